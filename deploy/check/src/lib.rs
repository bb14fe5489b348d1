//! Checks of everything under `deploy/` (Kubernetes manifests, systemd
//! units, the Grafana dashboard, the Prometheus rules). No code: the tests
//! are in `tests/deploy.rs`.

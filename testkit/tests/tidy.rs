//! Tidy: the invariants ARCHITECTURE.md states about where code lives,
//! checked over the workspace's sources (no build, no root).
//!
//! - every module has a `//!` header;
//! - only `agent/src/netlink/` uses the netlink crates (reads or writes
//!   netlink bytes), besides the golden-capture example;
//! - prost/`pb` types appear only in `proto` and the named edges (uplink,
//!   ingest, gRPC query, registry) and their tests;
//! - no `#[ignore]`d test;
//! - no `sleep` in tests without a `tidy:` comment saying why it is not a
//!   wait for a condition (waits use `wait_for` / `eventually`);
//! - the collector's query adapters (`http.rs`, `grpc_query.rs`,
//!   `resolve.rs`) pick no status for a failed query: only
//!   `collector/src/query.rs` maps `QueryError` to HTTP statuses and gRPC
//!   codes;
//! - `resolve.rs` and `query.rs` know no HTTP framework and no `http`
//!   module (no import cycle with the endpoints);
//! - the store knows no app configuration (`crate::config`): it takes its
//!   own options; the tantivy store's test hooks live only in its
//!   `hooks.rs`, compiled for tests and the `test-hooks` feature.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit inside the workspace")
        .to_path_buf()
}

/// Every `.rs` file of the workspace, as (path relative to the root, text).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(
                    name.as_str(),
                    "target" | "node_modules" | ".git" | "corpus" | "artifacts" | "run"
                ) {
                    walk(&path, root, out);
                }
            } else if name.ends_with(".rs") {
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.push((rel, text));
            }
        }
    }
    let root = workspace();
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    // This file names what it looks for.
    out.retain(|(p, _)| p != "testkit/tests/tidy.rs");
    out.sort();
    assert!(out.len() > 50, "workspace sources not found under {root:?}");
    out
}

fn fail_if_any(what: &str, bad: &[String]) {
    assert!(bad.is_empty(), "{what}:\n  {}", bad.join("\n  "));
}

#[test]
fn every_module_has_a_header() {
    let bad: Vec<String> = sources()
        .into_iter()
        .filter(|(p, _)| p.contains("/src/") || p.contains("/tests/"))
        .filter(|(_, t)| !t.trim_start().starts_with("//!"))
        .map(|(p, _)| p)
        .collect();
    fail_if_any("modules without a //! header", &bad);
}

#[test]
fn only_the_netlink_module_speaks_netlink() {
    let allowed = |p: &str| {
        p.starts_with("agent/src/netlink/")
            // Captures golden bytes for the decoder's tests.
            || p == "agent/examples/capture_golden.rs"
    };
    let bad: Vec<String> = sources()
        .into_iter()
        .filter(|(p, t)| {
            !allowed(p) && (t.contains("netlink_packet_") || t.contains("netlink_sys"))
        })
        .map(|(p, _)| p)
        .collect();
    fail_if_any("netlink crates used outside agent/src/netlink/", &bad);
}

#[test]
fn prost_types_stay_at_the_edges() {
    let allowed = |p: &str| {
        p.starts_with("proto/")
            || p.starts_with("agent/src/uplink/")
            || p.starts_with("fuzz/")
            || matches!(
                p,
                "collector/src/ingest.rs"
                    | "collector/src/grpc_query.rs"
                    | "collector/src/registry.rs"
                    // The forwarding client to the other collectors.
                    | "collector/src/peers.rs"
                    | "agent/tests/uplink.rs"
                    | "collector/tests/grpc.rs"
                    // Plays an agent's stream for the router tests.
                    | "collector/tests/api_router.rs"
            )
    };
    let bad: Vec<String> = sources()
        .into_iter()
        .filter(|(p, t)| !allowed(p) && (t.contains("ctw_proto::pb") || t.contains("prost::")))
        .map(|(p, _)| p)
        .collect();
    fail_if_any("prost types outside proto and the named edges", &bad);
}

#[test]
fn no_ignored_tests() {
    let attr = concat!("#[", "ignore");
    let bad: Vec<String> = sources()
        .into_iter()
        .filter(|(_, t)| t.contains(attr))
        .map(|(p, _)| p)
        .collect();
    fail_if_any("ignored tests", &bad);
}

#[test]
fn tests_do_not_sleep_to_wait() {
    let call = concat!("sleep", "(");
    let mut bad = Vec::new();
    for (p, t) in sources() {
        let is_test = p.contains("/tests/") || p.starts_with("testkit/");
        if !is_test {
            continue;
        }
        let lines: Vec<&str> = t.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if !l.contains(call) || l.trim_start().starts_with("//") {
                continue;
            }
            let justified =
                l.contains("tidy:") || i.checked_sub(1).is_some_and(|j| lines[j].contains("tidy:"));
            if !justified {
                bad.push(format!("{p}:{}: {}", i + 1, l.trim()));
            }
        }
    }
    fail_if_any(
        "sleep in tests (wait with wait_for/eventually, or say why with a `tidy:` comment)",
        &bad,
    );
}

/// The text of a source before its `#[cfg(test)]` module (tests may name
/// any status they assert).
fn non_test(t: &str) -> &str {
    t.split("#[cfg(test)]").next().unwrap_or(t)
}

#[test]
fn only_the_query_layer_maps_errors_to_status_codes() {
    const ADAPTERS: [&str; 3] = [
        "collector/src/http.rs",
        "collector/src/grpc_query.rs",
        "collector/src/resolve.rs",
    ];
    // Statuses of a failed query; 401, 414, 503 `starting` and the 404
    // "no such entry" answer are the HTTP layer's own.
    const ERROR_STATUSES: [&str; 14] = [
        "StatusCode::BAD_REQUEST",
        "StatusCode::BAD_GATEWAY",
        "StatusCode::GATEWAY_TIMEOUT",
        "StatusCode::INTERNAL_SERVER_ERROR",
        "StatusCode::PAYLOAD_TOO_LARGE,",
        "Status::invalid_argument",
        "Status::unavailable",
        "Status::internal",
        "Status::not_found",
        "Status::deadline_exceeded",
        "Status::resource_exhausted",
        "Code::InvalidArgument",
        "Code::Unavailable",
        "Code::Internal",
    ];
    let mut bad = Vec::new();
    for (p, t) in sources() {
        if !ADAPTERS.contains(&p.as_str()) {
            continue;
        }
        for s in ERROR_STATUSES {
            if non_test(&t).contains(s) {
                bad.push(format!("{p}: {s}"));
            }
        }
    }
    fail_if_any(
        "a query adapter picks an error status (map it in collector/src/query.rs)",
        &bad,
    );
}

#[test]
fn the_query_layer_knows_no_endpoint() {
    let mut bad = Vec::new();
    for (p, t) in sources() {
        if !matches!(
            p.as_str(),
            "collector/src/query.rs" | "collector/src/resolve.rs"
        ) {
            continue;
        }
        for s in [
            "crate::http",
            "axum::extract",
            "axum::routing",
            "axum::response",
        ] {
            if t.contains(s) {
                bad.push(format!("{p}: {s}"));
            }
        }
    }
    fail_if_any("the query layer depends on the HTTP endpoints", &bad);
}

#[test]
fn the_store_takes_its_own_options_and_hides_its_test_hooks() {
    let mut bad = Vec::new();
    for (p, t) in sources() {
        if p.starts_with("collector/src/store/") && t.contains("crate::config") {
            bad.push(format!("{p}: imports the app configuration"));
        }
        let hooks = "collector/src/store/tantivy_store/hooks.rs";
        if p.starts_with("collector/src/") && p != hooks {
            for hook in ["pub fn crash", "pub fn segment_count", "pub fn force_merge"] {
                if t.contains(hook) {
                    bad.push(format!("{p}: {hook} outside {hooks}"));
                }
            }
        }
        if p == "collector/src/store/tantivy_store/mod.rs"
            && !t.contains("#[cfg(any(test, feature = \"test-hooks\"))]\nmod hooks;")
        {
            bad.push(format!(
                "{p}: mod hooks is not behind the test-hooks feature"
            ));
        }
    }
    fail_if_any("store layout", &bad);
}

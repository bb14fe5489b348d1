//! Every Prometheus metric of the collector, in one place.
//!
//! Label values come only from fixed sets (reasons, results, routes, status
//! classes) and from node names (a cluster has few nodes; a node name is the
//! verified name of an agent's certificate, never a free string from the
//! wire). Never from addresses. Ingest updates counters once per batch.
//!
//! One exception, bounded by a hard cap: the workload counter
//! ([`WorkloadSeries`]) is labelled with Kubernetes namespaces, workload
//! kinds and names, and ports, at most `kubernetes.workload_series_max`
//! label sets; never pod names or addresses.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ctw_common::metrics::{counter, counter_vec, gauge, register};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry,
    TextEncoder,
};

/// Why a TLS handshake on the gRPC port failed (label `reason`).
pub const HANDSHAKE_REASONS: [&str; 6] = [
    "no_certificate",
    "unknown_ca",
    "bad_certificate",
    "timeout",
    "protocol",
    "io",
];

/// Why an ingest stream was refused (label `reason`).
pub const REFUSAL_REASONS: [&str; 4] = [
    "no_certificate",
    "bad_certificate",
    "bad_hello",
    "node_mismatch",
];

/// Outcomes of a live lookup (label `result`).
pub const LOOKUP_RESULTS: [&str; 5] = [
    "found",
    "not_found",
    "timeout",
    "not_connected",
    "agent_error",
];

/// All collector metrics. Cheap to clone (the series are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// TLS handshakes on the gRPC port that failed, by `reason` ([`HANDSHAKE_REASONS`]).
    pub tls_handshake_failures: IntCounterVec,
    /// TLS handshakes that succeeded.
    pub tls_handshakes: IntCounter,
    /// Reloads of the TLS files after a change, by `result` (`ok`, `error`).
    pub tls_reloads: IntCounterVec,
    /// Agents with an open ingest stream.
    pub agents_connected: IntGauge,
    /// Ingest streams refused after the handshake, by `reason` ([`REFUSAL_REASONS`]).
    pub streams_refused: IntCounterVec,
    /// Batches stored, by `node`.
    pub batches_stored: IntCounterVec,
    /// Batches already stored before (replays), by `node`; acked, not stored again.
    pub batches_duplicate: IntCounterVec,
    /// Batches the store failed to append, by `node`; not acked, the agent resends.
    pub batches_failed: IntCounterVec,
    /// Records stored, by `node`.
    pub records_stored: IntCounterVec,
    /// Wire records that could not be converted (skipped, the rest of the batch
    /// is stored), by `node`.
    pub record_conversion_errors: IntCounterVec,
    /// Time of one `RecordStore::append`.
    pub store_append_seconds: Histogram,
    /// Gaps (loss reports, disconnections) the store failed to record.
    pub gap_record_errors: IntCounter,
    /// Acks sent to agents.
    pub acks_sent: IntCounter,
    /// Live lookups sent to one agent, by `result` ([`LOOKUP_RESULTS`]).
    pub lookups: IntCounterVec,
    /// Live lookups forwarded to the collector holding the agent's stream
    /// (replicas), by `result` ([`LOOKUP_RESULTS`]).
    pub lookups_forwarded: IntCounterVec,
    /// Rounds of writing or reading the lease table that failed (replicas).
    pub lease_errors: IntCounter,
    /// This collector's clock minus the ClickHouse server's, in whole
    /// seconds (replicas; measured every minute, ±1 s): leases compare
    /// wall clocks, so collectors must agree within a few seconds.
    pub clock_offset: IntGauge,
    /// Loss reports received, by `node`.
    pub loss_reports: IntCounterVec,
    /// Events or records agents reported lost, by `node`.
    pub events_lost: IntCounterVec,
    /// HTTP requests by `route` (the route pattern, not the path) and
    /// `status` class (`2xx`, `4xx`, ...). See [`Metrics::http_request`].
    pub http_requests: IntCounterVec,
    /// HTTP request durations by `route`.
    pub http_request_seconds: HistogramVec,
    /// HTTP requests refused for a missing or wrong bearer token.
    pub http_auth_failures: IntCounter,
    /// Records in the store (as of the last scrape).
    pub store_records: IntGauge,
    /// Bytes the store uses on disk.
    pub store_bytes: IntGauge,
    /// Index partitions on disk.
    pub store_partitions: IntGauge,
    /// Pod watch inputs applied to the pod history (pods and owners).
    pub pod_watch_events: IntCounter,
    /// Watch failures (retried with backoff), by `watch` ([`POD_WATCHES`]);
    /// a `pods` failure opens a history gap.
    pub pod_watch_failures: IntCounterVec,
    /// Pods whose `metadata.uid` is not a UUID (skipped).
    pub pods_rejected: IntCounter,
    /// Pod IP intervals open (live pods with an IP, per IP).
    pub pod_intervals_live: IntGauge,
    /// Pod IP intervals kept (open and closed, within retention).
    pub pod_intervals: IntGauge,
    /// Watch gaps kept in the pod history.
    pub pod_history_gaps: IntGauge,
    /// Intervals closed because a newer pod (another UID) took the IP.
    pub pod_ip_fenced: IntCounter,
    /// Closed intervals evicted by `kubernetes.max_closed_intervals` (their
    /// times are answered `history_gap`).
    pub pod_intervals_evicted: IntCounter,
    /// Pod history journal writes that failed, and journal lines that did
    /// not parse at start-up (skipped).
    pub pod_journal_errors: IntCounterVec,
    /// New connections per workload and port (bounded label sets).
    pub workloads: WorkloadSeries,
}

/// The `_other` label value: the one series of
/// `ctw_collector_workload_new_connections_total` (every label `_other`)
/// that counts connections once the cap of label sets is reached.
pub const OTHER: &str = "_other";

/// `ctw_collector_workload_new_connections_total{namespace, workload_kind,
/// workload, port}`: NEW connections (not mid-stream) from pods, by the
/// pod's workload as of the connection's start (from the pod history), fed
/// at ingest once per batch ([`crate::pods::PodHistory::workload_counts`]).
/// At most `max` label sets are ever created (`kubernetes.workload_series_max`,
/// for the process's life: a series is never dropped, so a rate stays
/// right); connections of any further label set count in the one series
/// whose labels are all [`OTHER`], and in
/// `ctw_collector_workload_series_overflow_total`.
#[derive(Debug, Clone)]
pub struct WorkloadSeries {
    pub counter: IntCounterVec,
    /// Connections counted in the `_other` series.
    pub overflow: IntCounter,
    max: Arc<AtomicUsize>,
    seen: Arc<Mutex<HashSet<crate::pods::WorkloadKey>>>,
}

impl WorkloadSeries {
    /// Set the cap of label sets (`kubernetes.workload_series_max`); label
    /// sets already created stay.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Add one batch's counts.
    pub fn add(&self, counts: &[(crate::pods::WorkloadKey, u64)]) {
        if counts.is_empty() {
            return;
        }
        let max = self.max.load(Ordering::Relaxed);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (k, n) in counts {
            if seen.contains(k) || seen.len() < max {
                if !seen.contains(k) {
                    seen.insert(k.clone());
                }
                let port = k.port.to_string();
                self.counter
                    .with_label_values(&[&k.namespace, &k.kind, &k.name, &port])
                    .inc_by(*n);
            } else {
                self.counter
                    .with_label_values(&[OTHER, OTHER, OTHER, OTHER])
                    .inc_by(*n);
                self.overflow.inc_by(*n);
            }
        }
    }

    /// Label sets created (the `_other` series not included).
    pub fn series(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The watches of the pod history (label `watch`).
pub const POD_WATCHES: [&str; 3] = ["pods", "replicasets", "jobs"];

/// Buckets from 100 µs to 10 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

impl Metrics {
    /// Create the metrics; series of fixed label sets exist from the start
    /// (value 0).
    pub fn new() -> Metrics {
        let r = Registry::new();
        let store_append_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "ctw_collector_store_append_seconds",
                    "Time to durably append one batch to the store",
                )
                .buckets(latency_buckets()),
            ),
        );
        let http_request_seconds = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "ctw_collector_http_request_seconds",
                    "HTTP request durations, per route",
                )
                .buckets(latency_buckets()),
                &["route"],
            ),
        );
        let m = Metrics {
            tls_handshake_failures: counter_vec(
                &r,
                "ctw_collector_tls_handshake_failures_total",
                "TLS handshakes on the gRPC port that failed, per reason",
                &["reason"],
            ),
            tls_handshakes: counter(
                &r,
                "ctw_collector_tls_handshakes_total",
                "TLS handshakes on the gRPC port that succeeded",
            ),
            tls_reloads: counter_vec(
                &r,
                "ctw_collector_tls_reloads_total",
                "Reloads of the gRPC TLS files after they changed, per result",
                &["result"],
            ),
            agents_connected: gauge(
                &r,
                "ctw_collector_agents_connected",
                "Agents with an open ingest stream",
            ),
            streams_refused: counter_vec(
                &r,
                "ctw_collector_streams_refused_total",
                "Ingest streams refused after the TLS handshake, per reason",
                &["reason"],
            ),
            batches_stored: counter_vec(
                &r,
                "ctw_collector_batches_stored_total",
                "Record batches durably stored, per node",
                &["node"],
            ),
            batches_duplicate: counter_vec(
                &r,
                "ctw_collector_batches_duplicate_total",
                "Record batches received again after being stored (acked, not stored twice), per node",
                &["node"],
            ),
            batches_failed: counter_vec(
                &r,
                "ctw_collector_batches_failed_total",
                "Record batches the store could not append (not acked), per node",
                &["node"],
            ),
            records_stored: counter_vec(
                &r,
                "ctw_collector_records_stored_total",
                "Records durably stored, per node",
                &["node"],
            ),
            record_conversion_errors: counter_vec(
                &r,
                "ctw_collector_record_conversion_errors_total",
                "Wire records that could not be converted and were skipped, per node",
                &["node"],
            ),
            store_append_seconds,
            gap_record_errors: counter(
                &r,
                "ctw_collector_gap_record_errors_total",
                "Loss or disconnection gaps the store could not record",
            ),
            acks_sent: counter(
                &r,
                "ctw_collector_acks_sent_total",
                "Batch acknowledgements sent to agents",
            ),
            lookups: counter_vec(
                &r,
                "ctw_collector_lookups_total",
                "Live lookups sent to one agent, per result",
                &["result"],
            ),
            lookups_forwarded: counter_vec(
                &r,
                "ctw_collector_lookups_forwarded_total",
                "Live lookups forwarded to the collector holding the agent's stream, per result",
                &["result"],
            ),
            lease_errors: counter(
                &r,
                "ctw_collector_lease_errors_total",
                "Rounds of writing or reading the replicas' lease table that failed",
            ),
            clock_offset: gauge(
                &r,
                "ctw_collector_clock_offset_seconds",
                "This collector's clock minus the ClickHouse server's, in seconds (replicas)",
            ),
            loss_reports: counter_vec(
                &r,
                "ctw_collector_loss_reports_total",
                "Loss reports received from agents, per node",
                &["node"],
            ),
            events_lost: counter_vec(
                &r,
                "ctw_collector_agent_events_lost_total",
                "Events or records agents reported lost, per node",
                &["node"],
            ),
            http_requests: counter_vec(
                &r,
                "ctw_collector_http_requests_total",
                "HTTP requests, per route and status class",
                &["route", "status"],
            ),
            http_request_seconds,
            http_auth_failures: counter(
                &r,
                "ctw_collector_http_auth_failures_total",
                "HTTP requests refused for a missing or wrong bearer token",
            ),
            store_records: gauge(&r, "ctw_collector_store_records", "Records in the store"),
            store_bytes: gauge(&r, "ctw_collector_store_bytes", "Bytes the store uses on disk"),
            store_partitions: gauge(&r, "ctw_collector_store_partitions", "Index partitions on disk"),
            pod_watch_events: counter(
                &r,
                "ctw_collector_pod_watch_events_total",
                "Pod and owner watch events applied to the pod history",
            ),
            pod_watch_failures: counter_vec(
                &r,
                "ctw_collector_pod_watch_failures_total",
                "Kubernetes watch failures (retried), per watch; pods failures open a history gap",
                &["watch"],
            ),
            pods_rejected: counter(
                &r,
                "ctw_collector_pods_rejected_total",
                "Pods skipped because their metadata.uid is not a UUID",
            ),
            pod_intervals_live: gauge(
                &r,
                "ctw_collector_pod_intervals_live",
                "Open pod IP intervals (live pods holding an IP)",
            ),
            pod_intervals: gauge(
                &r,
                "ctw_collector_pod_intervals",
                "Pod IP intervals kept, open and closed",
            ),
            pod_history_gaps: gauge(
                &r,
                "ctw_collector_pod_history_gaps",
                "Watch gaps kept in the pod history",
            ),
            pod_ip_fenced: counter(
                &r,
                "ctw_collector_pod_ip_fenced_total",
                "Pod IP intervals closed because a newer pod took the IP",
            ),
            pod_intervals_evicted: counter(
                &r,
                "ctw_collector_pod_intervals_evicted_total",
                "Closed pod IP intervals evicted by kubernetes.max_closed_intervals (answered history_gap)",
            ),
            pod_journal_errors: counter_vec(
                &r,
                "ctw_collector_pod_journal_errors_total",
                "Pod history journal errors, per kind (write, bad_line)",
                &["kind"],
            ),
            workloads: WorkloadSeries {
                counter: counter_vec(
                    &r,
                    "ctw_collector_workload_new_connections_total",
                    "New connections from pods (NEW records, not mid-stream), per namespace, workload \
                     (as of the connection's start) and destination port; label sets capped by \
                     kubernetes.workload_series_max, the rest in the _other series",
                    &["namespace", "workload_kind", "workload", "port"],
                ),
                overflow: counter(
                    &r,
                    "ctw_collector_workload_series_overflow_total",
                    "New connections counted in the _other series of \
                     ctw_collector_workload_new_connections_total (label-set cap reached)",
                ),
                max: Arc::new(AtomicUsize::new(crate::config::DEFAULT_WORKLOAD_SERIES_MAX)),
                seen: Arc::new(Mutex::new(HashSet::new())),
            },
            registry: r,
        };
        for reason in HANDSHAKE_REASONS {
            m.tls_handshake_failures.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            m.tls_reloads.with_label_values(&[result]);
        }
        for reason in REFUSAL_REASONS {
            m.streams_refused.with_label_values(&[reason]);
        }
        for result in LOOKUP_RESULTS {
            m.lookups.with_label_values(&[result]);
            m.lookups_forwarded.with_label_values(&[result]);
        }
        for w in POD_WATCHES {
            m.pod_watch_failures.with_label_values(&[w]);
        }
        for k in ["write", "bad_line"] {
            m.pod_journal_errors.with_label_values(&[k]);
        }
        m
    }

    /// Count one HTTP request. `route` is the route pattern (a fixed set, e.g.
    /// `/api/v1/connections`), never the raw path; `status` is folded into
    /// its class (`2xx` ...).
    pub fn http_request(&self, route: &'static str, status: u16, seconds: f64) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests.with_label_values(&[route, class]).inc();
        self.http_request_seconds
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// Count a request refused for its bearer token.
    pub fn http_auth_failure(&self) {
        self.http_auth_failures.inc();
    }

    /// The registry, for metrics defined elsewhere (none today).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric in the Prometheus text format.
    /// Copy the store's size into the gauges (called at scrape).
    pub fn sync_store(&self, st: &crate::store::StoreStats) {
        self.store_records.set(st.records as i64);
        self.store_bytes.set(st.bytes_on_disk as i64);
        self.store_partitions.set(st.partitions as i64);
    }

    /// Copy the pod history's state into the pod gauges and counters
    /// (called by the pod watch at each heartbeat).
    pub fn sync_pods(&self, h: &crate::pods::PodHistory) {
        let st = h.stats();
        self.pod_intervals_live.set(st.live as i64);
        self.pod_intervals.set(st.intervals as i64);
        self.pod_history_gaps.set(st.gaps as i64);
        let up = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        up(&self.pod_ip_fenced, st.history.fenced);
        up(&self.pod_intervals_evicted, st.history.evicted);
        up(
            &self.pod_journal_errors.with_label_values(&["write"]),
            st.journal_errors,
        );
        up(
            &self.pod_journal_errors.with_label_values(&["bad_line"]),
            st.bad_lines,
        );
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_series_exist_from_the_start() {
        let m = Metrics::new();
        let text = m.render();
        assert!(
            text.contains("ctw_collector_tls_handshake_failures_total{reason=\"unknown_ca\"} 0")
        );
        assert!(text.contains("ctw_collector_streams_refused_total{reason=\"node_mismatch\"} 0"));
        assert!(text.contains("ctw_collector_lookups_total{result=\"timeout\"} 0"));
    }

    fn key(ns: &str, name: &str, port: u16) -> crate::pods::WorkloadKey {
        crate::pods::WorkloadKey {
            namespace: ns.into(),
            kind: "Deployment".into(),
            name: name.into(),
            port,
        }
    }

    #[test]
    fn workload_series_are_capped_and_the_rest_goes_to_other() {
        let m = Metrics::new();
        m.workloads.set_max(2);
        m.workloads.add(&[
            (key("payments", "checkout", 443), 3),
            (key("payments", "cart", 443), 1),
        ]);
        // A third label set (another port counts as one too): _other.
        m.workloads.add(&[
            (key("payments", "checkout", 80), 5),
            (key("payments", "checkout", 443), 2),
            (key("shop", "web", 443), 7),
        ]);
        let text = m.render();
        let value = |labels: &str| {
            let line = format!("ctw_collector_workload_new_connections_total{{{labels}}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&line))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let series = |ns: &str, name: &str, port: u16| {
            value(&format!(
                "namespace=\"{ns}\",port=\"{port}\",workload=\"{name}\",workload_kind=\"Deployment\""
            ))
        };
        assert_eq!(series("payments", "checkout", 443), Some(5), "{text}");
        assert_eq!(series("payments", "cart", 443), Some(1), "{text}");
        assert_eq!(series("payments", "checkout", 80), None, "{text}");
        assert_eq!(series("shop", "web", 443), None, "{text}");
        assert_eq!(
            value(
                "namespace=\"_other\",port=\"_other\",workload=\"_other\",workload_kind=\"_other\""
            ),
            Some(12),
            "{text}"
        );
        assert!(
            text.contains("ctw_collector_workload_series_overflow_total 12"),
            "{text}"
        );
        assert_eq!(m.workloads.series(), 2);
        // Label sets never exceed the cap, however many workloads come.
        for i in 0..100 {
            m.workloads.add(&[(key("ns", &format!("w{i}"), 443), 1)]);
        }
        let n = m
            .render()
            .lines()
            .filter(|l| l.starts_with("ctw_collector_workload_new_connections_total{"))
            .count();
        assert_eq!(n, 3, "two label sets and _other");
    }

    #[test]
    fn http_status_is_folded_into_its_class() {
        let m = Metrics::new();
        m.http_request("/api/v1/connections", 404, 0.001);
        m.http_request("/api/v1/connections", 400, 0.001);
        m.http_auth_failure();
        let text = m.render();
        assert!(
            text.contains(
                "ctw_collector_http_requests_total{route=\"/api/v1/connections\",status=\"4xx\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("ctw_collector_http_auth_failures_total 1"));
    }
}

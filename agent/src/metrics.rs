//! Every Prometheus metric of the agent, in one place.
//!
//! Label values come only from the configured ports and a fixed set of kinds;
//! never from addresses. The capture thread updates counters once per batch.

use ctw_common::metrics::{counter, counter_vec, gauge, register};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Registry, TextEncoder,
};

/// Buckets of `ctw_event_lag_seconds`: 100 µs to 10 s.
pub const EVENT_LAG_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

use crate::logfile::LogStats;

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// The seed's metric: new connections per watched port.
    pub new_connections: IntCounterVec,
    /// DESTROY events per watched port.
    pub closed_connections: IntCounterVec,
    /// Netlink messages read from the event socket.
    pub events_received: IntCounter,
    /// Messages read but not kept: other ports or protocols, no ports, updates.
    pub events_filtered: IntCounter,
    /// NEW events for entries already emitted (recovered by a dump before the
    /// event was read).
    pub events_duplicate: IntCounter,
    /// Messages that could not be decoded (counted, skipped).
    pub decode_errors: IntCounter,
    /// Events the kernel could not queue on the socket (`/proc/net/netlink` Drops).
    pub events_lost: IntCounter,
    /// ENOBUFS reports on the event socket.
    pub overflows: IntCounter,
    /// Table dumps done to resync after loss (not counting start-up).
    pub resyncs: IntCounter,
    /// Entries found by a dump that were not seen as events.
    pub recovered: IntCounterVec,
    /// Receive buffer the kernel granted the event socket.
    pub rcvbuf_bytes: IntGauge,
    /// 1 when the kernel-side BPF filter is attached.
    pub kernel_filter: IntGauge,
    /// Entries of watched ports the agent believes alive.
    pub tracked_entries: IntGauge,
    /// Live entries ended because a NEW or recovered entry took their
    /// (zone, protocol, reply tuple): the kernel holds one entry per reply tuple.
    pub entries_superseded: IntCounter,
    /// Recovered entries a re-check (GET by tuple, dump) found gone.
    pub entries_found_gone: IntCounter,
    /// Recovered entries waiting for a re-check (end unknown).
    pub entries_pending_recheck: IntGauge,
    /// TCP NEW events picked up mid-stream (state not SYN_SENT), per watched port.
    pub midstream_pickups: IntCounterVec,
    /// DESTROY events of NAT-clash shadow entries (`IPS_NAT_CLASH`): not records.
    pub nat_clash: IntCounter,
    /// Seconds from the kernel's event time (`CTA_TIMESTAMP_EVENT`, or the
    /// start/stop time) to the agent's read, once per kept record that has
    /// a kernel time (needs `nf_conntrack_timestamp=1`).
    pub event_lag: Histogram,
    log_written: IntCounter,
    log_dropped: IntCounter,
    log_errors: IntCounter,
    log_rotations: IntCounter,
    log_healthy: IntGauge,
    /// The collector uplink (`ctw_uplink_*`); stays at zero without a collector.
    pub uplink: UplinkMetrics,
}

/// Metrics of the collector uplink ([`crate::uplink`]).
#[derive(Debug, Clone)]
pub struct UplinkMetrics {
    /// 1 while the stream to the collector is up (Hello acknowledged).
    pub connected: IntGauge,
    /// Connection attempts after a failed attempt or a lost connection.
    pub reconnects: IntCounter,
    pub batches_sent: IntCounter,
    pub batches_acked: IntCounter,
    pub records_sent: IntCounter,
    pub records_acked: IntCounter,
    /// Records written to the spool (collector away or in-flight window full).
    pub records_spooled: IntCounter,
    /// Bytes of batch files in the spool.
    pub spool_bytes: IntGauge,
    /// Records dropped by the uplink, by reason: `spool_overflow` (oldest
    /// spooled batches deleted), `uplink_queue` (capture outran the uplink),
    /// `spool_error` (an unreadable spool file). Each is also reported to the
    /// collector as a loss.
    pub records_dropped: IntCounterVec,
    /// Batches not yet acknowledged (in memory and in the spool).
    pub unacked_batches: IntGauge,
    /// Loss reports sent to the collector (resends included).
    pub loss_reports_sent: IntCounter,
    /// Lookup requests from the collector answered.
    pub lookups_answered: IntCounter,
    /// Heartbeats sent to the collector.
    pub heartbeats_sent: IntCounter,
}

impl UplinkMetrics {
    /// Reasons of `ctw_uplink_records_dropped_total`.
    pub const DROP_REASONS: [&'static str; 3] = ["spool_overflow", "uplink_queue", "spool_error"];

    fn new(r: &Registry) -> UplinkMetrics {
        let m = UplinkMetrics {
            connected: gauge(
                r,
                "ctw_uplink_connected",
                "1 while the stream to the collector is up",
            ),
            reconnects: counter(
                r,
                "ctw_uplink_reconnects_total",
                "Connection attempts to the collector after a failure or a lost connection",
            ),
            batches_sent: counter(
                r,
                "ctw_uplink_batches_sent_total",
                "Record batches sent to the collector (resends included)",
            ),
            batches_acked: counter(
                r,
                "ctw_uplink_batches_acked_total",
                "Record batches the collector acknowledged as stored",
            ),
            records_sent: counter(
                r,
                "ctw_uplink_records_sent_total",
                "Records sent to the collector (resends included)",
            ),
            records_acked: counter(
                r,
                "ctw_uplink_records_acked_total",
                "Records the collector acknowledged as stored",
            ),
            records_spooled: counter(
                r,
                "ctw_uplink_records_spooled_total",
                "Records written to the on-disk spool",
            ),
            spool_bytes: gauge(
                r,
                "ctw_uplink_spool_bytes",
                "Bytes of unacknowledged batches in the spool",
            ),
            records_dropped: counter_vec(
                r,
                "ctw_uplink_records_dropped_total",
                "Records the uplink dropped (each reported to the collector as a loss)",
                &["reason"],
            ),
            unacked_batches: gauge(
                r,
                "ctw_uplink_unacked_batches",
                "Record batches not yet acknowledged by the collector (memory and spool)",
            ),
            loss_reports_sent: counter(
                r,
                "ctw_uplink_loss_reports_sent_total",
                "Loss reports sent to the collector (resends included)",
            ),
            lookups_answered: counter(
                r,
                "ctw_uplink_lookups_answered_total",
                "Live lookups answered for the collector",
            ),
            heartbeats_sent: counter(
                r,
                "ctw_uplink_heartbeats_sent_total",
                "Heartbeats sent to the collector",
            ),
        };
        for reason in Self::DROP_REASONS {
            m.records_dropped.with_label_values(&[reason]);
        }
        m
    }
}

impl Metrics {
    /// Create the metrics; per-port series exist from the start (value 0)
    /// for every watched port.
    pub fn new(ports: &[u16]) -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            new_connections: counter_vec(
                &r,
                "conntrack_new_connections_total",
                "New connections seen by conntrack, per watched destination port",
                &["port"],
            ),
            closed_connections: counter_vec(
                &r,
                "conntrack_closed_connections_total",
                "Connections destroyed by conntrack, per watched destination port",
                &["port"],
            ),
            events_received: counter(
                &r,
                "ctw_events_received_total",
                "Netlink messages read from the event socket",
            ),
            events_filtered: counter(
                &r,
                "ctw_events_filtered_total",
                "Messages read but not kept (other ports or protocols, no ports)",
            ),
            events_duplicate: counter(
                &r,
                "ctw_events_duplicate_total",
                "NEW events for entries a table dump had already emitted",
            ),
            decode_errors: counter(
                &r,
                "ctw_decode_errors_total",
                "Netlink messages that could not be decoded",
            ),
            events_lost: counter(
                &r,
                "ctw_events_lost_total",
                "Events the kernel dropped because the socket buffer was full",
            ),
            overflows: counter(
                &r,
                "ctw_socket_overflows_total",
                "ENOBUFS reports on the event socket",
            ),
            resyncs: counter(
                &r,
                "ctw_resyncs_total",
                "Table dumps done to recover from event loss",
            ),
            recovered: counter_vec(
                &r,
                "ctw_records_recovered_total",
                "Entries found by a table dump that were not seen as events",
                &["reason"],
            ),
            rcvbuf_bytes: gauge(
                &r,
                "ctw_netlink_rcvbuf_bytes",
                "Receive buffer of the event socket",
            ),
            kernel_filter: gauge(
                &r,
                "ctw_kernel_filter_attached",
                "1 when the BPF port filter is attached",
            ),
            tracked_entries: gauge(
                &r,
                "ctw_tracked_entries",
                "Watched conntrack entries believed alive",
            ),
            entries_superseded: counter(
                &r,
                "ctw_entries_superseded_total",
                "Live entries ended by a newer entry with the same zone, protocol and reply tuple",
            ),
            entries_found_gone: counter(
                &r,
                "ctw_entries_found_gone_total",
                "Recovered entries a re-check found gone (logged as closed, gone: true)",
            ),
            entries_pending_recheck: gauge(
                &r,
                "ctw_entries_pending_recheck",
                "Recovered entries whose end is unknown, re-checked periodically",
            ),
            midstream_pickups: counter_vec(
                &r,
                "ctw_midstream_pickups_total",
                "TCP entries picked up mid-stream (NEW in a state other than SYN_SENT), per watched port",
                &["port"],
            ),
            nat_clash: counter(
                &r,
                "ctw_nat_clash_total",
                "DESTROY events of NAT-clash shadow entries (IPS_NAT_CLASH), never records",
            ),
            event_lag: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ctw_event_lag_seconds",
                        "Time from the kernel's event timestamp to the agent reading the event (nf_conntrack_timestamp=1)",
                    )
                    .buckets(EVENT_LAG_BUCKETS.to_vec()),
                ),
            ),
            log_written: counter(
                &r,
                "ctw_log_records_written_total",
                "Records written to the JSON log",
            ),
            log_dropped: counter(
                &r,
                "ctw_log_records_dropped_total",
                "Records not written because the log writer was behind (slow or full disk)",
            ),
            log_errors: counter(
                &r,
                "ctw_log_write_errors_total",
                "Failed writes to the JSON log",
            ),
            log_rotations: counter(&r, "ctw_log_rotations_total", "Log file rotations"),
            log_healthy: gauge(
                &r,
                "ctw_log_healthy",
                "1 while the last log write succeeded",
            ),
            uplink: UplinkMetrics::new(&r),
            registry: r,
        };
        for p in ports {
            let p = p.to_string();
            m.new_connections.with_label_values(&[&p]);
            m.closed_connections.with_label_values(&[&p]);
            m.midstream_pickups.with_label_values(&[&p]);
        }
        for reason in ["startup", "loss"] {
            m.recovered.with_label_values(&[reason]);
        }
        m
    }

    /// Copy the log writer's counters into the registry (called at scrape).
    pub fn sync_log_stats(&self, s: &LogStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let up = |c: &IntCounter, v: u64| {
            let cur = c.get();
            if v > cur {
                c.inc_by(v - cur);
            }
        };
        up(&self.log_written, s.written_records.load(Relaxed));
        up(&self.log_dropped, s.dropped_records.load(Relaxed));
        up(&self.log_errors, s.write_errors.load(Relaxed));
        up(&self.log_rotations, s.rotations.load(Relaxed));
        self.log_healthy.set(i64::from(s.healthy.load(Relaxed)));
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_metric_name_and_label() {
        let m = Metrics::new(&[80, 443]);
        m.new_connections.with_label_values(&["443"]).inc_by(3);
        let text = m.render();
        assert!(
            text.contains("conntrack_new_connections_total{port=\"443\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("conntrack_new_connections_total{port=\"80\"} 0"),
            "{text}"
        );
    }
}

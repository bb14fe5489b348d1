//! The agent's stream to the collector (the `collector:` config section).
//!
//! [`Uplink::start`] returns the uplink and an [`UplinkSink`], the
//! [`RecordSink`] the capture thread sends to. The sink never waits: records
//! cross a queue bounded in records (`queue_max_records`); what does not fit
//! is counted and reported to the collector as an `uplink_queue` loss with
//! its exact count and time window.
//!
//! The uplink runs on its own thread with a current-thread tokio runtime
//! (module `task`). It batches records by size and time; each batch gets
//! (boot id, seq): a random id of this agent process and 1, 2, 3 ... The
//! batches not yet acknowledged live in the outbox: in memory while they fit
//! the in-flight window of a live stream, otherwise in the on-disk spool
//! (`spool_dir`, bounded by `spool_max_mb`, oldest dropped first with an
//! exact `spool_overflow` loss report). Batches spooled by an earlier run
//! keep their boot id and seq and are sent first after a restart, so the
//! collector's (node, boot id, seq) dedup makes every replay harmless.
//!
//! One bidirectional gRPC stream per connection, over mTLS: Hello, wait for
//! HelloAck, then everything unacknowledged oldest first, then new batches;
//! acks remove batches; a heartbeat every `heartbeat_interval_ms` (when the
//! collector's HelloAck says it takes them) tells the collector the agent's
//! time, live-entry count and newest record time; lookup requests are answered with the lookup
//! function (netlink GET) on a blocking thread. Reconnects use exponential
//! backoff with jitter and never give up.
//!
//! Delivery guarantee: at least once for every record the sink accepted,
//! unless it is reported lost (`spool_overflow`, `spool_error`), or the
//! agent process dies with batches not yet in the spool (the queue and the
//! in-flight window live in memory; a clean stop spools them).

mod conn;
mod losses;
mod outbox;
mod spool;
mod task;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ctw_common::ConnRecord;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};

use crate::capture::{Loss, RecordSink};
use crate::http::LookupFn;
use crate::metrics::Metrics;

pub use conn::{host_addresses, CONNECTION_WINDOW_BYTES, STREAM_WINDOW_BYTES};

/// `collector:` section of the agent config. Absent = standalone agent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// `https://host:port` of the collector's gRPC listener.
    pub address: String,
    pub tls: UplinkTls,
    /// Where unacknowledged batches are spooled while the collector is away.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Spool bound; when full the oldest batches are dropped and the exact
    /// loss is reported.
    #[serde(default = "default_spool_max_mb")]
    pub spool_max_mb: u64,
    /// A batch is sent when it has this many records ...
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// ... or when its oldest record is this old.
    #[serde(default = "default_batch_max_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// Batches sent and not yet acknowledged before new ones wait in memory
    /// (and then in the spool).
    #[serde(default = "default_max_inflight_batches")]
    pub max_inflight_batches: usize,
    /// The node's own addresses (the SNAT addresses it owns), reported in
    /// Hello. Empty = every global address of the host's interfaces.
    #[serde(default)]
    pub node_addresses: Vec<String>,
    /// TLS server name to verify; default: the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// ... or when its encoded size reaches this many bytes.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// Records waiting between the capture thread and the uplink; beyond
    /// this the capture's records are counted and reported as an
    /// `uplink_queue` loss (never waited for). About 2.6 s at 100k records/s.
    #[serde(default = "default_queue_max_records")]
    pub queue_max_records: usize,
    /// First reconnect delay; it doubles (with jitter) up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Limit for connecting: TCP, TLS, opening the stream, and the HelloAck.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Interval of the stream's heartbeat (agent time, live entries, newest
    /// record time), sent also when there is nothing else to send; only to
    /// collectors that announce heartbeats in their HelloAck.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/lib/conntrack-watch/spool")
}
fn default_spool_max_mb() -> u64 {
    1024
}
fn default_batch_max_records() -> usize {
    2000
}
fn default_batch_max_delay_ms() -> u64 {
    200
}
fn default_max_inflight_batches() -> usize {
    64
}
fn default_batch_max_bytes() -> usize {
    1 << 20
}
fn default_queue_max_records() -> usize {
    262_144
}
fn default_reconnect_min_ms() -> u64 {
    200
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_heartbeat_interval_ms() -> u64 {
    10_000
}

impl UplinkConfig {
    /// A config with every default, for `address` and the TLS files.
    pub fn new(address: impl Into<String>, tls: UplinkTls) -> UplinkConfig {
        UplinkConfig {
            address: address.into(),
            tls,
            spool_dir: default_spool_dir(),
            spool_max_mb: default_spool_max_mb(),
            batch_max_records: default_batch_max_records(),
            batch_max_delay_ms: default_batch_max_delay_ms(),
            max_inflight_batches: default_max_inflight_batches(),
            node_addresses: Vec::new(),
            server_name: None,
            batch_max_bytes: default_batch_max_bytes(),
            queue_max_records: default_queue_max_records(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
        }
    }

    /// Checks the values; the error names the key and the value.
    pub fn validate(&self) -> Result<(), String> {
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(format!(
                    "collector.{key}: {v} is out of range ({lo}..={hi})"
                ))
            } else {
                Ok(())
            }
        };
        conn::parse_address(&self.address).map_err(|e| format!("collector.address: {e}"))?;
        if let Some(n) = &self.server_name {
            if n.is_empty() {
                return Err("collector.server_name: empty".into());
            }
        }
        for a in &self.node_addresses {
            a.parse::<std::net::IpAddr>()
                .map_err(|_| format!("collector.node_addresses: {a:?} is not an IP address"))?;
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err("collector.spool_dir: empty".into());
        }
        range("spool_max_mb", self.spool_max_mb, 1, 1 << 20)?;
        range(
            "batch_max_records",
            self.batch_max_records as u64,
            1,
            100_000,
        )?;
        range(
            "batch_max_bytes",
            self.batch_max_bytes as u64,
            4096,
            32 << 20,
        )?;
        range("batch_max_delay_ms", self.batch_max_delay_ms, 1, 60_000)?;
        range(
            "max_inflight_batches",
            self.max_inflight_batches as u64,
            1,
            100_000,
        )?;
        range(
            "queue_max_records",
            self.queue_max_records as u64,
            1,
            1 << 26,
        )?;
        range("reconnect_min_ms", self.reconnect_min_ms, 1, 3_600_000)?;
        range(
            "reconnect_max_ms",
            self.reconnect_max_ms,
            self.reconnect_min_ms,
            3_600_000,
        )?;
        range("connect_timeout_ms", self.connect_timeout_ms, 100, 600_000)?;
        range(
            "heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            100,
            600_000,
        )?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("{0}")]
    Config(String),
    #[error("spool: {0}")]
    Spool(String),
    #[error("cannot start the uplink thread: {0}")]
    Thread(std::io::Error),
}

/// Records the sink could not queue, not yet reported.
#[derive(Debug, Default)]
struct QueueDrops {
    count: u64,
    from_ns: u64,
    to_ns: u64,
}

/// State shared by the sink (capture thread) and the uplink task.
#[derive(Debug)]
struct Shared {
    /// Records in the queue.
    queued: AtomicUsize,
    max_queued: usize,
    queue_drops: Mutex<QueueDrops>,
    capture_losses: Mutex<Vec<Loss>>,
    /// Wakes the task when the two above have news.
    news: Notify,
    stop: Notify,
}

impl Shared {
    fn take_queue_drops(&self) -> Option<QueueDrops> {
        let mut d = self.queue_drops.lock().ok()?;
        if d.count == 0 {
            return None;
        }
        Some(std::mem::take(&mut *d))
    }

    fn take_capture_losses(&self) -> Vec<Loss> {
        self.capture_losses
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// The capture's side of the uplink. Cloneable; never blocks.
#[derive(Debug, Clone)]
pub struct UplinkSink {
    tx: mpsc::UnboundedSender<Vec<ConnRecord>>,
    shared: Arc<Shared>,
    dropped: prometheus::IntCounter,
}

impl UplinkSink {
    fn drop_batch(&self, batch: &[ConnRecord]) {
        self.dropped.inc_by(batch.len() as u64);
        let from = batch.iter().map(|r| r.event_ns).min().unwrap_or(0);
        let to = batch.iter().map(|r| r.event_ns).max().unwrap_or(0);
        if let Ok(mut d) = self.shared.queue_drops.lock() {
            if d.count == 0 {
                d.from_ns = from;
                d.to_ns = to;
            } else {
                d.from_ns = d.from_ns.min(from);
                d.to_ns = d.to_ns.max(to);
            }
            d.count += batch.len() as u64;
        }
        self.shared.news.notify_one();
    }
}

impl RecordSink for UplinkSink {
    fn send(&self, batch: Vec<ConnRecord>) {
        let n = batch.len();
        if n == 0 {
            return;
        }
        let before = self.shared.queued.fetch_add(n, Ordering::AcqRel);
        if before + n > self.shared.max_queued {
            self.shared.queued.fetch_sub(n, Ordering::AcqRel);
            self.drop_batch(&batch);
            return;
        }
        if let Err(mpsc::error::SendError(batch)) = self.tx.send(batch) {
            self.shared.queued.fetch_sub(n, Ordering::AcqRel);
            self.drop_batch(&batch);
        }
    }

    fn loss(&self, loss: &Loss) {
        if let Ok(mut v) = self.shared.capture_losses.lock() {
            v.push(*loss);
        }
        self.shared.news.notify_one();
    }
}

/// The running uplink. Dropping it (or [`Uplink::shutdown`]) stops the task
/// and writes what is not acknowledged to the spool.
#[derive(Debug)]
pub struct Uplink {
    boot_id: Arc<str>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A random id for this agent process: the kernel's, else our own.
fn new_boot_id() -> String {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        let s = s.trim();
        if !s.is_empty() && s.len() <= 64 {
            return s.to_string();
        }
    }
    format!(
        "{:016x}{:016x}",
        conn::random_u64(),
        conn::random_u64() ^ u64::from(std::process::id())
    )
}

impl Uplink {
    /// Checks the config, opens the spool (batches of earlier runs included)
    /// and starts the uplink thread. `node` is announced in Hello; `lookup`
    /// answers the collector's live lookups.
    pub fn start(
        cfg: UplinkConfig,
        node: &str,
        metrics: Metrics,
        lookup: Arc<LookupFn>,
    ) -> Result<(Uplink, UplinkSink), UplinkError> {
        cfg.validate().map_err(UplinkError::Config)?;
        let boot_id: Arc<str> = new_boot_id().into();
        let core = task::Core::new(cfg.clone(), node, boot_id.clone(), metrics.clone())?;
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            max_queued: cfg.queue_max_records,
            queue_drops: Mutex::new(QueueDrops::default()),
            capture_losses: Mutex::new(Vec::new()),
            news: Notify::new(),
            stop: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("uplink".into())
                .spawn(move || task::run_thread(core, rx, shared, lookup))
                .map_err(UplinkError::Thread)?
        };
        let sink = UplinkSink {
            tx,
            shared: shared.clone(),
            dropped: metrics
                .uplink
                .records_dropped
                .with_label_values(&["uplink_queue"]),
        };
        Ok((
            Uplink {
                boot_id,
                shared,
                thread: Some(thread),
            },
            sink,
        ))
    }

    /// This process's boot id, sent with every new batch.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Stops the uplink: what the queue holds is batched, and every batch
    /// not acknowledged is in the spool when this returns.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.stop.notify_one();
            let _ = t.join();
        }
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long the uplink waits for an ack of its oldest batch in flight
/// before it treats the connection as dead.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> UplinkConfig {
        UplinkConfig::new(
            "https://collector.example:7443",
            UplinkTls {
                ca_file: "/ca.pem".into(),
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into(),
            },
        )
    }

    #[test]
    fn defaults_validate_and_bad_values_name_the_key() {
        assert_eq!(cfg().validate(), Ok(()));
        let yaml = "address: https://c:1\ntls: {ca_file: a, cert_file: b, key_file: c}\n";
        let parsed: UplinkConfig = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(parsed.batch_max_records, 2000);
        assert_eq!(parsed.queue_max_records, 262_144);
        assert_eq!(parsed.heartbeat_interval_ms, 10_000);
        let mut c = cfg();
        c.heartbeat_interval_ms = 50;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("collector.heartbeat_interval_ms: 50"));
        let mut c = cfg();
        c.address = "http://c:1".into();
        assert!(c.validate().unwrap_err().contains("collector.address"));
        let mut c = cfg();
        c.spool_max_mb = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("collector.spool_max_mb: 0"));
        let mut c = cfg();
        c.node_addresses = vec!["10.0.0.300".into()];
        assert!(c.validate().unwrap_err().contains("node_addresses"));
        let mut c = cfg();
        c.reconnect_max_ms = 10;
        assert!(c.validate().unwrap_err().contains("reconnect_max_ms"));
        let err = serde_yaml::from_str::<UplinkConfig>(&format!("{yaml}spool_max_gb: 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spool_max_gb"), "{err}");
    }

    #[test]
    fn boot_ids_differ() {
        let a = new_boot_id();
        assert!(!a.is_empty() && a.len() <= 64);
        assert_ne!(a, new_boot_id());
    }
}

//! The capture loop: reads conntrack events, keeps the watched ones, and
//! recovers from loss by dumping the table.
//!
//! Runs on its own thread and never waits on anything but the kernel: records
//! leave through a [`RecordSink`] that must not block.
//!
//! Loss handling: the agent keeps the set of watched entries it believes
//! alive (inserted on NEW, removed on DESTROY). When the kernel reports
//! ENOBUFS, or `/proc/net/netlink` shows drops, the agent dumps the table:
//! every watched entry not in the set is emitted as [`EventKind::Recovered`],
//! and the set becomes the dump's content. The same dump runs at start-up.
//! DESTROY events are always subscribed so the set stays exact;
//! `capture_destroy: false` only stops them from being emitted.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ctw_common::{ConnRecord, EventKind};

use crate::filter::Filter;
use crate::metrics::Metrics;
use crate::netlink::decode::{self, Decoded};
use crate::netlink::socket::{EventSocket, RecvOutcome, RequestSocket, GROUP_DESTROY, GROUP_NEW};
use crate::netlink::{bpf, procfs, request};

/// Pause after a small batch (see [`Capture::run`]).
const COALESCE: Duration = Duration::from_millis(1);

/// Where kept records go.
///
/// Delivery guarantee: `send` must return at once. A sink that cannot take a
/// batch (queue full, disk slow) must count the records it could not take;
/// it may never block the capture thread.
pub trait RecordSink: Send {
    fn send(&self, batch: Vec<ConnRecord>);

    /// The kernel dropped `count` events between `from_ns` and `to_ns`;
    /// `resynced` tells whether a table dump then recovered what was alive.
    fn loss(&self, _loss: &Loss) {}
}

/// Events lost by the kernel, as the capture saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    pub from_ns: u64,
    pub to_ns: u64,
    pub count: u64,
    pub resynced: bool,
}

/// Sends every batch to two sinks (the log and the collector uplink).
#[derive(Debug)]
pub struct Tee<A, B>(pub A, pub B);

impl<A: RecordSink, B: RecordSink> RecordSink for Tee<A, B> {
    fn send(&self, batch: Vec<ConnRecord>) {
        self.0.send(batch.clone());
        self.1.send(batch);
    }
    fn loss(&self, loss: &Loss) {
        self.0.loss(loss);
        self.1.loss(loss);
    }
}

/// In-memory sink for tests.
#[derive(Debug, Default, Clone)]
pub struct MemorySink(pub Arc<Mutex<Vec<ConnRecord>>>);

impl RecordSink for MemorySink {
    fn send(&self, batch: Vec<ConnRecord>) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(batch);
        }
    }
}

impl RecordSink for crate::logfile::LogHandle {
    fn send(&self, batch: Vec<ConnRecord>) {
        self.send_records(batch);
    }
}

#[derive(Debug, Clone)]
pub struct CaptureConfig {
    pub filter: Filter,
    pub capture_destroy: bool,
    pub rcvbuf_bytes: usize,
    pub batch_messages: usize,
    pub kernel_filter: bool,
}

/// Errors that stop capture before it starts. Once running, nothing stops it
/// but the stop flag.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open the conntrack event socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot attach the BPF port filter: {0}")]
    Bpf(std::io::Error),
    #[error("conntrack table dump failed: {0}")]
    Dump(String),
}

/// Identity of a conntrack entry: kernel id plus a hash of its original tuple
/// and zone (ids are only unique among live entries).
fn entry_key(r: &ConnRecord) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    r.orig.hash(&mut h);
    r.protocol.hash(&mut h);
    r.zone.hash(&mut h);
    (u64::from(r.id) << 32) | (h.finish() & 0xffff_ffff)
}

/// Keys are already hashes: pass them through, mixed once.
#[derive(Default)]
struct KeyHasher(u64);
impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}
type KeySet = HashSet<u64, BuildHasherDefault<KeyHasher>>;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Logs a repeating warning at most once per interval, with the number of
/// occurrences folded in.
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
    every: Duration,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        RateLimited {
            last: None,
            suppressed: 0,
            every,
        }
    }
    /// Returns `Some(suppressed_since_last)` when it is time to log.
    fn hit(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Per-port counts gathered during one batch, flushed to Prometheus once.
struct PortCounts {
    ports: Vec<u16>,
    new: Vec<u64>,
    closed: Vec<u64>,
    new_series: Vec<prometheus::IntCounter>,
    closed_series: Vec<prometheus::IntCounter>,
}

impl PortCounts {
    fn new(ports: &[u16], m: &Metrics) -> Self {
        let label = |p: &u16| p.to_string();
        PortCounts {
            ports: ports.to_vec(),
            new: vec![0; ports.len()],
            closed: vec![0; ports.len()],
            new_series: ports
                .iter()
                .map(|p| m.new_connections.with_label_values(&[&label(p)]))
                .collect(),
            closed_series: ports
                .iter()
                .map(|p| m.closed_connections.with_label_values(&[&label(p)]))
                .collect(),
        }
    }
    /// Count `r` under `port`, the watched port that matched it.
    fn add(&mut self, port: Option<u16>, r: &ConnRecord) {
        if let Some(Ok(i)) = port.map(|p| self.ports.binary_search(&p)) {
            match r.kind {
                EventKind::Destroy => self.closed[i] += 1,
                EventKind::New | EventKind::Recovered => self.new[i] += 1,
            }
        }
    }
    fn flush(&mut self) {
        for i in 0..self.ports.len() {
            self.new_series[i].inc_by(std::mem::take(&mut self.new[i]));
            self.closed_series[i].inc_by(std::mem::take(&mut self.closed[i]));
        }
    }
}

/// The running capture.
pub struct Capture<S: RecordSink> {
    cfg: CaptureConfig,
    sink: S,
    metrics: Metrics,
    sock: EventSocket,
    live: KeySet,
    counts: PortCounts,
    last_drops: u64,
    /// Events lost since the last report, and when the loss was first seen.
    pending_loss: u64,
    last_ok_ns: u64,
    decode_warn: RateLimited,
    loss_warn: RateLimited,
}

impl<S: RecordSink> std::fmt::Debug for Capture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("sock", &self.sock).finish()
    }
}

impl<S: RecordSink> Capture<S> {
    /// Open and subscribe the event socket, attach the BPF filter and do the
    /// start-up dump. Events arriving during the dump queue in the socket.
    pub fn start(
        cfg: CaptureConfig,
        sink: S,
        metrics: Metrics,
    ) -> Result<Capture<S>, CaptureError> {
        let sock = EventSocket::open(
            &[GROUP_NEW, GROUP_DESTROY],
            cfg.rcvbuf_bytes,
            cfg.batch_messages,
        )
        .map_err(CaptureError::Socket)?;
        metrics.rcvbuf_bytes.set(sock.rcvbuf() as i64);
        if cfg.kernel_filter {
            let prog = bpf::build(&cfg.filter);
            bpf::attach(sock.raw_fd(), &prog).map_err(CaptureError::Bpf)?;
            metrics.kernel_filter.set(1);
        }
        let last_drops = procfs::read_drops(sock.inode()).unwrap_or(0);
        let counts = PortCounts::new(cfg.filter.ports(), &metrics);
        let mut c = Capture {
            cfg,
            sink,
            metrics,
            sock,
            live: KeySet::default(),
            counts,
            last_drops,
            pending_loss: 0,
            last_ok_ns: now_ns(),
            decode_warn: RateLimited::new(Duration::from_secs(10)),
            loss_warn: RateLimited::new(Duration::from_secs(10)),
        };
        let n = c.resync(false).map_err(CaptureError::Dump)?;
        tracing::info!(entries = n, "start-up table dump done");
        Ok(c)
    }

    /// Read and process events until `stop` is set.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut last_drop_check = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match self.sock.recv_batch() {
                Ok(RecvOutcome::Batch(n)) => {
                    self.process_batch(n);
                    // A small batch means we are ahead of the kernel: let
                    // events accumulate briefly, so the next recvmmsg reads
                    // many at once (fewer syscalls and wake-ups per event).
                    // A full batch never waits; 1 ms of events is far below
                    // the socket buffer.
                    if n < self.cfg.batch_messages / 4 {
                        std::thread::sleep(COALESCE);
                    }
                }
                Ok(RecvOutcome::Idle) => {
                    if self.check_drops() {
                        self.recover_from_loss();
                    }
                }
                Ok(RecvOutcome::Overflow) => {
                    self.metrics.overflows.inc();
                    self.check_drops();
                    self.recover_from_loss();
                }
                Err(e) => {
                    if let Some(s) = self.decode_warn.hit() {
                        tracing::warn!(error = %e, suppressed = s, "event socket read failed");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if last_drop_check.elapsed() >= Duration::from_secs(1) {
                last_drop_check = Instant::now();
                if self.check_drops() {
                    self.recover_from_loss();
                }
            }
        }
    }

    /// Add new kernel drops to the lost counter; true when there were any.
    fn check_drops(&mut self) -> bool {
        let Some(d) = procfs::read_drops(self.sock.inode()) else {
            return false;
        };
        if d > self.last_drops {
            let lost = d - self.last_drops;
            self.last_drops = d;
            self.pending_loss += lost;
            self.metrics.events_lost.inc_by(lost);
            if let Some(s) = self.loss_warn.hit() {
                tracing::warn!(
                    lost,
                    total_lost = d,
                    suppressed = s,
                    "conntrack events lost: socket buffer full; resyncing from the table (raise netlink.rcvbuf_bytes)"
                );
            }
            return true;
        }
        false
    }

    fn recover_from_loss(&mut self) {
        self.metrics.resyncs.inc();
        match self.resync(true) {
            Ok(n) => tracing::info!(recovered = n, "resync after event loss done"),
            Err(e) => {
                tracing::warn!(error = %e, "resync after event loss failed; will retry on the next loss")
            }
        }
    }

    fn process_batch(&mut self, n: usize) {
        let recv_ns = now_ns();
        self.last_ok_ns = recv_ns;
        let mut out = Vec::with_capacity(n);
        let mut received = 0u64;
        let mut filtered = 0u64;
        let mut duplicate = 0u64;
        let mut errors = 0u64;
        let lag = self.metrics.event_lag.local();
        for i in 0..n {
            let (dgram, truncated) = self.sock.datagram(i);
            if truncated {
                errors += 1;
                continue;
            }
            for msg in decode::messages(dgram) {
                received += 1;
                let decoded = msg.and_then(|m| decode::decode(&m, recv_ns));
                match decoded {
                    Ok(Decoded::Conn(mut r)) => {
                        if !self.cfg.filter.keeps(&r) {
                            filtered += 1;
                            continue;
                        }
                        self.cfg.filter.mark(&mut r);
                        let port = self.cfg.filter.matched_port(&r);
                        if let Some(k) = decode::kernel_event_ns(&r) {
                            lag.observe(recv_ns.saturating_sub(k) as f64 / 1e9);
                        }
                        let key = entry_key(&r);
                        match r.kind {
                            EventKind::Destroy => {
                                self.live.remove(&key);
                                if self.cfg.capture_destroy {
                                    self.counts.add(port, &r);
                                    out.push(r);
                                } else {
                                    filtered += 1;
                                }
                            }
                            _ => {
                                if self.live.insert(key) {
                                    self.counts.add(port, &r);
                                    out.push(r);
                                } else {
                                    duplicate += 1;
                                }
                            }
                        }
                    }
                    Ok(_) => filtered += 1,
                    Err(e) => {
                        errors += 1;
                        if let Some(s) = self.decode_warn.hit() {
                            tracing::warn!(error = %e, suppressed = s, "malformed conntrack message skipped");
                        }
                    }
                }
            }
        }
        let m = &self.metrics;
        m.events_received.inc_by(received);
        m.events_filtered.inc_by(filtered);
        m.events_duplicate.inc_by(duplicate);
        m.decode_errors.inc_by(errors);
        m.tracked_entries.set(self.live.len() as i64);
        lag.flush();
        self.counts.flush();
        if !out.is_empty() {
            self.sink.send(out);
        }
    }

    /// Dump the table; emit watched entries not in the live set as
    /// recovered; make the live set the dump's content. Returns how many
    /// entries were recovered.
    fn resync(&mut self, after_loss: bool) -> Result<usize, String> {
        let reason = if after_loss { "loss" } else { "startup" };
        let mut dumped = dump_table(&self.cfg.filter)?;
        let mut fresh = KeySet::default();
        fresh.reserve(dumped.len());
        let mut out = Vec::new();
        for r in dumped.drain(..) {
            let key = entry_key(&r);
            fresh.insert(key);
            if !self.live.contains(&key) {
                if after_loss {
                    self.counts.add(self.cfg.filter.matched_port(&r), &r);
                }
                out.push(r);
            }
        }
        self.live = fresh;
        let n = out.len();
        self.metrics
            .recovered
            .with_label_values(&[reason])
            .inc_by(n as u64);
        self.metrics.tracked_entries.set(self.live.len() as i64);
        self.counts.flush();
        for chunk in out.chunks(4096) {
            self.sink.send(chunk.to_vec());
        }
        Ok(n)
    }
}

/// Dump the conntrack table and return the entries `filter` keeps, each
/// marked [`EventKind::Recovered`].
pub fn dump_table(filter: &Filter) -> Result<Vec<ConnRecord>, String> {
    let mut sock =
        RequestSocket::open(Duration::from_secs(10)).map_err(|e| format!("socket: {e}"))?;
    sock.send(&request::dump(1))
        .map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    loop {
        let recv_ns = now_ns();
        let dgram = sock.recv().map_err(|e| format!("receive: {e}"))?;
        for msg in decode::messages(dgram) {
            let msg = msg.map_err(|e| format!("malformed dump reply: {e}"))?;
            match decode::decode_entry(&msg, recv_ns) {
                Ok(Decoded::Conn(mut r)) => {
                    if filter.keeps(&r) {
                        filter.mark(&mut r);
                        out.push(r);
                    }
                }
                Ok(Decoded::Done) => return Ok(out),
                Ok(Decoded::Error(0)) => {}
                Ok(Decoded::Error(errno)) => {
                    return Err(format!(
                        "kernel answered {}",
                        std::io::Error::from_raw_os_error(errno)
                    ))
                }
                Ok(_) => {}
                // One bad entry does not stop the dump.
                Err(e) => tracing::warn!(error = %e, "malformed conntrack dump entry skipped"),
            }
        }
    }
}

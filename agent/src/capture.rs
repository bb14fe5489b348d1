//! The capture loop: reads conntrack events, keeps the watched ones, and
//! recovers from loss by dumping the table.
//!
//! Runs on its own thread and never waits on anything but the kernel: records
//! leave through a [`RecordSink`] that must not block.
//!
//! Events come from an [`EventSource`]: [`NetlinkSource`] (the kernel) in
//! production, [`ReplaySource`] (built records or captured datagrams, and a
//! modelled table for dumps and GETs) in tests, so the rules below have unit
//! tests that need no root. The source is a generic parameter: no dynamic
//! call per event.
//!
//! Rules of the live-entry set (the watched entries believed alive):
//! - NEW inserts; a NEW for an entry already in the set (a dump emitted it
//!   first) is a duplicate, counted, not emitted. DESTROY removes. DESTROY
//!   events are always subscribed so the set stays exact;
//!   `capture_destroy: false` only stops them from being emitted.
//! - Loss: when the kernel reports ENOBUFS, or `/proc/net/netlink` shows
//!   drops, the agent dumps the table: every watched entry not in the set is
//!   emitted as [`EventKind::Recovered`], and the set becomes the dump's
//!   content. The same dump runs at start-up.
//! - One entry per reply tuple: the kernel holds at most one live entry per
//!   (zone, protocol, reply tuple). A NEW (or a recovered entry) whose reply
//!   tuple equals a live entry's ends that older entry (counted in
//!   `ctw_entries_superseded_total`); a pending one (below) is logged as
//!   closed with `CTW_GONE`, its end bounded by the new entry's time.
//! - Recovered entries are *pending*: their end is unknown, since the kernel
//!   sends no DESTROY for entries created without an event cache: under
//!   `nf_conntrack_events=0`, or `2` while no ctnetlink listener existed
//!   (a host-wide flag since Linux 6.3: any listener in any namespace gives
//!   every new entry one). Every `recheck_interval` the agent asks the
//!   kernel about pending entries (a GET by original tuple in its zone,
//!   pipelined), at most [`RECHECK_BATCH`] per round, longest unseen first,
//!   so a round blocks the capture thread a bounded time. An entry found
//!   alive gets its last-seen time; one found gone (no entry, or
//!   another id under its tuple) becomes a DESTROY record with
//!   [`status::CTW_GONE`], `event_ns` = when found gone and `stop_ns` = last
//!   seen alive. A real DESTROY, or a NEW event for it (events flow for it),
//!   ends its pending state. A GONE record waits until the event socket has
//!   been read empty once, so a real DESTROY queued meanwhile wins.
//! - NAT clash: a DESTROY with `IPS_NAT_CLASH` is a shadow entry (see
//!   [`status::NAT_CLASH`]): never a record, never removes a live entry,
//!   counted in `ctw_nat_clash_total`.
//! - TCP entries picked up mid-stream ([`ConnRecord::midstream`]) are
//!   records like any NEW, counted per port in `ctw_midstream_pickups_total`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctw_common::ratelimit::RateLimiter;
use ctw_common::{now_ns, status, ConnRecord, EventKind};

use crate::filter::Filter;
use crate::metrics::Metrics;
use crate::netlink::decode::{self, DecodeError, Decoded};
use crate::netlink::socket::{EventSocket, RecvOutcome, RequestSocket, GROUP_DESTROY, GROUP_NEW};
use crate::netlink::{bpf, procfs, request};

/// Pause after a small batch (see [`Capture::run`]).
const COALESCE: Duration = Duration::from_millis(1);

/// Pending entries asked about per re-check round (longest unseen first).
///
/// Measured on this project's VM (debug build, `examples/recheck_cost.rs`,
/// 40,000-entry table): pipelined GETs cost about 11 us per entry whatever
/// the table size; a dump costs about 5 us per entry of the whole table
/// (all ports and zones; 206 ms for 40,000). A dump would be cheaper only
/// when more than about half the table is pending, and it blocks the
/// capture thread for the whole walk (1.3 s at 262,144 entries, longer than
/// the socket buffer lasts at 100,000 events/s), so re-checks use GETs only,
/// in rounds of at most this many (about 25 ms): with more pending, each is
/// asked every `ceil(pending / RECHECK_BATCH)` intervals.
pub const RECHECK_BATCH: usize = 2048;

/// GETs in flight at once on the request socket: their answers (entry + ack,
/// about 2 KB of receive buffer each) must fit the default socket buffer.
const GET_WINDOW: usize = 32;

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

/// In-memory sink for tests: the records, and the losses reported.
#[derive(Debug, Default, Clone)]
pub struct MemorySink(pub Arc<Mutex<Vec<ConnRecord>>>, pub Arc<Mutex<Vec<Loss>>>);

impl MemorySink {
    /// Every record sent so far, in order.
    pub fn records(&self) -> Vec<ConnRecord> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl RecordSink for MemorySink {
    fn send(&self, batch: Vec<ConnRecord>) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(batch);
        }
    }
    fn loss(&self, loss: &Loss) {
        if let Ok(mut v) = self.1.lock() {
            v.push(*loss);
        }
    }
}

impl RecordSink for crate::logfile::LogHandle {
    fn send(&self, batch: Vec<ConnRecord>) {
        self.send_records(batch);
    }
}

/// What the capture needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Watched ports and protocols.
    pub filter: Filter,
    /// Emit DESTROY records (they are always read, to keep the set exact).
    pub capture_destroy: bool,
    /// Event socket receive buffer (bytes, SO_RCVBUFFORCE).
    pub rcvbuf_bytes: usize,
    /// Datagrams read per `recvmmsg`.
    pub batch_messages: usize,
    /// Attach the BPF port filter to the event socket.
    pub kernel_filter: bool,
    /// Time between re-checks of pending (recovered) entries.
    pub recheck_interval: Duration,
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

/// What one [`EventSource::recv`] call saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRecv {
    /// `datagrams` were read (`truncated` of them cut short and skipped);
    /// every message of the others went to the callback.
    Batch { datagrams: usize, truncated: usize },
    /// Nothing arrived within the source's wait.
    Idle,
    /// The kernel dropped events: the socket overflowed.
    Overflow,
}

/// What a re-check learnt about one pending entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// An entry with this original tuple and zone exists, with this id.
    Alive(u32),
    /// No entry with this original tuple in this zone.
    Gone,
    /// No answer (kernel error other than ENOENT): ask again next time.
    Unknown,
}

/// Where the capture loop's conntrack messages come from: the kernel
/// ([`NetlinkSource`]) or a replay ([`ReplaySource`]).
pub trait EventSource {
    /// Wait for events (at most the source's own timeout) and hand each
    /// message's decode result to `each`, in order, with the time (ns since
    /// the epoch) the agent read it.
    fn recv<F: FnMut(Result<Decoded, DecodeError>, u64)>(
        &mut self,
        each: F,
    ) -> io::Result<SourceRecv>;

    /// The kernel's count of events dropped on this socket so far
    /// (`/proc/net/netlink` Drops), when known.
    fn drops(&mut self) -> Option<u64>;

    /// The watched entries of the table (`filter`), each
    /// [`EventKind::Recovered`] with `event_ns` = when read.
    fn dump(&mut self, filter: &Filter) -> Result<Vec<ConnRecord>, String>;

    /// Look each entry up by original tuple in its zone; `out` gets one
    /// [`Probe`] per entry, in order.
    fn probe(&mut self, entries: &[ConnRecord], out: &mut Vec<Probe>) -> Result<(), String>;
}

/// The kernel: the subscribed event socket, and a request socket for dumps
/// and GETs.
pub struct NetlinkSource {
    sock: EventSocket,
    req: Option<RequestSocket>,
}

impl std::fmt::Debug for NetlinkSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkSource")
            .field("sock", &self.sock)
            .finish()
    }
}

impl NetlinkSource {
    /// Open and subscribe the event socket (NEW and DESTROY groups) and
    /// attach the BPF port filter when `cfg.kernel_filter`.
    pub fn open(cfg: &CaptureConfig, metrics: &Metrics) -> Result<NetlinkSource, CaptureError> {
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
        Ok(NetlinkSource { sock, req: None })
    }

    fn request_socket(&mut self) -> Result<&mut RequestSocket, String> {
        if self.req.is_none() {
            let s = RequestSocket::open(Duration::from_secs(2))
                .map_err(|e| format!("request socket: {e}"))?;
            self.req = Some(s);
        }
        self.req
            .as_mut()
            .ok_or_else(|| "request socket unavailable".to_string())
    }

    /// One window of pipelined GETs: all requests in one datagram, then
    /// answers matched by sequence number until every one is closed.
    fn probe_window(
        &mut self,
        entries: &[ConnRecord],
        out: &mut [Probe],
        seq0: u32,
    ) -> Result<(), String> {
        let mut reqs = Vec::with_capacity(entries.len() * 96);
        for (i, r) in entries.iter().enumerate() {
            reqs.extend_from_slice(&request::get(
                r.protocol,
                &r.orig,
                request::TupleDir::Orig,
                r.zone,
                seq0.wrapping_add(i as u32),
            ));
        }
        let sock = self.request_socket()?;
        sock.send(&reqs).map_err(|e| format!("send: {e}"))?;
        let mut open = entries.len();
        while open > 0 {
            let dgram = match sock.recv() {
                Ok(d) => d,
                Err(e) => {
                    self.req = None;
                    return Err(format!("receive: {e}"));
                }
            };
            for msg in decode::messages(dgram) {
                let msg = msg.map_err(|e| format!("malformed GET answer: {e}"))?;
                let i = msg.seq.wrapping_sub(seq0) as usize;
                if i >= out.len() {
                    continue;
                }
                match decode::decode_entry(&msg, 0) {
                    Ok(Decoded::Conn(r)) => out[i] = Probe::Alive(r.id),
                    Ok(Decoded::Error(0)) => open -= 1,
                    Ok(Decoded::Error(e)) => {
                        if e == libc::ENOENT {
                            out[i] = Probe::Gone;
                        }
                        open -= 1;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "malformed GET answer skipped"),
                }
            }
        }
        Ok(())
    }
}

impl EventSource for NetlinkSource {
    fn recv<F: FnMut(Result<Decoded, DecodeError>, u64)>(
        &mut self,
        mut each: F,
    ) -> io::Result<SourceRecv> {
        match self.sock.recv_batch()? {
            RecvOutcome::Batch(n) => {
                let recv_ns = now_ns();
                let mut truncated = 0;
                for i in 0..n {
                    let (dgram, cut) = self.sock.datagram(i);
                    if cut {
                        truncated += 1;
                        continue;
                    }
                    for msg in decode::messages(dgram) {
                        each(msg.and_then(|m| decode::decode(&m, recv_ns)), recv_ns);
                    }
                }
                Ok(SourceRecv::Batch {
                    datagrams: n,
                    truncated,
                })
            }
            RecvOutcome::Idle => Ok(SourceRecv::Idle),
            RecvOutcome::Overflow => Ok(SourceRecv::Overflow),
        }
    }

    fn drops(&mut self) -> Option<u64> {
        procfs::read_drops(self.sock.inode())
    }

    fn dump(&mut self, filter: &Filter) -> Result<Vec<ConnRecord>, String> {
        dump_table(filter)
    }

    fn probe(&mut self, entries: &[ConnRecord], out: &mut Vec<Probe>) -> Result<(), String> {
        out.clear();
        out.resize(entries.len(), Probe::Unknown);
        let mut seq = 1u32;
        for (chunk, res) in entries.chunks(GET_WINDOW).zip(out.chunks_mut(GET_WINDOW)) {
            self.probe_window(chunk, res, seq)?;
            seq = seq.wrapping_add(GET_WINDOW as u32);
        }
        Ok(())
    }
}

/// A scripted source for tests: queued steps of events, and a modelled
/// conntrack table that dumps and GETs read.
///
/// Clones share one state, so a test keeps a handle while the capture owns
/// the source.
#[derive(Debug, Default, Clone)]
pub struct ReplaySource {
    state: Arc<Mutex<ReplayState>>,
}

#[derive(Debug, Default)]
struct ReplayState {
    steps: VecDeque<ReplayStep>,
    table: Vec<ConnRecord>,
    drops: u64,
    dumps: u64,
    probes: u64,
}

/// One [`EventSource::recv`] of a [`ReplaySource`].
#[derive(Debug, Clone)]
pub enum ReplayStep {
    /// Built records, delivered as decoded messages.
    Records(Vec<ConnRecord>),
    /// Netlink datagrams (e.g. golden captures), decoded like the kernel's;
    /// `recv_ns` is their receive time.
    Datagrams {
        recv_ns: u64,
        datagrams: Vec<Vec<u8>>,
    },
    /// The socket overflowed.
    Overflow,
}

impl ReplaySource {
    /// An empty replay: no steps queued, an empty table.
    pub fn new() -> ReplaySource {
        ReplaySource::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut ReplayState) -> T) -> T {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Queue one batch of events.
    pub fn push_records(&self, recs: impl IntoIterator<Item = ConnRecord>) {
        let v: Vec<ConnRecord> = recs.into_iter().collect();
        self.with(|s| s.steps.push_back(ReplayStep::Records(v)));
    }

    /// Queue any step.
    pub fn push(&self, step: ReplayStep) {
        self.with(|s| s.steps.push_back(step));
    }

    /// Steps not yet read.
    pub fn queued(&self) -> usize {
        self.with(|s| s.steps.len())
    }

    /// Replace the modelled table (what dumps and GETs see).
    pub fn set_table(&self, table: Vec<ConnRecord>) {
        self.with(|s| s.table = table);
    }

    /// Add kernel-dropped events to the drop counter.
    pub fn add_drops(&self, n: u64) {
        self.with(|s| s.drops += n);
    }

    /// Dumps and GET rounds done so far: `(dumps, probe_calls)`.
    pub fn requests(&self) -> (u64, u64) {
        self.with(|s| (s.dumps, s.probes))
    }
}

impl EventSource for ReplaySource {
    fn recv<F: FnMut(Result<Decoded, DecodeError>, u64)>(
        &mut self,
        mut each: F,
    ) -> io::Result<SourceRecv> {
        let Some(step) = self.with(|s| s.steps.pop_front()) else {
            return Ok(SourceRecv::Idle);
        };
        match step {
            ReplayStep::Records(v) => {
                for r in &v {
                    // Built records carry their own time: none of it is
                    // a kernel event time.
                    each(Ok(Decoded::Conn(*r)), r.event_ns);
                }
                Ok(SourceRecv::Batch {
                    datagrams: v.len(),
                    truncated: 0,
                })
            }
            ReplayStep::Datagrams { recv_ns, datagrams } => {
                for d in &datagrams {
                    for msg in decode::messages(d) {
                        each(msg.and_then(|m| decode::decode(&m, recv_ns)), recv_ns);
                    }
                }
                Ok(SourceRecv::Batch {
                    datagrams: datagrams.len(),
                    truncated: 0,
                })
            }
            ReplayStep::Overflow => Ok(SourceRecv::Overflow),
        }
    }

    fn drops(&mut self) -> Option<u64> {
        Some(self.with(|s| s.drops))
    }

    fn dump(&mut self, filter: &Filter) -> Result<Vec<ConnRecord>, String> {
        let now = now_ns();
        Ok(self.with(|s| {
            s.dumps += 1;
            s.table
                .iter()
                .filter(|r| filter.keeps(r))
                .map(|r| {
                    let mut r = ConnRecord {
                        kind: EventKind::Recovered,
                        event_ns: now,
                        ..*r
                    };
                    filter.mark(&mut r);
                    r
                })
                .collect()
        }))
    }

    fn probe(&mut self, entries: &[ConnRecord], out: &mut Vec<Probe>) -> Result<(), String> {
        self.with(|s| {
            s.probes += 1;
            out.clear();
            out.extend(entries.iter().map(|e| {
                s.table
                    .iter()
                    .find(|t| t.orig == e.orig && t.protocol == e.protocol && t.zone == e.zone)
                    .map_or(Probe::Gone, |t| Probe::Alive(t.id))
            }));
        });
        Ok(())
    }
}

/// Hash of (zone, protocol, reply tuple): the kernel holds at most one live
/// entry per value, so this key and the kernel id identify an entry (ids
/// alone repeat: they are unique only among live entries). One hash per
/// event, as before the reply-tuple rule.
fn reply_key(r: &ConnRecord) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    r.reply.hash(&mut h);
    r.protocol.hash(&mut h);
    r.zone.hash(&mut h);
    h.finish()
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
type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

/// Per-port counts gathered during one batch, flushed to Prometheus once.
struct PortCounts {
    ports: Vec<u16>,
    new: Vec<u64>,
    closed: Vec<u64>,
    midstream: Vec<u64>,
    new_series: Vec<prometheus::IntCounter>,
    closed_series: Vec<prometheus::IntCounter>,
    midstream_series: Vec<prometheus::IntCounter>,
}

impl PortCounts {
    fn new(ports: &[u16], m: &Metrics) -> Self {
        let series = |v: &prometheus::IntCounterVec| {
            ports
                .iter()
                .map(|p| v.with_label_values(&[&p.to_string()]))
                .collect()
        };
        PortCounts {
            ports: ports.to_vec(),
            new: vec![0; ports.len()],
            closed: vec![0; ports.len()],
            midstream: vec![0; ports.len()],
            new_series: series(&m.new_connections),
            closed_series: series(&m.closed_connections),
            midstream_series: series(&m.midstream_pickups),
        }
    }
    /// Count `r` under `port`, the watched port that matched it.
    fn add(&mut self, port: Option<u16>, r: &ConnRecord) {
        if let Some(Ok(i)) = port.map(|p| self.ports.binary_search(&p)) {
            match r.kind {
                EventKind::Destroy => self.closed[i] += 1,
                EventKind::New | EventKind::Recovered => {
                    self.new[i] += 1;
                    if r.midstream() {
                        self.midstream[i] += 1;
                    }
                }
            }
        }
    }
    fn flush(&mut self) {
        for i in 0..self.ports.len() {
            self.new_series[i].inc_by(std::mem::take(&mut self.new[i]));
            self.closed_series[i].inc_by(std::mem::take(&mut self.closed[i]));
            self.midstream_series[i].inc_by(std::mem::take(&mut self.midstream[i]));
        }
    }
}

/// A recovered entry whose end is unknown.
#[derive(Debug, Clone, Copy)]
struct Pending {
    rec: ConnRecord,
    /// Last time (ns) a dump or GET found it alive.
    last_seen_ns: u64,
}

impl Pending {
    /// The DESTROY record for this entry found gone at `found_ns`.
    fn gone(&self, found_ns: u64) -> ConnRecord {
        ConnRecord {
            kind: EventKind::Destroy,
            event_ns: found_ns,
            status: self.rec.status | status::CTW_GONE,
            stop_ns: Some(self.last_seen_ns),
            counters_orig: None,
            counters_reply: None,
            ..self.rec
        }
    }
}

/// Counts of one batch, added to Prometheus once per batch.
#[derive(Debug, Default)]
struct BatchCounts {
    received: u64,
    filtered: u64,
    duplicate: u64,
    errors: u64,
    superseded: u64,
    found_gone: u64,
    nat_clash: u64,
}

/// The live-entry set and its rules, apart from where events come from.
struct Core<S: RecordSink> {
    cfg: CaptureConfig,
    sink: S,
    metrics: Metrics,
    /// Live entries: reply key → kernel id of the one entry holding it.
    live: KeyMap<u32>,
    /// Recovered entries with an unknown end, by reply key (a subset of
    /// `live`: same key and id).
    pending: KeyMap<Pending>,
    /// GONE records waiting for the event socket to be read empty once.
    gone_waiting: Vec<ConnRecord>,
    counts: PortCounts,
    batch: BatchCounts,
    last_drops: u64,
    /// Events lost (kernel drops) not yet reported to the sink.
    pending_loss: u64,
    /// When the last batch was read: the start of a loss window.
    last_ok_ns: u64,
    decode_warn: RateLimiter,
    loss_warn: RateLimiter,
}

impl<S: RecordSink> Core<S> {
    /// One decoded message of a batch, read at `recv_ns`; `lag` gathers
    /// the kernel-to-agent delay of records with a kernel event time.
    fn handle(
        &mut self,
        d: Result<Decoded, DecodeError>,
        recv_ns: u64,
        lag: &prometheus::local::LocalHistogram,
        out: &mut Vec<ConnRecord>,
    ) {
        self.batch.received += 1;
        match d {
            Ok(Decoded::Conn(mut r)) => {
                if !self.cfg.filter.keeps(&r) {
                    self.batch.filtered += 1;
                    return;
                }
                self.cfg.filter.mark(&mut r);
                if let Some(k) = decode::kernel_event_ns(&r, recv_ns) {
                    lag.observe(recv_ns.saturating_sub(k) as f64 / 1e9);
                }
                if r.kind == EventKind::Destroy {
                    self.on_destroy(r, out);
                } else {
                    self.on_new(r, out);
                }
            }
            Ok(_) => self.batch.filtered += 1,
            Err(e) => {
                self.batch.errors += 1;
                if let Some(s) = self.decode_warn.allow() {
                    tracing::warn!(error = %e, suppressed = s, "malformed conntrack message skipped");
                }
            }
        }
    }

    fn on_new(&mut self, r: ConnRecord, out: &mut Vec<ConnRecord>) {
        let rkey = reply_key(&r);
        match self.live.insert(rkey, r.id) {
            Some(old) if old == r.id => {
                self.batch.duplicate += 1;
                // A NEW event for it: the kernel sends events for this
                // entry, its DESTROY will come.
                if !self.pending.is_empty() {
                    self.unpend(rkey, r.id);
                }
                return;
            }
            Some(old) => self.supersede(rkey, old, r.event_ns, out),
            None => {}
        }
        self.counts.add(self.cfg.filter.matched_port(&r), &r);
        out.push(r);
    }

    /// Remove the pending entry (`rkey`, `id`), if it is one.
    fn unpend(&mut self, rkey: u64, id: u32) -> Option<Pending> {
        if self.pending.get(&rkey).is_some_and(|p| p.rec.id == id) {
            self.pending.remove(&rkey)
        } else {
            None
        }
    }

    /// Entry (`rkey`, `old_id`) lost its reply tuple to a newer entry seen
    /// at `at_ns`.
    fn supersede(&mut self, rkey: u64, old_id: u32, at_ns: u64, out: &mut Vec<ConnRecord>) {
        self.batch.superseded += 1;
        if let Some(p) = self.unpend(rkey, old_id) {
            self.batch.found_gone += 1;
            self.emit_destroy(p.gone(at_ns), out);
        }
    }

    fn on_destroy(&mut self, r: ConnRecord, out: &mut Vec<ConnRecord>) {
        if r.nat_clash() {
            self.batch.nat_clash += 1;
            return;
        }
        let rkey = reply_key(&r);
        if let Entry::Occupied(e) = self.live.entry(rkey) {
            // One lookup; a DESTROY of a superseded entry leaves its
            // successor alone.
            if *e.get() == r.id {
                e.remove();
                if !self.pending.is_empty() {
                    self.unpend(rkey, r.id);
                }
            }
        }
        if !self.gone_waiting.is_empty() {
            // A real DESTROY beats the re-check's guess.
            if let Some(i) = self.gone_waiting.iter().position(|g| {
                g.id == r.id && g.reply == r.reply && g.zone == r.zone && g.protocol == r.protocol
            }) {
                self.gone_waiting.swap_remove(i);
            }
        }
        self.emit_destroy(r, out);
    }

    fn emit_destroy(&mut self, r: ConnRecord, out: &mut Vec<ConnRecord>) {
        if self.cfg.capture_destroy {
            self.counts.add(self.cfg.filter.matched_port(&r), &r);
            out.push(r);
        } else {
            self.batch.filtered += 1;
        }
    }

    /// Add the batch's counts to Prometheus and send its records.
    fn finish_batch(&mut self, out: Vec<ConnRecord>, truncated: usize) {
        let b = std::mem::take(&mut self.batch);
        let m = &self.metrics;
        m.events_received.inc_by(b.received);
        m.events_filtered.inc_by(b.filtered);
        m.events_duplicate.inc_by(b.duplicate);
        m.decode_errors.inc_by(b.errors + truncated as u64);
        m.entries_superseded.inc_by(b.superseded);
        m.entries_found_gone.inc_by(b.found_gone);
        m.nat_clash.inc_by(b.nat_clash);
        m.tracked_entries.set(self.live.len() as i64);
        m.entries_pending_recheck.set(self.pending.len() as i64);
        self.counts.flush();
        if !out.is_empty() {
            self.sink.send(out);
        }
    }

    /// Send the GONE records held back, now that the socket was read empty.
    fn flush_gone(&mut self) {
        if self.gone_waiting.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.gone_waiting);
        let mut out = Vec::with_capacity(held.len());
        self.batch.found_gone += held.len() as u64;
        for g in held {
            self.emit_destroy(g, &mut out);
        }
        self.finish_batch(out, 0);
    }

    /// Apply a dump: emit watched entries not in the live set as recovered
    /// (pending), make the live set the dump's content; pending entries
    /// missing from the dump are found gone. Returns how many entries were
    /// recovered.
    fn apply_dump(&mut self, dumped: Vec<ConnRecord>, after_loss: bool) -> usize {
        let reason = if after_loss { "loss" } else { "startup" };
        let dump_ns = now_ns();
        let mut fresh = KeyMap::default();
        fresh.reserve(dumped.len());
        let mut out = Vec::new();
        let mut recovered = 0;
        for r in dumped {
            if r.nat_clash() {
                // A shadow entry in the table: not a connection.
                self.batch.filtered += 1;
                continue;
            }
            let rkey = reply_key(&r);
            if let Some(old) = fresh.insert(rkey, r.id) {
                // Two entries of one reply tuple in one dump: the walk raced
                // with a replacement; the later one holds it.
                if old != r.id {
                    self.batch.superseded += 1;
                }
            }
            if self.live.get(&rkey) == Some(&r.id) {
                if let Some(p) = self.pending.get_mut(&rkey) {
                    if p.rec.id == r.id {
                        p.last_seen_ns = r.event_ns;
                    }
                }
                continue;
            }
            if after_loss {
                self.counts.add(self.cfg.filter.matched_port(&r), &r);
            }
            let p = Pending {
                rec: r,
                last_seen_ns: r.event_ns,
            };
            if let Some(old) = self.pending.insert(rkey, p) {
                // Another entry held this reply tuple: it ended.
                self.gone_waiting.push(old.gone(dump_ns));
            }
            out.push(r);
            recovered += 1;
        }
        // Pending entries the dump did not find ended since last seen.
        let ended: Vec<u64> = self
            .pending
            .iter()
            .filter(|(k, p)| fresh.get(*k) != Some(&p.rec.id))
            .map(|(k, _)| *k)
            .collect();
        for k in ended {
            if let Some(p) = self.pending.remove(&k) {
                self.gone_waiting.push(p.gone(dump_ns));
            }
        }
        self.live = fresh;
        self.metrics
            .recovered
            .with_label_values(&[reason])
            .inc_by(recovered as u64);
        let mut chunks = out.chunks(4096).peekable();
        if chunks.peek().is_none() {
            self.finish_batch(Vec::new(), 0);
        }
        for chunk in chunks {
            self.finish_batch(chunk.to_vec(), 0);
        }
        recovered
    }

    /// Apply a re-check's answers for `asked` (pending entries).
    fn apply_probes(&mut self, asked: &[ConnRecord], probes: &[Probe], at_ns: u64) {
        for (r, p) in asked.iter().zip(probes) {
            let rkey = reply_key(r);
            match *p {
                Probe::Alive(id) if id == r.id => {
                    if let Some(p) = self.pending.get_mut(&rkey) {
                        if p.rec.id == r.id {
                            p.last_seen_ns = at_ns;
                        }
                    }
                }
                Probe::Alive(_) | Probe::Gone => {
                    // Still pending (no event ended it meanwhile)?
                    let Some(p) = self.unpend(rkey, r.id) else {
                        continue;
                    };
                    if self.live.get(&rkey) == Some(&r.id) {
                        self.live.remove(&rkey);
                    }
                    self.gone_waiting.push(p.gone(at_ns));
                }
                Probe::Unknown => {}
            }
        }
        self.metrics.tracked_entries.set(self.live.len() as i64);
        self.metrics
            .entries_pending_recheck
            .set(self.pending.len() as i64);
    }
}

/// The running capture, reading from `E` (the kernel unless a test says
/// otherwise).
pub struct Capture<S: RecordSink, E: EventSource = NetlinkSource> {
    source: E,
    core: Core<S>,
    probes: Vec<Probe>,
}

impl<S: RecordSink, E: EventSource> std::fmt::Debug for Capture<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("live", &self.core.live.len())
            .field("pending", &self.core.pending.len())
            .finish()
    }
}

impl<S: RecordSink> Capture<S, NetlinkSource> {
    /// Open and subscribe the event socket, attach the BPF filter and do the
    /// start-up dump. Events arriving during the dump queue in the socket.
    pub fn start(
        cfg: CaptureConfig,
        sink: S,
        metrics: Metrics,
    ) -> Result<Capture<S, NetlinkSource>, CaptureError> {
        let source = NetlinkSource::open(&cfg, &metrics)?;
        Capture::with_source(source, cfg, sink, metrics)
    }
}

impl<S: RecordSink, E: EventSource> Capture<S, E> {
    /// Capture from `source`; does the start-up dump (its entries are
    /// emitted as recovered, and pending a re-check).
    pub fn with_source(
        mut source: E,
        cfg: CaptureConfig,
        sink: S,
        metrics: Metrics,
    ) -> Result<Capture<S, E>, CaptureError> {
        let last_drops = source.drops().unwrap_or(0);
        let counts = PortCounts::new(cfg.filter.ports(), &metrics);
        let mut c = Capture {
            source,
            core: Core {
                cfg,
                sink,
                metrics,
                live: KeyMap::default(),
                pending: KeyMap::default(),
                gone_waiting: Vec::new(),
                counts,
                batch: BatchCounts::default(),
                last_drops,
                pending_loss: 0,
                last_ok_ns: now_ns(),
                decode_warn: RateLimiter::new(Duration::from_secs(10)),
                loss_warn: RateLimiter::new(Duration::from_secs(10)),
            },
            probes: Vec::new(),
        };
        let n = c.resync(false).map_err(CaptureError::Dump)?;
        tracing::info!(entries = n, "start-up table dump done");
        Ok(c)
    }

    /// Read and process events until `stop` is set; re-check pending
    /// entries every `recheck_interval`.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut last_drop_check = Instant::now();
        let mut last_recheck = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if let Some(n) = self.step() {
                // A small batch means we are ahead of the kernel: let
                // events accumulate briefly, so the next recvmmsg reads
                // many at once (fewer syscalls and wake-ups per event).
                // A full batch never waits; 1 ms of events is far below
                // the socket buffer.
                if n < self.core.cfg.batch_messages / 4 {
                    std::thread::sleep(COALESCE);
                }
            }
            if last_drop_check.elapsed() >= Duration::from_secs(1) {
                last_drop_check = Instant::now();
                if self.check_drops() {
                    self.recover_from_loss();
                }
            }
            if last_recheck.elapsed() >= self.core.cfg.recheck_interval {
                last_recheck = Instant::now();
                self.recheck();
            }
        }
    }

    /// One receive from the source and its processing. Returns the number
    /// of datagrams read, `None` when nothing was read.
    pub fn step(&mut self) -> Option<usize> {
        let mut out = Vec::new();
        let core = &mut self.core;
        let lag = core.metrics.event_lag.local();
        let got = self
            .source
            .recv(|d, recv_ns| core.handle(d, recv_ns, &lag, &mut out));
        lag.flush();
        match got {
            Ok(SourceRecv::Batch {
                datagrams,
                truncated,
            }) => {
                self.core.last_ok_ns = now_ns();
                self.core.finish_batch(out, truncated);
                if datagrams < self.core.cfg.batch_messages {
                    self.core.flush_gone();
                }
                Some(datagrams)
            }
            Ok(SourceRecv::Idle) => {
                self.core.flush_gone();
                if self.check_drops() {
                    self.recover_from_loss();
                }
                None
            }
            Ok(SourceRecv::Overflow) => {
                self.core.metrics.overflows.inc();
                self.check_drops();
                self.recover_from_loss();
                None
            }
            Err(e) => {
                if let Some(s) = self.core.decode_warn.allow() {
                    tracing::warn!(error = %e, suppressed = s, "event socket read failed");
                }
                std::thread::sleep(Duration::from_millis(10));
                None
            }
        }
    }

    /// Re-check pending entries now: GETs by original tuple in their zone,
    /// at most [`RECHECK_BATCH`], longest unseen first. Entries found gone
    /// are sent after the next empty read of the source.
    pub fn recheck(&mut self) {
        if self.core.pending.is_empty() {
            return;
        }
        let mut order: Vec<(u64, ConnRecord)> = self
            .core
            .pending
            .values()
            .map(|p| (p.last_seen_ns, p.rec))
            .collect();
        if order.len() > RECHECK_BATCH {
            order.select_nth_unstable_by_key(RECHECK_BATCH, |(seen, _)| *seen);
            order.truncate(RECHECK_BATCH);
        }
        let asked: Vec<ConnRecord> = order.into_iter().map(|(_, r)| r).collect();
        let started = Instant::now();
        let result = self.source.probe(&asked, &mut self.probes);
        match result {
            Ok(()) => {
                let probes = std::mem::take(&mut self.probes);
                self.core.apply_probes(&asked, &probes, now_ns());
                self.probes = probes;
                tracing::debug!(
                    asked = asked.len(),
                    gone = self.core.gone_waiting.len(),
                    took_us = started.elapsed().as_micros() as u64,
                    "re-check of recovered entries done"
                );
            }
            Err(e) => {
                if let Some(s) = self.core.loss_warn.allow() {
                    tracing::warn!(error = %e, suppressed = s, "re-check of recovered entries failed; will retry");
                }
            }
        }
    }

    /// Entries believed alive, and how many of them are pending a re-check.
    pub fn live_counts(&self) -> (usize, usize) {
        (self.core.live.len(), self.core.pending.len())
    }

    /// Add new kernel drops to the lost counter; true when there were any.
    fn check_drops(&mut self) -> bool {
        let Some(d) = self.source.drops() else {
            return false;
        };
        let c = &mut self.core;
        if d > c.last_drops {
            let lost = d - c.last_drops;
            c.last_drops = d;
            c.pending_loss += lost;
            c.metrics.events_lost.inc_by(lost);
            if let Some(s) = c.loss_warn.allow() {
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

    /// Resync after kernel event loss, then report the loss to the sinks
    /// (the uplink sends it to the collector as a gap): from the last batch
    /// read before it to now, with the count `/proc/net/netlink` gave.
    fn recover_from_loss(&mut self) {
        self.core.metrics.resyncs.inc();
        let resynced = match self.resync(true) {
            Ok(n) => {
                tracing::info!(recovered = n, "resync after event loss done");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "resync after event loss failed; will retry on the next loss");
                false
            }
        };
        let c = &mut self.core;
        if c.pending_loss > 0 {
            let loss = Loss {
                from_ns: c.last_ok_ns,
                to_ns: now_ns(),
                count: std::mem::take(&mut c.pending_loss),
                resynced,
            };
            c.sink.loss(&loss);
        }
    }

    /// Dump the table and apply it (see [`Core::apply_dump`]).
    fn resync(&mut self, after_loss: bool) -> Result<usize, String> {
        let dumped = self.source.dump(&self.core.cfg.filter)?;
        Ok(self.core.apply_dump(dumped, after_loss))
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

#[cfg(test)]
mod tests {
    use super::*;
    use ctw_common::{Protocol, TcpState, Tuple};
    use std::net::IpAddr;

    const POD_A: [u8; 4] = [198, 18, 1, 2];
    const POD_B: [u8; 4] = [198, 18, 1, 3];
    const NODE: [u8; 4] = [198, 18, 0, 1];
    const SRV: [u8; 4] = [198, 19, 0, 2];

    fn tuple(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Tuple {
        Tuple::new(IpAddr::from(src), sport, IpAddr::from(dst), dport)
    }

    /// A TCP entry from `pod:sport` to the server's port 80, masqueraded to
    /// node port `snat`.
    fn tcp(kind: EventKind, ns: u64, pod: [u8; 4], sport: u16, snat: u16, id: u32) -> ConnRecord {
        ConnRecord {
            id,
            status: status::CONFIRMED | status::SEEN_REPLY | status::SRC_NAT,
            tcp_state: Some(if kind == EventKind::Destroy {
                TcpState::TimeWait
            } else {
                TcpState::SynSent
            }),
            ..ConnRecord::new(
                kind,
                ns,
                Protocol::Tcp,
                tuple(pod, sport, SRV, 80),
                tuple(SRV, 80, NODE, snat),
            )
        }
    }

    fn cfg() -> CaptureConfig {
        CaptureConfig {
            filter: Filter::new(&[80, 8080, 5353], &[]),
            capture_destroy: true,
            rcvbuf_bytes: 1 << 20,
            batch_messages: 256,
            kernel_filter: false,
            recheck_interval: Duration::from_secs(5),
        }
    }

    struct Rig {
        cap: Capture<MemorySink, ReplaySource>,
        src: ReplaySource,
        sink: MemorySink,
        m: Metrics,
    }

    /// A capture over a replay whose table holds `table` at start-up.
    fn rig(table: Vec<ConnRecord>) -> Rig {
        rig_with(cfg(), table)
    }

    fn rig_with(cfg: CaptureConfig, table: Vec<ConnRecord>) -> Rig {
        let src = ReplaySource::new();
        src.set_table(table);
        let sink = MemorySink::default();
        let m = Metrics::new(cfg.filter.ports());
        let cap = Capture::with_source(src.clone(), cfg, sink.clone(), m.clone())
            .expect("replay capture starts");
        Rig { cap, src, sink, m }
    }

    impl Rig {
        /// Deliver one batch and process it; then one idle read.
        fn feed(&mut self, recs: impl IntoIterator<Item = ConnRecord>) {
            self.src.push_records(recs);
            while self.src.queued() > 0 {
                self.cap.step();
            }
            self.cap.step();
        }
        fn out(&self) -> Vec<ConnRecord> {
            self.sink.records()
        }
        fn gone(&self) -> Vec<ConnRecord> {
            self.out()
                .into_iter()
                .filter(|r| r.status & status::CTW_GONE != 0)
                .collect()
        }
    }

    #[test]
    fn new_and_destroy_are_emitted_and_leave_the_set_empty() {
        let mut r = rig(vec![]);
        r.feed([tcp(EventKind::New, 1, POD_A, 42000, 42000, 7)]);
        r.feed([tcp(EventKind::Destroy, 2, POD_A, 42000, 42000, 7)]);
        let kinds: Vec<EventKind> = r.out().iter().map(|x| x.kind).collect();
        assert_eq!(kinds, [EventKind::New, EventKind::Destroy]);
        assert_eq!(r.cap.live_counts(), (0, 0));
        assert_eq!(r.m.closed_connections.with_label_values(&["80"]).get(), 1);
    }

    #[test]
    fn recovered_entry_then_its_new_event_is_a_duplicate_and_no_longer_pending() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let mut r = rig(vec![a]);
        assert_eq!(r.out()[0].kind, EventKind::Recovered);
        assert_eq!(r.cap.live_counts(), (1, 1));
        r.feed([a]);
        assert_eq!(r.out().len(), 1);
        assert_eq!(r.m.events_duplicate.get(), 1);
        // Events flow for it: its DESTROY will come, no re-check needed.
        assert_eq!(r.cap.live_counts(), (1, 0));
    }

    /// Issue 11 case 1: A recovered at start-up, its end never reported;
    /// B gets A's node port: B's NEW ends A, which is logged gone.
    #[test]
    fn new_with_a_live_reply_tuple_supersedes_and_closes_a_pending_entry() {
        let a = tcp(EventKind::New, 1_000, POD_A, 42000, 42000, 7);
        let mut r = rig(vec![a]);
        let seen = r.out()[0].event_ns;
        let b = tcp(EventKind::New, seen + 5_000, POD_B, 42000, 42000, 9);
        r.feed([b]);
        let out = r.out();
        assert_eq!(out.len(), 3, "{out:#?}");
        let g = out[1];
        assert_eq!(g.kind, EventKind::Destroy);
        assert_eq!(g.orig, a.orig);
        assert_eq!(g.id, 7);
        assert!(g.status & status::CTW_GONE != 0);
        assert_eq!(g.stop_ns, Some(seen), "last seen: the start-up dump");
        assert_eq!(g.event_ns, b.event_ns, "ended no later than B's start");
        assert_eq!(out[2], b);
        assert_eq!(r.cap.live_counts(), (1, 0));
        assert_eq!(r.m.entries_superseded.get(), 1);
        assert_eq!(r.m.entries_found_gone.get(), 1);
    }

    #[test]
    fn superseding_a_non_pending_entry_emits_nothing_and_its_late_destroy_is_kept() {
        let mut r = rig(vec![]);
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let b = tcp(EventKind::New, 2, POD_B, 42000, 42000, 9);
        r.feed([a, b]);
        assert_eq!(r.out().len(), 2);
        assert_eq!(r.m.entries_superseded.get(), 1);
        assert_eq!(r.cap.live_counts(), (1, 0));
        // A's DESTROY arriving late is still a record, and does not end B.
        r.feed([tcp(EventKind::Destroy, 3, POD_A, 42000, 42000, 7)]);
        assert_eq!(r.out().len(), 3);
        assert_eq!(r.cap.live_counts(), (1, 0));
        r.feed([tcp(EventKind::Destroy, 4, POD_B, 42000, 42000, 9)]);
        assert_eq!(r.cap.live_counts(), (0, 0));
    }

    #[test]
    fn same_reply_tuple_in_another_zone_is_another_entry() {
        let mut r = rig(vec![]);
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let b = ConnRecord {
            zone: 7,
            ..tcp(EventKind::New, 2, POD_B, 42000, 42000, 9)
        };
        r.feed([a, b]);
        assert_eq!(r.m.entries_superseded.get(), 0);
        assert_eq!(r.cap.live_counts(), (2, 0));
    }

    #[test]
    fn recheck_finds_a_pending_entry_alive_then_gone() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let mut r = rig(vec![a]);
        let dump_seen = r.out()[0].event_ns;
        r.cap.recheck();
        r.cap.step();
        assert!(r.gone().is_empty());
        assert_eq!(r.cap.live_counts(), (1, 1));
        assert_eq!(r.src.requests(), (1, 1), "one dump at start, one GET round");
        let before_gone_check = now_ns();
        r.src.set_table(vec![]);
        r.cap.recheck();
        // Held back until the socket was read empty once.
        assert!(r.gone().is_empty());
        r.cap.step();
        let g = r.gone();
        assert_eq!(g.len(), 1);
        let seen = g[0].stop_ns.expect("last seen");
        assert!(seen >= dump_seen && seen <= before_gone_check, "{seen}");
        assert!(g[0].event_ns >= before_gone_check);
        assert_eq!(g[0].start_ns, a.start_ns);
        assert_eq!((g[0].orig, g[0].reply, g[0].id), (a.orig, a.reply, a.id));
        assert_eq!(r.cap.live_counts(), (0, 0));
        assert_eq!(r.m.entries_found_gone.get(), 1);
        assert_eq!(r.m.closed_connections.with_label_values(&["80"]).get(), 1);
        // Nothing pending: no more requests.
        r.cap.recheck();
        assert_eq!(r.src.requests(), (1, 2));
    }

    #[test]
    fn another_id_under_the_same_tuple_means_gone() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let mut r = rig(vec![a]);
        r.src
            .set_table(vec![tcp(EventKind::New, 1, POD_A, 42000, 42001, 8)]);
        r.cap.recheck();
        r.cap.step();
        assert_eq!(r.gone().len(), 1);
    }

    #[test]
    fn a_real_destroy_beats_the_recheck() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let mut r = rig(vec![a]);
        r.src.set_table(vec![]);
        r.cap.recheck();
        // The DESTROY was queued on the socket before the GET answered.
        r.feed([tcp(EventKind::Destroy, 2, POD_A, 42000, 42000, 7)]);
        assert!(r.gone().is_empty(), "{:#?}", r.out());
        assert_eq!(r.out().len(), 2);
        assert_eq!(r.m.entries_found_gone.get(), 0);
        assert_eq!(r.cap.live_counts(), (0, 0));
    }

    #[test]
    fn a_real_destroy_ends_the_pending_state() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let mut r = rig(vec![a]);
        r.feed([tcp(EventKind::Destroy, 2, POD_A, 42000, 42000, 7)]);
        assert_eq!(r.cap.live_counts(), (0, 0));
        r.cap.recheck();
        assert_eq!(r.src.requests(), (1, 0), "nothing left to re-check");
    }

    #[test]
    fn many_pending_entries_are_rechecked_in_bounded_rounds_longest_unseen_first() {
        let n = RECHECK_BATCH as u16 + 100;
        let table: Vec<ConnRecord> = (0..n)
            .map(|i| {
                tcp(
                    EventKind::New,
                    1,
                    POD_A,
                    20000 + i,
                    20000 + i,
                    u32::from(i) + 1,
                )
            })
            .collect();
        let mut r = rig(table.clone());
        assert_eq!(r.cap.live_counts(), (n as usize, n as usize));
        r.src.set_table(vec![]);
        r.cap.recheck();
        r.cap.step();
        assert_eq!(r.src.requests(), (1, 1), "GETs, no dump");
        assert_eq!(r.gone().len(), RECHECK_BATCH);
        r.cap.recheck();
        r.cap.step();
        assert_eq!(r.gone().len(), n as usize, "the rest in the next round");
        assert_eq!(r.cap.live_counts(), (0, 0));
    }

    #[test]
    fn entries_found_alive_go_to_the_back_of_the_recheck_order() {
        let n = RECHECK_BATCH as u16 + 100;
        let table: Vec<ConnRecord> = (0..n)
            .map(|i| {
                tcp(
                    EventKind::New,
                    1,
                    POD_A,
                    20000 + i,
                    20000 + i,
                    u32::from(i) + 1,
                )
            })
            .collect();
        let mut r = rig(table.clone());
        // First round: RECHECK_BATCH of them found alive (last seen now).
        r.cap.recheck();
        // Now all are gone: the 100 not asked yet come first.
        r.src.set_table(vec![]);
        r.cap.recheck();
        r.cap.step();
        let gone = r.gone();
        assert_eq!(gone.len(), RECHECK_BATCH);
        let first_round_missed = gone
            .iter()
            .filter(|g| g.stop_ns == Some(r.out()[0].event_ns))
            .count();
        assert_eq!(
            first_round_missed, 100,
            "the 100 unasked ones were asked first"
        );
    }

    #[test]
    fn a_resync_finds_pending_entries_gone_and_supersedes_by_reply_tuple() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let c = tcp(EventKind::New, 1, POD_A, 42001, 42001, 8);
        let mut r = rig(vec![a, c]);
        // Loss; meanwhile A ended and B took its node port, C ended.
        let b = tcp(EventKind::New, 5, POD_B, 42000, 42000, 9);
        r.src.set_table(vec![b]);
        r.src.add_drops(3);
        r.cap.step();
        r.cap.step();
        let out = r.out();
        let recovered: Vec<_> = out
            .iter()
            .filter(|x| x.kind == EventKind::Recovered)
            .collect();
        assert_eq!(recovered.len(), 3, "{out:#?}");
        let gone = r.gone();
        assert_eq!(gone.len(), 2, "{out:#?}");
        assert_eq!(r.cap.live_counts(), (1, 1));
        assert_eq!(r.m.resyncs.get(), 1);
        let losses = r.sink.1.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(losses.len(), 1, "the loss goes to the sinks");
        assert_eq!((losses[0].count, losses[0].resynced), (3, true));
        assert!(losses[0].from_ns <= losses[0].to_ns);
    }

    /// Issue 11 case 6: the losing entry of a UDP NAT clash sends only a
    /// DESTROY, with another id and maybe another backend.
    #[test]
    fn nat_clash_shadow_is_counted_never_emitted_and_never_ends_the_real_entry() {
        let mut r = rig(vec![]);
        let udp = |kind, id, backend: [u8; 4], clash: bool| ConnRecord {
            id,
            status: status::CONFIRMED | status::DST_NAT | if clash { status::NAT_CLASH } else { 0 },
            ..ConnRecord::new(
                kind,
                1,
                Protocol::Udp,
                tuple(POD_A, 40000, [198, 19, 9, 9], 5353),
                tuple(backend, 5353, POD_A, 40000),
            )
        };
        r.feed([udp(EventKind::New, 1, SRV, false)]);
        r.feed([udp(EventKind::Destroy, 2, [198, 19, 0, 3], true)]);
        assert_eq!(r.out().len(), 1);
        assert_eq!(r.m.nat_clash.get(), 1);
        assert_eq!(r.cap.live_counts(), (1, 0));
        // Even with the same id (it never has it): still not the real one.
        r.feed([udp(EventKind::Destroy, 1, SRV, true)]);
        assert_eq!(r.cap.live_counts(), (1, 0));
        r.feed([udp(EventKind::Destroy, 1, SRV, false)]);
        assert_eq!(r.out().len(), 2);
        assert_eq!(r.cap.live_counts(), (0, 0));
        assert_eq!(r.m.nat_clash.get(), 2);
        assert_eq!(r.m.closed_connections.with_label_values(&["5353"]).get(), 1);
    }

    /// Issue 11 case 2: keepalive past the established timeout.
    #[test]
    fn midstream_pickups_are_records_counted_per_port() {
        let mut r = rig(vec![]);
        let first = tcp(EventKind::New, 1, POD_A, 43000, 43000, 7);
        let expired = tcp(EventKind::Destroy, 2, POD_A, 43000, 43000, 7);
        let pickup = |ns, id| ConnRecord {
            tcp_state: Some(TcpState::Established),
            ..tcp(EventKind::New, ns, POD_A, 43000, 43000, id)
        };
        r.feed([first, expired, pickup(3, 8)]);
        r.feed([
            tcp(EventKind::Destroy, 4, POD_A, 43000, 43000, 8),
            pickup(5, 9),
        ]);
        let news: Vec<bool> = r
            .out()
            .iter()
            .filter(|x| x.kind == EventKind::New)
            .map(ConnRecord::midstream)
            .collect();
        assert_eq!(news, [false, true, true]);
        assert_eq!(r.m.midstream_pickups.with_label_values(&["80"]).get(), 2);
        assert_eq!(r.m.new_connections.with_label_values(&["80"]).get(), 3);
        assert_eq!(r.m.entries_superseded.get(), 0);
    }

    #[test]
    fn capture_destroy_false_hides_gone_records_but_counts_them() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let mut r = rig_with(
            CaptureConfig {
                capture_destroy: false,
                ..cfg()
            },
            vec![a],
        );
        r.src.set_table(vec![]);
        r.cap.recheck();
        r.cap.step();
        assert_eq!(r.out().len(), 1);
        assert_eq!(r.m.entries_found_gone.get(), 1);
        assert_eq!(r.cap.live_counts(), (0, 0));
    }

    #[test]
    fn golden_datagrams_replay_through_the_loop() {
        use crate::netlink::decode::testutil::golden;
        let mut r = rig(vec![]);
        let g = golden("tcp4");
        r.src.push(ReplayStep::Datagrams {
            recv_ns: g[0].0,
            datagrams: g.into_iter().map(|(_, b)| b).collect(),
        });
        r.cap.step();
        let out = r.out();
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!(
            (out[0].kind, out[1].kind),
            (EventKind::New, EventKind::Destroy)
        );
        assert_eq!(r.cap.live_counts(), (0, 0));
        assert_eq!(r.m.decode_errors.get(), 0);
    }

    #[test]
    fn a_full_batch_holds_gone_records_until_the_socket_is_drained() {
        let a = tcp(EventKind::New, 1, POD_A, 42000, 42000, 7);
        let mut r = rig_with(
            CaptureConfig {
                batch_messages: 1,
                ..cfg()
            },
            vec![a],
        );
        r.src.set_table(vec![]);
        r.cap.recheck();
        r.src
            .push_records([tcp(EventKind::New, 2, POD_B, 50000, 50000, 11)]);
        r.cap.step();
        assert!(r.gone().is_empty(), "a full batch: more may be queued");
        r.cap.step();
        assert_eq!(r.gone().len(), 1);
    }
}

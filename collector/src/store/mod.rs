//! Durable storage of connection records and loss gaps, and search over them.
//!
//! [`RecordStore`] is the boundary: the tantivy implementation
//! ([`tantivy_store`]) in production, [`MemStore`] in tests.
//!
//! Delivery guarantee: when `append` returns `Ok`, the batch survives a crash
//! of the collector (it is in the write-ahead log, fsynced) and will be
//! searchable within the commit interval. A batch whose
//! `(node, boot_id, seq)` was stored before is not stored again
//! (`AppendOutcome::Duplicate`), so agent replays never show twice.

pub mod tantivy_store;

use std::net::IpAddr;
use std::sync::Mutex;

use ctw_common::{ConnRecord, Counters, EventKind, Protocol};

/// One batch from one agent boot.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBatch {
    pub node: String,
    pub boot_id: String,
    pub seq: u64,
    pub records: Vec<ConnRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored,
    Duplicate,
}

/// A window in which a node's records may be incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub node: String,
    pub from_ns: u64,
    pub to_ns: u64,
    /// `kernel_drop`, `spool_overflow`, `agent_disconnected`, ...
    pub reason: String,
    /// Events or records lost, when known.
    pub count: u64,
}

/// A search. Every field is optional; times are ns since the epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchQuery {
    pub src_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst_ip: Option<IpAddr>,
    pub dst_port: Option<u16>,
    pub snat_ip: Option<IpAddr>,
    pub snat_port: Option<u16>,
    pub node: Option<String>,
    pub protocol: Option<Protocol>,
    /// Connections that were alive (or, without a known end, started) in
    /// `[from_ns, to_ns]`.
    pub from_ns: Option<u64>,
    pub to_ns: Option<u64>,
    /// Rank connections alive at `at_ns` first, then by distance in time.
    pub at_ns: Option<u64>,
    /// Resolution of `at_ns` as the caller wrote it (1 ms for nginx's
    /// `$msec`): "alive at" means alive somewhere in `[at, at + precision)`.
    pub at_precision_ns: u64,
    pub limit: usize,
}

/// One connection: its NEW (or recovered) record joined with its DESTROY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub node: String,
    /// The NEW / recovered record; a DESTROY record when no NEW was stored.
    pub record: ConnRecord,
    /// When the connection was seen to end (the DESTROY's stop or event time).
    pub closed_ns: Option<u64>,
    pub counters_orig: Option<Counters>,
    pub counters_reply: Option<Counters>,
}

impl Hit {
    /// Start of the connection: kernel start time, else the record's time.
    pub fn start_ns(&self) -> u64 {
        self.record.start_ns.unwrap_or(self.record.event_ns)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchResult {
    pub hits: Vec<Hit>,
    /// Every match, not only those returned.
    pub total: u64,
    /// Gaps of the nodes in the result (or all nodes when unrestricted) that
    /// overlap the time range.
    pub gaps: Vec<Gap>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub records: u64,
    pub bytes_on_disk: u64,
    pub partitions: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("index: {0}")]
    Index(String),
    #[error("corrupt data in {path}: {message}")]
    Corrupt { path: String, message: String },
    #[error("bad query: {0}")]
    BadQuery(String),
}

pub trait RecordStore: Send + Sync {
    /// Durably store a batch (see the module's delivery guarantee).
    fn append(&self, batch: StoredBatch) -> Result<AppendOutcome, StoreError>;
    /// Durably record a gap; an identical gap again is a no-op (agents
    /// resend loss reports they could not see acknowledged).
    fn record_gap(&self, gap: Gap) -> Result<(), StoreError>;
    fn search(&self, q: &SearchQuery) -> Result<SearchResult, StoreError>;
    fn stats(&self) -> StoreStats;
}

/// Does `r` (seen on `node`) match the field filters of `q` (not time)?
pub fn matches_fields(q: &SearchQuery, node: &str, r: &ConnRecord) -> bool {
    let (snat_ip, snat_port) = r.snat();
    q.src_ip.is_none_or(|v| v == r.orig.src)
        && q.src_port.is_none_or(|v| v == r.orig.src_port)
        && q.dst_ip.is_none_or(|v| v == r.orig.dst)
        && q.dst_port.is_none_or(|v| v == r.orig.dst_port)
        && q.snat_ip.is_none_or(|v| v == snat_ip)
        && q.snat_port.is_none_or(|v| v == snat_port)
        && q.node.as_deref().is_none_or(|v| v == node)
        && q.protocol.is_none_or(|v| v == r.protocol)
}

/// What every store keeps of a record: times floored to the microsecond
/// (the agent's receive time is not more exact than that) and no conntrack
/// id (random 32 bits that cost 4 bytes per record on disk; connections are
/// joined by their tuple instead, see [`assemble`]). Applied on append, so
/// every store returns the same records.
pub fn normalize(r: &mut ConnRecord) {
    fn us(ns: u64) -> u64 {
        ns - ns % 1000
    }
    r.event_ns = us(r.event_ns);
    r.start_ns = r.start_ns.map(us);
    r.stop_ns = r.stop_ns.map(us);
    r.id = 0;
}

/// Could `a` and `b` be records of the same connection, judged by the
/// kernel start times when both carry one?
fn same_start(a: &ConnRecord, b: &ConnRecord) -> bool {
    match (a.start_ns, b.start_ns) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

/// Join NEW/recovered records with DESTROY records of the same connection,
/// filter by time, rank and cut to `limit`. Shared by every store so they
/// answer alike.
///
/// The kernel never holds two entries with the same original tuple in one
/// zone, so the records of a (node, protocol, original tuple, zone), in event
/// order, are one connection after another: a DESTROY closes the open
/// connection (when their kernel start times, if known, agree); a recovered
/// record while a connection is open is that connection again (the earliest
/// record is kept); a DESTROY with nothing open stands alone.
pub fn assemble(q: &SearchQuery, records: Vec<(String, ConnRecord)>, gaps: &[Gap]) -> SearchResult {
    use std::collections::HashMap;
    type Key = (String, Protocol, ctw_common::Tuple, u16);
    let mut by_key: HashMap<Key, Vec<ConnRecord>> = HashMap::new();
    for (node, r) in records {
        by_key
            .entry((node, r.protocol, r.orig, r.zone))
            .or_default()
            .push(r);
    }
    let mut hits: Vec<Hit> = Vec::new();
    for ((node, ..), mut rs) in by_key {
        let order = |k: EventKind| match k {
            EventKind::New => 0,
            EventKind::Recovered => 1,
            EventKind::Destroy => 2,
        };
        rs.sort_by_key(|r| (r.event_ns, order(r.kind)));
        // `open`: the connection not yet closed; `last`: the newest one.
        let mut open: Option<usize> = None;
        let mut last: Option<usize> = None;
        for r in rs {
            let closed = (r.kind == EventKind::Destroy).then(|| r.stop_ns.unwrap_or(r.event_ns));
            match r.kind {
                EventKind::New | EventKind::Recovered => {
                    let again = r.kind == EventKind::Recovered
                        && (open.is_some_and(|i| same_start(&hits[i].record, &r))
                            || last.is_some_and(|i: usize| {
                                r.start_ns.is_some() && hits[i].record.start_ns == r.start_ns
                            }));
                    if again {
                        continue;
                    }
                }
                EventKind::Destroy => {
                    if let Some(i) = open.filter(|&i| {
                        same_start(&hits[i].record, &r)
                            && closed.is_some_and(|c| c >= hits[i].start_ns())
                    }) {
                        let h = &mut hits[i];
                        h.closed_ns = closed;
                        h.counters_orig = r.counters_orig;
                        h.counters_reply = r.counters_reply;
                        open = None;
                        continue;
                    }
                }
            }
            hits.push(Hit {
                node: node.clone(),
                closed_ns: closed,
                counters_orig: if closed.is_some() {
                    r.counters_orig
                } else {
                    None
                },
                counters_reply: if closed.is_some() {
                    r.counters_reply
                } else {
                    None
                },
                record: r,
            });
            last = Some(hits.len() - 1);
            open = closed.is_none().then_some(hits.len() - 1);
        }
    }
    let from = q.from_ns.unwrap_or(0);
    let to = q.to_ns.unwrap_or(u64::MAX);
    hits.retain(|h| {
        let start = if h.record.kind == EventKind::Destroy {
            h.record.start_ns.unwrap_or(0)
        } else {
            h.start_ns()
        };
        let end = h.closed_ns.unwrap_or(start.max(h.record.event_ns));
        start <= to && end >= from
    });
    rank(&mut hits, q.at_ns, q.at_precision_ns);
    let total = hits.len() as u64;
    hits.truncate(q.limit);
    let gaps = gaps
        .iter()
        .filter(|g| g.from_ns <= to && g.to_ns >= from)
        .filter(|g| q.node.as_deref().is_none_or(|n| n == g.node))
        .cloned()
        .collect();
    SearchResult { hits, total, gaps }
}

/// Is the connection alive somewhere in `[at, at + precision)`?
pub fn alive_at(h: &Hit, at: u64, precision: u64) -> bool {
    let at_end = at.saturating_add(precision.saturating_sub(1));
    h.start_ns() <= at_end && h.closed_ns.is_none_or(|c| c >= at)
}

/// With `at`: connections alive at `at` (see [`alive_at`]) first, newest
/// start first, then by distance in time from `at`. Without: newest first.
pub fn rank(hits: &mut [Hit], at_ns: Option<u64>, precision: u64) {
    match at_ns {
        Some(at) => hits.sort_by_key(|h| {
            let start = h.start_ns();
            let alive = alive_at(h, at, precision);
            let distance = if alive {
                0
            } else if start > at {
                start - at
            } else {
                at - h.closed_ns.unwrap_or(start)
            };
            (!alive, distance, std::cmp::Reverse(start))
        }),
        None => hits.sort_by_key(|h| std::cmp::Reverse(h.start_ns())),
    }
}

/// In-memory store for tests: same dedup and search semantics, no durability.
#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    seen: std::collections::HashSet<(String, String, u64)>,
    records: Vec<(String, ConnRecord)>,
    gaps: Vec<Gap>,
}

impl RecordStore for MemStore {
    fn append(&self, b: StoredBatch) -> Result<AppendOutcome, StoreError> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| StoreError::Index("poisoned".into()))?;
        if !g.seen.insert((b.node.clone(), b.boot_id.clone(), b.seq)) {
            return Ok(AppendOutcome::Duplicate);
        }
        for mut r in b.records {
            normalize(&mut r);
            g.records.push((b.node.clone(), r));
        }
        Ok(AppendOutcome::Stored)
    }

    fn record_gap(&self, gap: Gap) -> Result<(), StoreError> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| StoreError::Index("poisoned".into()))?;
        if !g.gaps.contains(&gap) {
            g.gaps.push(gap);
        }
        Ok(())
    }

    fn search(&self, q: &SearchQuery) -> Result<SearchResult, StoreError> {
        let g = self
            .inner
            .lock()
            .map_err(|_| StoreError::Index("poisoned".into()))?;
        let matching = g
            .records
            .iter()
            .filter(|(n, r)| matches_fields(q, n, r))
            .cloned()
            .collect();
        Ok(assemble(q, matching, &g.gaps))
    }

    fn stats(&self) -> StoreStats {
        let n = self
            .inner
            .lock()
            .map(|g| g.records.len() as u64)
            .unwrap_or(0);
        StoreStats {
            records: n,
            bytes_on_disk: 0,
            partitions: 0,
        }
    }
}

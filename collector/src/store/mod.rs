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

mod backend;
pub mod clickhouse;
pub mod tantivy_store;

/// Default days of records kept (`storage.retention_days`, every backend).
pub const DEFAULT_RETENTION_DAYS: u32 = 14;
/// Default hours before a query's range searched for connections still
/// alive in it (`storage.lookback_hours`).
pub const DEFAULT_LOOKBACK_HOURS: u32 = 24;
/// Default most records one search collects and joins
/// (`storage.max_collected_records`); past it they are only counted.
pub const DEFAULT_MAX_COLLECTED_RECORDS: usize = 200_000;

pub use backend::{open, Backend};

use std::net::IpAddr;
use std::sync::Mutex;

use ctw_common::{ConnRecord, Counters, EventKind, Protocol, TcpState};

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
    /// Only connections of this kind (see [`ConnKind`]); `None`: all.
    pub kind: Option<ConnKind>,
}

/// What a connection's first stored record was, the `kind` search filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnKind {
    /// `new`: seen opening (a conntrack NEW whose first packet opened the
    /// connection: any UDP/ICMP NEW, a TCP NEW in state `SYN_SENT`).
    New,
    /// `midstream`: a TCP NEW picked up mid-stream ([`ConnRecord::midstream`]),
    /// e.g. after an idle keepalive connection's entry expired.
    Midstream,
    /// `recovered`: found by a table dump (agent start-up or resync), its
    /// NEW not seen.
    Recovered,
    /// `destroy`: only its end was seen (a DESTROY, or the agent's
    /// `CTW_GONE` record, with no NEW or recovered record of it stored).
    Destroy,
}

impl ConnKind {
    /// Every kind, in the order help texts list them.
    pub const ALL: [ConnKind; 4] = [
        ConnKind::New,
        ConnKind::Midstream,
        ConnKind::Recovered,
        ConnKind::Destroy,
    ];

    /// The API / CLI value: `new`, `midstream`, `recovered`, `destroy`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnKind::New => "new",
            ConnKind::Midstream => "midstream",
            ConnKind::Recovered => "recovered",
            ConnKind::Destroy => "destroy",
        }
    }

    /// Parse an API / CLI value (exact, lower case); `None` if unknown.
    pub fn parse(s: &str) -> Option<ConnKind> {
        ConnKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The valid values, comma-separated, for error and help texts.
    pub fn valid_values() -> String {
        ConnKind::ALL.map(ConnKind::as_str).join(", ")
    }

    /// The kind of a connection whose first record is `r`.
    pub fn of(r: &ConnRecord) -> ConnKind {
        match r.kind {
            EventKind::New if r.midstream() => ConnKind::Midstream,
            EventKind::New => ConnKind::New,
            EventKind::Recovered => ConnKind::Recovered,
            EventKind::Destroy => ConnKind::Destroy,
        }
    }
}

/// How a connection's end (`Hit::closed_ns`) is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    /// `destroy`: the kernel's DESTROY event; the end is its stop time
    /// (`CTA_TIMESTAMP_STOP`) or, without timestamps, when the agent read it.
    Destroy,
    /// `gone`: the agent's re-check found the entry gone (a DESTROY record
    /// with [`status::CTW_GONE`](ctw_common::status::CTW_GONE)). The end is
    /// after `Hit::last_seen_ns` and at or before `closed_ns` (when it was
    /// found gone): `closed_ns` is an upper bound.
    Gone,
    /// `superseded`: a later NEW or recovered entry on the same node took
    /// this connection's reply (or original) tuple in its zone; the kernel
    /// holds one live entry per tuple, so this one had ended at or before
    /// the later one's start, which is `closed_ns` (an upper bound). Seen
    /// for entries whose DESTROY the kernel never sent (created while no
    /// event listener existed, `nf_conntrack_events=2`) or was lost.
    Superseded,
}

impl End {
    /// The API value: `destroy`, `gone`, `superseded`.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Destroy => "destroy",
            End::Gone => "gone",
            End::Superseded => "superseded",
        }
    }
}

/// One connection: its NEW (or recovered) record joined with its DESTROY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub node: String,
    /// The NEW / recovered record; a DESTROY record when no NEW was stored.
    pub record: ConnRecord,
    /// When the connection ended, or the upper bound of its end (see
    /// [`End`]); `None` while no end is known.
    pub closed_ns: Option<u64>,
    /// How the end is known; `Some` exactly when `closed_ns` is.
    pub end: Option<End>,
    /// The last time the connection was seen alive, when the end is only
    /// bounded: the `stop_ns` of a [`End::Gone`] record (also kept when a
    /// superseded connection's `CTW_GONE` record arrives later).
    pub last_seen_ns: Option<u64>,
    /// Counters of the DESTROY (or gone) record, when it carried them.
    pub counters_orig: Option<Counters>,
    pub counters_reply: Option<Counters>,
    /// The TCP state the connection was last known in: the kernel's state
    /// in the DESTROY event that gave its end ([`End::Destroy`], also when
    /// the DESTROY stands alone). `None` for other ends (a `CTW_GONE`
    /// record carries the state of the dump that recovered the entry, not
    /// a later one), while open, and for DESTROYs without a TCP state.
    pub end_state: Option<TcpState>,
}

impl Hit {
    /// `record` of `node`, an open connection: no end, nothing joined yet.
    pub fn open(node: &str, record: ConnRecord) -> Hit {
        Hit {
            node: node.to_string(),
            record,
            closed_ns: None,
            end: None,
            last_seen_ns: None,
            counters_orig: None,
            counters_reply: None,
            end_state: None,
        }
    }

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
    /// Store several batches of one agent stream, in their order: the
    /// outcomes of the first batches stored (as `append`'s), then the
    /// error of the first batch that could not be (later batches are then
    /// not known stored; nothing of them may be acked). The default
    /// appends them one by one; a store that writes batches together
    /// (ClickHouse) takes them at once.
    fn append_many(&self, batches: Vec<StoredBatch>) -> (Vec<AppendOutcome>, Option<StoreError>) {
        let mut done = Vec::with_capacity(batches.len());
        for b in batches {
            match self.append(b) {
                Ok(o) => done.push(o),
                Err(e) => return (done, Some(e)),
            }
        }
        (done, None)
    }
    /// Durably record a gap; an identical gap again is a no-op (agents
    /// resend loss reports they could not see acknowledged).
    fn record_gap(&self, gap: Gap) -> Result<(), StoreError>;
    fn search(&self, q: &SearchQuery) -> Result<SearchResult, StoreError>;
    fn stats(&self) -> StoreStats;
    /// Stop background work and flush what is pending; later appends
    /// fail. Idempotent. (Dropping the store does the same.)
    fn close(&self) {}
    /// Can the store take appends and searches now? `false` while a
    /// remote backend is unreachable at start-up (the collector is then
    /// not ready: `/readyz` answers 503).
    fn ready(&self) -> bool {
        true
    }
    /// How many searches are worth running at once (a resolve request
    /// spreads its lines over this many threads). Default: the machine's
    /// cores, at most 4 (a local index is CPU-bound); a remote store whose
    /// searches wait on the network says more.
    fn search_parallelism(&self) -> usize {
        std::thread::available_parallelism().map_or(2, |p| p.get().clamp(1, 4))
    }
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

/// How far two start times of one entry may differ: a NEW's start is its
/// `CTA_TIMESTAMP_EVENT` (set when the entry is allocated), a DESTROY's or
/// a dump's is `CTA_TIMESTAMP_START` (set at confirm, after the rest of
/// the hooks), microseconds later.
const START_SLACK_NS: u64 = 10_000_000;

/// Could `a` and `b` be records of the same connection, judged by the
/// kernel start times when both carry one?
fn same_start(a: &ConnRecord, b: &ConnRecord) -> bool {
    match (a.start_ns, b.start_ns) {
        (Some(x), Some(y)) => x.abs_diff(y) <= START_SLACK_NS,
        _ => true,
    }
}

/// A total order of a tuple, to sort records deterministically.
fn tuple_key(t: &ctw_common::Tuple) -> (IpAddr, u16, IpAddr, u16) {
    (t.src, t.src_port, t.dst, t.dst_port)
}

/// Where a DESTROY record says its connection ended: for a kernel DESTROY
/// its stop time (else when it was read), for a `CTW_GONE` record when the
/// entry was found gone (the upper bound).
fn destroy_end(r: &ConnRecord) -> (u64, End) {
    if r.status & ctw_common::status::CTW_GONE != 0 {
        (r.event_ns, End::Gone)
    } else {
        (r.stop_ns.unwrap_or(r.event_ns), End::Destroy)
    }
}

/// The state a DESTROY record gives its connection's end: the kernel's (in
/// the DESTROY event), not a `CTW_GONE` record's (that is the state when a
/// dump recovered the entry).
fn end_state(r: &ConnRecord, end: End) -> Option<TcpState> {
    (end == End::Destroy).then_some(r.tcp_state).flatten()
}

/// The connections of one (node, protocol, zone), from its records in any
/// order, appended to `hits`. See [`assemble`] for the rules.
fn assemble_zone(node: &str, mut rs: Vec<ConnRecord>, hits: &mut Vec<Hit>) {
    use ctw_common::Tuple;
    use std::collections::HashMap;
    let order = |k: EventKind| match k {
        EventKind::New => 0,
        EventKind::Recovered => 1,
        EventKind::Destroy => 2,
    };
    rs.sort_by_key(|r| {
        (
            r.event_ns,
            order(r.kind),
            r.start_ns,
            tuple_key(&r.orig),
            tuple_key(&r.reply),
            r.status,
            r.stop_ns,
        )
    });
    // Open connections by original and by reply tuple (the kernel's two
    // hash keys), and the newest connection of each (original, reply).
    let mut by_orig: HashMap<Tuple, usize> = HashMap::new();
    let mut by_reply: HashMap<Tuple, usize> = HashMap::new();
    let mut last: HashMap<(Tuple, Tuple), usize> = HashMap::new();
    fn unlink(
        hits: &[Hit],
        i: usize,
        by_orig: &mut HashMap<Tuple, usize>,
        by_reply: &mut HashMap<Tuple, usize>,
    ) {
        let r = &hits[i].record;
        if by_orig.get(&r.orig) == Some(&i) {
            by_orig.remove(&r.orig);
        }
        if by_reply.get(&r.reply) == Some(&i) {
            by_reply.remove(&r.reply);
        }
    }
    for r in rs {
        if r.kind == EventKind::Destroy && r.nat_clash() {
            // A NAT-clash shadow entry: never a connection of its own, and
            // never the end of the real one (another id, maybe another
            // DNAT target). Agents of this version do not send them.
            continue;
        }
        if r.kind != EventKind::Destroy {
            if r.kind == EventKind::Recovered {
                let open_same = by_orig.get(&r.orig).is_some_and(|&i| {
                    hits[i].record.reply == r.reply && same_start(&hits[i].record, &r)
                });
                let ended_same = last.get(&(r.orig, r.reply)).is_some_and(|&i| {
                    r.start_ns.is_some() && hits[i].record.start_ns == r.start_ns
                });
                if open_same || ended_same {
                    // The same connection again (the earliest record is kept).
                    continue;
                }
            }
            // The kernel holds one live entry per original and per reply
            // tuple in a zone: an open connection holding either ended at
            // or before this one started.
            let start = r.start_ns.unwrap_or(r.event_ns);
            let mut ended: Vec<usize> = by_orig.get(&r.orig).copied().into_iter().collect();
            ended.extend(by_reply.get(&r.reply).copied());
            ended.dedup();
            // A record read after a newer holder of its tuple (a dump read
            // after the newer entry's NEW): by the kernel start times it is
            // the older entry, ended by the holder's start.
            let newer = ended
                .iter()
                .filter_map(|&i| hits[i].record.start_ns)
                .filter(|&s| r.start_ns.is_some_and(|own| own < s))
                .min();
            if let Some(bound) = newer {
                hits.push(Hit {
                    closed_ns: Some(bound),
                    end: Some(End::Superseded),
                    ..Hit::open(node, r)
                });
                last.insert((r.orig, r.reply), hits.len() - 1);
                continue;
            }
            for i in ended {
                unlink(hits, i, &mut by_orig, &mut by_reply);
                let h = &mut hits[i];
                h.closed_ns = Some(start.max(h.start_ns()));
                h.end = Some(End::Superseded);
            }
            hits.push(Hit::open(node, r));
            let i = hits.len() - 1;
            by_orig.insert(r.orig, i);
            by_reply.insert(r.reply, i);
            last.insert((r.orig, r.reply), i);
            continue;
        }
        let (closed, end) = destroy_end(&r);
        let last_seen = (end == End::Gone).then_some(r.stop_ns).flatten();
        // The open connection with the same original and reply tuple.
        if let Some(i) = by_orig.get(&r.orig).copied().filter(|&i| {
            let h = &hits[i];
            h.record.reply == r.reply && same_start(&h.record, &r) && closed >= h.start_ns()
        }) {
            unlink(hits, i, &mut by_orig, &mut by_reply);
            let h = &mut hits[i];
            h.closed_ns = Some(closed);
            h.end = Some(end);
            h.last_seen_ns = last_seen;
            h.counters_orig = r.counters_orig;
            h.counters_reply = r.counters_reply;
            h.end_state = end_state(&r, end);
            continue;
        }
        // The end of a connection already superseded: the kernel's DESTROY
        // is exact when it is earlier than the bound; a gone record adds
        // when it was last seen.
        if let Some(&i) = last.get(&(r.orig, r.reply)) {
            let h = &mut hits[i];
            if h.end == Some(End::Superseded) && same_start(&h.record, &r) {
                let bound = h.closed_ns.unwrap_or(u64::MAX);
                if end == End::Destroy && closed <= bound && closed >= h.start_ns() {
                    h.closed_ns = Some(closed);
                    h.end = Some(End::Destroy);
                    h.end_state = end_state(&r, end);
                }
                if last_seen.is_some_and(|s| s <= bound) {
                    h.last_seen_ns = last_seen;
                }
                if r.counters_orig.is_some() || r.counters_reply.is_some() {
                    h.counters_orig = r.counters_orig;
                    h.counters_reply = r.counters_reply;
                }
                continue;
            }
        }
        // Nothing to close: the DESTROY stands alone (its NEW was lost or
        // is outside the records read), and ends the claim of an open
        // connection on its tuples (without an end: when is not known).
        for i in [
            by_orig.get(&r.orig).copied(),
            by_reply.get(&r.reply).copied(),
        ]
        .into_iter()
        .flatten()
        {
            unlink(hits, i, &mut by_orig, &mut by_reply);
        }
        hits.push(Hit {
            closed_ns: Some(closed),
            end: Some(end),
            last_seen_ns: last_seen,
            counters_orig: r.counters_orig,
            counters_reply: r.counters_reply,
            end_state: end_state(&r, end),
            ..Hit::open(node, r)
        });
        last.insert((r.orig, r.reply), hits.len() - 1);
    }
}

/// Join NEW/recovered records with DESTROY records of the same connection,
/// end connections superseded by later ones, filter by time and kind, rank
/// and cut to `limit`. Shared by every store so they answer alike.
///
/// The kernel holds at most one live entry per original tuple and one per
/// reply tuple in a zone (`nf_conntrack_hash` keys both directions), so the
/// records of a (node, protocol, zone), in event order, are read as:
/// - a NEW or recovered record opens a connection, and ends every open
///   connection holding its original or its reply tuple ([`End::Superseded`],
///   bounded by the new start), except that a recovered record of an open
///   (or ended) connection with the same tuples and kernel start (if known)
///   is that connection again (the earliest record is kept), and that a
///   record whose kernel start is before an open holder's (a dump read
///   after the newer entry's NEW) is that older connection, ended by the
///   holder's start;
/// - a DESTROY (or the agent's `CTW_GONE` record) ends the open connection
///   with the same original tuple, reply tuple and kernel start (if known);
///   else it refines the end of the superseded connection with those
///   tuples; else it stands alone (a connection whose opening was not read);
///   a kernel DESTROY that gives the end also gives `Hit::end_state` (its
///   TCP state);
/// - a NAT-clash shadow DESTROY (`IPS_NAT_CLASH`) is skipped.
///
/// Only the records the store read take part: a superseding record, like a
/// DESTROY, more than the store's lookback after the range's end (or not
/// matching the query's fields, e.g. another pod's when searching by pod
/// address) leaves the connection without an end.
pub fn assemble(q: &SearchQuery, records: Vec<(String, ConnRecord)>, gaps: &[Gap]) -> SearchResult {
    assemble_with(q, records, gaps, false)
}

/// [`assemble`] of the records a store collected when it stopped at its
/// cap (`truncated`): then a DESTROY standing alone may be the end of a
/// connection whose opening record was read but not collected (and is
/// counted by [`counts_uncollected`]), so `total` counts it only as
/// [`counts_uncollected`] would; the caller adds the uncollected count (and
/// keeps `total` at least the number of hits returned).
pub fn assemble_with(
    q: &SearchQuery,
    records: Vec<(String, ConnRecord)>,
    gaps: &[Gap],
    truncated: bool,
) -> SearchResult {
    use std::collections::HashMap;
    type Key = (String, Protocol, u16);
    let mut by_key: HashMap<Key, Vec<ConnRecord>> = HashMap::new();
    for (node, r) in records {
        by_key
            .entry((node, r.protocol, r.zone))
            .or_default()
            .push(r);
    }
    let mut hits: Vec<Hit> = Vec::new();
    for ((node, ..), rs) in by_key {
        assemble_zone(&node, rs, &mut hits);
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
        start <= to && end >= from && q.kind.is_none_or(|k| k == ConnKind::of(&h.record))
    });
    rank(&mut hits, q.at_ns, q.at_precision_ns);
    let mut total = hits.len() as u64;
    if truncated {
        total -= hits
            .iter()
            .filter(|h| h.record.kind == EventKind::Destroy && !counts_uncollected(q, &h.record))
            .count() as u64;
    }
    hits.truncate(q.limit);
    let gaps = gaps
        .iter()
        .filter(|g| g.from_ns <= to && g.to_ns >= from)
        .filter(|g| q.node.as_deref().is_none_or(|n| n == g.node))
        .cloned()
        .collect();
    SearchResult { hits, total, gaps }
}

/// Does an uncollected record (one a store read past its collection cap,
/// so not joined) count as a connection of `q`'s `total`? Without the join
/// a store counts a connection by one of its records:
/// - a NEW or recovered record whose start is in `[from, to]` (and whose
///   kind is `q.kind`, if given): a connection that started in the range;
/// - without `q.kind`, a DESTROY (not a NAT-clash shadow) whose kernel
///   start (`CTA_TIMESTAMP_START`) is before `from` and whose end is at or
///   after it: a connection alive into the range that started before it
///   (its NEW, if read, is not counted by the first rule).
///
/// A collected DESTROY standing alone counts by the same rule (its opening
/// record may be among the uncollected ones), see [`assemble_with`].
///
/// So `total` is exact, whatever the cap, when each connection has one
/// opening record (no recovered duplicate of a NEW, no lost NEW) and, for
/// connections started before `from`, the kernel sent start timestamps
/// (`nf_conntrack_timestamp=1`) and they had ended by the end of the read
/// range. Else, past the cap, it counts recovered duplicates twice and
/// misses connections still open (or without timestamps) that started
/// before `from`, and DESTROYs whose NEW was lost. Below the cap every
/// record is joined and `total` is exact.
pub fn counts_uncollected(q: &SearchQuery, r: &ConnRecord) -> bool {
    let from = q.from_ns.unwrap_or(0);
    let to = q.to_ns.unwrap_or(u64::MAX);
    match r.kind {
        EventKind::New | EventKind::Recovered => {
            let start = r.start_ns.unwrap_or(r.event_ns);
            (from..=to).contains(&start) && q.kind.is_none_or(|k| k == ConnKind::of(r))
        }
        EventKind::Destroy => {
            q.kind.is_none()
                && !r.nat_clash()
                && r.start_ns.is_some_and(|s| s < from)
                && destroy_end(r).0 >= from
        }
    }
}

/// Is the connection alive somewhere in `[at, at + precision)`? See
/// [`alive_in`].
pub fn alive_at(h: &Hit, at: u64, precision: u64) -> bool {
    alive_in(h, at, at.saturating_add(precision.saturating_sub(1)))
}

/// Is the connection alive somewhere in `[from, to]` (ns, inclusive)? The
/// one rule every answer uses (search ranking, the resolver's interval and
/// its skew tolerance).
///
/// A superseded connection counts as alive only when its successor started
/// after the whole interval: from the successor's start on, the tuple is
/// the successor's, and the kernel gave it to the successor only once the
/// older entry had expired, which takes the timeout of its last state
/// (TIME_WAIT 120 s, CLOSE 10 s, UDP 30 s by default) after its last
/// packet. Its exact end is unknown (`closed_ns` is only an upper bound),
/// so it would otherwise make every line of the successor's first
/// millisecond (or second, or skew) ambiguous.
pub fn alive_in(h: &Hit, from: u64, to: u64) -> bool {
    h.start_ns() <= to
        && h.closed_ns.is_none_or(|c| {
            if h.end == Some(End::Superseded) {
                c > to
            } else {
                c >= from
            }
        })
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
                at.saturating_sub(h.closed_ns.unwrap_or(start))
            };
            (!alive, distance, std::cmp::Reverse(start))
        }),
        None => hits.sort_by_key(|h| std::cmp::Reverse(h.start_ns())),
    }
}

/// In-memory store for tests: same dedup and search semantics, no durability.
/// By default a search reads every record; [`MemStore::with_lookback`] makes
/// it read only the event times the tantivy store reads.
#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
    lookback_ns: Option<u64>,
}

impl MemStore {
    /// A store whose searches read only records with event times in
    /// `[from - lookback_ns, to + lookback_ns]`, like the tantivy store with
    /// `lookback_hours` (so the two answer alike also for connections longer
    /// than the lookback).
    pub fn with_lookback(lookback_ns: u64) -> MemStore {
        MemStore {
            lookback_ns: Some(lookback_ns),
            ..MemStore::default()
        }
    }
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
        let (lo, hi) = match self.lookback_ns {
            Some(lb) => (
                q.from_ns.map_or(0, |f| f.saturating_sub(lb)),
                q.to_ns.map_or(u64::MAX, |t| t.saturating_add(lb)),
            ),
            None => (0, u64::MAX),
        };
        let matching = g
            .records
            .iter()
            .filter(|(n, r)| (lo..=hi).contains(&r.event_ns) && matches_fields(q, n, r))
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

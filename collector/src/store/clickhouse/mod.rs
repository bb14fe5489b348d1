//! The ClickHouse store (`storage.backend: clickhouse`): records, loss gaps
//! and the ledger of stored batches live in one ClickHouse database, so
//! several collectors can write and answer from the same data.
//!
//! Talks HTTP with the official `clickhouse` crate (`RowBinary`). One schema
//! for ClickHouse 18.16 (Debian 12) and later: addresses as
//! `FixedString(16)`, no `IPv6`/`LowCardinality` types, TTL or skip
//! indexes; column codecs on servers 20.3 and later (see [`schema`]).
//!
//! - Reverse-SNAT lookups read `ctw_records`, partitioned by day and sorted
//!   by (SNAT address, SNAT port, event time): one (address, port, time
//!   range) question reads one range of granules of each day it spans.
//! - Pod-address searches (a source address but neither SNAT field) first
//!   read `ctw_records_by_pod`, a narrow index sorted by (pod address,
//!   event time) that a materialized view fills on every insert, for the
//!   (SNAT address, SNAT port) pairs the pod used in the range; then
//!   `ctw_records` for those pairs (at most [`MAX_PAIRS`]; past that, for
//!   the SNAT addresses alone).
//! - Search fetches the matching records of `[from - lookback, to +
//!   lookback]` and joins them in Rust with the shared
//!   [`assemble`](super::assemble), so answers equal the other stores'.
//!
//! Delivery: `append` returns `Ok` only after ClickHouse answered the
//! records' `INSERT` (and then the ledger's) with success; the collector
//! acks only then. Concurrent appends (one per agent stream) are stored
//! together: one flush (one ledger lookup, one records `INSERT`, one
//! ledger `INSERT`) per `insert_interval_ms` at most ([`flush_loop`]), so
//! ClickHouse gets a few large inserts instead of one per agent batch. A batch whose (node, boot id, seq) is in the ledger
//! (`ctw_batches`, shared by every collector on the database) is not stored
//! again. A collector that dies (or a request that fails or times out)
//! between the records' insert and the ledger's leaves a batch that the
//! agent replays, to this or another collector, and that is stored a second
//! time (on one server: `MergeTree` keeps both; in a cluster
//! `ReplicatedMergeTree` drops an identical block among a shard's last 100,
//! so only a late replay is). Searches answer such rows once: a row
//! identical in every column to one already read is dropped before
//! [`assemble`](super::assemble) (a kernel holds one entry per tuple and
//! zone, so two records equal in every field, time to the microsecond
//! included, are one event stored twice), and past the collection cap it
//! is counted once in `total` (see [`MAX_COUNTED_FINGERPRINTS`]). Nothing
//! is added per row (no batch id column) and appends read no records.
//! `stats().records` counts rows, a replayed batch's twice.
//!
//! A flush the server refuses for its data (an exception code that is
//! not a server, network or configuration failure: [`rejection_code`]) is
//! not retried; each of its batches is then stored on its own, so only a
//! batch the server refuses fails. (18.16 runs materialized views after
//! writing the table's part: rows of a flush a view refused are stored,
//! not acked, and answered once when replayed.)
//!
//! Cluster mode (`storage.cluster`, [`ClusterOptions`]): the same table
//! names are `Distributed` tables over `ReplicatedMergeTree` tables (see
//! [`schema`] for the sharding keys); every insert goes through them with
//! `insert_distributed_sync=1`, so `append` returns once every shard wrote
//! its rows and, with `insert_quorum`, that many replicas of each. With a
//! quorum every read sets `select_sequential_consistency=1`.
//!
//! Start-up: an unreachable server is not fatal: the store is returned not
//! [`ready`](super::RecordStore::ready) (appends and searches fail with a
//! clear error, so nothing is acked) and retries every
//! `connect_retry_ms`. A database holding another schema version is
//! refused with a message naming both versions.

mod row;
pub mod schema;
mod shards;

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::row::{addr_bytes, day_of, RecordRow};
use super::{
    assemble_with, counts_uncollected, normalize, AppendOutcome, Gap, RecordStore, SearchQuery,
    SearchResult, StoreError, StoreStats, StoredBatch,
};
use std::path::PathBuf;

const NS_PER_HOUR: u64 = 3_600_000_000_000;
/// How often old day partitions are looked for and dropped.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Most (SNAT address, port) pairs a pod-address search looks up by pair;
/// past it, by SNAT address only (the query text stays short).
pub const MAX_PAIRS: usize = 2000;

/// Past the collection cap a search remembers the records it counted by a
/// 64-bit fingerprint (about 16 bytes each, so at most about 32 MB) to
/// count a record stored twice once: at most this many (past them, `total`
/// may count such a record twice).
pub const MAX_COUNTED_FINGERPRINTS: usize = 2_000_000;

/// A row's fingerprint: SipHash-1-3 of every column (a fixed key: two rows
/// collide with probability 2^-64).
fn fingerprint(row: &RecordRow) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    row.hash(&mut h);
    h.finish()
}

/// A (SNAT address, port) pair from the pod-address index.
#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
struct SnatKey {
    snat_ip: [u8; 16],
    snat_port: u16,
}

/// A ledger row: one stored batch.
#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
struct BatchRow {
    day: u16,
    node: String,
    boot_id: String,
    seq: u64,
    records: u32,
    stored_us: u64,
}

/// A gap row (`seen_ns`: when a collector first stored it, for the order).
#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
struct GapRow {
    day: u16,
    node: String,
    from_ns: u64,
    to_ns: u64,
    reason: String,
    count: u64,
    seen_ns: u64,
}

/// Records, gaps and batches in a ClickHouse database; see the module docs.
pub struct ClickHouseStore {
    inner: Arc<Inner>,
    /// Runs the client's futures (the trait is synchronous: callers block
    /// on a channel, never on this runtime, so any thread may call).
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
}

struct Inner {
    cfg: ClickHouseOptions,
    client: clickhouse::Client,
    /// The schema is checked (or created): appends and searches may run.
    ready: AtomicBool,
    closed: AtomicBool,
    /// Why the store is not ready (the last start-up error).
    not_ready_why: Mutex<String>,
    /// Last `seen_ns` given to a gap (strictly increasing per collector).
    last_gap_ns: AtomicU64,
    /// `insert_quorum` in force (0: none), set by the schema check.
    quorum: AtomicU32,
    /// Appends waiting for the flusher ([`flush_loop`]).
    queue: Mutex<Queue>,
    /// Wakes the flusher: the first append of an empty queue, or the queue
    /// reaching `insert_max_records`.
    wake: tokio::sync::Notify,
    /// With `storage.cluster.shards`: where each shard's local tables are
    /// (set by the start-up check); inserts go there directly.
    shard_map: std::sync::OnceLock<shards::ShardMap>,
}

/// What an append hears back from its flush.
enum Answer {
    Done(AppendOutcome),
    /// The flush failed (the message), after its retries.
    Failed(String),
    /// The store closed before the batch was stored.
    Closed,
}

/// One append waiting for a flush.
struct Waiting {
    batch: StoredBatch,
    done: std::sync::mpsc::SyncSender<Answer>,
}

/// The appends not yet taken by a flush, oldest first.
#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Records of `waiting`.
    records: usize,
}

impl Inner {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// The client with this store's per-request settings: in a cluster,
    /// inserts through `Distributed` wait for every shard
    /// (`insert_distributed_sync`), and with a quorum they wait for it and
    /// reads see every quorum-written batch (`select_sequential_consistency`:
    /// a replica still catching up refuses instead of answering short).
    fn client(&self) -> clickhouse::Client {
        let quorum = self.quorum.load(Ordering::SeqCst);
        if quorum == 0 {
            return self.client.clone();
        }
        self.client
            .clone()
            .with_option("insert_quorum", quorum.to_string())
            // Shorter than the request timeout: the server says why.
            .with_option(
                "insert_quorum_timeout",
                (self.cfg.timeout_ms * 3 / 4).to_string(),
            )
            .with_option("select_sequential_consistency", "1")
    }
}

use ctw_common::now_ns;

fn ch_err(what: &str, e: clickhouse::error::Error) -> StoreError {
    StoreError::Index(format!("clickhouse {what}: {e}"))
}

/// A ClickHouse string literal (no `?` in it: the client binds those).
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            // The client reads `?` as a bind placeholder.
            '?' => out.push_str("\\x3F"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A `FixedString(16)` literal of an address's bytes.
fn addr_literal(a: IpAddr) -> String {
    hex_literal(&addr_bytes(a).0)
}

/// `YYYY-MM-DD` of a partition day (days since the epoch).
fn date_literal(day: u16) -> String {
    let d = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|e| e.checked_add_days(chrono::Days::new(u64::from(day))));
    match d {
        Some(d) => format!("'{}'", d.format("%Y-%m-%d")),
        None => "'2149-06-06'".into(),
    }
}

impl std::fmt::Debug for ClickHouseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseStore")
            .field("url", &self.inner.cfg.url)
            .field("database", &self.inner.cfg.database)
            .field("ready", &self.inner.ready.load(Ordering::SeqCst))
            .finish()
    }
}

impl ClickHouseStore {
    /// Connect to the server of `cfg` and check (or create) the schema.
    ///
    /// Errors: [`StoreError::Index`] when the database holds a schema this
    /// version does not write (message names both versions) or another
    /// layout (one server vs cluster), when the server has no cluster
    /// `storage.cluster.name` or fewer replicas per shard than
    /// `insert_quorum`, or the client cannot be set up. An unreachable server is no error: the store is
    /// returned not ready and retries in the background.
    pub fn open(cfg: &ClickHouseOptions) -> Result<ClickHouseStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ctw-clickhouse")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Index(format!("clickhouse runtime: {e}")))?;
        let client = client(cfg)?;
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            client,
            ready: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            not_ready_why: Mutex::new("not connected yet".into()),
            last_gap_ns: AtomicU64::new(0),
            quorum: AtomicU32::new(0),
            queue: Mutex::new(Queue::default()),
            wake: tokio::sync::Notify::new(),
            shard_map: std::sync::OnceLock::new(),
        });
        let store = ClickHouseStore {
            handle: rt.handle().clone(),
            rt: Mutex::new(Some(rt)),
            inner: inner.clone(),
        };
        match store.block_within(schema::ensure_timeout(cfg), start_up(inner.clone())) {
            Ok(()) => inner.ready.store(true, Ordering::SeqCst),
            Err(schema::Error::Refused(m)) => return Err(StoreError::Index(m)),
            Err(schema::Error::Unreachable(m)) => {
                tracing::error!(url = %cfg.url, error = %m, retry_ms = cfg.connect_retry_ms,
                    "ClickHouse not reachable; not ready, retrying");
                if let Ok(mut w) = inner.not_ready_why.lock() {
                    *w = m;
                }
                store.handle.spawn(retry_connect(inner.clone()));
            }
        }
        store.handle.spawn(retention_loop(inner.clone()));
        store.handle.spawn(flush_loop(inner.clone()));
        Ok(store)
    }

    /// Run `f` on the store's runtime and wait for it (with the configured
    /// request timeout).
    fn block<T, E>(&self, f: impl Future<Output = Result<T, E>> + Send + 'static) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<String> + Send + 'static,
    {
        self.block_within(Duration::from_millis(self.inner.cfg.timeout_ms), f)
    }

    /// [`block`](Self::block) with its own timeout.
    fn block_within<T, E>(
        &self,
        timeout: Duration,
        f: impl Future<Output = Result<T, E>> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<String> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let r = match tokio::time::timeout(timeout, f).await {
                Ok(r) => r,
                Err(_) => Err(E::from(format!(
                    "clickhouse: no answer within {} ms",
                    timeout.as_millis()
                ))),
            };
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(E::from("clickhouse: store is closed".to_string())))
    }

    fn check_usable(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Index("store is closed".into()));
        }
        if !self.inner.ready.load(Ordering::SeqCst) {
            let why = self
                .inner
                .not_ready_why
                .lock()
                .map(|w| w.clone())
                .unwrap_or_default();
            return Err(StoreError::Index(format!(
                "clickhouse at {} not ready: {why}",
                self.inner.cfg.url
            )));
        }
        Ok(())
    }

    /// Drop day partitions (records, ledger, gaps) older than
    /// `retention_days` before `now_ns`; returns how many were dropped.
    pub fn enforce_retention(&self, now_ns: u64) -> Result<usize, StoreError> {
        self.check_usable()?;
        self.block(drop_old_partitions(self.inner.clone(), now_ns))
    }

    /// The server's `version()`.
    pub fn server_version(&self) -> Result<String, StoreError> {
        let client = self.inner.client();
        self.block(async move {
            client
                .query("SELECT version()")
                .fetch_one::<String>()
                .await
                .map_err(|e| ch_err("version", e))
        })
    }
}

impl From<String> for StoreError {
    fn from(m: String) -> StoreError {
        StoreError::Index(m)
    }
}

/// The start-up check: the schema ([`schema::ensure`]), then with
/// `storage.cluster.shards` the shard list ([`shards::check`]).
async fn start_up(inner: Arc<Inner>) -> Result<(), schema::Error> {
    schema::ensure(inner.clone()).await?;
    let Some(c) = inner.cfg.cluster.as_ref().filter(|c| !c.shards.is_empty()) else {
        return Ok(());
    };
    if inner.shard_map.get().is_none() {
        let map = shards::check(&inner, &c.name, &c.shards)
            .await
            .map_err(|e| match e {
                shards::CheckError::Refused(m) => schema::Error::Refused(m),
                shards::CheckError::Unreachable(m) => schema::Error::Unreachable(m),
            })?;
        tracing::info!(
            shards = map.shards(),
            "ClickHouse inserts go to the shards' local tables"
        );
        let _ = inner.shard_map.set(map);
    }
    Ok(())
}

/// Retry the start-up check until it passes (ready) or the store closes.
async fn retry_connect(inner: Arc<Inner>) {
    let every = Duration::from_millis(inner.cfg.connect_retry_ms);
    while !inner.closed.load(Ordering::SeqCst) {
        tokio::time::sleep(every).await;
        match start_up(inner.clone()).await {
            Ok(()) => {
                inner.ready.store(true, Ordering::SeqCst);
                tracing::info!(url = %inner.cfg.url, "ClickHouse reachable; ready");
                return;
            }
            Err(e) => {
                let m = match e {
                    schema::Error::Unreachable(m) => m,
                    schema::Error::Refused(m) => m,
                };
                tracing::warn!(url = %inner.cfg.url, error = %m, "ClickHouse still not usable");
                if let Ok(mut w) = inner.not_ready_why.lock() {
                    *w = m;
                }
            }
        }
    }
}

async fn retention_loop(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if inner.ready.load(Ordering::SeqCst) {
            if let Err(e) = drop_old_partitions(inner.clone(), now_ns()).await {
                tracing::warn!(error = %e, "ClickHouse retention failed");
            }
        }
        tokio::time::sleep(RETENTION_EVERY).await;
    }
}

async fn drop_old_partitions(inner: Arc<Inner>, now_ns: u64) -> Result<usize, StoreError> {
    let db = &inner.cfg.database;
    let keep_from = day_of(now_ns).saturating_sub(inner.cfg.retention_days.min(65_535) as u16);
    let layout = inner.cfg.layout();
    let parts: Vec<(String, String)> = inner
        .client()
        .query(&format!(
            "SELECT DISTINCT table, partition FROM {} \
             WHERE database = {} AND active AND table IN ({})",
            parts_source(&layout),
            quote(db),
            schema::DAY_PARTITIONED
                .iter()
                .map(|t| quote(&layout.local(t)))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .fetch_all()
        .await
        .map_err(|e| ch_err("listing partitions", e))?;
    let cutoff = date_literal(keep_from);
    let mut dropped = 0;
    for (table, partition) in parts {
        // Partition values of a Date key are 'YYYY-MM-DD': they sort as dates.
        if format!("'{partition}'") < cutoff {
            inner
                .client()
                .query(&format!(
                    "ALTER TABLE {db}.{table}{} DROP PARTITION {}",
                    match &layout {
                        schema::Layout::Single => String::new(),
                        schema::Layout::Cluster { name, .. } => format!(" ON CLUSTER {name}"),
                    },
                    quote(&partition)
                ))
                .execute()
                .await
                .map_err(|e| ch_err("dropping a partition", e))?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Where the parts of the tables are listed: `system.parts`, or in a
/// cluster the `system.parts` of one replica of every shard.
fn parts_source(layout: &schema::Layout) -> String {
    match layout {
        schema::Layout::Single => "system.parts".into(),
        schema::Layout::Cluster { name, .. } => format!("cluster({}, system, parts)", quote(name)),
    }
}

/// The `WHERE` of a search: field filters, and event times in `[lo, hi]` ns.
fn where_clause(q: &SearchQuery, lo: u64, hi: u64) -> String {
    let mut c: Vec<String> = Vec::new();
    let mut family = None;
    for (col, ip) in [
        ("snat_ip", q.snat_ip),
        ("src_ip", q.src_ip),
        ("dst_ip", q.dst_ip),
    ] {
        if let Some(ip) = ip {
            let (_, f) = addr_bytes(ip);
            if family.is_some_and(|x| x != f) {
                return "0".into();
            }
            family = Some(f);
            c.push(format!("{col} = {}", addr_literal(ip)));
        }
    }
    if let Some(f) = family {
        c.push(format!("family = {f}"));
    }
    for (col, port) in [
        ("snat_port", q.snat_port),
        ("src_port", q.src_port),
        ("dst_port", q.dst_port),
    ] {
        if let Some(p) = port {
            c.push(format!("{col} = {p}"));
        }
    }
    if let Some(n) = &q.node {
        c.push(format!("node = {}", quote(n)));
    }
    if let Some(p) = q.protocol {
        c.push(format!("protocol = {}", p.number()));
    }
    // Event times are whole microseconds.
    let lo_us = lo.div_ceil(1000);
    let hi_us = hi / 1000;
    if lo_us > 0 {
        c.push(format!("event_us >= {lo_us}"));
        c.push(format!("day >= {}", date_literal(day_of(lo))));
    }
    if hi < u64::MAX {
        c.push(format!("event_us <= {hi_us}"));
        c.push(format!("day <= {}", date_literal(day_of(hi))));
    }
    if c.is_empty() {
        "1".into()
    } else {
        c.join(" AND ")
    }
}

/// Does `q` go through the pod-address index (a pod address, no SNAT
/// field)?
fn by_pod(q: &SearchQuery) -> bool {
    q.src_ip.is_some() && q.snat_ip.is_none() && q.snat_port.is_none()
}

fn hex_literal(b: &[u8; 16]) -> String {
    format!("toFixedString(unhex('{}'), 16)", hex(b))
}

/// The 32 lowercase hex digits of 16 bytes.
fn hex(b: &[u8; 16]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The extra condition of a pod-address search: the SNAT pairs the pod
/// used in the range, from the index (`None`: it used none, no records).
async fn pod_pairs(
    inner: &Inner,
    q: &SearchQuery,
    lo: u64,
    hi: u64,
) -> Result<Option<String>, StoreError> {
    let only_pod = SearchQuery {
        src_ip: q.src_ip,
        ..SearchQuery::default()
    };
    let keys: Vec<SnatKey> = inner
        .client()
        .query(&format!(
            "SELECT DISTINCT snat_ip, snat_port FROM {}.{} WHERE {}",
            inner.cfg.database,
            schema::BY_POD,
            where_clause(&only_pod, lo, hi)
        ))
        .fetch_all()
        .await
        .map_err(|e| ch_err("pod index", e))?;
    if keys.is_empty() {
        return Ok(None);
    }
    if keys.len() <= MAX_PAIRS {
        let pairs: Vec<String> = keys
            .iter()
            .map(|k| format!("({}, {})", hex_literal(&k.snat_ip), k.snat_port))
            .collect();
        return Ok(Some(format!(
            "(snat_ip, snat_port) IN ({})",
            pairs.join(", ")
        )));
    }
    let ips: HashSet<[u8; 16]> = keys.iter().map(|k| k.snat_ip).collect();
    let ips: Vec<String> = ips.iter().map(hex_literal).collect();
    Ok(Some(format!("snat_ip IN ({})", ips.join(", "))))
}

async fn search(inner: Arc<Inner>, q: SearchQuery) -> Result<SearchResult, StoreError> {
    let lb = u64::from(inner.cfg.lookback_hours) * NS_PER_HOUR;
    let lo = q.from_ns.map_or(0, |f| f.saturating_sub(lb));
    let hi = q.to_ns.map_or(u64::MAX, |t| t.saturating_add(lb));
    let mut cond = where_clause(&q, lo, hi);
    if by_pod(&q) {
        match pod_pairs(&inner, &q, lo, hi).await? {
            Some(pairs) => cond = format!("{cond} AND {pairs}"),
            None => cond = "0".into(),
        }
    }
    let sql = format!(
        "SELECT {} FROM {}.{} WHERE {}",
        schema::RECORD_COLUMNS.join(", "),
        inner.cfg.database,
        schema::RECORDS,
        cond
    );
    let mut cursor = inner
        .client()
        .query(&sql)
        .fetch::<RecordRow>()
        .map_err(|e| ch_err("search", e))?;
    let cap = inner.cfg.max_collected_records;
    // Rows answered once though stored twice (a replayed batch, see the
    // module docs): the collected rows whole, the counted uncollected ones
    // by a 64-bit fingerprint (at most `MAX_COUNTED_FINGERPRINTS`).
    let mut seen: HashSet<RecordRow> = HashSet::new();
    let mut counted: HashSet<u64> = HashSet::new();
    let mut records = Vec::new();
    let (mut uncollected, mut uncollected_connections) = (0u64, 0u64);
    let mut bad = 0u64;
    while let Some(row) = cursor.next().await.map_err(|e| ch_err("search", e))? {
        if seen.contains(&row) {
            continue; // a replayed batch stored twice (see the module docs)
        }
        if records.len() >= cap {
            let print = fingerprint(&row);
            if let Ok((_, r)) = row.into_record() {
                uncollected += 1;
                if counts_uncollected(&q, &r)
                    && (counted.len() >= MAX_COUNTED_FINGERPRINTS || counted.insert(print))
                {
                    uncollected_connections += 1;
                }
            }
            continue;
        }
        seen.insert(row.clone());
        match row.into_record() {
            Ok(nr) => records.push(nr),
            Err(_) => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(rows = bad, "ClickHouse rows that are no records skipped");
    }
    let gaps = read_gaps(&inner).await?;
    let truncated = uncollected > 0;
    let mut result = assemble_with(&q, records, &gaps, truncated);
    result.total += uncollected_connections;
    result.total = result.total.max(result.hits.len() as u64);
    Ok(result)
}

async fn read_gaps(inner: &Inner) -> Result<Vec<Gap>, StoreError> {
    let rows: Vec<(String, u64, u64, String, u64, u64)> = inner
        .client()
        .query(&format!(
            "SELECT node, from_ns, to_ns, reason, count, min(seen_ns) AS first \
             FROM {}.{} GROUP BY node, from_ns, to_ns, reason, count \
             ORDER BY first, node, from_ns, to_ns, reason, count",
            inner.cfg.database,
            schema::GAPS
        ))
        .fetch_all()
        .await
        .map_err(|e| ch_err("reading gaps", e))?;
    Ok(rows
        .into_iter()
        .map(|(node, from_ns, to_ns, reason, count, _)| Gap {
            node,
            from_ns,
            to_ns,
            reason,
            count,
        })
        .collect())
}

/// Longest list of literals in one query's text, bytes (ClickHouse's
/// default `max_query_size` is 256 KiB); more take several queries.
const MAX_LOOKUP_QUERY: usize = 200_000;

/// `literals` joined with `, ` into lists of at most [`MAX_LOOKUP_QUERY`]
/// bytes each (a longer literal alone), in order; none for no literals.
fn literal_lists(literals: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut list = String::new();
    for l in literals {
        if !list.is_empty() && list.len() + 2 + l.len() > MAX_LOOKUP_QUERY {
            out.push(std::mem::take(&mut list));
        }
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push_str(l);
    }
    if !list.is_empty() {
        out.push(list);
    }
    out
}

/// Runs the flushes: waits until appends are queued and either
/// `insert_interval_ms` passed since the last flush began or
/// `insert_max_records` records wait, takes the oldest appends (at most
/// `insert_max_records` records, at least one append), stores them with
/// [`flush_with_retries`] and answers each. One flush at a time,
/// so a flush's ledger lookup sees every batch an earlier flush stored.
async fn flush_loop(inner: Arc<Inner>) {
    let every = Duration::from_millis(inner.cfg.insert_interval_ms);
    let max = inner.cfg.insert_max_records.max(1);
    let timeout = Duration::from_millis(inner.cfg.timeout_ms);
    let mut next = tokio::time::Instant::now();
    loop {
        let taken = loop {
            if inner.closed.load(Ordering::SeqCst) {
                return;
            }
            let wait_until = {
                let mut q = inner.queue();
                if q.waiting.is_empty() {
                    None
                } else if q.records >= max || tokio::time::Instant::now() >= next {
                    break take(&mut q, max);
                } else {
                    Some(next)
                }
            };
            match wait_until {
                None => inner.wake.notified().await,
                Some(t) => {
                    tokio::select! {
                        _ = inner.wake.notified() => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
            }
        };
        next = tokio::time::Instant::now() + every;
        let result = flush_with_retries(&inner, &taken, timeout).await;
        match result {
            Err(e) if taken.len() > 1 && rejection_code(&e).is_some() => {
                // The server refused the flush's data: store each batch on
                // its own so one bad batch fails alone.
                tracing::warn!(batches = taken.len(), error = %e,
                    "ClickHouse refused a flush; storing its batches one by one");
                // All of them within one `timeout_ms`: an outage meanwhile
                // must not hold the flusher for a timeout per batch.
                let deadline = tokio::time::Instant::now() + timeout;
                for w in taken {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let one = if left.is_zero() {
                        Err(StoreError::Index(format!(
                            "clickhouse: storing the batches of a refused flush one by one \
                             took over {} ms",
                            timeout.as_millis()
                        )))
                    } else {
                        flush_with_retries(&inner, std::slice::from_ref(&w), left).await
                    };
                    let _ = w.done.send(match one {
                        Ok(o) => Answer::Done(o[0]),
                        Err(e) => Answer::Failed(error_text(e)),
                    });
                }
            }
            Ok(outcomes) => {
                for (w, o) in taken.into_iter().zip(outcomes) {
                    let _ = w.done.send(Answer::Done(o));
                }
            }
            Err(e) => {
                let m = error_text(e);
                for w in taken {
                    let _ = w.done.send(Answer::Failed(m.clone()));
                }
            }
        }
    }
}

fn error_text(e: StoreError) -> String {
    match e {
        StoreError::Index(m) => m,
        e => e.to_string(),
    }
}

/// ClickHouse error codes (`src/Common/ErrorCodes.cpp`) that say nothing
/// about the data sent: the server, the cluster, the network or the
/// configuration failed, so the same insert may succeed later.
const NOT_THE_DATA: [u32; 28] = [
    3,    // UNEXPECTED_END_OF_FILE (a connection cut mid-request)
    24,   // CANNOT_WRITE_TO_OSTREAM
    32,   // ATTEMPT_TO_READ_AFTER_EOF
    86,   // RECEIVED_ERROR_FROM_REMOTE_IO_SERVER
    243,  // NOT_ENOUGH_SPACE
    60,   // UNKNOWN_TABLE
    81,   // UNKNOWN_DATABASE
    159,  // TIMEOUT_EXCEEDED
    164,  // READONLY
    192,  // UNKNOWN_USER
    193,  // WRONG_PASSWORD
    202,  // TOO_MANY_SIMULTANEOUS_QUERIES
    209,  // SOCKET_TIMEOUT
    210,  // NETWORK_ERROR
    225,  // NO_ZOOKEEPER
    236,  // ABORTED
    242,  // TABLE_IS_READ_ONLY
    252,  // TOO_MANY_PARTS
    279,  // ALL_CONNECTION_TRIES_FAILED
    285,  // TOO_FEW_LIVE_REPLICAS
    286,  // UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
    319,  // UNKNOWN_STATUS_OF_INSERT
    394,  // QUERY_WAS_CANCELLED
    497,  // ACCESS_DENIED
    516,  // AUTHENTICATION_FAILED
    999,  // KEEPER_EXCEPTION
    1000, // POCO_EXCEPTION (network and system errors)
    1001, // STD_EXCEPTION
];

/// The ClickHouse error code of `e` when the server answered with an
/// exception about the request itself (its data, or what the data made
/// the server do: a type, a view, a limit), which sending the same insert
/// again cannot fix; `None` for a server, network or configuration error
/// (codes in [`NOT_THE_DATA`], or no code: no answer).
fn rejection_code(e: &StoreError) -> Option<u32> {
    let StoreError::Index(m) = e else { return None };
    let at = m.find("Code: ")? + "Code: ".len();
    let digits: String = m[at..].chars().take_while(char::is_ascii_digit).collect();
    let code: u32 = digits.parse().ok()?;
    (!NOT_THE_DATA.contains(&code)).then_some(code)
}

/// The oldest waiting appends holding at most `max` records (at least one).
fn take(q: &mut Queue, max: usize) -> Vec<Waiting> {
    let mut n = 0;
    let mut records = 0;
    for w in &q.waiting {
        if n > 0 && records + w.batch.records.len() > max {
            break;
        }
        records += w.batch.records.len();
        n += 1;
    }
    q.records -= records;
    q.waiting.drain(..n).collect()
}

/// The (node, boot id, seq) of a batch.
type BatchKey = (String, String, u64);

fn batch_key(b: &StoredBatch) -> BatchKey {
    (b.node.clone(), b.boot_id.clone(), b.seq)
}

/// Which of `keys` the ledger holds: one query (several past
/// [`MAX_LOOKUP_QUERY`] bytes of text).
async fn ledger_lookup(inner: &Inner, keys: &[BatchKey]) -> Result<HashSet<BatchKey>, StoreError> {
    let tuples: Vec<String> = keys
        .iter()
        .map(|(node, boot_id, seq)| format!("({}, {}, {seq})", quote(node), quote(boot_id)))
        .collect();
    let mut found = HashSet::new();
    for list in literal_lists(&tuples) {
        let rows: Vec<BatchKey> = inner
            .client()
            .query(&format!(
                "SELECT DISTINCT node, boot_id, seq FROM {}.{} WHERE (node, boot_id, seq) IN ({list})",
                inner.cfg.database,
                schema::BATCHES,
            ))
            .fetch_all()
            .await
            .map_err(|e| ch_err("ledger lookup", e))?;
        found.extend(rows);
    }
    Ok(found)
}

/// Stores the batches of one flush, trying again (backoff 100 ms doubling
/// to 2 s) while the server fails, for up to `timeout_ms` in all (each
/// attempt within `timeout_ms`): a short outage (a restart) delays the
/// acks instead of failing the batches. An insert the server refused for
/// its data ([`rejection_code`]) is not tried again. A retry repeats the first
/// attempt's inserts exactly (same batches as stored and duplicate, same
/// rows in the same order, same ledger times), so in cluster mode a shard
/// that had written its part of a failed insert drops the repeat as a
/// duplicate block (replicated insert deduplication); on one server an
/// insert that succeeded unseen is stored twice and searches answer it
/// once (see the module docs).
async fn flush_with_retries(
    inner: &Inner,
    waiting: &[Waiting],
    timeout: Duration,
) -> Result<Vec<AppendOutcome>, StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    let mut planned = None;
    let now = now_ns();
    loop {
        let e = match tokio::time::timeout(timeout, flush(inner, waiting, &mut planned, now)).await
        {
            Ok(Ok(o)) => return Ok(o),
            // Refused for its data: trying again cannot help.
            Ok(Err(e)) if rejection_code(&e).is_some() => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => StoreError::Index(format!(
                "clickhouse: no answer within {} ms",
                timeout.as_millis()
            )),
        };
        if tokio::time::Instant::now() + backoff >= deadline || inner.closed.load(Ordering::SeqCst)
        {
            return Err(e);
        }
        tracing::warn!(batches = waiting.len(), error = %e,
            "ClickHouse insert failed; trying again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One attempt at storing the batches of one flush: one ledger lookup for
/// all their keys (only on the first attempt: `planned` keeps its
/// outcomes), one `INSERT` of the records of every batch neither in the
/// ledger nor earlier in `waiting` (same key: the first is stored, the
/// others are duplicates), then one `INSERT` of their ledger rows (stored
/// at `now_ns`). A retry first looks the batches up again: when the
/// ledger holds them all, the failed attempt had stored them and nothing
/// is inserted again. Returns each batch's outcome, in order; an error is
/// the whole flush's (nothing of it is acked; records inserted before a
/// failed ledger insert are stored again by the replay and answered once,
/// see the module docs).
async fn flush(
    inner: &Inner,
    waiting: &[Waiting],
    planned: &mut Option<Vec<AppendOutcome>>,
    now: u64,
) -> Result<Vec<AppendOutcome>, StoreError> {
    let retry = planned.is_some();
    let outcomes = match planned {
        Some(o) => o.clone(),
        None => {
            let keys: Vec<BatchKey> = waiting.iter().map(|w| batch_key(&w.batch)).collect();
            let stored = ledger_lookup(inner, &keys).await?;
            let mut seen: HashSet<&BatchKey> = HashSet::new();
            let o: Vec<AppendOutcome> = keys
                .iter()
                .map(|k| {
                    if stored.contains(k) || !seen.insert(k) {
                        AppendOutcome::Duplicate
                    } else {
                        AppendOutcome::Stored
                    }
                })
                .collect();
            *planned = Some(o.clone());
            o
        }
    };
    let new: Vec<&StoredBatch> = waiting
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o == AppendOutcome::Stored)
        .map(|(w, _)| &w.batch)
        .collect();
    if new.is_empty() {
        return Ok(outcomes);
    }
    if retry {
        // The failed attempt may have completed unseen (its answer lost or
        // timed out): when the ledger holds every batch it was storing,
        // its records were written before (records, then ledger), so
        // inserting them again would only store them twice.
        let keys: Vec<BatchKey> = new.iter().map(|b| batch_key(b)).collect();
        let stored = ledger_lookup(inner, &keys).await?;
        if keys.iter().all(|k| stored.contains(k)) {
            return Ok(outcomes);
        }
    }
    let rows: Vec<RecordRow> = new
        .iter()
        .flat_map(|b| b.records.iter().map(|r| RecordRow::from_record(&b.node, r)))
        .collect();
    insert_rows(inner, schema::RECORDS, &rows, |r| {
        shards::Key::Addr(r.snat_ip)
    })
    .await?;
    let ledger: Vec<BatchRow> = new
        .iter()
        .map(|b| BatchRow {
            day: day_of(now),
            node: b.node.clone(),
            boot_id: b.boot_id.clone(),
            seq: b.seq,
            records: b.records.len().min(u32::MAX as usize) as u32,
            stored_us: now / 1000,
        })
        .collect();
    insert_rows(inner, schema::BATCHES, &ledger, |b| {
        shards::Key::Text(b.node.clone())
    })
    .await?;
    Ok(outcomes)
}

/// One `INSERT` of `rows` into `table` (through `Distributed` in a
/// cluster), or with `storage.cluster.shards` one into each shard's local
/// table, the shard chosen by `key` (the table's sharding key, see
/// [`schema`]). Nothing for no rows.
async fn insert_rows<R>(
    inner: &Inner,
    table: &str,
    rows: &[R],
    key: impl Fn(&R) -> shards::Key,
) -> Result<(), StoreError>
where
    R: clickhouse::Row + Serialize + Send + Sync + Partitioned,
{
    if rows.is_empty() {
        return Ok(());
    }
    for chunk in by_partitions(rows, MAX_PARTITIONS_PER_INSERT) {
        if let Some(map) = inner.shard_map.get() {
            map.insert(inner, table, &chunk, &key).await?;
            continue;
        }
        let what = |e| ch_err(&format!("insert into {table}"), e);
        let mut ins = inner
            .client()
            .insert::<R>(&format!("{}.{table}", inner.cfg.database))
            .map_err(what)?;
        for r in chunk {
            ins.write(r).await.map_err(what)?;
        }
        ins.end().await.map_err(what)?;
    }
    Ok(())
}

/// Most day partitions one `INSERT` touches: ClickHouse 19.x and later
/// refuse an insert block spanning more than `max_partitions_per_insert_block`
/// partitions (100 by default; 18.16 has no such limit).
const MAX_PARTITIONS_PER_INSERT: usize = 100;

/// A row's partition (`day`).
trait Partitioned {
    fn day(&self) -> u16;
}

impl Partitioned for RecordRow {
    fn day(&self) -> u16 {
        self.day
    }
}

impl Partitioned for BatchRow {
    fn day(&self) -> u16 {
        self.day
    }
}

/// `rows` split into chunks of at most `max` distinct days each (the
/// oldest days first; rows keep their order within a chunk). One chunk,
/// all of `rows`, in the usual case of a flush within `max` days. The
/// same rows always give the same chunks, so a retried flush repeats the
/// same inserts.
fn by_partitions<R: Partitioned>(rows: &[R], max: usize) -> Vec<Vec<&R>> {
    let mut days: Vec<u16> = rows.iter().map(Partitioned::day).collect();
    days.sort_unstable();
    days.dedup();
    let max = max.max(1);
    let mut chunks: Vec<Vec<&R>> = vec![Vec::new(); days.len().div_ceil(max)];
    for r in rows {
        let rank = days.binary_search(&r.day()).unwrap_or(0);
        chunks[rank / max].push(r);
    }
    chunks
}

async fn record_gap(inner: Arc<Inner>, gap: Gap) -> Result<(), StoreError> {
    let db = &inner.cfg.database;
    let n: u64 = inner
        .client()
        .query(&format!(
            "SELECT count() FROM {db}.{} WHERE node = {} AND from_ns = {} AND to_ns = {} \
             AND reason = {} AND count = {}",
            schema::GAPS,
            quote(&gap.node),
            gap.from_ns,
            gap.to_ns,
            quote(&gap.reason),
            gap.count
        ))
        .fetch_one()
        .await
        .map_err(|e| ch_err("gap lookup", e))?;
    if n > 0 {
        return Ok(());
    }
    let seen = {
        let now = now_ns();
        let prev = inner.last_gap_ns.fetch_max(now, Ordering::SeqCst);
        if prev >= now {
            inner.last_gap_ns.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            now
        }
    };
    let mut ins = inner
        .client()
        .insert::<GapRow>(&format!("{db}.{}", schema::GAPS))
        .map_err(|e| ch_err("gap insert", e))?;
    ins.write(&GapRow {
        day: day_of(gap.to_ns),
        node: gap.node,
        from_ns: gap.from_ns,
        to_ns: gap.to_ns,
        reason: gap.reason,
        count: gap.count,
        seen_ns: seen,
    })
    .await
    .map_err(|e| ch_err("gap insert", e))?;
    ins.end().await.map_err(|e| ch_err("gap insert", e))
}

async fn stats(inner: Arc<Inner>) -> Result<StoreStats, StoreError> {
    let (records, bytes, partitions): (u64, u64, u64) = inner
        .client()
        .query(&format!(
            "SELECT sumIf(rows, table = {t}), sum(bytes_on_disk), \
             uniqExactIf(partition, table = {t}) FROM {} \
             WHERE database = {} AND active",
            parts_source(&inner.cfg.layout()),
            quote(&inner.cfg.database),
            t = quote(&inner.cfg.layout().local(schema::RECORDS))
        ))
        .fetch_one()
        .await
        .map_err(|e| ch_err("stats", e))?;
    Ok(StoreStats {
        records,
        bytes_on_disk: bytes,
        partitions,
    })
}

impl ClickHouseStore {
    /// Queues `batches` (tagged with their place) for the flusher at once
    /// and waits for every answer.
    fn submit(&self, batches: Vec<(usize, StoredBatch)>) -> Vec<(usize, Answer)> {
        let mut waits = Vec::with_capacity(batches.len());
        {
            let mut q = self.inner.queue();
            if self.inner.closed.load(Ordering::SeqCst) {
                return batches
                    .into_iter()
                    .map(|(i, _)| (i, Answer::Closed))
                    .collect();
            }
            let was_empty = q.waiting.is_empty();
            for (i, batch) in batches {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                q.records += batch.records.len();
                q.waiting.push(Waiting { batch, done: tx });
                waits.push((i, rx));
            }
            if was_empty || q.records >= self.inner.cfg.insert_max_records {
                self.inner.wake.notify_one();
            }
        }
        waits
            .into_iter()
            .map(|(i, rx)| (i, rx.recv().unwrap_or(Answer::Closed)))
            .collect()
    }
}

/// The outcomes before the first batch without one, and the error.
fn in_order(
    outcomes: Vec<Option<AppendOutcome>>,
    error: Option<StoreError>,
) -> (Vec<AppendOutcome>, Option<StoreError>) {
    let done: Vec<AppendOutcome> = outcomes.into_iter().map_while(|o| o).collect();
    (done, error)
}

impl RecordStore for ClickHouseStore {
    /// Stores the batch together with the batches of concurrent appends;
    /// see [`append_many`](RecordStore::append_many).
    fn append(&self, batch: StoredBatch) -> Result<AppendOutcome, StoreError> {
        match self.append_many(vec![batch]) {
            (done, None) if done.len() == 1 => Ok(done[0]),
            (_, Some(e)) => Err(e),
            (_, None) => Err(StoreError::Index("clickhouse: no outcome".into())),
        }
    }

    /// Queues the batches for the flusher, which stores them together with
    /// the batches of concurrent appends (one flush every
    /// `insert_interval_ms` at most, or sooner once `insert_max_records`
    /// wait; see [`flush_loop`]), and returns once ClickHouse confirmed
    /// the inserts of their flushes. A flush is tried again while the
    /// server fails, for up to `timeout_ms` in all (see
    /// [`flush_with_retries`]): a short outage (a restart) delays the ack
    /// instead of failing the batch, which the agent would send again only
    /// after its ack timeout. A flush that still fails fails every batch
    /// of it, except when the server refused its data: then each of its
    /// batches is stored on its own, so only a batch the server refuses
    /// fails (and its agent keeps it).
    fn append_many(&self, batches: Vec<StoredBatch>) -> (Vec<AppendOutcome>, Option<StoreError>) {
        if let Err(e) = self.check_usable() {
            return (Vec::new(), Some(e));
        }
        let mut outcomes: Vec<Option<AppendOutcome>> = vec![None; batches.len()];
        let todo: Vec<(usize, StoredBatch)> = batches
            .into_iter()
            .map(|mut b| {
                b.records.iter_mut().for_each(normalize);
                b
            })
            .enumerate()
            .collect();
        let mut error = None;
        for (i, answer) in self.submit(todo) {
            match answer {
                Answer::Done(o) => outcomes[i] = Some(o),
                Answer::Failed(m) => {
                    error.get_or_insert(StoreError::Index(m));
                }
                Answer::Closed => {
                    error.get_or_insert(StoreError::Index("store is closed".into()));
                }
            }
        }
        in_order(outcomes, error)
    }

    fn record_gap(&self, gap: Gap) -> Result<(), StoreError> {
        self.check_usable()?;
        self.block(record_gap(self.inner.clone(), gap))
    }

    fn search(&self, q: &SearchQuery) -> Result<SearchResult, StoreError> {
        if let (Some(f), Some(t)) = (q.from_ns, q.to_ns) {
            if f > t {
                return Err(StoreError::BadQuery(format!(
                    "from ({f}) is after to ({t})"
                )));
            }
        }
        self.check_usable()?;
        self.block(search(self.inner.clone(), q.clone()))
    }

    /// Rows of `ctw_records`, bytes on disk of every table of the
    /// database, day partitions of `ctw_records`; zeros while the server
    /// cannot be asked. In a cluster: summed over one replica of every
    /// shard (bytes of one copy of the data).
    fn stats(&self) -> StoreStats {
        if self.check_usable().is_err() {
            return StoreStats::default();
        }
        self.block(stats(self.inner.clone())).unwrap_or_default()
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        // Appends not yet flushed fail (not acked; the agents resend).
        for w in std::mem::take(&mut self.inner.queue().waiting) {
            let _ = w.done.send(Answer::Closed);
        }
        self.inner.wake.notify_one();
        if let Ok(mut rt) = self.rt.lock() {
            if let Some(rt) = rt.take() {
                rt.shutdown_background();
            }
        }
    }

    /// 16: a search is two HTTP round trips that wait on the server, not
    /// on this machine's cores.
    fn search_parallelism(&self) -> usize {
        16
    }

    fn ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst) && !self.inner.closed.load(Ordering::SeqCst)
    }
}

impl Drop for ClickHouseStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_and_dates_format() {
        assert_eq!(quote("a'b\\c?"), "'a\\'b\\\\c\\x3F'");
        assert_eq!(date_literal(0), "'1970-01-01'");
        assert_eq!(date_literal(u16::MAX), "'2149-06-06'");
        let q = SearchQuery {
            snat_ip: Some("198.18.0.1".parse().unwrap_or(IpAddr::from([0u8; 4]))),
            dst_ip: Some("fd00::1".parse().unwrap_or(IpAddr::from([0u8; 4]))),
            ..Default::default()
        };
        assert_eq!(where_clause(&q, 0, u64::MAX), "0");
    }

    /// A flush takes the oldest whole batches up to the record bound, at
    /// least one (a larger batch goes alone), and leaves the count right.
    #[test]
    fn server_refusals_are_told_from_outages() {
        let e = |m: &str| StoreError::Index(m.to_string());
        // 18.16's and current servers' texts.
        assert_eq!(
            rejection_code(&e(
                "clickhouse insert into ctw_records: bad response: Code: 395, \
                 e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero"
            )),
            Some(395)
        );
        assert_eq!(
            rejection_code(&e(
                "bad response: Code: 252. DB::Exception: Too many partitions"
            )),
            None,
            "too many parts: wait and retry"
        );
        for m in [
            "bad response: Code: 286, e.displayText() = DB::Exception: Quorum for previous write",
            "bad response: Code: 319. DB::Exception: Unknown status, client must retry",
            "clickhouse insert: network error: connection refused",
            "clickhouse: no answer within 1000 ms",
        ] {
            assert_eq!(rejection_code(&e(m)), None, "{m}");
        }
    }

    #[test]
    fn literal_lists_stay_within_the_query_bound_in_order() {
        let lits: Vec<String> = (0..30_000).map(|i| format!("'{i:020}'")).collect();
        let lists = literal_lists(&lits);
        assert!(lists.len() > 1);
        assert!(lists.iter().all(|l| l.len() <= MAX_LOOKUP_QUERY));
        assert_eq!(lists.join(", "), lits.join(", "));
        let big = vec!["x".repeat(MAX_LOOKUP_QUERY + 1), "y".into()];
        assert_eq!(literal_lists(&big), big, "a longer literal goes alone");
        assert!(literal_lists(&[]).is_empty());
    }

    #[test]
    fn rows_of_many_days_are_split_by_partition() {
        struct D(u16);
        impl Partitioned for D {
            fn day(&self) -> u16 {
                self.0
            }
        }
        let days = |chunks: Vec<Vec<&D>>| -> Vec<Vec<u16>> {
            chunks
                .into_iter()
                .map(|c| c.into_iter().map(|d| d.0).collect())
                .collect()
        };
        let rows: Vec<D> = [5, 3, 5, 9, 3, 7].into_iter().map(D).collect();
        assert_eq!(days(by_partitions(&rows, 100)), [[5, 3, 5, 9, 3, 7]]);
        assert_eq!(
            days(by_partitions(&rows, 2)),
            vec![vec![5, 3, 5, 3], vec![9, 7]]
        );
        assert_eq!(
            days(by_partitions(&rows, 1)),
            vec![vec![3, 3], vec![5, 5], vec![7], vec![9]]
        );
        assert!(by_partitions::<D>(&[], 100).is_empty());
    }

    #[test]
    fn a_flush_takes_whole_batches_up_to_the_bound() {
        let mut q = Queue::default();
        let mut answers = Vec::new();
        for (seq, n) in [(0u64, 3usize), (1, 4), (2, 10), (3, 1)] {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            answers.push(rx);
            let t = ctw_common::Tuple {
                src: IpAddr::from([198, 18, 0, 1]),
                dst: IpAddr::from([198, 18, 0, 2]),
                src_port: 1,
                dst_port: 2,
            };
            let r = ctw_common::ConnRecord::new(
                ctw_common::EventKind::New,
                0,
                ctw_common::Protocol::Tcp,
                t,
                t,
            );
            q.records += n;
            q.waiting.push(Waiting {
                batch: StoredBatch {
                    node: "n".into(),
                    boot_id: "b".into(),
                    seq,
                    records: vec![r; n],
                },
                done: tx,
            });
        }
        let seqs = |v: &[Waiting]| v.iter().map(|w| w.batch.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&take(&mut q, 8)), [0, 1]);
        assert_eq!(q.records, 11);
        assert_eq!(seqs(&take(&mut q, 8)), [2]);
        assert_eq!(seqs(&take(&mut q, 8)), [3]);
        assert_eq!((q.records, q.waiting.len()), (0, 0));
    }
}

/// `storage` with `backend: clickhouse`: records, gaps and the batch
/// ledger live in one ClickHouse database (18.16 or later), reached over
/// HTTP (`RowBinary`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseOptions {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`.
    #[serde(default = "default_ch_url")]
    pub url: String,
    /// Database holding the tables (created if missing).
    #[serde(default = "default_ch_database")]
    pub database: String,
    #[serde(default = "default_ch_user")]
    pub user: String,
    /// File holding the user's password (none: empty password).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Day partitions older than this are dropped.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// How far before a query's range to look for connections still alive
    /// in it (as for the tantivy store).
    #[serde(default = "default_lookback_hours")]
    pub lookback_hours: u32,
    /// Most records one search collects and joins; past it they are only
    /// counted (as for the tantivy store).
    #[serde(default = "default_max_collected_records")]
    pub max_collected_records: usize,
    /// While the server cannot be reached at start-up, try again this often
    /// (the collector is not ready meanwhile).
    #[serde(default = "default_ch_retry_ms")]
    pub connect_retry_ms: u64,
    /// Timeout of one request (insert or query), ms; an append whose
    /// flushes fail tries again for this long in all.
    #[serde(default = "default_ch_timeout_ms")]
    pub timeout_ms: u64,
    /// Concurrent appends (one per agent stream) are stored together: at
    /// most one flush (one ledger lookup, one records `INSERT`, one ledger
    /// `INSERT`) per this many ms, so ClickHouse sees a few large inserts
    /// instead of one per agent batch. An append waits up to this long
    /// (plus the flush) before it is acked. 0: a flush as soon as the
    /// previous one ended.
    #[serde(default = "default_insert_interval_ms")]
    pub insert_interval_ms: u64,
    /// A flush starts sooner once this many records wait, and takes at
    /// most this many (whole batches; a larger batch goes alone).
    #[serde(default = "default_insert_max_records")]
    pub insert_max_records: usize,
    /// A ClickHouse cluster instead of one server (unset: one server,
    /// `MergeTree` tables).
    #[serde(default)]
    pub cluster: Option<ClusterOptions>,
}

/// The HTTP client `cfg` describes (URL, user, the password read from
/// `password_file`, no HTTP compression: 18.16 answers LZ4 requests
/// empty), with the cluster's settings when `storage.cluster` is set
/// (`insert_distributed_sync=1`, `distributed_ddl_task_timeout` of
/// [`schema::ensure_timeout`]). Shared by the store and the replicas'
/// lease table. Errors: the password file cannot be read.
pub fn client(cfg: &ClickHouseOptions) -> Result<clickhouse::Client, StoreError> {
    let password = match &cfg.password_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|source| StoreError::Io {
                path: p.display().to_string(),
                source,
            })?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        None => String::new(),
    };
    let mut client = clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_user(&cfg.user)
        .with_password(password)
        .with_compression(clickhouse::Compression::None);
    if cfg.cluster.is_some() {
        client = client
            .with_option("insert_distributed_sync", "1")
            .with_option(
                "distributed_ddl_task_timeout",
                schema::ensure_timeout(cfg).as_secs().to_string(),
            );
    }
    Ok(client)
}

/// `storage.cluster`: the tables are `Distributed` over
/// `ReplicatedMergeTree` tables on every server of a ClickHouse cluster
/// (see [`schema`]); `url` is any of its servers (or a load balancer in
/// front of them). Needs ZooKeeper configured on the servers (replication
/// and the `ON CLUSTER` DDL queue) and `{shard}`/`{replica}` macros.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterOptions {
    /// The cluster's name in the servers' `remote_servers`.
    pub name: String,
    /// ZooKeeper path prefix of the replicated tables (must hold
    /// `{shard}`); each table's path is `<prefix>/<database>/<table>`.
    #[serde(default = "default_zookeeper_path")]
    pub zookeeper_path: String,
    /// Replicas that must have written a batch before it is acked
    /// (`insert_quorum`); unset: every replica of a shard (the smallest
    /// shard's count, read from `system.clusters`); 0 or 1: no quorum (acked
    /// once one replica has it).
    #[serde(default)]
    pub insert_quorum: Option<u32>,
    /// Insert into the shards' local tables directly instead of through
    /// the `Distributed` tables (see [`shards`]): per shard, in the
    /// cluster's `remote_servers` order, the HTTP URLs of its replicas
    /// (e.g. `[[http://ch-0-0:8123, http://ch-0-1:8123], [http://ch-1-0:8123]]`).
    /// Checked at start against `system.clusters`. Empty (the default):
    /// through `Distributed`.
    #[serde(default)]
    pub shards: Vec<Vec<String>>,
}

fn default_zookeeper_path() -> String {
    "/clickhouse/tables/{shard}".into()
}

impl ClickHouseOptions {
    /// Where the tables live (one server, or the cluster of `cluster`).
    pub fn layout(&self) -> schema::Layout {
        match &self.cluster {
            None => schema::Layout::Single,
            Some(c) => schema::Layout::Cluster {
                name: c.name.clone(),
                zookeeper_path: c.zookeeper_path.clone(),
            },
        }
    }
}

fn default_ch_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_ch_database() -> String {
    "conntrack_watch".into()
}
fn default_ch_user() -> String {
    "default".into()
}
fn default_ch_retry_ms() -> u64 {
    2000
}
fn default_ch_timeout_ms() -> u64 {
    30_000
}
fn default_insert_interval_ms() -> u64 {
    200
}
fn default_insert_max_records() -> usize {
    100_000
}
fn default_retention_days() -> u32 {
    super::DEFAULT_RETENTION_DAYS
}
fn default_lookback_hours() -> u32 {
    super::DEFAULT_LOOKBACK_HOURS
}
fn default_max_collected_records() -> usize {
    super::DEFAULT_MAX_COLLECTED_RECORDS
}

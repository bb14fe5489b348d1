//! Tantivy-backed [`RecordStore`]: a write-ahead log for durability, one
//! tantivy index per time partition for search.
//!
//! Layout under `storage.path`:
//! - `wal/` — write-ahead log segments (see [`wal`]); `append` returns only
//!   after its entry is fsynced (concurrent appends share an fsync).
//! - `index/p-YYYYMMDDHH/` — one tantivy index per `partition_hours` window
//!   of event time, named by the window start (UTC).
//! - `checkpoint.json` — the WAL position every partition has committed, and
//!   the dedup state at that position (written after each index commit).
//! - `gaps.jsonl` — loss gaps, fsynced per gap.
//!
//! Index commits run on a background thread every `commit_interval_ms`; each
//! partition's commit carries the WAL position it covers as its payload, so a
//! crash between two partitions' commits and the checkpoint never indexes a
//! record twice on replay. `open` replays only the WAL after the checkpoint.
//!
//! Search touches the partitions overlapping `[from - lookback, to +
//! lookback]`: the lookback before `from` finds connections opened earlier
//! and still alive, the one after `to` finds the DESTROY of connections alive
//! in the range, so the NEW/DESTROY join gives the same lifetime and counters
//! as [`MemStore`](super::MemStore) for connections shorter than
//! `lookback_hours`. With a selective term (pod address, SNAT port) the
//! tantivy query is only that term's postings: time and the fields without
//! postings are checked per candidate (time first, from its column), because
//! a time range starting inside a partition makes tantivy scan the time
//! column from the partition's start. Partitions entirely inside the range
//! get no time clause at all. At most [`StoreOptions::max_collected_docs`] documents
//! are collected per search (newest or nearest partitions first); when more
//! match, [`SearchStats::truncated`] is set and `total` adds, to the
//! connections found, the uncollected documents that count as connections
//! ([`counts_uncollected`](super::counts_uncollected): NEW and recovered
//! records starting in the range, and DESTROYs of connections started
//! before it; its docs say when that is exact).

mod codec;
mod dedup;
mod gaps;
mod schema;
mod wal;

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ctw_common::{now_ns, ConnRecord};
use tantivy::indexer::{IndexWriterOptions, LogMergePolicy, UserOperation};
use tantivy::query::{AllQuery, BooleanQuery, EnableScoring, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::IndexRecordOption;
use tantivy::{
    index::SegmentId, DateTime, DocSet, Index, IndexReader, IndexWriter, ReloadPolicy, Searcher,
    SegmentReader, Term, TERMINATED,
};

use self::dedup::{BootSeqs, Dedup};
use self::gaps::GapLog;
use self::schema::{shape_range_of_dst, to_v6, Fields, RecordDoc, Run, SegmentColumns};
use self::wal::{io_err, Wal};
use super::{
    assemble_with, counts_uncollected, matches_fields, AppendOutcome, Gap, RecordStore,
    SearchQuery, SearchResult, StoreError, StoreStats, StoredBatch,
};
use crate::config::StorageConfig;

const NS_PER_HOUR: u64 = 3_600_000_000_000;
const NS_PER_DAY: u64 = 24 * NS_PER_HOUR;
/// A writer of a partition that is not the newest is closed after this many
/// commit rounds without documents.
const IDLE_COMMITS_BEFORE_CLOSE: u32 = 30;
/// Segments with more documents are not merged again (tantivy merges 8 of
/// a size into one): merge work per record stays bounded (each record is
/// rewritten about log8(8M / documents per commit) times) instead of growing
/// with the partition. At 100M records merging on to ~16M-document segments
/// cut ingest from ~250k to ~186k records per CPU-second; searches read a
/// few more segments per partition instead.
const MERGE_MAX_SEGMENT_DOCS: usize = 1_000_000;
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Tuning knobs with production defaults (tests make them small).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// WAL segment size before rotation.
    pub wal_segment_bytes: u64,
    /// Most documents one search collects (bounds its memory).
    pub max_collected_docs: usize,
    /// Indexing heap of each partition's writer.
    pub writer_heap_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal_segment_bytes: 64 << 20,
            max_collected_docs: 200_000,
            writer_heap_bytes: 48 << 20,
        }
    }
}

/// What one search did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchStats {
    /// Names (`p-YYYYMMDDHH`) of the partitions searched.
    pub partitions: Vec<String>,
    /// Documents collected (NEW, DESTROY and recovered records).
    pub docs: u64,
    /// More documents matched than `max_collected_docs`.
    pub truncated: bool,
}

struct Partition {
    start_ns: u64,
    name: String,
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    /// Opened columns of the segments searched, dropped when their segment
    /// leaves the reader (merged away).
    columns: Mutex<HashMap<SegmentId, Arc<SegmentColumns>>>,
    /// Records given to the writer and not yet in a segment the reader has
    /// loaded, in append order. Searched with the reader's segments; the
    /// commit that puts them in a segment removes them in the same write
    /// lock as it reloads the reader, so a search sees each record once.
    fresh: RwLock<Vec<Arc<Run>>>,
}

impl Run {
    /// Records that may match `q` (all, unless it names a SNAT port).
    fn candidates<'a>(&'a self, q: &SearchQuery) -> Box<dyn Iterator<Item = &'a ConnRecord> + 'a> {
        match q.snat_port {
            Some(port) => Box::new(
                self.snat_ports
                    .iter()
                    .zip(&self.records)
                    .filter(move |(p, _)| **p == port)
                    .map(|(_, r)| r),
            ),
            None => Box::new(self.records.iter()),
        }
    }
}

impl Partition {
    /// The reader's segments and the records not in them yet, consistently.
    fn view(&self) -> Result<(Searcher, Vec<Arc<Run>>), StoreError> {
        let fresh = self.fresh.read().map_err(|_| poisoned())?;
        Ok((self.reader.searcher(), fresh.clone()))
    }

    fn fresh_records(&self) -> u64 {
        self.fresh
            .read()
            .map_or(0, |f| f.iter().map(|r| r.records.len() as u64).sum::<u64>())
    }

    /// The columns of `seg`, opened on first use.
    fn columns(&self, seg: &SegmentReader) -> Result<Arc<SegmentColumns>, StoreError> {
        let mut cache = self.columns.lock().map_err(|_| poisoned())?;
        if let Some(c) = cache.get(&seg.segment_id()) {
            return Ok(c.clone());
        }
        let c = Arc::new(SegmentColumns::open(seg).map_err(idx_err)?);
        cache.insert(seg.segment_id(), c.clone());
        Ok(c)
    }

    /// Forget the columns of segments `searcher` no longer has.
    fn prune_columns(&self, searcher: &Searcher) {
        if let Ok(mut cache) = self.columns.lock() {
            let segs = searcher.segment_readers();
            cache.retain(|id, _| segs.iter().any(|s| s.segment_id() == *id));
        }
    }
}

struct WriterSlot {
    writer: IndexWriter<RecordDoc>,
    dirty: bool,
    idle_commits: u32,
}

/// Everything an append changes, under one lock so that WAL order, index
/// order and dedup state agree.
struct Ingest {
    dedup: Dedup,
    writers: BTreeMap<u64, WriterSlot>,
    /// WAL position of the end of the last entry given to the writers.
    applied: u64,
    /// Position written in the checkpoint file.
    checkpointed: u64,
    closed: bool,
}

/// What the background thread is asked to do.
#[derive(Debug, Default)]
struct BgState {
    /// Stop, committing first if `Some(true)`.
    stop: Option<bool>,
    /// Commit now (too many uncommitted records).
    commit_now: bool,
}

struct Inner {
    cfg: StorageConfig,
    opts: StoreOptions,
    root: PathBuf,
    fields: &'static Fields,
    wal: Wal,
    ingest: Mutex<Ingest>,
    parts: RwLock<BTreeMap<u64, Arc<Partition>>>,
    gaps: Mutex<GapLog>,
    last_search: Mutex<SearchStats>,
    commit_lock: Mutex<()>,
    bg: Mutex<BgState>,
    bg_cv: Condvar,
}

/// The production store. See the module docs.
pub struct TantivyStore {
    inner: Arc<Inner>,
    bg: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TantivyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TantivyStore")
            .field("path", &self.inner.root)
            .finish_non_exhaustive()
    }
}

fn idx_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Index(e.to_string())
}

fn poisoned() -> StoreError {
    StoreError::Index("store lock poisoned".into())
}

fn partition_name(start_ns: u64) -> String {
    let secs = (start_ns / 1_000_000_000) as i64;
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => format!("p-{}", t.format("%Y%m%d%H")),
        None => format!("p-ns{start_ns}"),
    }
}

fn parse_partition_name(name: &str) -> Option<u64> {
    let s = name.strip_prefix("p-")?;
    if let Some(ns) = s.strip_prefix("ns") {
        return ns.parse().ok();
    }
    let t = chrono::NaiveDateTime::parse_from_str(&format!("{s}00"), "%Y%m%d%H%M").ok()?;
    u64::try_from(t.and_utc().timestamp())
        .ok()
        .map(|s| s * 1_000_000_000)
}

fn dir_size(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A search's matching records, from fresh runs and segments alike: the
/// first `cap` are collected, the rest only counted (see
/// [`counts_uncollected`] for which of them count as connections).
struct Matches<'q> {
    q: &'q SearchQuery,
    cap: usize,
    records: Vec<(String, ConnRecord)>,
    /// Uncollected matching records.
    uncollected: u64,
    /// Uncollected records that count as connections.
    uncollected_connections: u64,
}

impl<'q> Matches<'q> {
    fn new(q: &'q SearchQuery, cap: usize) -> Matches<'q> {
        Matches {
            q,
            cap,
            records: Vec::new(),
            uncollected: 0,
            uncollected_connections: 0,
        }
    }

    /// One more match (its node name is copied only when it is collected).
    fn add(&mut self, node: impl Into<String>, r: ConnRecord) {
        if self.records.len() >= self.cap {
            self.uncollected += 1;
            self.uncollected_connections += u64::from(counts_uncollected(self.q, &r));
        } else {
            self.records.push((node.into(), r));
        }
    }
}

impl Inner {
    /// The partitions now, oldest first (a snapshot: no lock is held after).
    fn all_partitions(&self) -> Result<Vec<Arc<Partition>>, StoreError> {
        let parts = self.parts.read().map_err(|_| poisoned())?;
        Ok(parts.values().cloned().collect())
    }

    fn width_ns(&self) -> u64 {
        self.cfg.partition_hours.max(1) as u64 * NS_PER_HOUR
    }

    fn partition_start(&self, event_ns: u64) -> u64 {
        event_ns - event_ns % self.width_ns()
    }

    fn lock_ingest(&self) -> Result<MutexGuard<'_, Ingest>, StoreError> {
        self.ingest.lock().map_err(|_| poisoned())
    }

    fn open_partition(&self, start_ns: u64) -> Result<Arc<Partition>, StoreError> {
        open_partition_at(&self.root, self.fields, start_ns)
    }

    /// The partition for `start_ns`, created when needed.
    fn partition(&self, start_ns: u64) -> Result<Arc<Partition>, StoreError> {
        if let Some(p) = self.parts.read().map_err(|_| poisoned())?.get(&start_ns) {
            return Ok(p.clone());
        }
        let p = self.open_partition(start_ns)?;
        self.parts
            .write()
            .map_err(|_| poisoned())?
            .insert(start_ns, p.clone());
        Ok(p)
    }

    fn writer<'a>(
        &self,
        ing: &'a mut Ingest,
        start_ns: u64,
    ) -> Result<&'a mut WriterSlot, StoreError> {
        #[allow(clippy::map_entry)] // creating the writer is fallible
        if !ing.writers.contains_key(&start_ns) {
            let p = self.partition(start_ns)?;
            let w: IndexWriter<RecordDoc> = p
                .index
                .writer_with_options(
                    IndexWriterOptions::builder()
                        .num_worker_threads(1)
                        .num_merge_threads(1)
                        .memory_budget_per_thread(self.opts.writer_heap_bytes)
                        .build(),
                )
                .map_err(idx_err)?;
            let mut policy = LogMergePolicy::default();
            policy.set_max_docs_before_merge(MERGE_MAX_SEGMENT_DOCS);
            w.set_merge_policy(Box::new(policy));
            ing.writers.insert(
                start_ns,
                WriterSlot {
                    writer: w,
                    dirty: false,
                    idle_commits: 0,
                },
            );
        }
        ing.writers
            .get_mut(&start_ns)
            .ok_or_else(|| StoreError::Index("writer vanished".into()))
    }

    /// Give the records of one WAL entry (ending at `end`) to the writers;
    /// skip partitions whose last commit already covers `end`.
    fn index_batch(
        &self,
        ing: &mut Ingest,
        b: &StoredBatch,
        end: u64,
        covered: &HashMap<u64, u64>,
    ) -> Result<(), StoreError> {
        let node: Arc<str> = Arc::from(b.node.as_str());
        // Records go to the writers in runs of the same partition, one
        // channel message per run (`add_document` sends one per document,
        // and waking the indexing thread per document cost more CPU than
        // indexing it).
        let mut run: Vec<ConnRecord> = Vec::with_capacity(b.records.len());
        let mut cur: Option<(u64, bool)> = None;
        for r in &b.records {
            let start = self.partition_start(r.event_ns);
            let skip = match cur {
                Some((s, skip)) if s == start => skip,
                _ => {
                    if let Some((s, false)) = cur {
                        self.send_run(ing, s, &node, &mut run)?;
                    }
                    let skip = covered.get(&start).is_some_and(|&c| c >= end);
                    cur = Some((start, skip));
                    skip
                }
            };
            if !skip {
                run.push(*r);
            }
        }
        if let Some((s, false)) = cur {
            self.send_run(ing, s, &node, &mut run)?;
        }
        Ok(())
    }

    /// Give one run to its partition's writer and make its records
    /// searchable (as fresh records until the next commit).
    fn send_run(
        &self,
        ing: &mut Ingest,
        start: u64,
        node: &Arc<str>,
        records: &mut Vec<ConnRecord>,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let fresh = Arc::new(Run::new(node.clone(), std::mem::take(records)));
        let ops: Vec<UserOperation<RecordDoc>> =
            Run::docs(&fresh).map(UserOperation::Add).collect();
        let slot = self.writer(ing, start)?;
        slot.dirty = true;
        slot.writer.run(ops).map_err(idx_err)?;
        self.partition(start)?
            .fresh
            .write()
            .map_err(|_| poisoned())?
            .push(fresh);
        Ok(())
    }

    /// Commit every writer with new documents, reload their readers (their
    /// fresh records are then in segments) and, if
    /// `checkpoint`, write the checkpoint and drop covered WAL segments.
    fn commit(&self, checkpoint: bool) -> Result<(), StoreError> {
        // One commit at a time (background thread, `commit()`, close).
        let _one = self.commit_lock.lock().map_err(|_| poisoned())?;
        let (pos, snapshot, committed, idle) = {
            let mut ing = self.lock_ingest()?;
            let pos = ing.applied;
            let any_dirty = ing.writers.values().any(|s| s.dirty);
            if !any_dirty && pos == ing.checkpointed {
                return Ok(());
            }
            // Positions a commit covers must be durable in the WAL, so that
            // new entries are never written below them after a crash.
            self.wal.sync_to(pos)?;
            let payload = pos.to_string();
            let mut committed = Vec::new();
            for (&start, slot) in ing.writers.iter_mut() {
                if slot.dirty {
                    let mut prepared = slot.writer.prepare_commit().map_err(idx_err)?;
                    prepared.set_payload(&payload);
                    prepared.commit().map_err(idx_err)?;
                    slot.dirty = false;
                    slot.idle_commits = 0;
                    // Every fresh run of the partition went to the writer
                    // before this commit (runs are added under the ingest
                    // lock): the reload below makes them all redundant.
                    let runs = match self.parts.read().map_err(|_| poisoned())?.get(&start) {
                        Some(p) => p.fresh.read().map_err(|_| poisoned())?.len(),
                        None => 0,
                    };
                    committed.push((start, runs));
                } else {
                    slot.idle_commits += 1;
                }
            }
            let newest = ing.writers.keys().next_back().copied();
            let idle: Vec<u64> = ing
                .writers
                .iter()
                .filter(|(&s, w)| Some(s) != newest && w.idle_commits >= IDLE_COMMITS_BEFORE_CLOSE)
                .map(|(&s, _)| s)
                .collect();
            let idle: Vec<WriterSlot> = idle.iter().filter_map(|s| ing.writers.remove(s)).collect();
            let snapshot = checkpoint.then(|| ing.dedup.clone());
            (pos, snapshot, committed, idle)
        };
        {
            let parts = self.parts.read().map_err(|_| poisoned())?;
            for (start, runs) in committed {
                if let Some(p) = parts.get(&start) {
                    let mut fresh = p.fresh.write().map_err(|_| poisoned())?;
                    p.reader.reload().map_err(idx_err)?;
                    let n = runs.min(fresh.len());
                    fresh.drain(..n);
                }
            }
        }
        for slot in idle {
            if let Err(e) = slot.writer.wait_merging_threads() {
                tracing::warn!(error = %e, "closing an idle partition writer");
            }
        }
        if let Some(dedup) = snapshot {
            dedup::write_checkpoint(&self.root, pos, &dedup)?;
            self.lock_ingest()?.checkpointed = pos;
            self.wal.remove_covered(pos)?;
        }
        Ok(())
    }

    fn search(&self, q: &SearchQuery) -> Result<(SearchResult, SearchStats), StoreError> {
        if let (Some(f), Some(t)) = (q.from_ns, q.to_ns) {
            if f > t {
                return Err(StoreError::BadQuery(format!(
                    "from ({f}) is after to ({t})"
                )));
            }
        }
        let (lo, hi) = self.event_range(q);
        let parts = self.partitions_in(q);
        let mut stats = SearchStats {
            partitions: parts.iter().map(|p| p.name.clone()).collect(),
            ..Default::default()
        };
        let mut matches = Matches::new(q, self.opts.max_collected_docs);
        let width = self.width_ns();
        for p in &parts {
            let covered = lo <= p.start_ns && p.start_ns.saturating_add(width - 1) <= hi;
            let query = self.build_query(q, (!covered).then_some((lo, hi)));
            let (searcher, fresh) = p.view()?;
            for run in fresh.iter().rev() {
                for r in run.candidates(q) {
                    if (lo..=hi).contains(&r.event_ns) && matches_fields(q, &run.node, r) {
                        matches.add(&*run.node, *r);
                    }
                }
            }
            p.prune_columns(&searcher);
            let weight = query
                .weight(EnableScoring::disabled_from_searcher(&searcher))
                .map_err(idx_err)?;
            for seg in searcher.segment_readers() {
                let mut scorer = weight.scorer(seg, 1.0).map_err(idx_err)?;
                let alive = seg.alive_bitset();
                let mut cols: Option<Arc<SegmentColumns>> = None;
                let mut doc = scorer.doc();
                while doc != TERMINATED {
                    if alive.is_none_or(|a| a.is_alive(doc)) {
                        if cols.is_none() {
                            cols = Some(p.columns(seg)?);
                        }
                        // Time first (one column), then the whole record: the
                        // query may leave the time range, the exact SNAT port
                        // and the fast-only fields to this check. Past the
                        // cap, matches are only counted.
                        if let Some(c) = cols
                            .as_ref()
                            .filter(|c| c.event_ns(doc).is_some_and(|t| (lo..=hi).contains(&t)))
                        {
                            let rec = c.record(doc).map_err(idx_err)?;
                            if let Some((node, r)) =
                                rec.filter(|(node, r)| matches_fields(q, node, r))
                            {
                                matches.add(node, r);
                            }
                        }
                    }
                    doc = scorer.advance();
                }
            }
        }
        stats.docs = matches.records.len() as u64;
        stats.truncated = matches.uncollected > 0;
        let gaps = self.gaps.lock().map_err(|_| poisoned())?;
        let mut result = assemble_with(q, matches.records, &gaps.gaps, stats.truncated);
        result.total += matches.uncollected_connections;
        // Never fewer than returned (DESTROYs standing alone are returned
        // but not counted when their NEW may be among the uncollected).
        result.total = result.total.max(result.hits.len() as u64);
        Ok((result, stats))
    }

    /// Event times a search must read: `[from - lookback, to + lookback]`.
    fn event_range(&self, q: &SearchQuery) -> (u64, u64) {
        let lb = self.cfg.lookback_hours as u64 * NS_PER_HOUR;
        (
            q.from_ns.map_or(0, |f| f.saturating_sub(lb)),
            q.to_ns.map_or(u64::MAX, |t| t.saturating_add(lb)),
        )
    }

    /// Partitions overlapping the search's event range, in the order they
    /// are read: nearest to `at` first, else newest first.
    fn partitions_in(&self, q: &SearchQuery) -> Vec<Arc<Partition>> {
        let (lo, hi) = self.event_range(q);
        let width = self.width_ns();
        let Ok(parts) = self.parts.read() else {
            return Vec::new();
        };
        let mut v: Vec<Arc<Partition>> = parts
            .values()
            .filter(|p| p.start_ns <= hi && p.start_ns.saturating_add(width) > lo)
            .cloned()
            .collect();
        match q.at_ns {
            Some(at) => v.sort_by_key(|p| {
                let end = p.start_ns.saturating_add(width);
                if at < p.start_ns {
                    p.start_ns - at
                } else {
                    at.saturating_sub(end)
                }
            }),
            None => v.reverse(),
        }
        v
    }

    /// The tantivy query of a search in one partition; `time` is the event
    /// range when the partition is not entirely inside it. The caller checks
    /// every candidate's time and fields again: a query with a selective
    /// term (a pod address or a SNAT port, whose postings are short) leaves
    /// out the clauses that scan columns (time, `src_port`, `dst_ip`,
    /// `node`, `snat_ip`): with a range in the middle of a partition,
    /// tantivy scans the time column from the partition's start to find its
    /// first match, which cost tens of milliseconds per partition at 100M
    /// records.
    fn build_query(&self, q: &SearchQuery, time: Option<(u64, u64)>) -> Box<dyn Query> {
        let f = self.fields;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut term = |t: Term| {
            clauses.push((
                Occur::Must,
                Box::new(TermQuery::new(t, IndexRecordOption::Basic)),
            ))
        };
        if let Some(ip) = q.src_ip {
            term(Term::from_field_ip_addr(f.src_ip, to_v6(ip)));
        }
        if let Some(p) = q.snat_port {
            // The port's bucket: the exact port is checked per candidate.
            term(Term::from_field_u64(f.snat_bucket, schema::snat_bucket(p)));
        }
        let selective = q.src_ip.is_some() || q.snat_port.is_some();
        if !selective {
            let mut range = |lo: Term, hi: Term| {
                clauses.push((
                    Occur::Must,
                    Box::new(RangeQuery::new(Bound::Included(lo), Bound::Included(hi))),
                ))
            };
            if let Some(p) = q.src_port {
                let t = Term::from_field_u64(f.src_port, p as u64);
                range(t.clone(), t);
            }
            if let Some(ip) = q.dst_ip {
                let (lo, hi) = shape_range_of_dst(ip);
                range(
                    Term::from_field_bytes(f.shape, &lo),
                    Term::from_field_bytes(f.shape, &hi),
                );
            }
            if let Some(n) = &q.node {
                let t = Term::from_field_text(f.node, n);
                range(t.clone(), t);
            }
            if let Some(ip) = q.snat_ip {
                let t = Term::from_field_bytes(f.snat, &to_v6(ip).octets());
                range(t.clone(), t);
            }
            if let Some((lo, hi)) = time {
                let date = |ns: u64| {
                    Term::from_field_date(f.t, DateTime::from_timestamp_micros((ns / 1000) as i64))
                };
                range(date(lo), date(hi));
            }
        }
        // protocol is checked on the rebuilt record (two values: an index
        // would not narrow anything).
        match clauses.len() {
            0 => Box::new(AllQuery),
            1 => clauses
                .pop()
                .map(|(_, q)| q)
                .unwrap_or_else(|| Box::new(AllQuery)),
            _ => Box::new(BooleanQuery::new(clauses)),
        }
    }

    fn enforce_retention(&self, now: u64) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(self.cfg.retention_days as u64 * NS_PER_DAY);
        let width = self.width_ns();
        let max_bytes = (self.cfg.max_size_gb * (1u64 << 30) as f64) as u64;
        let mut dropped = 0;
        loop {
            let victim = {
                let parts = self.parts.read().map_err(|_| poisoned())?;
                let newest = parts.keys().next_back().copied();
                let by_age = parts
                    .values()
                    .find(|p| {
                        p.start_ns.saturating_add(width) <= cutoff && Some(p.start_ns) != newest
                    })
                    .cloned();
                match by_age {
                    Some(p) => Some(p),
                    None if parts.len() > 1 && dir_size(&self.root) > max_bytes => {
                        parts.values().next().cloned()
                    }
                    None => None,
                }
            };
            let Some(p) = victim else { break };
            self.drop_partition(&p)?;
            dropped += 1;
        }
        // The newest partition is kept even when old, unless it is entirely
        // past retention and nothing writes to it.
        self.gaps.lock().map_err(|_| poisoned())?.prune(cutoff)?;
        self.lock_ingest()?
            .dedup
            .retain(|_, b| b.last_seen_ns >= cutoff);
        Ok(dropped)
    }

    fn drop_partition(&self, p: &Arc<Partition>) -> Result<(), StoreError> {
        let slot = self.lock_ingest()?.writers.remove(&p.start_ns);
        if let Some(slot) = slot {
            // Uncommitted documents of a dropped partition are discarded.
            drop(slot);
        }
        self.parts
            .write()
            .map_err(|_| poisoned())?
            .remove(&p.start_ns);
        tracing::info!(partition = %p.name, "retention: dropping partition");
        match std::fs::remove_dir_all(&p.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&p.dir, e)),
        }
    }

    /// Records not committed yet, in every partition.
    fn fresh_records(&self) -> u64 {
        self.parts
            .read()
            .map_or(0, |parts| parts.values().map(|p| p.fresh_records()).sum())
    }

    /// Ask the background thread to commit now.
    fn request_commit(&self) {
        if let Ok(mut bg) = self.bg.lock() {
            if !bg.commit_now {
                bg.commit_now = true;
                self.bg_cv.notify_all();
            }
        }
    }

    /// Commit every `commit_interval_ms`, or sooner when asked (too many
    /// fresh records); enforce retention every minute.
    fn background(self: Arc<Self>) {
        let interval = Duration::from_millis(self.cfg.commit_interval_ms.max(1));
        let mut next_retention = Instant::now() + RETENTION_EVERY;
        let Ok(mut bg) = self.bg.lock() else {
            return;
        };
        loop {
            let due = Instant::now() + interval;
            while bg.stop.is_none() && !bg.commit_now {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Ok((b, _)) = self.bg_cv.wait_timeout(bg, left) else {
                    return;
                };
                bg = b;
            }
            if let Some(commit) = bg.stop {
                drop(bg);
                if commit {
                    if let Err(e) = self.commit(true) {
                        tracing::error!(error = %e, "final index commit failed");
                    }
                }
                return;
            }
            bg.commit_now = false;
            drop(bg);
            if let Err(e) = self.commit(true) {
                tracing::error!(error = %e, "index commit failed");
            }
            if Instant::now() >= next_retention {
                next_retention = Instant::now() + RETENTION_EVERY;
                if let Err(e) = self.enforce_retention(now_ns()) {
                    tracing::error!(error = %e, "retention failed");
                }
            }
            let Ok(b) = self.bg.lock() else { return };
            bg = b;
        }
    }
}

impl TantivyStore {
    /// Open (or create) the store under `cfg.path`, replaying the WAL tail
    /// into the index, and start its commit/retention thread.
    /// Open (or create) the store at `cfg.path`, collecting at most
    /// `cfg.max_collected_records` per search.
    pub fn open(cfg: &StorageConfig) -> Result<TantivyStore, StoreError> {
        let opts = StoreOptions {
            max_collected_docs: cfg.max_collected_records,
            ..StoreOptions::default()
        };
        TantivyStore::open_with(cfg, opts)
    }

    pub fn open_with(cfg: &StorageConfig, opts: StoreOptions) -> Result<TantivyStore, StoreError> {
        let root = cfg.path.clone();
        let index_dir = root.join("index");
        std::fs::create_dir_all(&index_dir).map_err(|e| io_err(&index_dir, e))?;
        let (ckpt_pos, dedup) = dedup::read_checkpoint(&root)?;
        let fields = Fields::get();
        let gaps = GapLog::open(&root)?;

        // Partitions on disk and the WAL position each one's commit covers.
        let mut starts = Vec::new();
        for entry in std::fs::read_dir(&index_dir).map_err(|e| io_err(&index_dir, e))? {
            let entry = entry.map_err(|e| io_err(&index_dir, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            match parse_partition_name(&name) {
                Some(s) if entry.path().is_dir() => starts.push(s),
                _ => tracing::warn!(name, "ignoring unknown entry in the index directory"),
            }
        }
        // Build `Inner` with a placeholder WAL position; replay fills it.
        let mut replayed: Vec<(u64, StoredBatch)> = Vec::new();
        let wal_dir = root.join("wal");
        let mut covered: HashMap<u64, u64> = HashMap::new();
        let mut parts = BTreeMap::new();
        for s in starts {
            let p = open_partition_at(&root, fields, s)?;
            let payload = p.index.load_metas().map_err(idx_err)?.payload;
            let pos = payload.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            covered.insert(s, pos);
            parts.insert(s, p);
        }
        let max_covered = covered.values().copied().max().unwrap_or(0).max(ckpt_pos);
        let mut err = None;
        let wal = Wal::open(
            &wal_dir,
            ckpt_pos,
            max_covered,
            opts.wal_segment_bytes,
            |end, payload| {
                match codec::decode(payload) {
                    Ok(b) => replayed.push((end, b)),
                    Err(m) => {
                        err.get_or_insert(StoreError::Corrupt {
                            path: wal_dir.display().to_string(),
                            message: format!("undecodable entry ending at position {end}: {m}"),
                        });
                    }
                }
                Ok(())
            },
        )?;
        if let Some(e) = err {
            return Err(e);
        }
        let applied = wal.written()?;
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            opts,
            root,
            fields,
            wal,
            ingest: Mutex::new(Ingest {
                dedup,
                writers: BTreeMap::new(),
                applied,
                checkpointed: ckpt_pos,
                closed: false,
            }),
            parts: RwLock::new(parts),
            gaps: Mutex::new(gaps),
            last_search: Mutex::new(SearchStats::default()),
            commit_lock: Mutex::new(()),
            bg: Mutex::new(BgState::default()),
            bg_cv: Condvar::new(),
        });
        {
            let mut ing = inner.lock_ingest()?;
            let n = replayed.len();
            for (end, b) in replayed {
                let key = (b.node.clone(), b.boot_id.clone());
                let entry = ing.dedup.entry(key).or_insert_with(BootSeqs::default);
                if !entry.seqs.insert(b.seq) {
                    continue; // stored twice in the WAL (e.g. after an index error)
                }
                entry.last_seen_ns = now_ns();
                inner.index_batch(&mut ing, &b, end, &covered)?;
            }
            if n > 0 {
                tracing::info!(entries = n, "replayed write-ahead log");
            }
        }
        inner.commit(true)?;
        let bg_inner = inner.clone();
        let bg = std::thread::Builder::new()
            .name("ctw-store-commit".into())
            .spawn(move || bg_inner.background())
            .map_err(|e| io_err(&cfg.path, e))?;
        Ok(TantivyStore {
            inner,
            bg: Mutex::new(Some(bg)),
        })
    }

    /// Stop the background thread, commit, and refuse further appends.
    /// Also done on drop.
    pub fn close(&self) {
        self.shutdown(true);
    }

    fn shutdown(&self, commit: bool) {
        let Ok(mut bg) = self.bg.lock() else { return };
        let Some(handle) = bg.take() else { return };
        if let Ok(mut s) = self.inner.bg.lock() {
            s.stop = Some(commit);
            self.inner.bg_cv.notify_all();
        }
        let _ = handle.join();
        if let Ok(mut ing) = self.inner.ingest.lock() {
            ing.closed = true;
            // Dropping an uncommitted writer discards its documents (they are
            // still in the WAL).
            let writers = std::mem::take(&mut ing.writers);
            drop(ing);
            for (_, slot) in writers {
                if commit {
                    let _ = slot.writer.wait_merging_threads();
                }
            }
        }
    }

    /// Simulate a crash: stop without committing the index or writing a
    /// checkpoint. Only what `append` acknowledged (the WAL) survives.
    #[doc(hidden)]
    pub fn crash(self) {
        self.shutdown(false);
    }

    /// Simulate a crash after every partition committed but before the
    /// checkpoint was written.
    #[doc(hidden)]
    pub fn crash_after_index_commit(self) -> Result<(), StoreError> {
        self.inner.commit(false)?;
        self.shutdown(false);
        Ok(())
    }

    /// Commit now (records become searchable); the background thread does
    /// this every `commit_interval_ms`.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.inner.commit(true)
    }

    /// Segments of all partitions (as the readers see them).
    pub fn segment_count(&self) -> usize {
        self.inner.parts.read().map_or(0, |parts| {
            parts
                .values()
                .map(|p| p.reader.searcher().segment_readers().len())
                .sum()
        })
    }

    /// Merge each partition into one segment and wait (benchmarks, tools).
    pub fn force_merge(&self) -> Result<(), StoreError> {
        self.inner.commit(true)?;
        let parts = self.inner.all_partitions()?;
        for p in parts {
            let mut ing = self.inner.lock_ingest()?;
            let slot = self.inner.writer(&mut ing, p.start_ns)?;
            let ids = p.index.searchable_segment_ids().map_err(idx_err)?;
            if ids.len() > 1 {
                slot.writer.merge(&ids).wait().map_err(idx_err)?;
            }
            p.reader.reload().map_err(idx_err)?;
        }
        Ok(())
    }

    /// Drop partitions past `retention_days` and, oldest first, while the
    /// store is larger than `max_size_gb` (never the newest partition).
    /// Returns how many were dropped. Runs every minute on its own too.
    pub fn enforce_retention(&self, now_ns: u64) -> Result<usize, StoreError> {
        self.inner.enforce_retention(now_ns)
    }

    /// Search and report what the search did.
    pub fn search_with_stats(
        &self,
        q: &SearchQuery,
    ) -> Result<(SearchResult, SearchStats), StoreError> {
        let (r, s) = self.inner.search(q)?;
        if let Ok(mut last) = self.inner.last_search.lock() {
            *last = s.clone();
        }
        Ok((r, s))
    }

    /// What the last search did.
    pub fn last_search_stats(&self) -> SearchStats {
        self.inner
            .last_search
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Names of the partitions a search for `q` would read.
    pub fn partitions_for(&self, q: &SearchQuery) -> Vec<String> {
        self.inner
            .partitions_in(q)
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    /// Names of every partition, oldest first.
    pub fn partitions(&self) -> Vec<String> {
        self.inner
            .parts
            .read()
            .map(|p| p.values().map(|p| p.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Bytes on disk of each field's parts (postings, terms, fast fields),
    /// summed over partitions, largest first; plus the index total.
    pub fn space_usage(&self) -> Result<(Vec<(String, u64)>, u64), StoreError> {
        let mut per: HashMap<String, u64> = HashMap::new();
        let mut total = 0u64;
        let parts = self.inner.all_partitions()?;
        for p in parts {
            let usage = p
                .reader
                .searcher()
                .space_usage()
                .map_err(|e| io_err(&p.dir, e))?;
            total += usage.total().get_bytes();
            for seg in usage.segments() {
                for (kind, pf) in [
                    ("postings", seg.postings()),
                    ("terms", seg.termdict()),
                    ("fast", seg.fast_fields()),
                    ("norms", seg.fieldnorms()),
                ] {
                    for f in pf.fields() {
                        *per.entry(format!("{} {kind}", f.field_name())).or_default() +=
                            f.total().get_bytes();
                    }
                }
                *per.entry("docstore".into()).or_default() += seg.store().total().get_bytes();
            }
        }
        let mut v: Vec<(String, u64)> = per.into_iter().filter(|(_, b)| *b > 0).collect();
        v.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
        Ok((v, total))
    }
}

fn open_partition_at(
    root: &Path,
    fields: &Fields,
    start_ns: u64,
) -> Result<Arc<Partition>, StoreError> {
    let name = partition_name(start_ns);
    let dir = root.join("index").join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let mmap = tantivy::directory::MmapDirectory::open(&dir).map_err(idx_err)?;
    let index = if Index::exists(&mmap).map_err(idx_err)? {
        let index = Index::open(mmap).map_err(idx_err)?;
        // Documents and columns are read by field id and name: a partition
        // written with another schema (an older version of this store)
        // would be misread.
        if index.schema() != fields.schema {
            return Err(StoreError::Corrupt {
                path: dir.display().to_string(),
                message: "partition written with a different index schema".into(),
            });
        }
        index
    } else {
        Index::builder()
            .schema(fields.schema.clone())
            // Nothing is stored, yet the doc store costs ~4 bytes per
            // document (a 4-byte offset per document in each block, which
            // LZ4 does not shrink); tantivy cannot skip it, and no block
            // size or LZ4 setting changes it (see `schema`).
            .settings(tantivy::IndexSettings {
                docstore_compression: tantivy::store::Compressor::Zstd(
                    tantivy::store::ZstdCompressor::default(),
                ),
                ..Default::default()
            })
            .open_or_create(mmap)
            .map_err(idx_err)?
    };
    let reader = index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()
        .map_err(idx_err)?;
    Ok(Arc::new(Partition {
        start_ns,
        name,
        dir,
        index,
        reader,
        columns: Mutex::default(),
        fresh: RwLock::default(),
    }))
}

impl Drop for TantivyStore {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

impl RecordStore for TantivyStore {
    fn append(&self, mut batch: StoredBatch) -> Result<AppendOutcome, StoreError> {
        let inner = &self.inner;
        batch.records.iter_mut().for_each(super::normalize);
        let mut payload = Vec::with_capacity(64 + batch.records.len() * 96);
        codec::encode(&batch, &mut payload);
        let end = {
            let mut ing = inner.lock_ingest()?;
            if ing.closed {
                return Err(StoreError::Index("store is closed".into()));
            }
            let key = (batch.node.clone(), batch.boot_id.clone());
            if ing
                .dedup
                .get(&key)
                .is_some_and(|b| b.seqs.contains(batch.seq))
            {
                drop(ing);
                // The first copy may still be on its way to disk: answer only
                // once it is durable.
                inner.wal.sync_to(inner.wal.written()?)?;
                return Ok(AppendOutcome::Duplicate);
            }
            let end = inner.wal.write(&payload)?;
            // From here the batch is in the WAL: it is stored (replay would
            // index it), whatever the index says.
            let b = ing.dedup.entry(key).or_default();
            b.seqs.insert(batch.seq);
            b.last_seen_ns = now_ns();
            ing.applied = end;
            let indexed = inner.index_batch(&mut ing, &batch, end, &HashMap::new());
            drop(ing);
            if inner.fresh_records() >= inner.cfg.commit_max_records {
                inner.request_commit();
            }
            if let Err(e) = indexed {
                tracing::error!(error = %e, "indexing a batch failed; it is in the WAL and will be indexed on restart");
            }
            end
        };
        inner.wal.sync_to(end)?;
        Ok(AppendOutcome::Stored)
    }

    fn record_gap(&self, gap: Gap) -> Result<(), StoreError> {
        self.inner.gaps.lock().map_err(|_| poisoned())?.append(gap)
    }

    fn search(&self, q: &SearchQuery) -> Result<SearchResult, StoreError> {
        self.search_with_stats(q).map(|(r, _)| r)
    }

    fn stats(&self) -> StoreStats {
        let parts = self.inner.all_partitions().unwrap_or_default();
        StoreStats {
            records: parts
                .iter()
                .map(|p| p.reader.searcher().num_docs() + p.fresh_records())
                .sum(),
            bytes_on_disk: dir_size(&self.inner.root),
            partitions: parts.len() as u64,
        }
    }
}

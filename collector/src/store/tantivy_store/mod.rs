//! Tantivy-backed [`RecordStore`]: a write-ahead log for durability, one
//! tantivy index per time partition for search.
//!
//! Layout under [`StoreOptions::path`]:
//! - `wal/` — write-ahead log segments (see the `wal` module); `append` returns only
//!   after its entry is fsynced (concurrent appends share an fsync).
//! - `index/p-YYYYMMDDHH/` — one tantivy index per [`StoreOptions::partition_hours`] window
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
//! ([`counts_uncollected`]: NEW and recovered
//! records starting in the range, and DESTROYs of connections started
//! before it; its docs say when that is exact).
//!
//! By job: `writer` (appends into partition writers, commits, the
//! background thread), `search`, `retention`, `partitions` (naming,
//! opening, listing), `wal`, `dedup` (checkpoint), `gaps`, `schema`,
//! `codec`; `hooks` holds the test hooks (crash simulation, forced merges,
//! segment counts), compiled only for tests and the `test-hooks` feature.

mod codec;
mod dedup;
mod gaps;
#[cfg(any(test, feature = "test-hooks"))]
mod hooks;
mod partitions;
mod retention;
mod schema;
mod search;
mod wal;
mod writer;

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
use self::partitions::{open_partition_at, parse_partition_name};
use self::retention::dir_size;
use self::schema::{shape_range_of_dst, to_v6, Fields, RecordDoc, Run, SegmentColumns};
use self::wal::{io_err, Wal};
use super::{
    assemble_with, counts_uncollected, matches_fields, AppendOutcome, Gap, RecordStore,
    SearchQuery, SearchResult, StoreError, StoreStats, StoredBatch,
};

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

/// What the store needs to know, with production defaults: where it lives,
/// how it partitions, commits and retains, and its tuning knobs. The app
/// builds it from its configuration (`StorageConfig::store_options`); the
/// store knows no app configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// Directory of the index partitions, the WAL, the checkpoint and the
    /// gap log (see the module docs).
    pub path: PathBuf,
    /// Partitions whose window ended more than this many days ago are dropped.
    pub retention_days: u32,
    /// Oldest partitions are dropped while the store is larger (GiB).
    pub max_size_gb: f64,
    /// How often the background thread commits (ms).
    pub commit_interval_ms: u64,
    /// Commit sooner when this many records wait in memory.
    pub commit_max_records: u64,
    /// Width of one partition (hours, at least 1).
    pub partition_hours: u32,
    /// How far around a query's range a search reads (hours).
    pub lookback_hours: u32,
    /// Most documents one search collects (bounds its memory).
    pub max_collected_docs: usize,
    /// WAL segment size before rotation (bytes).
    pub wal_segment_bytes: u64,
    /// Indexing heap of each partition's writer (bytes).
    pub writer_heap_bytes: usize,
}

impl StoreOptions {
    /// The production defaults for a store at `path`.
    pub fn at(path: impl Into<PathBuf>) -> StoreOptions {
        StoreOptions {
            path: path.into(),
            ..StoreOptions::default()
        }
    }
}

impl Default for StoreOptions {
    /// Production defaults; `path` is empty (set it, or use [`StoreOptions::at`]).
    fn default() -> Self {
        StoreOptions {
            path: PathBuf::new(),
            retention_days: 14,
            max_size_gb: 50.0,
            commit_interval_ms: 10_000,
            commit_max_records: 300_000,
            partition_hours: 1,
            lookback_hours: 3,
            max_collected_docs: 200_000,
            wal_segment_bytes: 64 << 20,
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

impl TantivyStore {
    /// Open (or create) the store under `opts.path`, replaying the WAL
    /// tail into the index, and start its commit/retention thread.
    pub fn open(opts: StoreOptions) -> Result<TantivyStore, StoreError> {
        let root = opts.path.clone();
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
        let bg_root = inner.root.clone();
        let bg = std::thread::Builder::new()
            .name("ctw-store-commit".into())
            .spawn(move || bg_inner.background())
            .map_err(|e| io_err(&bg_root, e))?;
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

    /// Commit now (records become searchable); the background thread does
    /// this every `commit_interval_ms`.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.inner.commit(true)
    }
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
            if inner.fresh_records() >= inner.opts.commit_max_records {
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

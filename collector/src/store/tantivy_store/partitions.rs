//! Time partitions: one tantivy index per `partition_hours` window of
//! event time, named `p-YYYYMMDDHH` by the window start (UTC); opening,
//! naming and listing them.

use super::*;

pub(super) fn partition_name(start_ns: u64) -> String {
    let secs = (start_ns / 1_000_000_000) as i64;
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => format!("p-{}", t.format("%Y%m%d%H")),
        None => format!("p-ns{start_ns}"),
    }
}

pub(super) fn parse_partition_name(name: &str) -> Option<u64> {
    let s = name.strip_prefix("p-")?;
    if let Some(ns) = s.strip_prefix("ns") {
        return ns.parse().ok();
    }
    let t = chrono::NaiveDateTime::parse_from_str(&format!("{s}00"), "%Y%m%d%H%M").ok()?;
    u64::try_from(t.and_utc().timestamp())
        .ok()
        .map(|s| s * 1_000_000_000)
}

pub(super) fn open_partition_at(
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

impl Inner {
    /// The partitions now, oldest first (a snapshot: no lock is held after).
    pub(super) fn all_partitions(&self) -> Result<Vec<Arc<Partition>>, StoreError> {
        let parts = self.parts.read().map_err(|_| poisoned())?;
        Ok(parts.values().cloned().collect())
    }

    pub(super) fn width_ns(&self) -> u64 {
        self.opts.partition_hours.max(1) as u64 * NS_PER_HOUR
    }

    pub(super) fn partition_start(&self, event_ns: u64) -> u64 {
        event_ns - event_ns % self.width_ns()
    }

    pub(super) fn open_partition(&self, start_ns: u64) -> Result<Arc<Partition>, StoreError> {
        open_partition_at(&self.root, self.fields, start_ns)
    }

    /// The partition for `start_ns`, created when needed.
    pub(super) fn partition(&self, start_ns: u64) -> Result<Arc<Partition>, StoreError> {
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
}

impl TantivyStore {
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

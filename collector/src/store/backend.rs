//! [`open`]: the store that `storage.backend` names, as one
//! `Arc<dyn RecordStore>`.

use std::sync::Arc;

use super::clickhouse::ClickHouseOptions;
use super::clickhouse::ClickHouseStore;
use super::tantivy_store::StoreOptions;
use super::tantivy_store::TantivyStore;
use super::{
    AppendOutcome, Gap, RecordStore, SearchQuery, SearchResult, StoreError, StoreStats, StoredBatch,
};

/// Which store to open, with its own options (built from the app's
/// `storage` section by `config::Storage::backend`).
#[derive(Debug, Clone)]
pub enum Backend {
    Tantivy(StoreOptions),
    ClickHouse(ClickHouseOptions),
}

/// Open the configured store: the tantivy index in `storage.path`, or the
/// ClickHouse database of `storage.url` (returned not
/// [`ready`](RecordStore::ready) while the server cannot be reached).
///
/// Errors: those of [`TantivyStore::open`] and [`ClickHouseStore::open`]
/// (a database of another schema version is refused).
pub fn open(backend: Backend) -> Result<Arc<dyn RecordStore>, StoreError> {
    Ok(match backend {
        Backend::Tantivy(o) => Arc::new(Tantivy(TantivyStore::open(o)?)),
        Backend::ClickHouse(o) => Arc::new(ClickHouseStore::open(&o)?),
    })
}

/// The tantivy store with [`RecordStore::close`] calling its own `close`
/// (commit, stop the background thread).
struct Tantivy(TantivyStore);

impl RecordStore for Tantivy {
    fn append(&self, batch: StoredBatch) -> Result<AppendOutcome, StoreError> {
        self.0.append(batch)
    }
    fn record_gap(&self, gap: Gap) -> Result<(), StoreError> {
        self.0.record_gap(gap)
    }
    fn search(&self, q: &SearchQuery) -> Result<SearchResult, StoreError> {
        self.0.search(q)
    }
    fn stats(&self) -> StoreStats {
        self.0.stats()
    }
    fn close(&self) {
        self.0.close()
    }
}

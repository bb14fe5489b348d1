//! Test hooks: crash simulation, segment counts, forced merges, retention
//! at a chosen time and the last search's stats. Compiled only for the
//! crate's own tests and with the `test-hooks` feature, which the
//! collector's dev-dependency on itself enables for its integration tests,
//! examples and benchmarks: they are not part of the store's API.

use super::*;

impl TantivyStore {
    /// Simulate a crash: stop without committing the index or writing a
    /// checkpoint. Only what `append` acknowledged (the WAL) survives.
    pub fn crash(self) {
        self.shutdown(false);
    }

    /// Simulate a crash after every partition committed but before the
    /// checkpoint was written.
    pub fn crash_after_index_commit(self) -> Result<(), StoreError> {
        self.inner.commit(false)?;
        self.shutdown(false);
        Ok(())
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

    /// What the last search did.
    pub fn last_search_stats(&self) -> SearchStats {
        self.inner
            .last_search
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

//! Retention: partitions past `retention_days` are dropped, then the
//! oldest while the store is larger than `max_size_gb` (never the newest).

use super::*;

pub(super) fn dir_size(path: &Path) -> u64 {
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

impl Inner {
    pub(super) fn enforce_retention(&self, now: u64) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(self.opts.retention_days as u64 * NS_PER_DAY);
        let width = self.width_ns();
        let max_bytes = (self.opts.max_size_gb * (1u64 << 30) as f64) as u64;
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

    pub(super) fn drop_partition(&self, p: &Arc<Partition>) -> Result<(), StoreError> {
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
}

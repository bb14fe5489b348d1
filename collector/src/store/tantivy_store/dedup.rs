//! Which `(node, boot_id, seq)` are stored, and the checkpoint file that
//! persists it together with the write-ahead-log position it covers.
//!
//! Per (node, boot) the stored seqs are a set of disjoint ranges: in-order
//! delivery keeps one range (a contiguous high-water mark), out-of-order or
//! missing batches add a few more above it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::super::StoreError;
use super::wal::io_err;

/// Set of u64 as disjoint half-open ranges `start -> end`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct SeqSet {
    ranges: BTreeMap<u64, u64>,
}

impl SeqSet {
    pub(super) fn contains(&self, s: u64) -> bool {
        self.ranges
            .range(..=s)
            .next_back()
            .is_some_and(|(_, &end)| s < end)
    }

    /// Insert `s`; false when it was already there.
    pub(super) fn insert(&mut self, s: u64) -> bool {
        if self.contains(s) {
            return false;
        }
        let mut start = s;
        let mut end = s.saturating_add(1);
        if let Some((&a, &e)) = self.ranges.range(..s).next_back() {
            if e == s {
                start = a;
            }
        }
        if let Some(e2) = self.ranges.remove(&end) {
            end = e2;
        }
        self.ranges.insert(start, end);
        true
    }

    #[cfg(test)]
    pub(super) fn num_ranges(&self) -> usize {
        self.ranges.len()
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct BootSeqs {
    pub(super) seqs: SeqSet,
    /// Wall clock of the last stored batch, for pruning old boots.
    pub(super) last_seen_ns: u64,
}

pub(super) type Dedup = HashMap<(String, String), BootSeqs>;

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    wal_pos: u64,
    boots: Vec<BootEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct BootEntry {
    node: String,
    boot_id: String,
    last_seen_ns: u64,
    ranges: Vec<(u64, u64)>,
}

/// Write the checkpoint atomically (temp file, fsync, rename, fsync dir).
pub(super) fn write_checkpoint(root: &Path, wal_pos: u64, dedup: &Dedup) -> Result<(), StoreError> {
    let file = CheckpointFile {
        version: 1,
        wal_pos,
        boots: dedup
            .iter()
            .map(|((node, boot_id), b)| BootEntry {
                node: node.clone(),
                boot_id: boot_id.clone(),
                last_seen_ns: b.last_seen_ns,
                ranges: b.seqs.ranges.iter().map(|(&a, &e)| (a, e)).collect(),
            })
            .collect(),
    };
    let tmp = root.join("checkpoint.json.tmp");
    let path = root.join("checkpoint.json");
    let bytes = serde_json::to_vec(&file).map_err(|e| StoreError::Index(e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    std::fs::File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(root, e))
}

/// Read the checkpoint: the covered WAL position and the dedup state there.
pub(super) fn read_checkpoint(root: &Path) -> Result<(u64, Dedup), StoreError> {
    let path = root.join("checkpoint.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Dedup::new())),
        Err(e) => return Err(io_err(&path, e)),
    };
    let file: CheckpointFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut dedup = Dedup::new();
    for b in file.boots {
        let mut seqs = SeqSet::default();
        for (a, e) in b.ranges {
            if a < e {
                seqs.ranges.insert(a, e);
            }
        }
        dedup.insert(
            (b.node, b.boot_id),
            BootSeqs {
                seqs,
                last_seen_ns: b.last_seen_ns,
            },
        );
    }
    Ok((file.wal_pos, dedup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqset_merges_ranges_and_is_idempotent() {
        let mut s = SeqSet::default();
        for x in [1u64, 2, 3, 7, 5, 6, 4] {
            assert!(s.insert(x));
            assert!(!s.insert(x));
        }
        assert_eq!(s.num_ranges(), 1);
        assert!(s.contains(1) && s.contains(7) && !s.contains(0) && !s.contains(8));
        assert!(s.insert(10));
        assert_eq!(s.num_ranges(), 2);
        assert!(!s.contains(9));
    }
}

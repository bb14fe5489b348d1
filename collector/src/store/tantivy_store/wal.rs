//! Write-ahead log: append-only segment files of length-prefixed, CRC-32
//! checked entries, fsynced with group commit.
//!
//! A position is a global byte offset across segments; a segment file is named
//! by the position of its first byte (`00000000000000000000.wal`). An entry is
//! `len: u32 LE | crc32(payload): u32 LE | payload`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::super::StoreError;

const HEADER: usize = 8;
/// Largest entry accepted on replay; a larger length is corruption.
const MAX_ENTRY: usize = 256 << 20;

pub(super) fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn poisoned() -> StoreError {
    StoreError::Index("write-ahead log lock poisoned".into())
}

/// CRC-32 (IEEE): `crc32fast` uses the CPU's carry-less multiply where it
/// can (the table-driven loop it replaced cost 3% of the collector's ingest
/// CPU).
pub(super) fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[derive(Debug)]
struct Writer {
    file: Arc<File>,
    seg_start: u64,
    /// Global position of the end of the last written entry.
    pos: u64,
    /// Starts of every segment on disk, ascending (the last is `seg_start`).
    segments: Vec<u64>,
    /// Set when a failed write could not be undone: no more appends.
    failed: Option<String>,
}

#[derive(Debug, Default)]
struct SyncState {
    synced: u64,
    syncing: bool,
}

#[derive(Debug)]
pub(super) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    sync: Mutex<SyncState>,
    synced_cv: Condvar,
}

fn seg_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.wal"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

impl Wal {
    /// Open the log in `dir`, calling `apply(end_position, payload)` for every
    /// entry that ends after `from`. A torn last entry of the last segment
    /// is cut off with a warning; any other damage is `StoreError::Corrupt`.
    /// New entries are written at or after `min_next` (the position a
    /// checkpoint or a commit already covers).
    pub(super) fn open(
        dir: &Path,
        from: u64,
        min_next: u64,
        segment_bytes: u64,
        mut apply: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<Wal, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut segments = list_segments(dir)?;
        let mut end = 0u64;
        let n = segments.len();
        for (i, &start) in segments.iter().enumerate() {
            let last = i + 1 == n;
            let next_start = segments.get(i + 1).copied();
            if next_start.is_some_and(|s| s <= from) {
                continue; // fully covered, deleted later
            }
            let path = seg_path(dir, start);
            let mut data = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(|e| io_err(&path, e))?;
            let valid = scan(&path, &data, start, from, last, &mut apply)?;
            if valid < data.len() {
                tracing::warn!(
                    path = %path.display(),
                    valid_bytes = valid,
                    garbage_bytes = data.len() - valid,
                    "write-ahead log ends with a torn entry; cutting it off"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                f.set_len(valid as u64).map_err(|e| io_err(&path, e))?;
                f.sync_all().map_err(|e| io_err(&path, e))?;
            }
            end = start + valid as u64;
        }
        // Continue the last segment, or start a new one where the covered
        // position says (never write below a position a commit covers).
        let (file, seg_start, pos) = match segments.last() {
            Some(&s) if end >= min_next && end >= s => {
                let path = seg_path(dir, s);
                let f = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                (f, s, end)
            }
            _ => {
                let start = end.max(min_next);
                let path = seg_path(dir, start);
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                f.set_len(0).map_err(|e| io_err(&path, e))?;
                sync_dir(dir)?;
                segments.retain(|&x| x < start);
                segments.push(start);
                (f, start, start)
            }
        };
        Ok(Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            writer: Mutex::new(Writer {
                file: Arc::new(file),
                seg_start,
                pos,
                segments,
                failed: None,
            }),
            sync: Mutex::new(SyncState {
                synced: pos,
                syncing: false,
            }),
            synced_cv: Condvar::new(),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Writer>, StoreError> {
        self.writer.lock().map_err(|_| poisoned())
    }

    /// Write one entry (not yet durable: see [`Wal::sync_to`]); returns the
    /// position of its end.
    pub(super) fn write(&self, payload: &[u8]) -> Result<u64, StoreError> {
        let mut w = self.lock()?;
        if let Some(m) = &w.failed {
            return Err(StoreError::Index(format!("write-ahead log unusable: {m}")));
        }
        if w.pos - w.seg_start >= self.segment_bytes {
            self.rotate(&mut w)?;
        }
        let mut buf = Vec::with_capacity(HEADER + payload.len());
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        let path = seg_path(&self.dir, w.seg_start);
        if let Err(e) = (&*w.file).write_all(&buf) {
            // Undo a partial write so later entries do not follow garbage.
            let len = w.pos - w.seg_start;
            if let Err(e2) = w.file.set_len(len) {
                w.failed = Some(format!("{e}; truncating back failed: {e2}"));
            }
            return Err(io_err(&path, e));
        }
        w.pos += buf.len() as u64;
        Ok(w.pos)
    }

    fn rotate(&self, w: &mut Writer) -> Result<(), StoreError> {
        let old = seg_path(&self.dir, w.seg_start);
        w.file.sync_data().map_err(|e| io_err(&old, e))?;
        let path = seg_path(&self.dir, w.pos);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        sync_dir(&self.dir)?;
        w.file = Arc::new(f);
        w.seg_start = w.pos;
        w.segments.push(w.pos);
        Ok(())
    }

    /// Position of the end of the last written entry.
    pub(super) fn written(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.pos)
    }

    /// Make everything up to `pos` durable. Concurrent callers share one
    /// fsync: one of them syncs, the others wait for it.
    pub(super) fn sync_to(&self, pos: u64) -> Result<(), StoreError> {
        let mut s = self.sync.lock().map_err(|_| poisoned())?;
        loop {
            if s.synced >= pos {
                return Ok(());
            }
            if s.syncing {
                s = self.synced_cv.wait(s).map_err(|_| poisoned())?;
                continue;
            }
            s.syncing = true;
            drop(s);
            let res = self.lock().map(|w| (w.file.clone(), w.pos, w.seg_start));
            let res = res.and_then(|(file, target, seg)| {
                file.sync_data()
                    .map(|()| target)
                    .map_err(|e| io_err(&seg_path(&self.dir, seg), e))
            });
            s = self.sync.lock().map_err(|_| poisoned())?;
            s.syncing = false;
            self.synced_cv.notify_all();
            s.synced = s.synced.max(res?);
        }
    }

    /// Delete every segment whose entries all end at or before `pos`.
    pub(super) fn remove_covered(&self, pos: u64) -> Result<usize, StoreError> {
        let mut w = self.lock()?;
        let mut removed = 0;
        while w.segments.len() > 1 && w.segments[1] <= pos {
            let start = w.segments.remove(0);
            let path = seg_path(&self.dir, start);
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        }
        Ok(removed)
    }
}

/// Walk the entries of one segment; returns the length of its valid prefix.
fn scan(
    path: &Path,
    data: &[u8],
    seg_start: u64,
    from: u64,
    last_segment: bool,
    apply: &mut impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
) -> Result<usize, StoreError> {
    let corrupt = |off: usize, m: &str| StoreError::Corrupt {
        path: path.display().to_string(),
        message: format!("{m} at byte {off}"),
    };
    let mut off = 0usize;
    while off < data.len() {
        let rest = &data[off..];
        let torn_tail_ok = last_segment;
        if rest.len() < HEADER {
            return if torn_tail_ok {
                Ok(off)
            } else {
                Err(corrupt(off, "truncated entry header"))
            };
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 && rest.iter().all(|&b| b == 0) && torn_tail_ok {
            return Ok(off); // zero-filled tail after a crash
        }
        if len > MAX_ENTRY {
            return if torn_tail_ok && looks_like_tail(rest) {
                Ok(off)
            } else {
                Err(corrupt(off, &format!("entry length {len} too large")))
            };
        }
        if HEADER + len > rest.len() {
            return if torn_tail_ok {
                Ok(off)
            } else {
                Err(corrupt(off, "truncated entry"))
            };
        }
        let payload = &rest[HEADER..HEADER + len];
        if crc32(payload) != crc {
            // A bad checksum on the very last entry is a torn write; earlier
            // it means the log is damaged.
            return if torn_tail_ok && HEADER + len == rest.len() {
                Ok(off)
            } else {
                Err(corrupt(off, "checksum mismatch"))
            };
        }
        off += HEADER + len;
        let end = seg_start + off as u64;
        if end > from {
            apply(end, payload)?;
        }
    }
    Ok(off)
}

/// A huge length at the end of the file is a torn header when nothing after
/// it parses as an entry; treat it as a tail only if it is short.
fn looks_like_tail(rest: &[u8]) -> bool {
    rest.len() < 4096
}

#[cfg(test)]
mod tests {
    /// The entry checksum is the standard CRC-32 (IEEE) check value, as the
    /// WAL written by earlier versions expects.
    #[test]
    fn crc32_is_ieee() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(super::crc32(b""), 0);
    }
}

//! The on-disk spool: one file per unacknowledged record batch, plus the
//! pending loss reports, in `collector.spool_dir`.
//!
//! A batch file is `<index>.batch`, `index` a zero-padded 20-digit number
//! that grows with every batch the agent ever made (it continues across
//! restarts), so the file names sort in the order the batches were made.
//! Its layout (integers little endian):
//!
//! ```text
//! 0   magic "CTWB"
//! 4   version (1), boot id length (u8), 2 zero bytes
//! 8   records u32, seq u64, from_ns u64, to_ns u64
//! 36  payload length u32
//! 40  CRC-32 of bytes 0..40, the boot id and the payload
//! 44  boot id (UTF-8), then the payload: a prost-encoded pb::RecordBatch
//! ```
//!
//! Files are written to `<index>.tmp` and renamed, so a crash leaves either
//! a whole file or a `.tmp` that the next start deletes; the CRC catches a
//! torn or damaged file when it is read back. Files are not fsynced: the
//! spool survives an agent restart or crash, not a power loss of the node.
//!
//! `losses` holds the loss reports not yet confirmed by the collector
//! (magic "CTWL", version, payload length, CRC-32, then length-delimited
//! pb::LossReport messages). `.lock` is held with `flock` while an agent
//! uses the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ctw_proto::pb;
use prost::Message;

const BATCH_MAGIC: &[u8; 4] = b"CTWB";
const LOSS_MAGIC: &[u8; 4] = b"CTWL";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 44;
const LOSS_HEADER_LEN: usize = 16;
const BATCH_SUFFIX: &str = ".batch";
const TMP_SUFFIX: &str = ".tmp";
const LOSSES_FILE: &str = "losses";
const LOCK_FILE: &str = ".lock";

/// What the agent knows about a batch without reading its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMeta {
    pub boot_id: Arc<str>,
    pub seq: u64,
    pub records: u32,
    /// Smallest and largest `event_ns` of the batch's records.
    pub from_ns: u64,
    pub to_ns: u64,
}

/// A batch file found when the spool was opened.
#[derive(Debug)]
pub struct SpooledBatch {
    pub index: u64,
    pub meta: BatchMeta,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("spool directory {0} is in use by another agent")]
    Locked(PathBuf),
}

/// The spool directory, its size bound and the bytes its batch files use.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    bytes: u64,
    _lock: File,
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut c = flate2::Crc::new();
    for p in parts {
        c.update(p);
    }
    c.sum()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Size of the file that holds a batch with this boot id and payload.
pub fn file_size(boot_id: &str, payload_len: usize) -> u64 {
    (HEADER_LEN + boot_id.len() + payload_len) as u64
}

fn header(meta: &BatchMeta, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(BATCH_MAGIC);
    h[4] = VERSION;
    h[5] = meta.boot_id.len() as u8;
    h[8..12].copy_from_slice(&meta.records.to_le_bytes());
    h[12..20].copy_from_slice(&meta.seq.to_le_bytes());
    h[20..28].copy_from_slice(&meta.from_ns.to_le_bytes());
    h[28..36].copy_from_slice(&meta.to_ns.to_le_bytes());
    h[36..40].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let sum = crc(&[&h[..40], meta.boot_id.as_bytes(), payload]);
    h[40..44].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Parses a header and the boot id after it; `file_len` must match.
fn parse_header(b: &[u8], file_len: u64) -> Result<(BatchMeta, usize), String> {
    if b.len() < HEADER_LEN || &b[0..4] != BATCH_MAGIC {
        return Err("not a spool batch file".into());
    }
    if b[4] != VERSION {
        return Err(format!("unknown version {}", b[4]));
    }
    let boot_len = usize::from(b[5]);
    let payload_len = u32_at(b, 36) as usize;
    if file_len != (HEADER_LEN + boot_len + payload_len) as u64 {
        return Err(format!(
            "length {file_len} does not match the header ({} bytes expected)",
            HEADER_LEN + boot_len + payload_len
        ));
    }
    if b.len() < HEADER_LEN + boot_len {
        return Err("truncated header".into());
    }
    let boot_id = std::str::from_utf8(&b[HEADER_LEN..HEADER_LEN + boot_len])
        .map_err(|_| "boot id is not UTF-8".to_string())?;
    Ok((
        BatchMeta {
            boot_id: boot_id.into(),
            seq: u64_at(b, 12),
            records: u32_at(b, 8),
            from_ns: u64_at(b, 20),
            to_ns: u64_at(b, 28),
        },
        payload_len,
    ))
}

fn batch_name(index: u64) -> String {
    format!("{index:020}{BATCH_SUFFIX}")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `parts` to `path` through a temporary file and a rename.
fn write_atomic(dir: &Path, tmp_name: &str, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let tmp = dir.join(tmp_name);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        drop(f);
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

impl Spool {
    /// Opens (creating it if needed) and locks the spool directory, deletes
    /// leftover temporary files and unreadable batch files, and returns the
    /// batches found, oldest first. `removed` gets the paths and reasons of
    /// the files deleted as unreadable.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        removed: &mut Vec<String>,
    ) -> Result<(Spool, Vec<SpooledBatch>), SpoolError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(SpoolError::Locked(dir.to_path_buf()));
            }
            return Err(io_err(&lock_path)(e));
        }
        let mut found = Vec::new();
        for ent in fs::read_dir(dir).map_err(io_err(dir))? {
            let ent = ent.map_err(io_err(dir))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = ent.path();
            if name.ends_with(TMP_SUFFIX) {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(index) = name
                .strip_suffix(BATCH_SUFFIX)
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            match Self::read_meta(&path) {
                Ok((meta, size)) => found.push(SpooledBatch { index, meta, size }),
                Err(reason) => {
                    let _ = fs::remove_file(&path);
                    removed.push(format!("{}: {reason}", path.display()));
                }
            }
        }
        found.sort_by_key(|b| b.index);
        let bytes = found.iter().map(|b| b.size).sum();
        Ok((
            Spool {
                dir: dir.to_path_buf(),
                max_bytes,
                bytes,
                _lock: lock,
            },
            found,
        ))
    }

    fn read_meta(path: &Path) -> Result<(BatchMeta, u64), String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        let mut b = Vec::with_capacity(HEADER_LEN + 64);
        Read::by_ref(&mut f)
            .take((HEADER_LEN + 255) as u64)
            .read_to_end(&mut b)
            .map_err(|e| e.to_string())?;
        let (meta, _) = parse_header(&b, len)?;
        Ok((meta, len))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of batch files in the spool.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Writes a batch file; returns its size. The caller has made room.
    pub fn write(
        &mut self,
        index: u64,
        meta: &BatchMeta,
        payload: &[u8],
    ) -> Result<u64, SpoolError> {
        let h = header(meta, payload);
        let path = self.dir.join(batch_name(index));
        write_atomic(
            &self.dir,
            &format!("{index:020}{TMP_SUFFIX}"),
            &path,
            &[&h, meta.boot_id.as_bytes(), payload],
        )
        .map_err(io_err(&path))?;
        let size = file_size(&meta.boot_id, payload.len());
        self.bytes += size;
        Ok(size)
    }

    /// Reads a batch file back and checks it; returns the payload.
    pub fn read(&self, index: u64) -> Result<Vec<u8>, SpoolError> {
        let path = self.dir.join(batch_name(index));
        let b = fs::read(&path).map_err(io_err(&path))?;
        let corrupt = |reason: String| SpoolError::Corrupt {
            path: path.clone(),
            reason,
        };
        let (meta, payload_len) = parse_header(&b, b.len() as u64).map_err(corrupt)?;
        let start = HEADER_LEN + meta.boot_id.len();
        let payload = &b[start..start + payload_len];
        if crc(&[&b[..40], meta.boot_id.as_bytes(), payload]) != u32_at(&b, 40) {
            return Err(corrupt("checksum mismatch".into()));
        }
        Ok(payload.to_vec())
    }

    /// Deletes a batch file of `size` bytes.
    pub fn remove(&mut self, index: u64, size: u64) {
        let path = self.dir.join(batch_name(index));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a spool file")
            }
        }
        self.bytes = self.bytes.saturating_sub(size);
    }

    /// The loss reports saved by [`Spool::store_losses`]; empty when there
    /// are none or the file is damaged (then the error says why).
    pub fn load_losses(&self) -> (Vec<pb::LossReport>, Option<String>) {
        let path = self.dir.join(LOSSES_FILE);
        let b = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (Vec::new(), None),
            Err(e) => return (Vec::new(), Some(format!("{}: {e}", path.display()))),
        };
        let bad = |why: &str| (Vec::new(), Some(format!("{}: {why}", path.display())));
        if b.len() < LOSS_HEADER_LEN || &b[0..4] != LOSS_MAGIC || b[4] != VERSION {
            return bad("not a loss report file");
        }
        let len = u32_at(&b, 8) as usize;
        if b.len() != LOSS_HEADER_LEN + len {
            return bad("truncated");
        }
        let payload = &b[LOSS_HEADER_LEN..];
        if crc(&[&b[..12], payload]) != u32_at(&b, 12) {
            return bad("checksum mismatch");
        }
        let mut out = Vec::new();
        let mut buf = payload;
        while !buf.is_empty() {
            match pb::LossReport::decode_length_delimited(&mut buf) {
                Ok(r) => out.push(r),
                Err(e) => return bad(&e.to_string()),
            }
        }
        (out, None)
    }

    /// Replaces the saved loss reports (deletes the file when there are none).
    pub fn store_losses(&self, reports: &[pb::LossReport]) -> Result<(), SpoolError> {
        let path = self.dir.join(LOSSES_FILE);
        if reports.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
                _ => Ok(()),
            };
        }
        let mut payload = Vec::new();
        for r in reports {
            // Encoding into a Vec only fails when it runs out of capacity.
            let _ = r.encode_length_delimited(&mut payload);
        }
        let mut h = [0u8; LOSS_HEADER_LEN];
        h[0..4].copy_from_slice(LOSS_MAGIC);
        h[4] = VERSION;
        h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let sum = crc(&[&h[..12], &payload]);
        h[12..16].copy_from_slice(&sum.to_le_bytes());
        write_atomic(&self.dir, "losses.tmp", &path, &[&h, &payload]).map_err(io_err(&path))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ctw-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn meta(seq: u64) -> BatchMeta {
        BatchMeta {
            boot_id: "8f0c3c55-2d47-4b9e-9d59-6b1f5c0f6a11".into(),
            seq,
            records: 3,
            from_ns: 10 * seq,
            to_ns: 10 * seq + 5,
        }
    }

    #[test]
    fn batches_round_trip_and_survive_reopen_in_order() {
        let d = tmpdir("roundtrip");
        let mut removed = Vec::new();
        let (mut s, found) = Spool::open(&d, 1 << 20, &mut removed).unwrap();
        assert!(found.is_empty());
        let mut total = 0;
        for i in [3u64, 1, 12, 2] {
            total += s
                .write(i, &meta(i), &vec![i as u8; 100 + i as usize])
                .unwrap();
        }
        assert_eq!(s.bytes(), total);
        assert_eq!(total, 4 * file_size(&meta(1).boot_id, 100) + 1 + 2 + 3 + 12);
        assert_eq!(s.read(12).unwrap(), vec![12u8; 112]);
        s.remove(2, file_size(&meta(2).boot_id, 102));
        // A second agent cannot use the directory at the same time.
        assert!(matches!(
            Spool::open(&d, 1 << 20, &mut removed),
            Err(SpoolError::Locked(_))
        ));
        drop(s);
        fs::write(d.join("00000000000000000007.tmp"), b"half").unwrap();
        let (s, found) = Spool::open(&d, 1 << 20, &mut removed).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        assert_eq!(
            found.iter().map(|b| b.index).collect::<Vec<_>>(),
            vec![1, 3, 12]
        );
        assert_eq!(found[1].meta, meta(3));
        assert_eq!(s.bytes(), found.iter().map(|b| b.size).sum::<u64>());
        assert!(!d.join("00000000000000000007.tmp").exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn damaged_files_are_detected() {
        let d = tmpdir("damaged");
        let mut removed = Vec::new();
        let (mut s, _) = Spool::open(&d, 1 << 20, &mut removed).unwrap();
        s.write(1, &meta(1), &[7u8; 64]).unwrap();
        s.write(2, &meta(2), &[7u8; 64]).unwrap();
        // Flip a payload byte: the header still parses, the CRC does not match.
        let p1 = d.join(batch_name(1));
        let mut b = fs::read(&p1).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0xff;
        fs::write(&p1, &b).unwrap();
        assert!(matches!(s.read(1), Err(SpoolError::Corrupt { .. })));
        // Truncate the other: it is removed when the spool is opened.
        let p2 = d.join(batch_name(2));
        let b = fs::read(&p2).unwrap();
        fs::write(&p2, &b[..50]).unwrap();
        drop(s);
        let (_s, found) = Spool::open(&d, 1 << 20, &mut removed).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(!p2.exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn loss_reports_round_trip() {
        let d = tmpdir("losses");
        let mut removed = Vec::new();
        let (s, _) = Spool::open(&d, 1 << 20, &mut removed).unwrap();
        assert_eq!(s.load_losses(), (Vec::new(), None));
        let reports = vec![
            pb::LossReport {
                boot_id: "a".into(),
                reason: "kernel_drop".into(),
                from_ns: 1,
                to_ns: 2,
                count: 3,
                resynced: true,
            },
            pb::LossReport {
                boot_id: "b".into(),
                reason: "spool_overflow".into(),
                from_ns: 4,
                to_ns: 5,
                count: 6,
                resynced: false,
            },
        ];
        s.store_losses(&reports).unwrap();
        assert_eq!(s.load_losses(), (reports, None));
        s.store_losses(&[]).unwrap();
        assert!(!d.join(LOSSES_FILE).exists());
        fs::write(d.join(LOSSES_FILE), b"CTWL\x01garbage-garbage").unwrap();
        let (l, err) = s.load_losses();
        assert!(l.is_empty() && err.is_some());
        let _ = fs::remove_dir_all(&d);
    }
}

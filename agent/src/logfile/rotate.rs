//! The active log file and lumberjack-style rotation of it.
//!
//! When a line would push the active file past its size limit, the file is
//! renamed to `<stem>-<local time YYYY-MM-DDTHH-MM-SS.mmm><.ext>` next to it
//! and a new file is opened. A separate "mill" thread then gzips backups and
//! removes those beyond `max_backups` or older than `max_age_days`, the same
//! rules (and names) as the Go `lumberjack` package the seed tool used, so
//! existing cleanup scripts and Filebeat exclusions keep matching.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

use chrono::{DateTime, Local, NaiveDateTime, TimeDelta};
use flate2::write::GzEncoder;
use flate2::Compression;

/// Bytes buffered before a write(2); lines reach the file at the latest when
/// the writer's queue runs empty.
const BUF_CAP: usize = 64 * 1024;

/// `strftime` form of the timestamp in a backup name.
const BACKUP_TIME_FORMAT: &str = "%Y-%m-%dT%H-%M-%S%.3f";

/// Suffix of a gzip file being written; renamed to `.gz` once complete.
const TMP_SUFFIX: &str = ".tmp";

/// Opens `path` for appending, creating it if needed.
pub(super) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The file lines are appended to, with its own write buffer.
///
/// Unlike `BufWriter`, a failed write keeps the unwritten bytes for the next
/// attempt (so a full disk loses no buffered line once space returns) and the
/// buffer never grows past [`BUF_CAP`]: while the disk stays full, new lines
/// are refused instead.
pub(super) struct ActiveFile {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Size of the file once `buf` is written.
    size: u64,
}

impl std::fmt::Debug for ActiveFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveFile")
            .field("path", &self.path)
            .field("buffered", &self.buf.len())
            .field("size", &self.size)
            .finish()
    }
}

impl ActiveFile {
    pub(super) fn new(path: PathBuf, file: File) -> io::Result<ActiveFile> {
        let size = file.metadata()?.len();
        Ok(ActiveFile {
            path,
            file,
            buf: Vec::with_capacity(BUF_CAP),
            size,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Buffers `line`, writing the buffer out first when it is full. On error
    /// the line is not taken.
    pub(super) fn push(&mut self, line: &[u8]) -> io::Result<()> {
        if self.buf.len() + line.len() > BUF_CAP && !self.buf.is_empty() {
            let flushed = self.flush();
            if flushed.is_err() && self.buf.len() + line.len() > BUF_CAP {
                return flushed;
            }
        }
        self.buf.extend_from_slice(line);
        self.size += line.len() as u64;
        Ok(())
    }

    /// Whether bytes are waiting to be written.
    pub(super) fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes out the buffer. Bytes the kernel did not take stay buffered.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        let result = loop {
            if done == self.buf.len() {
                break Ok(());
            }
            match self.file.write(&self.buf[done..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..done);
        result
    }

    /// Renames the file to `backup` and opens a new one at the original path.
    ///
    /// Call [`flush`](Self::flush) first; bytes still buffered (because the
    /// flush failed) go to the new file. If the new file cannot be opened the
    /// rename is undone and writing continues in the old file. A file deleted
    /// behind our back is simply re-created.
    pub(super) fn rotate(&mut self, backup: &Path) -> io::Result<()> {
        match fs::rename(&self.path, backup) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match open_append(&self.path) {
            Ok(file) => {
                self.file = file;
                self.size = self.buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = fs::rename(backup, &self.path);
                Err(e)
            }
        }
    }
}

/// How backups of one log file are named: `<dir>/<stem>-<time><ext>[.gz]`.
#[derive(Debug, Clone)]
pub(super) struct BackupNames {
    pub(super) dir: PathBuf,
    /// File name before the extension, e.g. `nat`.
    stem: String,
    /// Extension with its dot, e.g. `.log`, or empty.
    ext: String,
}

impl BackupNames {
    /// Splits the active file's path. The name must be UTF-8 (checked by
    /// `LogConfig::validate`); anything else is decoded lossily.
    pub(super) fn new(path: &Path) -> BackupNames {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        BackupNames { dir, stem, ext }
    }

    pub(super) fn file_name(&self, time: NaiveDateTime) -> String {
        format!(
            "{}-{}{}",
            self.stem,
            time.format(BACKUP_TIME_FORMAT),
            self.ext
        )
    }

    /// A backup path for a rotation at `now` that sorts after `last` and does
    /// not exist yet (plain or gzipped), bumping the time by 1 ms as needed.
    pub(super) fn next_backup(
        &self,
        now: NaiveDateTime,
        last: Option<NaiveDateTime>,
    ) -> (PathBuf, NaiveDateTime) {
        let one_ms = TimeDelta::milliseconds(1);
        let mut time = truncate_to_ms(now);
        if let Some(last) = last {
            if time <= last {
                time = last + one_ms;
            }
        }
        loop {
            let path = self.dir.join(self.file_name(time));
            if !path.exists() && !gz_path(&path).exists() {
                return (path, time);
            }
            time += one_ms;
        }
    }

    /// The time in a backup's file name and whether it is gzipped, or `None`
    /// when `name` is not one of our backups.
    pub(super) fn parse(&self, name: &str) -> Option<(NaiveDateTime, bool)> {
        let rest = name.strip_prefix(&self.stem)?.strip_prefix('-')?;
        let (rest, gz) = match rest.strip_suffix(".gz") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let time = rest.strip_suffix(self.ext.as_str())?;
        let time = NaiveDateTime::parse_from_str(time, BACKUP_TIME_FORMAT).ok()?;
        Some((time, gz))
    }
}

fn truncate_to_ms(t: NaiveDateTime) -> NaiveDateTime {
    let ms = t.and_utc().timestamp_millis();
    DateTime::from_timestamp_millis(ms).map_or(t, |d| d.naive_utc())
}

fn gz_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".gz");
    PathBuf::from(s)
}

/// Retention and compression settings of the mill.
#[derive(Debug, Clone)]
pub(super) struct MillConfig {
    pub(super) names: BackupNames,
    /// 0 keeps every backup.
    pub(super) max_backups: u32,
    /// 0 keeps backups of any age.
    pub(super) max_age_days: u32,
    pub(super) compress: bool,
}

/// What one mill pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct MillReport {
    pub(super) removed: usize,
    pub(super) compressed: usize,
    pub(super) errors: usize,
}

#[derive(Debug)]
struct Backup {
    time: NaiveDateTime,
    plain: Option<PathBuf>,
    gz: Option<PathBuf>,
}

/// One pass over the backups: drop stale partial gzips, remove backups past
/// `max_backups` (oldest first) and older than `max_age_days`, then gzip the
/// remaining plain ones. Errors on single files are logged and counted; the
/// pass goes on.
pub(super) fn mill_once(cfg: &MillConfig, now: DateTime<Local>) -> io::Result<MillReport> {
    let mut report = MillReport::default();
    let mut backups: Vec<Backup> = Vec::new();
    for entry in fs::read_dir(&cfg.names.dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Only this thread compresses, so a temporary file here is left over
        // from a crash: remove it and compress the backup again.
        if let Some(partial) = name.strip_suffix(TMP_SUFFIX) {
            if cfg.names.parse(partial).is_some_and(|(_, gz)| gz) {
                remove(&entry.path(), &mut report);
            }
            continue;
        }
        let Some((time, gz)) = cfg.names.parse(name) else {
            continue;
        };
        let idx = match backups.iter().position(|b| b.time == time) {
            Some(i) => i,
            None => {
                backups.push(Backup {
                    time,
                    plain: None,
                    gz: None,
                });
                backups.len() - 1
            }
        };
        if gz {
            backups[idx].gz = Some(entry.path());
        } else {
            backups[idx].plain = Some(entry.path());
        }
    }
    backups.sort_by_key(|b| std::cmp::Reverse(b.time));

    let cutoff = (cfg.max_age_days > 0)
        .then(|| (now - TimeDelta::days(i64::from(cfg.max_age_days))).naive_local());
    for (i, b) in backups.iter().enumerate() {
        let too_many = cfg.max_backups > 0 && i >= cfg.max_backups as usize;
        let too_old = cutoff.is_some_and(|c| b.time < c);
        if too_many || too_old {
            for p in b.plain.iter().chain(b.gz.iter()) {
                if remove(p, &mut report) {
                    report.removed += 1;
                }
            }
            continue;
        }
        if !cfg.compress {
            continue;
        }
        if let Some(plain) = &b.plain {
            if b.gz.is_some() {
                // Compression finished but the original was not removed.
                remove(plain, &mut report);
            } else {
                match compress(plain) {
                    Ok(()) => report.compressed += 1,
                    Err(e) => {
                        report.errors += 1;
                        tracing::warn!(path = %plain.display(), error = %e, "cannot compress rotated log file");
                    }
                }
            }
        }
    }
    Ok(report)
}

/// Removes `path`; false (and a counted, logged error) when that failed.
fn remove(path: &Path, report: &mut MillReport) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            report.errors += 1;
            tracing::warn!(path = %path.display(), error = %e, "cannot remove old log file");
            false
        }
    }
}

/// Gzips `src` to `src.gz` (through `src.gz.tmp`, so a crash never leaves a
/// truncated `.gz`), keeping its permissions, then removes `src`.
pub(super) fn compress(src: &Path) -> io::Result<()> {
    let dst = gz_path(src);
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut input = File::open(src)?;
        let perms = input.metadata()?.permissions();
        let out = File::create(&tmp)?;
        out.set_permissions(perms)?;
        let mut enc = GzEncoder::new(io::BufWriter::new(out), Compression::default());
        io::copy(&mut input, &mut enc)?;
        let out = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
        out.sync_all()?;
        fs::rename(&tmp, &dst)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::remove_file(src)
}

/// The mill thread: runs [`mill_once`] whenever asked, one pass at a time,
/// so compressing a big backup never stalls the writer thread.
#[derive(Debug)]
pub(super) struct Mill {
    tx: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Mill {
    pub(super) fn spawn(cfg: MillConfig) -> io::Result<Mill> {
        // One pending request is enough: a pass sees the latest directory.
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("ctw-log-mill".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    if let Err(e) = mill_once(&cfg, Local::now()) {
                        tracing::warn!(dir = %cfg.names.dir.display(), error = %e, "cannot list rotated log files");
                    }
                }
            })?;
        Ok(Mill {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Asks for a pass; never blocks.
    pub(super) fn request(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(());
        }
    }

    /// Lets a requested pass finish and stops the thread.
    pub(super) fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Mill {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};

    fn names(dir: &Path) -> BackupNames {
        BackupNames::new(&dir.join("nat.log"))
    }

    fn t(h: u32, m: u32, s: u32, ms: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2024, 12, 9)
            .and_then(|d| d.and_hms_milli_opt(h, m, s, ms))
            .expect("valid time")
    }

    #[test]
    fn backup_names_round_trip() {
        let n = BackupNames::new(Path::new("/var/log/nat-tracker/nat.log"));
        assert_eq!(n.dir, Path::new("/var/log/nat-tracker"));
        assert_eq!(
            n.file_name(t(15, 5, 0, 123)),
            "nat-2024-12-09T15-05-00.123.log"
        );
        assert_eq!(
            n.parse("nat-2024-12-09T15-05-00.123.log"),
            Some((t(15, 5, 0, 123), false))
        );
        assert_eq!(
            n.parse("nat-2024-12-09T15-05-00.123.log.gz"),
            Some((t(15, 5, 0, 123), true))
        );
        assert_eq!(n.parse("nat.log"), None);
        assert_eq!(n.parse("nat-2024-12-09T15-05-00.123.txt"), None);
        assert_eq!(n.parse("other-2024-12-09T15-05-00.123.log"), None);
        assert_eq!(n.parse("nat-garbage.log"), None);

        let bare = BackupNames::new(Path::new("nat"));
        assert_eq!(bare.dir, Path::new("."));
        assert_eq!(bare.file_name(t(1, 2, 3, 4)), "nat-2024-12-09T01-02-03.004");
        assert_eq!(
            bare.parse("nat-2024-12-09T01-02-03.004"),
            Some((t(1, 2, 3, 4), false))
        );
    }

    #[test]
    fn next_backup_is_unique_and_increasing() {
        let dir = super::super::tests::TempDir::new("next-backup");
        let n = names(dir.path());
        let now = t(10, 0, 0, 5) + TimeDelta::microseconds(700);
        let (p1, t1) = n.next_backup(now, None);
        assert_eq!(t1, t(10, 0, 0, 5));
        fs::write(&p1, b"x").expect("write");
        let (_, t2) = n.next_backup(now, Some(t1));
        assert_eq!(t2, t(10, 0, 0, 6));
        // An existing .gz also blocks the name.
        fs::write(gz_path(&n.dir.join(n.file_name(t2))), b"x").expect("write");
        let (_, t3) = n.next_backup(now, None);
        assert_eq!(t3, t(10, 0, 0, 7));
    }

    #[test]
    fn mill_prunes_by_count_and_age_and_compresses() {
        let dir = super::super::tests::TempDir::new("mill");
        let n = names(dir.path());
        let now = Local
            .from_local_datetime(&t(12, 0, 0, 0))
            .earliest()
            .expect("local time");
        let day = TimeDelta::days(1);
        let times = [
            t(11, 0, 0, 0),
            t(10, 0, 0, 0),
            t(9, 0, 0, 0),
            t(8, 0, 0, 0) - day * 3,
            t(8, 0, 0, 0) - day * 10,
        ];
        for (i, time) in times.iter().enumerate() {
            fs::write(dir.path().join(n.file_name(*time)), format!("line {i}\n")).expect("write");
        }
        fs::write(dir.path().join("nat.log"), b"active\n").expect("write");
        fs::write(dir.path().join("unrelated.txt"), b"keep\n").expect("write");
        // A leftover partial gzip from a crash.
        fs::write(
            dir.path().join(format!("{}.gz.tmp", n.file_name(times[0]))),
            b"junk",
        )
        .expect("write");

        let cfg = MillConfig {
            names: n.clone(),
            max_backups: 3,
            max_age_days: 7,
            compress: true,
        };
        let report = mill_once(&cfg, now).expect("mill");
        assert_eq!(
            report,
            MillReport {
                removed: 2,
                compressed: 3,
                errors: 0
            }
        );
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .expect("read_dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        left.sort();
        let mut want = vec![
            format!("{}.gz", n.file_name(times[0])),
            format!("{}.gz", n.file_name(times[1])),
            format!("{}.gz", n.file_name(times[2])),
            "nat.log".to_string(),
            "unrelated.txt".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
        let newest = dir.path().join(format!("{}.gz", n.file_name(times[0])));
        assert_eq!(super::super::tests::read_gz(&newest), "line 0\n");

        // Age-only: the 3-day-old file goes with max_age_days = 2, count unlimited.
        for time in &times[3..] {
            fs::write(dir.path().join(n.file_name(*time)), b"x\n").expect("write");
        }
        let cfg = MillConfig {
            names: n,
            max_backups: 0,
            max_age_days: 2,
            compress: false,
        };
        let report = mill_once(&cfg, now).expect("mill");
        assert_eq!(
            report,
            MillReport {
                removed: 2,
                compressed: 0,
                errors: 0
            }
        );
    }

    #[test]
    fn active_file_keeps_unwritten_bytes() {
        let dir = super::super::tests::TempDir::new("active");
        let path = dir.path().join("nat.log");
        let file = open_append(&path).expect("open");
        let mut f = ActiveFile::new(path.clone(), file).expect("active");
        f.push(b"one\n").expect("push");
        assert!(f.has_pending());
        assert_eq!(f.size(), 4);
        f.flush().expect("flush");
        let backup = dir.path().join("nat-1.log");
        f.push(b"two\n").expect("push");
        f.rotate(&backup).expect("rotate");
        // The unflushed line goes to the new file.
        f.flush().expect("flush");
        assert_eq!(fs::read_to_string(&backup).expect("read"), "one\n");
        assert_eq!(fs::read_to_string(&path).expect("read"), "two\n");
        assert_eq!(f.size(), 4);
    }
}

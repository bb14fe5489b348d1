//! The JSON lines log file: the agent's record of every watched connection.
//!
//! Callers hand batches of [`ConnRecord`]s (and occasional `type:"log"`
//! lines) to a [`LogHandle`]; a dedicated thread started by
//! [`LogWriter::spawn`] formats them ([`format_record`]), appends them to the
//! file and rotates it like the seed tool did ([`rotate`]). The handle never
//! blocks: when the bounded queue is full, or the writer is gone, the records
//! are counted in [`LogStats::dropped_records`] and discarded.
//! [`tracing_layer`] copies the agent's own INFO-and-above events into the
//! same file.

mod format;
mod layer;
mod rotate;

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{Local, NaiveDateTime};
use ctw_common::{now_ns, ConnRecord};

pub use format::{format_log_line, format_record};
pub use layer::{tracing_layer, LogLayer};

use rotate::{ActiveFile, BackupNames, Mill, MillConfig};

/// Default path of the log file, the seed tool's.
pub const DEFAULT_PATH: &str = "/var/log/nat-tracker/nat.log";
pub const DEFAULT_MAX_SIZE_MB: u64 = 100;
pub const DEFAULT_MAX_BACKUPS: u32 = 10;
pub const DEFAULT_MAX_AGE_DAYS: u32 = 7;
pub const DEFAULT_COMPRESS: bool = true;
pub const DEFAULT_QUEUE_BATCHES: usize = 4096;

/// Largest accepted `max_size_mb` (1 TiB).
const MAX_SIZE_MB_LIMIT: u64 = 1 << 20;
/// Largest accepted `queue_batches`; the queue's slots are allocated up front.
const QUEUE_BATCHES_LIMIT: usize = 1 << 20;

/// Warnings about failed writes are printed at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// While writes fail, buffered lines are retried this often when idle.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long buffered lines may wait for more before they are written.
const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// A failed rotation is not tried again sooner than this.
const ROTATE_RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Backups are checked for age at least this often, even without rotation.
const MILL_INTERVAL: Duration = Duration::from_secs(3600);

/// The `log:` section of the config file, the seed tool's keys plus
/// `queue_batches`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The active log file; backups go next to it.
    pub path: PathBuf,
    /// Rotate when the file would grow past this many MiB.
    pub max_size_mb: u64,
    /// Keep at most this many backups; 0 keeps all.
    pub max_backups: u32,
    /// Remove backups older than this many days; 0 keeps all.
    pub max_age_days: u32,
    /// Gzip backups.
    pub compress: bool,
    /// Capacity of the writer queue, in batches.
    pub queue_batches: usize,
    /// Tests only: rotate at this many bytes instead of `max_size_mb`.
    #[doc(hidden)]
    #[serde(skip)]
    pub max_size_bytes_override: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            path: PathBuf::from(DEFAULT_PATH),
            max_size_mb: DEFAULT_MAX_SIZE_MB,
            max_backups: DEFAULT_MAX_BACKUPS,
            max_age_days: DEFAULT_MAX_AGE_DAYS,
            compress: DEFAULT_COMPRESS,
            queue_batches: DEFAULT_QUEUE_BATCHES,
            max_size_bytes_override: None,
        }
    }
}

impl LogConfig {
    /// Checks the values serde cannot; the message names the key and value.
    pub fn validate(&self) -> Result<(), String> {
        let path = self.path.display();
        if self.path.as_os_str().is_empty() {
            return Err("log.path: must not be empty".to_string());
        }
        match self.path.file_name() {
            None => return Err(format!("log.path: must name a file, got {path:?}")),
            Some(name) if name.to_str().is_none() => {
                return Err(format!("log.path: file name must be UTF-8, got {path:?}"))
            }
            Some(_) => {}
        }
        if self.max_size_mb < 1 {
            return Err(format!(
                "log.max_size_mb: must be at least 1, got {}",
                self.max_size_mb
            ));
        }
        if self.max_size_mb > MAX_SIZE_MB_LIMIT {
            return Err(format!(
                "log.max_size_mb: must be at most {MAX_SIZE_MB_LIMIT}, got {}",
                self.max_size_mb
            ));
        }
        if self.queue_batches < 1 || self.queue_batches > QUEUE_BATCHES_LIMIT {
            return Err(format!(
                "log.queue_batches: must be between 1 and {QUEUE_BATCHES_LIMIT}, got {}",
                self.queue_batches
            ));
        }
        Ok(())
    }

    /// The rotation threshold in bytes.
    #[doc(hidden)]
    pub fn max_size_bytes(&self) -> u64 {
        self.max_size_bytes_override
            .unwrap_or(self.max_size_mb.saturating_mul(1024 * 1024))
            .max(1)
    }
}

/// Errors starting or stopping the log writer.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log config: {0}")]
    Config(String),
    #[error("cannot create log directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open log file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start log writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot flush log file {path} at shutdown: {source}")]
    Flush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log writer thread panicked")]
    Panicked,
}

/// Counters of the log writer, read by the metrics endpoint and `/healthz`.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Conntrack records written (buffered for the file).
    pub written_records: AtomicU64,
    /// Lines written, conntrack and `type:"log"` alike.
    pub written_lines: AtomicU64,
    /// Records discarded because the queue was full or the writer gone.
    pub dropped_records: AtomicU64,
    /// `type:"log"` lines discarded for the same reasons.
    pub dropped_log_lines: AtomicU64,
    /// Failed writes, flushes and rotations; a line refused while the disk is
    /// full is lost and counted here, not in `written_*`.
    pub write_errors: AtomicU64,
    /// Successful rotations.
    pub rotations: AtomicU64,
    /// False while the last write failed (e.g. disk full); set once the file
    /// is open at start-up.
    pub healthy: AtomicBool,
}

/// A `type:"log"` line waiting in the queue.
#[derive(Debug)]
struct LogLine {
    ts_ns: u64,
    level: Cow<'static, str>,
    msg: String,
    fields: Vec<(Cow<'static, str>, serde_json::Value)>,
}

#[derive(Debug)]
enum Msg {
    Records(Vec<ConnRecord>),
    Log(Box<LogLine>),
    Shutdown,
    /// Tests: the writer reports that it got here, then waits for `release`.
    #[cfg(test)]
    Pause {
        entered: SyncSender<()>,
        release: Receiver<()>,
    },
}

/// The sending side of the log writer: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct LogHandle {
    tx: SyncSender<Msg>,
    stats: Arc<LogStats>,
    path: Arc<Path>,
    thread: Arc<Mutex<Option<JoinHandle<std::io::Result<()>>>>>,
}

impl LogHandle {
    /// Queues a batch for writing. If the queue is full or the writer has
    /// stopped, the records are counted as dropped and discarded.
    pub fn send_records(&self, batch: Vec<ConnRecord>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        if self.tx.try_send(Msg::Records(batch)).is_err() {
            self.stats.dropped_records.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Queues a `type:"log"` line stamped with the current time, e.g.
    /// `log("info", "program started", &[("ports", json!([80, 443]))])`.
    /// Never blocks; a line that does not fit is counted in
    /// [`LogStats::dropped_log_lines`].
    pub fn log(&self, level: &str, msg: &str, fields: &[(&str, serde_json::Value)]) {
        let fields = fields
            .iter()
            .map(|(k, v)| (Cow::Owned((*k).to_string()), v.clone()))
            .collect();
        self.send_log(format::level_name(level), msg.to_string(), fields);
    }

    fn send_log(
        &self,
        level: Cow<'static, str>,
        msg: String,
        fields: Vec<(Cow<'static, str>, serde_json::Value)>,
    ) {
        let line = LogLine {
            ts_ns: now_ns(),
            level,
            msg,
            fields,
        };
        if self.tx.try_send(Msg::Log(Box::new(line))).is_err() {
            self.stats.dropped_log_lines.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> &Arc<LogStats> {
        &self.stats
    }

    /// The active log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes everything queued so far, flushes, waits for a running
    /// compression pass and stops the writer thread. A failure (final flush,
    /// writer panic) is reported with `tracing::error!` and on stderr; use
    /// [`try_shutdown`](Self::try_shutdown) to handle it instead.
    pub fn shutdown(self) {
        if let Err(e) = self.try_shutdown() {
            // The log file itself may be what failed, so say it on stderr too.
            eprintln!("ctw-agent: {e}");
            tracing::error!(error = %e, "log writer did not stop cleanly");
        }
    }

    /// Like [`shutdown`](Self::shutdown), returning the failure. Other clones
    /// of the handle keep working but their lines are then dropped (and
    /// counted); called again on another clone, it returns `Ok` at once.
    pub fn try_shutdown(self) -> Result<(), LogError> {
        // A blocking send: the writer is draining the queue, so room comes.
        // It fails only when the writer is already gone.
        let _ = self.tx.send(Msg::Shutdown);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match thread.map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(source))) => Err(LogError::Flush {
                path: self.path.to_path_buf(),
                source,
            }),
            Some(Err(_)) => Err(LogError::Panicked),
        }
    }

    /// Tests: blocks the writer thread until the returned sender is used or
    /// dropped; returns once the writer is blocked.
    #[cfg(test)]
    fn pause(&self) -> SyncSender<()> {
        let (entered_tx, entered_rx) = mpsc::sync_channel(1);
        let (release_tx, release_rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Pause {
                entered: entered_tx,
                release: release_rx,
            })
            .expect("writer running");
        entered_rx.recv().expect("writer paused");
        release_tx
    }
}

thread_local! {
    /// Set on the writer thread, so the tracing layer does not feed the
    /// writer's own warnings back into its queue.
    static ON_WRITER_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The writer thread's state. Start it with [`LogWriter::spawn`].
pub struct LogWriter {
    rx: Receiver<Msg>,
    queue_batches: usize,
    max_bytes: u64,
    file: ActiveFile,
    names: BackupNames,
    mill: Mill,
    node: Arc<str>,
    stats: Arc<LogStats>,
    /// Reused for every line.
    line: Vec<u8>,
    last_backup: Option<NaiveDateTime>,
    next_rotate_attempt: Option<Instant>,
    next_mill: Instant,
    /// When the buffered lines must be written (set when the queue ran dry).
    flush_due: Option<Instant>,
    last_warn: Option<Instant>,
    suppressed_warnings: u64,
}

impl fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogWriter")
            .field("file", &self.file)
            .field("max_bytes", &self.max_bytes)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl LogWriter {
    /// Validates `cfg`, creates the log directory, opens the file for
    /// appending (so a bad path or missing permission fails here, naming the
    /// path) and starts the writer thread `ctw-log-writer`. `node` goes into
    /// every conntrack line.
    pub fn spawn(
        cfg: &LogConfig,
        node: Arc<str>,
        stats: Arc<LogStats>,
    ) -> Result<LogHandle, LogError> {
        cfg.validate().map_err(LogError::Config)?;
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| LogError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let open_err = |source| LogError::Open {
            path: cfg.path.clone(),
            source,
        };
        let file = rotate::open_append(&cfg.path).map_err(open_err)?;
        let file = ActiveFile::new(cfg.path.clone(), file).map_err(open_err)?;
        let names = BackupNames::new(&cfg.path);
        let mill = Mill::spawn(MillConfig {
            names: names.clone(),
            max_backups: cfg.max_backups,
            max_age_days: cfg.max_age_days,
            compress: cfg.compress,
        })
        .map_err(LogError::Spawn)?;
        let (tx, rx) = mpsc::sync_channel(cfg.queue_batches);
        let writer = LogWriter {
            rx,
            queue_batches: cfg.queue_batches,
            max_bytes: cfg.max_size_bytes(),
            file,
            names,
            mill,
            node,
            stats: Arc::clone(&stats),
            line: Vec::with_capacity(512),
            last_backup: None,
            next_rotate_attempt: None,
            next_mill: Instant::now() + MILL_INTERVAL,
            flush_due: None,
            last_warn: None,
            suppressed_warnings: 0,
        };
        stats.healthy.store(true, Ordering::Relaxed);
        let thread = std::thread::Builder::new()
            .name("ctw-log-writer".into())
            .spawn(move || writer.run())
            .map_err(LogError::Spawn)?;
        Ok(LogHandle {
            tx,
            stats,
            path: Arc::from(cfg.path.as_path()),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    fn run(mut self) -> std::io::Result<()> {
        ON_WRITER_THREAD.with(|c| c.set(true));
        // Apply retention to what earlier runs left behind.
        self.mill.request();
        loop {
            let msg = match self.rx.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    // The queue ran dry. Lines reach the file at most
                    // FLUSH_DELAY later: waiting a little first turns one
                    // write per small batch into one write per buffer at
                    // high rates.
                    let now = Instant::now();
                    let healthy = self.stats.healthy.load(Ordering::Relaxed);
                    match self.flush_due {
                        None if self.file.has_pending() && healthy => {
                            self.flush_due = Some(now + FLUSH_DELAY);
                        }
                        Some(due) if now >= due => {
                            self.flush_due = None;
                            self.flush();
                        }
                        _ => {}
                    }
                    let wait = match self.flush_due {
                        Some(due) => due.saturating_duration_since(now),
                        None if self.file.has_pending() => {
                            // A failed write: retry later.
                            self.flush();
                            RETRY_INTERVAL
                        }
                        None => self.next_mill.saturating_duration_since(now),
                    };
                    match self.rx.recv_timeout(wait) {
                        Ok(msg) => msg,
                        Err(RecvTimeoutError::Timeout) => {
                            self.tick();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            if !self.handle(msg) {
                // Shutdown: also write what other clones queued meanwhile,
                // bounded so a busy sender cannot keep us alive.
                for _ in 0..self.queue_batches {
                    match self.rx.try_recv() {
                        Ok(msg) => {
                            self.handle(msg);
                        }
                        Err(_) => break,
                    }
                }
                break;
            }
            self.tick();
        }
        self.mill.finish();
        let result = self.file.flush();
        if result.is_err() {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            self.stats.healthy.store(false, Ordering::Relaxed);
        }
        result
    }

    /// Handles one message; false on shutdown.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Records(batch) => self.write_records(&batch),
            Msg::Log(line) => self.write_log(&line),
            Msg::Shutdown => return false,
            #[cfg(test)]
            Msg::Pause { entered, release } => {
                let _ = entered.send(());
                let _ = release.recv();
            }
        }
        true
    }

    /// Periodic work: start a retention pass when one is due.
    fn tick(&mut self) {
        let now = Instant::now();
        if now >= self.next_mill {
            self.mill.request();
            self.next_mill = now + MILL_INTERVAL;
        }
    }

    fn write_records(&mut self, batch: &[ConnRecord]) {
        let mut line = std::mem::take(&mut self.line);
        let mut written = 0;
        for rec in batch {
            line.clear();
            format_record(&mut line, rec, &self.node, &Local);
            if self.write_line(&line) {
                written += 1;
            }
        }
        self.stats
            .written_records
            .fetch_add(written, Ordering::Relaxed);
        self.line = line;
    }

    fn write_log(&mut self, l: &LogLine) {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        format_log_line(&mut line, l.ts_ns, &l.level, &l.msg, &l.fields, &Local);
        self.write_line(&line);
        self.line = line;
    }

    /// Appends one line, rotating first if it would not fit. True if taken.
    fn write_line(&mut self, line: &[u8]) -> bool {
        let size = self.file.size();
        if size > 0 && size.saturating_add(line.len() as u64) > self.max_bytes {
            self.rotate();
        }
        match self.file.push(line) {
            Ok(()) => {
                self.stats.written_lines.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.write_failed("cannot write log file", &e);
                false
            }
        }
    }

    fn flush(&mut self) {
        if !self.file.has_pending() {
            return;
        }
        match self.file.flush() {
            Ok(()) => self.stats.healthy.store(true, Ordering::Relaxed),
            Err(e) => self.write_failed("cannot write log file", &e),
        }
    }

    fn rotate(&mut self) {
        let now = Instant::now();
        if self.next_rotate_attempt.is_some_and(|t| now < t) {
            return;
        }
        // Everything accepted so far belongs in the backup. If this fails
        // the leftover bytes go to the new file instead.
        self.flush();
        let (backup, time) = self
            .names
            .next_backup(Local::now().naive_local(), self.last_backup);
        match self.file.rotate(&backup) {
            Ok(()) => {
                self.last_backup = Some(time);
                self.next_rotate_attempt = None;
                self.stats.rotations.fetch_add(1, Ordering::Relaxed);
                self.mill.request();
            }
            Err(e) => {
                self.next_rotate_attempt = Some(now + ROTATE_RETRY_INTERVAL);
                self.write_failed("cannot rotate log file", &e);
            }
        }
    }

    /// Counts a failed write, marks the log unhealthy and warns at most once
    /// per [`WARN_INTERVAL`].
    fn write_failed(&mut self, what: &'static str, e: &std::io::Error) {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        self.stats.healthy.store(false, Ordering::Relaxed);
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < WARN_INTERVAL)
        {
            self.suppressed_warnings += 1;
            return;
        }
        tracing::warn!(
            path = %self.file.path().display(),
            error = %e,
            suppressed = self.suppressed_warnings,
            "{what}"
        );
        self.last_warn = Some(now);
        self.suppressed_warnings = 0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read as _;
    use std::sync::atomic::AtomicUsize;

    use ctw_common::{EventKind, Protocol, Tuple};

    /// A unique directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> TempDir {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ctw-logfile-{}-{}-{name}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn read_gz(path: &Path) -> String {
        let file = std::fs::File::open(path).expect("open gz");
        let mut s = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut s)
            .expect("decompress");
        s
    }

    pub(crate) fn record(i: u16) -> ConnRecord {
        let tuple = |src: [u8; 4], sp, dst: [u8; 4], dp| Tuple {
            src: src.into(),
            dst: dst.into(),
            src_port: sp,
            dst_port: dp,
        };
        ConnRecord {
            id: u32::from(i),
            ..ConnRecord::new(
                EventKind::New,
                1_733_727_900_123_000_000,
                Protocol::Tcp,
                tuple([10, 0, 0, 5], i, [1, 2, 3, 4], 443),
                tuple([1, 2, 3, 4], 443, [192, 168, 1, 100], i),
            )
        }
    }

    fn config(dir: &Path) -> LogConfig {
        LogConfig {
            path: dir.join("sub/dir/nat.log"),
            compress: false,
            ..LogConfig::default()
        }
    }

    fn spawn(cfg: &LogConfig) -> (LogHandle, Arc<LogStats>) {
        let stats = Arc::new(LogStats::default());
        let handle = LogWriter::spawn(cfg, Arc::from("node-1"), Arc::clone(&stats)).expect("spawn");
        (handle, stats)
    }

    /// Every file of the log (active, backups, gzipped backups) with its text.
    fn all_files(dir: &Path) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().into_string().expect("utf-8 name");
                let text = if name.ends_with(".gz") {
                    read_gz(&e.path())
                } else {
                    std::fs::read_to_string(e.path()).expect("read")
                };
                (name, text)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn defaults_are_the_seed_values() {
        let cfg = LogConfig::default();
        assert_eq!(cfg.path, Path::new("/var/log/nat-tracker/nat.log"));
        assert_eq!(
            (cfg.max_size_mb, cfg.max_backups, cfg.max_age_days),
            (100, 10, 7)
        );
        assert!(cfg.compress);
        assert_eq!(cfg.queue_batches, 4096);
        assert_eq!(cfg.max_size_bytes(), 100 * 1024 * 1024);
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn seed_log_section_deserializes() {
        let yaml = "path: \"/var/log/nat-tracker/nat.log\"\nmax_size_mb: 100\nmax_backups: 10\nmax_age_days: 7\ncompress: true\n";
        let cfg: LogConfig = serde_yaml::from_str(yaml).expect("seed config");
        assert_eq!(cfg, LogConfig::default());
        let partial: LogConfig = serde_yaml::from_str("max_size_mb: 5").expect("partial");
        assert_eq!(partial.max_size_mb, 5);
        assert_eq!(partial.max_backups, 10);
        let err = serde_yaml::from_str::<LogConfig>("max_size_bm: 5").expect_err("typo");
        assert!(err.to_string().contains("max_size_bm"), "{err}");
    }

    #[test]
    fn validate_names_key_and_value() {
        let bad = |f: fn(&mut LogConfig)| {
            let mut c = LogConfig::default();
            f(&mut c);
            c.validate().expect_err("invalid")
        };
        assert_eq!(
            bad(|c| c.max_size_mb = 0),
            "log.max_size_mb: must be at least 1, got 0"
        );
        assert!(bad(|c| c.max_size_mb = u64::MAX).starts_with("log.max_size_mb: must be at most"));
        assert_eq!(
            bad(|c| c.queue_batches = 0),
            "log.queue_batches: must be between 1 and 1048576, got 0"
        );
        assert_eq!(
            bad(|c| c.path = PathBuf::new()),
            "log.path: must not be empty"
        );
        assert_eq!(
            bad(|c| c.path = PathBuf::from("/var/log/..")),
            "log.path: must name a file, got \"/var/log/..\""
        );
    }

    #[test]
    fn writes_records_and_log_lines_creating_the_directory() {
        let dir = TempDir::new("basic");
        let cfg = config(dir.path());
        let (handle, stats) = spawn(&cfg);
        assert!(cfg.path.exists(), "file opened at spawn");
        handle.log(
            "INFO",
            "program started",
            &[("ports", serde_json::json!([80, 443]))],
        );
        handle.send_records(vec![record(1), record(2)]);
        handle.send_records(Vec::new());
        handle.try_shutdown().expect("shutdown");

        let text = std::fs::read_to_string(&cfg.path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["msg"], "program started");
        assert_eq!(lines[0]["level"], "info");
        assert_eq!(lines[0]["type"], "log");
        assert_eq!(lines[0]["ports"], serde_json::json!([80, 443]));
        assert_eq!(lines[1]["type"], "conntrack");
        assert_eq!(lines[1]["node"], "node-1");
        assert_eq!(lines[2]["src_port"], 2);
        assert_eq!(stats.written_records.load(Ordering::Relaxed), 2);
        assert_eq!(stats.written_lines.load(Ordering::Relaxed), 3);
        assert_eq!(stats.dropped_records.load(Ordering::Relaxed), 0);
        assert!(stats.healthy.load(Ordering::Relaxed));
    }

    #[test]
    fn appends_to_an_existing_file() {
        let dir = TempDir::new("append");
        let cfg = config(dir.path());
        std::fs::create_dir_all(cfg.path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&cfg.path, "old line\n").expect("write");
        let (handle, _) = spawn(&cfg);
        handle.send_records(vec![record(1)]);
        handle.try_shutdown().expect("shutdown");
        let text = std::fs::read_to_string(&cfg.path).expect("read");
        assert!(text.starts_with("old line\n{\"ts\""), "{text}");
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn lines_reach_the_file_when_the_queue_is_empty() {
        let dir = TempDir::new("idle-flush");
        let cfg = config(dir.path());
        let (handle, stats) = spawn(&cfg);
        handle.send_records(vec![record(1)]);
        // Wait on the condition with a deadline, not a fixed sleep.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let len = std::fs::metadata(&cfg.path).expect("metadata").len();
            if len > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "line not flushed");
            std::thread::yield_now();
        }
        assert_eq!(stats.written_records.load(Ordering::Relaxed), 1);
        handle.try_shutdown().expect("shutdown");
    }

    #[test]
    fn rotation_keeps_every_line_and_compresses() {
        let dir = TempDir::new("rotate");
        let cfg = LogConfig {
            compress: true,
            max_backups: 0,
            max_age_days: 0,
            max_size_bytes_override: Some(2_000),
            ..config(dir.path())
        };
        let (handle, stats) = spawn(&cfg);
        let n: u16 = 500;
        for chunk in (0..n).collect::<Vec<_>>().chunks(7) {
            let batch: Vec<ConnRecord> = chunk.iter().map(|&i| record(i)).collect();
            handle.send_records(batch);
        }
        handle.try_shutdown().expect("shutdown");
        assert_eq!(stats.dropped_records.load(Ordering::Relaxed), 0);
        assert_eq!(stats.written_records.load(Ordering::Relaxed), u64::from(n));

        let files = all_files(cfg.path.parent().expect("parent"));
        let rotations = stats.rotations.load(Ordering::Relaxed);
        assert!(rotations >= 50, "rotations {rotations}");
        assert_eq!(files.len() as u64, rotations + 1);
        let mut ports = Vec::new();
        for (name, text) in &files {
            assert!(
                name == "nat.log" || (name.starts_with("nat-") && name.ends_with(".log.gz")),
                "{name}"
            );
            assert!(text.len() <= 2_000, "{name} has {} bytes", text.len());
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).expect("whole json line");
                ports.push(v["src_port"].as_u64().expect("port"));
            }
        }
        // Backup names sort by time and before "nat.log", so reading the
        // files in name order gives the lines in the order they were sent.
        assert_eq!(ports, (0..u64::from(n)).collect::<Vec<_>>());
    }

    #[test]
    fn max_backups_prunes_oldest() {
        let dir = TempDir::new("prune");
        let cfg = LogConfig {
            compress: false,
            max_backups: 3,
            max_age_days: 0,
            max_size_bytes_override: Some(1_000),
            ..config(dir.path())
        };
        let (handle, stats) = spawn(&cfg);
        for i in 0..100 {
            handle.send_records(vec![record(i)]);
        }
        handle.try_shutdown().expect("shutdown");
        assert!(stats.rotations.load(Ordering::Relaxed) > 5);
        let files = all_files(cfg.path.parent().expect("parent"));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!(names[3], "nat.log");
        // The newest backups survive: the last line of the newest backup is
        // right before the first line of the active file.
        let last_backup_port = files[2].1.lines().last().map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["src_port"].as_u64()
        });
        let first_active_port = files[3].1.lines().next().map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["src_port"].as_u64()
        });
        assert_eq!(
            last_backup_port.flatten().map(|p| p + 1),
            first_active_port.flatten()
        );
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let dir = TempDir::new("full");
        let cfg = LogConfig {
            queue_batches: 1,
            ..config(dir.path())
        };
        let (handle, stats) = spawn(&cfg);
        let release = handle.pause();
        let start = Instant::now();
        handle.send_records(vec![record(1), record(2)]); // fills the one slot
        handle.send_records(vec![record(3), record(4), record(5)]);
        handle.send_records(vec![record(6)]);
        handle.log("info", "lost", &[]);
        assert!(start.elapsed() < Duration::from_secs(1), "send blocked");
        assert_eq!(stats.dropped_records.load(Ordering::Relaxed), 4);
        assert_eq!(stats.dropped_log_lines.load(Ordering::Relaxed), 1);
        drop(release);
        let clone = handle.clone();
        handle.try_shutdown().expect("shutdown");
        assert_eq!(stats.written_records.load(Ordering::Relaxed), 2);
        assert_eq!(
            std::fs::read_to_string(&cfg.path)
                .expect("read")
                .lines()
                .count(),
            2
        );

        // The writer is gone: sends are dropped and counted, shutdown is a no-op.
        clone.send_records(vec![record(7), record(8)]);
        assert_eq!(stats.dropped_records.load(Ordering::Relaxed), 6);
        clone.try_shutdown().expect("second shutdown");
    }

    #[test]
    fn unwritable_paths_fail_at_spawn_naming_the_path() {
        let dir = TempDir::new("unwritable");
        // A regular file where a directory should be (works even as root).
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, b"").expect("write");
        let cfg = LogConfig {
            path: blocker.join("sub/nat.log"),
            ..LogConfig::default()
        };
        let stats = Arc::new(LogStats::default());
        let err =
            LogWriter::spawn(&cfg, Arc::from("n"), Arc::clone(&stats)).expect_err("must fail");
        assert!(matches!(err, LogError::CreateDir { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot create log directory {}",
                blocker.join("sub").display()
            )),
            "{msg}"
        );

        // The path is a directory.
        let cfg = LogConfig {
            path: dir.path().to_path_buf(),
            ..LogConfig::default()
        };
        let err =
            LogWriter::spawn(&cfg, Arc::from("n"), Arc::clone(&stats)).expect_err("must fail");
        assert!(matches!(err, LogError::Open { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
        assert!(!stats.healthy.load(Ordering::Relaxed));

        let cfg = LogConfig {
            max_size_mb: 0,
            ..config(dir.path())
        };
        let err = LogWriter::spawn(&cfg, Arc::from("n"), stats).expect_err("must fail");
        assert_eq!(
            err.to_string(),
            "invalid log config: log.max_size_mb: must be at least 1, got 0"
        );
    }

    #[test]
    fn write_errors_mark_unhealthy_and_recover() {
        // /dev/full fails every write with ENOSPC.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let stats = Arc::new(LogStats::default());
        let cfg = LogConfig {
            path: PathBuf::from("/dev/full"),
            max_backups: 0,
            max_age_days: 0,
            compress: false,
            ..LogConfig::default()
        };
        let handle = LogWriter::spawn(&cfg, Arc::from("n"), Arc::clone(&stats)).expect("spawn");
        handle.send_records(vec![record(1)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.write_errors.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no write error seen");
            std::thread::yield_now();
        }
        assert!(!stats.healthy.load(Ordering::Relaxed));
        assert!(matches!(handle.try_shutdown(), Err(LogError::Flush { .. })));
    }
}

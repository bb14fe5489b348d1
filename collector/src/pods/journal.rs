//! The pod history on disk: one JSON-lines file, `<storage.path>/pods/history.jsonl`.
//!
//! Each line is one [`Line`]: an interval opened (`open`, with `to_ns` once
//! compacted and closed), closed (`close`), its workload resolved late
//! (`workload`), a watch gap (`gap`), closed intervals evicted by the
//! `kubernetes.max_closed_intervals` bound (`evicted`: every closed interval
//! that ended at or before `through_ns`), or the
//! watch's heartbeat (`alive`: the history was complete up to `at_ns`).
//! Appends are buffered and written + fsynced at every heartbeat
//! ([`Journal::sync`]); after a crash the lines since the last heartbeat are
//! lost, and the restart records a gap from that heartbeat, so nothing is
//! claimed as verified that was not on disk. [`Journal::compact`] rewrites
//! the file from the in-memory history (retention applied) through a
//! temporary file and a rename. A line that does not parse is counted and
//! skipped, never fatal.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::history::{parse_uid, uid_text, Change, Gap, History, Interval, Sym, OPEN};

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Line {
    Open {
        ip: IpAddr,
        uid: String,
        from_ns: u64,
        /// The handover window's start (`Interval::maybe_from_ns`) when
        /// before `from_ns`; absent in journals written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maybe_from_ns: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_ns: Option<u64>,
        namespace: String,
        name: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        workload_kind: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        workload_name: String,
        node: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        host_network: bool,
    },
    Close {
        ip: IpAddr,
        uid: String,
        to_ns: u64,
    },
    Gap {
        from_ns: u64,
        to_ns: u64,
    },
    Workload {
        ip: IpAddr,
        uid: String,
        kind: String,
        name: String,
    },
    Alive {
        at_ns: u64,
    },
    Evicted {
        through_ns: u64,
    },
}

/// Errors of the journal (all I/O; the message names the file).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("pod history {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`Journal::open`] read back.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The last `alive` heartbeat: the history is complete up to here.
    pub alive_ns: Option<u64>,
    /// Lines that did not parse (skipped).
    pub bad_lines: u64,
    pub lines: u64,
}

/// The append side of the journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    /// Lines in the file (to decide when to compact).
    pub lines: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    /// Open (creating) `dir/history.jsonl` and replay it into `history`.
    pub fn open(dir: &Path, history: &mut History) -> Result<(Journal, Loaded), JournalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("history.jsonl");
        let mut loaded = Loaded::default();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io(&path))?;
                if line.trim().is_empty() {
                    continue;
                }
                loaded.lines += 1;
                match serde_json::from_str::<Line>(&line) {
                    Ok(l) => {
                        if let Some(at) = apply_line(history, l) {
                            loaded.alive_ns = Some(at);
                        }
                    }
                    Err(e) => {
                        loaded.bad_lines += 1;
                        tracing::warn!(file = %path.display(), error = %e, "skipping a bad pod history line");
                    }
                }
            }
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok((
            Journal {
                path,
                out: BufWriter::new(f),
                lines: loaded.lines,
            },
            loaded,
        ))
    }

    /// Buffer the lines of `changes` (written at the next [`Journal::sync`]).
    pub fn append(&mut self, history: &History, changes: &[Change]) -> Result<(), JournalError> {
        for c in changes {
            let line = change_line(history, c);
            self.write(&line)?;
        }
        Ok(())
    }

    /// Append a heartbeat, write and fsync.
    pub fn sync(&mut self, alive_ns: Option<u64>) -> Result<(), JournalError> {
        if let Some(at_ns) = alive_ns {
            self.write(&Line::Alive { at_ns })?;
        }
        self.out.flush().map_err(io(&self.path))?;
        self.out.get_ref().sync_data().map_err(io(&self.path))
    }

    /// Rewrite the file from `history` (already pruned) plus a heartbeat.
    pub fn compact(
        &mut self,
        history: &History,
        alive_ns: Option<u64>,
    ) -> Result<(), JournalError> {
        self.out.flush().map_err(io(&self.path))?;
        let tmp = self.path.with_extension("jsonl.tmp");
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = BufWriter::new(f);
        let mut n = 0;
        let mut put = |w: &mut BufWriter<File>, l: &Line| -> Result<(), JournalError> {
            n += 1;
            serde_json::to_writer(&mut *w, l)
                .map_err(|e| std::io::Error::other(e.to_string()))
                .map_err(io(&tmp))?;
            w.write_all(b"\n").map_err(io(&tmp))
        };
        // First: replayed before the intervals kept, it drops none of them.
        if history.evicted_through_ns() > 0 {
            put(
                &mut w,
                &Line::Evicted {
                    through_ns: history.evicted_through_ns(),
                },
            )?;
        }
        for g in history.gaps() {
            put(
                &mut w,
                &Line::Gap {
                    from_ns: g.from_ns,
                    to_ns: g.to_ns,
                },
            )?;
        }
        for (ip, ivs) in &history.by_ip {
            for iv in ivs {
                put(&mut w, &open_line(history, *ip, iv))?;
            }
        }
        if let Some(at_ns) = alive_ns {
            put(&mut w, &Line::Alive { at_ns })?;
        }
        w.flush().map_err(io(&tmp))?;
        w.get_ref().sync_all().map_err(io(&tmp))?;
        drop(w);
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        let f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        self.out = BufWriter::new(f);
        self.lines = n;
        Ok(())
    }

    fn write(&mut self, l: &Line) -> Result<(), JournalError> {
        serde_json::to_writer(&mut self.out, l)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .map_err(io(&self.path))?;
        self.out.write_all(b"\n").map_err(io(&self.path))?;
        self.lines += 1;
        Ok(())
    }
}

fn open_line(h: &History, ip: IpAddr, iv: &Interval) -> Line {
    let s = |x: Sym| h.strings.get(x).to_string();
    Line::Open {
        ip,
        uid: uid_text(iv.uid),
        from_ns: iv.from_ns,
        maybe_from_ns: (iv.maybe_from_ns < iv.from_ns).then_some(iv.maybe_from_ns),
        to_ns: (iv.to_ns != OPEN).then_some(iv.to_ns),
        namespace: s(iv.namespace),
        name: iv.name.to_string(),
        workload_kind: s(iv.workload_kind),
        workload_name: s(iv.workload_name),
        node: s(iv.node),
        host_network: iv.host_network,
    }
}

fn change_line(h: &History, c: &Change) -> Line {
    match c {
        Change::Opened(ip, iv) => open_line(h, *ip, iv),
        Change::Closed { ip, uid, to_ns } => Line::Close {
            ip: *ip,
            uid: uid_text(*uid),
            to_ns: *to_ns,
        },
        Change::Gap(g) => Line::Gap {
            from_ns: g.from_ns,
            to_ns: g.to_ns,
        },
        Change::Workload { ip, uid, workload } => Line::Workload {
            ip: *ip,
            uid: uid_text(*uid),
            kind: workload.kind.clone(),
            name: workload.name.clone(),
        },
        Change::Evicted { through_ns } => Line::Evicted {
            through_ns: *through_ns,
        },
    }
}

/// Replay one line; returns the heartbeat time of an `alive` line.
fn apply_line(h: &mut History, l: Line) -> Option<u64> {
    match l {
        Line::Open {
            ip,
            uid,
            from_ns,
            maybe_from_ns,
            to_ns,
            namespace,
            name,
            workload_kind,
            workload_name,
            node,
            host_network,
        } => {
            let uid = parse_uid(&uid)?;
            let iv = Interval {
                uid,
                from_ns,
                maybe_from_ns: maybe_from_ns.unwrap_or(from_ns).min(from_ns),
                to_ns: OPEN,
                name: name.into(),
                namespace: h.strings.intern(&namespace),
                node: h.strings.intern(&node),
                workload_kind: h.strings.intern(&workload_kind),
                workload_name: h.strings.intern(&workload_name),
                host_network,
            };
            h.replay(Change::Opened(ip, iv));
            if let Some(to_ns) = to_ns {
                h.replay(Change::Closed { ip, uid, to_ns });
            }
            None
        }
        Line::Close { ip, uid, to_ns } => {
            h.replay(Change::Closed {
                ip,
                uid: parse_uid(&uid)?,
                to_ns,
            });
            None
        }
        Line::Gap { from_ns, to_ns } => {
            h.replay(Change::Gap(Gap { from_ns, to_ns }));
            None
        }
        Line::Workload {
            ip,
            uid,
            kind,
            name,
        } => {
            h.replay(Change::Workload {
                ip,
                uid: parse_uid(&uid)?,
                workload: super::history::Workload { kind, name },
            });
            None
        }
        Line::Alive { at_ns } => Some(at_ns),
        Line::Evicted { through_ns } => {
            h.replay(Change::Evicted { through_ns });
            None
        }
    }
}

//! Durable gap log: one JSON object per line in `gaps.jsonl`, fsynced per
//! gap. Gaps are few (loss reports, disconnections), so all live in memory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::{Gap, StoreError};
use super::wal::io_err;

#[derive(Debug, Serialize, Deserialize)]
struct GapLine {
    node: String,
    from_ns: u64,
    to_ns: u64,
    reason: String,
    count: u64,
}

impl From<&Gap> for GapLine {
    fn from(g: &Gap) -> Self {
        GapLine {
            node: g.node.clone(),
            from_ns: g.from_ns,
            to_ns: g.to_ns,
            reason: g.reason.clone(),
            count: g.count,
        }
    }
}

#[derive(Debug)]
pub(super) struct GapLog {
    path: PathBuf,
    file: File,
    pub(super) gaps: Vec<Gap>,
}

impl GapLog {
    /// Load `gaps.jsonl`; a torn last line is cut off with a warning, a bad
    /// line before the last is an error.
    pub(super) fn open(root: &Path) -> Result<GapLog, StoreError> {
        let path = root.join("gaps.jsonl");
        let text = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&path, e)),
        };
        let mut gaps = Vec::new();
        let mut valid = 0usize;
        let mut off = 0usize;
        while off < text.len() {
            let nl = text[off..].iter().position(|&b| b == b'\n');
            let (line, next, complete) = match nl {
                Some(i) => (&text[off..off + i], off + i + 1, true),
                None => (&text[off..], text.len(), false),
            };
            match serde_json::from_slice::<GapLine>(line) {
                Ok(g) if complete => {
                    gaps.push(Gap {
                        node: g.node,
                        from_ns: g.from_ns,
                        to_ns: g.to_ns,
                        reason: g.reason,
                        count: g.count,
                    });
                    valid = next;
                }
                _ if next == text.len() => break,
                Err(e) => {
                    return Err(StoreError::Corrupt {
                        path: path.display().to_string(),
                        message: format!("bad gap line at byte {off}: {e}"),
                    })
                }
                Ok(_) => unreachable!("a complete line is handled above"),
            }
            off = next;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        if valid < text.len() {
            tracing::warn!(path = %path.display(), garbage_bytes = text.len() - valid, "gap log ends with a torn line; cutting it off");
            file.set_len(valid as u64).map_err(|e| io_err(&path, e))?;
        }
        Ok(GapLog { path, file, gaps })
    }

    /// Record a gap once: agents resend a loss report after a reconnect
    /// when they cannot know it arrived, so an identical gap is a no-op.
    pub(super) fn append(&mut self, gap: Gap) -> Result<(), StoreError> {
        if self.gaps.contains(&gap) {
            return Ok(());
        }
        let mut line = serde_json::to_vec(&GapLine::from(&gap))
            .map_err(|e| StoreError::Index(e.to_string()))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.path, e))?;
        self.gaps.push(gap);
        Ok(())
    }

    /// Drop gaps that ended before `cutoff_ns`, rewriting the file.
    pub(super) fn prune(&mut self, cutoff_ns: u64) -> Result<usize, StoreError> {
        let before = self.gaps.len();
        self.gaps.retain(|g| g.to_ns >= cutoff_ns);
        let dropped = before - self.gaps.len();
        if dropped == 0 {
            return Ok(0);
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut out = Vec::new();
        for g in &self.gaps {
            out.extend(
                serde_json::to_vec(&GapLine::from(g))
                    .map_err(|e| StoreError::Index(e.to_string()))?,
            );
            out.push(b'\n');
        }
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(&out)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io_err(&self.path, e))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io_err(&self.path, e))?;
        Ok(dropped)
    }
}

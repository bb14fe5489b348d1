//! The API token: read from `http.token_file`, re-read when the file
//! changes, compared in constant time.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path} is empty or shorter than 16 characters")]
    TooShort { path: String },
}

#[derive(Debug)]
pub struct Token {
    path: PathBuf,
    current: RwLock<(String, Option<SystemTime>)>,
}

fn read(path: &Path) -> Result<(String, Option<SystemTime>), TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim().to_string();
    if token.len() < 16 {
        return Err(TokenError::TooShort {
            path: path.display().to_string(),
        });
    }
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((token, mtime))
}

/// Constant-time comparison of two byte strings (length may leak).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Token {
    pub fn load(path: &Path) -> Result<Token, TokenError> {
        Ok(Token {
            path: path.to_path_buf(),
            current: RwLock::new(read(path)?),
        })
    }

    /// A token held in memory (tests).
    pub fn fixed(token: &str) -> Token {
        Token {
            path: PathBuf::new(),
            current: RwLock::new((token.to_string(), None)),
        }
    }

    /// Re-read the file when its modification time changed; a file that
    /// became unreadable keeps the old token (and is logged).
    fn refresh(&self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let stale = self.current.read().map(|c| c.1 != mtime).unwrap_or(false);
        if stale {
            match read(&self.path) {
                Ok(new) => {
                    if let Ok(mut c) = self.current.write() {
                        *c = new;
                        tracing::info!(path = %self.path.display(), "API token reloaded");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "keeping the previous API token"),
            }
        }
    }

    pub fn matches(&self, given: &str) -> bool {
        self.refresh();
        self.current
            .read()
            .map(|c| same(c.0.as_bytes(), given.as_bytes()))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn matches_and_reloads() {
        let dir = std::env::temp_dir().join(format!("ctw-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, "0123456789abcdef-one\n").unwrap();
        let t = Token::load(&p).unwrap();
        assert!(t.matches("0123456789abcdef-one"));
        assert!(!t.matches("0123456789abcdef-two"));
        assert!(!t.matches(""));
        // A new token file (new mtime) is picked up.
        std::fs::write(&p, "0123456789abcdef-two\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(later).unwrap();
        assert!(t.matches("0123456789abcdef-two"));
        assert!(!t.matches("0123456789abcdef-one"));
        std::fs::write(&p, "short").unwrap();
        assert!(Token::load(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

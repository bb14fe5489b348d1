//! Where the collector is and which token to send: flags, then environment
//! (`CTW_SERVER`, `CTW_TOKEN`, `CTW_TOKEN_FILE`), then the config file
//! (`$CTW_CONFIG`, else `~/.config/ctw/config.yaml`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::args::Global;
use crate::error::CliError;

/// Used when no flag, variable or file names a server: the collector's
/// default `http.listen_addr` port on this host.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:9360";

/// The config file (`server:`, `token:` or `token_file:`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: Option<String>,
    pub token: Option<String>,
    /// Relative paths are relative to the config file's directory.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Base URL without trailing slash, with a scheme.
    pub server: String,
    pub token: String,
}

/// The config file to read: `$CTW_CONFIG` (must exist), else
/// `$XDG_CONFIG_HOME/ctw/config.yaml` or `$HOME/.config/ctw/config.yaml`
/// when it exists.
fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<PathBuf>, CliError> {
    if let Some(p) = env("CTW_CONFIG").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.exists() {
            return Err(CliError::usage(format!(
                "CTW_CONFIG: {} does not exist",
                p.display()
            )));
        }
        return Ok(Some(p));
    }
    let base = env("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        });
    Ok(base
        .map(|b| b.join("ctw/config.yaml"))
        .filter(|p| p.exists()))
}

fn load_file(path: &Path) -> Result<FileConfig, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    let mut c: FileConfig = serde_yaml::from_str(&text)
        .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?;
    if c.token.is_some() && c.token_file.is_some() {
        return Err(CliError::usage(format!(
            "{}: give token or token_file, not both",
            path.display()
        )));
    }
    if let (Some(f), Some(dir)) = (&c.token_file, path.parent()) {
        if f.is_relative() {
            c.token_file = Some(dir.join(f));
        }
    }
    Ok(c)
}

fn read_token_file(path: &Path, what: &str) -> Result<String, CliError> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("{what}: cannot read {}: {e}", path.display())))?;
    let t = t.trim();
    if t.is_empty() {
        return Err(CliError::usage(format!(
            "{what}: {} is empty",
            path.display()
        )));
    }
    Ok(t.to_string())
}

/// `host:port` -> `http://host:port`; no trailing slash.
pub fn normalize_server(s: &str) -> Result<String, CliError> {
    let s = s.trim().trim_end_matches('/');
    if s.is_empty() {
        return Err(CliError::usage("empty server address"));
    }
    if s.starts_with("http://") || s.starts_with("https://") {
        return Ok(s.to_string());
    }
    if s.contains("://") {
        return Err(CliError::usage(format!(
            "server {s:?}: only http:// and https:// are supported"
        )));
    }
    Ok(format!("http://{s}"))
}

/// Flags > environment > config file (> [`DEFAULT_SERVER`] for the server).
/// The file is read only when flags and environment leave something open.
pub fn settings(g: &Global, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, CliError> {
    let env_nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let mut server = g.server.clone().or_else(|| env_nonempty("CTW_SERVER"));
    let mut token = match (&g.token, &g.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(read_token_file(f, "--token-file")?),
        (None, None) => match (env_nonempty("CTW_TOKEN"), env_nonempty("CTW_TOKEN_FILE")) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => Some(read_token_file(Path::new(&f), "CTW_TOKEN_FILE")?),
            (None, None) => None,
        },
    };
    let mut file_used = None;
    if server.is_none() || token.is_none() {
        if let Some(path) = config_path(env)? {
            let c = load_file(&path)?;
            if server.is_none() {
                server = c.server;
            }
            if token.is_none() {
                token = match (c.token, c.token_file) {
                    (Some(t), _) => Some(t.trim().to_string()),
                    (None, Some(f)) => Some(read_token_file(
                        &f,
                        &format!("{} token_file", path.display()),
                    )?),
                    (None, None) => None,
                };
            }
            file_used = Some(path);
        }
    }
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
        let file = file_used
            .map(|p| format!(" ({} has none)", p.display()))
            .unwrap_or_default();
        CliError::usage(format!(
            "no API token: give --token or --token-file, set CTW_TOKEN, or put token: in ~/.config/ctw/config.yaml{file}"
        ))
    })?;
    Ok(Settings {
        server: normalize_server(server.as_deref().unwrap_or(DEFAULT_SERVER))?,
        token,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::error::Exit;
    use std::collections::HashMap;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ctw-cli-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn env_of(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<&str, String> = pairs.into_iter().collect();
        move |k: &str| m.get(k).cloned()
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let d = tmp("prec");
        std::fs::write(d.join("file-token"), "from-token-file\n").unwrap();
        let cfg = d.join("config.yaml");
        std::fs::write(&cfg, "server: file:9360\ntoken_file: file-token\n").unwrap();
        let all_env = env_of(vec![
            ("CTW_CONFIG", cfg.display().to_string()),
            ("CTW_SERVER", "https://env.example:443/".into()),
            ("CTW_TOKEN", "from-env".into()),
        ]);
        // Flags win.
        let g = Global {
            server: Some("flag:1".into()),
            token: Some("from-flag".into()),
            ..Global::default()
        };
        assert_eq!(
            settings(&g, &all_env).unwrap(),
            Settings {
                server: "http://flag:1".into(),
                token: "from-flag".into()
            }
        );
        // Environment next.
        assert_eq!(
            settings(&Global::default(), &all_env).unwrap(),
            Settings {
                server: "https://env.example:443".into(),
                token: "from-env".into()
            }
        );
        // Then the file (token_file relative to it).
        let file_only = env_of(vec![("CTW_CONFIG", cfg.display().to_string())]);
        assert_eq!(
            settings(&Global::default(), &file_only).unwrap(),
            Settings {
                server: "http://file:9360".into(),
                token: "from-token-file".into()
            }
        );
        // Mixed: the server from a flag, the token from the file.
        let g = Global {
            server: Some("flag:1".into()),
            ..Global::default()
        };
        assert_eq!(settings(&g, &file_only).unwrap().token, "from-token-file");
        // --token-file flag.
        let g = Global {
            token_file: Some(d.join("file-token")),
            ..Global::default()
        };
        assert_eq!(
            settings(&g, &env_of(vec![])).unwrap().token,
            "from-token-file"
        );
        // ~/.config/ctw/config.yaml through HOME; the default server.
        let home = tmp("home");
        std::fs::create_dir_all(home.join(".config/ctw")).unwrap();
        std::fs::write(home.join(".config/ctw/config.yaml"), "token: in-home\n").unwrap();
        let s = settings(
            &Global::default(),
            &env_of(vec![("HOME", home.display().to_string())]),
        )
        .unwrap();
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.token, "in-home");
    }

    #[test]
    fn config_errors_are_usage_errors() {
        let d = tmp("errs");
        let cfg = d.join("config.yaml");
        std::fs::write(&cfg, "server: a\ntokne: x\n").unwrap();
        let e = settings(
            &Global::default(),
            &env_of(vec![("CTW_CONFIG", cfg.display().to_string())]),
        )
        .unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        assert!(e.message.contains("tokne"), "{e}");
        let e = settings(
            &Global::default(),
            &env_of(vec![("CTW_CONFIG", "/nonexistent/ctw.yaml".into())]),
        )
        .unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        let e = settings(&Global::default(), &env_of(vec![])).unwrap_err();
        assert!(e.message.contains("no API token"), "{e}");
        let g = Global {
            token_file: Some(d.join("missing")),
            ..Global::default()
        };
        assert_eq!(settings(&g, &env_of(vec![])).unwrap_err().exit, Exit::Usage);
        assert!(normalize_server("ftp://x").is_err());
        assert_eq!(
            normalize_server("10.0.0.1:9360/").unwrap(),
            "http://10.0.0.1:9360"
        );
    }
}

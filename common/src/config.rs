//! Loading YAML config files, shared by the agent and the collector: the
//! error type and the read + parse + validate steps. Each binary's config
//! struct uses `#[serde(deny_unknown_fields)]` and implements
//! [`ConfigFile::validate`].

use std::path::Path;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// YAML syntax, or a key or value serde refused; the message names the
    /// key and gives the line and column.
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// What [`ConfigFile::validate`] returns: the key and the refused value.
    /// [`ConfigFile::load`] and [`ConfigFile::parse`] turn it into
    /// [`ConfigError::Rejected`], which names the file too.
    #[error("config: {0}")]
    Invalid(String),
    /// A value the config's own checks refused, in the file `path`: shown
    /// the same way as [`ConfigError::Parse`].
    #[error("config file {path}: {message}")]
    Rejected { path: String, message: String },
}

impl ConfigError {
    /// Name the file an [`ConfigError::Invalid`] came from.
    fn in_file(self, origin: &str) -> ConfigError {
        match self {
            ConfigError::Invalid(message) => ConfigError::Rejected {
                path: origin.to_string(),
                message,
            },
            e => e,
        }
    }
}

/// Parse YAML text; `origin` names it in errors (a path, or `<text>`).
///
/// The text is first checked as plain YAML, so a syntax error (an unclosed
/// flow list `[80, 443`) is reported as one, with its line and column,
/// rather than as whatever type error the half-parsed text gives.
pub fn parse_yaml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let err = |message: String| ConfigError::Parse {
        path: origin.to_string(),
        message,
    };
    serde_yaml::from_str::<serde_yaml::Value>(text)
        .map_err(|e| err(format!("YAML syntax error: {e}")))?;
    serde_yaml::from_str(text).map_err(|e| err(e.to_string()))
}

/// Read and parse a YAML file.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_yaml(&text, &path.display().to_string())
}

/// How a file named in a config is used, for [`ConfigFile::check_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileUse {
    /// Read at start-up or later (a certificate, a key, a token).
    Read,
    /// A directory the program writes into, created when missing: it must
    /// be writable, or its nearest existing ancestor must be.
    WriteDir,
}

/// Open every file a config names the way the program will, and describe
/// each problem with its key: `collector.tls.ca_file: cannot read
/// /etc/ctw/ca.pem: No such file or directory (os error 2)`.
pub fn check_files(files: &[(&str, &Path, FileUse)]) -> Vec<String> {
    let mut problems = Vec::new();
    for &(key, path, how) in files {
        let shown = path.display();
        match how {
            FileUse::Read => {
                if let Err(e) = std::fs::File::open(path).and_then(|mut f| {
                    let mut byte = [0u8; 1];
                    std::io::Read::read(&mut f, &mut byte).map(|_| ())
                }) {
                    problems.push(format!("{key}: cannot read {shown}: {e}"));
                }
            }
            FileUse::WriteDir => {
                let existing = path.ancestors().find(|a| a.exists());
                match existing {
                    Some(dir) if !dir.is_dir() => {
                        problems.push(format!("{key}: {} is not a directory", dir.display()))
                    }
                    Some(dir) => {
                        let probe = dir.join(format!(".ctw-check-{}", std::process::id()));
                        match std::fs::File::create(&probe) {
                            Ok(_) => {
                                let _ = std::fs::remove_file(&probe);
                            }
                            Err(e) => problems.push(format!(
                                "{key}: cannot write in {}{}: {e}",
                                dir.display(),
                                if dir == path { "" } else { " (to create it)" }
                            )),
                        }
                    }
                    None => problems.push(format!("{key}: no existing directory above {shown}")),
                }
            }
        }
    }
    problems
}

/// A config file's top-level struct: YAML, then checks serde cannot make.
pub trait ConfigFile: DeserializeOwned {
    /// Checks of values and of how they fit together.
    fn validate(&self) -> Result<(), ConfigError>;

    /// The files the config names, by key, and how they are used (see
    /// [`check_files`]; `--check` opens each).
    fn files(&self) -> Vec<(&'static str, &Path, FileUse)> {
        Vec::new()
    }

    /// Open every file the config names; one message per problem, each
    /// naming the key (empty when all is well).
    fn check_files(&self) -> Vec<String> {
        check_files(&self.files())
    }

    /// Read, parse and validate a config file.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = load_yaml(path)?;
        cfg.validate()
            .map_err(|e| e.in_file(&path.display().to_string()))?;
        Ok(cfg)
    }

    /// Parse and validate YAML text.
    fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = parse_yaml(text, "<text>")?;
        cfg.validate().map_err(|e| e.in_file("<text>"))?;
        Ok(cfg)
    }
}

/// The end of both binaries' `main`: load and validate the config at
/// `path` (exit code 2 on a bad config, the error naming file and key); with
/// `check_only`, open every file it names and stop (2 if any cannot be
/// used, else 0); else `run` it (1 on a fatal error, printed with its
/// causes, else 0). Returns the process exit code.
pub fn load_check_run<C, E>(
    path: &Path,
    check_only: bool,
    run: impl FnOnce(C) -> Result<(), E>,
) -> u8
where
    C: ConfigFile,
    E: std::fmt::Display,
{
    let cfg = match C::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if check_only {
        let problems = cfg.check_files();
        for p in &problems {
            eprintln!("error: config file {}: {p}", path.display());
        }
        if !problems.is_empty() {
            return 2;
        }
        println!(
            "config {} is valid (and every file it names can be used)",
            path.display()
        );
        return 0;
    }
    match run(cfg) {
        Ok(()) => 0,
        Err(e) => {
            // `{:#}` of anyhow's error prints its causes too.
            eprintln!("error: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        #[allow(dead_code)]
        a: u32,
    }

    #[test]
    fn errors_name_origin_and_key() {
        let e = parse_yaml::<T>("b: 1", "x.yaml").unwrap_err().to_string();
        assert!(e.contains("x.yaml") && e.contains('b'), "{e}");
        let e = load_yaml::<T>(Path::new("/nonexistent/x.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.yaml"), "{e}");
    }

    #[derive(Debug, serde::Deserialize)]
    struct Ports {
        ports: Vec<u32>,
    }
    impl ConfigFile for Ports {
        fn validate(&self) -> Result<(), ConfigError> {
            match self.ports.iter().find(|p| !(1..=65535).contains(*p)) {
                Some(p) => Err(ConfigError::Invalid(format!("ports: {p} is not a port"))),
                None => Ok(()),
            }
        }
    }

    #[test]
    fn parse_and_validation_errors_name_the_file_alike() {
        let dir = std::env::temp_dir().join(format!("ctw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.yaml");
        std::fs::write(&file, "ports: [70000]\n").unwrap();
        let e = Ports::load(&file).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("config file {}: ports: 70000 is not a port", file.display())
        );
        std::fs::write(&file, "ports: [x]\n").unwrap();
        let e = Ports::load(&file).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("config file {}: ports", file.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_are_opened_as_they_will_be_used() {
        let dir = std::env::temp_dir().join(format!("ctw-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let present = dir.join("ca.pem");
        std::fs::write(&present, "x").unwrap();
        let missing = dir.join("missing.pem");
        let new_dir = dir.join("spool/sub");
        let not_dir = present.join("sub");
        let p = check_files(&[
            ("tls.ca_file", &present, FileUse::Read),
            ("tls.cert_file", &missing, FileUse::Read),
            ("tls.key_file", &dir, FileUse::Read),
            ("spool_dir", &new_dir, FileUse::WriteDir),
            ("log.path", &not_dir, FileUse::WriteDir),
        ]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with(&format!("tls.cert_file: cannot read {}", missing.display())));
        assert!(p[1].starts_with("tls.key_file: cannot read"), "{p:?}");
        assert!(
            p[2].starts_with("log.path:") && p[2].contains("not a directory"),
            "{p:?}"
        );
        assert!(!new_dir.exists(), "the check creates nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_flow_list_is_a_syntax_error_with_its_position() {
        let e = parse_yaml::<Ports>("ports: [80, 443\nlog:\n  path: /tmp/x.log\n", "a.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config file a.yaml: YAML syntax error"),
            "{e}"
        );
        assert!(e.contains("line") && e.contains("column"), "{e}");
    }
}

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

/// A config file's top-level struct: YAML, then checks serde cannot make.
pub trait ConfigFile: DeserializeOwned {
    /// Checks of values and of how they fit together.
    fn validate(&self) -> Result<(), ConfigError>;

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

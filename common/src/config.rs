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
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// Parse YAML text; `origin` names it in errors (a path, or `<text>`).
pub fn parse_yaml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_string(),
        message: e.to_string(),
    })
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
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse and validate YAML text.
    fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = parse_yaml(text, "<text>")?;
        cfg.validate()?;
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
}

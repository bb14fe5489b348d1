//! Exit codes (the contract scripts rely on) and the one error type.

/// What `ctw` exits with. Documented in `ctw --help` and `cli/README.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Found / done.
    Ok = 0,
    /// Nothing found (search, lookup), or a line did not resolve to exactly
    /// one pod (resolve: not found, ambiguous or unparsed).
    NotFound = 1,
    /// Bad arguments or config; also a request the server refused as invalid
    /// (HTTP 400).
    Usage = 2,
    /// Network, TLS, authentication (401) or server error; the message has
    /// the HTTP status.
    Server = 3,
    /// Found, but the answer may be incomplete: an agent lost events or was
    /// disconnected in the time range.
    Incomplete = 4,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// An error with the exit code it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::Usage,
            message: message.into(),
        }
    }

    pub fn server(message: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::Server,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::NotFound,
            message: message.into(),
        }
    }
}

/// Map an HTTP error answer (`{"error": ..., "parameter": ...}`) to an error:
/// 400 is the caller's mistake (exit 2), 404 "not found" (exit 1), anything
/// else a server or auth problem (exit 3).
pub fn from_status(status: u16, body: &serde_json::Value) -> CliError {
    use serde::Deserialize;
    let answer = ctw_common::api::ErrorAnswer::deserialize(body).ok();
    let msg = answer
        .as_ref()
        .map(|a| a.error.clone())
        .unwrap_or_else(|| body.to_string());
    let param = answer
        .and_then(|a| a.parameter)
        .map(|p| format!(" (parameter {p})"))
        .unwrap_or_default();
    let text = format!("HTTP {status}: {msg}{param}");
    match status {
        400 => CliError::usage(format!("the collector refused the request: {text}")),
        401 => CliError::server(format!(
            "{text}: check --token, CTW_TOKEN or the config file"
        )),
        404 => CliError::not_found(text),
        _ => CliError::server(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_map_to_exit_codes() {
        let e = from_status(
            400,
            &json!({"error": "limit: must be 1-100", "parameter": "limit"}),
        );
        assert_eq!(e.exit, Exit::Usage);
        assert!(
            e.message.contains("HTTP 400") && e.message.contains("parameter limit"),
            "{e}"
        );
        let e = from_status(401, &json!({"error": "missing or wrong bearer token"}));
        assert_eq!(e.exit, Exit::Server);
        assert!(e.message.contains("HTTP 401"), "{e}");
        assert_eq!(
            from_status(404, &json!({"error": "no entry"})).exit,
            Exit::NotFound
        );
        for s in [413, 500, 502, 503, 504] {
            let e = from_status(s, &json!("plain"));
            assert_eq!(e.exit, Exit::Server);
            assert!(e.message.contains(&format!("HTTP {s}")), "{e}");
        }
        assert_eq!(
            [
                Exit::Ok,
                Exit::NotFound,
                Exit::Usage,
                Exit::Server,
                Exit::Incomplete
            ]
            .map(Exit::code),
            [0, 1, 2, 3, 4]
        );
    }
}

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
    // A live lookup that no agent answered (502/504) lists each failure
    // (with replicas, the collector that could not be reached) and the
    // agents that did not have the entry.
    let list = |key: &str| -> Vec<&str> {
        body.get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default()
    };
    let mut detail = String::new();
    let failures = list("failures");
    if !failures.is_empty() {
        detail.push_str(&format!(": {}", failures.join("; ")));
    }
    let not_found = list("not_found");
    if !not_found.is_empty() {
        detail.push_str(&format!("; not found on {}", not_found.join(", ")));
    }
    let text = format!("HTTP {status}: {msg}{param}{detail}");
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
    fn a_lookup_that_no_agent_answered_names_each_failure() {
        // The collector's 502 lists why each agent could not answer (with
        // replicas: which collector could not be reached); ctw printed only
        // "no agent found the entry and some could not answer".
        let e = from_status(
            502,
            &json!({
                "error": "no agent found the entry and some could not answer",
                "not_found": ["n3"],
                "failures": [
                    "n1: agent error: via collector c2 (198.18.0.10:9359): tcp connect error",
                    "n2: timeout"
                ]
            }),
        );
        assert_eq!(e.exit, Exit::Server);
        assert!(
            e.message.contains("via collector c2 (198.18.0.10:9359)")
                && e.message.contains("n2: timeout")
                && e.message.contains("not found on n3"),
            "{e}"
        );
    }

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

//! The collector's HTTP API over a small blocking client (ureq; rustls on
//! ring for https). Every answer is JSON; HTTP error statuses are returned,
//! not raised, so each command maps them itself.

use std::time::Duration;

use serde_json::Value;

use crate::config::Settings;
use crate::error::CliError;

/// Largest answer read (a resolve batch of 20,000 lines with records).
const MAX_ANSWER_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Client {
    pub fn new(s: &Settings) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(300)))
            .user_agent(concat!("ctw/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Client {
            agent,
            base: s.server.clone(),
            token: s.token.clone(),
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub fn get(&self, path: &str, query: &[(String, String)]) -> Result<Reply, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url).header("Authorization", self.auth());
        for (k, v) in query {
            req = req.query(k, v);
        }
        let resp = req.call().map_err(|e| self.net_error(e))?;
        self.reply(path, resp)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Reply, CliError> {
        let url = format!("{}{path}", self.base);
        let bytes = serde_json::to_vec(body)
            .map_err(|e| CliError::usage(format!("cannot encode request: {e}")))?;
        let resp = self
            .agent
            .post(&url)
            .header("Authorization", self.auth())
            .content_type("application/json")
            .send(&bytes[..])
            .map_err(|e| self.net_error(e))?;
        self.reply(path, resp)
    }

    fn net_error(&self, e: ureq::Error) -> CliError {
        CliError::server(format!(
            "cannot talk to the collector at {}: {e}",
            self.base
        ))
    }

    /// The answer as JSON. Every answer of the collector's API is JSON, its
    /// errors too: one that is not comes from something else at `--server`
    /// (an agent's port, a proxy's error page), and the error says so.
    fn reply(
        &self,
        path: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<Reply, CliError> {
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(|e| CliError::server(format!("HTTP {status}: cannot read the answer: {e}")))?;
        let body = serde_json::from_str(&text).map_err(|_| {
            let shown: String = text.chars().take(200).collect();
            CliError::server(format!(
                "{} does not answer like a conntrack-watch collector: {path} gave HTTP {status} \
                 and {}; check --server (CTW_SERVER): it must be the collector's HTTP API, not an \
                 agent's port (an agent serves /metrics and /api/conntrack/query) or a proxy",
                self.base,
                if shown.trim().is_empty() {
                    "an empty answer".to_string()
                } else {
                    format!("an answer that is not JSON: {shown:?}")
                },
            ))
        })?;
        Ok(Reply { status, body })
    }
}

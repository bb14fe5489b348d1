//! Agent configuration: the seed tool's YAML file loads unchanged, plus the
//! agent's own keys. Unknown keys are rejected with their name; bad values are
//! reported with the key and the value.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ctw_common::Protocol;
use serde::Deserialize;

pub use crate::filter::{Cidr, Match};

pub use crate::logfile::LogConfig;
pub use crate::uplink::UplinkConfig;

/// Default HTTP listener of the seed tool.
pub const DEFAULT_HTTP_LISTEN: &str = ":9358";
/// Default netlink receive buffer: 64 MiB holds about 50,000 queued events.
pub const DEFAULT_RCVBUF_BYTES: usize = 64 << 20;

pub use ctw_common::config::{ConfigError, ConfigFile};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Original destination ports to watch (the seed's `ports`).
    pub ports: Vec<u32>,
    /// Protocols to keep; empty or absent = every protocol with ports.
    #[serde(default)]
    pub protocols: Vec<Protocol>,
    /// Where a watched port is looked for: `original` (the original
    /// destination port, the seed's rule) and/or `reply` (the reply source
    /// port, i.e. the port after DNAT: NodePort and other service backends).
    /// Default `[original]`.
    #[serde(default = "default_match", rename = "match")]
    pub match_on: Vec<Match>,
    /// Pod address blocks; records whose original source is outside all of
    /// them are marked external clients (`status` bit `CTW_EXTERNAL`, log
    /// field `"external": true`). Absent or empty = no marking.
    #[serde(default)]
    pub pod_cidrs: Vec<Cidr>,
    /// Also record DESTROY events (connection closed, with counters).
    #[serde(default = "yes")]
    pub capture_destroy: bool,
    /// Name of this node in records; default: `$NODE_NAME`, else the hostname.
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub prometheus: PrometheusConfig,
    #[serde(default)]
    pub web_ui: WebUiConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub netlink: NetlinkConfig,
    /// Stream records to a collector; absent = standalone agent.
    #[serde(default)]
    pub collector: Option<UplinkConfig>,
}

fn yes() -> bool {
    true
}

fn default_match() -> Vec<Match> {
    vec![Match::Original]
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Serve `/metrics`.
    pub enabled: bool,
    /// The seed's metrics address; used for the single HTTP listener when
    /// `http.listen_addr` is not set.
    pub listen_addr: Option<String>,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            enabled: true,
            listen_addr: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebUiConfig {
    /// Serve the query page at `/`.
    pub enabled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port`, `[v6]:port` or `:port` (all addresses). Default `:9358`.
    pub listen_addr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetlinkConfig {
    /// Event socket receive buffer, set with SO_RCVBUFFORCE.
    pub rcvbuf_bytes: usize,
    /// Messages read per `recvmmsg` call.
    pub batch_messages: usize,
    /// Attach the classic BPF filter so unwatched ports never reach user space.
    pub kernel_filter: bool,
}

impl Default for NetlinkConfig {
    fn default() -> Self {
        NetlinkConfig {
            rcvbuf_bytes: DEFAULT_RCVBUF_BYTES,
            batch_messages: 256,
            kernel_filter: true,
        }
    }
}

impl ConfigFile for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.ports.is_empty() {
            return bad("ports: at least one port is needed".into());
        }
        for (i, &p) in self.ports.iter().enumerate() {
            if p == 0 || p > 65535 {
                return bad(format!("ports[{i}]: must be 1-65535, got {p}"));
            }
        }
        if self.match_on.is_empty() {
            return bad("match: name at least one of original, reply".into());
        }
        if let Some(n) = &self.node_name {
            if n.trim().is_empty() || n.len() > 253 {
                return bad(format!("node_name: must be 1-253 characters, got {n:?}"));
            }
        }
        self.log.validate().map_err(ConfigError::Invalid)?;
        if let Some(c) = &self.collector {
            c.validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if self.netlink.rcvbuf_bytes < 4096 {
            return bad(format!(
                "netlink.rcvbuf_bytes: must be at least 4096, got {}",
                self.netlink.rcvbuf_bytes
            ));
        }
        if !(1..=4096).contains(&self.netlink.batch_messages) {
            return bad(format!(
                "netlink.batch_messages: must be 1-4096, got {}",
                self.netlink.batch_messages
            ));
        }
        if let Some(a) = &self.http.listen_addr {
            parse_listen_addr(a)
                .map_err(|e| ConfigError::Invalid(format!("http.listen_addr: {e}")))?;
        }
        if let Some(a) = &self.prometheus.listen_addr {
            parse_listen_addr(a)
                .map_err(|e| ConfigError::Invalid(format!("prometheus.listen_addr: {e}")))?;
        }
        if let (Some(h), Some(p)) = (&self.http.listen_addr, &self.prometheus.listen_addr) {
            if parse_listen_addr(h).ok() != parse_listen_addr(p).ok() {
                return bad(format!(
                    "http.listen_addr {h:?} and prometheus.listen_addr {p:?} differ; the agent has one HTTP listener, set only one of them"
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The watched ports as `u16` (validated to fit).
    pub fn ports_u16(&self) -> Vec<u16> {
        self.ports.iter().map(|&p| p as u16).collect()
    }

    /// The single HTTP listener: `http.listen_addr`, else the seed's
    /// `prometheus.listen_addr`, else `:9358`.
    pub fn http_listen_addr(&self) -> SocketAddr {
        let text = self
            .http
            .listen_addr
            .as_deref()
            .or(self.prometheus.listen_addr.as_deref())
            .unwrap_or(DEFAULT_HTTP_LISTEN);
        // Validated in `validate`; the default always parses.
        parse_listen_addr(text).unwrap_or(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 9358))
    }

    /// The node name for records: `node_name`, else `$NODE_NAME`, else the hostname.
    pub fn resolve_node_name(&self) -> String {
        if let Some(n) = &self.node_name {
            return n.trim().to_string();
        }
        if let Ok(n) = std::env::var("NODE_NAME") {
            if !n.trim().is_empty() {
                return n.trim().to_string();
            }
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".to_string())
    }
}

/// Parse Go-style listen addresses: `:9358` (all addresses), `0.0.0.0:9358`,
/// `127.0.0.1:9358`, `[::1]:9358`.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("bad port in {s:?} (expected host:port or :port)"))?;
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("cannot parse {s:?} (expected host:port, [v6]:port or :port)"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The seed tool's config file, verbatim.
    const SEED: &str = r#"
ports:
  - 80
  - 443

log:
  path: "/var/log/nat-tracker/nat.log"
  max_size_mb: 100
  max_backups: 10
  max_age_days: 7
  compress: true

prometheus:
  enabled: true
  listen_addr: ":9100"

web_ui:
  enabled: false  # serve the query page
"#;

    #[test]
    fn seed_config_loads_unchanged() {
        let c = Config::parse(SEED).unwrap();
        assert_eq!(c.ports_u16(), vec![80, 443]);
        assert_eq!(c.log.max_size_mb, 100);
        assert!(c.log.compress);
        assert!(c.prometheus.enabled);
        assert!(!c.web_ui.enabled);
        assert!(c.capture_destroy);
        assert_eq!(c.http_listen_addr().port(), 9100);
    }

    #[test]
    fn default_listener_is_9358() {
        let c = Config::parse("ports: [443]").unwrap();
        assert_eq!(c.http_listen_addr().to_string(), "[::]:9358");
    }

    #[test]
    fn misspelled_key_is_named() {
        let e = Config::parse("ports: [80]\nlog:\n  max_sise_mb: 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_sise_mb"), "{e}");
        let e = Config::parse("portz: [80]\n").unwrap_err().to_string();
        assert!(e.contains("portz"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = Config::parse("ports: [80, 70000]").unwrap_err().to_string();
        assert!(e.contains("ports[1]") && e.contains("70000"), "{e}");
        let e = Config::parse("ports: []").unwrap_err().to_string();
        assert!(e.contains("ports"), "{e}");
        let e = Config::parse("ports: [80]\nprotocols: [icmp]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("icmp"), "{e}");
        let e = Config::parse("ports: [80]\nhttp:\n  listen_addr: 'nonsense'")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("http.listen_addr") && e.contains("nonsense"),
            "{e}"
        );
        let e = Config::parse("ports: [80]\nnetlink:\n  rcvbuf_bytes: 10")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("netlink.rcvbuf_bytes") && e.contains("10"),
            "{e}"
        );
    }

    #[test]
    fn match_and_pod_cidrs() {
        let c = Config::parse("ports: [80]").unwrap();
        assert_eq!(c.match_on, vec![Match::Original], "seed behaviour");
        assert!(c.pod_cidrs.is_empty());
        let c = Config::parse(
            "ports: [80]\nmatch: [original, reply]\npod_cidrs: [198.18.0.0/16, 'fd00:198:18::/48']",
        )
        .unwrap();
        assert_eq!(c.match_on, vec![Match::Original, Match::Reply]);
        assert_eq!(c.pod_cidrs.len(), 2);
        let e = Config::parse("ports: [80]\nmatch: [original, replies]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replies"), "{e}");
        let e = Config::parse("ports: [80]\nmatch: []")
            .unwrap_err()
            .to_string();
        assert!(e.contains("match"), "{e}");
        let e = Config::parse("ports: [80]\npod_cidrs: [198.18.0.0/40]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("198.18.0.0/40") && e.contains("0-32"), "{e}");
    }

    #[test]
    fn collector_section_is_validated() {
        let base = "ports: [80]\ncollector:\n  address: https://c:9359\n  tls: {ca_file: a, cert_file: b, key_file: c}\n";
        Config::parse(base).unwrap();
        let e = Config::parse(&format!("{base}  spool_max_mb: 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("collector.spool_max_mb"), "{e}");
        let e = Config::parse(&format!("{base}  spool_dirr: /x\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("spool_dirr"), "{e}");
    }

    #[test]
    fn conflicting_listeners_are_refused() {
        let e = Config::parse(
            "ports: [80]\nhttp: {listen_addr: ':1'}\nprometheus: {listen_addr: ':2'}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("one HTTP listener"), "{e}");
        let c = Config::parse("ports: [80]\nhttp: {listen_addr: '127.0.0.1:9000'}").unwrap();
        assert_eq!(c.http_listen_addr().to_string(), "127.0.0.1:9000");
    }

    #[test]
    fn every_example_config_loads() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("agent") && name.ends_with(".yaml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "expected the agent examples in config/, found {n}");
    }
}

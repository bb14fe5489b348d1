//! The agent's stream to the collector. (Being built: see issue 3.)

use std::path::PathBuf;

use serde::Deserialize;

/// `collector:` section of the agent config. Absent = standalone agent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// `https://host:port` of the collector's gRPC listener.
    pub address: String,
    pub tls: UplinkTls,
    /// Where unacknowledged batches are spooled while the collector is away.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Spool bound; when full the oldest batches are dropped and the exact
    /// loss is reported.
    #[serde(default = "default_spool_max_mb")]
    pub spool_max_mb: u64,
    /// A batch is sent when it has this many records ...
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// ... or when its oldest record is this old.
    #[serde(default = "default_batch_max_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// Batches sent and not yet acknowledged before new ones wait in memory
    /// (and then in the spool).
    #[serde(default = "default_max_inflight_batches")]
    pub max_inflight_batches: usize,
    /// The node's own addresses (the SNAT addresses it owns), reported in
    /// Hello. Empty = every global address of the host's interfaces.
    #[serde(default)]
    pub node_addresses: Vec<String>,
    /// TLS server name to verify; default: the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/lib/conntrack-watch/spool")
}
fn default_spool_max_mb() -> u64 {
    1024
}
fn default_batch_max_records() -> usize {
    2000
}
fn default_batch_max_delay_ms() -> u64 {
    200
}
fn default_max_inflight_batches() -> usize {
    64
}

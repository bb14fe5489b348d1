//! Collector configuration. Unknown keys are rejected with their name; bad
//! values are reported with the key and the value.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub use ctw_common::config::{ConfigError, ConfigFile, FileUse};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub grpc: GrpcConfig,
    pub http: HttpConfig,
    /// `storage.backend` picks the store: `tantivy` (default, the keys of
    /// [`StorageConfig`]) or `clickhouse` ([`ClickHouseConfig`]).
    pub storage: Storage,
    #[serde(default)]
    pub lookup: LookupConfig,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Several collectors on one ClickHouse database (`peers.rs`): present
    /// turns replicas on; needs `storage.backend: clickhouse`.
    #[serde(default)]
    pub replicas: Option<ReplicasConfig>,
}

/// The `replicas` section: this collector's name and address among its
/// peers, and the lease timing (see `crate::peers`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasConfig {
    /// This collector's id in the lease table: `$HOSTNAME` (in Kubernetes
    /// the pod name), else the kernel's host name, when unset.
    pub collector_id: Option<String>,
    /// `host:port` the other collectors dial for forwarded lookups (this
    /// collector's gRPC port): `$POD_IP` (the downward API's
    /// `status.podIP`) or else the collector id, with the port of
    /// `grpc.listen_addr`, when unset.
    pub advertise_addr: Option<String>,
    /// TLS name the peers' certificates carry (they share this
    /// collector's): the first DNS name of `grpc.tls.cert_file` when unset.
    pub peer_server_name: Option<String>,
    /// A lease not renewed for this long is over (the collector holding
    /// it is gone), ms.
    pub lease_ttl_ms: u64,
    /// How often held leases are renewed and the lease table read, ms.
    pub renew_interval_ms: u64,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        ReplicasConfig {
            collector_id: None,
            advertise_addr: None,
            peer_server_name: None,
            lease_ttl_ms: 15_000,
            renew_interval_ms: 3_000,
        }
    }
}

/// `kubernetes.enabled`: whether the collector watches Pods to name pod IPs.
/// YAML `true`/`false` (booleans) or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "EnabledValue")]
pub enum KubernetesEnabled {
    /// On when `kubeconfig` is set or the collector runs in a pod.
    #[default]
    Auto,
    True,
    False,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EnabledValue {
    Bool(bool),
    Text(String),
}

impl TryFrom<EnabledValue> for KubernetesEnabled {
    type Error = String;
    fn try_from(v: EnabledValue) -> Result<Self, String> {
        match v {
            EnabledValue::Bool(true) => Ok(KubernetesEnabled::True),
            EnabledValue::Bool(false) => Ok(KubernetesEnabled::False),
            EnabledValue::Text(t) => match t.as_str() {
                "auto" => Ok(KubernetesEnabled::Auto),
                "true" => Ok(KubernetesEnabled::True),
                "false" => Ok(KubernetesEnabled::False),
                _ => Err(format!(
                    "kubernetes.enabled: expected auto, true or false, got {t:?}"
                )),
            },
        }
    }
}

/// Default `kubernetes.max_closed_intervals`: about 103 MB of closed
/// pod IP intervals (103 bytes each, BENCHMARKS.md §4).
pub const DEFAULT_MAX_CLOSED_INTERVALS: usize = crate::pods::history::DEFAULT_MAX_CLOSED;
/// Default `kubernetes.workload_series_max`.
pub const DEFAULT_WORKLOAD_SERIES_MAX: usize = 500;

/// The `kubernetes` section: the pod watch (pod names in answers).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub enabled: KubernetesEnabled,
    /// A kubeconfig file (its current context); the in-cluster service
    /// account when unset.
    pub kubeconfig: Option<PathBuf>,
    /// Directory of the pod history's journal: `storage.path/pods` by
    /// default; required with `storage.backend: clickhouse` (no local
    /// storage path) when the watch is on.
    pub history_dir: Option<PathBuf>,
    /// Most closed pod IP intervals kept in memory (and in the journal):
    /// about 103 bytes each. Past it the oldest are evicted, and times that
    /// only they covered are answered `pod: null`, reason `history_gap`.
    /// At least 1.
    pub max_closed_intervals: usize,
    /// Most label sets of `ctw_collector_workload_new_connections_total`
    /// (namespace, workload kind, workload, port); connections past it count
    /// in its one `_other` series. At least 1.
    pub workload_series_max: usize,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: KubernetesEnabled::default(),
            kubeconfig: None,
            history_dir: None,
            max_closed_intervals: DEFAULT_MAX_CLOSED_INTERVALS,
            workload_series_max: DEFAULT_WORKLOAD_SERIES_MAX,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Where agents connect (mTLS), e.g. `0.0.0.0:9359`.
    #[serde(default = "default_grpc_listen")]
    pub listen_addr: String,
    pub tls: TlsFiles,
}

fn default_grpc_listen() -> String {
    "[::]:9359".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA that signs agent certificates (and, usually, the collector's).
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_http_listen")]
    pub listen_addr: String,
    /// File holding the API token (`Authorization: Bearer TOKEN`).
    pub token_file: PathBuf,
    /// Largest `limit` a search may ask for.
    #[serde(default = "default_max_limit")]
    pub max_limit: usize,
}

fn default_http_listen() -> String {
    "[::]:9360".into()
}
fn default_max_limit() -> usize {
    10_000
}

/// Where records are stored: the `storage` section, tagged by its
/// `backend` key (`tantivy` when absent, so configs written before the
/// key existed keep working).
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    /// `backend: tantivy`: the embedded index in a local directory.
    Tantivy(StorageConfig),
    /// `backend: clickhouse`: a ClickHouse server (or cluster) over HTTP.
    ClickHouse(ClickHouseConfig),
}

impl Storage {
    /// The store this section names, with the store's own options.
    pub fn backend(&self) -> crate::store::Backend {
        match self {
            Storage::Tantivy(t) => crate::store::Backend::Tantivy(t.store_options()),
            Storage::ClickHouse(c) => crate::store::Backend::ClickHouse(c.clone()),
        }
    }

    /// Days of records kept (`storage.retention_days`, either backend).
    pub fn retention_days(&self) -> u32 {
        match self {
            Storage::Tantivy(t) => t.retention_days,
            Storage::ClickHouse(c) => c.retention_days,
        }
    }

    /// The collector's local directory (`storage.path`), when the backend
    /// has one (tantivy); ClickHouse keeps nothing locally.
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        match self {
            Storage::Tantivy(t) => Some(&t.path),
            Storage::ClickHouse(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Storage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut v = serde_yaml::Value::deserialize(d)?;
        let backend = match v.as_mapping_mut().and_then(|m| m.remove("backend")) {
            None => "tantivy".to_string(),
            Some(serde_yaml::Value::String(s)) => s,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "storage.backend: expected tantivy or clickhouse, got {other:?}"
                )))
            }
        };
        let inner = |e: serde_yaml::Error| D::Error::custom(format!("storage ({backend}): {e}"));
        match backend.as_str() {
            "tantivy" => StorageConfig::deserialize(v)
                .map(Storage::Tantivy)
                .map_err(inner),
            "clickhouse" => ClickHouseConfig::deserialize(v)
                .map(Storage::ClickHouse)
                .map_err(inner),
            other => Err(D::Error::custom(format!(
                "storage.backend: unknown backend {other:?} (expected tantivy or clickhouse)"
            ))),
        }
    }
}

/// The `storage` section with `backend: clickhouse`: the store's own
/// options type (the store knows no app configuration).
pub use crate::store::clickhouse::ClickHouseOptions as ClickHouseConfig;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of the index partitions and the write-ahead log.
    pub path: PathBuf,
    /// Partitions older than this are dropped.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Oldest partitions are dropped while the total exceeds this.
    #[serde(default = "default_max_size_gb")]
    pub max_size_gb: f64,
    /// How often the index commits: acknowledged records are searchable at
    /// once (from memory until then); a commit writes them as a segment.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Commit sooner when this many records wait in memory (bounds the
    /// memory they use, about 200 bytes each).
    #[serde(default = "default_commit_max_records")]
    pub commit_max_records: u64,
    /// Width of one partition.
    #[serde(default = "default_partition_hours")]
    pub partition_hours: u32,
    /// How far before a query's range to look for connections still alive
    /// in it (long-lived connections logged their NEW earlier).
    #[serde(default = "default_lookback_hours")]
    pub lookback_hours: u32,
    /// Most records one search collects and joins into connections (bounds
    /// its memory, about 200 bytes a record); past it, matching records
    /// are only counted (see `store::counts_uncollected` for when `total`
    /// is then exact).
    #[serde(default = "default_max_collected_records")]
    pub max_collected_records: usize,
}

impl StorageConfig {
    /// The store's options from this section (the tuning knobs the file
    /// does not set keep their defaults).
    pub fn store_options(&self) -> crate::store::tantivy_store::StoreOptions {
        crate::store::tantivy_store::StoreOptions {
            path: self.path.clone(),
            retention_days: self.retention_days,
            max_size_gb: self.max_size_gb,
            commit_interval_ms: self.commit_interval_ms,
            commit_max_records: self.commit_max_records,
            partition_hours: self.partition_hours,
            lookback_hours: self.lookback_hours,
            max_collected_docs: self.max_collected_records,
            ..crate::store::tantivy_store::StoreOptions::default()
        }
    }
}

fn default_retention_days() -> u32 {
    crate::store::DEFAULT_RETENTION_DAYS
}
fn default_max_size_gb() -> f64 {
    50.0
}
fn default_commit_interval_ms() -> u64 {
    10_000
}
fn default_commit_max_records() -> u64 {
    300_000
}
fn default_partition_hours() -> u32 {
    24
}
fn default_lookback_hours() -> u32 {
    crate::store::DEFAULT_LOOKBACK_HOURS
}
fn default_max_collected_records() -> usize {
    crate::store::DEFAULT_MAX_COLLECTED_RECORDS
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupConfig {
    /// How long a live lookup waits for an agent's answer.
    pub timeout_ms: u64,
    /// Agents asked at once when the owner is unknown.
    pub max_concurrency: usize,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig {
            timeout_ms: 3000,
            max_concurrency: 16,
        }
    }
}

impl ConfigFile for Config {
    fn files(&self) -> Vec<(&'static str, &std::path::Path, FileUse)> {
        vec![
            (
                "grpc.tls.ca_file",
                self.grpc.tls.ca_file.as_path(),
                FileUse::Read,
            ),
            (
                "grpc.tls.cert_file",
                self.grpc.tls.cert_file.as_path(),
                FileUse::Read,
            ),
            (
                "grpc.tls.key_file",
                self.grpc.tls.key_file.as_path(),
                FileUse::Read,
            ),
            (
                "http.token_file",
                self.http.token_file.as_path(),
                FileUse::Read,
            ),
        ]
        .into_iter()
        .chain(match &self.storage {
            Storage::Tantivy(t) => Some(("storage.path", t.path.as_path(), FileUse::WriteDir)),
            Storage::ClickHouse(c) => c
                .password_file
                .as_deref()
                .map(|p| ("storage.password_file", p, FileUse::Read)),
        })
        .chain(
            self.kubernetes
                .kubeconfig
                .as_deref()
                .map(|k| ("kubernetes.kubeconfig", k, FileUse::Read)),
        )
        .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (key, v) in [
            ("grpc.listen_addr", &self.grpc.listen_addr),
            ("http.listen_addr", &self.http.listen_addr),
        ] {
            if v.parse::<SocketAddr>().is_err() {
                return bad(format!(
                    "{key}: cannot parse {v:?} (expected host:port or [v6]:port)"
                ));
            }
        }
        match &self.storage {
            Storage::Tantivy(t) => t.validate()?,
            Storage::ClickHouse(c) => c.validate()?,
        }
        if !(1..=1_000_000).contains(&self.http.max_limit) {
            return bad(format!(
                "http.max_limit: must be 1-1000000, got {}",
                self.http.max_limit
            ));
        }
        if !(100..=600_000).contains(&self.lookup.timeout_ms) {
            return bad(format!(
                "lookup.timeout_ms: must be 100-600000, got {}",
                self.lookup.timeout_ms
            ));
        }
        if self.lookup.max_concurrency == 0 {
            return bad("lookup.max_concurrency: must be at least 1, got 0".into());
        }
        for (key, v) in [
            (
                "kubernetes.max_closed_intervals",
                self.kubernetes.max_closed_intervals,
            ),
            (
                "kubernetes.workload_series_max",
                self.kubernetes.workload_series_max,
            ),
        ] {
            if v == 0 {
                return bad(format!("{key}: must be at least 1, got 0"));
            }
        }
        if self.kubernetes.enabled == KubernetesEnabled::True
            && self.kubernetes.history_dir.is_none()
            && self.storage.local_dir().is_none()
        {
            return bad(
                "kubernetes.history_dir: required with kubernetes.enabled true and \
                 storage.backend clickhouse (the pod history's journal needs a local directory)"
                    .into(),
            );
        }
        if let Some(r) = &self.replicas {
            if !matches!(self.storage, Storage::ClickHouse(_)) {
                return bad(
                    "replicas: needs storage.backend clickhouse (the lease table lives there)"
                        .into(),
                );
            }
            r.validate()?;
        }
        Ok(())
    }
}

impl ReplicasConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(id) = &self.collector_id {
            if id.is_empty() || id.len() > 253 {
                return bad(format!(
                    "replicas.collector_id: 1-253 characters, got {id:?}"
                ));
            }
        }
        if let Some(a) = &self.advertise_addr {
            // A host name, an IPv4 address or a bracketed IPv6 address: an
            // IPv6 address without brackets is no URI authority to dial.
            let host_ok = |h: &str| {
                !h.is_empty()
                    && (!h.contains(':')
                        || h.strip_prefix('[')
                            .and_then(|h| h.strip_suffix(']'))
                            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok()))
            };
            match a.rsplit_once(':') {
                Some((h, p)) if host_ok(h) && p.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => {
                    return bad(format!(
                        "replicas.advertise_addr: expected host:port or [IPv6]:port, got {a:?}"
                    ))
                }
            }
        }
        if !(1000..=600_000).contains(&self.lease_ttl_ms) {
            return bad(format!(
                "replicas.lease_ttl_ms: must be 1000-600000, got {}",
                self.lease_ttl_ms
            ));
        }
        if self.renew_interval_ms < 100 || self.renew_interval_ms * 2 > self.lease_ttl_ms {
            return bad(format!(
                "replicas.renew_interval_ms: must be 100 to half of lease_ttl_ms ({}), got {}",
                self.lease_ttl_ms, self.renew_interval_ms
            ));
        }
        Ok(())
    }
}

impl StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.retention_days == 0 {
            return bad("storage.retention_days: must be at least 1, got 0".into());
        }
        if self.max_size_gb.is_nan() || self.max_size_gb <= 0.0 {
            return bad(format!(
                "storage.max_size_gb: must be positive, got {}",
                self.max_size_gb
            ));
        }
        if !(50..=60_000).contains(&self.commit_interval_ms) {
            return bad(format!(
                "storage.commit_interval_ms: must be 50-60000, got {}",
                self.commit_interval_ms
            ));
        }
        if !(1000..=10_000_000).contains(&self.commit_max_records) {
            return bad(format!(
                "storage.commit_max_records: must be 1000-10000000, got {}",
                self.commit_max_records
            ));
        }
        if !(1..=168).contains(&self.partition_hours)
            || 24 % self.partition_hours != 0 && self.partition_hours % 24 != 0
        {
            return bad(format!(
                "storage.partition_hours: must divide a day or be whole days (1-168), got {}",
                self.partition_hours
            ));
        }
        Ok(())
    }
}

impl ClickHouseConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return bad(format!(
                "storage.url: expected http://host:port, got {:?}",
                self.url
            ));
        }
        if self.database.is_empty()
            || !self
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad(format!(
                "storage.database: letters, digits and _ only, got {:?}",
                self.database
            ));
        }
        if self.retention_days == 0 {
            return bad("storage.retention_days: must be at least 1, got 0".into());
        }
        if !(100..=600_000).contains(&self.connect_retry_ms) {
            return bad(format!(
                "storage.connect_retry_ms: must be 100-600000, got {}",
                self.connect_retry_ms
            ));
        }
        if !(100..=3_600_000).contains(&self.timeout_ms) {
            return bad(format!(
                "storage.timeout_ms: must be 100-3600000, got {}",
                self.timeout_ms
            ));
        }
        if self.insert_interval_ms > 60_000 {
            return bad(format!(
                "storage.insert_interval_ms: must be 0-60000, got {}",
                self.insert_interval_ms
            ));
        }
        if !(1..=10_000_000).contains(&self.insert_max_records) {
            return bad(format!(
                "storage.insert_max_records: must be 1-10000000, got {}",
                self.insert_max_records
            ));
        }
        if let Some(c) = &self.cluster {
            let ident = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            };
            if !ident(&c.name) {
                return bad(format!(
                    "storage.cluster.name: the remote_servers name (letters, digits, _ and -), got {:?}",
                    c.name
                ));
            }
            if !c.zookeeper_path.starts_with('/')
                || !c.zookeeper_path.contains("{shard}")
                || c.zookeeper_path.contains('\'')
                || c.zookeeper_path.contains('\\')
            {
                return bad(format!(
                    "storage.cluster.zookeeper_path: an absolute ZooKeeper path holding the \
                     {{shard}} macro (each shard's replicas share one path), got {:?}",
                    c.zookeeper_path
                ));
            }
            for (i, shard) in c.shards.iter().enumerate() {
                if shard.is_empty() {
                    return bad(format!(
                        "storage.cluster.shards[{i}]: the HTTP URLs of the shard's replicas, got none"
                    ));
                }
                for url in shard {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return bad(format!(
                            "storage.cluster.shards[{i}]: an http:// or https:// URL, got {url:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MIN: &str = "grpc:\n  tls: {ca_file: ca.pem, cert_file: c.pem, key_file: k.pem}\nhttp:\n  token_file: t\nstorage:\n  path: /tmp/x\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.grpc.listen_addr, "[::]:9359");
        let Storage::Tantivy(t) = &c.storage else {
            panic!("default backend is not tantivy: {:?}", c.storage)
        };
        assert_eq!(t.retention_days, 14);
        assert_eq!(c.lookup.timeout_ms, 3000);
    }

    #[test]
    fn unknown_key_and_bad_value_are_named() {
        let e = Config::parse(&format!("{MIN}  retention_dayz: 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("retention_dayz"), "{e}");
        let e = Config::parse(&format!("{MIN}  retention_days: 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage.retention_days") && e.contains('0'),
            "{e}"
        );
        let e = Config::parse(&MIN.replace("grpc:\n", "grpc:\n  listen_addr: nope\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpc.listen_addr") && e.contains("nope"), "{e}");
    }

    #[test]
    fn kubernetes_section() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.kubernetes, KubernetesConfig::default());
        assert_eq!(c.kubernetes.enabled, KubernetesEnabled::Auto);
        let c = Config::parse(&format!(
            "{MIN}kubernetes:\n  enabled: true\n  kubeconfig: /k\n"
        ))
        .unwrap();
        assert_eq!(c.kubernetes.enabled, KubernetesEnabled::True);
        assert_eq!(c.kubernetes.kubeconfig, Some(PathBuf::from("/k")));
        let c = Config::parse(&format!("{MIN}kubernetes:\n  enabled: \"false\"\n")).unwrap();
        assert_eq!(c.kubernetes.enabled, KubernetesEnabled::False);
        assert_eq!(c.kubernetes.max_closed_intervals, 1_000_000);
        assert_eq!(c.kubernetes.workload_series_max, 500);
        let c = Config::parse(&format!(
            "{MIN}kubernetes:\n  max_closed_intervals: 5000\n  workload_series_max: 20\n"
        ))
        .unwrap();
        assert_eq!(
            (
                c.kubernetes.max_closed_intervals,
                c.kubernetes.workload_series_max
            ),
            (5000, 20)
        );
        for key in ["max_closed_intervals", "workload_series_max"] {
            let e = Config::parse(&format!("{MIN}kubernetes:\n  {key}: 0\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("kubernetes.{key}")), "{e}");
        }
        for bad in [
            "kubernetes:\n  enable: true\n",
            "kubernetes:\n  enabled: maybe\n",
        ] {
            let e = Config::parse(&format!("{MIN}{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("enable"), "{e}");
        }
    }

    #[test]
    fn storage_backend_is_tagged_and_checked() {
        let with = |extra: &str| Config::parse(&format!("{MIN}{extra}"));
        let c = with("  backend: tantivy\n").unwrap();
        assert!(matches!(c.storage, Storage::Tantivy(_)));
        let ch = MIN.replace(
            "  path: /tmp/x\n",
            "  backend: clickhouse\n  url: http://127.0.0.1:8123\n  database: ctw\n",
        );
        let c = Config::parse(&ch).unwrap();
        let Storage::ClickHouse(h) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!((h.database.as_str(), h.retention_days), ("ctw", 14));
        assert!(c.files().iter().all(|(k, ..)| *k != "storage.path"));
        let e = with("  backend: cassandra\n").unwrap_err().to_string();
        assert!(
            e.contains("cassandra") && e.contains("storage.backend"),
            "{e}"
        );
        // A tantivy key under clickhouse is unknown there, and named.
        let e = Config::parse(&format!("{ch}  commit_interval_ms: 5\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("commit_interval_ms"), "{e}");
        let e = Config::parse(&ch.replace("ctw\n", "\"a;b\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage.database"), "{e}");
        // Insert coalescing: defaults, and bad values named.
        assert_eq!((h.insert_interval_ms, h.insert_max_records), (200, 100_000));
        for (bad, key) in [
            (
                "  insert_interval_ms: 60001\n",
                "storage.insert_interval_ms",
            ),
            ("  insert_max_records: 0\n", "storage.insert_max_records"),
        ] {
            let e = Config::parse(&format!("{ch}{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        // Cluster mode: unset by default; name required, path defaulted
        // and checked.
        assert_eq!(h.cluster, None);
        let c = Config::parse(&format!(
            "{ch}  cluster:\n    name: ctw\n    insert_quorum: 2\n"
        ))
        .unwrap();
        let Storage::ClickHouse(h) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        let cl = h.cluster.as_ref().unwrap();
        assert_eq!(
            (
                cl.name.as_str(),
                cl.zookeeper_path.as_str(),
                cl.insert_quorum
            ),
            ("ctw", "/clickhouse/tables/{shard}", Some(2))
        );
        assert!(cl.shards.is_empty(), "through Distributed by default");
        let c = Config::parse(&format!(
            "{ch}  cluster:\n    name: ctw\n    shards:\n      - [http://a:8123, http://b:8123]\n      - [https://c:8443]\n"
        ))
        .unwrap();
        let Storage::ClickHouse(h) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!(
            h.cluster.as_ref().unwrap().shards,
            vec![
                vec!["http://a:8123".to_string(), "http://b:8123".to_string()],
                vec!["https://c:8443".to_string()]
            ]
        );
        for (bad, key) in [
            ("    name: \"a b\"\n", "storage.cluster.name"),
            (
                "    name: ctw\n    zookeeper_path: /ch/tables\n",
                "storage.cluster.zookeeper_path",
            ),
            ("    zookeeper_path: /x/{shard}\n", "name"),
            (
                "    name: ctw\n    shards: [[]]\n",
                "storage.cluster.shards[0]",
            ),
            (
                "    name: ctw\n    shards: [[\"http://a:8123\"], [\"a:8123\"]]\n",
                "storage.cluster.shards[1]",
            ),
        ] {
            let e = Config::parse(&format!("{ch}  cluster:\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn replicas_need_clickhouse_and_sane_lease_timing() {
        let ch = MIN.replace(
            "  path: /tmp/x\n",
            "  backend: clickhouse\n  url: http://127.0.0.1:8123\n",
        );
        let c = Config::parse(&format!("{ch}replicas: {{}}\n")).unwrap();
        assert_eq!(c.replicas, Some(ReplicasConfig::default()));
        assert_eq!(c.replicas.unwrap().lease_ttl_ms, 15_000);
        let c = Config::parse(&format!(
            "{ch}replicas:\n  collector_id: c1\n  advertise_addr: \"198.18.0.1:9359\"\n"
        ))
        .unwrap();
        assert_eq!(c.replicas.unwrap().collector_id.as_deref(), Some("c1"));
        for (bad, key) in [
            ("replicas:\n  collector: c1\n", "collector"),
            (
                "replicas:\n  advertise_addr: nope\n",
                "replicas.advertise_addr",
            ),
            ("replicas:\n  lease_ttl_ms: 10\n", "replicas.lease_ttl_ms"),
            (
                "replicas:\n  renew_interval_ms: 9000\n",
                "replicas.renew_interval_ms",
            ),
        ] {
            let e = Config::parse(&format!("{ch}{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let e = Config::parse(&format!("{MIN}replicas: {{}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("replicas") && e.contains("clickhouse"), "{e}");
    }

    #[test]
    fn lookup_timeout_and_peer_address_are_checked() {
        // A timeout of 0 never waits; u64::MAX overflowed the forwarded
        // lookups' timeout (twice it plus 1 s) at start.
        for v in ["0", "99", "600001", "18446744073709551615"] {
            let e = Config::parse(&format!("{MIN}lookup:\n  timeout_ms: {v}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("lookup.timeout_ms") && e.contains(v), "{v}: {e}");
        }
        for v in ["100", "600000"] {
            Config::parse(&format!("{MIN}lookup:\n  timeout_ms: {v}\n")).unwrap();
        }
        let ch = MIN.replace(
            "  path: /tmp/x\n",
            "  backend: clickhouse\n  url: http://127.0.0.1:8123\n",
        );
        // An IPv6 address without brackets is no address a peer can dial.
        let e = Config::parse(&format!(
            "{ch}replicas:\n  advertise_addr: \"fd00::1:9359\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("replicas.advertise_addr"), "{e}");
        for ok in [
            "\"[fd00::1]:9359\"",
            "ctw-collector-0.ctw:9359",
            "198.18.0.1:9359",
        ] {
            Config::parse(&format!("{ch}replicas:\n  advertise_addr: {ok}\n"))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn the_pod_watch_on_clickhouse_needs_a_history_dir() {
        let ch = MIN.replace(
            "  path: /tmp/x\n",
            "  backend: clickhouse\n  url: http://127.0.0.1:8123\n",
        );
        // --check said valid, the start then failed on it.
        let e = Config::parse(&format!("{ch}kubernetes:\n  enabled: true\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kubernetes.history_dir"), "{e}");
        Config::parse(&format!(
            "{ch}kubernetes:\n  enabled: true\n  history_dir: /var/lib/ctw/pods\n"
        ))
        .unwrap();
        // auto (in a cluster or not, known only at start) and false pass.
        Config::parse(&format!("{ch}kubernetes:\n  enabled: auto\n")).unwrap();
        Config::parse(&format!("{ch}kubernetes:\n  enabled: false\n")).unwrap();
        Config::parse(&format!("{MIN}kubernetes:\n  enabled: true\n")).unwrap();
    }

    #[test]
    fn every_collector_example_loads() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("collector") && name.ends_with(".yaml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                n += 1;
            }
        }
        assert!(n >= 1, "expected collector examples in config/");
    }
}

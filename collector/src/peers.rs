//! Collector replicas on one ClickHouse database (`replicas` in the
//! config): who holds which agent's stream, and live lookups forwarded to
//! that collector.
//!
//! # Leases
//!
//! Each collector writes, for every agent streaming to it, a lease row to
//! `ctw_leases` in the store's ClickHouse database: (node, collector id,
//! the collector's advertised gRPC address, the agent's boot id, when the
//! stream started, when the lease expires, when it was written, and the
//! collector's view of the agent as the JSON of
//! [`AgentInfo`]). It writes them at once when a stream starts or ends
//! (an ended stream's lease expires at once) and renews them every
//! `replicas.renew_interval_ms` with an expiry of `lease_ttl_ms` ahead.
//! The table holds a row per node and collector id that held it
//! (`ReplacingMergeTree` keeps the newest, reads take `argMax`), and rows
//! past the records' `retention_days` are deleted hourly ([`prune`]), so
//! it holds nodes × collector ids that held each within the retention
//! (each rollout adds ids: pod names).
//!
//! At the same pace each collector reads back only the rows the rules
//! need ([`read_sql`]): per node its newest row and its unexpired ones
//! (one row, two while a stream is taken over), plus, for a stream that
//! just started here, the node's newest row written before it. A read is
//! so about one row per node (~800 bytes: ~600 of [`AgentInfo`] JSON, the
//! ids, address and times; 5,000 nodes ≈ 4 MB), however many collector
//! ids ever held the nodes; the server scans the table's small columns
//! (node, collector id, times) to choose them.
//!
//! The holder of a node's stream ([`holder`]) is, among its unexpired
//! leases, the one whose stream started last: an agent that reconnects to
//! another collector is taken over by that collector at once, even while
//! the one it left (half-open stream, dead process) has not yet noticed or
//! its lease has not yet expired. A collector killed with SIGKILL stops
//! renewing; its leases end after `lease_ttl_ms`. Times are the
//! collectors' wall clocks (keep them in sync, as for the records).
//!
//! Why a table in ClickHouse and not a headless Service: the collectors
//! already share the database (nothing more to run or to grant), the
//! table works outside Kubernetes (systemd, several hosts), and it says
//! which collector holds which node — DNS would list the collectors but
//! not who holds a stream (every collector would have to be asked).
//!
//! # Forwarded lookups
//!
//! A live lookup for a node whose stream another collector holds goes to
//! that collector's `Query.Lookup` over mTLS gRPC (the collector's own
//! certificate as client certificate, its CA, and `peer_server_name` as
//! the name the peer's certificate must carry), naming the node. The
//! request carries the metadata [`FORWARDED_BY`] (the sender's id): a
//! collector answers such a request from its own agents only and never
//! forwards it again (the loop guard; two collectors whose lease views
//! disagree answer "not connected" instead of bouncing the lookup). The
//! reply's [`ZONES_TRIED`] metadata says which zones the holder asked.
//!
//! # The cluster's agents and open gaps
//!
//! [`agents`] lists every node of the lease table and of the local
//! registry, with `collector` naming the holder (absent when none holds
//! it; the agent is then disconnected since its last lease was written).
//! [`open_gaps`] gives an `agent_disconnected` gap for exactly those nodes
//! no collector holds, so every collector answers `complete` alike. While
//! the lease table cannot be read for longer than `lease_ttl_ms`, both
//! fall back to the local registry.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ctw_common::{now_ns, ConnRecord};
use ctw_proto::pb;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{ReplicasConfig, TlsFiles};
use crate::metrics::Metrics;
use crate::registry::{AgentInfo, LiveAnswer, LiveQuery, LookupError, Registry};
use crate::store::clickhouse::{quote, ClickHouseOptions, ClusterOptions};
use crate::store::{Gap, RecordStore};

/// The lease table (in the store's database).
pub const LEASES: &str = "ctw_leases";
/// gRPC metadata on a forwarded lookup: the forwarding collector's id.
pub const FORWARDED_BY: &str = "ctw-forwarded-by";
/// gRPC metadata on a `Query.Lookup` answer: the zones asked, `0,3`.
pub const ZONES_TRIED: &str = "ctw-zones-tried";
/// How often the local registry is checked for streams that started or
/// ended (their leases are written at once).
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// How often lease rows past the retention are deleted ([`prune`]).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// One lease: a collector's claim on a node's stream (see the module docs).
/// Times in ns since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct Lease {
    pub node: String,
    pub collector_id: String,
    /// `host:port` of the collector's gRPC (mTLS) listener.
    pub grpc_addr: String,
    pub boot_id: String,
    /// When the stream started (the collector's clock).
    pub connected_ns: u64,
    /// The lease holds until then; a released lease has `expires_ns ==
    /// updated_ns`.
    pub expires_ns: u64,
    /// When this row was written.
    pub updated_ns: u64,
    /// The collector's [`AgentInfo`] of the agent, as JSON.
    pub info: String,
}

impl Lease {
    fn agent_info(&self) -> Option<AgentInfo> {
        serde_json::from_str(&self.info).ok()
    }
}

/// The lease that holds `node`'s stream at `now`: among the node's
/// unexpired leases, the one whose stream started last (then the newest
/// written). `None`: no collector holds it.
pub fn holder<'a>(leases: &'a [Lease], node: &str, now: u64) -> Option<&'a Lease> {
    leases
        .iter()
        .filter(|l| l.node == node && l.expires_ns > now)
        .max_by_key(|l| (l.connected_ns, l.updated_ns))
}

/// The `agent_restarted` gap of `a`'s stream that started on this
/// collector at `connected_ns`, from the lease table as it was before: the
/// node's newest lease written before the stream started (by any
/// collector) names another boot id, so the agent restarted since (capture
/// was down): a gap from that lease's last write to the stream's start.
/// `None` when the boot id is the same (a reconnect: the agent replays its
/// spool) or the node has no earlier lease. Also for an agent this
/// collector saw before: with replicas the registry leaves restart gaps to
/// the leases ([`Registry::leave_restart_gaps_to_leases`]), since the agent
/// may have restarted, and been recorded, while it streamed elsewhere.
pub fn restart_gap(leases: &[Lease], a: &AgentInfo, connected_ns: u64) -> Option<Gap> {
    let last = leases
        .iter()
        .filter(|l| l.node == a.node && l.updated_ns < connected_ns)
        .max_by_key(|l| l.updated_ns)?;
    (last.boot_id != a.boot_id).then(|| Gap {
        node: a.node.clone(),
        from_ns: last.updated_ns,
        to_ns: connected_ns,
        reason: "agent_restarted".into(),
        count: 0,
    })
}

/// The newest lease row of `node`, held or not (`None`: never seen).
fn newest<'a>(leases: &'a [Lease], node: &str) -> Option<&'a Lease> {
    leases
        .iter()
        .filter(|l| l.node == node)
        .max_by_key(|l| l.updated_ns)
}

/// How often the clock is compared with the ClickHouse server's.
const CLOCK_EVERY: Duration = Duration::from_secs(60);
/// A clock offset above this is logged: a lease written by a collector
/// that far behind looks that much closer to expiring to the others (the
/// margin is `lease_ttl_ms - renew_interval_ms`, 12 s by default).
const MAX_CLOCK_OFFSET_S: u64 = 2;

/// This host's clock minus the ClickHouse server's `now()`, in whole
/// seconds (±1: `now()` has one-second resolution on 18.16), taken at the
/// middle of the query's round trip.
async fn clock_offset_s(client: &clickhouse::Client) -> Result<i64, String> {
    let before = now_ns();
    let server_s: u64 = client
        .query("SELECT toUInt64(now())")
        .fetch_one()
        .await
        .map_err(|e| format!("reading ClickHouse's clock: {e}"))?;
    let mid_ns = before / 2 + now_ns() / 2;
    Ok(offset_s(mid_ns, server_s))
}

/// `local_ns` minus a server time truncated to the second, rounded to
/// whole seconds.
fn offset_s(local_ns: u64, server_s: u64) -> i64 {
    // The server's second covers [server_s, server_s + 1): compare with
    // its middle.
    let server_mid_ns = i128::from(server_s) * 1_000_000_000 + 500_000_000;
    let d = i128::from(local_ns) - server_mid_ns;
    ((d + d.signum() * 500_000_000) / 1_000_000_000) as i64
}

/// Columns of the lease table.
const LEASE_COLUMNS: &str = "node String, collector_id String, grpc_addr String, \
     boot_id String, connected_ns UInt64, expires_ns UInt64, updated_ns UInt64, info String";

/// `CREATE TABLE` of the lease table in `db` on one server (18.16 and
/// later).
pub fn create_table_sql(db: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{LEASES} ({LEASE_COLUMNS}) \
         ENGINE = ReplacingMergeTree(updated_ns) ORDER BY (node, collector_id)"
    )
}

/// The statement creating the lease table where `cluster` says: on one
/// server ([`create_table_sql`]), or in a ClickHouse cluster on every
/// server (`ON CLUSTER`) as one `ReplicatedReplacingMergeTree` whose
/// replicas are all the cluster's servers, whatever their shard: its
/// ZooKeeper path is `zookeeper_path` with `{shard}` replaced by `all`,
/// each server's replica name `{shard}-{replica}`. Every collector reads
/// and writes the full table on the server it talks to (a few hundred
/// bytes per node; replicated in well under the lease time), and a
/// `DELETE` mutation reaches every server through replication.
pub fn create_table_statement(db: &str, cluster: Option<&ClusterOptions>) -> String {
    match cluster {
        None => create_table_sql(db),
        Some(c) => {
            let path = c
                .zookeeper_path
                .trim_end_matches('/')
                .replace("{shard}", "all");
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.{LEASES} ON CLUSTER {name} ({LEASE_COLUMNS}) \
                 ENGINE = ReplicatedReplacingMergeTree('{path}/{db}/{LEASES}', \
                 '{{shard}}-{{replica}}', updated_ns) ORDER BY (node, collector_id)",
                name = c.name,
            )
        }
    }
}

/// The lease rows the rules need, each the newest row of its (node,
/// collector) pair (`argMax` over the pair's versions) among the pairs
/// written since `since_ns` (older ones are of agents gone longer than the
/// records are kept):
///
/// - every pair whose lease is unexpired at `now_ns` ([`holder`]);
/// - per node, the pair written last ([`newest`]: the agents page and the
///   open gaps of nodes nobody holds);
/// - per `(node, connected_ns)` of `started` (streams that started on this
///   collector since the last read), the pair written last before
///   `connected_ns` ([`restart_gap`]).
///
/// With `now_ns` `None`, only the last kind (the further chunks of
/// [`read_leases`]).
///
/// So a read returns about one row per node (two while a stream is being
/// taken over), however many collector ids ever held a node, and the
/// rules answer as over the whole table. Columns in the order of
/// [`Lease`]'s fields.
fn read_sql(db: &str, since_ns: u64, now_ns: Option<u64>, started: &[(String, u64)]) -> String {
    let pairs = format!(
        "SELECT node, collector_id, max(updated_ns) AS u, argMax(expires_ns, updated_ns) AS e \
         FROM {db}.{LEASES} GROUP BY node, collector_id HAVING u >= {since_ns}"
    );
    let mut wanted = Vec::new();
    if let Some(now_ns) = now_ns {
        wanted.push(format!(
            "SELECT node, collector_id AS c FROM ({pairs}) WHERE e > {now_ns}"
        ));
        wanted.push(format!(
            "SELECT node, argMax(collector_id, u) AS c FROM ({pairs}) GROUP BY node"
        ));
    }
    if !started.is_empty() {
        let nodes: Vec<String> = started.iter().map(|(n, _)| quote(n)).collect();
        let cuts: Vec<String> = started
            .iter()
            .map(|(_, c)| format!("toUInt64({c})"))
            .collect();
        wanted.push(format!(
            "SELECT node, argMax(collector_id, u) AS c FROM ({pairs}) \
             WHERE u < transform(node, [{}], [{}], toUInt64(0)) GROUP BY node",
            nodes.join(", "),
            cuts.join(", ")
        ));
    }
    format!(
        "SELECT node, collector_id, argMax(grpc_addr, updated_ns) AS a, \
         argMax(boot_id, updated_ns) AS b, argMax(connected_ns, updated_ns) AS c, \
         argMax(expires_ns, updated_ns) AS e, max(updated_ns) AS u, \
         argMax(info, updated_ns) AS i FROM {db}.{LEASES} \
         WHERE (node, collector_id) IN ({}) GROUP BY node, collector_id \
         HAVING u >= {since_ns}",
        wanted.join(" UNION ALL ")
    )
}

/// Started streams asked about per query: the node names keep the SQL
/// well under ClickHouse's `max_query_size` (256 KiB) even when every
/// agent reconnects to one collector at once (200 names of up to 253
/// bytes).
const RESTARTS_PER_READ: usize = 200;

/// Read the lease rows of [`read_sql`] at `now_ns` (the restart candidates
/// of `started` [`RESTARTS_PER_READ`] at a time); each (node, collector)
/// pair once. ClickHouse errors as text.
async fn read_leases(
    client: &clickhouse::Client,
    db: &str,
    since_ns: u64,
    now_ns: u64,
    started: &[(String, u64)],
) -> Result<Vec<Lease>, String> {
    let fetch = |sql: String| async move {
        client
            .query(&sql)
            .fetch_all::<Lease>()
            .await
            .map_err(|e| format!("reading {LEASES}: {e}"))
    };
    let mut chunks = started.chunks(RESTARTS_PER_READ);
    let first = chunks.next().unwrap_or_default();
    let mut leases = fetch(read_sql(db, since_ns, Some(now_ns), first)).await?;
    let mut seen: std::collections::HashSet<(String, String)> = leases
        .iter()
        .map(|l| (l.node.clone(), l.collector_id.clone()))
        .collect();
    for chunk in chunks {
        for l in fetch(read_sql(db, since_ns, None, chunk)).await? {
            if seen.insert((l.node.clone(), l.collector_id.clone())) {
                leases.push(l);
            }
        }
    }
    Ok(leases)
}

/// Delete the lease rows written before `cutoff_ns` (the retention): the
/// rows of agents gone that long and of every collector id that has not
/// written a node since (ids superseded by later ones: old pods of a
/// rollout). Runs `ALTER TABLE ... DELETE` (a mutation, applied in the
/// background; 18.16 has them) only when such rows exist. Returns how
/// many rows it asked to delete.
async fn prune(client: &clickhouse::Client, db: &str, cutoff_ns: u64) -> Result<u64, String> {
    let old: u64 = client
        .query(&format!(
            "SELECT count() FROM {db}.{LEASES} WHERE updated_ns < {cutoff_ns}"
        ))
        .fetch_one()
        .await
        .map_err(|e| format!("counting old rows of {LEASES}: {e}"))?;
    if old > 0 {
        client
            .query(&format!(
                "ALTER TABLE {db}.{LEASES} DELETE WHERE updated_ns < {cutoff_ns}"
            ))
            .execute()
            .await
            .map_err(|e| format!("deleting old rows of {LEASES}: {e}"))?;
    }
    Ok(old)
}

/// Who this collector is among its peers, resolved from
/// [`ReplicasConfig`] and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub collector_id: String,
    pub advertise_addr: String,
    pub peer_server_name: String,
}

/// This collector's id, address and peer TLS name: the configured values,
/// else `$HOSTNAME` (or the kernel's host name), `$POD_IP` (or the id)
/// with the port of `grpc_listen`, and the first DNS name of the
/// certificate. Errors name the key that needs a value.
pub fn identity(
    cfg: &ReplicasConfig,
    grpc_listen: &str,
    tls: &TlsFiles,
) -> Result<PeerIdentity, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let collector_id = match &cfg.collector_id {
        Some(id) => id.clone(),
        None => env("HOSTNAME")
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            })
            .ok_or("replicas.collector_id: no host name to default to; set it")?,
    };
    let advertise_addr = match &cfg.advertise_addr {
        Some(a) => a.clone(),
        None => {
            let port = grpc_listen
                .parse::<std::net::SocketAddr>()
                .map_err(|_| format!("grpc.listen_addr: cannot parse {grpc_listen:?}"))?
                .port();
            match env("POD_IP").and_then(|ip| ip.trim().parse::<IpAddr>().ok()) {
                Some(ip) => std::net::SocketAddr::new(ip, port).to_string(),
                None => format!("{collector_id}:{port}"),
            }
        }
    };
    let peer_server_name = match &cfg.peer_server_name {
        Some(n) => n.clone(),
        None => first_dns_name(&tls.cert_file).ok_or_else(|| {
            format!(
                "replicas.peer_server_name: {} has no DNS name; set it",
                tls.cert_file.display()
            )
        })?,
    };
    Ok(PeerIdentity {
        collector_id,
        advertise_addr,
        peer_server_name,
    })
}

fn first_dns_name(cert: &std::path::Path) -> Option<String> {
    let pem = std::fs::read_to_string(cert).ok()?;
    let der = crate::certs::first_cert_der(&pem)?;
    crate::certs::node_name(&der)
}

/// What [`Peers`] needs: who we are, the lease timing, the TLS files for
/// forwarding, and the ClickHouse database.
#[derive(Debug, Clone)]
pub struct PeersOptions {
    pub me: PeerIdentity,
    pub lease_ttl: Duration,
    pub renew_interval: Duration,
    pub tls: TlsFiles,
    pub clickhouse: ClickHouseOptions,
    /// Deadline of one forwarded lookup.
    pub forward_timeout: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// The lease table as last read.
    leases: Vec<Lease>,
    /// When it was last read successfully (0: never).
    read_ns: u64,
    /// Streams this collector holds, by node: their `connected_since`.
    held: BTreeMap<String, String>,
}

/// The lease table's view and the forwarding client; see the module docs.
/// Share with `Arc`.
pub struct Peers {
    opts: PeersOptions,
    client: Option<clickhouse::Client>,
    registry: Arc<Registry>,
    metrics: Metrics,
    /// Where `agent_restarted` gaps seen through the leases are recorded.
    store: Option<Arc<dyn RecordStore>>,
    state: Mutex<State>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("me", &self.opts.me)
            .finish_non_exhaustive()
    }
}

fn rfc3339_ns(ns: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(ns.min(i64::MAX as u64) as i64)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse_rfc3339_ns(s: &str) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    u64::try_from(t.timestamp_nanos_opt()?).ok()
}

impl Peers {
    /// Peers over the database of `opts.clickhouse` (the password file is
    /// read now); `agent_restarted` gaps found through the leases go to
    /// `store`. Start [`Peers::run`] to write and read leases.
    pub fn new(
        opts: PeersOptions,
        registry: Arc<Registry>,
        store: Arc<dyn RecordStore>,
        metrics: Metrics,
    ) -> Result<Peers, String> {
        registry.leave_restart_gaps_to_leases();
        let client = crate::store::clickhouse::client(&opts.clickhouse)
            .map_err(|e| format!("storage: {e}"))?;
        Ok(Peers {
            opts,
            client: Some(client),
            registry,
            metrics,
            store: Some(store),
            state: Mutex::new(State::default()),
            channels: Mutex::new(HashMap::new()),
        })
    }

    /// Peers without a database: the lease table is `leases` (unit tests
    /// of routing and of the loop guard).
    pub fn with_leases(opts: PeersOptions, registry: Arc<Registry>, leases: Vec<Lease>) -> Peers {
        let metrics = Metrics::new();
        Peers {
            opts,
            client: None,
            registry,
            metrics,
            store: None,
            state: Mutex::new(State {
                leases,
                read_ns: u64::MAX,
                held: BTreeMap::new(),
            }),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// This collector's id.
    pub fn collector_id(&self) -> &str {
        &self.opts.me.collector_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The lease table as last read, if read within `lease_ttl` (else the
    /// view is too old to trust: callers use the local registry).
    fn leases(&self) -> Option<Vec<Lease>> {
        let g = self.lock();
        let ttl = self.opts.lease_ttl.as_nanos() as u64;
        (g.read_ns == u64::MAX || now_ns().saturating_sub(g.read_ns) < ttl)
            .then(|| g.leases.clone())
    }

    /// The lease of the other collector that holds `node`'s stream now
    /// (`None`: nobody else does, or the view is too old).
    pub fn remote_holder(&self, node: &str) -> Option<Lease> {
        if self.registry.is_connected(node) {
            return None;
        }
        let leases = self.leases()?;
        holder(&leases, node, now_ns())
            .filter(|l| l.collector_id != self.opts.me.collector_id)
            .cloned()
    }

    /// Nodes whose streams other collectors hold now (not this one).
    pub fn remote_nodes(&self) -> Vec<String> {
        let Some(leases) = self.leases() else {
            return Vec::new();
        };
        let now = now_ns();
        let mut nodes: Vec<String> = leases.iter().map(|l| l.node.clone()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
            .into_iter()
            .filter(|n| {
                !self.registry.is_connected(n)
                    && holder(&leases, n, now)
                        .is_some_and(|l| l.collector_id != self.collector_id())
            })
            .collect()
    }

    /// The node held by another collector whose agent's Hello listed `ip`.
    pub fn remote_node_owning(&self, ip: IpAddr) -> Option<String> {
        let leases = self.leases()?;
        let now = now_ns();
        self.remote_nodes().into_iter().find(|n| {
            holder(&leases, n, now)
                .and_then(Lease::agent_info)
                .is_some_and(|a| a.addresses.iter().any(|s| parse_address(s) == Some(ip)))
        })
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut g = match self.channels.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.opts.tls.ca_file)?))
            .identity(Identity::from_pem(
                read(&self.opts.tls.cert_file)?,
                read(&self.opts.tls.key_file)?,
            ))
            .domain_name(self.opts.me.peer_server_name.clone());
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| format!("peer address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect_lazy();
        g.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn drop_channel(&self, addr: &str) {
        if let Ok(mut g) = self.channels.lock() {
            g.remove(addr);
        }
    }

    /// Ask the collector of `lease` for a live entry on its node (named in
    /// the request, marked [`FORWARDED_BY`] us). Returns the answer and the
    /// zones the holder asked. A holder that no longer has the stream
    /// answers `NotConnected`; an unreachable one is an `Agent` error
    /// naming it.
    pub async fn forward(
        &self,
        lease: &Lease,
        q: LiveQuery,
    ) -> (Result<Option<LiveAnswer>, LookupError>, Vec<u16>) {
        let r = self.forward_inner(lease, q).await;
        let label = match &r.0 {
            Ok(Some(_)) => "found",
            Ok(None) => "not_found",
            Err(e) => e.label(),
        };
        self.metrics
            .lookups_forwarded
            .with_label_values(&[label])
            .inc();
        r
    }

    async fn forward_inner(
        &self,
        lease: &Lease,
        q: LiveQuery,
    ) -> (Result<Option<LiveAnswer>, LookupError>, Vec<u16>) {
        let node = lease.node.clone();
        let via = |m: String| {
            LookupError::Agent(format!(
                "via collector {} ({}): {m}",
                lease.collector_id, lease.grpc_addr
            ))
        };
        let channel = match self.channel(&lease.grpc_addr) {
            Ok(c) => c,
            Err(e) => return (Err(via(e)), Vec::new()),
        };
        let mut req = tonic::Request::new(pb::LookupRequest {
            request_id: 0,
            protocol: u32::from(q.protocol.number()),
            tuple: Some((&q.tuple).into()),
            reply_tuple: q.reply_tuple,
            node: node.clone(),
            zone: q.zone.map(u32::from),
        });
        req.set_timeout(self.opts.forward_timeout);
        if let Ok(v) = self.opts.me.collector_id.parse() {
            req.metadata_mut().insert(FORWARDED_BY, v);
        }
        let mut client = pb::query_client::QueryClient::new(channel);
        let resp = match tokio::time::timeout(self.opts.forward_timeout, client.lookup(req)).await {
            Err(_) => return (Err(LookupError::Timeout(node)), Vec::new()),
            Ok(r) => r,
        };
        let resp = match resp {
            Ok(r) => r,
            Err(s) => {
                let e = match s.code() {
                    tonic::Code::NotFound => LookupError::NotConnected(node),
                    tonic::Code::DeadlineExceeded => LookupError::Timeout(node),
                    tonic::Code::Unavailable | tonic::Code::Unknown => {
                        self.drop_channel(&lease.grpc_addr);
                        via(s.message().to_string())
                    }
                    _ => via(s.message().to_string()),
                };
                return (Err(e), Vec::new());
            }
        };
        let zones: Vec<u16> = resp
            .metadata()
            .get(ZONES_TRIED)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(',').filter_map(|z| z.trim().parse().ok()).collect())
            .unwrap_or_default();
        let reply = resp.into_inner();
        if !reply.found {
            return (Ok(None), zones);
        }
        let record = match reply.entry.as_ref().map(ConnRecord::try_from) {
            Some(Ok(r)) => r,
            Some(Err(e)) => return (Err(LookupError::BadReply(e.to_string())), zones),
            None => {
                return (
                    Err(LookupError::BadReply("found without an entry".into())),
                    zones,
                )
            }
        };
        let node = if reply.node.is_empty() {
            node
        } else {
            reply.node
        };
        (Ok(Some(LiveAnswer { node, record })), zones)
    }

    /// Write and read leases until `stop` (see the module docs): streams
    /// that start or end are written within [`WATCH_EVERY`], held leases
    /// renewed every `renew_interval`. ClickHouse errors are logged and
    /// retried.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let db = self.opts.clickhouse.database.clone();
        let mut table = false;
        let mut next_renew = tokio::time::Instant::now();
        let mut next_prune = tokio::time::Instant::now();
        let mut next_clock = tokio::time::Instant::now();
        let log = ctw_common::ratelimit::RateLimiter::new(Duration::from_secs(60));
        let clock_log = ctw_common::ratelimit::RateLimiter::new(Duration::from_secs(600));
        loop {
            if *stop.borrow() {
                break;
            }
            if !table {
                let sql = create_table_statement(&db, self.opts.clickhouse.cluster.as_ref());
                match client.query(&sql).execute().await {
                    Ok(()) => table = true,
                    Err(e) => {
                        self.metrics.lease_errors.inc();
                        if let Some(suppressed) = log.allow() {
                            tracing::warn!(error = %e, suppressed, "lease table not created yet (ClickHouse)");
                        }
                    }
                }
            }
            let changed = self.local_changes();
            let now = tokio::time::Instant::now();
            if table && (changed || now >= next_renew) {
                match self.write_and_read(&client, &db).await {
                    Ok(()) => next_renew = now + self.opts.renew_interval,
                    Err(e) => {
                        self.metrics.lease_errors.inc();
                        if let Some(suppressed) = log.allow() {
                            tracing::warn!(error = %e, suppressed, "lease table not written or read (ClickHouse)");
                        }
                    }
                }
            }
            if now >= next_clock {
                next_clock = now + CLOCK_EVERY;
                match clock_offset_s(&client).await {
                    Ok(offset) => {
                        self.metrics.clock_offset.set(offset);
                        if offset.unsigned_abs() > MAX_CLOCK_OFFSET_S {
                            if let Some(suppressed) = clock_log.allow() {
                                tracing::warn!(
                                    offset_seconds = offset,
                                    suppressed,
                                    "this collector's clock differs from ClickHouse's by more than {MAX_CLOCK_OFFSET_S} s: \
                                     leases compare wall clocks, so other collectors may see this one's agents \
                                     as disconnected (or it theirs); synchronise the clocks (NTP)"
                                );
                            }
                        }
                    }
                    Err(e) => {
                        self.metrics.lease_errors.inc();
                        if let Some(suppressed) = log.allow() {
                            tracing::warn!(error = %e, suppressed, "clock not compared with ClickHouse's");
                        }
                    }
                }
            }
            if table && now >= next_prune {
                match prune(&client, &db, self.retention_cutoff(now_ns())).await {
                    Ok(n) => {
                        next_prune = now + PRUNE_EVERY;
                        if n > 0 {
                            tracing::info!(rows = n, "deleting lease rows past the retention");
                        }
                    }
                    Err(e) => {
                        self.metrics.lease_errors.inc();
                        if let Some(suppressed) = log.allow() {
                            tracing::warn!(error = %e, suppressed, "old lease rows not deleted (ClickHouse)");
                        }
                    }
                }
            }
            tokio::select! {
                _ = stop.wait_for(|v| *v) => break,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
        }
        // Leaving cleanly: release what we last wrote as held (streams may
        // be ending already) so others need not wait for the leases to
        // expire.
        let held = self.lock().held.clone();
        let rows: Vec<Lease> = self
            .registry
            .agents()
            .iter()
            .filter(|a| held.contains_key(&a.node))
            .map(|a| self.lease_row(a, now_ns(), true))
            .collect();
        if table && !rows.is_empty() {
            let _ = insert(&client, &db, &rows).await;
        }
    }

    /// Did a stream start or end since the last write?
    fn local_changes(&self) -> bool {
        let now: BTreeMap<String, String> = self
            .registry
            .agents()
            .into_iter()
            .filter(|a| a.connected)
            .map(|a| (a.node, a.connected_since.unwrap_or_default()))
            .collect();
        self.lock().held != now
    }

    fn lease_row(&self, a: &AgentInfo, now: u64, release: bool) -> Lease {
        Lease {
            node: a.node.clone(),
            collector_id: self.opts.me.collector_id.clone(),
            grpc_addr: self.opts.me.advertise_addr.clone(),
            boot_id: a.boot_id.clone(),
            connected_ns: a
                .connected_since
                .as_deref()
                .and_then(parse_rfc3339_ns)
                .unwrap_or(now),
            expires_ns: if release {
                now
            } else {
                now + self.opts.lease_ttl.as_nanos() as u64
            },
            updated_ns: now,
            info: serde_json::to_string(a).unwrap_or_default(),
        }
    }

    /// Lease rows written before this are past the retention (the
    /// records' `retention_days`): not read, and deleted by [`prune`].
    fn retention_cutoff(&self, now: u64) -> u64 {
        now.saturating_sub(u64::from(self.opts.clickhouse.retention_days) * 86_400 * 1_000_000_000)
    }

    async fn write_and_read(&self, client: &clickhouse::Client, db: &str) -> Result<(), String> {
        let agents = self.registry.agents();
        let now = now_ns();
        let held: BTreeMap<String, String> = agents
            .iter()
            .filter(|a| a.connected)
            .map(|a| {
                (
                    a.node.clone(),
                    a.connected_since.clone().unwrap_or_default(),
                )
            })
            .collect();
        let released: Vec<String> = {
            let g = self.lock();
            g.held
                .keys()
                .filter(|n| !held.contains_key(*n))
                .cloned()
                .collect()
        };
        let rows: Vec<Lease> = agents
            .iter()
            .filter(|a| a.connected || released.contains(&a.node))
            .map(|a| self.lease_row(a, now, !a.connected))
            .collect();
        // Streams started since the last write, with their start.
        let started: Vec<(&AgentInfo, u64)> = {
            let g = self.lock();
            agents
                .iter()
                .filter(|a| a.connected && g.held.get(&a.node) != a.connected_since.as_ref())
                .filter_map(|a| Some((a, a.connected_since.as_deref().and_then(parse_rfc3339_ns)?)))
                .collect()
        };
        // Read before writing: a new stream's restart gap compares with
        // the leases written before it (ours included: a restarted
        // collector process overwrites its own row).
        let restarts: Vec<(String, u64)> = started
            .iter()
            .filter(|(a, _)| a.connections <= 1)
            .map(|(a, since)| (a.node.clone(), *since))
            .collect();
        let mut leases =
            read_leases(client, db, self.retention_cutoff(now), now, &restarts).await?;
        let gaps: Vec<Gap> = started
            .iter()
            .filter_map(|(a, since)| restart_gap(&leases, a, *since))
            .collect();
        if let (Some(store), false) = (&self.store, gaps.is_empty()) {
            let store = store.clone();
            let stored = tokio::task::spawn_blocking(move || {
                gaps.into_iter()
                    .map(|g| {
                        let node = g.node.clone();
                        store.record_gap(g).map_err(|e| format!("{node}: {e}"))
                    })
                    .collect::<Result<Vec<()>, String>>()
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            // Not recorded: the stream counts as new again next round.
            stored.map_err(|e| format!("recording an agent_restarted gap: {e}"))?;
        }
        if !rows.is_empty() {
            insert(client, db, &rows).await?;
        }
        for r in rows {
            leases.retain(|l| !(l.node == r.node && l.collector_id == r.collector_id));
            leases.push(r);
        }
        let mut g = self.lock();
        g.leases = leases;
        g.read_ns = now;
        g.held = held;
        Ok(())
    }
}

async fn insert(client: &clickhouse::Client, db: &str, rows: &[Lease]) -> Result<(), String> {
    let err = |e: clickhouse::error::Error| format!("writing {LEASES}: {e}");
    let mut ins = client
        .insert::<Lease>(&format!("{db}.{LEASES}"))
        .map_err(err)?;
    for r in rows {
        ins.write(r).await.map_err(err)?;
    }
    ins.end().await.map_err(err)
}

/// Every agent of the cluster (`GET /api/v1/agents`): without replicas the
/// local registry's; with them every node of the lease table and of the
/// registry, each with `collector` = the collector holding its stream
/// (this one's view when it is this one, the holder's last lease
/// otherwise; absent and `connected: false` when nobody holds it).
pub fn agents(registry: &Registry, peers: Option<&Peers>) -> Vec<AgentInfo> {
    let local = registry.agents();
    let Some(p) = peers else { return local };
    let Some(leases) = p.leases() else {
        return local;
    };
    let now = now_ns();
    let me = p.collector_id();
    let mut out: BTreeMap<String, AgentInfo> = BTreeMap::new();
    for a in local {
        out.insert(a.node.clone(), a);
    }
    let nodes: Vec<String> = leases.iter().map(|l| l.node.clone()).collect();
    for n in nodes {
        if out.get(&n).is_some_and(|a| a.connected) {
            continue;
        }
        let held = holder(&leases, &n, now);
        let info = match held {
            Some(l) => l.agent_info().map(|mut a| {
                a.connected = true;
                a.collector = Some(l.collector_id.clone());
                a
            }),
            None => match (out.get(&n), newest(&leases, &n)) {
                // This collector saw the stream end after the last lease.
                (Some(local), Some(l))
                    if local
                        .disconnected_since
                        .as_deref()
                        .and_then(parse_rfc3339_ns)
                        .is_some_and(|d| d >= l.updated_ns) =>
                {
                    None
                }
                (_, Some(l)) => l.agent_info().map(|mut a| {
                    a.connected = false;
                    a.collector = None;
                    a.disconnected_since = Some(rfc3339_ns(l.updated_ns));
                    a
                }),
                (_, None) => None,
            },
        };
        if let Some(a) = info {
            out.insert(n, a);
        }
    }
    for a in out.values_mut() {
        if a.connected && a.collector.is_none() {
            a.collector = Some(me.to_string());
        }
    }
    out.into_values().collect()
}

/// The node, connected or not, whose agent's Hello listed `ip` among its
/// addresses (`10.0.0.1` or `10.0.0.1/24`), in `agents` ([`agents`]).
pub fn node_owning_any(agents: &[AgentInfo], ip: IpAddr) -> Option<String> {
    agents
        .iter()
        .find(|a| a.addresses.iter().any(|s| parse_address(s) == Some(ip)))
        .map(|a| a.node.clone())
}

/// An address as a Hello lists it, with or without a prefix length.
fn parse_address(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.trim().parse().ok()
}

/// The open `agent_disconnected` gaps (merged into searches): without
/// replicas the local registry's; with them, one for each node no
/// collector holds, from its disconnection (as [`agents`] shows it) to
/// now.
pub fn open_gaps(registry: &Registry, peers: Option<&Peers>) -> Vec<Gap> {
    if peers.is_none_or(|p| p.leases().is_none()) {
        return registry.open_gaps();
    }
    let now = now_ns();
    agents(registry, peers)
        .into_iter()
        .filter(|a| !a.connected)
        .filter_map(|a| {
            let from = a.disconnected_since.as_deref().and_then(parse_rfc3339_ns)?;
            Some(Gap {
                node: a.node,
                from_ns: from,
                to_ns: now,
                reason: "agent_disconnected".into(),
                count: 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lease(node: &str, c: &str, connected: u64, expires: u64, updated: u64) -> Lease {
        Lease {
            node: node.into(),
            collector_id: c.into(),
            grpc_addr: format!("{c}:9359"),
            boot_id: "b".into(),
            connected_ns: connected,
            expires_ns: expires,
            updated_ns: updated,
            info: String::new(),
        }
    }

    #[test]
    fn the_stream_started_last_holds_among_unexpired_leases() {
        let ls = vec![
            lease("a", "c1", 100, 500, 400),
            // Taken over at 200 by c2, while c1 still renews.
            lease("a", "c2", 200, 450, 300),
            lease("b", "c1", 100, 150, 140),
        ];
        assert_eq!(holder(&ls, "a", 300).unwrap().collector_id, "c2");
        // c2's lease ran out (c2 died): c1's, still renewed, holds.
        assert_eq!(holder(&ls, "a", 460).unwrap().collector_id, "c1");
        assert!(holder(&ls, "a", 500).is_none());
        // Expired: nobody holds b; its newest row says when it was last held.
        assert!(holder(&ls, "b", 150).is_none());
        assert_eq!(newest(&ls, "b").unwrap().updated_ns, 140);
        assert!(holder(&ls, "zz", 0).is_none());
    }

    fn agent(node: &str, boot: &str, connections: u64) -> AgentInfo {
        AgentInfo {
            node: node.into(),
            addresses: vec![],
            boot_id: boot.into(),
            version: String::new(),
            connected: true,
            peer: None,
            connected_since: None,
            disconnected_since: None,
            last_seen: None,
            last_batch_at: None,
            last_batch_boot_id: None,
            last_batch_seq: None,
            lag_seconds: None,
            batches_stored: 0,
            records_stored: 0,
            duplicates: 0,
            conversion_errors: 0,
            loss_reports: 0,
            events_lost: 0,
            connections,
            collector: None,
            last_heartbeat: None,
            heartbeat_interval_seconds: None,
            heartbeat_agent_time: None,
            live_entries: None,
            last_event_at: None,
        }
    }

    #[test]
    fn a_new_boot_id_after_the_last_lease_is_a_restart_gap() {
        let info = |boot: &str, connections: u64| agent("a", boot, connections);
        // Held by c1 (boot "b") until 400; c2's own row (written after the
        // stream started at 500) does not count.
        let ls = vec![
            lease("a", "c1", 100, 450, 400),
            lease("a", "c2", 500, 900, 600),
        ];
        let g = restart_gap(&ls, &info("b2", 1), 500).unwrap();
        assert_eq!(
            (g.from_ns, g.to_ns, g.reason.as_str()),
            (400, 500, "agent_restarted")
        );
        // Same process: it replays its spool, no gap.
        assert!(restart_gap(&ls, &info("b", 1), 500).is_none());
        // Seen here before: the leases decide too (the registry leaves
        // restart gaps to them with replicas). Its last lease names "b":
        // it restarted since.
        let g = restart_gap(&ls[..1], &info("b2", 2), 500).unwrap();
        assert_eq!((g.from_ns, g.to_ns), (400, 500));
        // It restarted while streaming to c2 (c2 recorded that gap), then
        // came back here as "b2": no gap, whatever this collector saw last.
        let mut flapped = ls.clone();
        flapped[1].boot_id = "b2".into();
        assert!(restart_gap(&flapped, &info("b2", 2), 700).is_none());
        // Never seen anywhere.
        assert!(restart_gap(&[], &info("b2", 1), 500).is_none());
    }

    #[test]
    fn sql_reads_the_newest_row_of_the_pairs_the_rules_need() {
        let c = create_table_sql("ctw");
        assert!(c.contains("ReplacingMergeTree(updated_ns) ORDER BY (node, collector_id)"));
        let r = read_sql("ctw", 7, Some(9), &[]);
        assert!(r.ends_with("GROUP BY node, collector_id HAVING u >= 7"));
        assert!(r.contains("WHERE e > 9 UNION ALL"));
        assert!(!r.contains("transform"));
        // Columns in the order of `Lease`'s fields.
        assert!(r.find("argMax(grpc_addr").unwrap() < r.find("argMax(boot_id").unwrap());
        assert!(r.find("max(updated_ns) AS u,").unwrap() < r.find("argMax(info").unwrap());
        // Node names are quoted literals.
        let r = read_sql("ctw", 7, Some(9), &[("it's".into(), 5)]);
        assert!(r.contains(r"transform(node, ['it\'s'], [toUInt64(5)], toUInt64(0))"));
        // A further chunk: the restart candidates only.
        let r = read_sql("ctw", 7, None, &[("a".into(), 5)]);
        assert!(!r.contains("WHERE e >") && !r.contains("UNION ALL"));
        assert!(r.contains("transform(node, ['a'], [toUInt64(5)], toUInt64(0))"));
    }

    /// A private ClickHouse server with the lease table in `ctw`, and a
    /// client on it (`None`: skipped, no server installed).
    fn lease_server() -> Option<(ctw_testkit::clickhouse::ClickHouse, clickhouse::Client)> {
        if !ctw_testkit::clickhouse::available() {
            ctw_testkit::skip("needs clickhouse-server (apt-get install clickhouse-server)");
            return None;
        }
        let ch = ctw_testkit::clickhouse::ClickHouse::start();
        ch.must("CREATE DATABASE ctw");
        ch.must(&create_table_sql("ctw"));
        let client = clickhouse::Client::default()
            .with_url(ch.url())
            .with_compression(clickhouse::Compression::None);
        Some((ch, client))
    }

    const S: u64 = 1_000_000_000;
    const DAY: u64 = 86_400 * S;

    /// A lease row with the JSON of a real [`AgentInfo`] (addresses padded
    /// to about 600 bytes, as a node with many pods lists).
    fn row(node: &str, c: &str, boot: &str, connected: u64, expires: u64, updated: u64) -> Lease {
        let mut a = agent(node, boot, 1);
        a.addresses = (0..30)
            .map(|i| format!("198.18.{}.{i}/24", i % 7))
            .collect();
        Lease {
            boot_id: boot.into(),
            info: serde_json::to_string(&a).unwrap(),
            ..lease(node, c, connected, expires, updated)
        }
    }

    /// Many collector ids of past rollouts per node: the read returns at
    /// most two rows per node (the newest and the unexpired ones, plus the
    /// restart candidate of a stream that just started), and holder,
    /// agents page and restart gap are what the rows written say.
    #[tokio::test]
    async fn a_read_returns_a_row_or_two_per_node_however_many_collectors_held_it() {
        let Some((_ch, client)) = lease_server() else {
            return;
        };
        let t = now_ns();
        let since = t - 14 * DAY;
        let mut rows = Vec::new();
        // 60 rollouts' worth of collector ids per node, each released an
        // hour after the one before (the newest 1 h ago), and one of a
        // collector id last written 20 days ago (past the retention).
        for node in ["n1", "n2", "n3", "n4"] {
            for i in 0..60u64 {
                let u = t - (61 - i) * 3600 * S;
                rows.push(row(node, &format!("old-{i}"), "b0", u - 3000 * S, u, u));
            }
            rows.push(row(
                node,
                "ancient",
                "b0",
                t - 21 * DAY,
                t + DAY,
                t - 20 * DAY,
            ));
        }
        // n1: held by c-now (an older version of its row, expired, below).
        rows.push(row("n1", "c-now", "b1", t - 10 * S, t + 60 * S, t - S));
        // n2: taken over by c2 (started last) while c1 still renews.
        rows.push(row("n2", "c1", "b2", t - 100 * S, t + 30 * S, t - 2 * S));
        rows.push(row("n2", "c2", "b2", t - 5 * S, t + 40 * S, t - 3 * S));
        // n3: nobody holds it since c-last released it 10 minutes ago.
        rows.push(row(
            "n3",
            "c-last",
            "b3",
            t - 900 * S,
            t - 600 * S,
            t - 600 * S,
        ));
        // n4: c-prev released boot b-old 30 s ago; the agent restarted
        // (boot b-new) onto this collector 2 s ago, and briefly onto c-late
        // too (released 1 s ago).
        rows.push(row(
            "n4",
            "c-prev",
            "b-old",
            t - 900 * S,
            t - 30 * S,
            t - 30 * S,
        ));
        rows.push(row("n4", "c-late", "b-new", t - 2 * S, t - S, t - S));
        insert(&client, "ctw", &rows).await.unwrap();
        // Newer versions win: an older, unexpired version of c-now's row
        // and a newer, released one of a past id, in separate parts.
        insert(
            &client,
            "ctw",
            &[
                row("n1", "c-now", "b-x", t - 3 * DAY, t + 600 * S, t - 2 * DAY),
                row("n1", "old-59", "b0", t - 3000 * S, t - 30 * S, t - 30 * S),
            ],
        )
        .await
        .unwrap();
        let total: u64 = client
            .query("SELECT count() FROM ctw.ctw_leases")
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(total, 4 * 61 + 8);

        let started = 2 * S;
        // Streams that started here: hundreds of nodes never seen (a
        // collector that every agent reconnects to at once: more than one
        // query's worth, names with quotes and `?`), n4 last.
        let mut streams: Vec<(String, u64)> = (0..450)
            .map(|i| (format!("it's-node?{i:0>200}"), t - started))
            .collect();
        streams.push(("n4".into(), t - started));
        let leases = read_leases(&client, "ctw", since, t, &streams)
            .await
            .unwrap();
        let mut per_node: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for l in &leases {
            per_node.entry(&l.node).or_default().push(&l.collector_id);
        }
        for v in per_node.values_mut() {
            v.sort();
        }
        let want: BTreeMap<&str, Vec<&str>> = [
            ("n1", vec!["c-now"]),
            ("n2", vec!["c1", "c2"]),
            ("n3", vec!["c-last"]),
            ("n4", vec!["c-late", "c-prev"]),
        ]
        .into();
        assert_eq!(per_node, want);
        let bytes: usize = leases.iter().map(|l| l.info.len()).sum();
        assert!(bytes <= 2 * 4 * 700, "{bytes} bytes of AgentInfo");

        // Holders, by the rows written.
        let h = holder(&leases, "n1", t).unwrap();
        assert_eq!(
            (h.collector_id.as_str(), h.boot_id.as_str()),
            ("c-now", "b1")
        );
        assert_eq!(holder(&leases, "n2", t).unwrap().collector_id, "c2");
        assert!(holder(&leases, "n3", t).is_none());
        assert!(holder(&leases, "n4", t).is_none());
        // The restart gap: from c-prev's last write to the stream's start.
        let g = restart_gap(&leases, &agent("n4", "b-new", 1), t - started).unwrap();
        assert_eq!((g.from_ns, g.to_ns), (t - 30 * S, t - started));
        // Without the started stream, the read has no row before it.
        let plain = read_leases(&client, "ctw", since, t, &[]).await.unwrap();
        assert_eq!(plain.iter().filter(|l| l.node == "n4").count(), 1);
        assert_eq!(plain.len(), 5);

        // The agents page: every node, its holder or when it was last held.
        let registry = Arc::new(Registry::new(Metrics::new()));
        let opts = PeersOptions {
            me: PeerIdentity {
                collector_id: "me".into(),
                advertise_addr: "127.0.0.1:9359".into(),
                peer_server_name: "collector".into(),
            },
            lease_ttl: Duration::from_secs(15),
            renew_interval: Duration::from_secs(3),
            tls: TlsFiles {
                ca_file: "/nonexistent/ca.pem".into(),
                cert_file: "/nonexistent/c.pem".into(),
                key_file: "/nonexistent/k.pem".into(),
            },
            clickhouse: serde_yaml::from_str("{}").unwrap(),
            forward_timeout: Duration::from_secs(1),
        };
        let peers = Peers::with_leases(opts, registry.clone(), leases);
        let page: Vec<(String, bool, Option<String>, Option<String>)> =
            agents(&registry, Some(&peers))
                .into_iter()
                .map(|a| (a.node, a.connected, a.collector, a.disconnected_since))
                .collect();
        assert_eq!(
            page,
            vec![
                ("n1".into(), true, Some("c-now".into()), None),
                ("n2".into(), true, Some("c2".into()), None),
                ("n3".into(), false, None, Some(rfc3339_ns(t - 600 * S))),
                ("n4".into(), false, None, Some(rfc3339_ns(t - S))),
            ]
        );
    }

    /// Rows past the retention go: the nodes gone that long and the
    /// collector ids that have not written a node since; the rest stay.
    /// In a ClickHouse cluster (2 shards, one replica each, ZooKeeper) the
    /// lease table is one replicated table on every server: a lease written
    /// through shard 1's server is read through shard 2's (collectors
    /// talking to different servers see each other's leases), and the
    /// retention's delete through one server reaches the other.
    #[tokio::test]
    async fn in_a_cluster_every_server_holds_every_lease() {
        use ctw_testkit::clickhouse::{cluster_available, Cluster, CLUSTER};
        if !cluster_available() {
            ctw_testkit::skip("needs clickhouse-server and zookeeperd");
            return;
        }
        let cl = Cluster::start(2, 1);
        let opts = ClusterOptions {
            name: CLUSTER.into(),
            zookeeper_path: "/clickhouse/tables/{shard}".into(),
            insert_quorum: None,
            shards: Vec::new(),
        };
        // ON CLUSTER DDL needs every server's ZooKeeper session and DDL
        // worker up, which can lag the servers' start under load: retried,
        // as the collector does.
        for sql in [
            format!("CREATE DATABASE IF NOT EXISTS ctw ON CLUSTER {CLUSTER}"),
            create_table_statement("ctw", Some(&opts)),
        ] {
            ctw_testkit::wait_for(Duration::from_secs(120), "the ON CLUSTER DDL", || {
                cl.servers[0].query(&sql).ok()
            });
        }
        let client = |i: usize| {
            clickhouse::Client::default()
                .with_url(cl.servers[i].url())
                .with_compression(clickhouse::Compression::None)
        };
        let t = now_ns();
        let fresh = row("n1", "c1", "b1", t - 10 * S, t + 60 * S, t - S);
        let old = row("n2", "c1", "b2", t - 31 * DAY, t - 30 * DAY, t - 30 * DAY);
        insert(&client(0), "ctw", &[fresh.clone(), old])
            .await
            .unwrap();
        let count = |i: usize| cl.servers[i].must("SELECT count() FROM ctw.ctw_leases");
        ctw_testkit::eventually(
            Duration::from_secs(30),
            "the leases on shard 2's server",
            || count(1).trim() == "2",
        )
        .await;
        let read: Vec<Lease> = client(1)
            .query(&read_sql("ctw", t - 14 * DAY, Some(t), &[]))
            .fetch_all()
            .await
            .unwrap();
        assert_eq!(read, vec![fresh], "read through the other server");
        assert_eq!(prune(&client(1), "ctw", t - 14 * DAY).await.unwrap(), 1);
        ctw_testkit::eventually(
            Duration::from_secs(30),
            "the delete on shard 1's server",
            || count(0).trim() == "1",
        )
        .await;
    }

    #[tokio::test]
    async fn rows_past_the_retention_are_deleted() {
        let Some((ch, client)) = lease_server() else {
            return;
        };
        let t = now_ns();
        let cutoff = t - 14 * DAY;
        let mut rows = Vec::new();
        // n1: 20 collector ids superseded 15-34 days ago, and its holder.
        for i in 0..20u64 {
            let u = t - (15 + i) * DAY;
            rows.push(row("n1", &format!("old-{i}"), "b0", u - S, u, u));
        }
        rows.push(row("n1", "c-now", "b1", t - 10 * S, t + 60 * S, t - S));
        // n2: gone 30 days ago; n3: gone 13 days ago (kept).
        rows.push(row(
            "n2",
            "c1",
            "b2",
            t - 31 * DAY,
            t - 30 * DAY,
            t - 30 * DAY,
        ));
        rows.push(row(
            "n3",
            "c1",
            "b3",
            t - 14 * DAY,
            t - 13 * DAY,
            t - 13 * DAY,
        ));
        // An old version of c-now's row (replaced, and past the retention).
        rows.push(row(
            "n1",
            "c-now",
            "b1",
            t - 20 * DAY,
            t - 20 * DAY,
            t - 20 * DAY,
        ));
        insert(&client, "ctw", &rows).await.unwrap();

        assert_eq!(prune(&client, "ctw", cutoff).await.unwrap(), 22);
        // The mutation runs in the background.
        let left = || {
            ch.must("SELECT node, collector_id, updated_ns FROM ctw.ctw_leases ORDER BY node FORMAT TSV")
        };
        ctw_testkit::eventually(Duration::from_secs(60), "old lease rows deleted", || {
            left().lines().count() == 2
        })
        .await;
        assert_eq!(
            left(),
            format!("n1\tc-now\t{}\nn3\tc1\t{}\n", t - S, t - 13 * DAY)
        );
        // Nothing left to delete: no mutation asked for.
        assert_eq!(prune(&client, "ctw", cutoff).await.unwrap(), 0);
        let mutations = ch.must("SELECT count() FROM system.mutations WHERE table = 'ctw_leases'");
        assert_eq!(mutations.trim(), "1");
    }

    #[test]
    fn clock_offset_is_rounded_to_whole_seconds_around_the_servers_second() {
        let s = 1_700_000_000u64;
        // Local clock inside the server's second: no offset.
        assert_eq!(offset_s(s * 1_000_000_000 + 100_000_000, s), 0);
        assert_eq!(offset_s(s * 1_000_000_000 + 900_000_000, s), 0);
        // 20 s ahead, 20 s behind.
        assert_eq!(offset_s((s + 20) * 1_000_000_000 + 500_000_000, s), 20);
        assert_eq!(offset_s((s - 20) * 1_000_000_000 + 500_000_000, s), -20);
    }

    #[test]
    fn times_round_trip_through_rfc3339() {
        let ns = 1_733_727_900_123_000_000;
        assert_eq!(parse_rfc3339_ns(&rfc3339_ns(ns)), Some(ns));
    }
}

//! Every agent the collector has seen since it started, connected or not:
//! what its Hello said, its last batch, lag and loss counters; and the live
//! lookups carried over its stream (request ids, pending replies, timeouts).
//!
//! Times in [`AgentInfo`] are RFC 3339 strings in UTC with millisecond
//! precision (`2024-12-09T07:05:00.123Z`); durations are seconds as `f64`.
//!
//! Disconnections: when an agent's stream ends, the agent is kept with
//! `connected: false` and `disconnected_since`; [`Registry::open_gaps`]
//! reports that window as an open `agent_disconnected` gap (up to now), so
//! searches over it say they may be incomplete: records of that window may
//! still sit in the agent's spool. When the same agent process (same boot
//! id) comes back, it replays its spool and reports spool overflow itself, so
//! nothing is recorded. When it comes back with a new boot id, it restarted
//! and capture was down: [`Registry::connect`] returns an `agent_restarted`
//! gap from its last contact to now, which the ingest service stores. The
//! registry is in memory: a collector restart forgets the agents until they
//! reconnect (their spools cover the collector's downtime).
//!
//! Heartbeats: agents that send them (every `collector.heartbeat_interval_ms`
//! of the agent, 10 s by default) get `last_heartbeat` (the collector's
//! receipt time), the agent's clock, its live-entry count and newest record
//! time in [`AgentInfo`]; older agents send none and those fields are absent.
//!
//! Conntrack zones: every stored batch adds the zones (`CTA_ZONE`) of its
//! records to the node's set ([`Registry::zones_of`]); a live lookup without
//! an explicit zone tries zone 0 and then these (a GET looks in one zone
//! only; OVN-Kubernetes and OVS keep NAT state in non-zero zones).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ctw_common::api::format_time;
use ctw_common::{unix_ns, ConnRecord};
use ctw_proto::pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::metrics::Metrics;
use crate::store::Gap;

/// What the collector sends down an agent's stream.
pub type AgentSender = mpsc::Sender<Result<pb::CollectorMessage, Status>>;

/// A live lookup: the same question as the agent's `/api/conntrack/query`
/// (the API's type).
pub use ctw_common::api::LiveQuery;

/// An agent's answer: the live conntrack entry and the node that has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAnswer {
    pub node: String,
    pub record: ConnRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {0} did not answer in time")]
    Timeout(String),
    #[error("agent error: {0}")]
    Agent(String),
    #[error("agent sent a bad reply: {0}")]
    BadReply(String),
}

impl LookupError {
    /// The `result` label of `ctw_collector_lookups_total`.
    pub fn label(&self) -> &'static str {
        match self {
            LookupError::NotConnected(_) => "not_connected",
            LookupError::Timeout(_) => "timeout",
            LookupError::Agent(_) | LookupError::BadReply(_) => "agent_error",
        }
    }
}

/// One agent as `GET /api/v1/agents` shows it (the API's type).
pub use ctw_common::api::AgentInfo;

#[derive(Debug)]
struct Conn {
    id: u64,
    tx: AgentSender,
}

#[derive(Debug)]
struct Agent {
    addresses: Vec<String>,
    owned: Vec<IpAddr>,
    boot_id: String,
    version: String,
    conn: Option<Conn>,
    peer: Option<String>,
    connected_since: Option<SystemTime>,
    disconnected_since: Option<SystemTime>,
    last_seen: Option<SystemTime>,
    last_batch_at: Option<SystemTime>,
    last_batch_boot_id: Option<String>,
    last_batch_seq: Option<u64>,
    lag: Option<Duration>,
    batches_stored: u64,
    records_stored: u64,
    duplicates: u64,
    conversion_errors: u64,
    loss_reports: u64,
    events_lost: u64,
    connections: u64,
    /// Conntrack zones seen in this node's stored records.
    zones: BTreeSet<u16>,
    /// The last heartbeat (kept after a disconnection); `None` for agents
    /// that send none (older versions).
    heartbeat: Option<HeartbeatSeen>,
}

#[derive(Debug)]
struct Pending {
    conn: u64,
    node: String,
    tx: oneshot::Sender<pb::LookupReply>,
}

#[derive(Debug, Default)]
struct Inner {
    agents: BTreeMap<String, Agent>,
    pending: HashMap<u64, Pending>,
}

/// The agents and their pending lookups. Share it with `Arc`.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    metrics: Metrics,
    /// With collector replicas: [`Registry::connect`] returns no
    /// `agent_restarted` gap (the lease table decides, `peers::restart_gap`).
    restart_gaps_from_leases: AtomicBool,
}

/// What Hello told about an agent (see `pb::Hello`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    pub addresses: Vec<String>,
    pub boot_id: String,
    pub version: String,
    pub peer: Option<String>,
}

/// One stored batch, for the agent's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    pub boot_id: String,
    pub seq: u64,
    pub records: u64,
    pub duplicate: bool,
    pub conversion_errors: u64,
    /// Newest record time in the batch (ns since the epoch), if any.
    pub newest_event_ns: Option<u64>,
    /// Distinct conntrack zones of the batch's records.
    pub zones: Vec<u16>,
}

/// What a heartbeat said (see `pb::Heartbeat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatInfo {
    /// The agent's clock when it sent the heartbeat (ns since the epoch).
    pub agent_time_ns: u64,
    /// The agent's interval between heartbeats.
    pub interval: Duration,
    /// Entries of watched ports the agent believes alive.
    pub live_entries: u64,
    /// Event time of the newest record the agent captured (ns since the
    /// epoch); `None` when it has captured none since it started.
    pub last_record_ns: Option<u64>,
}

impl From<&pb::Heartbeat> for HeartbeatInfo {
    fn from(h: &pb::Heartbeat) -> HeartbeatInfo {
        HeartbeatInfo {
            agent_time_ns: h.time_ns,
            interval: Duration::from_millis(h.interval_ms),
            live_entries: h.live_entries,
            last_record_ns: (h.last_record_ns != 0).then_some(h.last_record_ns),
        }
    }
}

/// A heartbeat and when the collector received it.
#[derive(Debug, Clone, Copy)]
struct HeartbeatSeen {
    received: SystemTime,
    info: HeartbeatInfo,
}

/// The handle of one stream in the registry; pass it back on every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnToken {
    pub node: String,
    id: u64,
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| {
        chrono::DateTime::<chrono::Utc>::from(t)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    })
}

/// An address as a Hello may list it: `10.0.0.1`, `fd00::1` or with a
/// prefix length (`10.0.0.1/24`).
fn parse_address(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.trim().parse().ok()
}

impl Registry {
    pub fn new(metrics: Metrics) -> Registry {
        Registry {
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            metrics,
            restart_gaps_from_leases: AtomicBool::new(false),
        }
    }

    /// With collector replicas: leave `agent_restarted` gaps to the lease
    /// table (`peers::restart_gap`). This registry only knows the agent's
    /// streams to this collector: an agent that left with one boot id and
    /// comes back with another may have restarted while it streamed to
    /// another collector, which recorded that gap; the time since it left
    /// here was not lost.
    pub fn leave_restart_gaps_to_leases(&self) {
        self.restart_gaps_from_leases.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn update_gauge(&self, inner: &Inner) {
        let n = inner.agents.values().filter(|a| a.conn.is_some()).count();
        self.metrics.agents_connected.set(n as i64);
    }

    /// A verified agent said Hello. A stream of the same node that is still
    /// registered is replaced (it is told so and ends). Returns the stream's
    /// token and, when the agent was disconnected before, the closed
    /// `agent_disconnected` gap to record.
    pub fn connect(
        &self,
        node: &str,
        hello: HelloInfo,
        tx: AgentSender,
    ) -> (ConnToken, Option<Gap>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        let mut g = self.lock();
        let agent = g.agents.entry(node.to_string()).or_insert_with(|| Agent {
            addresses: Vec::new(),
            owned: Vec::new(),
            boot_id: String::new(),
            version: String::new(),
            conn: None,
            peer: None,
            connected_since: None,
            disconnected_since: None,
            last_seen: None,
            last_batch_at: None,
            last_batch_boot_id: None,
            last_batch_seq: None,
            lag: None,
            batches_stored: 0,
            records_stored: 0,
            duplicates: 0,
            conversion_errors: 0,
            loss_reports: 0,
            events_lost: 0,
            connections: 0,
            zones: BTreeSet::new(),
            heartbeat: None,
        });
        if let Some(old) = agent.conn.take() {
            let _ = old.tx.try_send(Err(Status::aborted(
                "replaced by a newer stream of the same node",
            )));
        }
        // A reconnect of the same agent process loses nothing: it spooled
        // while away and replays, and reports spool overflow itself. A new
        // boot id means the agent restarted: capture was down from its last
        // contact until now.
        let away_since = agent.disconnected_since.take();
        let restarted = !agent.boot_id.is_empty()
            && agent.boot_id != hello.boot_id
            && !self.restart_gaps_from_leases.load(Ordering::Relaxed);
        let gap = match (restarted, away_since.or(agent.last_seen)) {
            (true, Some(from)) => Some(Gap {
                node: node.to_string(),
                from_ns: unix_ns(from),
                to_ns: unix_ns(now),
                reason: "agent_restarted".into(),
                count: 0,
            }),
            _ => None,
        };
        agent.owned = hello
            .addresses
            .iter()
            .filter_map(|a| parse_address(a))
            .collect();
        agent.addresses = hello.addresses;
        agent.boot_id = hello.boot_id;
        agent.version = hello.version;
        agent.peer = hello.peer;
        agent.conn = Some(Conn { id, tx });
        agent.connected_since = Some(now);
        agent.last_seen = Some(now);
        agent.connections += 1;
        self.update_gauge(&g);
        (
            ConnToken {
                node: node.to_string(),
                id,
            },
            gap,
        )
    }

    /// The stream of `token` ended. Its pending lookups fail at once. Does
    /// nothing when a newer stream of the node replaced it.
    pub fn disconnect(&self, token: &ConnToken) {
        let now = SystemTime::now();
        let mut g = self.lock();
        g.pending.retain(|_, p| p.conn != token.id);
        let Some(agent) = g.agents.get_mut(&token.node) else {
            return;
        };
        if agent.conn.as_ref().is_some_and(|c| c.id == token.id) {
            agent.conn = None;
            agent.disconnected_since = Some(now);
        }
        self.update_gauge(&g);
    }

    fn with_agent(&self, token: &ConnToken, f: impl FnOnce(&mut Agent)) {
        let mut g = self.lock();
        if let Some(a) = g.agents.get_mut(&token.node) {
            a.last_seen = Some(SystemTime::now());
            f(a);
        }
    }

    /// Any message arrived on the stream.
    pub fn touch(&self, token: &ConnToken) {
        self.with_agent(token, |_| {});
    }

    /// A batch was stored (or was a duplicate).
    pub fn batch_stored(&self, token: &ConnToken, b: &BatchInfo) {
        let now = SystemTime::now();
        self.with_agent(token, |a| {
            a.last_batch_at = Some(now);
            a.last_batch_boot_id = Some(b.boot_id.clone());
            a.last_batch_seq = Some(b.seq);
            a.conversion_errors += b.conversion_errors;
            a.zones.extend(b.zones.iter().copied());
            if b.duplicate {
                a.duplicates += 1;
            } else {
                a.batches_stored += 1;
                a.records_stored += b.records;
            }
            if let Some(newest) = b.newest_event_ns {
                a.lag = Some(Duration::from_nanos(unix_ns(now).saturating_sub(newest)));
            }
        });
    }

    /// A heartbeat arrived on the stream (received now).
    pub fn heartbeat(&self, token: &ConnToken, info: &HeartbeatInfo) {
        let now = SystemTime::now();
        self.with_agent(token, |a| {
            a.heartbeat = Some(HeartbeatSeen {
                received: now,
                info: *info,
            })
        });
    }

    /// When the collector received `node`'s last heartbeat, if it sent one.
    pub fn last_heartbeat(&self, node: &str) -> Option<SystemTime> {
        let g = self.lock();
        g.agents.get(node)?.heartbeat.map(|h| h.received)
    }

    /// The agent reported `count` events or records lost.
    pub fn loss_reported(&self, token: &ConnToken, count: u64) {
        self.with_agent(token, |a| {
            a.loss_reports += 1;
            a.events_lost = a.events_lost.saturating_add(count);
        });
    }

    /// Every agent seen, by node name.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let g = self.lock();
        g.agents
            .iter()
            .map(|(node, a)| AgentInfo {
                node: node.clone(),
                addresses: a.addresses.clone(),
                boot_id: a.boot_id.clone(),
                version: a.version.clone(),
                connected: a.conn.is_some(),
                peer: a.peer.clone(),
                connected_since: rfc3339(a.connected_since),
                disconnected_since: rfc3339(a.disconnected_since),
                last_seen: rfc3339(a.last_seen),
                last_batch_at: rfc3339(a.last_batch_at),
                last_batch_boot_id: a.last_batch_boot_id.clone(),
                last_batch_seq: a.last_batch_seq,
                lag_seconds: a.lag.map(|d| d.as_secs_f64()),
                batches_stored: a.batches_stored,
                records_stored: a.records_stored,
                duplicates: a.duplicates,
                conversion_errors: a.conversion_errors,
                loss_reports: a.loss_reports,
                events_lost: a.events_lost,
                connections: a.connections,
                collector: None,
                last_heartbeat: a.heartbeat.map(|h| format_time(unix_ns(h.received))),
                heartbeat_interval_seconds: a.heartbeat.map(|h| h.info.interval.as_secs_f64()),
                heartbeat_agent_time: a.heartbeat.map(|h| format_time(h.info.agent_time_ns)),
                live_entries: a.heartbeat.map(|h| h.info.live_entries),
                last_event_at: a
                    .heartbeat
                    .and_then(|h| h.info.last_record_ns)
                    .map(format_time),
            })
            .collect()
    }

    /// Open `agent_disconnected` gaps: from each disconnected agent's
    /// disconnection to now. Merge them into search results.
    pub fn open_gaps(&self) -> Vec<Gap> {
        let now = ctw_common::now_ns();
        let g = self.lock();
        g.agents
            .iter()
            .filter_map(|(node, a)| {
                a.disconnected_since.map(|from| Gap {
                    node: node.clone(),
                    from_ns: unix_ns(from),
                    to_ns: now,
                    reason: "agent_disconnected".into(),
                    count: 0,
                })
            })
            .collect()
    }

    /// The connected agent whose Hello addresses contain `ip`.
    pub fn node_owning(&self, ip: IpAddr) -> Option<String> {
        let g = self.lock();
        g.agents
            .iter()
            .find(|(_, a)| a.conn.is_some() && a.owned.contains(&ip))
            .map(|(n, _)| n.clone())
    }

    /// The agent, connected or not, whose Hello addresses contain `ip`: the
    /// node whose capture should have seen connections SNATed to `ip`.
    pub fn node_owning_any(&self, ip: IpAddr) -> Option<String> {
        let g = self.lock();
        g.agents
            .iter()
            .find(|(_, a)| a.owned.contains(&ip))
            .map(|(n, _)| n.clone())
    }

    /// Remember that `node` uses conntrack zone `zone` (from an indexed
    /// record). Unknown nodes are ignored.
    pub fn add_zone(&self, node: &str, zone: u16) {
        if let Some(a) = self.lock().agents.get_mut(node) {
            a.zones.insert(zone);
        }
    }

    /// The conntrack zones to try for a lookup on `node` without an
    /// explicit zone: 0 first, then every zone seen in its records.
    pub fn zones_of(&self, node: &str) -> Vec<u16> {
        let g = self.lock();
        let mut zones = vec![0];
        if let Some(a) = g.agents.get(node) {
            zones.extend(a.zones.iter().copied().filter(|&z| z != 0));
        }
        zones
    }

    pub fn connected_nodes(&self) -> Vec<String> {
        let g = self.lock();
        g.agents
            .iter()
            .filter(|(_, a)| a.conn.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.lock()
            .agents
            .get(node)
            .is_some_and(|a| a.conn.is_some())
    }

    /// Ask `node`'s agent for a live entry over its stream. `Ok(None)`: the
    /// agent has no such entry.
    pub async fn lookup_on(
        &self,
        node: &str,
        q: LiveQuery,
        timeout: Duration,
    ) -> Result<Option<LiveAnswer>, LookupError> {
        let result = self.lookup_inner(node, q, timeout).await;
        let label = match &result {
            Ok(Some(_)) => "found",
            Ok(None) => "not_found",
            Err(e) => e.label(),
        };
        self.metrics.lookups.with_label_values(&[label]).inc();
        result
    }

    async fn lookup_inner(
        &self,
        node: &str,
        q: LiveQuery,
        timeout: Duration,
    ) -> Result<Option<LiveAnswer>, LookupError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let tx = {
            let mut g = self.lock();
            let conn = g
                .agents
                .get(node)
                .and_then(|a| a.conn.as_ref())
                .map(|c| (c.id, c.tx.clone()));
            let Some((conn, tx)) = conn else {
                return Err(LookupError::NotConnected(node.to_string()));
            };
            g.pending.insert(
                request_id,
                Pending {
                    conn,
                    node: node.to_string(),
                    tx: reply_tx,
                },
            );
            tx
        };
        // Removes the pending entry however this future ends (timeout,
        // error, or the caller dropping it).
        let _cleanup = PendingGuard {
            registry: self,
            id: request_id,
        };
        let msg = pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::Lookup(pb::LookupRequest {
                request_id,
                protocol: u32::from(q.protocol.number()),
                tuple: Some((&q.tuple).into()),
                reply_tuple: q.reply_tuple,
                node: node.to_string(),
                zone: q.zone.map(u32::from),
            })),
        };
        match tokio::time::timeout_at(deadline, tx.send(Ok(msg))).await {
            Err(_) => return Err(LookupError::Timeout(node.to_string())),
            Ok(Err(_)) => return Err(LookupError::NotConnected(node.to_string())),
            Ok(Ok(())) => {}
        }
        let reply = match tokio::time::timeout_at(deadline, reply_rx).await {
            Err(_) => return Err(LookupError::Timeout(node.to_string())),
            // The stream ended before the agent answered.
            Ok(Err(_)) => return Err(LookupError::NotConnected(node.to_string())),
            Ok(Ok(r)) => r,
        };
        if !reply.error.is_empty() {
            return Err(LookupError::Agent(reply.error));
        }
        if !reply.found {
            return Ok(None);
        }
        let entry = reply
            .entry
            .as_ref()
            .ok_or_else(|| LookupError::BadReply("found without an entry".into()))?;
        let record =
            ConnRecord::try_from(entry).map_err(|e| LookupError::BadReply(e.to_string()))?;
        Ok(Some(LiveAnswer {
            node: node.to_string(),
            record,
        }))
    }

    /// A LookupReply arrived on the stream of `token`. Replies to requests
    /// that were not sent on this stream (or that timed out) are dropped;
    /// returns whether it completed a pending lookup.
    pub fn complete_lookup(&self, token: &ConnToken, reply: pb::LookupReply) -> bool {
        let mut g = self.lock();
        if let Some(a) = g.agents.get_mut(&token.node) {
            a.last_seen = Some(SystemTime::now());
        }
        match g.pending.get(&reply.request_id) {
            Some(p) if p.conn == token.id && p.node == token.node => {}
            _ => return false,
        }
        match g.pending.remove(&reply.request_id) {
            Some(p) => p.tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Lookups waiting for an answer (for tests and debugging).
    pub fn pending_lookups(&self) -> usize {
        self.lock().pending.len()
    }
}

struct PendingGuard<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.registry.lock().pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ctw_common::{Protocol, Tuple};

    fn hello(addrs: &[&str]) -> HelloInfo {
        HelloInfo {
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            boot_id: "b1".into(),
            version: "0.1.0".into(),
            peer: None,
        }
    }

    fn query() -> LiveQuery {
        LiveQuery {
            protocol: Protocol::Tcp,
            tuple: Tuple {
                src: "198.19.0.2".parse().unwrap(),
                dst: "198.19.0.1".parse().unwrap(),
                src_port: 80,
                dst_port: 1024,
            },
            reply_tuple: true,
            zone: None,
        }
    }

    #[test]
    fn with_replicas_restart_gaps_are_left_to_the_leases() {
        // The agent left this collector with boot "b", restarted while it
        // streamed to another collector (which recorded the restart), and
        // came back here days later: this registry's last sight of it says
        // nothing of the time in between.
        let r = Registry::new(Metrics::new());
        r.leave_restart_gaps_to_leases();
        let (tx, _rx) = mpsc::channel(4);
        let (t, gap) = r.connect("a", hello(&[]), tx);
        assert!(gap.is_none());
        r.disconnect(&t);
        let mut h = hello(&[]);
        h.boot_id = "b2".into();
        let (tx, _rx) = mpsc::channel(4);
        let (_t, gap) = r.connect("a", h, tx);
        assert_eq!(gap, None);
        assert!(r.open_gaps().is_empty());
    }

    #[test]
    fn owner_is_a_connected_agent_listing_the_address() {
        let r = Registry::new(Metrics::new());
        let (tx, _rx) = mpsc::channel(4);
        let (t, gap) = r.connect("a", hello(&["198.19.0.1/24", "fd00::1"]), tx);
        assert!(gap.is_none());
        assert_eq!(
            r.node_owning("198.19.0.1".parse().unwrap()).as_deref(),
            Some("a")
        );
        assert_eq!(
            r.node_owning("fd00::1".parse().unwrap()).as_deref(),
            Some("a")
        );
        assert_eq!(r.node_owning("198.19.0.9".parse().unwrap()), None);
        assert_eq!(r.connected_nodes(), vec!["a".to_string()]);
        r.disconnect(&t);
        assert_eq!(r.node_owning("198.19.0.1".parse().unwrap()), None);
        assert!(r.connected_nodes().is_empty());
        let agents = r.agents();
        assert_eq!(agents.len(), 1);
        assert!(!agents[0].connected && agents[0].disconnected_since.is_some());
        assert_eq!(r.open_gaps().len(), 1);
        // The same agent process coming back closes the open gap; its spool
        // replay fills it, so there is nothing to record.
        let (tx, _rx) = mpsc::channel(4);
        let (t, gap) = r.connect("a", hello(&[]), tx);
        assert!(gap.is_none());
        assert!(r.open_gaps().is_empty());
        // A restarted agent (new boot id): capture was down, record a gap.
        r.disconnect(&t);
        let (tx, _rx) = mpsc::channel(4);
        let mut h = hello(&[]);
        h.boot_id = "b2".into();
        let (_t, gap) = r.connect("a", h, tx);
        let gap = gap.unwrap();
        assert_eq!(gap.reason, "agent_restarted");
        assert!(gap.from_ns <= gap.to_ns);
        assert!(r.open_gaps().is_empty());
    }

    #[test]
    fn zones_seen_in_batches_are_tried_after_zone_0() {
        let r = Registry::new(Metrics::new());
        let (tx, _rx) = mpsc::channel(4);
        let (t, _) = r.connect("a", hello(&["198.19.0.1"]), tx);
        assert_eq!(r.zones_of("a"), vec![0]);
        assert_eq!(r.zones_of("unknown"), vec![0]);
        let batch = |zones: Vec<u16>| BatchInfo {
            boot_id: "b1".into(),
            seq: 1,
            records: 2,
            duplicate: false,
            conversion_errors: 0,
            newest_event_ns: None,
            zones,
        };
        r.batch_stored(&t, &batch(vec![7, 0]));
        r.batch_stored(&t, &batch(vec![3]));
        assert_eq!(r.zones_of("a"), vec![0, 3, 7]);
        r.add_zone("a", 9);
        r.add_zone("unknown", 9);
        assert_eq!(r.zones_of("a"), vec![0, 3, 7, 9]);
        assert_eq!(r.zones_of("unknown"), vec![0]);
        // The owner is known after it disconnects (its capture is what
        // should have seen the address's connections).
        r.disconnect(&t);
        assert_eq!(r.node_owning("198.19.0.1".parse().unwrap()), None);
        assert_eq!(
            r.node_owning_any("198.19.0.1".parse().unwrap()).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn heartbeats_are_shown_and_absent_for_agents_that_send_none() {
        let r = Registry::new(Metrics::new());
        let (tx, _rx) = mpsc::channel(4);
        let (old, _) = r.connect("old", hello(&[]), tx);
        let (tx, _rx2) = mpsc::channel(4);
        let (new, _) = r.connect("new", hello(&[]), tx);
        r.touch(&old);
        let before = SystemTime::now();
        let info = HeartbeatInfo::from(&pb::Heartbeat {
            time_ns: 1_733_727_900_123_000_000,
            interval_ms: 10_000,
            live_entries: 4,
            last_record_ns: 0,
        });
        assert_eq!(info.last_record_ns, None, "0: no record yet");
        r.heartbeat(&new, &info);
        let got = r.last_heartbeat("new").unwrap();
        assert!(got >= before);
        assert_eq!(r.last_heartbeat("old"), None);
        let agents = r.agents();
        let (o, n) = (&agents[1], &agents[0]);
        assert_eq!((o.node.as_str(), n.node.as_str()), ("old", "new"));
        assert_eq!(o.last_heartbeat, None);
        assert_eq!(o.live_entries, None);
        let json = serde_json::to_value(o).unwrap();
        for k in ["last_heartbeat", "heartbeat_agent_time", "live_entries"] {
            assert!(json.get(k).is_none(), "{k} absent: {json}");
        }
        assert_eq!(n.last_heartbeat, rfc3339(Some(got)));
        assert_eq!(
            n.heartbeat_agent_time.as_deref(),
            Some("2024-12-09T07:05:00.123Z")
        );
        assert_eq!(n.heartbeat_interval_seconds, Some(10.0));
        assert_eq!(n.live_entries, Some(4));
        assert_eq!(n.last_event_at, None);
        // Kept after the stream ends.
        r.disconnect(&new);
        assert!(r.agents()[0].last_heartbeat.is_some());
    }

    #[test]
    fn a_replaced_stream_does_not_disconnect_the_new_one() {
        let r = Registry::new(Metrics::new());
        let (tx1, mut rx1) = mpsc::channel(4);
        let (t1, _) = r.connect("a", hello(&[]), tx1);
        let (tx2, _rx2) = mpsc::channel(4);
        let (_t2, _) = r.connect("a", hello(&[]), tx2);
        assert!(
            matches!(rx1.try_recv(), Ok(Err(_))),
            "old stream told to end"
        );
        r.disconnect(&t1);
        assert!(r.is_connected("a"));
        assert_eq!(r.metrics.agents_connected.get(), 1);
    }

    #[tokio::test]
    async fn lookup_round_trip_timeout_and_not_connected() {
        let r = std::sync::Arc::new(Registry::new(Metrics::new()));
        let (tx, mut rx) = mpsc::channel(4);
        let (t, _) = r.connect("a", hello(&[]), tx);
        assert_eq!(
            r.lookup_on("b", query(), Duration::from_secs(1)).await,
            Err(LookupError::NotConnected("b".into()))
        );
        // An agent that answers "not found".
        let r2 = r.clone();
        let t2 = t.clone();
        let agent = tokio::spawn(async move {
            let Some(Ok(pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::Lookup(req)),
            })) = rx.recv().await
            else {
                panic!("expected a lookup request");
            };
            // A reply on another stream's token is ignored.
            let other = ConnToken {
                node: "a".into(),
                id: 0,
            };
            let reply = pb::LookupReply {
                request_id: req.request_id,
                found: false,
                error: String::new(),
                entry: None,
                node: "a".into(),
                pod: None,
            };
            assert!(!r2.complete_lookup(&other, reply.clone()));
            assert!(r2.complete_lookup(&t2, reply));
            rx
        });
        assert_eq!(
            r.lookup_on("a", query(), Duration::from_secs(5)).await,
            Ok(None)
        );
        let _rx = agent.await.unwrap();
        // Nobody answers now.
        assert_eq!(
            r.lookup_on("a", query(), Duration::from_millis(50)).await,
            Err(LookupError::Timeout("a".into()))
        );
        assert_eq!(r.pending_lookups(), 0);
    }
}

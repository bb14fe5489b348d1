//! Shared pieces of the HTTP APIs: live-lookup parameters, parsing of times
//! and durations, and the typed answer of every endpoint: the agent and the
//! collector serialize exactly these, and `ctw` deserializes them, so a
//! client sees one format.
//!
//! # Answers
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /api/v1/connections` | [`SearchAnswer`] ([`ConnectionAnswer`], [`GapAnswer`]) |
//! | `POST /api/v1/resolve` | [`ResolveAnswer`] ([`LineAnswer`], [`CandidateAnswer`]) |
//! | `GET /api/v1/conntrack/query` (collector), `/api/conntrack/query` (agent) | [`LookupAnswer`] |
//! | `GET /api/v1/agents` | [`AgentsAnswer`] ([`AgentInfo`]) |
//! | `/healthz`, `/readyz` | [`StatusAnswer`] |
//! | any failure | [`ErrorAnswer`] |
//!
//! Presence rules: `Option` fields said to be absent when `None` are left
//! out of the JSON; the others are written as `null`. Boolean marks
//! (`midstream`, `external`, `started_after`) are written only when true,
//! a zone only when not 0. Times are RFC 3339 UTC strings with
//! milliseconds ([`format_time`]).

use std::net::IpAddr;

use chrono::Offset;
use serde::{Deserialize, Serialize};

use crate::{status, ConnRecord, Protocol, Tuple};

/// A bad request parameter: its name and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam {
    pub parameter: String,
    pub message: String,
}

impl BadParam {
    pub fn new(parameter: &str, message: impl Into<String>) -> BadParam {
        BadParam {
            parameter: parameter.to_string(),
            message: message.into(),
        }
    }
}

/// A validated live lookup, the one question of the agent's
/// `/api/conntrack/query`, the collector's `/api/v1/conntrack/query`, the
/// collector's `Query.Lookup` and the `LookupRequest` it sends down an
/// agent's stream: `tuple` names the reply direction when `reply_tuple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveQuery {
    pub protocol: Protocol,
    pub tuple: Tuple,
    /// `tuple` is the reply direction (its destination is the SNAT address).
    pub reply_tuple: bool,
    /// Conntrack zone to look in (`CTA_ZONE`, 16 bits); `None`: not given
    /// (the agent looks in zone 0; the collector tries zone 0 and then
    /// the zones the node's records showed).
    pub zone: Option<u16>,
}

/// Reject unknown and repeated parameters. `known` lists every accepted name.
pub fn check_names(params: &[(String, String)], known: &[&str]) -> Result<(), BadParam> {
    let mut seen: Vec<&str> = Vec::new();
    for (k, _) in params {
        if !known.contains(&k.as_str()) {
            return Err(BadParam::new(
                k,
                format!("unknown parameter {k:?} (known: {})", known.join(", ")),
            ));
        }
        if seen.contains(&k.as_str()) {
            return Err(BadParam::new(k, format!("parameter {k:?} given twice")));
        }
        seen.push(k);
    }
    Ok(())
}

/// The value of `k`, trimmed; `None` when absent or empty.
pub fn param<'a>(params: &'a [(String, String)], k: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

pub fn parse_ip(params: &[(String, String)], k: &str) -> Result<Option<IpAddr>, BadParam> {
    param(params, k)
        .map(|v| {
            v.parse()
                .map_err(|_| BadParam::new(k, format!("{k}: {v:?} is not an IP address")))
        })
        .transpose()
}

pub fn parse_port(params: &[(String, String)], k: &str) -> Result<Option<u16>, BadParam> {
    param(params, k)
        .map(|v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(BadParam::new(
                k,
                format!("{k}: {v:?} is not a port (1-65535)"),
            )),
        })
        .transpose()
}

pub fn parse_protocol(params: &[(String, String)], k: &str) -> Result<Option<Protocol>, BadParam> {
    param(params, k)
        .map(|v| {
            v.parse()
                .map_err(|e: crate::UnknownProtocol| BadParam::new(k, e.to_string()))
        })
        .transpose()
}

/// The parameters of a live lookup (`protocol`, `src_ip`, `src_port`,
/// `dst_ip`, `dst_port`, `tuple`, `zone`). The caller checks names first.
pub fn parse_live(params: &[(String, String)]) -> Result<LiveQuery, BadParam> {
    let required = |k: &str| BadParam::new(k, format!("missing parameter {k:?}"));
    let protocol = parse_protocol(params, "protocol")?.unwrap_or(Protocol::Tcp);
    let src = parse_ip(params, "src_ip")?.ok_or_else(|| required("src_ip"))?;
    let src_port = parse_port(params, "src_port")?.ok_or_else(|| required("src_port"))?;
    let dst = parse_ip(params, "dst_ip")?.ok_or_else(|| required("dst_ip"))?;
    let dst_port = parse_port(params, "dst_port")?.ok_or_else(|| required("dst_port"))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(BadParam::new(
            "dst_ip",
            "src_ip and dst_ip must be the same IP version",
        ));
    }
    let reply_tuple = match param(params, "tuple") {
        None | Some("orig") | Some("origin") | Some("original") => false,
        Some("reply") => true,
        Some(v) => {
            return Err(BadParam::new(
                "tuple",
                format!("tuple: {v:?} must be orig or reply"),
            ))
        }
    };
    let zone = param(params, "zone")
        .map(|v| {
            v.parse::<u16>().map_err(|_| {
                BadParam::new(
                    "zone",
                    format!("zone: {v:?} is not a conntrack zone (0-65535)"),
                )
            })
        })
        .transpose()?;
    Ok(LiveQuery {
        protocol,
        tuple: Tuple {
            src,
            dst,
            src_port,
            dst_port,
        },
        reply_tuple,
        zone,
    })
}

/// The "no such entry" message, the same from agent and collector (the
/// zone is named when one was given and is not 0).
pub fn not_found_message(p: &LiveQuery) -> String {
    let dir = if p.reply_tuple { "reply" } else { "original" };
    let t = &p.tuple;
    let mut m = format!(
        "no conntrack entry with {dir} tuple {} {}:{} -> {}:{}",
        p.protocol,
        fmt_ip(t.src),
        t.src_port,
        fmt_ip(t.dst),
        t.dst_port
    );
    if let Some(z) = p.zone.filter(|&z| z != 0) {
        m.push_str(&format!(" (conntrack zone {z})"));
    }
    m
}

/// An address as it appears before `:port` (`[v6]`).
pub fn fmt_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// One direction in the seed's JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TupleJson {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl From<&Tuple> for TupleJson {
    fn from(t: &Tuple) -> Self {
        TupleJson {
            src: t.src,
            dst: t.dst,
            src_port: t.src_port,
            dst_port: t.dst_port,
        }
    }
}

/// The seed's live-lookup answer (`status`, `origin`, `reply`) plus extras.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LookupAnswer {
    /// TCP: the conntrack state as found (`ESTABLISHED`, `SYN_SENT`, ...).
    /// Other protocols: `ASSURED`, `REPLIED` or `UNREPLIED`.
    pub status: String,
    pub origin: TupleJson,
    pub reply: TupleJson,
    pub protocol: Protocol,
    pub snat_ip: IpAddr,
    pub snat_port: u16,
    /// `status` bits by name (`ASSURED`, `SEEN_REPLY`, ...).
    pub flags: Vec<String>,
    pub id: u32,
    pub zone: u16,
    pub mark: u32,
    pub node: String,
    /// TCP entry picked up mid-stream: a NEW not in SYN_SENT
    /// ([`ConnRecord::midstream`]) or, for an entry read from the table, one
    /// whose both directions carry `IP_CT_TCP_FLAG_BE_LIBERAL` (0x08), which
    /// the kernel's `tcp_new()` sets on a loose pickup and not on a SYN
    /// (unless `nf_conntrack_tcp_be_liberal=1` or flow offload set it).
    /// Its connection started earlier under the same tuple.
    pub midstream: bool,
    /// Collector only: the zones asked, in order, of the node that
    /// answered (absent when `None`: the agent's own answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones_tried: Option<Vec<u16>>,
    /// The source's pod (`pod`, `pod_reason`, `pod_verified`,
    /// `pod_ip_reused`, `pod_holders`); absent when kubernetes is off.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub pod_fields: Option<PodFields>,
}

/// `IP_CT_TCP_FLAG_BE_LIBERAL` (`include/uapi/linux/netfilter/nf_conntrack_tcp.h`).
const TCP_FLAG_BE_LIBERAL: u8 = 0x08;

impl LookupAnswer {
    pub fn new(r: &ConnRecord, node: &str) -> LookupAnswer {
        let state = match r.tcp_state {
            Some(s) => s.name().to_string(),
            None if r.status & status::ASSURED != 0 => "ASSURED".into(),
            None if r.status & status::SEEN_REPLY != 0 => "REPLIED".into(),
            None => "UNREPLIED".into(),
        };
        let (snat_ip, snat_port) = r.snat();
        LookupAnswer {
            status: state,
            origin: (&r.orig).into(),
            reply: (&r.reply).into(),
            protocol: r.protocol,
            snat_ip,
            snat_port,
            flags: r.flag_names().into_iter().map(str::to_string).collect(),
            id: r.id,
            zone: r.zone,
            mark: r.mark,
            node: node.to_string(),
            midstream: r.midstream()
                || (r.protocol == Protocol::Tcp
                    && !matches!(r.tcp_state, None | Some(crate::TcpState::SynSent))
                    && r.tcp_flags_orig & TCP_FLAG_BE_LIBERAL != 0
                    && r.tcp_flags_reply & TCP_FLAG_BE_LIBERAL != 0),
            zones_tried: None,
            pod_fields: None,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(z: &u16) -> bool {
    *z == 0
}

/// `GET /api/v1/connections`: connections, newest first (alive at `at`
/// first when given).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SearchAnswer {
    /// At most `limit` connections.
    pub records: Vec<ConnectionAnswer>,
    /// Connections matching, also past `limit` (see the store's `total`).
    pub total: u64,
    /// `records.len()`.
    pub returned: u64,
    pub limit: u64,
    /// No gap overlaps the range (`gaps` is empty).
    pub complete: bool,
    /// Where records may be missing: capture loss, agent restarts and
    /// disconnections overlapping the range.
    pub gaps: Vec<GapAnswer>,
    /// The range searched (`null`: open).
    pub from: Option<String>,
    pub to: Option<String>,
    /// The `at` asked (`null` without one).
    pub at: Option<String>,
}

/// One connection of a search (or a resolved line's `record`): its first
/// stored record, with the end joined from its DESTROY or successor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionAnswer {
    /// Event time of the record shown.
    pub ts: String,
    pub node: String,
    pub protocol: Protocol,
    /// Original direction: the pod's address and port.
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// The reply direction's destination: the address after SNAT.
    pub snat_ip: IpAddr,
    pub snat_port: u16,
    /// `new`, `recovered` or `destroy`: the record shown.
    pub kind: String,
    /// Kernel start (`CTA_TIMESTAMP_START`) or the record's event time.
    pub start: String,
    /// TCP state of the record shown (absent when not TCP): a NEW's is
    /// the state at the first packet (`SYN_SENT`), a mid-stream NEW's at
    /// the first packet seen, a recovered record's when the table was
    /// read, a DESTROY's at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The TCP state the connection was last known in: the kernel's state
    /// in the DESTROY that gave its end (`end_kind` `destroy`), e.g.
    /// `TIME_WAIT` (closed normally; conntrack dropped the entry after its
    /// TIME_WAIT timeout, so `end` is that long after the close) or
    /// `CLOSE` (reset). Absent while open, for other end kinds, and when
    /// not TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_state: Option<String>,
    /// A TCP NEW picked up mid-stream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub midstream: bool,
    /// Conntrack zone (absent when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub zone: u16,
    /// The source is outside the node's pod CIDRs (`CTW_EXTERNAL`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub external: bool,
    /// When it ended (absent while open); see `end_kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// `destroy` (exact), `gone` or `superseded` (upper bounds); absent
    /// without an end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_kind: Option<String>,
    /// `gone` only: last time seen alive (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// `end - start`, ms (absent without an end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Alive at the search's `at` (absent without `at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alive_at: Option<bool>,
    /// Counters from the DESTROY (`CTA_COUNTERS_ORIG`/`_REPLY`; absent
    /// without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_bytes: Option<u64>,
    /// The source's pod (`pod`, `pod_reason`, `pod_verified`,
    /// `pod_ip_reused`, `pod_holders`); absent when kubernetes is off.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub pod_fields: Option<PodFields>,
}

/// A workload as answered: the pod's controller owner resolved upward
/// (ReplicaSet to Deployment, Job to CronJob); `kind` is the Kubernetes kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadAnswer {
    pub kind: String,
    pub name: String,
}

/// A pod as answered (issue 13): who held an address, from the collector's
/// pod history (the Kubernetes watch).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRefAnswer {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid` (UUID text).
    pub uid: String,
    /// Absent when the pod has no controller owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadAnswer>,
    /// `spec.nodeName`.
    pub node: String,
    /// `spec.hostNetwork`: the pod shares its node's address.
    #[serde(default, skip_serializing_if = "is_false")]
    pub host_network: bool,
    /// When the pod got the address.
    pub from: String,
    /// When it gave the address up (absent while it holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl PodRefAnswer {
    /// `NAMESPACE/NAME (Kind/name)`, or `NAMESPACE/NAME` without a workload:
    /// how `ctw` and the UI show a pod.
    pub fn label(&self) -> String {
        match &self.workload {
            Some(w) => format!("{}/{} ({}/{})", self.namespace, self.name, w.kind, w.name),
            None => format!("{}/{}", self.namespace, self.name),
        }
    }
}

/// The pod fields of an answer (flattened into connections, resolved
/// lines, candidates and live lookups): present only when the collector
/// keeps a pod history (`kubernetes` on); absent otherwise.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodFields {
    /// The pod that held the connection's source address at its start, or
    /// `null` (see `pod_reason`).
    pub pod: Option<PodRefAnswer>,
    /// Set exactly when `pod` is `null`: `no_pod_at_time`, `history_gap`,
    /// `host_network` (a hostNetwork pod shares the node's address and
    /// is never named as if proven) or `ip_handover` (two pods may have
    /// held the address then, both in `pod_holders`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_reason: Option<String>,
    /// `false` when the time falls in a gap of the pod watch or in a pod's
    /// IP handover window, or (live lookups without a kernel start time)
    /// the entry may be an earlier holder's: the name is the best guess,
    /// not proven.
    pub pod_verified: bool,
    /// The address changed hands within the connection's lifetime (widened
    /// by the query's skew): `pod_holders` lists every holder.
    pub pod_ip_reused: bool,
    /// Every holder in that window, oldest first, when `pod_ip_reused`; the
    /// hostNetwork pods when `pod_reason` is `host_network`; else absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_holders: Option<Vec<PodRefAnswer>>,
}

/// A time range where records of `node` may be missing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GapAnswer {
    pub node: String,
    pub from: String,
    pub to: String,
    /// `kernel_drop`, `spool_overflow`, `agent_restarted`,
    /// `agent_disconnected`, ...
    pub reason: String,
    /// Events or records lost (0 when unknown).
    pub count: u64,
}

/// `POST /api/v1/resolve`: one answer per line, in order, and the counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolveAnswer {
    pub results: Vec<LineAnswer>,
    pub summary: ResolveSummary,
    /// The log format used (the request's or the default).
    pub log_format: String,
    pub window_ms: u64,
    pub skew_ms: u64,
}

/// Lines by status, and lines with a gap.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResolveSummary {
    pub lines: u64,
    pub resolved: u64,
    pub not_found: u64,
    pub ambiguous: u64,
    pub not_observed: u64,
    pub unparsed: u64,
    pub incomplete: u64,
}

/// One nginx line's answer. An `unparsed` line has only `line_no`,
/// `line`, `status` and `error`; every other one has the fields up to
/// `gaps`, and the rest as said.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LineAnswer {
    /// 1-based, in the request.
    pub line_no: u64,
    pub line: String,
    /// `resolved`, `ambiguous`, `not_found`, `not_observed` or `unparsed`.
    pub status: String,
    /// `unparsed` only: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    /// The line's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Where the connection was alive, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<IntervalAnswer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skew_ms: Option<u64>,
    /// `alive`, `skew`, `late` or `none`: how the status was reached.
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    /// Distinct candidates (pod address, port, node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alive_candidates: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_candidates: Option<u64>,
    /// A gap overlaps the line's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gaps: Option<Vec<GapAnswer>>,
    /// Why the status, in words (absent for a plain `resolved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Candidates, nearest first (absent when `resolved` or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranked: Option<Vec<CandidateAnswer>>,
    /// The answer (`resolved`, `ambiguous`: the first ranked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_port: Option<u16>,
    /// The answer's node, or with `not_observed` the node owning the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    /// Conntrack entries the answer joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub midstream: bool,
    /// The answer's connection as a search shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<ConnectionAnswer>>,
    /// The answer's pod (its connection's source) (`pod`, `pod_reason`, `pod_verified`,
    /// `pod_ip_reused`, `pod_holders`); absent when kubernetes is off.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub pod_fields: Option<PodFields>,
}

/// An inclusive time interval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntervalAnswer {
    pub from: String,
    pub to: String,
}

/// One candidate of a line: a pod address and port on a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CandidateAnswer {
    pub pod_ip: IpAddr,
    pub pod_port: u16,
    pub node: String,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// Alive in the line's interval.
    pub alive: bool,
    /// Distance to the interval, ms (0 when alive).
    pub distance_ms: u64,
    /// Conntrack entries joined.
    pub merged: u64,
    pub start: String,
    /// Absent while one of its entries is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub midstream: bool,
    /// Started after the line (possibly recorded late).
    #[serde(default, skip_serializing_if = "is_false")]
    pub started_after: bool,
    /// The candidate's pod (`pod`, `pod_reason`, `pod_verified`,
    /// `pod_ip_reused`, `pod_holders`); absent when kubernetes is off.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub pod_fields: Option<PodFields>,
}

/// `GET /api/v1/agents`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentsAnswer {
    pub agents: Vec<AgentInfo>,
}

/// One agent as `GET /api/v1/agents` shows it. Times are RFC 3339 UTC
/// strings with milliseconds (`null` when unknown), durations seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub node: String,
    /// The addresses the agent's Hello listed (the SNAT addresses it owns).
    pub addresses: Vec<String>,
    pub boot_id: String,
    pub version: String,
    pub connected: bool,
    /// Remote address of the current (or last) stream.
    pub peer: Option<String>,
    pub connected_since: Option<String>,
    /// Set while disconnected: start of the open `agent_disconnected` gap.
    pub disconnected_since: Option<String>,
    /// Last message of any kind.
    pub last_seen: Option<String>,
    pub last_batch_at: Option<String>,
    pub last_batch_boot_id: Option<String>,
    pub last_batch_seq: Option<u64>,
    /// When the last batch arrived, minus the newest record time in it.
    pub lag_seconds: Option<f64>,
    pub batches_stored: u64,
    pub records_stored: u64,
    /// Batches received again after they were stored (replays).
    pub duplicates: u64,
    /// Records that could not be converted and were skipped.
    pub conversion_errors: u64,
    /// Loss reports received and the events or records they counted.
    pub loss_reports: u64,
    pub events_lost: u64,
    /// Streams this agent opened since the collector started.
    pub connections: u64,
    /// With collector replicas: the id of the collector holding the
    /// agent's stream (absent when none does, and without replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// When the collector received the agent's last heartbeat (its stream's
    /// proof of life, sent also when there is nothing else to send). This
    /// and the `heartbeat_*`, `live_entries` and `last_event_at` fields are
    /// absent for agents that send no heartbeats (older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// The agent's interval between heartbeats, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_seconds: Option<f64>,
    /// The agent's own clock in its last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_agent_time: Option<String>,
    /// Conntrack entries of watched ports the agent believed alive at its
    /// last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_entries: Option<u64>,
    /// Event time of the newest record the agent had captured at its last
    /// heartbeat (absent also when it had captured none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<String>,
}

/// `/healthz` (`ok`) and `/readyz` (`ready`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusAnswer {
    pub status: String,
}

/// Every failure: `error` in words, and what else is known.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorAnswer {
    pub error: String,
    /// The request field at fault (absent when none is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// Live lookup not found: the agents asked (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked: Option<Vec<String>>,
    /// Live lookup not found: the zones asked of the last node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones_tried: Option<Vec<u16>>,
    /// Live lookup unanswered: agents that did not have the entry...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_found: Option<Vec<String>>,
    /// ...and the others, as `node: why`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Vec<String>>,
}

impl ErrorAnswer {
    /// `{"error": message}` plus `parameter` when given.
    pub fn new(message: impl Into<String>, parameter: Option<&str>) -> ErrorAnswer {
        ErrorAnswer {
            error: message.into(),
            parameter: parameter.map(str::to_string),
            ..ErrorAnswer::default()
        }
    }
}

/// Parse a time as a user types or pastes it; see [`parse_time_in`]. A time
/// without a zone is refused. Returns ns since the epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    parse_time_in(s, None)
}

/// Parse a time in any form nginx writes or a user types, and return ns
/// since the epoch:
///
/// - Unix seconds with an optional fraction (`$msec`: `1733727900.123`);
/// - RFC 3339 / ISO 8601 with a zone (`$time_iso8601`:
///   `2024-12-09T15:05:00+08:00`, `2024-12-09T07:05:00.123Z`; a space for
///   the `T` is accepted);
/// - nginx's `$time_local` (`09/Dec/2024:15:05:00 +0800`, brackets as in the
///   access log allowed);
/// - the last two without a zone (`2024-12-09T15:05:00`,
///   `09/Dec/2024:15:05:00`) only with `tz`, the zone the caller chose
///   (`ctw --tz`, the UI's zone, the API's `tz`); without one, an error says
///   so rather than guessing.
///
/// The resolution as written is [`time_precision_ns`].
pub fn parse_time_in(s: &str, tz: Option<chrono::FixedOffset>) -> Result<u64, String> {
    let s = s.trim();
    let s = s
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && (0.0..1e11).contains(&secs) {
            // Split to keep nanosecond precision for up to 9 decimals.
            let (int, frac) = s.split_once('.').unwrap_or((s, ""));
            let whole: u64 = int.parse().map_err(|_| format!("{s:?} is not a time"))?;
            let mut frac_ns = 0u64;
            for (i, c) in frac.chars().take(9).enumerate() {
                let d = c
                    .to_digit(10)
                    .ok_or_else(|| format!("{s:?} is not a time"))?;
                frac_ns += u64::from(d) * 10u64.pow(8 - i as u32);
            }
            // u64 nanoseconds reach year 2554; later times are out of range.
            return whole
                .checked_mul(1_000_000_000)
                .and_then(|n| n.checked_add(frac_ns))
                .ok_or_else(|| format!("{s:?} is out of range for Unix seconds"));
        }
        return Err(format!("{s:?} is out of range for Unix seconds"));
    }
    let zoned = chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(&s.replacen(' ', "T", 1)))
        .or_else(|_| chrono::DateTime::parse_from_str(s, TIME_LOCAL));
    let t = match zoned {
        Ok(t) => t,
        Err(_) => {
            let naive = NAIVE_FORMATS
                .iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())
                .ok_or_else(|| {
                    format!(
                        "{s:?} is not a time: expected Unix seconds (1733727900.123), RFC 3339 \
                         (2024-12-09T15:05:00+08:00) or nginx's $time_local (09/Dec/2024:15:05:00 +0800)"
                    )
                })?;
            let tz = tz.ok_or_else(|| {
                format!(
                    "{s:?} has no time zone: add one (Z, +08:00, +0800) or choose the zone it \
                     was written in (ctw --tz, the UI's zone switch)"
                )
            })?;
            naive
                .and_local_timezone(tz)
                .single()
                .ok_or_else(|| format!("{s:?} is not a time in {tz}"))?
        }
    };
    t.timestamp_nanos_opt()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| format!("{s:?} is out of range"))
}

/// nginx's `$time_local`.
const TIME_LOCAL: &str = "%d/%b/%Y:%H:%M:%S %z";
/// Zone-less forms [`parse_time_in`] takes with a chosen zone.
const NAIVE_FORMATS: [&str; 3] = [
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%d/%b/%Y:%H:%M:%S",
];

/// Parse a zone as a user gives it: `UTC`, `Z`, `+08:00`, `+0800`, `-5`.
pub fn parse_tz(s: &str) -> Result<chrono::FixedOffset, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return Ok(chrono::Utc.fix());
    }
    let bad = || format!("{s:?} is not a time zone offset (UTC, +08:00, +0800, -5)");
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

/// The resolution of a time as written: 1 ms for `1733727900.123`, 1 s for
/// `1733727900` or an RFC 3339 time without fraction (ns).
pub fn time_precision_ns(s: &str) -> u64 {
    let s = s.trim();
    let digits = match s.split_once('.') {
        Some((_, rest)) => rest.chars().take_while(char::is_ascii_digit).count().min(9),
        None => 0,
    };
    10u64.pow(9 - digits as u32)
}

/// Parse a duration: `500ms`, `30s`, `5m`, `2h`, `1d`, or plain seconds
/// (`90`, `1.5`). Returns ns.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit_ns) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000_000f64)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e9)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e9)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e9)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86400e9)
    } else {
        (s, 1e9)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * unit_ns < 3.2e18 => Ok((v * unit_ns) as u64),
        _ => Err(format!(
            "{s:?} is not a duration (like 500ms, 30s, 5m, 2h, 1d)"
        )),
    }
}

/// Format ns since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_time(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nanos = (ns % 1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1733727900").unwrap(), 1_733_727_900_000_000_000);
        assert_eq!(
            parse_time("1733727900.123").unwrap(),
            1_733_727_900_123_000_000
        );
        assert_eq!(
            parse_time("2024-12-09T15:05:00.123+08:00").unwrap(),
            1_733_727_900_123_000_000
        );
        assert_eq!(
            parse_time("2024-12-09T07:05:00.123Z").unwrap(),
            1_733_727_900_123_000_000
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("-5").is_err());
        assert!(parse_time("1e300").is_err());
        // Found by fuzzing: below the 1e11 s guard, but past u64 nanoseconds.
        assert!(parse_time("20100110120").is_err());
        assert!(parse_time("18446744073.709551615").is_ok());
        assert_eq!(
            format_time(1_733_727_900_123_000_000),
            "2024-12-09T07:05:00.123Z"
        );
    }

    #[test]
    fn times_as_nginx_writes_them() {
        const T: u64 = 1_733_727_900_000_000_000; // 2024-12-09T07:05:00Z
                                                  // $time_local, bare and as in the access log.
        assert_eq!(parse_time("09/Dec/2024:15:05:00 +0800").unwrap(), T);
        assert_eq!(parse_time("[09/Dec/2024:07:05:00 +0000]").unwrap(), T);
        assert_eq!(
            time_precision_ns("09/Dec/2024:15:05:00 +0800"),
            1_000_000_000
        );
        // $time_iso8601, and with a space.
        assert_eq!(parse_time("2024-12-09T15:05:00+08:00").unwrap(), T);
        assert_eq!(parse_time("2024-12-09 07:05:00Z").unwrap(), T);
        // Zone-less: refused, saying how to give the zone; taken with one.
        for s in [
            "2024-12-09T15:05:00",
            "09/Dec/2024:15:05:00",
            "2024-12-09 15:05:00",
        ] {
            let e = parse_time(s).unwrap_err();
            assert!(e.contains("no time zone") && e.contains("--tz"), "{e}");
            let tz = parse_tz("+08:00").unwrap();
            assert_eq!(parse_time_in(s, Some(tz)).unwrap(), T, "{s}");
        }
        assert_eq!(
            parse_time_in("2024-12-09T07:05:00.250", Some(parse_tz("UTC").unwrap())).unwrap(),
            T + 250_000_000
        );
        // A zone in the text wins over the chosen one.
        assert_eq!(
            parse_time_in("2024-12-09T07:05:00Z", Some(parse_tz("+0800").unwrap())).unwrap(),
            T
        );
        let e = parse_time("30/Foo/2026:10:50:57 +0000").unwrap_err();
        assert!(e.contains("$time_local"), "{e}");
    }

    #[test]
    fn zones() {
        assert_eq!(parse_tz("UTC").unwrap().local_minus_utc(), 0);
        assert_eq!(parse_tz("Z").unwrap().local_minus_utc(), 0);
        assert_eq!(parse_tz("+08:00").unwrap().local_minus_utc(), 8 * 3600);
        assert_eq!(
            parse_tz("+0530").unwrap().local_minus_utc(),
            5 * 3600 + 1800
        );
        assert_eq!(parse_tz("-5").unwrap().local_minus_utc(), -5 * 3600);
        for bad in ["", "8", "+25:00", "+08:60", "Europe/Paris", "+x"] {
            assert!(parse_tz(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m").unwrap(), 300_000_000_000);
        assert_eq!(parse_duration("500ms").unwrap(), 500_000_000);
        assert_eq!(parse_duration("90").unwrap(), 90_000_000_000);
        assert_eq!(parse_duration("1.5s").unwrap(), 1_500_000_000);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn live_params() {
        let q = parse_live(&p(&[
            ("src_ip", "198.18.0.2"),
            ("src_port", "1"),
            ("dst_ip", "198.19.0.2"),
            ("dst_port", "80"),
        ]))
        .unwrap();
        assert_eq!(q.protocol, Protocol::Tcp);
        assert!(!q.reply_tuple);
        let e = parse_live(&p(&[
            ("src_ip", "198.18.0.2"),
            ("src_port", "1"),
            ("dst_ip", "198.19.0.2"),
        ]))
        .unwrap_err();
        assert_eq!(e.parameter, "dst_port");
        let e = check_names(&p(&[("src_ip", "a"), ("src_ip", "b")]), &["src_ip"]).unwrap_err();
        assert!(e.message.contains("twice"));
    }
}

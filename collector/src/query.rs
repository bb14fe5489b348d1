//! The collector's one query layer, under both APIs: HTTP (`http.rs`) and
//! gRPC (`grpc_query.rs`) only turn their request into the inputs here and
//! the outcome into their answer.
//!
//! It owns:
//! - the validated search ([`SearchInput::validate`] into a store
//!   [`SearchQuery`]) and running it ([`search`]: store, then the open
//!   `agent_disconnected` gaps of [`merge_open_gaps`]);
//! - the validated live lookup ([`Lookup`]: the question, the optional
//!   `node` and conntrack `zone`) and its routing ([`lookup`],
//!   [`route_lookup`]: which agents and zones are asked);
//! - the one error type, [`QueryError`], with the one mapping to an HTTP
//!   status ([`QueryError::http_status`]) and a gRPC code
//!   ([`QueryError::grpc_code`]): no other module picks a status for a
//!   query's failure (the tidy test checks it);
//! - [`DEFAULT_LIMIT`], [`DEFAULT_WINDOW_NS`] and the clock
//!   ([`ctw_common::now_ns`]).
//!
//! # Search rules (both APIs)
//!
//! Field names are the HTTP parameter's (`from`); over gRPC an error names
//! the request's field (`from_ns`), see [`Api`].
//! - `at` ranks connections alive at that time first; without `from`/`to`
//!   it searches `[at - window, at + window]` (`window` default
//!   [`DEFAULT_WINDOW_NS`], saturating at 0 and `u64::MAX`).
//! - `at` and `from`/`to` exclude each other (refused, naming `at`): the
//!   window would be silently ignored otherwise. `window` needs `at`.
//! - `from` after `to` is refused, naming `to`.
//! - `limit` 1 to the collector's `max_limit`; absent is [`DEFAULT_LIMIT`]
//!   (at most `max_limit`); 0 or above `max_limit` is refused. proto3
//!   cannot tell a 0 from an unset `uint32`, so a gRPC `limit` 0 is absent
//!   (the one place the adapters differ, by the wire format).
//! - `node`: 1-253 characters (a Kubernetes node name is a DNS subdomain).
//!   HTTP reads an empty parameter as absent (as every parameter: forms
//!   send empty fields); gRPC refuses `Some("")`.
//! - ports 1-65535 (0 is no port to search for), `kind` one of
//!   [`ConnKind::valid_values`].
//! - `namespace`, `pod`, `workload` (`NAME` or `KIND/NAME`; the same
//!   fields over gRPC; empty refused over gRPC, absent over HTTP, as `node`;
//!   at most 320 characters): connections from the matching pods
//!   ([`run_search`]), searched through the collector's
//!   pod history ([`search_by_pod`]): each pod's tenure of its address
//!   becomes a search by `src_ip` over that tenure, so the store is asked
//!   by address, not scanned over the time range. Refused (naming the
//!   first given) when the collector keeps no pod history, and when more
//!   than [`MAX_POD_TENURES`] tenures match (narrow the filter or range).
//!
//! # Lookup routing, in order
//! 1. the `node` of the request, if given (only that agent is asked);
//! 2. the connected agent that owns the SNAT address (the reply tuple's
//!    destination; for an original tuple, its source, in case it is a node
//!    address) — its answer is final, found or not;
//! 3. the node of the newest indexed match of the tuple (last 7 days);
//! 4. every other connected agent, `lookup.max_concurrency` at a time, each
//!    with `lookup.timeout_ms`; the first that finds the entry wins.
//!
//! Zones: a GET finds an entry only in the zone it names. With a `zone` in
//! the request only that zone is asked; without one, each agent is asked in
//! zone 0 and then in every zone its records showed
//! ([`Registry::zones_of`], plus the zone of the newest indexed match of
//! the tuple), in order, until one has the entry.
//! [`RoutedLookup::zones_tried`] says which zones were asked of the node
//! that answered (or of the last one asked).
//!
//! # Errors
//!
//! | [`QueryError`] | HTTP | gRPC |
//! |---|---|---|
//! | `Invalid` (a field), `Malformed` | 400 | `InvalidArgument` |
//! | `TooLarge` (a body or list) | 413 | `ResourceExhausted` |
//! | `Store(BadQuery)` | 400 | `InvalidArgument` |
//! | `Store(_)`, `Task` | 500 | `Internal` |
//! | `NoAgent` | 503 | `Unavailable` |
//! | `Lookup(NotConnected)`: the named node has no agent connected | 404 | `NotFound` |
//! | `Lookup(Timeout)`, `Unanswered` with only timeouts | 504 | `DeadlineExceeded` |
//! | `Lookup(Agent / BadReply)`, other `Unanswered` | 502 | `Unavailable` |

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use ctw_common::api::{self, BadParam};
use ctw_common::Protocol;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::LookupConfig;
use crate::peers::{self, Peers};
use crate::pods::{PodFilter, PodHistory, Tenure};
use crate::registry::{LiveAnswer, LiveQuery, LookupError, Registry};
use crate::store::{ConnKind, Gap, RecordStore, SearchQuery, SearchResult, StoreError};

/// `limit` when a search does not give one.
pub const DEFAULT_LIMIT: usize = 100;
/// `window` around `at` when a search does not give one: 5 min, in ns.
pub const DEFAULT_WINDOW_NS: u64 = 5 * 60 * 1_000_000_000;
/// How far back [`route_lookup`] looks in the index for the tuple's node.
pub const LOOKUP_INDEX_LOOKBACK: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `node` accepted (a DNS subdomain, RFC 1123).
pub const MAX_NODE_LEN: usize = 253;

// ---------------------------------------------------------------------------
// Errors.

/// Why a query failed; the one mapping to HTTP and gRPC is in the module
/// documentation and [`QueryError::http_status`] / [`QueryError::grpc_code`].
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A bad field: `parameter` names it as the caller's API spells it;
    /// `message` starts with that name (build it with [`QueryError::invalid`]).
    #[error("{message}")]
    Invalid { parameter: String, message: String },
    /// A request that cannot be read at all (not JSON, a malformed query
    /// string): no field to name.
    #[error("{0}")]
    Malformed(String),
    /// A request too large to serve (too many lines, too large a body).
    #[error("{message}")]
    TooLarge { parameter: String, message: String },
    /// No agent is connected, so no live lookup can be answered.
    #[error("no agent is connected")]
    NoAgent,
    /// The one agent asked failed (the request named its `node`).
    #[error(transparent)]
    Lookup(LookupError),
    /// No agent found the entry and some could not answer.
    #[error("no agent found the entry and some could not answer")]
    Unanswered {
        /// Agents that answered "not found".
        not_found: Vec<String>,
        /// The others, as `node: why`.
        failures: Vec<String>,
        /// Every failure was a timeout.
        timeouts_only: bool,
    },
    /// The store failed (or refused the query: `BadQuery`).
    #[error("search failed: {0}")]
    Store(#[from] StoreError),
    /// The blocking task running the search failed (panicked or cancelled).
    #[error("search task failed: {0}")]
    Task(String),
}

impl QueryError {
    /// A bad field; `message` is made to start with `parameter` (so a
    /// client showing only the message still names the field).
    pub fn invalid(parameter: &str, message: impl Into<String>) -> QueryError {
        let message = message.into();
        QueryError::Invalid {
            message: if message.starts_with(parameter) {
                message
            } else {
                format!("{parameter}: {message}")
            },
            parameter: parameter.to_string(),
        }
    }

    /// The field at fault, if one is.
    pub fn parameter(&self) -> Option<&str> {
        match self {
            QueryError::Invalid { parameter, .. } | QueryError::TooLarge { parameter, .. } => {
                Some(parameter)
            }
            QueryError::Lookup(LookupError::NotConnected(_)) => Some("node"),
            _ => None,
        }
    }

    /// The HTTP status of this error (table in the module docs).
    pub fn http_status(&self) -> StatusCode {
        match self {
            QueryError::Invalid { .. }
            | QueryError::Malformed(_)
            | QueryError::Store(StoreError::BadQuery(_)) => StatusCode::BAD_REQUEST,
            QueryError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            QueryError::Store(_) | QueryError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
            QueryError::NoAgent => StatusCode::SERVICE_UNAVAILABLE,
            QueryError::Lookup(LookupError::NotConnected(_)) => StatusCode::NOT_FOUND,
            QueryError::Lookup(LookupError::Timeout(_))
            | QueryError::Unanswered {
                timeouts_only: true,
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
            QueryError::Lookup(LookupError::Agent(_) | LookupError::BadReply(_))
            | QueryError::Unanswered { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The gRPC code of this error (table in the module docs).
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self.http_status() {
            StatusCode::BAD_REQUEST => Code::InvalidArgument,
            StatusCode::PAYLOAD_TOO_LARGE => Code::ResourceExhausted,
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            _ => Code::Internal,
        }
    }

    /// This error as a gRPC status (its code and message).
    pub fn to_status(&self) -> tonic::Status {
        let msg = match self {
            QueryError::Unanswered { failures, .. } => {
                format!("no agent answered ({})", failures.join("; "))
            }
            e => e.to_string(),
        };
        tonic::Status::new(self.grpc_code(), msg)
    }
}

/// A bad HTTP parameter ([`QueryError::invalid`]).
impl From<BadParam> for QueryError {
    fn from(b: BadParam) -> QueryError {
        QueryError::invalid(&b.parameter, b.message)
    }
}

/// The API a request came over: it decides how a field is named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Query parameters: `from`, `to`, `at`, `window`.
    Http,
    /// `pb::SearchRequest` fields: `from_ns`, `to_ns`, `at_ns`, `window_ns`.
    Grpc,
}

impl Api {
    /// The name of search field `field` (its HTTP name) in this API.
    pub fn name(self, field: &'static str) -> &'static str {
        match (self, field) {
            (Api::Grpc, "from") => "from_ns",
            (Api::Grpc, "to") => "to_ns",
            (Api::Grpc, "at") => "at_ns",
            (Api::Grpc, "window") => "window_ns",
            (_, f) => f,
        }
    }
}

// ---------------------------------------------------------------------------
// Search.

/// A search as an API received it, fields decoded but not yet checked
/// against each other ([`SearchInput::validate`]). Times in ns since the
/// epoch, `window_ns` in ns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchInput {
    pub src_ip: Option<IpAddr>,
    pub src_port: Option<u32>,
    pub dst_ip: Option<IpAddr>,
    pub dst_port: Option<u32>,
    pub snat_ip: Option<IpAddr>,
    pub snat_port: Option<u32>,
    pub node: Option<String>,
    pub protocol: Option<Protocol>,
    pub from_ns: Option<u64>,
    pub to_ns: Option<u64>,
    pub at_ns: Option<u64>,
    /// Resolution of `at_ns` as written (1 ms for `1733727900.123`); 0 = exact.
    pub at_precision_ns: u64,
    pub window_ns: Option<u64>,
    /// `None`: the default; `Some(0)` is refused.
    pub limit: Option<u64>,
    pub kind: Option<String>,
    /// Connections from pods of this namespace (a search by pod).
    pub namespace: Option<String>,
    /// Connections from the pod of this name (`metadata.name`).
    pub pod: Option<String>,
    /// Connections from pods of this workload: `NAME` (any kind) or
    /// `KIND/NAME` (`Deployment/checkout`).
    pub workload: Option<String>,
}

/// A validated search: the store query and, for a search by pod, which
/// pods ([`search_by_pod`]). [`run_search`] runs either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSearch {
    pub query: SearchQuery,
    /// `Some` when `namespace`, `pod` or `workload` was given.
    pub pods: Option<PodFilter>,
}

impl SearchInput {
    /// The checked search (rules in the module docs); errors name the field
    /// as `api` spells it.
    pub fn validate(self, api: Api, max_limit: usize) -> Result<ValidSearch, QueryError> {
        let bad = |f: &'static str, m: String| {
            let name = api.name(f);
            QueryError::invalid(name, format!("{name}: {m}"))
        };
        if self.window_ns.is_some() && self.at_ns.is_none() {
            return Err(bad("window", format!("needs {}", api.name("at"))));
        }
        if self.at_ns.is_some() && (self.from_ns.is_some() || self.to_ns.is_some()) {
            return Err(bad(
                "at",
                format!(
                    "give either {} (+ {}) or {}/{}, not both",
                    api.name("at"),
                    api.name("window"),
                    api.name("from"),
                    api.name("to")
                ),
            ));
        }
        let (from_ns, to_ns) = match self.at_ns {
            Some(at) => {
                let w = self.window_ns.unwrap_or(DEFAULT_WINDOW_NS);
                (Some(at.saturating_sub(w)), Some(at.saturating_add(w)))
            }
            None => (self.from_ns, self.to_ns),
        };
        if let (Some(f), Some(t)) = (from_ns, to_ns) {
            if f > t {
                return Err(bad("to", format!("is before {}", api.name("from"))));
            }
        }
        let limit = match self.limit {
            None => DEFAULT_LIMIT.min(max_limit),
            Some(n) if n >= 1 && n <= max_limit as u64 => n as usize,
            Some(n) => return Err(bad("limit", format!("{n} must be 1-{max_limit}"))),
        };
        let node = self.node.map(|n| n.trim().to_string());
        match &node {
            Some(n) if n.is_empty() => return Err(bad("node", "empty".into())),
            Some(n) if n.len() > MAX_NODE_LEN => {
                return Err(bad(
                    "node",
                    format!("longer than {MAX_NODE_LEN} characters"),
                ))
            }
            _ => {}
        }
        let port = |p: Option<u32>, f: &'static str| match p {
            None => Ok(None),
            Some(p @ 1..=65535) => Ok(Some(p as u16)),
            Some(p) => Err(bad(f, format!("{p} is not a port (1-65535)"))),
        };
        let kind = match self.kind.as_deref() {
            None => None,
            Some(k) => Some(ConnKind::parse(k).ok_or_else(|| {
                bad(
                    "kind",
                    format!("unknown value {k:?}; valid: {}", ConnKind::valid_values()),
                )
            })?),
        };
        let pods = pod_filter(self.namespace, self.pod, self.workload)?;
        let query = SearchQuery {
            src_ip: self.src_ip,
            src_port: port(self.src_port, "src_port")?,
            dst_ip: self.dst_ip,
            dst_port: port(self.dst_port, "dst_port")?,
            snat_ip: self.snat_ip,
            snat_port: port(self.snat_port, "snat_port")?,
            node,
            protocol: self.protocol,
            from_ns,
            to_ns,
            at_ns: self.at_ns,
            at_precision_ns: self.at_precision_ns,
            limit,
            kind,
        };
        Ok(ValidSearch { query, pods })
    }
}

/// The pod filter of a search (`None` when none of `namespace`, `pod`,
/// `workload` is given): each trimmed, 1-[`MAX_POD_PARAM_LEN`] characters
/// (an empty one is refused: HTTP reads an empty parameter as absent before
/// this); `workload` is `NAME` or `KIND/NAME`.
fn pod_filter(
    namespace: Option<String>,
    pod: Option<String>,
    workload: Option<String>,
) -> Result<Option<PodFilter>, QueryError> {
    let check = |k: &str, v: Option<String>| -> Result<Option<String>, QueryError> {
        match v.as_deref().map(str::trim) {
            None => Ok(None),
            Some("") => Err(QueryError::invalid(k, format!("{k}: empty"))),
            Some(v) if v.len() > MAX_POD_PARAM_LEN => Err(QueryError::invalid(
                k,
                format!("{k}: longer than {MAX_POD_PARAM_LEN} characters"),
            )),
            Some(v) => Ok(Some(v.to_string())),
        }
    };
    let namespace = check("namespace", namespace)?;
    let pod = check("pod", pod)?;
    let (workload_kind, workload_name) = match check("workload", workload)? {
        None => (None, None),
        Some(w) => match w.split_once('/') {
            Some((k, n)) if !k.is_empty() && !n.is_empty() && !n.contains('/') => {
                (Some(k.to_string()), Some(n.to_string()))
            }
            Some(_) => {
                return Err(QueryError::invalid(
                    "workload",
                    format!("workload: {w:?} is not NAME or KIND/NAME"),
                ))
            }
            None => (None, Some(w)),
        },
    };
    if namespace.is_none() && pod.is_none() && workload_name.is_none() {
        return Ok(None);
    }
    Ok(Some(PodFilter {
        namespace,
        pod,
        workload_kind,
        workload_name,
    }))
}

/// Run a validated search: by pod ([`search_by_pod`]) when it names pods,
/// else the store's search ([`search`]). What both APIs run.
pub async fn run_search(
    store: Arc<dyn RecordStore>,
    registry: &Registry,
    peers: Option<&Peers>,
    pods: Option<&PodHistory>,
    s: &ValidSearch,
) -> Result<SearchResult, QueryError> {
    match &s.pods {
        Some(f) => search_by_pod(store, registry, peers, pods, &s.query, f).await,
        None => search(store, registry, peers, &s.query).await,
    }
}

/// The parameters `GET /api/v1/connections` accepts.
pub const SEARCH_PARAMS: [&str; 17] = [
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "snat_ip",
    "snat_port",
    "node",
    "protocol",
    "from",
    "to",
    "at",
    "window",
    "limit",
    "kind",
    "namespace",
    "pod",
    "workload",
];

/// Most pod tenures (pod, address, time) one search by pod may cover.
pub const MAX_POD_TENURES: usize = 256;

/// Longest `namespace`, `pod` or `workload` accepted (a Kubernetes name is
/// at most 253 characters; `KIND/` adds a few).
const MAX_POD_PARAM_LEN: usize = 320;

/// Run a validated search restricted to the pods matching `f`: the tenures
/// the pod history holds for them in the query's range, each searched by
/// `src_ip` over the tenure (hits kept only when they started in it), then
/// merged and ranked as one search ([`crate::store::rank`]), at most
/// `q.limit`. `total` is an upper bound when a tenure had more matches than
/// the limit. Besides the store's and the open agent gaps, `gaps` holds a
/// [`POD_HISTORY_GAP`] gap for each part of the range where the pod history
/// may miss a tenure ([`PodHistory::missing`]), so `complete` is false
/// there. Errors: no pod history (`kubernetes` off), too many tenures.
pub async fn search_by_pod(
    store: Arc<dyn RecordStore>,
    registry: &Registry,
    peers: Option<&Peers>,
    pods: Option<&PodHistory>,
    q: &SearchQuery,
    f: &PodFilter,
) -> Result<SearchResult, QueryError> {
    let first = if f.namespace.is_some() {
        "namespace"
    } else if f.pod.is_some() {
        "pod"
    } else {
        "workload"
    };
    let Some(pods) = pods else {
        return Err(QueryError::invalid(
            first,
            "needs the collector's pod history (kubernetes is off)",
        ));
    };
    let from = q.from_ns.unwrap_or(0);
    let to = q.to_ns.unwrap_or(u64::MAX);
    let tenures = pods.tenures(f, from, to);
    if tenures.len() > MAX_POD_TENURES {
        return Err(QueryError::TooLarge {
            parameter: first.into(),
            message: format!(
                "{first}: {} pod address tenures match (at most {MAX_POD_TENURES}): narrow the pods or the time range",
                tenures.len()
            ),
        });
    }
    let tenures = merge_tenures(tenures);
    let q2 = q.clone();
    let mut res = tokio::task::spawn_blocking(move || -> Result<SearchResult, QueryError> {
        let mut out = SearchResult::default();
        for t in tenures {
            if q2.src_ip.is_some_and(|ip| ip != t.ip) {
                continue;
            }
            let sub = SearchQuery {
                src_ip: Some(t.ip),
                from_ns: Some(from.max(t.from_ns)),
                to_ns: Some(to.min(t.to_ns)),
                ..q2.clone()
            };
            let r = store.search(&sub)?;
            let unseen = r.total.saturating_sub(r.hits.len() as u64);
            let before = out.hits.len();
            out.hits.extend(r.hits.into_iter().filter(|h| {
                let s = h.start_ns();
                s >= t.from_ns && s < t.to_ns
            }));
            out.total += (out.hits.len() - before) as u64 + unseen;
            for g in r.gaps {
                if !out.gaps.contains(&g) {
                    out.gaps.push(g);
                }
            }
        }
        crate::store::rank(&mut out.hits, q2.at_ns, q2.at_precision_ns);
        out.hits.truncate(q2.limit);
        Ok(out)
    })
    .await
    .map_err(|e| QueryError::Task(e.to_string()))??;
    merge_open_gaps(q, &mut res, peers::open_gaps(registry, peers));
    // Where the pod history may miss a tenure, the search may miss that
    // pod's connections: the answer is not complete there.
    for m in pods.missing(from, to) {
        let g = crate::store::Gap {
            node: POD_HISTORY_GAP_NODE.into(),
            from_ns: m.from_ns,
            to_ns: m.to_ns,
            reason: POD_HISTORY_GAP.into(),
            count: 0,
        };
        if !res.gaps.contains(&g) {
            res.gaps.push(g);
        }
    }
    Ok(res)
}

/// Tenures of one address that overlap or touch merged into one (a pod's
/// handover window overlaps the previous holder's tenure when both match
/// the filter): each address range is searched once and no connection is
/// counted twice. Ordered by (address, start).
fn merge_tenures(mut tenures: Vec<Tenure>) -> Vec<Tenure> {
    tenures.sort_by_key(|t| (t.ip, t.from_ns));
    let mut out: Vec<Tenure> = Vec::with_capacity(tenures.len());
    for t in tenures {
        match out.last_mut() {
            Some(last) if last.ip == t.ip && t.from_ns <= last.to_ns => {
                last.to_ns = last.to_ns.max(t.to_ns);
            }
            _ => out.push(t),
        }
    }
    out
}

/// Reason of the gaps a search by pod adds where the pod history may miss
/// tenures (watch gaps, the range of intervals evicted by
/// `kubernetes.max_closed_intervals`): connections of the searched pods in
/// it may be missing from the answer.
pub const POD_HISTORY_GAP: &str = "pod_history_gap";

/// Node of a [`POD_HISTORY_GAP`] gap: the pod history is cluster-wide.
pub const POD_HISTORY_GAP_NODE: &str = "*";

/// Decode `GET /api/v1/connections` parameters (unknown or repeated names
/// refused; an empty value is absent) and validate them.
pub fn search_from_params(
    params: &[(String, String)],
    max_limit: usize,
) -> Result<ValidSearch, QueryError> {
    api::check_names(params, &SEARCH_PARAMS)?;
    let time = |k: &str| {
        api::param(params, k)
            .map(|v| api::parse_time(v).map_err(|e| BadParam::new(k, format!("{k}: {e}"))))
            .transpose()
    };
    let number = |k: &str, what: &str| {
        api::param(params, k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| BadParam::new(k, format!("{k}: {v:?} is not {what}")))
            })
            .transpose()
    };
    let port = |k: &str| {
        number(k, "a port (1-65535)")?
            .map(|p| {
                u32::try_from(p)
                    .map_err(|_| BadParam::new(k, format!("{k}: {p} is not a port (1-65535)")))
            })
            .transpose()
    };
    let input = SearchInput {
        src_ip: api::parse_ip(params, "src_ip")?,
        src_port: port("src_port")?,
        dst_ip: api::parse_ip(params, "dst_ip")?,
        dst_port: port("dst_port")?,
        snat_ip: api::parse_ip(params, "snat_ip")?,
        snat_port: port("snat_port")?,
        node: api::param(params, "node").map(str::to_string),
        protocol: api::parse_protocol(params, "protocol")?,
        from_ns: time("from")?,
        to_ns: time("to")?,
        at_ns: time("at")?,
        at_precision_ns: api::param(params, "at").map_or(0, api::time_precision_ns),
        window_ns: api::param(params, "window")
            .map(|v| {
                api::parse_duration(v).map_err(|e| BadParam::new("window", format!("window: {e}")))
            })
            .transpose()?,
        limit: number("limit", "a number")?,
        kind: api::param(params, "kind").map(str::to_string),
        namespace: api::param(params, "namespace").map(str::to_string),
        pod: api::param(params, "pod").map(str::to_string),
        workload: api::param(params, "workload").map(str::to_string),
    };
    input.validate(Api::Http, max_limit)
}

/// Add the open `agent_disconnected` gaps (agents disconnected now) that
/// overlap the query (its range and `node`) to `result.gaps`, once each.
pub fn merge_open_gaps(q: &SearchQuery, result: &mut SearchResult, open: Vec<Gap>) {
    let from = q.from_ns.unwrap_or(0);
    let to = q.to_ns.unwrap_or(u64::MAX);
    for g in open {
        if g.from_ns <= to
            && g.to_ns >= from
            && q.node.as_deref().is_none_or(|n| n == g.node)
            && !result.gaps.contains(&g)
        {
            result.gaps.push(g);
        }
    }
}

/// Run a validated search on a blocking thread and add the open gaps
/// ([`peers::open_gaps`]: the registry's, or with replicas those of the
/// agents no collector holds): what both APIs answer.
pub async fn search(
    store: Arc<dyn RecordStore>,
    registry: &Registry,
    peers: Option<&Peers>,
    q: &SearchQuery,
) -> Result<SearchResult, QueryError> {
    let q2 = q.clone();
    let mut res = tokio::task::spawn_blocking(move || store.search(&q2))
        .await
        .map_err(|e| QueryError::Task(e.to_string()))??;
    merge_open_gaps(q, &mut res, peers::open_gaps(registry, peers));
    Ok(res)
}

// ---------------------------------------------------------------------------
// Live lookup.

/// A validated live lookup: the question asked of agents and, optionally,
/// the one node to ask. Built from HTTP parameters ([`Lookup::from_params`])
/// or a gRPC `LookupRequest` (`grpc_query::lookup_from_pb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Protocol, tuple, direction and the conntrack zone (`None`: zone 0
    /// and then every zone seen on the node).
    pub query: LiveQuery,
    /// Ask only this node's agent.
    pub node: Option<String>,
    /// The collector that forwarded this lookup (gRPC metadata
    /// [`peers::FORWARDED_BY`]): it is answered from this collector's own
    /// agents and never forwarded again (the loop guard).
    pub forwarded_by: Option<String>,
}

/// The parameters `GET /api/v1/conntrack/query` accepts.
pub const LOOKUP_PARAMS: [&str; 8] = [
    "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "tuple", "node", "zone",
];

/// A conntrack zone, 0-65535 (`CTA_ZONE` is 16 bits).
pub(crate) fn zone(z: Option<u64>) -> Result<Option<u16>, QueryError> {
    z.map(|z| {
        u16::try_from(z).map_err(|_| {
            QueryError::invalid(
                "zone",
                format!("zone: {z} is not a conntrack zone (0-65535)"),
            )
        })
    })
    .transpose()
}

/// A lookup's `node`: empty is any; at most [`MAX_NODE_LEN`].
pub(crate) fn lookup_node(n: Option<&str>) -> Result<Option<String>, QueryError> {
    match n.map(str::trim) {
        None | Some("") => Ok(None),
        Some(n) if n.len() > MAX_NODE_LEN => Err(QueryError::invalid(
            "node",
            format!("node: longer than {MAX_NODE_LEN} characters"),
        )),
        Some(n) => Ok(Some(n.to_string())),
    }
}

impl Lookup {
    /// From `GET /api/v1/conntrack/query` parameters ([`LOOKUP_PARAMS`];
    /// protocol default `tcp`, `tuple` `orig` or `reply`).
    pub fn from_params(params: &[(String, String)]) -> Result<Lookup, QueryError> {
        api::check_names(params, &LOOKUP_PARAMS)?;
        Ok(Lookup {
            query: api::parse_live(params)?,
            node: lookup_node(api::param(params, "node"))?,
            forwarded_by: None,
        })
    }

    /// The "no such entry" message, the same as the agent's.
    pub fn not_found_message(&self) -> String {
        api::not_found_message(&self.query)
    }
}

/// How a routed lookup went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedLookup {
    /// The entry, if an agent has it.
    pub answer: Option<LiveAnswer>,
    /// Agents that answered "not found".
    pub not_found: Vec<String>,
    /// Agents that did not answer, and why.
    pub failed: Vec<(String, LookupError)>,
    /// Zones asked, in order, of the node that answered (with the entry's
    /// zone last), or of the last node asked.
    pub zones_tried: Vec<u16>,
}

/// A lookup's answer when it did not fail ([`lookup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupOutcome {
    /// An agent has the entry; `zones_tried` as in [`RoutedLookup`].
    Found {
        answer: LiveAnswer,
        zones_tried: Vec<u16>,
    },
    /// Every agent asked (`asked`) answered "not found".
    NotFound {
        asked: Vec<String>,
        zones_tried: Vec<u16>,
    },
}

/// Route a validated lookup ([`route_lookup`]) and say what it found:
/// [`QueryError::NoAgent`] when no agent is connected (and no node named),
/// [`QueryError::Lookup`] when the named node failed,
/// [`QueryError::Unanswered`] when nobody found it and some failed.
pub async fn lookup(
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    peers: Option<Arc<Peers>>,
    cfg: &LookupConfig,
    l: &Lookup,
) -> Result<LookupOutcome, QueryError> {
    let agents = Agents {
        registry,
        // The loop guard: a forwarded lookup is answered here or not at all.
        peers: peers.filter(|_| l.forwarded_by.is_none()),
    };
    if l.node.is_none() && agents.connected_nodes().is_empty() {
        return Err(QueryError::NoAgent);
    }
    let routed = route_lookup(store, agents, l.query, l.node.as_deref(), cfg)
        .await
        .map_err(QueryError::Lookup)?;
    if let Some(answer) = routed.answer {
        return Ok(LookupOutcome::Found {
            answer,
            zones_tried: routed.zones_tried,
        });
    }
    if !routed.failed.is_empty() {
        return Err(QueryError::Unanswered {
            timeouts_only: routed
                .failed
                .iter()
                .all(|(_, e)| matches!(e, LookupError::Timeout(_))),
            failures: routed
                .failed
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect(),
            not_found: routed.not_found,
        });
    }
    if routed.not_found.is_empty() {
        // Every agent disconnected while the lookup was routed.
        return Err(QueryError::NoAgent);
    }
    Ok(LookupOutcome::NotFound {
        asked: routed.not_found,
        zones_tried: routed.zones_tried,
    })
}

/// The node and conntrack zone of the newest indexed connection with this
/// tuple.
fn indexed_node(store: &dyn RecordStore, q: &LiveQuery) -> Option<(String, u16)> {
    let now = ctw_common::now_ns();
    let t = q.tuple;
    let mut sq = SearchQuery {
        protocol: Some(q.protocol),
        from_ns: Some(now.saturating_sub(LOOKUP_INDEX_LOOKBACK.as_nanos() as u64)),
        to_ns: Some(now),
        at_ns: Some(now),
        limit: 1,
        ..SearchQuery::default()
    };
    if q.reply_tuple {
        sq.dst_ip = Some(t.src);
        sq.dst_port = Some(t.src_port);
        sq.snat_ip = Some(t.dst);
        sq.snat_port = Some(t.dst_port);
    } else {
        sq.src_ip = Some(t.src);
        sq.src_port = Some(t.src_port);
        sq.dst_ip = Some(t.dst);
        sq.dst_port = Some(t.dst_port);
    }
    match store.search(&sq) {
        Ok(r) => r.hits.into_iter().next().map(|h| (h.node, h.record.zone)),
        Err(e) => {
            tracing::warn!(error = %e, "index search for lookup routing failed");
            None
        }
    }
}

/// Ask `node` in the request's zone, or in zone 0 and then every zone seen
/// on it, until one has the entry. Returns the answer and the zones asked.
async fn lookup_in_zones(
    registry: &Registry,
    node: &str,
    q: LiveQuery,
    timeout: Duration,
) -> (Result<Option<LiveAnswer>, LookupError>, Vec<u16>) {
    let zones = match q.zone {
        Some(z) => vec![z],
        None => registry.zones_of(node),
    };
    let mut tried = Vec::new();
    for z in zones {
        tried.push(z);
        let zq = LiveQuery { zone: Some(z), ..q };
        match registry.lookup_on(node, zq, timeout).await {
            Ok(None) => continue,
            other => return (other, tried),
        }
    }
    (Ok(None), tried)
}

/// The agents a lookup may ask: those streaming to this collector and,
/// with replicas (and unless the lookup was forwarded here), those whose
/// streams other collectors hold, asked through them ([`Peers::forward`]).
#[derive(Debug, Clone)]
pub struct Agents {
    pub registry: Arc<Registry>,
    pub peers: Option<Arc<Peers>>,
}

impl Agents {
    /// Connected nodes: local ones first, then those held elsewhere.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut n = self.registry.connected_nodes();
        if let Some(p) = &self.peers {
            n.extend(p.remote_nodes());
        }
        n
    }

    fn is_connected(&self, node: &str) -> bool {
        self.registry.is_connected(node)
            || self
                .peers
                .as_ref()
                .is_some_and(|p| p.remote_holder(node).is_some())
    }

    fn node_owning(&self, ip: IpAddr) -> Option<String> {
        self.registry
            .node_owning(ip)
            .or_else(|| self.peers.as_ref()?.remote_node_owning(ip))
    }

    /// Ask `node`: its agent here, or the collector holding its stream.
    async fn ask(
        &self,
        node: &str,
        q: LiveQuery,
        timeout: Duration,
    ) -> (Result<Option<LiveAnswer>, LookupError>, Vec<u16>) {
        if !self.registry.is_connected(node) {
            if let Some((p, lease)) = self
                .peers
                .as_ref()
                .and_then(|p| Some((p, p.remote_holder(node)?)))
            {
                return p.forward(&lease, q).await;
            }
        }
        lookup_in_zones(&self.registry, node, q, timeout).await
    }
}

/// Ask the right agent(s) for a live entry (routing in the module docs).
/// `Err` only when `node` is given and that agent fails.
pub async fn route_lookup(
    store: Arc<dyn RecordStore>,
    agents: Agents,
    q: LiveQuery,
    node: Option<&str>,
    cfg: &LookupConfig,
) -> Result<RoutedLookup, LookupError> {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let mut out = RoutedLookup {
        answer: None,
        not_found: Vec::new(),
        failed: Vec::new(),
        zones_tried: Vec::new(),
    };
    let registry = agents.registry.clone();
    if let Some(node) = node {
        let (r, tried) = agents.ask(node, q, timeout).await;
        out.zones_tried = tried;
        match r? {
            Some(a) => out.answer = Some(a),
            None => out.not_found.push(node.to_string()),
        }
        return Ok(out);
    }
    // The index knows the tuple's node and zone even when the registry
    // does not (a collector restart forgets the zones seen until the node
    // sends records again).
    let s = store.clone();
    let indexed = tokio::task::spawn_blocking(move || indexed_node(s.as_ref(), &q))
        .await
        .ok()
        .flatten();
    if let Some((n, zone)) = &indexed {
        registry.add_zone(n, *zone);
    }
    let indexed = indexed.map(|(n, _)| n);
    let owner_ip = if q.reply_tuple {
        q.tuple.dst
    } else {
        q.tuple.src
    };
    if let Some(owner) = agents.node_owning(owner_ip) {
        let (r, tried) = agents.ask(&owner, q, timeout).await;
        out.zones_tried = tried;
        match r {
            Ok(Some(a)) => out.answer = Some(a),
            Ok(None) => out.not_found.push(owner),
            Err(e) => out.failed.push((owner, e)),
        }
        if out.failed.is_empty() {
            return Ok(out);
        }
    }
    let mut asked: Vec<String> = out.failed.iter().map(|(n, _)| n.clone()).collect();
    if let Some(n) = indexed.filter(|n| !asked.contains(n) && agents.is_connected(n)) {
        asked.push(n.clone());
        let (r, tried) = agents.ask(&n, q, timeout).await;
        out.zones_tried = tried;
        match r {
            Ok(Some(a)) => {
                out.answer = Some(a);
                return Ok(out);
            }
            Ok(None) => out.not_found.push(n),
            Err(e) => out.failed.push((n, e)),
        }
    }
    let sem = Arc::new(Semaphore::new(cfg.max_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for n in agents.connected_nodes() {
        if asked.contains(&n) {
            continue;
        }
        let (agents, sem) = (agents.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let (r, tried) = agents.ask(&n, q, timeout).await;
            (n, r, tried)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((n, r, tried)) = joined else { continue };
        out.zones_tried = tried;
        match r {
            Ok(Some(a)) => {
                out.answer = Some(a);
                // Dropping the set aborts the lookups still running.
                tasks.abort_all();
                break;
            }
            Ok(None) => out.not_found.push(n),
            Err(e) => out.failed.push((n, e)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tonic::Code;

    #[test]
    fn overlapping_tenures_of_one_address_are_searched_once() {
        let a: IpAddr = "198.18.1.11".parse().unwrap();
        let b: IpAddr = "198.18.1.12".parse().unwrap();
        let t = |ip, from_ns, to_ns| Tenure { ip, from_ns, to_ns };
        // C holds `a` from 10 to 30; D's handover window starts at 25
        // (D proven from 30); `b` is another pod's from 20.
        let merged = merge_tenures(vec![t(a, 25, u64::MAX), t(b, 20, 40), t(a, 10, 30)]);
        assert_eq!(merged, [t(a, 10, u64::MAX), t(b, 20, 40)]);
        // Apart in time: kept apart.
        assert_eq!(
            merge_tenures(vec![t(a, 50, 60), t(a, 10, 30)]),
            [t(a, 10, 30), t(a, 50, 60)]
        );
    }

    #[test]
    fn one_mapping_of_errors_to_http_and_grpc() {
        let cases: Vec<(QueryError, u16, Code)> = vec![
            (
                QueryError::invalid("limit", "limit: x"),
                400,
                Code::InvalidArgument,
            ),
            (
                QueryError::Malformed("x".into()),
                400,
                Code::InvalidArgument,
            ),
            (
                QueryError::Store(StoreError::BadQuery("x".into())),
                400,
                Code::InvalidArgument,
            ),
            (
                QueryError::TooLarge {
                    parameter: "lines".into(),
                    message: "x".into(),
                },
                413,
                Code::ResourceExhausted,
            ),
            (
                QueryError::Store(StoreError::Index("x".into())),
                500,
                Code::Internal,
            ),
            (QueryError::Task("x".into()), 500, Code::Internal),
            (QueryError::NoAgent, 503, Code::Unavailable),
            (
                QueryError::Lookup(LookupError::NotConnected("a".into())),
                404,
                Code::NotFound,
            ),
            (
                QueryError::Lookup(LookupError::Timeout("a".into())),
                504,
                Code::DeadlineExceeded,
            ),
            (
                QueryError::Lookup(LookupError::Agent("x".into())),
                502,
                Code::Unavailable,
            ),
            (
                QueryError::Lookup(LookupError::BadReply("x".into())),
                502,
                Code::Unavailable,
            ),
            (
                QueryError::Unanswered {
                    not_found: vec![],
                    failures: vec!["a: x".into()],
                    timeouts_only: true,
                },
                504,
                Code::DeadlineExceeded,
            ),
            (
                QueryError::Unanswered {
                    not_found: vec![],
                    failures: vec!["a: x".into()],
                    timeouts_only: false,
                },
                502,
                Code::Unavailable,
            ),
        ];
        for (e, http, grpc) in cases {
            assert_eq!(e.http_status().as_u16(), http, "{e:?}");
            assert_eq!(e.grpc_code(), grpc, "{e:?}");
            assert_eq!(e.to_status().code(), grpc, "{e:?}");
        }
        let e = QueryError::Lookup(LookupError::NotConnected("a".into()));
        assert_eq!(e.parameter(), Some("node"));
    }

    /// A lookup forwarded here is never forwarded again: for a node that
    /// another collector holds it answers "not connected" instead.
    #[tokio::test]
    async fn a_forwarded_lookup_is_not_forwarded_again() {
        use crate::metrics::Metrics;
        use crate::peers::{Lease, PeerIdentity, Peers, PeersOptions};
        use ctw_common::{Protocol, Tuple};
        let registry = Arc::new(Registry::new(Metrics::new()));
        let now = ctw_common::now_ns();
        let opts = PeersOptions {
            me: PeerIdentity {
                collector_id: "c1".into(),
                advertise_addr: "127.0.0.1:9359".into(),
                peer_server_name: "collector".into(),
            },
            lease_ttl: Duration::from_secs(15),
            renew_interval: Duration::from_secs(3),
            tls: crate::config::TlsFiles {
                ca_file: "/nonexistent/ca.pem".into(),
                cert_file: "/nonexistent/c.pem".into(),
                key_file: "/nonexistent/k.pem".into(),
            },
            clickhouse: serde_yaml::from_str("{}").unwrap(),
            forward_timeout: Duration::from_secs(1),
        };
        // Node a streams to collector c2 (by its lease).
        let lease = Lease {
            node: "a".into(),
            collector_id: "c2".into(),
            grpc_addr: "127.0.0.1:1".into(),
            boot_id: "b".into(),
            connected_ns: now - 1_000_000_000,
            expires_ns: now + 60_000_000_000,
            updated_ns: now,
            info: String::new(),
        };
        let peers = Arc::new(Peers::with_leases(opts, registry.clone(), vec![lease]));
        let store: Arc<dyn RecordStore> = Arc::new(crate::store::MemStore::default());
        let mut l = Lookup {
            query: LiveQuery {
                protocol: Protocol::Tcp,
                tuple: Tuple {
                    src: "198.19.0.2".parse().unwrap(),
                    dst: "198.19.0.1".parse().unwrap(),
                    src_port: 80,
                    dst_port: 1024,
                },
                reply_tuple: true,
                zone: None,
            },
            node: Some("a".into()),
            forwarded_by: Some("c2".into()),
        };
        let cfg = LookupConfig::default();
        let lookup = |l: Lookup| {
            let (store, registry, peers, cfg) =
                (store.clone(), registry.clone(), peers.clone(), cfg.clone());
            async move { lookup(store, registry, Some(peers), &cfg, &l).await }
        };
        // Forwarded here: only our own agents count (none).
        match lookup(l.clone()).await {
            Err(QueryError::Lookup(LookupError::NotConnected(n))) => assert_eq!(n, "a"),
            other => panic!("{other:?}"),
        }
        l.node = None;
        assert!(matches!(lookup(l.clone()).await, Err(QueryError::NoAgent)));
        // Asked here first: it goes to c2 (unreachable here: its TLS files
        // do not exist), and the error names c2.
        l.forwarded_by = None;
        l.node = Some("a".into());
        match lookup(l.clone()).await {
            Err(QueryError::Lookup(LookupError::Agent(m))) => assert!(m.contains("c2"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Without a node, c2's agent is among those asked.
        l.node = None;
        match lookup(l).await {
            Err(QueryError::Unanswered { failures, .. }) => {
                assert!(
                    failures[0].starts_with("a: ") && failures[0].contains("c2"),
                    "{failures:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn open_gaps_in_range_make_results_incomplete() {
        let q = SearchQuery {
            from_ns: Some(100),
            to_ns: Some(200),
            node: Some("a".into()),
            ..SearchQuery::default()
        };
        let gap = |node: &str, from, to| Gap {
            node: node.into(),
            from_ns: from,
            to_ns: to,
            reason: "agent_disconnected".into(),
            count: 0,
        };
        let mut r = SearchResult::default();
        merge_open_gaps(
            &q,
            &mut r,
            vec![gap("a", 150, 900), gap("b", 150, 900), gap("a", 300, 900)],
        );
        // Once each.
        merge_open_gaps(&q, &mut r, vec![gap("a", 150, 900)]);
        assert_eq!(r.gaps, vec![gap("a", 150, 900)]);
    }
}

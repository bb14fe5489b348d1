//! The `Query` gRPC service, with the meaning of the HTTP API: `Search` is
//! `GET /api/v1/connections`, `Lookup` is `GET /api/v1/conntrack/query`.
//! Served on the mTLS port next to `Ingest`.
//!
//! Also the pieces the HTTP layer can share so both APIs answer alike:
//! [`search_query`] (validation; errors name the field), [`merge_open_gaps`]
//! and [`route_lookup`] (which agent to ask).
//!
//! Lookup routing, in order:
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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ctw_common::{Counters, Protocol, Tuple};
use ctw_proto::pb;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::{Request, Response, Status};

use crate::config::LookupConfig;
use crate::registry::{unix_ns, LiveAnswer, LiveQuery, LookupError, Registry};
use crate::store::{ConnKind, Gap, RecordStore, SearchQuery, SearchResult, StoreError};

/// `limit` when a search does not give one.
pub const DEFAULT_LIMIT: usize = 100;
/// `window` around `at` when a search does not give one.
pub const DEFAULT_WINDOW_NS: u64 = 5 * 60 * 1_000_000_000;
/// How far back [`route_lookup`] looks in the index for the tuple's node.
pub const LOOKUP_INDEX_LOOKBACK: Duration = Duration::from_secs(7 * 24 * 3600);

/// A bad request: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        message: message.into(),
    }
}

/// gRPC status of a bad request.
pub fn invalid_status(e: &InvalidField) -> Status {
    Status::invalid_argument(e.to_string())
}

/// gRPC status of a store error.
pub fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::BadQuery(m) => Status::invalid_argument(m.clone()),
        e => Status::internal(e.to_string()),
    }
}

/// gRPC status of a failed lookup on one agent.
pub fn lookup_status(e: &LookupError) -> Status {
    match e {
        LookupError::NotConnected(_) => Status::unavailable(e.to_string()),
        LookupError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        LookupError::Agent(_) | LookupError::BadReply(_) => Status::internal(e.to_string()),
    }
}

fn port(v: Option<u32>, field: &'static str) -> Result<Option<u16>, InvalidField> {
    v.map(|p| u16::try_from(p).map_err(|_| invalid(field, format!("{p} is not a port (0-65535)"))))
        .transpose()
}

fn ip(v: &Option<Vec<u8>>, field: &'static str) -> Result<Option<std::net::IpAddr>, InvalidField> {
    v.as_ref()
        .map(|b| ctw_proto::ip_from_bytes(b, field).map_err(|e| invalid(field, e.to_string())))
        .transpose()
}

fn protocol(n: u32, field: &'static str) -> Result<Protocol, InvalidField> {
    u8::try_from(n)
        .ok()
        .and_then(Protocol::from_number)
        .ok_or_else(|| invalid(field, format!("unsupported protocol number {n}")))
}

/// Validate a search. `at` without `from`/`to` gives `[at - window, at +
/// window]` (window default 5 min); `limit` 0 means [`DEFAULT_LIMIT`].
pub fn search_query(r: &pb::SearchRequest, max_limit: usize) -> Result<SearchQuery, InvalidField> {
    let node = match &r.node {
        Some(n) if n.is_empty() => return Err(invalid("node", "empty")),
        n => n.clone(),
    };
    if r.window_ns.is_some() && r.at_ns.is_none() {
        return Err(invalid("window_ns", "needs at_ns"));
    }
    let (mut from_ns, mut to_ns) = (r.from_ns, r.to_ns);
    if let Some(at) = r.at_ns {
        let window = r.window_ns.unwrap_or(DEFAULT_WINDOW_NS);
        from_ns = from_ns.or(Some(at.saturating_sub(window)));
        to_ns = to_ns.or(Some(at.saturating_add(window)));
    }
    if let (Some(f), Some(t)) = (from_ns, to_ns) {
        if f > t {
            return Err(invalid("from_ns", format!("{f} is after to_ns {t}")));
        }
    }
    let limit = match r.limit as usize {
        0 => DEFAULT_LIMIT.min(max_limit),
        n if n > max_limit => return Err(invalid("limit", format!("{n} is above {max_limit}"))),
        n => n,
    };
    Ok(SearchQuery {
        src_ip: ip(&r.src_ip, "src_ip")?,
        src_port: port(r.src_port, "src_port")?,
        dst_ip: ip(&r.dst_ip, "dst_ip")?,
        dst_port: port(r.dst_port, "dst_port")?,
        snat_ip: ip(&r.snat_ip, "snat_ip")?,
        snat_port: port(r.snat_port, "snat_port")?,
        node,
        protocol: r.protocol.map(|p| protocol(p, "protocol")).transpose()?,
        from_ns,
        to_ns,
        at_ns: r.at_ns,
        at_precision_ns: 0,
        limit,
        kind: r
            .kind
            .as_deref()
            .map(|k| {
                ConnKind::parse(k).ok_or_else(|| {
                    invalid(
                        "kind",
                        format!("unknown kind {k:?}; valid: {}", ConnKind::valid_values()),
                    )
                })
            })
            .transpose()?,
    })
}

/// Add the open `agent_disconnected` gaps (agents disconnected now) that
/// overlap the query to `result.gaps`.
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

fn pb_counters(c: Option<Counters>) -> Option<pb::Counters> {
    c.map(|c| pb::Counters {
        packets: c.packets,
        bytes: c.bytes,
    })
}

fn search_response(result: SearchResult) -> pb::SearchResponse {
    pb::SearchResponse {
        complete: result.gaps.is_empty(),
        total: result.total,
        connections: result
            .hits
            .iter()
            .map(|h| pb::Connection {
                node: h.node.clone(),
                record: Some((&h.record).into()),
                closed_ns: h.closed_ns,
                end: h.end.map(|e| e.as_str().to_string()),
                last_seen_ns: h.last_seen_ns,
                counters_orig: pb_counters(h.counters_orig),
                counters_reply: pb_counters(h.counters_reply),
            })
            .collect(),
        gaps: result
            .gaps
            .iter()
            .map(|g| pb::Gap {
                node: g.node.clone(),
                from_ns: g.from_ns,
                to_ns: g.to_ns,
                reason: g.reason.clone(),
            })
            .collect(),
    }
}

/// Validate a `LookupRequest`: the query and the optional node.
pub fn live_query(r: &pb::LookupRequest) -> Result<(LiveQuery, Option<String>), InvalidField> {
    let protocol = protocol(r.protocol, "protocol")?;
    let t = r
        .tuple
        .as_ref()
        .ok_or_else(|| invalid("tuple", "missing"))?;
    let tuple = Tuple::try_from(t).map_err(|e| match e {
        ctw_proto::ConvertError::Missing(f) => invalid(f, "missing"),
        ctw_proto::ConvertError::Invalid { field, message } => invalid(field, message),
    })?;
    let node = (!r.node.is_empty()).then(|| r.node.clone());
    let zone = r
        .zone
        .map(|z| {
            u16::try_from(z).map_err(|_| invalid("zone", format!("{z} is not a zone (0-65535)")))
        })
        .transpose()?;
    Ok((
        LiveQuery {
            protocol,
            tuple,
            reply_tuple: r.reply_tuple,
            zone,
        },
        node,
    ))
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

impl RoutedLookup {
    /// No agent found the entry and none could say so.
    pub fn nobody_answered(&self) -> bool {
        self.answer.is_none() && self.not_found.is_empty()
    }
}

/// The node and conntrack zone of the newest indexed connection with this
/// tuple.
fn indexed_node(store: &dyn RecordStore, q: &LiveQuery) -> Option<(String, u16)> {
    let now = unix_ns(SystemTime::now());
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

/// Ask the right agent(s) for a live entry (routing in the module docs).
/// `Err` only when `node` is given and that agent fails.
pub async fn route_lookup(
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
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
    if let Some(node) = node {
        let (r, tried) = lookup_in_zones(&registry, node, q, timeout).await;
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
    if let Some(owner) = registry.node_owning(owner_ip) {
        let (r, tried) = lookup_in_zones(&registry, &owner, q, timeout).await;
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
    if let Some(n) = indexed.filter(|n| !asked.contains(n) && registry.is_connected(n)) {
        asked.push(n.clone());
        let (r, tried) = lookup_in_zones(&registry, &n, q, timeout).await;
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
    for n in registry.connected_nodes() {
        if asked.contains(&n) {
            continue;
        }
        let (registry, sem) = (registry.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let (r, tried) = lookup_in_zones(&registry, &n, q, timeout).await;
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

/// The `Query` service.
#[derive(Clone)]
pub struct QueryService {
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    lookup: LookupConfig,
    max_limit: usize,
}

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryService")
            .field("lookup", &self.lookup)
            .field("max_limit", &self.max_limit)
            .finish_non_exhaustive()
    }
}

impl QueryService {
    pub fn new(
        store: Arc<dyn RecordStore>,
        registry: Arc<Registry>,
        lookup: LookupConfig,
        max_limit: usize,
    ) -> QueryService {
        QueryService {
            store,
            registry,
            lookup,
            max_limit,
        }
    }
}

#[tonic::async_trait]
impl pb::query_server::Query for QueryService {
    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let q = search_query(request.get_ref(), self.max_limit).map_err(|e| invalid_status(&e))?;
        let store = self.store.clone();
        let q2 = q.clone();
        let mut result = tokio::task::spawn_blocking(move || store.search(&q2))
            .await
            .map_err(|e| Status::internal(format!("search task: {e}")))?
            .map_err(|e| store_status(&e))?;
        merge_open_gaps(&q, &mut result, self.registry.open_gaps());
        Ok(Response::new(search_response(result)))
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupReply>, Status> {
        let req = request.into_inner();
        let (q, node) = live_query(&req).map_err(|e| invalid_status(&e))?;
        if node.is_none() && self.registry.connected_nodes().is_empty() {
            return Err(Status::unavailable("no agent is connected"));
        }
        let routed = route_lookup(
            self.store.clone(),
            self.registry.clone(),
            q,
            node.as_deref(),
            &self.lookup,
        )
        .await
        .map_err(|e| lookup_status(&e))?;
        if routed.nobody_answered() && !routed.failed.is_empty() {
            let why: Vec<String> = routed
                .failed
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect();
            return Err(Status::unavailable(format!(
                "no agent answered ({})",
                why.join("; ")
            )));
        }
        let reply = match routed.answer {
            Some(a) => pb::LookupReply {
                request_id: req.request_id,
                found: true,
                error: String::new(),
                entry: Some((&a.record).into()),
                node: a.node,
            },
            None => pb::LookupReply {
                request_id: req.request_id,
                found: false,
                error: String::new(),
                entry: None,
                node: String::new(),
            },
        };
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn search_fields_are_validated_by_name() {
        let ok = pb::SearchRequest {
            snat_ip: Some(vec![198, 19, 0, 1]),
            snat_port: Some(1024),
            at_ns: Some(10 * DEFAULT_WINDOW_NS),
            ..Default::default()
        };
        let q = search_query(&ok, 1000).unwrap();
        assert_eq!(q.from_ns, Some(9 * DEFAULT_WINDOW_NS));
        assert_eq!(q.to_ns, Some(11 * DEFAULT_WINDOW_NS));
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.snat_port, Some(1024));

        let cases: Vec<(pb::SearchRequest, &str)> = vec![
            (
                pb::SearchRequest {
                    src_ip: Some(vec![1, 2, 3]),
                    ..Default::default()
                },
                "src_ip",
            ),
            (
                pb::SearchRequest {
                    dst_port: Some(70000),
                    ..Default::default()
                },
                "dst_port",
            ),
            (
                pb::SearchRequest {
                    protocol: Some(1),
                    ..Default::default()
                },
                "protocol",
            ),
            (
                pb::SearchRequest {
                    from_ns: Some(5),
                    to_ns: Some(4),
                    ..Default::default()
                },
                "from_ns",
            ),
            (
                pb::SearchRequest {
                    window_ns: Some(5),
                    ..Default::default()
                },
                "window_ns",
            ),
            (
                pb::SearchRequest {
                    limit: 1001,
                    ..Default::default()
                },
                "limit",
            ),
            (
                pb::SearchRequest {
                    node: Some(String::new()),
                    ..Default::default()
                },
                "node",
            ),
            (
                pb::SearchRequest {
                    kind: Some("opened".into()),
                    ..Default::default()
                },
                "kind",
            ),
        ];
        for (req, field) in cases {
            let e = search_query(&req, 1000).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(invalid_status(&e).message().starts_with(field));
        }
        for k in ConnKind::ALL {
            let req = pb::SearchRequest {
                kind: Some(k.as_str().into()),
                ..Default::default()
            };
            assert_eq!(search_query(&req, 1000).unwrap().kind, Some(k));
        }
    }

    #[test]
    fn connections_say_how_their_end_is_known() {
        use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};
        let ip = "198.18.0.1".parse().unwrap();
        let r = ConnRecord::new(
            EventKind::New,
            1,
            Protocol::Udp,
            Tuple::new(ip, 1, ip, 2),
            Tuple::new(ip, 2, ip, 1),
        );
        let hit = |end, closed_ns, last_seen_ns| crate::store::Hit {
            node: "n".into(),
            record: r,
            closed_ns,
            end,
            last_seen_ns,
            counters_orig: None,
            counters_reply: None,
        };
        let res = SearchResult {
            hits: vec![
                hit(None, None, None),
                hit(Some(crate::store::End::Gone), Some(9), Some(5)),
                hit(Some(crate::store::End::Superseded), Some(7), None),
            ],
            total: 3,
            gaps: Vec::new(),
        };
        let c = search_response(res).connections;
        let got: Vec<_> = c
            .iter()
            .map(|c| (c.end.as_deref(), c.closed_ns, c.last_seen_ns))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, None, None),
                (Some("gone"), Some(9), Some(5)),
                (Some("superseded"), Some(7), None)
            ]
        );
    }

    #[test]
    fn lookup_request_is_validated_by_name() {
        let mut r = pb::LookupRequest {
            request_id: 1,
            protocol: 6,
            tuple: Some(pb::Tuple {
                src: vec![10, 0, 0, 1],
                dst: vec![10, 0, 0, 2],
                src_port: 1,
                dst_port: 2,
            }),
            reply_tuple: true,
            node: String::new(),
            zone: None,
        };
        let (q, node) = live_query(&r).unwrap();
        assert!(q.reply_tuple && node.is_none() && q.zone.is_none());
        r.zone = Some(7);
        assert_eq!(live_query(&r).unwrap().0.zone, Some(7));
        r.zone = Some(1 << 16);
        assert_eq!(live_query(&r).unwrap_err().field, "zone");
        r.zone = None;
        r.tuple.as_mut().unwrap().dst_port = 1 << 20;
        assert_eq!(live_query(&r).unwrap_err().field, "tuple.dst_port");
        r.tuple = None;
        assert_eq!(live_query(&r).unwrap_err().field, "tuple");
        r.protocol = 1;
        assert_eq!(live_query(&r).unwrap_err().field, "protocol");
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
        assert_eq!(r.gaps, vec![gap("a", 150, 900)]);
        assert!(!search_response(r).complete);
    }
}

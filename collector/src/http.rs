//! The collector's HTTP API: cluster-wide search (`/api/v1/connections`),
//! live lookups proxied to agents (`/api/v1/conntrack/query`, optional
//! `zone`; without it the zones the node has recorded are tried, zone 0
//! first, and `zones_tried` says which were asked), the agents list, and
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! Everything under `/api/` needs `Authorization: Bearer TOKEN`; metrics and
//! probes do not (Prometheus and kubelet have no token).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ctw_common::api::{self, BadParam, LookupAnswer};
use ctw_common::EventKind;
use serde_json::{json, Value};

use crate::auth::Token;
use crate::config::LookupConfig;
use crate::grpc_query::{merge_open_gaps, route_lookup};
use crate::metrics::Metrics;
use crate::registry::{LiveQuery, LookupError, Registry};
use crate::resolve;
use crate::store::{alive_at, ConnKind, Gap, Hit, RecordStore, SearchQuery, SearchResult};

/// Default and largest `window` around `at`.
const DEFAULT_WINDOW_NS: u64 = 5 * 60 * 1_000_000_000;
const DEFAULT_LIMIT: usize = 100;
/// Longest query string accepted.
const MAX_QUERY_BYTES: usize = 4096;

pub struct AppState {
    pub store: Arc<dyn RecordStore>,
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub token: Token,
    pub max_limit: usize,
    pub lookup: LookupConfig,
    /// Set once storage is open and the gRPC listener is up.
    pub ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("max_limit", &self.max_limit)
            .finish()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/v1/connections", get(connections))
        .route("/api/v1/conntrack/query", get(live_query))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/resolve", resolve::route())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .merge(crate::ui::router())
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// A JSON error answer: `{"error": msg}` plus `"parameter"` when one is named.
pub(crate) fn error(code: StatusCode, msg: &str, parameter: Option<&str>) -> Response {
    let body = match parameter {
        Some(p) => json!({ "error": msg, "parameter": p }),
        None => json!({ "error": msg }),
    };
    (code, Json(body)).into_response()
}

fn bad(b: BadParam) -> Response {
    error(StatusCode::BAD_REQUEST, &b.message, Some(&b.parameter))
}

/// Count every request by route pattern and status class.
async fn track(
    State(s): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    const ROUTES: [&str; 7] = [
        "/api/v1/connections",
        "/api/v1/resolve",
        "/api/v1/conntrack/query",
        "/api/v1/agents",
        "/metrics",
        "/healthz",
        "/readyz",
    ];
    let route = matched
        .as_ref()
        .and_then(|m| ROUTES.iter().find(|r| **r == m.as_str()).copied())
        .unwrap_or("other");
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    s.metrics.http_request(
        route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

async fn require_token(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !given.is_some_and(|t| s.token.matches(t)) {
        s.metrics.http_auth_failure();
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
            None,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    next.run(req).await
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    s.metrics.sync_store(&s.store.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "starting", None)
    }
}

type Params = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

fn params_of(p: Params, uri_len: usize) -> Result<Vec<(String, String)>, Box<Response>> {
    if uri_len > MAX_QUERY_BYTES {
        return Err(Box::new(error(
            StatusCode::URI_TOO_LONG,
            "query string too long",
            None,
        )));
    }
    p.map(|Query(v)| v).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "malformed query string",
            None,
        ))
    })
}

const SEARCH_PARAMS: [&str; 14] = [
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
];

/// Parse `/api/v1/connections` parameters into a store query.
pub fn parse_search(
    params: &[(String, String)],
    max_limit: usize,
) -> Result<SearchQuery, BadParam> {
    api::check_names(params, &SEARCH_PARAMS)?;
    let time = |k: &str| {
        api::param(params, k)
            .map(|v| api::parse_time(v).map_err(|e| BadParam::new(k, format!("{k}: {e}"))))
            .transpose()
    };
    let from = time("from")?;
    let to = time("to")?;
    let at = time("at")?;
    let window = api::param(params, "window")
        .map(|v| {
            api::parse_duration(v).map_err(|e| BadParam::new("window", format!("window: {e}")))
        })
        .transpose()?;
    if at.is_none() && window.is_some() {
        return Err(BadParam::new("window", "window needs at"));
    }
    if at.is_some() && (from.is_some() || to.is_some()) {
        return Err(BadParam::new(
            "at",
            "give either at (+ window) or from/to, not both",
        ));
    }
    let (from_ns, to_ns) = match at {
        Some(at) => {
            let w = window.unwrap_or(DEFAULT_WINDOW_NS);
            (Some(at.saturating_sub(w)), Some(at.saturating_add(w)))
        }
        None => (from, to),
    };
    if let (Some(f), Some(t)) = (from_ns, to_ns) {
        if f > t {
            return Err(BadParam::new("to", "to is before from"));
        }
    }
    let limit = match api::param(params, "limit") {
        None => DEFAULT_LIMIT.min(max_limit),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max_limit).contains(&n) => n,
            _ => {
                return Err(BadParam::new(
                    "limit",
                    format!("limit: {v:?} must be 1-{max_limit}"),
                ))
            }
        },
    };
    let node = api::param(params, "node").map(str::to_string);
    if let Some(n) = &node {
        if n.len() > 253 {
            return Err(BadParam::new("node", "node: longer than 253 characters"));
        }
    }
    Ok(SearchQuery {
        src_ip: api::parse_ip(params, "src_ip")?,
        src_port: api::parse_port(params, "src_port")?,
        dst_ip: api::parse_ip(params, "dst_ip")?,
        dst_port: api::parse_port(params, "dst_port")?,
        snat_ip: api::parse_ip(params, "snat_ip")?,
        snat_port: api::parse_port(params, "snat_port")?,
        node,
        protocol: api::parse_protocol(params, "protocol")?,
        from_ns,
        to_ns,
        at_ns: at,
        at_precision_ns: api::param(params, "at").map_or(0, api::time_precision_ns),
        limit,
        kind: api::param(params, "kind")
            .map(|k| {
                ConnKind::parse(k).ok_or_else(|| {
                    BadParam::new(
                        "kind",
                        format!(
                            "kind: unknown value {k:?}; valid: {}",
                            ConnKind::valid_values()
                        ),
                    )
                })
            })
            .transpose()?,
    })
}

/// One search hit as JSON.
pub fn hit_json(h: &Hit, q: &SearchQuery) -> Value {
    let r = &h.record;
    let (snat_ip, snat_port) = r.snat();
    let start = h.start_ns();
    let mut v = json!({
        "ts": api::format_time(r.event_ns),
        "node": h.node,
        "protocol": r.protocol,
        "src_ip": r.orig.src,
        "src_port": r.orig.src_port,
        "dst_ip": r.orig.dst,
        "dst_port": r.orig.dst_port,
        "snat_ip": snat_ip,
        "snat_port": snat_port,
        "kind": match r.kind { EventKind::New => "new", EventKind::Recovered => "recovered", EventKind::Destroy => "destroy" },
        "start": api::format_time(start),
    });
    let o = v.as_object_mut().expect("json object");
    if let Some(s) = r.tcp_state {
        o.insert("state".into(), json!(s.name()));
    }
    if r.midstream() {
        // Picked up mid-stream: the connection started before this entry.
        o.insert("midstream".into(), json!(true));
    }
    if r.zone != 0 {
        o.insert("zone".into(), json!(r.zone));
    }
    if r.status & ctw_common::status::CTW_EXTERNAL != 0 {
        o.insert("external".into(), json!(true));
    }
    if let Some(c) = h.closed_ns {
        o.insert("end".into(), json!(api::format_time(c)));
        if let Some(e) = h.end {
            o.insert("end_kind".into(), json!(e.as_str()));
        }
        if let Some(s) = h.last_seen_ns {
            o.insert("last_seen".into(), json!(api::format_time(s)));
        }
        o.insert(
            "duration_ms".into(),
            json!(c.saturating_sub(start) / 1_000_000),
        );
    }
    if let Some(at) = q.at_ns {
        o.insert("alive_at".into(), json!(alive_at(h, at, q.at_precision_ns)));
    }
    if let Some(c) = h.counters_orig {
        o.insert("orig_packets".into(), json!(c.packets));
        o.insert("orig_bytes".into(), json!(c.bytes));
    }
    if let Some(c) = h.counters_reply {
        o.insert("reply_packets".into(), json!(c.packets));
        o.insert("reply_bytes".into(), json!(c.bytes));
    }
    v
}

fn gap_json(g: &Gap) -> Value {
    json!({
        "node": g.node,
        "from": api::format_time(g.from_ns),
        "to": api::format_time(g.to_ns),
        "reason": g.reason,
        "count": g.count,
    })
}

pub fn search_json(res: &SearchResult, q: &SearchQuery) -> Value {
    let gaps = &res.gaps;
    json!({
        "records": res.hits.iter().map(|h| hit_json(h, q)).collect::<Vec<_>>(),
        "total": res.total,
        "returned": res.hits.len(),
        "limit": q.limit,
        "complete": gaps.is_empty(),
        "gaps": gaps.iter().map(gap_json).collect::<Vec<_>>(),
        "from": q.from_ns.map(api::format_time),
        "to": q.to_ns.map(api::format_time),
        "at": q.at_ns.map(api::format_time),
    })
}

async fn connections(State(s): State<Arc<AppState>>, uri: axum::http::Uri, p: Params) -> Response {
    let params = match params_of(p, uri.query().map_or(0, str::len)) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let q = match parse_search(&params, s.max_limit) {
        Ok(q) => q,
        Err(b) => return bad(b),
    };
    let store = s.store.clone();
    let q2 = q.clone();
    match tokio::task::spawn_blocking(move || store.search(&q2)).await {
        Ok(Ok(mut res)) => {
            merge_open_gaps(&q, &mut res, s.registry.open_gaps());
            Json(search_json(&res, &q)).into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("search failed: {e}"),
            None,
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("search task failed: {e}"),
            None,
        ),
    }
}

async fn live_query(State(s): State<Arc<AppState>>, uri: axum::http::Uri, p: Params) -> Response {
    let params = match params_of(p, uri.query().map_or(0, str::len)) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let parsed = api::check_names(
        &params,
        &[
            "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "tuple", "node", "zone",
        ],
    )
    .and_then(|_| api::parse_live(&params))
    .and_then(|lp| parse_zone(&params).map(|z| (lp, z)));
    let (lp, zone) = match parsed {
        Ok(p) => p,
        Err(b) => return bad(b),
    };
    let node = api::param(&params, "node").map(str::to_string);
    let q = LiveQuery {
        protocol: lp.protocol,
        tuple: lp.tuple,
        reply_tuple: lp.reply_tuple,
        zone,
    };
    let routed = route_lookup(
        s.store.clone(),
        s.registry.clone(),
        q,
        node.as_deref(),
        &s.lookup,
    )
    .await;
    let routed = match routed {
        Ok(r) => r,
        Err(LookupError::NotConnected(n)) => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("agent {n:?} is not connected"),
                Some("node"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("lookup failed: {e}"),
                None,
            )
        }
    };
    if let Some(ans) = routed.answer {
        let mut v = serde_json::to_value(LookupAnswer::new(&ans.record, &ans.node))
            .unwrap_or_else(|_| json!({}));
        if let Some(o) = v.as_object_mut() {
            o.insert("zones_tried".into(), json!(routed.zones_tried));
        }
        return Json(v).into_response();
    }
    let failures: Vec<String> = routed
        .failed
        .iter()
        .map(|(n, e)| format!("{n}: {e}"))
        .collect();
    if routed.not_found.is_empty() && failures.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no agent is connected",
            None,
        );
    }
    if failures.is_empty() {
        let body = json!({
            "error": api::not_found_message(&lp),
            "asked": routed.not_found,
            "zones_tried": routed.zones_tried,
        });
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    let timeouts = routed
        .failed
        .iter()
        .all(|(_, e)| matches!(e, LookupError::Timeout(_)));
    let code = if timeouts {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let body = json!({
        "error": "no agent found the entry and some could not answer",
        "not_found": routed.not_found,
        "failures": failures,
    });
    (code, Json(body)).into_response()
}

/// The optional `zone` of a live lookup: a conntrack zone, 0-65535.
fn parse_zone(params: &[(String, String)]) -> Result<Option<u16>, BadParam> {
    api::param(params, "zone")
        .map(|v| {
            v.parse::<u16>().map_err(|_| {
                BadParam::new(
                    "zone",
                    format!("zone: {v:?} is not a conntrack zone (0-65535)"),
                )
            })
        })
        .transpose()
}

async fn agents(State(s): State<Arc<AppState>>) -> Response {
    Json(json!({ "agents": s.registry.agents() })).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hit_json_says_how_the_end_is_known() {
        use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};
        let ip = "198.18.0.1".parse().unwrap();
        let r = ConnRecord::new(
            EventKind::Recovered,
            1_000_000_000,
            Protocol::Tcp,
            Tuple::new(ip, 1, ip, 2),
            Tuple::new(ip, 2, ip, 1),
        );
        let mut h = Hit {
            node: "n".into(),
            record: r,
            closed_ns: None,
            end: None,
            last_seen_ns: None,
            counters_orig: None,
            counters_reply: None,
        };
        let q = SearchQuery::default();
        let v = hit_json(&h, &q);
        assert!(v.get("end").is_none() && v.get("end_kind").is_none(), "{v}");
        h.closed_ns = Some(3_000_000_000);
        h.end = Some(crate::store::End::Gone);
        h.last_seen_ns = Some(2_000_000_000);
        let v = hit_json(&h, &q);
        assert_eq!(v["end_kind"], "gone", "{v}");
        assert_eq!(v["end"], "1970-01-01T00:00:03.000Z", "{v}");
        assert_eq!(v["last_seen"], "1970-01-01T00:00:02.000Z", "{v}");
        h.end = Some(crate::store::End::Superseded);
        h.last_seen_ns = None;
        let v = hit_json(&h, &q);
        assert_eq!(v["end_kind"], "superseded", "{v}");
        assert!(v.get("last_seen").is_none(), "{v}");
    }

    #[test]
    fn kind_is_parsed_and_an_unknown_one_names_the_valid_values() {
        for k in ConnKind::ALL {
            let q = parse_search(&params(&[("kind", k.as_str())]), 100).unwrap();
            assert_eq!(q.kind, Some(k));
        }
        assert_eq!(parse_search(&params(&[]), 100).unwrap().kind, None);
        let e = parse_search(&params(&[("kind", "NEW")]), 100).unwrap_err();
        assert_eq!(e.parameter, "kind");
        for k in ["new", "midstream", "recovered", "destroy"] {
            assert!(e.message.contains(k), "{}", e.message);
        }
    }
}

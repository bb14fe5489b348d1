//! The collector's HTTP API: cluster-wide search (`/api/v1/connections`),
//! live lookups proxied to agents (`/api/v1/conntrack/query`, optional
//! `zone`; without it the zones the node has recorded are tried, zone 0
//! first, and `zones_tried` says which were asked), the agents list, and
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! With a pod history (`kubernetes` on, [`AppState::pods`]) every
//! connection, resolved line, candidate and live lookup carries the pod
//! fields ([`ctw_common::api::PodFields`]), and searches take `namespace`,
//! `pod`, `workload` ([`query::search_by_pod`]).
//!
//! Everything under `/api/` needs `Authorization: Bearer TOKEN`; metrics and
//! probes do not (Prometheus and kubelet have no token).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ctw_common::api::{AgentsAnswer, ErrorAnswer, LookupAnswer, StatusAnswer};

use crate::answer;
use crate::auth::Token;
use crate::config::LookupConfig;
use crate::metrics::Metrics;
use crate::peers::{self, Peers};
use crate::pods::PodHistory;
use crate::query::{self, Lookup, LookupOutcome, QueryError};
use crate::registry::Registry;
use crate::resolve;
use crate::store::RecordStore;

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
    /// The pod history (kubernetes on): answers carry `pod` and its
    /// fields; `None` leaves them out.
    pub pods: Option<Arc<PodHistory>>,
    /// The other collectors on the same database (`replicas` on): live
    /// lookups reach agents streaming to them, `/api/v1/agents` lists
    /// every agent of the cluster. `None`: this collector alone.
    pub peers: Option<Arc<Peers>>,
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
        .route(
            "/api/v1/resolve",
            post(resolve_lines).layer(DefaultBodyLimit::max(resolve::MAX_BODY_BYTES)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .merge(crate::ui::router())
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { status("ok") }))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// `{"status": s}`.
fn status(s: &str) -> Json<StatusAnswer> {
    Json(StatusAnswer { status: s.into() })
}

/// A JSON error answer: `{"error": msg}` plus `"parameter"` when one is named.
fn error(code: StatusCode, msg: &str, parameter: Option<&str>) -> Response {
    (code, Json(ErrorAnswer::new(msg, parameter))).into_response()
}

/// A failed query as its JSON answer, with the status [`query`] maps it to.
fn query_error(e: &QueryError) -> Response {
    let code = e.http_status();
    let answer = match e {
        QueryError::Unanswered {
            not_found,
            failures,
            ..
        } => ErrorAnswer {
            not_found: Some(not_found.clone()),
            failures: Some(failures.clone()),
            ..ErrorAnswer::new(e.to_string(), None)
        },
        QueryError::Lookup(crate::registry::LookupError::NotConnected(n)) => {
            ErrorAnswer::new(format!("agent {n:?} is not connected"), e.parameter())
        }
        QueryError::Lookup(_) => ErrorAnswer::new(format!("lookup failed: {e}"), e.parameter()),
        e => ErrorAnswer::new(e.to_string(), e.parameter()),
    };
    (code, Json(answer)).into_response()
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
        status("ready").into_response()
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
        Box::new(query_error(&QueryError::Malformed(
            "malformed query string".into(),
        )))
    })
}

async fn connections(State(s): State<Arc<AppState>>, uri: axum::http::Uri, p: Params) -> Response {
    let params = match params_of(p, uri.query().map_or(0, str::len)) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let search = match query::search_from_params(&params, s.max_limit) {
        Ok(q) => q,
        Err(e) => return query_error(&e),
    };
    let res = query::run_search(
        s.store.clone(),
        &s.registry,
        s.peers.as_deref(),
        s.pods.as_deref(),
        &search,
    )
    .await;
    match res {
        Ok(res) => Json(answer::search(&res, &search.query, s.pods.as_deref())).into_response(),
        Err(e) => query_error(&e),
    }
}

async fn live_query(State(s): State<Arc<AppState>>, uri: axum::http::Uri, p: Params) -> Response {
    let params = match params_of(p, uri.query().map_or(0, str::len)) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let l = match Lookup::from_params(&params) {
        Ok(l) => l,
        Err(e) => return query_error(&e),
    };
    match query::lookup(
        s.store.clone(),
        s.registry.clone(),
        s.peers.clone(),
        &s.lookup,
        &l,
    )
    .await
    {
        Ok(LookupOutcome::Found {
            answer,
            zones_tried,
        }) => Json(LookupAnswer {
            zones_tried: Some(zones_tried),
            pod_fields: s
                .pods
                .as_ref()
                .map(|p| answer::pod_fields(&p.for_record(&answer.record, ctw_common::now_ns()))),
            ..LookupAnswer::new(&answer.record, &answer.node)
        })
        .into_response(),
        Ok(LookupOutcome::NotFound { asked, zones_tried }) => {
            let body = ErrorAnswer {
                asked: Some(asked),
                zones_tried: Some(zones_tried),
                ..ErrorAnswer::new(l.not_found_message(), None)
            };
            (StatusCode::NOT_FOUND, Json(body)).into_response()
        }
        Err(e) => query_error(&e),
    }
}

/// `POST /api/v1/resolve`: see [`resolve`].
async fn resolve_lines(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return query_error(&QueryError::TooLarge {
                parameter: "lines".into(),
                message: format!(
                    "request body larger than {} MiB: send the lines in batches",
                    resolve::MAX_BODY_BYTES >> 20
                ),
            })
        }
        Err(e) => return error(e.status(), &format!("cannot read the body: {e}"), None),
    };
    let req = match resolve::parse_request(&body) {
        Ok(r) => Arc::new(r),
        Err(e) => return query_error(&e),
    };
    drop(body);
    match resolve::resolve(
        s.store.clone(),
        s.registry.clone(),
        s.peers.clone(),
        s.pods.clone(),
        req,
    )
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => query_error(&e),
    }
}

async fn agents(State(s): State<Arc<AppState>>) -> Response {
    Json(AgentsAnswer {
        agents: peers::agents(&s.registry, s.peers.as_deref()),
    })
    .into_response()
}

//! The agent's single HTTP listener: `/metrics`, `/healthz`,
//! `/api/conntrack/query` and the query page `/`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ctw_common::api::{self, BadParam};
use ctw_common::ConnRecord;
use serde_json::json;

use crate::logfile::LogStats;
use crate::lookup::{LookupAnswer, LookupError, LookupQuery};
use crate::metrics::Metrics;
use crate::netlink::request::TupleDir;

/// How the API finds a live entry: netlink in production, a map in tests.
pub type LookupFn = dyn Fn(&LookupQuery) -> Result<Option<ConnRecord>, LookupError> + Send + Sync;

pub struct AppState {
    pub node: String,
    pub metrics: Metrics,
    pub log_stats: Arc<LogStats>,
    pub prometheus_enabled: bool,
    pub web_ui_enabled: bool,
    /// Cleared when the capture thread stops.
    pub capture_running: Arc<AtomicBool>,
    pub lookup: Arc<LookupFn>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("node", &self.node)
            .finish()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/conntrack/query", get(query))
        .with_state(state)
}

const PAGE: &str = include_str!("query.html");

async fn page(State(s): State<Arc<AppState>>) -> Response {
    if !s.web_ui_enabled {
        return error(
            StatusCode::NOT_FOUND,
            "the query page is off (web_ui.enabled: false)",
            None,
        );
    }
    Html(PAGE).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    if !s.prometheus_enabled {
        return error(
            StatusCode::NOT_FOUND,
            "metrics are off (prometheus.enabled: false)",
            None,
        );
    }
    s.metrics.sync_log_stats(&s.log_stats);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(s): State<Arc<AppState>>) -> Response {
    let capture = s.capture_running.load(Ordering::Relaxed);
    let log_ok = s.log_stats.healthy.load(Ordering::Relaxed);
    let code = if capture {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "status": if capture { "ok" } else { "capture stopped" },
            "node": s.node,
            "capture_running": capture,
            "log_healthy": log_ok,
        })),
    )
        .into_response()
}

/// The API's error answer (`common::api::ErrorAnswer`).
fn error(code: StatusCode, msg: &str, parameter: Option<&str>) -> Response {
    (code, Json(api::ErrorAnswer::new(msg, parameter))).into_response()
}

/// Parse the query string of `/api/conntrack/query`.
pub fn parse_query(params: &[(String, String)]) -> Result<LookupQuery, BadParam> {
    api::check_names(
        params,
        &[
            "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "tuple", "node", "zone",
        ],
    )?;
    let p = api::parse_live(params)?;
    Ok(LookupQuery {
        zone: p.zone.unwrap_or(0),
        protocol: p.protocol,
        tuple: p.tuple,
        dir: if p.reply_tuple {
            TupleDir::Reply
        } else {
            TupleDir::Orig
        },
    })
}

async fn query(
    State(s): State<Arc<AppState>>,
    params: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return error(StatusCode::BAD_REQUEST, "malformed query string", None);
    };
    if let Some((_, n)) = params.iter().find(|(k, _)| k == "node") {
        if n != &s.node {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("this agent is node {:?}, not {n:?}", s.node),
                Some("node"),
            );
        }
    }
    let q = match parse_query(&params) {
        Ok(q) => q,
        Err(b) => return error(StatusCode::BAD_REQUEST, &b.message, Some(&b.parameter)),
    };
    let lookup = s.lookup.clone();
    let res = tokio::task::spawn_blocking(move || lookup(&q)).await;
    match res {
        Ok(Ok(Some(r))) => Json(LookupAnswer::new(&r, &s.node)).into_response(),
        Ok(Ok(None)) => {
            let p = api::LiveQuery {
                protocol: q.protocol,
                tuple: q.tuple,
                reply_tuple: q.dir == TupleDir::Reply,
                zone: Some(q.zone),
            };
            error(StatusCode::NOT_FOUND, &api::not_found_message(&p), None)
        }
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("lookup failed: {e}"),
            None,
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("lookup task failed: {e}"),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use ctw_common::{EventKind, Protocol, TcpState, Tuple};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn entry() -> ConnRecord {
        ConnRecord {
            id: 7,
            status: ctw_common::status::ASSURED | ctw_common::status::SEEN_REPLY,
            tcp_state: Some(TcpState::Established),
            ..ConnRecord::new(
                EventKind::Recovered,
                0,
                Protocol::Tcp,
                Tuple::new(
                    "198.18.0.2".parse().unwrap(),
                    45678,
                    "198.19.0.2".parse().unwrap(),
                    443,
                ),
                Tuple::new(
                    "198.19.0.2".parse().unwrap(),
                    443,
                    "198.19.0.1".parse().unwrap(),
                    12345,
                ),
            )
        }
    }

    fn state() -> Arc<AppState> {
        // The entry exists in zones 0 and 7 (two entries, same tuples).
        let lookup: Arc<LookupFn> = Arc::new(|q: &LookupQuery| {
            let e = ConnRecord {
                zone: q.zone,
                ..entry()
            };
            let hit = match q.dir {
                TupleDir::Orig => q.tuple == e.orig,
                TupleDir::Reply => q.tuple == e.reply,
            };
            Ok((hit && matches!(q.zone, 0 | 7)).then_some(e))
        });
        Arc::new(AppState {
            node: "node-a".into(),
            metrics: Metrics::new(&[443]),
            log_stats: Arc::new(LogStats::default()),
            prometheus_enabled: true,
            web_ui_enabled: false,
            capture_running: Arc::new(AtomicBool::new(true)),
            lookup,
        })
    }

    async fn call(uri: &str) -> (StatusCode, String) {
        let resp = router(state())
            .oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let code = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (code, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn seed_query_shape() {
        let (code, body) =
            call("/api/conntrack/query?protocol=tcp&src_ip=198.18.0.2&src_port=45678&dst_ip=198.19.0.2&dst_port=443")
                .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "ESTABLISHED");
        assert_eq!(
            v["origin"],
            json!({"src": "198.18.0.2", "dst": "198.19.0.2", "src_port": 45678, "dst_port": 443})
        );
        assert_eq!(
            v["reply"],
            json!({"src": "198.19.0.2", "dst": "198.19.0.1", "src_port": 443, "dst_port": 12345})
        );
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["flags"], json!(["ASSURED"]));
    }

    #[tokio::test]
    async fn reply_tuple_lookup() {
        let (code, body) = call(
            "/api/conntrack/query?tuple=reply&src_ip=198.19.0.2&src_port=443&dst_ip=198.19.0.1&dst_port=12345",
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert!(body.contains("\"snat_port\":12345"), "{body}");
    }

    #[tokio::test]
    async fn zone_lookup() {
        let base = "/api/conntrack/query?tuple=reply&src_ip=198.19.0.2&src_port=443&dst_ip=198.19.0.1&dst_port=12345";
        // An empty parameter is absent, as every parameter (common::api).
        for (zone, want) in [("", 0), ("&zone=", 0), ("&zone=0", 0), ("&zone=7", 7)] {
            let (code, body) = call(&format!("{base}{zone}")).await;
            assert_eq!(code, StatusCode::OK, "{zone}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["zone"], want, "the answer names the entry's zone");
        }
        let (code, body) = call(&format!("{base}&zone=3")).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
        assert!(body.contains("zone 3"), "{body}");
        for bad in ["-1", "65536", "seven"] {
            let (code, body) = call(&format!("{base}&zone={bad}")).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["parameter"], "zone", "{body}");
        }
    }

    #[tokio::test]
    async fn missing_entry_is_404_json() {
        let (code, body) = call(
            "/api/conntrack/query?src_ip=198.18.0.2&src_port=1&dst_ip=198.19.0.2&dst_port=443",
        )
        .await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("no conntrack entry"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn bad_input_is_400_naming_the_parameter() {
        for (uri, param) in [
            ("/api/conntrack/query?src_ip=x&src_port=1&dst_ip=198.19.0.2&dst_port=443", "src_ip"),
            ("/api/conntrack/query?src_ip=198.18.0.2&dst_ip=198.19.0.2&dst_port=443", "src_port"),
            ("/api/conntrack/query?src_ip=198.18.0.2&src_port=0&dst_ip=198.19.0.2&dst_port=443", "src_port"),
            ("/api/conntrack/query?src_ip=198.18.0.2&src_port=1&dst_ip=198.19.0.2&dst_port=99999", "dst_port"),
            ("/api/conntrack/query?protocol=icmp&src_ip=198.18.0.2&src_port=1&dst_ip=198.19.0.2&dst_port=1", "protocol"),
            ("/api/conntrack/query?src_ip=198.18.0.2&src_port=1&dst_ip=fd00::1&dst_port=1", "dst_ip"),
            ("/api/conntrack/query?tuple=sideways&src_ip=198.18.0.2&src_port=1&dst_ip=198.19.0.2&dst_port=1", "tuple"),
            ("/api/conntrack/query?srcip=1&src_ip=198.18.0.2&src_port=1&dst_ip=198.19.0.2&dst_port=1", "srcip"),
            ("/api/conntrack/query?node=other&src_ip=198.18.0.2&src_port=1&dst_ip=198.19.0.2&dst_port=1", "node"),
        ] {
            let (code, body) = call(uri).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{uri}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["parameter"], param, "{uri}: {body}");
        }
    }

    #[tokio::test]
    async fn metrics_health_and_page() {
        let (code, body) = call("/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(
            body.contains("conntrack_new_connections_total{port=\"443\"} 0"),
            "{body}"
        );
        let (code, body) = call("/healthz").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("\"capture_running\":true"), "{body}");
        // web_ui.enabled is false in this state.
        let (code, _) = call("/").await;
        assert_eq!(code, StatusCode::NOT_FOUND);
    }
}

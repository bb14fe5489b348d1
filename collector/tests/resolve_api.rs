//! `POST /api/v1/resolve` through the router (no socket), over a `MemStore`
//! with known connections: resolved, port reused, ambiguous, not found,
//! unparsed and incomplete lines, formats, limits and the token.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ctw_collector::auth::Token;
use ctw_collector::config::LookupConfig;
use ctw_collector::http::{router, AppState};
use ctw_collector::metrics::Metrics;
use ctw_collector::registry::Registry;
use ctw_collector::store::{Gap, MemStore, RecordStore, StoredBatch};
use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "secret-token";
/// 2024-12-09T07:05:00Z.
const T0: u64 = 1_733_727_900;
const S: u64 = 1_000_000_000;
const NODE_IP: &str = "198.18.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conn(kind: EventKind, pod: &str, snat_port: u16, id: u32, t_ns: u64) -> ConnRecord {
    ConnRecord {
        id,
        status: 0xe,
        ..ConnRecord::new(
            kind,
            t_ns,
            Protocol::Tcp,
            Tuple::new(ip(pod), 40000, ip("198.19.0.2"), 80),
            Tuple::new(ip("198.19.0.2"), 80, ip(NODE_IP), snat_port),
        )
    }
}

fn store() -> Arc<MemStore> {
    let s = Arc::new(MemStore::default());
    let a = vec![
        // Pod .7 used node port 45000 from T0 to T0+10s, then pod .8 from T0+60s.
        conn(EventKind::New, "10.244.1.7", 45000, 1, T0 * S),
        conn(EventKind::Destroy, "10.244.1.7", 45000, 1, (T0 + 10) * S),
        conn(EventKind::New, "10.244.1.8", 45000, 2, (T0 + 60) * S),
        // Two open connections with the same node port (e.g. different
        // destinations): ambiguous.
        conn(EventKind::New, "10.244.1.9", 45001, 3, T0 * S),
        conn(EventKind::New, "10.244.1.10", 45001, 4, (T0 + 1) * S),
    ];
    s.append(StoredBatch {
        node: "node-a".into(),
        boot_id: "b".into(),
        seq: 1,
        records: a,
    })
    .unwrap();
    s.append(StoredBatch {
        node: "node-b".into(),
        boot_id: "b".into(),
        seq: 1,
        records: vec![conn(
            EventKind::New,
            "10.244.2.5",
            46000,
            5,
            (T0 + 1000) * S,
        )],
    })
    .unwrap();
    s.record_gap(Gap {
        node: "node-b".into(),
        from_ns: (T0 + 990) * S,
        to_ns: (T0 + 995) * S,
        reason: "kernel_drop".into(),
        count: 3,
    })
    .unwrap();
    s
}

fn app() -> axum::Router {
    let metrics = Metrics::new();
    router(Arc::new(AppState {
        store: store() as Arc<dyn RecordStore>,
        registry: Arc::new(Registry::new(metrics.clone())),
        metrics,
        token: Token::fixed(TOKEN),
        max_limit: 1000,
        lookup: LookupConfig::default(),
        ready: Arc::new(AtomicBool::new(true)),
    }))
}

async fn post_raw(body: Vec<u8>, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::post("/api/v1/resolve").header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let code = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{code}: not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (code, v)
}

async fn post(body: Value) -> (StatusCode, Value) {
    post_raw(serde_json::to_vec(&body).unwrap(), Some(TOKEN)).await
}

/// A default-format (combined + $remote_port) line at T0 + `secs`.
fn line(port: u16, secs: u64) -> String {
    let t = chrono_like(T0 + secs);
    format!(r#"{NODE_IP} - - [{t}] "GET /x HTTP/1.1" 200 3 "-" "curl/8.5.0 (x86_64) \"q\"" {port}"#)
}

/// `$time_local` in UTC for Unix seconds within 2024-12-09.
fn chrono_like(unix: u64) -> String {
    let day_start = T0 - (7 * 3600 + 5 * 60);
    let s = unix - day_start;
    format!(
        "09/Dec/2024:{:02}:{:02}:{:02} +0000",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[tokio::test]
async fn default_format_lines_resolve_to_pods() {
    let lines = vec![
        line(45000, 5),
        line(45000, 70),
        line(45001, 5),
        line(45999, 5),
        "garbage".to_string(),
        line(46000, 1000),
    ];
    let (code, v) = post(json!({ "lines": lines })).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 6);
    for (i, x) in r.iter().enumerate() {
        assert_eq!(x["line_no"], i + 1);
        assert_eq!(x["line"], lines[i].as_str());
    }
    // The first user of the port, alive at the line's time.
    assert_eq!(r[0]["status"], "resolved", "{:#}", r[0]);
    assert_eq!(r[0]["pod_ip"], "10.244.1.7");
    assert_eq!(r[0]["pod_port"], 40000);
    assert_eq!(r[0]["node"], "node-a");
    assert_eq!(r[0]["dst_ip"], "198.19.0.2");
    assert_eq!(r[0]["dst_port"], 80);
    assert_eq!(r[0]["remote_addr"], NODE_IP);
    assert_eq!(r[0]["remote_port"], 45000);
    assert_eq!(r[0]["time"], "2024-12-09T07:05:05.000Z");
    assert_eq!(r[0]["candidates"], 2);
    assert_eq!(r[0]["incomplete"], false);
    assert_eq!(r[0]["record"]["src_ip"], "10.244.1.7");
    assert_eq!(r[0]["record"]["alive_at"], true);
    assert_eq!(r[0]["record"]["end"], "2024-12-09T07:05:10.000Z");
    // The same node port reused later by another pod.
    assert_eq!(r[1]["status"], "resolved", "{:#}", r[1]);
    assert_eq!(r[1]["pod_ip"], "10.244.1.8");
    // Two connections alive at once: ambiguous, the newest first.
    assert_eq!(r[2]["status"], "ambiguous", "{:#}", r[2]);
    assert_eq!(r[2]["alive_candidates"], 2);
    assert_eq!(r[2]["pod_ip"], "10.244.1.10");
    assert_eq!(r[3]["status"], "not_found", "{:#}", r[3]);
    assert_eq!(r[3]["candidates"], 0);
    assert!(r[3].get("pod_ip").is_none());
    assert_eq!(r[4]["status"], "unparsed");
    assert!(
        r[4]["error"].as_str().unwrap().contains("remote_addr"),
        "{:#}",
        r[4]
    );
    // Loss inside the window: resolved, but flagged with the gap.
    assert_eq!(r[5]["status"], "resolved");
    assert_eq!(r[5]["node"], "node-b");
    assert_eq!(r[5]["incomplete"], true);
    assert_eq!(r[5]["gaps"][0]["reason"], "kernel_drop");
    assert_eq!(r[5]["gaps"][0]["node"], "node-b");
    assert_eq!(
        v["summary"],
        json!({"lines": 6, "resolved": 3, "not_found": 1, "ambiguous": 1, "not_observed": 0, "unparsed": 1, "incomplete": 1})
    );
}

#[tokio::test]
async fn custom_formats_and_at() {
    let fmt = "$remote_addr $remote_port $msec $server_port";
    let lines = [
        format!("{NODE_IP} 45000 {}.250 80", T0 + 3),
        format!("{NODE_IP} 45000 {}.000 80", T0 + 61),
    ];
    let (code, v) = post(json!({"lines": lines, "log_format": fmt, "window": "2m"})).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    assert_eq!(v["results"][0]["pod_ip"], "10.244.1.7");
    assert_eq!(v["results"][0]["time"], "2024-12-09T07:05:03.250Z");
    assert_eq!(v["results"][1]["pod_ip"], "10.244.1.8");
    assert_eq!(v["log_format"], fmt);

    // No time in the format: `at` gives it (number or string).
    let (code, v) = post(json!({"lines": [format!("{NODE_IP}:45000")], "log_format": "$remote_addr:$remote_port", "at": T0 + 2})).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    assert_eq!(v["results"][0]["pod_ip"], "10.244.1.7");
    let (code, v) = post(json!({"lines": ["x"], "log_format": "$remote_addr:$remote_port"})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(v["parameter"], "at", "{v:#}");
    let (code, v) = post(json!({"lines": ["x"], "at": "2024-12-09T07:05:00Z"})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(v["parameter"], "at", "{v:#}");
}

#[tokio::test]
async fn bad_requests_name_the_parameter() {
    for (body, param) in [
        (
            json!({"lines": ["x"], "log_format": "combined"}),
            "log_format",
        ),
        (
            json!({"lines": ["x"], "log_format": "$remote_addr $msec"}),
            "log_format",
        ),
        (json!({"lines": ["x"], "window": "soon"}), "window"),
        (json!({"lines": ["x"], "window": "2d"}), "window"),
        (json!({"lines": ["x"], "colour": "red"}), "colour"),
        (json!({"lines": "x"}), "lines"),
        (json!({"lines": [1]}), "lines"),
        (json!({}), "lines"),
    ] {
        let (code, v) = post(body.clone()).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}: {v:#}");
        assert_eq!(v["parameter"], param, "{body}: {v:#}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (code, v) = post_raw(b"not json".to_vec(), Some(TOKEN)).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("JSON"));
}

#[tokio::test]
async fn token_and_limits() {
    let body = serde_json::to_vec(&json!({"lines": [line(45000, 5)]})).unwrap();
    let (code, v) = post_raw(body.clone(), None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{v:#}");
    let (code, _) = post_raw(body, Some("wrong")).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);

    // Too many lines.
    let many = vec!["x"; ctw_collector::resolve::MAX_LINES + 1];
    let (code, v) = post(json!({ "lines": many })).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{v:#}");
    assert_eq!(v["parameter"], "lines");
    assert!(v["error"].as_str().unwrap().contains("20000"), "{v:#}");

    // Too large a body.
    let big = "y".repeat(ctw_collector::resolve::MAX_BODY_BYTES);
    let (code, v) = post(json!({ "lines": [big] })).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("MiB"), "{v:#}");

    // The full line count, well over the API's general 64 KiB body limit.
    let lines: Vec<String> = (0..ctw_collector::resolve::MAX_LINES)
        .map(|i| line(45000, i as u64 % 8))
        .collect();
    let (code, v) = post(json!({ "lines": lines })).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    assert_eq!(v["summary"]["resolved"], ctw_collector::resolve::MAX_LINES);
    assert_eq!(v["results"][19_999]["line_no"], 20_000);
}

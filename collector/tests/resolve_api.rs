//! `POST /api/v1/resolve` through the router (no socket), over a `MemStore`
//! with known connections: resolved, port reused, ambiguous, not found,
//! unparsed and incomplete lines, formats, limits and the token.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ctw_collector::http::router;
use ctw_collector::metrics::Metrics;
use ctw_collector::registry::Registry;
use ctw_collector::store::{MemStore, RecordStore, StoredBatch};
use ctw_common::{ConnRecord, EventKind, TcpState};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

mod support {
    //! The shared router fixture.
    #[path = "mem_api.rs"]
    pub mod mem_api;
}
use support::mem_api::{self, conn, NODE_IP, S, T0};

const TOKEN: &str = "secret-token";

fn app() -> axum::Router {
    router(mem_api::state(
        mem_api::store(vec![
            // Pod .7 used node port 45000 from T0 to T0+10s, then pod .8 from T0+60s.
            conn(EventKind::New, "10.244.1.7", 45000, 1, T0 * S),
            conn(EventKind::Destroy, "10.244.1.7", 45000, 1, (T0 + 10) * S),
            conn(EventKind::New, "10.244.1.8", 45000, 2, (T0 + 60) * S),
            // Two open connections with the same node port and server, in two
            // conntrack zones (in one zone the later would supersede the
            // earlier): ambiguous.
            ConnRecord {
                zone: 1,
                ..conn(EventKind::New, "10.244.1.9", 45001, 3, T0 * S)
            },
            conn(EventKind::New, "10.244.1.10", 45001, 4, (T0 + 1) * S),
        ]),
        TOKEN,
    ))
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

// ---------------------------------------------------------------------------
// Issue 11: candidates, the line's interval, skew, late records, not observed.

fn app_with(store: Arc<MemStore>, registry: Arc<Registry>) -> axum::Router {
    router(mem_api::state_with(store, registry, Metrics::new(), TOKEN))
}

async fn post_to(app: axum::Router, body: Value) -> (StatusCode, Value) {
    let req = Request::post("/api/v1/resolve")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let code = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap())
}

const MS: u64 = 1_000_000;
const FMT_RT: &str = "$remote_addr $remote_port $msec $request_time";

/// A line ending at `t_ns` after `rt_ms`, in [`FMT_RT`].
fn rt_line(port: u16, t_ns: u64, rt_ms: u64) -> String {
    let ms = t_ns / MS;
    format!(
        "{NODE_IP} {port} {}.{:03} {}.{:03}",
        ms / 1000,
        ms % 1000,
        rt_ms / 1000,
        rt_ms % 1000
    )
}

fn tcp(kind: EventKind, pod: &str, snat_port: u16, t_ns: u64, state: TcpState) -> ConnRecord {
    ConnRecord {
        tcp_state: Some(state),
        ..conn(kind, pod, snat_port, 0, t_ns)
    }
}

fn store_of(records: Vec<ConnRecord>) -> Arc<MemStore> {
    let s = Arc::new(MemStore::default());
    s.append(StoredBatch {
        node: "node-a".into(),
        boot_id: "b".into(),
        seq: 1,
        records,
    })
    .unwrap();
    s
}

#[tokio::test]
async fn keepalive_entries_of_one_connection_are_one_candidate() {
    use TcpState::*;
    // One connection from pod .7 port 40000, three entries: the first
    // expired while idle and was reaped by the next packet, which created
    // the second mid-stream (NEW in ESTABLISHED), and again. (The DESTROY
    // of the reaped entry is sent just before the NEW.)
    let s = store_of(vec![
        tcp(EventKind::New, "10.244.1.7", 43000, T0 * S, SynSent),
        tcp(
            EventKind::Destroy,
            "10.244.1.7",
            43000,
            (T0 + 8) * S - MS,
            Established,
        ),
        tcp(
            EventKind::New,
            "10.244.1.7",
            43000,
            (T0 + 8) * S,
            Established,
        ),
        tcp(
            EventKind::Destroy,
            "10.244.1.7",
            43000,
            (T0 + 16) * S - MS,
            Established,
        ),
        tcp(
            EventKind::New,
            "10.244.1.7",
            43000,
            (T0 + 16) * S,
            Established,
        ),
    ]);
    let app = app_with(s, Arc::new(Registry::new(Metrics::new())));
    let lines: Vec<String> = [0, 8, 16]
        .iter()
        .map(|t| rt_line(43000, (T0 + t) * S + 2 * MS, 1))
        .collect();
    let (code, v) = post_to(app, json!({"lines": lines, "log_format": FMT_RT})).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    for (i, r) in v["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["status"], "resolved", "{r:#}");
        assert_eq!(r["pod_ip"], "10.244.1.7");
        assert_eq!(r["candidates"], 1, "{r:#}");
        assert_eq!(r["alive_candidates"], 1, "{r:#}");
        assert_eq!(r["merged"], 3, "{r:#}");
        assert_eq!(r["match"], "alive");
        assert_eq!(r.get("midstream").is_some(), i > 0, "{r:#}");
        assert_eq!(r["record"]["midstream"] == true, i > 0, "{r:#}");
    }
}

#[tokio::test]
async fn skew_interval_and_late_records() {
    // Pod .7 held port 45000 until T0+10 s; pod .8 from T0+10.6 s.
    let s = store_of(vec![
        conn(EventKind::New, "10.244.1.7", 45000, 0, T0 * S),
        conn(EventKind::Destroy, "10.244.1.7", 45000, 0, (T0 + 10) * S),
        conn(
            EventKind::New,
            "10.244.1.8",
            45000,
            0,
            (T0 + 10) * S + 600 * MS,
        ),
        // Port 45100: one connection recorded 5 s after the line (late).
        conn(EventKind::New, "10.244.1.9", 45100, 0, (T0 + 35) * S),
        // Port 45200: one connection that ended long before the line.
        conn(EventKind::New, "10.244.1.10", 45200, 0, T0 * S),
        conn(EventKind::Destroy, "10.244.1.10", 45200, 0, (T0 + 1) * S),
        // Port 45400: one connection whose kernel start time is after the
        // line: exact, so not the line's.
        ConnRecord {
            start_ns: Some((T0 + 35) * S),
            ..conn(EventKind::New, "10.244.1.13", 45400, 0, (T0 + 35) * S)
        },
        // Port 45300: two connections recorded after the line.
        conn(EventKind::New, "10.244.1.11", 45300, 0, (T0 + 35) * S),
        conn(EventKind::Destroy, "10.244.1.11", 45300, 0, (T0 + 36) * S),
        conn(EventKind::New, "10.244.1.12", 45300, 0, (T0 + 40) * S),
    ]);
    let between = (T0 + 10) * S + 300 * MS;
    let lines = vec![
        // 0: between the two, no request time: within the skew of both.
        rt_line(45000, between, 0),
        // 1: the same end, but the request ran 0.5 s: only pod .7.
        rt_line(45000, between, 500),
        // 2: the only connection, recorded 5 s after the line.
        rt_line(45100, (T0 + 30) * S, 1),
        // 3: the only connection ended 29 s before the line.
        rt_line(45200, (T0 + 30) * S, 1),
        // 4: two connections after the line: one may be late, which?
        rt_line(45300, (T0 + 30) * S, 1),
        // 5: the only connection started after the line by kernel time.
        rt_line(45400, (T0 + 30) * S, 1),
    ];
    let app = || app_with(s.clone(), Arc::new(Registry::new(Metrics::new())));
    let (code, v) = post_to(app(), json!({"lines": lines, "log_format": FMT_RT})).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["status"], "ambiguous", "{:#}", r[0]);
    assert_eq!(r[0]["match"], "skew");
    assert_eq!(r[0]["alive_candidates"], 0);
    assert_eq!(r[0]["near_candidates"], 2);
    let ranked: Vec<&str> = r[0]["ranked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["pod_ip"].as_str().unwrap())
        .collect();
    // Pod .7 ended 300 ms before, pod .8 started 300 ms after: the newer
    // first on a tie.
    assert_eq!(ranked, ["10.244.1.8", "10.244.1.7"], "{:#}", r[0]);
    assert_eq!(r[0]["interval"]["from"], "2024-12-09T07:05:10.300Z");

    assert_eq!(r[1]["status"], "resolved", "{:#}", r[1]);
    assert_eq!(r[1]["pod_ip"], "10.244.1.7");
    assert_eq!(r[1]["interval"]["from"], "2024-12-09T07:05:09.800Z");

    assert_eq!(r[2]["status"], "resolved", "{:#}", r[2]);
    assert_eq!(r[2]["match"], "late");
    assert_eq!(r[2]["pod_ip"], "10.244.1.9");

    // A connection that ended before the line never carried it.
    assert_eq!(r[3]["status"], "not_found", "{:#}", r[3]);
    assert_eq!(r[3]["candidates"], 1);
    assert!(r[3].get("pod_ip").is_none());
    assert_eq!(r[3]["ranked"][0]["pod_ip"], "10.244.1.10");

    assert_eq!(r[4]["status"], "ambiguous", "{:#}", r[4]);
    assert_eq!(r[4]["match"], "late");
    assert_eq!(r[4]["pod_ip"], "10.244.1.11");

    assert_eq!(r[5]["status"], "not_found", "{:#}", r[5]);
    assert!(r[5].get("pod_ip").is_none());

    // No skew: line 0 has no connection within 0 s; one started after it
    // (maybe late), one ended before: still ambiguous, never one silently.
    let (_, v) = post_to(
        app(),
        json!({"lines": [lines[0].clone()], "log_format": FMT_RT, "skew": "0s"}),
    )
    .await;
    assert_eq!(v["results"][0]["status"], "ambiguous", "{v:#}");
    assert_eq!(v["results"][0]["match"], "late");
    // A wider skew changes nothing for line 2: its only candidate started
    // after it, whatever the tolerance.
    let (_, v) = post_to(
        app(),
        json!({"lines": [lines[2].clone()], "log_format": FMT_RT, "skew": "10s"}),
    )
    .await;
    assert_eq!(v["results"][0]["status"], "resolved", "{v:#}");
    assert_eq!(v["results"][0]["match"], "late");
    assert_eq!(v["skew_ms"], 10_000);
    // But pod .10, which ended 29 s before line 3, is within a 30 s skew:
    // the line's clock may be that far off; ambiguous, not resolved.
    let (_, v) = post_to(
        app(),
        json!({"lines": [lines[3].clone()], "log_format": FMT_RT, "skew": "30s"}),
    )
    .await;
    assert_eq!(v["results"][0]["status"], "ambiguous", "{v:#}");
    assert_eq!(v["results"][0]["match"], "skew");

    for bad in ["61s", "soon"] {
        let (code, v) = post_to(
            app(),
            json!({"lines": [lines[0].clone()], "log_format": FMT_RT, "skew": bad}),
        )
        .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{v:#}");
        assert_eq!(v["parameter"], "skew");
    }
}

#[tokio::test]
async fn a_late_record_is_not_taken_alone_when_the_window_has_a_gap() {
    let s = store_of(vec![conn(
        EventKind::New,
        "10.244.1.9",
        45100,
        0,
        (T0 + 35) * S,
    )]);
    s.record_gap(mem_api::kernel_drop("node-a", T0 + 20, T0 + 21, 1))
        .unwrap();
    let app = app_with(s, Arc::new(Registry::new(Metrics::new())));
    let (_, v) = post_to(
        app,
        json!({"lines": [rt_line(45100, (T0 + 30) * S, 1)], "log_format": FMT_RT}),
    )
    .await;
    let r = &v["results"][0];
    assert_eq!(r["status"], "ambiguous", "{r:#}");
    assert_eq!(r["incomplete"], true);
}

#[tokio::test]
async fn nothing_recorded_by_the_owning_node_is_not_observed() {
    let registry = Arc::new(Registry::new(Metrics::new()));
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let hello = ctw_collector::registry::HelloInfo {
        addresses: vec![NODE_IP.into(), "198.18.0.9".into()],
        boot_id: "b".into(),
        version: "test".into(),
        peer: None,
    };
    registry.connect("node-a", hello, tx);
    // node-a recorded port 45000 traffic from NODE_IP, nothing from .9.
    let s = store_of(vec![conn(EventKind::New, "10.244.1.7", 45000, 0, T0 * S)]);
    let app = app_with(s, registry);
    let lines = vec![
        format!("198.18.0.9 45000 {}.000 0.001", T0 + 1),
        rt_line(45999, (T0 + 1) * S, 1),
        format!("198.18.0.77 45000 {}.000 0.001", T0 + 1),
    ];
    let (code, v) = post_to(app, json!({"lines": lines, "log_format": FMT_RT})).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["status"], "not_observed", "{:#}", r[0]);
    assert_eq!(r[0]["node"], "node-a");
    assert!(r[0]["note"].as_str().unwrap().contains("node-a"));
    // The node sees its address's traffic: nothing matched is not_found.
    assert_eq!(r[1]["status"], "not_found", "{:#}", r[1]);
    // No agent owns the address.
    assert_eq!(r[2]["status"], "not_found", "{:#}", r[2]);
    assert!(r[2]["note"].as_str().unwrap().contains("no agent"));
    assert_eq!(v["summary"]["not_observed"], 1);
}

//! The collector's HTTP API through its full router, without a socket
//! (`tower::ServiceExt::oneshot`): every parameter of every endpoint,
//! accepted with a good value and refused with a bad one (400, naming it),
//! and snapshots of every answer's JSON (`expect-test`, keys sorted: a
//! changed field name, value or presence is a reviewed diff).
//!
//! The store is a `MemStore` with one known connection; one agent
//! (`node-a`, owning 198.18.0.1) is "connected" through the registry, and
//! a task plays its stream: it has the live entry of that connection and
//! nothing else. No root, no network.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use ctw_collector::http::router;
use ctw_collector::metrics::Metrics;
use ctw_collector::pods::{Input, PodHistory, PodState, Workload};
use ctw_collector::registry::{HeartbeatInfo, HelloInfo, Registry};
use ctw_collector::store::{Gap, MemStore, RecordStore, StoredBatch};
use ctw_common::{ConnRecord, EventKind, Protocol, TcpState, Tuple};
use ctw_proto::pb;
use expect_test::{expect, Expect};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;

mod support {
    //! The shared router fixture.
    #[path = "mem_api.rs"]
    pub mod mem_api;
}
use support::mem_api::ip;

const TOKEN: &str = "secret-token";
/// 2024-12-09T07:05:00Z, in Unix seconds and ns.
const T_S: u64 = 1_733_727_900;
const T: u64 = T_S * 1_000_000_000;
const S: u64 = 1_000_000_000;

/// pod 10.244.1.7:1000 -> 198.19.0.2:80, SNAT to 198.18.0.1:40001 on node-a.
fn record(kind: EventKind, at: u64) -> ConnRecord {
    let mut r = ConnRecord::new(
        kind,
        at,
        Protocol::Tcp,
        Tuple::new(ip("10.244.1.7"), 1000, ip("198.19.0.2"), 80),
        Tuple::new(ip("198.19.0.2"), 80, ip("198.18.0.1"), 40001),
    );
    r.tcp_state = Some(if kind == EventKind::New {
        TcpState::SynSent
    } else {
        TcpState::Close
    });
    r.start_ns = Some(T);
    r
}

struct Api {
    app: Router,
    _agent: tokio::task::JoinHandle<()>,
}

/// The router over a store with one connection (`T` to `T + 2 s`) and a
/// `kernel_drop` gap on node-b, and node-a's agent answering lookups.
async fn api() -> Api {
    api_with(None).await
}

/// [`api`] with a pod history (kubernetes on).
async fn api_with(pods: Option<Arc<PodHistory>>) -> Api {
    let store = Arc::new(MemStore::default());
    store
        .append(StoredBatch {
            node: "node-a".into(),
            boot_id: "b1".into(),
            seq: 1,
            records: vec![
                record(EventKind::New, T),
                record(EventKind::Destroy, T + 2 * S),
            ],
        })
        .expect("append");
    store
        .record_gap(Gap {
            node: "node-b".into(),
            from_ns: T + 60 * S,
            to_ns: T + 120 * S,
            reason: "kernel_drop".into(),
            count: 3,
        })
        .expect("gap");
    let metrics = Metrics::new();
    let registry = Arc::new(Registry::new(metrics.clone()));
    let (tx, mut rx) = mpsc::channel(8);
    let hello = HelloInfo {
        addresses: vec!["198.18.0.1".into()],
        boot_id: "b1".into(),
        version: "0.1.0".into(),
        peer: None,
    };
    let (token, _) = registry.connect("node-a", hello, tx);
    // node-a sends heartbeats (the agent's clock 5 s after T).
    registry.heartbeat(
        &token,
        &HeartbeatInfo {
            agent_time_ns: T + 5 * S,
            interval: std::time::Duration::from_secs(10),
            live_entries: 1,
            last_record_ns: Some(T + 2 * S),
        },
    );
    let r = registry.clone();
    // node-a's stream: the entry exists in zone 0 only, by either tuple.
    let agent = tokio::spawn(async move {
        while let Some(Ok(pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::Lookup(req)),
        })) = rx.recv().await
        {
            let live = record(EventKind::New, T);
            let want = if req.reply_tuple {
                live.reply
            } else {
                live.orig
            };
            let found = req.zone.unwrap_or(0) == 0
                && req.tuple.as_ref().and_then(|t| Tuple::try_from(t).ok()) == Some(want);
            let mut entry = record(EventKind::Recovered, T);
            entry.tcp_state = Some(TcpState::Established);
            entry.status = ctw_common::status::ASSURED | ctw_common::status::SEEN_REPLY;
            r.complete_lookup(
                &token,
                pb::LookupReply {
                    request_id: req.request_id,
                    found,
                    error: String::new(),
                    entry: found.then(|| (&entry).into()),
                    node: "node-a".into(),
                    pod: None,
                },
            );
        }
    });
    let mut state = support::mem_api::state_with(store, registry, metrics, TOKEN);
    Arc::get_mut(&mut state).expect("only owner").pods = pods;
    Api {
        app: router(state),
        _agent: agent,
    }
}

impl Api {
    async fn send(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .expect("request");
        let resp = self.app.clone().oneshot(req).await.expect("router answers");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.send(Method::GET, uri, None).await
    }

    async fn resolve(&self, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, "/api/v1/resolve", Some(body)).await
    }
}

/// Keys sorted: only names, values and presence show.
fn snapshot(v: &Value, want: Expect) {
    want.assert_eq(&serde_json::to_string_pretty(v).expect("json"));
}

fn assert_refused(what: &str, (code, v): (StatusCode, Value), parameter: &str) {
    assert_eq!(code, StatusCode::BAD_REQUEST, "{what}: {v:#}");
    assert_eq!(v["parameter"], parameter, "{what}: {v:#}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(msg.starts_with(parameter), "{what}: {msg}");
}

#[tokio::test]
async fn every_search_parameter_is_taken_and_checked() {
    let api = api().await;
    let at = (T_S + 1).to_string();
    let to = (T_S + 10).to_string();
    let good: [(&str, &str); 14] = [
        ("src_ip", "10.244.1.7"),
        ("src_port", "1000"),
        ("dst_ip", "198.19.0.2"),
        ("dst_port", "80"),
        ("snat_ip", "198.18.0.1"),
        ("snat_port", "40001"),
        ("node", "node-a"),
        ("protocol", "tcp"),
        ("from", "1733727899"),
        ("to", &to),
        ("at", &at),
        ("window", "5m"),
        ("limit", "5"),
        ("kind", "new"),
    ];
    let long_node = "n".repeat(254);
    let bad: [(&str, &str); 14] = [
        ("src_ip", "10.244.1"),
        ("src_port", "0"),
        ("dst_ip", "x"),
        ("dst_port", "70000"),
        ("snat_ip", "198.18.0.1.1"),
        ("snat_port", "x"),
        ("node", &long_node),
        ("protocol", "icmpx"),
        ("from", "yesterday"),
        ("to", "x"),
        ("at", "x"),
        ("window", "soon"),
        ("limit", "0"),
        ("kind", "NEW"),
    ];
    for ((name, value), (bad_name, bad_value)) in good.iter().zip(bad.iter()) {
        assert_eq!(name, bad_name);
        // `window` only goes with `at`.
        let extra = if *name == "window" {
            format!("&at={at}")
        } else {
            String::new()
        };
        let (code, v) = api
            .get(&format!("/api/v1/connections?{name}={value}{extra}"))
            .await;
        assert_eq!(code, StatusCode::OK, "{name}={value}: {v:#}");
        assert_eq!(v["total"], 1, "{name}={value} finds the connection: {v:#}");
        let refused = api
            .get(&format!("/api/v1/connections?{name}={bad_value}{extra}"))
            .await;
        assert_refused(&format!("{name}={bad_value}"), refused, name);
    }
    // The same filters excluding the connection find nothing.
    for (name, value) in [
        ("snat_port", "40002"),
        ("node", "node-b"),
        ("protocol", "udp"),
        ("kind", "recovered"),
    ] {
        let (code, v) = api
            .get(&format!("/api/v1/connections?{name}={value}"))
            .await;
        assert_eq!((code, &v["total"]), (StatusCode::OK, &json!(0)), "{name}");
    }
    // Rules between parameters, the same as over gRPC (query.rs).
    let refused = api
        .get(&format!("/api/v1/connections?at={at}&from=1733727899"))
        .await;
    assert_refused("at with from", refused, "at");
    assert_refused(
        "window without at",
        api.get("/api/v1/connections?window=5m").await,
        "window",
    );
    assert_refused(
        "from after to",
        api.get("/api/v1/connections?from=1733727999&to=1733727900")
            .await,
        "to",
    );
    assert_refused(
        "limit above max_limit",
        api.get("/api/v1/connections?limit=1001").await,
        "limit",
    );
    assert_refused(
        "unknown",
        api.get("/api/v1/connections?sport=1").await,
        "sport",
    );
    assert_refused(
        "twice",
        api.get("/api/v1/connections?node=a&node=b").await,
        "node",
    );
    // An empty parameter is absent (forms send empty fields).
    let (code, v) = api.get("/api/v1/connections?node=&snat_ip=").await;
    assert_eq!((code, &v["total"]), (StatusCode::OK, &json!(1)), "{v:#}");
    let (code, _) = api
        .get(&format!("/api/v1/connections?node={}", "n".repeat(5000)))
        .await;
    assert_eq!(code, StatusCode::URI_TOO_LONG);
}

#[tokio::test]
async fn search_answer_snapshot() {
    let api = api().await;
    let (code, v) = api
        .get(&format!(
            "/api/v1/connections?snat_ip=198.18.0.1&snat_port=40001&at={}.500&window=2m",
            T_S + 1
        ))
        .await;
    assert_eq!(code, StatusCode::OK);
    snapshot(
        &v,
        expect![[r#"
            {
              "at": "2024-12-09T07:05:01.500Z",
              "complete": false,
              "from": "2024-12-09T07:03:01.500Z",
              "gaps": [
                {
                  "count": 3,
                  "from": "2024-12-09T07:06:00.000Z",
                  "node": "node-b",
                  "reason": "kernel_drop",
                  "to": "2024-12-09T07:07:00.000Z"
                }
              ],
              "limit": 100,
              "records": [
                {
                  "alive_at": true,
                  "dst_ip": "198.19.0.2",
                  "dst_port": 80,
                  "duration_ms": 2000,
                  "end": "2024-12-09T07:05:02.000Z",
                  "end_kind": "destroy",
                  "end_state": "CLOSE",
                  "kind": "new",
                  "node": "node-a",
                  "protocol": "tcp",
                  "snat_ip": "198.18.0.1",
                  "snat_port": 40001,
                  "src_ip": "10.244.1.7",
                  "src_port": 1000,
                  "start": "2024-12-09T07:05:00.000Z",
                  "state": "SYN_SENT",
                  "ts": "2024-12-09T07:05:00.000Z"
                }
              ],
              "returned": 1,
              "to": "2024-12-09T07:07:01.500Z",
              "total": 1
            }"#]],
    );
    // A range with a gap: incomplete.
    let (_, v) = api
        .get("/api/v1/connections?from=1733727950&to=1733728000&limit=1")
        .await;
    snapshot(
        &v,
        expect![[r#"
        {
          "at": null,
          "complete": false,
          "from": "2024-12-09T07:05:50.000Z",
          "gaps": [
            {
              "count": 3,
              "from": "2024-12-09T07:06:00.000Z",
              "node": "node-b",
              "reason": "kernel_drop",
              "to": "2024-12-09T07:07:00.000Z"
            }
          ],
          "limit": 1,
          "records": [],
          "returned": 0,
          "to": "2024-12-09T07:06:40.000Z",
          "total": 0
        }"#]],
    );
}

fn lookup_uri(extra: &str) -> String {
    format!(
        "/api/v1/conntrack/query?tuple=reply&src_ip=198.19.0.2&src_port=80&dst_ip=198.18.0.1&dst_port=40001{extra}"
    )
}

#[tokio::test]
async fn every_lookup_parameter_is_taken_and_checked() {
    let api = api().await;
    for extra in ["", "&protocol=tcp", "&node=node-a", "&zone=0"] {
        let (code, v) = api.get(&lookup_uri(extra)).await;
        assert_eq!(code, StatusCode::OK, "{extra}: {v:#}");
        assert_eq!(v["node"], "node-a", "{v:#}");
    }
    // By the original tuple.
    let (code, v) = api
        .get("/api/v1/conntrack/query?tuple=orig&src_ip=10.244.1.7&src_port=1000&dst_ip=198.19.0.2&dst_port=80")
        .await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    let base = [
        ("src_ip", "198.19.0.2"),
        ("src_port", "80"),
        ("dst_ip", "198.18.0.1"),
        ("dst_port", "40001"),
    ];
    let query = |over: &[(&str, &str)]| {
        let mut p: Vec<(String, String)> = base
            .iter()
            .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.extend(over.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let q: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("/api/v1/conntrack/query?{}", q.join("&"))
    };
    for (name, bad) in [
        ("protocol", "icmpx"),
        ("src_ip", "x"),
        ("src_port", "0"),
        ("dst_ip", "fd00::1"),
        ("dst_port", "70000"),
        ("tuple", "both"),
        ("zone", "65536"),
        ("node", &"n".repeat(254)),
        ("ports", "1"),
    ] {
        let refused = api.get(&query(&[(name, bad)])).await;
        assert_refused(&format!("{name}={bad}"), refused, name);
    }
    for missing in ["src_ip", "src_port", "dst_ip", "dst_port"] {
        let uri = query(&[]).replace(&format!("{missing}="), "skip=");
        let (code, v) = api.get(&uri).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{missing}: {v:#}");
    }
    let (code, v) = api.get(&lookup_uri("&node=ghost")).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{v:#}");
    assert_eq!(v["parameter"], "node", "{v:#}");
}

#[tokio::test]
async fn lookup_answer_snapshots() {
    let api = api().await;
    let (code, v) = api.get(&lookup_uri("")).await;
    assert_eq!(code, StatusCode::OK);
    snapshot(
        &v,
        expect![[r#"
        {
          "flags": [
            "ASSURED"
          ],
          "id": 0,
          "mark": 0,
          "midstream": false,
          "node": "node-a",
          "origin": {
            "dst": "198.19.0.2",
            "dst_port": 80,
            "src": "10.244.1.7",
            "src_port": 1000
          },
          "protocol": "tcp",
          "reply": {
            "dst": "198.18.0.1",
            "dst_port": 40001,
            "src": "198.19.0.2",
            "src_port": 80
          },
          "snat_ip": "198.18.0.1",
          "snat_port": 40001,
          "status": "ESTABLISHED",
          "zone": 0,
          "zones_tried": [
            0
          ]
        }"#]],
    );
    // Not in zone 7: not found, saying whom and which zones it asked.
    let (code, v) = api.get(&lookup_uri("&zone=7")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    snapshot(
        &v,
        expect![[r#"
            {
              "asked": [
                "node-a"
              ],
              "error": "no conntrack entry with reply tuple tcp 198.19.0.2:80 -> 198.18.0.1:40001 (conntrack zone 7)",
              "zones_tried": [
                7
              ]
            }"#]],
    );
    let (code, v) = api.get(&lookup_uri("&node=ghost")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    snapshot(
        &v,
        expect![[r#"
        {
          "error": "agent \"ghost\" is not connected",
          "parameter": "node"
        }"#]],
    );
}

#[tokio::test]
async fn every_resolve_field_is_taken_and_checked() {
    let api = api().await;
    let line = format!("198.18.0.1 40001 {}.500", T_S + 1);
    let format = "$remote_addr $remote_port $msec";
    let good = [
        ("log_format", json!(format)),
        ("window", json!("2m")),
        ("skew", json!("2s")),
    ];
    for (name, value) in good {
        let mut body = json!({"lines": [line], "log_format": format});
        body[name] = value;
        let (code, v) = api.resolve(body).await;
        assert_eq!(code, StatusCode::OK, "{name}: {v:#}");
        assert_eq!(v["results"][0]["status"], "resolved", "{name}: {v:#}");
    }
    // `at`, for a format without a time.
    let (code, v) = api
        .resolve(json!({
            "lines": ["198.18.0.1 40001"],
            "log_format": "$remote_addr $remote_port",
            "at": format!("{}.500", T_S + 1),
        }))
        .await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    assert_eq!(v["results"][0]["status"], "resolved", "{v:#}");
    for (name, value) in [
        ("lines", json!("one line")),
        ("log_format", json!("$remote_addr")),
        ("window", json!("2d")),
        ("skew", json!("2m")),
        ("at", json!("1733727901")),
        ("extra", json!(1)),
    ] {
        let mut body = json!({"lines": [line], "log_format": format});
        body[name] = value;
        assert_refused(name, api.resolve(body).await, name);
    }
    assert_refused(
        "no lines",
        api.resolve(json!({"log_format": format})).await,
        "lines",
    );
    let (code, v) = api
        .send(Method::POST, "/api/v1/resolve", Some(json!([1])))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v:#}");
    snapshot(
        &v,
        expect![[r#"
        {
          "error": "body must be a JSON object"
        }"#]],
    );
}

#[tokio::test]
async fn agents_health_and_error_snapshots() {
    let api = api().await;
    let (code, mut v) = api.get("/api/v1/agents").await;
    assert_eq!(code, StatusCode::OK);
    // Times of this run.
    for k in ["connected_since", "last_seen", "last_heartbeat"] {
        assert!(v["agents"][0][k].is_string(), "{k}: {v:#}");
        v["agents"][0][k] = json!("<now>");
    }
    snapshot(
        &v,
        expect![[r#"
            {
              "agents": [
                {
                  "addresses": [
                    "198.18.0.1"
                  ],
                  "batches_stored": 0,
                  "boot_id": "b1",
                  "connected": true,
                  "connected_since": "<now>",
                  "connections": 1,
                  "conversion_errors": 0,
                  "disconnected_since": null,
                  "duplicates": 0,
                  "events_lost": 0,
                  "heartbeat_agent_time": "2024-12-09T07:05:05.000Z",
                  "heartbeat_interval_seconds": 10.0,
                  "lag_seconds": null,
                  "last_batch_at": null,
                  "last_batch_boot_id": null,
                  "last_batch_seq": null,
                  "last_event_at": "2024-12-09T07:05:02.000Z",
                  "last_heartbeat": "<now>",
                  "last_seen": "<now>",
                  "live_entries": 1,
                  "loss_reports": 0,
                  "node": "node-a",
                  "peer": null,
                  "records_stored": 0,
                  "version": "0.1.0"
                }
              ]
            }"#]],
    );
    let (_, v) = api.get("/healthz").await;
    snapshot(
        &v,
        expect![[r#"
        {
          "status": "ok"
        }"#]],
    );
    let (_, v) = api.get("/readyz").await;
    snapshot(
        &v,
        expect![[r#"
        {
          "status": "ready"
        }"#]],
    );
    let req = Request::builder()
        .uri("/api/v1/agents")
        .body(Body::empty())
        .expect("request");
    let resp = api.app.clone().oneshot(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    snapshot(
        &v,
        expect![[r#"
        {
          "error": "missing or wrong bearer token"
        }"#]],
    );
    let (_, v) = api.get("/api/v1/connections?limit=0").await;
    snapshot(
        &v,
        expect![[r#"
        {
          "error": "limit: 0 must be 1-1000",
          "parameter": "limit"
        }"#]],
    );
    // Not ready (storage or gRPC not up yet): 503.
    let state_off = support::mem_api::state(Arc::new(MemStore::default()), TOKEN);
    state_off
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let req = Request::builder()
        .uri("/readyz")
        .body(Body::empty())
        .expect("request");
    let resp = router(state_off).oneshot(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    snapshot(
        &v,
        expect![[r#"
            {
              "error": "starting"
            }"#]],
    );
}

/// The pod history of [`answers_name_pods_when_kubernetes_is_on`]: the
/// connection's source 10.244.1.7 held by `payments/checkout-a` (Deployment
/// `checkout` through ReplicaSet `checkout-7d9f`) from `T - 60 s`, deleted at
/// `T + 1 s`; `payments/checkout-b` has it from `T + 1.5 s`, while the
/// connection (`T` to `T + 2 s`) is still alive.
fn pods() -> Arc<PodHistory> {
    let h = PodHistory::in_memory(u64::MAX);
    h.apply(Input::ListBegin, T - 120 * S);
    h.apply(Input::ListDone, T - 120 * S);
    h.apply(
        Input::Owner {
            kind: "ReplicaSet".into(),
            namespace: "payments".into(),
            name: "checkout-7d9f".into(),
            owner: Some(Workload {
                kind: "Deployment".into(),
                name: "checkout".into(),
            }),
        },
        T - 100 * S,
    );
    let pod = |uid: u128, name: &str| PodState {
        uid,
        namespace: "payments".into(),
        name: name.into(),
        owner: Some(Workload {
            kind: "ReplicaSet".into(),
            name: "checkout-7d9f".into(),
        }),
        node: "node-a".into(),
        host_network: false,
        ips: vec![ip("10.244.1.7")],
        terminal: false,
        start_ns: None,
    };
    h.apply(Input::Applied(pod(0xa, "checkout-a")), T - 60 * S);
    h.apply(Input::Deleted(pod(0xa, "checkout-a")), T + S);
    h.apply(Input::Applied(pod(0xb, "checkout-b")), T + 3 * S / 2);
    Arc::new(h)
}

/// Only the pod fields of an answer.
fn pod_fields(v: &Value) -> Value {
    Value::Object(
        v.as_object()
            .expect("an object")
            .iter()
            .filter(|(k, _)| k.starts_with("pod") && *k != "pod_ip" && *k != "pod_port")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

#[tokio::test]
async fn answers_name_pods_when_kubernetes_is_on() {
    // Off: no pod field anywhere (today's answers).
    let off = api().await;
    let search = format!(
        "/api/v1/connections?snat_ip=198.18.0.1&snat_port=40001&at={}.500&window=2m",
        T_S + 1
    );
    let (_, v) = off.get(&search).await;
    assert_eq!(pod_fields(&v["records"][0]), json!({}), "{v:#}");
    let (_, v) = off.get(&lookup_uri("")).await;
    assert_eq!(pod_fields(&v), json!({}), "{v:#}");

    let api = api_with(Some(pods())).await;
    // A search hit: the pod as of the connection's start; the address
    // changed hands before its end, so both holders are listed.
    let (code, v) = api.get(&search).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    snapshot(
        &pod_fields(&v["records"][0]),
        expect![[r#"
        {
          "pod": {
            "from": "2024-12-09T07:04:00.000Z",
            "name": "checkout-a",
            "namespace": "payments",
            "node": "node-a",
            "to": "2024-12-09T07:05:01.000Z",
            "uid": "00000000-0000-0000-0000-00000000000a",
            "workload": {
              "kind": "Deployment",
              "name": "checkout"
            }
          },
          "pod_holders": [
            {
              "from": "2024-12-09T07:04:00.000Z",
              "name": "checkout-a",
              "namespace": "payments",
              "node": "node-a",
              "to": "2024-12-09T07:05:01.000Z",
              "uid": "00000000-0000-0000-0000-00000000000a",
              "workload": {
                "kind": "Deployment",
                "name": "checkout"
              }
            },
            {
              "from": "2024-12-09T07:05:01.500Z",
              "name": "checkout-b",
              "namespace": "payments",
              "node": "node-a",
              "uid": "00000000-0000-0000-0000-00000000000b",
              "workload": {
                "kind": "Deployment",
                "name": "checkout"
              }
            }
          ],
          "pod_ip_reused": true,
          "pod_verified": true
        }"#]],
    );
    // A resolved line: the same pod, on the line and on its record.
    let line = format!("198.18.0.1 40001 {}.500", T_S + 1);
    let (code, v) = api
        .resolve(json!({"lines": [line], "log_format": "$remote_addr $remote_port $msec"}))
        .await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    let r = &v["results"][0];
    assert_eq!(r["status"], "resolved", "{r:#}");
    assert_eq!(r["pod"]["name"], "checkout-a", "{r:#}");
    assert_eq!(r["record"]["pod"]["name"], "checkout-a", "{r:#}");
    assert_eq!(r["pod_ip_reused"], true, "{r:#}");
    // A live lookup: the entry's pod as of its start, up to now.
    let (code, v) = api.get(&lookup_uri("")).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    assert_eq!(v["pod"]["name"], "checkout-a", "{v:#}");
    assert_eq!(
        v["pod"]["workload"],
        json!({"kind": "Deployment", "name": "checkout"})
    );
    assert_eq!(v["pod_verified"], true, "{v:#}");
    assert_eq!(v["pod_ip_reused"], true, "{v:#}");
}

#[tokio::test]
async fn search_by_namespace_pod_and_workload_goes_through_the_pod_history() {
    let uri = |q: &str| {
        format!(
            "/api/v1/connections?{q}&from={}&to={}",
            T_S - 600,
            T_S + 600
        )
    };
    // Off: refused, naming the parameter (no history to answer from).
    let off = api().await;
    assert_refused(
        "namespace without a history",
        off.get(&uri("namespace=payments")).await,
        "namespace",
    );
    let api = api_with(Some(pods())).await;
    // The connection started at T, while checkout-a held 10.244.1.7.
    for q in [
        "namespace=payments",
        "pod=checkout-a",
        "namespace=payments&pod=checkout-a",
        "workload=checkout",
        "workload=Deployment/checkout",
        "namespace=payments&workload=Deployment/checkout&dst_port=80",
    ] {
        let (code, v) = api.get(&uri(q)).await;
        assert_eq!(code, StatusCode::OK, "{q}: {v:#}");
        assert_eq!(v["total"], 1, "{q}: {v:#}");
        assert_eq!(v["records"][0]["src_ip"], "10.244.1.7", "{q}: {v:#}");
        assert_eq!(v["records"][0]["pod"]["name"], "checkout-a", "{q}: {v:#}");
    }
    // checkout-b got the address after the connection started: not its.
    for q in [
        "pod=checkout-b",
        "namespace=other",
        "workload=StatefulSet/checkout",
        "pod=checkout-a&dst_port=443",
    ] {
        let (code, v) = api.get(&uri(q)).await;
        assert_eq!(code, StatusCode::OK, "{q}: {v:#}");
        assert_eq!(v["total"], 0, "{q}: {v:#}");
    }
    // A range outside A's tenure finds nothing.
    let (_, v) = api
        .get(&format!(
            "/api/v1/connections?pod=checkout-a&from={}&to={}",
            T_S + 100,
            T_S + 200
        ))
        .await;
    assert_eq!(v["total"], 0, "{v:#}");
    assert_refused(
        "a workload of three parts",
        api.get(&uri("workload=a/b/c")).await,
        "workload",
    );
    assert_refused(
        "a long namespace",
        api.get(&uri(&format!("namespace={}", "n".repeat(400))))
            .await,
        "namespace",
    );
}

#[tokio::test]
async fn search_by_pod_is_incomplete_where_the_pod_history_may_miss_tenures() {
    let h = pods();
    let api = api_with(Some(h.clone())).await;
    let uri =
        |from: u64, to: u64| format!("/api/v1/connections?pod=checkout-a&from={from}&to={to}");
    // The history is complete over the range (its first list was at
    // T - 120 s) and no store or agent gap is in it: complete.
    let (code, v) = api.get(&uri(T_S - 100, T_S + 30)).await;
    assert_eq!(code, StatusCode::OK, "{v:#}");
    assert_eq!(
        (v["total"].clone(), v["complete"].clone()),
        (json!(1), json!(true)),
        "{v:#}"
    );
    // Before the first list the history knows no pods.
    let (_, v) = api.get(&uri(T_S - 600, T_S + 30)).await;
    assert_eq!(v["complete"], false, "{v:#}");
    assert_eq!(v["gaps"][0]["reason"], "pod_history_gap", "{v:#}");
    // The watch breaks at T + 10 s and re-lists at T + 20 s: a pod's
    // tenure may be missing there, so the same search is not complete.
    h.apply(Input::Broken, T + 10 * S);
    h.apply(Input::ListBegin, T + 20 * S);
    h.apply(Input::ListDone, T + 20 * S);
    let (_, v) = api.get(&uri(T_S - 100, T_S + 30)).await;
    assert_eq!(v["complete"], false, "{v:#}");
    assert_eq!(v["total"], 1, "{v:#}");
    let gaps = v["gaps"].as_array().expect("gaps");
    assert_eq!(gaps.len(), 1, "{v:#}");
    assert_eq!(
        (
            gaps[0]["reason"].clone(),
            gaps[0]["node"].clone(),
            gaps[0]["count"].clone()
        ),
        (json!("pod_history_gap"), json!("*"), json!(0)),
        "{v:#}"
    );
    let at = ctw_common::api::format_time;
    assert_eq!(gaps[0]["from"], json!(at(T + 10 * S)), "{v:#}");
    assert_eq!(gaps[0]["to"], json!(at(T + 20 * S)), "{v:#}");
}

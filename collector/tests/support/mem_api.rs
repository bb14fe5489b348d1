//! Shared by the tests that drive the collector's HTTP router over a
//! `MemStore` (`collector/tests/{resolve_api,api_router,ui}.rs` and `ctw`'s
//! `cli/tests/cli.rs`, which include this file with `#[path]`): the known
//! connections' records, the store holding them, and the router's state.
//!
//! The store: node-a's records as the test gives them, node-b's one
//! connection (pod 10.244.2.5, SNAT port 46000, at `T0 + 1000 s`) and a
//! `kernel_drop` gap on node-b from `T0 + 990 s` to `T0 + 995 s`.

// Each test uses part of it.
#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ctw_collector::auth::Token;
use ctw_collector::config::LookupConfig;
use ctw_collector::http::AppState;
use ctw_collector::metrics::Metrics;
use ctw_collector::registry::Registry;
use ctw_collector::store::{Gap, MemStore, RecordStore, StoredBatch};
use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};

/// 2024-12-09T07:05:00Z, Unix seconds.
pub const T0: u64 = 1_733_727_900;
pub const S: u64 = 1_000_000_000;
/// The SNAT address of every known connection (node-a's and node-b's).
pub const NODE_IP: &str = "198.18.0.1";

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

/// A TCP record of pod `pod`:40000 -> 198.19.0.2:80, SNATed to
/// `NODE_IP`:`snat_port`, with conntrack id `id`, at `t_ns`
/// (`status` 0xe: SEEN_REPLY, ASSURED, CONFIRMED).
pub fn conn(kind: EventKind, pod: &str, snat_port: u16, id: u32, t_ns: u64) -> ConnRecord {
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

/// The store: `node_a`'s records, node-b's connection and gap.
pub fn store(node_a: Vec<ConnRecord>) -> Arc<MemStore> {
    let s = Arc::new(MemStore::default());
    let batch = |node: &str, records| StoredBatch {
        node: node.into(),
        boot_id: "b".into(),
        seq: 1,
        records,
    };
    s.append(batch("node-a", node_a)).expect("append");
    s.append(batch(
        "node-b",
        vec![conn(
            EventKind::New,
            "10.244.2.5",
            46000,
            5,
            (T0 + 1000) * S,
        )],
    ))
    .expect("append");
    s.record_gap(kernel_drop("node-b", T0 + 990, T0 + 995, 3))
        .expect("gap");
    s
}

/// A `kernel_drop` gap of `count` events on `node` from `from_s` to `to_s`
/// (Unix seconds).
pub fn kernel_drop(node: &str, from_s: u64, to_s: u64, count: u64) -> Gap {
    Gap {
        node: node.into(),
        from_ns: from_s * S,
        to_ns: to_s * S,
        reason: "kernel_drop".into(),
        count,
    }
}

/// The router's state over `store`, with `registry` (and its `metrics`),
/// bearer token `token`, `max_limit` 1000, default lookups, ready.
pub fn state_with(
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    metrics: Metrics,
    token: &str,
) -> Arc<AppState> {
    Arc::new(AppState {
        store,
        registry,
        metrics,
        token: Token::fixed(token),
        max_limit: 1000,
        lookup: LookupConfig::default(),
        ready: Arc::new(AtomicBool::new(true)),
        pods: None,
        peers: None,
    })
}

/// [`state_with`] and a registry without agents.
pub fn state(store: Arc<dyn RecordStore>, token: &str) -> Arc<AppState> {
    let metrics = Metrics::new();
    state_with(
        store,
        Arc::new(Registry::new(metrics.clone())),
        metrics,
        token,
    )
}

//! End to end with `storage.backend: clickhouse`, in network namespaces:
//! two nodes with pods behind masquerade, nginx in the server namespace,
//! the collector and a private ClickHouse server (Debian's 18.16) in their
//! own namespace, the real agents. The right answers come from nginx's
//! access log (the line's address and port) and the pod each request was
//! sent from. One test uses a cluster (a private ZooKeeper and 2 shards ×
//! 2 replicas) instead. Needs root and `clickhouse-server` (and
//! `zookeeperd` for the cluster).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use ctw_testkit::clickhouse::{self, ClickHouse};
use ctw_testkit::cluster::Cluster;
use ctw_testkit::collector::Collector;
use ctw_testkit::{require_root, wait_for, Topology};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
/// How long the outage's lines may take: the store retries a failed
/// insert for `timeout_ms` (20 s here), longer than the server's restart;
/// a batch it gave up on would come again after the agent's ack timeout
/// (60 s, `uplink::ACK_TIMEOUT`).
const RESEND_WAIT: Duration = Duration::from_secs(30);

/// The ClickHouse server(s) first: stopped before the namespaces go.
struct ChCluster<S = ClickHouse> {
    ch: S,
    c: Cluster,
}

/// Like `Cluster::start`, with the collector storing in ClickHouse.
fn start() -> Option<ChCluster> {
    start_timeout(20_000)
}

/// [`start`] with the store's `timeout_ms` (how long it retries an insert).
fn start_timeout(timeout_ms: u64) -> Option<ChCluster> {
    if !clickhouse::available() {
        ctw_testkit::skip("needs clickhouse-server (apt-get install clickhouse-server)");
        return None;
    }
    start_with(|ns| {
        let ch = ClickHouse::start_in(Some(ns));
        let storage = format!(
            "  backend: clickhouse\n  url: {}\n  database: ctw\n  connect_retry_ms: 200\n  timeout_ms: {timeout_ms}\n",
            ch.url()
        );
        (ch, storage)
    })
}

/// [`start`] with the servers and `storage` section that `servers` starts
/// in the collector's namespace.
fn start_with<S>(servers: impl FnOnce(&str) -> (S, String)) -> Option<ChCluster<S>> {
    if !require_root() {
        return None;
    }
    let pods = 2;
    let mut topo = Topology::new(pods);
    topo.add_node(pods);
    let (col_ns, col_addr) = topo.add_host("c");
    let nginx = topo.start_nginx(&[80]);
    let (ch, storage) = servers(&col_ns);
    let collector = Collector::start_with_storage(&mut topo, &col_ns, col_addr, Some(&storage), "");
    let mut agents = Vec::new();
    for i in 0..2 {
        let name = format!("node-{i}");
        let spool = topo.tmp_dir().join(format!("spool-{i}"));
        let yaml = collector.agent_yaml(&name, &spool, "");
        agents.push(ctw_testkit::agent::Agent::start_on(
            &mut topo,
            i,
            &name,
            &[80],
            &yaml,
        ));
    }
    collector.wait_connected(&["node-0", "node-1"]);
    Some(ChCluster {
        ch,
        c: Cluster {
            topo,
            collector,
            nginx,
            agents,
        },
    })
}

fn resolve(c: &Cluster, lines: &[String]) -> (u16, Value) {
    c.collector.post_json(
        "/api/v1/resolve",
        &json!({ "lines": lines, "log_format": "$remote_addr $remote_port $msec $server_port" }),
        c.topo.tmp_dir(),
    )
}

/// Wait until every line resolves, then check each against its pod.
fn assert_resolved(c: &Cluster, sent: &[(String, Ipv4Addr, String)], wait: Duration) {
    let lines: Vec<String> = sent.iter().map(|s| s.0.clone()).collect();
    let mut tries = 0;
    let v = wait_for(wait, "every line resolved", || {
        let (code, v) = resolve(c, &lines);
        tries += 1;
        if tries % 500 == 0 {
            let bad: Vec<&Value> = v["results"]
                .as_array()
                .map(|a| a.iter().filter(|r| r["status"] != "resolved").collect())
                .unwrap_or_default();
            eprintln!("not yet resolved ({code}): {} {bad:?}", v["summary"]);
        }
        (code == 200 && v["summary"]["resolved"] == lines.len()).then_some(v)
    });
    for (i, (line, pod, node)) in sent.iter().enumerate() {
        let r = &v["results"][i];
        assert_eq!(r["status"], "resolved", "{line}: {r:#}");
        assert_eq!(r["pod_ip"], pod.to_string(), "{line}: {r:#}");
        assert_eq!(r["node"], node.as_str(), "{line}: {r:#}");
        assert_eq!(r["candidates"], 1, "stored once: {line}: {r:#}");
    }
}

/// Every nginx line resolves through the ClickHouse store; the collector
/// killed with SIGKILL and started again (no local state) answers the same
/// at once, and the agents' replays after the reconnect are not stored
/// twice.
#[test]
fn lines_resolve_through_clickhouse_also_after_a_collector_kill() {
    let Some(mut x) = start() else { return };
    let sent = x.c.requests(2);
    assert_resolved(&x.c, &sent, WAIT);
    x.c.collector.kill9(&mut x.c.topo);
    x.c.collector.restart(&mut x.c.topo);
    let lines: Vec<String> = sent.iter().map(|s| s.0.clone()).collect();
    let (code, v) = resolve(&x.c, &lines);
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(v["summary"]["resolved"], lines.len(), "{v:#}");
    x.c.collector.wait_connected(&["node-0", "node-1"]);
    let more = x.c.requests(1);
    assert_resolved(
        &x.c,
        &sent.iter().chain(&more).cloned().collect::<Vec<_>>(),
        WAIT,
    );
    // A batch whose insert the killed collector had sent may commit after
    // the replay's ledger lookup (the crash window, README): stored twice
    // at most, answered once (checked above); never more.
    let most: u64 =
        x.ch.must(
            "SELECT max(c) FROM (SELECT count() AS c FROM ctw.ctw_batches \
             GROUP BY node, boot_id, seq)",
        )
        .trim()
        .parse()
        .unwrap();
    assert!(most <= 2, "a batch in the ledger {most} times");
}

/// A ClickHouse cluster of 2 shards × 2 replicas (and a ZooKeeper) behind
/// the collector (`storage.cluster`, quorum 2 by default). One replica
/// killed (SIGKILL) while requests arrive: the shard's inserts fail
/// (nothing is acked, the agents keep their batches); once it is back
/// every line resolves to one connection, and every replica of a shard
/// holds the same rows, none twice.
#[test]
fn lines_resolve_through_a_replicated_sharded_cluster_with_a_replica_killed() {
    if !clickhouse::cluster_available() {
        ctw_testkit::skip(
            "needs clickhouse-server and zookeeperd (apt-get install clickhouse-server zookeeperd)",
        );
        return;
    }
    let Some(mut x) = start_with(|ns| {
        let chc = clickhouse::Cluster::start_in(Some(ns), 2, 2);
        let storage = format!(
            "  backend: clickhouse\n  url: {}\n  database: ctw\n  connect_retry_ms: 200\n  \
             timeout_ms: 20000\n  cluster:\n    name: {}\n",
            chc.servers[0].url(),
            clickhouse::CLUSTER
        );
        (chc, storage)
    }) else {
        return;
    };
    let before = x.c.requests(1);
    assert_resolved(&x.c, &before, WAIT);
    x.ch.server(0, 1).stop();
    let mut during = x.c.requests(2);
    // Down until an insert failed (quorum not reached: nothing acked).
    let failed = || {
        x.c.collector
            .metric_sum("ctw_collector_batches_failed_total")
    };
    wait_for(
        Duration::from_secs(120),
        "an insert refused for want of quorum",
        || (failed() > 0.0).then_some(()),
    );
    during.extend(x.c.requests(1));
    x.ch.server(0, 1).restart();
    let all: Vec<_> = before.iter().chain(&during).cloned().collect();
    // The agents resend what was not acked after their ack timeout (60 s).
    assert_resolved(&x.c, &all, Duration::from_secs(150));
    let rows = |ch: &ClickHouse, sql: &str| -> u64 { ch.must(sql).trim().parse().unwrap() };
    let mut total = 0;
    for shard in 0..2 {
        let counts: Vec<(u64, u64)> = (0..2)
            .map(|r| {
                let ch = x.ch.server(shard, r);
                wait_for(WAIT, "the replica caught up", || {
                    ch.query("SYSTEM SYNC REPLICA ctw.ctw_records_local").ok()
                });
                (
                    rows(ch, "SELECT count() FROM ctw.ctw_records_local"),
                    rows(
                        ch,
                        "SELECT count() FROM (SELECT DISTINCT * FROM ctw.ctw_records_local)",
                    ),
                )
            })
            .collect();
        assert_eq!(counts[0], counts[1], "shard {shard}: replicas differ");
        assert_eq!(counts[0].0, counts[0].1, "shard {shard}: a row twice");
        total += counts[0].0;
    }
    let through = rows(&x.ch.servers[0], "SELECT count() FROM ctw.ctw_records");
    assert_eq!(total, through);
    assert!(
        total >= all.len() as u64,
        "{total} rows for {} lines",
        all.len()
    );
}

/// ClickHouse killed mid-stream: appends fail, nothing is acked, the
/// agents keep their batches; once the server is back (within the store's
/// retries) every line of the outage resolves, each to one connection.
#[test]
fn clickhouse_down_mid_stream_loses_and_doubles_nothing() {
    let Some(mut x) = start() else { return };
    let before = x.c.requests(1);
    assert_resolved(&x.c, &before, WAIT);
    x.ch.stop();
    let during = x.c.requests(2);
    // Nothing of the outage is answered while the server is down.
    let lines: Vec<String> = during.iter().map(|s| s.0.clone()).collect();
    let (code, _) = resolve(&x.c, &lines);
    assert_ne!(code, 200, "searches must fail while ClickHouse is down");
    x.ch.restart();
    assert_resolved(
        &x.c,
        &before.iter().chain(&during).cloned().collect::<Vec<_>>(),
        RESEND_WAIT,
    );
    let lines_set: HashSet<&str> = lines.iter().map(String::as_str).collect();
    assert_eq!(lines_set.len(), lines.len());
}

/// A batch the store gave up on (ClickHouse down longer than the store's
/// 1 s of retries) ends the agent's stream, so the agent reconnects and
/// resends it as soon as the server is back, not after its 60 s ack
/// timeout: every line of the outage resolves within 30 s of the restart,
/// each to one connection, and the failed batch was counted.
#[test]
fn a_batch_the_store_refused_is_resent_at_once() {
    let Some(mut x) = start_timeout(1_000) else {
        return;
    };
    let before = x.c.requests(1);
    assert_resolved(&x.c, &before, WAIT);
    x.ch.stop();
    let during = x.c.requests(2);
    let failed = || {
        x.c.collector
            .metric_sum("ctw_collector_batches_failed_total")
    };
    wait_for(WAIT, "an insert given up on", || {
        (failed() > 0.0).then_some(())
    });
    x.ch.restart();
    // Within half the agent's ack timeout (uplink::ACK_TIMEOUT, 60 s): the
    // resend came from the ended stream, not from the timeout.
    assert_resolved(
        &x.c,
        &before.iter().chain(&during).cloned().collect::<Vec<_>>(),
        RESEND_WAIT,
    );
}

/// ClickHouse down when the collector starts: the collector runs and
/// answers `/readyz` 503 (not ready), retrying; once the server is up it
/// becomes ready by itself and stores.
#[test]
fn clickhouse_down_at_start_collector_not_ready_until_it_is_up() {
    if !require_root() {
        return;
    }
    if !clickhouse::available() {
        ctw_testkit::skip("needs clickhouse-server (apt-get install clickhouse-server)");
        return;
    }
    let mut topo = Topology::new(1);
    let (ns, addr) = topo.add_host("c");
    let mut ch = ClickHouse::start_in(Some(&ns));
    ch.stop();
    let storage = format!(
        "  backend: clickhouse\n  url: {}\n  database: ctw\n  connect_retry_ms: 200\n",
        ch.url()
    );
    let readyz = |ns: &str| {
        let out = ctw_testkit::run_in(
            ns,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "http://127.0.0.1:9360/readyz",
            ],
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let collector = std::thread::scope(|s| {
        // Returns once /readyz answers 200.
        let started =
            s.spawn(|| Collector::start_with_storage(&mut topo, &ns, addr, Some(&storage), ""));
        wait_for(WAIT, "the collector answering /readyz with 503", || {
            (readyz(&ns) == "503").then_some(())
        });
        ch.restart();
        started.join().unwrap()
    });
    assert_eq!(collector.get("/readyz").0, 200);
    assert_eq!(
        ch.must(
            "SELECT count() FROM system.tables WHERE database = 'ctw' AND name = 'ctw_records'"
        )
        .trim(),
        "1"
    );
    drop(ch);
    drop(topo);
}

//! Collector replicas end to end, in network namespaces: one private
//! ClickHouse server (Debian's 18.16), or a cluster of them with a
//! ZooKeeper (2 shards; 2 × 2 for the test that also kills a replica), two
//! collectors (`c1`, `c2`) on its database with `replicas` on, two nodes
//! with pods behind masquerade, nginx in the server namespace, and the real agents. Each agent dials the
//! name `collectors`, which its node's `/etc/hosts` (through `ip netns
//! exec`'s `/etc/netns/NS/hosts`) maps to both collectors, its own first
//! (as a Service's endpoints would): node-0 streams to c1, node-1 to c2,
//! and an agent whose collector is gone connects to the other one.
//!
//! The right answers come from outside the product: nginx's access log
//! (every line, its address and port), the pod each request was sent from,
//! and the node's kernel conntrack table (`conntrack -L`). Needs root,
//! `clickhouse-server` and `conntrack` (and `zookeeperd` for the cluster
//! tests, skipped without it).

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ctw_collector::store::clickhouse::schema::RECORD_COLUMNS;
use ctw_testkit::clickhouse::{self, ClickHouse};
use ctw_testkit::cluster::Cluster;
use ctw_testkit::collector::{Collector, GRPC_PORT};
use ctw_testkit::{must_in, require_root, wait_for, Topology};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);
/// The nginx log format the resolver reads (the testkit's default).
const LOG_FORMAT: &str = "$remote_addr $remote_port $msec $server_port";

/// `/etc/netns/NS/` directories made for the test (their `hosts` file is
/// what `ip netns exec NS` shows as `/etc/hosts`); removed on drop, also
/// when the test fails.
struct NetnsEtc(Vec<PathBuf>);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The ClickHouse the collectors share: one server, or a cluster (with
/// its ZooKeeper) of at least two shards: c1 talks to shard 1's first
/// replica, c2 to shard 2's.
enum Servers {
    One(ClickHouse),
    Cluster(clickhouse::Cluster),
}

impl Servers {
    /// Run a query on the (first) server; its output.
    fn must(&self, sql: &str) -> String {
        match self {
            Servers::One(ch) => ch.must(sql),
            Servers::Cluster(cl) => cl.servers[0].must(sql),
        }
    }
}

/// Fields drop in order: ClickHouse and the second collector before the
/// namespaces (the cluster's topology).
struct Replicas {
    ch: Servers,
    c2: Collector,
    c: Cluster,
    /// Each agent's config text (to start it again).
    agent_yamls: Vec<String>,
    _etc: NetnsEtc,
}

impl Replicas {
    fn c1(&self) -> &Collector {
        &self.c.collector
    }
}

fn replicas_yaml(id: &str, addr: Ipv4Addr) -> String {
    format!(
        "replicas:\n  collector_id: {id}\n  advertise_addr: \"{addr}:{GRPC_PORT}\"\n  lease_ttl_ms: 4000\n  renew_interval_ms: 500\n"
    )
}

fn start() -> Option<Replicas> {
    start_on(None)
}

/// [`start`], the collectors on a ClickHouse cluster of `(shards,
/// replicas)` (shards at least 2; with its ZooKeeper; `insert_quorum`
/// unset: every replica of a shard) when `cluster` is given.
fn start_on(cluster: Option<(usize, usize)>) -> Option<Replicas> {
    if !require_root() {
        return None;
    }
    if !clickhouse::available() {
        ctw_testkit::skip("needs clickhouse-server (apt-get install clickhouse-server)");
        return None;
    }
    if cluster.is_some() && !clickhouse::cluster_available() {
        ctw_testkit::skip("needs clickhouse-server and zookeeperd (apt-get install zookeeperd)");
        return None;
    }
    let pods = 2;
    let mut topo = Topology::new(pods);
    topo.add_node(pods);
    let (col_ns, addr1) = topo.add_host("c");
    // The second collector shares the namespace (and so the ClickHouse
    // server on its loopback) with its own address on the same link.
    let o = addr1.octets();
    let addr2 = Ipv4Addr::new(o[0], o[1], o[2], 3);
    must_in(
        &col_ns,
        &["ip", "addr", "add", &format!("{addr2}/24"), "dev", "eth0"],
    );
    let nginx = topo.start_nginx(&[80]);
    let storage = |url: String, cluster: &str| {
        format!(
            "  backend: clickhouse\n  url: {url}\n  database: ctw\n  connect_retry_ms: 200\n  timeout_ms: 20000\n{cluster}"
        )
    };
    let (ch, storage1, storage2) = if let Some((shards, replicas)) = cluster {
        assert!(shards >= 2, "c1 and c2 talk to different shards");
        let mut cl = clickhouse::Cluster::start_in(Some(&col_ns), shards, replicas);
        let section = format!("  cluster:\n    name: {}\n", clickhouse::CLUSTER);
        let (s1, s2) = (
            storage(cl.server(0, 0).url(), &section),
            storage(cl.server(1, 0).url(), &section),
        );
        (Servers::Cluster(cl), s1, s2)
    } else {
        let ch = ClickHouse::start_in(Some(&col_ns));
        let s = storage(ch.url(), "");
        (Servers::One(ch), s.clone(), s)
    };
    let c1 = Collector::start_with_storage(
        &mut topo,
        &col_ns,
        addr1,
        Some(&storage1),
        &replicas_yaml("c1", addr1),
    );
    let c2 = c1.start_replica(
        &mut topo,
        &col_ns,
        addr2,
        9361,
        Some(&storage2),
        &replicas_yaml("c2", addr2),
    );
    // Each node lists its own collector first.
    let mut etc = NetnsEtc(Vec::new());
    for (i, order) in [[addr1, addr2], [addr2, addr1]].iter().enumerate() {
        let dir = PathBuf::from("/etc/netns").join(topo.node_ns_of(i));
        std::fs::create_dir_all(&dir).unwrap();
        etc.0.push(dir.clone());
        let hosts: String = order.iter().map(|a| format!("{a} collectors\n")).collect();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}")).unwrap();
    }
    let mut agents = Vec::new();
    let mut agent_yamls = Vec::new();
    for i in 0..2 {
        let name = format!("node-{i}");
        let spool = topo.tmp_dir().join(format!("spool-{i}"));
        let yaml = c1.agent_yaml(&name, &spool, "").replace(
            &format!("https://{addr1}:{GRPC_PORT}"),
            &format!("https://collectors:{GRPC_PORT}"),
        );
        agents.push(ctw_testkit::agent::Agent::start_on(
            &mut topo,
            i,
            &name,
            &[80],
            &yaml,
        ));
        agent_yamls.push(yaml);
    }
    let x = Replicas {
        ch,
        c2,
        c: Cluster {
            topo,
            collector: c1,
            nginx,
            agents,
        },
        agent_yamls,
        _etc: etc,
    };
    for c in [x.c1(), &x.c2] {
        wait_holders(c, &[("node-0", "c1"), ("node-1", "c2")]);
    }
    Some(x)
}

/// Wait until `c`'s `/api/v1/agents` lists each node as connected through
/// the named collector; returns the answer.
fn wait_holders(c: &Collector, want: &[(&str, &str)]) -> Value {
    wait_for(WAIT, "agents listed with their collectors", || {
        let (code, v) = c.api("/api/v1/agents");
        let agents = v["agents"].as_array()?;
        let ok = code == 200
            && want.iter().all(|(node, col)| {
                agents
                    .iter()
                    .any(|a| a["node"] == *node && a["connected"] == true && a["collector"] == *col)
            });
        ok.then_some(v)
    })
}

fn resolve(c: &Collector, tmp: &std::path::Path, lines: &[String]) -> (u16, Value) {
    let t = std::time::Instant::now();
    let out = c.post_json(
        "/api/v1/resolve",
        &json!({ "lines": lines, "log_format": LOG_FORMAT }),
        tmp,
    );
    eprintln!("resolve of {} lines: {:?}", lines.len(), t.elapsed());
    out
}

/// Wait until every line resolves through `c`, then check each against
/// the pod it came from (`None`: any pod of the node) and its node, once.
fn assert_resolved(
    c: &Collector,
    tmp: &std::path::Path,
    sent: &[(String, Option<Ipv4Addr>, String)],
) -> Value {
    let lines: Vec<String> = sent.iter().map(|s| s.0.clone()).collect();
    let mut tries = 0;
    let v = wait_for(WAIT, "every line resolved", || {
        let (code, v) = resolve(c, tmp, &lines);
        tries += 1;
        if tries % 200 == 0 {
            eprintln!("not yet resolved ({code}): {}", v["summary"]);
        }
        (code == 200 && v["summary"]["resolved"] == lines.len()).then_some(v)
    });
    for (i, (line, pod, node)) in sent.iter().enumerate() {
        let r = &v["results"][i];
        assert_eq!(r["status"], "resolved", "{line}: {r:#}");
        if let Some(pod) = pod {
            assert_eq!(r["pod_ip"], pod.to_string(), "{line}: {r:#}");
        }
        assert_eq!(r["node"], node.as_str(), "{line}: {r:#}");
        assert_eq!(r["candidates"], 1, "stored once: {line}: {r:#}");
    }
    v
}

/// The kernel's entry for the connection nginx logged as `node_ip:port`
/// on node `i`: (pod address, pod port) of its original tuple.
fn kernel_entry(c: &Cluster, i: usize, node_ip: &str, port: &str) -> (String, String) {
    let table = c
        .topo
        .conntrack_on(i, &["-L", "-p", "tcp", "--dport", "80"]);
    let reply_dst = format!("dst={node_ip} sport=80 dport={port} ");
    let line = table
        .lines()
        .find(|l| l.contains(&reply_dst))
        .unwrap_or_else(|| panic!("no kernel entry for {node_ip}:{port} on node {i}:\n{table}"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    (field("src="), field("sport="))
}

/// Every nginx line resolves through either collector to the pod that
/// sent it; a live lookup through the collector that does not hold the
/// node's agent is forwarded to the one that does and answers what the
/// node's kernel table holds; `/api/v1/agents` of either lists both
/// agents with the collector holding each.
#[test]
fn lines_and_live_lookups_resolve_through_either_collector() {
    let Some(x) = start() else { return };
    lines_and_live_lookups(x);
}

/// The same on a ClickHouse cluster of two shards, each collector talking
/// to another shard's server: records, ledger and leases are seen alike
/// through both (the lease table is replicated to every server).
#[test]
fn on_two_shards_lines_and_live_lookups_resolve_through_either_collector() {
    let Some(x) = start_on(Some((2, 1))) else {
        return;
    };
    lines_and_live_lookups(x);
}

fn lines_and_live_lookups(x: Replicas) {
    let tmp = x.c.topo.tmp_dir().to_path_buf();
    let sent: Vec<(String, Option<Ipv4Addr>, String)> =
        x.c.requests(2)
            .into_iter()
            .map(|(l, p, n)| (l, Some(p), n))
            .collect();
    for c in [x.c1(), &x.c2] {
        let v = assert_resolved(c, &tmp, &sent);
        assert_eq!(v["summary"]["resolved"], sent.len());
    }
    // node-0's agent streams to c1, node-1's to c2: ask the other one.
    for (i, (line, pod, _)) in sent.iter().enumerate().step_by(2) {
        let node = i / 4;
        let via = if node == 0 { &x.c2 } else { x.c1() };
        let f: Vec<&str> = line.split_whitespace().collect();
        let (node_ip, port) = (f[0], f[1]);
        let (k_src, k_sport) = kernel_entry(&x.c, node, node_ip, port);
        assert_eq!(k_src, pod.unwrap().to_string(), "kernel table vs the pod");
        let (code, v) = via.api(&format!(
            "/api/v1/conntrack/query?tuple=reply&src_ip={}&src_port=80&dst_ip={node_ip}&dst_port={port}",
            x.c.topo.srv_ip_for_node(node)
        ));
        assert_eq!(code, 200, "{line}: {v:#}");
        assert_eq!(v["node"], format!("node-{node}"), "{v:#}");
        assert_eq!(v["origin"]["src"], k_src, "{v:#}");
        assert_eq!(v["origin"]["src_port"].to_string(), k_sport, "{v:#}");
        assert_eq!(v["snat_ip"], node_ip, "{v:#}");
        assert_eq!(v["snat_port"].to_string(), port, "{v:#}");
        assert_eq!(v["zones_tried"], json!([0]), "{v:#}");
        // Named node, same answer.
        let (code, named) = via.api(&format!(
            "/api/v1/conntrack/query?tuple=reply&src_ip={}&src_port=80&dst_ip={node_ip}&dst_port={port}&node=node-{node}",
            x.c.topo.srv_ip_for_node(node)
        ));
        assert_eq!(code, 200, "{named:#}");
        assert_eq!(named["origin"], v["origin"]);
    }
    // A tuple no kernel holds: every agent asked, through both collectors.
    let (code, v) = x.c1().api(&format!(
        "/api/v1/conntrack/query?tuple=reply&src_ip={}&src_port=80&dst_ip={}&dst_port=9",
        x.c.topo.srv_ip_for_node(1),
        x.c.topo.node_ip4_of(1)
    ));
    assert_eq!(code, 404, "{v:#}");
    let mut asked: Vec<String> = v["asked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    asked.sort();
    assert_eq!(asked, ["node-1"], "the address's owner answers: {v:#}");
    // A line of node-1's address that no connection matches: both
    // collectors know node-1 owns the address (c1 from the lease table).
    let secs = ctw_common::now_ns() as f64 / 1e9;
    let line = format!("{} 9 {secs:.3} 80", x.c.topo.node_ip4_of(1));
    for c in [x.c1(), &x.c2] {
        let (code, v) = resolve(c, &tmp, std::slice::from_ref(&line));
        assert_eq!(code, 200, "{v:#}");
        let r = &v["results"][0];
        assert_eq!(r["candidates"], 0, "{r:#}");
        let note = r["note"].as_str().unwrap_or_default();
        assert!(!note.starts_with("no agent lists"), "owner known: {r:#}");
    }
    // Each lookup above went once to the holder: 2 lines x 2 questions per
    // node, and the unknown tuple.
    let forwarded = |c: &Collector, result: &str| -> f64 {
        let text = c.get("/metrics").1;
        let series = format!("ctw_collector_lookups_forwarded_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(forwarded(&x.c2, "found"), 4.0);
    assert_eq!(forwarded(x.c1(), "found"), 4.0);
    assert_eq!(forwarded(x.c1(), "not_found"), 1.0);
    assert_eq!(forwarded(&x.c2, "not_found"), 0.0);
    for c in [x.c1(), &x.c2] {
        let v = wait_holders(c, &[("node-0", "c1"), ("node-1", "c2")]);
        assert_eq!(v["agents"].as_array().unwrap().len(), 2, "{v:#}");
    }
    drop(x.ch);
}

/// c1 is killed with SIGKILL while pods keep sending requests: node-0's
/// agent connects to c2, replays what c1 had not acked, and every line
/// nginx logged resolves through c2 to exactly one connection of the
/// right node; the search counts exactly nginx's lines and is complete;
/// the ledger holds each batch once. Started again, c1 answers the same
/// and lists node-0 as held by c2.
#[test]
fn a_killed_collector_loses_and_doubles_nothing() {
    let Some(mut x) = start() else { return };
    let tmp = x.c.topo.tmp_dir().to_path_buf();
    let first = x.c.requests(1);
    assert_resolved(
        x.c1(),
        &tmp,
        &first
            .iter()
            .map(|(l, p, n)| (l.clone(), Some(*p), n.clone()))
            .collect::<Vec<_>>(),
    );
    let from = ctw_common::now_ns() / 1_000_000_000 - 600;
    // Flows from one pod of each node, arriving while c1 dies.
    let per_loop = 150;
    let before = x.c.nginx.access_lines().len();
    for node in 0..2 {
        let ns = x.c.topo.pod_ns_of(node, 0).to_string();
        let url = format!("http://{}/", x.c.topo.srv_ip_for_node(node));
        let script = format!(
            "i=0; while [ $i -lt {per_loop} ]; do curl -s -o /dev/null --max-time 5 {url}; i=$((i+1)); done"
        );
        x.c.topo.spawn_in(&ns, &["sh", "-c", &script]);
    }
    wait_for(WAIT, "flows under way", || {
        (x.c.nginx.access_lines().len() >= before + 40).then_some(())
    });
    x.c.collector.kill9(&mut x.c.topo);
    wait_for(WAIT, "every flow logged by nginx", || {
        (x.c.nginx.access_lines().len() >= before + 2 * per_loop).then_some(())
    });
    wait_holders(&x.c2, &[("node-0", "c2"), ("node-1", "c2")]);
    // Every line nginx logged, with the node its address belongs to.
    let logged: Vec<(String, Option<Ipv4Addr>, String)> =
        std::fs::read_to_string(&x.c.nginx.access_log)
            .unwrap()
            .lines()
            .map(|l| {
                let ip: Ipv4Addr = l.split_whitespace().next().unwrap().parse().unwrap();
                let node = (0..2).find(|&i| x.c.topo.node_ip4_of(i) == ip).unwrap();
                (l.to_string(), None, format!("node-{node}"))
            })
            .collect();
    assert_eq!(logged.len(), before + 2 * per_loop);
    let v = assert_resolved(&x.c2, &tmp, &logged);
    // The loops' lines came from pod 0 of their node.
    for (i, (_, _, node)) in logged.iter().enumerate().skip(before) {
        let n = if node == "node-0" { 0 } else { 1 };
        assert_eq!(
            v["results"][i]["pod_ip"],
            x.c.topo.pod_ip4_of(n, 0).to_string(),
            "{:#}",
            v["results"][i]
        );
    }
    // The search counts nginx's connections exactly, and nothing is missing.
    let to = ctw_common::now_ns() / 1_000_000_000 + 60;
    let search = |c: &Collector| {
        let (code, v) = c.api(&format!(
            "/api/v1/connections?dst_port=80&from={from}&to={to}&limit=10000"
        ));
        assert_eq!(code, 200, "{v:#}");
        v
    };
    let s = search(&x.c2);
    assert_eq!(s["total"], logged.len() as u64, "{}", s["gaps"]);
    assert_eq!(s["complete"], true, "{}", s["gaps"]);
    let n: u64 =
        x.ch.must("SELECT count() FROM ctw.ctw_batches")
            .trim()
            .parse()
            .unwrap();
    let distinct: u64 =
        x.ch.must("SELECT uniqExact(node, boot_id, seq) FROM ctw.ctw_batches")
            .trim()
            .parse()
            .unwrap();
    assert_eq!(n, distinct, "a batch in the ledger twice");
    // c1 back (no local state): the same answers, node-0 held by c2.
    x.c.collector.restart(&mut x.c.topo);
    wait_holders(x.c1(), &[("node-0", "c2"), ("node-1", "c2")]);
    let s1 = search(x.c1());
    assert_eq!(s1["total"], s["total"]);
    assert_eq!(s1["complete"], true, "{}", s1["gaps"]);
    drop(x.ch);
}

/// node-0's agent and its collector c1 die together; the agent, started
/// again (a new boot id), connects to c2, which never saw it: c2 finds
/// the restart in the lease table (c1's last lease names the old boot id)
/// and records the `agent_restarted` gap, so searches over the outage are
/// incomplete, for node-0 only.
#[test]
fn an_agent_restarted_across_collectors_leaves_a_gap() {
    let Some(mut x) = start() else { return };
    let v = wait_holders(&x.c2, &[("node-0", "c1"), ("node-1", "c2")]);
    let boot0 = v["agents"][0]["boot_id"].as_str().unwrap().to_string();
    let before_ns = ctw_common::now_ns();
    let pid = x.c.agents[0].pid;
    x.c.topo.kill(pid);
    x.c.collector.kill9(&mut x.c.topo);
    let killed_ns = ctw_common::now_ns();
    x.c.agents[0] =
        ctw_testkit::agent::Agent::start_on(&mut x.c.topo, 0, "node-0", &[80], &x.agent_yamls[0]);
    let v = wait_holders(&x.c2, &[("node-0", "c2"), ("node-1", "c2")]);
    assert_eq!(v["agents"][0]["node"], "node-0");
    assert_ne!(
        v["agents"][0]["boot_id"],
        boot0.as_str(),
        "a new agent process"
    );
    let from = before_ns / 1_000_000_000 - 60;
    let to = ctw_common::now_ns() / 1_000_000_000 + 60;
    let s = wait_for(WAIT, "the restart gap recorded", || {
        let (code, v) =
            x.c2.api(&format!("/api/v1/connections?from={from}&to={to}"));
        (code == 200 && v["complete"] == false).then_some(v)
    });
    let gaps = s["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{gaps:#?}");
    let g = &gaps[0];
    assert_eq!(g["node"], "node-0", "{g:#}");
    assert_eq!(g["reason"], "agent_restarted", "{g:#}");
    // From c1's last lease (before the kill) to the new stream (after it).
    let ns = |k: &str| {
        let t = chrono::DateTime::parse_from_rfc3339(g[k].as_str().unwrap()).unwrap();
        t.timestamp_nanos_opt().unwrap() as u64
    };
    assert!(ns("from") <= killed_ns, "{g:#}");
    assert!(
        ns("from") + 5_000_000_000 >= before_ns,
        "within a renewal: {g:#}"
    );
    assert!(ns("to") >= killed_ns, "{g:#}");
    drop(x.ch);
}

/// Wait until `c`'s `/api/v1/agents` lists every node in `nodes` as
/// connected (through any collector).
fn wait_connected(c: &Collector, nodes: &[&str]) {
    wait_for(WAIT, "agents connected to a collector", || {
        let (code, v) = c.api("/api/v1/agents");
        let agents = v["agents"].as_array()?;
        let ok = code == 200
            && nodes.iter().all(|node| {
                agents
                    .iter()
                    .any(|a| a["node"] == *node && a["connected"] == true)
            });
        ok.then_some(())
    });
}

/// Sum of every series of counter `name` in `c`'s `/metrics`.
/// Issue 15's failover test, on a ClickHouse cluster of 2 shards × 2
/// replicas (with ZooKeeper; `insert_quorum` unset: both replicas) behind
/// c1 and c2. While one pod of each node sends requests (about 8 a
/// second, through the outage and after it), c1 (holding node-0's stream) and the second replica of a shard that
/// stores records are killed together with SIGKILL. node-0's agent moves
/// to c2; every insert that needs the dead replica is refused for want of
/// quorum, so nothing is acked that both replicas did not store and the
/// agents keep (spool) their batches; the traffic goes on. Once the
/// replica and c1 are started again: every line nginx logged resolves
/// through each collector to exactly one connection of the right pod and
/// node; a search counts exactly nginx's lines and is complete, through
/// each; the ledger holds each (node, boot id, seq) once; both replicas of
/// each shard hold the same rows. Record rows of inserts refused during
/// the outage may be stored twice (never three times, never from after
/// it): see the end of the test.
#[test]
fn a_collector_and_a_replica_killed_together_lose_nothing_and_answer_each_once() {
    let Some(mut x) = start_on(Some((2, 2))) else {
        return;
    };
    let tmp = x.c.topo.tmp_dir().to_path_buf();
    let from = ctw_common::now_ns() / 1_000_000_000 - 600;
    let first: Vec<(String, Option<Ipv4Addr>, String)> =
        x.c.requests(1)
            .into_iter()
            .map(|(l, p, n)| (l, Some(p), n))
            .collect();
    for c in [x.c1(), &x.c2] {
        assert_resolved(c, &tmp, &first);
    }
    let Servers::Cluster(cl) = &mut x.ch else {
        unreachable!("started on a cluster")
    };
    let rows = |ch: &ClickHouse, sql: &str| -> u64 { ch.must(sql).trim().parse().unwrap() };
    // A shard holding records: its second replica (no collector's server)
    // is the one killed, so record inserts need it.
    let shard = (0..2)
        .find(|&s| rows(cl.server(s, 0), "SELECT count() FROM ctw.ctw_records_local") > 0)
        .expect("a shard with records");
    // One pod of each node sends requests, one after the other, until told
    // to stop; each loop writes curl's status of every request.
    let before = x.c.nginx.access_lines().len();
    let stop = tmp.join("stop-traffic");
    let mut loops = Vec::new();
    for node in 0..2 {
        let ns = x.c.topo.pod_ns_of(node, 0).to_string();
        let url = format!("http://{}/", x.c.topo.srv_ip_for_node(node));
        let (codes, done) = (
            tmp.join(format!("codes-{node}")),
            tmp.join(format!("done-{node}")),
        );
        // tidy: `sleep 0.1` paces the traffic (about 8 requests/s per pod
        // on this machine: each line costs the resolver); it waits for no
        // condition.
        let script = format!(
            "while [ ! -e {stop} ]; do curl -s -o /dev/null --max-time 5 -w '%{{http_code}}\\n' {url} >> {codes}; sleep 0.1; done; touch {done}",
            stop = stop.display(),
            codes = codes.display(),
            done = done.display(),
        );
        x.c.topo.spawn_in(&ns, &["sh", "-c", &script]);
        loops.push((codes, done));
    }
    wait_for(WAIT, "flows under way", || {
        (x.c.nginx.access_lines().len() >= before + 40).then_some(())
    });
    x.c.collector.kill9(&mut x.c.topo);
    cl.server(shard, 1).stop();
    // node-0's agent moves to c2, whose inserts into the shard are refused
    // (quorum of 2, one replica): nothing acked, the agents keep sending
    // (c2's store gives up after retrying for its timeout_ms, 20 s).
    wait_holders(&x.c2, &[("node-0", "c2"), ("node-1", "c2")]);
    wait_for(
        Duration::from_secs(120),
        "an insert refused for want of quorum",
        || (x.c2.metric_sum("ctw_collector_batches_failed_total") > 0.0).then_some(()),
    );
    let outage_lines = x.c.nginx.access_lines().len();
    cl.server(shard, 1).restart();
    let back_us = ctw_common::now_ns() / 1000;
    x.c.collector.restart(&mut x.c.topo);
    // Traffic also after both came back, then stop it.
    wait_for(WAIT, "flows after the restarts", || {
        (x.c.nginx.access_lines().len() >= outage_lines + 30).then_some(())
    });
    std::fs::write(&stop, "").unwrap();
    let sent: usize = loops
        .iter()
        .map(|(codes, done)| {
            wait_for(WAIT, "the request loop to end", || {
                done.exists().then_some(())
            });
            let codes = std::fs::read_to_string(codes).unwrap();
            assert!(
                codes.lines().all(|c| c == "200"),
                "a request failed: {codes}"
            );
            codes.lines().count()
        })
        .sum();
    wait_for(WAIT, "every request logged by nginx", || {
        (x.c.nginx.access_lines().len() >= before + sent).then_some(())
    });
    // Every line nginx logged, with the pod (the loops' lines: pod 0 of
    // the node their address belongs to) and node that sent it.
    let text = std::fs::read_to_string(&x.c.nginx.access_log).unwrap();
    let logged: Vec<(String, Option<Ipv4Addr>, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i < before {
                assert_eq!(first[i].0, l);
                return first[i].clone();
            }
            let ip: Ipv4Addr = l.split_whitespace().next().unwrap().parse().unwrap();
            let node = (0..2).find(|&n| x.c.topo.node_ip4_of(n) == ip).unwrap();
            (
                l.to_string(),
                Some(x.c.topo.pod_ip4_of(node, 0)),
                format!("node-{node}"),
            )
        })
        .collect();
    assert_eq!(
        logged.len(),
        before + sent,
        "nginx logged each request once"
    );
    assert!(
        logged.len() > outage_lines,
        "flows during and after the outage"
    );
    let to = ctw_common::now_ns() / 1_000_000_000 + 60;
    for c in [&x.c.collector, &x.c2] {
        wait_connected(c, &["node-0", "node-1"]);
        assert_resolved(c, &tmp, &logged);
        let (code, s) = c.api(&format!(
            "/api/v1/connections?dst_port=80&from={from}&to={to}&limit=10000"
        ));
        assert_eq!(code, 200, "{s:#}");
        assert_eq!(s["total"], logged.len() as u64, "{}", s["gaps"]);
        assert_eq!(s["complete"], true, "{}", s["gaps"]);
    }
    let batches = rows(&cl.servers[0], "SELECT count() FROM ctw.ctw_batches");
    let distinct = rows(
        &cl.servers[0],
        "SELECT uniqExact(node, boot_id, seq) FROM ctw.ctw_batches",
    );
    assert_eq!(batches, distinct, "a batch in the ledger twice");
    // Each shard's replicas, caught up, hold the same rows; the ledger's
    // none twice. Records: a quorum insert that timed out (ClickHouse's
    // "unknown status, client must retry", code 319) stays on the live
    // replica, which hands it to the other once back; the store's retries
    // of the same insert are dropped as a repeated block, but once it gave
    // up the agents' replays come in other flushes (other blocks) and store
    // those rows again; searches answer them once (checked above). So rows
    // stored twice are allowed only from inserts made before the replica
    // was back, and never three times.
    let all_columns = RECORD_COLUMNS.join(", ");
    let mut total = 0;
    for s in 0..2 {
        for table in ["ctw_records_local", "ctw_batches_local"] {
            let counts: Vec<(u64, u64)> = (0..2)
                .map(|r| {
                    let ch = cl.server(s, r);
                    wait_for(WAIT, "the replica caught up", || {
                        ch.query(&format!("SYSTEM SYNC REPLICA ctw.{table}")).ok()
                    });
                    (
                        rows(ch, &format!("SELECT count() FROM ctw.{table}")),
                        rows(
                            ch,
                            &format!("SELECT count() FROM (SELECT DISTINCT * FROM ctw.{table})"),
                        ),
                    )
                })
                .collect();
            assert_eq!(counts[0], counts[1], "shard {s} {table}: replicas differ");
            if table == "ctw_batches_local" {
                assert_eq!(counts[0].0, counts[0].1, "shard {s}: a ledger row twice");
                continue;
            }
            total += counts[0].0;
            let twice = cl.server(s, 0).must(&format!(
                "SELECT n, count(), max(event_us) FROM (SELECT {all_columns}, count() AS n \
                 FROM ctw.{table} GROUP BY {all_columns}) WHERE n > 1 GROUP BY n"
            ));
            for l in twice.lines() {
                let f: Vec<u64> = l.split('\t').map(|v| v.parse().unwrap()).collect();
                assert_eq!(f[0], 2, "shard {s}: {} rows stored {} times", f[1], f[0]);
                assert!(
                    f[2] < back_us,
                    "shard {s}: a row stored twice after the outage: {l}"
                );
                eprintln!("shard {s}: {} record rows of the outage stored twice", f[1]);
            }
        }
    }
    assert_eq!(
        total,
        rows(&cl.servers[0], "SELECT count() FROM ctw.ctw_records")
    );
}

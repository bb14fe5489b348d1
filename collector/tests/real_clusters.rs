//! Issue 11's real-cluster cases on the collector side, end to end in
//! network namespaces: one node with pods behind masquerade, nginx in the
//! server namespace, the collector in its own namespace, the real agent.
//! The right answers are known independently: from nginx's access log and
//! the UDP server's record of what it received, and the node's
//! `conntrack -L`. Needs root.
//!
//! - Case 1: an entry recovered at agent start-up whose DESTROY the kernel
//!   never sends, then port reuse by another pod: each line resolves to its
//!   own pod (IPv4 and IPv6).
//! - Case 4: `total` counts UDP flows, not NEW + DESTROY records, also with
//!   a collection cap below the flow count.
//! - Case 5: the `kind` filter in a real run (a recovered and a new entry).

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ctw_testkit::agent::Agent;
use ctw_testkit::collector::Collector;
use ctw_testkit::{must_in, require_root, wait_for, Topology};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// The testkit's nginx format.
const LOG_FORMAT: &str = "$remote_addr $remote_port $msec $server_port";

/// A pod's HTTP/1.1 keepalive client from a fixed local port: one request,
/// then (once the file argv[4] exists) a second request on the same
/// connection, then close. Prints `first` and `done`.
const KEEPALIVE_CLIENT: &str = r#"
import os, socket, sys, time
dst, port, lp, sig = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::" if v6 else "0.0.0.0", lp))
s.settimeout(10)
s.connect((dst, port))
host = "[%s]" % dst if v6 else dst
req = ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode()
def one():
    s.sendall(req)
    buf = b""
    while b"ok\n" not in buf:
        d = s.recv(4096)
        if not d:
            sys.exit("closed by the server")
        buf += d
one()
print("first", flush=True)
end = time.time() + 120
while not os.path.exists(sig):
    if time.time() > end:
        sys.exit("no signal to go on")
    time.sleep(0.05)  # tidy: the client script polls for the test's go signal, bounded
one()
s.close()
print("done", flush=True)
"#;

/// Send one datagram from each local port `base..base+n` to `dst:port` and
/// wait for its echo (each port a new flow). Prints the number echoed.
const UDP_FLOWS: &str = r#"
import socket, sys
dst, port, base, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ok = 0
for p in range(base, base + n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", p))
    s.settimeout(5)
    s.sendto(b"x", (dst, port))
    s.recvfrom(64)
    ok += 1
    s.close()
print(ok)
"#;

/// A topology with `pods` pods on node 0 and a collector (extra `storage:`
/// YAML, indented two spaces), no agent yet.
fn cluster(pods: usize, storage_extra: &str) -> (Topology, Collector) {
    let mut topo = Topology::new(pods);
    let (ns, addr) = topo.add_host("c");
    let collector = Collector::start(&mut topo, &ns, addr, storage_extra);
    (topo, collector)
}

fn start_agent(topo: &mut Topology, c: &Collector, ports: &[u16], extra: &str) -> Agent {
    let spool = topo.tmp_dir().join("spool-0");
    let yaml = format!("{}{extra}", c.agent_yaml("node-0", &spool, ""));
    let a = Agent::start_on(topo, 0, "node-0", ports, &yaml);
    c.wait_connected(&["node-0"]);
    a
}

fn sysctl(topo: &Topology, kv: &[&str]) {
    let mut argv = vec!["sysctl", "-qw"];
    argv.extend_from_slice(kv);
    must_in(topo.node_ns(), &argv);
}

fn search(c: &Collector, query: &str) -> Value {
    let (code, v) = c.api(&format!("/api/v1/connections?{query}"));
    assert_eq!(code, 200, "{query}: {v}");
    v
}

/// Wait for access-log line `n` (0-based) of nginx.
fn access_line(log: &PathBuf, n: usize) -> String {
    wait_for(WAIT, "nginx to log the request", || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .nth(n)
            .map(str::to_string)
    })
}

fn remote(line: &str) -> (IpAddr, u16) {
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[0].parse().unwrap(), f[1].parse().unwrap())
}

/// Issue 11 case 1. The agent is stopped while pod A connects from port
/// 42000 (the kernel gives the entry no event cache: no DESTROY will ever
/// come, `nf_conntrack_events=2`); the agent starts and its dump recovers
/// A; A makes a second request and closes; once the kernel dropped A's
/// entry (`TIME_WAIT` 1 s), pod B connects from port 42000 and gets the
/// same node port. A's lines resolve to A, B's to B, all `resolved`.
///
/// Whether the kernel sends A's DESTROY depends on whether any ctnetlink
/// event listener existed when A's entry was created: since Linux 6.4 the
/// check (`nf_ctnetlink_has_listener`) is global, so an agent in another
/// namespace (a parallel test) gives A an event cache. `no_destroy` runs
/// the agent with `capture_destroy: false`: then no DESTROY ever reaches
/// the collector, and only B's start ends A (the superseding rule).
fn agent_restart_then_port_reuse(v6: bool, no_destroy: bool) {
    let (mut topo, c) = cluster(2, "");
    sysctl(
        &topo,
        &[
            "net.netfilter.nf_conntrack_events=2",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
        ],
    );
    let nginx = topo.start_nginx(&[80]);
    let srv: IpAddr = if v6 {
        topo.srv_ip6().into()
    } else {
        topo.srv_ip4().into()
    };
    let (pod_a, pod_b): (IpAddr, IpAddr) = if v6 {
        (topo.pod_ip6(0).into(), topo.pod_ip6(1).into())
    } else {
        (topo.pod_ip4(0).into(), topo.pod_ip4(1).into())
    };
    let go = topo.tmp_dir().join("a-go");
    let script = topo.tmp_dir().join("keepalive.py");
    std::fs::write(&script, KEEPALIVE_CLIENT).unwrap();
    let pod_a_ns = topo.pod_ns(0).to_string();
    let (srv_s, script_s, go_s) = (
        srv.to_string(),
        script.display().to_string(),
        go.display().to_string(),
    );
    topo.spawn_in(
        &pod_a_ns,
        &["python3", "-u", &script_s, &srv_s, "80", "42000", &go_s],
    );
    let a1 = access_line(&nginx.access_log, 0);
    // A's entry exists, created with no listener; now the agent starts.
    let extra = if no_destroy {
        "capture_destroy: false\n"
    } else {
        ""
    };
    let _agent = start_agent(&mut topo, &c, &[80], extra);
    let (node_ip, node_port) = remote(&a1);
    let by_port = format!("snat_ip={node_ip}&snat_port={node_port}");
    wait_for(WAIT, "A recovered by the agent's start-up dump", || {
        let v = search(&c, &format!("{by_port}&kind=recovered"));
        (v["total"] == 1).then_some(())
    });
    std::fs::write(&go, "").unwrap();
    let a2 = access_line(&nginx.access_log, 1);
    assert_eq!(remote(&a2), (node_ip, node_port), "{a2}");
    // The kernel drops A's entry (the conntrack table is the truth).
    let family = if v6 { "ipv6" } else { "ipv4" };
    wait_for(WAIT, "A's conntrack entry to be gone", || {
        let out = topo.node_conntrack(&["-L", "-f", family, "-p", "tcp"]);
        (!out.contains(&format!("src={pod_a} "))).then_some(())
    });
    let url = if v6 {
        format!("http://[{srv}]/")
    } else {
        format!("http://{srv}/")
    };
    ctw_testkit::curl_ok(topo.pod_ns(1), &url, Some(42000), &[]);
    let b = access_line(&nginx.access_log, 2);
    // The premise: B got A's node port (nginx saw the same address and port).
    assert_eq!(remote(&b), (node_ip, node_port), "A: {a1} B: {b}");
    wait_for(WAIT, "B's NEW stored", || {
        let v = search(&c, &format!("{by_port}&kind=new"));
        (v["total"] == 1).then_some(())
    });
    let lines = vec![a1.clone(), a2.clone(), b.clone()];
    let (code, v) = c.post_json(
        "/api/v1/resolve",
        &json!({ "lines": lines, "log_format": LOG_FORMAT }),
        topo.tmp_dir(),
    );
    assert_eq!(code, 200, "{v:#}");
    for (i, pod) in [pod_a, pod_a, pod_b].into_iter().enumerate() {
        let r = &v["results"][i];
        assert_eq!(r["status"], "resolved", "{}: {r:#}", lines[i]);
        assert_eq!(r["pod_ip"], pod.to_string(), "{}: {r:#}", lines[i]);
        assert_eq!(r["pod_port"], 42000, "{r:#}");
    }
    // A's end is known as an upper bound: B took its reply tuple (or the
    // agent found it gone first), at or before B's start.
    let all = search(&c, &by_port);
    assert_eq!(all["total"], 2, "{all:#}");
    let rec = |pod: IpAddr| {
        all["records"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["src_ip"] == pod.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("{pod} missing: {all:#}"))
    };
    let (ra, rb) = (rec(pod_a), rec(pod_b));
    assert_eq!(ra["kind"], "recovered", "{ra:#}");
    let ends: &[&str] = if no_destroy {
        &["superseded", "gone"]
    } else {
        &["superseded", "gone", "destroy"]
    };
    assert!(
        ends.contains(&ra["end_kind"].as_str().unwrap_or("")),
        "{ra:#}"
    );
    assert!(
        ra["end"].as_str().unwrap() <= rb["start"].as_str().unwrap(),
        "{ra:#} {rb:#}"
    );
    assert_eq!(rb["kind"], "new", "{rb:#}");

    if !v6 && !no_destroy {
        // Case 5: the kind filter, on the same real run.
        let pods = |kind: &str| {
            let v = search(&c, &format!("{by_port}&kind={kind}"));
            let p: Vec<String> = v["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["src_ip"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(v["total"], p.len(), "{v:#}");
            p
        };
        assert_eq!(pods("recovered"), vec![pod_a.to_string()]);
        assert_eq!(pods("new"), vec![pod_b.to_string()]);
        assert!(pods("destroy").is_empty());
        assert!(pods("midstream").is_empty());
        let (code, e) = c.api(&format!("/api/v1/connections?{by_port}&kind=opened"));
        assert_eq!(code, 400, "{e}");
        assert_eq!(e["parameter"], "kind", "{e}");
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("new, midstream, recovered, destroy"),
            "{e}"
        );
    }
}

#[test]
fn agent_restart_then_port_reuse_resolves_each_pod_v4_and_kind_filters() {
    if !require_root() {
        return;
    }
    agent_restart_then_port_reuse(false, false);
}

#[test]
fn agent_restart_then_port_reuse_without_destroys_resolves_each_pod_v4() {
    if !require_root() {
        return;
    }
    agent_restart_then_port_reuse(false, true);
}

#[test]
fn agent_restart_then_port_reuse_resolves_each_pod_v6() {
    if !require_root() {
        return;
    }
    agent_restart_then_port_reuse(true, false);
}

#[test]
fn agent_restart_then_port_reuse_without_destroys_resolves_each_pod_v6() {
    if !require_root() {
        return;
    }
    agent_restart_then_port_reuse(true, true);
}

/// Issue 11 case 4: 2,000 UDP flows (each from its own source port, one
/// datagram and its echo), each reported as a NEW and, once the node's
/// short UDP timeout expired it, a DESTROY; the collector collects at most
/// 500 records per search. `total` is the number of flows the server
/// received, before and after the DESTROYs arrived.
#[test]
fn total_counts_udp_flows_not_records_past_the_cap() {
    if !require_root() {
        return;
    }
    const FLOWS: u64 = 2000;
    let (mut topo, c) = cluster(1, "  max_collected_records: 500\n");
    sysctl(
        &topo,
        &[
            "net.netfilter.nf_conntrack_udp_timeout=1",
            "net.netfilter.nf_conntrack_udp_timeout_stream=1",
        ],
    );
    let udp = topo.start_udp_server(5353);
    let agent = start_agent(&mut topo, &c, &[5353], "");
    let script = topo.tmp_dir().join("udp_flows.py");
    std::fs::write(&script, UDP_FLOWS).unwrap();
    let srv = topo.srv_ip4().to_string();
    let out = must_in(
        topo.pod_ns(0),
        &[
            "python3",
            &script.display().to_string(),
            &srv,
            "5353",
            "20000",
            &FLOWS.to_string(),
        ],
    );
    assert_eq!(out.trim(), FLOWS.to_string());
    // The independent count: every flow's datagram reached the server.
    let flows = udp.seen().len() as u64;
    assert_eq!(flows, FLOWS);
    // Every entry expired (so the kernel sent its DESTROY), and the agent
    // had every NEW and DESTROY acknowledged by the collector.
    wait_for(WAIT, "the node's UDP entries to expire", || {
        let out = topo.node_conntrack(&["-L", "-p", "udp", "--dport", "5353"]);
        (!out.contains("dport=5353")).then_some(())
    });
    wait_for(WAIT, "every NEW and DESTROY acknowledged", || {
        (agent.metric("ctw_uplink_records_acked_total")? >= (2 * FLOWS) as f64).then_some(())
    });
    let q = "protocol=udp&dst_port=5353&limit=10";
    let v = wait_for(WAIT, "every record searchable", || {
        let v = search(&c, q);
        (v["total"] == flows).then_some(v)
    });
    assert_eq!(v["records"].as_array().unwrap().len(), 10);
    // Stable: the same once more (the count is not a moment's luck of
    // which records arrived).
    assert_eq!(search(&c, q)["total"], flows);
    assert_eq!(search(&c, &format!("{q}&kind=new"))["total"], flows);
}

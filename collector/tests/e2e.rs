//! End to end in network namespaces: two nodes with pods behind masquerade,
//! each with its own agent streaming to the collector over mTLS; an ingress
//! namespace running nginx (Debian) whose access log has `$remote_addr
//! $remote_port $msec`; the collector in its own namespace. Needs root.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ctw_testkit::agent::Agent;
use ctw_testkit::cluster::Cluster;
use ctw_testkit::collector::Collector;
use ctw_testkit::{require_root, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Parse a line of the testkit's nginx format
/// (`$remote_addr $remote_port $msec $server_port`).
fn parse(line: &str) -> (IpAddr, u16, f64) {
    let f: Vec<&str> = line.split_whitespace().collect();
    let parsed = (|| {
        Some((
            f.first()?.parse().ok()?,
            f.get(1)?.parse().ok()?,
            f.get(2)?.parse().ok()?,
        ))
    })();
    parsed.unwrap_or_else(|| panic!("unexpected access line {line:?}"))
}

/// One request from `pod` on `node`; its nginx line, parsed.
fn request(c: &Cluster, node: usize, pod: usize, local_port: Option<u16>) -> (IpAddr, u16, f64) {
    parse(&c.request(node, pod, local_port, &[]))
}

fn search(c: &Collector, query: &str) -> Value {
    let (code, v) = c.api(&format!("/api/v1/connections?{query}"));
    assert_eq!(code, 200, "{query}: {v}");
    v
}

#[test]
fn every_nginx_line_resolves_to_the_pod_that_sent_it() {
    if !require_root() {
        return;
    }
    let c = Cluster::start(2, None, "", "");
    // (nginx line, pod address, node) for every request.
    let mut sent: Vec<((IpAddr, u16, f64), Ipv4Addr, String)> = Vec::new();
    for node in 0..2 {
        // Two pods use the same node port at different times: pod 0 with
        // local port 45000 (masquerade keeps it), its entry is deleted, then
        // pod 1 with local port 45000 gets the same node port.
        let first = request(&c, node, 0, Some(45000));
        c.topo
            .conntrack_on(node, &["-D", "-p", "tcp", "--orig-port-src", "45000"]);
        let second = request(&c, node, 1, Some(45000));
        assert_eq!(
            first.1, second.1,
            "the node port was not reused: {first:?} {second:?}"
        );
        sent.push((first, c.topo.pod_ip4_of(node, 0), format!("node-{node}")));
        sent.push((second, c.topo.pod_ip4_of(node, 1), format!("node-{node}")));
        for pod in 0..2 {
            for _ in 0..3 {
                let line = request(&c, node, pod, None);
                sent.push((line, c.topo.pod_ip4_of(node, pod), format!("node-{node}")));
            }
        }
    }
    for ((addr, port, msec), pod, node) in &sent {
        assert_eq!(
            *addr,
            IpAddr::V4(c.topo.node_ip4_of(if node == "node-0" { 0 } else { 1 }))
        );
        let q = format!("snat_ip={addr}&snat_port={port}&at={msec:.3}&window=2m");
        let v = wait_for(WAIT, "the connection to be searchable", || {
            let v = search(&c.collector, &q);
            (v["total"].as_u64().unwrap_or(0) >= 1).then_some(v)
        });
        let best = &v["records"][0];
        assert_eq!(best["src_ip"], pod.to_string(), "{q}: {v:#}");
        assert_eq!(best["node"], node.as_str(), "{q}: {v:#}");
        assert_eq!(best["dst_port"], 80);
        assert_eq!(best["alive_at"], true, "{q}: {v:#}");
        assert_eq!(v["complete"], true, "{v:#}");
    }
    // The reused port: both connections are found, the right one first.
    for node in 0..2 {
        let ((_, port, msec), _, _) = &sent[node * 8 + 1];
        let v = search(
            &c.collector,
            &format!(
                "snat_ip={}&snat_port={port}&at={msec:.3}",
                c.topo.node_ip4_of(node)
            ),
        );
        assert_eq!(v["total"], 2, "{v:#}");
    }
    // Every agent connected, with its addresses.
    let (_, agents) = c.collector.api("/api/v1/agents");
    for node in 0..2 {
        let a = agents["agents"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|a| a["node"] == format!("node-{node}"))
                    .cloned()
            })
            .unwrap_or_default();
        assert_eq!(a["connected"], true, "{agents:#}");
    }
    // Live lookup through the collector, by the reply tuple an nginx line gives.
    let (_pid, lport) = {
        let mut topo = c.topo;
        let r = topo.hold_tcp(0, IpAddr::V4(topo.srv_ip4()), 80);
        let conn = wait_for(WAIT, "the held connection in node-0's log", || {
            c.agents[0]
                .records("new_connection")
                .into_iter()
                .find(|v| v["src_port"] == r.1 && v["src_ip"] == topo.pod_ip4(0).to_string())
        });
        let snat_port = conn["snat_port"].as_u64().unwrap_or(0);
        let q = format!(
            "/api/v1/conntrack/query?tuple=reply&src_ip={}&src_port=80&dst_ip={}&dst_port={snat_port}",
            topo.srv_ip4(),
            topo.node_ip4()
        );
        let (code, v) = c.collector.api(&q);
        assert_eq!(code, 200, "{v:#}");
        assert_eq!(v["node"], "node-0");
        assert_eq!(v["status"], "ESTABLISHED");
        assert_eq!(v["origin"]["src"], topo.pod_ip4(0).to_string());
        let (code, v) = c.collector.api(
            "/api/v1/conntrack/query?src_ip=198.18.250.250&src_port=1&dst_ip=198.19.250.250&dst_port=80",
        );
        assert_eq!(code, 404, "{v:#}");
        drop(topo);
        r
    };
    let _ = lport;
}

#[test]
fn killed_and_stopped_collector_loses_and_duplicates_nothing() {
    if !require_root() {
        return;
    }
    // Small batches and a tiny in-flight window: an outage of a few dozen
    // flows overflows memory into the spool.
    let mut c = Cluster::start(
        1,
        None,
        "  batch_max_records: 5\n  batch_max_delay_ms: 50\n  max_inflight_batches: 2\n",
        "capture_destroy: false\n",
    );
    let mut expected: BTreeSet<(String, u16)> = BTreeSet::new();
    let mut port = 46000u16;
    let mut flows = |c: &Cluster, n: usize, expected: &mut BTreeSet<(String, u16)>| {
        for _ in 0..n {
            for node in 0..2 {
                request(c, node, 0, Some(port));
                expected.insert((c.topo.pod_ip4_of(node, 0).to_string(), port));
            }
            port += 1;
        }
    };
    flows(&c, 10, &mut expected);
    // kill -9 with records in flight, flows go on, restart.
    c.collector.kill9(&mut c.topo);
    flows(&c, 15, &mut expected);
    c.collector.restart(&mut c.topo);
    flows(&c, 5, &mut expected);
    // Second kill -9, a longer outage than memory holds (2 x 5 records).
    c.collector.kill9(&mut c.topo);
    flows(&c, 40, &mut expected);
    c.collector.restart(&mut c.topo);
    flows(&c, 5, &mut expected);
    c.collector.wait_connected(&["node-0", "node-1"]);

    let want = expected.len();
    let got = wait_for(Duration::from_secs(60), "every flow in the index", || {
        let v = search(&c.collector, "limit=10000&dst_port=80");
        (v["total"].as_u64() == Some(want as u64)).then_some(v)
    });
    let seen: BTreeSet<(String, u16)> = got["records"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["src_ip"].as_str().unwrap_or_default().to_string(),
                        r["src_port"].as_u64().unwrap_or(0) as u16,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(seen, expected);
    // Exactly one stored record per flow: no replayed batch was stored twice.
    let (_, metrics) = c.collector.get("/metrics");
    let stored: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ctw_collector_store_records "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0);
    assert_eq!(stored, want as f64, "{metrics}");
    // The agents really went through their spools, and since they spooled
    // everything, nothing is missing: the answer says complete.
    let spooled: f64 = c
        .agents
        .iter()
        .map(|a| a.metric("ctw_uplink_records_spooled_total").unwrap_or(0.0))
        .sum();
    assert!(spooled > 0.0, "no record went through a spool");
    let v = search(&c.collector, "limit=1");
    assert_eq!(v["complete"], true, "{v:#}");

    // An agent restart is a capture gap: complete turns false.
    c.agents[1].signal("KILL");
    let spool = c.topo.tmp_dir().join("spool-1");
    let yaml = c.collector.agent_yaml("node-1", &spool, "");
    let again = Agent::start_on(
        &mut c.topo,
        1,
        "node-1",
        &[80],
        &format!("{yaml}capture_destroy: false\n"),
    );
    c.collector.wait_connected(&["node-0", "node-1"]);
    let v = search(&c.collector, "limit=1&node=node-1");
    assert_eq!(v["complete"], false, "{v:#}");
    assert!(
        v["gaps"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["reason"] == "agent_restarted")),
        "{v:#}"
    );
    drop(again);
}

/// A heartbeat's time from `/api/v1/agents` (RFC 3339), as ns since the epoch.
fn heartbeat_ns(a: &Value) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(a["last_heartbeat"].as_str()?).ok()?;
    u64::try_from(t.timestamp_nanos_opt()?).ok()
}

#[test]
fn an_idle_agent_heartbeats_with_its_live_entries() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(1, None, "  heartbeat_interval_ms: 500\n", "");
    // One connection held open: node-0's table holds exactly one watched
    // entry, and the agent has captured it.
    let srv = IpAddr::V4(c.topo.srv_ip4());
    let (pid, lport) = c.topo.hold_tcp(0, srv, 80);
    let newest = wait_for(WAIT, "the held connection in node-0's log", || {
        c.agents[0]
            .records("new_connection")
            .into_iter()
            .find(|v| v["src_port"] == lport)
    });
    let kernel: Vec<String> = c
        .topo
        .conntrack_on(0, &["-L", "-p", "tcp", "--dport", "80"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    assert_eq!(kernel.len(), 1, "{kernel:?}");
    assert!(kernel[0].contains(&format!("sport={lport} ")), "{kernel:?}");
    // From now on no traffic: only heartbeats can move last_heartbeat.
    let since = ctw_common::now_ns();
    let agent = |c: &Cluster| {
        let (_, v) = c.collector.api("/api/v1/agents");
        v["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["node"] == "node-0").cloned())
            .unwrap_or_default()
    };
    let first = wait_for(WAIT, "a heartbeat newer than the wait", || {
        let a = agent(&c);
        (heartbeat_ns(&a)? > since).then_some(a)
    });
    let at_first = heartbeat_ns(&first).unwrap_or(0);
    let second = wait_for(WAIT, "the next heartbeat", || {
        let a = agent(&c);
        (heartbeat_ns(&a)? > at_first).then_some(a)
    });
    for a in [&first, &second] {
        assert_eq!(a["connected"], true, "{a:#}");
        assert_eq!(a["heartbeat_interval_seconds"], 0.5, "{a:#}");
        assert_eq!(a["live_entries"], kernel.len(), "{a:#}");
        // The newest record is the held connection's NEW (the log's ts is
        // the record's event time, to the millisecond).
        let logged = chrono::DateTime::parse_from_str(
            newest["ts"].as_str().unwrap_or_default(),
            "%Y-%m-%dT%H:%M:%S%.3f%z",
        )
        .map(|t| t.timestamp_millis())
        .unwrap_or_else(|e| panic!("ts: {e}: {newest}"));
        let said =
            chrono::DateTime::parse_from_rfc3339(a["last_event_at"].as_str().unwrap_or_default())
                .map(|t| t.timestamp_millis())
                .unwrap_or_else(|e| panic!("last_event_at: {e}: {a:#}"));
        assert_eq!(said, logged, "{a:#} {newest}");
        let agent_time = chrono::DateTime::parse_from_rfc3339(
            a["heartbeat_agent_time"].as_str().unwrap_or_default(),
        )
        .map(|t| t.timestamp_nanos_opt().unwrap_or(0) as u64)
        .unwrap_or(0);
        assert!(agent_time > since, "{a:#}");
    }
    c.topo.kill(pid);
}

/// Closes a TCP connection to `dst:80` from `local_port` with a reset
/// (SO_LINGER 0) after nginx answered a keep-alive request.
const RESET_AFTER_RESPONSE: &str = r#"
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(5)
s.connect((sys.argv[1], 80))
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
got = b""
while b"ok" not in got:
    b = s.recv(4096)
    if not b:
        break
    got += b
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print(got.split(b"\r\n")[0].decode())
"#;

/// The TCP state of a `conntrack -E` DESTROY line: the word before the
/// first `src=`.
fn event_state(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| w.starts_with("src="))?;
    words.get(i.checked_sub(1)?).copied()
}

#[test]
fn closed_connections_carry_the_state_of_their_destroy() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(2, None, "", "");
    let node_ns = c.topo.node_ns_of(0).to_string();
    // Short TIME_WAIT and CLOSE timeouts on node-0: the kernel drops the
    // closed entries (and sends their DESTROY) within seconds.
    for (k, v) in [
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
    ] {
        ctw_testkit::must_in(&node_ns, &["sysctl", "-qw", &format!("{k}={v}")]);
    }
    // What the kernel reports, independently of the agent.
    let events = c.topo.tmp_dir().join("conntrack-destroy.log");
    let watch = format!(
        "exec stdbuf -oL conntrack -E -e DESTROY -p tcp --dport 80 > {}",
        events.display()
    );
    let ev_pid = c.topo.spawn_in(&node_ns, &["sh", "-c", &watch]);
    // (DESTROY events go to whoever listens when the entry is dropped,
    // seconds after the requests; the agent set nf_conntrack_events=1.)
    let srv = c.topo.srv_ip_for_node(0).to_string();
    let (normal_pod, reset_pod) = (c.topo.pod_ip4_of(0, 0), c.topo.pod_ip4_of(0, 1));
    let (normal_port, reset_port) = (46100u16, 46101u16);
    // A request closed normally (curl closes after the answer).
    c.request(0, 0, Some(normal_port), &[]);
    // A request closed with a reset.
    let out = ctw_testkit::run_in(
        c.topo.pod_ns_of(0, 1),
        &[
            "python3",
            "-c",
            RESET_AFTER_RESPONSE,
            &srv,
            &reset_port.to_string(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("200"),
        "{out:?}"
    );
    // Listing the table makes the kernel drop expired entries at once
    // (garbage collection is lazy otherwise).
    let destroyed = |port: u16| {
        let log = std::fs::read_to_string(&events).unwrap_or_default();
        log.lines()
            .find(|l| l.contains("[DESTROY]") && l.contains(&format!(" sport={port} ")))
            .and_then(event_state)
            .map(str::to_string)
    };
    let (normal_state, reset_state) = wait_for(WAIT, "both DESTROY events", || {
        c.topo
            .conntrack_on(0, &["-L", "-p", "tcp", "--dport", "80"]);
        Some((destroyed(normal_port)?, destroyed(reset_port)?))
    });
    c.topo.kill(ev_pid);
    assert_eq!(
        (normal_state.as_str(), reset_state.as_str()),
        ("TIME_WAIT", "CLOSE"),
        "what conntrack -E reported"
    );
    for (pod, port, want) in [
        (normal_pod, normal_port, &normal_state),
        (reset_pod, reset_port, &reset_state),
    ] {
        let q = format!("src_ip={pod}&src_port={port}&protocol=tcp");
        let v = wait_for(WAIT, "the connection's end to be searchable", || {
            let v = search(&c.collector, &q);
            v["records"][0]["end"].is_string().then_some(v)
        });
        let r = &v["records"][0];
        assert_eq!(v["total"], 1, "{q}: {v:#}");
        assert_eq!(r["kind"], "new", "{r:#}");
        assert_eq!(r["state"], "SYN_SENT", "state at the first packet: {r:#}");
        assert_eq!(r["end_kind"], "destroy", "{r:#}");
        assert_eq!(r["end_state"], want.as_str(), "{r:#}");
        // The agent's log line of the DESTROY (what the kernel sent it)
        // says the same.
        let logged = c.agents[0]
            .records("connection_closed")
            .into_iter()
            .find(|l| l["src_port"] == port)
            .unwrap_or_else(|| panic!("no DESTROY line for port {port}"));
        assert_eq!(logged["state"], want.as_str(), "{logged}");
    }
}

//! Resolving nginx lines under conditions of real clusters (issue 11), in
//! network namespaces with real nftables NAT, real nginx and the real agent
//! and collector binaries (`ctw_testkit::cluster::Cluster`: two nodes, pods
//! behind masquerade, nginx on port 80 in the server namespace). nginx logs
//! `$remote_addr $remote_port $msec $request_time "$http_x_pod"`; every
//! request names its pod in an `X-Pod` header, so each line says which pod
//! really sent it. Needs root.
//!
//! - keepalive idle past the node's established timeout: one connection,
//!   several conntrack entries (the later ones picked up mid-stream) →
//!   `resolved`, one candidate, `midstream` (IPv4 and IPv6);
//! - `$request_time` makes the line an interval; a line between two pods'
//!   uses of one node port, within the clock-skew tolerance, is
//!   `ambiguous` with both ranked, never one of them silently;
//! - the agent stopped (SIGSTOP) 5 s while a pod connects, without kernel
//!   timestamps: the record is 5 s late, the line still resolves;
//! - traffic the node's conntrack never sees (`notrack`, NAT done
//!   statelessly as eBPF masquerade would) → `not_observed`, naming the
//!   node (IPv4 and IPv6);
//! - conntrack zone 7: the collector's live lookup finds the entry by
//!   trying the zones the node recorded (also after a collector restart,
//!   from the index).

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::Duration;

use ctw_common::now_ns;
use ctw_testkit::cluster::Cluster;
use ctw_testkit::{must_in, require_root, run_in, wait_for};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const FORMAT: &str = r#"$remote_addr $remote_port $msec $request_time "$http_x_pod""#;

fn start() -> Cluster {
    Cluster::start(2, Some(FORMAT), "", "")
}

/// (remote_addr, remote_port, msec in ns, pod header) of a line.
fn fields(line: &str) -> (IpAddr, u16, u64, String) {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 5, "unexpected access line {line:?}");
    let msec = ctw_common::api::parse_time(f[2]).unwrap();
    (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        msec,
        f[4].trim_matches('"').to_string(),
    )
}

/// A line as nginx would write it for a request to `addr:port` that ended
/// at `msec_ns` after `request_time_ms`.
fn line_at(addr: IpAddr, port: u16, msec_ns: u64, request_time_ms: u64, pod: &str) -> String {
    let ms = msec_ns / 1_000_000;
    format!(
        "{addr} {port} {}.{:03} {}.{:03} \"{pod}\"",
        ms / 1000,
        ms % 1000,
        request_time_ms / 1000,
        request_time_ms % 1000
    )
}

fn resolve(c: &Cluster, lines: &[String], extra: Value) -> Value {
    let mut body = json!({ "lines": lines, "log_format": FORMAT });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (code, v) = c
        .collector
        .post_json("/api/v1/resolve", &body, c.topo.tmp_dir());
    assert_eq!(code, 200, "{v:#}");
    v
}

/// Resolve until no line is `not_found` / `not_observed` any more (records
/// reach the collector within the batch delay), or the deadline.
fn resolve_all(c: &Cluster, lines: &[String], extra: Value) -> Value {
    wait_for(WAIT, "every line to find its connection", || {
        let v = resolve(c, lines, extra.clone());
        let s = &v["summary"];
        (s["not_found"] == 0 && s["not_observed"] == 0).then_some(v)
    })
}

/// Wait until the collector has `n` connections with this SNAT address and
/// port (records arrive within the agents' batch delay).
fn wait_connections(c: &Cluster, addr: IpAddr, port: u16, n: u64) {
    let q = format!("/api/v1/connections?snat_ip={addr}&snat_port={port}");
    wait_for(WAIT, "the connections at the collector", || {
        let (code, v) = c.collector.api(&q);
        (code == 200 && v["total"].as_u64().unwrap_or(0) >= n).then_some(())
    });
}

/// The access-log lines whose `X-Pod` header is `pod`, in order.
fn lines_of(c: &Cluster, pod: &str) -> Vec<String> {
    std::fs::read_to_string(&c.nginx.access_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with(&format!("\"{pod}\"")))
        .map(str::to_string)
        .collect()
}

/// argv: dst, local port, requests, seconds between,
/// pod name. One HTTP/1.1 connection, several requests on it.
const KEEPALIVE: &str = r#"
import http.client, sys, time
dst, lport, n, gap, pod = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
any_addr = "::" if ":" in dst else "0.0.0.0"
c = http.client.HTTPConnection(dst, 80, source_address=(any_addr, lport), timeout=10)
for i in range(n):
    if i:
        time.sleep(gap)  # tidy: the idle time is the stimulus
    c.request("GET", "/", headers={"X-Pod": pod})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    assert c.sock.getsockname()[1] == lport
print("ok", flush=True)
"#;

#[test]
fn keepalive_entries_picked_up_midstream_are_one_connection() {
    if !require_root() {
        return;
    }
    let c = start();
    let node = c.topo.node_ns_of(0).to_string();
    must_in(
        &node,
        &[
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_tcp_timeout_established=5",
        ],
    );
    let v4 = format!("{}", c.topo.srv_ip4());
    let v6 = format!("{}", c.topo.srv_ip6());
    // Both families at once: pod 0 over IPv4, pod 1 over IPv6, each one
    // connection from port 43000 with three requests 8 s apart.
    let clients: Vec<_> = [(0usize, v4, "ka-v4"), (1, v6, "ka-v6")]
        .into_iter()
        .map(|(pod, dst, name)| {
            let ns = c.topo.pod_ns_of(0, pod).to_string();
            std::thread::spawn(move || {
                let out = run_in(
                    &ns,
                    &["python3", "-c", KEEPALIVE, &dst, "43000", "3", "8", name],
                );
                assert!(
                    out.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            })
        })
        .collect();
    for t in clients {
        t.join().unwrap();
    }
    // The node's conntrack held more than one entry for each connection:
    // the later ones NEW in state ESTABLISHED (picked up mid-stream).
    for (pod, name) in [(0usize, "ka-v4"), (1, "ka-v6")] {
        let lines = lines_of(&c, name);
        assert_eq!(lines.len(), 3, "{lines:?}");
        let ports: Vec<u16> = lines.iter().map(|l| fields(l).1).collect();
        assert!(
            ports.iter().all(|p| *p == ports[0]),
            "one connection: {ports:?}"
        );
        let pod_ip: IpAddr = if pod == 0 {
            c.topo.pod_ip4_of(0, 0).into()
        } else {
            c.topo.pod_ip6(1).into()
        };
        let v = resolve_all(&c, &lines, json!({}));
        for (i, r) in v["results"].as_array().unwrap().iter().enumerate() {
            assert_eq!(r["status"], "resolved", "{name} line {i}: {r:#}");
            assert_eq!(r["pod_ip"], pod_ip.to_string(), "{r:#}");
            assert_eq!(r["node"], "node-0", "{r:#}");
            assert_eq!(r["candidates"], 1, "{r:#}");
            assert_eq!(r["alive_candidates"], 1, "{r:#}");
            if i > 0 {
                // The line's own entry was picked up mid-stream; the
                // earlier ones are merged into the answer.
                assert_eq!(r["midstream"], true, "{r:#}");
                assert_eq!(r["record"]["midstream"], true, "{r:#}");
                assert!(r["merged"].as_u64().unwrap() >= 2, "{r:#}");
            } else {
                assert!(r.get("midstream").is_none(), "{r:#}");
            }
        }
        // The agent saw the later entries as NEW in state ESTABLISHED.
        let midstream_news = c.agents[0]
            .records("new_connection")
            .iter()
            .filter(|x| x["src_ip"] == pod_ip.to_string() && x["src_port"] == 43000)
            .filter(|x| x["state"] == "ESTABLISHED")
            .count();
        assert!(
            midstream_news >= 2,
            "{name}: {midstream_news} mid-stream NEW"
        );
    }
}

#[test]
fn request_time_interval_and_clock_skew() {
    if !require_root() {
        return;
    }
    let c = start();
    // Pod 0 uses node port 45300, its entry is deleted, and 400 ms later
    // pod 1 uses the same node port.
    let l0 = c.request(0, 0, Some(45300), &["-H", "X-Pod: p0"]);
    let before_delete = now_ns();
    c.topo
        .conntrack_on(0, &["-D", "-p", "tcp", "--orig-port-src", "45300"]);
    let deleted = now_ns();
    assert!(
        deleted - before_delete < 300_000_000,
        "conntrack -D took {} ms",
        (deleted - before_delete) / 1_000_000
    );
    wait_for(Duration::from_secs(3), "400 ms after the delete", || {
        (now_ns() > deleted + 400_000_000).then_some(())
    });
    let l1 = c.request(0, 1, Some(45300), &["-H", "X-Pod: p1"]);
    let (addr, port, _, _) = fields(&l0);
    assert_eq!(fields(&l1).1, port, "the node port was not reused");
    let pod0 = c.topo.pod_ip4_of(0, 0).to_string();
    let pod1 = c.topo.pod_ip4_of(0, 1).to_string();
    wait_connections(&c, addr, port, 2);

    // The real lines: each is its own pod's.
    let v = resolve_all(&c, &[l0.clone(), l1.clone()], json!({}));
    assert_eq!(v["results"][0]["status"], "resolved", "{v:#}");
    assert_eq!(v["results"][0]["pod_ip"], pod0, "{v:#}");
    assert_eq!(v["results"][1]["status"], "resolved", "{v:#}");
    assert_eq!(v["results"][1]["pod_ip"], pod1, "{v:#}");

    // A line written 200 ms after the delete, as a log host whose clock
    // differs from the node's would write pod 1's line: no connection was
    // alive then; both pods' are within the 1 s skew. Ambiguous, both
    // ranked, neither silently chosen.
    let between = deleted + 200_000_000;
    let skewed = line_at(addr, port, between, 0, "p1");
    let v = resolve(&c, std::slice::from_ref(&skewed), json!({}));
    let r = &v["results"][0];
    assert_eq!(r["status"], "ambiguous", "{r:#}");
    assert_eq!(r["match"], "skew", "{r:#}");
    assert_eq!(r["alive_candidates"], 0, "{r:#}");
    let ranked: Vec<&str> = r["ranked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["pod_ip"].as_str().unwrap())
        .collect();
    assert!(
        ranked.contains(&pod0.as_str()) && ranked.contains(&pod1.as_str()),
        "{r:#}"
    );

    // The same end time with $request_time 0.5 s: the request ran from
    // 300 ms before the delete, while only pod 0's connection held the
    // port (pod 1 connected 400 ms after the delete).
    let long = line_at(addr, port, between, 500, "p0");
    let v = resolve(&c, std::slice::from_ref(&long), json!({}));
    let r = &v["results"][0];
    assert_eq!(r["status"], "resolved", "{r:#}");
    assert_eq!(r["pod_ip"], pod0, "{r:#}");
    assert_eq!(r["match"], "alive", "{r:#}");

    // Skew is bounded and validated.
    let (code, v) = c.collector.post_json(
        "/api/v1/resolve",
        &json!({"lines": [skewed], "log_format": FORMAT, "skew": "2m"}),
        c.topo.tmp_dir(),
    );
    assert_eq!(code, 400, "{v:#}");
    assert_eq!(v["parameter"], "skew");
}

#[test]
fn a_record_read_late_after_the_agent_was_stopped_still_resolves() {
    if !require_root() {
        return;
    }
    let c = start();
    // No kernel timestamps: a record's time is when the agent read it.
    must_in(
        c.topo.node_ns_of(0),
        &["sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=0"],
    );
    c.agents[0].signal("STOP");
    let stopped = now_ns();
    let line = c.request(0, 0, None, &["-H", "X-Pod: p0"]);
    // The agent stays stopped 5 s (tidy: the stimulus), then reads the event.
    std::thread::sleep(
        Duration::from_secs(5)
            .saturating_sub(Duration::from_nanos(now_ns().saturating_sub(stopped))),
    );
    c.agents[0].signal("CONT");
    let v = wait_for(WAIT, "the line to resolve", || {
        let v = resolve(&c, std::slice::from_ref(&line), json!({}));
        (v["results"][0]["status"] == "resolved").then_some(v)
    });
    let r = &v["results"][0];
    assert_eq!(r["pod_ip"], c.topo.pod_ip4_of(0, 0).to_string(), "{r:#}");
    assert_eq!(r["node"], "node-0", "{r:#}");
    // The record really is late: it starts after the line was written.
    let start = ctw_common::api::parse_time(r["record"]["start"].as_str().unwrap()).unwrap();
    assert!(start > fields(&line).2, "{r:#}");
}

#[test]
fn traffic_the_node_conntrack_never_sees_is_not_observed() {
    if !require_root() {
        return;
    }
    let c = start();
    let t = &c.topo;
    let (p4, s4, n4) = (t.pod_ip4_of(0, 0), t.srv_ip4(), t.node_ip4());
    let (p6, s6, n6) = (t.pod_ip6(0), t.srv_ip6(), t.node_ip6());
    // Pod 0's traffic to nginx from ports 47000 (IPv4) and 47001 (IPv6) is untracked and NATed
    // statelessly (as an eBPF masquerade would): the node's conntrack
    // never has an entry for it.
    let (lp, lp6) = (47000, 47001);
    let rules = format!(
        "table inet ctwnotrack {{
    chain pre {{
        type filter hook prerouting priority raw;
        ip saddr {p4} ip daddr {s4} tcp sport {lp} tcp dport 80 notrack
        ip saddr {s4} ip daddr {n4} tcp sport 80 tcp dport {lp} notrack
        ip saddr {s4} ip daddr {n4} tcp sport 80 tcp dport {lp} ip daddr set {p4}
        ip6 saddr {p6} ip6 daddr {s6} tcp sport {lp6} tcp dport 80 notrack
        ip6 saddr {s6} ip6 daddr {n6} tcp sport 80 tcp dport {lp6} notrack
        ip6 saddr {s6} ip6 daddr {n6} tcp sport 80 tcp dport {lp6} ip6 daddr set {p6}
    }}
    chain post {{
        type filter hook postrouting priority 0;
        oifname \"s0\" ip saddr {p4} ip daddr {s4} tcp sport {lp} tcp dport 80 ip saddr set {n4}
        oifname \"s0\" ip6 saddr {p6} ip6 daddr {s6} tcp sport {lp6} tcp dport 80 ip6 saddr set {n6}
    }}
}}
"
    );
    let file = t.tmp_dir().join("notrack.nft");
    std::fs::write(&file, rules).unwrap();
    must_in(t.node_ns_of(0), &["nft", "-f", &file.display().to_string()]);
    let mut lines = Vec::new();
    for (dst, name, port) in [
        (format!("http://{s4}/"), "nt-v4", "47000"),
        (format!("http://[{s6}]/"), "nt-v6", "47001"),
    ] {
        let hdr = format!("X-Pod: {name}");
        let out = run_in(
            t.pod_ns_of(0, 0),
            &[
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "5",
                "--local-port",
                port,
                "-H",
                &hdr,
                &dst,
            ],
        );
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let l = wait_for(WAIT, "nginx to log", || lines_of(&c, name).pop());
        // nginx saw the node's address: the traffic was NATed.
        let addr = fields(&l).0;
        assert!(addr == IpAddr::from(n4) || addr == IpAddr::from(n6), "{l}");
        lines.push(l);
    }
    // The node really has no entry for it.
    let listed = c
        .topo
        .conntrack_on(0, &["-L", "-p", "tcp", "--dport", "80"]);
    assert!(!listed.contains(&p4.to_string()), "{listed}");
    let v = resolve(&c, &lines, json!({}));
    for r in v["results"].as_array().unwrap() {
        assert_eq!(r["status"], "not_observed", "{r:#}");
        assert_eq!(r["node"], "node-0", "{r:#}");
        assert!(r.get("pod_ip").is_none(), "{r:#}");
        assert!(r["note"].as_str().unwrap().contains("node-0"), "{r:#}");
    }
    assert_eq!(v["summary"]["not_observed"], 2, "{v:#}");

    // Once node 0 records connections from its address, a line without a
    // match is `not_found` again: the capture works, nothing matched.
    c.request(0, 1, None, &["-H", "X-Pod: other"]);
    let v = wait_for(WAIT, "the node's other connection to arrive", || {
        let v = resolve(&c, &lines[..1], json!({}));
        (v["results"][0]["status"] == "not_found").then_some(v)
    });
    assert!(v["results"][0].get("pod_ip").is_none(), "{v:#}");
}

/// argv: dst, local port. Connects from that port and holds the connection.
const HOLD_FROM: &str = r#"
import signal, socket, sys
dst, lport = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", lport))
s.settimeout(5)
s.connect((dst, 80))
print(lport, flush=True)
while True:
    signal.pause()
"#;

#[test]
fn live_lookup_finds_an_entry_in_zone_7() {
    if !require_root() {
        return;
    }
    let mut c = start();
    let (pod_net, srv, node_ip) = (
        {
            let o = c.topo.pod_ip4_of(0, 0).octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        },
        c.topo.srv_ip4(),
        c.topo.node_ip4(),
    );
    let rules = format!(
        "table ip z {{\n    chain pre {{\n        type filter hook prerouting priority raw;\n        ip saddr {pod_net} ct zone set 7\n        ip saddr {srv} tcp sport 80 ct zone set 7\n    }}\n}}\n"
    );
    let file = c.topo.tmp_dir().join("zone.nft");
    std::fs::write(&file, rules).unwrap();
    must_in(
        c.topo.node_ns_of(0),
        &["nft", "-f", &file.display().to_string()],
    );
    let ns = c.topo.pod_ns_of(0, 0).to_string();
    let srv_s = srv.to_string();
    c.topo
        .spawn_in(&ns, &["python3", "-c", HOLD_FROM, &srv_s, "45001"]);
    // The entry exists in zone 7 (and not in zone 0).
    wait_for(WAIT, "the entry in zone 7", || {
        let out = run_in(
            c.topo.node_ns_of(0),
            &[
                "conntrack",
                "-L",
                "-w",
                "7",
                "-p",
                "tcp",
                "--sport",
                "45001",
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .contains("sport=45001")
            .then_some(())
    });
    // The collector has recorded it (so it knows node-0 uses zone 7).
    let q = format!("/api/v1/connections?snat_ip={node_ip}&snat_port=45001");
    wait_for(WAIT, "the record at the collector", || {
        let (code, v) = c.collector.api(&q);
        (code == 200 && v["total"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    let live = format!(
        "/api/v1/conntrack/query?tuple=reply&src_ip={srv}&src_port=80&dst_ip={node_ip}&dst_port=45001"
    );
    let (code, v) = c.collector.api(&live);
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(v["origin"]["src"], c.topo.pod_ip4_of(0, 0).to_string());
    assert_eq!(v["node"], "node-0");
    assert_eq!(v["zone"], 7, "{v:#}");
    assert_eq!(v["zones_tried"], json!([0, 7]), "{v:#}");
    // An explicit zone is the only one asked.
    let (code, v) = c.collector.api(&format!("{live}&zone=7"));
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(v["zones_tried"], json!([7]), "{v:#}");
    let (code, v) = c.collector.api(&format!("{live}&zone=0"));
    assert_eq!(code, 404, "{v:#}");
    let (code, v) = c.collector.api(&format!("{live}&zone=x"));
    assert_eq!(code, 400, "{v:#}");
    assert_eq!(v["parameter"], "zone");

    // A restarted collector has seen no batch yet: the index gives zone 7.
    c.collector.kill9(&mut c.topo);
    c.collector.restart(&mut c.topo);
    c.collector.wait_connected(&["node-0", "node-1"]);
    let (code, v) = c.collector.api(&live);
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(v["zone"], 7, "{v:#}");
    assert_eq!(v["zones_tried"], json!([0, 7]), "{v:#}");
}

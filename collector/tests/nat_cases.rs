//! Issue 11, NAT cases end to end (two nodes, one agent each, the collector
//! on a host; `testkit::cluster`): nginx lines of connections that reached
//! the server through a NodePort DNAT (case 8) or through a port rewrite the
//! kernel made without any SNAT rule (case 7) resolve to the client that
//! really sent them. The right answer is known from the test: which
//! namespace made the request. Needs root.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::Duration;

use ctw_testkit::cluster::Cluster;
use ctw_testkit::{must_in, require_root, wait_for};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// The testkit's nginx format (`Topology::start_nginx`).
const FORMAT: &str = "$remote_addr $remote_port $msec $server_port";

fn resolve(c: &Cluster, lines: &[String]) -> (u16, Value) {
    c.collector.post_json(
        "/api/v1/resolve",
        &json!({ "lines": lines, "log_format": FORMAT }),
        c.topo.tmp_dir(),
    )
}

/// Wait until nginx has logged `before + 1` lines; return the new one.
fn next_line(c: &Cluster, before: usize) -> String {
    wait_for(WAIT, "nginx to log the request", || {
        std::fs::read_to_string(&c.nginx.access_log)
            .unwrap_or_default()
            .lines()
            .nth(before)
            .map(str::to_string)
    })
}

fn logged(c: &Cluster) -> usize {
    std::fs::read_to_string(&c.nginx.access_log)
        .unwrap_or_default()
        .lines()
        .count()
}

/// An external client host and a NodePort on node 0: `node:30080` DNATs to
/// nginx on srv:80, masqueraded out of the node, over IPv4 or IPv6.
/// Returns (client namespace, client address, node address).
fn nodeport(c: &mut Cluster, v6: bool) -> (String, IpAddr, IpAddr) {
    let (client_ns, client4) = c.topo.add_host("x");
    let node_ns = c.topo.node_ns_of(0).to_string();
    let (client, node_ip, srv, family, to) = if v6 {
        let client = c.topo.host_ip6(&client_ns).unwrap();
        let srv = c.topo.srv_ip6();
        (
            IpAddr::from(client),
            IpAddr::from(c.topo.node_ip6()),
            format!("[{srv}]"),
            "ip6",
            "ip6 daddr",
        )
    } else {
        (
            IpAddr::from(client4),
            IpAddr::from(c.topo.node_ip4_of(0)),
            c.topo.srv_ip4().to_string(),
            "ip",
            "ip daddr",
        )
    };
    let ruleset = format!(
        "table {family} np {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    \
         {to} {node_ip} tcp dport 30080 dnat to {srv}:80\n  }}\n}}\n"
    );
    let f = c.topo.tmp_dir().join("nodeport.nft");
    std::fs::write(&f, ruleset).unwrap();
    must_in(&node_ns, &["nft", "-f", &f.display().to_string()]);
    (client_ns, client, node_ip)
}

fn curl_nodeport(c: &Cluster, client_ns: &str, node_ip: IpAddr, local_port: u16) -> String {
    let before = logged(c);
    let url = match node_ip {
        IpAddr::V6(a) => format!("http://[{a}]:30080/"),
        IpAddr::V4(a) => format!("http://{a}:30080/"),
    };
    ctw_testkit::curl_ok(client_ns, &url, Some(local_port), &[]);
    next_line(c, before)
}

/// Case 8: with `match: [original, reply]` the agent keeps the NodePort
/// connection (its original destination port is 30080, the reply source
/// port 80), marks the client external (`pod_cidrs`), and the nginx line
/// resolves to the external client.
#[test]
fn nodeport_line_resolves_to_the_external_client_with_reply_match() {
    nodeport_resolves_to_the_external_client(false);
}

/// Case 8 over IPv6.
#[test]
fn nodeport_line_resolves_to_the_external_client_with_reply_match_ipv6() {
    nodeport_resolves_to_the_external_client(true);
}

fn nodeport_resolves_to_the_external_client(v6: bool) {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(
        1,
        None,
        "",
        "match: [original, reply]\npod_cidrs: [198.18.0.0/16, \"fd00:198:18::/48\"]\n",
    );
    let (client_ns, client, node_ip) = nodeport(&mut c, v6);
    let line = curl_nodeport(&c, &client_ns, node_ip, 45200);
    // nginx saw the node (masquerade), not the client.
    let remote: IpAddr = line.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(remote, node_ip, "{line}");

    // The agent's own record, independently of the collector.
    let agent = &c.agents[0];
    let rec = wait_for(
        WAIT,
        "the agent's record of the NodePort connection",
        || {
            agent
                .records("new_connection")
                .into_iter()
                .find(|r| r["src_port"] == 45200 && r["dst_port"] == 30080)
        },
    );
    assert_eq!(rec["src_ip"], client.to_string(), "{rec}");
    assert_eq!(rec["reply_src_port"], 80, "{rec}");
    assert_eq!(rec["external"], true, "{rec}");
    assert!(
        agent
            .metric("conntrack_new_connections_total{port=\"80\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "counted under the watched port that matched"
    );

    // A pod's own request is not external.
    let pod_line = c.request(0, 0, Some(45201), &[]);
    let pod_rec = wait_for(WAIT, "the agent's record of the pod request", || {
        agent
            .records("new_connection")
            .into_iter()
            .find(|r| r["src_port"] == 45201)
    });
    assert!(pod_rec.get("external").is_none(), "{pod_rec}");

    let lines = vec![line.clone(), pod_line.clone()];
    let v = wait_for(WAIT, "both lines resolved", || {
        let (code, v) = resolve(&c, &lines);
        assert_eq!(code, 200, "{v:#}");
        (v["summary"]["resolved"] == 2).then_some(v)
    });
    let r = &v["results"][0];
    assert_eq!(r["status"], "resolved", "{r:#}");
    assert_eq!(r["pod_ip"], client.to_string(), "{line}: {r:#}");
    assert_eq!(r["node"], "node-0", "{r:#}");
    assert_eq!(r["record"]["external"], true, "{r:#}");
    let r = &v["results"][1];
    assert_eq!(r["pod_ip"], c.topo.pod_ip4_of(0, 0).to_string(), "{r:#}");
    assert!(r["record"].get("external").is_none(), "{r:#}");
}

/// Case 8, documented limit: with the default `match: [original]` a
/// NodePort connection to a watched backend port is not captured (its
/// original destination port is the node port).
#[test]
fn nodeport_is_not_captured_with_the_default_match() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(1, None, "", "");
    let (client_ns, _client, node_ip) = nodeport(&mut c, false);
    let line = curl_nodeport(&c, &client_ns, node_ip, 45210);
    // A watched pod request afterwards: events arrive in order, so once its
    // record is written the NodePort one would have been too.
    c.request(0, 0, Some(45211), &[]);
    let agent = &c.agents[0];
    wait_for(WAIT, "the pod request's record", || {
        agent
            .records("new_connection")
            .into_iter()
            .find(|r| r["src_port"] == 45211)
    });
    let all = agent.records("new_connection");
    assert!(
        !all.iter().any(|r| r["dst_port"] == 30080),
        "not captured: {all:?}"
    );
    let (code, v) = resolve(&c, &[line]);
    assert_eq!(code, 200, "{v:#}");
    assert_ne!(v["results"][0]["status"], "resolved", "{v:#}");
}

/// Python: from local port `argv[3]` (SO_REUSEADDR on both sockets), open a
/// connection to the VIP `argv[1]`:80 and keep it, then connect directly to
/// the server `argv[2]`:80; send one request on each (VIP first) and print
/// "ok" once both answered.
const TWO_FROM_ONE_PORT: &str = r#"
import socket, sys
vip, srv, lport = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ':' in srv else socket.AF_INET
def conn(dst):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('::' if fam == socket.AF_INET6 else '0.0.0.0', lport))
    s.settimeout(5)
    s.connect((dst, 80))
    return s
def get(s):
    s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
    data = b''
    while b'ok' not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    assert b' 200 ' in data, data
a = conn(vip)
b = conn(srv)
get(a)
get(b)
print('ok', flush=True)
"#;

/// Case 7: no SNAT rule on node 0 (its masquerade chain flushed, the server
/// routes back to the pods), a DNAT from a VIP to the server. A connection
/// to the VIP from port 4321 holds the reply tuple `srv:80 -> pod:4321`;
/// a direct connection from the same port would clash, so the kernel
/// rewrites its source port. The server logs the pod's address with another
/// port: that line resolves to the pod, like the VIP one. IPv4 and IPv6.
#[test]
fn kernel_port_rewrite_without_snat_resolves_to_the_pod() {
    if !require_root() {
        return;
    }
    let c = Cluster::start(1, None, "", "");
    let node_ns = c.topo.node_ns_of(0).to_string();
    let srv_ns = c.topo.srv_ns().to_string();
    // No SNAT: the NAT chain stays (nat hooks registered) but is empty.
    must_in(
        &node_ns,
        &["nft", "flush", "chain", "inet", "ctwtest", "post"],
    );
    let (p4, p6) = (c.topo.pod_ip4(0), c.topo.pod_ip6(0));
    let (n4, n6) = (c.topo.node_ip4(), c.topo.node_ip6());
    let (s4, s6) = (c.topo.srv_ip4(), c.topo.srv_ip6());
    let o = n4.octets();
    let vip4 = std::net::Ipv4Addr::new(o[0], o[1], o[2], 100);
    let g = n6.segments();
    let vip6 = std::net::Ipv6Addr::new(g[0], g[1], g[2], g[3], 0, 0, 0, 0x100);
    let q = p4.octets();
    let h = p6.segments();
    for route in [
        format!("{}.{}.{}.0/24 via {n4}", q[0], q[1], q[2]),
        format!("{:x}:{:x}:{:x}:{:x}::/64 via {n6}", h[0], h[1], h[2], h[3]),
    ] {
        let mut argv = vec!["ip", "route", "add"];
        argv.extend(route.split(' '));
        must_in(&srv_ns, &argv);
    }
    let ruleset = format!(
        "table inet vip {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    \
         ip daddr {vip4} tcp dport 80 dnat ip to {s4}:80\n    \
         ip6 daddr {vip6} tcp dport 80 dnat ip6 to [{s6}]:80\n  }}\n}}\n"
    );
    let f = c.topo.tmp_dir().join("vip.nft");
    std::fs::write(&f, ruleset).unwrap();
    must_in(&node_ns, &["nft", "-f", &f.display().to_string()]);

    let pod_ns = c.topo.pod_ns_of(0, 0).to_string();
    let python = must_in(
        &pod_ns,
        &["python3", "-c", "import sys; print(sys.executable)"],
    );
    for (vip, srv, pod_ip) in [
        (IpAddr::from(vip4), IpAddr::from(s4), IpAddr::from(p4)),
        (IpAddr::from(vip6), IpAddr::from(s6), IpAddr::from(p6)),
    ] {
        let before = logged(&c);
        let out = must_in(
            &pod_ns,
            &[
                python.trim(),
                "-c",
                TWO_FROM_ONE_PORT,
                &vip.to_string(),
                &srv.to_string(),
                "4321",
            ],
        );
        assert_eq!(out.trim(), "ok");
        let first = next_line(&c, before);
        let second = next_line(&c, before + 1);
        let addr_port = |l: &str| -> (IpAddr, u16) {
            let mut w = l.split(' ');
            (
                w.next().unwrap().parse().unwrap(),
                w.next().unwrap().parse().unwrap(),
            )
        };
        // What the server saw: the pod's own address both times, the
        // second time from a port the kernel chose.
        let (a1, p1) = addr_port(&first);
        let (a2, p2) = addr_port(&second);
        assert_eq!((a1, p1), (pod_ip, 4321), "{first}");
        assert_eq!(a2, pod_ip, "{second}");
        assert_ne!(
            p2, 4321,
            "the kernel rewrote the clashing source port: {second}"
        );

        // The agent's record of the rewritten connection: snat_ip == src_ip.
        let agent = &c.agents[0];
        let rec = wait_for(WAIT, "the record of the rewritten connection", || {
            agent
                .records("new_connection")
                .into_iter()
                .find(|r| r["snat_port"] == p2 && r["dst_ip"] == srv.to_string())
        });
        assert_eq!(rec["src_ip"], pod_ip.to_string(), "{rec}");
        assert_eq!(rec["snat_ip"], pod_ip.to_string(), "{rec}");
        assert_eq!(rec["src_port"], 4321, "{rec}");

        let lines = vec![first.clone(), second.clone()];
        let v = wait_for(WAIT, "both lines resolved", || {
            let (code, v) = resolve(&c, &lines);
            assert_eq!(code, 200, "{v:#}");
            (v["summary"]["resolved"] == 2).then_some(v)
        });
        for (i, line) in lines.iter().enumerate() {
            let r = &v["results"][i];
            assert_eq!(r["status"], "resolved", "{line}: {r:#}");
            assert_eq!(r["pod_ip"], pod_ip.to_string(), "{line}: {r:#}");
            assert_eq!(r["node"], "node-0", "{r:#}");
            assert_eq!(r["pod_port"], 4321, "{r:#}");
        }
    }
}

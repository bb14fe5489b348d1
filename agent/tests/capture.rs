//! The agent against the real kernel: pods behind a masquerading node, real
//! TCP (nginx) and UDP traffic over IPv4 and IPv6. Every check compares the
//! agent's output with what the server side actually saw. Needs root.

use ctw_testkit as support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use ctw_testkit::agent::Agent;
use ctw_testkit::{field_ip as ip, field_port as port, must_in, require_root, wait_for, Topology};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// `ts` as the seed writes it: local time, milliseconds, numeric offset.
fn assert_seed_ts(v: &Value) {
    let ts = v["ts"].as_str().unwrap_or_default();
    let b = ts.as_bytes();
    let ok = b.len() == 28
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && b[20..23].iter().all(u8::is_ascii_digit)
        && (b[23] == b'+' || b[23] == b'-')
        && b[24..28].iter().all(u8::is_ascii_digit);
    assert!(ok, "ts {ts:?} is not like 2024-12-09T15:05:00.123+0800");
}

/// curl from a pod with a fixed local port, so two pods collide on the
/// node's SNAT port and masquerade must remap one of them.
fn curl_from(topo: &Topology, pod: usize, dst: IpAddr, port: u16, local_port: u16) {
    let url = support::http_url(dst, port, "/");
    support::curl_ok(topo.pod_ns(pod), &url, Some(local_port), &[]);
}

#[test]
fn every_watched_connection_is_logged_with_the_snat_the_server_saw() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(2);
    let nginx = topo.start_nginx(&[80, 8080]);
    let udp = topo.start_udp_server(5353);
    let udp_other = topo.start_udp_server(5354);
    let agent = Agent::start(&mut topo, &[80, 5353], "");

    let srv = [IpAddr::V4(topo.srv_ip4()), IpAddr::V6(topo.srv_ip6())];
    let pods: Vec<[IpAddr; 2]> = (0..2)
        .map(|i| [IpAddr::V4(topo.pod_ip4(i)), IpAddr::V6(topo.pod_ip6(i))])
        .collect();
    // Local ports per family: a v4 socket in TIME_WAIT blocks the same port
    // for a dual-stack v6 bind.
    let lport = |dst: IpAddr, base: u16| if dst.is_ipv4() { base } else { base + 10 };
    for pod in 0..2 {
        for &dst in &srv {
            curl_from(&topo, pod, dst, 80, lport(dst, 40000));
            curl_from(&topo, pod, dst, 8080, lport(dst, 40002));
            topo.udp_send(pod, dst, 5353, Some(40001));
            topo.udp_send(pod, dst, 5354, Some(40003));
        }
    }

    // What the servers saw: (protocol, remote address, remote port).
    let tcp_seen: Vec<(IpAddr, u16)> = wait_for(WAIT, "nginx to log 8 requests", || {
        let l = nginx.access_lines();
        (l.len() == 8).then_some(l)
    })
    .into_iter()
    .filter(|l| l.3 == 80)
    .map(|l| (l.0, l.1))
    .collect();
    assert_eq!(tcp_seen.len(), 4);
    let udp_seen = udp.seen_set();
    assert_eq!(udp_seen.len(), 4, "udp server saw {udp_seen:?}");
    assert_eq!(udp_other.seen_set().len(), 4);

    let records = wait_for(WAIT, "8 new_connection records", || {
        let r = agent.records("new_connection");
        (r.len() >= 8).then_some(r)
    });
    assert_eq!(
        records.len(),
        8,
        "exactly one record per watched flow: {records:#?}"
    );

    let mut snat_by_proto: HashMap<String, BTreeSet<(IpAddr, u16)>> = HashMap::new();
    for r in &records {
        assert_seed_ts(r);
        assert_eq!(r["level"], "info");
        assert_eq!(r["node"], "test-node");
        assert!(
            r.get("recovered").is_none(),
            "live flow marked recovered: {r}"
        );
        let proto = r["protocol"].as_str().unwrap_or_default().to_string();
        let (want_port, want_src_port) = match proto.as_str() {
            "tcp" => (80, lport(ip(r, "dst_ip"), 40000)),
            "udp" => (5353, 40001),
            other => panic!("unexpected protocol {other} in {r}"),
        };
        assert_eq!(port(r, "dst_port"), want_port, "{r}");
        assert_eq!(port(r, "src_port"), want_src_port, "{r}");
        let src = ip(r, "src_ip");
        assert!(
            pods.iter().any(|p| p.contains(&src)),
            "src_ip {src} is no pod: {r}"
        );
        let dst = ip(r, "dst_ip");
        assert!(srv.contains(&dst), "{r}");
        let snat = ip(r, "snat_ip");
        let want_snat = if src.is_ipv4() {
            IpAddr::V4(topo.node_ip4())
        } else {
            IpAddr::V6(topo.node_ip6())
        };
        assert_eq!(snat, want_snat, "{r}");
        assert_eq!(ip(r, "reply_src_ip"), dst, "{r}");
        snat_by_proto
            .entry(proto)
            .or_default()
            .insert((snat, port(r, "snat_port")));
    }
    let tcp_snat: BTreeSet<_> = tcp_seen.iter().copied().collect();
    let udp_snat: BTreeSet<_> = udp_seen.iter().copied().collect();
    assert_eq!(
        snat_by_proto["tcp"], tcp_snat,
        "TCP SNAT pairs differ from what nginx saw"
    );
    assert_eq!(
        snat_by_proto["udp"], udp_snat,
        "UDP SNAT pairs differ from what the server saw"
    );
    // Both pods used local port 40000 towards the same server address: the
    // node had to remap one of them, and the log tells them apart.
    for v4 in [true, false] {
        let ports: HashSet<u16> = tcp_seen
            .iter()
            .filter(|s| s.0.is_ipv4() == v4)
            .map(|s| s.1)
            .collect();
        assert_eq!(
            ports.len(),
            2,
            "masquerade did not remap a colliding port: {tcp_seen:?}"
        );
    }

    // Unwatched ports leave no trace: no records, no metric series.
    assert!(agent
        .log_lines()
        .iter()
        .all(|l| l["dst_port"] != 8080 && l["dst_port"] != 5354));
    let text = agent.metrics_text();
    assert!(
        !text.contains("port=\"8080\"") && !text.contains("port=\"5354\""),
        "{text}"
    );
    assert_eq!(
        agent.metric("conntrack_new_connections_total{port=\"80\"}"),
        Some(4.0)
    );
    assert_eq!(
        agent.metric("conntrack_new_connections_total{port=\"5353\"}"),
        Some(4.0)
    );
    assert_eq!(agent.metric("ctw_events_lost_total"), Some(0.0));
    assert_eq!(agent.metric("ctw_decode_errors_total"), Some(0.0));
    assert_eq!(agent.metric("ctw_kernel_filter_attached"), Some(1.0));
    let received = agent.metric("ctw_events_received_total").unwrap_or(0.0);
    assert!(received >= 8.0, "received {received}");
    assert!(agent.metric("ctw_netlink_rcvbuf_bytes").unwrap_or(0.0) >= (64 << 20) as f64);
    // The agent's own lines are `type: log` (written by the log thread).
    wait_for(WAIT, "the agent's \"program started\" line", || {
        agent
            .log_lines()
            .iter()
            .any(|l| l["type"] == "log" && l["msg"] == "program started")
            .then_some(())
    });
}

#[test]
fn live_lookup_by_original_and_reply_tuple() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let _nginx = topo.start_nginx(&[80]);
    let agent = Agent::start(&mut topo, &[80], "");
    let pod = [IpAddr::V4(topo.pod_ip4(0)), IpAddr::V6(topo.pod_ip6(0))];
    let srv = [IpAddr::V4(topo.srv_ip4()), IpAddr::V6(topo.srv_ip6())];
    let node = [IpAddr::V4(topo.node_ip4()), IpAddr::V6(topo.node_ip6())];
    for f in 0..2 {
        let (_pid, lport) = topo.hold_tcp(0, srv[f], 80);
        let rec = wait_for(WAIT, "the held connection's record", || {
            agent
                .records("new_connection")
                .into_iter()
                .find(|r| port(r, "src_port") == lport && ip(r, "src_ip") == pod[f])
        });
        let snat_port = port(&rec, "snat_port");

        let q = format!(
            "/api/conntrack/query?protocol=tcp&src_ip={}&src_port={lport}&dst_ip={}&dst_port=80",
            pod[f], srv[f]
        );
        let (code, v) = agent.get_json(&q);
        assert_eq!(code, 200, "{q}: {v}");
        assert_eq!(v["status"], "ESTABLISHED", "{v}");
        assert_eq!(ip(&v["origin"], "src"), pod[f]);
        assert_eq!(port(&v["origin"], "src_port"), lport);
        assert_eq!(ip(&v["reply"], "dst"), node[f], "{v}");
        assert_eq!(port(&v["reply"], "dst_port"), snat_port, "{v}");
        assert_eq!(v["node"], "test-node");

        // What a server log shows: remote_addr:remote_port = the SNAT pair.
        let q = format!(
            "/api/conntrack/query?tuple=reply&protocol=tcp&src_ip={}&src_port=80&dst_ip={}&dst_port={snat_port}",
            srv[f], node[f]
        );
        let (code, v) = agent.get_json(&q);
        assert_eq!(code, 200, "{q}: {v}");
        assert_eq!(ip(&v["origin"], "src"), pod[f], "{v}");
        assert_eq!(port(&v["origin"], "src_port"), lport, "{v}");
        assert_eq!(v["status"], "ESTABLISHED");

        let q = format!(
            "/api/conntrack/query?protocol=tcp&src_ip={}&src_port=1&dst_ip={}&dst_port=80",
            pod[f], srv[f]
        );
        let (code, v) = agent.get_json(&q);
        assert_eq!(code, 404, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("no conntrack entry"),
            "{v}"
        );
    }
    let (code, v) = agent.get_json("/api/conntrack/query?protocol=tcp&src_ip=198.18.0.1&src_port=x&dst_ip=198.19.0.1&dst_port=80");
    assert_eq!(code, 400);
    assert_eq!(v["parameter"], "src_port");
    let (code, v) = agent
        .get_json("/api/conntrack/query?protocol=tcp&src_port=1&dst_ip=198.19.0.1&dst_port=80");
    assert_eq!(code, 400);
    assert_eq!(v["parameter"], "src_ip");
    let (code, page) = agent.get("/");
    assert_eq!(code, 200);
    assert!(page.contains("Live conntrack lookup"));
}

#[test]
fn forced_overflow_is_counted_and_recovered_by_resync() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let _udp = topo.start_udp_server(5353);
    // The smallest buffer the config allows: a handful of queued events.
    let agent = Agent::start(&mut topo, &[5353], "netlink:\n  rcvbuf_bytes: 4096\n");
    const FLOWS: u16 = 400;
    // Stop the agent, create the flows, let it go on: the socket overflows.
    agent.signal("STOP");
    let dst = topo.srv_ip4().to_string();
    let script = format!(
        "import socket\nfor p in range(42000, {}):\n s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n s.bind(('', p))\n s.sendto(b'x', ('{dst}', 5353))\n s.close()\n",
        42000 + FLOWS
    );
    must_in(topo.pod_ns(0), &["python3", "-c", &script]);
    wait_for(WAIT, "the kernel to track every flow", || {
        let out = topo.node_conntrack(&["-L", "-p", "udp", "--dport", "5353"]);
        (out.lines().count() >= FLOWS as usize).then_some(())
    });
    agent.signal("CONT");

    let records = wait_for(WAIT, "every flow to be logged, live or recovered", || {
        let r = agent.records("new_connection");
        let ports: HashSet<u16> = r.iter().map(|v| port(v, "src_port")).collect();
        (ports.len() >= FLOWS as usize).then_some(r)
    });
    assert_eq!(records.len(), FLOWS as usize, "each flow exactly once");
    let recovered = records.iter().filter(|r| r["recovered"] == true).count();
    assert!(recovered > 0, "no record was recovered");
    assert!(agent.metric("ctw_events_lost_total").unwrap_or(0.0) > 0.0);
    assert!(agent.metric("ctw_resyncs_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        agent.metric("ctw_records_recovered_total{reason=\"loss\"}"),
        Some(recovered as f64)
    );
    assert_eq!(
        agent.metric("conntrack_new_connections_total{port=\"5353\"}"),
        Some(FLOWS as f64)
    );
}

#[test]
fn seed_config_file_runs_unchanged() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let _nginx = topo.start_nginx(&[80]);
    // The seed's file verbatim: log in /var/log/nat-tracker, listener :9100.
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/agent-seed.yaml");
    let dir = std::path::Path::new("/var/log/nat-tracker");
    let dir_existed = dir.exists();
    let log = dir.join("nat.log");
    let agent = Agent::start_with_config(&mut topo, &cfg, log.clone(), "127.0.0.1:9100");
    let pod = IpAddr::V4(topo.pod_ip4(0));
    curl_from(&topo, 0, IpAddr::V4(topo.srv_ip4()), 80, 40500);
    let rec = wait_for(WAIT, "the seed-config agent to log the request", || {
        agent
            .records("new_connection")
            .into_iter()
            .find(|r| ip(r, "src_ip") == pod)
    });
    assert_eq!(port(&rec, "src_port"), 40500);
    assert_eq!(
        agent.metric("conntrack_new_connections_total{port=\"80\"}"),
        Some(1.0)
    );
    assert!(agent
        .metric("conntrack_new_connections_total{port=\"443\"}")
        .is_some());
    // web_ui.enabled: false in the seed file.
    assert_eq!(agent.get("/").0, 404);
    drop(topo);
    if !dir_existed {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn destroyed_connections_are_logged_with_lifetime_and_counters() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let _nginx = topo.start_nginx(&[80]);
    let agent = Agent::start(&mut topo, &[80], "");
    let pod = IpAddr::V4(topo.pod_ip4(0));
    curl_from(&topo, 0, IpAddr::V4(topo.srv_ip4()), 80, 40600);
    wait_for(WAIT, "the NEW record", || {
        agent
            .records("new_connection")
            .into_iter()
            .find(|r| port(r, "src_port") == 40600)
    });
    // Remove the TIME_WAIT entry: the kernel sends its DESTROY event.
    topo.node_conntrack(&["-D", "-p", "tcp", "--dport", "80", "--sport", "40600"]);
    let closed = wait_for(WAIT, "the connection_closed record", || {
        agent
            .records("connection_closed")
            .into_iter()
            .find(|r| port(r, "src_port") == 40600)
    });
    assert_eq!(ip(&closed, "src_ip"), pod);
    assert_eq!(ip(&closed, "snat_ip"), IpAddr::V4(topo.node_ip4()));
    assert_eq!(port(&closed, "dst_port"), 80);
    // nf_conntrack_acct and nf_conntrack_timestamp are on in the node namespace.
    assert!(
        closed["orig_packets"].as_u64().unwrap_or(0) >= 3,
        "{closed}"
    );
    assert!(closed["reply_bytes"].as_u64().unwrap_or(0) > 0, "{closed}");
    assert!(closed["duration_ms"].as_u64().is_some(), "{closed}");
    assert!(
        closed["start"].is_string() && closed["stop"].is_string(),
        "{closed}"
    );
    assert_eq!(
        agent.metric("conntrack_closed_connections_total{port=\"80\"}"),
        Some(1.0)
    );
    assert_eq!(
        agent.metric("conntrack_new_connections_total{port=\"80\"}"),
        Some(1.0)
    );
}

#[test]
fn capture_destroy_false_logs_no_closed_connections() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let _nginx = topo.start_nginx(&[80]);
    let agent = Agent::start(&mut topo, &[80], "capture_destroy: false\n");
    for lp in [40700, 40701] {
        curl_from(&topo, 0, IpAddr::V4(topo.srv_ip4()), 80, lp);
    }
    wait_for(WAIT, "two NEW records", || {
        (agent.records("new_connection").len() == 2).then_some(())
    });
    topo.node_conntrack(&["-D", "-p", "tcp", "--dport", "80"]);
    // A third connection after the deletes: once it is logged, the DESTROY
    // events sent before it have been read too.
    curl_from(&topo, 0, IpAddr::V4(topo.srv_ip4()), 80, 40702);
    wait_for(WAIT, "the third NEW record", || {
        (agent.records("new_connection").len() == 3).then_some(())
    });
    assert!(agent.records("connection_closed").is_empty());
    assert_eq!(
        agent.metric("conntrack_closed_connections_total{port=\"80\"}"),
        Some(0.0)
    );
}

#[test]
fn missing_cap_net_admin_is_one_clear_line_and_exit_1() {
    if !require_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ctw-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ports: [80]\nlog:\n  path: {}/nat.log\nhttp:\n  listen_addr: \"127.0.0.1:0\"\n",
            dir.display()
        ),
    )
    .expect("write config");
    let out = std::process::Command::new("setpriv")
        .args(["--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"])
        .arg(env!("CARGO_BIN_EXE_ctw-agent"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: missing CAP_NET_ADMIN"), "{stderr}");
}

//! Issue 11 cases on the agent's netlink side, against the real kernel:
//! live lookup in a conntrack zone other than 0 (case 3) and the kernel's
//! event time under a stalled agent (case 9). Each test compares the agent
//! with what the kernel said (`conntrack -L/-G`) or what the test did (the
//! wall clock around the connect). Needs root.

use std::net::IpAddr;
use std::time::Duration;

use ctw_testkit::agent::Agent;
use ctw_testkit::{must_in, require_root, run_in, wait_for, Topology};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// Python: bind `sys.argv[3]` (SO_REUSEADDR), connect to argv[1]:argv[2],
/// print "ok" and hold the connection until killed.
const HOLD_FROM_PORT: &str = r#"
import socket, sys, time
dst, port, lport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ':' in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('::' if fam == socket.AF_INET6 else '0.0.0.0', lport))
s.settimeout(5)
s.connect((dst, port))
print('ok', flush=True)
while True:
    time.sleep(60)  # tidy: holds the connection until killed
"#;

/// The kernel's entry for a held connection from `sport`, as
/// `conntrack -L -o extended` prints it in the node namespace: the reply
/// tuple's destination address and port (the SNAT address and port).
fn reply_dst(line: &str, v6: bool) -> (IpAddr, u16) {
    // "... src=P dst=S sport=45001 dport=80 ... src=S dst=N sport=80 dport=Q ..."
    let field = |k: &str| -> Vec<&str> {
        line.split_whitespace()
            .filter_map(|w| w.strip_prefix(k))
            .collect()
    };
    let dst = field("dst=");
    let dport = field("dport=");
    assert!(dst.len() >= 2 && dport.len() >= 2, "{line}");
    let ip: IpAddr = dst[1].parse().unwrap_or_else(|e| panic!("{line}: {e}"));
    assert_eq!(ip.is_ipv6(), v6, "{line}");
    (
        ip,
        dport[1].parse().unwrap_or_else(|e| panic!("{line}: {e}")),
    )
}

/// Case 3: entries in conntrack zone 7 (a raw prerouting chain moves both
/// directions there, as OVN-Kubernetes does with its own zones). A lookup
/// without a zone misses, as the kernel's own GET does; with `zone=7` it
/// finds the pod, and the answer names zone 7. IPv4 and IPv6.
#[test]
fn lookup_in_zone_7_finds_the_pod_the_kernel_holds() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let _nginx = topo.start_nginx(&[80]);
    let node = topo.node_ns().to_string();
    let ruleset = format!(
        "table inet z {{\n  chain pre {{\n    type filter hook prerouting priority raw;\n    \
         ip saddr {p4}/24 ct zone set 7\n    ip saddr {s4} tcp sport 80 ct zone set 7\n    \
         ip6 saddr {p6}/64 ct zone set 7\n    ip6 saddr {s6} tcp sport 80 ct zone set 7\n  }}\n}}\n",
        p4 = topo.pod_ip4(0),
        s4 = topo.srv_ip4(),
        p6 = topo.pod_ip6(0),
        s6 = topo.srv_ip6(),
    );
    let nft = topo.tmp_dir().join("zone.nft");
    std::fs::write(&nft, ruleset).expect("write zone ruleset");
    must_in(&node, &["nft", "-f", &nft.display().to_string()]);
    let agent = Agent::start(&mut topo, &[80], "");
    let pod = topo.pod_ns(0).to_string();

    for (srv, pod_ip, v6, lport) in [
        (
            IpAddr::from(topo.srv_ip4()),
            IpAddr::from(topo.pod_ip4(0)),
            false,
            45001u16,
        ),
        (
            IpAddr::from(topo.srv_ip6()),
            IpAddr::from(topo.pod_ip6(0)),
            true,
            45002,
        ),
    ] {
        let python = must_in(
            &pod,
            &["python3", "-c", "import sys; print(sys.executable)"],
        );
        let srv_s = srv.to_string();
        let lport_s = lport.to_string();
        let holder = topo.spawn_in(
            &pod,
            &[
                python.trim(),
                "-u",
                "-c",
                HOLD_FROM_PORT,
                &srv_s,
                "80",
                &lport_s,
            ],
        );
        let family = if v6 { "ipv6" } else { "ipv4" };
        let sport = format!("sport={lport} ");
        // The kernel's entry, from the kernel: zone 7, established.
        let line = wait_for(WAIT, "the held connection in conntrack zone 7", || {
            let out = run_in(
                &node,
                &[
                    "conntrack",
                    "-L",
                    "-w",
                    "7",
                    "-p",
                    "tcp",
                    "-f",
                    family,
                    "-o",
                    "extended",
                ],
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains(&sport) && l.contains("ESTABLISHED"))
                .map(str::to_string)
        });
        assert!(line.contains("zone=7"), "{line}");
        let (snat_ip, snat_port) = reply_dst(&line, v6);
        let q = format!(
            "/api/conntrack/query?tuple=reply&src_ip={srv}&src_port=80&dst_ip={snat_ip}&dst_port={snat_port}"
        );

        // The kernel's zone 0 holds no entry for the connection (conntrack
        // 1.4.7's -G takes no zone, so list zone 0 instead).
        let zone0 = run_in(
            &node,
            &[
                "conntrack",
                "-L",
                "-w",
                "0",
                "-p",
                "tcp",
                "-f",
                family,
                "-o",
                "extended",
            ],
        );
        let zone0 = String::from_utf8_lossy(&zone0.stdout);
        assert!(
            !zone0.lines().any(|l| l.contains(&sport)),
            "no zone-0 entry: {zone0}"
        );

        let (code, v) = agent.get_json(&q);
        assert_eq!(code, 404, "no zone = zone 0, as the kernel: {v}");
        let (code, v) = agent.get_json(&format!("{q}&zone=7"));
        assert_eq!(code, 200, "{v}");
        let src: IpAddr = v["origin"]["src"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(src, pod_ip, "{v}");
        assert_eq!(v["origin"]["src_port"], lport, "{v}");
        assert_eq!(v["zone"], 7, "the answer names the entry's zone: {v}");
        assert_eq!(v["snat_port"], snat_port, "{v}");

        // Bad zone values name the parameter.
        let (code, v) = agent.get_json(&format!("{q}&zone=70000"));
        assert_eq!((code, v["parameter"].as_str()), (400, Some("zone")), "{v}");

        // The event record says zone 7 too.
        let rec = wait_for(WAIT, "the agent's record of the held connection", || {
            agent
                .records("new_connection")
                .into_iter()
                .find(|r| r["src_port"] == lport)
        });
        assert_eq!(rec["zone"], 7, "{rec}");
        topo.kill(holder);
    }
}

use ctw_common::now_ns;

fn ts_ns(v: &Value) -> u64 {
    let ts = v["ts"].as_str().unwrap_or_default();
    let t = chrono::DateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%S%.3f%z")
        .unwrap_or_else(|e| panic!("ts {ts:?}: {e}"));
    t.timestamp_nanos_opt().unwrap_or(0) as u64
}

/// Case 9: with `nf_conntrack_timestamp=1` (the testkit's node has it) the
/// record's time is the kernel's event time, however late the agent reads
/// the event. The agent is stopped (SIGSTOP) for 5 s while a pod connects:
/// the record's `ts` lies within the connect (ms resolution), and the lag
/// histogram holds an observation of at least 5 s.
#[test]
fn stalled_agent_keeps_the_kernel_event_time_and_reports_its_lag() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let _nginx = topo.start_nginx(&[80]);
    let node = topo.node_ns().to_string();
    let on = must_in(
        &node,
        &["sysctl", "-n", "net.netfilter.nf_conntrack_timestamp"],
    );
    assert_eq!(on.trim(), "1", "the testkit node has timestamps on");
    let agent = Agent::start(&mut topo, &[80], "");
    assert_eq!(
        agent.metric("ctw_event_lag_seconds_count"),
        Some(0.0),
        "nothing observed yet"
    );

    agent.signal("STOP");
    let before = now_ns();
    let url = ctw_testkit::http_url(topo.srv_ip4().into(), 80, "/");
    let out = run_in(
        topo.pod_ns(0),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--local-port",
            "45100",
            "-o",
            "/dev/null",
            &url,
        ],
    );
    let after = now_ns();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The stall itself is the scenario (not a wait for a condition): the
    // agent stays stopped for 5 s after the connection was made (tidy: the scenario).
    std::thread::sleep(Duration::from_secs(5));
    let resumed = now_ns();
    agent.signal("CONT");

    let rec = wait_for(
        WAIT,
        "the record of the connection made while stopped",
        || {
            agent
                .records("new_connection")
                .into_iter()
                .find(|r| r["src_port"] == 45100)
        },
    );
    let ts = ts_ns(&rec);
    // ts has millisecond resolution (truncated).
    assert!(
        ts + 1_000_000 >= before && ts <= after,
        "record time {ts} outside the connect [{before}, {after}]: {rec}"
    );
    assert!(resumed - ts >= 5_000_000_000);

    let count = agent.metric("ctw_event_lag_seconds_count").unwrap_or(0.0);
    let under_5s = agent
        .metric("ctw_event_lag_seconds_bucket{le=\"5\"}")
        .unwrap_or(f64::NAN);
    let sum = agent.metric("ctw_event_lag_seconds_sum").unwrap_or(0.0);
    assert!(count >= 1.0, "lag observed: {}", agent.metrics_text());
    assert!(
        count - under_5s >= 1.0 && sum >= 5.0,
        "a lag of 5 s or more: count {count}, le=5 {under_5s}, sum {sum}"
    );
}

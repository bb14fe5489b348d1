//! Checks the shared netns test topology itself: masquerade through the node
//! works for TCP and UDP on IPv4 and IPv6, the node's conntrack sees the pods
//! in the original tuples, and everything is removed on drop (also on panic).

use ctw_testkit as support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use ctw_testkit::{http_url, netns_list, wait_for, Topology};

const WAIT: Duration = Duration::from_secs(10);

fn assert_gone(names: &[String]) {
    let left: HashSet<String> = netns_list().into_iter().collect();
    for n in names {
        assert!(!left.contains(n), "namespace {n} still exists after drop");
    }
}

/// The conntrack line whose original tuple starts at `src` (dport filtered
/// by the caller) must have the node address as the reply destination.
fn assert_masqueraded(listing: &str, src: IpAddr, node: IpAddr, what: &str) {
    let needle = format!("src={src} ");
    let line = listing
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("{what}: no conntrack entry from {src} in:\n{listing}"));
    // Fields: ... src=<pod> dst=<srv> sport dport ... src=<srv> dst=<node> ...
    let srcs: Vec<&str> = line
        .split_whitespace()
        .filter(|f| f.starts_with("src="))
        .collect();
    let dsts: Vec<&str> = line
        .split_whitespace()
        .filter(|f| f.starts_with("dst="))
        .collect();
    assert_eq!(srcs.first().copied(), Some(needle.trim()), "{what}: {line}");
    assert_eq!(
        dsts.get(1).copied(),
        Some(format!("dst={node}").as_str()),
        "{what}: reply tuple should target the node: {line}"
    );
}

#[test]
fn tcp_through_masquerading_node_v4_and_v6() {
    if !support::require_root() {
        return;
    }
    const PORT: u16 = 18080;
    let mut topo = Topology::new(2);
    let nginx = topo.start_nginx(&[PORT]);
    for key in [
        "net.netfilter.nf_conntrack_timestamp",
        "net.netfilter.nf_conntrack_acct",
        "net.ipv4.ip_forward",
        "net.ipv6.conf.all.forwarding",
    ] {
        let v = support::must_in(topo.node_ns(), &["sysctl", "-n", key]);
        assert_eq!(v.trim(), "1", "{key} in the node namespace");
    }

    for pod in 0..2 {
        for dst in [IpAddr::from(topo.srv_ip4()), IpAddr::from(topo.srv_ip6())] {
            let out = topo.curl(pod, &http_url(dst, PORT, "/"));
            assert!(
                out.status.success(),
                "curl from pod {pod} to {dst}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
        }
    }

    // nginx logs after sending the response: wait for all four lines.
    let lines = wait_for(WAIT, "4 nginx access log lines", || {
        let l = nginx.access_lines();
        (l.len() >= 4).then_some(l)
    });
    assert_eq!(lines.len(), 4, "{lines:?}");
    let node4 = IpAddr::from(topo.node_ip4());
    let node6 = IpAddr::from(topo.node_ip6());
    let v4 = lines.iter().filter(|l| l.0 == node4).count();
    let v6 = lines.iter().filter(|l| l.0 == node6).count();
    assert_eq!(
        (v4, v6),
        (2, 2),
        "nginx should only see the node: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.3 == PORT && l.2 > 1.0e9),
        "{lines:?}"
    );

    let port = PORT.to_string();
    let ct4 = topo.node_conntrack(&["-L", "-f", "ipv4", "-p", "tcp", "--dport", &port]);
    let ct6 = topo.node_conntrack(&["-L", "-f", "ipv6", "-p", "tcp", "--dport", &port]);
    for pod in 0..2 {
        assert_masqueraded(&ct4, topo.pod_ip4(pod).into(), node4, "tcp v4");
        assert_masqueraded(&ct6, topo.pod_ip6(pod).into(), node6, "tcp v6");
    }

    // A held connection reports its local port; conntrack shows it.
    let (pid, sport) = topo.hold_tcp(1, topo.srv_ip4().into(), PORT);
    let sport_s = sport.to_string();
    let held = wait_for(WAIT, "held connection in conntrack", || {
        let l = topo.node_conntrack(&["-L", "-p", "tcp", "--sport", &sport_s, "--dport", &port]);
        l.contains("ESTABLISHED").then_some(l)
    });
    assert!(held.contains(&format!("src={}", topo.pod_ip4(1))), "{held}");
    topo.kill(pid);

    let names = topo.namespaces();
    drop(topo);
    assert_gone(&names);
}

#[test]
fn udp_roundtrip_v4_and_v6() {
    if !support::require_root() {
        return;
    }
    const PORT: u16 = 15353;
    let mut topo = Topology::new(2);
    let udp = topo.start_udp_server(PORT);

    let sport = topo.udp_send(0, topo.srv_ip4().into(), PORT, Some(40123));
    assert_eq!(sport, 40123);
    topo.udp_send(1, topo.srv_ip6().into(), PORT, None);

    let seen = udp.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, IpAddr::from(topo.node_ip4()), "{seen:?}");
    assert_eq!(seen[1].0, IpAddr::from(topo.node_ip6()), "{seen:?}");

    let port = PORT.to_string();
    let ct4 = topo.node_conntrack(&["-L", "-f", "ipv4", "-p", "udp", "--dport", &port]);
    let ct6 = topo.node_conntrack(&["-L", "-f", "ipv6", "-p", "udp", "--dport", &port]);
    assert_masqueraded(
        &ct4,
        topo.pod_ip4(0).into(),
        topo.node_ip4().into(),
        "udp v4",
    );
    assert_masqueraded(
        &ct6,
        topo.pod_ip6(1).into(),
        topo.node_ip6().into(),
        "udp v6",
    );
    assert!(ct4.contains("sport=40123 "), "{ct4}");

    // srv cannot reach the pod network on its own (no route back).
    let out = support::run_in(
        topo.srv_ns(),
        &["ip", "route", "get", &topo.pod_ip4(0).to_string()],
    );
    assert!(!out.status.success(), "srv should have no route to pods");

    let names = topo.namespaces();
    drop(topo);
    assert_gone(&names);
}

#[test]
fn cleanup_runs_when_the_test_panics() {
    if !support::require_root() {
        return;
    }
    let mut names = Vec::new();
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut topo = Topology::new(1);
        names = topo.namespaces();
        let ns = topo.pod_ns(0).to_string();
        pid = topo.spawn_in(&ns, &["sleep", "3600"]);
        panic!("deliberate panic inside a topology test");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 3);
    assert_gone(&names);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "spawned process {pid} still running"
    );
}

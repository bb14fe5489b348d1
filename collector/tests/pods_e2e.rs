//! Issue 13 end to end in network namespaces, with the real binaries: the
//! testbed pods exist as Pod objects (their real addresses) on a local API
//! server (`ctw_testkit::kubeapi`) in the collector's namespace; the real
//! `ctw-collector` watches it through `kubernetes.kubeconfig`; the real agent
//! captures curl → nginx through the node's masquerade. The pod history the
//! collector kept on disk names the source of each stored connection as of
//! its start: pod A, then (A deleted, B created with A's address) pod B; a
//! connection made while the collector was down (kill -9) is unverified.
//! The answers are asked through `PodHistory` on the collector's journal
//! (the answers of the HTTP API do not carry `pod` yet). Needs root.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::Duration;

use ctw_collector::pods::{NoPodReason, PodHistory};
use ctw_common::api::parse_time;
use ctw_testkit::agent::Agent;
use ctw_testkit::collector::Collector;
use ctw_testkit::kubeapi::{owner_json, pod_json, KubeApi};
use ctw_testkit::{require_root, run_in, wait_for, Topology};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(40);

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn metric(c: &Collector, name: &str) -> Option<f64> {
    let (_, body) = c.get("/metrics");
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// curl from pod 0 to nginx; returns the connection's start (ns) from the
/// collector's search once stored, matched by nginx's line (SNAT port).
fn connect(topo: &Topology, c: &Collector, nginx_log: &std::path::Path, n: usize) -> u64 {
    let out = run_in(
        topo.pod_ns(0),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            &format!("http://{}/", topo.srv_ip4()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = wait_for(WAIT, "nginx logs the request", || {
        std::fs::read_to_string(nginx_log)
            .ok()?
            .lines()
            .nth(n)
            .map(str::to_string)
    });
    let port: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    wait_for(WAIT, "the connection stored", || {
        let (code, v): (u16, Value) = c.api(&format!(
            "/api/v1/connections?snat_ip={}&snat_port={port}",
            topo.node_ip4()
        ));
        if code != 200 {
            return None;
        }
        let hits = v["records"].as_array()?;
        let h = hits
            .iter()
            .find(|h| h["src_ip"] == topo.pod_ip4(0).to_string())?;
        parse_time(h["start"].as_str()?).ok()
    })
}

/// Wait until the collector's pod journal holds `text` (durable).
fn journal_has(c: &Collector, text: &str) {
    let path = c.dir.join("index/pods/history.jsonl");
    wait_for(WAIT, "the pod journal written", || {
        std::fs::read_to_string(&path)
            .ok()?
            .contains(text)
            .then_some(())
    });
}

#[test]
fn pod_names_as_of_the_connection_across_reuse_and_a_collector_outage() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(2);
    let (ns, addr) = topo.add_host("c");
    let api = KubeApi::start_in_netns(&ns);
    let kubeconfig = topo.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let ip0 = topo.pod_ip4(0).to_string();
    let ip0_6 = topo.pod_ip6(0).to_string();
    let ip1 = topo.pod_ip4(1).to_string();
    api.apply(owner_json(
        "ReplicaSet",
        "payments",
        "checkout-7d9f",
        &uid(100),
        Some("checkout"),
    ));
    api.apply(pod_json(
        "payments",
        "checkout-7d9f-a",
        &uid(1),
        &[&ip0, &ip0_6],
        "node-0",
        Some(("ReplicaSet", "checkout-7d9f")),
        false,
        "Running",
    ));
    api.apply(pod_json(
        "batch",
        "worker-0",
        &uid(2),
        &[&ip1],
        "node-0",
        Some(("StatefulSet", "worker")),
        false,
        "Running",
    ));

    let extra = format!("kubernetes:\n  kubeconfig: {}\n", kubeconfig.display());
    let mut c = Collector::start(&mut topo, &ns, addr, &extra);
    let nginx = topo.start_nginx(&[80]);
    let spool = topo.tmp_dir().join("spool-0");
    let yaml = c.agent_yaml("node-0", &spool, "");
    let _agent = Agent::start_on(&mut topo, 0, "node-0", &[80], &yaml);
    c.wait_connected(&["node-0"]);
    wait_for(
        WAIT,
        "the collector holds the pods (3 intervals: A v4+v6, worker)",
        || (metric(&c, "ctw_collector_pod_intervals_live") == Some(3.0)).then_some(()),
    );

    // A's connection.
    let t_a = connect(&topo, &c, &nginx.access_log, 0);
    // A deleted, then B created with A's address (the namespace pod 0 is now B).
    api.delete("Pod", "payments", "checkout-7d9f-a");
    api.apply(pod_json(
        "payments",
        "checkout-7d9f-b",
        &uid(3),
        &[&ip0, &ip0_6],
        "node-0",
        Some(("ReplicaSet", "checkout-7d9f")),
        false,
        "Running",
    ));
    wait_for(WAIT, "the collector saw the delete and B", || {
        let fenced_or_closed = metric(&c, "ctw_collector_pod_intervals")? >= 5.0;
        fenced_or_closed.then_some(())
    });
    let t_b = connect(&topo, &c, &nginx.access_log, 1);

    // The collector's journal has B (written at its 1 s heartbeat).
    journal_has(&c, &uid(3));
    // The collector dies; B is deleted and C takes the address while it is
    // down; a connection from the address meanwhile (the agent spools it).
    c.kill9(&mut topo);
    // C's startTime (whole seconds) must be after B's connection, as it is
    // in a cluster where C starts after B is gone.
    wait_for(WAIT, "the clock's next second after B's connection", || {
        (ctw_collector::pods::watch::now_ns() / 1_000_000_000 > t_b / 1_000_000_000).then_some(())
    });
    api.delete("Pod", "payments", "checkout-7d9f-b");
    api.apply(pod_json(
        "payments",
        "checkout-7d9f-c",
        &uid(4),
        &[&ip0],
        "node-0",
        Some(("ReplicaSet", "checkout-7d9f")),
        false,
        "Running",
    ));
    let out = run_in(
        topo.pod_ns(0),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            &format!("http://{}/", topo.srv_ip4()),
        ],
    );
    assert!(out.status.success());
    c.restart(&mut topo);
    c.wait_connected(&["node-0"]);
    let line = wait_for(WAIT, "nginx logs the outage request", || {
        std::fs::read_to_string(&nginx.access_log)
            .ok()?
            .lines()
            .nth(2)
            .map(str::to_string)
    });
    let port: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let t_down = wait_for(WAIT, "the outage connection stored", || {
        let (_, v) = c.api(&format!(
            "/api/v1/connections?snat_ip={}&snat_port={port}",
            topo.node_ip4()
        ));
        let h = v["records"]
            .as_array()?
            .iter()
            .find(|h| h["src_ip"] == ip0.as_str())?
            .clone();
        parse_time(h["start"].as_str()?).ok()
    });
    wait_for(
        WAIT,
        "the re-list after the restart (C live, A and B closed)",
        || {
            (metric(&c, "ctw_collector_pod_intervals_live") == Some(2.0)
                && metric(&c, "ctw_collector_pod_history_gaps") == Some(2.0))
            .then_some(())
        },
    );
    let t_c = connect(&topo, &c, &nginx.access_log, 3);
    journal_has(&c, &uid(4));
    c.kill9(&mut topo);

    let h = PodHistory::open(&c.dir.join("index/pods"), u64::MAX).unwrap();
    let src: IpAddr = ip0.parse().unwrap();
    let a = h.at(src, t_a);
    let p = a.pod.clone().unwrap_or_else(|| panic!("A at {t_a}: {a:?}"));
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str(), p.node.as_str()),
        ("payments", "checkout-7d9f-a", "node-0")
    );
    let w = p.workload.unwrap();
    assert_eq!(
        (w.kind.as_str(), w.name.as_str()),
        ("Deployment", "checkout")
    );
    assert!(a.verified && !a.pod_ip_reused);
    assert_eq!(
        h.at(src, t_b).pod.map(|p| p.name).as_deref(),
        Some("checkout-7d9f-b")
    );
    // B's connection was made before the collector died; whether it falls
    // after the last heartbeat (then unverified) depends on timing.
    let down = h.at(src, t_down);
    assert!(
        !down.verified,
        "made while the collector was down: {down:?}"
    );
    let cp = h.at(src, t_c);
    assert_eq!(cp.pod.map(|p| p.name).as_deref(), Some("checkout-7d9f-c"));
    assert!(cp.verified);
    // The IPv6 address was A's and B's; C has none.
    let src6: IpAddr = ip0_6.parse().unwrap();
    assert_eq!(
        h.at(src6, t_b).pod.map(|p| p.name).as_deref(),
        Some("checkout-7d9f-b")
    );
    assert_eq!(h.at(src6, t_c).reason, Some(NoPodReason::NoPodAtTime));
    // The other pod, untouched, is named throughout (StatefulSet itself).
    let wk = h
        .at(ip1.parse().unwrap(), t_c)
        .pod
        .unwrap()
        .workload
        .unwrap();
    assert_eq!(
        (wk.kind.as_str(), wk.name.as_str()),
        ("StatefulSet", "worker")
    );
}

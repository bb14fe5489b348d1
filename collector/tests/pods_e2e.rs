//! Issue 13 end to end in network namespaces, with the real binaries: the
//! testbed pods exist as Pod objects (their real addresses) on a local API
//! server (`ctw_testkit::kubeapi`) in the collector's namespace; the real
//! `ctw-collector` watches it through `kubernetes.kubeconfig`; the real agent
//! captures curl → nginx through the node's masquerade. The collector's
//! answers (search and resolve of nginx's own lines) name the source of each
//! connection as of its start: pod A, then (A deleted, B created with A's
//! address) pod B; a connection made while the collector was down (kill -9)
//! is `pod_verified: false`; then D created while C still holds the address
//! and C deleted late: D throughout; a hostNetwork pod is never named
//! (`pod_reason: host_network`). A second test checks the workload counter
//! behind the dashboard's top-workloads panel after real connections from
//! known pods. Needs root.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ctw_common::api::parse_time;
use ctw_testkit::agent::Agent;
use ctw_testkit::collector::Collector;
use ctw_testkit::kubeapi::{owner_json, pod_json, KubeApi};
use ctw_testkit::{curl_ok, require_root, wait_for, Topology};
use serde_json::{json, Value};

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

/// The testkit nginx's access-log format (`Topology::start_nginx`).
const LOG_FORMAT: &str = "$remote_addr $remote_port $msec $server_port";

/// curl from pod `pod` to nginx (its `n`th line, 0-based); returns the
/// line and the connection as the collector's search shows it once stored,
/// matched by nginx's line (SNAT port).
fn connect(
    topo: &Topology,
    c: &Collector,
    nginx_log: &std::path::Path,
    pod: usize,
    n: usize,
) -> (String, Value) {
    curl_ok(
        topo.pod_ns(pod),
        &format!("http://{}/", topo.srv_ip4()),
        None,
        &[],
    );
    stored(topo, c, nginx_log, pod, n)
}

/// nginx's `n`th line and its connection from pod `pod` as searched.
fn stored(
    topo: &Topology,
    c: &Collector,
    nginx_log: &std::path::Path,
    pod: usize,
    n: usize,
) -> (String, Value) {
    let line = wait_for(WAIT, "nginx logs the request", || {
        std::fs::read_to_string(nginx_log)
            .ok()?
            .lines()
            .nth(n)
            .map(str::to_string)
    });
    let port: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let hit = wait_for(WAIT, "the connection stored", || {
        let (code, v): (u16, Value) = c.api(&format!(
            "/api/v1/connections?snat_ip={}&snat_port={port}",
            topo.node_ip4()
        ));
        if code != 200 {
            return None;
        }
        v["records"]
            .as_array()?
            .iter()
            .find(|h| h["src_ip"] == topo.pod_ip4(pod).to_string())
            .cloned()
    });
    (line, hit)
}

fn start_of(hit: &Value) -> u64 {
    parse_time(hit["start"].as_str().unwrap()).unwrap()
}

/// `(namespace, name, workload kind, workload name)` of an answer's `pod`.
fn named(v: &Value) -> (String, String, String, String) {
    let p = &v["pod"];
    assert!(p.is_object(), "no pod named: {v}");
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&p["namespace"]),
        s(&p["name"]),
        s(&p["workload"]["kind"]),
        s(&p["workload"]["name"]),
    )
}

fn checkout(name: &str) -> (String, String, String, String) {
    (
        "payments".into(),
        name.into(),
        "Deployment".into(),
        "checkout".into(),
    )
}

/// Wait until `ctw_collector_pod_watch_events_total` passes `after`.
fn events_past(c: &Collector, after: f64) {
    wait_for(WAIT, "the collector applied the watch event", || {
        (metric(c, "ctw_collector_pod_watch_events_total")? > after).then_some(())
    });
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

/// Wait until the wall clock's second is past `t_ns`'s (a pod's startTime
/// has whole seconds).
fn next_second_after(t_ns: u64) {
    wait_for(WAIT, "the clock's next second", || {
        (ctw_collector::pods::watch::now_ns() / 1_000_000_000 > t_ns / 1_000_000_000).then_some(())
    });
}

fn checkout_pod(name: &str, n: u32, ips: &[&str]) -> Value {
    pod_json(
        "payments",
        name,
        &uid(n),
        ips,
        "node-0",
        Some(("ReplicaSet", "checkout-7d9f")),
        false,
        "Running",
    )
}

#[test]
fn pod_names_as_of_the_connection_across_reuse_and_a_collector_outage() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(3);
    let (ns, addr) = topo.add_host("c");
    let api = KubeApi::start_in_netns(&ns);
    let kubeconfig = topo.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let ip0 = topo.pod_ip4(0).to_string();
    // A and B also hold pod 0's IPv6 address (dual stack).
    let ip0_6 = topo.pod_ip6(0).to_string();
    let ip1 = topo.pod_ip4(1).to_string();
    let ip2 = topo.pod_ip4(2).to_string();
    api.apply(owner_json(
        "ReplicaSet",
        "payments",
        "checkout-7d9f",
        &uid(100),
        Some("checkout"),
    ));
    api.apply(checkout_pod("checkout-7d9f-a", 1, &[&ip0, &ip0_6]));
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
    // A hostNetwork pod: its address is shared (the node's in a cluster).
    api.apply(pod_json(
        "monitoring",
        "node-exporter-x",
        &uid(5),
        &[&ip2],
        "node-0",
        Some(("DaemonSet", "node-exporter")),
        true,
        "Running",
    ));

    let extra = format!("kubernetes:\n  kubeconfig: {}\n", kubeconfig.display());
    let mut c = Collector::start(&mut topo, &ns, addr, &extra);
    let nginx = topo.start_nginx(&[80]);
    let log = nginx.access_log.clone();
    let spool = topo.tmp_dir().join("spool-0");
    let yaml = c.agent_yaml("node-0", &spool, "");
    let _agent = Agent::start_on(&mut topo, 0, "node-0", &[80], &yaml);
    c.wait_connected(&["node-0"]);
    wait_for(
        WAIT,
        "the collector holds the pods (4 intervals: A v4+v6, worker, hostNetwork)",
        || (metric(&c, "ctw_collector_pod_intervals_live") == Some(4.0)).then_some(()),
    );
    // For the resolve at the end: (nginx line, expected pod name and
    // whether it must be verified).
    let mut lines: Vec<(String, Option<(&str, bool)>)> = Vec::new();

    // A's connection.
    let (line, hit) = connect(&topo, &c, &log, 0, 0);
    assert_eq!(named(&hit), checkout("checkout-7d9f-a"), "{hit}");
    assert_eq!(hit["pod"]["node"], "node-0", "{hit}");
    assert_eq!(hit["pod"]["uid"], uid(1), "{hit}");
    assert_eq!(
        (&hit["pod_verified"], &hit["pod_ip_reused"]),
        (&json!(true), &json!(false)),
        "{hit}"
    );
    lines.push((line, Some(("checkout-7d9f-a", true))));
    // B's startTime (whole seconds) opens its handover window: after A's
    // connection, as in a cluster where B starts after it.
    next_second_after(start_of(&hit));
    // Delete first, then create: A deleted, then B created with A's address
    // (the namespace pod 0 is now B).
    api.delete("Pod", "payments", "checkout-7d9f-a");
    api.apply(checkout_pod("checkout-7d9f-b", 3, &[&ip0, &ip0_6]));
    wait_for(WAIT, "the collector saw the delete and B", || {
        let fenced_or_closed = metric(&c, "ctw_collector_pod_intervals")? >= 6.0;
        fenced_or_closed.then_some(())
    });
    let (line, hit) = connect(&topo, &c, &log, 0, 1);
    let t_b = start_of(&hit);
    assert_eq!(named(&hit), checkout("checkout-7d9f-b"), "{hit}");
    // B's connection was made just before the collector died: whether it
    // falls after the last heartbeat (then unverified) depends on timing.
    lines.push((line, Some(("checkout-7d9f-b", false))));
    // A's connection is still A's, asked after A is gone.
    let (_, again) = stored(&topo, &c, &log, 0, 0);
    assert_eq!(named(&again), checkout("checkout-7d9f-a"), "{again}");

    // The collector's journal has B (written at its 1 s heartbeat).
    journal_has(&c, &uid(3));
    // The collector dies; B is deleted and C takes the address while it is
    // down; a connection from the address meanwhile (the agent spools it).
    c.kill9(&mut topo);
    // C's startTime (whole seconds) must be after B's connection, as it is
    // in a cluster where C starts after B is gone.
    next_second_after(t_b);
    api.delete("Pod", "payments", "checkout-7d9f-b");
    api.apply(checkout_pod("checkout-7d9f-c", 4, &[&ip0]));
    curl_ok(
        topo.pod_ns(0),
        &format!("http://{}/", topo.srv_ip4()),
        None,
        &[],
    );
    c.restart(&mut topo);
    c.wait_connected(&["node-0"]);
    wait_for(
        WAIT,
        "the re-list after the restart (C, worker, hostNetwork live; A and B closed)",
        || {
            (metric(&c, "ctw_collector_pod_intervals_live") == Some(3.0)
                && metric(&c, "ctw_collector_pod_history_gaps") == Some(2.0))
            .then_some(())
        },
    );
    let (line, down) = stored(&topo, &c, &log, 0, 2);
    assert_eq!(
        down["pod_verified"], false,
        "made while the collector was down: {down}"
    );
    if down["pod"].is_null() {
        assert_eq!(down["pod_reason"], "history_gap", "{down}");
    }
    lines.push((line, None));
    let (line, hit) = connect(&topo, &c, &log, 0, 3);
    assert_eq!(named(&hit), checkout("checkout-7d9f-c"), "{hit}");
    assert_eq!(hit["pod_verified"], true, "{hit}");
    lines.push((line, Some(("checkout-7d9f-c", true))));
    // D's handover window (from its whole-second startTime) after C's
    // connection.
    next_second_after(start_of(&hit));
    // Create first, then delete late: D takes the address while C still
    // holds it; C's delete arrives after D's connection and changes nothing.
    let before = metric(&c, "ctw_collector_pod_ip_fenced_total").unwrap_or(0.0);
    api.apply(checkout_pod("checkout-7d9f-d", 6, &[&ip0]));
    wait_for(WAIT, "the collector fenced C by D", || {
        (metric(&c, "ctw_collector_pod_ip_fenced_total")? > before).then_some(())
    });
    let (line, hit) = connect(&topo, &c, &log, 0, 4);
    assert_eq!(named(&hit), checkout("checkout-7d9f-d"), "{hit}");
    lines.push((line, Some(("checkout-7d9f-d", true))));
    let events = metric(&c, "ctw_collector_pod_watch_events_total").unwrap();
    api.delete("Pod", "payments", "checkout-7d9f-c");
    events_past(&c, events);
    let (line, hit) = connect(&topo, &c, &log, 0, 5);
    assert_eq!(named(&hit), checkout("checkout-7d9f-d"), "{hit}");
    lines.push((line, Some(("checkout-7d9f-d", true))));

    // The hostNetwork pod is never named; it is listed as a holder.
    let (line, hit) = connect(&topo, &c, &log, 2, 6);
    assert!(hit["pod"].is_null(), "{hit}");
    assert_eq!(hit["pod_reason"], "host_network", "{hit}");
    assert_eq!(hit["pod_holders"][0]["name"], "node-exporter-x", "{hit}");
    assert_eq!(hit["pod_holders"][0]["host_network"], true, "{hit}");
    lines.push((line, None));
    // The other pod, untouched, is named throughout (StatefulSet itself).
    let (line, hit) = connect(&topo, &c, &log, 1, 7);
    assert_eq!(
        named(&hit),
        (
            "batch".into(),
            "worker-0".into(),
            "StatefulSet".into(),
            "worker".into()
        ),
        "{hit}"
    );
    lines.push((line, Some(("worker-0", true))));

    // nginx's own lines resolve to the pods as of their time, including
    // those of pods long gone.
    let (code, v) = c.post_json(
        "/api/v1/resolve",
        &json!({
            "lines": lines.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(),
            "log_format": LOG_FORMAT,
        }),
        topo.tmp_dir(),
    );
    assert_eq!(code, 200, "{v}");
    let results = v["results"].as_array().unwrap();
    for ((line, want), r) in lines.iter().zip(results) {
        assert_eq!(r["status"], "resolved", "{line}: {r}");
        match want {
            Some((name, verified)) => {
                assert_eq!(r["pod"]["name"], *name, "{line}: {r}");
                if *verified {
                    assert_eq!(r["pod_verified"], true, "{line}: {r}");
                }
                assert_eq!(r["record"]["pod"]["name"], *name, "{line}: {r}");
            }
            None => assert!(
                r["pod_verified"] == false || r["pod_reason"] == "host_network",
                "{line}: {r}"
            ),
        }
    }
    // Searches by pod go through the history: A's one connection, the
    // Deployment's six (A, B, the outage one, C, D twice), the StatefulSet's one.
    let count = |q: &str| {
        let (code, v) = c.api(&format!("/api/v1/connections?{q}&limit=100"));
        assert_eq!(code, 200, "{q}: {v}");
        let srcs: Vec<String> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r["src_ip"], r["pod"]["name"]))
            .collect();
        (v["total"].as_u64().unwrap(), srcs)
    };
    let (n, srcs) = count("namespace=payments&pod=checkout-7d9f-a");
    assert_eq!(
        (n, srcs),
        (1, vec![format!("\"{ip0}\" \"checkout-7d9f-a\"")])
    );
    let (n, srcs) = count("workload=Deployment/checkout");
    assert_eq!(n, 6, "{srcs:?}");
    let (n, _) = count("workload=StatefulSet/worker");
    assert_eq!(n, 1);
    // The hostNetwork pod is never matched: its address is not its own.
    let (n, _) = count("pod=node-exporter-x");
    assert_eq!(n, 0);
    assert_eq!(results[2]["pod_verified"], false, "{}", results[2]);
    assert_eq!(results[6]["pod_reason"], "host_network", "{}", results[6]);
    assert!(results[6]["pod"].is_null(), "{}", results[6]);
}

/// The handover window end to end: A holds pod 0's address; B is created
/// and started (startTime set) with no podIP yet and connects (pod 0's
/// namespace is now B: CNI gave it the address); then B's podIP is posted
/// and A's delete arrives late. B's first connection is never named A
/// verified: `pod: null`, `pod_reason: ip_handover`, both pods listed,
/// unverified, in the search and in the resolve of nginx's line; B's next
/// connection is B's, verified; a search by B finds both, one by the
/// Deployment counts each connection once. Needs root.
#[test]
fn a_connection_before_the_new_pods_ip_is_posted_is_never_named_as_the_old_pod_verified() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(1);
    let (ns, addr) = topo.add_host("c");
    let api = KubeApi::start_in_netns(&ns);
    let kubeconfig = topo.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let ip0 = topo.pod_ip4(0).to_string();
    api.apply(owner_json(
        "ReplicaSet",
        "payments",
        "checkout-7d9f",
        &uid(100),
        Some("checkout"),
    ));
    api.apply(checkout_pod("checkout-7d9f-a", 1, &[&ip0]));
    let extra = format!("kubernetes:\n  kubeconfig: {}\n", kubeconfig.display());
    let c = Collector::start(&mut topo, &ns, addr, &extra);
    let nginx = topo.start_nginx(&[80]);
    let log = nginx.access_log.clone();
    let spool = topo.tmp_dir().join("spool-0");
    let yaml = c.agent_yaml("node-0", &spool, "");
    let _agent = Agent::start_on(&mut topo, 0, "node-0", &[80], &yaml);
    c.wait_connected(&["node-0"]);
    wait_for(WAIT, "the collector holds A", || {
        (metric(&c, "ctw_collector_pod_intervals_live") == Some(1.0)).then_some(())
    });
    let (_, hit) = connect(&topo, &c, &log, 0, 0);
    assert_eq!(named(&hit), checkout("checkout-7d9f-a"), "{hit}");
    assert_eq!(hit["pod_verified"], true, "{hit}");
    next_second_after(start_of(&hit));
    // B created and started, no podIP yet.
    let events = metric(&c, "ctw_collector_pod_watch_events_total").unwrap();
    api.apply(checkout_pod("checkout-7d9f-b", 2, &[]));
    events_past(&c, events);
    // B connects before its podIP is posted.
    let (line, _) = connect(&topo, &c, &log, 0, 1);
    // B's podIP posted (A still holds the address), then A's late delete.
    let fenced = metric(&c, "ctw_collector_pod_ip_fenced_total").unwrap_or(0.0);
    api.apply(checkout_pod("checkout-7d9f-b", 2, &[&ip0]));
    wait_for(WAIT, "the collector fenced A by B", || {
        (metric(&c, "ctw_collector_pod_ip_fenced_total")? > fenced).then_some(())
    });
    let events = metric(&c, "ctw_collector_pod_watch_events_total").unwrap();
    api.delete("Pod", "payments", "checkout-7d9f-a");
    events_past(&c, events);
    let handover = |v: &Value| {
        assert!(v["pod"].is_null(), "{v}");
        assert_eq!(v["pod_reason"], "ip_handover", "{v}");
        assert_eq!(v["pod_verified"], false, "{v}");
        assert_eq!(v["pod_ip_reused"], true, "{v}");
        let holders: Vec<&str> = v["pod_holders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["name"].as_str().unwrap())
            .collect();
        assert_eq!(holders, ["checkout-7d9f-a", "checkout-7d9f-b"], "{v}");
    };
    let (_, first) = stored(&topo, &c, &log, 0, 1);
    handover(&first);
    let (code, v) = c.post_json(
        "/api/v1/resolve",
        &json!({"lines": [line], "log_format": LOG_FORMAT}),
        topo.tmp_dir(),
    );
    assert_eq!(code, 200, "{v}");
    handover(&v["results"][0]);
    // B's next connection is B's, proven.
    let (_, hit) = connect(&topo, &c, &log, 0, 2);
    assert_eq!(named(&hit), checkout("checkout-7d9f-b"), "{hit}");
    assert_eq!(hit["pod_verified"], true, "{hit}");
    let total = |q: &str| {
        let (code, v) = c.api(&format!("/api/v1/connections?{q}&limit=100"));
        assert_eq!(code, 200, "{q}: {v}");
        v["total"].as_u64().unwrap()
    };
    assert_eq!(total("pod=checkout-7d9f-b"), 2, "B's window is searched");
    assert_eq!(total("workload=Deployment/checkout"), 3, "each once");
}

/// Every `ctw_collector_workload_new_connections_total` series of the
/// collector: (labels as exposed, value).
fn workload_series(c: &Collector) -> Vec<(String, f64)> {
    let (_, body) = c.get("/metrics");
    body.lines()
        .filter_map(|l| l.strip_prefix("ctw_collector_workload_new_connections_total{"))
        .filter_map(|l| {
            let (labels, v) = l.split_once("} ")?;
            Some((labels.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The workload counter behind the dashboard's top-workloads panel, after
/// real connections (curl → nginx through the node's masquerade) from pods
/// whose Pod objects the test created: a Deployment's pod to two watched
/// ports, a StatefulSet's pod, and a pod the API server does not know (not
/// counted). The values are the connections each pod made (each one logged
/// by nginx), by workload and destination port; no pod name or address is a
/// label. Needs root.
#[test]
fn workload_counter_counts_new_connections_of_known_pods_by_workload_and_port() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(3);
    let (ns, addr) = topo.add_host("c");
    let api = KubeApi::start_in_netns(&ns);
    let kubeconfig = topo.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let (ip0, ip1) = (topo.pod_ip4(0).to_string(), topo.pod_ip4(1).to_string());
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
        &[&ip0],
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
    // Pod 2 has no Pod object.
    let extra = format!("kubernetes:\n  kubeconfig: {}\n", kubeconfig.display());
    let c = Collector::start(&mut topo, &ns, addr, &extra);
    let nginx = topo.start_nginx(&[80, 8080]);
    let spool = topo.tmp_dir().join("spool-0");
    let yaml = c.agent_yaml("node-0", &spool, "");
    let _agent = Agent::start_on(&mut topo, 0, "node-0", &[80, 8080], &yaml);
    c.wait_connected(&["node-0"]);
    wait_for(WAIT, "the collector holds the two pods", || {
        (metric(&c, "ctw_collector_pod_intervals_live") == Some(2.0)).then_some(())
    });
    assert!(workload_series(&c).is_empty(), "nothing counted yet");

    // (pod, port, connections).
    let plan = [(0, 80, 3), (0, 8080, 1), (1, 80, 2), (2, 80, 2)];
    for (pod, port, n) in plan {
        for _ in 0..n {
            curl_ok(
                topo.pod_ns(pod),
                &format!("http://{}:{port}/", topo.srv_ip4()),
                None,
                &[],
            );
        }
    }
    // nginx logged every one (`$server_port` last), and the collector
    // stored every NEW record before the counter is read.
    let total: usize = plan.iter().map(|p| p.2).sum();
    let lines = wait_for(WAIT, "nginx logs every request", || {
        let l: Vec<String> = std::fs::read_to_string(&nginx.access_log)
            .ok()?
            .lines()
            .map(str::to_string)
            .collect();
        (l.len() == total).then_some(l)
    });
    for port in [80, 8080] {
        let logged = lines
            .iter()
            .filter(|l| l.ends_with(&format!(" {port}")))
            .count();
        let sent: usize = plan.iter().filter(|p| p.1 == port).map(|p| p.2).sum();
        assert_eq!(logged, sent, "port {port}: {lines:?}");
    }
    wait_for(WAIT, "every connection stored", || {
        let (code, v) = c.api(&format!(
            "/api/v1/connections?snat_ip={}&kind=new&limit=100",
            topo.node_ip4()
        ));
        (code == 200 && v["total"].as_u64() == Some(total as u64)).then_some(())
    });
    let mut got = workload_series(&c);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            (
                "namespace=\"batch\",port=\"80\",workload=\"worker\",workload_kind=\"StatefulSet\""
                    .to_string(),
                2.0
            ),
            (
                "namespace=\"payments\",port=\"80\",workload=\"checkout\",workload_kind=\"Deployment\""
                    .to_string(),
                3.0
            ),
            (
                "namespace=\"payments\",port=\"8080\",workload=\"checkout\",workload_kind=\"Deployment\""
                    .to_string(),
                1.0
            ),
        ],
        "pod 2 (no Pod object) is not counted"
    );
    assert_eq!(
        metric(&c, "ctw_collector_workload_series_overflow_total"),
        Some(0.0)
    );
}

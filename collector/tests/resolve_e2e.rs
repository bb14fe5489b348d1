//! End to end in network namespaces: real nginx lines in the default format
//! (`combined` + `$remote_port`, whose time is `$time_local`, 1 s) resolve to
//! the pods that sent them through `POST /api/v1/resolve`. Two nodes with
//! pods behind masquerade, one agent each, the collector in its own
//! namespace (the shape of `e2e.rs`). Needs root.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ctw_collector::resolve::DEFAULT_LOG_FORMAT;
use ctw_testkit::agent::Agent;
use ctw_testkit::collector::{Collector, HTTP_PORT};
use ctw_testkit::{require_root, run_in, wait_for, NginxHandle, Topology};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn log_lines(nginx: &NginxHandle) -> Vec<String> {
    std::fs::read_to_string(&nginx.access_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// One request from a pod; returns the access line nginx wrote for it.
fn request(
    topo: &Topology,
    nginx: &NginxHandle,
    node: usize,
    pod: usize,
    local_port: Option<u16>,
) -> String {
    let before = log_lines(nginx).len();
    let url = format!("http://{}/some/path?q=1", topo.srv_ip_for_node(node));
    let lp = local_port.map(|p| p.to_string());
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-A",
        "test agent/1.0 (\"quoted\")",
    ];
    if let Some(p) = &lp {
        argv.extend(["--local-port", p.as_str()]);
    }
    argv.push(&url);
    let out = run_in(topo.pod_ns_of(node, pod), &argv);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(WAIT, "nginx to log the request", || {
        let l = log_lines(nginx);
        (l.len() > before).then(|| l[before].clone())
    })
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Wait until the wall clock is in a later second than now: lines logged
/// with 1 s resolution then cannot share a second.
fn next_second() {
    let s = unix_secs();
    wait_for(Duration::from_secs(3), "the next second", || {
        (unix_secs() > s).then_some(())
    });
}

fn resolve(topo: &Topology, c: &Collector, lines: &[String]) -> (u16, Value) {
    let body = topo.tmp_dir().join("resolve.json");
    std::fs::write(
        &body,
        serde_json::to_vec(&json!({ "lines": lines })).unwrap(),
    )
    .unwrap();
    let auth = format!("Authorization: Bearer {}", c.token);
    let data = format!("@{}", body.display());
    let url = format!("http://127.0.0.1:{HTTP_PORT}/api/v1/resolve");
    let out = run_in(
        &c.ns,
        &[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
            "-w",
            "\n%{http_code}",
            &url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    let v = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (code.trim().parse().unwrap_or(0), v)
}

#[test]
fn real_nginx_lines_in_the_default_format_resolve_to_their_pods() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new(2);
    topo.add_node(2);
    let (col_ns, col_addr) = topo.add_host("c");
    let nginx = topo.start_nginx_with_format(&[80], DEFAULT_LOG_FORMAT);
    let collector = Collector::start(&mut topo, &col_ns, col_addr, "");
    let mut agents = Vec::new();
    for i in 0..2 {
        let name = format!("node-{i}");
        let spool = topo.tmp_dir().join(format!("spool-{i}"));
        let yaml = collector.agent_yaml(&name, &spool, "");
        agents.push(Agent::start_on(&mut topo, i, &name, &[80], &yaml));
    }
    collector.wait_connected(&["node-0", "node-1"]);

    // (line, pod address, node) for every request.
    let mut sent: Vec<(String, Ipv4Addr, String)> = Vec::new();
    for node in 0..2 {
        let name = format!("node-{node}");
        // The same node port used by two pods, in different seconds.
        let first = request(&topo, &nginx, node, 0, Some(45100));
        topo.conntrack_on(node, &["-D", "-p", "tcp", "--orig-port-src", "45100"]);
        next_second();
        let second = request(&topo, &nginx, node, 1, Some(45100));
        sent.push((first, topo.pod_ip4_of(node, 0), name.clone()));
        sent.push((second, topo.pod_ip4_of(node, 1), name.clone()));
        for pod in 0..2 {
            for _ in 0..3 {
                let line = request(&topo, &nginx, node, pod, None);
                sent.push((line, topo.pod_ip4_of(node, pod), name.clone()));
            }
        }
    }
    let lines: Vec<String> = sent.iter().map(|s| s.0.clone()).collect();
    // Records are searchable within the commit interval: wait until every
    // line is resolved (or the deadline says which were not).
    let v = wait_for(WAIT, "every line resolved", || {
        let (code, v) = resolve(&topo, &collector, &lines);
        assert_eq!(code, 200, "{v:#}");
        (v["summary"]["resolved"] == lines.len()).then_some(v)
    });
    for (i, (line, pod, node)) in sent.iter().enumerate() {
        let r = &v["results"][i];
        assert_eq!(r["line"], line.as_str());
        assert_eq!(r["status"], "resolved", "{r:#}");
        assert_eq!(r["pod_ip"], pod.to_string(), "{line}: {r:#}");
        assert_eq!(r["node"], node.as_str(), "{line}: {r:#}");
        assert_eq!(r["dst_port"], 80, "{r:#}");
        assert_eq!(r["incomplete"], false, "{r:#}");
        assert_eq!(r["record"]["alive_at"], true, "{r:#}");
    }
    // Both users of the reused port were candidates for its lines.
    for node in 0..2 {
        assert_eq!(
            v["results"][node * 8]["candidates"],
            2,
            "{:#}",
            v["results"][node * 8]
        );
        assert_eq!(
            v["results"][node * 8]["remote_port"],
            v["results"][node * 8 + 1]["remote_port"]
        );
    }
    assert_eq!(v["summary"]["unparsed"], 0);
    drop(agents);
}

//! End to end in network namespaces: real nginx lines in the default format
//! (`combined` + `$remote_port`, whose time is `$time_local`, 1 s) resolve to
//! the pods that sent them through `POST /api/v1/resolve`. Two nodes with
//! pods behind masquerade, one agent each, the collector in its own
//! namespace (the shape of `e2e.rs`). Needs root.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ctw_collector::resolve::DEFAULT_LOG_FORMAT;
use ctw_testkit::cluster::Cluster;
use ctw_testkit::{require_root, wait_for};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// A user agent with spaces and quotes, as real ones have.
const UA: &[&str] = &["-A", "test agent/1.0 (\"quoted\")"];

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

fn resolve(c: &Cluster, lines: &[String]) -> (u16, Value) {
    c.collector.post_json(
        "/api/v1/resolve",
        &json!({ "lines": lines }),
        c.topo.tmp_dir(),
    )
}

#[test]
fn real_nginx_lines_in_the_default_format_resolve_to_their_pods() {
    if !require_root() {
        return;
    }
    let c = Cluster::start(2, Some(DEFAULT_LOG_FORMAT), "", "");
    let topo = &c.topo;

    // (line, pod address, node) for every request.
    let mut sent: Vec<(String, Ipv4Addr, String)> = Vec::new();
    for node in 0..2 {
        let name = format!("node-{node}");
        // The same node port used by two pods, in different seconds.
        let first = c.request(node, 0, Some(45100), UA);
        topo.conntrack_on(node, &["-D", "-p", "tcp", "--orig-port-src", "45100"]);
        next_second();
        let second = c.request(node, 1, Some(45100), UA);
        sent.push((first, topo.pod_ip4_of(node, 0), name.clone()));
        sent.push((second, topo.pod_ip4_of(node, 1), name.clone()));
        for pod in 0..2 {
            for _ in 0..3 {
                let line = c.request(node, pod, None, UA);
                sent.push((line, topo.pod_ip4_of(node, pod), name.clone()));
            }
        }
    }
    let lines: Vec<String> = sent.iter().map(|s| s.0.clone()).collect();
    // Records are searchable within the commit interval: wait until every
    // line is resolved (or the deadline says which were not).
    let v = wait_for(WAIT, "every line resolved", || {
        let (code, v) = resolve(&c, &lines);
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
}

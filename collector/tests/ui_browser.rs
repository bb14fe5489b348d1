//! The web UI in headless Chromium against a real cluster: two nodes with
//! pods behind masquerade, an nginx ingress, agents streaming to the
//! collector (the topology of `e2e.rs`). The pods send requests; the nginx
//! access lines they produced are pasted into the Resolve page (with the
//! testkit's `log_format`), and the pod IP shown on every row must be the
//! pod that sent that request. The Search and Agents pages must show both
//! nodes, connected. `ui-tests/run.mjs` drives the browser (playwright-core
//! with Debian's chromium, inside the collector's network namespace, where
//! its HTTP API listens on 127.0.0.1) and saves a screenshot of each page
//! under `target/ui-screenshots/`.
//!
//! Needs root, chromium, node and `npm ci` in `ui-tests/`; without them it
//! prints why it is skipping and passes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ctw_testkit::cluster::Cluster;
use ctw_testkit::collector::HTTP_PORT;
use ctw_testkit::{require_root, run_in_timeout, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// The testkit's nginx `log_format`.
const LOG_FORMAT: &str = "$remote_addr $remote_port $msec $server_port";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Chromium, node and playwright-core, or why the test cannot run.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !chromium.exists() {
        return Err(format!(
            "{} not found (apt-get install chromium)",
            chromium.display()
        ));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node not found (apt-get install nodejs npm)".into());
    }
    let dir = workspace().join("ui-tests");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Err(format!(
            "playwright-core not installed (cd {} && npm ci)",
            dir.display()
        ));
    }
    Ok((chromium, dir.join("run.mjs")))
}

fn screenshots_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from)
        .join("ui-screenshots")
}

#[test]
fn resolve_search_and_agents_pages_show_the_pods_behind_real_nginx_lines() {
    if !require_root() {
        return;
    }
    let (chromium, script) = match browser_tools() {
        Ok(t) => t,
        Err(why) => {
            ctw_testkit::skip(&why);
            return;
        }
    };

    // The cluster of e2e.rs: two nodes with two pods each, nginx on port 80.
    let c = Cluster::start(2, None, "", "");
    let (topo, collector) = (&c.topo, &c.collector);

    // Requests from known pods; each one's raw access line and its sender.
    let mut sent: Vec<(String, Ipv4Addr, String)> = Vec::new();
    for _round in 0..2 {
        for node in 0..2 {
            for pod in 0..2 {
                let raw = c.request(node, pod, None, &[]);
                sent.push((raw, topo.pod_ip4_of(node, pod), format!("node-{node}")));
            }
        }
    }
    // Every line is searchable before the browser asks (the index commits
    // every 200 ms).
    for (raw, _, _) in &sent {
        let f: Vec<&str> = raw.split_whitespace().collect();
        let q = format!(
            "/api/v1/connections?snat_ip={}&snat_port={}&at={}&window=2m",
            f[0], f[1], f[2]
        );
        wait_for(WAIT, "the connection to be searchable", || {
            let (code, v) = collector.api(&q);
            (code == 200 && v["total"].as_u64().unwrap_or(0) >= 1).then_some(())
        });
    }
    // One line that is no nginx line at all.
    let garbage = "this is not an access log line";
    let mut text: Vec<&str> = sent.iter().map(|(l, _, _)| l.as_str()).collect();
    text.push(garbage);
    let lines_file = topo.tmp_dir().join("ui-lines.txt");
    std::fs::write(&lines_file, format!("{}\n", text.join("\n"))).expect("lines file");

    let shots = screenshots_dir();
    let url = format!("http://127.0.0.1:{HTTP_PORT}");
    let argv = [
        "env",
        &format!("CHROMIUM={}", chromium.display()),
        "node",
        script.to_str().expect("utf-8 path"),
        "--url",
        &url,
        "--token",
        &collector.token,
        "--lines",
        lines_file.to_str().expect("utf-8 path"),
        "--log-format",
        LOG_FORMAT,
        "--screenshots",
        shots.to_str().expect("utf-8 path"),
    ];
    let out = run_in_timeout(&collector.ns, &argv, Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ui-tests/run.mjs failed (see {}/failure.png): {stderr}",
        shots.display()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "run.mjs output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    eprintln!("browser saw: {v:#}");

    assert_eq!(
        v["problems"],
        serde_json::json!([]),
        "console errors, CSP violations or foreign requests"
    );
    // Sign-in gates everything.
    assert_eq!(v["signin"]["header_hidden"], true);
    assert_eq!(v["signin"]["agents_hidden"], true);
    assert!(
        v["signin"]["wrong_token_message"]
            .as_str()
            .is_some_and(|m| m.contains("401")),
        "{v:#}"
    );
    assert_eq!(v["signed_out"]["search_hidden"], true);
    assert_eq!(v["signed_out"]["token_kept"], 0);

    // Resolve: one row per line, in order, each with the pod that sent it.
    let rows = v["resolve"].as_array().expect("resolve rows");
    assert_eq!(rows.len(), sent.len() + 1, "{v:#}");
    for (i, (raw, pod, node)) in sent.iter().enumerate() {
        let r = &rows[i];
        assert_eq!(r["line"], i + 1, "{r}");
        assert_eq!(r["pod_ip"], pod.to_string(), "line {raw:?}: {r}");
        assert_eq!(r["node"], node.as_str(), "line {raw:?}: {r}");
        assert_eq!(r["status"], "resolved", "line {raw:?}: {r}");
    }
    let last = &rows[sent.len()];
    assert_eq!(last["status"], "unparsed", "{last}");
    assert_eq!(last["pod_ip"], "", "{last}");
    // The file upload shows the same pods; one ip:port + time finds the first.
    let uploaded: Vec<&str> = v["upload"]
        .as_array()
        .expect("upload rows")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let pasted: Vec<&str> = rows.iter().filter_map(|r| r["pod_ip"].as_str()).collect();
    assert_eq!(uploaded, pasted, "{v:#}");
    assert_eq!(v["single"]["pod_ip"], sent[0].1.to_string(), "{v:#}");
    assert_eq!(v["single"]["node"], sent[0].2.as_str(), "{v:#}");
    assert_eq!(v["single"]["status"], "resolved", "{v:#}");
    let summary = v["resolve_summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains(&format!("{} resolved", sent.len())) && summary.contains("1 unparsed"),
        "{summary}"
    );
    // The live lookup (the connection is in TIME_WAIT or gone by now) answered.
    if let Some(live) = v.get("live").filter(|l| !l.is_null()) {
        let text = live["text"].as_str().unwrap_or_default();
        let line = live["line"].as_u64().unwrap_or(0) as usize;
        let pod = sent[line - 1].1.to_string();
        assert!(
            text.starts_with("live:") && text.contains(&pod) || text.starts_with("closed"),
            "{live}"
        );
    }

    // Search: every request, both nodes, one histogram bar per match counted.
    let nodes = v["search"]["nodes"].as_array().expect("search nodes");
    assert_eq!(nodes.len(), sent.len(), "{v:#}");
    for n in ["node-0", "node-1"] {
        assert!(nodes.iter().any(|x| x == n), "{n} missing in search: {v:#}");
    }
    let sorted: Vec<&str> = nodes.iter().filter_map(Value::as_str).collect();
    assert!(
        sorted.windows(2).all(|w| w[0] <= w[1]),
        "not sorted by node: {sorted:?}"
    );
    assert_eq!(v["search"]["histogram_total"], sent.len(), "{v:#}");
    let pods = v["search"]["pods"].as_array().expect("search pods");
    for (_, pod, _) in &sent {
        let p = IpAddr::V4(*pod).to_string();
        assert!(
            pods.iter()
                .any(|x| x.as_str().is_some_and(|s| s.starts_with(&format!("{p}:")))),
            "{p} not in {pods:?}"
        );
    }

    // Agents: both nodes, connected.
    let agents_seen = v["agents"].as_array().expect("agents rows");
    for n in ["node-0", "node-1"] {
        let a = agents_seen
            .iter()
            .find(|a| a["node"] == n)
            .unwrap_or_else(|| panic!("{n} missing: {v:#}"));
        assert_eq!(a["connected"], true, "{a}");
        assert!(
            a["text"].as_str().is_some_and(|t| t.contains("connected")),
            "{a}"
        );
    }
    for name in ["signin", "resolve", "search", "agents"] {
        let p = shots.join(format!("{name}.png"));
        assert!(
            std::fs::metadata(&p).is_ok_and(|m| m.len() > 1000),
            "no screenshot {}",
            p.display()
        );
    }
}

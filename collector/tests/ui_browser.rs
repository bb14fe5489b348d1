//! The web UI in headless Chromium against a real cluster: two nodes with
//! pods behind masquerade, an nginx ingress writing nginx's own default
//! (`combined`) format plus `$remote_port`, agents streaming to the
//! collector (the topology of `e2e.rs`). The pods send requests; the nginx
//! access lines they produced are pasted into the Resolve page (no
//! `log_format`: the collector's default), and the pod IP shown on every
//! row must be the pod that sent that request. The browser runs in
//! Asia/Shanghai (UTC+8): every time shown must carry its zone, with the
//! precision nginx logged (`$time_local`: whole seconds), in UTC or, after
//! the switch, in +08:00. One connection is ended for real (`conntrack -D`:
//! the kernel's DESTROY) and must show its end; the others show the state
//! at their first packet and no end yet, and the live lookup of one of them
//! calls its TIME_WAIT entry closing. Lines nobody could have made say what
//! was searched. The Search and Agents pages must show both nodes,
//! connected and, with no traffic, idle. `ui-tests/run.mjs` drives the
//! browser (playwright-core with Debian's chromium, inside the collector's
//! network namespace, where its HTTP API listens on 127.0.0.1) and saves a
//! screenshot of each page under `target/ui-screenshots/`.
//!
//! Kubernetes is on: every testbed pod exists as a Pod object with its real
//! address on a local API server the collector watches
//! (`Cluster::start_with_pod_objects`): node-0's pods belong to Deployment
//! `shop/web`, node-1's to StatefulSet `data/db`. Every row of a connection
//! from a testbed pod (Resolve, one address, Search) must show that pod's
//! namespace/name and workload, verified and not reused; a search narrowed
//! to `StatefulSet/db` shows exactly node-1's connections.
//!
//! Needs root, chromium, node and `npm ci` in `ui-tests/`; without them it
//! prints why it is skipping and passes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ctw_testkit::cluster::{Cluster, PodCluster};
use ctw_testkit::collector::HTTP_PORT;
use ctw_testkit::{require_root, run_in, run_in_timeout, wait_for};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// nginx's `combined` format plus `$remote_port`: what the collector reads
/// when no `log_format` is given (`ctw_common::nginx::DEFAULT_LOG_FORMAT`).
const LOG_FORMAT: &str = concat!(
    r#"$remote_addr - $remote_user [$time_local] "$request" "#,
    r#"$status $body_bytes_sent "$http_referer" "$http_user_agent" $remote_port"#
);
/// The browser's zone: UTC+8, so a time shown without its zone shows.
const BROWSER_TZ: &str = "Asia/Shanghai";

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

/// argv: dst, local port, FIFO. One HTTP/1.1 connection, two requests on
/// it; the second waits (select, 30 s at most) until the test writes to the
/// FIFO, after it deleted the connection's conntrack entry: the kernel then
/// picks the connection up mid-stream (`nf_conntrack_tcp_loose`).
const KEEPALIVE: &str = r#"
import http.client, os, select, sys
dst, lport, fifo = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection(dst, 80, source_address=("0.0.0.0", lport), timeout=10)
for i in range(2):
    if i:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        ready, _, _ = select.select([fd], [], [], 30)
        assert ready, "the test did not say go"
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    assert c.sock.getsockname()[1] == lport
print("ok", flush=True)
"#;

/// One request: its access line as nginx wrote it, and what it says.
struct Sent {
    raw: String,
    remote_addr: Ipv4Addr,
    remote_port: u16,
    /// `$time_local` as written (`30/Nov/2026:10:51:45 +0000`).
    time_local: String,
    time: chrono::DateTime<chrono::FixedOffset>,
    pod: Ipv4Addr,
    node: usize,
}

/// `$remote_addr - - [$time_local] "..." ... $remote_port`, read by hand
/// (not with the collector's parser).
fn read_line(raw: &str, pod: Ipv4Addr, node: usize) -> Sent {
    let remote_addr = raw
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {raw:?}"));
    let remote_port = raw
        .split_whitespace()
        .last()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port at the end of {raw:?}"));
    let time_local = raw
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(t, _)| t.to_string())
        .unwrap_or_else(|| panic!("no [$time_local] in {raw:?}"));
    let time = chrono::DateTime::parse_from_str(&time_local, "%d/%b/%Y:%H:%M:%S %z")
        .unwrap_or_else(|e| panic!("{time_local:?}: {e}"));
    Sent {
        raw: raw.to_string(),
        remote_addr,
        remote_port,
        time_local,
        time,
        pod,
        node,
    }
}

/// The time as the UI must show it in `zone`: `2026-11-30 10:51:45 UTC`,
/// `2026-11-30 18:51:45 +08:00`.
fn shown(t: chrono::DateTime<chrono::FixedOffset>, zone: Option<i32>) -> String {
    match zone {
        None => format!(
            "{} UTC",
            t.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S")
        ),
        Some(h) => {
            let z = chrono::FixedOffset::east_opt(h * 3600).expect("offset");
            t.with_timezone(&z)
                .format("%Y-%m-%d %H:%M:%S %:z")
                .to_string()
        }
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The pod address of a search row's `src` cell (`ip:port`).
fn src_ip(r: &Value) -> Ipv4Addr {
    text(&r["src"])
        .rsplit_once(':')
        .and_then(|(ip, _)| ip.parse().ok())
        .unwrap_or_else(|| panic!("no pod address in {r}"))
}

/// The keepalive connection's local port (its second entry is picked up
/// mid-stream).
const KA_PORT: u16 = 43100;

/// A row (of run.mjs: `pod_shown`, `pod_name`, `pod_workload`, `pod_text`)
/// shows the Pod object the test created for the address `pod`:
/// `namespace/name` and `Kind/name`, not flagged unverified or reused
/// (unverified when picked up mid-stream: its start is unknown).
fn shows_pod(c: &PodCluster, r: &Value, pod: Ipv4Addr) {
    let obj = c
        .pod_object(pod)
        .unwrap_or_else(|| panic!("{pod} is no testbed pod"));
    assert_eq!(r["pod_shown"], true, "{r}");
    assert_eq!(
        r["pod_name"],
        format!("{}/{}", obj.namespace, obj.name),
        "{pod}: {r}"
    );
    assert_eq!(
        r["pod_workload"],
        format!("{}/{}", obj.workload_kind, obj.workload_name),
        "{pod}: {r}"
    );
    let t = text(&r["pod_text"]);
    let keepalive = r["src"]
        .as_str()
        .is_some_and(|s| s.ends_with(&format!(":{KA_PORT}")));
    if keepalive && !r.to_string().contains("mid-stream") && r.get("state").is_none() {
        // A search row of the keepalive: its first entry (seen from its
        // start) or the mid-stream one; the rows carry no state to tell.
        return;
    }
    if r.to_string().contains("mid-stream") {
        // Picked up mid-stream: the connection's start is unknown, so the
        // pod is named unverified until the history covers the entry's
        // possible lifetime (5 days; here it began with the test).
        assert!(t.contains("unverified"), "{r}");
    } else {
        assert!(!t.contains("unverified") && !t.contains("IP reused"), "{r}");
    }
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

    // The cluster of e2e.rs: two nodes with two pods each, nginx on port 80,
    // and the pods as Pod objects the collector watches.
    let c = Cluster::start_with_pod_objects(2, Some(LOG_FORMAT), "", "");
    let (topo, collector) = (&c.topo, &c.collector);

    // Requests from known pods; each one's raw access line and its sender.
    let mut sent: Vec<Sent> = Vec::new();
    for _round in 0..2 {
        for node in 0..2 {
            for pod in 0..2 {
                let raw = c.request(node, pod, None, &[]);
                sent.push(read_line(&raw, topo.pod_ip4_of(node, pod), node));
            }
        }
    }
    // Every line is searchable before the browser asks (the index commits
    // every 200 ms).
    let query = |s: &Sent| {
        format!(
            "/api/v1/connections?snat_ip={}&snat_port={}&at={}&window=2m",
            s.remote_addr,
            s.remote_port,
            s.time.timestamp()
        )
    };
    for s in &sent {
        wait_for(WAIT, "the connection to be searchable", || {
            let (code, v) = collector.api(&query(s));
            (code == 200 && v["total"].as_u64().unwrap_or(0) >= 1).then_some(())
        });
    }
    // The first request's connection ends for real: its entry is deleted
    // (the kernel sends DESTROY), and the collector has its end.
    let first = &sent[0];
    let del = run_in(
        topo.node_ns_of(first.node),
        &[
            "conntrack",
            "-D",
            "-p",
            "tcp",
            "--reply-dst",
            &first.remote_addr.to_string(),
            "--reply-port-dst",
            &first.remote_port.to_string(),
        ],
    );
    assert!(
        del.status.success(),
        "conntrack -D: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    // The state the kernel held the entry in when it was deleted (what its
    // DESTROY carries): conntrack -D prints the entry, the state before
    // the first `src=`.
    let deleted = String::from_utf8_lossy(&del.stdout).to_string();
    let deleted_state = deleted
        .split_whitespace()
        .take_while(|w| !w.starts_with("src="))
        .last()
        .unwrap_or_else(|| panic!("conntrack -D printed {deleted:?}"))
        .to_string();
    wait_for(WAIT, "the deleted connection's end", || {
        let (_, v) = collector.api(&query(first));
        v["records"][0]["end"].as_str().map(|_| ())
    });

    // A keepalive connection from node-1's pod 0 whose entry is deleted
    // between its two requests: the second line's entry is picked up
    // mid-stream (state ESTABLISHED at its first packet seen).
    let fifo = topo.tmp_dir().join("ui-keepalive-go");
    let mk = run_in(
        topo.node_ns_of(1),
        &["mkfifo", fifo.to_str().expect("utf-8 path")],
    );
    assert!(
        mk.status.success(),
        "mkfifo: {}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let log_lines = || {
        std::fs::read_to_string(&c.nginx.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = log_lines().len();
    let client = {
        let ns = topo.pod_ns_of(1, 0).to_string();
        let dst = topo.srv_ip_for_node(1).to_string();
        let fifo = fifo.to_str().expect("utf-8 path").to_string();
        std::thread::spawn(move || {
            run_in(
                &ns,
                &[
                    "python3",
                    "-c",
                    KEEPALIVE,
                    &dst,
                    &KA_PORT.to_string(),
                    &fifo,
                ],
            )
        })
    };
    let ka_first = wait_for(WAIT, "the keepalive's first request", || {
        log_lines().get(before).cloned()
    });
    let ka_first = read_line(&ka_first, topo.pod_ip4_of(1, 0), 1);
    wait_for(WAIT, "the keepalive's first entry at the collector", || {
        let (_, v) = collector.api(&query(&ka_first));
        (v["total"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    let del = run_in(
        topo.node_ns_of(1),
        &[
            "conntrack",
            "-D",
            "-p",
            "tcp",
            "--reply-dst",
            &ka_first.remote_addr.to_string(),
            "--reply-port-dst",
            &ka_first.remote_port.to_string(),
        ],
    );
    assert!(
        del.status.success(),
        "conntrack -D: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    std::fs::write(&fifo, "go").expect("write the FIFO");
    let out = client.join().expect("keepalive client thread");
    assert!(
        out.status.success(),
        "keepalive client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ka_second = wait_for(WAIT, "the keepalive's second request", || {
        log_lines().get(before + 1).cloned()
    });
    let ka_second = read_line(&ka_second, topo.pod_ip4_of(1, 0), 1);
    assert_eq!(
        ka_second.remote_port, ka_first.remote_port,
        "one connection"
    );
    wait_for(WAIT, "the mid-stream entry at the collector", || {
        let (_, v) = collector.api(&query(&ka_second));
        (v["total"].as_u64().unwrap_or(0) >= 2).then_some(())
    });

    // Lines nobody could have made: node-0's address an hour before the
    // cluster existed (node-0's agent saw nothing then: not observed), and a
    // pod address, which no agent lists as its own (not found).
    let hour_before = first.time - chrono::Duration::hours(1);
    let stamp = |t: chrono::DateTime<chrono::FixedOffset>| t.format("%d/%b/%Y:%H:%M:%S %z");
    let not_observed = format!(
        r#"{} - - [{}] "GET / HTTP/1.1" 200 3 "-" "curl/8" 40000"#,
        topo.node_ip4_of(0),
        stamp(hour_before)
    );
    let stray = topo.pod_ip4_of(0, 0);
    let not_found = format!(
        r#"{stray} - - [{}] "GET / HTTP/1.1" 200 3 "-" "curl/8" 40001"#,
        stamp(first.time)
    );
    // One line that is no nginx line at all.
    let garbage = "this is not an access log line";
    let mut text_lines: Vec<&str> = sent.iter().map(|s| s.raw.as_str()).collect();
    text_lines.extend([
        ka_second.raw.as_str(),
        not_observed.as_str(),
        not_found.as_str(),
        garbage,
    ]);
    let lines_file = topo.tmp_dir().join("ui-lines.txt");
    std::fs::write(&lines_file, format!("{}\n", text_lines.join("\n"))).expect("lines file");

    // Typed times: $time_local as written; the second line's time without a
    // zone, typed in the browser's zone (UTC+8) with the switch on local;
    // a pod address that no connection used.
    let second = &sent[1];
    let zoneless = second
        .time
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).expect("offset"))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    let checks = json!({
        "single": [
            {"addr": format!("{}:{}", first.remote_addr, first.remote_port), "time": first.time_local, "zone": "utc"},
            {"addr": format!("{}:{}", second.remote_addr, second.remote_port), "time": zoneless, "zone": "local"},
            {"addr": format!("{stray}:40001"), "time": first.time.to_rfc3339(), "zone": "utc"},
            {"addr": format!("{}:{}", second.remote_addr, second.remote_port), "time": second.time.timestamp().to_string(), "zone": "utc"},
            {"addr": format!("{}:{}", second.remote_addr, second.remote_port), "time": format!("{}.999", second.time.timestamp()), "zone": "local"},
        ],
        "search_at": {
            "snat_ip": first.remote_addr.to_string(),
            "snat_port": first.remote_port,
            "at": first.time_local,
            "at_zoneless": first.time.with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).expect("offset")).format("%Y-%m-%d %H:%M:%S").to_string(),
            "empty_port": 40002,
        },
        "search_workload": "StatefulSet/db",
    });
    let checks_file = topo.tmp_dir().join("ui-checks.json");
    std::fs::write(&checks_file, checks.to_string()).expect("checks file");

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
        "--checks",
        checks_file.to_str().expect("utf-8 path"),
        "--timezone",
        BROWSER_TZ,
        "--screenshots",
        shots.to_str().expect("utf-8 path"),
    ];
    let out = run_in_timeout(&collector.ns, &argv, Duration::from_secs(240));
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
        json!([]),
        "console errors, CSP violations or foreign requests"
    );
    // Sign-in gates everything.
    assert_eq!(v["signin"]["header_hidden"], true);
    assert_eq!(v["signin"]["agents_hidden"], true);
    assert!(
        text(&v["signin"]["wrong_token_message"]).contains("401"),
        "{v:#}"
    );
    assert_eq!(v["signed_out"]["search_hidden"], true);
    assert_eq!(v["signed_out"]["token_kept"], 0);

    // Resolve: one row per line, in order, each with the pod that sent it,
    // the line's time with its zone and nginx's one-second precision (UTC,
    // then +08:00 after the switch, which a reload keeps).
    assert_eq!(v["zone_default"], "utc");
    assert_eq!(v["zone_after_reload"], "local");
    let rows = v["resolve"].as_array().expect("resolve rows");
    let local = v["resolve_local"].as_array().expect("resolve rows, local");
    assert_eq!(rows.len(), sent.len() + 4, "{v:#}");
    for (i, s) in sent.iter().enumerate() {
        let (r, l) = (&rows[i], &local[i]);
        let raw = &s.raw;
        assert_eq!(r["line"], i + 1, "{r}");
        assert_eq!(r["pod_ip"], s.pod.to_string(), "line {raw:?}: {r}");
        assert_eq!(r["node"], format!("node-{}", s.node), "line {raw:?}: {r}");
        assert_eq!(r["status"], "resolved", "line {raw:?}: {r}");
        shows_pod(&c, r, s.pod);
        assert_eq!(r["time"], shown(s.time, None), "line {raw:?}: {r}");
        assert_eq!(l["time"], shown(s.time, Some(8)), "line {raw:?}: {l}");
        // A client's connection seen from its SYN.
        assert_eq!(r["state"], "state at first packet: SYN_SENT", "{r}");
        assert!(
            text(&r["status_text"]).contains("alive at line time"),
            "{r}"
        );
        for t in [&r["lifetime"], &l["lifetime"]] {
            assert!(
                text(t).contains(" UTC") || text(t).contains("+08:00"),
                "lifetime without a zone: {t}"
            );
        }
        if i == 0 {
            // Deleted above: the kernel's DESTROY is its end, and its
            // state the last known one.
            assert!(text(&r["lifetime"]).contains("ended (destroy"), "{r}");
            assert_eq!(
                r["end_state"],
                format!("last known state: {deleted_state}"),
                "{r}"
            );
            assert_eq!(r["live_button"], false, "{r}");
        } else {
            // In TIME_WAIT (120 s): no DESTROY yet, and not called "open".
            assert!(text(&r["lifetime"]).contains("no end yet"), "{r}");
            assert_eq!(r["end_state"], "", "{r}");
            assert!(!text(&r["text"]).contains("open"), "{r}");
            assert_eq!(r["live_button"], true, "{r}");
        }
    }
    for r in rows.iter().chain(local) {
        assert!(!text(&r["time"]).contains(".000"), "{r}");
    }
    let legend = text(&v["resolve_legend"]);
    assert!(
        legend.contains("alive at — alive at = the conntrack entry existed"),
        "{legend}"
    );
    assert!(legend.contains("TIME_WAIT"), "{legend}");
    // The keepalive's second request: its entry was picked up mid-stream.
    let r = &rows[sent.len()];
    assert_eq!(r["status"], "resolved", "{r}");
    assert_eq!(r["pod_ip"], ka_second.pod.to_string(), "{r}");
    shows_pod(&c, r, ka_second.pod);
    assert_eq!(r["time"], shown(ka_second.time, None), "{r}");
    assert_eq!(
        r["state"], "state at first packet seen: ESTABLISHED (mid-stream)",
        "{r}"
    );
    assert!(text(&r["status_text"]).contains("mid-stream"), "{r}");
    // Not observed: names node-0 and says what was searched.
    let r = &rows[sent.len() + 1];
    assert_eq!(r["status"], "not_observed", "{r}");
    let st = text(&r["status_text"]);
    assert!(
        st.contains("not observed on node-0") && st.contains("the agent of node-0"),
        "{r}"
    );
    assert!(
        st.contains(&format!(
            "searched: SNAT address {}:40000, any protocol",
            topo.node_ip4_of(0)
        )),
        "{r}"
    );
    assert!(
        st.contains(&shown(hour_before, None)[11..]),
        "the line's time in {r}"
    );
    // Not found: address, port, protocol, window and gaps.
    let r = &rows[sent.len() + 2];
    assert_eq!(r["status"], "not_found", "{r}");
    let st = text(&r["status_text"]);
    assert!(st.contains(&format!("no agent lists {stray}")), "{r}");
    assert!(
        st.contains(&format!(
            "searched: SNAT address {stray}:40001, any protocol, every node's records"
        )),
        "{r}"
    );
    assert!(
        st.contains("in records from ") && st.contains("gaps: none"),
        "{r}"
    );
    let last = &rows[sent.len() + 3];
    assert_eq!(last["status"], "unparsed", "{last}");
    assert_eq!(last["pod_ip"], "", "{last}");
    // No connection, no pod named.
    for r in &rows[sent.len() + 1..] {
        assert_eq!(r["pod_name"], "", "{r}");
    }
    // The file upload shows the same pods.
    let uploaded: Vec<&str> = v["upload"]
        .as_array()
        .expect("upload rows")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let pasted: Vec<&str> = rows.iter().filter_map(|r| r["pod_ip"].as_str()).collect();
    assert_eq!(uploaded, pasted, "{v:#}");
    let summary = text(&v["resolve_summary"]);
    assert!(
        summary.contains(&format!("{} resolved", sent.len() + 1))
            && summary.contains("1 unparsed")
            && summary.contains("1 not found")
            && summary.contains("1 not observed"),
        "{summary}"
    );

    // One address: $time_local as written finds the first pod; a zone-less
    // time typed in the browser's zone (switch on local) finds the second,
    // saying which zone it was read in; the stray address says what was
    // searched.
    let single = v["single"].as_array().expect("single rows");
    assert_eq!(single.len(), 5, "{v:#}");
    for (k, s) in [first, second].into_iter().enumerate() {
        let r = &single[k];
        assert_eq!(r["error"], Value::Null, "{r}");
        assert_eq!(r["status"], "resolved", "{r}");
        assert_eq!(r["pod_ip"], s.pod.to_string(), "{r}");
        assert_eq!(r["node"], format!("node-{}", s.node), "{r}");
        shows_pod(&c, r, s.pod);
    }
    assert_eq!(single[0]["time"], shown(first.time, None), "{v:#}");
    assert_eq!(single[1]["time"], shown(second.time, Some(8)), "{v:#}");
    let note = format!("{zoneless} has no zone: read as browser-local time (+08:00)");
    assert!(text(&single[1]["summary"]).contains(&note), "{v:#}");
    assert!(text(&single[1]["status_text"]).contains(&note), "{v:#}");
    // Unix seconds, and $msec (ms: shown with ms, here in +08:00) at the
    // end of the line's second (nginx wrote the line within that second,
    // after the connection started): the second pod, whose entry lives on
    // in TIME_WAIT.
    for (k, shown_as) in [
        (3, shown(second.time, None)),
        (
            4,
            shown(second.time, Some(8)).replace(" +08:00", ".999 +08:00"),
        ),
    ] {
        let r = &single[k];
        assert_eq!(r["error"], Value::Null, "{r}");
        assert_eq!(r["status"], "resolved", "{r}");
        assert_eq!(r["pod_ip"], second.pod.to_string(), "{r}");
        shows_pod(&c, r, second.pod);
        assert_eq!(r["time"], shown_as, "{r}");
        assert!(!text(&r["summary"]).contains("has no zone"), "{r}");
    }
    let r = &single[2];
    assert_eq!(r["status"], "not_found", "{r}");
    let st = text(&r["status_text"]);
    assert!(
        st.contains(&format!(
            "searched: SNAT address {stray}:40001, any protocol, every node's records; from "
        )) && st.contains("gaps: none"),
        "{r}"
    );

    // The live lookup of a connection in TIME_WAIT calls it closing: the
    // state conntrack holds for it (read after the browser asked; TIME_WAIT
    // only ends by the entry going away).
    let live = v
        .get("live")
        .filter(|l| !l.is_null())
        .expect("a live lookup");
    let line = live["line"].as_u64().unwrap_or(0) as usize;
    // The last row with a live button: the keepalive's line, after the
    // requests' lines.
    let s = sent.get(line - 1).unwrap_or(&ka_second);
    let held = run_in(
        topo.node_ns_of(s.node),
        &[
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--reply-dst",
            &s.remote_addr.to_string(),
            "--reply-port-dst",
            &s.remote_port.to_string(),
        ],
    );
    let held = String::from_utf8_lossy(&held.stdout);
    let live_text = text(&live["text"]);
    if held.contains("TIME_WAIT") {
        assert!(
            live_text.starts_with("live: closing (TIME_WAIT)"),
            "{live}; conntrack: {held}"
        );
        assert!(live_text.contains(&s.pod.to_string()), "{live}");
    } else {
        assert!(held.trim().is_empty(), "unexpected state: {held}");
        assert!(
            live_text.starts_with("closed") || live_text.contains("closing"),
            "{live}"
        );
    }

    // Search with at typed as nginx wrote it: the deleted connection, alive
    // at that time, ended by its DESTROY. An empty one says what it searched.
    let sa = &v["search_at"];
    assert_eq!(sa["error"], Value::Null, "{sa}");
    let sa_rows = sa["rows"].as_array().expect("search_at rows");
    assert_eq!(sa_rows.len(), 1, "{sa}");
    assert!(text(&sa_rows[0]).contains("ended (destroy"), "{sa}");
    assert!(
        text(&sa_rows[0]).contains("state at first packet: SYN_SENT"),
        "{sa}"
    );
    assert_eq!(sa["alive"], json!(["yes"]), "{sa}");
    assert!(
        text(&sa["legend"]).contains("alive at = the conntrack entry existed"),
        "{sa}"
    );
    // The same time typed without a zone in the browser's zone (+08:00).
    let z = &sa["zoneless"];
    let zr = z["rows"].as_array().expect("zone-less search rows");
    assert_eq!(zr.len(), 1, "{sa}");
    let zr = text(&zr[0]);
    assert!(
        zr.contains(&format!("{}:", first.pod)) && zr.contains(" +08:00") && zr.ends_with(" yes"),
        "{sa}"
    );
    assert!(
        text(&z["summary"]).contains("has no zone: read as browser-local time (+08:00)"),
        "{sa}"
    );
    let empty = text(&v["search_empty"]);
    assert!(
        empty.contains(&format!(
            "No connection found. Searched: SNAT {}:40002, protocol any, every node, from {}",
            first.remote_addr,
            shown(first.time - chrono::Duration::minutes(2), None).replace(" UTC", ".000 UTC")
        )) && empty.contains("gaps: none"),
        "{empty}"
    );

    // Search: every request (and the keepalive's two entries), both nodes,
    // one histogram bar per match counted.
    let nodes = v["search"]["nodes"].as_array().expect("search nodes");
    assert_eq!(nodes.len(), sent.len() + 2, "{v:#}");
    for n in ["node-0", "node-1"] {
        assert!(nodes.iter().any(|x| x == n), "{n} missing in search: {v:#}");
    }
    let sorted: Vec<&str> = nodes.iter().filter_map(Value::as_str).collect();
    assert!(
        sorted.windows(2).all(|w| w[0] <= w[1]),
        "not sorted by node: {sorted:?}"
    );
    assert_eq!(v["search"]["histogram_total"], sent.len() + 2, "{v:#}");
    let pods = v["search"]["pods"].as_array().expect("search pods");
    for s in &sent {
        let p = IpAddr::V4(s.pod).to_string();
        assert!(
            pods.iter()
                .any(|x| x.as_str().is_some_and(|t| t.starts_with(&format!("{p}:")))),
            "{p} not in {pods:?}"
        );
    }
    // Every search row names the pod that holds its source address, and
    // the search narrowed to StatefulSet data/db shows node-1's
    // connections only: its requests and the keepalive's two entries.
    let pod_rows = v["search"]["pod_rows"].as_array().expect("search pod rows");
    assert_eq!(pod_rows.len(), sent.len() + 2, "{v:#}");
    for r in pod_rows {
        shows_pod(&c, r, src_ip(r));
    }
    let narrowed = v["search_workload"]["pod_rows"]
        .as_array()
        .expect("search by workload rows");
    let node1 = sent.iter().filter(|s| s.node == 1).count() + 2;
    assert_eq!(narrowed.len(), node1, "{v:#}");
    for r in narrowed {
        let obj = c.pod_object(src_ip(r)).expect("a testbed pod");
        assert_eq!(obj.node, 1, "{r}");
        assert_eq!(r["pod_workload"], "StatefulSet/db", "{r}");
        shows_pod(&c, r, src_ip(r));
    }
    let search_rows = v["search"]["rows"].as_array().expect("search rows");
    assert_eq!(
        search_rows
            .iter()
            .filter(|r| text(r).contains("ended (destroy"))
            .count(),
        2,
        "the two deleted entries: {v:#}"
    );
    assert_eq!(
        search_rows
            .iter()
            .filter(|r| text(r).contains("no end yet"))
            .count(),
        sent.len(),
        "{v:#}"
    );
    assert_eq!(
        search_rows
            .iter()
            .filter(|r| text(r).contains("state at first packet seen: ESTABLISHED (mid-stream)"))
            .count(),
        1,
        "{v:#}"
    );

    // Agents: both nodes, connected, idle (no traffic since), their stream
    // shown as connected rather than a stale "last seen", no empty lag; the
    // last heartbeat arrived after the page started waiting (no traffic:
    // only heartbeats can advance it) and says what the agent holds.
    let agents_seen = v["agents"].as_array().expect("agents rows");
    let wait_started = chrono::DateTime::parse_from_rfc3339(text(&v["agents_wait_started"]))
        .unwrap_or_else(|e| panic!("agents_wait_started: {e}: {v:#}"));
    for n in ["node-0", "node-1"] {
        let a = agents_seen
            .iter()
            .find(|a| a["node"] == n)
            .unwrap_or_else(|| panic!("{n} missing: {v:#}"));
        assert_eq!(a["connected"], true, "{a}");
        assert_eq!(a["idle"], true, "{a}");
        assert_eq!(a["lag"], "idle", "{a}");
        assert!(text(&a["stream"]).starts_with("connected since "), "{a}");
        assert!(text(&a["stream"]).contains("idle: last heartbeat "), "{a}");
        assert!(text(&a["stream"]).contains(", last batch "), "{a}");
        let beat = chrono::DateTime::parse_from_rfc3339(text(&a["heartbeat_at"]))
            .unwrap_or_else(|e| panic!("heartbeat_at: {e}: {a}"));
        assert!(beat > wait_started, "{beat} not after {wait_started}: {a}");
        assert!(text(&a["heartbeat"]).contains("every 10 s, "), "{a}");
        assert!(text(&a["heartbeat"]).contains("newest record "), "{a}");
        assert!(!text(&a["text"]).contains("last seen"), "{a}");
    }
    assert!(text(&v["agents_summary"]).contains("2 idle"), "{v:#}");
    for name in [
        "signin",
        "resolve",
        "resolve-local",
        "single",
        "search",
        "agents",
    ] {
        let p = shots.join(format!("{name}.png"));
        assert!(
            std::fs::metadata(&p).is_ok_and(|m| m.len() > 1000),
            "no screenshot {}",
            p.display()
        );
    }
}

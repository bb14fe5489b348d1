//! The README's first command in its demo mode: `scripts/run.sh --demo
//! --exit-after 90` with a throw-away state directory and the already built
//! binaries of this test run (`CTW_BIN_DIR`), so no release build. It must
//! exit 0, print at least three real nginx lines resolved to pods of the
//! demo (each on the node that owns both the SNAT address and the pod), and
//! leave none of its namespaces or its host veth behind. Needs root.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ctw_testkit::{bin_path, netns_list, require_root};

/// `--exit-after`: how long the demo runs once its services are up.
const EXIT_AFTER_SECS: u64 = 90;
/// Whole-run limit: the run itself plus set-up, checks and shutdown.
const RUN_LIMIT: Duration = Duration::from_secs(EXIT_AFTER_SECS + 150);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("collector/ has a parent")
        .to_path_buf()
}

/// A port that was free a moment ago on 127.0.0.1 (keeps the run off the
/// default ports, which a developer's own `run.sh` may be using).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn drain(r: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// One resolved line of the script's output:
/// `resolved: SNAT_IP:PORT at TIME -> pod POD_IP on NODE ...`.
#[derive(Debug)]
struct Resolved {
    snat_ip: String,
    pod_ip: String,
    node: String,
}

fn resolved_lines(out: &str) -> Vec<Resolved> {
    out.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("resolved: ")?;
            let (addr, rest) = rest.split_once(" at ")?;
            let (snat_ip, _) = addr.rsplit_once(':')?;
            let (_, rest) = rest.split_once(" -> pod ")?;
            let mut f = rest.split_whitespace();
            let pod_ip = f.next()?.to_string();
            (f.next()? == "on").then_some(())?;
            let node = f.next()?.to_string();
            Some(Resolved {
                snat_ip: snat_ip.to_string(),
                pod_ip,
                node,
            })
        })
        .collect()
}

/// The first word after `key` in the script's output, without a trailing `*`.
fn named(stdout: &str, key: &str) -> Option<String> {
    stdout
        .lines()
        .find_map(|l| l.split(key).nth(1))
        .and_then(|r| r.split_whitespace().next())
        .map(|w| w.trim_end_matches('*').to_string())
}

#[test]
fn run_sh_refuses_a_port_in_use_before_building() {
    if !require_root() {
        return;
    }
    // A listener of our own on the HTTP port: run.sh must name it and stop
    // at once (before any build or install).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("local address").port();
    let state = std::env::temp_dir().join(format!("ctw-start-busy-{}", std::process::id()));
    let out = Command::new(repo_root().join("scripts/run.sh"))
        .args(["--demo", "--exit-after", "1"])
        .current_dir(repo_root())
        .env("CTW_STATE_DIR", &state)
        .env("CTW_GRPC_PORT", free_port().to_string())
        .env("CTW_HTTP_PORT", port.to_string())
        .env("CTW_AGENT_HTTP_PORT", free_port().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/run.sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("port {port} (CTW_HTTP_PORT) is already in use")),
        "{err}"
    );
    assert!(!state.exists(), "nothing started: {}", state.display());
    drop(taken);
}

#[test]
fn run_sh_demo_resolves_nginx_lines_to_pods_and_cleans_up() {
    if !require_root() {
        return;
    }
    let bin_dir = bin_path("ctw-agent")
        .parent()
        .expect("binary directory")
        .to_path_buf();
    bin_path("ctw-collector");
    let state = std::env::temp_dir().join(format!("ctw-start-script-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);

    let started = Instant::now();
    let mut child = Command::new(repo_root().join("scripts/run.sh"))
        .args(["--demo", "--exit-after", &EXIT_AFTER_SECS.to_string()])
        .current_dir(repo_root())
        .env("CTW_STATE_DIR", &state)
        .env("CTW_BIN_DIR", &bin_dir)
        .env("CTW_GRPC_PORT", free_port().to_string())
        .env("CTW_HTTP_PORT", free_port().to_string())
        .env("CTW_AGENT_HTTP_PORT", free_port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scripts/run.sh");
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for run.sh") {
            break Some(s);
        }
        if started.elapsed() > RUN_LIMIT {
            // SIGTERM: the script's trap still stops everything it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            break None;
        }
        // tidy: polls the script's exit, bounded by RUN_LIMIT.
        thread::sleep(Duration::from_millis(200));
    };
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    eprintln!("run.sh finished in {:?}\n{report}", started.elapsed());

    // Nothing of this run's demo is left, also when the run failed. (Other
    // demos, e.g. a developer's own, may come and go meanwhile.) The script
    // says "building the demo network (namespaces ctwdemo-ID-*, host veth
    // ctwdID ...".
    let ns_prefix = named(&stdout, "(namespaces ");
    let veth = named(&stdout, "host veth ");
    if let Some(prefix) = &ns_prefix {
        let leaked: Vec<String> = netns_list()
            .into_iter()
            .filter(|n| n.starts_with(prefix.as_str()))
            .collect();
        assert!(
            leaked.is_empty(),
            "demo namespaces left behind: {leaked:?}\n{report}"
        );
    }
    if let Some(veth) = &veth {
        let links = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip link");
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(
            !links.contains(&format!(" {veth}@")),
            "host veth {veth} left behind\n{report}"
        );
    }

    let status =
        status.unwrap_or_else(|| panic!("run.sh did not finish within {RUN_LIMIT:?}\n{report}"));
    assert!(status.success(), "run.sh exited with {status}\n{report}");
    assert!(
        ns_prefix
            .as_deref()
            .is_some_and(|p| p.starts_with("ctwdemo-"))
            && veth.is_some(),
        "run.sh did not name its demo namespaces and veth\n{report}"
    );

    let resolved = resolved_lines(&stdout);
    assert!(
        resolved.len() >= 3,
        "fewer than 3 resolved nginx lines\n{report}"
    );
    for r in &resolved {
        // Node i: SNAT address 198.19.i.1, pods 198.18.i.11 and .12.
        let i = match r.node.as_str() {
            "demo-node-1" => 1,
            "demo-node-2" => 2,
            other => panic!("{r:?}: unexpected node {other}\n{report}"),
        };
        assert_eq!(r.snat_ip, format!("198.19.{i}.1"), "{r:?}\n{report}");
        let pods = [format!("198.18.{i}.11"), format!("198.18.{i}.12")];
        assert!(
            pods.contains(&r.pod_ip),
            "{r:?}: not a pod of {}\n{report}",
            r.node
        );
    }
    assert!(stdout.contains("final check passed"), "{report}");
    let _ = std::fs::remove_dir_all(&state);
}

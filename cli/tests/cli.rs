//! The built `ctw` binary against the collector's real router, served in
//! process on 127.0.0.1:0 over a `MemStore` with known connections.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ctw_collector::http::router;
use ctw_common::EventKind;
use serde_json::Value;

#[path = "../../collector/tests/support/mem_api.rs"]
mod mem_api;
use mem_api::{conn, S, T0};

const TOKEN: &str = "cli-test-token";

struct Server {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

fn server() -> Server {
    let store = mem_api::store(vec![
        conn(EventKind::New, "10.244.1.7", 45000, 1, T0 * S),
        conn(EventKind::Destroy, "10.244.1.7", 45000, 1, (T0 + 10) * S),
        conn(EventKind::New, "10.244.1.8", 45000, 2, (T0 + 60) * S),
        // Found by the agent's start-up dump.
        conn(EventKind::Recovered, "10.244.1.9", 45002, 3, (T0 + 3) * S),
    ]);
    let app = router(mem_api::state(store, TOKEN));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    Server { addr, _rt: rt }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ctw-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `ctw` with a clean environment (no CTW_* variables, HOME without config).
fn ctw_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ctw"));
    for k in [
        "CTW_SERVER",
        "CTW_TOKEN",
        "CTW_TOKEN_FILE",
        "CTW_CONFIG",
        "XDG_CONFIG_HOME",
    ] {
        c.env_remove(k);
    }
    let home = std::env::temp_dir().join(format!("ctw-cli-test-{}-home-empty", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    c.env("HOME", home);
    c
}

fn run(s: &Server, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = ctw_cmd();
    c.args(["--server", &format!("http://{}", s.addr), "--token", TOKEN])
        .args(args);
    run_cmd(c, stdin)
}

fn run_cmd(mut c: Command, stdin: Option<&str>) -> Output {
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(text) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A default-format (combined + $remote_port) line at T0 + `secs` (< 1 h).
fn line(port: u16, secs: u64) -> String {
    format!(
        r#"198.18.0.1 - - [09/Dec/2024:07:{:02}:{:02} +0000] "GET / HTTP/1.1" 200 3 "-" "curl/8 (a b)" {port}"#,
        5 + secs / 60,
        secs % 60
    )
}

#[test]
fn search_table_json_and_exit_codes() {
    let s = server();
    let o = run(
        &s,
        &["search", "198.18.0.1:45000", &format!("{}", T0 + 5)],
        None,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("START")
            && lines[0].contains("POD (SRC)")
            && lines[0].ends_with("ALIVE@AT"),
        "{out}"
    );
    assert!(
        lines[1].contains("10.244.1.7:40000") && lines[1].ends_with("yes"),
        "{out}"
    );
    assert!(
        lines[2].contains("10.244.1.8:40000") && lines[2].ends_with("no"),
        "{out}"
    );
    assert_eq!(lines[1].find("10.244"), lines[2].find("10.244"), "{out}");

    let o = run(
        &s,
        &[
            "--json",
            "search",
            "--snat-ip",
            "198.18.0.1",
            "--snat-port",
            "45000",
            "--at",
            &format!("{}", T0 + 5),
        ],
        None,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["total"], 2);
    assert_eq!(v["complete"], true);

    // Nothing found: 1. Found but incomplete: 4. Refused by the server: 2.
    let o = run(&s, &["search", "198.18.0.1:1"], None);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    // Only the message, saying what was searched; no empty table.
    assert_eq!(stdout(&o), "", "an empty table was printed");
    let e = stderr(&o);
    assert!(
        e.contains("no connection found for snat_ip=198.18.0.1 snat_port=1 at any time"),
        "{e}"
    );
    let o = run(
        &s,
        &["search", "198.18.0.1:46000", &format!("{}", T0 + 1000)],
        None,
    );
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("kernel_drop"), "{}", stderr(&o));
    let o = run(&s, &["search", "--limit", "0"], None);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("HTTP 400") && stderr(&o).contains("limit"),
        "{}",
        stderr(&o)
    );
    // Usage errors never reach the server.
    let o = run(&s, &["search", "--bogus", "1"], None);
    assert_eq!(code(&o), 2);
}

#[test]
fn search_kind_filters_and_lists_its_values() {
    let s = server();
    let pods = |kind: &str| {
        let o = run(
            &s,
            &["--json", "search", "--node", "node-a", "--kind", kind],
            None,
        );
        assert!(matches!(code(&o), 0 | 1), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        let mut pods: Vec<String> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["src_ip"].as_str().unwrap().to_string())
            .collect();
        pods.sort();
        assert_eq!(v["total"], pods.len(), "{v}");
        pods
    };
    assert_eq!(pods("recovered"), vec!["10.244.1.9"]);
    assert_eq!(pods("new"), vec!["10.244.1.7", "10.244.1.8"]);
    assert!(pods("destroy").is_empty());
    assert!(pods("midstream").is_empty());
    // An unknown kind: a usage error naming the valid values, client-side.
    let o = run(&s, &["search", "--kind", "opened"], None);
    assert_eq!(code(&o), 2);
    for k in ctw_collector::store::ConnKind::ALL {
        assert!(stderr(&o).contains(k.as_str()), "{}", stderr(&o));
    }
    // The help lists them too.
    let o = run(&s, &["--help"], None);
    for k in ["new", "midstream", "recovered", "destroy"] {
        assert!(stdout(&o).contains(k), "{}", stdout(&o));
    }
}

#[test]
fn resolve_from_stdin_and_file_keeps_order() {
    let s = server();
    let input = [
        line(45000, 5),
        line(45000, 70),
        "not an nginx line".to_string(),
        line(45999, 5),
        line(46000, 1000),
    ]
    .join("\n")
        + "\n";
    // Batches of 2: three requests, output in input order.
    let o = run(&s, &["resolve", "--batch", "2"], Some(&input));
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let out = stdout(&o);
    let got: Vec<&str> = out.lines().collect();
    let want: Vec<String> = input
        .lines()
        .zip([
            " pod=10.244.1.7 node=node-a",
            " pod=10.244.1.8 node=node-a",
            " pod=? reason=unparsed",
            " pod=? reason=not_found",
            " pod=10.244.2.5 node=node-b incomplete=true",
        ])
        .map(|(l, s)| format!("{l}{s}"))
        .collect();
    assert_eq!(got, want);
    let err = stderr(&o);
    assert!(err.contains("line 3:"), "{err}");
    assert!(
        err.contains("5 lines: 3 resolved, 1 not found, 0 ambiguous, 1 unparsed, 1 incomplete"),
        "{err}"
    );

    // From a file, every line resolved: 0; one incomplete: 4.
    let d = tmp("resolve");
    let f = d.join("access.log");
    std::fs::write(&f, format!("{}\n{}\n", line(45000, 5), line(45000, 70))).unwrap();
    let o = run(&s, &["resolve", f.to_str().unwrap()], None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 2);
    std::fs::write(&f, format!("{}\n", line(46000, 1000))).unwrap();
    let o = run(&s, &["resolve", f.to_str().unwrap()], None);
    assert_eq!(code(&o), 4, "{}", stderr(&o));

    // --json: one document over all batches, line numbers of the input.
    let o = run(
        &s,
        &["--json", "resolve", "-", "--batch", "2"],
        Some(&input),
    );
    assert_eq!(code(&o), 1);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["lines"], 5);
    assert_eq!(v["summary"]["resolved"], 3);
    let nos: Vec<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line_no"].as_u64().unwrap())
        .collect();
    assert_eq!(nos, [1, 2, 3, 4, 5]);
    assert_eq!(v["results"][4]["gaps"][0]["reason"], "kernel_drop");

    // A custom format without time, with --at.
    let o = run(
        &s,
        &[
            "resolve",
            "--log-format",
            "$remote_addr:$remote_port",
            "--at",
            &format!("{}", T0 + 2),
        ],
        Some("198.18.0.1:45000\n"),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "198.18.0.1:45000 pod=10.244.1.7 node=node-a\n");
    // A format the server refuses: usage error naming it.
    let o = run(&s, &["resolve", "--log-format", "combined"], Some("x\n"));
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("log_format"), "{}", stderr(&o));
    // A missing file.
    let o = run(&s, &["resolve", "/nonexistent/access.log"], None);
    assert_eq!(code(&o), 2);
}

#[test]
fn lookup_agents_auth_and_config() {
    let s = server();
    let lookup = [
        "lookup",
        "--src-ip",
        "10.244.1.7",
        "--src-port",
        "40000",
        "--dst-ip",
        "198.19.0.2",
        "--dst-port",
        "80",
    ];
    // No agent connected: the collector answers 503.
    let o = run(&s, &lookup, None);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("HTTP 503"), "{}", stderr(&o));
    // An unknown node: 404, not found.
    let mut with_node = lookup.to_vec();
    with_node.extend(["--node", "ghost"]);
    let o = run(&s, &with_node, None);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("HTTP 404"), "{}", stderr(&o));

    let o = run(&s, &["agents"], None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("NODE"), "{}", stdout(&o));
    let o = run(&s, &["agents", "--json"], None);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["agents"], serde_json::json!([]));

    // Wrong token: 3, with the status.
    let mut c = ctw_cmd();
    c.args([
        "--server",
        &format!("http://{}", s.addr),
        "--token",
        "wrong",
        "agents",
    ]);
    let o = run_cmd(c, None);
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).contains("HTTP 401"), "{}", stderr(&o));
    // Nothing listening: 3.
    let mut c = ctw_cmd();
    c.args(["--server", "http://127.0.0.1:9", "--token", TOKEN, "agents"]);
    let o = run_cmd(c, None);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot talk to the collector"),
        "{}",
        stderr(&o)
    );
    // No token anywhere: 2.
    let mut c = ctw_cmd();
    c.arg("agents");
    assert_eq!(code(&run_cmd(c, None)), 2);

    // Environment, then the config file ($CTW_CONFIG; token_file relative).
    let mut c = ctw_cmd();
    c.env("CTW_SERVER", s.addr.to_string())
        .env("CTW_TOKEN", TOKEN)
        .arg("agents");
    assert_eq!(code(&run_cmd(c, None)), 0);
    let d = tmp("config");
    std::fs::write(d.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        d.join("config.yaml"),
        format!("server: http://{}\ntoken_file: token\n", s.addr),
    )
    .unwrap();
    let mut c = ctw_cmd();
    c.env("CTW_CONFIG", d.join("config.yaml")).arg("agents");
    let o = run_cmd(c, None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // The environment's token beats the file's.
    let mut c = ctw_cmd();
    c.env("CTW_CONFIG", d.join("config.yaml"))
        .env("CTW_TOKEN", "wrong")
        .arg("agents");
    assert_eq!(code(&run_cmd(c, None)), 3);
    // ~/.config/ctw/config.yaml.
    let home = tmp("home");
    std::fs::create_dir_all(home.join(".config/ctw")).unwrap();
    std::fs::write(
        home.join(".config/ctw/config.yaml"),
        format!("server: {}\ntoken: {TOKEN}\n", s.addr),
    )
    .unwrap();
    let mut c = ctw_cmd();
    c.env("HOME", &home).arg("agents");
    assert_eq!(code(&run_cmd(c, None)), 0);

    // Help documents the exit codes.
    let o = run_cmd(
        {
            let mut c = ctw_cmd();
            c.arg("--help");
            c
        },
        None,
    );
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("EXIT CODES"));
}

/// A server that is not a collector: every request gets what an agent's
/// port gives for the collector's paths, 404 with an empty body.
fn not_a_collector() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut c, &mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    addr
}

#[test]
fn pointed_at_something_that_is_not_a_collector_it_says_so() {
    let addr = not_a_collector();
    let mut c = ctw_cmd();
    c.args(["--server", &format!("http://{addr}"), "--token", TOKEN])
        .args(["search", "198.18.0.1:45000"]);
    let o = run_cmd(c, None);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("does not answer like a conntrack-watch collector")
            && e.contains("HTTP 404")
            && e.contains("an empty answer")
            && e.contains("--server"),
        "{e}"
    );
}

#[test]
fn times_as_nginx_writes_them_and_zone_less_times_with_tz() {
    let s = server();
    // 10.244.1.7 held node port 45000 from T0 (2024-12-09T07:05:00Z) for 10 s.
    for t in [
        "09/Dec/2024:15:05:03 +0800",   // $time_local
        "[09/Dec/2024:07:05:03 +0000]", // as in the access log
        "2024-12-09T07:05:03+00:00",    // $time_iso8601
        "1733727903.250",               // $msec
    ] {
        let o = run(&s, &["search", "198.18.0.1:45000", t], None);
        assert_eq!(code(&o), 0, "{t}: {}", stderr(&o));
        assert!(stdout(&o).contains("10.244.1.7"), "{t}: {}", stdout(&o));
    }
    // Without a zone: refused, saying how to give one.
    let o = run(
        &s,
        &["search", "198.18.0.1:45000", "2024-12-09T15:05:03"],
        None,
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no time zone") && stderr(&o).contains("--tz"),
        "{}",
        stderr(&o)
    );
    // With --tz, read in that zone.
    let o = run(
        &s,
        &[
            "search",
            "198.18.0.1:45000",
            "2024-12-09T15:05:03",
            "--tz",
            "+08:00",
        ],
        None,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("10.244.1.7"), "{}", stdout(&o));
}

//! The binary's command line and config errors, without root.

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ctw-agent"))
        .args(args)
        .output()
        .expect("run ctw-agent")
}

fn tmp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ctw-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn unknown_key_is_named_and_exit_code_is_2() {
    let p = tmp("typo.yaml", "ports: [80]\nlog:\n  max_sise_mb: 5\n");
    let out = agent(&["--config", p.to_str().unwrap_or_default()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("max_sise_mb"), "{err}");
    assert!(err.lines().count() <= 2, "one clear line: {err}");
}

#[test]
fn bad_value_names_key_and_value() {
    let p = tmp("bad.yaml", "ports: [80, 0]\n");
    let out = agent(&["-config", p.to_str().unwrap_or_default()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("ports[1]") && err.contains("got 0"), "{err}");
}

#[test]
fn check_mode_accepts_every_example_and_the_seed_file() {
    for f in ["agent.yaml", "agent-seed.yaml", "agent-kubernetes.yaml"] {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(f);
        let out = agent(&["--check", "-c", p.to_str().unwrap_or_default()]);
        // The examples name files of a real node (/etc/conntrack-watch/...):
        // here only those may be reported, never the YAML or a value.
        let err = String::from_utf8_lossy(&out.stderr);
        for line in err.lines() {
            assert!(
                line.contains(": cannot read /etc/")
                    || line.contains(": cannot read /run/")
                    || line.contains(": cannot write in /"),
                "{f}: {err}"
            );
        }
        assert!(out.status.success() || !err.is_empty(), "{f}");
    }
}

#[test]
fn check_mode_opens_every_file_the_config_names() {
    let dir = std::env::temp_dir().join(format!("ctw-check-{}", std::process::id()));
    let text = format!(
        "ports: [80]\nlog:\n  path: {d}/log/nat.log\ncollector:\n  address: https://c:9359\n  \
         spool_dir: {d}/spool\n  tls: {{ca_file: {d}/ca.pem, cert_file: {d}/node.pem, key_file: {d}/node.key}}\n",
        d = dir.display()
    );
    let p = tmp("files.yaml", &text);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("ca.pem"), "ca").expect("ca");
    let out = agent(&["--check", "-c", p.to_str().unwrap_or_default()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // Each missing file is named with its key and the file's path.
    for key in ["collector.tls.cert_file", "collector.tls.key_file"] {
        assert!(
            err.lines().any(|l| l.contains(&format!(
                "{}: {key}: cannot read {}",
                p.display(),
                dir.display()
            ))),
            "{key}: {err}"
        );
    }
    assert_eq!(err.lines().count(), 2, "{err}");
    std::fs::write(dir.join("node.pem"), "cert").expect("cert");
    std::fs::write(dir.join("node.key"), "key").expect("key");
    let out = agent(&["--check", "-c", p.to_str().unwrap_or_default()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_file_and_bad_arguments() {
    let out = agent(&["--config", "/nonexistent/ctw.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ctw.yaml"));
    let out = agent(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
    let out = agent(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ctw-agent "));
}

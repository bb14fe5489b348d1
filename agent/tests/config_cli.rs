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
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
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

//! Everything in `deploy/` checked: every YAML and JSON file parses; the
//! Kubernetes manifests carry the fields the agent and collector depend on;
//! the ConfigMap sources equal the example configs the agent's and
//! collector's own tests load; the Kustomize overlays build (with kubectl);
//! the dashboard holds the seed's PromQL; the alert rules pass `promtool`;
//! the systemd units pass `systemd-analyze verify`.
//!
//! Tools that CI installs (Debian packages `prometheus` for promtool and
//! `systemd` for systemd-analyze; kubectl when present) are skipped with a
//! printed message when missing, never silently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    yaml_docs_str(&read(path), &path.display().to_string())
}

fn yaml_docs_str(text: &str, what: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// `v` at a dotted path; list elements by index (`containers.0.name`). Keys
/// with dots (annotations) are indexed directly instead.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) if cur.is_sequence() => &cur[i],
            _ => &cur[key],
        };
    }
    cur
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path}: expected a string, got {:?}", at(v, path)))
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path)
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{path}: expected a list, got {:?}", at(v, path)))
}

fn find<'a>(list: &'a [Value], key: &str, want: &str) -> &'a Value {
    list.iter()
        .find(|x| x[key].as_str() == Some(want))
        .unwrap_or_else(|| panic!("no element with {key}: {want}"))
}

fn kind<'a>(docs: &'a [Value], k: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(k) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {k} {name}"))
}

fn have(tool: &str) -> bool {
    // kubectl has no --version flag.
    let probe: &[&str] = if tool == "kubectl" {
        &["version", "--client"]
    } else {
        &["--version"]
    };
    Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The test checks nothing: counted as skipped (see `ctw_testkit::skip`).
fn skip(test: &str, why: &str) {
    ctw_testkit::skip(&format!("{test}: {why}"));
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ctw-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "generated" {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if e.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Files under deploy/, without the check crate, build outputs and the
/// overlays' generated/ (secrets written by make-certs.sh, not committed).
fn deploy_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if !["check", "generated", "target"].contains(&name.as_str()) {
                    walk(&p, out);
                }
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), &mut out);
    out.sort();
    out
}

#[test]
fn every_yaml_and_json_file_parses() {
    let (mut yaml, mut json) = (0, 0);
    for p in deploy_files() {
        match p.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                assert!(!yaml_docs(&p).is_empty(), "{}: empty", p.display());
                yaml += 1;
            }
            Some("json") => {
                serde_json::from_str::<serde_json::Value>(&read(&p))
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                json += 1;
            }
            _ => {}
        }
    }
    assert!(
        yaml >= 12,
        "expected the manifests, found {yaml} YAML files"
    );
    assert!(json >= 1, "expected the dashboard");
}

fn agent_docs() -> Vec<Value> {
    yaml_docs(&deploy().join("kubernetes/base/agent-daemonset.yaml"))
}

fn collector_docs() -> Vec<Value> {
    let base = deploy().join("kubernetes/base");
    let mut docs = yaml_docs(&base.join("collector-statefulset.yaml"));
    docs.extend(yaml_docs(&base.join("collector-service.yaml")));
    docs
}

/// Every volumeMount names a volume of the pod.
fn check_mounts(pod: &Value) {
    let volumes: BTreeSet<&str> = seq(pod, "volumes").iter().map(|v| s(v, "name")).collect();
    for list in ["initContainers", "containers"] {
        if pod[list].is_null() {
            continue;
        }
        for c in seq(pod, list) {
            for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                assert!(
                    volumes.contains(s(m, "name")),
                    "{}: no volume {}",
                    s(c, "name"),
                    s(m, "name")
                );
            }
        }
    }
}

fn mount_of<'a>(c: &'a Value, volume: &str) -> &'a str {
    s(find(seq(c, "volumeMounts"), "name", volume), "mountPath")
}

fn node_name_env(c: &Value) {
    let env = find(seq(c, "env"), "name", "NODE_NAME");
    assert_eq!(s(env, "valueFrom.fieldRef.fieldPath"), "spec.nodeName");
}

#[test]
fn agent_daemonset_is_host_network_with_net_admin_only() {
    let docs = agent_docs();
    let ds = kind(&docs, "DaemonSet", "ctw-agent");
    let pod = at(ds, "spec.template.spec");
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(s(pod, "dnsPolicy"), "ClusterFirstWithHostNet");
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let agent = find(seq(pod, "containers"), "name", "agent");
    let sc = &agent["securityContext"];
    assert_eq!(seq(sc, "capabilities.add"), [Value::from("NET_ADMIN")]);
    assert_eq!(seq(sc, "capabilities.drop"), [Value::from("ALL")]);
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_ne!(sc["privileged"].as_bool(), Some(true));
    // The init container has no capability at all.
    for init in seq(pod, "initContainers") {
        assert_eq!(
            seq(init, "securityContext.capabilities.drop"),
            [Value::from("ALL")]
        );
        assert!(init["securityContext"]["capabilities"]["add"].is_null());
        node_name_env(init);
    }
    node_name_env(agent);
    assert_eq!(
        seq(agent, "args"),
        [
            Value::from("--config"),
            Value::from("/etc/conntrack-watch/agent.yaml")
        ]
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            s(agent, &format!("{probe}.httpGet.path")),
            "/healthz",
            "{probe}"
        );
        assert_eq!(
            at(agent, &format!("{probe}.httpGet.port")).as_u64(),
            Some(9358),
            "{probe}"
        );
    }
    let ann = at(ds, "spec.template.metadata.annotations");
    assert_eq!(
        ann["prometheus.io/scrape"].as_str().unwrap_or_default(),
        "true"
    );
    assert_eq!(
        ann["prometheus.io/port"].as_str().unwrap_or_default(),
        "9358"
    );
    assert_eq!(
        ann["prometheus.io/path"].as_str().unwrap_or_default(),
        "/metrics"
    );
    check_mounts(pod);
    let volumes = seq(pod, "volumes");
    for (name, path) in [
        ("log", "/var/log/nat-tracker"),
        ("spool", "/var/lib/conntrack-watch/spool"),
    ] {
        let v = find(volumes, "name", name);
        assert_eq!(s(v, "hostPath.path"), path);
        assert_eq!(mount_of(agent, name), path);
    }
    assert_eq!(
        s(find(volumes, "name", "config"), "configMap.name"),
        "ctw-agent-config"
    );
    assert!(find(volumes, "name", "agent-tls")["projected"].is_mapping());
}

#[test]
fn collector_statefulset_has_a_volume_claim_probes_and_services() {
    let docs = collector_docs();
    let sts = kind(&docs, "StatefulSet", "ctw-collector");
    assert_eq!(at(sts, "spec.replicas").as_u64(), Some(1));
    let claims = seq(sts, "spec.volumeClaimTemplates");
    let claim = claims
        .iter()
        .find(|c| s(c, "metadata.name") == "index")
        .expect("volume claim index");
    assert!(at(claim, "spec.resources.requests.storage")
        .as_str()
        .is_some());
    let pod = at(sts, "spec.template.spec");
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    let c = find(seq(pod, "containers"), "name", "collector");
    assert_eq!(s(c, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(s(c, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(
        seq(c, "securityContext.capabilities.drop"),
        [Value::from("ALL")]
    );
    assert!(c["securityContext"]["capabilities"]["add"].is_null());
    assert_eq!(
        at(c, "securityContext.readOnlyRootFilesystem").as_bool(),
        Some(true)
    );
    let ports: Vec<(&str, u64)> = seq(c, "ports")
        .iter()
        .map(|p| (s(p, "name"), at(p, "containerPort").as_u64().unwrap()))
        .collect();
    assert_eq!(ports, [("grpc", 9359), ("http", 9360)]);
    // The index mount is the claim (not a pod volume).
    assert_eq!(mount_of(c, "index"), "/var/lib/conntrack-watch");
    let volumes = seq(pod, "volumes");
    assert_eq!(
        s(find(volumes, "name", "tls"), "secret.secretName"),
        "ctw-collector-tls"
    );
    assert_eq!(
        s(find(volumes, "name", "token"), "secret.secretName"),
        "ctw-collector-token"
    );
    assert_eq!(
        s(find(volumes, "name", "config"), "configMap.name"),
        "ctw-collector-config"
    );
    let ann = at(sts, "spec.template.metadata.annotations");
    assert_eq!(
        ann["prometheus.io/scrape"].as_str().unwrap_or_default(),
        "true"
    );
    assert_eq!(
        ann["prometheus.io/port"].as_str().unwrap_or_default(),
        "9360"
    );
    let svc = kind(&docs, "Service", "ctw-collector");
    let ports: Vec<(&str, u64)> = seq(svc, "spec.ports")
        .iter()
        .map(|p| (s(p, "name"), at(p, "port").as_u64().unwrap()))
        .collect();
    assert_eq!(ports, [("grpc", 9359), ("http", 9360)]);
    assert_eq!(
        at(svc, "spec.selector")["app.kubernetes.io/name"]
            .as_str()
            .unwrap_or_default(),
        "ctw-collector"
    );
    assert_eq!(
        s(sts, "spec.serviceName"),
        s(
            kind(&docs, "Service", "ctw-collector-headless"),
            "metadata.name"
        )
    );
}

#[test]
fn configmap_sources_equal_the_example_configs() {
    // config/*-kubernetes.yaml are loaded by the agent's and collector's own
    // config tests; the ConfigMaps are generated from these copies.
    for (copy, example) in [
        (
            "kubernetes/base/config/agent.yaml",
            "config/agent-kubernetes.yaml",
        ),
        (
            "kubernetes/base/config/collector.yaml",
            "config/collector-kubernetes.yaml",
        ),
        (
            "kubernetes/clickhouse/config/collector.yaml",
            "config/collector-kubernetes-clickhouse.yaml",
        ),
    ] {
        assert_eq!(
            read(&deploy().join(copy)),
            read(&root().join(example)),
            "deploy/{copy} differs from {example}: copy one onto the other"
        );
    }
    let kust = &yaml_docs(&deploy().join("kubernetes/base/kustomization.yaml"))[0];
    let gens = seq(kust, "configMapGenerator");
    assert_eq!(
        seq(find(gens, "name", "ctw-agent-config"), "files"),
        [Value::from("agent.yaml=config/agent.yaml")]
    );
    assert_eq!(
        seq(find(gens, "name", "ctw-collector-config"), "files"),
        [Value::from("collector.yaml=config/collector.yaml")]
    );
}

/// `path` lies under the directory `dir`.
fn under(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(dir)
}

/// The API resources the collector's pod watch reads, from its source:
/// `Api::<Kind>::all` in collector/src/pods/watch.rs, as (group, resource).
fn watched_resources() -> BTreeSet<(String, String)> {
    let src = read(&root().join("collector/src/pods/watch.rs"));
    let mut out = BTreeSet::new();
    for part in src.split("Api::<").skip(1) {
        let kind = part.split('>').next().unwrap_or_default();
        let (group, resource) = match kind {
            "Pod" => ("", "pods"),
            "ReplicaSet" => ("apps", "replicasets"),
            "Job" => ("batch", "jobs"),
            k => panic!(
                "collector/src/pods/watch.rs watches {k}: add it to collector-rbac.yaml and here"
            ),
        };
        out.insert((group.to_string(), resource.to_string()));
    }
    out
}

#[test]
fn collector_rbac_reads_pods_and_owner_kinds_only() {
    let docs = yaml_docs(&deploy().join("kubernetes/base/collector-rbac.yaml"));
    let role = kind(&docs, "ClusterRole", "ctw-collector-pods");
    let mut granted = BTreeSet::new();
    for rule in seq(role, "rules") {
        let verbs: BTreeSet<&str> = seq(rule, "verbs")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            verbs,
            BTreeSet::from(["get", "list", "watch"]),
            "read-only verbs, no wildcard: {rule:?}"
        );
        assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());
        for g in seq(rule, "apiGroups") {
            for r in seq(rule, "resources") {
                let (g, r) = (g.as_str().unwrap(), r.as_str().unwrap());
                assert!(
                    g != "*" && r != "*" && !r.contains('/'),
                    "no wildcard or subresource: {g}/{r}"
                );
                granted.insert((g.to_string(), r.to_string()));
            }
        }
    }
    assert_eq!(
        granted,
        watched_resources(),
        "the role grants exactly what the pod watch reads"
    );
    let binding = kind(&docs, "ClusterRoleBinding", "ctw-collector-pods");
    assert_eq!(s(binding, "roleRef.kind"), "ClusterRole");
    assert_eq!(s(binding, "roleRef.name"), "ctw-collector-pods");
    assert_eq!(s(binding, "roleRef.apiGroup"), "rbac.authorization.k8s.io");
    let subjects = seq(binding, "subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(s(&subjects[0], "kind"), "ServiceAccount");
    assert_eq!(s(&subjects[0], "name"), "ctw-collector");
    assert_eq!(s(&subjects[0], "namespace"), "conntrack-watch");
    // The account exists, the collector's pod runs as it with its token
    // mounted (the in-cluster config reads it); the agent gets no token.
    let cdocs = collector_docs();
    kind(&cdocs, "ServiceAccount", "ctw-collector");
    let pod = at(
        kind(&cdocs, "StatefulSet", "ctw-collector"),
        "spec.template.spec",
    );
    assert_eq!(s(pod, "serviceAccountName"), "ctw-collector");
    assert_eq!(
        at(pod, "automountServiceAccountToken").as_bool(),
        Some(true)
    );
    let adocs = agent_docs();
    let apod = at(kind(&adocs, "DaemonSet", "ctw-agent"), "spec.template.spec");
    assert_eq!(
        at(apod, "automountServiceAccountToken").as_bool(),
        Some(false)
    );
    // The base lists the file; the config has the watch on (auto) with the
    // in-cluster account (no kubeconfig).
    let kust = &yaml_docs(&deploy().join("kubernetes/base/kustomization.yaml"))[0];
    assert!(seq(kust, "resources").contains(&Value::from("collector-rbac.yaml")));
    let cfg = &yaml_docs(&root().join("config/collector-kubernetes.yaml"))[0];
    assert!(
        matches!(cfg["kubernetes"]["enabled"].as_str(), Some("auto"))
            || cfg["kubernetes"]["enabled"].as_bool() == Some(true)
    );
    assert!(cfg["kubernetes"]["kubeconfig"].is_null());
}

#[test]
fn config_paths_match_the_mounts() {
    let agent_cfg = &yaml_docs(&root().join("config/agent-kubernetes.yaml"))[0];
    let docs = agent_docs();
    let pod = at(kind(&docs, "DaemonSet", "ctw-agent"), "spec.template.spec");
    let agent = find(seq(pod, "containers"), "name", "agent");
    let log_dir = mount_of(agent, "log");
    assert!(under(s(agent_cfg, "log.path"), log_dir));
    assert_eq!(
        s(agent_cfg, "collector.spool_dir"),
        mount_of(agent, "spool")
    );
    assert_eq!(s(agent_cfg, "http.listen_addr"), ":9358");
    assert!(s(agent_cfg, "collector.address")
        .starts_with("https://ctw-collector.conntrack-watch.svc:9359"));
    // TLS files are behind the link the init container makes.
    let init = &seq(pod, "initContainers")[0];
    let cmd: Vec<&str> = seq(init, "command")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(cmd[..2], ["ln", "-sfn"]);
    assert_eq!(
        cmd[2],
        format!("{}/$(NODE_NAME)", mount_of(agent, "agent-tls"))
    );
    assert!(under(cmd[3], mount_of(agent, "run")));
    assert_eq!(mount_of(init, "run"), mount_of(agent, "run"));
    for key in ["ca_file", "cert_file", "key_file"] {
        let file = s(agent_cfg, &format!("collector.tls.{key}"));
        assert_eq!(
            Path::new(file).parent().unwrap(),
            Path::new(cmd[3]),
            "{key}"
        );
    }

    let coll_cfg = &yaml_docs(&root().join("config/collector-kubernetes.yaml"))[0];
    let docs = collector_docs();
    let pod = at(
        kind(&docs, "StatefulSet", "ctw-collector"),
        "spec.template.spec",
    );
    let c = find(seq(pod, "containers"), "name", "collector");
    assert!(under(s(coll_cfg, "storage.path"), mount_of(c, "index")));
    assert!(under(s(coll_cfg, "http.token_file"), mount_of(c, "token")));
    assert!(
        s(coll_cfg, "http.token_file").ends_with("/token"),
        "the Secret's key is token"
    );
    for key in ["ca_file", "cert_file", "key_file"] {
        assert!(
            under(s(coll_cfg, &format!("grpc.tls.{key}")), mount_of(c, "tls")),
            "{key}"
        );
    }
    assert!(s(coll_cfg, "grpc.listen_addr").ends_with(":9359"));
    assert!(s(coll_cfg, "http.listen_addr").ends_with(":9360"));
}

#[test]
fn kustomizations_name_existing_files() {
    let k8s = deploy().join("kubernetes");
    for dir in ["base", "cert-manager", "static-certs", "clickhouse"] {
        let kust = &yaml_docs(&k8s.join(dir).join("kustomization.yaml"))[0];
        assert_eq!(s(kust, "namespace"), "conntrack-watch", "{dir}");
        let mut files: Vec<String> = Vec::new();
        for v in kust["resources"].as_sequence().into_iter().flatten() {
            files.push(v.as_str().unwrap().to_string());
        }
        for p in kust["patches"].as_sequence().into_iter().flatten() {
            files.push(s(p, "path").to_string());
        }
        for g in kust["configMapGenerator"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            for f in seq(g, "files") {
                files.push(
                    f.as_str()
                        .unwrap()
                        .split('=')
                        .next_back()
                        .unwrap()
                        .to_string(),
                );
            }
        }
        for f in files {
            if f.starts_with("generated/") {
                continue; // written by make-certs.sh
            }
            assert!(
                k8s.join(dir).join(&f).exists(),
                "{dir}/kustomization.yaml names missing {f}"
            );
        }
    }
}

/// A `ctw-collector` binary with the `certs` subcommand: $CTW_COLLECTOR, or
/// the workspace's build.
fn collector_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("CTW_COLLECTOR")
        .map(PathBuf::from)
        .into_iter()
        .chain(["debug", "release"].map(|p| root().join("target").join(p).join("ctw-collector")));
    candidates.into_iter().find(|b| {
        Command::new(b)
            .args(["certs", "init-ca", "--help"])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("init-ca")
            })
    })
}

#[test]
fn make_certs_script_is_valid_bash() {
    run(Command::new("bash")
        .arg("-n")
        .arg(deploy().join("kubernetes/make-certs.sh")));
    let out = run(Command::new(deploy().join("kubernetes/make-certs.sh")).arg("--help"));
    assert!(out.contains("--mode static|cert-manager"), "{out}");
    let bad = Command::new(deploy().join("kubernetes/make-certs.sh"))
        .args(["--nodes", "ca", "--mode", "cert-manager"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a node named ca clashes with the CA's files"
    );
}

/// Copy deploy/kubernetes, run make-certs.sh in `mode` for two nodes, build
/// the overlay with kubectl, and return the rendered objects.
fn build_overlay(mode: &str, overlay: &str, collector: Option<&Path>) -> Vec<Value> {
    let tmp = temp_dir(overlay);
    copy_tree(&deploy().join("kubernetes"), &tmp);
    let mut cmd = Command::new(tmp.join("make-certs.sh"));
    cmd.args(["--mode", mode, "--nodes", "node-a node-b.example"]);
    if let Some(b) = collector {
        cmd.env("CTW_COLLECTOR", b);
    }
    run(&mut cmd);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(tmp.join(overlay))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_docs_str(&String::from_utf8_lossy(&out.stdout), overlay);
    std::fs::remove_dir_all(&tmp).unwrap();
    docs
}

/// Checks common to both overlays' output.
fn check_rendered(docs: &[Value]) {
    for d in docs {
        let k = s(d, "kind");
        if !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&k) {
            assert_eq!(s(d, "metadata.namespace"), "conntrack-watch", "{k}");
        }
    }
    let ds = kind(docs, "DaemonSet", "ctw-agent");
    let pod = at(ds, "spec.template.spec");
    check_mounts(pod);
    let tls = find(seq(pod, "volumes"), "name", "agent-tls");
    let sources = seq(tls, "projected.sources");
    assert_eq!(sources.len(), 2);
    for (src, node) in sources.iter().zip(["node-a", "node-b.example"]) {
        assert_eq!(s(src, "secret.name"), format!("ctw-agent-{node}"));
        let paths: Vec<&str> = seq(src, "secret.items")
            .iter()
            .map(|i| s(i, "path"))
            .collect();
        assert_eq!(
            paths,
            [
                format!("{node}/ca.crt"),
                format!("{node}/tls.crt"),
                format!("{node}/tls.key")
            ]
        );
    }
    // The generated ConfigMap names (with their hash) are the ones mounted.
    let cm = docs
        .iter()
        .find(|d| {
            s(d, "kind") == "ConfigMap" && s(d, "metadata.name").starts_with("ctw-agent-config-")
        })
        .expect("agent ConfigMap");
    assert_eq!(
        s(
            find(seq(pod, "volumes"), "name", "config"),
            "configMap.name"
        ),
        s(cm, "metadata.name")
    );
    assert_eq!(
        at(cm, "data")["agent.yaml"].as_str().unwrap_or_default(),
        read(&root().join("config/agent-kubernetes.yaml"))
    );
    kind(docs, "Secret", "ctw-collector-token");
    // The pod-watch RBAC is rendered, bound to the collector's account in
    // the product's namespace.
    kind(docs, "ClusterRole", "ctw-collector-pods");
    let b = kind(docs, "ClusterRoleBinding", "ctw-collector-pods");
    let subj = &seq(b, "subjects")[0];
    assert_eq!(
        (s(subj, "name"), s(subj, "namespace")),
        ("ctw-collector", "conntrack-watch")
    );
    let images: BTreeSet<&str> = seq(pod, "containers")
        .iter()
        .chain(seq(pod, "initContainers"))
        .map(|c| s(c, "image"))
        .collect();
    assert_eq!(
        images.into_iter().collect::<Vec<_>>(),
        ["conntrack-watch:0.1.0"]
    );
}

#[test]
fn cert_manager_overlay_builds() {
    if !have("kubectl") {
        return skip("cert_manager_overlay_builds", "kubectl is not installed");
    }
    let docs = build_overlay("cert-manager", "cert-manager", None);
    check_rendered(&docs);
    for node in ["node-a", "node-b.example"] {
        let cert = kind(&docs, "Certificate", &format!("ctw-agent-{node}"));
        assert_eq!(
            seq(cert, "spec.dnsNames")[0].as_str(),
            Some(node),
            "first DNS name = node name"
        );
        assert_eq!(s(cert, "spec.secretName"), format!("ctw-agent-{node}"));
        assert_eq!(s(cert, "spec.issuerRef.name"), "ctw-ca-issuer");
        assert!(seq(cert, "spec.usages").contains(&Value::from("client auth")));
    }
    let coll = kind(&docs, "Certificate", "ctw-collector");
    assert_eq!(s(coll, "spec.secretName"), "ctw-collector-tls");
    // Replicas use it as client certificate towards each other too.
    for u in ["server auth", "client auth"] {
        assert!(seq(coll, "spec.usages").contains(&Value::from(u)), "{u}");
    }
    assert!(seq(coll, "spec.dnsNames").contains(&Value::from("ctw-collector.conntrack-watch.svc")));
    kind(&docs, "Issuer", "ctw-ca-issuer");
}

/// The replicas overlay: the collector as a Deployment of 2+ pods without
/// a volume claim, its pod IP (downward API) as `POD_IP` for
/// `replicas.advertise_addr`, the ClickHouse config and password Secret
/// mounted where the config names them; the rest as the cert-manager
/// overlay renders it.
#[test]
fn clickhouse_overlay_builds() {
    if !have("kubectl") {
        return skip("clickhouse_overlay_builds", "kubectl is not installed");
    }
    let docs = build_overlay("cert-manager", "clickhouse", None);
    check_rendered(&docs);
    assert!(
        !docs.iter().any(|d| s(d, "kind") == "StatefulSet"
            || s(d, "kind") == "PersistentVolumeClaim"
            || d["metadata"]["name"].as_str() == Some("ctw-collector-headless")),
        "no StatefulSet, claim or headless Service"
    );
    let dep = kind(&docs, "Deployment", "ctw-collector");
    assert!(at(dep, "spec.replicas").as_u64().unwrap() >= 2);
    let pod = at(dep, "spec.template.spec");
    let c = find(seq(pod, "containers"), "name", "collector");
    let env = find(seq(c, "env"), "name", "POD_IP");
    assert_eq!(s(env, "valueFrom.fieldRef.fieldPath"), "status.podIP");
    assert_eq!(s(c, "readinessProbe.httpGet.path"), "/readyz");
    let volumes = seq(pod, "volumes");
    for v in volumes {
        assert!(
            v["persistentVolumeClaim"].is_null() && v["hostPath"].is_null(),
            "no persistent volume: {v:?}"
        );
    }
    assert_eq!(
        s(find(volumes, "name", "clickhouse"), "secret.secretName"),
        "ctw-clickhouse"
    );
    // The replaced ConfigMap is the one mounted, with the example's text.
    let cm = docs
        .iter()
        .find(|d| {
            s(d, "kind") == "ConfigMap"
                && s(d, "metadata.name").starts_with("ctw-collector-config-")
        })
        .expect("collector ConfigMap");
    assert_eq!(
        s(find(volumes, "name", "config"), "configMap.name"),
        s(cm, "metadata.name")
    );
    let text = read(&root().join("config/collector-kubernetes-clickhouse.yaml"));
    assert_eq!(
        at(cm, "data")["collector.yaml"].as_str(),
        Some(text.as_str())
    );
    let cfg = &yaml_docs_str(&text, "collector-kubernetes-clickhouse.yaml")[0];
    assert_eq!(s(cfg, "storage.backend"), "clickhouse");
    assert!(cfg["replicas"].is_mapping(), "replicas on");
    // No fixed id or address: each pod's own ($HOSTNAME, $POD_IP).
    assert!(cfg["replicas"]["collector_id"].is_null());
    assert!(cfg["replicas"]["advertise_addr"].is_null());
    for (key, mount) in [
        ("storage.password_file", "clickhouse"),
        ("http.token_file", "token"),
        ("grpc.tls.cert_file", "tls"),
        ("grpc.tls.key_file", "tls"),
        ("grpc.tls.ca_file", "tls"),
        ("kubernetes.history_dir", "pods"),
    ] {
        assert!(under(s(cfg, key), mount_of(c, mount)), "{key}");
    }
    assert!(s(cfg, "storage.password_file").ends_with("/password"));
    let coll = kind(&docs, "Certificate", "ctw-collector");
    assert!(seq(coll, "spec.usages").contains(&Value::from("client auth")));
    // Agents dial the Service, which picks any replica.
    let svc = kind(&docs, "Service", "ctw-collector");
    assert_eq!(
        at(svc, "spec.selector")["app.kubernetes.io/name"].as_str(),
        at(dep, "spec.template.metadata.labels")["app.kubernetes.io/name"].as_str()
    );
}

#[test]
fn static_certs_overlay_builds() {
    if !have("kubectl") {
        return skip("static_certs_overlay_builds", "kubectl is not installed");
    }
    let Some(bin) = collector_binary() else {
        return skip(
            "static_certs_overlay_builds",
            "no ctw-collector binary with `certs` (build it, or set CTW_COLLECTOR)",
        );
    };
    let docs = build_overlay("static", "static-certs", Some(&bin));
    check_rendered(&docs);
    for name in [
        "ctw-collector-tls",
        "ctw-agent-node-a",
        "ctw-agent-node-b.example",
    ] {
        let secret = kind(&docs, "Secret", name);
        for key in ["ca.crt", "tls.crt", "tls.key"] {
            assert!(at(secret, "data")[key].as_str().is_some(), "{name} {key}");
        }
    }
}

/// Metric names in a PromQL text.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        if (rest.starts_with("ctw_") || rest.starts_with("conntrack_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every metric name used exists in agent/src/metrics.rs or
/// collector/src/metrics.rs (histogram series by their base name).
fn assert_metrics_exist(exprs: &[String], what: &str) {
    let sources = format!(
        "{}{}",
        read(&root().join("agent/src/metrics.rs")),
        read(&root().join("collector/src/metrics.rs"))
    );
    for e in exprs {
        for name in metric_names(e) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| name.strip_suffix(suf))
                .filter(|b| sources.contains(&format!("\"{b}\"")))
                .unwrap_or(&name);
            assert!(
                sources.contains(&format!("\"{base}\"")),
                "{what}: {name} (in {e}) is not a metric of the agent or the collector"
            );
        }
    }
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(&deploy().join("grafana/conntrack-watch.json"))).unwrap()
}

fn dashboard_exprs(d: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    out
}

#[test]
fn dashboard_has_the_seed_queries_and_agent_health() {
    let d = dashboard();
    assert_eq!(d["uid"], "conntrack-watch");
    let vars = d["templating"]["list"].as_array().unwrap();
    let inst = vars
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("$instance");
    assert_eq!(inst["includeAll"], true);
    assert!(inst["definition"]
        .as_str()
        .unwrap()
        .contains("conntrack_new_connections_total"));
    assert!(vars
        .iter()
        .any(|v| v["name"] == "datasource" && v["type"] == "datasource"));
    let exprs = dashboard_exprs(&d);
    // The seed's queries, with the $instance filter taken out.
    let plain: Vec<String> = exprs
        .iter()
        .map(|e| {
            e.replace("instance=~\"$instance\",", "")
                .replace(",instance=~\"$instance\"", "")
                .replace("instance=~\"$instance\"", "")
                .replace("{}", "")
        })
        .collect();
    for seed in [
        "rate(conntrack_new_connections_total[5m])",
        "rate(conntrack_new_connections_total{port=\"443\"}[5m])",
        "sum by (port) (rate(conntrack_new_connections_total[5m]))",
        "increase(conntrack_new_connections_total[1h])",
        "sum by (instance, port) (rate(conntrack_new_connections_total[5m]))",
    ] {
        assert!(
            plain.iter().any(|e| e == seed),
            "dashboard lacks the seed's {seed}"
        );
    }
    let all = exprs.join("\n");
    for metric in [
        "ctw_events_lost_total",
        "ctw_resyncs_total",
        "ctw_records_recovered_total",
        "ctw_log_healthy",
        "ctw_log_records_dropped_total",
        "ctw_uplink_connected",
        "ctw_uplink_spool_bytes",
        "ctw_uplink_unacked_batches",
        "ctw_collector_records_stored_total",
        "ctw_collector_tls_handshake_failures_total",
        "ctw_collector_agents_connected",
        "ctw_collector_workload_new_connections_total",
    ] {
        assert!(all.contains(metric), "dashboard has no panel on {metric}");
    }
    // Top workloads: a topk over a rate, by the bounded labels only.
    assert!(
        exprs.iter().any(|e| e.starts_with("topk(")
            && e.contains("rate(ctw_collector_workload_new_connections_total")
            && e.contains("by (namespace, workload_kind, workload, port)")),
        "no top-workloads panel"
    );
    assert_metrics_exist(&exprs, "dashboard");
    // Panel ids are unique; every panel but rows has a data source.
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
}

fn alert_exprs() -> Vec<String> {
    let rules = &yaml_docs(&deploy().join("prometheus/alerts.yml"))[0];
    let mut out = Vec::new();
    for g in seq(rules, "groups") {
        for r in seq(g, "rules") {
            out.push(s(r, "expr").to_string());
        }
    }
    out
}

#[test]
fn alert_rules_cover_loss_log_and_disconnection() {
    let exprs = alert_exprs();
    let all = exprs.join("\n");
    for needle in [
        "increase(ctw_events_lost_total[5m]) > 0",
        "ctw_log_healthy == 0",
        "ctw_uplink_connected == 0",
        "ctw_collector_agents_connected",
        "reason=\"spool_overflow\"",
        "ctw_collector_tls_handshake_failures_total",
    ] {
        assert!(all.contains(needle), "no alert on {needle}");
    }
    assert_metrics_exist(&exprs, "alerts.yml");
}

#[test]
fn alert_rules_pass_promtool() {
    if !have("promtool") {
        return skip(
            "alert_rules_pass_promtool",
            "promtool is not installed (Debian: prometheus)",
        );
    }
    let dir = deploy().join("prometheus");
    run(Command::new("promtool")
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    run(Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&dir));
}

#[test]
fn dashboard_queries_pass_promtool() {
    if !have("promtool") {
        return skip(
            "dashboard_queries_pass_promtool",
            "promtool is not installed (Debian: prometheus)",
        );
    }
    // Each query as a recording rule: promtool parses it.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs(&dashboard()).iter().enumerate() {
        let e = e.replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let tmp = temp_dir("dashboard-rules");
    std::fs::write(tmp.join("rules.yml"), rules).unwrap();
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(tmp.join("rules.yml")));
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn unit(name: &str) -> String {
    read(&deploy().join("systemd").join(name))
}

fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn units_are_hardened() {
    let agent = unit("ctw-agent.service");
    assert_eq!(
        unit_values(&agent, "AmbientCapabilities"),
        ["CAP_NET_ADMIN"]
    );
    assert_eq!(
        unit_values(&agent, "CapabilityBoundingSet"),
        ["CAP_NET_ADMIN"]
    );
    assert_eq!(unit_values(&agent, "LogsDirectory"), ["nat-tracker"]);
    assert_eq!(unit_values(&agent, "StateDirectory"), ["conntrack-watch"]);
    assert_eq!(
        unit_values(&agent, "RestrictAddressFamilies"),
        ["AF_NETLINK AF_INET AF_INET6 AF_UNIX"]
    );
    assert_eq!(
        unit_values(&agent, "ExecStart"),
        ["/usr/local/bin/ctw-agent --config /etc/conntrack-watch/agent.yaml"]
    );
    let collector = unit("ctw-collector.service");
    assert_eq!(unit_values(&collector, "CapabilityBoundingSet"), [""]);
    assert_eq!(unit_values(&collector, "AmbientCapabilities"), [""]);
    assert_eq!(
        unit_values(&collector, "StateDirectory"),
        ["conntrack-watch"]
    );
    assert!(!collector.contains("AF_NETLINK"));
    assert_eq!(
        unit_values(&collector, "ExecStart"),
        ["/usr/local/bin/ctw-collector --config /etc/conntrack-watch/collector.yaml"]
    );
    for text in [&agent, &collector] {
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "SystemCallFilter=@system-service",
            "Restart=always",
            "User=conntrack-watch",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
    }
    // The user the units name is the one sysusers.d creates.
    assert!(
        read(&deploy().join("systemd/conntrack-watch.sysusers.conf"))
            .lines()
            .any(|l| l.starts_with("u conntrack-watch "))
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return skip(
            "units_pass_systemd_analyze_verify",
            "systemd-analyze is not installed (Debian: systemd)",
        );
    }
    // `verify` requires every Exec binary to exist; the test machine has no
    // installed ctw-agent, so copies of the units run /bin/true instead
    // (arguments kept). Everything else is verified as written.
    let tmp = temp_dir("units");
    let names = ["ctw-agent.service", "ctw-collector.service"];
    let mut paths = Vec::new();
    for name in names {
        let text = unit(name)
            .replace("/usr/local/bin/ctw-agent", "/bin/true")
            .replace("/usr/local/bin/ctw-collector", "/bin/true");
        let p = tmp.join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    // Unknown keys and bad values are only warnings: any line about our
    // units is a failure. (Lines about the host's other units are not ours.)
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n)))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warnings:\n{}",
        ours.join("\n")
    );
    // The exposure score (0 = locked down, 10 = not at all) stays low.
    let sec = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
        .args(&paths)
        .output()
        .unwrap();
    if String::from_utf8_lossy(&sec.stderr).contains("unrecognized option") {
        skip(
            "systemd-analyze security --offline",
            "needs systemd 250 or later",
        );
    } else {
        assert!(
            sec.status.success(),
            "exposure above 2.5:\n{}{}",
            String::from_utf8_lossy(&sec.stdout),
            String::from_utf8_lossy(&sec.stderr)
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn dockerfile_builds_both_binaries_on_debian_slim() {
    let text = read(&deploy().join("docker/Dockerfile"));
    assert!(text.contains("cargo build --release --locked -p ctw-agent -p ctw-collector"));
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: build and runtime");
    assert!(froms[1].contains("-slim"), "{}", froms[1]);
}

//! Runs the real `ctw-collector` in a host namespace of a topology, with
//! certificates made by its own `certs` subcommand, and talks to its API.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::{run_in, wait_for, Topology};

/// gRPC port of the collector in tests.
pub const GRPC_PORT: u16 = 9359;
/// HTTP port (loopback of the collector's namespace).
pub const HTTP_PORT: u16 = 9360;
/// TLS server name in the collector's certificate.
pub const SERVER_NAME: &str = "collector";

#[derive(Debug)]
pub struct Collector {
    pub pid: u32,
    pub ns: String,
    pub addr: Ipv4Addr,
    pub dir: PathBuf,
    pub token: String,
    /// HTTP port on the loopback of `ns` ([`HTTP_PORT`] unless a replica
    /// shares the namespace).
    pub http_port: u16,
    cfg: PathBuf,
}

fn certs(dir: &std::path::Path, args: &[&str]) {
    let bin = crate::bin_path("ctw-collector");
    let out = Command::new(bin)
        .arg("certs")
        .args(args)
        .args(["--dir", &dir.join("tls").display().to_string()])
        .output()
        .expect("run ctw-collector certs");
    assert!(
        out.status.success(),
        "ctw-collector certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Collector {
    /// Create a CA, the collector's certificate, a token and a config under
    /// the topology's temp dir, start the collector in `ns` (address `addr`)
    /// and wait until it is ready.
    pub fn start(
        topo: &mut Topology,
        ns: &str,
        addr: Ipv4Addr,
        extra_storage_yaml: &str,
    ) -> Collector {
        Collector::start_with_storage(topo, ns, addr, None, extra_storage_yaml)
    }

    /// [`start`](Self::start) with the whole `storage:` section given
    /// (`Some`, each line indented two spaces, e.g. `backend: clickhouse`
    /// and its keys) instead of the tantivy store in the collector's dir.
    pub fn start_with_storage(
        topo: &mut Topology,
        ns: &str,
        addr: Ipv4Addr,
        storage_yaml: Option<&str>,
        extra_storage_yaml: &str,
    ) -> Collector {
        let dir = topo.tmp_dir().join("collector");
        std::fs::create_dir_all(&dir).expect("collector dir");
        certs(&dir, &["init-ca"]);
        Collector::configure(
            topo,
            ns,
            addr,
            dir,
            HTTP_PORT,
            storage_yaml,
            extra_storage_yaml,
        )
    }

    /// Another collector (a replica) in namespace `ns` at `addr` (an
    /// address of that namespace), HTTP on `http_port`, with a server
    /// certificate from this collector's CA and the same token; agents'
    /// certificates issued by either are accepted by both. `storage_yaml`
    /// and `extra_yaml` as for [`start_with_storage`](Self::start_with_storage).
    pub fn start_replica(
        &self,
        topo: &mut Topology,
        ns: &str,
        addr: Ipv4Addr,
        http_port: u16,
        storage_yaml: Option<&str>,
        extra_yaml: &str,
    ) -> Collector {
        let dir = topo.tmp_dir().join(format!("collector-{addr}"));
        std::fs::create_dir_all(dir.join("tls")).expect("replica dir");
        for f in ["ca.pem", "ca-key.pem"] {
            std::fs::copy(self.dir.join("tls").join(f), dir.join("tls").join(f))
                .expect("copy the CA");
        }
        Collector::configure(topo, ns, addr, dir, http_port, storage_yaml, extra_yaml)
    }

    fn configure(
        topo: &mut Topology,
        ns: &str,
        addr: Ipv4Addr,
        dir: PathBuf,
        http_port: u16,
        storage_yaml: Option<&str>,
        extra_storage_yaml: &str,
    ) -> Collector {
        certs(
            &dir,
            &[
                "issue",
                "--name",
                "collector",
                "--kind",
                "server",
                "--dns",
                SERVER_NAME,
                "--ip",
                &addr.to_string(),
            ],
        );
        let token = "test-token-0123456789abcdef".to_string();
        std::fs::write(dir.join("token"), &token).expect("token");
        let d = dir.display();
        let storage = match storage_yaml {
            Some(s) => s.to_string(),
            None => format!("  path: {d}/index\n  commit_interval_ms: 200\n"),
        };
        let yaml = format!(
            "grpc:\n  listen_addr: \"{addr}:{GRPC_PORT}\"\n  tls:\n    ca_file: {d}/tls/ca.pem\n    cert_file: {d}/tls/collector.pem\n    key_file: {d}/tls/collector-key.pem\nhttp:\n  listen_addr: \"127.0.0.1:{http_port}\"\n  token_file: {d}/token\nstorage:\n{storage}{extra_storage_yaml}\n"
        );
        let cfg = dir.join("collector.yaml");
        std::fs::write(&cfg, yaml).expect("collector config");
        let mut c = Collector {
            pid: 0,
            ns: ns.to_string(),
            addr,
            dir,
            token,
            http_port,
            cfg,
        };
        c.launch(topo);
        c
    }

    fn launch(&mut self, topo: &mut Topology) {
        let bin = crate::bin_path("ctw-collector");
        let cfg = self.cfg.display().to_string();
        self.pid = topo.spawn_in(
            &self.ns.clone(),
            &[bin.to_str().expect("utf-8 path"), "--config", &cfg],
        );
        wait_for(Duration::from_secs(30), "collector /readyz", || {
            (self.get("/readyz").0 == 200).then_some(())
        });
    }

    /// SIGKILL the collector (no clean shutdown).
    pub fn kill9(&mut self, topo: &mut Topology) {
        topo.kill(self.pid);
    }

    /// Start it again on the same storage and certificates.
    pub fn restart(&mut self, topo: &mut Topology) {
        self.launch(topo);
    }

    /// Issue a client certificate for agent `node`; returns (cert, key) paths.
    /// An existing certificate of `node` is reused.
    pub fn issue_agent_cert(&self, node: &str) -> (PathBuf, PathBuf) {
        let tls = self.dir.join("tls");
        let pair = (
            tls.join(format!("{node}.pem")),
            tls.join(format!("{node}-key.pem")),
        );
        if !pair.0.exists() {
            certs(&self.dir, &["issue", "--name", node, "--kind", "client"]);
        }
        pair
    }

    /// The agent config's `collector:` section for agent `node`, with its own
    /// certificate and spool directory.
    pub fn agent_yaml(&self, node: &str, spool: &std::path::Path, extra: &str) -> String {
        let (cert, key) = self.issue_agent_cert(node);
        format!(
            "collector:\n  address: \"https://{}:{GRPC_PORT}\"\n  server_name: {SERVER_NAME}\n  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n  spool_dir: {}\n{extra}",
            self.addr,
            self.dir.join("tls/ca.pem").display(),
            cert.display(),
            key.display(),
            spool.display()
        )
    }

    /// GET without a token: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.request(path, None)
    }

    /// The sum of every series of metric `name` on `/metrics` (0 when it
    /// has none), e.g. `ctw_collector_batches_failed_total` over its labels.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// GET with the bearer token, parsed as JSON.
    pub fn api(&self, path: &str) -> (u16, Value) {
        let (code, body) = self.request(path, Some(&self.token));
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        (code, v)
    }

    /// POST a JSON body with the bearer token; parse the JSON answer.
    pub fn post_json(&self, path: &str, body: &Value, tmp: &std::path::Path) -> (u16, Value) {
        let file = tmp.join(format!("post-{}.json", std::process::id()));
        std::fs::write(&file, serde_json::to_vec(body).expect("serialize body"))
            .expect("write body");
        let url = format!("http://127.0.0.1:{}{path}", self.http_port);
        let auth = format!("Authorization: Bearer {}", self.token);
        let data = format!("@{}", file.display());
        let out = run_in(
            &self.ns,
            &[
                "curl",
                "-sS",
                "--max-time",
                "30",
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
        let v =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (code.trim().parse().unwrap_or(0), v)
    }

    fn request(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.http_port);
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut argv = vec![
            "curl",
            "-sS",
            "-g",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ];
        if let Some(a) = &auth {
            argv.extend(["-H", a.as_str()]);
        }
        argv.push(&url);
        let out = run_in(&self.ns, &argv);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        match text.rsplit_once('\n') {
            Some((body, code)) => (code.trim().parse().unwrap_or(0), body.to_string()),
            None => (0, text),
        }
    }

    /// Wait until every node in `nodes` shows as connected.
    pub fn wait_connected(&self, nodes: &[&str]) {
        wait_for(
            Duration::from_secs(30),
            "agents connected to the collector",
            || {
                let (code, v) = self.api("/api/v1/agents");
                if code != 200 {
                    return None;
                }
                let agents = v["agents"].as_array()?.clone();
                nodes
                    .iter()
                    .all(|n| {
                        agents
                            .iter()
                            .any(|a| a["node"] == *n && a["connected"] == true)
                    })
                    .then_some(())
            },
        );
    }
}

//! Runs the real `ctw-agent` binary inside a topology's node namespace and
//! reads what it produced: its JSON log, `/metrics` and the HTTP API.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{must_in, run_in, wait_for, Topology};

/// A running agent. Stopped by the topology's drop (it was spawned there).
#[derive(Debug)]
pub struct Agent {
    pub pid: u32,
    pub ns: String,
    pub log_path: PathBuf,
    pub listen: String,
}

impl Agent {
    /// Start the agent in the node namespace with `ports` and extra YAML
    /// (top-level keys), node name `test-node`; wait until `/healthz` answers 200.
    pub fn start(topo: &mut Topology, ports: &[u16], extra_yaml: &str) -> Agent {
        Agent::start_on(topo, 0, "test-node", ports, extra_yaml)
    }

    /// Start an agent named `name` on node `node` of the topology.
    pub fn start_on(
        topo: &mut Topology,
        node: usize,
        name: &str,
        ports: &[u16],
        extra_yaml: &str,
    ) -> Agent {
        let log_path = topo
            .tmp_dir()
            .join(format!("agent-log-{node}"))
            .join("nat.log");
        let listen = "127.0.0.1:9358".to_string();
        let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        let yaml = format!(
            "ports: [{}]\nnode_name: {name}\nlog:\n  path: {}\nhttp:\n  listen_addr: \"{listen}\"\nweb_ui:\n  enabled: true\n{extra_yaml}\n",
            ports.join(", "),
            log_path.display()
        );
        let cfg = topo.tmp_dir().join(format!("agent-{node}.yaml"));
        std::fs::write(&cfg, yaml).expect("write agent config");
        let ns = topo.node_ns_of(node).to_string();
        Agent::start_in(topo, &ns, &cfg, log_path, &listen)
    }

    /// Start the agent with a config file as given, in node 0.
    pub fn start_with_config(
        topo: &mut Topology,
        cfg: &std::path::Path,
        log_path: PathBuf,
        listen: &str,
    ) -> Agent {
        let ns = topo.node_ns().to_string();
        Agent::start_in(topo, &ns, cfg, log_path, listen)
    }

    fn start_in(
        topo: &mut Topology,
        ns: &str,
        cfg: &std::path::Path,
        log_path: PathBuf,
        listen: &str,
    ) -> Agent {
        let bin = crate::bin_path("ctw-agent");
        let bin = bin.to_str().expect("utf-8 path");
        let cfg_s = cfg.display().to_string();
        let pid = topo.spawn_in(ns, &[bin, "--config", &cfg_s]);
        let agent = Agent {
            pid,
            ns: ns.to_string(),
            log_path,
            listen: listen.to_string(),
        };
        wait_for(
            Duration::from_secs(20),
            "agent /healthz to answer 200",
            || (agent.get("/healthz").0 == 200).then_some(()),
        );
        agent
    }

    /// GET a path on the agent from inside the node namespace: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{}", self.listen, path);
        let out = run_in(
            &self.ns,
            &[
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &url,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        match text.rsplit_once('\n') {
            Some((body, code)) => (code.trim().parse().unwrap_or(0), body.to_string()),
            None => (0, text),
        }
    }

    /// GET and parse JSON.
    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let (code, body) = self.get(path);
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        (code, v)
    }

    /// The value of one metric series, e.g. `conntrack_new_connections_total{port="80"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
    }

    /// The whole `/metrics` text.
    pub fn metrics_text(&self) -> String {
        self.get("/metrics").1
    }

    /// Every line of the JSON log, parsed (panics on a line that is not JSON).
    pub fn log_lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The `type: conntrack` lines with the given `msg`.
    pub fn records(&self, msg: &str) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|v| v["type"] == "conntrack" && v["msg"] == msg)
            .collect()
    }

    /// Send a signal to the agent process.
    pub fn signal(&self, sig: &str) {
        must_in(
            &self.ns,
            &["kill", &format!("-{sig}"), &self.pid.to_string()],
        );
    }
}

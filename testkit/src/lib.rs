//! Shared helpers for the integration tests of the agent and collector: a throw-away network
//! namespace topology (pods -> masquerading node -> server), real peers in it
//! (nginx, a UDP echo server, curl, python clients) and condition polling.
//!
//! Layout built by [`Topology::new`] (k = per-instance number, 0..=255,
//! written in hex in IPv6 addresses, as is the pod host part 0x10+i):
//!
//! ```text
//!  pod<i> eth0 198.18.k.(10+i)/24       node br0 198.18.k.1/24
//!         fd00:198:18:k::(10+i)/64 ----       fd00:198:18:k::1/64
//!                                        node s0  198.19.k.1/24          srv eth0 198.19.k.2/24
//!                                             fd00:198:18:1kk::1/64 ----     fd00:198:18:1kk::2/64
//! ```
//!
//! Pods hang off a bridge in the node namespace and route through the node.
//! The node forwards and masquerades everything leaving on `s0`; srv has only
//! its connected route, so replies reach pods only through the node's NAT.
//! Every namespace is private to one `Topology`, so address plans of
//! parallel instances could not clash even if k repeated; k only makes
//! captured output easier to tell apart.
//!
//! Everything is done by shelling out to `ip`, `nft`, `sysctl`, `conntrack`,
//! `nginx`, `curl` and `python3`. Failures panic with the command and its
//! stderr. [`Topology`]'s `Drop` kills the processes it started (by pid) and
//! deletes its namespaces, also while a failing test unwinds.
//!
//! Tests run as root; start each one with
//! `if !support::require_root() { return; }`.

pub mod agent;
pub mod clickhouse;
pub mod cluster;
pub mod collector;
pub mod kubeapi;

/// Path of a workspace binary (`ctw-agent`, `ctw-collector`) in the same
/// target directory as the running test, built once with cargo when it is
/// missing. `CTW_BIN_DIR` overrides the directory.
pub fn bin_path(name: &str) -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir = match std::env::var_os("CTW_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/deps/<test> -> target/<profile>
            let exe = std::env::current_exe().expect("current test executable");
            exe.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .expect("test executable inside target/<profile>/deps")
        }
    };
    let path = dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        let pkg = name;
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", pkg, "--bin", name]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p {pkg} failed");
        assert!(
            path.exists(),
            "{} still missing after cargo build",
            path.display()
        );
    }
    path
}

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default limit for commands run to completion with [`run_in`].
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started server may take to accept connections.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// `--max-time` passed to curl and the echo timeout of [`Topology::udp_send`].
pub const CLIENT_TIMEOUT_SECS: u64 = 5;

/// Name of the node's interface towards srv (the masquerading one).
pub const NODE_SRV_IF: &str = "s0";
/// Name of the pod bridge in the node namespace.
pub const NODE_BRIDGE: &str = "br0";

static INSTANCE_COUNTER: AtomicU32 = AtomicU32::new(0);
/// `ip netns add/del` mount /run/netns on first use; serialise them within
/// one test binary so parallel tests do not race on that.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// True when running as root; otherwise says why the test is skipped.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        true
    } else {
        skip("needs root (network namespaces)");
        false
    }
}

/// Environment variable naming the file where [`skip`] records skipped
/// tests (`scripts/test.sh` sets it and counts the lines as skipped).
pub const SKIP_LOG_ENV: &str = "CTW_SKIP_LOG";

/// Say that the running test checks nothing and why: prints
/// `skipping <test>: <why>` and appends that line to the file named by
/// [`SKIP_LOG_ENV`], so the test script's summary counts the test as
/// skipped rather than passed. The caller returns right after.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let line = format!("skipping {test}: {why}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        use std::io::Write as _;
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = appended {
            eprintln!("cannot record the skip in {}: {e}", path.to_string_lossy());
        }
    }
}

/// Calls `f` every 20 ms until it returns `Some`, panicking with `what` once
/// `deadline` (measured from now) has passed.
pub fn wait_for<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        // tidy: the polling primitive itself.
        thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_for`] for async tests: checks `f` every 20 ms without blocking
/// the runtime (servers under test may run on the test's own thread).
pub async fn eventually(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        // tidy: the polling primitive itself.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Masquerades what `ns` sends out of `out_if` (an nftables ruleset written
/// to `nft_file`), and turns on conntrack timestamps and counters there.
pub fn masquerade(ns: &str, out_if: &str, nft_file: &Path) {
    let ruleset = format!(
        "table inet ctwtest {{\n    chain post {{\n        \
         type nat hook postrouting priority 100;\n        \
         oifname \"{out_if}\" masquerade\n    }}\n}}\n"
    );
    fs::write(nft_file, ruleset)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", nft_file.display()));
    must_in(ns, &["nft", "-f", &nft_file.display().to_string()]);
    // The NAT chain loads nf_conntrack in this namespace, so its
    // per-namespace sysctls exist only from here on.
    must_in(
        ns,
        &[
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_timestamp=1",
            "net.netfilter.nf_conntrack_acct=1",
        ],
    );
}

/// Runs `cmd` inside namespace `ns` to completion (limit [`COMMAND_TIMEOUT`]).
/// The caller checks the exit status.
pub fn run_in(ns: &str, cmd: &[&str]) -> Output {
    run_in_timeout(ns, cmd, COMMAND_TIMEOUT)
}

/// Runs `cmd` inside namespace `ns`; kills it and panics after `timeout`.
pub fn run_in_timeout(ns: &str, cmd: &[&str], timeout: Duration) -> Output {
    run_timeout(&ns_argv(ns, cmd), timeout)
}

/// The address in field `k` of a JSON record (an agent log line, an API
/// hit); panics naming the field and the record when it is not one.
pub fn field_ip(v: &serde_json::Value, k: &str) -> IpAddr {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
        .parse()
        .unwrap_or_else(|e| panic!("{k} in {v}: {e}"))
}

/// The port in field `k` of a JSON record; panics when it is not one.
pub fn field_port(v: &serde_json::Value, k: &str) -> u16 {
    v[k].as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("{k} missing or not a port in {v}"))
}

/// One HTTP request with curl from namespace `ns`:
/// `curl -sS -g --max-time 5 -o /dev/null [--local-port P] EXTRA... URL`;
/// panics with curl's error unless it succeeded. A fixed local port makes
/// the SNAT port (and its reuse) part of the test.
pub fn curl_ok(ns: &str, url: &str, local_port: Option<u16>, extra_args: &[&str]) {
    let max_time = CLIENT_TIMEOUT_SECS.to_string();
    let lp = local_port.map(|p| p.to_string());
    let mut argv = vec![
        "curl",
        "-sS",
        "-g",
        "--max-time",
        &max_time,
        "-o",
        "/dev/null",
    ];
    if let Some(p) = &lp {
        argv.extend(["--local-port", p.as_str()]);
    }
    argv.extend_from_slice(extra_args);
    argv.push(url);
    let out = run_in(ns, &argv);
    assert!(
        out.status.success(),
        "curl {url} from {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` inside `ns` and panics (with its stderr) unless it succeeds;
/// returns its stdout.
pub fn must_in(ns: &str, cmd: &[&str]) -> String {
    must(&ns_argv(ns, cmd))
}

/// `http://addr:port/path`, with brackets for IPv6.
pub fn http_url(ip: IpAddr, port: u16, path: &str) -> String {
    match ip {
        IpAddr::V4(a) => format!("http://{a}:{port}{path}"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}{path}"),
    }
}

/// Absolute path of the python3 interpreter (resolved once, so pyenv shims
/// are not re-run for every client).
fn python3() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let out = must(&["python3", "-c", "import sys; print(sys.executable)"]);
        let path = out.trim().to_string();
        assert!(!path.is_empty(), "python3 did not report sys.executable");
        path
    })
}

fn ns_argv<'a>(ns: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["ip", "netns", "exec", ns];
    argv.extend_from_slice(cmd);
    argv
}

/// The command line for messages; inline python scripts are elided.
fn describe(argv: &[&str]) -> String {
    argv.iter()
        .map(|a| if a.contains('\n') { "<script>" } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_timeout(argv: &[&str], timeout: Duration) -> Output {
    let (prog, args) = argv.split_first().expect("empty command");
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(argv)));
    let out_reader = drain(child.stdout.take().expect("piped stdout"));
    let err_reader = drain(child.stderr.take().expect("piped stderr"));
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            // tidy: polls the child's exit, bounded by the timeout.
            Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_reader.join().unwrap_or_default();
                panic!(
                    "`{}` did not finish within {timeout:?}; stderr: {}",
                    describe(argv),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("waiting for `{}`: {e}", describe(argv)),
        }
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn must(argv: &[&str]) -> String {
    let out = run_timeout(argv, COMMAND_TIMEOUT);
    if !out.status.success() {
        panic!(
            "`{}` failed ({}): {}{}",
            describe(argv),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command from `Drop`: never panics, reports failures on stderr.
fn try_run(argv: &[&str]) -> bool {
    let (prog, args) = argv.split_first().expect("empty command");
    match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "cleanup: `{}` failed: {}",
                describe(argv),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("cleanup: cannot run `{}`: {e}", describe(argv));
            false
        }
    }
}

/// Names of the network namespaces that currently exist.
pub fn netns_list() -> Vec<String> {
    must(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[derive(Debug)]
struct Spawned {
    child: Child,
    log: PathBuf,
    what: String,
}

/// A set of namespaces wired as pods -> masquerading node -> srv; see the
/// module docs for the address plan. Dropping it cleans everything up.
#[derive(Debug)]
pub struct Topology {
    suffix: String,
    k: u8,
    pods: Vec<String>,
    node: String,
    srv: String,
    /// Namespaces created so far (cleanup list; filled as they are made).
    created: Vec<String>,
    tmp: PathBuf,
    children: Vec<Spawned>,
    spawn_counter: u32,
    /// Nodes added with [`Topology::add_node`] (node 0 is `node`).
    extra_nodes: Vec<cluster::ExtraNode>,
    /// Hosts added with [`Topology::add_host`]: (namespace, IPv4 address).
    hosts: Vec<(String, Ipv4Addr)>,
}

impl Topology {
    /// Builds the topology with `pods` pod namespaces. Panics on failure
    /// (anything already created is removed again).
    pub fn new(pods: usize) -> Topology {
        assert!(pods > 0 && pods <= 100, "pods must be 1..=100, got {pods}");
        let n = INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // pid + counter are unique among live processes; the time bits guard
        // against a stale namespace left by an earlier run with the same pid.
        let suffix = format!("{pid:x}{n:x}{:03x}", (nanos >> 10) & 0xfff);
        let k = (pid.wrapping_mul(7).wrapping_add(n) % 256) as u8;
        let tmp = std::env::temp_dir().join(format!("ctw-test-{suffix}"));
        let mut topo = Topology {
            pods: (0..pods).map(|i| format!("ctw{suffix}p{i}")).collect(),
            node: format!("ctw{suffix}n"),
            srv: format!("ctw{suffix}s"),
            suffix,
            k,
            created: Vec::new(),
            tmp,
            children: Vec::new(),
            spawn_counter: 0,
            extra_nodes: Vec::new(),
            hosts: Vec::new(),
        };
        fs::create_dir_all(&topo.tmp)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", topo.tmp.display()));
        topo.build();
        topo
    }

    fn build(&mut self) {
        let all: Vec<String> = self
            .pods
            .iter()
            .chain([&self.node, &self.srv])
            .cloned()
            .collect();
        for ns in &all {
            {
                let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                must(&["ip", "netns", "add", ns]);
            }
            self.created.push(ns.clone());
            ip(ns, "link set lo up");
        }

        let node = self.node.clone();
        let srv = self.srv.clone();

        // Pod network: a bridge in the node namespace, one veth per pod.
        ip(
            &node,
            &format!("link add {NODE_BRIDGE} type bridge stp_state 0 forward_delay 0"),
        );
        add_addrs(&node, NODE_BRIDGE, self.node_pod_ip4(), self.node_pod_ip6());
        ip(&node, &format!("link set {NODE_BRIDGE} up"));
        let (gw4, gw6) = (self.node_pod_ip4(), self.node_pod_ip6());
        for i in 0..self.pods.len() {
            let pod = self.pods[i].clone();
            ip(
                &node,
                &format!("link add p{i} type veth peer name eth0 netns {pod}"),
            );
            ip(&node, &format!("link set p{i} master {NODE_BRIDGE}"));
            ip(&node, &format!("link set p{i} up"));
            add_addrs(&pod, "eth0", self.pod_ip4(i), self.pod_ip6(i));
            ip(&pod, "link set eth0 up");
            ip(&pod, &format!("-4 route add default via {gw4}"));
            ip(&pod, &format!("-6 route add default via {gw6}"));
        }

        // Node <-> srv link. srv gets no route back to the pod network.
        ip(
            &node,
            &format!("link add {NODE_SRV_IF} type veth peer name eth0 netns {srv}"),
        );
        add_addrs(&node, NODE_SRV_IF, self.node_ip4(), self.node_ip6());
        add_addrs(&srv, "eth0", self.srv_ip4(), self.srv_ip6());
        ip(&node, &format!("link set {NODE_SRV_IF} up"));
        ip(&srv, "link set eth0 up");

        must_in(
            &node,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
        masquerade(&node, NODE_SRV_IF, &self.tmp.join("node.nft"));
    }

    /// Per-run suffix shared by all namespace names of this instance.
    pub fn name_suffix(&self) -> &str {
        &self.suffix
    }
    /// Number of pods.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }
    pub fn pod_ns(&self, i: usize) -> &str {
        &self.pods[i]
    }
    pub fn node_ns(&self) -> &str {
        &self.node
    }
    pub fn srv_ns(&self) -> &str {
        &self.srv
    }
    /// All namespace names of this topology.
    pub fn namespaces(&self) -> Vec<String> {
        self.pods
            .iter()
            .chain([&self.node, &self.srv])
            .cloned()
            .collect()
    }
    /// Temporary directory of this instance (logs, server files).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    pub fn pod_ip4(&self, i: usize) -> Ipv4Addr {
        assert!(i < self.pods.len(), "no pod {i}");
        Ipv4Addr::new(198, 18, self.k, 10 + i as u8)
    }
    pub fn pod_ip6(&self, i: usize) -> Ipv6Addr {
        assert!(i < self.pods.len(), "no pod {i}");
        Ipv6Addr::new(
            0xfd00,
            0x198,
            0x18,
            u16::from(self.k),
            0,
            0,
            0,
            0x10 + i as u16,
        )
    }
    /// The node's (gateway) address on the pod network.
    pub fn node_pod_ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.k, 1)
    }
    pub fn node_pod_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x18, u16::from(self.k), 0, 0, 0, 1)
    }
    /// The node's address on the srv link: the masquerade (SNAT) address.
    pub fn node_ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.k, 1)
    }
    pub fn node_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x18, 0x100 + u16::from(self.k), 0, 0, 0, 1)
    }
    pub fn srv_ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.k, 2)
    }
    pub fn srv_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x18, 0x100 + u16::from(self.k), 0, 0, 0, 2)
    }

    /// Starts `cmd` in namespace `ns` (stdin null, stdout and stderr to a log
    /// file in [`Self::tmp_dir`]); the process is killed on drop.
    pub fn spawn_in(&mut self, ns: &str, cmd: &[&str]) -> u32 {
        self.spawn(ns, cmd, false).0
    }

    /// Like [`Self::spawn_in`] but stdout comes back line by line.
    fn spawn(
        &mut self,
        ns: &str,
        cmd: &[&str],
        pipe_stdout: bool,
    ) -> (u32, Option<Receiver<String>>) {
        self.spawn_counter += 1;
        let log = self.tmp.join(format!("spawn-{}.log", self.spawn_counter));
        let file = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err_file = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup {}: {e}", log.display()));
        let argv = ns_argv(ns, cmd);
        let mut command = Command::new(argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stderr(err_file);
        if pipe_stdout {
            command.stdout(Stdio::piped());
        } else {
            command.stdout(file);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&argv)));
        let rx = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    match line {
                        // Keep draining even when nobody listens any more.
                        Ok(l) => {
                            let _ = tx.send(l);
                        }
                        Err(_) => break,
                    }
                }
            });
            rx
        });
        let pid = child.id();
        self.children.push(Spawned {
            child,
            log,
            what: describe(&argv),
        });
        (pid, rx)
    }

    /// Kills (SIGKILL) and reaps a process started by this topology.
    pub fn kill(&mut self, pid: u32) {
        let idx = self
            .children
            .iter()
            .position(|s| s.child.id() == pid)
            .unwrap_or_else(|| panic!("pid {pid} was not started by this topology"));
        let mut s = self.children.remove(idx);
        let _ = s.child.kill();
        let _ = s.child.wait();
    }

    /// Panics with the process's log if `pid` (ours) has exited.
    fn check_alive(&mut self, pid: u32, what: &str) {
        let Some(s) = self.children.iter_mut().find(|s| s.child.id() == pid) else {
            panic!("{what}: pid {pid} is not ours");
        };
        if let Ok(Some(status)) = s.child.try_wait() {
            let log = fs::read_to_string(&s.log).unwrap_or_default();
            panic!("{what} (`{}`) exited with {status}; output:\n{log}", s.what);
        }
    }

    /// Runs nginx in the srv namespace listening on every port on 0.0.0.0
    /// and [::]; returns once each port accepts TCP on both families.
    /// Every request gets `200 ok\n`. Access log lines (written after the
    /// response is sent, so wait for them) are read with
    /// [`NginxHandle::access_lines`].
    pub fn start_nginx(&mut self, ports: &[u16]) -> NginxHandle {
        self.start_nginx_with_format(ports, "$remote_addr $remote_port $msec $server_port")
    }

    /// [`Topology::start_nginx`] with the access log written in
    /// `log_format` (nginx syntax, without quotes). Read such a log from
    /// [`NginxHandle::access_log`]: [`NginxHandle::access_lines`] only knows
    /// the default format.
    pub fn start_nginx_with_format(&mut self, ports: &[u16], log_format: &str) -> NginxHandle {
        assert!(!ports.is_empty(), "start_nginx needs at least one port");
        let log_format = log_format.replace('\\', "\\\\").replace('\'', "\\'");
        self.spawn_counter += 1;
        let dir = self.tmp.join(format!("nginx-{}", self.spawn_counter));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let d = dir.display();
        let mut listen = String::new();
        for p in ports {
            let _ = writeln!(
                listen,
                "        listen 0.0.0.0:{p};\n        listen [::]:{p} ipv6only=on;"
            );
        }
        // master_process off: a single process, so killing its pid stops
        // everything (workers would outlive a SIGKILLed master).
        let conf = format!(
            "master_process off;
user root root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format ctw '{log_format}';
    access_log {d}/access.log ctw;
    client_header_timeout 3600s;
    keepalive_timeout 3600s;
    server {{
{listen}        location / {{ default_type text/plain; return 200 \"ok\\n\"; }}
    }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf_path.display()));
        let conf_s = conf_path.display().to_string();
        let prefix = format!("{d}/");
        let srv = self.srv.clone();
        let pid = self.spawn_in(
            &srv,
            &["nginx", "-g", "daemon off;", "-c", &conf_s, "-p", &prefix],
        );
        let error_log = dir.join("error.log");
        let targets: Vec<String> = ports
            .iter()
            .flat_map(|p| {
                [
                    format!("{}:{p}", self.srv_ip4()),
                    format!("{}:{p}", self.srv_ip6()),
                ]
            })
            .collect();
        let probe = tcp_probe_script();
        let pid_path = dir.join("nginx.pid");
        wait_for(SERVER_START_TIMEOUT, "nginx to accept on all ports", || {
            if let Some(s) = self.children.iter_mut().find(|s| s.child.id() == pid) {
                if let Ok(Some(status)) = s.child.try_wait() {
                    panic!(
                        "nginx exited with {status}: {}{}",
                        fs::read_to_string(&s.log).unwrap_or_default(),
                        fs::read_to_string(&error_log).unwrap_or_default()
                    );
                }
            }
            // nginx writes its pid file only once all listeners are bound,
            // so the probe cannot be answered by some other server.
            let pid_file = fs::read_to_string(&pid_path).unwrap_or_default();
            if pid_file.trim() != pid.to_string() {
                return None;
            }
            let mut argv = vec![python3(), "-c", probe];
            argv.extend(targets.iter().map(String::as_str));
            run_in_timeout(&srv, &argv, COMMAND_TIMEOUT)
                .status
                .success()
                .then_some(())
        });
        NginxHandle {
            pid,
            access_log: dir.join("access.log"),
            error_log,
            dir,
        }
    }

    /// Runs a UDP echo server on `port` (0.0.0.0 and [::]) in srv; each
    /// datagram's source is appended to a file before the echo is sent, so
    /// once a client has its echo, [`UdpHandle::seen`] includes it.
    pub fn start_udp_server(&mut self, port: u16) -> UdpHandle {
        self.spawn_counter += 1;
        let file = self
            .tmp
            .join(format!("udp-{port}-{}.log", self.spawn_counter));
        fs::write(&file, "").unwrap_or_else(|e| panic!("cannot create {}: {e}", file.display()));
        let file_s = file.display().to_string();
        let port_s = port.to_string();
        let srv = self.srv.clone();
        let (pid, rx) = self.spawn(
            &srv,
            &[python3(), "-u", "-c", UDP_SERVER, &port_s, &file_s],
            true,
        );
        let rx = rx.expect("piped stdout");
        let line = self.recv_line(pid, &rx, "udp server to bind");
        assert_eq!(line, "ready", "unexpected udp server output");
        UdpHandle { pid, port, file }
    }

    fn recv_line(&mut self, pid: u32, rx: &Receiver<String>, what: &str) -> String {
        let end = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => return line,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < end => {
                    self.check_alive(pid, what)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("timed out after {SERVER_START_TIMEOUT:?} waiting for {what}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closes just before exit: give the process a
                    // moment to be reaped so its output can be reported.
                    let end = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < end {
                        self.check_alive(pid, what);
                        // tidy: polls the process's exit, bounded.
                        thread::sleep(Duration::from_millis(20));
                    }
                    panic!("{what}: stdout closed without a line");
                }
            }
        }
    }

    /// `curl -sS -g --max-time 5 <url>` inside pod `pod`.
    pub fn curl(&self, pod: usize, url: &str) -> Output {
        let max_time = CLIENT_TIMEOUT_SECS.to_string();
        run_in(
            &self.pods[pod],
            &["curl", "-sS", "-g", "--max-time", &max_time, url],
        )
    }

    /// Sends one UDP datagram from pod `pod` (from `src_port` if given) to
    /// `dst:port` and waits for the echo; returns the local port used.
    /// Panics if no echo arrives within [`CLIENT_TIMEOUT_SECS`].
    pub fn udp_send(&self, pod: usize, dst: IpAddr, port: u16, src_port: Option<u16>) -> u16 {
        let dst_s = dst.to_string();
        let port_s = port.to_string();
        let src_s = src_port.unwrap_or(0).to_string();
        let t = CLIENT_TIMEOUT_SECS.to_string();
        let out = must_in(
            &self.pods[pod],
            &[python3(), "-c", UDP_CLIENT, &dst_s, &port_s, &src_s, &t],
        );
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("udp client printed {out:?}: {e}"))
    }

    /// Opens a TCP connection from pod `pod` to `dst:port` and keeps it open
    /// (nothing is sent) until the process is killed ([`Self::kill`] or
    /// drop). Returns (pid, local port).
    pub fn hold_tcp(&mut self, pod: usize, dst: IpAddr, port: u16) -> (u32, u16) {
        let dst_s = dst.to_string();
        let port_s = port.to_string();
        let t = CLIENT_TIMEOUT_SECS.to_string();
        let ns = self.pods[pod].clone();
        let (pid, rx) = self.spawn(
            &ns,
            &[python3(), "-u", "-c", TCP_HOLD, &dst_s, &port_s, &t],
            true,
        );
        let rx = rx.expect("piped stdout");
        let line = self.recv_line(pid, &rx, "tcp holder to connect");
        let local: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("tcp holder printed {line:?}: {e}"));
        (pid, local)
    }

    /// Runs `conntrack <args>` in the node namespace; returns stdout.
    pub fn node_conntrack(&self, args: &[&str]) -> String {
        let mut argv = vec!["conntrack"];
        argv.extend_from_slice(args);
        must_in(&self.node, &argv)
    }
}

/// `ip -n <ns> <args>`; `args` is split at whitespace.
fn ip(ns: &str, args: &str) {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend(args.split_whitespace());
    must(&argv);
}

fn add_addrs(ns: &str, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
    ip(ns, &format!("addr add {v4}/24 dev {dev}"));
    // nodad: usable at once, no waiting for duplicate address detection.
    ip(ns, &format!("addr add {v6}/64 dev {dev} nodad"));
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut s in self.children.drain(..) {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        // Safety net: anything still running inside our namespaces was
        // started (indirectly) by this topology.
        for ns in &self.created {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: plain syscall on a pid living in our namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        for ns in self.created.drain(..).rev() {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            try_run(&["ip", "netns", "del", &ns]);
        }
        if let Err(e) = fs::remove_dir_all(&self.tmp) {
            eprintln!("cleanup: cannot remove {}: {e}", self.tmp.display());
        }
    }
}

/// nginx started by [`Topology::start_nginx`]; stopped when the topology is
/// dropped (or earlier with `Topology::kill(handle.pid)`).
#[derive(Debug)]
pub struct NginxHandle {
    pub pid: u32,
    pub dir: PathBuf,
    pub access_log: PathBuf,
    pub error_log: PathBuf,
}

impl NginxHandle {
    /// Access log as (remote addr, remote port, time in seconds, server port).
    pub fn access_lines(&self) -> Vec<(IpAddr, u16, f64, u16)> {
        let text = fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let parsed = (|| {
                    if f.len() != 4 {
                        return None;
                    }
                    Some((
                        f[0].parse().ok()?,
                        f[1].parse().ok()?,
                        f[2].parse().ok()?,
                        f[3].parse().ok()?,
                    ))
                })();
                parsed.unwrap_or_else(|| panic!("bad nginx access line {l:?}"))
            })
            .collect()
    }
}

/// UDP echo server started by [`Topology::start_udp_server`].
#[derive(Debug)]
pub struct UdpHandle {
    pub pid: u32,
    pub port: u16,
    pub file: PathBuf,
}

impl UdpHandle {
    /// Source (addr, port) of every datagram received so far, in order.
    pub fn seen(&self) -> Vec<(IpAddr, u16)> {
        let text = fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .map(|l| {
                let (a, p) = l
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad udp record {l:?}"));
                let a: IpAddr = a
                    .parse()
                    .unwrap_or_else(|e| panic!("bad udp addr {l:?}: {e}"));
                let p: u16 = p
                    .parse()
                    .unwrap_or_else(|e| panic!("bad udp port {l:?}: {e}"));
                (a, p)
            })
            .collect()
    }

    /// Distinct sources seen so far.
    pub fn seen_set(&self) -> HashSet<(IpAddr, u16)> {
        self.seen().into_iter().collect()
    }
}

/// argv: "addr:port"... (IPv6 without brackets, split at the last ':').
/// Exit 0 when every target accepts a TCP connection.
fn tcp_probe_script() -> &'static str {
    r#"
import socket, sys
for t in sys.argv[1:]:
    host, port = t.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect((host, int(port)))
    except OSError:
        sys.exit(1)
    finally:
        s.close()
"#
}

/// argv: port, record file. Prints "ready" once both sockets are bound.
const UDP_SERVER: &str = r#"
import select, socket, sys
port, path = int(sys.argv[1]), sys.argv[2]
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.bind(("0.0.0.0", port))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s6.bind(("::", port))
print("ready", flush=True)
while True:
    ready, _, _ = select.select([s4, s6], [], [])
    for s in ready:
        data, addr = s.recvfrom(65535)
        with open(path, "a") as f:
            f.write("%s %d\n" % (addr[0], addr[1]))
        s.sendto(data, addr)
"#;

/// argv: dst, port, src port (0 = any), timeout secs. Prints the local port.
const UDP_CLIENT: &str = r#"
import socket, sys
dst, port, src, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", src))
s.settimeout(t)
s.sendto(b"ctw-ping", (dst, port))
data, _ = s.recvfrom(65535)
if data != b"ctw-ping":
    sys.exit("unexpected echo %r" % data)
print(s.getsockname()[1])
"#;

/// argv: dst, port, connect timeout secs. Prints the local port, then
/// holds the connection until killed.
const TCP_HOLD: &str = r#"
import signal, socket, sys
dst, port, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(t)
s.connect((dst, port))
print(s.getsockname()[1], flush=True)
while True:
    signal.pause()
"#;

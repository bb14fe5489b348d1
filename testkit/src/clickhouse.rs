//! A private ClickHouse server for a test: Debian's `clickhouse-server`
//! (18.16 on Debian 12) with its own config, data and logs in a temp
//! directory, listening on free loopback ports only. [`ClickHouse::start`]
//! waits until it answers `SELECT 1`; dropping it kills the server by pid
//! and removes the directory. [`ClickHouse::stop`] and
//! [`ClickHouse::restart`] keep the directory and ports (a server down
//! mid-stream, then back with its data).
//!
//! Needs the `clickhouse-server` package (`scripts/test.sh` installs it and
//! disables the system service the package starts); [`available`] says
//! whether it is there.
//!
//! [`Cluster`] starts a [`ZooKeeper`] (Debian's `zookeeperd` jars, run
//! directly by `java`: own data directory, free port, no systemd) and
//! `shards × replicas` servers whose generated config names them all in
//! `remote_servers` (cluster [`CLUSTER`]), with `{shard}`/`{replica}`
//! macros, the ZooKeeper and a `distributed_ddl` queue (`ON CLUSTER`
//! statements). [`cluster_available`] says whether both packages are there.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The server binary of Debian's `clickhouse-server` package.
pub const SERVER_BIN: &str = "/usr/sbin/clickhouse-server";
/// How long a server may take to answer after its start.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Is `clickhouse-server` installed? Tests that need it call
/// [`crate::skip`] and return when not.
pub fn available() -> bool {
    Path::new(SERVER_BIN).exists()
}

/// ZooKeeper's jar from Debian's `zookeeper` package (`zookeeperd` pulls it in).
pub const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
/// The Java runtime that runs it.
pub const JAVA_BIN: &str = "/usr/bin/java";
/// The `remote_servers` name of a [`Cluster`].
pub const CLUSTER: &str = "ctw_test";

/// Are `clickhouse-server`, ZooKeeper and Java installed (for a [`Cluster`])?
pub fn cluster_available() -> bool {
    available() && Path::new(ZOOKEEPER_JAR).exists() && Path::new(JAVA_BIN).exists()
}

/// A running (or stopped) private server; see the module docs.
#[derive(Debug)]
pub struct ClickHouse {
    dir: PathBuf,
    /// HTTP interface port on 127.0.0.1 (the collector's `storage.url`).
    pub http_port: u16,
    /// Native protocol port on 127.0.0.1 (`clickhouse-client --port`).
    pub tcp_port: u16,
    /// Network namespace the server runs in (`None`: the host's).
    ns: Option<String>,
    child: Option<Child>,
    /// Extra top-level config elements (a cluster member's).
    extra: String,
}

/// A port free on 127.0.0.1 right now (the kernel's choice).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback port")
}

impl ClickHouse {
    /// Start a server in a fresh temp directory on free ports and wait
    /// until it answers. Panics (with the server's error log) if it does
    /// not within [`START_TIMEOUT`].
    pub fn start() -> ClickHouse {
        ClickHouse::start_in(None)
    }

    /// [`start`](Self::start) inside network namespace `ns` (its
    /// loopback: for a collector running there); [`query`](Self::query)
    /// then connects from inside it too.
    pub fn start_in(ns: Option<&str>) -> ClickHouse {
        let mut ch = ClickHouse::new(ns, free_port(), free_port(), String::new());
        ch.restart();
        ch
    }

    /// [`start`](Self::start) with `extra` top-level config elements
    /// (e.g. a `<compression>` section), written into its `config.xml`.
    pub fn start_with_config(extra: &str) -> ClickHouse {
        let mut ch = ClickHouse::new(None, free_port(), free_port(), extra.to_string());
        ch.restart();
        ch
    }

    /// A server not yet started, its directory and config written.
    fn new(ns: Option<&str>, http_port: u16, tcp_port: u16, extra: String) -> ClickHouse {
        let dir = temp_dir("clickhouse");
        let ch = ClickHouse {
            dir,
            http_port,
            tcp_port,
            ns: ns.map(str::to_string),
            child: None,
            extra,
        };
        ch.write_config();
        ch
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The server's directory (config, data, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn write_config(&self) {
        let d = self.dir.display();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
  <logger>
    <level>information</level>
    <log>{d}/server.log</log>
    <errorlog>{d}/server.err.log</errorlog>
    <size>100M</size>
    <count>1</count>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <profiles><default></default></profiles>
  <quotas><default></default></quotas>
{extra}</yandex>
"#,
            http = self.http_port,
            tcp = self.tcp_port,
            extra = self.extra,
        );
        std::fs::write(self.dir.join("config.xml"), config).expect("write config.xml");
    }

    /// Start the server (again, with the same directory and ports) and
    /// wait until it answers. No-op while it runs.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            return;
        }
        assert!(
            available(),
            "{SERVER_BIN} missing: apt-get install clickhouse-server (scripts/test.sh does)"
        );
        let out = std::fs::File::create(self.dir.join("stdout.log")).expect("stdout.log");
        let err = out.try_clone().expect("stdout.log");
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                // `ip netns exec` execs the server: the pid stays its own.
                c.args(["netns", "exec", ns, SERVER_BIN]);
                c
            }
            None => Command::new(SERVER_BIN),
        };
        let child = cmd
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start clickhouse-server");
        self.child = Some(child);
        let what = format!(
            "clickhouse-server to answer (logs in {})",
            self.dir.display()
        );
        let started = crate::wait_for(START_TIMEOUT, &what, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Some(Err(status));
            }
            // This server, not another test's that took the port first
            // (ports are picked free, then bound later: a race under load).
            let data = self.dir.display().to_string();
            self.query("SELECT metadata_path FROM system.tables WHERE database = 'system' LIMIT 1")
                .is_ok_and(|r| r.trim().starts_with(&data))
                .then_some(Ok(()))
        });
        if let Err(status) = started {
            self.child = None;
            panic!(
                "clickhouse-server exited ({status}) at start:\n{}",
                self.log_tail()
            );
        }
    }

    /// SIGKILL the server by pid and reap it (data stay; see [`restart`](Self::restart)).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last lines of the server's logs, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for f in ["stdout.log", "server.err.log"] {
            out.push_str(&format!("--- {f}\n{}\n", tail(&self.dir.join(f), 30)));
        }
        out
    }

    /// Run one statement over HTTP; `Ok(body)` on status 200, else
    /// `Err` with the status line and the server's message.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        match &self.ns {
            None => self.query_here(sql),
            Some(ns) => std::thread::scope(|s| {
                s.spawn(|| {
                    enter_netns(ns)?;
                    self.query_here(sql)
                })
                .join()
                .unwrap_or_else(|_| Err("query thread panicked".into()))
            }),
        }
    }

    fn query_here(&self, sql: &str) -> Result<String, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let req = format!(
            "POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{sql}",
            sql.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
        let resp = String::from_utf8_lossy(&resp);
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head.lines().next().unwrap_or("");
        if status.contains(" 200 ") {
            Ok(body.to_string())
        } else {
            Err(format!("{status}: {body}"))
        }
    }

    /// [`query`](Self::query), panicking on an error.
    pub fn must(&self, sql: &str) -> String {
        self.query(sql)
            .unwrap_or_else(|e| panic!("clickhouse {sql:?}: {e}"))
    }
}

/// A fresh, empty directory under the temp dir, unique in this process.
fn temp_dir(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ctw-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp directory");
    dir
}

/// The last `n` lines of file `path` (empty when unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A private standalone ZooKeeper 3.8 (Debian's jars run by `java`, no
/// systemd) on a free loopback port with its own data directory; dropping
/// it kills it by pid and removes the directory.
#[derive(Debug)]
pub struct ZooKeeper {
    dir: PathBuf,
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// Network namespace it runs in (`None`: the host's).
    ns: Option<String>,
    child: Option<Child>,
}

impl ZooKeeper {
    /// Start one and wait until it answers the `srvr` command as
    /// standalone. Panics (with its log) if it does not within
    /// [`START_TIMEOUT`].
    pub fn start() -> ZooKeeper {
        ZooKeeper::start_in(None)
    }

    /// [`start`](Self::start) inside network namespace `ns` (its loopback).
    pub fn start_in(ns: Option<&str>) -> ZooKeeper {
        assert!(
            cluster_available(),
            "{ZOOKEEPER_JAR} or {JAVA_BIN} missing: apt-get install zookeeperd (scripts/test.sh does)"
        );
        let dir = temp_dir("zookeeper");
        let port = free_port();
        let log = std::fs::File::create(dir.join("zookeeper.log")).expect("zookeeper.log");
        let err = log.try_clone().expect("zookeeper.log");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, JAVA_BIN]);
                c
            }
            None => Command::new(JAVA_BIN),
        };
        let child = cmd
            .args([
                "-Xmx256m",
                "-Dzookeeper.admin.enableServer=false",
                "-cp",
                &format!("/etc/zookeeper/conf:{ZOOKEEPER_JAR}"),
                "org.apache.zookeeper.server.ZooKeeperServerMain",
                &port.to_string(),
                &dir.join("data").display().to_string(),
            ])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start zookeeper");
        let mut zk = ZooKeeper {
            dir,
            port,
            ns: ns.map(str::to_string),
            child: Some(child),
        };
        let what = format!("zookeeper to answer (log in {})", zk.dir.display());
        let started = crate::wait_for(START_TIMEOUT, &what, || {
            if let Some(Ok(Some(status))) = zk.child.as_mut().map(Child::try_wait) {
                return Some(Err(status));
            }
            zk.four_letter("srvr")
                .is_ok_and(|r| r.contains("Mode: standalone"))
                .then_some(Ok(()))
        });
        if let Err(status) = started {
            zk.child = None;
            panic!(
                "zookeeper exited ({status}) at start:\n{}",
                tail(&zk.dir.join("zookeeper.log"), 30)
            );
        }
        zk
    }

    /// Send a four-letter command (`srvr`, `ruok`...) and read the answer.
    pub fn four_letter(&self, cmd: &str) -> Result<String, String> {
        match &self.ns {
            None => self.four_letter_here(cmd),
            Some(ns) => std::thread::scope(|s| {
                s.spawn(|| {
                    enter_netns(ns)?;
                    self.four_letter_here(cmd)
                })
                .join()
                .unwrap_or_else(|_| Err("zookeeper thread panicked".into()))
            }),
        }
    }

    fn four_letter_here(&self, cmd: &str) -> Result<String, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(cmd.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A ZooKeeper and `shards × replicas` ClickHouse servers forming the
/// cluster [`CLUSTER`] (`internal_replication`: a `Distributed` table
/// writes one replica per shard, `ReplicatedMergeTree` copies to the
/// others); each server's macros are `shard` = `01`, `02`... and `replica`
/// = `r1`, `r2`... See the module docs.
#[derive(Debug)]
pub struct Cluster {
    /// Servers shard by shard: shard `s`, replica `r` is `servers[s * replicas + r]`.
    pub servers: Vec<ClickHouse>,
    pub shards: usize,
    pub replicas: usize,
    /// Dropped after the servers (field order).
    pub zookeeper: ZooKeeper,
}

impl Cluster {
    /// Start the ZooKeeper and every server (in turn), each waited for.
    pub fn start(shards: usize, replicas: usize) -> Cluster {
        Cluster::start_in(None, shards, replicas)
    }

    /// [`start`](Self::start) inside network namespace `ns` (every server
    /// and the ZooKeeper on its loopback).
    pub fn start_in(ns: Option<&str>, shards: usize, replicas: usize) -> Cluster {
        Cluster::start_weighted_in(ns, &vec![1; shards], replicas)
    }

    /// [`start`](Self::start) with one shard per entry of `weights`, each
    /// with that `<weight>` in `remote_servers` (the share of the
    /// `Distributed` tables' rows it gets).
    pub fn start_weighted(weights: &[u32], replicas: usize) -> Cluster {
        Cluster::start_weighted_in(None, weights, replicas)
    }

    fn start_weighted_in(ns: Option<&str>, weights: &[u32], replicas: usize) -> Cluster {
        let shards = weights.len();
        assert!(shards >= 1 && replicas >= 1, "a cluster needs a server");
        let zookeeper = ZooKeeper::start_in(ns);
        let n = shards * replicas;
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut remote = String::new();
        for s in 0..shards {
            remote.push_str(&format!(
                "      <shard><weight>{}</weight><internal_replication>true</internal_replication>\n",
                weights[s]
            ));
            for r in 0..replicas {
                let tcp = ports[s * replicas + r].1;
                remote.push_str(&format!(
                    "        <replica><host>127.0.0.1</host><port>{tcp}</port></replica>\n"
                ));
            }
            remote.push_str("      </shard>\n");
        }
        let mut servers = Vec::with_capacity(n);
        for (i, &(http, tcp, inter)) in ports.iter().enumerate() {
            let (s, r) = (i / replicas, i % replicas);
            let extra = format!(
                r#"  <interserver_http_host>127.0.0.1</interserver_http_host>
  <interserver_http_port>{inter}</interserver_http_port>
  <remote_servers>
    <{CLUSTER}>
{remote}    </{CLUSTER}>
  </remote_servers>
  <zookeeper>
    <node><host>127.0.0.1</host><port>{zk}</port></node>
    <session_timeout_ms>10000</session_timeout_ms>
  </zookeeper>
  <macros>
    <shard>{shard:02}</shard>
    <replica>r{replica}</replica>
  </macros>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
"#,
                zk = zookeeper.port,
                shard = s + 1,
                replica = r + 1,
            );
            let mut ch = ClickHouse::new(ns, http, tcp, extra);
            ch.restart();
            servers.push(ch);
        }
        Cluster {
            servers,
            shards,
            replicas,
            zookeeper,
        }
    }

    /// Shard `shard`'s replica `replica` (both from 0).
    pub fn server(&mut self, shard: usize, replica: usize) -> &mut ClickHouse {
        &mut self.servers[shard * self.replicas + replica]
    }
}

/// Move the calling thread into network namespace `ns` (`/run/netns/NS`,
/// as made by `ip netns add`); its new sockets live there.
fn enter_netns(ns: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .map_err(|e| format!("open /run/netns/{ns}: {e}"))?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        // A server that died on its own explains a failure: say so.
        if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
            eprintln!(
                "clickhouse-server in {} had exited on its own ({status}):\n{}",
                self.dir.display(),
                self.log_tail()
            );
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! The mTLS gRPC port end to end, on 127.0.0.1: ingest with acks and
//! dedup, refused handshakes (no certificate, another CA), a Hello naming
//! another node, live lookups over an agent's stream, certificate reload,
//! and the Query service (also a search by pod over a pod history, and the
//! workload counter its ingest feeds). Certificates are generated at test start with
//! `ctw_collector::certs`, except `checked_in_certificates`, which uses the
//! ones in `tests/data/` (regenerate with `tests/data/regen.sh`).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ctw_collector::certs::{self, CertPair, IssueSpec};
use ctw_collector::config::{LookupConfig, TlsFiles};
use ctw_collector::ingest::{serve_on, ServeOptions};
use ctw_collector::metrics::Metrics;
use ctw_collector::pods::{Input, PodHistory, PodState, Workload};
use ctw_collector::registry::{LiveQuery, LookupError, Registry};
use ctw_collector::store::{MemStore, RecordStore, SearchQuery};
use ctw_common::{now_ns, ConnRecord, EventKind, Protocol, Tuple};
use ctw_proto::pb;
use ctw_proto::pb::agent_message::Msg as AgentMsg;
use ctw_proto::pb::collector_message::Msg as CollectorMsg;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Streaming};

const DEADLINE: Duration = Duration::from_secs(10);

/// Wait until `f` holds, failing after [`DEADLINE`].
async fn eventually(what: &str, f: impl FnMut() -> bool) {
    ctw_testkit::eventually(DEADLINE, what, f).await
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ctw-grpc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A CA with a collector certificate and client certificates.
struct Pki {
    ca: CertPair,
    server: CertPair,
}

impl Pki {
    fn new(cn: &str) -> Pki {
        let ca = certs::generate_ca(cn, 2).unwrap();
        let server = certs::issue(
            &ca,
            &IssueSpec::server(
                "collector",
                &["localhost"],
                &["127.0.0.1".parse::<IpAddr>().unwrap()],
            ),
        )
        .unwrap();
        Pki { ca, server }
    }

    fn client(&self, node: &str) -> CertPair {
        certs::issue(&self.ca, &IssueSpec::client(node)).unwrap()
    }

    /// Write the server's files (ca.pem, collector.pem, collector-key.pem).
    fn write_server_files(&self, dir: &Path) -> TlsFiles {
        certs::write_pair(dir, "ca", &self.ca, true).unwrap();
        certs::write_pair(dir, "collector", &self.server, true).unwrap();
        TlsFiles {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("collector.pem"),
            key_file: dir.join("collector-key.pem"),
        }
    }
}

struct Collector {
    addr: SocketAddr,
    store: Arc<MemStore>,
    registry: Arc<Registry>,
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Collector {
    async fn start(files: &TlsFiles) -> Collector {
        Collector::start_with_pods(files, None).await
    }

    /// [`Collector::start`] naming pods from `pods` (kubernetes on).
    async fn start_with_pods(files: &TlsFiles, pods: Option<Arc<PodHistory>>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(MemStore::default());
        let metrics = Metrics::new();
        let registry = Arc::new(Registry::new(metrics.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let opts = ServeOptions {
            lookup: LookupConfig {
                timeout_ms: 300,
                max_concurrency: 4,
            },
            reload_interval: Duration::from_millis(100),
            handshake_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
            pods,
            ..ServeOptions::default()
        };
        let (files, s, r, m) = (
            files.clone(),
            store.clone() as Arc<dyn RecordStore>,
            registry.clone(),
            metrics.clone(),
        );
        let server = tokio::spawn(async move {
            serve_on(listener, &files, opts, s, r, m, async {
                let _ = stopped.await;
            })
            .await
        });
        Collector {
            addr,
            store,
            registry,
            metrics,
            stop: Some(stop),
            server,
        }
    }

    async fn channel(&self, ca: &CertPair, identity: Option<&CertPair>) -> anyhow::Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca.cert_pem))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        let ch = Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(ch)
    }

    fn metric(&self, needle: &str) -> u64 {
        self.metrics
            .render()
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or(0)
    }

    fn records(&self) -> usize {
        self.store
            .search(&SearchQuery {
                limit: 1000,
                ..SearchQuery::default()
            })
            .unwrap()
            .total as usize
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// A fake agent: the request side of its stream and the collector's answers.
struct Agent {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::CollectorMessage>,
}

fn hello(node: &str, addresses: &[&str]) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            node: node.into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            boot_id: "boot-1".into(),
            version: "test".into(),
        })),
    }
}

/// Open a stream and send `first`; the result of the call.
async fn open(ch: Channel, first: pb::AgentMessage) -> Result<Agent, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut client = pb::ingest_client::IngestClient::new(ch);
    let rx = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Agent { tx, rx })
}

impl Agent {
    async fn connect(c: &Collector, pki: &Pki, node: &str, addresses: &[&str]) -> Agent {
        Agent::connect_boot(c, pki, node, addresses, "boot-1").await
    }

    async fn connect_boot(
        c: &Collector,
        pki: &Pki,
        node: &str,
        addresses: &[&str],
        boot: &str,
    ) -> Agent {
        let ch = c.channel(&pki.ca, Some(&pki.client(node))).await.unwrap();
        let mut h = hello(node, addresses);
        if let Some(pb::agent_message::Msg::Hello(hh)) = h.msg.as_mut() {
            hh.boot_id = boot.into();
        }
        let mut a = open(ch, h).await.unwrap();
        match a.next().await {
            CollectorMsg::HelloAck(_) => {}
            m => panic!("expected HelloAck, got {m:?}"),
        }
        a
    }

    async fn next(&mut self) -> CollectorMsg {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("collector message in time")
            .unwrap()
            .expect("stream open")
            .msg
            .unwrap()
    }

    async fn send(&self, msg: AgentMsg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .unwrap();
    }
}

fn record(snat_port: u16, event_ns: u64) -> ConnRecord {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    ConnRecord {
        id: u32::from(snat_port),
        status: 0xe,
        ..ConnRecord::new(
            EventKind::New,
            event_ns,
            Protocol::Tcp,
            Tuple::new(ip("10.244.1.7"), 40000, ip("198.19.0.2"), 80),
            Tuple::new(ip("198.19.0.2"), 80, ip("198.18.0.1"), snat_port),
        )
    }
}

/// A batch as agents send it (records packed); tests add message-form
/// records to `records`.
fn batch(seq: u64, records: &[ConnRecord]) -> AgentMsg {
    let mut packed = Vec::new();
    ctw_proto::packed::encode(records, &mut packed);
    AgentMsg::Batch(pb::RecordBatch {
        boot_id: "boot-1".into(),
        seq,
        records: Vec::new(),
        packed,
    })
}

/// Run `f` on a fresh collector with a fresh PKI, then stop it.
async fn with_collector<F, Fut>(name: &str, f: F)
where
    F: FnOnce(Collector, Pki) -> Fut,
    Fut: Future<Output = Collector>,
{
    let dir = temp_dir(name);
    let pki = Pki::new("test CA");
    let files = pki.write_server_files(&dir);
    let c = Collector::start(&files).await;
    let c = f(c, pki).await;
    c.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn batches_are_acked_once_stored_and_replays_are_stored_once() {
    with_collector("ingest", |c, pki| async move {
        let mut a = Agent::connect(&c, &pki, "node-a", &["198.18.0.1"]).await;
        let t = now_ns();
        let mut bad = pb::Record::from(&record(1, t));
        bad.orig.as_mut().unwrap().src = vec![1, 2, 3];
        let mut b = batch(1, &[record(1024, t), record(1025, t)]);
        if let AgentMsg::Batch(ref mut b) = b {
            b.records.push(bad);
        }
        a.send(b.clone()).await;
        match a.next().await {
            CollectorMsg::Ack(ack) => assert_eq!((ack.boot_id.as_str(), ack.seq), ("boot-1", 1)),
            m => panic!("expected Ack, got {m:?}"),
        }
        // Acked means stored: the store holds the two good records now.
        assert_eq!(c.records(), 2);
        assert_eq!(
            c.metric("ctw_collector_record_conversion_errors_total{node=\"node-a\"}"),
            1
        );

        // A replay is acked again and not stored twice.
        a.send(b).await;
        assert!(matches!(a.next().await, CollectorMsg::Ack(ack) if ack.seq == 1));
        assert_eq!(c.records(), 2);
        assert_eq!(
            c.metric("ctw_collector_batches_duplicate_total{node=\"node-a\"}"),
            1
        );
        assert_eq!(c.metric("ctw_collector_acks_sent_total"), 2);
        let info = &c.registry.agents()[0];
        assert_eq!(info.node, "node-a");
        assert!(info.connected);
        assert_eq!(info.last_batch_seq, Some(1));
        assert_eq!((info.records_stored, info.duplicates), (2, 1));
        assert!(info.lag_seconds.is_some());
        assert_eq!(c.metric("ctw_collector_agents_connected"), 1);

        // Loss reports become gaps.
        a.send(AgentMsg::Loss(pb::LossReport {
            boot_id: "boot-1".into(),
            reason: "kernel_drop".into(),
            from_ns: t,
            to_ns: t + 1000,
            count: 7,
            resynced: true,
        }))
        .await;
        eventually("the loss report is a gap in the store", || {
            let r = c
                .store
                .search(&SearchQuery {
                    limit: 10,
                    ..SearchQuery::default()
                })
                .unwrap();
            r.gaps
                .iter()
                .any(|g| g.reason == "kernel_drop" && g.count == 7 && g.node == "node-a")
        })
        .await;
        assert_eq!(c.registry.agents()[0].events_lost, 7);

        // The agent goes away: an open gap. The same process comes back: its
        // spool replay fills the window, no gap is stored.
        drop(a);
        eventually("the agent is seen disconnected", || {
            !c.registry.agents()[0].connected
        })
        .await;
        assert_eq!(c.registry.open_gaps().len(), 1);
        assert_eq!(c.metric("ctw_collector_agents_connected"), 0);
        let a = Agent::connect(&c, &pki, "node-a", &["198.18.0.1"]).await;
        assert!(c.registry.open_gaps().is_empty());
        let gaps = |c: &Collector| {
            c.store
                .search(&SearchQuery {
                    limit: 10,
                    ..SearchQuery::default()
                })
                .unwrap()
                .gaps
        };
        assert!(!gaps(&c).iter().any(|g| g.reason.starts_with("agent_")));
        // A restarted agent (new boot id): capture was down, a gap is stored.
        drop(a);
        eventually("the agent is seen disconnected", || {
            !c.registry.agents()[0].connected
        })
        .await;
        let _a = Agent::connect_boot(&c, &pki, "node-a", &["198.18.0.1"], "boot-2").await;
        assert!(gaps(&c)
            .iter()
            .any(|g| g.reason == "agent_restarted" && g.node == "node-a"));
        assert!(c.registry.open_gaps().is_empty());
        c
    })
    .await;
}

#[tokio::test]
async fn no_certificate_and_other_ca_are_refused_and_counted() {
    with_collector("refused", |c, pki| async move {
        async fn attempt(c: &Collector, ca: &CertPair, id: Option<&CertPair>) -> bool {
            match c.channel(ca, id).await {
                Err(_) => false,
                Ok(ch) => open(ch, hello("node-a", &[])).await.is_ok(),
            }
        }
        assert!(!attempt(&c, &pki.ca, None).await, "no client certificate");
        eventually("no_certificate counted", || {
            c.metric("ctw_collector_tls_handshake_failures_total{reason=\"no_certificate\"}") >= 1
        })
        .await;

        let other = Pki::new("other CA");
        assert!(
            !attempt(&c, &pki.ca, Some(&other.client("node-a"))).await,
            "client certificate from another CA"
        );
        eventually("unknown_ca counted", || {
            c.metric("ctw_collector_tls_handshake_failures_total{reason=\"unknown_ca\"}") >= 1
        })
        .await;

        // Garbage instead of a ClientHello.
        {
            let s = tokio::net::TcpStream::connect(c.addr).await.unwrap();
            s.writable().await.unwrap();
            s.try_write(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        }
        eventually("garbage counted", || {
            c.metric("ctw_collector_tls_handshake_failures_total{reason=\"protocol\"}")
                + c.metric("ctw_collector_tls_handshake_failures_total{reason=\"io\"}")
                >= 1
        })
        .await;

        assert_eq!(c.records(), 0);
        assert!(c.registry.agents().is_empty());
        // The right certificate still works.
        assert!(attempt(&c, &pki.ca, Some(&pki.client("node-a"))).await);
        c
    })
    .await;
}

#[tokio::test]
async fn an_agent_cannot_claim_another_node() {
    with_collector("claim", |c, pki| async move {
        let ch = c
            .channel(&pki.ca, Some(&pki.client("node-a")))
            .await
            .unwrap();
        let err = match open(ch, hello("node-b", &[])).await {
            Ok(mut a) => a.rx.message().await.unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("node-a"), "{}", err.message());

        // A batch before Hello is refused too.
        let ch = c
            .channel(&pki.ca, Some(&pki.client("node-a")))
            .await
            .unwrap();
        let first = pb::AgentMessage {
            msg: Some(batch(1, &[record(1024, now_ns())])),
        };
        let err = match open(ch, first).await {
            Ok(mut a) => a.rx.message().await.unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

        assert_eq!(c.records(), 0);
        assert!(c.registry.agents().is_empty());
        assert_eq!(
            c.metric("ctw_collector_streams_refused_total{reason=\"node_mismatch\"}"),
            1
        );
        assert_eq!(
            c.metric("ctw_collector_streams_refused_total{reason=\"bad_hello\"}"),
            1
        );
        c
    })
    .await;
}

/// Answer every lookup request on `a` with an entry whose reply tuple is the
/// request's (or stay silent when `answer` is false).
fn serve_lookups(mut a: Agent, node: &'static str, answer: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(m)) = a.rx.message().await {
            let Some(CollectorMsg::Lookup(req)) = m.msg else {
                continue;
            };
            if !answer {
                continue;
            }
            let t = Tuple::try_from(req.tuple.as_ref().unwrap()).unwrap();
            let mut r = record(t.dst_port, now_ns());
            r.reply = t;
            let reply = pb::LookupReply {
                request_id: req.request_id,
                found: true,
                error: String::new(),
                entry: Some((&r).into()),
                node: node.into(),
                pod: None,
            };
            if a.tx
                .send(pb::AgentMessage {
                    msg: Some(AgentMsg::LookupReply(reply)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

#[tokio::test]
async fn live_lookups_travel_over_the_agent_stream() {
    with_collector("lookup", |c, pki| async move {
        let a = Agent::connect(&c, &pki, "node-a", &["198.18.0.1"]).await;
        let b = Agent::connect(&c, &pki, "node-b", &["198.18.0.2"]).await;
        let fa = serve_lookups(a, "node-a", true);
        let fb = serve_lookups(b, "node-b", false);
        let reply_tuple = Tuple::new(
            "198.19.0.2".parse().unwrap(),
            80,
            "198.18.0.1".parse().unwrap(),
            1024,
        );
        let q = LiveQuery {
            protocol: Protocol::Tcp,
            tuple: reply_tuple,
            reply_tuple: true,
            zone: None,
        };
        let ans = c
            .registry
            .lookup_on("node-a", q, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ans.node, "node-a");
        assert_eq!(ans.record.reply, reply_tuple);

        // node-b never answers.
        assert_eq!(
            c.registry
                .lookup_on("node-b", q, Duration::from_millis(200))
                .await,
            Err(LookupError::Timeout("node-b".into()))
        );
        assert_eq!(
            c.registry
                .lookup_on("node-c", q, Duration::from_millis(200))
                .await,
            Err(LookupError::NotConnected("node-c".into()))
        );
        assert_eq!(c.registry.pending_lookups(), 0);

        // The same over Query.Lookup: routed to the owner of 198.18.0.1.
        let ch = c
            .channel(&pki.ca, Some(&pki.client("operator")))
            .await
            .unwrap();
        let mut query = pb::query_client::QueryClient::new(ch);
        let req = pb::LookupRequest {
            request_id: 42,
            protocol: 6,
            tuple: Some((&reply_tuple).into()),
            reply_tuple: true,
            node: String::new(),
            zone: None,
        };
        let r = query.lookup(req.clone()).await.unwrap().into_inner();
        assert!(r.found && r.node == "node-a" && r.request_id == 42, "{r:?}");
        // Asking node-b only: it times out.
        let err = query
            .lookup(pb::LookupRequest {
                node: "node-b".into(),
                ..req.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        // An owner nobody has: every agent is asked, node-a finds it.
        let mut t = reply_tuple;
        t.dst = "198.18.0.99".parse().unwrap();
        let r = query
            .lookup(pb::LookupRequest {
                tuple: Some((&t).into()),
                ..req.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.found && r.node == "node-a", "{r:?}");
        // Bad input names the field.
        let err = query
            .lookup(pb::LookupRequest { protocol: 1, ..req })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("protocol"), "{}", err.message());
        assert!(c.metric("ctw_collector_lookups_total{result=\"found\"}") >= 3);
        assert!(c.metric("ctw_collector_lookups_total{result=\"timeout\"}") >= 2);
        fa.abort();
        fb.abort();
        c
    })
    .await;
}

#[tokio::test]
async fn query_search_returns_stored_records() {
    with_collector("search", |c, pki| async move {
        let mut a = Agent::connect(&c, &pki, "node-a", &["198.18.0.1"]).await;
        let t = now_ns();
        a.send(batch(1, &[record(1024, t), record(2048, t + 1)]))
            .await;
        assert!(matches!(a.next().await, CollectorMsg::Ack(_)));

        let ch = c
            .channel(&pki.ca, Some(&pki.client("operator")))
            .await
            .unwrap();
        let mut query = pb::query_client::QueryClient::new(ch);
        let r = query
            .search(pb::SearchRequest {
                snat_ip: Some(vec![198, 18, 0, 1]),
                snat_port: Some(1024),
                at_ns: Some(t),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.total, 1);
        assert!(r.complete);
        let conn = &r.connections[0];
        assert_eq!(conn.node, "node-a");
        let rec = ConnRecord::try_from(conn.record.as_ref().unwrap()).unwrap();
        // As stored: whole microseconds, no conntrack id.
        let mut want = record(1024, t);
        ctw_collector::store::normalize(&mut want);
        assert_eq!(rec, want);

        let all = query
            .search(pb::SearchRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.total, 2);

        let err = query
            .search(pb::SearchRequest {
                src_ip: Some(vec![1, 2, 3]),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("src_ip"), "{}", err.message());
        // Without a pod history a search by pod is refused, naming the field.
        let err = query
            .search(pb::SearchRequest {
                namespace: Some("payments".into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("namespace"), "{}", err.message());
        c
    })
    .await;
}

/// A NEW record from pod address `src` to 198.19.0.2:80, SNATed to
/// 198.18.0.1:`snat_port`.
fn pod_record(src: &str, snat_port: u16, event_ns: u64) -> ConnRecord {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    ConnRecord {
        status: 0xe,
        ..ConnRecord::new(
            EventKind::New,
            event_ns,
            Protocol::Tcp,
            Tuple::new(ip(src), 40000, ip("198.19.0.2"), 80),
            Tuple::new(ip("198.19.0.2"), 80, ip("198.18.0.1"), snat_port),
        )
    }
}

fn pod_state(uid: u128, namespace: &str, name: &str, ip: &str, owner: (&str, &str)) -> PodState {
    PodState {
        uid,
        namespace: namespace.into(),
        name: name.into(),
        owner: Some(Workload {
            kind: owner.0.into(),
            name: owner.1.into(),
        }),
        node: "node-a".into(),
        host_network: false,
        ips: vec![ip.parse().unwrap()],
        terminal: false,
        start_ns: None,
    }
}

#[tokio::test]
async fn query_search_by_pod_over_grpc_names_the_pods_as_of_each_connection() {
    const S: u64 = 1_000_000_000;
    let dir = temp_dir("search-by-pod");
    let pki = Pki::new("test CA");
    let files = pki.write_server_files(&dir);
    // The pod history as the watch would feed it: checkout-a (Deployment
    // checkout through its ReplicaSet) on .11, then deleted and checkout-c
    // on the same address; checkout-b on .12; worker-0 (StatefulSet) on .13.
    let t = now_ns();
    let pods = Arc::new(PodHistory::in_memory(u64::MAX));
    pods.apply(Input::ListBegin, t - 60 * S);
    pods.apply(Input::ListDone, t - 60 * S);
    pods.apply(
        Input::Owner {
            kind: "ReplicaSet".into(),
            namespace: "payments".into(),
            name: "checkout-7d9f".into(),
            owner: Some(Workload {
                kind: "Deployment".into(),
                name: "checkout".into(),
            }),
        },
        t - 59 * S,
    );
    let rs = ("ReplicaSet", "checkout-7d9f");
    let a = pod_state(1, "payments", "checkout-7d9f-a", "198.18.1.11", rs);
    pods.apply(Input::Applied(a.clone()), t - 50 * S);
    let b = pod_state(2, "payments", "checkout-7d9f-b", "198.18.1.12", rs);
    pods.apply(Input::Applied(b), t - 50 * S);
    let w = pod_state(
        3,
        "batch",
        "worker-0",
        "198.18.1.13",
        ("StatefulSet", "worker"),
    );
    pods.apply(Input::Applied(w), t - 50 * S);
    pods.apply(Input::Deleted(a), t + S);
    let c_pod = pod_state(4, "payments", "checkout-7d9f-c", "198.18.1.11", rs);
    pods.apply(Input::Applied(c_pod), t + 2 * S);

    let c = Collector::start_with_pods(&files, Some(pods.clone())).await;
    let mut agent = Agent::connect(&c, &pki, "node-a", &["198.18.0.1"]).await;
    // A's connection, B's, the worker's, then C's from A's old address; and
    // one from an address no pod held.
    let records = [
        pod_record("198.18.1.11", 1024, t),
        pod_record("198.18.1.12", 1025, t),
        pod_record("198.18.1.13", 1026, t),
        pod_record("198.18.1.11", 1027, t + 3 * S),
        pod_record("198.18.1.99", 1028, t),
    ];
    agent.send(batch(1, &records)).await;
    assert!(matches!(agent.next().await, CollectorMsg::Ack(_)));

    let ch = c
        .channel(&pki.ca, Some(&pki.client("operator")))
        .await
        .unwrap();
    let mut query = pb::query_client::QueryClient::new(ch);
    let search = |f: &dyn Fn(&mut pb::SearchRequest)| {
        let mut r = pb::SearchRequest {
            from_ns: Some(t - 100 * S),
            to_ns: Some(t + 100 * S),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    // (SNAT port, pod name) of every connection found, by SNAT port.
    let found = |r: pb::SearchResponse| {
        let mut v: Vec<(u32, String)> = r
            .connections
            .iter()
            .map(|c| {
                let rec = c.record.as_ref().unwrap();
                let port = rec.reply.as_ref().unwrap().dst_port;
                let name = c
                    .pod
                    .as_ref()
                    .and_then(|p| p.pod.as_ref())
                    .map_or(String::new(), |p| p.name.clone());
                (port, name)
            })
            .collect();
        v.sort();
        (r.total, v)
    };
    let r = query
        .search(search(&|r| r.pod = Some("checkout-7d9f-a".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found(r), (1, vec![(1024, "checkout-7d9f-a".into())]));
    let r = query
        .search(search(&|r| {
            r.namespace = Some("payments".into());
            r.workload = Some("Deployment/checkout".into());
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        found(r),
        (
            3,
            vec![
                (1024, "checkout-7d9f-a".into()),
                (1025, "checkout-7d9f-b".into()),
                (1027, "checkout-7d9f-c".into())
            ]
        )
    );
    let r = query
        .search(search(&|r| r.workload = Some("worker".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found(r), (1, vec![(1026, "worker-0".into())]));
    // The pod filter and the other fields together: C's address, A's pod.
    let r = query
        .search(search(&|r| {
            r.pod = Some("checkout-7d9f-c".into());
            r.snat_port = Some(1024);
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found(r), (0, vec![]));
    // The same validation as HTTP, naming the field.
    for (field, req) in [
        (
            "workload",
            search(&|r| r.workload = Some("Deployment/a/b".into())),
        ),
        ("pod", search(&|r| r.pod = Some(String::new()))),
        (
            "namespace",
            search(&|r| r.namespace = Some("n".repeat(400))),
        ),
    ] {
        let err = query.search(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    // The workload counter at ingest: the Deployment's three connections
    // (A, B, C as of their start) and the StatefulSet's one, to port 80;
    // the address no pod held is not counted.
    assert_eq!(
        c.metric(
            "ctw_collector_workload_new_connections_total{namespace=\"payments\",port=\"80\",workload=\"checkout\",workload_kind=\"Deployment\"}"
        ),
        3
    );
    assert_eq!(
        c.metric(
            "ctw_collector_workload_new_connections_total{namespace=\"batch\",port=\"80\",workload=\"worker\",workload_kind=\"StatefulSet\"}"
        ),
        1
    );
    c.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn certificates_are_reloaded_without_restart() {
    let dir = temp_dir("reload");
    let old = Pki::new("old CA");
    let files = old.write_server_files(&dir);
    let c = Collector::start(&files).await;
    let ok = |ch: anyhow::Result<Channel>| async move {
        match ch {
            Ok(ch) => open(ch, hello("node-a", &[])).await.is_ok(),
            Err(_) => false,
        }
    };
    assert!(ok(c.channel(&old.ca, Some(&old.client("node-a"))).await).await);

    // Replace CA, certificate and key with a new PKI.
    let new = Pki::new("new CA");
    new.write_server_files(&dir);
    let new_client = new.client("node-a");
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if ok(c.channel(&new.ca, Some(&new_client)).await).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "new certificates not in use"
        );
        // tidy: polls an async condition (`eventually` takes a sync one).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old CA's clients are refused now, and the server is not trusted
    // by them either.
    assert!(!ok(c.channel(&old.ca, Some(&old.client("node-a"))).await).await);
    assert!(!ok(c.channel(&new.ca, Some(&old.client("node-a"))).await).await);

    assert!(c.metric("ctw_collector_tls_reloads_total{result=\"ok\"}") >= 1);

    // A broken file keeps the current config.
    std::fs::write(dir.join("collector-key.pem"), "not a key").unwrap();
    eventually("the broken key is seen and refused", || {
        c.metric("ctw_collector_tls_reloads_total{result=\"error\"}") >= 1
    })
    .await;
    assert!(ok(c.channel(&new.ca, Some(&new_client)).await).await);
    c.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The checked-in certificates (tests/data/) still work: a good agent over
/// them, and a node-a certificate from the other CA refused. With
/// CTW_REGEN_TEST_CERTS=1 they are rewritten first (tests/data/regen.sh).
#[tokio::test]
async fn checked_in_certificates() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    if std::env::var_os("CTW_REGEN_TEST_CERTS").is_some() {
        let run = |args: &str| {
            let args: Vec<String> = args
                .replace("DATA", &data.display().to_string())
                .split(' ')
                .map(str::to_string)
                .collect();
            certs::cli(&args).unwrap();
        };
        run("init-ca --dir DATA --cn ctw-test-CA --days 36500 --force");
        run("issue --dir DATA --name collector --kind server --dns localhost --ip 127.0.0.1,::1 --days 36500 --force");
        run("issue --dir DATA --name node-a --kind client --days 36500 --force");
        run("issue --dir DATA --name node-b --kind client --days 36500 --force");
        run("init-ca --dir DATA/other --cn ctw-other-CA --days 36500 --force");
        run("issue --dir DATA/other --name node-a --kind client --days 36500 --force");
    }
    let pair = |dir: &Path, name: &str| certs::read_pair(dir, name).unwrap();
    let pki = Pki {
        ca: pair(&data, "ca"),
        server: pair(&data, "collector"),
    };
    let files = TlsFiles {
        ca_file: data.join("ca.pem"),
        cert_file: data.join("collector.pem"),
        key_file: data.join("collector-key.pem"),
    };
    let c = Collector::start(&files).await;
    let ch = c
        .channel(&pki.ca, Some(&pair(&data, "node-a")))
        .await
        .unwrap();
    let mut a = open(ch, hello("node-a", &[])).await.unwrap();
    assert!(matches!(a.next().await, CollectorMsg::HelloAck(_)));
    a.send(batch(1, &[record(1024, now_ns())])).await;
    assert!(matches!(a.next().await, CollectorMsg::Ack(_)));

    let ch = c
        .channel(&pki.ca, Some(&pair(&data, "node-b")))
        .await
        .unwrap();
    let err = match open(ch, hello("node-a", &[])).await {
        Ok(mut a) => a.rx.message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::PermissionDenied);

    let other = pair(&data.join("other"), "node-a");
    let refused = match c.channel(&pki.ca, Some(&other)).await {
        Err(_) => true,
        Ok(ch) => open(ch, hello("node-a", &[])).await.is_err(),
    };
    assert!(refused, "certificate of another CA accepted");
    c.stop().await;
}

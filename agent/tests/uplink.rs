//! The collector uplink against an in-process fake collector: a tonic
//! server implementing `Ingest` over mTLS (client certificate required),
//! with certificates made by rcgen at test start. No root needed.
//!
//! Waits are on conditions with deadlines: the fake collector's state is a
//! `watch` channel (woken on every message), the agent's metrics are polled.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctw_agent::capture::{Loss, RecordSink};
use ctw_agent::http::LookupFn;
use ctw_agent::lookup::LookupQuery;
use ctw_agent::metrics::Metrics;
use ctw_agent::netlink::request::TupleDir;
use ctw_agent::uplink::{Uplink, UplinkConfig, UplinkSink, UplinkTls};
use ctw_common::{ConnRecord, EventKind, Protocol, TcpState, Tuple};
use ctw_proto::pb;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- certificates

struct Pem {
    cert: String,
    key: String,
}

/// A CA and certificates it signs.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn sign(&self, names: &[&str], eku: ExtendedKeyUsagePurpose) -> Pem {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Everything one test needs on disk: the agent's TLS files and spool.
struct Fixture {
    dir: PathBuf,
    ca: Ca,
    server: Pem,
}

impl Fixture {
    /// A test collector on a free loopback port with this fixture's server
    /// certificate, trusting its CA.
    async fn collector(&self, behaviour: Behaviour) -> Collector {
        self.collector_at("127.0.0.1:0".parse().unwrap(), behaviour)
            .await
    }

    /// The same at `addr` (a restarted collector on the address the agent
    /// knows).
    async fn collector_at(&self, addr: SocketAddr, behaviour: Behaviour) -> Collector {
        Collector::start(addr, &self.server, &self.ca.pem, behaviour).await
    }

    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("ctw-uplink-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("ctw test CA");
        let agent = ca.sign(&["node-a"], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.join("agent.pem"), &agent.cert).unwrap();
        std::fs::write(dir.join("agent-key.pem"), &agent.key).unwrap();
        let server = ca.sign(
            &["collector.test", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        Fixture { dir, ca, server }
    }

    fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    fn config(&self, addr: SocketAddr) -> UplinkConfig {
        let mut c = UplinkConfig::new(
            format!("https://{addr}"),
            UplinkTls {
                ca_file: self.dir.join("ca.pem"),
                cert_file: self.dir.join("agent.pem"),
                key_file: self.dir.join("agent-key.pem"),
            },
        );
        c.spool_dir = self.spool();
        c.batch_max_records = 100;
        c.batch_max_delay_ms = 20;
        c.node_addresses = vec!["192.0.2.10".into(), "2001:db8::10".into()];
        c.reconnect_min_ms = 50;
        c.reconnect_max_ms = 400;
        c.connect_timeout_ms = 5000;
        c
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// -------------------------------------------------------------- fake collector

/// Everything the fake collector received, in order.
#[derive(Debug, Default, Clone)]
struct Seen {
    streams: usize,
    hellos: Vec<pb::Hello>,
    /// (boot id, seq, event_ns of each record), duplicates included.
    batches: Vec<(String, u64, Vec<u64>)>,
    losses: Vec<pb::LossReport>,
    replies: Vec<pb::LookupReply>,
    heartbeats: Vec<pb::Heartbeat>,
}

impl Seen {
    /// Distinct records by event_ns, over distinct (boot, seq).
    fn records(&self) -> BTreeSet<u64> {
        self.batches
            .iter()
            .flat_map(|(_, _, r)| r.iter().copied())
            .collect()
    }
    fn distinct_batches(&self) -> BTreeMap<(String, u64), Vec<u64>> {
        self.batches
            .iter()
            .map(|(b, s, r)| ((b.clone(), *s), r.clone()))
            .collect()
    }
    fn record_count_with_duplicates(&self) -> usize {
        self.batches.iter().map(|(_, _, r)| r.len()).sum()
    }
}

#[derive(Debug, Clone, Copy)]
struct Behaviour {
    /// Ack batches.
    ack: bool,
    /// On the first stream only: after this many batches, fail the stream
    /// without acking anything.
    drop_first_stream_after: Option<usize>,
    /// Say in HelloAck that heartbeats are taken (a collector older than
    /// heartbeats says nothing).
    heartbeats: bool,
}

const ACKING: Behaviour = Behaviour {
    ack: true,
    drop_first_stream_after: None,
    heartbeats: false,
};

const HEARTBEATS: Behaviour = Behaviour {
    heartbeats: true,
    ..ACKING
};

type Outbound = mpsc::Sender<Result<pb::CollectorMessage, Status>>;

struct Fake {
    seen: watch::Sender<Seen>,
    behaviour: Behaviour,
    current: Arc<Mutex<Option<Outbound>>>,
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for Fake {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

    async fn stream(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        let mut stream_no = 0;
        self.seen.send_modify(|s| {
            s.streams += 1;
            stream_no = s.streams;
        });
        *self.current.lock().unwrap() = Some(tx.clone());
        let seen = self.seen.clone();
        let behaviour = self.behaviour;
        tokio::spawn(async move {
            use pb::agent_message::Msg;
            let mut batches = 0;
            while let Ok(Some(m)) = inbound.message().await {
                let Some(m) = m.msg else { continue };
                let reply = match m {
                    Msg::Hello(h) => {
                        seen.send_modify(|s| s.hellos.push(h));
                        Some(pb::collector_message::Msg::HelloAck(pb::HelloAck {
                            collector_version: "fake".into(),
                            heartbeats: behaviour.heartbeats,
                        }))
                    }
                    Msg::Batch(b) => {
                        batches += 1;
                        let ack = pb::Ack {
                            boot_id: b.boot_id.clone(),
                            seq: b.seq,
                        };
                        seen.send_modify(|s| {
                            s.batches.push((
                                b.boot_id,
                                b.seq,
                                // Agents send their records packed.
                                {
                                    assert!(b.records.is_empty(), "message-form records");
                                    let u = ctw_proto::packed::decode(&b.packed);
                                    assert_eq!(u.errors, 0, "{:?}", u.first_error);
                                    u.records.iter().map(|r| r.event_ns).collect()
                                },
                            ))
                        });
                        if stream_no == 1 && behaviour.drop_first_stream_after == Some(batches) {
                            let _ = tx
                                .send(Err(Status::unavailable("fake collector goes away")))
                                .await;
                            return;
                        }
                        (behaviour.ack
                            && !(stream_no == 1 && behaviour.drop_first_stream_after.is_some()))
                        .then_some(pb::collector_message::Msg::Ack(ack))
                    }
                    Msg::Loss(l) => {
                        seen.send_modify(|s| s.losses.push(l));
                        None
                    }
                    Msg::LookupReply(r) => {
                        seen.send_modify(|s| s.replies.push(r));
                        None
                    }
                    Msg::Heartbeat(h) => {
                        seen.send_modify(|s| s.heartbeats.push(h));
                        None
                    }
                };
                if let Some(msg) = reply {
                    if tx
                        .send(Ok(pb::CollectorMessage { msg: Some(msg) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Collector {
    addr: SocketAddr,
    seen: watch::Receiver<Seen>,
    current: Arc<Mutex<Option<Outbound>>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Collector {
    /// Serves on `addr` (port 0: any) with `server` as its certificate and
    /// `client_ca` as the only CA it accepts client certificates from.
    async fn start(
        addr: SocketAddr,
        server: &Pem,
        client_ca: &str,
        behaviour: Behaviour,
    ) -> Collector {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseaddr(true).unwrap();
        sock.bind(addr).unwrap();
        let listener = sock.listen(128).unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = watch::channel(Seen::default());
        let current = Arc::new(Mutex::new(None));
        let fake = Fake {
            seen: seen_tx,
            behaviour,
            current: current.clone(),
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&server.cert, &server.key))
            .client_ca_root(Certificate::from_pem(client_ca));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::builder()
            .tls_config(tls)
            .unwrap()
            .initial_stream_window_size(ctw_agent::uplink::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(ctw_agent::uplink::CONNECTION_WINDOW_BYTES);
        tokio::spawn(async move {
            let _ = server
                .serve_with_incoming_shutdown(
                    pb::ingest_server::IngestServer::new(fake),
                    TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Collector {
            addr,
            seen,
            current,
            stop: Some(stop),
        }
    }

    /// Waits until `f` holds for what the collector has seen.
    async fn wait(&mut self, what: &str, f: impl FnMut(&Seen) -> bool) -> Seen {
        let got = match tokio::time::timeout(WAIT, self.seen.wait_for(f)).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        got.unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}; seen: {}",
                summary(&self.seen.borrow())
            )
        })
    }

    /// Sends a message on the newest stream.
    async fn send(&self, msg: pb::collector_message::Msg) {
        let tx = self
            .current
            .lock()
            .unwrap()
            .clone()
            .expect("an open stream");
        tx.send(Ok(pb::CollectorMessage { msg: Some(msg) }))
            .await
            .unwrap();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn summary(s: &Seen) -> String {
    format!(
        "streams {}, hellos {}, batches {} ({} records, {} distinct), losses {:?}, replies {}, heartbeats {}",
        s.streams,
        s.hellos.len(),
        s.batches.len(),
        s.record_count_with_duplicates(),
        s.records().len(),
        s.losses,
        s.replies.len(),
        s.heartbeats.len()
    )
}

/// A port nothing listens on (yet).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ----------------------------------------------------------------------- agent

fn record(event_ns: u64) -> ConnRecord {
    let i = event_ns as u32;
    let pod = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i & 0xffff)));
    let server: IpAddr = "198.19.0.2".parse().unwrap();
    let node: IpAddr = "198.19.0.1".parse().unwrap();
    ConnRecord {
        id: i,
        status: 0x8,
        tcp_state: Some(TcpState::SynSent),
        ..ConnRecord::new(
            EventKind::New,
            event_ns,
            Protocol::Tcp,
            Tuple::new(pod, 10000 + (i % 50000) as u16, server, 443),
            Tuple::new(server, 443, node, 20000 + (i % 40000) as u16),
        )
    }
}

/// Sends records `range` through the sink in capture-sized chunks.
fn send(sink: &UplinkSink, range: std::ops::Range<u64>, chunk: usize) {
    let all: Vec<ConnRecord> = range.map(record).collect();
    for c in all.chunks(chunk) {
        sink.send(c.to_vec());
    }
}

fn no_lookup() -> Arc<LookupFn> {
    Arc::new(|_: &LookupQuery| Ok(None))
}

fn start(cfg: UplinkConfig, metrics: &Metrics, lookup: Arc<LookupFn>) -> (Uplink, UplinkSink) {
    Uplink::start(cfg, "node-a", metrics.clone(), lookup).unwrap()
}

/// Polls an agent-side condition (metrics, files) until a deadline.
async fn poll(what: &str, f: impl FnMut() -> bool) {
    ctw_testkit::eventually(WAIT, what, f).await
}

fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
                .count()
        })
        .unwrap_or(0)
}

fn dropped(m: &Metrics, reason: &str) -> u64 {
    m.uplink.records_dropped.with_label_values(&[reason]).get()
}

/// (boot, seq) of each batch is unique, seqs of a boot are 1..=n, and the
/// batches of each boot hold `records`, in order.
fn assert_complete(seen: &Seen, boot: &str, records: std::ops::Range<u64>) {
    let mine: Vec<_> = seen
        .distinct_batches()
        .into_iter()
        .filter(|((b, _), _)| b == boot)
        .collect();
    let seqs: Vec<u64> = mine.iter().map(|((_, s), _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=mine.len() as u64).collect::<Vec<_>>(),
        "seqs of boot {boot}"
    );
    let got: Vec<u64> = mine.into_iter().flat_map(|(_, r)| r).collect();
    assert_eq!(got, records.collect::<Vec<_>>(), "records of boot {boot}");
}

// ----------------------------------------------------------------------- tests

#[tokio::test]
async fn records_arrive_in_order_with_seq_1_to_n_and_are_acked() {
    let fx = Fixture::new("inorder");
    let mut col = fx.collector(ACKING).await;
    let m = Metrics::new(&[]);
    let mut cfg = fx.config(col.addr);
    cfg.server_name = Some("collector.test".into());
    let (up, sink) = start(cfg, &m, no_lookup());
    send(&sink, 0..1000, 7);
    let seen = col
        .wait("1000 records", |s| s.records().len() == 1000)
        .await;
    assert_eq!(seen.streams, 1);
    assert_eq!(
        seen.batches.len(),
        seen.distinct_batches().len(),
        "no resends"
    );
    // Every batch in the order made: seq 1..n, records in capture order.
    let seqs: Vec<u64> = seen.batches.iter().map(|b| b.1).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(seen
        .batches
        .iter()
        .all(|b| b.0 == up.boot_id() && b.2.len() <= 100));
    assert_complete(&seen, up.boot_id(), 0..1000);
    let hello = &seen.hellos[0];
    assert_eq!(hello.node, "node-a");
    assert_eq!(hello.boot_id, up.boot_id());
    assert_eq!(hello.addresses, vec!["192.0.2.10", "2001:db8::10"]);
    assert_eq!(hello.version, env!("CARGO_PKG_VERSION"));
    let n = seqs.len() as u64;
    poll("every batch acked", || {
        m.uplink.batches_acked.get() == n && m.uplink.unacked_batches.get() == 0
    })
    .await;
    assert_eq!(m.uplink.records_acked.get(), 1000);
    assert_eq!(m.uplink.records_sent.get(), 1000);
    assert_eq!(m.uplink.connected.get(), 1);
    assert_eq!(m.uplink.spool_bytes.get(), 0);
    assert_eq!(spool_files(&fx.spool()), 0);
    assert!(m.render().contains("ctw_uplink_connected 1"));
    up.shutdown();
    assert_eq!(m.uplink.connected.get(), 0);
    assert_eq!(
        spool_files(&fx.spool()),
        0,
        "nothing unacked to spool at stop"
    );
}

#[tokio::test]
async fn collector_down_at_start_then_everything_delivered_once() {
    let fx = Fixture::new("down");
    let addr = free_addr();
    let m = Metrics::new(&[]);
    let (up, sink) = start(fx.config(addr), &m, no_lookup());
    send(&sink, 0..500, 10);
    poll("500 records spooled", || {
        m.uplink.records_spooled.get() == 500
    })
    .await;
    assert!(spool_files(&fx.spool()) >= 5);
    assert!(m.uplink.spool_bytes.get() > 0);
    assert_eq!(m.uplink.connected.get(), 0);
    poll("a reconnect attempt", || m.uplink.reconnects.get() >= 1).await;

    let mut col = fx.collector_at(addr, ACKING).await;
    let seen = col.wait("500 records", |s| s.records().len() == 500).await;
    assert_eq!(
        seen.batches.len(),
        seen.distinct_batches().len(),
        "each batch once"
    );
    assert_eq!(seen.record_count_with_duplicates(), 500);
    assert_complete(&seen, up.boot_id(), 0..500);
    poll("spool emptied by acks", || {
        m.uplink.unacked_batches.get() == 0 && spool_files(&fx.spool()) == 0
    })
    .await;
    assert_eq!(m.uplink.spool_bytes.get(), 0);
    assert_eq!(m.uplink.connected.get(), 1);
    // New records after the outage go straight out.
    send(&sink, 500..600, 10);
    let seen = col.wait("600 records", |s| s.records().len() == 600).await;
    assert_complete(&seen, up.boot_id(), 0..600);
}

#[tokio::test]
async fn unacked_batches_are_resent_after_the_stream_drops() {
    let fx = Fixture::new("resend");
    let behaviour = Behaviour {
        ack: true,
        drop_first_stream_after: Some(3),
        heartbeats: false,
    };
    let mut col = fx.collector(behaviour).await;
    let m = Metrics::new(&[]);
    let (up, sink) = start(fx.config(col.addr), &m, no_lookup());
    send(&sink, 0..1000, 50);
    let seen = col
        .wait("every record after a reconnect", |s| {
            s.records().len() == 1000 && s.streams >= 2
        })
        .await;
    poll("every batch acked", || m.uplink.unacked_batches.get() == 0).await;
    let seen2 = col.seen.borrow().clone();
    assert!(seen.streams >= 2);
    assert!(
        seen2.batches.len() > seen2.distinct_batches().len(),
        "the first stream's batches were seen twice: {}",
        summary(&seen2)
    );
    // The union by (boot, seq) is complete and consistent.
    assert_complete(&seen2, up.boot_id(), 0..1000);
    for (key, records) in seen2.distinct_batches() {
        for (b, s, r) in &seen2.batches {
            if (b, s) == (&key.0, &key.1) {
                assert_eq!(r, &records, "a resent batch has the same records");
            }
        }
    }
    assert!(m.uplink.reconnects.get() >= 1);
    assert!(m.uplink.batches_sent.get() > m.uplink.batches_acked.get());
}

#[tokio::test]
async fn full_spool_drops_oldest_first_and_reports_the_exact_loss() {
    let fx = Fixture::new("overflow");
    let addr = free_addr();
    let m = Metrics::new(&[]);
    let mut cfg = fx.config(addr);
    cfg.spool_max_mb = 1;
    cfg.batch_max_records = 50;
    const BASE: u64 = 1_000_000;
    const N: u64 = 40_000;
    let (up, sink) = start(cfg, &m, no_lookup());
    send(&sink, BASE..BASE + N, 100);
    poll("every record spooled", || {
        m.uplink.records_spooled.get() == N
    })
    .await;
    let lost = dropped(&m, "spool_overflow");
    assert!(lost > 0, "the spool must overflow");
    assert!(m.uplink.spool_bytes.get() <= 1 << 20);

    let mut col = fx.collector_at(addr, ACKING).await;
    let seen = col
        .wait("the rest and the loss report", |s| {
            let reported: u64 = s
                .losses
                .iter()
                .filter(|l| l.reason == "spool_overflow")
                .map(|l| l.count)
                .sum();
            s.records().len() as u64 + reported == N && reported > 0
        })
        .await;
    let losses: Vec<_> = seen
        .losses
        .iter()
        .filter(|l| l.reason == "spool_overflow")
        .collect();
    let count: u64 = losses.iter().map(|l| l.count).sum();
    assert_eq!(count, lost, "the report has the exact count");
    // The oldest records went: what arrived is exactly the newest N - lost.
    let got = seen.records();
    assert_eq!(got.iter().next().copied(), Some(BASE + lost));
    assert_eq!(got.len() as u64, N - lost);
    assert!(got.iter().zip(BASE + lost..).all(|(a, b)| *a == b));
    // And the report's window is exactly theirs.
    assert_eq!(losses.iter().map(|l| l.from_ns).min(), Some(BASE));
    assert_eq!(losses.iter().map(|l| l.to_ns).max(), Some(BASE + lost - 1));
    assert!(losses
        .iter()
        .all(|l| l.boot_id == up.boot_id() && !l.resynced));
    assert_eq!(seen.batches.len(), seen.distinct_batches().len());
}

#[tokio::test]
async fn spooled_batches_and_losses_survive_an_agent_restart() {
    let fx = Fixture::new("restart");
    let addr = free_addr();
    let m = Metrics::new(&[]);
    let (up1, sink1) = start(fx.config(addr), &m, no_lookup());
    let boot1 = up1.boot_id().to_string();
    send(&sink1, 0..300, 25);
    sink1.loss(&Loss {
        from_ns: 7,
        to_ns: 9,
        count: 42,
        resynced: true,
    });
    // A clean stop batches and spools whatever is still queued.
    up1.shutdown();
    drop(sink1);
    assert!(spool_files(&fx.spool()) >= 3);
    assert!(fx.spool().join("losses").exists());

    let m2 = Metrics::new(&[]);
    let (up2, sink2) = start(fx.config(addr), &m2, no_lookup());
    let boot2 = up2.boot_id().to_string();
    assert_ne!(boot1, boot2);
    assert_eq!(
        m2.uplink.unacked_batches.get() as usize,
        spool_files(&fx.spool())
    );
    send(&sink2, 300..400, 25);
    poll("new records spooled", || {
        m2.uplink.records_spooled.get() == 100
    })
    .await;

    let mut col = fx.collector_at(addr, ACKING).await;
    let seen = col.wait("400 records", |s| s.records().len() == 400).await;
    assert_complete(&seen, &boot1, 0..300);
    assert_complete(&seen, &boot2, 300..400);
    // The old boot's batches went first.
    let first_new = seen.batches.iter().position(|b| b.0 == boot2).unwrap();
    assert!(seen.batches[..first_new].iter().all(|b| b.0 == boot1));
    assert!(seen.batches[first_new..].iter().all(|b| b.0 == boot2));
    let seen = col
        .wait("the earlier run's loss report", |s| !s.losses.is_empty())
        .await;
    let l = &seen.losses[0];
    assert_eq!(
        (
            l.boot_id.as_str(),
            l.reason.as_str(),
            l.from_ns,
            l.to_ns,
            l.count,
            l.resynced
        ),
        (boot1.as_str(), "kernel_drop", 7, 9, 42, true)
    );
    poll("spool empty", || {
        m2.uplink.unacked_batches.get() == 0
            && spool_files(&fx.spool()) == 0
            && !fx.spool().join("losses").exists()
    })
    .await;
}

#[tokio::test]
async fn queue_overflow_and_kernel_loss_are_reported() {
    let fx = Fixture::new("queue");
    let mut col = fx.collector(ACKING).await;
    let m = Metrics::new(&[]);
    let mut cfg = fx.config(col.addr);
    cfg.queue_max_records = 10;
    let (up, sink) = start(cfg, &m, no_lookup());
    col.wait("hello", |s| !s.hellos.is_empty()).await;
    // More than the queue holds at once: refused whole, counted, reported.
    send(&sink, 500..520, 20);
    assert_eq!(dropped(&m, "uplink_queue"), 20);
    sink.loss(&Loss {
        from_ns: 100,
        to_ns: 200,
        count: 3,
        resynced: false,
    });
    send(&sink, 0..5, 5);
    let seen = col
        .wait("both loss reports and the records", |s| {
            s.losses.len() >= 2 && s.records().len() == 5
        })
        .await;
    let q = seen
        .losses
        .iter()
        .find(|l| l.reason == "uplink_queue")
        .unwrap();
    assert_eq!((q.from_ns, q.to_ns, q.count), (500, 519, 20));
    assert_eq!(q.boot_id, up.boot_id());
    let k = seen
        .losses
        .iter()
        .find(|l| l.reason == "kernel_drop")
        .unwrap();
    assert_eq!(
        (k.from_ns, k.to_ns, k.count, k.resynced),
        (100, 200, 3, false)
    );
    // Confirmed by the ack of a batch sent after them: not kept for a resend.
    send(&sink, 5..10, 5);
    col.wait("more records", |s| s.records().len() == 10).await;
    poll("loss reports confirmed", || {
        m.uplink.unacked_batches.get() == 0 && !fx.spool().join("losses").exists()
    })
    .await;
    assert_eq!(m.uplink.loss_reports_sent.get(), 2);
}

#[tokio::test]
async fn heartbeats_go_only_to_collectors_that_take_them_and_say_time_entries_and_newest_record() {
    // A collector older than heartbeats: none is sent, records flow.
    let fx = Fixture::new("heartbeat-old");
    let mut col = fx.collector(ACKING).await;
    let m = Metrics::new(&[]);
    let mut cfg = fx.config(col.addr);
    cfg.heartbeat_interval_ms = 100;
    let (up, sink) = start(cfg, &m, no_lookup());
    send(&sink, 1..11, 5);
    col.wait("10 records", |s| s.records().len() == 10).await;
    // tidy: proving that nothing is sent takes time: ten heartbeat intervals.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    send(&sink, 11..21, 5);
    let seen = col.wait("20 records", |s| s.records().len() == 20).await;
    assert!(seen.heartbeats.is_empty(), "{:?}", seen.heartbeats);
    assert_eq!(m.uplink.heartbeats_sent.get(), 0);
    up.shutdown();
    drop(sink);

    // A collector that takes them: one at once, then one per interval,
    // with the agent's clock, the capture's live-entry count and the
    // newest record's event time.
    let fx = Fixture::new("heartbeat-new");
    let mut col = fx.collector(HEARTBEATS).await;
    let m = Metrics::new(&[]);
    m.tracked_entries.set(7);
    let mut cfg = fx.config(col.addr);
    cfg.heartbeat_interval_ms = 100;
    let before = ctw_common::now_ns();
    let (_up, sink) = start(cfg, &m, no_lookup());
    let seen = col.wait("a heartbeat", |s| !s.heartbeats.is_empty()).await;
    let first = &seen.heartbeats[0];
    assert!(first.time_ns >= before, "{first:?} before {before}");
    assert_eq!(first.interval_ms, 100);
    assert_eq!(first.live_entries, 7);
    assert_eq!(first.last_record_ns, 0, "no record yet");
    send(&sink, 500..503, 3);
    m.tracked_entries.set(3);
    let seen = col
        .wait("a heartbeat after the records", |s| {
            s.heartbeats.iter().any(|h| h.last_record_ns == 502)
        })
        .await;
    let h = seen
        .heartbeats
        .iter()
        .find(|h| h.last_record_ns == 502)
        .unwrap();
    assert_eq!(h.live_entries, 3);
    let seen = col
        .wait("five heartbeats", |s| s.heartbeats.len() >= 5)
        .await;
    let times: Vec<u64> = seen.heartbeats.iter().map(|h| h.time_ns).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    assert!(m.uplink.heartbeats_sent.get() >= 5);
}

#[tokio::test]
async fn lookup_requests_are_answered() {
    let fx = Fixture::new("lookup");
    let mut col = fx.collector(ACKING).await;
    let m = Metrics::new(&[]);
    let entry = record(77);
    let want = entry;
    let lookup: Arc<LookupFn> = Arc::new(move |q: &LookupQuery| {
        let hit = match q.dir {
            TupleDir::Orig => q.tuple == want.orig,
            TupleDir::Reply => q.tuple == want.reply,
        };
        Ok((hit && q.protocol == Protocol::Tcp).then_some(want))
    });
    let (_up, _sink) = start(fx.config(col.addr), &m, lookup);
    col.wait("hello", |s| !s.hellos.is_empty()).await;
    let req = |id: u64, protocol: u32, t: &Tuple, reply: bool| {
        pb::collector_message::Msg::Lookup(pb::LookupRequest {
            request_id: id,
            protocol,
            tuple: Some(t.into()),
            reply_tuple: reply,
            node: String::new(),
            zone: None,
        })
    };
    col.send(req(1, 6, &entry.reply, true)).await;
    col.send(req(2, 6, &entry.reply, false)).await;
    col.send(req(3, 1, &entry.orig, false)).await;
    let seen = col.wait("three replies", |s| s.replies.len() == 3).await;
    let by_id: BTreeMap<u64, &pb::LookupReply> =
        seen.replies.iter().map(|r| (r.request_id, r)).collect();
    let hit = by_id[&1];
    assert!(hit.found && hit.error.is_empty());
    assert_eq!(hit.node, "node-a");
    assert_eq!(
        ConnRecord::try_from(hit.entry.as_ref().unwrap()).unwrap(),
        entry
    );
    assert!(!by_id[&2].found && by_id[&2].error.is_empty() && by_id[&2].entry.is_none());
    assert!(
        !by_id[&3].found && by_id[&3].error.contains("protocol"),
        "{:?}",
        by_id[&3]
    );
    assert_eq!(m.uplink.lookups_answered.get(), 3);
}

#[tokio::test]
async fn certificates_from_another_ca_are_refused_both_ways_and_renewed_ones_are_read() {
    let fx = Fixture::new("wrongca");
    let other = Ca::new("another CA");
    // The collector shows a certificate the agent's CA did not sign.
    let impostor = other.sign(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let col = Collector::start(
        "127.0.0.1:0".parse().unwrap(),
        &impostor,
        &fx.ca.pem,
        ACKING,
    )
    .await;
    let m = Metrics::new(&[]);
    let (up, sink) = start(fx.config(col.addr), &m, no_lookup());
    send(&sink, 0..10, 10);
    poll("two failed attempts", || m.uplink.reconnects.get() >= 2).await;
    assert_eq!(m.uplink.connected.get(), 0);
    assert_eq!(col.seen.borrow().streams, 0);
    let first_boot = up.boot_id().to_string();
    drop(up);
    drop(col);
    // The collector accepts only client certificates of another CA.
    let col = Collector::start(
        "127.0.0.1:0".parse().unwrap(),
        &fx.server,
        &other.pem,
        ACKING,
    )
    .await;
    let m = Metrics::new(&[]);
    let (_up, _sink) = start(fx.config(col.addr), &m, no_lookup());
    poll("two failed attempts", || m.uplink.reconnects.get() >= 2).await;
    assert_eq!(m.uplink.connected.get(), 0);
    assert!(col.seen.borrow().hellos.is_empty());
    // The earlier run's records are still in the spool, nothing was lost.
    assert_eq!(m.uplink.unacked_batches.get(), 1);
    // The agent's certificate is renewed (as cert-manager does), here by
    // the CA the collector trusts: the agent reads its files again at the
    // next attempt, without a restart, and delivers what it spooled.
    let renewed = other.sign(&["node-a"], ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(fx.dir.join("agent.pem"), &renewed.cert).unwrap();
    std::fs::write(fx.dir.join("agent-key.pem"), &renewed.key).unwrap();
    let mut col = col;
    let seen = col
        .wait("the spooled records", |s| s.records().len() == 10)
        .await;
    assert_complete(&seen, &first_boot, 0..10);
    poll("acked", || m.uplink.unacked_batches.get() == 0).await;
    assert_eq!(m.uplink.connected.get(), 1);
}

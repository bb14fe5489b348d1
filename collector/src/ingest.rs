//! The `Ingest` gRPC service (one long-lived stream per agent) and
//! [`serve`], which runs it and the `Query` service on the mTLS port.
//!
//! Per stream:
//! 1. The node name comes from the verified client certificate (first DNS
//!    SAN, else CN). The first message must be Hello, within
//!    [`ServeOptions::hello_timeout`], naming that node; otherwise the stream
//!    ends with `PermissionDenied` (another node's name) or
//!    `InvalidArgument` / `Unauthenticated`, counted in
//!    `ctw_collector_streams_refused_total{reason}`. Nothing of a refused
//!    stream is stored.
//! 2. The collector answers HelloAck and registers the stream in the
//!    [`Registry`] (which sends lookup requests down it).
//! 3. Batches are converted (a record that fails conversion is counted,
//!    logged rate-limited and skipped; the rest is stored), appended in
//!    `spawn_blocking`, and acked (`Ack{boot_id, seq}`) only when `append`
//!    returned `Ok` — `Stored` or `Duplicate`, both durable. A store error
//!    is logged, not acked, and ends the stream (UNAVAILABLE): the agent
//!    reconnects and resends at once. Batches are appended in
//!    the order received, by a task of their own, so lookup replies are not
//!    held up behind the store; the batches already read (at most
//!    `APPEND_QUEUE` + 1) go to the store in one `append_many`, so a store
//!    that coalesces inserts (ClickHouse) takes them in one flush.
//! 4. LossReport → a [`Gap`] in the store (reason as reported) and the
//!    agent's loss counters. LookupReply → completes the pending lookup.
//!
//! Disconnections: when a stream ends, the agent stays in the registry as
//! disconnected, and [`Registry::open_gaps`] lists the open window (its
//! records may still be in its spool). When the agent reconnects with a new
//! boot id (it restarted, so capture was down), a `Gap{reason:
//! "agent_restarted"}` from its last contact to the reconnection is recorded
//! in the store; a reconnect of the same process replays its spool instead.
//!
//! Flow control for one agent streaming 100k records/s (≈10 MB/s) over a
//! 50 ms round trip: the bandwidth-delay product is ≈0.5 MB, so 8 MiB
//! stream and 16 MiB connection windows never stall the sender; frames up
//! to 1 MiB cut per-frame overhead; messages up to 32 MiB are accepted.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ctw_common::ConnRecord;
use ctw_proto::pb;
use ctw_proto::pb::agent_message::Msg as AgentMsg;
use ctw_proto::pb::collector_message::Msg as CollectorMsg;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{GrpcConfig, LookupConfig, TlsFiles};
use crate::grpc_query::QueryService;
use crate::metrics::Metrics;
use crate::pods::PodHistory;
use crate::registry::{AgentSender, BatchInfo, ConnToken, HeartbeatInfo, HelloInfo, Registry};
use crate::store::{AppendOutcome, Gap, RecordStore, StoredBatch};
use crate::tls::{self, RateLimiter, LOG_EVERY};

/// HTTP/2 stream window (see the module docs).
pub const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection window.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame the server accepts.
pub const MAX_FRAME: u32 = 1 << 20;
/// Largest gRPC message (one record batch) the server accepts.
pub const MAX_MESSAGE: usize = 32 << 20;
/// Messages queued towards one agent (acks, lookup requests).
const OUT_QUEUE: usize = 1024;
/// Batches read ahead of the store per stream.
const APPEND_QUEUE: usize = 4;

/// Knobs of [`serve_on`]; `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub lookup: LookupConfig,
    /// Largest `limit` of a search (`http.max_limit`).
    pub max_limit: usize,
    /// How often the TLS files are checked for changes.
    pub reload_interval: Duration,
    pub handshake_timeout: Duration,
    /// How long a new stream may take to send Hello.
    pub hello_timeout: Duration,
    /// How long in-flight streams get to end after shutdown.
    pub shutdown_grace: Duration,
    /// The pod history (kubernetes on): Query answers name pods.
    pub pods: Option<Arc<PodHistory>>,
    /// The other collectors (`replicas` on): Query lookups reach their
    /// agents.
    pub peers: Option<Arc<crate::peers::Peers>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            lookup: LookupConfig::default(),
            max_limit: 10_000,
            reload_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            pods: None,
            peers: None,
        }
    }
}

/// Bind `cfg.listen_addr` and serve Ingest and Query with mTLS until
/// `shutdown` completes, with `opts` as given (the binary passes the
/// config's lookups, `http.max_limit`, pod history and peers over
/// [`ServeOptions::default`]).
pub async fn serve(
    cfg: &GrpcConfig,
    opts: ServeOptions,
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = cfg
        .listen_addr
        .parse()
        .with_context(|| format!("grpc.listen_addr: cannot parse {:?}", cfg.listen_addr))?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("grpc.listen_addr: cannot listen on {addr}"))?;
    tracing::info!(%addr, "gRPC (mTLS) listening");
    serve_on(listener, &cfg.tls, opts, store, registry, metrics, shutdown).await
}

/// [`serve`] on a bound listener (tests bind `127.0.0.1:0`).
pub async fn serve_on(
    listener: TcpListener,
    tls_files: &TlsFiles,
    opts: ServeOptions,
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = tls::load_server_config(tls_files).context("grpc.tls")?;
    let holder = Arc::new(tls::ReloadableConfig::new(config));
    let (stop_tx, stop_rx) = watch::channel(false);
    let reloader = tls::spawn_reloader(
        tls_files.clone(),
        holder.clone(),
        opts.reload_interval,
        metrics.clone(),
        stop_rx.clone(),
    );
    let incoming = tls::incoming(
        listener,
        holder,
        metrics.clone(),
        opts.handshake_timeout,
        stop_rx.clone(),
    );
    let ingest = IngestService::new(
        store.clone(),
        registry.clone(),
        metrics,
        stop_rx.clone(),
        opts.hello_timeout,
    )
    .with_pods(opts.pods.clone());
    let query = QueryService::new(store, registry, opts.lookup.clone(), opts.max_limit)
        .with_pods(opts.pods.clone())
        .with_peers(opts.peers.clone());
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(256))
        .serve_with_incoming_shutdown(
            Routes {
                ingest: pb::ingest_server::IngestServer::new(ingest)
                    .max_decoding_message_size(MAX_MESSAGE),
                query: pb::query_server::QueryServer::new(query),
            },
            incoming,
            signal,
        );
    // Graceful shutdown waits for open streams; agents' streams end when
    // told, but a peer that never closes its side must not hold us forever.
    let mut stopped = stop_rx.clone();
    let grace = opts.shutdown_grace;
    let result = tokio::select! {
        r = server => r.context("gRPC server"),
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("gRPC streams still open after the shutdown grace period; closing");
            Ok(())
        }
    };
    reloader.abort();
    result
}

/// Both services on one port: `/ctw.v1.Query/*` to Query, the rest to
/// Ingest (which answers `Unimplemented` for paths it does not know). The
/// workspace builds tonic without its `router` feature; this is all of it
/// that two services need.
#[derive(Clone)]
struct Routes {
    ingest: pb::ingest_server::IngestServer<IngestService>,
    query: pb::query_server::QueryServer<QueryService>,
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Routes {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Both generated services are always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path().starts_with("/ctw.v1.Query/") {
            self.query.call(req)
        } else {
            self.ingest.call(req)
        }
    }
}

/// The `Ingest` service. See the module docs.
#[derive(Clone)]
pub struct IngestService {
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    hello_timeout: Duration,
    /// The pod history (kubernetes on): stored NEW records are counted per
    /// workload (`ctw_collector_workload_new_connections_total`).
    pods: Option<Arc<PodHistory>>,
}

impl std::fmt::Debug for IngestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestService")
            .field("hello_timeout", &self.hello_timeout)
            .finish_non_exhaustive()
    }
}

impl IngestService {
    /// Streams end when `shutdown` turns true.
    pub fn new(
        store: Arc<dyn RecordStore>,
        registry: Arc<Registry>,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
        hello_timeout: Duration,
    ) -> IngestService {
        IngestService {
            store,
            registry,
            metrics,
            shutdown,
            hello_timeout,
            pods: None,
        }
    }

    /// Count stored connections per workload from `pods` (kubernetes on).
    pub fn with_pods(self, pods: Option<Arc<PodHistory>>) -> IngestService {
        IngestService { pods, ..self }
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics
            .streams_refused
            .with_label_values(&[reason])
            .inc();
        tracing::warn!(reason, message = status.message(), "ingest stream refused");
        status
    }
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    type StreamStream = ReceiverStream<Result<pb::CollectorMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr();
        let Some(certs) = request.peer_certs() else {
            return Err(self.refuse(
                "no_certificate",
                Status::unauthenticated("a client certificate is required"),
            ));
        };
        let Some(node) = certs.first().and_then(|c| crate::certs::node_name(c)) else {
            return Err(self.refuse(
                "bad_certificate",
                Status::unauthenticated("the client certificate has no DNS name and no CN"),
            ));
        };
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(self.hello_timeout, inbound.message()).await {
            Err(_) => {
                return Err(self.refuse("bad_hello", Status::deadline_exceeded("no Hello in time")))
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(Some(pb::AgentMessage {
                msg: Some(AgentMsg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return Err(self.refuse(
                    "bad_hello",
                    Status::invalid_argument("the first message must be Hello"),
                ))
            }
        };
        if hello.node != node {
            return Err(self.refuse(
                "node_mismatch",
                Status::permission_denied(format!(
                    "the client certificate is for node {node:?}, Hello claims {:?}",
                    hello.node
                )),
            ));
        }
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let ack = pb::CollectorMessage {
            msg: Some(CollectorMsg::HelloAck(pb::HelloAck {
                collector_version: env!("CARGO_PKG_VERSION").to_string(),
                heartbeats: true,
            })),
        };
        // A fresh channel has room.
        let _ = tx.try_send(Ok(ack));
        let (token, gap) = self.registry.connect(
            &node,
            HelloInfo {
                addresses: hello.addresses,
                boot_id: hello.boot_id.clone(),
                version: hello.version.clone(),
                peer: peer.map(|p| p.to_string()),
            },
            tx.clone(),
        );
        tracing::info!(
            node,
            peer = ?peer,
            boot_id = hello.boot_id,
            version = hello.version,
            "agent connected"
        );
        let ctx = StreamCtx {
            store: self.store.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            token,
            pods: self.pods.clone(),
        };
        if let Some(gap) = gap {
            ctx.record_gap(gap).await;
        }
        tokio::spawn(run_stream(ctx, inbound, tx, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[derive(Clone)]
struct StreamCtx {
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    metrics: Metrics,
    token: ConnToken,
    pods: Option<Arc<PodHistory>>,
}

enum Work {
    Batch(pb::RecordBatch),
    Loss(pb::LossReport),
}

async fn run_stream(
    ctx: StreamCtx,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: AgentSender,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = ctx.token.node.clone();
    let (work_tx, work_rx) = mpsc::channel(APPEND_QUEUE);
    let appender = tokio::spawn(append_loop(ctx.clone(), work_rx, tx.clone()));
    let log = RateLimiter::new(LOG_EVERY);
    let mut stopping = *shutdown.borrow();
    while !stopping {
        let msg = tokio::select! {
            r = shutdown.changed() => {
                stopping = r.is_err() || *shutdown.borrow();
                continue;
            }
            m = inbound.message() => m,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::info!(node, "agent closed its stream");
                break;
            }
            Err(status) => {
                tracing::info!(node, code = ?status.code(), message = status.message(), "agent stream ended");
                break;
            }
        };
        match msg.msg {
            Some(AgentMsg::Batch(b)) => {
                if work_tx.send(Work::Batch(b)).await.is_err() {
                    break;
                }
            }
            Some(AgentMsg::Loss(l)) => {
                ctx.registry.touch(&ctx.token);
                if work_tx.send(Work::Loss(l)).await.is_err() {
                    break;
                }
            }
            Some(AgentMsg::Heartbeat(h)) => {
                ctx.registry.heartbeat(&ctx.token, &HeartbeatInfo::from(&h));
            }
            Some(AgentMsg::LookupReply(r)) => {
                let id = r.request_id;
                if !ctx.registry.complete_lookup(&ctx.token, r) {
                    tracing::debug!(node, request_id = id, "late or unknown lookup reply");
                }
            }
            Some(AgentMsg::Hello(_)) | None => {
                if let Some(suppressed) = log.allow() {
                    tracing::warn!(
                        node,
                        suppressed,
                        "unexpected message (second Hello or empty); ignored"
                    );
                }
            }
        }
    }
    // Batches already read are still appended (and acked if the stream is
    // still up); the agent resends whatever it did not see acked.
    drop(work_tx);
    let _ = appender.await;
    ctx.registry.disconnect(&ctx.token);
    tracing::info!(node, "agent disconnected");
}

/// A batch could not be stored: end the stream with UNAVAILABLE so the
/// agent reconnects (here or to another collector) and resends every
/// unacked batch at once, instead of after its ack timeout (60 s,
/// `uplink::ACK_TIMEOUT`). Batches after it are not appended on this
/// stream (the agent resends them too; replays are stored once).
async fn end_stream_unstored(tx: &AgentSender, b: &pb::RecordBatch, error: &str) {
    let status = Status::unavailable(format!(
        "batch {} of boot {} not stored ({error}); reconnect and resend",
        b.seq, b.boot_id
    ));
    let _ = tx.send(Err(status)).await;
}

/// One batch converted and ready for the store, with what is counted once
/// it is stored.
struct Prepared {
    b: pb::RecordBatch,
    info: BatchInfo,
    workloads: Vec<(crate::pods::WorkloadKey, u64)>,
}

async fn append_loop(ctx: StreamCtx, mut work: mpsc::Receiver<Work>, tx: AgentSender) {
    let node = ctx.token.node.as_str();
    let convert_log = RateLimiter::new(LOG_EVERY);
    let store_log = RateLimiter::new(LOG_EVERY);
    // A loss report read while collecting batches, handled after them.
    let mut carried: Option<Work> = None;
    loop {
        let w = match carried.take() {
            Some(w) => w,
            None => match work.recv().await {
                Some(w) => w,
                None => break,
            },
        };
        match w {
            Work::Batch(first) => {
                // Every batch already queued goes to the store at once, in
                // order (a store that coalesces inserts stores them in one
                // flush instead of one flush each).
                let (mut prepared, mut batches) = (Vec::new(), Vec::new());
                let (p, batch) = prepare(&ctx, first, &convert_log);
                prepared.push(p);
                batches.push(batch);
                while let Ok(w) = work.try_recv() {
                    match w {
                        Work::Batch(b) => {
                            let (p, batch) = prepare(&ctx, b, &convert_log);
                            prepared.push(p);
                            batches.push(batch);
                        }
                        other => {
                            carried = Some(other);
                            break;
                        }
                    }
                }
                let store = ctx.store.clone();
                let started = Instant::now();
                let result = tokio::task::spawn_blocking(move || store.append_many(batches)).await;
                ctx.metrics
                    .store_append_seconds
                    .observe(started.elapsed().as_secs_f64());
                let (outcomes, error) = match result {
                    Ok((o, e)) => (o, e.map(|e| e.to_string())),
                    Err(e) => (Vec::new(), Some(format!("store append task failed: {e}"))),
                };
                let mut prepared = prepared.into_iter();
                let n = outcomes.len();
                for (p, outcome) in prepared.by_ref().take(n).zip(outcomes) {
                    stored(&ctx, &tx, p, outcome).await;
                }
                if let Some(e) = error {
                    ctx.metrics.batches_failed.with_label_values(&[node]).inc();
                    let b = match prepared.next() {
                        Some(p) => p.b,
                        None => break,
                    };
                    if let Some(suppressed) = store_log.allow() {
                        tracing::error!(node, boot_id = b.boot_id, seq = b.seq, error = %e, suppressed,
                            "cannot store a batch; not acked, ending the stream so the agent resends");
                    }
                    end_stream_unstored(&tx, &b, &e).await;
                    break;
                }
            }
            Work::Loss(l) => {
                ctx.metrics.loss_reports.with_label_values(&[node]).inc();
                ctx.metrics
                    .events_lost
                    .with_label_values(&[node])
                    .inc_by(l.count);
                ctx.registry.loss_reported(&ctx.token, l.count);
                tracing::warn!(
                    node,
                    boot_id = l.boot_id,
                    reason = l.reason,
                    count = l.count,
                    resynced = l.resynced,
                    "agent reported loss"
                );
                ctx.record_gap(Gap {
                    node: node.to_string(),
                    from_ns: l.from_ns,
                    to_ns: l.to_ns.max(l.from_ns),
                    reason: loss_reason(&l.reason),
                    count: l.count,
                })
                .await;
            }
        }
    }
}

/// Convert a batch (records that fail conversion are counted, logged
/// rate-limited and skipped) and note what is counted once it is stored.
fn prepare(
    ctx: &StreamCtx,
    b: pb::RecordBatch,
    convert_log: &RateLimiter,
) -> (Prepared, StoredBatch) {
    let node = ctx.token.node.as_str();
    let (records, errors, first_error) = convert(&b.records, &b.packed);
    if errors > 0 {
        ctx.metrics
            .record_conversion_errors
            .with_label_values(&[node])
            .inc_by(errors);
        if let Some(suppressed) = convert_log.allow() {
            tracing::warn!(
                node,
                boot_id = b.boot_id,
                seq = b.seq,
                errors,
                first_error,
                suppressed,
                "records that cannot be converted were skipped"
            );
        }
    }
    let info = BatchInfo {
        boot_id: b.boot_id.clone(),
        seq: b.seq,
        records: records.len() as u64,
        duplicate: false,
        conversion_errors: errors,
        newest_event_ns: records.iter().map(|r| r.event_ns).max(),
        // Usually one zone: a linear check beats sorting.
        zones: records.iter().fold(Vec::new(), |mut z, r| {
            if !z.contains(&r.zone) {
                z.push(r.zone);
            }
            z
        }),
    };
    // Per workload, as of each connection's start; added once the batch
    // is stored (not for a replay).
    let workloads = ctx
        .pods
        .as_ref()
        .map(|p| p.workload_counts(&records))
        .unwrap_or_default();
    let batch = StoredBatch {
        node: node.to_string(),
        boot_id: b.boot_id.clone(),
        seq: b.seq,
        records,
    };
    (Prepared { b, info, workloads }, batch)
}

/// A batch is stored (or was before): count it and ack it.
async fn stored(ctx: &StreamCtx, tx: &AgentSender, p: Prepared, outcome: AppendOutcome) {
    let node = ctx.token.node.as_str();
    let duplicate = outcome == AppendOutcome::Duplicate;
    if duplicate {
        ctx.metrics
            .batches_duplicate
            .with_label_values(&[node])
            .inc();
    } else {
        ctx.metrics.batches_stored.with_label_values(&[node]).inc();
        ctx.metrics
            .records_stored
            .with_label_values(&[node])
            .inc_by(p.info.records);
        ctx.metrics.workloads.add(&p.workloads);
    }
    ctx.registry.batch_stored(
        &ctx.token,
        &BatchInfo {
            duplicate,
            ..p.info
        },
    );
    let ack = pb::CollectorMessage {
        msg: Some(CollectorMsg::Ack(pb::Ack {
            boot_id: p.b.boot_id,
            seq: p.b.seq,
        })),
    };
    // The response stream may be gone; what was read is still stored.
    if tx.send(Ok(ack)).await.is_ok() {
        ctx.metrics.acks_sent.inc();
    }
}

impl StreamCtx {
    async fn record_gap(&self, gap: Gap) {
        let store = self.store.clone();
        let g = gap.clone();
        match tokio::task::spawn_blocking(move || store.record_gap(g)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.metrics.gap_record_errors.inc();
                tracing::error!(node = gap.node, reason = gap.reason, error = %e, "cannot record a gap");
            }
            Err(e) => {
                self.metrics.gap_record_errors.inc();
                tracing::error!(node = gap.node, error = %e, "gap task failed");
            }
        }
    }
}

/// The reason of a loss report as stored: the agent's word, bounded to 64
/// printable ASCII characters; empty becomes `unknown`.
fn loss_reason(r: &str) -> String {
    let s: String = r
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

/// Convert wire records; returns the good ones, the number of bad ones and
/// the first error.
/// The records of a batch (`records`, then `packed`), the number that
/// could not be converted and the first error.
fn convert(records: &[pb::Record], packed: &[u8]) -> (Vec<ConnRecord>, u64, Option<String>) {
    let mut unpacked = if packed.is_empty() {
        ctw_proto::packed::Unpacked::default()
    } else {
        ctw_proto::packed::decode(packed)
    };
    if records.is_empty() {
        // What agents send.
        return (unpacked.records, unpacked.errors, unpacked.first_error);
    }
    let mut out = Vec::with_capacity(records.len() + unpacked.records.len());
    let mut errors = 0;
    let mut first = None;
    for r in records {
        match ConnRecord::try_from(r) {
            Ok(c) => out.push(c),
            Err(e) => {
                errors += 1;
                if first.is_none() {
                    first = Some(e.to_string());
                }
            }
        }
    }
    out.append(&mut unpacked.records);
    (
        out,
        errors + unpacked.errors,
        first.or(unpacked.first_error),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn loss_reasons_are_bounded() {
        assert_eq!(loss_reason("kernel_drop"), "kernel_drop");
        assert_eq!(loss_reason(""), "unknown");
        assert_eq!(loss_reason("a\nb\u{1F600}"), "ab");
        assert_eq!(loss_reason(&"x".repeat(500)).len(), 64);
    }

    #[test]
    fn bad_records_are_counted_not_fatal() {
        let bad = pb::Record::default(); // no tuples
        let (good, errors, first) = convert(&[bad.clone(), bad], &[]);
        assert!(good.is_empty());
        assert_eq!(errors, 2);
        assert!(first.is_some());
    }

    #[test]
    fn packed_records_follow_message_records() {
        // A TCP record from pod port `port`, built from its wire form.
        let r = |port: u16| {
            let t = |src_port: u16| pb::Tuple {
                src: vec![198, 18, 0, 1],
                dst: vec![198, 18, 0, 2],
                src_port: src_port.into(),
                dst_port: 80,
            };
            ConnRecord::try_from(&pb::Record {
                event_ns: 1,
                protocol: 6,
                orig: Some(t(port)),
                reply: Some(t(80)),
                ..Default::default()
            })
            .unwrap()
        };
        let mut packed = Vec::new();
        ctw_proto::packed::encode(&[r(2), r(3)], &mut packed);
        let (got, errors, _) = convert(&[pb::Record::from(&r(1))], &packed);
        assert_eq!(errors, 0);
        assert_eq!(got, vec![r(1), r(2), r(3)]);
        // A packed batch cut short: its whole records are kept, the rest
        // counted.
        let (got, errors, first) = convert(&[], &packed[..packed.len() - 1]);
        assert_eq!((got, errors), (vec![r(2)], 1));
        assert!(first.unwrap().contains("record 1"));
    }
}

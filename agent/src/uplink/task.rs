//! The uplink task: batching, the connection's life, acks, lookups and loss
//! reports. One thread, one current-thread runtime, one loop (`run`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ctw_common::ratelimit::RateLimiter;
use ctw_common::{ConnRecord, Protocol, Tuple};
use ctw_proto::{packed, pb};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::conn::{self, Backoff, ConnectError, Session, Target};
use super::losses::Losses;
use super::outbox::{Dropped, Outbox};
use super::spool::{BatchMeta, Spool};
use super::{Shared, UplinkConfig, UplinkError, ACK_TIMEOUT};
use crate::http::LookupFn;
use crate::lookup::LookupQuery;
use crate::metrics::{Metrics, UplinkMetrics};
use crate::netlink::request::TupleDir;

/// Lookups running at once; more are answered "busy".
const MAX_LOOKUPS: usize = 16;
/// Capture batches taken from the queue per loop turn.
const RECV_BURST: usize = 64;
/// A connection that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Connection state messages of one kind are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Records gathered for the next batch.
#[derive(Debug, Default)]
struct Batcher {
    /// The records, packed (`RecordBatch.packed`).
    records: packed::Packer,
    from_ns: u64,
    to_ns: u64,
    opened: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Down,
    /// Hello sent; `deadline` for the HelloAck.
    Handshake {
        deadline: Instant,
    },
    Up {
        since: Instant,
    },
}

/// Everything the loop owns except the connection's handles.
#[derive(Debug)]
pub(super) struct Core {
    cfg: UplinkConfig,
    node: String,
    boot_id: Arc<str>,
    next_seq: u64,
    target: Target,
    outbox: Outbox,
    losses: Losses,
    batcher: Batcher,
    metrics: UplinkMetrics,
    state: State,
    /// Number of the next message sent on the current connection.
    send_no: u64,
    replies: VecDeque<pb::LookupReply>,
    /// The collector's HelloAck said it takes heartbeats.
    heartbeats: bool,
    /// A heartbeat waits to be sent.
    heartbeat_due: bool,
    /// The capture's live-entry count (`ctw_tracked_entries`).
    live_entries: prometheus::IntGauge,
    /// Event time of the newest record received from the capture (ns).
    last_record_ns: u64,
    spool_warn: RateLimiter,
    conn_warn: RateLimiter,
    conn_info: RateLimiter,
}

impl Core {
    /// Opens the spool and restores its batches and loss reports.
    pub(super) fn new(
        cfg: UplinkConfig,
        node: &str,
        boot_id: Arc<str>,
        metrics: Metrics,
    ) -> Result<Core, UplinkError> {
        let host = conn::parse_address(&cfg.address).map_err(UplinkError::Config)?;
        let mut removed = Vec::new();
        let (spool, found) = Spool::open(
            &cfg.spool_dir,
            cfg.spool_max_mb.saturating_mul(1 << 20),
            &mut removed,
        )
        .map_err(|e| UplinkError::Spool(e.to_string()))?;
        for r in &removed {
            tracing::warn!(file = %r, "unreadable spool file deleted");
        }
        let (saved, err) = spool.load_losses();
        if let Some(e) = err {
            tracing::warn!(error = %e, "saved loss reports unreadable, ignored");
        }
        if !found.is_empty() || !saved.is_empty() {
            tracing::info!(
                batches = found.len(),
                records = found.iter().map(|b| u64::from(b.meta.records)).sum::<u64>(),
                bytes = spool.bytes(),
                loss_reports = saved.len(),
                "spool from an earlier run found, will be sent"
            );
        }
        let target = Target {
            address: cfg.address.clone(),
            domain: cfg.server_name.clone().unwrap_or(host),
            tls: cfg.tls.clone(),
            timeout: Duration::from_millis(cfg.connect_timeout_ms),
        };
        let outbox = Outbox::new(spool, found, cfg.max_inflight_batches);
        let core = Core {
            node: node.to_string(),
            boot_id,
            next_seq: 1,
            target,
            outbox,
            losses: Losses::from_saved(saved),
            batcher: Batcher::default(),
            metrics: metrics.uplink.clone(),
            state: State::Down,
            send_no: 1,
            replies: VecDeque::new(),
            heartbeats: false,
            heartbeat_due: false,
            live_entries: metrics.tracked_entries.clone(),
            last_record_ns: 0,
            spool_warn: RateLimiter::new(LOG_EVERY),
            conn_warn: RateLimiter::new(LOG_EVERY),
            conn_info: RateLimiter::new(LOG_EVERY),
            cfg,
        };
        core.update_gauges();
        Ok(core)
    }

    fn update_gauges(&self) {
        self.metrics
            .spool_bytes
            .set(self.outbox.spool().bytes() as i64);
        self.metrics.unacked_batches.set(self.outbox.len() as i64);
    }

    fn hello(&self) -> pb::Hello {
        let addresses = if self.cfg.node_addresses.is_empty() {
            match conn::host_addresses() {
                Ok(a) => a.iter().map(|a| a.to_string()).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the node's addresses");
                    Vec::new()
                }
            }
        } else {
            self.cfg.node_addresses.clone()
        };
        pb::Hello {
            node: self.node.clone(),
            addresses,
            boot_id: self.boot_id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    // ---- records and batches ----

    fn add_records(&mut self, records: Vec<ConnRecord>) {
        for r in &records {
            self.last_record_ns = self.last_record_ns.max(r.event_ns);
            let b = &mut self.batcher;
            if b.records.is_empty() {
                b.opened = Some(Instant::now());
                b.from_ns = r.event_ns;
                b.to_ns = r.event_ns;
            } else {
                b.from_ns = b.from_ns.min(r.event_ns);
                b.to_ns = b.to_ns.max(r.event_ns);
            }
            b.records.push(r);
            if b.records.len() >= self.cfg.batch_max_records
                || b.records.bytes() >= self.cfg.batch_max_bytes
            {
                self.seal();
            }
        }
    }

    fn batch_deadline(&self) -> Option<Instant> {
        self.batcher
            .opened
            .map(|t| t + Duration::from_millis(self.cfg.batch_max_delay_ms))
    }

    /// Turns the gathered records into a batch with the next seq.
    fn seal(&mut self) {
        let b = std::mem::take(&mut self.batcher);
        if b.records.is_empty() {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let meta = BatchMeta {
            boot_id: self.boot_id.clone(),
            seq,
            records: b.records.len() as u32,
            from_ns: b.from_ns,
            to_ns: b.to_ns,
        };
        let msg = pb::RecordBatch {
            boot_id: self.boot_id.to_string(),
            seq,
            records: Vec::new(),
            packed: b.records.finish(),
        };
        let mut dropped = Vec::new();
        let up = self.is_up();
        match self.outbox.push(meta, msg, up, &mut dropped) {
            Ok(n) => self.metrics.records_spooled.inc_by(u64::from(n)),
            Err(e) => self.spool_error(&e),
        }
        self.report_dropped(dropped);
    }

    fn spool_error(&mut self, e: &dyn std::error::Error) {
        if let Some(s) = self.spool_warn.allow() {
            tracing::warn!(error = %e, suppressed = s, "cannot write the spool");
        }
    }

    fn report_dropped(&mut self, dropped: Vec<Dropped>) {
        for d in dropped {
            let reason = d.reason.as_str();
            self.metrics
                .records_dropped
                .with_label_values(&[reason])
                .inc_by(u64::from(d.meta.records));
            self.losses.add(pb::LossReport {
                boot_id: d.meta.boot_id.to_string(),
                reason: reason.to_string(),
                from_ns: d.meta.from_ns,
                to_ns: d.meta.to_ns,
                count: u64::from(d.meta.records),
                resynced: false,
            });
        }
    }

    /// Loss news from the sink: queue overflows and the kernel's drops.
    fn collect_shared(&mut self, shared: &Shared) {
        if let Some(d) = shared.take_queue_drops() {
            if let Some(s) = self.spool_warn.allow() {
                tracing::warn!(
                    records = d.count,
                    suppressed = s,
                    "uplink queue full, records dropped and reported as lost"
                );
            }
            self.losses.add(pb::LossReport {
                boot_id: self.boot_id.to_string(),
                reason: "uplink_queue".into(),
                from_ns: d.from_ns,
                to_ns: d.to_ns,
                count: d.count,
                resynced: false,
            });
        }
        for l in shared.take_capture_losses() {
            self.losses.add(pb::LossReport {
                boot_id: self.boot_id.to_string(),
                reason: "kernel_drop".into(),
                from_ns: l.from_ns,
                to_ns: l.to_ns,
                count: l.count,
                resynced: l.resynced,
            });
        }
    }

    fn persist_losses(&mut self) {
        if let Some(reports) = self.losses.take_dirty() {
            if let Err(e) = self.outbox.spool().store_losses(&reports) {
                self.spool_error(&e);
            }
        }
    }

    // ---- the connection ----

    fn on_stream_open(&mut self) {
        self.state = State::Handshake {
            deadline: Instant::now() + self.target.timeout,
        };
        self.send_no = 1;
    }

    fn on_hello_ack(&mut self, ack: &pb::HelloAck) {
        if !matches!(self.state, State::Handshake { .. }) {
            return;
        }
        self.state = State::Up {
            since: Instant::now(),
        };
        self.heartbeats = ack.heartbeats;
        // The first heartbeat right away: the collector shows it at once.
        self.heartbeat_due = ack.heartbeats;
        self.metrics.connected.set(1);
        if let Some(s) = self.conn_info.allow() {
            tracing::info!(
                address = %self.target.address,
                collector_version = %ack.collector_version,
                unacked_batches = self.outbox.len(),
                suppressed = s,
                "connected to the collector"
            );
        }
    }

    fn on_connect_failed(&mut self, e: &ConnectError) {
        if let Some(s) = self.conn_warn.allow() {
            tracing::warn!(address = %self.target.address, error = %e, suppressed = s,
                "cannot connect to the collector");
        }
    }

    /// The connection ended: everything unacknowledged goes to the spool
    /// and will be sent again. Returns whether it had been healthy.
    fn on_disconnect(&mut self, why: &str) -> bool {
        let healthy = match self.state {
            State::Up { since } => {
                if let Some(s) = self.conn_warn.allow() {
                    tracing::warn!(address = %self.target.address, reason = %why,
                        unacked_batches = self.outbox.len(), suppressed = s,
                        "lost the connection to the collector");
                }
                since.elapsed() >= HEALTHY_AFTER
            }
            State::Handshake { .. } => {
                if let Some(s) = self.conn_warn.allow() {
                    tracing::warn!(address = %self.target.address, reason = %why, suppressed = s,
                        "collector did not accept the stream");
                }
                false
            }
            State::Down => false,
        };
        self.state = State::Down;
        self.heartbeats = false;
        self.heartbeat_due = false;
        self.metrics.connected.set(0);
        self.spool_memory();
        self.losses.reset();
        self.replies.clear();
        healthy
    }

    fn spool_memory(&mut self) {
        let mut dropped = Vec::new();
        let (spooled, err) = self.outbox.reset(&mut dropped);
        self.metrics.records_spooled.inc_by(spooled);
        if let Some(e) = err {
            self.spool_error(&e);
        }
        self.report_dropped(dropped);
    }

    /// Why the connection should be dropped now, if it should.
    fn check_timeouts(&self) -> Option<String> {
        match self.state {
            State::Handshake { deadline } if Instant::now() >= deadline => {
                Some(format!("no HelloAck within {:?}", self.target.timeout))
            }
            State::Up { .. } => match self.outbox.oldest_in_flight() {
                Some(t) if t.elapsed() >= ACK_TIMEOUT => {
                    Some(format!("no ack for {ACK_TIMEOUT:?}"))
                }
                _ => None,
            },
            _ => None,
        }
    }

    fn has_sendable(&self) -> bool {
        self.is_up()
            && (self.heartbeat_due
                || !self.replies.is_empty()
                || self.losses.has_unsent()
                || self.outbox.can_send())
    }

    /// The heartbeat interval ticked: one is due when the collector takes them.
    fn heartbeat_tick(&mut self) {
        if self.is_up() && self.heartbeats {
            self.heartbeat_due = true;
        }
    }

    fn heartbeat(&self) -> pb::Heartbeat {
        pb::Heartbeat {
            time_ns: ctw_common::now_ns(),
            interval_ms: self.cfg.heartbeat_interval_ms,
            live_entries: self.live_entries.get().max(0) as u64,
            last_record_ns: self.last_record_ns,
        }
    }

    /// The next message for the stream: a due heartbeat (tiny; it proves
    /// the stream alive), lookup replies (someone waits for them), then
    /// loss reports, then batches oldest first.
    fn next_message(&mut self) -> Option<pb::AgentMessage> {
        use pb::agent_message::Msg;
        if !self.is_up() {
            return None;
        }
        let no = self.send_no;
        let msg = if self.heartbeat_due {
            self.heartbeat_due = false;
            self.metrics.heartbeats_sent.inc();
            Msg::Heartbeat(self.heartbeat())
        } else if let Some(r) = self.replies.pop_front() {
            Msg::LookupReply(r)
        } else if let Some(l) = self.losses.next_unsent(no) {
            self.metrics.loss_reports_sent.inc();
            Msg::Loss(l)
        } else {
            let mut dropped = Vec::new();
            let out = self.outbox.next_batch(no, &mut dropped);
            self.report_dropped(dropped);
            let out = out?;
            self.metrics.batches_sent.inc();
            self.metrics.records_sent.inc_by(u64::from(out.records));
            Msg::Batch(out.msg)
        };
        self.send_no += 1;
        Some(pb::AgentMessage { msg: Some(msg) })
    }

    fn on_ack(&mut self, ack: &pb::Ack) {
        match self.outbox.ack(&ack.boot_id, ack.seq) {
            Some(a) => {
                self.metrics.batches_acked.inc();
                self.metrics.records_acked.inc_by(u64::from(a.meta.records));
                if let Some(n) = a.sent_no {
                    self.losses.confirm_before(n);
                }
            }
            None => {
                tracing::debug!(boot_id = %ack.boot_id, seq = ack.seq, "ack for an unknown batch");
            }
        }
    }

    fn queue_reply(&mut self, reply: pb::LookupReply) {
        self.metrics.lookups_answered.inc();
        if self.is_up() {
            self.replies.push_back(reply);
        }
    }

    /// Stop: batch what is left and put everything unacknowledged on disk.
    fn finish(&mut self) {
        self.seal();
        self.spool_memory();
        self.persist_losses();
        self.state = State::Down;
        self.metrics.connected.set(0);
        self.update_gauges();
        tracing::info!(
            unacked_batches = self.outbox.len(),
            spool_bytes = self.outbox.spool().bytes(),
            "uplink stopped"
        );
    }
}

/// The lookup a collector's request asks for.
fn lookup_query(req: &pb::LookupRequest) -> Result<LookupQuery, String> {
    let protocol = u8::try_from(req.protocol)
        .ok()
        .and_then(Protocol::from_number)
        .ok_or_else(|| format!("unsupported protocol number {}", req.protocol))?;
    let tuple = req.tuple.as_ref().ok_or("missing tuple")?;
    let tuple = Tuple::try_from(tuple).map_err(|e| e.to_string())?;
    // No zone: zone 0, the kernel's default and the seed's behaviour.
    let zone = match req.zone {
        None => 0,
        Some(z) => u16::try_from(z).map_err(|_| format!("zone {z} out of range 0-65535"))?,
    };
    Ok(LookupQuery {
        protocol,
        tuple,
        dir: if req.reply_tuple {
            TupleDir::Reply
        } else {
            TupleDir::Orig
        },
        zone,
    })
}

fn answer(
    node: &str,
    request_id: u64,
    lookup: &LookupFn,
    q: Result<LookupQuery, String>,
) -> pb::LookupReply {
    let mut reply = pb::LookupReply {
        request_id,
        node: node.to_string(),
        ..Default::default()
    };
    match q.and_then(|q| lookup(&q).map_err(|e| e.to_string())) {
        Ok(Some(r)) => {
            reply.found = true;
            reply.entry = Some(pb::Record::from(&r));
        }
        Ok(None) => {}
        Err(e) => reply.error = e,
    }
    reply
}

type Connecting = Pin<Box<dyn Future<Output = Result<Session, ConnectError>>>>;

/// The connection's handles, apart from [`Core`] so the loop can wait on
/// them while the core is updated.
struct Link {
    inbound: Option<tonic::Streaming<pb::CollectorMessage>>,
    outbound: Option<mpsc::Sender<pb::AgentMessage>>,
    connecting: Option<Connecting>,
    next_attempt: Instant,
    backoff: Backoff,
    attempts: u64,
}

impl Link {
    fn close(&mut self, core: &mut Core, why: &str) {
        self.inbound = None;
        self.outbound = None;
        if core.on_disconnect(why) {
            self.backoff.reset();
        }
        self.next_attempt = Instant::now() + self.backoff.next_delay();
    }
}

async fn next_inbound(
    s: &mut Option<tonic::Streaming<pb::CollectorMessage>>,
) -> Result<Option<pb::CollectorMessage>, tonic::Status> {
    match s {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

/// Room for one message on the stream (an owned permit, so the loop may
/// replace the sender while it holds one).
async fn reserve(
    tx: Option<mpsc::Sender<pb::AgentMessage>>,
) -> Option<mpsc::OwnedPermit<pb::AgentMessage>> {
    match tx {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

async fn connected(c: &mut Option<Connecting>) -> Result<Session, ConnectError> {
    match c {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn deadline(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The uplink thread's body.
pub(super) fn run_thread(
    core: Core,
    rx: mpsc::UnboundedReceiver<Vec<ConnRecord>>,
    shared: Arc<Shared>,
    lookup: Arc<LookupFn>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_LOOKUPS)
        .thread_name("uplink-lookup")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the uplink runtime; records are not sent to the collector");
            return;
        }
    };
    rt.block_on(run(core, rx, shared, lookup));
}

async fn run(
    mut core: Core,
    mut rx: mpsc::UnboundedReceiver<Vec<ConnRecord>>,
    shared: Arc<Shared>,
    lookup: Arc<LookupFn>,
) {
    let mut link = Link {
        inbound: None,
        outbound: None,
        connecting: None,
        next_attempt: Instant::now(),
        backoff: Backoff::new(
            Duration::from_millis(core.cfg.reconnect_min_ms),
            Duration::from_millis(core.cfg.reconnect_max_ms),
        ),
        attempts: 0,
    };
    let mut lookups: JoinSet<pb::LookupReply> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(core.cfg.heartbeat_interval_ms));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rx_open = true;
    let take = |core: &mut Core, batch: Vec<ConnRecord>| {
        shared.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        core.add_records(batch);
    };
    loop {
        let batch_due = core.batch_deadline();
        let can_send = link.outbound.is_some() && core.has_sendable();
        let may_connect = link.outbound.is_none() && link.connecting.is_none();
        let attempt_at = may_connect.then_some(link.next_attempt);
        tokio::select! {
            _ = shared.stop.notified() => break,
            m = rx.recv(), if rx_open => match m {
                Some(batch) => {
                    take(&mut core, batch);
                    for _ in 0..RECV_BURST {
                        match rx.try_recv() {
                            Ok(batch) => take(&mut core, batch),
                            Err(_) => break,
                        }
                    }
                }
                None => rx_open = false,
            },
            _ = deadline(batch_due) => core.seal(),
            _ = shared.news.notified() => core.collect_shared(&shared),
            _ = deadline(attempt_at) => {
                if link.attempts > 0 {
                    core.metrics.reconnects.inc();
                }
                link.attempts += 1;
                link.connecting = Some(Box::pin(conn::connect(core.target.clone(), core.hello())));
            }
            r = connected(&mut link.connecting) => {
                link.connecting = None;
                match r {
                    Ok(s) => {
                        link.inbound = Some(s.inbound);
                        link.outbound = Some(s.outbound);
                        core.on_stream_open();
                    }
                    Err(e) => {
                        core.on_connect_failed(&e);
                        link.next_attempt = Instant::now() + link.backoff.next_delay();
                    }
                }
            }
            m = next_inbound(&mut link.inbound) => match m {
                Ok(Some(pb::CollectorMessage { msg: Some(msg) })) => {
                    use pb::collector_message::Msg;
                    match msg {
                        Msg::HelloAck(a) => core.on_hello_ack(&a),
                        Msg::Ack(a) => core.on_ack(&a),
                        Msg::Lookup(req) => {
                            let q = lookup_query(&req);
                            if lookups.len() >= MAX_LOOKUPS {
                                let r = answer(&core.node, req.request_id, &*lookup,
                                    Err("agent busy: too many lookups in progress".into()));
                                core.queue_reply(r);
                            } else {
                                let node = core.node.clone();
                                let f = lookup.clone();
                                lookups.spawn_blocking(move || answer(&node, req.request_id, &*f, q));
                            }
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => link.close(&mut core, "the collector closed the stream"),
                Err(status) => {
                    let why = format!("{:?}: {}", status.code(), status.message());
                    link.close(&mut core, &why);
                }
            },
            Some(permit) = reserve(link.outbound.clone().filter(|_| can_send)), if can_send => {
                if let Some(m) = core.next_message() {
                    permit.send(m);
                }
            }
            Some(done) = lookups.join_next(), if !lookups.is_empty() => match done {
                Ok(reply) => core.queue_reply(reply),
                Err(e) => tracing::warn!(error = %e, "lookup task failed"),
            },
            _ = heartbeat.tick() => core.heartbeat_tick(),
            _ = tick.tick() => {
                core.collect_shared(&shared);
                if let Some(why) = core.check_timeouts() {
                    link.close(&mut core, &why);
                }
            }
        }
        core.persist_losses();
        core.update_gauges();
    }
    // Stop: take what the capture queued, then spool everything.
    while let Ok(batch) = rx.try_recv() {
        take(&mut core, batch);
    }
    core.collect_shared(&shared);
    drop(link);
    core.finish();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn lookup_requests_are_validated() {
        let t = pb::Tuple {
            src: vec![10, 0, 0, 5],
            dst: vec![1, 2, 3, 4],
            src_port: 45678,
            dst_port: 443,
        };
        let q = lookup_query(&pb::LookupRequest {
            request_id: 1,
            protocol: 6,
            tuple: Some(t.clone()),
            reply_tuple: true,
            node: String::new(),
            zone: None,
        })
        .unwrap();
        assert_eq!(q.protocol, Protocol::Tcp);
        assert_eq!(q.dir, TupleDir::Reply);
        assert_eq!(q.tuple.src_port, 45678);
        assert_eq!(q.zone, 0, "no zone: zone 0");
        let zoned = |zone| {
            lookup_query(&pb::LookupRequest {
                request_id: 1,
                protocol: 6,
                tuple: Some(t.clone()),
                reply_tuple: true,
                node: String::new(),
                zone,
            })
        };
        assert_eq!(zoned(Some(7)).unwrap().zone, 7);
        assert_eq!(zoned(Some(65535)).unwrap().zone, 65535);
        assert!(zoned(Some(65536)).unwrap_err().contains("zone 65536"));
        let bad = |protocol, tuple| {
            lookup_query(&pb::LookupRequest {
                request_id: 1,
                protocol,
                tuple,
                reply_tuple: false,
                node: String::new(),
                zone: None,
            })
            .unwrap_err()
        };
        assert!(bad(1, Some(t.clone())).contains("protocol"));
        assert!(bad(6, None).contains("tuple"));
        let mut short = t;
        short.src = vec![1, 2];
        assert!(bad(17, Some(short)).contains("tuple.src"));
    }

    #[test]
    fn answers_carry_the_node_and_the_error() {
        let f: Box<LookupFn> = Box::new(|_| Ok(None));
        let r = answer("node-a", 7, &*f, Err("bad".into()));
        assert_eq!(
            (r.request_id, r.found, r.error.as_str(), r.node.as_str()),
            (7, false, "bad", "node-a")
        );
        let encoded = r.encode_to_vec();
        assert!(!encoded.is_empty());
    }
}

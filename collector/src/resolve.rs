//! Resolve nginx access-log lines to the pods that sent them
//! (`POST /api/v1/resolve`): each line is parsed with a
//! [`ctw_common::nginx::LogFormat`] to `(remote_addr, remote_port, time)`,
//! which is searched in the store as the SNAT address and port of a
//! connection alive at that time.
//!
//! # The line's interval
//!
//! nginx writes a line when the request ends (`$msec`, 1 ms; `$time_local`,
//! 1 s). With `$request_time` in the format the request ran for that long
//! before, so the connection was alive somewhere in
//! `[time - request_time, time + resolution)`; without it the interval is
//! `[time, time + resolution)`.
//!
//! # Candidates and statuses
//!
//! Connections (store hits) with the same pod address, pod port and node
//! are one candidate: a keepalive connection idle past the node's
//! established timeout has several conntrack entries (the later ones picked
//! up mid-stream), and they are the same answer (`merged` says how many
//! entries the answer joins). `candidates` and `alive_candidates` count
//! distinct candidates. With `skew` (the clock difference tolerated between
//! the log's host and the nodes, default 1 s, at most 60 s):
//!
//! - exactly one candidate alive in the interval: `resolved`
//!   (`match: "alive"`); two or more: `ambiguous` (`match: "alive"`).
//! - none alive in the interval, but the only candidate in the whole
//!   window started after the line, by a record time that is the agent's
//!   read time (no kernel start time), and the window has no gap:
//!   `resolved` (`match: "late"`). Read times are never early (later than
//!   the event, e.g. after the agent was stopped), so that connection may
//!   be the line's own; a kernel start time after the line rules it out.
//! - otherwise, some alive within ± `skew` of the interval: `ambiguous`
//!   (`match: "skew"`), candidates `ranked` by distance; a neighbour is
//!   never silently taken for the line's connection.
//! - none within `skew`: `ambiguous` (`match: "late"`) when one started
//!   after the line, else `not_found` with the nearest listed in `ranked`
//!   (they ended before the line, so none carried it).
//! - no candidate at all: `not_observed` when the agent of the node that
//!   owns the address (its Hello listed it) recorded no connection SNATed
//!   to that address in the window (its capture does not see this traffic:
//!   eBPF masquerade, a `notrack` rule, conntrack events off), naming the
//!   node; else `not_found`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ctw_common::api::{
    self, CandidateAnswer, IntervalAnswer, LineAnswer, ResolveAnswer, ResolveSummary,
};
use serde_json::{Map, Value};

use crate::answer;
use crate::pods::PodHistory;
use crate::query::{merge_open_gaps, QueryError};
use crate::registry::{AgentInfo, Registry};
use crate::store::{alive_in, Gap, Hit, RecordStore, SearchQuery, SearchResult, StoreError};

pub use ctw_common::nginx::{
    FormatError, LineError, LogFormat, ParsedLine, TimeVar, COMBINED, DEFAULT_LOG_FORMAT,
    MAX_LINE_BYTES,
};

/// Most lines one request may carry.
pub const MAX_LINES: usize = 20_000;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Largest `window` around each line's time (default
/// [`crate::query::DEFAULT_WINDOW_NS`]).
const MAX_WINDOW_NS: u64 = 24 * 3600 * 1_000_000_000;
/// Default clock-skew tolerance between the log's host and the nodes.
pub const DEFAULT_SKEW_NS: u64 = 1_000_000_000;
/// Largest `skew` accepted.
pub const MAX_SKEW_NS: u64 = 60 * 1_000_000_000;
/// Hits fetched per line (a keepalive connection may have several).
const SEARCH_LIMIT: usize = 50;
/// Candidates listed in `ranked`.
const RANKED_SHOWN: usize = 10;

/// A validated `POST /api/v1/resolve` body ([`parse_request`]).
#[derive(Debug)]
pub struct Request {
    lines: Vec<String>,
    format: LogFormat,
    window_ns: u64,
    skew_ns: u64,
    at: Option<(u64, u64)>,
}

/// Validate a request body: `{"lines": [...], "log_format", "window",
/// "skew", "at"}` (see the module docs).
pub fn parse_request(body: &[u8]) -> Result<Request, QueryError> {
    let bad = |p: &str, m: String| QueryError::invalid(p, m);
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| QueryError::Malformed(format!("body is not JSON: {e}")))?;
    let Value::Object(mut o) = v else {
        return Err(QueryError::Malformed("body must be a JSON object".into()));
    };
    const KNOWN: [&str; 5] = ["lines", "log_format", "window", "skew", "at"];
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(
            k,
            format!("unknown field {k:?} (known: {})", KNOWN.join(", ")),
        ));
    }
    let lines = match o.remove("lines") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("lines", "lines must be an array of strings".into())),
        None => return Err(bad("lines", "missing field \"lines\"".into())),
    };
    if lines.len() > MAX_LINES {
        return Err(QueryError::TooLarge {
            parameter: "lines".into(),
            message: format!(
                "{} lines: at most {MAX_LINES} per request, send them in batches",
                lines.len()
            ),
        });
    }
    let lines = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| match l {
            Value::String(s) => Ok(s),
            _ => Err(bad("lines", format!("lines[{i}] is not a string"))),
        })
        .collect::<Result<Vec<String>, QueryError>>()?;
    let text = |o: &mut Map<String, Value>, k: &str| -> Result<Option<String>, QueryError> {
        match o.remove(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(n)) if k == "at" => Ok(Some(n.to_string())),
            Some(_) => Err(bad(k, format!("{k} must be a string"))),
        }
    };
    let format = match text(&mut o, "log_format")? {
        Some(f) => {
            LogFormat::compile(&f).map_err(|e| bad("log_format", format!("log_format: {e}")))?
        }
        None => {
            LogFormat::compile(DEFAULT_LOG_FORMAT).map_err(|e| bad("log_format", e.to_string()))?
        }
    };
    let window_ns = match text(&mut o, "window")? {
        Some(w) => {
            let ns = api::parse_duration(&w).map_err(|e| bad("window", format!("window: {e}")))?;
            if ns > MAX_WINDOW_NS {
                return Err(bad("window", format!("window: {w:?} is longer than 1d")));
            }
            ns
        }
        None => crate::query::DEFAULT_WINDOW_NS,
    };
    let skew_ns = match text(&mut o, "skew")? {
        Some(w) => {
            let ns = api::parse_duration(&w).map_err(|e| bad("skew", format!("skew: {e}")))?;
            if ns > MAX_SKEW_NS {
                return Err(bad("skew", format!("skew: {w:?} is longer than 60s")));
            }
            ns
        }
        None => DEFAULT_SKEW_NS,
    };
    let at = text(&mut o, "at")?
        .map(|a| {
            api::parse_time(&a)
                .map(|t| (t, api::time_precision_ns(&a)))
                .map_err(|e| bad("at", format!("at: {e}")))
        })
        .transpose()?;
    match (format.time_var(), at) {
        (None, None) => {
            return Err(bad(
                "at",
                "the log format has no $msec, $time_iso8601 or $time_local: give at, the time of the lines".into(),
            ))
        }
        (Some(_), Some(_)) => {
            return Err(bad("at", "the log format has a time variable: at is only for formats without one".into()))
        }
        _ => {}
    }
    Ok(Request {
        lines,
        format,
        window_ns,
        skew_ns,
        at,
    })
}

/// The interval a line covers, inclusive, in ns since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub from_ns: u64,
    pub to_ns: u64,
}

impl Interval {
    /// `[time - request_time, time + precision)` (see the module docs).
    pub fn of_line(time_ns: u64, precision_ns: u64, request_time_ns: Option<u64>) -> Interval {
        Interval {
            from_ns: time_ns.saturating_sub(request_time_ns.unwrap_or(0)),
            to_ns: time_ns.saturating_add(precision_ns.saturating_sub(1)),
        }
    }

    fn widened(self, by: u64) -> Interval {
        Interval {
            from_ns: self.from_ns.saturating_sub(by),
            to_ns: self.to_ns.saturating_add(by),
        }
    }

    /// Was `h` alive somewhere in the interval? ([`alive_in`], the rule
    /// every answer uses.)
    pub fn alive(&self, h: &Hit) -> bool {
        alive_in(h, self.from_ns, self.to_ns)
    }

    /// How far `h` was from the interval (0 when alive in it).
    pub fn distance(&self, h: &Hit) -> u64 {
        if self.alive(h) {
            0
        } else if h.start_ns() > self.to_ns {
            h.start_ns() - self.to_ns
        } else {
            // Ended before the interval; or superseded inside it (its
            // successor holds the tuple there): near, never 0 (0 is alive).
            self.from_ns
                .saturating_sub(h.closed_ns.unwrap_or(h.start_ns()))
                .max(1)
        }
    }
}

/// One candidate answer: the connections of one pod address and port on
/// one node (several conntrack entries of one connection, e.g. keepalive
/// entries picked up mid-stream), nearest to the line first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub hits: Vec<&'a Hit>,
    /// Smallest distance of its connections to the line's interval.
    pub distance_ns: u64,
}

impl Candidate<'_> {
    /// The connection shown for the candidate (the nearest, newest first).
    pub fn best(&self) -> &Hit {
        self.hits[0]
    }
}

/// How the status was reached (`match` in the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Alive in the line's interval.
    Alive,
    /// Alive within ± skew of it, not in it.
    Skew,
    /// Started after the line (records are never early).
    Late,
    /// No candidate could have carried the line.
    None,
}

impl Basis {
    fn as_str(self) -> &'static str {
        match self {
            Basis::Alive => "alive",
            Basis::Skew => "skew",
            Basis::Late => "late",
            Basis::None => "none",
        }
    }
}

/// The verdict for one line's hits (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'a> {
    /// `resolved`, `ambiguous` or `not_found` (`not_observed` is decided
    /// by the caller, which knows the agents).
    pub status: &'static str,
    pub basis: Basis,
    /// Distinct candidates, nearest first.
    pub ranked: Vec<Candidate<'a>>,
    /// Distinct candidates alive in the interval.
    pub alive: usize,
    /// Distinct candidates alive within ± skew (including `alive`).
    pub near: usize,
    /// Whether the verdict names a pod (`resolved` / `ambiguous`).
    pub answers: bool,
}

/// Group `hits` by (pod address, pod port, node) and decide the status.
/// `complete`: no gap in the window (a late candidate is taken alone only
/// then).
pub fn judge<'a>(hits: &'a [Hit], line: Interval, skew_ns: u64, complete: bool) -> Verdict<'a> {
    let mut ranked: Vec<Candidate<'a>> = Vec::new();
    for h in hits {
        let key = (h.record.orig.src, h.record.orig.src_port, h.node.as_str());
        let d = line.distance(h);
        match ranked.iter_mut().find(|c| {
            let b = c.best();
            (b.record.orig.src, b.record.orig.src_port, b.node.as_str()) == key
        }) {
            Some(c) => {
                c.hits.push(h);
                c.distance_ns = c.distance_ns.min(d);
            }
            None => ranked.push(Candidate {
                hits: vec![h],
                distance_ns: d,
            }),
        }
    }
    for c in &mut ranked {
        c.hits
            .sort_by_key(|h| (line.distance(h), std::cmp::Reverse(h.start_ns())));
    }
    ranked.sort_by_key(|c| (c.distance_ns, std::cmp::Reverse(c.best().start_ns())));
    let near_iv = line.widened(skew_ns);
    let alive = ranked.iter().filter(|c| c.distance_ns == 0).count();
    let near = ranked
        .iter()
        .filter(|c| c.hits.iter().any(|h| near_iv.alive(h)))
        .count();
    // A connection recorded after the line may be the line's own only when
    // its time is the agent's read time (no kernel start time): kernel
    // times are exact.
    let started_after = |c: &Candidate| {
        c.hits
            .iter()
            .any(|h| h.start_ns() > line.to_ns && h.record.start_ns.is_none())
    };
    let (status, basis) = if alive == 1 {
        ("resolved", Basis::Alive)
    } else if alive > 1 {
        ("ambiguous", Basis::Alive)
    } else if ranked.len() == 1 && complete && started_after(&ranked[0]) {
        // Whatever the skew: a record is never early, so the one
        // connection recorded after the line may be its own, read late.
        ("resolved", Basis::Late)
    } else if near > 0 {
        ("ambiguous", Basis::Skew)
    } else if ranked.iter().any(started_after) {
        // A record that started after the line may be its own, late.
        ranked.sort_by_key(|c| (!started_after(c), c.distance_ns));
        ("ambiguous", Basis::Late)
    } else {
        ("not_found", Basis::None)
    };
    Verdict {
        status,
        basis,
        answers: status != "not_found",
        ranked,
        alive,
        near,
    }
}

/// Shared by the lines of one request (one per worker thread).
#[derive(Debug, Default)]
struct Caches {
    searches: HashMap<(IpAddr, u16, u64, u64), SearchResult>,
    /// (address, owner node, window bucket) -> the node recorded something.
    observed: HashMap<(IpAddr, String, u64), bool>,
}

/// Did `node` record any connection SNATed to `addr` around `at`? The
/// range is `at ± window` widened to whole windows (so lines share the
/// search); wider only makes the answer `not_found` rather than
/// `not_observed`, today's answer.
fn node_observed(
    store: &dyn RecordStore,
    caches: &mut Caches,
    node: &str,
    addr: IpAddr,
    at: u64,
    window_ns: u64,
) -> Result<bool, StoreError> {
    let w = window_ns.max(1);
    let bucket = at / w;
    let key = (addr, node.to_string(), bucket);
    if let Some(&seen) = caches.observed.get(&key) {
        return Ok(seen);
    }
    let q = SearchQuery {
        snat_ip: Some(addr),
        node: Some(node.to_string()),
        from_ns: Some(bucket.saturating_sub(1).saturating_mul(w)),
        to_ns: Some(bucket.saturating_add(2).saturating_mul(w)),
        limit: 1,
        ..SearchQuery::default()
    };
    let seen = store.search(&q)?.total > 0;
    caches.observed.insert(key, seen);
    Ok(seen)
}

/// One candidate in `ranked`.
fn candidate(
    c: &Candidate,
    line: Interval,
    pods: Option<&PodHistory>,
    skew_ns: u64,
) -> CandidateAnswer {
    let b = c.best();
    let r = &b.record;
    CandidateAnswer {
        pod_ip: r.orig.src,
        pod_port: r.orig.src_port,
        node: b.node.clone(),
        dst_ip: r.orig.dst,
        dst_port: r.orig.dst_port,
        alive: c.distance_ns == 0,
        distance_ms: c.distance_ns / 1_000_000,
        merged: c.hits.len() as u64,
        start: api::format_time(c.hits.iter().map(|h| h.start_ns()).min().unwrap_or(0)),
        end: c
            .hits
            .iter()
            .map(|h| h.closed_ns)
            .try_fold(0u64, |m, e| e.map(|e| m.max(e)))
            .map(api::format_time),
        midstream: c.hits.iter().any(|h| h.record.midstream()),
        started_after: c.hits.iter().any(|h| h.start_ns() > line.to_ns),
        pod_fields: answer::hit_pod(pods, b, skew_ns),
    }
}

/// One line's answer (the search runs here, on a blocking thread).
fn resolve_line(
    store: &dyn RecordStore,
    agents: &[AgentInfo],
    pods: Option<&PodHistory>,
    req: &Request,
    open_gaps: &[Gap],
    caches: &mut Caches,
    line_no: usize,
) -> Result<LineAnswer, StoreError> {
    let line = &req.lines[line_no - 1];
    let parsed = match req.format.parse_line(line) {
        Ok(p) => p,
        Err(e) => {
            return Ok(LineAnswer {
                line_no: line_no as u64,
                line: line.clone(),
                status: "unparsed".into(),
                error: Some(e.0),
                ..LineAnswer::default()
            })
        }
    };
    let (at, precision) = match (parsed.time_ns, req.at) {
        (Some(t), _) => (t, parsed.precision_ns),
        (None, Some(a)) => a,
        (None, None) => (0, 0), // refused in parse_request
    };
    let iv = Interval::of_line(at, precision, parsed.request_time_ns);
    let q = SearchQuery {
        snat_ip: Some(parsed.remote_addr),
        snat_port: Some(parsed.remote_port),
        from_ns: Some(iv.from_ns.saturating_sub(req.window_ns)),
        to_ns: Some(iv.to_ns.saturating_add(req.window_ns)),
        at_ns: Some(at),
        at_precision_ns: precision,
        limit: SEARCH_LIMIT,
        ..SearchQuery::default()
    };
    let key = (parsed.remote_addr, parsed.remote_port, iv.from_ns, iv.to_ns);
    let res = match caches.searches.get(&key) {
        Some(r) => r.clone(),
        None => {
            let mut r = store.search(&q)?;
            merge_open_gaps(&q, &mut r, open_gaps.to_vec());
            caches.searches.insert(key, r.clone());
            r
        }
    };
    let verdict = judge(&res.hits, iv, req.skew_ns, res.gaps.is_empty());
    // Hits past the limit are counted as distinct candidates (an upper bound).
    let unseen = res.total.saturating_sub(res.hits.len() as u64);
    let candidates = verdict.ranked.len() as u64 + unseen;
    let mut status = verdict.status;
    let mut note: Option<String> = None;
    let mut owner: Option<String> = None;
    if candidates == 0 {
        if let Some(node) = crate::peers::node_owning_any(agents, parsed.remote_addr) {
            if !node_observed(store, caches, &node, parsed.remote_addr, at, req.window_ns)? {
                status = "not_observed";
                note = Some(format!(
                    "the agent of {node}, which owns {}, recorded no connection from that address within {} of the line: its capture does not see this traffic (eBPF masquerade, a notrack rule, conntrack events off) or it was not running",
                    parsed.remote_addr,
                    fmt_duration(req.window_ns)
                ));
            }
            owner = Some(node);
        } else {
            note = Some(format!(
                "no agent lists {} among its node addresses",
                parsed.remote_addr
            ));
        }
    } else {
        note = match verdict.basis {
            Basis::Skew => Some(format!(
                "no connection was alive at the line's time; {} within the {} clock-skew tolerance, ranked by distance",
                verdict.near,
                fmt_duration(req.skew_ns)
            )),
            Basis::Late if status == "resolved" => Some(
                "the only connection with this address and port in the window started after the line: taken as recorded late (agent read lag without kernel timestamps)".into(),
            ),
            Basis::Late => Some(
                "no connection was alive at the line's time; one started after it (possibly recorded late), ranked first".into(),
            ),
            Basis::None => Some(
                "no connection with this address and port was alive at the line's time; the nearest ones ended before it".into(),
            ),
            Basis::Alive => None,
        };
    }
    let mut v = LineAnswer {
        line_no: line_no as u64,
        line: line.clone(),
        status: status.into(),
        remote_addr: Some(parsed.remote_addr),
        remote_port: Some(parsed.remote_port),
        time: Some(api::format_time(at)),
        interval: Some(IntervalAnswer {
            from: api::format_time(iv.from_ns),
            to: api::format_time(iv.to_ns),
        }),
        skew_ms: Some(req.skew_ns / 1_000_000),
        basis: Some(verdict.basis.as_str().into()),
        candidates: Some(candidates),
        alive_candidates: Some(verdict.alive as u64),
        near_candidates: Some(verdict.near as u64),
        incomplete: Some(!res.gaps.is_empty()),
        gaps: Some(answer::gaps(&res.gaps)),
        note,
        ..LineAnswer::default()
    };
    if status == "not_observed" {
        v.node = owner;
    }
    if !verdict.ranked.is_empty() && status != "resolved" {
        v.ranked = Some(
            verdict
                .ranked
                .iter()
                .take(RANKED_SHOWN)
                .map(|c| candidate(c, iv, pods, req.skew_ns))
                .collect(),
        );
    }
    if let (true, Some(top)) = (verdict.answers, verdict.ranked.first()) {
        let best = top.best();
        let r = &best.record;
        v.pod_ip = Some(r.orig.src);
        v.pod_port = Some(r.orig.src_port);
        v.node = Some(best.node.clone());
        v.dst_ip = Some(r.orig.dst);
        v.dst_port = Some(r.orig.dst_port);
        v.merged = Some(top.hits.len() as u64);
        // The line's own entry was picked up mid-stream.
        v.midstream = r.midstream();
        v.record = Some(Box::new(answer::connection(best, &q, pods)));
        v.pod_fields = answer::hit_pod(pods, best, req.skew_ns);
    }
    Ok(v)
}

/// `1s`, `5m`, `250ms` for messages.
fn fmt_duration(ns: u64) -> String {
    if ns % 60_000_000_000 == 0 && ns > 0 {
        format!("{}m", ns / 60_000_000_000)
    } else if ns % 1_000_000_000 == 0 {
        format!("{}s", ns / 1_000_000_000)
    } else {
        format!("{}ms", ns / 1_000_000)
    }
}

/// Fewest lines a resolve thread takes (fewer threads for short requests).
const MIN_LINES_PER_THREAD: usize = 32;

/// Resolve every line of `req` (in order, over up to the store's
/// [`search_parallelism`](RecordStore::search_parallelism) blocking
/// threads) and add the summary: the whole answer of `POST /api/v1/resolve`.
pub async fn resolve(
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    peers: Option<Arc<crate::peers::Peers>>,
    pods: Option<Arc<PodHistory>>,
    req: Arc<Request>,
) -> Result<ResolveAnswer, QueryError> {
    let open_gaps = Arc::new(crate::peers::open_gaps(&registry, peers.as_deref()));
    // The agents of the cluster (with replicas, also those streaming to
    // other collectors): who owns a line's address.
    let agents = Arc::new(crate::peers::agents(&registry, peers.as_deref()));
    let n = req.lines.len();
    // Contiguous slices of at least MIN_LINES_PER_THREAD lines over the
    // store's search threads; order is kept.
    let workers = store
        .search_parallelism()
        .clamp(1, 64)
        .min(n.div_ceil(MIN_LINES_PER_THREAD).max(1));
    let chunk = n.div_ceil(workers).max(1);
    let mut tasks = Vec::new();
    for start in (0..n).step_by(chunk) {
        let (store, req, gaps) = (store.clone(), req.clone(), open_gaps.clone());
        let (agents, pods) = (agents.clone(), pods.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut caches = Caches::default();
            (start..(start + chunk).min(n))
                .map(|i| {
                    resolve_line(
                        store.as_ref(),
                        &agents,
                        pods.as_deref(),
                        &req,
                        &gaps,
                        &mut caches,
                        i + 1,
                    )
                })
                .collect::<Result<Vec<LineAnswer>, StoreError>>()
        }));
    }
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.extend(t.await.map_err(|e| QueryError::Task(e.to_string()))??);
    }
    let count = |st: &str| results.iter().filter(|r| r.status == st).count() as u64;
    let summary = ResolveSummary {
        lines: n as u64,
        resolved: count("resolved"),
        not_found: count("not_found"),
        ambiguous: count("ambiguous"),
        not_observed: count("not_observed"),
        unparsed: count("unparsed"),
        incomplete: results
            .iter()
            .filter(|r| r.incomplete == Some(true))
            .count() as u64,
    };
    Ok(ResolveAnswer {
        summary,
        log_format: req.format.source().to_string(),
        window_ms: req.window_ns / 1_000_000,
        skew_ms: req.skew_ns / 1_000_000,
        results,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};

    const S: u64 = 1_000_000_000;

    fn hit(node: &str, pod: &str, port: u16, start: u64, end: Option<u64>) -> Hit {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        Hit {
            closed_ns: end,
            ..Hit::open(
                node,
                ConnRecord::new(
                    EventKind::New,
                    start,
                    Protocol::Tcp,
                    Tuple::new(ip(pod), port, ip("198.19.0.2"), 80),
                    Tuple::new(ip("198.19.0.2"), 80, ip("198.19.0.1"), 40000),
                ),
            )
        }
    }

    #[test]
    fn a_line_is_its_request_interval() {
        let iv = Interval::of_line(10 * S, 1_000_000, Some(2 * S));
        assert_eq!((iv.from_ns, iv.to_ns), (8 * S, 10 * S + 999_999));
        let iv = Interval::of_line(10 * S, S, None);
        assert_eq!((iv.from_ns, iv.to_ns), (10 * S, 11 * S - 1));
        // Alive somewhere in it; distance otherwise.
        let iv = Interval::of_line(10 * S, 1, Some(S));
        assert!(iv.alive(&hit("a", "10.0.0.1", 1, 5 * S, Some(9 * S))));
        assert_eq!(iv.distance(&hit("a", "10.0.0.1", 1, 5 * S, Some(8 * S))), S);
        assert_eq!(iv.distance(&hit("a", "10.0.0.1", 1, 12 * S, None)), 2 * S);
    }

    #[test]
    fn a_connection_superseded_inside_the_interval_is_near_not_alive() {
        // The search ranking and the resolver use one rule (store::alive_in):
        // A's tuple went to B at 10.0004 s, inside the line's millisecond.
        let mut a = hit("a", "10.0.0.1", 1, 5 * S, Some(10 * S + 400_000));
        a.end = Some(crate::store::End::Superseded);
        let b = hit("a", "10.0.0.2", 1, 10 * S + 400_000, None);
        let iv = Interval::of_line(10 * S, 1_000_000, None);
        assert!(!iv.alive(&a) && iv.alive(&b));
        assert!(iv.distance(&a) > 0, "0 means alive");
        assert_eq!(iv.alive(&a), crate::store::alive_at(&a, 10 * S, 1_000_000));
        let hits = [a, b];
        let v = judge(&hits, iv, S, true);
        assert_eq!((v.status, v.alive), ("resolved", 1));
        assert_eq!(v.ranked[0].best().record.orig.src.to_string(), "10.0.0.2");
    }

    #[test]
    fn candidates_are_pod_address_port_and_node() {
        let line = Interval::of_line(10 * S, 1, None);
        // Two entries of one connection: one candidate, resolved.
        let hits = vec![
            hit("a", "10.0.0.1", 1, S, Some(10 * S)),
            hit("a", "10.0.0.1", 1, 10 * S, None),
        ];
        let v = judge(&hits, line, S, true);
        assert_eq!((v.status, v.basis, v.alive), ("resolved", Basis::Alive, 1));
        assert_eq!(v.ranked.len(), 1);
        assert_eq!(v.ranked[0].hits.len(), 2);
        // The same pod address and port on another node, or another port,
        // is another candidate.
        for other in [
            hit("b", "10.0.0.1", 1, 9 * S, None),
            hit("a", "10.0.0.1", 2, 9 * S, None),
        ] {
            let mut hs = hits.clone();
            hs.push(other);
            let v = judge(&hs, line, S, true);
            assert_eq!((v.status, v.alive), ("ambiguous", 2));
        }
        // Nothing at all.
        let v = judge(&[], line, S, true);
        assert_eq!(
            (v.status, v.basis, v.answers),
            ("not_found", Basis::None, false)
        );
    }

    #[tokio::test]
    async fn resolve_answer_snapshot() {
        use crate::store::{MemStore, StoredBatch};
        use ctw_common::TcpState;
        const T: u64 = 1_733_727_900_000_000_000; // 2024-12-09T07:05:00Z
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let rec = |kind, at: u64, pod: &str, snat_port: u16| {
            let mut r = ConnRecord::new(
                kind,
                at,
                Protocol::Tcp,
                Tuple::new(ip(pod), 1000, ip("198.19.0.2"), 80),
                Tuple::new(ip("198.19.0.2"), 80, ip("198.18.0.1"), snat_port),
            );
            r.tcp_state = Some(TcpState::Established);
            r
        };
        let store = Arc::new(MemStore::default());
        let batch = |node: &str, records| StoredBatch {
            node: node.into(),
            boot_id: "b".into(),
            seq: 1,
            records,
        };
        store
            .append(batch(
                "node-a",
                vec![
                    // Resolved: alive at the line, closed after it.
                    rec(EventKind::New, T, "10.244.1.7", 40001),
                    rec(EventKind::Destroy, T + 2 * S, "10.244.1.7", 40001),
                    // Ambiguous: two pods behind one address and port.
                    rec(EventKind::Recovered, T, "10.244.1.8", 40002),
                ],
            ))
            .unwrap();
        store
            .append(batch(
                "node-b",
                // Started later: ranked first (newest start first).
                vec![rec(EventKind::New, T + 100_000_000, "10.244.2.9", 40002)],
            ))
            .unwrap();
        let body = serde_json::json!({
            "log_format": "$remote_addr $remote_port $msec",
            "lines": [
                "198.18.0.1 40001 1733727900.500",
                "198.18.0.1 40002 1733727900.500",
                "198.18.0.1 40003 1733727900.500",
                "not a line",
            ],
        });
        let req = parse_request(body.to_string().as_bytes()).unwrap();
        let registry = Arc::new(Registry::new(crate::metrics::Metrics::new()));
        let answer = resolve(store, registry, None, None, Arc::new(req))
            .await
            .unwrap();
        expect_test::expect![[r#"
            {
              "log_format": "$remote_addr $remote_port $msec",
              "results": [
                {
                  "alive_candidates": 1,
                  "candidates": 1,
                  "dst_ip": "198.19.0.2",
                  "dst_port": 80,
                  "gaps": [],
                  "incomplete": false,
                  "interval": {
                    "from": "2024-12-09T07:05:00.500Z",
                    "to": "2024-12-09T07:05:00.500Z"
                  },
                  "line": "198.18.0.1 40001 1733727900.500",
                  "line_no": 1,
                  "match": "alive",
                  "merged": 1,
                  "midstream": true,
                  "near_candidates": 1,
                  "node": "node-a",
                  "pod_ip": "10.244.1.7",
                  "pod_port": 1000,
                  "record": {
                    "alive_at": true,
                    "dst_ip": "198.19.0.2",
                    "dst_port": 80,
                    "duration_ms": 2000,
                    "end": "2024-12-09T07:05:02.000Z",
                    "end_kind": "destroy",
                    "end_state": "ESTABLISHED",
                    "kind": "new",
                    "midstream": true,
                    "node": "node-a",
                    "protocol": "tcp",
                    "snat_ip": "198.18.0.1",
                    "snat_port": 40001,
                    "src_ip": "10.244.1.7",
                    "src_port": 1000,
                    "start": "2024-12-09T07:05:00.000Z",
                    "state": "ESTABLISHED",
                    "ts": "2024-12-09T07:05:00.000Z"
                  },
                  "remote_addr": "198.18.0.1",
                  "remote_port": 40001,
                  "skew_ms": 1000,
                  "status": "resolved",
                  "time": "2024-12-09T07:05:00.500Z"
                },
                {
                  "alive_candidates": 2,
                  "candidates": 2,
                  "dst_ip": "198.19.0.2",
                  "dst_port": 80,
                  "gaps": [],
                  "incomplete": false,
                  "interval": {
                    "from": "2024-12-09T07:05:00.500Z",
                    "to": "2024-12-09T07:05:00.500Z"
                  },
                  "line": "198.18.0.1 40002 1733727900.500",
                  "line_no": 2,
                  "match": "alive",
                  "merged": 1,
                  "midstream": true,
                  "near_candidates": 2,
                  "node": "node-b",
                  "pod_ip": "10.244.2.9",
                  "pod_port": 1000,
                  "ranked": [
                    {
                      "alive": true,
                      "distance_ms": 0,
                      "dst_ip": "198.19.0.2",
                      "dst_port": 80,
                      "merged": 1,
                      "midstream": true,
                      "node": "node-b",
                      "pod_ip": "10.244.2.9",
                      "pod_port": 1000,
                      "start": "2024-12-09T07:05:00.100Z"
                    },
                    {
                      "alive": true,
                      "distance_ms": 0,
                      "dst_ip": "198.19.0.2",
                      "dst_port": 80,
                      "merged": 1,
                      "node": "node-a",
                      "pod_ip": "10.244.1.8",
                      "pod_port": 1000,
                      "start": "2024-12-09T07:05:00.000Z"
                    }
                  ],
                  "record": {
                    "alive_at": true,
                    "dst_ip": "198.19.0.2",
                    "dst_port": 80,
                    "kind": "new",
                    "midstream": true,
                    "node": "node-b",
                    "protocol": "tcp",
                    "snat_ip": "198.18.0.1",
                    "snat_port": 40002,
                    "src_ip": "10.244.2.9",
                    "src_port": 1000,
                    "start": "2024-12-09T07:05:00.100Z",
                    "state": "ESTABLISHED",
                    "ts": "2024-12-09T07:05:00.100Z"
                  },
                  "remote_addr": "198.18.0.1",
                  "remote_port": 40002,
                  "skew_ms": 1000,
                  "status": "ambiguous",
                  "time": "2024-12-09T07:05:00.500Z"
                },
                {
                  "alive_candidates": 0,
                  "candidates": 0,
                  "gaps": [],
                  "incomplete": false,
                  "interval": {
                    "from": "2024-12-09T07:05:00.500Z",
                    "to": "2024-12-09T07:05:00.500Z"
                  },
                  "line": "198.18.0.1 40003 1733727900.500",
                  "line_no": 3,
                  "match": "none",
                  "near_candidates": 0,
                  "note": "no agent lists 198.18.0.1 among its node addresses",
                  "remote_addr": "198.18.0.1",
                  "remote_port": 40003,
                  "skew_ms": 1000,
                  "status": "not_found",
                  "time": "2024-12-09T07:05:00.500Z"
                },
                {
                  "error": "$remote_addr: \"not\" is not an IP address",
                  "line": "not a line",
                  "line_no": 4,
                  "status": "unparsed"
                }
              ],
              "skew_ms": 1000,
              "summary": {
                "ambiguous": 1,
                "incomplete": 0,
                "lines": 4,
                "not_found": 1,
                "not_observed": 0,
                "resolved": 1,
                "unparsed": 1
              },
              "window_ms": 300000
            }"#]]
        .assert_eq(&crate::answer::fixtures::json(answer));
    }
}

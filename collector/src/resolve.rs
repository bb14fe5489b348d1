//! Resolve nginx access-log lines to the pods that sent them
//! (`POST /api/v1/resolve`): each line is parsed with a
//! [`ctw_common::nginx::LogFormat`] to `(remote_addr, remote_port, time)`,
//! which is searched in the store as the SNAT address and port of a
//! connection alive at that time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Json;
use ctw_common::api;
use serde_json::{json, Map, Value};

use crate::grpc_query::merge_open_gaps;
use crate::http::{error, hit_json, search_json, AppState};
use crate::store::{alive_at, Gap, RecordStore, SearchQuery, SearchResult, StoreError};

pub use ctw_common::nginx::{
    FormatError, LineError, LogFormat, ParsedLine, TimeVar, COMBINED, DEFAULT_LOG_FORMAT,
    MAX_LINE_BYTES,
};

/// Most lines one request may carry.
pub const MAX_LINES: usize = 20_000;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default and largest `window` around each line's time.
const DEFAULT_WINDOW_NS: u64 = 5 * 60 * 1_000_000_000;
const MAX_WINDOW_NS: u64 = 24 * 3600 * 1_000_000_000;
/// Hits fetched per line.
const SEARCH_LIMIT: usize = 10;

// ---------------------------------------------------------------------------
// The endpoint.

/// `POST /api/v1/resolve` with its own body limit ([`MAX_BODY_BYTES`]); the
/// caller mounts it behind the bearer token.
pub fn route() -> MethodRouter<Arc<AppState>> {
    post(handler).layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// A refused request (kept small: clippy's `result_large_err`).
#[derive(Debug)]
struct Reject {
    code: StatusCode,
    message: String,
    parameter: Option<String>,
}

impl Reject {
    fn new(code: StatusCode, message: impl Into<String>, parameter: Option<&str>) -> Reject {
        Reject {
            code,
            message: message.into(),
            parameter: parameter.map(str::to_string),
        }
    }

    fn into_response(self) -> Response {
        error(self.code, &self.message, self.parameter.as_deref())
    }
}

/// A validated request.
#[derive(Debug)]
struct Request {
    lines: Vec<String>,
    format: LogFormat,
    window_ns: u64,
    at: Option<(u64, u64)>,
}

fn parse_request(body: &[u8]) -> Result<Request, Reject> {
    let bad = |p: &str, m: String| Reject::new(StatusCode::BAD_REQUEST, m, Some(p));
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            format!("body is not JSON: {e}"),
            None,
        )
    })?;
    let Value::Object(mut o) = v else {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            "body must be a JSON object",
            None,
        ));
    };
    const KNOWN: [&str; 4] = ["lines", "log_format", "window", "at"];
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
        return Err(Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} lines: at most {MAX_LINES} per request, send them in batches",
                lines.len()
            ),
            Some("lines"),
        ));
    }
    let lines = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| match l {
            Value::String(s) => Ok(s),
            _ => Err(bad("lines", format!("lines[{i}] is not a string"))),
        })
        .collect::<Result<Vec<String>, Reject>>()?;
    let text = |o: &mut Map<String, Value>, k: &str| -> Result<Option<String>, Reject> {
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
        None => DEFAULT_WINDOW_NS,
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
        at,
    })
}

/// One line's answer as JSON (the search runs here, on a blocking thread).
fn resolve_line(
    store: &dyn RecordStore,
    req: &Request,
    open_gaps: &[Gap],
    cache: &mut HashMap<(IpAddr, u16, u64, u64), SearchResult>,
    line_no: usize,
) -> Result<Value, StoreError> {
    let line = &req.lines[line_no - 1];
    let parsed = match req.format.parse_line(line) {
        Ok(p) => p,
        Err(e) => {
            return Ok(json!({
                "line_no": line_no, "line": line, "status": "unparsed", "error": e.0,
            }))
        }
    };
    let (at, precision) = match (parsed.time_ns, req.at) {
        (Some(t), _) => (t, parsed.precision_ns),
        (None, Some(a)) => a,
        (None, None) => (0, 0), // refused in parse_request
    };
    let q = SearchQuery {
        snat_ip: Some(parsed.remote_addr),
        snat_port: Some(parsed.remote_port),
        from_ns: Some(at.saturating_sub(req.window_ns)),
        to_ns: Some(at.saturating_add(req.window_ns).saturating_add(precision)),
        at_ns: Some(at),
        at_precision_ns: precision,
        limit: SEARCH_LIMIT,
        ..SearchQuery::default()
    };
    let key = (parsed.remote_addr, parsed.remote_port, at, precision);
    let res = match cache.get(&key) {
        Some(r) => r.clone(),
        None => {
            let mut r = store.search(&q)?;
            merge_open_gaps(&q, &mut r, open_gaps.to_vec());
            cache.insert(key, r.clone());
            r
        }
    };
    let alive = res
        .hits
        .iter()
        .filter(|h| alive_at(h, at, precision))
        .count();
    let status = match (res.hits.first(), alive) {
        (None, _) => "not_found",
        (Some(_), n) if n > 1 => "ambiguous",
        (Some(_), _) => "resolved",
    };
    let gaps = gaps_json(&res.gaps, &q);
    let mut v = json!({
        "line_no": line_no,
        "line": line,
        "remote_addr": parsed.remote_addr,
        "remote_port": parsed.remote_port,
        "time": api::format_time(at),
        "status": status,
        "candidates": res.total,
        "alive_candidates": alive,
        "incomplete": !res.gaps.is_empty(),
        "gaps": gaps,
    });
    if let (Some(best), Some(o)) = (res.hits.first(), v.as_object_mut()) {
        let r = &best.record;
        o.insert("pod_ip".into(), json!(r.orig.src));
        o.insert("pod_port".into(), json!(r.orig.src_port));
        o.insert("node".into(), json!(best.node));
        o.insert("dst_ip".into(), json!(r.orig.dst));
        o.insert("dst_port".into(), json!(r.orig.dst_port));
        o.insert("record".into(), hit_json(best, &q));
    }
    Ok(v)
}

/// Gaps in the API's JSON shape (through `search_json`, the one place that
/// writes them).
fn gaps_json(gaps: &[Gap], q: &SearchQuery) -> Value {
    if gaps.is_empty() {
        return json!([]);
    }
    let only_gaps = SearchResult {
        hits: Vec::new(),
        total: 0,
        gaps: gaps.to_vec(),
    };
    let mut v = search_json(&only_gaps, q);
    v.get_mut("gaps")
        .map(Value::take)
        .unwrap_or_else(|| json!([]))
}

/// `POST /api/v1/resolve`: see the module documentation.
pub async fn handler(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "request body larger than {} MiB: send the lines in batches",
                    MAX_BODY_BYTES >> 20
                ),
                Some("lines"),
            )
        }
        Err(e) => return error(e.status(), &format!("cannot read the body: {e}"), None),
    };
    let req = match parse_request(&body) {
        Ok(r) => Arc::new(r),
        Err(r) => return r.into_response(),
    };
    drop(body);
    let open_gaps = Arc::new(s.registry.open_gaps());
    let n = req.lines.len();
    // Contiguous slices over a few blocking threads; order is kept.
    let workers = std::thread::available_parallelism()
        .map_or(2, |p| p.get())
        .clamp(1, 4)
        .min(n.div_ceil(256).max(1));
    let chunk = n.div_ceil(workers).max(1);
    let mut tasks = Vec::new();
    for start in (0..n).step_by(chunk) {
        let (store, req, gaps) = (s.store.clone(), req.clone(), open_gaps.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut cache = HashMap::new();
            (start..(start + chunk).min(n))
                .map(|i| resolve_line(store.as_ref(), &req, &gaps, &mut cache, i + 1))
                .collect::<Result<Vec<Value>, StoreError>>()
        }));
    }
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        match t.await {
            Ok(Ok(v)) => results.extend(v),
            Ok(Err(e)) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("search failed: {e}"),
                    None,
                )
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("search task failed: {e}"),
                    None,
                )
            }
        }
    }
    let count = |st: &str| results.iter().filter(|r| r["status"] == st).count();
    let summary = json!({
        "lines": n,
        "resolved": count("resolved"),
        "not_found": count("not_found"),
        "ambiguous": count("ambiguous"),
        "unparsed": count("unparsed"),
        "incomplete": results.iter().filter(|r| r["incomplete"] == true).count(),
    });
    Json(json!({
        "results": results,
        "summary": summary,
        "log_format": req.format.source(),
        "window_ms": req.window_ns / 1_000_000,
    }))
    .into_response()
}

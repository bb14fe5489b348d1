//! Streams synthetic records through the real uplink to a collector at a
//! fixed rate and reports what was acked: the agent side of the "100k
//! records/s over a 50 ms round trip" benchmark (bench/uplink.sh).
//!
//! `uplink_bench CONFIG.yaml RATE SECONDS [node|wide]` — CONFIG holds an
//! agent config whose `collector:` section is used; the last argument picks
//! the record mix (see [`Spread`]).
//!
//! With `CTW_PROBE_HTTP=HOST:PORT` and `CTW_PROBE_TOKEN_FILE=FILE` it also
//! measures time to searchable end to end: every 100 ms the first record of
//! the batch handed to the uplink is searched for through the collector's
//! HTTP API (`/api/v1/connections` by SNAT address and port, pod address
//! and port, and its exact time) every 20 ms until found. The time from
//! handing it to the uplink to the first answer that holds it covers the
//! agent's batching, the link, the collector's WAL fsync and the search.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ctw_agent::capture::RecordSink;
use ctw_agent::config::{Config, ConfigFile};
use ctw_agent::http::LookupFn;
use ctw_agent::metrics::Metrics;
use ctw_agent::uplink::Uplink;
use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};

/// Record mixes: what one node's agent sends (the default), or a stress mix
/// with far more distinct pod addresses than any node has.
#[derive(Clone, Copy, PartialEq)]
enum Spread {
    /// One node: 110 pods (kubelet's default `maxPods`), 20 destination
    /// services (4 of them UDP DNS-like), pod source ports random in Linux's
    /// ephemeral range (kept by masquerade), and every connection's NEW later
    /// followed by its DESTROY with counters (`capture_destroy: true`, as in
    /// config/agent.yaml): half the records are DESTROY.
    Node,
    /// Every record a NEW from one of 65,536 pod addresses with SNAT ports
    /// cycling through 1024-65023 (the mix of earlier versions of this
    /// benchmark).
    Wide,
}

/// Flows stay open this many records before their DESTROY.
const FLOW_LIFETIME_RECORDS: u64 = 20_000;

fn mix(x: u64) -> u64 {
    // splitmix64: a fixed pseudo-random value per flow.
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn record(spread: Spread, i: u64, now_ns: u64) -> ConnRecord {
    let node = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1));
    let (flow, destroy) = match spread {
        Spread::Wide => (i, false),
        // Even records open flow i/2; odd ones close the flow opened
        // FLOW_LIFETIME_RECORDS records earlier (or open one, at the start).
        Spread::Node if i % 2 == 1 && i / 2 >= FLOW_LIFETIME_RECORDS / 2 => {
            (i / 2 - FLOW_LIFETIME_RECORDS / 2, true)
        }
        Spread::Node if i % 2 == 0 => (i / 2, false),
        // Flows that are never closed in the run.
        Spread::Node => ((1 << 40) | i, false),
    };
    let h = mix(flow);
    let (pod, port, srv, dport, protocol) = match spread {
        Spread::Wide => (
            Ipv4Addr::new(198, 18, (flow >> 8) as u8, flow as u8),
            1024 + (flow % 64000) as u16,
            Ipv4Addr::new(198, 19, 0, 2),
            443,
            Protocol::Tcp,
        ),
        Spread::Node => {
            let svc = (h >> 32) % 20;
            let (dport, protocol) = match svc {
                0..=3 => (53, Protocol::Udp),
                4..=9 => (443, Protocol::Tcp),
                10..=13 => (3306, Protocol::Tcp),
                14..=16 => (6379, Protocol::Tcp),
                _ => (27017, Protocol::Tcp),
            };
            (
                Ipv4Addr::new(198, 18, 0, 10 + (h % 110) as u8),
                32768 + ((h >> 8) % 28232) as u16,
                Ipv4Addr::new(198, 19, 1, 1 + svc as u8),
                dport,
                protocol,
            )
        }
    };
    let (pod, srv) = (IpAddr::V4(pod), IpAddr::V4(srv));
    let tcp = protocol == Protocol::Tcp;
    let lifetime_ns = 200_000_000 + (h >> 40) % 1_000_000_000;
    let counters = |k: u64| {
        destroy.then_some(ctw_common::Counters {
            packets: 4 + (h >> k) % 60,
            bytes: 300 + (h >> (k + 8)) % 90_000,
        })
    };
    ConnRecord {
        kind: if destroy {
            EventKind::Destroy
        } else {
            EventKind::New
        },
        event_ns: now_ns,
        protocol,
        orig: Tuple {
            src: pod,
            dst: srv,
            src_port: port,
            dst_port: dport,
        },
        reply: Tuple {
            src: srv,
            dst: node,
            src_port: dport,
            dst_port: port,
        },
        id: mix(flow ^ 0x5555) as u32,
        zone: 0,
        mark: 0,
        status: if destroy { 0x18e } else { 0x8 },
        tcp_state: tcp.then_some(if destroy {
            ctw_common::TcpState::TimeWait
        } else {
            ctw_common::TcpState::SynSent
        }),
        tcp_flags_orig: 0,
        tcp_flags_reply: 0,
        start_ns: destroy.then(|| now_ns.saturating_sub(lifetime_ns)),
        stop_ns: destroy.then_some(now_ns),
        counters_orig: counters(0),
        counters_reply: counters(16),
    }
}

/// A record handed to the uplink, to be found through the search API.
struct Probe {
    sent: Instant,
    path: String,
}

impl Probe {
    fn new(r: &ConnRecord, sent: Instant) -> Probe {
        // The store keeps times to the microsecond.
        let us = r.event_ns / 1000;
        let t = |us: u64| format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
        let (snat, snat_port) = r.snat();
        Probe {
            sent,
            path: format!(
                "/api/v1/connections?snat_ip={snat}&snat_port={snat_port}&src_ip={}&src_port={}&from={}&to={}&limit=1",
                r.orig.src,
                r.orig.src_port,
                t(us),
                t(us + 1)
            ),
        }
    }
}

/// `total` of one search, or why there is none.
fn search_total(addr: &str, token: &str, path: &str) -> Result<u64, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{}: {body}", head.lines().next().unwrap_or("")));
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    v["total"]
        .as_u64()
        .ok_or_else(|| format!("no total in {body}"))
}

/// Time to searchable of each probe, in milliseconds, as JSON fields.
fn run_prober(addr: String, token: String, probes: mpsc::Receiver<Probe>) -> String {
    let mut waiting: Vec<Probe> = Vec::new();
    let mut found_ms: Vec<f64> = Vec::new();
    let (mut lost, mut errors, mut first_error) = (0u64, 0u64, String::new());
    let mut open = true;
    while open || !waiting.is_empty() {
        loop {
            match probes.try_recv() {
                Ok(p) => waiting.push(p),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        waiting.retain(|p| match search_total(&addr, &token, &p.path) {
            Ok(n) if n > 0 => {
                found_ms.push(p.sent.elapsed().as_secs_f64() * 1000.0);
                false
            }
            r => {
                if let Err(e) = r {
                    errors += 1;
                    if first_error.is_empty() {
                        first_error = e;
                    }
                }
                let give_up = p.sent.elapsed() > Duration::from_secs(30);
                lost += u64::from(give_up);
                !give_up
            }
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    found_ms.sort_by(f64::total_cmp);
    let q = |f: f64| {
        found_ms
            .get(((found_ms.len() as f64 * f).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    format!(
        "\"probes_found\":{},\"probes_not_found_in_30s\":{lost},\"searchable_ms_p50\":{:.0},\"searchable_ms_p99\":{:.0},\"searchable_ms_max\":{:.0},\"probe_errors\":{errors},\"probe_first_error\":{:?}",
        found_ms.len(),
        q(0.5),
        q(0.99),
        q(1.0),
        first_error
    )
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cfg, rate, secs, spread) = match args.as_slice() {
        [c, r, s] => (c, r, s, Spread::Node),
        [c, r, s, m] if m == "node" => (c, r, s, Spread::Node),
        [c, r, s, m] if m == "wide" => (c, r, s, Spread::Wide),
        _ => anyhow::bail!("usage: uplink_bench CONFIG.yaml RATE SECONDS [node|wide]"),
    };
    let cfg = Config::load(std::path::Path::new(cfg))?;
    let up = cfg
        .collector
        .clone()
        .ok_or_else(|| anyhow::anyhow!("config has no collector section"))?;
    let rate: u64 = rate.parse()?;
    let secs: u64 = secs.parse()?;
    let metrics = Metrics::new(&[443]);
    let lookup: Arc<LookupFn> = Arc::new(|_q| Ok(None));
    let (uplink, sink) = Uplink::start(up, "bench-node", metrics.clone(), lookup)?;
    let (probe_tx, prober) = match (
        std::env::var("CTW_PROBE_HTTP"),
        std::env::var("CTW_PROBE_TOKEN_FILE"),
    ) {
        (Ok(addr), Ok(file)) => {
            let token = std::fs::read_to_string(&file)?.trim().to_string();
            let (tx, rx) = mpsc::channel();
            let h = std::thread::spawn(move || run_prober(addr, token, rx));
            (Some(tx), Some(h))
        }
        _ => (None, None),
    };
    let start = Instant::now();
    let tick = Duration::from_millis(10);
    let per_tick = rate / 100;
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let now_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
        let batch: Vec<ConnRecord> = (0..per_tick)
            .map(|k| record(spread, sent + k, now_ns))
            .collect();
        let probe = match (&probe_tx, batch.first()) {
            (Some(tx), Some(r)) if (sent / per_tick.max(1)) % 10 == 0 => {
                Some((tx, Probe::new(r, Instant::now())))
            }
            _ => None,
        };
        sent += per_tick;
        sink.send(batch);
        if let Some((tx, p)) = probe {
            let _ = tx.send(p);
        }
        let due = start + tick * ((sent / per_tick.max(1)) as u32);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    // Wait for the tail to be acked (bounded).
    let text = |m: &Metrics| m.render();
    let acked = |m: &Metrics| {
        text(m)
            .lines()
            .find_map(|l| l.strip_prefix("ctw_uplink_records_acked_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked(&metrics) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let total_secs = start.elapsed().as_secs_f64();
    drop(probe_tx);
    let probes = match prober {
        Some(h) => format!(
            ",{}",
            h.join()
                .map_err(|_| anyhow::anyhow!("the prober panicked"))?
        ),
        None => String::new(),
    };
    let got = acked(&metrics);
    let spooled = text(&metrics)
        .lines()
        .find_map(|l| l.strip_prefix("ctw_uplink_records_spooled_total "))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    println!(
        "{{\"sent\":{sent},\"acked\":{got},\"send_seconds\":{send_secs:.2},\"all_acked_after_seconds\":{total_secs:.2},\"offered_rate\":{:.0},\"acked_rate\":{:.0},\"tail_after_send_seconds\":{:.2},\"spooled\":\"{spooled}\"{probes}}}",
        sent as f64 / send_secs,
        got as f64 / total_secs,
        total_secs - send_secs
    );
    uplink.shutdown();
    Ok(())
}

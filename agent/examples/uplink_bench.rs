//! Streams synthetic records through the real uplink to a collector at a
//! fixed rate and reports what was acked: the agent side of the "100k
//! records/s over a 50 ms round trip" benchmark (bench/uplink.sh).
//!
//! `uplink_bench CONFIG.yaml RATE SECONDS [node|wide]` — CONFIG holds an
//! agent config whose `collector:` section is used; the last argument picks
//! the record mix (see [`Spread`]).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
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
    let start = Instant::now();
    let tick = Duration::from_millis(10);
    let per_tick = rate / 100;
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let now_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
        let batch: Vec<ConnRecord> = (0..per_tick)
            .map(|k| record(spread, sent + k, now_ns))
            .collect();
        sent += per_tick;
        sink.send(batch);
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
    let got = acked(&metrics);
    let spooled = text(&metrics)
        .lines()
        .find_map(|l| l.strip_prefix("ctw_uplink_records_spooled_total "))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    println!(
        "{{\"sent\":{sent},\"acked\":{got},\"send_seconds\":{send_secs:.2},\"all_acked_after_seconds\":{total_secs:.2},\"offered_rate\":{:.0},\"acked_rate\":{:.0},\"tail_after_send_seconds\":{:.2},\"spooled\":\"{spooled}\"}}",
        sent as f64 / send_secs,
        got as f64 / total_secs,
        total_secs - send_secs
    );
    uplink.shutdown();
    Ok(())
}

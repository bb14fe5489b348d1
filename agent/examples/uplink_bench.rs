//! Streams synthetic records through the real uplink to a collector at a
//! fixed rate and reports what was acked: the agent side of the "100k
//! records/s over a 50 ms round trip" benchmark (bench/uplink.sh).
//!
//! `uplink_bench CONFIG.yaml RATE SECONDS` — CONFIG holds an agent config
//! whose `collector:` section is used.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ctw_agent::capture::RecordSink;
use ctw_agent::config::Config;
use ctw_agent::http::LookupFn;
use ctw_agent::metrics::Metrics;
use ctw_agent::uplink::Uplink;
use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};

fn record(i: u64, now_ns: u64) -> ConnRecord {
    let pod = IpAddr::V4(Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8));
    let srv = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 2));
    let node = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1));
    let port = 1024 + (i % 64000) as u16;
    ConnRecord {
        kind: EventKind::New,
        event_ns: now_ns,
        protocol: Protocol::Tcp,
        orig: Tuple {
            src: pod,
            dst: srv,
            src_port: port,
            dst_port: 443,
        },
        reply: Tuple {
            src: srv,
            dst: node,
            src_port: 443,
            dst_port: port,
        },
        id: i as u32,
        zone: 0,
        mark: 0,
        status: 0x8,
        tcp_state: Some(ctw_common::TcpState::SynSent),
        tcp_flags_orig: 0,
        tcp_flags_reply: 0,
        start_ns: None,
        stop_ns: None,
        counters_orig: None,
        counters_reply: None,
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
    let [cfg, rate, secs] = args.as_slice() else {
        anyhow::bail!("usage: uplink_bench CONFIG.yaml RATE SECONDS");
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
        let batch: Vec<ConnRecord> = (0..per_tick).map(|k| record(sent + k, now_ns)).collect();
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

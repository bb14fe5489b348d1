//! Measures what a re-check of recovered entries costs: pipelined GETs by
//! original tuple (one per entry) against one table dump, on the conntrack
//! table of the current network namespace (run it with `ip netns exec`).
//!
//! Usage: `recheck_cost PORT [ROUNDS]`: dumps the entries with destination
//! port PORT (the "pending" set), then times ROUNDS re-checks each way and
//! prints entries, table size and microseconds per round.

use std::time::Instant;

use anyhow::{bail, Context};
use ctw_agent::capture::{dump_table, EventSource, NetlinkSource, Probe};
use ctw_agent::filter::Filter;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        bail!("usage: recheck_cost PORT [ROUNDS]");
    }
    let port: u16 = args[1].parse().context("PORT")?;
    let rounds: u32 = args.get(2).map_or(Ok(5), |r| r.parse()).context("ROUNDS")?;
    let pending = dump_table(&Filter::new(&[port], &[])).map_err(anyhow::Error::msg)?;
    let all_ports: Vec<u16> = (1..=u16::MAX).collect();
    let table = dump_table(&Filter::new(&all_ports, &[]))
        .map_err(anyhow::Error::msg)?
        .len();
    let cfg = ctw_agent::capture::CaptureConfig {
        filter: Filter::new(&[port], &[]),
        capture_destroy: true,
        rcvbuf_bytes: 1 << 20,
        batch_messages: 64,
        kernel_filter: false,
        recheck_interval: std::time::Duration::from_secs(5),
    };
    let metrics = ctw_agent::metrics::Metrics::new(&[port]);
    let mut src = NetlinkSource::open(&cfg, &metrics).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = Vec::new();
    let t = Instant::now();
    for _ in 0..rounds {
        src.probe(&pending, &mut out).map_err(anyhow::Error::msg)?;
    }
    let get_us = t.elapsed().as_micros() / u128::from(rounds);
    let alive = out.iter().filter(|p| matches!(p, Probe::Alive(_))).count();
    let t = Instant::now();
    for _ in 0..rounds {
        src.dump(&cfg.filter).map_err(anyhow::Error::msg)?;
    }
    let dump_us = t.elapsed().as_micros() / u128::from(rounds);
    println!(
        "pending {} (alive {alive}), table {table}: GETs {get_us} us/round ({:.1} us/entry), dump {dump_us} us/round",
        pending.len(),
        get_us as f64 / pending.len().max(1) as f64
    );
    Ok(())
}

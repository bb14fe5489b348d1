//! Benchmark of the tantivy store on synthetic, realistically spread records:
//! ingest rate, bytes per record on disk, exact snat ip:port + time query
//! latency, pod address + time query latency, and time to searchable.
//!
//! `cargo run --release -p ctw-collector --example store_bench -- --records 10000000`
//! Options: `--records N`, `--batch N` (records per batch, default 1000),
//! `--dir PATH` (default: a new directory under the temp dir, removed at the
//! end unless `--keep`), `--keep`, `--query-only` (only the query
//! measurement, on an index kept by an earlier run with the same `--records`
//! and `--dir`: the records are generated again from `t0`, which that run
//! saved in the directory).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctw_collector::store::tantivy_store::{StoreOptions, TantivyStore};
use ctw_collector::store::{RecordStore, SearchQuery, StoreError, StoredBatch};
use ctw_common::ConnRecord;

#[path = "support/bench.rs"]
mod bench;
use bench::{
    cpu_seconds, feed, pct, pod_query_latency, snat_query, Gen, NODES, PODS, SERVICES, SPAN_NS,
};

/// Exact snat ip:port ± 5 min queries of `samples`: p50 and p99 latency in
/// ms, how many found their record, partitions read per query.
fn query_latency(
    store: &TantivyStore,
    samples: &[(String, ConnRecord)],
) -> Result<(f64, f64, usize, f64), Box<dyn std::error::Error>> {
    let mut lat = Vec::new();
    let mut found = 0;
    let mut parts_touched = 0usize;
    for (node, r) in samples {
        let q = snat_query(r);
        let t = Instant::now();
        let (res, st) = store.search_with_stats(&q)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        parts_touched += st.partitions.len();
        if res.hits.iter().any(|h| {
            &h.node == node
                && h.record.orig == r.orig
                && h.start_ns() == r.start_ns.unwrap_or(r.event_ns) / 1000 * 1000
        }) {
            found += 1;
        }
    }
    let parts = parts_touched as f64 / samples.len().max(1) as f64;
    Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99), found, parts))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: u64 = arg("--records").map_or(Ok(10_000_000), |v| v.parse())?;
    let batch: usize = arg("--batch").map_or(Ok(1000), |v| v.parse())?;
    let keep = args.iter().any(|a| a == "--keep");
    let dir = arg("--dir").map(Into::into).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ctw-store-bench-{}", std::process::id()))
    });
    let cfg = StoreOptions {
        path: dir,
        retention_days: 14,
        max_size_gb: 1000.0,
        // The defaults (config.rs).
        commit_interval_ms: 10_000,
        commit_max_records: 300_000,
        partition_hours: 24,
        lookback_hours: 24,
        max_collected_docs: 200_000,
        ..StoreOptions::default()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let t0_file = cfg.path.join("bench-t0");
    let query_only = args.iter().any(|a| a == "--query-only");
    let t0 = if query_only {
        std::fs::read_to_string(&t0_file)?.trim().parse()?
    } else {
        now - SPAN_NS - 3_600_000_000_000
    };
    let store = Arc::new(TantivyStore::open(cfg.clone())?);
    std::fs::write(&t0_file, t0.to_string())?;
    let mut gen = Gen::new(n, t0);
    if query_only {
        // The same records and samples as the run that stored them.
        let samples = feed(&mut gen, n, batch, "boot-1", |_| Ok::<(), StoreError>(()))?;
        let (q50, q99, found, parts) = query_latency(&store, &samples)?;
        println!(
            "exact snat ip:port ±5 min query p50 / p99: {q50:.2} ms / {q99:.2} ms ({found}/{} found, {parts:.1} partitions each)",
            samples.len()
        );
        return Ok(());
    }

    // Ingest: one writer thread.
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let samples = feed(&mut gen, n, batch, "boot-1", |b| {
        store.append(b).map(|_| ())
    })?;
    store.commit()?;
    let ingest_s = start.elapsed().as_secs_f64();
    let ingest_cpu = cpu_seconds() - cpu0;
    eprintln!(
        "ingested {n} in {ingest_s:.1}s, {:.0} records per CPU-s; merging",
        n as f64 / ingest_cpu.max(1e-9)
    );
    // As ingested (background merges only), as the store is in production.
    let (_, ingested_bytes) = store.space_usage()?;
    let segments = store.segment_count();
    // Exact snat ip:port + 10-minute window queries of existing records.
    let (q50, q99, found, parts_each) = query_latency(&store, &samples)?;
    // Pod-address queries (the second table).
    let (p50, p99) = pod_query_latency(store.as_ref(), &samples)?;
    let m0 = Instant::now();
    let c0 = cpu_seconds();
    store.force_merge()?;
    let (merge_s, merge_cpu) = (m0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    let (m50, m99, _, _) = query_latency(&store, &samples)?;
    let stats = store.stats();
    let (usage, index_bytes) = store.space_usage()?;

    // Time to searchable, with a background load of ~20k records/s.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let store = store.clone();
        let stop = stop.clone();
        let mut gen = Gen::new(n, t0);
        gen.i = n; // continue at the newest time
        std::thread::spawn(move || -> Result<(), String> {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let records = (0..1000).map(|_| gen.record(0)).collect();
                store
                    .append(StoredBatch {
                        node: "node-load".into(),
                        boot_id: "boot-1".into(),
                        seq,
                        records,
                    })
                    .map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
    };
    let mut tts = Vec::new();
    let mut probe_gen = Gen::new(n, t0);
    probe_gen.i = n;
    for k in 0..100u16 {
        let mut r = probe_gen.record(1);
        r.reply.dst = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1));
        r.reply.dst_port = 2000 + k;
        let q = SearchQuery {
            snat_ip: Some(r.reply.dst),
            snat_port: Some(r.reply.dst_port),
            node: Some("probe".into()),
            limit: 1,
            ..Default::default()
        };
        let t = Instant::now();
        store.append(StoredBatch {
            node: "probe".into(),
            boot_id: "b".into(),
            seq: k as u64,
            records: vec![r],
        })?;
        let deadline = t + Duration::from_secs(10);
        loop {
            if store.search(&q)?.total > 0 {
                tts.push(t.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline {
                tts.push(f64::INFINITY);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // a random phase of the commit cycle (commits stall appends)
        std::thread::sleep(Duration::from_millis(probe_gen.rng.u64(..1100)));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().map_err(|_| "load thread panicked")??;
    let (t50, t99) = (pct(&mut tts, 0.5), pct(&mut tts, 0.99));

    println!("\n### store_bench: {n} records, batch {batch}, {NODES} nodes, {PODS} pods, {SERVICES} services, 7 days\n");
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| ingest (single writer thread, WAL fsync per batch) | {:.0} records/s wall |",
        n as f64 / ingest_s
    );
    println!(
        "| ingest per CPU-second (process user+sys) | {:.0} records/s ({ingest_cpu:.1} CPU-s over {ingest_s:.1} s wall, 2 cores) |",
        n as f64 / ingest_cpu.max(1e-9)
    );
    println!(
        "| partitions / segments after ingest | {} / {segments} |",
        stats.partitions
    );
    println!(
        "| index bytes / record after ingest (background merges only) | {:.1} |",
        ingested_bytes as f64 / n as f64
    );
    println!(
        "| optional final merge to one segment per partition | {merge_s:.1} s wall, {merge_cpu:.1} CPU-s; ingest + final merge: {:.0} records per CPU-second |",
        n as f64 / (ingest_cpu + merge_cpu).max(1e-9)
    );
    println!(
        "| index bytes / record after the final merge | {:.1} |",
        index_bytes as f64 / n as f64
    );
    println!("| query p50 / p99 after the final merge | {m50:.2} ms / {m99:.2} ms |");
    println!(
        "| all bytes on disk / record (index + WAL tail + checkpoint) | {:.1} |",
        stats.bytes_on_disk as f64 / n as f64
    );
    println!(
        "| exact snat ip:port ±5 min query p50 / p99 | {q50:.2} ms / {q99:.2} ms ({found}/{} found, {:.1} partitions each) |",
        samples.len(),
        parts_each
    );
    println!("| pod address ±5 min query p50 / p99 (as ingested) | {p50:.2} ms / {p99:.2} ms |");
    println!("| time to searchable p50 / p99 (append to found; commits every 10 s or 300k records) | {t50:.1} ms / {t99:.1} ms |");
    println!("\nIndex bytes per record by field part:\n");
    println!("| field part | bytes/record |");
    println!("|---|---|");
    for (name, bytes) in usage.iter().take(30) {
        println!("| {name} | {:.2} |", *bytes as f64 / n as f64);
    }
    drop(store);
    if !keep {
        let _ = std::fs::remove_dir_all(&cfg.path);
    }
    Ok(())
}

//! Benchmark of the ClickHouse store against a running server, on the
//! same synthetic records as `store_bench` (the tantivy store): ingest
//! rate and collector CPU per record, bytes per record on disk (every
//! table), exact SNAT ip:port ± 5 min query latency, time to searchable.
//!
//! `cargo run --release -p ctw-collector --example clickhouse_bench -- --start 1 --records 1000000`
//! Options: `--records N`, `--batch N` (records per batch, default 1000),
//! `--database NAME` (default `ctw_bench_PID`: a new one each run),
//! either `--url URL` with `--server-pid PID` (a running server; its CPU
//! is measured) or `--start 1` (a private server started by the testkit,
//! like the tests do), `--start SxR` (a private ZooKeeper and S shards × R
//! replicas, the store in cluster mode: inserts through `Distributed`, the
//! quorum every replica), `--zstd` (with `--start 1`: the server compresses
//! parts with ZSTD level 1 instead of LZ4, a server setting that 18.16
//! has), `--streams N` (N threads append concurrently, like N agent
//! streams, default 1; the store coalesces their batches into one flush
//! per `--insert-interval-ms`, default 200: the table line "INSERT
//! queries" counts ClickHouse's `InsertQuery` event, with `--start 1`;
//! `--settle S` (with `--start 1`): after the queries, wait at most S
//! seconds until the server runs no merge of the database, then query
//! again. "append to ack" is each `append` call's latency, its wait for the flush
//! included).
//! The generator is `store_bench`'s (same seed, same spread).
//!
//! `--dump FILE` (with `--start 1`): after the run, merge each day of the
//! records table and the pod-address index into one part (`OPTIMIZE ...
//! FINAL`), print the compressed bytes per record of every column of both,
//! and write the stored records (`RowBinary`, the records table's columns
//! in order, the probe records left out) to FILE for
//! `bench/clickhouse_codecs.py`, which loads them into newer ClickHouse
//! (chdb) with codecs. `--ddl VERSION` prints the `CREATE` statements the
//! collector runs (one server) on a server whose `version()` is VERSION,
//! one per line, and exits.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use ctw_collector::config::ClickHouseConfig;
use ctw_collector::store::clickhouse::schema::{self, Features, Layout};
use ctw_collector::store::clickhouse::{ClickHouseStore, ClusterOptions};
use ctw_collector::store::{RecordStore, SearchQuery, StoredBatch};
use ctw_testkit::clickhouse::{ClickHouse, Cluster, CLUSTER};

#[path = "support/bench.rs"]
mod bench;
use bench::{
    cpu_seconds, cpu_seconds_of, feed, pct, pod_query_latency, snat_query, Gen, NODES, PODS,
    SERVICES, SPAN_NS,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: u64 = arg("--records").map_or(Ok(1_000_000), |v| v.parse())?;
    let batch: usize = arg("--batch").map_or(Ok(1000), |v| v.parse())?;
    let streams: usize = arg("--streams").map_or(Ok(1), |v| v.parse())?;
    let interval_ms: u64 = arg("--insert-interval-ms").map_or(Ok(200), |v| v.parse())?;
    let database = arg("--database").unwrap_or_else(|| format!("ctw_bench_{}", std::process::id()));
    if let Some(v) = arg("--ddl") {
        for sql in schema::create_statements(&database, &Layout::Single, Features::of_version(&v)) {
            println!("{sql}");
        }
        return Ok(());
    }
    let dump = arg("--dump");
    // Servers started here (dropped, so stopped, at the end).
    let mut single: Option<ClickHouse> = None;
    let mut cluster: Option<Cluster> = None;
    let mut pids: Vec<String> = arg("--server-pid").into_iter().collect();
    let mut url = arg("--url").unwrap_or_else(|| "http://127.0.0.1:8123".into());
    let mut layout = "one server".to_string();
    match arg("--start").as_deref() {
        None => {}
        Some("1") => {
            let ch = if args.iter().any(|a| a == "--zstd") {
                layout.push_str(", ZSTD(1) part compression");
                ClickHouse::start_with_config(
                    "  <compression><case><method>zstd</method><level>1</level></case></compression>\n",
                )
            } else {
                ClickHouse::start()
            };
            url = ch.url();
            pids = ch.pid().into_iter().map(|p| p.to_string()).collect();
            single = Some(ch);
        }
        Some(sxr) => {
            let (s, r) = sxr
                .split_once('x')
                .and_then(|(s, r)| Some((s.parse().ok()?, r.parse().ok()?)))
                .ok_or("--start: 1 or SHARDSxREPLICAS, e.g. 2x1")?;
            let c = Cluster::start(s, r);
            url = c.servers[0].url();
            pids = c
                .servers
                .iter()
                .filter_map(|ch| ch.pid().map(|p| p.to_string()))
                .collect();
            layout = format!(
                "cluster of {s} shard(s) x {r} replica(s), quorum {r}, inserts through Distributed"
            );
            cluster = Some(c);
        }
    }
    let cfg = ClickHouseConfig {
        url,
        database: database.clone(),
        user: "default".into(),
        password_file: None,
        retention_days: 36500,
        lookback_hours: 24,
        max_collected_records: 200_000,
        connect_retry_ms: 1000,
        timeout_ms: 600_000,
        insert_interval_ms: interval_ms,
        insert_max_records: 100_000,
        cluster: cluster.as_ref().map(|_| ClusterOptions {
            name: CLUSTER.into(),
            zookeeper_path: "/clickhouse/tables/{shard}".into(),
            insert_quorum: None,
            shards: Vec::new(),
        }),
    };
    let store = std::sync::Arc::new(ClickHouseStore::open(&cfg)?);
    let inserts = || {
        single.as_ref().and_then(|ch| {
            ch.must("SELECT value FROM system.events WHERE event = 'InsertQuery'")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let inserts0 = inserts();
    // `--streams` appenders, fed batches in generation order.
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<StoredBatch>(streams);
    let work_rx = std::sync::Arc::new(std::sync::Mutex::new(work_rx));
    let appenders: Vec<_> = (0..streams)
        .map(|_| {
            let (store, rx) = (store.clone(), work_rx.clone());
            // Returns each append's latency (call to ack), in ms.
            std::thread::spawn(move || -> Result<Vec<f64>, String> {
                let mut lat = Vec::new();
                loop {
                    let next = rx.lock().map_err(|e| e.to_string())?.recv();
                    let Ok(b) = next else { return Ok(lat) };
                    let t = Instant::now();
                    store.append(b).map_err(|e| e.to_string())?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            })
        })
        .collect();
    let version = store.server_version()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let t0 = now - SPAN_NS - 3_600_000_000_000;
    let mut gen = Gen::new(n, t0);
    let server_cpu =
        || (!pids.is_empty()).then(|| pids.iter().map(|p| cpu_seconds_of(p)).sum::<f64>());
    let server0 = server_cpu();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let samples = feed(&mut gen, n, batch, &format!("boot-{now}"), |b| {
        work_tx.send(b)
    })?;
    drop(work_tx);
    let mut ack_lat = Vec::new();
    for a in appenders {
        ack_lat.extend(a.join().map_err(|_| "an appender panicked")??);
    }
    let batches = ack_lat.len();
    let (a50, a99) = (pct(&mut ack_lat, 0.5), pct(&mut ack_lat, 0.99));
    let insert_queries = inserts().zip(inserts0).map(|(a, b)| a - b);
    let ingest_s = start.elapsed().as_secs_f64();
    let ingest_cpu = cpu_seconds() - cpu0;
    let server_ingest_cpu = server_cpu().zip(server0).map(|(a, b)| a - b);
    let stats = store.stats();
    let (q50, q99, found, p50, p99) = queries(&store, &samples)?;
    // `--settle S`: wait (at most S seconds) until the server runs no
    // merge of this database, then query again.
    let settle_s: u64 = arg("--settle").map_or(Ok(0), |v| v.parse())?;
    let settled = match (&single, settle_s) {
        (Some(ch), s) if s > 0 => {
            let t = Instant::now();
            let c0 = server_cpu().unwrap_or(0.0);
            let sql = format!("SELECT count() FROM system.merges WHERE database = '{database}'");
            while t.elapsed().as_secs() < s && ch.must(&sql).trim() != "0" {
                // tidy: a benchmark polling the server's merges once a second.
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            let waited = t.elapsed().as_secs_f64();
            let merge_cpu = server_cpu().unwrap_or(0.0) - c0;
            Some((waited, merge_cpu, queries(&store, &samples)?))
        }
        _ => None,
    };
    // Time to searchable: append one record, search until found.
    let mut tts = Vec::new();
    let mut probe_gen = Gen::new(n, t0);
    probe_gen.i = n;
    for k in 0..50u16 {
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
            boot_id: format!("b-{now}"),
            seq: k as u64,
            records: vec![r],
        })?;
        // Acked means searchable: one search, no polling.
        let ok = store.search(&q)?.total > 0;
        tts.push(if ok {
            t.elapsed().as_secs_f64() * 1e3
        } else {
            f64::INFINITY
        });
    }
    let (t50, t99) = (pct(&mut tts, 0.5), pct(&mut tts, 0.99));
    // Where the bytes are: compressed bytes per record of each column of
    // the records table (one copy: the first replica of each shard).
    let col_sizes = match &cluster {
        Some(c) => (0..c.shards)
            .map(|s| column_sizes(&c.servers[s * c.replicas], &database))
            .collect::<Vec<_>>(),
        None => single
            .as_ref()
            .map(|ch| vec![column_sizes(ch, &database)])
            .unwrap_or_default(),
    };
    let mut merged: std::collections::BTreeMap<String, u64> = Default::default();
    for (name, b) in col_sizes.into_iter().flatten() {
        *merged.entry(name).or_default() += b;
    }
    let mut cols: Vec<(String, u64)> = merged.into_iter().collect();
    cols.sort_by_key(|c| std::cmp::Reverse(c.1));
    let cols: Vec<String> = cols
        .iter()
        .take(10)
        .map(|(c, b)| format!("{c} {:.1}", *b as f64 / n as f64))
        .collect();
    println!("\n### clickhouse_bench: {n} records, batch {batch}, {NODES} nodes, {PODS} pods, {SERVICES} services, 7 days, ClickHouse {version}, {layout}\n");
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| ingest ({streams} writer(s), each waits for its batch's flush; flush every {interval_ms} ms at most) | {:.0} records/s wall, {:.0} records per collector CPU-second |",
        n as f64 / ingest_s,
        n as f64 / ingest_cpu.max(1e-9)
    );
    if let Some(q) = insert_queries {
        println!(
            "| INSERT queries during ingest (records and ledger) | {q} for {batches} batches: {:.1} per second |",
            q as f64 / ingest_s
        );
    }
    println!("| append to ack (one batch's `append` call, its flush's inserts confirmed) p50 / p99 | {a50:.1} ms / {a99:.1} ms |");
    if let Some(c) = server_ingest_cpu {
        println!(
            "| ClickHouse server CPU during ingest (inserts, view, merges so far) | {c:.1} CPU-s: {:.0} records per server CPU-second |",
            n as f64 / c.max(1e-9)
        );
    }
    println!(
        "| bytes per record on disk (every table: records, pod index, ledger, gaps) | {:.1} |",
        stats.bytes_on_disk as f64 / n as f64
    );
    println!("| exact snat ip:port ±5 min query p50 / p99 | {q50:.2} ms / {q99:.2} ms ({found}/{} found) |", samples.len());
    println!("| pod address ±5 min query p50 / p99 | {p50:.2} ms / {p99:.2} ms |");
    if let Some((waited, merge_cpu, (s50, s99, sfound, sp50, sp99))) = settled {
        println!("| merges after ingest (`--settle`: until none runs) | {waited:.0} s wall, {merge_cpu:.1} server CPU-s |");
        println!("| after the merges: exact snat ip:port query p50 / p99; pod address p50 / p99 | {s50:.2} ms / {s99:.2} ms ({sfound}/{} found); {sp50:.2} ms / {sp99:.2} ms |", samples.len());
    }
    println!(
        "| time to searchable p50 / p99 (append acked to found) | {t50:.1} ms / {t99:.1} ms |"
    );
    if !cols.is_empty() {
        println!(
            "| records table, compressed bytes per record of its largest columns | {} |",
            cols.join(", ")
        );
    }
    if let (Some(file), Some(ch)) = (&dump, &single) {
        println!();
        dump_records(ch, &database, file, n)?;
    }
    store.close();
    drop(cluster);
    drop(single);
    Ok(())
}

/// (column, compressed bytes) of the records table on server `ch`.
fn column_sizes(ch: &ClickHouse, db: &str) -> Vec<(String, u64)> {
    let sql = format!(
        "SELECT name, data_compressed_bytes FROM system.columns WHERE database = '{db}' \
         AND table IN ('ctw_records', 'ctw_records_local') AND data_compressed_bytes > 0 FORMAT TSV"
    );
    ch.query(&sql)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (n, b) = l.split_once('\t')?;
            Some((n.to_string(), b.parse().ok()?))
        })
        .collect()
}

/// `--dump`: merge each day of the records table and the pod index into
/// one part, print every column's compressed bytes per record (`n`
/// records) and write the stored records (not the probes) as `RowBinary`
/// to `file`.
fn dump_records(
    ch: &ClickHouse,
    db: &str,
    file: &str,
    n: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    for table in [schema::RECORDS, schema::BY_POD] {
        let days = ch.query(&format!(
            "SELECT DISTINCT partition_id FROM system.parts WHERE database = '{db}' \
             AND table = '{table}' AND active FORMAT TSV"
        ))?;
        for day in days.lines() {
            ch.query(&format!(
                "OPTIMIZE TABLE {db}.{table} PARTITION ID '{day}' FINAL"
            ))?;
        }
        let cols = ch.query(&format!(
            "SELECT name, data_compressed_bytes FROM system.columns WHERE database = '{db}' \
             AND table = '{table}' FORMAT TSV"
        ))?;
        let parts = ch.query(&format!(
            "SELECT count(), sum(bytes) FROM system.parts WHERE database = '{db}' \
             AND table = '{table}' AND active FORMAT TSV"
        ))?;
        println!(
            "{table} after OPTIMIZE FINAL (parts, bytes on disk): {}",
            parts.trim()
        );
        println!("| column | compressed bytes per record |");
        println!("|---|---|");
        let mut total = 0u64;
        for l in cols.lines() {
            if let Some((c, b)) = l.split_once('\t') {
                let b: u64 = b.parse()?;
                total += b;
                println!("| {c} | {:.3} |", b as f64 / n as f64);
            }
        }
        println!("| total | {:.3} |\n", total as f64 / n as f64);
    }
    let sql = format!(
        "SELECT {} FROM {db}.{} WHERE node != 'probe' FORMAT RowBinary",
        schema::RECORD_COLUMNS.join(", "),
        schema::RECORDS
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "-o",
            file,
            "--data-binary",
            &sql,
            &ch.url(),
        ])
        .output()?;
    if !out.status.success() {
        return Err(format!("dump: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    println!(
        "records written to {file} (RowBinary, {} bytes)",
        std::fs::metadata(file)?.len()
    );
    Ok(())
}

/// (SNAT query p50, p99 in ms, samples found, pod query p50, p99 in ms).
type QueryLatencies = (f64, f64, usize, f64, f64);

/// Exact SNAT ip:port ± 5 min queries of every sample and pod-address
/// ± 5 min queries of the first 200: (SNAT p50, p99 in ms, samples found,
/// pod p50, p99 in ms).
fn queries(
    store: &ClickHouseStore,
    samples: &[(String, ctw_common::ConnRecord)],
) -> Result<QueryLatencies, Box<dyn std::error::Error>> {
    let mut lat = Vec::new();
    let mut found = 0;
    for (node, r) in samples {
        let q = snat_query(r);
        let t = Instant::now();
        let res = store.search(&q)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if res
            .hits
            .iter()
            .any(|h| &h.node == node && h.record.orig == r.orig)
        {
            found += 1;
        }
    }
    let (q50, q99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    // Pod-address queries (the second table).
    let (p50, p99) = pod_query_latency(store, samples)?;
    Ok((q50, q99, found, p50, p99))
}

//! The ClickHouse store in cluster mode (`storage.cluster`) against real
//! servers: a private ZooKeeper (Debian's `zookeeperd` jars) and Debian's
//! `clickhouse-server` 18.16, several per test, started by the testkit on
//! loopback ports with a generated `remote_servers`. Two shards: the
//! conformance suite (same answers as `MemStore`), every record on exactly
//! one shard (by SNAT address), exactly once across collectors that talk
//! to different shards. A replica pair: a replica killed with SIGKILL
//! while batches arrive: with `insert_quorum` 2 nothing is acked until it
//! is back; with the quorum off inserts go on; nothing lost or doubled.
//! Shards of weights 2:1: direct inserts land where `Distributed` puts
//! the same rows. Direct inserts on a replica pair: a refused flush is not
//! failed over to the other replica (acked batches stay searchable).

#![allow(clippy::unwrap_used)]

mod conformance;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use conformance::*;
use ctw_collector::config::{ClickHouseConfig, Storage};
use ctw_collector::store::clickhouse::{ClickHouseStore, ClusterOptions};
use ctw_collector::store::{self, AppendOutcome, MemStore, RecordStore, SearchQuery, StoredBatch};
use ctw_testkit::clickhouse::{self, ClickHouse, Cluster, CLUSTER};
use ctw_testkit::wait_for;

/// Starts a cluster, or says why the test is skipped.
fn cluster(shards: usize, replicas: usize) -> Option<Cluster> {
    if !clickhouse::cluster_available() {
        ctw_testkit::skip(
            "needs clickhouse-server and zookeeperd (apt-get install clickhouse-server zookeeperd)",
        );
        return None;
    }
    Some(Cluster::start(shards, replicas))
}

fn cfg(ch: &ClickHouse, db: &str, insert_quorum: Option<u32>) -> ClickHouseConfig {
    ClickHouseConfig {
        url: ch.url(),
        database: db.into(),
        user: "default".into(),
        password_file: None,
        retention_days: 36500,
        lookback_hours: 3,
        max_collected_records: 200_000,
        connect_retry_ms: 100,
        timeout_ms: 20_000,
        insert_interval_ms: 200,
        insert_max_records: 100_000,
        cluster: Some(ClusterOptions {
            name: CLUSTER.into(),
            zookeeper_path: "/clickhouse/tables/{shard}".into(),
            insert_quorum,
            shards: Vec::new(),
        }),
    }
}

fn count(ch: &ClickHouse, sql: &str) -> u64 {
    ch.must(sql).trim().parse().unwrap()
}

/// Distinct SNAT addresses (hex) in a server's local records table.
fn snat_addresses(ch: &ClickHouse, db: &str) -> HashSet<String> {
    ch.must(&format!(
        "SELECT DISTINCT hex(snat_ip) FROM {db}.ctw_records_local"
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

fn everything() -> SearchQuery {
    SearchQuery {
        limit: 1_000_000,
        ..Default::default()
    }
}

/// Batch `seq` of node `node`: `n` records of pods 198.18.1.x behind SNAT
/// addresses 198.18.0.1-8 (several, so both shards get some).
fn pod_batch(node: &str, seq: u64, n: u64) -> StoredBatch {
    let records = (0..n)
        .map(|i| {
            rec(
                BASE + seq * MIN + i * 1000,
                IpAddr::V4(Ipv4Addr::new(198, 18, 1, (i % 200) as u8)),
                10_000 + i as u16,
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1 + (i % 8) as u8)),
                30_000 + (seq * n + i) as u16,
            )
        })
        .collect();
    batch(node, seq, records)
}

/// Two shards: the same answers as `MemStore` on random data (through
/// the `Distributed` tables), each record stored on exactly one shard,
/// records of one SNAT address on one shard only.
#[test]
fn two_shards_give_the_same_answers_as_memstore() {
    let Some(c) = cluster(2, 1) else { return };
    let (s0, s1) = (&c.servers[0], &c.servers[1]);
    let store = store::open(Storage::ClickHouse(cfg(s0, "ctw_equiv", None)).backend()).unwrap();
    assert!(store.ready());
    random_equivalence(store.as_ref(), 3, 300, &mut |_| {});
    let total = count(s0, "SELECT count() FROM ctw_equiv.ctw_records");
    let (n0, n1) = (
        count(s0, "SELECT count() FROM ctw_equiv.ctw_records_local"),
        count(s1, "SELECT count() FROM ctw_equiv.ctw_records_local"),
    );
    assert!(total > 3000, "{total}");
    assert!(n0 > 0 && n1 > 0, "both shards hold records: {n0} {n1}");
    assert_eq!(n0 + n1, total, "each record on one shard");
    assert_eq!(store.stats().records, total);
    let (a0, a1) = (
        snat_addresses(s0, "ctw_equiv"),
        snat_addresses(s1, "ctw_equiv"),
    );
    assert!(a0.is_disjoint(&a1), "{a0:?} {a1:?}");
    // The pod index sits with its records (the view runs on each shard).
    for s in [s0, s1] {
        assert_eq!(
            count(s, "SELECT count() FROM ctw_equiv.ctw_records_by_pod_local"),
            count(s, "SELECT count() FROM ctw_equiv.ctw_records_local"),
        );
    }
    store.close();

    // Direct inserts into the local tables (`storage.cluster.shards`): the
    // same answers, and every row on the shard `Distributed` chooses (two
    // shards of weight 1: cityHash64 of the sharding key modulo 2, shard
    // 1 first), asked of the servers themselves.
    let mut direct = cfg(s1, "ctw_direct", None);
    direct.cluster.as_mut().unwrap().shards = vec![vec![s0.url()], vec![s1.url()]];
    let store = store::open(Storage::ClickHouse(direct.clone()).backend()).unwrap();
    assert!(store.ready());
    random_equivalence(store.as_ref(), 3, 300, &mut |_| {});
    let total = count(s0, "SELECT count() FROM ctw_direct.ctw_records");
    assert!(total > 3000, "{total}");
    assert_eq!(store.stats().records, total);
    let mut ledger = 0;
    for (i, s) in [s0, s1].into_iter().enumerate() {
        let here = |table: &str, key: &str| {
            let all = count(s, &format!("SELECT count() FROM ctw_direct.{table}_local"));
            let wrong = count(
                s,
                &format!(
                    "SELECT count() FROM ctw_direct.{table}_local WHERE cityHash64({key}) % 2 != {i}"
                ),
            );
            assert_eq!(
                wrong,
                0,
                "{table} on shard {}: rows of another shard",
                i + 1
            );
            all
        };
        assert!(
            here("ctw_records", "snat_ip") > 0,
            "shard {} holds records",
            i + 1
        );
        ledger += here("ctw_batches", "node");
        assert_eq!(
            here("ctw_records_by_pod", "snat_ip"),
            here("ctw_records", "snat_ip"),
            "the pod index sits with its records"
        );
    }
    assert_eq!(
        ledger,
        count(s0, "SELECT count() FROM ctw_direct.ctw_batches")
    );
    assert!(ledger > 0);
    store.close();
    // A list that does not match the cluster is refused, naming the fault.
    for (shards, want) in [
        (
            vec![vec![s1.url()], vec![s0.url()]],
            "storage.cluster.shards[0]",
        ),
        (vec![vec![s0.url()]], "lists 1 shard(s) but cluster"),
    ] {
        let mut bad = direct.clone();
        bad.cluster.as_mut().unwrap().shards = shards;
        let e = ClickHouseStore::open(&bad).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// Collectors talking to different shards share one ledger: a batch
/// stored through one is a duplicate through the other (the agent's replay
/// after a failover). A missing cluster and a single-server database are
/// refused with clear messages.
#[test]
fn exactly_once_across_collectors_on_different_shards() {
    let Some(c) = cluster(2, 1) else { return };
    let (s0, s1) = (&c.servers[0], &c.servers[1]);
    let a = ClickHouseStore::open(&cfg(s0, "ctw_once", None)).unwrap();
    let b = ClickHouseStore::open(&cfg(s1, "ctw_once", None)).unwrap();
    let mem = MemStore::default();
    for seq in 0..5 {
        for node in ["n1", "n2", "n3"] {
            assert_eq!(
                a.append(pod_batch(node, seq, 40)).unwrap(),
                AppendOutcome::Stored
            );
            mem.append(pod_batch(node, seq, 40)).unwrap();
        }
    }
    for seq in 0..5 {
        for node in ["n1", "n2", "n3"] {
            assert_eq!(
                b.append(pod_batch(node, seq, 40)).unwrap(),
                AppendOutcome::Duplicate,
                "{node} {seq}"
            );
        }
    }
    assert_eq!(
        b.append(pod_batch("n1", 5, 40)).unwrap(),
        AppendOutcome::Stored
    );
    mem.append(pod_batch("n1", 5, 40)).unwrap();
    let want = mem.search(&everything()).unwrap();
    assert_eq!(want.total, 16 * 40);
    for s in [&a, &b] {
        let got = s.search(&everything()).unwrap();
        assert_eq!(got.total, want.total);
        assert_eq!(canonical(got.hits), canonical(want.hits.clone()));
    }
    let rows = |sql: &str| count(s0, sql) + count(s1, sql);
    assert_eq!(
        rows("SELECT count() FROM ctw_once.ctw_records_local"),
        16 * 40
    );
    assert_eq!(rows("SELECT count() FROM ctw_once.ctw_batches_local"), 16);
    // A node's ledger rows live on one shard.
    for node in ["n1", "n2", "n3"] {
        let on = |s: &ClickHouse| {
            count(
                s,
                &format!("SELECT count() FROM ctw_once.ctw_batches_local WHERE node = '{node}'"),
            )
        };
        assert!(on(s0) == 0 || on(s1) == 0, "{node}");
    }
    // Retention drops the old days on every shard (ON CLUSTER).
    let mut short = cfg(s1, "ctw_once", None);
    short.retention_days = 2;
    let r = ClickHouseStore::open(&short).unwrap();
    r.append(pod_batch("n9", 0, 4)).unwrap();
    let mut late = pod_batch("n9", 1, 4);
    for x in &mut late.records {
        x.event_ns += 5 * 24 * H;
        x.start_ns = Some(x.event_ns);
    }
    r.append(late).unwrap();
    assert!(r.enforce_retention(BASE + 5 * 24 * H).unwrap() >= 1);
    assert_eq!(r.search(&everything()).unwrap().total, 4);
    assert_eq!(rows("SELECT count() FROM ctw_once.ctw_records_local"), 4);
    // Refused: a cluster the server does not know; a database written by a
    // single-server collector.
    let mut bad = cfg(s0, "ctw_x", None);
    if let Some(cl) = bad.cluster.as_mut() {
        cl.name = "nope".into();
    }
    let e = ClickHouseStore::open(&bad).unwrap_err().to_string();
    assert!(
        e.contains("\"nope\"") && e.contains("remote_servers"),
        "{e}"
    );
    let mut single = cfg(s0, "ctw_single", None);
    single.cluster = None;
    ClickHouseStore::open(&single).unwrap().close();
    let e = ClickHouseStore::open(&cfg(s0, "ctw_single", None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("MergeTree") && e.contains("Distributed"), "{e}");
    let e = ClickHouseStore::open(&cfg(s0, "ctw_q", Some(3)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("insert_quorum is 3"), "{e}");
}

/// One shard, two replicas; two databases, one written with
/// `insert_quorum` 2 (the default: every replica), one with the quorum
/// off. With the quorum an acked batch is on both replicas at the ack.
/// Replica 2 killed (SIGKILL): with the quorum appends fail (the agent
/// keeps the batch and replays it); without, they go on. Replica 2 back:
/// it catches up, the replayed batch is stored, and in both databases
/// every record is on each replica exactly once.
#[test]
fn replica_killed_quorum_holds_acks_and_nothing_is_lost_or_doubled() {
    let Some(mut c) = cluster(1, 2) else { return };
    let mut strict = cfg(&c.servers[0], "ctw_q2", None);
    strict.timeout_ms = 4000;
    let a = ClickHouseStore::open(&strict).unwrap();
    let b = ClickHouseStore::open(&cfg(&c.servers[0], "ctw_q0", Some(0))).unwrap();
    let mem = MemStore::default();
    let local = |db: &str| format!("SELECT count() FROM {db}.ctw_records_local");
    for seq in 0..3 {
        for s in [&a, &b] {
            assert_eq!(
                s.append(pod_batch("n1", seq, 50)).unwrap(),
                AppendOutcome::Stored
            );
        }
        mem.append(pod_batch("n1", seq, 50)).unwrap();
        // Acked with the quorum: on both replicas already.
        assert_eq!(count(&c.servers[1], &local("ctw_q2")), (seq + 1) * 50);
    }
    c.server(0, 1).stop();
    let e = a.append(pod_batch("n1", 3, 50)).unwrap_err().to_string();
    assert!(e.contains("clickhouse"), "{e}");
    eprintln!("with one replica down, quorum 2: {e}");
    // Quorum off: stored on the replica that is up.
    assert_eq!(
        b.append(pod_batch("n1", 3, 50)).unwrap(),
        AppendOutcome::Stored
    );
    mem.append(pod_batch("n1", 3, 50)).unwrap();
    c.server(0, 1).restart();
    // The agent replays the batch that was not acked until it is.
    let outcome = wait_for(Duration::from_secs(60), "the replayed batch stored", || {
        a.append(pod_batch("n1", 3, 50)).ok()
    });
    assert_eq!(outcome, AppendOutcome::Stored);
    for s in [&a, &b] {
        assert_eq!(
            s.append(pod_batch("n1", 3, 50)).unwrap(),
            AppendOutcome::Duplicate
        );
    }
    let want = mem.search(&everything()).unwrap();
    assert_eq!(want.total, 200);
    for (db, s) in [("ctw_q2", &a), ("ctw_q0", &b)] {
        wait_for(Duration::from_secs(60), "replica 2 caught up", || {
            (c.servers[1].query(&local(db)).ok()?.trim() == "200").then_some(())
        });
        for ch in &c.servers {
            assert_eq!(count(ch, &local(db)), 200, "{db}: every record once");
            assert_eq!(
                count(
                    ch,
                    &format!("SELECT count() FROM (SELECT DISTINCT * FROM {db}.ctw_records_local)")
                ),
                200,
                "{db}"
            );
        }
        let got = s.search(&everything()).unwrap();
        assert_eq!(got.total, 200, "{db}");
        assert_eq!(canonical(got.hits), canonical(want.hits.clone()), "{db}");
    }

    // Direct inserts (`storage.cluster.shards`) go on through the other
    // replica when the one they used is killed; it catches up afterwards.
    let mut direct = cfg(&c.servers[1], "ctw_qd", Some(0));
    direct.cluster.as_mut().unwrap().shards = vec![vec![c.servers[0].url(), c.servers[1].url()]];
    let d = ClickHouseStore::open(&direct).unwrap();
    let mem = MemStore::default();
    for seq in 0..4 {
        if seq == 2 {
            c.server(0, 0).stop();
        }
        assert_eq!(
            d.append(pod_batch("n1", seq, 50)).unwrap(),
            AppendOutcome::Stored,
            "batch {seq}"
        );
        mem.append(pod_batch("n1", seq, 50)).unwrap();
    }
    c.server(0, 0).restart();
    // Both replicas: replica 2 may still have been fetching replica 1's
    // last parts when replica 1 was killed (no quorum).
    wait_for(Duration::from_secs(60), "both replicas caught up", || {
        c.servers
            .iter()
            .all(|ch| {
                let ledger = ch.query("SELECT count() FROM ctw_qd.ctw_batches_local");
                ch.query(&local("ctw_qd")).is_ok_and(|n| n.trim() == "200")
                    && ledger.is_ok_and(|n| n.trim() == "4")
            })
            .then_some(())
    });
    for ch in &c.servers {
        assert_eq!(count(ch, &local("ctw_qd")), 200, "every record once");
        assert_eq!(
            count(ch, "SELECT count() FROM ctw_qd.ctw_batches_local"),
            4,
            "every ledger row once"
        );
    }
    let got = d.search(&everything()).unwrap();
    assert_eq!(got.total, 200);
    assert_eq!(
        canonical(got.hits),
        canonical(mem.search(&everything()).unwrap().hits)
    );
}

/// Shards of weights 2 and 1: direct inserts (`storage.cluster.shards`)
/// put every record and ledger row on the shard a real `Distributed`
/// insert of the same rows chooses (the same batches written through the
/// `Distributed` tables of another database). SNAT addresses: 48 IPv4,
/// 16 IPv6, and IPv4-mapped IPv6 twins of 8 of the IPv4 ones (the same 16
/// bytes: the same shard, answered apart by family).
#[test]
fn weighted_shards_direct_inserts_land_where_distributed_puts_them() {
    if !clickhouse::cluster_available() {
        ctw_testkit::skip(
            "needs clickhouse-server and zookeeperd (apt-get install clickhouse-server zookeeperd)",
        );
        return;
    }
    let c = Cluster::start_weighted(&[2, 1], 1);
    let (s0, s1) = (&c.servers[0], &c.servers[1]);
    let via = ClickHouseStore::open(&cfg(s0, "ctw_wdist", None)).unwrap();
    let mut direct = cfg(s0, "ctw_wdirect", None);
    direct.cluster.as_mut().unwrap().shards = vec![vec![s0.url()], vec![s1.url()]];
    let direct = ClickHouseStore::open(&direct).unwrap();
    let snat = |i: u64| -> IpAddr {
        match i % 80 {
            k @ 0..48 => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1 + k as u8)),
            k @ 48..64 => IpAddr::V6(format!("fd00::{:x}", k).parse().unwrap()),
            k => IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1 + (k - 64) as u8).to_ipv6_mapped()),
        }
    };
    let mem = MemStore::default();
    for node in 0..12u64 {
        let records = (0..80)
            .map(|i| {
                // One family per connection, as the kernel keeps it.
                let pod = match snat(i) {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(198, 18, 1, i as u8)),
                    IpAddr::V6(_) => IpAddr::V6(format!("fd00::1:{i:x}").parse().unwrap()),
                };
                rec(
                    BASE + node * MIN + i * 1000,
                    pod,
                    10_000 + i as u16,
                    snat(i),
                    30_000 + node as u16,
                )
            })
            .collect::<Vec<_>>();
        let b = batch(&format!("node-{node}"), 0, records);
        assert_eq!(via.append(b.clone()).unwrap(), AppendOutcome::Stored);
        assert_eq!(direct.append(b.clone()).unwrap(), AppendOutcome::Stored);
        mem.append(b).unwrap();
    }
    let placed = |s: &ClickHouse, db: &str, sql: &str| -> Vec<String> {
        let mut v: Vec<String> = s
            .must(&sql.replace("DB", db))
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    for (i, s) in [s0, s1].into_iter().enumerate() {
        for sql in [
            "SELECT hex(snat_ip), count() FROM DB.ctw_records_local GROUP BY snat_ip",
            "SELECT node, count() FROM DB.ctw_batches_local GROUP BY node",
        ] {
            let want = placed(s, "ctw_wdist", sql);
            assert!(!want.is_empty(), "shard {} holds rows: {sql}", i + 1);
            assert_eq!(
                placed(s, "ctw_wdirect", sql),
                want,
                "shard {}: {sql}",
                i + 1
            );
        }
    }
    let want = mem.search(&everything()).unwrap();
    assert_eq!(want.total, 12 * 80);
    let want = canonical(want.hits);
    for (name, s) in [("distributed", &via), ("direct", &direct)] {
        let got = s.search(&everything()).unwrap();
        assert_eq!(got.total, 12 * 80, "{name}");
        let got = canonical(got.hits);
        let extra: Vec<_> = got.iter().filter(|h| !want.contains(h)).collect();
        let missing: Vec<_> = want.iter().filter(|h| !got.contains(h)).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{name}: {} extra, {} missing; first extra {:?}; first missing {:?}",
            extra.len(),
            missing.len(),
            extra.first(),
            missing.first()
        );
    }
}

/// Direct inserts into one shard of two replicas, and a view on each
/// replica's local records table that refuses node `n13`'s rows (as the
/// single-server refusal test does; named to run before the pod index's
/// view): the flush of n10-n12 and n13 is refused, n13 fails alone (the
/// refusal is not sent to the other replica, which would take the block
/// as a duplicate of the part the first wrote and run no view), and every
/// acked batch's records are found by a pod-address search (through the
/// pod index).
#[test]
fn direct_refused_flush_on_replicas_keeps_acked_batches_searchable() {
    let Some(c) = cluster(1, 2) else { return };
    let (r1, r2) = (&c.servers[0], &c.servers[1]);
    let mut direct = cfg(r1, "ctw_refdir", None);
    direct.insert_interval_ms = 300;
    direct.cluster.as_mut().unwrap().shards = vec![vec![r1.url(), r2.url()]];
    let store = ClickHouseStore::open(&direct).unwrap();
    for r in [r1, r2] {
        r.must(
            "CREATE MATERIALIZED VIEW ctw_refdir.a_refuse_n13 ENGINE = Memory \
             AS SELECT throwIf(node = 'n13') AS refused FROM ctw_refdir.ctw_records_local",
        );
    }
    let batches: Vec<_> = ["n10", "n11", "n12", "n13"]
        .into_iter()
        .map(|n| pod_batch(n, 0, 20))
        .collect();
    let (done, e) = store.append_many(batches);
    eprintln!("outcomes {done:?}, error {e:?}");
    for r in [r1, r2] {
        eprintln!(
            "{}: records {} pod index {}",
            r.url(),
            r.must("SELECT count() FROM ctw_refdir.ctw_records_local")
                .trim(),
            r.must("SELECT count() FROM ctw_refdir.ctw_records_by_pod_local")
                .trim()
        );
    }
    let mem = MemStore::default();
    for n in ["n10", "n11", "n12"] {
        mem.append(pod_batch(n, 0, 20)).unwrap();
    }
    for i in 0..20u8 {
        let q = SearchQuery {
            src_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 18, 1, i))),
            ..everything()
        };
        let want = mem.search(&q).unwrap();
        let got = store.search(&q).unwrap();
        let nodes = |hits: &[store::Hit]| {
            let mut v: Vec<String> = hits
                .iter()
                .map(|h| h.node.clone())
                .filter(|n| n != "n13")
                .collect();
            v.sort();
            v
        };
        assert_eq!(nodes(&got.hits), nodes(&want.hits), "pod 198.18.1.{i}");
    }
    assert_eq!(done, [AppendOutcome::Stored; 3]);
    let e = e.expect("n13 refused").to_string();
    assert!(e.contains("Code: 395"), "{e}");
}

/// Two shards through `Distributed`: the other shard down for a moment
/// (stopped, started again while the first attempts fail) delays the ack
/// instead of failing the batch (the flush is tried again for up to
/// `timeout_ms`), and the batch is stored once.
#[test]
fn a_short_outage_of_another_shard_delays_the_ack() {
    let Some(mut c) = cluster(2, 1) else { return };
    let conf = cfg(&c.servers[0], "ctw_out", None);
    let store = std::sync::Arc::new(ClickHouseStore::open(&conf).unwrap());
    c.server(1, 0).stop();
    let s = store.clone();
    let t0 = std::time::Instant::now();
    let append = std::thread::spawn(move || s.append(pod_batch("n1", 0, 40)));
    // tidy: the outage has to outlast the append's first attempt.
    std::thread::sleep(Duration::from_millis(1500));
    let early = append.is_finished();
    c.server(1, 0).restart();
    let got = append.join().unwrap();
    assert!(
        !early && matches!(got, Ok(AppendOutcome::Stored)),
        "after {:?} (early: {early}): {got:?}",
        t0.elapsed()
    );
    assert_eq!(store.search(&everything()).unwrap().total, 40);
}

/// Direct inserts, one shard of two replicas, `insert_quorum` 2 (every
/// replica): replica 2 alive but fetching nothing (`SYSTEM STOP FETCHES`),
/// so replica 1's insert waits for the quorum in vain. The batch must not
/// be acked while replica 2 lacks its records.
#[test]
fn direct_quorum_unmet_is_not_acked() {
    let Some(c) = cluster(1, 2) else { return };
    let (r1, r2) = (&c.servers[0], &c.servers[1]);
    let mut direct = cfg(r1, "ctw_qdir", None);
    direct.timeout_ms = 6000;
    direct.cluster.as_mut().unwrap().shards = vec![vec![r1.url(), r2.url()]];
    let store = ClickHouseStore::open(&direct).unwrap();
    assert!(store.ready());
    r2.must("SYSTEM STOP FETCHES ctw_qdir.ctw_records_local");
    let got = store.append(pod_batch("n1", 0, 30));
    let on_r2 = count(r2, "SELECT count() FROM ctw_qdir.ctw_records_local");
    eprintln!("quorum unmet: {got:?}, {on_r2} on replica 2");
    assert!(
        got.is_err() || on_r2 == 30,
        "acked {got:?} with {on_r2} of 30 records on replica 2"
    );
}

/// Direct inserts: node names with characters SQL literals escape (the
/// ledger's sharding key is asked of the server as a literal) are stored,
/// found, and a duplicate is told.
#[test]
fn direct_inserts_take_node_names_that_need_escaping() {
    let Some(c) = cluster(2, 1) else { return };
    let (s0, s1) = (&c.servers[0], &c.servers[1]);
    let mut direct = cfg(s0, "ctw_names", None);
    direct.timeout_ms = 4000;
    direct.cluster.as_mut().unwrap().shards = vec![vec![s0.url()], vec![s1.url()]];
    let store = ClickHouseStore::open(&direct).unwrap();
    let names = ["a?b", "o'k", "back\\slash", "tab\there", "ünï", "q?'\\?"];
    for (i, n) in names.iter().enumerate() {
        let got = store.append(pod_batch(n, 0, 4));
        assert!(matches!(got, Ok(AppendOutcome::Stored)), "{n:?}: {got:?}");
        let again = store.append(pod_batch(n, 0, 4));
        assert!(
            matches!(again, Ok(AppendOutcome::Duplicate)),
            "{n:?}: {again:?}"
        );
        assert_eq!(
            store.search(&everything()).unwrap().total,
            4 * (i as u64 + 1)
        );
    }
}

/// Direct inserts: a batch whose records have 6,000 distinct SNAT
/// addresses (the hashes of keys not met before are asked of the server
/// in one query) is stored and found.
#[test]
fn direct_inserts_take_a_batch_of_many_snat_addresses() {
    let Some(c) = cluster(2, 1) else { return };
    let (s0, s1) = (&c.servers[0], &c.servers[1]);
    let mut direct = cfg(s0, "ctw_many", None);
    direct.cluster.as_mut().unwrap().shards = vec![vec![s0.url()], vec![s1.url()]];
    let store = ClickHouseStore::open(&direct).unwrap();
    let records = (0..6000u64)
        .map(|i| {
            rec(
                BASE + i * 1000,
                IpAddr::V6(format!("fd00::1:{i:x}").parse().unwrap()),
                10_000,
                IpAddr::V6(format!("fd00::2:{i:x}").parse().unwrap()),
                30_000,
            )
        })
        .collect();
    let t0 = std::time::Instant::now();
    let got = store.append(batch("n1", 0, records));
    eprintln!("6000 SNAT addresses: {got:?} in {:?}", t0.elapsed());
    assert!(matches!(got, Ok(AppendOutcome::Stored)), "{got:?}");
    assert_eq!(store.search(&everything()).unwrap().total, 6000);
}

/// Direct inserts, two shards: shard 2's local records table detached (its
/// inserts fail with an error worth retrying) while shard 1 takes its part
/// of a flush. Reattached during the retries: the batch is acked and each
/// record is stored once (shard 1 drops the repeated block). Reattached
/// only after the append failed, and the agent's replay sent to another
/// collector: stored once too.
#[test]
fn direct_partial_flush_retried_or_replayed_elsewhere_is_stored_once() {
    let Some(c) = cluster(2, 1) else { return };
    let (s0, s1) = (&c.servers[0], &c.servers[1]);
    let shards = vec![vec![s0.url()], vec![s1.url()]];
    let mut ca = cfg(s0, "ctw_part", None);
    ca.timeout_ms = 3000;
    ca.cluster.as_mut().unwrap().shards = shards.clone();
    let mut cb = cfg(s1, "ctw_part", None);
    cb.cluster.as_mut().unwrap().shards = shards;
    let a = std::sync::Arc::new(ClickHouseStore::open(&ca).unwrap());
    let b = ClickHouseStore::open(&cb).unwrap();
    let raw = |node: &str| {
        let sql = format!("SELECT count() FROM ctw_part.ctw_records_local WHERE node = '{node}'");
        (count(s0, &sql), count(s1, &sql))
    };
    s1.must("DETACH TABLE ctw_part.ctw_records_local");
    let a2 = a.clone();
    let append = std::thread::spawn(move || a2.append(pod_batch("n1", 0, 40)));
    // tidy: the detach has to outlast the append's first attempt.
    std::thread::sleep(Duration::from_millis(1000));
    s1.must("ATTACH TABLE ctw_part.ctw_records_local");
    let got = append.join().unwrap();
    assert!(matches!(got, Ok(AppendOutcome::Stored)), "{got:?}");
    let (n0, n1) = raw("n1");
    assert!(n0 > 0 && n1 > 0, "both shards: {n0} {n1}");
    assert_eq!(n0 + n1, 40, "retried: each record once");
    s1.must("DETACH TABLE ctw_part.ctw_records_local");
    let e = a.append(pod_batch("n2", 0, 40));
    assert!(e.is_err(), "{e:?}");
    s1.must("ATTACH TABLE ctw_part.ctw_records_local");
    assert_eq!(
        b.append(pod_batch("n2", 0, 40)).unwrap(),
        AppendOutcome::Stored
    );
    let (n0, n1) = raw("n2");
    assert_eq!(
        n0 + n1,
        40,
        "replayed elsewhere: each record once ({n0} + {n1})"
    );
    assert_eq!(b.search(&everything()).unwrap().total, 80);
}

/// Through `Distributed`, one shard of two replicas: the pod index's local
/// table detached (the insert fails with an error worth retrying) and
/// attached again during the retries. The acked batch is found by a
/// pod-address search, its pod-index rows stored once.
#[test]
fn retried_flush_after_a_view_failure_keeps_the_pod_index() {
    let Some(c) = cluster(1, 2) else { return };
    let store =
        std::sync::Arc::new(ClickHouseStore::open(&cfg(&c.servers[0], "ctw_pi", None)).unwrap());
    for r in &c.servers {
        r.must("DETACH TABLE ctw_pi.ctw_records_by_pod_local");
    }
    let s = store.clone();
    let append = std::thread::spawn(move || s.append(pod_batch("n1", 0, 20)));
    // tidy: the detach has to outlast the append's first attempt.
    std::thread::sleep(Duration::from_millis(1000));
    for r in &c.servers {
        r.must("ATTACH TABLE ctw_pi.ctw_records_by_pod_local");
    }
    let got = append.join().unwrap();
    assert!(matches!(got, Ok(AppendOutcome::Stored)), "{got:?}");
    let q = SearchQuery {
        src_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 0))),
        ..everything()
    };
    let hits = store.search(&q).unwrap().total;
    let rows = count(
        &c.servers[0],
        "SELECT count() FROM ctw_pi.ctw_records_by_pod_local",
    );
    assert_eq!((hits, rows), (1, 20), "(pod search hits, pod index rows)");
}

//! Integration tests of the ClickHouse store against a real server (Debian's
//! `clickhouse-server`, started per test on loopback ports by the testkit):
//! the conformance suite (same answers as `MemStore`), exactly once across
//! two collectors (a batch replayed after a crash between the records' and
//! the ledger's inserts is answered once), a server down at start and
//! mid-stream, a database of another schema version, retention by day
//! partitions, concurrent appends coalesced into few inserts (and their
//! failure while the server is down).

#![allow(clippy::unwrap_used)]

mod conformance;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use conformance::*;
use ctw_collector::config::{ClickHouseConfig, Storage};
use ctw_collector::store::clickhouse::ClickHouseStore;
use ctw_collector::store::{self, AppendOutcome, MemStore, RecordStore, SearchQuery};
use ctw_testkit::clickhouse::{self, ClickHouse};
use ctw_testkit::wait_for;

/// Starts a server, or says why the test is skipped.
fn server() -> Option<ClickHouse> {
    if !clickhouse::available() {
        ctw_testkit::skip("needs clickhouse-server (apt-get install clickhouse-server)");
        return None;
    }
    Some(ClickHouse::start())
}

fn cfg(ch: &ClickHouse, db: &str) -> ClickHouseConfig {
    ClickHouseConfig {
        url: ch.url(),
        database: db.into(),
        user: "default".into(),
        password_file: None,
        retention_days: 36500,
        lookback_hours: 3,
        max_collected_records: 200_000,
        connect_retry_ms: 100,
        timeout_ms: 10_000,
        insert_interval_ms: 50,
        insert_max_records: 100_000,
        cluster: None,
    }
}

#[test]
fn same_answers_as_memstore_on_random_data() {
    let Some(ch) = server() else { return };
    let store = store::open(Storage::ClickHouse(cfg(&ch, "ctw_equiv")).backend()).unwrap();
    assert!(store.ready());
    random_equivalence(store.as_ref(), 3, 400, &mut |_| {});
    let stats = store.stats();
    assert!(stats.records > 3000, "{stats:?}");
    assert!(stats.bytes_on_disk > 0, "{stats:?}");
    store.close();
}

fn pod_batch(seq: u64, n: u64) -> ctw_collector::store::StoredBatch {
    let node_ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let records = (0..n)
        .map(|i| {
            rec(
                BASE + seq * MIN + i * 1000,
                IpAddr::V4(Ipv4Addr::new(198, 18, 1, (i % 200) as u8)),
                10_000 + i as u16,
                node_ip,
                30_000 + (seq * n + i) as u16,
            )
        })
        .collect();
    batch("n1", seq, records)
}

fn everything() -> SearchQuery {
    SearchQuery {
        limit: 1_000_000,
        ..Default::default()
    }
}

/// A batch stored through one collector is a duplicate through another
/// (agent failover replays it), and rows stored twice (a collector that
/// died between the records' insert and the ledger's) are answered once.
#[test]
fn exactly_once_across_two_collectors() {
    let Some(ch) = server() else { return };
    let a = ClickHouseStore::open(&cfg(&ch, "ctw_once")).unwrap();
    let b = ClickHouseStore::open(&cfg(&ch, "ctw_once")).unwrap();
    let mem = MemStore::default();
    for seq in 0..5 {
        assert_eq!(a.append(pod_batch(seq, 50)).unwrap(), AppendOutcome::Stored);
        mem.append(pod_batch(seq, 50)).unwrap();
    }
    for seq in 0..5 {
        assert_eq!(
            b.append(pod_batch(seq, 50)).unwrap(),
            AppendOutcome::Duplicate
        );
    }
    assert_eq!(b.append(pod_batch(5, 50)).unwrap(), AppendOutcome::Stored);
    mem.append(pod_batch(5, 50)).unwrap();
    let want = mem.search(&everything()).unwrap();
    assert_eq!(want.total, 300);
    for s in [&a, &b] {
        let got = s.search(&everything()).unwrap();
        assert_eq!(canonical(got.hits), canonical(want.hits.clone()));
    }
    // Every row stored a second time (both tables, through the view).
    ch.must("INSERT INTO ctw_once.ctw_records SELECT * FROM ctw_once.ctw_records");
    assert_eq!(
        ch.must("SELECT count() FROM ctw_once.ctw_records").trim(),
        "600"
    );
    for q in [
        everything(),
        SearchQuery {
            src_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 7))),
            ..everything()
        },
    ] {
        let got = b.search(&q).unwrap();
        let want = mem.search(&q).unwrap();
        assert_eq!(got.total, want.total, "{q:?}");
        assert_eq!(canonical(got.hits), canonical(want.hits), "{q:?}");
    }
}

/// The crash window of `append` on one server (`MergeTree`: nothing drops
/// an identical block): a collector inserted a batch's records and died (or
/// its ledger insert failed) before the ledger row; the agent replays the
/// batch to another collector, which finds no ledger row and stores the
/// records again. Every record and connection is answered once, `total`
/// is the number of connections sent, also past the collection cap.
#[test]
fn replay_after_a_crash_between_records_and_ledger_is_answered_once() {
    let Some(ch) = server() else { return };
    // The dead collector's records insert without its ledger insert:
    // batches 1 and 2 stored on another database, their rows copied over
    // (the view fills the pod index as for the store's own insert).
    let donor = ClickHouseStore::open(&cfg(&ch, "ctw_donor")).unwrap();
    let a = ClickHouseStore::open(&cfg(&ch, "ctw_crash")).unwrap();
    assert_eq!(a.append(pod_batch(0, 50)).unwrap(), AppendOutcome::Stored);
    for seq in 1..3 {
        assert_eq!(
            donor.append(pod_batch(seq, 50)).unwrap(),
            AppendOutcome::Stored
        );
    }
    donor.close();
    ch.must("INSERT INTO ctw_crash.ctw_records SELECT * FROM ctw_donor.ctw_records");
    // The agent replays batches 1 and 2 (and 0, acked before) to collector b.
    let b = ClickHouseStore::open(&cfg(&ch, "ctw_crash")).unwrap();
    assert_eq!(
        b.append(pod_batch(0, 50)).unwrap(),
        AppendOutcome::Duplicate
    );
    for seq in 1..3 {
        assert_eq!(b.append(pod_batch(seq, 50)).unwrap(), AppendOutcome::Stored);
        assert_eq!(
            a.append(pod_batch(seq, 50)).unwrap(),
            AppendOutcome::Duplicate
        );
    }
    // Batches 1 and 2 are stored twice: 250 rows for 150 records.
    for table in ["ctw_records", "ctw_records_by_pod"] {
        assert_eq!(
            ch.must(&format!("SELECT count() FROM ctw_crash.{table}"))
                .trim(),
            "250",
            "{table}"
        );
    }
    let mem = MemStore::default();
    for seq in 0..3 {
        mem.append(pod_batch(seq, 50)).unwrap();
    }
    // 150 connections sent, one NEW each; pod 198.18.1.7 opened one per
    // batch (i = 7); SNAT port 30057 is batch 1's i = 7.
    let pod = SearchQuery {
        src_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 7))),
        ..everything()
    };
    let snat = SearchQuery {
        snat_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))),
        snat_port: Some(30_057),
        from_ns: Some(BASE),
        to_ns: Some(BASE + 2 * MIN),
        ..everything()
    };
    for (q, total) in [(everything(), 150), (pod, 3), (snat, 1)] {
        let want = mem.search(&q).unwrap();
        assert_eq!(want.total, total, "{q:?}");
        for s in [&a, &b] {
            let got = s.search(&q).unwrap();
            assert_eq!(got.total, total, "{q:?}");
            assert_eq!(got.hits.len() as u64, total, "{q:?}");
            assert_eq!(canonical(got.hits), canonical(want.hits.clone()), "{q:?}");
        }
    }
    // Past the collection cap the uncollected records are counted once.
    let mut capped = cfg(&ch, "ctw_crash");
    capped.max_collected_records = 20;
    let c = ClickHouseStore::open(&capped).unwrap();
    assert_eq!(c.search(&everything()).unwrap().total, 150);
}

/// Server down at start: the store opens not ready, appends fail (nothing
/// would be acked) with an error naming the server; once the server is up
/// the store becomes ready by itself.
#[test]
fn down_at_start_is_not_ready_then_connects() {
    let Some(mut ch) = server() else { return };
    ch.stop();
    let store = ClickHouseStore::open(&cfg(&ch, "ctw_late")).unwrap();
    assert!(!store.ready());
    let e = store.append(pod_batch(0, 3)).unwrap_err().to_string();
    assert!(e.contains("not ready") && e.contains(&ch.url()), "{e}");
    assert!(store.search(&everything()).is_err());
    ch.restart();
    wait_for(Duration::from_secs(30), "the store to connect", || {
        store.ready().then_some(())
    });
    assert_eq!(
        store.append(pod_batch(0, 3)).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(store.search(&everything()).unwrap().total, 3);
}

/// Server down mid-stream: the append fails once its retries used up
/// `timeout_ms` (so the batch is not acked and the agent keeps it), and
/// the same batch appended after the server is back is stored once.
#[test]
fn down_mid_stream_fails_the_append_and_the_retry_stores_once() {
    let Some(mut ch) = server() else { return };
    let mut c = cfg(&ch, "ctw_mid");
    c.timeout_ms = 1000;
    let store = ClickHouseStore::open(&c).unwrap();
    assert_eq!(
        store.append(pod_batch(0, 10)).unwrap(),
        AppendOutcome::Stored
    );
    ch.stop();
    let e = store.append(pod_batch(1, 10)).unwrap_err().to_string();
    assert!(e.contains("clickhouse"), "{e}");
    ch.restart();
    assert_eq!(
        store.append(pod_batch(1, 10)).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(
        store.append(pod_batch(1, 10)).unwrap(),
        AppendOutcome::Duplicate
    );
    assert_eq!(store.search(&everything()).unwrap().total, 20);
}

/// A database written by an older version (no version table, other
/// columns) or with another version number is refused, with a message
/// naming the versions; nothing in it is changed.
#[test]
fn another_schema_version_is_refused() {
    let Some(ch) = server() else { return };
    ch.must("CREATE DATABASE old");
    ch.must(
        "CREATE TABLE old.ctw_records (day Date, snat_ip String, snat_port UInt16) \
         ENGINE = MergeTree PARTITION BY day ORDER BY (snat_ip, snat_port)",
    );
    let e = ClickHouseStore::open(&cfg(&ch, "old"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("old.") || e.contains("database old"),
        "names the database: {e}"
    );
    assert!(e.contains("schema version 2"), "{e}");
    // Same columns as this version, but a version table saying 7.
    {
        let s = ClickHouseStore::open(&cfg(&ch, "newer")).unwrap();
        s.close();
    }
    ch.must("INSERT INTO newer.ctw_schema (version) VALUES (7)");
    let e = ClickHouseStore::open(&cfg(&ch, "newer"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 7]") || e.contains("[7, 2]"), "{e}");
    // An older table's columns, with the version table of this version.
    ch.must("CREATE DATABASE older");
    ch.must("CREATE TABLE older.ctw_schema (version UInt32) ENGINE = TinyLog");
    ch.must("INSERT INTO older.ctw_schema (version) VALUES (2)");
    ch.must(
        "CREATE TABLE older.ctw_records (day Date, family UInt8, snat_ip String) \
         ENGINE = MergeTree PARTITION BY day ORDER BY snat_ip",
    );
    let e = ClickHouseStore::open(&cfg(&ch, "older"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected column snat_ip FixedString(16)"), "{e}");
    assert_eq!(
        ch.must("SELECT count() FROM system.tables WHERE database = 'older'")
            .trim(),
        "2"
    );
}

/// Retention drops whole days older than `retention_days` from every
/// table; later days stay searchable.
#[test]
fn retention_drops_old_days() {
    let Some(ch) = server() else { return };
    let mut c = cfg(&ch, "ctw_ret");
    c.retention_days = 2;
    let store = ClickHouseStore::open(&c).unwrap();
    let day = 24 * H;
    for d in 0..5u64 {
        let mut b = pod_batch(d, 4);
        for r in &mut b.records {
            r.event_ns += d * day;
            r.start_ns = Some(r.event_ns);
        }
        store.append(b).unwrap();
    }
    assert_eq!(store.search(&everything()).unwrap().total, 20);
    // "Now" is day 5: days 0, 1 and 2 are older than 2 days.
    let dropped = store.enforce_retention(BASE + 5 * day).unwrap();
    assert!(dropped >= 3, "{dropped}");
    let left = store.search(&everything()).unwrap();
    assert_eq!(left.total, 8);
    assert!(left
        .hits
        .iter()
        .all(|h| h.record.event_ns >= BASE + 3 * day));
}

/// Batch `seq` of `node`: `n` records no other (node, seq) has.
fn node_batch(node: usize, seq: u64, n: u64) -> ctw_collector::store::StoredBatch {
    let records = (0..n)
        .map(|i| {
            rec(
                BASE + seq * MIN + i * 1000 + node as u64,
                IpAddr::V4(Ipv4Addr::new(198, 18, 2, node as u8)),
                10_000 + (seq * n + i) as u16,
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
                20_000 + node as u16,
            )
        })
        .collect();
    batch(&format!("n{node}"), seq, records)
}

/// ClickHouse's count of `INSERT` queries since it started (all tables).
fn insert_queries(ch: &ClickHouse) -> u64 {
    ch.must("SELECT value FROM system.events WHERE event = 'InsertQuery'")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Concurrent appends (one thread per agent stream) are stored in few
/// inserts: ClickHouse counts far fewer `INSERT` queries, and the records
/// table far fewer blocks, than batches; every record is stored once; a
/// key appended by two threads is stored by one and a duplicate for the
/// other, and a key twice in one call (one flush) is stored once.
#[test]
fn concurrent_appends_are_coalesced_into_few_inserts() {
    let Some(ch) = server() else { return };
    let mut c = cfg(&ch, "ctw_coalesce");
    c.insert_interval_ms = 300;
    let store = std::sync::Arc::new(ClickHouseStore::open(&c).unwrap());
    let (threads, seqs, per) = (16usize, 10u64, 20u64);
    let inserts0 = insert_queries(&ch);
    // Thread `threads` replays node 0's batches alongside thread 0.
    let handles: Vec<_> = (0..=threads)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let node = if t == threads { 0 } else { t };
                (0..seqs)
                    .map(|seq| store.append(node_batch(node, seq, per)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let outcomes: Vec<Vec<AppendOutcome>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (t, o) in outcomes.iter().enumerate().take(threads).skip(1) {
        assert!(o.iter().all(|o| *o == AppendOutcome::Stored), "{t}: {o:?}");
    }
    for (seq, pair) in outcomes[0].iter().zip(&outcomes[threads]).enumerate() {
        let pair = [*pair.0, *pair.1];
        assert!(
            pair.contains(&AppendOutcome::Stored) && pair.contains(&AppendOutcome::Duplicate),
            "node 0 seq {seq}: {pair:?}"
        );
    }
    let batches = (threads as u64 + 1) * seqs;
    let inserts = insert_queries(&ch) - inserts0;
    // Two inserts (records, ledger) per flush; a flush per 300 ms at most.
    assert!(
        inserts * 4 <= batches,
        "{inserts} inserts for {batches} batches"
    );
    let blocks: u64 = ch
        .must(
            "SELECT max(max_block_number) FROM system.parts \
             WHERE database = 'ctw_coalesce' AND table = 'ctw_records'",
        )
        .trim()
        .parse()
        .unwrap();
    assert!(
        blocks * 8 <= batches,
        "{blocks} record inserts for {batches} batches"
    );
    eprintln!("{batches} batches: {inserts} INSERT queries, {blocks} records-table inserts");
    let want = threads as u64 * seqs * per;
    assert_eq!(
        ch.must(
            "SELECT count(), uniqExact(node, src_port, event_us) FROM ctw_coalesce.ctw_records"
        )
        .trim(),
        format!("{want}\t{want}")
    );
    assert_eq!(store.search(&everything()).unwrap().total, want);
    // The same key twice in one call goes to one flush: stored once.
    let (done, e) = store.append_many(vec![node_batch(99, 0, 3), node_batch(99, 0, 3)]);
    assert!(e.is_none(), "{e:?}");
    assert_eq!(done, [AppendOutcome::Stored, AppendOutcome::Duplicate]);
    assert_eq!(
        ch.must("SELECT count() FROM ctw_coalesce.ctw_records WHERE node = 'n99'")
            .trim(),
        "3"
    );
}

/// Server down while several streams append: every waiting append fails
/// (none would be acked); replayed once the server is back, each batch is
/// stored once, and a second replay is a duplicate.
#[test]
fn coalesced_appends_all_fail_while_down_and_replay_stores_once() {
    let Some(mut ch) = server() else { return };
    let mut c = cfg(&ch, "ctw_coalesce_down");
    c.timeout_ms = 1000;
    c.insert_interval_ms = 200;
    let store = std::sync::Arc::new(ClickHouseStore::open(&c).unwrap());
    assert_eq!(
        store.append(node_batch(0, 0, 5)).unwrap(),
        AppendOutcome::Stored
    );
    ch.stop();
    let streams = 8usize;
    let run = |store: &std::sync::Arc<ClickHouseStore>| {
        let handles: Vec<_> = (1..=streams)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || store.append(node_batch(t, 1, 5)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    };
    for r in run(&store) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("clickhouse"), "{e}");
    }
    ch.restart();
    for r in run(&store) {
        assert_eq!(r.unwrap(), AppendOutcome::Stored);
    }
    for r in run(&store) {
        assert_eq!(r.unwrap(), AppendOutcome::Duplicate);
    }
    let want = (streams as u64 + 1) * 5;
    assert_eq!(
        ch.must("SELECT count(), uniqExact(node, src_port, event_us) FROM ctw_coalesce_down.ctw_records")
            .trim(),
        format!("{want}\t{want}")
    );
    assert_eq!(store.search(&everything()).unwrap().total, want);
}

/// A batch the server refuses for its data (here: a view that throws on
/// node `n13`'s rows, as a server limit or a bad value would) fails alone:
/// the other batches of its flush are stored and answered once, and the
/// refusal names the server's error. A batch spanning more days than ClickHouse
/// 19.x+ takes in one insert block (100) is stored in several inserts.
#[test]
fn a_refused_batch_fails_alone_and_the_rest_of_its_flush_is_stored() {
    let Some(ch) = server() else { return };
    let mut c = cfg(&ch, "ctw_refuse");
    c.insert_interval_ms = 300;
    let store = ClickHouseStore::open(&c).unwrap();
    ch.must(
        "CREATE MATERIALIZED VIEW ctw_refuse.refuse_n13 ENGINE = Memory \
         AS SELECT throwIf(node = 'n13') AS refused FROM ctw_refuse.ctw_records",
    );
    // One call: every batch goes into one flush; the refused one last, so
    // every other outcome is reported before the error.
    let batches: Vec<_> = [10, 11, 12, 14, 15, 13]
        .into_iter()
        .map(|n| node_batch(n, 0, 5))
        .collect();
    let (done, e) = store.append_many(batches);
    assert_eq!(done, [AppendOutcome::Stored; 5]);
    let e = e.expect("n13 refused").to_string();
    assert!(e.contains("Code: 395") && e.contains("throwIf"), "{e}");
    // 18.16 runs a view after writing the table's part: the refused flush
    // had written its rows, and storing each batch again wrote them twice
    // (MergeTree keeps both; searches answer each once).
    assert_eq!(
        ch.must(
            "SELECT node, uniqExact(src_port, event_us) FROM ctw_refuse.ctw_records \
             WHERE node != 'n13' GROUP BY node ORDER BY node"
        ),
        "n10\t5\nn11\t5\nn12\t5\nn14\t5\nn15\t5\n"
    );
    // n13's rows too: written before its view refused them (not acked:
    // its agent replays the batch, answered once).
    assert_eq!(store.search(&everything()).unwrap().total, 30);
    // Refused again when replayed; the others are duplicates.
    let (done, e) = store.append_many(vec![node_batch(10, 0, 5), node_batch(13, 0, 5)]);
    assert_eq!(done, [AppendOutcome::Duplicate]);
    assert!(e.is_some());
    ch.must("DROP TABLE ctw_refuse.refuse_n13");
    assert_eq!(
        store.append(node_batch(13, 0, 5)).unwrap(),
        AppendOutcome::Stored
    );
    assert_eq!(store.search(&everything()).unwrap().total, 30);
    // 150 days in one batch.
    let mut long = node_batch(20, 0, 150);
    for (i, r) in long.records.iter_mut().enumerate() {
        r.event_ns += i as u64 * 86_400_000_000_000;
        r.start_ns = Some(r.event_ns);
    }
    assert_eq!(store.append(long).unwrap(), AppendOutcome::Stored);
    assert_eq!(
        ch.must(
            "SELECT count(), uniqExact(day), uniqExact(src_port) FROM ctw_refuse.ctw_records \
             WHERE node = 'n20'"
        )
        .trim(),
        "150\t150\t150"
    );
}

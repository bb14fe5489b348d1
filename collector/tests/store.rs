//! Integration tests of the tantivy store: search, equivalence with
//! `MemStore`, dedup, crash recovery, time to searchable, retention,
//! partition pruning and write-ahead-log damage.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ctw_collector::store::tantivy_store::{StoreOptions, TantivyStore};
use ctw_collector::store::{
    alive_at, AppendOutcome, ConnKind, End, Gap, MemStore, RecordStore, SearchQuery, StoreError,
};
use ctw_common::{status, ConnRecord, Counters, EventKind, Protocol, TcpState};
use ctw_testkit::wait_for;

mod conformance;

use conformance::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ctw-store-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    fn cfg(&self) -> StoreOptions {
        StoreOptions {
            path: self.0.clone(),
            retention_days: 36500,
            max_size_gb: 100.0,
            commit_interval_ms: 100,
            commit_max_records: 300_000,
            partition_hours: 1,
            lookback_hours: 3,
            max_collected_docs: 200_000,
            ..StoreOptions::default()
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn append_and_search_by_snat_ip_port_and_time_v4_and_v6() {
    let dir = TempDir::new("snat");
    let store = TantivyStore::open(dir.cfg()).unwrap();
    let pod4 = IpAddr::V4(Ipv4Addr::new(198, 18, 3, 4));
    let node4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let pod6: IpAddr = "fd00::3:4".parse().unwrap();
    let node6: IpAddr = "2001:db8::1".parse().unwrap();
    let a = rec(BASE + 10 * MIN, pod4, 40000, node4, 31000);
    let b = rec(
        BASE + 50 * MIN,
        IpAddr::V4(Ipv4Addr::new(198, 18, 9, 9)),
        40001,
        node4,
        31000,
    );
    let c = rec(BASE + 10 * MIN, pod6, 40002, node6, 31000);
    store.append(batch("n1", 1, vec![a, b, c])).unwrap();
    store.commit().unwrap();
    let q = |ip: IpAddr, at: u64| SearchQuery {
        snat_ip: Some(ip),
        snat_port: Some(31000),
        from_ns: Some(at - 5 * MIN),
        to_ns: Some(at + 5 * MIN),
        at_ns: Some(at),
        limit: 10,
        ..Default::default()
    };
    let r = store.search(&q(node4, BASE + 10 * MIN)).unwrap();
    assert_eq!(r.total, 1, "{r:?}");
    assert_eq!(r.hits[0].record, kept(a));
    assert_eq!(r.hits[0].node, "n1");
    // b took a's reply tuple: a had ended by b's start (no DESTROY seen),
    // so a may have been alive in the range but not at b's start.
    let r = store.search(&q(node4, BASE + 50 * MIN)).unwrap();
    assert_eq!(
        r.hits.iter().map(|h| h.record).collect::<Vec<_>>(),
        vec![kept(b), kept(a)]
    );
    assert_eq!(r.hits[1].end, Some(End::Superseded));
    assert_eq!(r.hits[1].closed_ns, Some(BASE + 50 * MIN));
    assert!(!alive_at(&r.hits[1], BASE + 50 * MIN, 1));
    assert!(alive_at(&r.hits[0], BASE + 50 * MIN, 1));
    let r = store.search(&q(node6, BASE + 10 * MIN)).unwrap();
    assert_eq!(
        r.hits.iter().map(|h| h.record).collect::<Vec<_>>(),
        vec![kept(c)]
    );
    // An IPv4-mapped IPv6 address stays IPv6 and does not match the IPv4 one.
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
    let d = rec(BASE + 20 * MIN, pod6, 40003, mapped, 31001);
    store.append(batch("n1", 2, vec![d])).unwrap();
    store.commit().unwrap();
    let mut qd = q(mapped, BASE + 20 * MIN);
    qd.snat_port = Some(31001);
    assert_eq!(store.search(&qd).unwrap().hits[0].record, kept(d));
    qd.snat_ip = Some(node4);
    assert_eq!(store.search(&qd).unwrap().total, 0);
}

#[test]
fn same_answers_as_memstore_on_random_data() {
    let dir = TempDir::new("equiv");
    let mut cfg = dir.cfg();
    cfg.commit_interval_ms = 60_000; // only explicit commits
    let store = TantivyStore::open(cfg.clone()).unwrap();
    // Reads what the tantivy store reads: connections superseded (or
    // destroyed) more than the lookback after a range show no end in both.
    let mem = MemStore::with_lookback(cfg.lookback_hours as u64 * H);
    // Collects at most 300 records per search: the same answer whenever it
    // did not reach the cap.
    let capped_dir = TempDir::new("equiv-capped");
    let capped = TantivyStore::open(StoreOptions {
        max_collected_docs: 300,
        ..capped_dir.cfg()
    })
    .unwrap();
    let mut rng = fastrand::Rng::with_seed(1234);
    let span = 30 * H;
    let records = random_records(&mut rng, 3000, span);
    // A third in segments, the rest fresh (uncommitted) in the first round
    // of queries; all in segments in the second.
    let (old, new) = records.split_at(1000);
    load(&[&store, &mem, &capped], old);
    store.commit().unwrap();
    load_from(&[&store, &mem, &capped], new, 1_000_000);
    capped.commit().unwrap();
    let mut truncated = 0;
    let gap = Gap {
        node: "n1".into(),
        from_ns: BASE + 3 * H,
        to_ns: BASE + 4 * H,
        reason: "kernel_drop".into(),
        count: 5,
    };
    store.record_gap(gap.clone()).unwrap();
    mem.record_gap(gap).unwrap();
    for i in 0..800 {
        if i == 400 {
            assert!(store.segment_count() > 0);
            store.commit().unwrap();
        }
        let mut q = random_query(&mut rng, &records, span);
        let a = store.search(&q).unwrap();
        let b = mem.search(&q).unwrap();
        assert_eq!(a.total, b.total, "query {i}: {q:?}");
        let (c, stats) = capped.search_with_stats(&q).unwrap();
        if stats.truncated {
            truncated += 1;
            assert!(c.total >= c.hits.len() as u64, "query {i}: {q:?}");
        } else {
            assert_eq!(c.total, b.total, "query {i}: {q:?}");
            assert_eq!(
                canonical(c.hits),
                canonical(b.hits.clone()),
                "query {i}: {q:?}"
            );
        }
        assert_same(i, &mut q, a, b, &store, &mem, &mut rng);
    }
    assert!(truncated > 20, "{truncated}");
}

#[test]
fn duplicates_are_stored_once_also_after_reopen_and_crash() {
    let dir = TempDir::new("dedup");
    let r = |i: u64| {
        rec(
            BASE + i * MIN,
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            1000 + i as u16,
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            2000 + i as u16,
        )
    };
    {
        let store = TantivyStore::open(dir.cfg()).unwrap();
        for seq in [1u64, 2, 3, 5] {
            assert_eq!(
                store.append(batch("n", seq, vec![r(seq)])).unwrap(),
                AppendOutcome::Stored
            );
        }
        assert_eq!(
            store.append(batch("n", 2, vec![r(2)])).unwrap(),
            AppendOutcome::Duplicate
        );
        // Same seq from another boot or node is not a duplicate.
        let mut other = batch("n", 2, vec![r(20)]);
        other.boot_id = "boot-b".into();
        assert_eq!(store.append(other).unwrap(), AppendOutcome::Stored);
        store.close();
    }
    {
        let store = TantivyStore::open(dir.cfg()).unwrap();
        assert_eq!(
            store.append(batch("n", 3, vec![r(3)])).unwrap(),
            AppendOutcome::Duplicate
        );
        assert_eq!(
            store.append(batch("n", 4, vec![r(4)])).unwrap(),
            AppendOutcome::Stored
        );
        assert_eq!(
            store.append(batch("n", 6, vec![r(6)])).unwrap(),
            AppendOutcome::Stored
        );
        store.crash();
    }
    let store = TantivyStore::open(dir.cfg()).unwrap();
    for seq in 1..=6 {
        assert_eq!(
            store.append(batch("n", seq, vec![r(seq)])).unwrap(),
            AppendOutcome::Duplicate,
            "seq {seq}"
        );
    }
    let all = store
        .search(&SearchQuery {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.total, 7);
    assert_eq!(store.stats().records, 7);
}

#[test]
fn crash_loses_nothing_acknowledged_and_never_duplicates() {
    let dir = TempDir::new("crash");
    let mut cfg = dir.cfg();
    cfg.commit_interval_ms = 60_000; // only explicit commits
    let mut rng = fastrand::Rng::with_seed(99);
    let records = random_records(&mut rng, 600, 10 * H);
    let mem = MemStore::default();
    let (first, rest) = records.split_at(records.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    {
        let store = TantivyStore::open(cfg.clone()).unwrap();
        load(&[&store, &mem], first);
        store.commit().unwrap(); // part is committed, the rest only in the WAL
        load_seq(&[&store, &mem], second, 1000);
        store.crash();
    }
    {
        let store = TantivyStore::open(cfg.clone()).unwrap();
        assert_eq!(store.stats().records as usize, first.len() + second.len());
        load_seq(&[&store, &mem], third, 2000);
        // Every partition commits, the checkpoint is not written.
        store.crash_after_index_commit().unwrap();
    }
    let store = TantivyStore::open(cfg.clone()).unwrap();
    assert_eq!(store.stats().records as usize, records.len());
    let q = SearchQuery {
        limit: 1_000_000,
        ..Default::default()
    };
    let a = store.search(&q).unwrap();
    let b = mem.search(&q).unwrap();
    assert_eq!(a.total, b.total);
    assert_eq!(canonical(a.hits), canonical(b.hits));
}

fn load_seq(stores: &[&dyn RecordStore], records: &[(String, ConnRecord)], seq0: u64) {
    for (i, (node, r)) in records.iter().enumerate() {
        for s in stores {
            assert_eq!(
                s.append(batch(node, seq0 + i as u64, vec![*r])).unwrap(),
                AppendOutcome::Stored
            );
        }
    }
}

#[test]
fn records_are_searchable_once_appended_and_after_their_commit() {
    let dir = TempDir::new("tts");
    let mut cfg = dir.cfg();
    cfg.commit_interval_ms = 60_000; // only explicit commits
    let store = TantivyStore::open(cfg.clone()).unwrap();
    let snat = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    for k in 0..5u16 {
        let r = rec(
            BASE + k as u64 * MIN,
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)),
            1000,
            snat,
            7000 + k,
        );
        let q = SearchQuery {
            snat_ip: Some(snat),
            snat_port: Some(7000 + k),
            limit: 1,
            ..Default::default()
        };
        store.append(batch("n", k as u64, vec![r])).unwrap();
        // Not committed yet: found among the fresh records.
        let fresh = store.search(&q).unwrap();
        assert_eq!(fresh.total, 1, "record {k} not searchable once appended");
        // Committed: found once, in a segment.
        store.commit().unwrap();
        let committed = store.search(&q).unwrap();
        assert_eq!(committed.total, 1, "record {k} after its commit");
        assert_eq!(canonical(committed.hits), canonical(fresh.hits));
    }
    assert_eq!(store.stats().records, 5);
    assert_eq!(store.segment_count(), 5);
}

/// A search running while commits move records from memory into segments
/// sees every record exactly once.
#[test]
fn searches_during_commits_see_each_record_once() {
    let dir = TempDir::new("tts-race");
    let mut cfg = dir.cfg();
    cfg.commit_interval_ms = 60_000;
    let store = std::sync::Arc::new(TantivyStore::open(cfg.clone()).unwrap());
    let snat = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    let q = SearchQuery {
        snat_ip: Some(snat),
        limit: 1_000_000,
        ..Default::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut commits = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.commit().unwrap();
                commits += 1;
            }
            commits
        })
    };
    let pod = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9));
    for k in 0..300u64 {
        let r = rec(BASE + k * 1000, pod, 1000, snat, 1024 + k as u16);
        store.append(batch("n", k, vec![r])).unwrap();
        // Every record appended so far, none twice, whatever the commit
        // thread is doing.
        assert_eq!(store.search(&q).unwrap().total, k + 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(committer.join().unwrap() > 0);
}

#[test]
fn retention_drops_old_partitions_by_age_and_by_size() {
    let dir = TempDir::new("retention");
    let mut cfg = dir.cfg();
    cfg.retention_days = 1;
    let day = 24 * H;
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    {
        let store = TantivyStore::open(cfg.clone()).unwrap();
        for h in 0..6u64 {
            store
                .append(batch(
                    "n",
                    h,
                    vec![rec(BASE + h * H + MIN, ip, 1, ip, h as u16)],
                ))
                .unwrap();
        }
        store.commit().unwrap();
        assert_eq!(store.partitions().len(), 6);
        // Windows ending at or before now - 1 day (hours 0, 1, 2) go.
        assert_eq!(
            store
                .enforce_retention(BASE + day + 3 * H + 30 * MIN)
                .unwrap(),
            3
        );
        assert_eq!(
            store.partitions(),
            vec!["p-2026010103", "p-2026010104", "p-2026010105"]
        );
        let all = store
            .search(&SearchQuery {
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.total, 3);
        assert_eq!(
            store
                .enforce_retention(BASE + day + 3 * H + 30 * MIN)
                .unwrap(),
            0
        );
        store.close();
    }
    // By size: a limit below the current size drops the oldest first and
    // never the newest partition.
    cfg.max_size_gb = 1e-9;
    let store = TantivyStore::open(cfg.clone()).unwrap();
    assert_eq!(store.enforce_retention(BASE).unwrap(), 2);
    assert_eq!(store.partitions(), vec!["p-2026010105"]);
    let all = store
        .search(&SearchQuery {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        all.hits
            .iter()
            .map(|h| h.record.reply.dst_port)
            .collect::<Vec<_>>(),
        vec![5]
    );
}

#[test]
fn search_touches_only_the_partitions_its_range_needs() {
    let dir = TempDir::new("prune");
    let mut cfg = dir.cfg();
    cfg.lookback_hours = 1;
    let store = TantivyStore::open(cfg.clone()).unwrap();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    for h in 0..10u64 {
        store
            .append(batch("n", h, vec![rec(BASE + h * H + MIN, ip, 1, ip, 100)]))
            .unwrap();
    }
    store.commit().unwrap();
    let q = SearchQuery {
        snat_ip: Some(ip),
        snat_port: Some(100),
        from_ns: Some(BASE + 5 * H),
        to_ns: Some(BASE + 5 * H + 10 * MIN),
        limit: 10,
        ..Default::default()
    };
    let (r, stats) = store.search_with_stats(&q).unwrap();
    let mut touched = stats.partitions.clone();
    touched.sort();
    assert_eq!(
        touched,
        vec!["p-2026010104", "p-2026010105", "p-2026010106"]
    );
    assert_eq!(store.last_search_stats(), stats);
    assert_eq!(store.partitions_for(&q).len(), 3);
    // The 05:01 connection (superseded at 06:01, inside the lookback), and
    // the 04:01 one it superseded (same reply tuple, no DESTROY): that one
    // may have been alive until 05:01.
    assert_eq!(r.total, 2);
    assert_eq!(
        r.hits
            .iter()
            .map(|h| (h.start_ns(), h.end))
            .collect::<Vec<_>>(),
        vec![
            (BASE + 5 * H + MIN, Some(End::Superseded)),
            (BASE + 4 * H + MIN, Some(End::Superseded))
        ]
    );
    let (_, stats) = store
        .search_with_stats(&SearchQuery {
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(stats.partitions.len(), 10);
}

/// A store whose searches collect at most `max` documents per query.
fn store_collecting_at_most(dir: &TempDir, max: usize) -> TantivyStore {
    TantivyStore::open(StoreOptions {
        max_collected_docs: max,
        ..dir.cfg()
    })
    .unwrap()
}

#[test]
fn collected_documents_are_capped() {
    let dir = TempDir::new("cap");
    let store = store_collecting_at_most(&dir, 50);
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let rs: Vec<ConnRecord> = (0..120u64)
        .map(|i| rec(BASE + i * 1000, ip, i as u16, ip, 9))
        .collect();
    store.append(batch("n", 1, rs)).unwrap();
    store.commit().unwrap();
    let (r, stats) = store
        .search_with_stats(&SearchQuery {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert!(stats.truncated);
    assert_eq!(stats.docs, 50);
    assert_eq!(r.total, 120);
    assert_eq!(r.hits.len(), 10);
}

#[test]
fn past_the_cap_only_matches_are_counted() {
    let dir = TempDir::new("capcount");
    let store = store_collecting_at_most(&dir, 20);
    let pod = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let node = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    // SNAT ports 1600-1615 share an index term; 100 records use each.
    let rs: Vec<ConnRecord> = (0..1600u64)
        .map(|i| {
            rec(
                BASE + i * 1000,
                pod,
                40000 + i as u16,
                node,
                1600 + (i % 16) as u16,
            )
        })
        .collect();
    store.append(batch("n", 1, rs.clone())).unwrap();
    let count = |q: &SearchQuery| store.search(q).unwrap().total;
    let by_port = SearchQuery {
        snat_port: Some(1601),
        limit: 5,
        ..Default::default()
    };
    let by_pod_and_port = SearchQuery {
        src_ip: Some(pod),
        src_port: Some(40007),
        limit: 5,
        ..Default::default()
    };
    // From memory (fresh records), then from the index.
    assert_eq!((count(&by_port), count(&by_pod_and_port)), (100, 1));
    store.commit().unwrap();
    assert_eq!((count(&by_port), count(&by_pod_and_port)), (100, 1));
    let (_, stats) = store.search_with_stats(&by_port).unwrap();
    assert!(stats.truncated);
}

/// A gap of node `n`.
fn gap(from_ns: u64, to_ns: u64, reason: &str, count: u64) -> Gap {
    Gap {
        node: "n".into(),
        from_ns,
        to_ns,
        reason: reason.into(),
        count,
    }
}

#[test]
fn gaps_are_durable_and_filtered_by_range() {
    let dir = TempDir::new("gaps");
    {
        let store = TantivyStore::open(dir.cfg()).unwrap();
        store
            .record_gap(gap(BASE, BASE + MIN, "kernel_drop", 3))
            .unwrap();
        store
            .record_gap(gap(BASE + H, BASE + H + MIN, "agent_disconnected", 0))
            .unwrap();
        // A resent loss report is recorded once.
        store
            .record_gap(gap(BASE, BASE + MIN, "kernel_drop", 3))
            .unwrap();
        store.crash();
    }
    let store = TantivyStore::open(dir.cfg()).unwrap();
    let r = store
        .search(&SearchQuery {
            from_ns: Some(BASE + H),
            to_ns: Some(BASE + 2 * H),
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.gaps.len(), 1);
    assert_eq!(r.gaps[0].reason, "agent_disconnected");
    // Unfiltered: both gaps, the resent one once.
    let all = store
        .search(&SearchQuery {
            limit: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.gaps.len(), 2, "{:?}", all.gaps);
}

fn wal_segments(dir: &TempDir) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.0.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn torn_wal_tail_is_cut_and_corrupt_middle_is_an_error() {
    let dir = TempDir::new("wal");
    let mut cfg = dir.cfg();
    cfg.commit_interval_ms = 60_000;
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    {
        let store = TantivyStore::open(cfg.clone()).unwrap();
        for i in 0..3u64 {
            store
                .append(batch("n", i, vec![rec(BASE + i, ip, 1, ip, i as u16)]))
                .unwrap();
        }
        store.crash();
    }
    // A torn last entry: a header promising more than is there.
    let seg = wal_segments(&dir).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
    }
    {
        let store = TantivyStore::open(cfg.clone()).unwrap();
        assert_eq!(store.stats().records, 3);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            len,
            "torn tail cut off"
        );
        store
            .append(batch("n", 3, vec![rec(BASE + 3, ip, 1, ip, 3)]))
            .unwrap();
        store.crash();
    }
    // Damage inside the first entry: a clear error naming the file.
    let seg = wal_segments(&dir).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[12] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    // The segment is still the active one, so open reads all of it.
    match TantivyStore::open(cfg.clone()) {
        Err(StoreError::Corrupt { path, message }) => {
            assert!(path.contains("wal"), "{path}");
            assert!(message.contains("checksum"), "{message}");
        }
        other => panic!("expected a corrupt WAL error, got {other:?}"),
    }
}

/// Values the compact encodings must round-trip exactly: event times below
/// the microsecond (kept floored to it; search bounds inside one), start/stop equal to or
/// apart from the event time, counters packed (both directions, 32-bit
/// values) or not (one direction, or a value above 32 bits).
#[test]
fn edge_values_round_trip_and_match_memstore() {
    let dir = TempDir::new("edges");
    let mut cfg = dir.cfg();
    cfg.lookback_hours = 0;
    let store = TantivyStore::open(cfg.clone()).unwrap();
    let mem = MemStore::default();
    let src = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let snat = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let us = BASE + 7 * MIN + 123_456_000; // a whole microsecond
    let mut records = Vec::new();
    for (k, sub) in [0u64, 1, 499, 500, 999].into_iter().enumerate() {
        let mut r = rec(us + sub, src, 40000 + k as u16, snat, 31000);
        r.id = 7 + k as u32;
        records.push(r);
    }
    let c = |packets: u64, bytes: u64| Some(Counters { packets, bytes });
    let mut d = records[0];
    for (k, (co, cr, start, stop)) in [
        (c(1, 2), c(3, 4), Some(us - MIN), Some(us + MIN)),
        (c(u32::MAX as u64, u32::MAX as u64), c(0, 0), None, None),
        (
            c(5, 1 << 32),
            c(6, 7),
            Some(us + 2 * MIN),
            Some(us + 2 * MIN),
        ),
        (None, c(8, 9), Some(us + 3 * MIN), Some(us + 4 * MIN)),
        (c(u64::MAX, u64::MAX), None, Some(0), Some(u64::MAX)),
    ]
    .into_iter()
    .enumerate()
    {
        d.kind = EventKind::Destroy;
        d.event_ns = us + 2 * MIN + k as u64 * 333;
        d.orig.src_port = 41000 + k as u16;
        d.id = 100 + k as u32;
        d.start_ns = start;
        d.stop_ns = stop;
        d.counters_orig = co;
        d.counters_reply = cr;
        records.push(d);
    }
    // NEW records whose start is not their event time.
    let mut n = records[1];
    n.orig.src_port = 42000;
    n.start_ns = Some(us - 5);
    records.push(n);
    n.orig.src_port = 42001;
    n.start_ns = Some(us + 5);
    records.push(n);
    for s in [&store as &dyn RecordStore, &mem] {
        s.append(batch("n1", 1, records.clone())).unwrap();
    }
    store.commit().unwrap();
    let all = SearchQuery {
        limit: 1000,
        ..Default::default()
    };
    let got = store.search(&all).unwrap();
    assert_eq!(got.total, records.len() as u64);
    // Kept as normalized: whole microseconds, no conntrack id.
    let mut want: Vec<String> = records.iter().map(|r| format!("{:?}", kept(*r))).collect();
    want.sort();
    let mut have: Vec<String> = got.hits.iter().map(|h| format!("{:?}", h.record)).collect();
    have.sort();
    assert_eq!(have, want);
    let mut nonempty = 0;
    for (from, to) in [
        (us, us),
        (us + 1, us + 499),
        (us + 500, us + 998),
        (us + 2, us + 2 * MIN + 333),
        (us + 999, us + 2 * MIN + 1000),
        (us - MIN, us + 3 * MIN),
    ] {
        let q = SearchQuery {
            from_ns: Some(from),
            to_ns: Some(to),
            limit: 1000,
            ..Default::default()
        };
        // Without lookback the store reads exactly the records whose event
        // time is in the range: MemStore's answer less the connections it
        // finds alive in the range from records outside it.
        let mut want: Vec<String> = mem
            .search(&q)
            .unwrap()
            .hits
            .iter()
            .filter(|h| (from..=to).contains(&h.record.event_ns))
            .map(|h| format!("{:?}", h.record))
            .collect();
        want.sort();
        // Bounds inside a microsecond after the records' (floored) one
        // find nothing, in both stores.
        nonempty += usize::from(!want.is_empty());
        let a = store.search(&q).unwrap();
        let mut have: Vec<String> = a.hits.iter().map(|h| format!("{:?}", h.record)).collect();
        have.sort();
        assert_eq!(have, want, "{q:?}");
    }
    assert_eq!(nonempty, 4);
    // Same answers as MemStore for everything.
    let b = mem.search(&all).unwrap();
    assert_eq!(canonical(got.hits), canonical(b.hits));
}

/// The join by tuple, in both stores: a DESTROY closes the open connection
/// of its tuple; the tuple used again later is another connection; a
/// recovered record while open is the same connection; a DESTROY whose
/// kernel start differs from the open one's (its NEW was lost) stands alone
/// and ends the open one's claim to it.
#[test]
fn destroy_joins_the_open_connection_of_its_tuple() {
    let dir = TempDir::new("join");
    let store = TantivyStore::open(dir.cfg()).unwrap();
    let mem = MemStore::default();
    let pod = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9));
    let snat = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let t = BASE + 10 * MIN;
    let new1 = rec(t, pod, 40000, snat, 31000);
    let mut again1 = new1;
    again1.kind = EventKind::Recovered;
    again1.event_ns = t + MIN;
    // Each DESTROY with the kernel's state at the end (its connection's
    // end_state).
    let destroy = |of: &ConnRecord, at: u64, packets: u64| {
        let mut d = *of;
        d.kind = EventKind::Destroy;
        d.event_ns = at;
        d.stop_ns = Some(at);
        d.counters_orig = Some(Counters { packets, bytes: 1 });
        d.tcp_state =
            Some([TcpState::TimeWait, TcpState::Close, TcpState::LastAck][packets as usize - 1]);
        d
    };
    let d1 = destroy(&new1, t + 2 * MIN, 1);
    // Same tuple, later: another connection (another SNAT port).
    let new2 = rec(t + 5 * MIN, pod, 40000, snat, 31001);
    let d2 = destroy(&new2, t + 6 * MIN, 2);
    // A third use whose NEW was lost: its DESTROY has another start.
    let new3 = rec(t + 8 * MIN, pod, 40000, snat, 31002);
    let mut lost = rec(t + 9 * MIN, pod, 40000, snat, 31003);
    lost.start_ns = Some(t + 9 * MIN);
    let d_lost = destroy(&lost, t + 10 * MIN, 3);
    let records = vec![d2, new1, d1, again1, new2, new3, d_lost];
    for s in [&store as &dyn RecordStore, &mem] {
        s.append(batch("n1", 1, records.clone())).unwrap();
    }
    store.commit().unwrap();
    let q = SearchQuery {
        src_ip: Some(pod),
        limit: 100,
        ..Default::default()
    };
    for res in [store.search(&q).unwrap(), mem.search(&q).unwrap()] {
        let mut got: Vec<_> = res
            .hits
            .iter()
            .map(|h| {
                (
                    h.record.reply.dst_port,
                    h.record.kind == EventKind::Destroy,
                    h.start_ns(),
                    h.closed_ns,
                    h.counters_orig.map(|c| c.packets),
                    h.end_state.map(TcpState::name),
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (
                    31000,
                    false,
                    t,
                    Some(t + 2 * MIN),
                    Some(1),
                    Some("TIME_WAIT")
                ),
                (
                    31001,
                    false,
                    t + 5 * MIN,
                    Some(t + 6 * MIN),
                    Some(2),
                    Some("CLOSE")
                ),
                (31002, false, t + 8 * MIN, None, None, None),
                (
                    31003,
                    true,
                    t + 9 * MIN,
                    Some(t + 10 * MIN),
                    Some(3),
                    Some("LAST_ACK")
                ),
            ]
        );
    }
}

/// Past `commit_max_records` uncommitted records the store commits without
/// waiting for `commit_interval_ms`.
#[test]
fn many_uncommitted_records_trigger_a_commit() {
    let dir = TempDir::new("commit-max");
    let mut cfg = dir.cfg();
    cfg.commit_interval_ms = 60_000;
    cfg.commit_max_records = 1000;
    let store = TantivyStore::open(cfg.clone()).unwrap();
    let snat = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    let pod = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9));
    let batch_of = |seq: u64, n: u64| {
        let recs = (0..n)
            .map(|i| {
                rec(
                    BASE + seq * 10_000 + i,
                    pod,
                    1000,
                    snat,
                    (seq * n + i) as u16,
                )
            })
            .collect();
        batch("n", seq, recs)
    };
    // `append` asks for a commit itself once the limit is reached (the
    // interval is a minute away): below it, no segment; at it, one segment
    // with every record (had the 999 been committed alone, two).
    store.append(batch_of(0, 999)).unwrap();
    assert_eq!(store.segment_count(), 0, "committed below the limit");
    store.append(batch_of(1, 1)).unwrap();
    wait_for(Duration::from_secs(30), "a commit at the limit", || {
        (store.segment_count() > 0).then_some(())
    });
    assert_eq!(store.segment_count(), 1);
    assert_eq!(store.stats().records, 1000);
}

/// Both stores, loaded with `records` on node `n1`, committed.
fn both(dir: &TempDir, cfg: StoreOptions, records: &[ConnRecord]) -> (TantivyStore, MemStore) {
    let _ = dir;
    let store = TantivyStore::open(cfg.clone()).unwrap();
    let mem = MemStore::with_lookback(cfg.lookback_hours as u64 * H);
    for s in [&store as &dyn RecordStore, &mem] {
        s.append(batch("n1", 1, records.to_vec())).unwrap();
    }
    store.commit().unwrap();
    (store, mem)
}

fn destroy_of(r: &ConnRecord, at: u64) -> ConnRecord {
    ConnRecord {
        kind: EventKind::Destroy,
        event_ns: at,
        stop_ns: r.start_ns.map(|_| at),
        tcp_state: Some(TcpState::TimeWait),
        counters_orig: Some(Counters {
            packets: 3,
            bytes: 180,
        }),
        ..*r
    }
}

/// Issue 11 case 1: pod A's entry was recovered by the start-up dump and its
/// DESTROY never came (created while no listener existed); pod B later got
/// the same node port, i.e. the same reply tuple. B's start ends A (an
/// upper bound), so at B's time only B is alive; a `CTW_GONE` record for A
/// arriving after B keeps the tighter bound and adds when A was last seen;
/// one arriving before B ends A itself.
#[test]
fn a_later_entry_with_the_reply_tuple_ends_the_open_one() {
    let dir = TempDir::new("supersede");
    let a_pod = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));
    let b_pod = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 3));
    let node = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let t = BASE + 10 * MIN;
    let s = 1_000_000_000;
    for (gone_at, v6) in [
        (None, false),
        (Some(t + 20 * s), false),
        (Some(t + 8 * s), true),
    ] {
        let (a_pod, b_pod, node) = if v6 {
            let v = |s: &str| s.parse::<IpAddr>().unwrap();
            (v("fd00::1:2"), v("fd00::1:3"), v("fd00::1"))
        } else {
            (a_pod, b_pod, node)
        };
        let mut a = rec(t, a_pod, 42000, node, 42000);
        a.kind = EventKind::Recovered;
        a.event_ns = t + 2 * s;
        a.tcp_state = Some(TcpState::Established);
        let b = rec(t + 10 * s, b_pod, 42000, node, 42000);
        let mut records = vec![a, b, destroy_of(&b, t + 11 * s)];
        if let Some(g) = gone_at {
            let mut gone = destroy_of(&a, g);
            gone.status |= status::CTW_GONE;
            gone.stop_ns = Some(t + 6 * s);
            gone.counters_orig = None;
            records.push(gone);
        }
        let (store, mem) = both(&dir, dir.cfg(), &records);
        let at = t + 10 * s + 500_000_000;
        let q = SearchQuery {
            snat_ip: Some(node),
            snat_port: Some(42000),
            from_ns: Some(at - 5 * MIN),
            to_ns: Some(at + 5 * MIN),
            at_ns: Some(at),
            at_precision_ns: 1_000_000,
            limit: 10,
            ..Default::default()
        };
        for r in [store.search(&q).unwrap(), mem.search(&q).unwrap()] {
            assert_eq!(r.total, 2, "{r:?}");
            assert_eq!(r.hits[0].record.orig.src, b_pod, "{r:?}");
            assert!(alive_at(&r.hits[0], at, 1_000_000));
            // B's end is its DESTROY's, and so is its last known state; A's
            // end is only bounded (superseded, or the agent's gone record,
            // whose state is the dump's): no last known state.
            assert_eq!(r.hits[0].end_state, Some(TcpState::TimeWait));
            let ha = &r.hits[1];
            assert_eq!(ha.record.orig.src, a_pod);
            assert!(!alive_at(ha, at, 1_000_000));
            assert_eq!(ha.end_state, None);
            match gone_at {
                Some(g) if g < t + 10 * s => {
                    assert_eq!((ha.end, ha.closed_ns), (Some(End::Gone), Some(g)));
                    assert_eq!(ha.last_seen_ns, Some(t + 6 * s));
                }
                _ => {
                    assert_eq!(
                        (ha.end, ha.closed_ns),
                        (Some(End::Superseded), Some(t + 10 * s))
                    );
                    assert_eq!(ha.last_seen_ns, gone_at.map(|_| t + 6 * s));
                }
            }
            // A line in B's first millisecond (nginx's `$msec`) is B's:
            // A's bound lies inside the line's interval, A is not alive.
            if gone_at.is_none() {
                let qb = SearchQuery {
                    at_ns: Some(t + 10 * s - 200_000),
                    ..q.clone()
                };
                let rb = store.search(&qb).unwrap();
                assert_eq!(rb.hits[0].record.orig.src, b_pod);
                assert!(alive_at(&rb.hits[0], t + 10 * s - 200_000, 1_000_000));
                assert!(!alive_at(&rb.hits[1], t + 10 * s - 200_000, 1_000_000));
            }
            // A's own line (at 5 s) is A's alone.
            let qa = SearchQuery {
                at_ns: Some(t + 5 * s),
                ..q.clone()
            };
            let ra = store.search(&qa).unwrap();
            assert!(alive_at(&ra.hits[0], t + 5 * s, 1) && !alive_at(&ra.hits[1], t + 5 * s, 1));
            assert_eq!(ra.hits[0].record.orig.src, a_pod);
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir.0);
    }
}

/// A dump read after the NEW of the entry that replaced the dumped one
/// (records out of order): by the kernel start times the recovered record
/// is the older connection, ended by the newer one's start; the newer one
/// stays open and alone alive after it started.
#[test]
fn a_late_dump_record_of_an_older_entry_does_not_end_the_newer() {
    let dir = TempDir::new("late-dump");
    let node = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let t = BASE + MIN;
    let s = 1_000_000_000;
    let b = rec(
        t + 10 * s,
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, 3)),
        42000,
        node,
        42000,
    );
    let mut a = rec(
        t,
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2)),
        42000,
        node,
        42000,
    );
    a.kind = EventKind::Recovered;
    a.event_ns = t + 10 * s + 1000;
    let (store, mem) = both(&dir, dir.cfg(), &[b, a]);
    let q = SearchQuery {
        snat_port: Some(42000),
        at_ns: Some(t + 11 * s),
        at_precision_ns: 1_000_000,
        limit: 10,
        ..Default::default()
    };
    for r in [store.search(&q).unwrap(), mem.search(&q).unwrap()] {
        assert_eq!(r.total, 2);
        assert_eq!(r.hits[0].record.orig.src, b.orig.src);
        assert_eq!(r.hits[0].end, None);
        assert!(alive_at(&r.hits[0], t + 11 * s, 1_000_000));
        assert_eq!(
            (r.hits[1].end, r.hits[1].closed_ns),
            (Some(End::Superseded), Some(t + 10 * s))
        );
        assert!(!alive_at(&r.hits[1], t + 11 * s, 1_000_000));
    }
}

/// At the edges of the records read: a search reads event times in
/// `[from - lookback, to + lookback]`; a superseding record after that
/// leaves the connection without an end (like a DESTROY that late), in
/// both stores; with the successor read, the end is known.
#[test]
fn a_successor_outside_the_records_read_leaves_no_end() {
    let dir = TempDir::new("supersede-edge");
    let mut cfg = dir.cfg();
    cfg.lookback_hours = 1;
    let node = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let a = rec(BASE, IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2)), 1, node, 9);
    let b = rec(
        BASE + 2 * H,
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, 3)),
        1,
        node,
        9,
    );
    let (store, mem) = both(&dir, cfg, &[a, b]);
    let ends = |from: u64, to: u64| {
        let q = SearchQuery {
            from_ns: Some(from),
            to_ns: Some(to),
            limit: 10,
            ..Default::default()
        };
        let x = store.search(&q).unwrap();
        let y = mem.search(&q).unwrap();
        assert_eq!(canonical(x.hits.clone()), canonical(y.hits), "{q:?}");
        assert_eq!(x.total, y.total);
        x.hits
            .iter()
            .map(|h| (h.start_ns(), h.end, h.closed_ns))
            .collect::<Vec<_>>()
    };
    // B is 2 h after a range ending at A's start: not read (lookback 1 h).
    assert_eq!(ends(BASE, BASE), vec![(BASE, None, None)]);
    // Read: A ended by B's start, so it may have been alive at 01:00.
    assert_eq!(
        ends(BASE + H, BASE + H),
        vec![(BASE, Some(End::Superseded), Some(BASE + 2 * H))]
    );
    assert_eq!(
        ends(BASE, BASE + 2 * H),
        vec![
            (BASE + 2 * H, None, None),
            (BASE, Some(End::Superseded), Some(BASE + 2 * H))
        ]
    );
}

/// Issue 11 case 6: a NAT-clash shadow DESTROY (another id, start and
/// backend) neither closes the real connection nor shows as one; a DESTROY
/// joins its NEW on original tuple, reply tuple and zone.
#[test]
fn nat_clash_shadows_never_close_or_duplicate_a_connection() {
    let dir = TempDir::new("clash");
    let pod = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));
    let node = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let t = BASE + MIN;
    let mut new = rec(t, pod, 5353, node, 5353);
    new.protocol = Protocol::Udp;
    new.tcp_state = None;
    let mut shadow = destroy_of(&new, t + 1_000_000);
    shadow.status |= status::NAT_CLASH;
    shadow.reply.src = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 3));
    shadow.start_ns = Some(t + 1000);
    shadow.counters_orig = Some(Counters {
        packets: 1,
        bytes: 60,
    });
    // Same original tuple, another zone: another connection's DESTROY.
    let other_zone = ConnRecord {
        zone: 7,
        ..destroy_of(&new, t + 2_000_000)
    };
    let real = destroy_of(&new, t + 30_000_000_000);
    let (store, mem) = both(&dir, dir.cfg(), &[new, shadow, other_zone, real]);
    let q = SearchQuery {
        src_ip: Some(pod),
        limit: 10,
        ..Default::default()
    };
    for r in [store.search(&q).unwrap(), mem.search(&q).unwrap()] {
        assert_eq!(r.total, 2, "{r:?}");
        let by_zone = |z: u16| r.hits.iter().find(|h| h.record.zone == z).unwrap();
        let h = by_zone(0);
        assert_eq!(h.record.kind, EventKind::New);
        assert_eq!(
            (h.end, h.closed_ns),
            (Some(End::Destroy), Some(t + 30_000_000_000))
        );
        assert_eq!(h.counters_orig.map(|c| c.packets), Some(3));
        assert_eq!(by_zone(7).record.kind, EventKind::Destroy);
    }
}

/// Issue 11 case 4: `total` counts connections, also past the collection
/// cap: UDP flows with NEW and DESTROY each (with kernel timestamps), some
/// started before the range and alive into it; for every range the total
/// is the number of flows alive in it, counted from the generated flows.
#[test]
fn total_counts_connections_past_the_cap() {
    let dir = TempDir::new("total");
    let store = store_collecting_at_most(&dir, 500);
    let mem = MemStore::with_lookback(3 * H);
    let node = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let mut rng = fastrand::Rng::with_seed(77);
    let mut flows = Vec::new();
    let mut records = Vec::new();
    for i in 0..3000u64 {
        let t = BASE + i * 1_000_000_000;
        let life = rng.u64(..20 * MIN);
        let mut r = rec(t, node, 10_000 + i as u16, node, 10_000 + i as u16);
        r.orig.src = IpAddr::V4(Ipv4Addr::new(198, 18, 1, (i % 200) as u8));
        r.protocol = Protocol::Udp;
        r.tcp_state = None;
        records.push(r);
        records.push(destroy_of(&r, t + life));
        flows.push((t, t + life));
    }
    // Interleaved in batches, so the cap cuts between a NEW and its DESTROY.
    for (i, c) in records.chunks(97).enumerate() {
        for s in [&store as &dyn RecordStore, &mem] {
            s.append(batch("n1", i as u64, c.to_vec())).unwrap();
        }
    }
    store.commit().unwrap();
    // Every NEW committed, then every DESTROY fresh: the newest records,
    // collected first, are all DESTROYs of connections whose NEW is not
    // collected (as when a real run's DESTROYs arrive last).
    let dir2 = TempDir::new("total-destroys-last");
    let store2 = store_collecting_at_most(&dir2, 500);
    let (news, destroys): (Vec<ConnRecord>, Vec<ConnRecord>) =
        records.iter().partition(|r| r.kind == EventKind::New);
    store2.append(batch("n1", 1, news)).unwrap();
    store2.commit().unwrap();
    store2.append(batch("n1", 2, destroys)).unwrap();
    let span = 3000 * 1_000_000_000u64;
    for (from, to, kind) in [
        (None, None, None),
        (Some(BASE), Some(BASE + span), None),
        (Some(BASE + span / 3), Some(BASE + span / 2), None),
        (Some(BASE + span / 2), Some(BASE + span / 2), None),
        // With a kind, past the cap, only connections started in the range
        // are counted (a DESTROY does not say how its connection opened):
        // exact for ranges no connection is alive into.
        (None, None, Some(ConnKind::New)),
        (Some(BASE), Some(BASE + span / 2), Some(ConnKind::New)),
        (None, None, Some(ConnKind::Recovered)),
    ] {
        let q = SearchQuery {
            from_ns: from,
            to_ns: to,
            kind,
            limit: 10,
            ..Default::default()
        };
        let (f, t) = (from.unwrap_or(0), to.unwrap_or(u64::MAX));
        let want = flows
            .iter()
            .filter(|&&(a, b)| {
                // Started in the range, or alive into it; every flow is NEW.
                kind.is_none_or(|k| k == ConnKind::New) && ((a >= f && a <= t) || (a < f && b >= f))
            })
            .count() as u64;
        let (r, stats) = store.search_with_stats(&q).unwrap();
        assert!(stats.truncated || want == 0, "{q:?}");
        assert_eq!(r.total, want, "{q:?}");
        assert_eq!(store2.search(&q).unwrap().total, want, "{q:?}");
        assert_eq!(mem.search(&q).unwrap().total, want, "{q:?}");
    }
}

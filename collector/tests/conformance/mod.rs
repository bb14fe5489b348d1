//! The store conformance suite: random connection records (with every
//! case the join rules know: superseding, gone, NAT-clash shadows,
//! recovered duplicates, IPv4 and IPv6) and random queries, checked
//! against `MemStore`. Every store (tantivy, ClickHouse) must give the
//! same hits, totals, gaps and rank order.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctw_collector::store::{
    normalize, AppendOutcome, ConnKind, Gap, Hit, MemStore, RecordStore, SearchQuery, SearchResult,
    StoredBatch,
};
use ctw_common::{status, ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

pub const H: u64 = 3_600_000_000_000;
pub const MIN: u64 = 60_000_000_000;
/// 2026-01-01T00:00:00Z
pub const BASE: u64 = 1_767_225_600_000_000_000;

/// Deterministic randomness for the generators: `fastrand` with a fixed seed.
pub use fastrand::Rng;

pub fn rec(t: u64, src: IpAddr, sport: u16, snat: IpAddr, nport: u16) -> ConnRecord {
    let dst = match src {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        IpAddr::V6(_) => IpAddr::V6("2001:db8::7".parse().unwrap()),
    };
    ConnRecord {
        id: (t % 1_000_000_007) as u32,
        status: status::CONFIRMED | status::SRC_NAT,
        tcp_state: Some(TcpState::SynSent),
        tcp_flags_orig: 0x27,
        start_ns: Some(t),
        ..ConnRecord::new(
            EventKind::New,
            t,
            Protocol::Tcp,
            Tuple::new(src, sport, dst, 443),
            Tuple::new(dst, 443, snat, nport),
        )
    }
}

/// A record as every store keeps it.
pub fn kept(mut r: ConnRecord) -> ConnRecord {
    normalize(&mut r);
    r
}

pub fn batch(node: &str, seq: u64, records: Vec<ConnRecord>) -> StoredBatch {
    StoredBatch {
        node: node.into(),
        boot_id: "boot-a".into(),
        seq,
        records,
    }
}

/// Random connections: NEW, often a DESTROY (lifetime < 2 h), sometimes a
/// recovered duplicate while alive; IPv4 and IPv6; few values so queries
/// collide. Like the kernel, never two live connections with the same
/// original or the same reply tuple on one node: a source port (for the
/// original tuple) or a SNAT port (for the reply tuple) is redrawn (else a
/// fresh one taken) when the tuple is alive at the drawn time.
///
/// Connections without a DESTROY are, in turns: superseded (a later NEW of
/// another pod takes their reply tuple: the kernel sent no DESTROY), found
/// gone by the agent (a `CTW_GONE` record), or alive for 4 h. Some UDP
/// connections also get a NAT-clash shadow DESTROY (another backend).
pub fn random_records(rng: &mut Rng, n: usize, span: u64) -> Vec<(String, ConnRecord)> {
    use std::collections::HashMap;
    type Alive = HashMap<(String, Protocol, bool, ctw_common::Tuple), Vec<(u64, u64)>>;
    let mut out = Vec::new();
    // Lifetimes by (node, protocol, is reply tuple, tuple).
    let mut alive: Alive = HashMap::new();
    let free = |alive: &Alive, node: &str, r: &ConnRecord, reply: bool, a: u64, b: u64| {
        let t = if reply { r.reply } else { r.orig };
        alive
            .get(&(node.to_string(), r.protocol, reply, t))
            .is_none_or(|v| v.iter().all(|&(x, y)| b < x || a > y))
    };
    let take = |alive: &mut Alive, node: &str, r: &ConnRecord, a: u64, b: u64| {
        for (reply, t) in [(false, r.orig), (true, r.reply)] {
            alive
                .entry((node.to_string(), r.protocol, reply, t))
                .or_default()
                .push((a, b));
        }
    };
    let mut fresh_port = 20000u16;
    for _ in 0..n {
        let node = format!("n{}", rng.u64(..3));
        let v6 = rng.u64(..4) == 0;
        let ip = |rng: &mut Rng, net: u8| -> IpAddr {
            if v6 {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    net as u16,
                    0,
                    0,
                    0,
                    0,
                    rng.u64(..6) as u16,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::new(10, net, 0, rng.u64(..6) as u8))
            }
        };
        let t = BASE + rng.u64(..span);
        let mut r = rec(
            t,
            ip(rng, 1),
            1000 + rng.u64(..8) as u16,
            ip(rng, 2),
            5000 + rng.u64(..8) as u16,
        );
        r.orig.dst = ip(rng, 3);
        r.reply.src = if rng.u64(..5) == 0 {
            ip(rng, 4)
        } else {
            r.orig.dst
        };
        r.orig.dst_port = [53, 80, 443][rng.u64(..3) as usize];
        r.reply.src_port = r.orig.dst_port;
        r.protocol = if rng.u64(..4) == 0 {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        r.id = rng.u64(..) as u32;
        r.mark = rng.u64(..3) as u32;
        if rng.u64(..3) == 0 {
            r.start_ns = None;
        }
        // 0-5: DESTROY; 6: superseded; 7: gone; 8-9: alive 4 h.
        let fate = rng.u64(..10);
        let life = if fate < 6 || fate == 7 {
            rng.u64(..2 * H)
        } else if fate == 6 {
            1 + rng.u64(..H)
        } else {
            4 * H
        };
        for _ in 0..8 {
            if free(&alive, &node, &r, false, t, t + life) {
                break;
            }
            r.orig.src_port = 1000 + rng.u64(..8) as u16;
        }
        for _ in 0..8 {
            if free(&alive, &node, &r, true, t, t + life) {
                break;
            }
            r.reply.dst_port = 5000 + rng.u64(..8) as u16;
        }
        if !free(&alive, &node, &r, false, t, t + life)
            || !free(&alive, &node, &r, true, t, t + life)
        {
            fresh_port += 1;
            r.orig.src_port = fresh_port;
            r.reply.dst_port = fresh_port;
        }
        take(&mut alive, &node, &r, t, t + life);
        out.push((node.clone(), r));
        let destroy = |r: &ConnRecord, at: u64, rng: &mut Rng| {
            let mut d = *r;
            d.kind = EventKind::Destroy;
            d.event_ns = at;
            d.stop_ns = Some(at);
            // The kernel's state at the end (the connection's end_state).
            d.tcp_state = (r.protocol == Protocol::Tcp).then(|| {
                [TcpState::TimeWait, TcpState::Close, TcpState::LastAck][rng.u64(..3) as usize]
            });
            d.counters_orig = Some(Counters {
                packets: rng.u64(..100),
                bytes: rng.u64(..1 << 40),
            });
            d.counters_reply = (rng.u64(..2) == 0).then(|| Counters {
                packets: rng.u64(..100),
                bytes: rng.u64(..100_000),
            });
            d
        };
        match fate {
            0..6 => {
                out.push((node.clone(), destroy(&r, t + life, rng)));
                if r.protocol == Protocol::Udp && rng.u64(..5) == 0 {
                    // The shadow of a NAT clash: another id and backend,
                    // its own start, only a DESTROY.
                    let mut shadow = destroy(&r, t + rng.u64(..life + 1), rng);
                    shadow.status |= status::NAT_CLASH;
                    shadow.reply.src = ip(rng, 5);
                    shadow.start_ns = r.start_ns.map(|s| s + 1000);
                    out.push((node.clone(), shadow));
                }
            }
            6 => {
                // Another pod takes the reply tuple at t + life; this
                // connection's end was never reported (or, sometimes, the
                // agent found it gone only after the successor started).
                let at = t + life;
                let mut next = r;
                next.event_ns = at;
                next.start_ns = r.start_ns.map(|_| at);
                next.orig.src = ip(rng, 6);
                let next_life = rng.u64(..2 * H);
                if free(&alive, &node, &next, false, at, at + next_life)
                    && free(&alive, &node, &next, true, at + 1, at + next_life)
                {
                    take(&mut alive, &node, &next, at, at + next_life);
                    out.push((node.clone(), next));
                    if rng.u64(..2) == 0 {
                        out.push((node.clone(), destroy(&next, at + next_life, rng)));
                    }
                    if rng.u64(..3) == 0 {
                        let mut gone = destroy(&r, at + rng.u64(..MIN), rng);
                        gone.status |= status::CTW_GONE;
                        gone.stop_ns = Some(t + rng.u64(..life));
                        gone.counters_orig = None;
                        gone.counters_reply = None;
                        out.push((node.clone(), gone));
                    }
                }
            }
            7 => {
                // Found gone by the agent: last seen before, gone at t + life.
                let mut gone = destroy(&r, t + life, rng);
                gone.status |= status::CTW_GONE;
                gone.stop_ns = Some(t + rng.u64(..life + 1));
                gone.counters_orig = None;
                gone.counters_reply = None;
                out.push((node.clone(), gone));
            }
            _ => {}
        }
        if rng.u64(..10) == 0 {
            let mut again = r;
            again.kind = EventKind::Recovered;
            again.event_ns = t + rng.u64(..MIN.min(life).max(1));
            out.push((node, again));
        }
    }
    out
}

pub fn load(stores: &[&dyn RecordStore], records: &[(String, ConnRecord)]) {
    load_from(stores, records, 0)
}

/// [`load`] with batch sequence numbers from `seq0`.
pub fn load_from(stores: &[&dyn RecordStore], records: &[(String, ConnRecord)], seq0: u64) {
    for (i, chunk) in records.chunks(37).enumerate() {
        // group by node per batch
        for node in ["n0", "n1", "n2"] {
            let rs: Vec<ConnRecord> = chunk
                .iter()
                .filter(|(n, _)| n == node)
                .map(|(_, r)| *r)
                .collect();
            if rs.is_empty() {
                continue;
            }
            for s in stores {
                assert_eq!(
                    s.append(batch(node, seq0 + i as u64, rs.clone())).unwrap(),
                    AppendOutcome::Stored
                );
            }
        }
    }
}

pub fn canonical(mut hits: Vec<Hit>) -> Vec<String> {
    let mut v: Vec<String> = hits.drain(..).map(|h| format!("{h:?}")).collect();
    v.sort();
    v
}

/// A random query about one of `records` (any mix of fields, a time
/// range within `span` of `BASE`, sometimes `at` and a kind).
pub fn random_query(rng: &mut Rng, records: &[(String, ConnRecord)], span: u64) -> SearchQuery {
    let (_, pick) = &records[rng.u64(..records.len() as u64) as usize];
    let mut q = SearchQuery {
        limit: 100_000,
        ..Default::default()
    };
    let m = rng.u64(..);
    if m & 1 != 0 {
        q.snat_ip = Some(pick.reply.dst);
    }
    if m & 2 != 0 {
        q.snat_port = Some(pick.reply.dst_port);
    }
    if m & 4 != 0 {
        q.src_ip = Some(pick.orig.src);
    }
    if m & 8 != 0 {
        q.src_port = Some(pick.orig.src_port);
    }
    if m & 16 != 0 {
        q.dst_ip = Some(pick.orig.dst);
    }
    if m & 32 != 0 {
        q.dst_port = Some(pick.orig.dst_port);
    }
    if m & 64 != 0 {
        q.node = Some(format!("n{}", rng.u64(..3)));
    }
    if m & 128 != 0 {
        q.protocol = Some(pick.protocol);
    }
    if m & 256 != 0 {
        let from = BASE + rng.u64(..span);
        q.from_ns = Some(from);
        q.to_ns = Some(from + rng.u64(..3 * H));
        if m & 512 != 0 {
            q.at_ns = Some(from + rng.u64(..H));
        }
    }
    if m & 1024 != 0 && m & 2048 != 0 {
        q.kind = Some(ConnKind::ALL[rng.u64(..4) as usize]);
    }
    q
}

/// `a` (a store's answer to `q`) equals `b` (MemStore's): total, gaps,
/// hits; then with a small limit, the same count and rank order.
pub fn assert_same(
    i: usize,
    q: &mut SearchQuery,
    a: SearchResult,
    b: SearchResult,
    store: &dyn RecordStore,
    mem: &MemStore,
    rng: &mut Rng,
) {
    assert_eq!(a.total, b.total, "query {i}: {q:?}");
    assert_eq!(a.gaps, b.gaps, "query {i}: {q:?}");
    assert_eq!(canonical(a.hits), canonical(b.hits), "query {i}: {q:?}");
    // With a small limit: the same number, and the same rank order.
    q.limit = 1 + rng.u64(..5) as usize;
    let a = store.search(q).unwrap();
    let b = mem.search(q).unwrap();
    assert_eq!(
        (a.total, a.hits.len()),
        (b.total, b.hits.len()),
        "query {i}: {q:?}"
    );
    let starts = |h: &[Hit]| h.iter().map(|h| h.start_ns()).collect::<Vec<_>>();
    if q.at_ns.is_none() {
        assert_eq!(starts(&a.hits), starts(&b.hits), "query {i}: {q:?}");
    }
}

/// The randomized equivalence of `store` with a `MemStore` reading
/// `lookback_hours` around each range: 3000 random records (a third
/// appended, then `between(0)`, the rest, a gap), `queries` random
/// queries (`between(i)` before query `i`).
pub fn random_equivalence(
    store: &dyn RecordStore,
    lookback_hours: u64,
    queries: usize,
    between: &mut dyn FnMut(usize),
) {
    let mem = MemStore::with_lookback(lookback_hours * H);
    let mut rng = Rng::with_seed(1234);
    let span = 30 * H;
    let records = random_records(&mut rng, 3000, span);
    // MemStore keeps two records identical in every stored field; the
    // ClickHouse store answers them once (one kernel event stored twice by
    // a replayed batch): the data must hold none.
    let mut distinct = std::collections::HashSet::new();
    for (node, r) in &records {
        let again = format!("{node} {:?}", kept(*r));
        assert!(distinct.insert(again.clone()), "generated twice: {again}");
    }
    let (old, new) = records.split_at(1000);
    load(&[store, &mem], old);
    between(0);
    load_from(&[store, &mem], new, 1_000_000);
    let gap = Gap {
        node: "n1".into(),
        from_ns: BASE + 3 * H,
        to_ns: BASE + 4 * H,
        reason: "kernel_drop".into(),
        count: 5,
    };
    store.record_gap(gap.clone()).unwrap();
    mem.record_gap(gap).unwrap();
    for i in 0..queries {
        between(i);
        let mut q = random_query(&mut rng, &records, span);
        let a = store.search(&q).unwrap();
        let b = mem.search(&q).unwrap();
        assert_same(i, &mut q, a, b, store, &mem, &mut rng);
    }
}

//! The API's answers built from store types ([`ctw_common::api`]'s typed
//! answers): a connection, a gap, a search. Shared by the search endpoint
//! and the resolve service, so both show a connection alike.

use ctw_common::api::{self, ConnectionAnswer, GapAnswer, SearchAnswer};
use ctw_common::{status, EventKind};

use crate::store::{alive_at, Gap, Hit, SearchQuery, SearchResult};

/// One connection (a store hit) as a search shows it; `alive_at` only with
/// the query's `at`.
pub fn connection(h: &Hit, q: &SearchQuery) -> ConnectionAnswer {
    let r = &h.record;
    let (snat_ip, snat_port) = r.snat();
    let start = h.start_ns();
    let c =
        |f: fn(&ctw_common::Counters) -> u64, c: Option<ctw_common::Counters>| c.as_ref().map(f);
    ConnectionAnswer {
        ts: api::format_time(r.event_ns),
        node: h.node.clone(),
        protocol: r.protocol,
        src_ip: r.orig.src,
        src_port: r.orig.src_port,
        dst_ip: r.orig.dst,
        dst_port: r.orig.dst_port,
        snat_ip,
        snat_port,
        kind: match r.kind {
            EventKind::New => "new",
            EventKind::Recovered => "recovered",
            EventKind::Destroy => "destroy",
        }
        .into(),
        start: api::format_time(start),
        state: r.tcp_state.map(|s| s.name().to_string()),
        // Picked up mid-stream: the connection started before this entry.
        midstream: r.midstream(),
        zone: r.zone,
        external: r.status & status::CTW_EXTERNAL != 0,
        end: h.closed_ns.map(api::format_time),
        end_kind: h.closed_ns.and(h.end).map(|e| e.as_str().to_string()),
        last_seen: h.closed_ns.and(h.last_seen_ns).map(api::format_time),
        duration_ms: h.closed_ns.map(|c| c.saturating_sub(start) / 1_000_000),
        alive_at: q.at_ns.map(|at| alive_at(h, at, q.at_precision_ns)),
        orig_packets: c(|c| c.packets, h.counters_orig),
        orig_bytes: c(|c| c.bytes, h.counters_orig),
        reply_packets: c(|c| c.packets, h.counters_reply),
        reply_bytes: c(|c| c.bytes, h.counters_reply),
    }
}

/// A gap as the API lists it.
pub fn gap(g: &Gap) -> GapAnswer {
    GapAnswer {
        node: g.node.clone(),
        from: api::format_time(g.from_ns),
        to: api::format_time(g.to_ns),
        reason: g.reason.clone(),
        count: g.count,
    }
}

/// Gaps as the API lists them (`gaps` of a search or of a resolved line).
pub fn gaps(gaps: &[Gap]) -> Vec<GapAnswer> {
    gaps.iter().map(gap).collect()
}

/// The answer of `GET /api/v1/connections` for query `q`.
pub fn search(res: &SearchResult, q: &SearchQuery) -> SearchAnswer {
    SearchAnswer {
        records: res.hits.iter().map(|h| connection(h, q)).collect(),
        total: res.total,
        returned: res.hits.len() as u64,
        limit: q.limit as u64,
        complete: res.gaps.is_empty(),
        gaps: gaps(&res.gaps),
        from: q.from_ns.map(api::format_time),
        to: q.to_ns.map(api::format_time),
        at: q.at_ns.map(api::format_time),
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Hits covering every optional field of a connection's answer, shared
    //! by the snapshot tests of the answers that show connections.
    #![allow(clippy::unwrap_used)]
    use ctw_common::{status, ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

    use crate::store::{End, Hit};

    pub const T: u64 = 1_733_727_900_000_000_000; // 2024-12-09T07:05:00Z

    /// Field-wise JSON for snapshots: keys sorted, so only a changed name,
    /// value or presence shows in the diff.
    pub fn json(v: impl serde::Serialize) -> String {
        serde_json::to_string_pretty(&serde_json::to_value(v).unwrap()).unwrap()
    }

    fn hit(node: &str, record: ConnRecord) -> Hit {
        Hit::open(node, record)
    }
    pub const MS: u64 = 1_000_000;

    fn record(kind: EventKind, protocol: Protocol, pod: &str, port: u16) -> ConnRecord {
        let ip = |s: &str| s.parse().unwrap();
        ConnRecord::new(
            kind,
            T,
            protocol,
            Tuple::new(ip(pod), port, ip("198.19.0.2"), 80),
            Tuple::new(ip("198.19.0.2"), 80, ip("198.18.0.1"), 40000 + port),
        )
    }

    /// A TCP connection seen opening and ended by the kernel's DESTROY,
    /// in zone 7, from outside the pod CIDRs, with counters.
    pub fn closed() -> Hit {
        let mut r = record(EventKind::New, Protocol::Tcp, "10.244.1.7", 1);
        r.tcp_state = Some(TcpState::SynSent);
        r.zone = 7;
        r.status |= status::CTW_EXTERNAL;
        r.start_ns = Some(T - 5 * MS);
        Hit {
            closed_ns: Some(T + 1500 * MS),
            end: Some(End::Destroy),
            counters_orig: Some(Counters {
                packets: 5,
                bytes: 400,
            }),
            counters_reply: Some(Counters {
                packets: 4,
                bytes: 3000,
            }),
            ..hit("node-a", r)
        }
    }

    /// A TCP connection picked up mid-stream, still open.
    pub fn midstream() -> Hit {
        let mut r = record(EventKind::New, Protocol::Tcp, "10.244.1.8", 2);
        r.tcp_state = Some(TcpState::Established);
        hit("node-b", r)
    }

    /// A UDP flow found by a dump (IPv6), found gone by the agent.
    pub fn gone() -> Hit {
        let mut r = record(EventKind::Recovered, Protocol::Udp, "10.244.1.9", 3);
        r.orig = Tuple::new(
            "fd00::9".parse().unwrap(),
            3,
            "fd00::2".parse().unwrap(),
            53,
        );
        r.reply = Tuple::new(
            "fd00::2".parse().unwrap(),
            53,
            "fd00::1".parse().unwrap(),
            40003,
        );
        Hit {
            closed_ns: Some(T + 30_000 * MS),
            end: Some(End::Gone),
            last_seen_ns: Some(T + 20_000 * MS),
            ..hit("node-c", r)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use expect_test::expect;

    use super::fixtures::{self, json, MS, T};
    use super::*;

    #[test]
    fn search_answer_snapshot() {
        let q = SearchQuery {
            at_ns: Some(T + 10 * MS),
            at_precision_ns: MS,
            from_ns: Some(T - 300_000 * MS),
            to_ns: Some(T + 300_000 * MS),
            limit: 3,
            ..SearchQuery::default()
        };
        let res = SearchResult {
            hits: vec![fixtures::closed(), fixtures::midstream(), fixtures::gone()],
            total: 7,
            gaps: vec![Gap {
                node: "node-b".into(),
                from_ns: T,
                to_ns: T + 60_000 * MS,
                reason: "kernel_drop".into(),
                count: 12,
            }],
        };
        expect![[r#"
            {
              "at": "2024-12-09T07:05:00.010Z",
              "complete": false,
              "from": "2024-12-09T07:00:00.000Z",
              "gaps": [
                {
                  "count": 12,
                  "from": "2024-12-09T07:05:00.000Z",
                  "node": "node-b",
                  "reason": "kernel_drop",
                  "to": "2024-12-09T07:06:00.000Z"
                }
              ],
              "limit": 3,
              "records": [
                {
                  "alive_at": true,
                  "dst_ip": "198.19.0.2",
                  "dst_port": 80,
                  "duration_ms": 1505,
                  "end": "2024-12-09T07:05:01.500Z",
                  "end_kind": "destroy",
                  "external": true,
                  "kind": "new",
                  "node": "node-a",
                  "orig_bytes": 400,
                  "orig_packets": 5,
                  "protocol": "tcp",
                  "reply_bytes": 3000,
                  "reply_packets": 4,
                  "snat_ip": "198.18.0.1",
                  "snat_port": 40001,
                  "src_ip": "10.244.1.7",
                  "src_port": 1,
                  "start": "2024-12-09T07:04:59.995Z",
                  "state": "SYN_SENT",
                  "ts": "2024-12-09T07:05:00.000Z",
                  "zone": 7
                },
                {
                  "alive_at": true,
                  "dst_ip": "198.19.0.2",
                  "dst_port": 80,
                  "kind": "new",
                  "midstream": true,
                  "node": "node-b",
                  "protocol": "tcp",
                  "snat_ip": "198.18.0.1",
                  "snat_port": 40002,
                  "src_ip": "10.244.1.8",
                  "src_port": 2,
                  "start": "2024-12-09T07:05:00.000Z",
                  "state": "ESTABLISHED",
                  "ts": "2024-12-09T07:05:00.000Z"
                },
                {
                  "alive_at": true,
                  "dst_ip": "fd00::2",
                  "dst_port": 53,
                  "duration_ms": 30000,
                  "end": "2024-12-09T07:05:30.000Z",
                  "end_kind": "gone",
                  "kind": "recovered",
                  "last_seen": "2024-12-09T07:05:20.000Z",
                  "node": "node-c",
                  "protocol": "udp",
                  "snat_ip": "fd00::1",
                  "snat_port": 40003,
                  "src_ip": "fd00::9",
                  "src_port": 3,
                  "start": "2024-12-09T07:05:00.000Z",
                  "ts": "2024-12-09T07:05:00.000Z"
                }
              ],
              "returned": 3,
              "to": "2024-12-09T07:10:00.000Z",
              "total": 7
            }"#]]
        .assert_eq(&json(search(&res, &q)));
    }

    #[test]
    fn empty_search_answer_snapshot() {
        let q = SearchQuery {
            limit: 100,
            ..SearchQuery::default()
        };
        expect![[r#"
            {
              "at": null,
              "complete": true,
              "from": null,
              "gaps": [],
              "limit": 100,
              "records": [],
              "returned": 0,
              "to": null,
              "total": 0
            }"#]]
        .assert_eq(&json(search(&SearchResult::default(), &q)));
    }

    #[test]
    fn a_connection_says_how_its_end_is_known() {
        use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};
        let ip = "198.18.0.1".parse().unwrap();
        let r = ConnRecord::new(
            EventKind::Recovered,
            1_000_000_000,
            Protocol::Tcp,
            Tuple::new(ip, 1, ip, 2),
            Tuple::new(ip, 2, ip, 1),
        );
        let mut h = Hit::open("n", r);
        let q = SearchQuery::default();
        let v = serde_json::to_value(connection(&h, &q)).unwrap();
        assert!(v.get("end").is_none() && v.get("end_kind").is_none(), "{v}");
        h.closed_ns = Some(3_000_000_000);
        h.end = Some(crate::store::End::Gone);
        h.last_seen_ns = Some(2_000_000_000);
        let v = serde_json::to_value(connection(&h, &q)).unwrap();
        assert_eq!(v["end_kind"], "gone", "{v}");
        assert_eq!(v["end"], "1970-01-01T00:00:03.000Z", "{v}");
        assert_eq!(v["last_seen"], "1970-01-01T00:00:02.000Z", "{v}");
        h.end = Some(crate::store::End::Superseded);
        h.last_seen_ns = None;
        let v = serde_json::to_value(connection(&h, &q)).unwrap();
        assert_eq!(v["end_kind"], "superseded", "{v}");
        assert!(v.get("last_seen").is_none(), "{v}");
    }
}

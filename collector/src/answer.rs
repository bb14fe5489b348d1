//! The JSON answers of the HTTP API that are built from store types: a
//! search hit, a gap, a search. Shared by the search endpoint and the
//! resolve service, so both write a connection alike.

use ctw_common::api;
use ctw_common::EventKind;
use serde_json::{json, Value};

use crate::store::{alive_at, Gap, Hit, SearchQuery, SearchResult};

/// One search hit as JSON.
pub fn hit_json(h: &Hit, q: &SearchQuery) -> Value {
    let r = &h.record;
    let (snat_ip, snat_port) = r.snat();
    let start = h.start_ns();
    let mut v = json!({
        "ts": api::format_time(r.event_ns),
        "node": h.node,
        "protocol": r.protocol,
        "src_ip": r.orig.src,
        "src_port": r.orig.src_port,
        "dst_ip": r.orig.dst,
        "dst_port": r.orig.dst_port,
        "snat_ip": snat_ip,
        "snat_port": snat_port,
        "kind": match r.kind { EventKind::New => "new", EventKind::Recovered => "recovered", EventKind::Destroy => "destroy" },
        "start": api::format_time(start),
    });
    let o = v.as_object_mut().expect("json object");
    if let Some(s) = r.tcp_state {
        o.insert("state".into(), json!(s.name()));
    }
    if r.midstream() {
        // Picked up mid-stream: the connection started before this entry.
        o.insert("midstream".into(), json!(true));
    }
    if r.zone != 0 {
        o.insert("zone".into(), json!(r.zone));
    }
    if r.status & ctw_common::status::CTW_EXTERNAL != 0 {
        o.insert("external".into(), json!(true));
    }
    if let Some(c) = h.closed_ns {
        o.insert("end".into(), json!(api::format_time(c)));
        if let Some(e) = h.end {
            o.insert("end_kind".into(), json!(e.as_str()));
        }
        if let Some(s) = h.last_seen_ns {
            o.insert("last_seen".into(), json!(api::format_time(s)));
        }
        o.insert(
            "duration_ms".into(),
            json!(c.saturating_sub(start) / 1_000_000),
        );
    }
    if let Some(at) = q.at_ns {
        o.insert("alive_at".into(), json!(alive_at(h, at, q.at_precision_ns)));
    }
    if let Some(c) = h.counters_orig {
        o.insert("orig_packets".into(), json!(c.packets));
        o.insert("orig_bytes".into(), json!(c.bytes));
    }
    if let Some(c) = h.counters_reply {
        o.insert("reply_packets".into(), json!(c.packets));
        o.insert("reply_bytes".into(), json!(c.bytes));
    }
    v
}

fn gap_json(g: &Gap) -> Value {
    json!({
        "node": g.node,
        "from": api::format_time(g.from_ns),
        "to": api::format_time(g.to_ns),
        "reason": g.reason,
        "count": g.count,
    })
}

/// Gaps as the API lists them (`gaps` of a search or of a resolved line).
pub fn gaps_json(gaps: &[Gap]) -> Value {
    Value::Array(gaps.iter().map(gap_json).collect())
}

/// The answer of `GET /api/v1/connections` for query `q`.
pub fn search_json(res: &SearchResult, q: &SearchQuery) -> Value {
    let gaps = &res.gaps;
    json!({
        "records": res.hits.iter().map(|h| hit_json(h, q)).collect::<Vec<_>>(),
        "total": res.total,
        "returned": res.hits.len(),
        "limit": q.limit,
        "complete": gaps.is_empty(),
        "gaps": gaps.iter().map(gap_json).collect::<Vec<_>>(),
        "from": q.from_ns.map(api::format_time),
        "to": q.to_ns.map(api::format_time),
        "at": q.at_ns.map(api::format_time),
    })
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Hits covering every optional field of a connection's answer, shared
    //! by the snapshot tests of the answers that show connections.
    #![allow(clippy::unwrap_used)]
    use ctw_common::{status, ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

    use crate::store::{End, Hit};

    pub const T: u64 = 1_733_727_900_000_000_000; // 2024-12-09T07:05:00Z
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
            node: "node-a".into(),
            record: r,
            closed_ns: Some(T + 1500 * MS),
            end: Some(End::Destroy),
            last_seen_ns: None,
            counters_orig: Some(Counters {
                packets: 5,
                bytes: 400,
            }),
            counters_reply: Some(Counters {
                packets: 4,
                bytes: 3000,
            }),
        }
    }

    /// A TCP connection picked up mid-stream, still open.
    pub fn midstream() -> Hit {
        let mut r = record(EventKind::New, Protocol::Tcp, "10.244.1.8", 2);
        r.tcp_state = Some(TcpState::Established);
        Hit {
            node: "node-b".into(),
            record: r,
            closed_ns: None,
            end: None,
            last_seen_ns: None,
            counters_orig: None,
            counters_reply: None,
        }
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
            node: "node-c".into(),
            record: r,
            closed_ns: Some(T + 30_000 * MS),
            end: Some(End::Gone),
            last_seen_ns: Some(T + 20_000 * MS),
            counters_orig: None,
            counters_reply: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use expect_test::expect;

    use super::fixtures::{self, MS, T};
    use super::*;

    /// Field-wise JSON: keys sorted, so only a changed name, value or
    /// presence shows in the diff.
    fn json(v: impl serde::Serialize) -> String {
        serde_json::to_string_pretty(&serde_json::to_value(v).unwrap()).unwrap()
    }

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
        .assert_eq(&json(search_json(&res, &q)));
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
        .assert_eq(&json(search_json(&SearchResult::default(), &q)));
    }
}

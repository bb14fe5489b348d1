//! The API's answers built from store types ([`ctw_common::api`]'s typed
//! answers): a connection, a gap, a search. Shared by the search endpoint
//! and the resolve service, so both show a connection alike.

use ctw_common::api::{
    self, ConnectionAnswer, GapAnswer, PodFields, PodRefAnswer, SearchAnswer, WorkloadAnswer,
};
use ctw_common::{status, EventKind};

use crate::pods::{NoPodReason, PodAnswer, PodHistory, PodRef};
use crate::store::{alive_at, Gap, Hit, SearchQuery, SearchResult};

/// A pod of the history as the API shows it.
pub fn pod_ref(p: &PodRef) -> PodRefAnswer {
    PodRefAnswer {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
        workload: p.workload.as_ref().map(|w| WorkloadAnswer {
            kind: w.kind.clone(),
            name: w.name.clone(),
        }),
        node: p.node.clone(),
        host_network: p.host_network,
        from: api::format_time(p.from_ns),
        to: p.to_ns.map(api::format_time),
    }
}

/// A pod answer of the history as the API's pod fields.
pub fn pod_fields(a: &PodAnswer) -> PodFields {
    PodFields {
        pod: a.pod.as_ref().map(pod_ref),
        pod_reason: a.reason.map(|r| {
            match r {
                NoPodReason::NoPodAtTime => "no_pod_at_time",
                NoPodReason::HistoryGap => "history_gap",
                NoPodReason::HostNetwork => "host_network",
                NoPodReason::IpHandover => "ip_handover",
            }
            .to_string()
        }),
        pod_verified: a.verified,
        pod_ip_reused: a.pod_ip_reused,
        pod_holders: (!a.holders.is_empty()).then(|| a.holders.iter().map(pod_ref).collect()),
    }
}

/// The pod fields of a connection (its source as of its start, reuse
/// checked over its lifetime widened by `skew_ns`); `None` without a
/// history (kubernetes off).
pub fn hit_pod(pods: Option<&PodHistory>, h: &Hit, skew_ns: u64) -> Option<PodFields> {
    pods.map(|p| pod_fields(&p.for_hit_with_skew(h, skew_ns)))
}

/// One connection (a store hit) as a search shows it; `alive_at` only with
/// the query's `at`; the pod fields only with a pod history.
pub fn connection(h: &Hit, q: &SearchQuery, pods: Option<&PodHistory>) -> ConnectionAnswer {
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
        end_state: h.end_state.map(|s| s.name().to_string()),
        last_seen: h.closed_ns.and(h.last_seen_ns).map(api::format_time),
        duration_ms: h.closed_ns.map(|c| c.saturating_sub(start) / 1_000_000),
        alive_at: q.at_ns.map(|at| alive_at(h, at, q.at_precision_ns)),
        orig_packets: c(|c| c.packets, h.counters_orig),
        orig_bytes: c(|c| c.bytes, h.counters_orig),
        reply_packets: c(|c| c.packets, h.counters_reply),
        reply_bytes: c(|c| c.bytes, h.counters_reply),
        pod_fields: hit_pod(pods, h, 0),
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

/// The answer of `GET /api/v1/connections` for query `q` (each connection
/// with its pod when `pods` is given).
pub fn search(res: &SearchResult, q: &SearchQuery, pods: Option<&PodHistory>) -> SearchAnswer {
    SearchAnswer {
        records: res.hits.iter().map(|h| connection(h, q, pods)).collect(),
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
            end_state: Some(TcpState::TimeWait),
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

    /// A pod history over the addresses of [`closed`], [`midstream`] and
    /// [`gone`] (in a collector with kubernetes on):
    /// - `10.244.1.7` (closed): `payments/checkout-7d9f-x2k4` of Deployment
    ///   `payments/checkout` (through ReplicaSet `checkout-7d9f`), node-a,
    ///   since a minute before;
    /// - `10.244.1.8` (midstream): no pod ever (`no_pod_at_time`);
    /// - `fd00::9` (gone, alive until +20 s, gone by +30 s): `jobs/batch-1`
    ///   deleted at +10 s, then `jobs/batch-2` from +15 s (`pod_ip_reused`).
    pub fn pods() -> crate::pods::PodHistory {
        use crate::pods::{Input, PodHistory, PodState, Workload};
        let h = PodHistory::in_memory(u64::MAX);
        h.apply(Input::ListBegin, T - 120_000 * MS);
        h.apply(Input::ListDone, T - 120_000 * MS);
        h.apply(
            Input::Owner {
                kind: "ReplicaSet".into(),
                namespace: "payments".into(),
                name: "checkout-7d9f".into(),
                owner: Some(Workload {
                    kind: "Deployment".into(),
                    name: "checkout".into(),
                }),
            },
            T - 100_000 * MS,
        );
        let pod =
            |uid: u128, ns: &str, name: &str, ip: &str, owner: Option<(&str, &str)>| PodState {
                uid,
                namespace: ns.into(),
                name: name.into(),
                owner: owner.map(|(kind, name)| Workload {
                    kind: kind.into(),
                    name: name.into(),
                }),
                node: "node-a".into(),
                host_network: false,
                ips: vec![ip.parse().unwrap()],
                terminal: false,
                start_ns: None,
            };
        let checkout = pod(
            0xa1,
            "payments",
            "checkout-7d9f-x2k4",
            "10.244.1.7",
            Some(("ReplicaSet", "checkout-7d9f")),
        );
        h.apply(Input::Applied(checkout), T - 60_000 * MS);
        let b1 = pod(0xb1, "jobs", "batch-1", "fd00::9", None);
        h.apply(Input::Applied(b1.clone()), T - 60_000 * MS);
        h.apply(Input::Deleted(b1), T + 10_000 * MS);
        let b2 = pod(0xb2, "jobs", "batch-2", "fd00::9", None);
        h.apply(Input::Applied(b2), T + 15_000 * MS);
        h
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
                  "end_state": "TIME_WAIT",
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
        .assert_eq(&json(search(&res, &q, None)));
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
        .assert_eq(&json(search(&SearchResult::default(), &q, None)));
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
        let v = serde_json::to_value(connection(&h, &q, None)).unwrap();
        assert!(v.get("end").is_none() && v.get("end_kind").is_none(), "{v}");
        h.closed_ns = Some(3_000_000_000);
        h.end = Some(crate::store::End::Gone);
        h.last_seen_ns = Some(2_000_000_000);
        let v = serde_json::to_value(connection(&h, &q, None)).unwrap();
        assert_eq!(v["end_kind"], "gone", "{v}");
        assert_eq!(v["end"], "1970-01-01T00:00:03.000Z", "{v}");
        assert_eq!(v["last_seen"], "1970-01-01T00:00:02.000Z", "{v}");
        h.end = Some(crate::store::End::Superseded);
        h.last_seen_ns = None;
        let v = serde_json::to_value(connection(&h, &q, None)).unwrap();
        assert_eq!(v["end_kind"], "superseded", "{v}");
        assert!(v.get("last_seen").is_none(), "{v}");
    }

    #[test]
    fn search_answer_with_pods_snapshot() {
        // Kubernetes on: every connection names its source's pod as of its
        // start, or says why not, and whether the address changed hands.
        let q = SearchQuery {
            limit: 3,
            ..SearchQuery::default()
        };
        let res = SearchResult {
            hits: vec![fixtures::closed(), fixtures::midstream(), fixtures::gone()],
            total: 3,
            gaps: vec![],
        };
        let pods = fixtures::pods();
        let v = serde_json::to_value(search(&res, &q, Some(&pods))).unwrap();
        let only_pods: Vec<serde_json::Value> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let o = r.as_object().unwrap();
                let keep = |k: &&String| k.starts_with("pod") || *k == "src_ip";
                serde_json::Value::Object(
                    o.iter()
                        .filter(|(k, _)| keep(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
            })
            .collect();
        expect![[r#"
            [
              {
                "pod": {
                  "from": "2024-12-09T07:04:00.000Z",
                  "name": "checkout-7d9f-x2k4",
                  "namespace": "payments",
                  "node": "node-a",
                  "uid": "00000000-0000-0000-0000-0000000000a1",
                  "workload": {
                    "kind": "Deployment",
                    "name": "checkout"
                  }
                },
                "pod_ip_reused": false,
                "pod_verified": true,
                "src_ip": "10.244.1.7"
              },
              {
                "pod": null,
                "pod_ip_reused": false,
                "pod_reason": "no_pod_at_time",
                "pod_verified": false,
                "src_ip": "10.244.1.8"
              },
              {
                "pod": {
                  "from": "2024-12-09T07:04:00.000Z",
                  "name": "batch-1",
                  "namespace": "jobs",
                  "node": "node-a",
                  "to": "2024-12-09T07:05:10.000Z",
                  "uid": "00000000-0000-0000-0000-0000000000b1"
                },
                "pod_holders": [
                  {
                    "from": "2024-12-09T07:04:00.000Z",
                    "name": "batch-1",
                    "namespace": "jobs",
                    "node": "node-a",
                    "to": "2024-12-09T07:05:10.000Z",
                    "uid": "00000000-0000-0000-0000-0000000000b1"
                  },
                  {
                    "from": "2024-12-09T07:05:15.000Z",
                    "name": "batch-2",
                    "namespace": "jobs",
                    "node": "node-a",
                    "uid": "00000000-0000-0000-0000-0000000000b2"
                  }
                ],
                "pod_ip_reused": true,
                "pod_verified": false,
                "src_ip": "fd00::9"
              }
            ]"#]]
        .assert_eq(&json(only_pods));
        // The same answer round-trips through the client's type.
        let back: SearchAnswer = serde_json::from_value(v).unwrap();
        assert!(back.records.iter().all(|c| c.pod_fields.is_some()));
        let off: SearchAnswer =
            serde_json::from_value(serde_json::to_value(search(&res, &q, None)).unwrap()).unwrap();
        assert!(off.records.iter().all(|c| c.pod_fields.is_none()));
    }
}

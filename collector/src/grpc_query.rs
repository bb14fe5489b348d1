//! The `Query` gRPC service, with the meaning of the HTTP API: `Search` is
//! `GET /api/v1/connections`, `Lookup` is `GET /api/v1/conntrack/query`.
//! Served on the mTLS port next to `Ingest`.
//!
//! A thin adapter over [`crate::query`]: validation rules, routing and the
//! error codes are there ([`QueryError::to_status`]); this module only
//! decodes the protobuf requests into the query layer's inputs
//! ([`search_from_pb`], [`lookup_from_pb`]) and encodes the answers.

use std::net::IpAddr;
use std::sync::Arc;

use ctw_common::{Counters, Protocol, Tuple};
use ctw_proto::pb;
use tonic::{Request, Response, Status};

use crate::config::LookupConfig;
use crate::peers::{self, Peers};
use crate::pods::{PodAnswer, PodHistory, PodRef};
use crate::query::{self, Api, Lookup, LookupOutcome, QueryError, SearchInput, ValidSearch};
use crate::registry::LiveQuery;
use crate::registry::Registry;
use crate::store::{RecordStore, SearchResult};

fn convert_error(e: ctw_proto::ConvertError) -> QueryError {
    match e {
        ctw_proto::ConvertError::Missing(f) => QueryError::invalid(f, format!("{f}: missing")),
        ctw_proto::ConvertError::Invalid { field, message } => {
            QueryError::invalid(field, format!("{field}: {message}"))
        }
    }
}

fn pb_ip(v: &Option<Vec<u8>>, field: &'static str) -> Result<Option<IpAddr>, QueryError> {
    v.as_ref()
        .map(|b| ctw_proto::ip_from_bytes(b, field).map_err(convert_error))
        .transpose()
}

fn pb_protocol(n: u32, field: &'static str) -> Result<Protocol, QueryError> {
    u8::try_from(n)
        .ok()
        .and_then(Protocol::from_number)
        .ok_or_else(|| {
            QueryError::invalid(field, format!("{field}: unsupported protocol number {n}"))
        })
}

/// Decode a gRPC `SearchRequest` and validate it with the HTTP API's rules
/// ([`SearchInput::validate`]); `limit` 0 is unset (proto3).
pub fn search_from_pb(r: &pb::SearchRequest, max_limit: usize) -> Result<ValidSearch, QueryError> {
    let input = SearchInput {
        src_ip: pb_ip(&r.src_ip, "src_ip")?,
        src_port: r.src_port,
        dst_ip: pb_ip(&r.dst_ip, "dst_ip")?,
        dst_port: r.dst_port,
        snat_ip: pb_ip(&r.snat_ip, "snat_ip")?,
        snat_port: r.snat_port,
        node: r.node.clone(),
        protocol: r.protocol.map(|p| pb_protocol(p, "protocol")).transpose()?,
        from_ns: r.from_ns,
        to_ns: r.to_ns,
        at_ns: r.at_ns,
        at_precision_ns: 0,
        window_ns: r.window_ns,
        limit: (r.limit != 0).then_some(u64::from(r.limit)),
        kind: r.kind.clone(),
        namespace: r.namespace.clone(),
        pod: r.pod.clone(),
        workload: r.workload.clone(),
    };
    input.validate(Api::Grpc, max_limit)
}

/// Decode a gRPC `LookupRequest` into the lookup the HTTP API builds
/// ([`Lookup::from_params`]); an empty `node` is any.
pub fn lookup_from_pb(r: &pb::LookupRequest) -> Result<Lookup, QueryError> {
    let protocol = pb_protocol(r.protocol, "protocol")?;
    let t = r
        .tuple
        .as_ref()
        .ok_or_else(|| QueryError::invalid("tuple", "tuple: missing"))?;
    let tuple = Tuple::try_from(t).map_err(convert_error)?;
    Ok(Lookup {
        query: LiveQuery {
            protocol,
            tuple,
            reply_tuple: r.reply_tuple,
            zone: query::zone(r.zone.map(u64::from))?,
        },
        node: query::lookup_node(Some(&r.node))?,
        forwarded_by: None,
    })
}

fn pb_counters(c: Option<Counters>) -> Option<pb::Counters> {
    c.map(|c| pb::Counters {
        packets: c.packets,
        bytes: c.bytes,
    })
}

/// A pod of the history as its protobuf message.
fn pb_pod_ref(p: &PodRef) -> pb::PodRef {
    pb::PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
        workload_kind: p
            .workload
            .as_ref()
            .map_or(String::new(), |w| w.kind.clone()),
        workload_name: p
            .workload
            .as_ref()
            .map_or(String::new(), |w| w.name.clone()),
        node: p.node.clone(),
        host_network: p.host_network,
        from_ns: p.from_ns,
        to_ns: p.to_ns,
    }
}

/// A pod answer of the history as the `Pod` message (the same fields as the
/// HTTP API's, see [`crate::answer::pod_fields`]).
pub fn pb_pod(a: &PodAnswer) -> pb::Pod {
    let fields = crate::answer::pod_fields(a);
    pb::Pod {
        pod: a.pod.as_ref().map(pb_pod_ref),
        reason: fields.pod_reason.unwrap_or_default(),
        verified: a.verified,
        ip_reused: a.pod_ip_reused,
        holders: a.holders.iter().map(pb_pod_ref).collect(),
    }
}

fn search_response(result: SearchResult, pods: Option<&PodHistory>) -> pb::SearchResponse {
    pb::SearchResponse {
        complete: result.gaps.is_empty(),
        total: result.total,
        connections: result
            .hits
            .iter()
            .map(|h| pb::Connection {
                node: h.node.clone(),
                record: Some((&h.record).into()),
                closed_ns: h.closed_ns,
                end: h.end.map(|e| e.as_str().to_string()),
                last_seen_ns: h.last_seen_ns,
                counters_orig: pb_counters(h.counters_orig),
                counters_reply: pb_counters(h.counters_reply),
                pod: pods.map(|p| pb_pod(&p.for_hit(h))),
                end_tcp_state: ctw_proto::tcp_state_to_wire(h.end_state),
            })
            .collect(),
        gaps: result
            .gaps
            .iter()
            .map(|g| pb::Gap {
                node: g.node.clone(),
                from_ns: g.from_ns,
                to_ns: g.to_ns,
                reason: g.reason.clone(),
            })
            .collect(),
    }
}

/// The `Query` service.
#[derive(Clone)]
pub struct QueryService {
    store: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    lookup: LookupConfig,
    max_limit: usize,
    /// The pod history (kubernetes on); `None` leaves the pod fields out.
    pods: Option<Arc<PodHistory>>,
    /// The other collectors (`replicas` on): lookups are forwarded to
    /// the one holding the agent's stream (not when forwarded here).
    peers: Option<Arc<Peers>>,
}

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryService")
            .field("lookup", &self.lookup)
            .field("max_limit", &self.max_limit)
            .finish_non_exhaustive()
    }
}

impl QueryService {
    pub fn new(
        store: Arc<dyn RecordStore>,
        registry: Arc<Registry>,
        lookup: LookupConfig,
        max_limit: usize,
    ) -> QueryService {
        QueryService {
            store,
            registry,
            lookup,
            max_limit,
            pods: None,
            peers: None,
        }
    }

    /// Name pods in the answers from `pods` (kubernetes on).
    pub fn with_pods(self, pods: Option<Arc<PodHistory>>) -> QueryService {
        QueryService { pods, ..self }
    }

    /// Reach the agents of the other collectors through `peers`.
    pub fn with_peers(self, peers: Option<Arc<Peers>>) -> QueryService {
        QueryService { peers, ..self }
    }
}

#[tonic::async_trait]
impl pb::query_server::Query for QueryService {
    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let status = |e: QueryError| e.to_status();
        let q = search_from_pb(request.get_ref(), self.max_limit).map_err(status)?;
        let result = query::run_search(
            self.store.clone(),
            &self.registry,
            self.peers.as_deref(),
            self.pods.as_deref(),
            &q,
        )
        .await
        .map_err(status)?;
        Ok(Response::new(search_response(result, self.pods.as_deref())))
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupReply>, Status> {
        // Forwarded by another collector: answered from our agents only.
        let forwarded_by = request
            .metadata()
            .get(peers::FORWARDED_BY)
            .map(|v| v.to_str().unwrap_or("?").to_string());
        let req = request.into_inner();
        let mut l = lookup_from_pb(&req).map_err(|e| e.to_status())?;
        l.forwarded_by = forwarded_by;
        let outcome = query::lookup(
            self.store.clone(),
            self.registry.clone(),
            self.peers.clone(),
            &self.lookup,
            &l,
        )
        .await
        .map_err(|e| e.to_status())?;
        let zones = match &outcome {
            LookupOutcome::Found { zones_tried, .. }
            | LookupOutcome::NotFound { zones_tried, .. } => zones_tried
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let reply = match outcome {
            LookupOutcome::Found { answer, .. } => pb::LookupReply {
                request_id: req.request_id,
                found: true,
                error: String::new(),
                entry: Some((&answer.record).into()),
                pod: self
                    .pods
                    .as_ref()
                    .map(|p| pb_pod(&p.for_record(&answer.record, ctw_common::now_ns()))),
                node: answer.node,
            },
            LookupOutcome::NotFound { .. } => pb::LookupReply {
                request_id: req.request_id,
                found: false,
                error: String::new(),
                entry: None,
                node: String::new(),
                pod: None,
            },
        };
        let mut resp = Response::new(reply);
        if let Ok(v) = zones.parse() {
            resp.metadata_mut().insert(peers::ZONES_TRIED, v);
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::query::{DEFAULT_LIMIT, DEFAULT_WINDOW_NS, MAX_NODE_LEN};
    use crate::store::{ConnKind, SearchQuery};
    use axum::http::StatusCode;
    use tonic::Code;

    const MAX: usize = 1000;
    const S: u64 = 1_000_000_000;

    fn params(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The same search over both APIs: HTTP parameters and a gRPC request.
    fn both(
        http: &[(&str, &str)],
        grpc: pb::SearchRequest,
    ) -> (
        Result<SearchQuery, QueryError>,
        Result<SearchQuery, QueryError>,
    ) {
        let (h, g) = both_searches(http, grpc);
        (h.map(|s| s.query), g.map(|s| s.query))
    }

    /// [`both`] with the pod filter.
    fn both_searches(
        http: &[(&str, &str)],
        grpc: pb::SearchRequest,
    ) -> (
        Result<ValidSearch, QueryError>,
        Result<ValidSearch, QueryError>,
    ) {
        (
            query::search_from_params(&params(http), MAX),
            search_from_pb(&grpc, MAX),
        )
    }

    fn field<T: std::fmt::Debug>(r: Result<T, QueryError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.http_status(), StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(e.grpc_code(), Code::InvalidArgument, "{e}");
        let p = e.parameter().unwrap().to_string();
        assert!(e.to_string().starts_with(&p), "{e} names {p}");
        assert!(e.to_status().message().starts_with(&p), "{e}");
        p
    }

    #[test]
    fn both_apis_give_the_same_search() {
        let (h, g) = both(
            &[
                ("snat_ip", "198.19.0.1"),
                ("snat_port", "1024"),
                ("at", "600"),
            ],
            pb::SearchRequest {
                snat_ip: Some(vec![198, 19, 0, 1]),
                snat_port: Some(1024),
                at_ns: Some(600 * S),
                ..Default::default()
            },
        );
        let (mut h, g) = (h.unwrap(), g.unwrap());
        assert_eq!(h.from_ns, Some(600 * S - DEFAULT_WINDOW_NS));
        assert_eq!(h.to_ns, Some(600 * S + DEFAULT_WINDOW_NS));
        assert_eq!(h.limit, DEFAULT_LIMIT);
        // Only the written resolution differs: "600" is whole seconds.
        assert_eq!(h.at_precision_ns, S);
        h.at_precision_ns = 0;
        assert_eq!(h, g);
    }

    #[test]
    fn at_excludes_from_and_to_over_both_apis() {
        let (h, g) = both(
            &[("at", "600"), ("from", "500")],
            pb::SearchRequest {
                at_ns: Some(600 * S),
                from_ns: Some(500 * S),
                ..Default::default()
            },
        );
        assert_eq!((field(h), field(g)), ("at".into(), "at_ns".into()));
        let (h, g) = both(
            &[("at", "600"), ("to", "700")],
            pb::SearchRequest {
                at_ns: Some(600 * S),
                to_ns: Some(700 * S),
                ..Default::default()
            },
        );
        assert_eq!((field(h), field(g)), ("at".into(), "at_ns".into()));
        let (h, g) = both(
            &[("window", "5s")],
            pb::SearchRequest {
                window_ns: Some(5 * S),
                ..Default::default()
            },
        );
        assert_eq!((field(h), field(g)), ("window".into(), "window_ns".into()));
        let (h, g) = both(
            &[("from", "5"), ("to", "4")],
            pb::SearchRequest {
                from_ns: Some(5 * S),
                to_ns: Some(4 * S),
                ..Default::default()
            },
        );
        assert_eq!((field(h), field(g)), ("to".into(), "to_ns".into()));
        // A window past the epoch saturates.
        let (h, g) = both(
            &[("at", "1"), ("window", "1d")],
            pb::SearchRequest {
                at_ns: Some(S),
                window_ns: Some(86400 * S),
                ..Default::default()
            },
        );
        assert_eq!(h.unwrap().from_ns, Some(0));
        assert_eq!(g.unwrap().from_ns, Some(0));
    }

    #[test]
    fn limit_rules_are_the_same_over_both_apis() {
        // Absent: the default.
        let (h, g) = both(&[], pb::SearchRequest::default());
        assert_eq!(h.unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(g.unwrap().limit, DEFAULT_LIMIT);
        // An explicit 0 is refused; proto3 cannot send one (0 is unset).
        assert_eq!(
            field(query::search_from_params(&params(&[("limit", "0")]), MAX)),
            "limit"
        );
        let zero = SearchInput {
            limit: Some(0),
            ..SearchInput::default()
        };
        assert_eq!(field(zero.validate(Api::Grpc, MAX)), "limit");
        let (h, g) = both(
            &[("limit", "7")],
            pb::SearchRequest {
                limit: 7,
                ..Default::default()
            },
        );
        assert_eq!((h.unwrap().limit, g.unwrap().limit), (7, 7));
        let (h, g) = both(
            &[("limit", "1001")],
            pb::SearchRequest {
                limit: 1001,
                ..Default::default()
            },
        );
        assert_eq!((field(h), field(g)), ("limit".into(), "limit".into()));
        assert_eq!(
            field(query::search_from_params(&params(&[("limit", "x")]), MAX)),
            "limit"
        );
        // The default never exceeds the collector's cap.
        assert_eq!(query::search_from_params(&[], 10).unwrap().query.limit, 10);
    }

    #[test]
    fn node_rules_are_the_same_over_both_apis() {
        let long = "n".repeat(MAX_NODE_LEN + 1);
        let (h, g) = both(
            &[("node", &long)],
            pb::SearchRequest {
                node: Some(long.clone()),
                ..Default::default()
            },
        );
        assert_eq!((field(h), field(g)), ("node".into(), "node".into()));
        let (h, g) = both(
            &[("node", " node-a ")],
            pb::SearchRequest {
                node: Some("node-a".into()),
                ..Default::default()
            },
        );
        assert_eq!(h.unwrap().node.as_deref(), Some("node-a"));
        assert_eq!(g.unwrap().node.as_deref(), Some("node-a"));
        // An empty HTTP parameter is absent; an empty gRPC node is an error.
        let (h, g) = both(
            &[("node", "")],
            pb::SearchRequest {
                node: Some(String::new()),
                ..Default::default()
            },
        );
        assert_eq!(h.unwrap().node, None);
        assert_eq!(field(g), "node");
    }

    #[test]
    fn fields_are_validated_by_name_over_both_apis() {
        let cases: Vec<(&str, &str, pb::SearchRequest)> = vec![
            (
                "src_ip",
                "1.2.3",
                pb::SearchRequest {
                    src_ip: Some(vec![1, 2, 3]),
                    ..Default::default()
                },
            ),
            (
                "dst_port",
                "70000",
                pb::SearchRequest {
                    dst_port: Some(70000),
                    ..Default::default()
                },
            ),
            (
                "snat_port",
                "0",
                pb::SearchRequest {
                    snat_port: Some(0),
                    ..Default::default()
                },
            ),
            (
                "protocol",
                "icmp6",
                pb::SearchRequest {
                    protocol: Some(1),
                    ..Default::default()
                },
            ),
            (
                "kind",
                "NEW",
                pb::SearchRequest {
                    kind: Some("NEW".into()),
                    ..Default::default()
                },
            ),
        ];
        for (name, value, req) in cases {
            let (h, g) = both(&[(name, value)], req);
            assert_eq!((field(h), field(g)), (name.into(), name.into()));
        }
        for k in ConnKind::ALL {
            let (h, g) = both(
                &[("kind", k.as_str())],
                pb::SearchRequest {
                    kind: Some(k.as_str().into()),
                    ..Default::default()
                },
            );
            assert_eq!((h.unwrap().kind, g.unwrap().kind), (Some(k), Some(k)));
        }
        let e = query::search_from_params(&params(&[("kind", "NEW")]), MAX).unwrap_err();
        for k in ["new", "midstream", "recovered", "destroy"] {
            assert!(e.to_string().contains(k), "{e}");
        }
        // HTTP only: unknown and repeated names.
        assert_eq!(
            field(query::search_from_params(&params(&[("sport", "1")]), MAX)),
            "sport"
        );
        assert_eq!(
            field(query::search_from_params(
                &params(&[("node", "a"), ("node", "b")]),
                MAX
            )),
            "node"
        );
    }

    #[test]
    fn pod_fields_are_the_same_over_both_apis() {
        use crate::pods::PodFilter;
        let (h, g) = both_searches(
            &[
                ("namespace", "payments"),
                ("pod", " checkout-7d9f-a "),
                ("workload", "Deployment/checkout"),
            ],
            pb::SearchRequest {
                namespace: Some("payments".into()),
                pod: Some("checkout-7d9f-a".into()),
                workload: Some("Deployment/checkout".into()),
                ..Default::default()
            },
        );
        let want = PodFilter {
            namespace: Some("payments".into()),
            pod: Some("checkout-7d9f-a".into()),
            workload_kind: Some("Deployment".into()),
            workload_name: Some("checkout".into()),
        };
        assert_eq!(h.unwrap().pods, Some(want.clone()));
        assert_eq!(g.unwrap().pods, Some(want));
        // NAME alone: any kind.
        let (h, g) = both_searches(
            &[("workload", "checkout")],
            pb::SearchRequest {
                workload: Some("checkout".into()),
                ..Default::default()
            },
        );
        let any = PodFilter {
            workload_name: Some("checkout".into()),
            ..PodFilter::default()
        };
        assert_eq!(h.unwrap().pods, Some(any.clone()));
        assert_eq!(g.unwrap().pods, Some(any));
        // None given: no pod filter.
        let (h, g) = both_searches(&[], pb::SearchRequest::default());
        assert_eq!((h.unwrap().pods, g.unwrap().pods), (None, None));
        // Bad values are refused naming the field, over both.
        let long = "n".repeat(321);
        for (name, value) in [
            ("workload", "Deployment/"),
            ("workload", "/checkout"),
            ("workload", "a/b/c"),
            ("namespace", long.as_str()),
            ("pod", long.as_str()),
        ] {
            let mut req = pb::SearchRequest::default();
            match name {
                "namespace" => req.namespace = Some(value.into()),
                "pod" => req.pod = Some(value.into()),
                _ => req.workload = Some(value.into()),
            }
            let (h, g) = both(&[(name, value)], req);
            assert_eq!((field(h), field(g)), (name.into(), name.into()), "{value}");
        }
        // An empty HTTP parameter is absent; an empty gRPC field an error.
        let (h, g) = both_searches(
            &[("pod", "")],
            pb::SearchRequest {
                pod: Some(" ".into()),
                ..Default::default()
            },
        );
        assert_eq!(h.unwrap().pods, None);
        assert_eq!(field(g), "pod");
    }

    fn pb_lookup() -> pb::LookupRequest {
        pb::LookupRequest {
            request_id: 1,
            protocol: 17,
            tuple: Some(pb::Tuple {
                src: vec![198, 19, 0, 2],
                dst: vec![198, 18, 0, 1],
                src_port: 80,
                dst_port: 1024,
            }),
            reply_tuple: true,
            node: "node-a".into(),
            zone: Some(7),
        }
    }

    #[test]
    fn both_apis_give_the_same_lookup() {
        let h = Lookup::from_params(&params(&[
            ("protocol", "udp"),
            ("src_ip", "198.19.0.2"),
            ("src_port", "80"),
            ("dst_ip", "198.18.0.1"),
            ("dst_port", "1024"),
            ("tuple", "reply"),
            ("node", "node-a"),
            ("zone", "7"),
        ]))
        .unwrap();
        let g = lookup_from_pb(&pb_lookup()).unwrap();
        assert_eq!(h, g);
        assert_eq!(h.query.zone, Some(7));
        assert!(
            h.not_found_message().contains("reply tuple udp"),
            "{}",
            h.not_found_message()
        );
        // Without node and zone: any node, zone 0 then the zones seen.
        let g = lookup_from_pb(&pb::LookupRequest {
            node: String::new(),
            zone: None,
            ..pb_lookup()
        })
        .unwrap();
        assert_eq!((g.node, g.query.zone), (None, None));
    }

    #[test]
    fn lookup_fields_are_validated_by_name() {
        let e = |r: pb::LookupRequest| lookup_from_pb(&r).unwrap_err();
        let name = |e: QueryError| {
            assert_eq!(e.grpc_code(), Code::InvalidArgument, "{e}");
            e.parameter().unwrap().to_string()
        };
        assert_eq!(
            name(e(pb::LookupRequest {
                zone: Some(1 << 16),
                ..pb_lookup()
            })),
            "zone"
        );
        let mut r = pb_lookup();
        r.tuple.as_mut().unwrap().dst_port = 1 << 20;
        assert_eq!(name(e(r)), "tuple.dst_port");
        assert_eq!(
            name(e(pb::LookupRequest {
                tuple: None,
                ..pb_lookup()
            })),
            "tuple"
        );
        assert_eq!(
            name(e(pb::LookupRequest {
                protocol: 1,
                ..pb_lookup()
            })),
            "protocol"
        );
        let live = [
            ("src_ip", "198.19.0.2"),
            ("src_port", "80"),
            ("dst_ip", "198.18.0.1"),
            ("dst_port", "1024"),
        ];
        for (k, v, want) in [
            ("zone", "65536", "zone"),
            ("zone", "x", "zone"),
            ("tuple", "both", "tuple"),
            ("ports", "1", "ports"),
        ] {
            let mut p = params(&live);
            p.push((k.into(), v.into()));
            assert_eq!(name(Lookup::from_params(&p).unwrap_err()), want);
        }
        assert_eq!(
            name(Lookup::from_params(&params(&live[..3])).unwrap_err()),
            "dst_port"
        );
    }

    #[test]
    fn connections_say_how_their_end_is_known() {
        use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};
        let ip = "198.18.0.1".parse().unwrap();
        let r = ConnRecord::new(
            EventKind::New,
            1,
            Protocol::Udp,
            Tuple::new(ip, 1, ip, 2),
            Tuple::new(ip, 2, ip, 1),
        );
        let hit = |end, closed_ns, last_seen_ns| crate::store::Hit {
            node: "n".into(),
            record: r,
            closed_ns,
            end,
            last_seen_ns,
            counters_orig: None,
            counters_reply: None,
            end_state: None,
        };
        let res = SearchResult {
            hits: vec![
                hit(None, None, None),
                hit(Some(crate::store::End::Gone), Some(9), Some(5)),
                hit(Some(crate::store::End::Superseded), Some(7), None),
            ],
            total: 3,
            gaps: Vec::new(),
        };
        let c = search_response(res, None).connections;
        let got: Vec<_> = c
            .iter()
            .map(|c| (c.end.as_deref(), c.closed_ns, c.last_seen_ns))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, None, None),
                (Some("gone"), Some(9), Some(5)),
                (Some("superseded"), Some(7), None)
            ]
        );
    }

    #[test]
    fn connections_carry_their_pod_when_kubernetes_is_on() {
        use crate::answer::fixtures;
        let res = SearchResult {
            hits: vec![fixtures::closed(), fixtures::midstream(), fixtures::gone()],
            total: 3,
            gaps: vec![],
        };
        let off = search_response(res.clone(), None);
        assert!(off.connections.iter().all(|c| c.pod.is_none()));
        // The DESTROY's state (TIME_WAIT, kernel 7, + 1) only for the
        // connection the kernel's DESTROY ended.
        let ends: Vec<u32> = off.connections.iter().map(|c| c.end_tcp_state).collect();
        assert_eq!(ends, vec![8, 0, 0]);
        let pods = fixtures::pods();
        let c = search_response(res, Some(&pods)).connections;
        let named = c[0].pod.as_ref().unwrap();
        let p = named.pod.as_ref().unwrap();
        assert_eq!(
            (
                p.namespace.as_str(),
                p.name.as_str(),
                p.workload_kind.as_str(),
                p.workload_name.as_str(),
                p.node.as_str()
            ),
            (
                "payments",
                "checkout-7d9f-x2k4",
                "Deployment",
                "checkout",
                "node-a"
            )
        );
        assert_eq!(p.uid, "00000000-0000-0000-0000-0000000000a1");
        assert!(named.verified && !named.ip_reused && named.reason.is_empty());
        let none = c[1].pod.as_ref().unwrap();
        assert!(none.pod.is_none());
        assert_eq!(none.reason, "no_pod_at_time");
        let reused = c[2].pod.as_ref().unwrap();
        assert!(reused.ip_reused);
        let names: Vec<&str> = reused.holders.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["batch-1", "batch-2"]);
        assert_eq!(reused.pod.as_ref().unwrap().name, "batch-1");
        assert!(reused.holders[1].to_ns.is_none() && reused.holders[0].to_ns.is_some());
    }

    #[test]
    fn open_gaps_make_the_answer_incomplete() {
        let mut r = SearchResult::default();
        assert!(search_response(r.clone(), None).complete);
        r.gaps.push(crate::store::Gap {
            node: "a".into(),
            from_ns: 1,
            to_ns: 2,
            reason: "agent_disconnected".into(),
            count: 0,
        });
        assert!(!search_response(r, None).complete);
    }
}

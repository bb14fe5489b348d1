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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hit_json_says_how_the_end_is_known() {
        use ctw_common::{ConnRecord, EventKind, Protocol, Tuple};
        let ip = "198.18.0.1".parse().unwrap();
        let r = ConnRecord::new(
            EventKind::Recovered,
            1_000_000_000,
            Protocol::Tcp,
            Tuple::new(ip, 1, ip, 2),
            Tuple::new(ip, 2, ip, 1),
        );
        let mut h = Hit {
            node: "n".into(),
            record: r,
            closed_ns: None,
            end: None,
            last_seen_ns: None,
            counters_orig: None,
            counters_reply: None,
        };
        let q = SearchQuery::default();
        let v = hit_json(&h, &q);
        assert!(v.get("end").is_none() && v.get("end_kind").is_none(), "{v}");
        h.closed_ns = Some(3_000_000_000);
        h.end = Some(crate::store::End::Gone);
        h.last_seen_ns = Some(2_000_000_000);
        let v = hit_json(&h, &q);
        assert_eq!(v["end_kind"], "gone", "{v}");
        assert_eq!(v["end"], "1970-01-01T00:00:03.000Z", "{v}");
        assert_eq!(v["last_seen"], "1970-01-01T00:00:02.000Z", "{v}");
        h.end = Some(crate::store::End::Superseded);
        h.last_seen_ns = None;
        let v = hit_json(&h, &q);
        assert_eq!(v["end_kind"], "superseded", "{v}");
        assert!(v.get("last_seen").is_none(), "{v}");
    }
}

//! Human output: aligned tables built from the API's typed answers
//! ([`ctw_common::api`]).

use ctw_common::api::{
    AgentsAnswer, GapAnswer, LineAnswer, LookupAnswer, PodFields, SearchAnswer, TupleJson,
};

/// Render rows under a header, columns separated by two spaces and padded
/// to the widest cell (in characters); the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate().take(cols) {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            if i + 1 < cols {
                s.extend(std::iter::repeat_n(
                    ' ',
                    width[i].saturating_sub(c.chars().count()),
                ));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// An optional value as a cell: `-` when absent.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A list as a cell: comma-separated, `-` when empty.
pub fn list<T: std::fmt::Display>(v: &[T]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// `ip:port` (`[v6]:port`).
pub fn endpoint(ip: impl std::fmt::Display, port: u16) -> String {
    let ip = ip.to_string();
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// An answer's pod for a table cell: `NAMESPACE/NAME (Kind/name)`, or
/// `-` and the reason when none is named (`-` alone without a reason),
/// then ` unverified` (in a gap of the pod watch) and ` ip-reused` (the
/// address changed hands within the connection).
pub fn pod_cell(f: &PodFields) -> String {
    let mut s = match (&f.pod, f.pod_reason.as_deref()) {
        (Some(p), _) => p.label(),
        (None, Some(r)) => format!("- ({r})"),
        (None, None) => "-".into(),
    };
    if !f.pod_verified {
        s.push_str(" unverified");
    }
    if f.pod_ip_reused {
        s.push_str(" ip-reused");
    }
    s
}

/// The rows of `GET /api/v1/connections`; a `NAMESPACE/POD (WORKLOAD)`
/// column when the collector names pods (kubernetes on). `STATE` is the
/// record's (a NEW's: at the first packet), `LAST STATE` the state the
/// connection was last known in (its DESTROY's; `-` when not known).
pub fn search_table(v: &SearchAnswer) -> String {
    let with_at = v.at.is_some();
    let with_pods = v.records.iter().any(|r| r.pod_fields.is_some());
    let mut header = vec![
        "START",
        "NODE",
        "PROTO",
        "POD (SRC)",
        "DST",
        "SNAT",
        "END",
        "STATE",
        "LAST STATE",
    ];
    if with_pods {
        header.insert(3, "NAMESPACE/POD (WORKLOAD)");
    }
    if with_at {
        header.push("ALIVE@AT");
    }
    let rows: Vec<Vec<String>> = v
        .records
        .iter()
        .map(|r| {
            let mut row = vec![
                r.start.clone(),
                r.node.clone(),
                r.protocol.to_string(),
                endpoint(r.src_ip, r.src_port),
                endpoint(r.dst_ip, r.dst_port),
                endpoint(r.snat_ip, r.snat_port),
                match (&r.end, r.end_kind.as_deref()) {
                    (None, _) => "open".into(),
                    // Only an upper bound of the end is known.
                    (Some(e), Some(k @ ("gone" | "superseded"))) => format!("<={e} ({k})"),
                    (Some(e), _) => e.clone(),
                },
                opt(r.state.as_deref()),
                opt(r.end_state.as_deref()),
            ];
            if with_pods {
                row.insert(3, r.pod_fields.as_ref().map_or("-".into(), pod_cell));
            }
            if with_at {
                row.push(
                    if r.alive_at == Some(true) {
                        "yes"
                    } else {
                        "no"
                    }
                    .into(),
                );
            }
            row
        })
        .collect();
    table(&header, &rows)
}

/// The rows of `GET /api/v1/agents`.
pub fn agents_table(v: &AgentsAnswer) -> String {
    let rows: Vec<Vec<String>> = v
        .agents
        .iter()
        .map(|a| {
            vec![
                a.node.clone(),
                if a.connected {
                    // Collector replicas: the collector holding the stream.
                    match &a.collector {
                        Some(c) => format!("yes (collector {c})"),
                        None => "yes".into(),
                    }
                } else {
                    format!("no (since {})", opt(a.disconnected_since.as_deref()))
                },
                list(&a.addresses),
                a.version.clone(),
                opt(a.last_batch_at.as_deref()),
                match a.lag_seconds {
                    Some(l) => format!("{l:.3}s"),
                    None => "-".into(),
                },
                opt(a.last_heartbeat.as_deref()),
                a.live_entries.map_or_else(|| "-".into(), |n| n.to_string()),
                a.records_stored.to_string(),
                a.events_lost.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "CONNECTED",
            "ADDRESSES",
            "VERSION",
            "LAST BATCH",
            "LAG",
            "LAST HEARTBEAT",
            "LIVE",
            "RECORDS",
            "LOST",
        ],
        &rows,
    )
}

/// A live lookup answer as `KEY  value` lines.
pub fn lookup_table(v: &LookupAnswer) -> String {
    let dir = |t: &TupleJson| {
        format!(
            "{} -> {}",
            endpoint(t.src, t.src_port),
            endpoint(t.dst, t.dst_port)
        )
    };
    let mut rows = vec![
        vec!["node".into(), v.node.clone()],
        vec!["status".into(), v.status.clone()],
        vec!["protocol".into(), v.protocol.to_string()],
        vec!["origin".into(), dir(&v.origin)],
        vec!["reply".into(), dir(&v.reply)],
        vec!["snat".into(), endpoint(v.snat_ip, v.snat_port)],
        vec!["flags".into(), list(&v.flags)],
        vec!["id".into(), v.id.to_string()],
        vec!["zone".into(), v.zone.to_string()],
        vec![
            "zones tried".into(),
            v.zones_tried.as_deref().map_or_else(|| "-".into(), list),
        ],
        vec!["mark".into(), v.mark.to_string()],
    ];
    if let Some(f) = &v.pod_fields {
        rows.push(vec!["pod".into(), pod_cell(f)]);
    }
    table(&["FIELD", "VALUE"], &rows)
}

/// Gaps as one warning line each.
pub fn gap_lines(gaps: &[GapAnswer]) -> Vec<String> {
    gaps.iter()
        .map(|g| {
            format!(
                "{} {} .. {}: {} ({} lost)",
                g.node, g.from, g.to, g.reason, g.count
            )
        })
        .collect()
}

/// One resolve result appended to its line: ` pod=IP node=NODE`, plus
/// ` ambiguous=N` / ` midstream=true` / ` incomplete=true`; or
/// ` pod=? reason=...` (` node=NODE` with `not_observed`). When the
/// collector names pods: ` pod=NAMESPACE/NAME (Kind/name) pod_ip=IP
/// node=NODE` (or ` pod=IP node=NODE pod_reason=REASON` when none is named),
/// then ` pod_verified=false` / ` pod_ip_reused=true` when so.
pub fn resolve_suffix(r: &LineAnswer) -> String {
    let status = r.status.as_str();
    let incomplete = r.incomplete == Some(true);
    match status {
        "resolved" | "ambiguous" => {
            let node = opt(r.node.as_deref());
            let mut s = match &r.pod_fields {
                Some(PodFields { pod: Some(p), .. }) => {
                    format!(" pod={} pod_ip={} node={node}", p.label(), opt(r.pod_ip))
                }
                Some(PodFields {
                    pod: None,
                    pod_reason,
                    ..
                }) => format!(
                    " pod={} node={node} pod_reason={}",
                    opt(r.pod_ip),
                    opt(pod_reason.as_deref())
                ),
                None => format!(" pod={} node={node}", opt(r.pod_ip)),
            };
            if let Some(f) = &r.pod_fields {
                if !f.pod_verified {
                    s.push_str(" pod_verified=false");
                }
                if f.pod_ip_reused {
                    s.push_str(" pod_ip_reused=true");
                }
            }
            if status == "ambiguous" {
                // Candidates alive at the line's time, else within the skew.
                let n = match r.alive_candidates {
                    Some(0) | None => opt(r.near_candidates),
                    Some(n) => n.to_string(),
                };
                s.push_str(&format!(" ambiguous={n}"));
            }
            if r.midstream {
                s.push_str(" midstream=true");
            }
            if incomplete {
                s.push_str(" incomplete=true");
            }
            s
        }
        "not_found" if incomplete => " pod=? reason=not_found incomplete=true".into(),
        "not_observed" => format!(" pod=? reason=not_observed node={}", opt(r.node.as_deref())),
        other => format!(" pod=? reason={other}"),
    }
}

/// "no connection found" and what was searched: the parameters sent
/// (address, port, protocol, node...) and the time window the collector
/// used. Gaps that may hide a connection follow as their own warning.
pub fn not_found_message(params: &[(String, String)], answer: &SearchAnswer) -> String {
    let searched: Vec<String> = params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "from" | "to" | "at" | "window" | "limit"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut m = String::from("no connection found");
    if !searched.is_empty() {
        m.push_str(&format!(" for {}", searched.join(" ")));
    }
    match (answer.from.as_deref(), answer.to.as_deref()) {
        (Some(f), Some(t)) => m.push_str(&format!(" between {f} and {t}")),
        (Some(f), None) => m.push_str(&format!(" since {f}")),
        (None, Some(t)) => m.push_str(&format!(" until {t}")),
        (None, None) => m.push_str(" at any time"),
    }
    m
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONGER", "C"],
            &[
                vec!["xxxx".into(), "y".into(), "z".into()],
                vec!["é".into(), "".into(), "last".into()],
            ],
        );
        assert_eq!(t, "A     LONGER  C\nxxxx  y       z\né             last\n");
        assert_eq!(table(&["ONLY"], &[]), "ONLY\n");
    }

    fn conn(v: serde_json::Value) -> serde_json::Value {
        let mut c = json!({
            "ts": "2024-12-09T07:05:00.000Z", "kind": "new",
        });
        for (k, x) in v.as_object().unwrap() {
            c[k] = x.clone();
        }
        c
    }

    fn agent(v: serde_json::Value) -> serde_json::Value {
        let mut a = json!({
            "node": "", "addresses": [], "boot_id": "b", "version": "0.1.0", "connected": false,
            "peer": null, "connected_since": null, "disconnected_since": null, "last_seen": null,
            "last_batch_at": null, "last_batch_boot_id": null, "last_batch_seq": null,
            "lag_seconds": null, "batches_stored": 0, "records_stored": 0, "duplicates": 0,
            "conversion_errors": 0, "loss_reports": 0, "events_lost": 0, "connections": 0,
        });
        for (k, x) in v.as_object().unwrap() {
            a[k] = x.clone();
        }
        a
    }

    #[test]
    fn search_and_agents_tables() {
        let v: SearchAnswer = serde_json::from_value(json!({
            "at": "2024-12-09T07:05:05.000Z", "from": null, "to": null,
            "total": 2, "returned": 2, "limit": 100, "complete": true, "gaps": [],
            "records": [conn(json!({
                "start": "2024-12-09T07:05:00.000Z", "node": "node-a", "protocol": "tcp",
                "src_ip": "10.244.1.7", "src_port": 40000, "dst_ip": "fd00::2", "dst_port": 443,
                "snat_ip": "198.18.0.1", "snat_port": 45000, "alive_at": true,
                "end": "2024-12-09T07:05:10.000Z", "state": "SYN_SENT", "end_state": "TIME_WAIT"
            })), conn(json!({
                "start": "2024-12-09T07:06:00.000Z", "node": "node-b", "protocol": "udp",
                "src_ip": "10.244.2.8", "src_port": 5, "dst_ip": "1.1.1.1", "dst_port": 53,
                "snat_ip": "198.18.0.2", "snat_port": 6, "alive_at": false
            }))]
        }))
        .unwrap();
        let t = search_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("START                     NODE    PROTO  POD (SRC)"),
            "{t}"
        );
        assert!(lines[1].contains("10.244.1.7:40000  [fd00::2]:443"), "{t}");
        assert!(lines[1].ends_with("SYN_SENT  TIME_WAIT   yes"), "{t}");
        assert!(lines[0].contains(" STATE     LAST STATE  ALIVE@AT"), "{t}");
        assert!(
            lines[2].contains(" open ") && lines[2].ends_with("no"),
            "{t}"
        );
        // Columns line up: every row has its POD column at the header's offset.
        let col = lines[0].find("POD").unwrap();
        assert_eq!(lines[1].find("10.244.1.7"), Some(col));
        assert_eq!(lines[2].find("10.244.2.8"), Some(col));

        // Kubernetes on: a pod column, named or why not.
        let mut on = v.clone();
        on.records[0].pod_fields = Some(
            serde_json::from_value(
                json!({"pod": {"namespace": "payments", "name": "checkout-x",
                "uid": "u", "workload": {"kind": "Deployment", "name": "checkout"},
                "node": "node-a", "from": "2024-12-09T07:00:00.000Z"},
                "pod_verified": true, "pod_ip_reused": false}),
            )
            .unwrap(),
        );
        on.records[1].pod_fields = Some(
            serde_json::from_value(json!({"pod": null, "pod_reason": "history_gap",
                "pod_verified": false, "pod_ip_reused": false}))
            .unwrap(),
        );
        let t = search_table(&on);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0]
                .starts_with("START                     NODE    PROTO  NAMESPACE/POD (WORKLOAD)"),
            "{t}"
        );
        assert!(
            lines[1].contains(" payments/checkout-x (Deployment/checkout) "),
            "{t}"
        );
        assert!(lines[2].contains(" - (history_gap) unverified "), "{t}");

        let a: AgentsAnswer = serde_json::from_value(json!({"agents": [
            agent(json!({"node": "n1", "connected": true, "addresses": ["198.18.0.1", "fd00::1"],
             "lag_seconds": 0.0123, "records_stored": 5,
             "last_heartbeat": "2024-12-09T07:06:00.000Z", "live_entries": 12})),
            agent(json!({"node": "n2", "disconnected_since": "2024-12-09T07:00:00.000Z"})),
            agent(json!({"node": "n3", "connected": true, "collector": "ctw-collector-7d9f-x2"}))
        ]}))
        .unwrap();
        let a = agents_table(&a);
        assert!(a.contains("n1    yes"), "{a}");
        assert!(a.contains("198.18.0.1,fd00::1"), "{a}");
        assert!(a.contains("0.012s"), "{a}");
        // Heartbeat and live entries; an agent without heartbeats (older
        // version, fields absent) shows "-".
        assert!(a.contains("LAST HEARTBEAT            LIVE"), "{a}");
        assert!(a.contains("2024-12-09T07:06:00.000Z  12 "), "{a}");
        let n2 = a.lines().find(|l| l.starts_with("n2")).unwrap();
        assert!(
            n2.contains(" -  ") && n2.contains(" -                         - "),
            "{a}"
        );
        assert!(a.contains("no (since 2024-12-09T07:00:00.000Z)"), "{a}");
        assert!(a.contains("yes (collector ctw-collector-7d9f-x2)"), "{a}");
    }

    #[test]
    fn resolve_suffixes() {
        let line = |v: serde_json::Value| {
            let mut l = json!({"line_no": 1, "line": "x"});
            for (k, x) in v.as_object().unwrap() {
                l[k] = x.clone();
            }
            resolve_suffix(&serde_json::from_value(l).unwrap())
        };
        let r =
            json!({"status": "resolved", "pod_ip": "10.0.0.5", "node": "a", "incomplete": false});
        assert_eq!(line(r), " pod=10.0.0.5 node=a");
        let r = json!({"status": "ambiguous", "pod_ip": "10.0.0.5", "node": "a", "alive_candidates": 2, "incomplete": true});
        assert_eq!(line(r), " pod=10.0.0.5 node=a ambiguous=2 incomplete=true");
        assert_eq!(
            line(json!({"status": "not_found"})),
            " pod=? reason=not_found"
        );
        assert_eq!(
            line(json!({"status": "unparsed"})),
            " pod=? reason=unparsed"
        );
        assert_eq!(
            line(json!({"status": "not_observed", "node": "node-0"})),
            " pod=? reason=not_observed node=node-0"
        );
        let r = json!({"status": "resolved", "pod_ip": "10.0.0.5", "node": "a", "midstream": true});
        assert_eq!(line(r), " pod=10.0.0.5 node=a midstream=true");
        let r = json!({"status": "ambiguous", "pod_ip": "10.0.0.5", "node": "a", "alive_candidates": 0, "near_candidates": 2});
        assert_eq!(line(r), " pod=10.0.0.5 node=a ambiguous=2");
        // Kubernetes on: the pod's name, as of the connection's start.
        let pod = json!({"namespace": "payments", "name": "checkout-7d9f-x2k4", "uid": "u",
            "workload": {"kind": "Deployment", "name": "checkout"}, "node": "a",
            "from": "2024-12-09T07:00:00.000Z"});
        let r = json!({"status": "resolved", "pod_ip": "10.0.0.5", "node": "a",
            "pod": pod, "pod_verified": true, "pod_ip_reused": false});
        assert_eq!(
            line(r),
            " pod=payments/checkout-7d9f-x2k4 (Deployment/checkout) pod_ip=10.0.0.5 node=a"
        );
        let r = json!({"status": "resolved", "pod_ip": "10.0.0.5", "node": "a", "pod": pod,
            "pod_verified": false, "pod_ip_reused": true, "pod_holders": [pod]});
        assert_eq!(
            line(r),
            " pod=payments/checkout-7d9f-x2k4 (Deployment/checkout) pod_ip=10.0.0.5 node=a pod_verified=false pod_ip_reused=true"
        );
        let r = json!({"status": "resolved", "pod_ip": "10.0.0.5", "node": "a", "pod": null,
            "pod_reason": "host_network", "pod_verified": true, "pod_ip_reused": false});
        assert_eq!(line(r), " pod=10.0.0.5 node=a pod_reason=host_network");
        let gaps: Vec<GapAnswer> = serde_json::from_value(
            json!([{"node": "a", "from": "f", "to": "t", "reason": "kernel_drop", "count": 3}]),
        )
        .unwrap();
        assert_eq!(gap_lines(&gaps), vec!["a f .. t: kernel_drop (3 lost)"]);
    }
}

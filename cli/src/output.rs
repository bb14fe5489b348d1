//! Human output: aligned tables built from the API's JSON.

use serde_json::Value;

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

/// A JSON value as a cell: strings bare, null/absent as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `ip:port` (`[v6]:port`) from two JSON fields.
pub fn endpoint(ip: &Value, port: &Value) -> String {
    let ip = cell(ip);
    let port = cell(port);
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The rows of `GET /api/v1/connections`.
pub fn search_table(v: &Value) -> String {
    let with_at = !v["at"].is_null();
    let mut header = vec![
        "START",
        "NODE",
        "PROTO",
        "POD (SRC)",
        "DST",
        "SNAT",
        "END",
        "STATE",
    ];
    if with_at {
        header.push("ALIVE@AT");
    }
    let rows: Vec<Vec<String>> = v["records"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let mut row = vec![
                cell(&r["start"]),
                cell(&r["node"]),
                cell(&r["protocol"]),
                endpoint(&r["src_ip"], &r["src_port"]),
                endpoint(&r["dst_ip"], &r["dst_port"]),
                endpoint(&r["snat_ip"], &r["snat_port"]),
                match (&r["end"], r["end_kind"].as_str()) {
                    (Value::Null, _) => "open".into(),
                    // Only an upper bound of the end is known.
                    (e, Some(k @ ("gone" | "superseded"))) => format!("<={} ({k})", cell(e)),
                    (e, _) => cell(e),
                },
                cell(&r["state"]),
            ];
            if with_at {
                row.push(if r["alive_at"] == true { "yes" } else { "no" }.into());
            }
            row
        })
        .collect();
    table(&header, &rows)
}

/// The rows of `GET /api/v1/agents`.
pub fn agents_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["agents"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            vec![
                cell(&a["node"]),
                if a["connected"] == true {
                    "yes".into()
                } else {
                    format!("no (since {})", cell(&a["disconnected_since"]))
                },
                cell(&a["addresses"]),
                cell(&a["version"]),
                cell(&a["last_batch_at"]),
                match a["lag_seconds"].as_f64() {
                    Some(l) => format!("{l:.3}s"),
                    None => "-".into(),
                },
                cell(&a["records_stored"]),
                cell(&a["events_lost"]),
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
            "RECORDS",
            "LOST",
        ],
        &rows,
    )
}

/// A live lookup answer as `KEY  value` lines.
pub fn lookup_table(v: &Value) -> String {
    let rows = vec![
        vec!["node".into(), cell(&v["node"])],
        vec!["status".into(), cell(&v["status"])],
        vec!["protocol".into(), cell(&v["protocol"])],
        vec![
            "origin".into(),
            format!(
                "{} -> {}",
                endpoint(&v["origin"]["src"], &v["origin"]["src_port"]),
                endpoint(&v["origin"]["dst"], &v["origin"]["dst_port"])
            ),
        ],
        vec![
            "reply".into(),
            format!(
                "{} -> {}",
                endpoint(&v["reply"]["src"], &v["reply"]["src_port"]),
                endpoint(&v["reply"]["dst"], &v["reply"]["dst_port"])
            ),
        ],
        vec!["snat".into(), endpoint(&v["snat_ip"], &v["snat_port"])],
        vec!["flags".into(), cell(&v["flags"])],
        vec!["id".into(), cell(&v["id"])],
        vec!["zone".into(), cell(&v["zone"])],
        vec!["zones tried".into(), cell(&v["zones_tried"])],
        vec!["mark".into(), cell(&v["mark"])],
    ];
    table(&["FIELD", "VALUE"], &rows)
}

/// Gaps as one warning line each.
pub fn gap_lines(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|g| {
            format!(
                "{} {} .. {}: {} ({} lost)",
                cell(&g["node"]),
                cell(&g["from"]),
                cell(&g["to"]),
                cell(&g["reason"]),
                cell(&g["count"])
            )
        })
        .collect()
}

/// One resolve result appended to its line: ` pod=IP node=NODE`, plus
/// ` ambiguous=N` / ` midstream=true` / ` incomplete=true`; or
/// ` pod=? reason=...` (` node=NODE` with `not_observed`).
pub fn resolve_suffix(r: &Value) -> String {
    let status = r["status"].as_str().unwrap_or("error");
    match status {
        "resolved" | "ambiguous" => {
            let mut s = format!(" pod={} node={}", cell(&r["pod_ip"]), cell(&r["node"]));
            if status == "ambiguous" {
                // Candidates alive at the line's time, else within the skew.
                let n = match r["alive_candidates"].as_u64() {
                    Some(0) | None => cell(&r["near_candidates"]),
                    Some(n) => n.to_string(),
                };
                s.push_str(&format!(" ambiguous={n}"));
            }
            if r["midstream"] == true {
                s.push_str(" midstream=true");
            }
            if r["incomplete"] == true {
                s.push_str(" incomplete=true");
            }
            s
        }
        "not_found" if r["incomplete"] == true => " pod=? reason=not_found incomplete=true".into(),
        "not_observed" => format!(" pod=? reason=not_observed node={}", cell(&r["node"])),
        other => format!(" pod=? reason={other}"),
    }
}

/// "no connection found" and what was searched: the parameters sent
/// (address, port, protocol, node...) and the time window the collector
/// used. Gaps that may hide a connection follow as their own warning.
pub fn not_found_message(params: &[(String, String)], answer: &Value) -> String {
    let searched: Vec<String> = params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "from" | "to" | "at" | "window" | "limit"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut m = String::from("no connection found");
    if !searched.is_empty() {
        m.push_str(&format!(" for {}", searched.join(" ")));
    }
    match (answer["from"].as_str(), answer["to"].as_str()) {
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

    #[test]
    fn search_and_agents_tables() {
        let v = json!({
            "at": "2024-12-09T07:05:05.000Z",
            "records": [{
                "start": "2024-12-09T07:05:00.000Z", "node": "node-a", "protocol": "tcp",
                "src_ip": "10.244.1.7", "src_port": 40000, "dst_ip": "fd00::2", "dst_port": 443,
                "snat_ip": "198.18.0.1", "snat_port": 45000, "alive_at": true,
                "end": "2024-12-09T07:05:10.000Z", "state": "TIME_WAIT"
            }, {
                "start": "2024-12-09T07:06:00.000Z", "node": "node-b", "protocol": "udp",
                "src_ip": "10.244.2.8", "src_port": 5, "dst_ip": "1.1.1.1", "dst_port": 53,
                "snat_ip": "198.18.0.2", "snat_port": 6, "alive_at": false
            }]
        });
        let t = search_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("START                     NODE    PROTO  POD (SRC)"),
            "{t}"
        );
        assert!(lines[1].contains("10.244.1.7:40000  [fd00::2]:443"), "{t}");
        assert!(lines[1].ends_with("TIME_WAIT  yes"), "{t}");
        assert!(
            lines[2].contains(" open ") && lines[2].ends_with("no"),
            "{t}"
        );
        // Columns line up: every row has its POD column at the header's offset.
        let col = lines[0].find("POD").unwrap();
        assert_eq!(lines[1].find("10.244.1.7"), Some(col));
        assert_eq!(lines[2].find("10.244.2.8"), Some(col));

        let a = agents_table(&json!({"agents": [
            {"node": "n1", "connected": true, "addresses": ["198.18.0.1", "fd00::1"], "version": "0.1.0",
             "last_batch_at": null, "lag_seconds": 0.0123, "records_stored": 5, "events_lost": 0},
            {"node": "n2", "connected": false, "disconnected_since": "2024-12-09T07:00:00.000Z", "addresses": []}
        ]}));
        assert!(a.contains("n1    yes"), "{a}");
        assert!(a.contains("198.18.0.1,fd00::1"), "{a}");
        assert!(a.contains("0.012s"), "{a}");
        assert!(a.contains("no (since 2024-12-09T07:00:00.000Z)"), "{a}");
    }

    #[test]
    fn resolve_suffixes() {
        let r =
            json!({"status": "resolved", "pod_ip": "10.0.0.5", "node": "a", "incomplete": false});
        assert_eq!(resolve_suffix(&r), " pod=10.0.0.5 node=a");
        let r = json!({"status": "ambiguous", "pod_ip": "10.0.0.5", "node": "a", "alive_candidates": 2, "incomplete": true});
        assert_eq!(
            resolve_suffix(&r),
            " pod=10.0.0.5 node=a ambiguous=2 incomplete=true"
        );
        assert_eq!(
            resolve_suffix(&json!({"status": "not_found"})),
            " pod=? reason=not_found"
        );
        assert_eq!(
            resolve_suffix(&json!({"status": "unparsed"})),
            " pod=? reason=unparsed"
        );
        assert_eq!(
            resolve_suffix(&json!({"status": "not_observed", "node": "node-0"})),
            " pod=? reason=not_observed node=node-0"
        );
        let r = json!({"status": "resolved", "pod_ip": "10.0.0.5", "node": "a", "midstream": true});
        assert_eq!(resolve_suffix(&r), " pod=10.0.0.5 node=a midstream=true");
        let r = json!({"status": "ambiguous", "pod_ip": "10.0.0.5", "node": "a", "alive_candidates": 0, "near_candidates": 2});
        assert_eq!(resolve_suffix(&r), " pod=10.0.0.5 node=a ambiguous=2");
        let lines = gap_lines(
            &json!([{"node": "a", "from": "f", "to": "t", "reason": "kernel_drop", "count": 3}]),
        );
        assert_eq!(lines, vec!["a f .. t: kernel_drop (3 lost)"]);
    }
}

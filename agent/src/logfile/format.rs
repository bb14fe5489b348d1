//! JSON line formatting for the log file, allocation-free on the record path.
//!
//! The first fields of a conntrack line are exactly those of the seed tool
//! (`ts`, `level`, `msg`, `type`, `dst_port`, `src_ip`, `src_port`, `dst_ip`,
//! `snat_ip`, `snat_port`, in that order) so existing Filebeat pipelines and
//! searches keep working; the agent's extra fields follow them.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::IpAddr;

use chrono::{DateTime, Datelike, Offset, TimeZone, Timelike};
use ctw_common::{status, ConnRecord, EventKind};

/// Keys of a `type:"log"` line that caller fields may not overwrite; a caller
/// field with one of these names is written as `field_<name>`.
const RESERVED_KEYS: [&str; 4] = ["ts", "level", "msg", "type"];

/// Appends one conntrack line for `rec`, ending with `\n`, to `buf`.
///
/// Times are rendered in `tz` (the writer passes [`chrono::Local`]; tests pass
/// a [`chrono::FixedOffset`]). Nothing is allocated on the heap.
pub fn format_record<Tz: TimeZone>(buf: &mut Vec<u8>, rec: &ConnRecord, node: &str, tz: &Tz) {
    let msg = match rec.kind {
        EventKind::New | EventKind::Recovered => "new_connection",
        EventKind::Destroy => "connection_closed",
    };
    buf.extend_from_slice(b"{\"ts\":\"");
    write_ts(buf, rec.event_ns, tz);
    buf.extend_from_slice(b"\",\"level\":\"info\",\"msg\":\"");
    buf.extend_from_slice(msg.as_bytes());
    buf.extend_from_slice(b"\",\"type\":\"conntrack\",\"dst_port\":");
    write_num(buf, rec.orig.dst_port);
    buf.extend_from_slice(b",\"src_ip\":");
    write_ip(buf, rec.orig.src);
    buf.extend_from_slice(b",\"src_port\":");
    write_num(buf, rec.orig.src_port);
    buf.extend_from_slice(b",\"dst_ip\":");
    write_ip(buf, rec.orig.dst);
    let (snat_ip, snat_port) = rec.snat();
    buf.extend_from_slice(b",\"snat_ip\":");
    write_ip(buf, snat_ip);
    buf.extend_from_slice(b",\"snat_port\":");
    write_num(buf, snat_port);

    buf.extend_from_slice(b",\"protocol\":\"");
    buf.extend_from_slice(rec.protocol.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"node\":");
    write_json_str(buf, node);
    buf.extend_from_slice(b",\"id\":");
    write_num(buf, rec.id);
    buf.extend_from_slice(b",\"zone\":");
    write_num(buf, rec.zone);
    buf.extend_from_slice(b",\"mark\":");
    write_num(buf, rec.mark);
    if let Some(state) = rec.tcp_state {
        buf.extend_from_slice(b",\"state\":\"");
        buf.extend_from_slice(state.name().as_bytes());
        buf.push(b'"');
    }
    buf.extend_from_slice(b",\"flags\":");
    write_flags(buf, rec.status);
    buf.extend_from_slice(b",\"reply_src_ip\":");
    write_ip(buf, rec.reply.src);
    buf.extend_from_slice(b",\"reply_src_port\":");
    write_num(buf, rec.reply.src_port);
    if rec.status & status::CTW_EXTERNAL != 0 {
        buf.extend_from_slice(b",\"external\":true");
    }

    match rec.kind {
        EventKind::New => {
            if rec.midstream() {
                buf.extend_from_slice(b",\"midstream\":true");
            }
        }
        EventKind::Recovered => buf.extend_from_slice(b",\"recovered\":true"),
        EventKind::Destroy if rec.status & status::CTW_GONE != 0 => {
            // Found gone by a re-check: ended after `last_seen` (stop_ns),
            // at or before `ts`; the real stop is unknown.
            buf.extend_from_slice(b",\"gone\":true");
            if let Some(seen) = rec.stop_ns {
                buf.extend_from_slice(b",\"last_seen\":\"");
                write_ts(buf, seen, tz);
                buf.push(b'"');
            }
            if let Some(start) = rec.start_ns {
                buf.extend_from_slice(b",\"start\":\"");
                write_ts(buf, start, tz);
                buf.push(b'"');
            }
        }
        EventKind::Destroy => {
            if let Some(start) = rec.start_ns {
                buf.extend_from_slice(b",\"start\":\"");
                write_ts(buf, start, tz);
                buf.push(b'"');
            }
            if let Some(stop) = rec.stop_ns {
                buf.extend_from_slice(b",\"stop\":\"");
                write_ts(buf, stop, tz);
                buf.push(b'"');
            }
            if let (Some(start), Some(stop)) = (rec.start_ns, rec.stop_ns) {
                buf.extend_from_slice(b",\"duration_ms\":");
                write_num(buf, stop.saturating_sub(start) / 1_000_000);
            }
            if let Some(c) = rec.counters_orig {
                buf.extend_from_slice(b",\"orig_packets\":");
                write_num(buf, c.packets);
                buf.extend_from_slice(b",\"orig_bytes\":");
                write_num(buf, c.bytes);
            }
            if let Some(c) = rec.counters_reply {
                buf.extend_from_slice(b",\"reply_packets\":");
                write_num(buf, c.packets);
                buf.extend_from_slice(b",\"reply_bytes\":");
                write_num(buf, c.bytes);
            }
        }
    }
    buf.extend_from_slice(b"}\n");
}

/// Appends one `type:"log"` line, ending with `\n`, to `buf`.
///
/// `ts_ns` is nanoseconds since the Unix epoch. Field values are written as
/// JSON; a field named like a fixed key (`ts`, `level`, `msg`, `type`) is
/// renamed `field_<name>` so the line never has duplicate keys.
pub fn format_log_line<Tz: TimeZone, K: AsRef<str>>(
    buf: &mut Vec<u8>,
    ts_ns: u64,
    level: &str,
    msg: &str,
    fields: &[(K, serde_json::Value)],
    tz: &Tz,
) {
    buf.extend_from_slice(b"{\"ts\":\"");
    write_ts(buf, ts_ns, tz);
    buf.extend_from_slice(b"\",\"level\":");
    write_json_str(buf, level);
    buf.extend_from_slice(b",\"msg\":");
    write_json_str(buf, msg);
    buf.extend_from_slice(b",\"type\":\"log\"");
    for (key, value) in fields {
        let key = key.as_ref();
        buf.push(b',');
        if RESERVED_KEYS.contains(&key) {
            write_json_str(buf, &format!("field_{key}"));
        } else {
            write_json_str(buf, key);
        }
        buf.push(b':');
        // Serializing a `Value` into a Vec cannot fail: its maps have string
        // keys and the writer is infallible.
        let _ = serde_json::to_writer(&mut *buf, value);
    }
    buf.extend_from_slice(b"}\n");
}

/// The level names written in the `level` key, lowercase as the seed wrote
/// them. Unknown names are kept as given.
pub(crate) fn level_name(level: &str) -> Cow<'static, str> {
    for known in ["error", "warn", "info", "debug", "trace"] {
        if level.eq_ignore_ascii_case(known) {
            return Cow::Borrowed(known);
        }
    }
    if level.eq_ignore_ascii_case("warning") {
        return Cow::Borrowed("warn");
    }
    Cow::Owned(level.to_string())
}

/// Writes `ns` (Unix epoch nanoseconds) in `tz` with millisecond precision,
/// in the seed's `ts` format: `2024-12-09T15:05:00.123+0800`. Every time in
/// a log line (`ts`, `start`, `stop`, `last_seen`) has this one format.
fn write_ts<Tz: TimeZone>(buf: &mut Vec<u8>, ns: u64, tz: &Tz) {
    let utc = DateTime::from_timestamp_nanos(i64::try_from(ns).unwrap_or(i64::MAX));
    let local = utc.with_timezone(tz);
    let offset_secs = local.offset().fix().local_minus_utc();
    let t = local.naive_local();
    // Years are 1970..=2262 for a u64 of nanoseconds: always four digits.
    write_padded(buf, u32::try_from(t.year()).unwrap_or(0), 4);
    buf.push(b'-');
    write_padded(buf, t.month(), 2);
    buf.push(b'-');
    write_padded(buf, t.day(), 2);
    buf.push(b'T');
    write_padded(buf, t.hour(), 2);
    buf.push(b':');
    write_padded(buf, t.minute(), 2);
    buf.push(b':');
    write_padded(buf, t.second(), 2);
    buf.push(b'.');
    // A leap second shows as nanosecond >= 1e9; clamp it into .999.
    write_padded(buf, (t.nanosecond() / 1_000_000).min(999), 3);
    buf.push(if offset_secs < 0 { b'-' } else { b'+' });
    let off_min = offset_secs.unsigned_abs() / 60;
    write_padded(buf, off_min / 60, 2);
    write_padded(buf, off_min % 60, 2);
}

/// Writes `v` in decimal, left-padded with zeros to `width` digits.
fn write_padded(buf: &mut Vec<u8>, v: u32, width: usize) {
    let mut digits = [b'0'; 10];
    let mut n = v;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    for _ in len..width {
        buf.push(b'0');
    }
    buf.extend_from_slice(&digits[i..]);
}

fn write_num(buf: &mut Vec<u8>, v: impl Into<u64>) {
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "{}", v.into());
}

/// Writes a quoted IP address; `Ipv6Addr`'s Display is RFC 5952 form.
fn write_ip(buf: &mut Vec<u8>, ip: IpAddr) {
    buf.push(b'"');
    let _ = write!(buf, "{ip}");
    buf.push(b'"');
}

/// Writes the same list as [`ConnRecord::flag_names`] without allocating.
fn write_flags(buf: &mut Vec<u8>, status_bits: u32) {
    buf.push(b'[');
    let mut first = true;
    let mut flag = |buf: &mut Vec<u8>, name: &str| {
        if !first {
            buf.push(b',');
        }
        first = false;
        buf.push(b'"');
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'"');
    };
    if status_bits & status::SEEN_REPLY == 0 {
        flag(buf, "UNREPLIED");
    }
    if status_bits & status::ASSURED != 0 {
        flag(buf, "ASSURED");
    }
    buf.push(b']');
}

/// Writes `s` as a quoted JSON string, escaping quotes, backslashes and
/// control characters.
pub(crate) fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[usize::from(b >> 4)]);
            buf.push(HEX[usize::from(b & 0xf)]);
        } else {
            buf.extend_from_slice(short);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
    buf.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;
    use ctw_common::{Counters, Protocol, TcpState, Tuple};
    use serde_json::{json, Value};

    /// 2024-12-09T15:05:00.123+08:00 as Unix nanoseconds.
    const TS_NS: u64 = 1_733_727_900_123_456_789;

    fn cst() -> FixedOffset {
        FixedOffset::east_opt(8 * 3600).expect("valid offset")
    }

    fn tuple(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Tuple {
        Tuple {
            src: src.parse().expect("ip"),
            dst: dst.parse().expect("ip"),
            src_port,
            dst_port,
        }
    }

    fn new_v4() -> ConnRecord {
        ConnRecord {
            id: 3_141_592,
            mark: 7,
            status: status::SEEN_REPLY | status::ASSURED | status::CONFIRMED,
            tcp_state: Some(TcpState::SynSent),
            ..ConnRecord::new(
                EventKind::New,
                TS_NS,
                Protocol::Tcp,
                tuple("10.0.0.5", 45678, "1.2.3.4", 443),
                tuple("1.2.3.4", 443, "192.168.1.100", 12345),
            )
        }
    }

    fn line(rec: &ConnRecord, tz: &FixedOffset) -> String {
        let mut buf = Vec::new();
        format_record(&mut buf, rec, "node-1", tz);
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn new_ipv4_line_is_exact() {
        assert_eq!(
            line(&new_v4(), &cst()),
            concat!(
                r#"{"ts":"2024-12-09T15:05:00.123+0800","level":"info","msg":"new_connection","type":"conntrack","#,
                r#""dst_port":443,"src_ip":"10.0.0.5","src_port":45678,"dst_ip":"1.2.3.4","snat_ip":"192.168.1.100","snat_port":12345,"#,
                r#""protocol":"tcp","node":"node-1","id":3141592,"zone":0,"mark":7,"state":"SYN_SENT","flags":["ASSURED"],"#,
                r#""reply_src_ip":"1.2.3.4","reply_src_port":443}"#,
                "\n"
            )
        );
    }

    #[test]
    fn seed_fields_come_first_in_seed_order() {
        let l = line(&new_v4(), &cst());
        let v: Value = serde_json::from_str(&l).expect("json");
        let seed = r#"{"ts":"2024-12-09T15:05:00.123+0800","level":"info","msg":"new_connection","type":"conntrack","dst_port":443,"src_ip":"10.0.0.5","src_port":45678,"dst_ip":"1.2.3.4","snat_ip":"192.168.1.100","snat_port":12345"#;
        assert!(l.starts_with(seed), "{l}");
        assert_eq!(v["snat_port"], 12345);
    }

    #[test]
    fn negative_and_utc_offsets() {
        let mut rec = new_v4();
        rec.event_ns = 5_000_000; // 1970-01-01T00:00:00.005Z
        let west = FixedOffset::west_opt(3 * 3600 + 30 * 60).expect("valid offset");
        assert!(line(&rec, &west).starts_with(r#"{"ts":"1969-12-31T20:30:00.005-0330""#));
        assert!(
            line(&rec, &chrono::Utc.fix()).starts_with(r#"{"ts":"1970-01-01T00:00:00.005+0000""#)
        );
    }

    #[test]
    fn ipv6_udp_unreplied_without_state() {
        let rec = ConnRecord {
            protocol: Protocol::Udp,
            orig: tuple("fd00::0:5", 5353, "2001:db8:0:0:0:0:0:1", 53),
            reply: tuple("2001:db8::1", 53, "2001:DB8:0:1::64", 40000),
            status: 0,
            tcp_state: None,
            ..new_v4()
        };
        let l = line(&rec, &cst());
        assert!(l.contains(r#""dst_port":53,"src_ip":"fd00::5","src_port":5353,"dst_ip":"2001:db8::1","snat_ip":"2001:db8:0:1::64","snat_port":40000,"protocol":"udp","#), "{l}");
        assert!(l.contains(r#""mark":7,"flags":["UNREPLIED"],"reply_src_ip":"2001:db8::1","reply_src_port":53}"#), "{l}");
        assert!(!l.contains("state"));
    }

    #[test]
    fn destroy_has_times_duration_and_counters() {
        let rec = ConnRecord {
            kind: EventKind::Destroy,
            tcp_state: Some(TcpState::TimeWait),
            start_ns: Some(TS_NS - 2_500_000_000),
            stop_ns: Some(TS_NS),
            counters_orig: Some(Counters {
                packets: 10,
                bytes: 1_000,
            }),
            counters_reply: Some(Counters {
                packets: 8,
                bytes: 64_000,
            }),
            ..new_v4()
        };
        let l = line(&rec, &cst());
        assert!(
            l.contains(r#""msg":"connection_closed","type":"conntrack","dst_port":443,"#),
            "{l}"
        );
        assert!(l.ends_with(concat!(
            r#""state":"TIME_WAIT","flags":["ASSURED"],"reply_src_ip":"1.2.3.4","reply_src_port":443,"#,
            r#""start":"2024-12-09T15:04:57.623+0800","stop":"2024-12-09T15:05:00.123+0800","duration_ms":2500,"#,
            r#""orig_packets":10,"orig_bytes":1000,"reply_packets":8,"reply_bytes":64000}"#,
            "\n"
        )), "{l}");
        let v: Value = serde_json::from_str(&l).expect("json");
        // The seed's `ts` format, like `ts` itself.
        let start = DateTime::parse_from_str(
            v["start"].as_str().expect("start"),
            "%Y-%m-%dT%H:%M:%S%.3f%z",
        )
        .expect("seed time format");
        assert_eq!(
            start.timestamp_millis(),
            i64::try_from((TS_NS - 2_500_000_000) / 1_000_000).expect("fits")
        );
    }

    #[test]
    fn destroy_without_timestamps_or_counters_has_no_extras() {
        let rec = ConnRecord {
            kind: EventKind::Destroy,
            start_ns: Some(TS_NS),
            ..new_v4()
        };
        let l = line(&rec, &cst());
        assert!(
            l.ends_with("\"reply_src_port\":443,\"start\":\"2024-12-09T15:05:00.123+0800\"}\n"),
            "{l}"
        );
        assert!(!l.contains("duration_ms") && !l.contains("packets") && !l.contains("\"stop\""));
    }

    #[test]
    fn midstream_pickup_is_marked() {
        let rec = ConnRecord {
            tcp_state: Some(TcpState::Established),
            ..new_v4()
        };
        let l = line(&rec, &cst());
        assert!(
            l.ends_with("\"reply_src_port\":443,\"midstream\":true}\n"),
            "{l}"
        );
        // Only NEW: a recovered ESTABLISHED entry is not a mid-stream pickup.
        let rec = ConnRecord {
            kind: EventKind::Recovered,
            ..rec
        };
        assert!(!line(&rec, &cst()).contains("midstream"));
    }

    #[test]
    fn gone_has_last_seen_and_no_stop_or_duration() {
        let rec = ConnRecord {
            kind: EventKind::Destroy,
            status: status::SEEN_REPLY | status::ASSURED | status::CTW_GONE,
            tcp_state: Some(TcpState::Established),
            start_ns: Some(TS_NS - 2_500_000_000),
            stop_ns: Some(TS_NS - 1_000_000_000),
            ..new_v4()
        };
        let l = line(&rec, &cst());
        assert!(l.contains(r#""msg":"connection_closed""#), "{l}");
        assert!(
            l.ends_with(concat!(
                r#""reply_src_port":443,"gone":true,"last_seen":"2024-12-09T15:04:59.123+0800","#,
                r#""start":"2024-12-09T15:04:57.623+0800"}"#,
                "\n"
            )),
            "{l}"
        );
        assert!(!l.contains("\"stop\"") && !l.contains("duration_ms"), "{l}");
        let v: Value = serde_json::from_str(&l).expect("json");
        assert_eq!(v["gone"], true);
    }

    #[test]
    fn recovered_is_new_connection_with_flag() {
        let rec = ConnRecord {
            kind: EventKind::Recovered,
            ..new_v4()
        };
        let l = line(&rec, &cst());
        assert!(l.contains(r#""msg":"new_connection""#));
        assert!(
            l.ends_with("\"reply_src_port\":443,\"recovered\":true}\n"),
            "{l}"
        );
        let v: Value = serde_json::from_str(&l).expect("json");
        assert_eq!(v["recovered"], true);
    }

    #[test]
    fn external_clients_are_marked() {
        let rec = ConnRecord {
            status: status::CTW_EXTERNAL,
            ..new_v4()
        };
        let v: Value = serde_json::from_str(&line(&rec, &cst())).expect("json");
        assert_eq!(v["external"], true);
        let v: Value = serde_json::from_str(&line(&new_v4(), &cst())).expect("json");
        assert!(v.get("external").is_none(), "absent unless marked");
    }

    #[test]
    fn flags_match_flag_names() {
        for bits in 0..64u32 {
            let rec = ConnRecord {
                status: bits,
                ..new_v4()
            };
            let v: Value = serde_json::from_str(&line(&rec, &cst())).expect("json");
            assert_eq!(v["flags"], json!(rec.flag_names()), "status {bits:#x}");
        }
    }

    #[test]
    fn node_name_is_escaped() {
        let mut buf = Vec::new();
        format_record(&mut buf, &new_v4(), "we\"ird\\node\n", &cst());
        let v: Value = serde_json::from_slice(&buf).expect("json");
        assert_eq!(v["node"], "we\"ird\\node\n");
    }

    #[test]
    fn log_line_is_exact_and_escaped() {
        let mut buf = Vec::new();
        let fields = [
            ("path", json!("/var/log/nat \"x\"\\y")),
            ("ports", json!([80, 443])),
            ("type", json!("shadowed")),
        ];
        format_log_line(
            &mut buf,
            TS_NS,
            "info",
            "program \"started\"\n\u{1}\ttab",
            &fields,
            &cst(),
        );
        let l = String::from_utf8(buf).expect("utf-8");
        assert_eq!(
            l,
            concat!(
                r#"{"ts":"2024-12-09T15:05:00.123+0800","level":"info","msg":"program \"started\"\n\u0001\ttab","type":"log","#,
                r#""path":"/var/log/nat \"x\"\\y","ports":[80,443],"field_type":"shadowed"}"#,
                "\n"
            )
        );
        let v: Value = serde_json::from_str(&l).expect("json");
        assert_eq!(v["msg"], "program \"started\"\n\u{1}\ttab");
        assert_eq!(v["type"], "log");
    }

    #[test]
    fn seed_program_started_line() {
        let mut buf = Vec::new();
        format_log_line::<_, &str>(&mut buf, TS_NS, "info", "program started", &[], &cst());
        assert_eq!(
            buf,
            b"{\"ts\":\"2024-12-09T15:05:00.123+0800\",\"level\":\"info\",\"msg\":\"program started\",\"type\":\"log\"}\n"
        );
    }

    #[test]
    fn json_escaping_round_trips() {
        let samples = [
            "",
            "plain",
            "\"\\/",
            "\u{0}\u{1f}\u{7f}",
            "ünïcödé ✓ 𝄞",
            "\r\n\t\u{8}\u{c}",
        ];
        for s in samples {
            let mut buf = Vec::new();
            write_json_str(&mut buf, s);
            let back: String = serde_json::from_slice(&buf).expect("json string");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn level_names() {
        assert_eq!(level_name("INFO"), "info");
        assert_eq!(level_name("Warning"), "warn");
        assert_eq!(level_name("notice"), "notice");
    }
}

//! The conntrack-watch wire protocol: generated prost/tonic code in [`pb`],
//! conversions between [`pb::Record`] and [`ctw_common::ConnRecord`], and
//! the [`packed`] record encoding batches use.
//!
//! Invariant: prost message types are converted to common types at the edge
//! (the agent's uplink, the collector's ingest and query services); storage
//! and HTTP code never see them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctw_common::{ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

pub mod packed;

#[allow(clippy::all, missing_debug_implementations, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("ctw.v1");
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("field {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub fn ip_from_bytes(b: &[u8], field: &'static str) -> Result<IpAddr, ConvertError> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        n => Err(ConvertError::Invalid {
            field,
            message: format!("an address has 4 or 16 bytes, got {n}"),
        }),
    }
}

fn port(v: u32, field: &'static str) -> Result<u16, ConvertError> {
    u16::try_from(v).map_err(|_| ConvertError::Invalid {
        field,
        message: format!("port {v} out of range"),
    })
}

impl From<&Tuple> for pb::Tuple {
    fn from(t: &Tuple) -> Self {
        pb::Tuple {
            src: ip_to_bytes(t.src),
            dst: ip_to_bytes(t.dst),
            src_port: u32::from(t.src_port),
            dst_port: u32::from(t.dst_port),
        }
    }
}

impl TryFrom<&pb::Tuple> for Tuple {
    type Error = ConvertError;
    fn try_from(t: &pb::Tuple) -> Result<Self, Self::Error> {
        let src = ip_from_bytes(&t.src, "tuple.src")?;
        let dst = ip_from_bytes(&t.dst, "tuple.dst")?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(ConvertError::Invalid {
                field: "tuple",
                message: "src and dst of different IP versions".into(),
            });
        }
        Ok(Tuple {
            src,
            dst,
            src_port: port(t.src_port, "tuple.src_port")?,
            dst_port: port(t.dst_port, "tuple.dst_port")?,
        })
    }
}

/// A TCP state as `Record.tcp_state` (and `Connection.end_tcp_state`)
/// carry it: the kernel's `tcp_conntrack` value + 1; 0 = no state.
pub fn tcp_state_to_wire(s: Option<TcpState>) -> u32 {
    match s {
        None => 0,
        Some(s) => u32::from(s.to_kernel()) + 1,
    }
}

impl From<&ConnRecord> for pb::Record {
    fn from(r: &ConnRecord) -> Self {
        let counters = |c: Option<Counters>| {
            c.map(|c| pb::Counters {
                packets: c.packets,
                bytes: c.bytes,
            })
        };
        pb::Record {
            kind: match r.kind {
                EventKind::New => pb::Kind::New,
                EventKind::Destroy => pb::Kind::Destroy,
                EventKind::Recovered => pb::Kind::Recovered,
            } as i32,
            event_ns: r.event_ns,
            protocol: u32::from(r.protocol.number()),
            orig: Some((&r.orig).into()),
            reply: Some((&r.reply).into()),
            id: r.id,
            zone: u32::from(r.zone),
            mark: r.mark,
            status: r.status,
            tcp_state: tcp_state_to_wire(r.tcp_state),
            tcp_flags_orig: u32::from(r.tcp_flags_orig),
            tcp_flags_reply: u32::from(r.tcp_flags_reply),
            start_ns: r.start_ns,
            stop_ns: r.stop_ns,
            counters_orig: counters(r.counters_orig),
            counters_reply: counters(r.counters_reply),
        }
    }
}

impl TryFrom<&pb::Record> for ConnRecord {
    type Error = ConvertError;
    fn try_from(r: &pb::Record) -> Result<Self, Self::Error> {
        let kind = match pb::Kind::try_from(r.kind) {
            Ok(pb::Kind::New) => EventKind::New,
            Ok(pb::Kind::Destroy) => EventKind::Destroy,
            Ok(pb::Kind::Recovered) => EventKind::Recovered,
            Err(_) => {
                return Err(ConvertError::Invalid {
                    field: "kind",
                    message: format!("unknown kind {}", r.kind),
                })
            }
        };
        let protocol = u8::try_from(r.protocol)
            .ok()
            .and_then(Protocol::from_number)
            .ok_or_else(|| ConvertError::Invalid {
                field: "protocol",
                message: format!("unsupported protocol number {}", r.protocol),
            })?;
        let orig = Tuple::try_from(r.orig.as_ref().ok_or(ConvertError::Missing("orig"))?)?;
        let reply = Tuple::try_from(r.reply.as_ref().ok_or(ConvertError::Missing("reply"))?)?;
        let small = |v: u32, field: &'static str| {
            u8::try_from(v).map_err(|_| ConvertError::Invalid {
                field,
                message: format!("{v} out of range"),
            })
        };
        let tcp_state = match r.tcp_state {
            0 => None,
            v => Some(TcpState::from_kernel(small(v - 1, "tcp_state")?)),
        };
        let counters = |c: &Option<pb::Counters>| {
            c.as_ref().map(|c| Counters {
                packets: c.packets,
                bytes: c.bytes,
            })
        };
        Ok(ConnRecord {
            kind,
            event_ns: r.event_ns,
            protocol,
            orig,
            reply,
            id: r.id,
            zone: u16::try_from(r.zone).map_err(|_| ConvertError::Invalid {
                field: "zone",
                message: format!("{} out of range", r.zone),
            })?,
            mark: r.mark,
            status: r.status,
            tcp_state,
            tcp_flags_orig: small(r.tcp_flags_orig, "tcp_flags_orig")?,
            tcp_flags_reply: small(r.tcp_flags_reply, "tcp_flags_reply")?,
            start_ns: r.start_ns,
            stop_ns: r.stop_ns,
            counters_orig: counters(&r.counters_orig),
            counters_reply: counters(&r.counters_reply),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(kind: EventKind, v6: bool) -> ConnRecord {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = if v6 {
            (
                "fd00:198:18::2".parse().unwrap(),
                "fd00:198:18:1::2".parse().unwrap(),
                "fd00:198:18:1::1".parse().unwrap(),
            )
        } else {
            (
                "198.18.0.2".parse().unwrap(),
                "198.19.0.2".parse().unwrap(),
                "198.19.0.1".parse().unwrap(),
            )
        };
        ConnRecord {
            id: 0xdead_beef,
            zone: 3,
            mark: 7,
            status: 0xe,
            tcp_state: if v6 { Some(TcpState::TimeWait) } else { None },
            tcp_flags_orig: 0x23,
            start_ns: Some(1),
            stop_ns: if kind == EventKind::Destroy {
                Some(2)
            } else {
                None
            },
            counters_orig: Some(Counters {
                packets: 3,
                bytes: 300,
            }),
            ..ConnRecord::new(
                kind,
                1_733_727_900_123_000_000,
                Protocol::Udp,
                Tuple::new(a, 40000, b, 53),
                Tuple::new(b, 53, c, 1024),
            )
        }
    }

    #[test]
    fn record_round_trips() {
        for kind in [EventKind::New, EventKind::Destroy, EventKind::Recovered] {
            for v6 in [false, true] {
                let r = rec(kind, v6);
                let wire = pb::Record::from(&r);
                assert_eq!(ConnRecord::try_from(&wire).unwrap(), r);
            }
        }
    }

    #[test]
    fn bad_wire_records_are_errors_not_panics() {
        let mut w = pb::Record::from(&rec(EventKind::New, false));
        w.orig.as_mut().unwrap().src = vec![1, 2, 3];
        assert!(ConnRecord::try_from(&w)
            .unwrap_err()
            .to_string()
            .contains("tuple.src"));
        let mut w = pb::Record::from(&rec(EventKind::New, false));
        w.protocol = 1;
        assert!(ConnRecord::try_from(&w).is_err());
        let mut w = pb::Record::from(&rec(EventKind::New, false));
        w.reply = None;
        assert_eq!(
            ConnRecord::try_from(&w).unwrap_err(),
            ConvertError::Missing("reply")
        );
        let mut w = pb::Record::from(&rec(EventKind::New, false));
        w.orig.as_mut().unwrap().dst_port = 70000;
        assert!(ConnRecord::try_from(&w).is_err());
        let mut w = pb::Record::from(&rec(EventKind::New, false));
        w.kind = 9;
        assert!(ConnRecord::try_from(&w).is_err());
    }

    #[test]
    fn packed_batches_round_trip() {
        let mut all = Vec::new();
        for kind in [EventKind::New, EventKind::Destroy, EventKind::Recovered] {
            for v6 in [false, true] {
                all.push(rec(kind, v6));
            }
        }
        all[0].tcp_state = Some(TcpState::Other(200));
        let mut buf = Vec::new();
        packed::encode(&all, &mut buf);
        let mut p = packed::Packer::default();
        all.iter().for_each(|r| p.push(r));
        assert_eq!(p.len(), all.len());
        assert_eq!(p.bytes(), buf.len());
        assert_eq!(p.finish(), buf);
        let u = packed::decode(&buf);
        assert_eq!((u.records, u.errors, u.first_error), (all, 0, None));
        assert!(packed::Packer::default().finish().is_empty());
        assert_eq!(packed::decode(&[0, 0, 0, 0]), packed::Unpacked::default());
    }

    #[test]
    fn the_fuzz_seed_is_a_valid_packed_batch() {
        let u = packed::decode(include_bytes!("../../fuzz/seeds/packed/three.bin"));
        assert_eq!((u.records.len(), u.errors), (3, 0), "{:?}", u.first_error);
        assert_eq!(u.records[1].counters_orig.map(|c| c.bytes), Some(300));
    }

    #[test]
    fn bad_packed_batches_are_counted_not_panics() {
        let all = vec![rec(EventKind::New, false); 3];
        let mut buf = Vec::new();
        packed::encode(&all, &mut buf);
        let one = (buf.len() - 4) / 3;
        // Every cut decodes the whole records before it and counts the rest.
        for cut in 0..buf.len() {
            let u = packed::decode(&buf[..cut]);
            let whole = cut.saturating_sub(4) / one;
            assert_eq!(u.records.len(), whole.min(3), "cut at {cut}");
            if cut < 4 {
                assert_eq!(u.errors, 1);
            } else {
                assert_eq!(u.errors, 3 - whole as u64, "cut at {cut}");
            }
            assert!(u.first_error.is_some());
        }
        // A bad kind in the second record: only that record is lost.
        let mut bad = buf.clone();
        bad[4 + one + 1] = 9;
        let u = packed::decode(&bad);
        assert_eq!((u.records.len(), u.errors), (2, 1));
        assert!(u.first_error.unwrap().contains("record 1: field kind"));
        // Mixed address families in the first record's tuple.
        let mut bad = buf.clone();
        bad[4 + 11] = 6;
        let u = packed::decode(&bad);
        assert_eq!((u.records.len(), u.errors), (2, 1));
        // A record that is longer than its fields (a later version's) is
        // read; its extra bytes are skipped.
        let mut newer = buf[..4].to_vec();
        newer.push(buf[4] + 3);
        newer.extend_from_slice(&buf[5..4 + one]);
        newer.extend_from_slice(&[7, 7, 7]);
        newer.extend_from_slice(&buf[4 + one..]);
        let u = packed::decode(&newer);
        assert_eq!((u.records, u.errors), (all.clone(), 0));
        // Trailing bytes, and a count far beyond the data.
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(packed::decode(&long).errors, 1);
        let u = packed::decode(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!((u.records.len(), u.errors), (0, u32::MAX as u64));
    }
}

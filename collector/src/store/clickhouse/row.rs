//! One stored record as a ClickHouse row (`RowBinary`), and back.
//!
//! Addresses are `FixedString(16)`: IPv6 as is, IPv4 as the IPv4-mapped
//! IPv6 address (`::ffff:a.b.c.d`); `family` (4 or 6) tells which, so an
//! IPv4-mapped IPv6 address never matches the IPv4 one. Times are
//! microseconds since the epoch (records are [`normalize`](super::super::normalize)d
//! to the microsecond before they are stored); the kernel's start and stop
//! times are stored relative to the event time (`event_us - start` and
//! `stop - event_us`: zero for most records, so they compress to almost
//! nothing on 18.16, which has no `Delta` codec). Optional fields are zero
//! when absent, with a bit in `present` saying which are there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctw_common::{ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};
use serde::{Deserialize, Serialize};

/// `present` bits.
const HAS_TCP_STATE: u8 = 1;
const HAS_START: u8 = 2;
const HAS_STOP: u8 = 4;
const HAS_COUNTERS_ORIG: u8 = 8;
const HAS_COUNTERS_REPLY: u8 = 16;

/// The columns of `ctw_records` (and `ctw_records_by_pod`), in table order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, clickhouse::Row, Serialize, Deserialize)]
pub(super) struct RecordRow {
    /// `Date`: days since the epoch of `event_us` (the partition), capped
    /// at the last day a `Date` holds (2149-06-06).
    pub day: u16,
    pub family: u8,
    /// The reply tuple's destination: the SNAT address and port.
    pub snat_ip: [u8; 16],
    pub snat_port: u16,
    pub event_us: u64,
    pub node: String,
    /// 0 NEW, 1 DESTROY, 2 recovered.
    pub kind: u8,
    /// IANA protocol number.
    pub protocol: u8,
    pub zone: u16,
    /// The original tuple: the pod's address and port, the destination.
    pub src_ip: [u8; 16],
    pub src_port: u16,
    pub dst_ip: [u8; 16],
    pub dst_port: u16,
    /// The reply tuple's source (the destination after DNAT).
    pub reply_src_ip: [u8; 16],
    pub reply_src_port: u16,
    pub mark: u32,
    pub status: u32,
    /// `enum tcp_conntrack` value.
    pub tcp_state: u8,
    pub tcp_flags_orig: u8,
    pub tcp_flags_reply: u8,
    pub present: u8,
    /// `event_us` minus the kernel's start time, µs (0 when absent).
    pub start_before_us: i64,
    /// The kernel's stop time minus `event_us`, µs (0 when absent).
    pub stop_after_us: i64,
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

/// Last day a ClickHouse `Date` holds.
pub(super) const MAX_DAY: u64 = u16::MAX as u64;

/// The partition day of an event time (ns).
pub(super) fn day_of(event_ns: u64) -> u16 {
    (event_ns / 86_400_000_000_000).min(MAX_DAY) as u16
}

/// The 16 bytes and the family (4 or 6) of an address.
pub(super) fn addr_bytes(a: IpAddr) -> ([u8; 16], u8) {
    match a {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 4),
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

fn addr_of(b: [u8; 16], family: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    if family == 4 {
        let o = &b[12..16];
        IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
    } else {
        IpAddr::V6(v6)
    }
}

impl RecordRow {
    /// The row of a normalized record seen on `node`.
    pub fn from_record(node: &str, r: &ConnRecord) -> RecordRow {
        let (snat_ip, family) = addr_bytes(r.reply.dst);
        let mut present = 0;
        let mut set = |bit: u8, on: bool| {
            if on {
                present |= bit
            }
        };
        set(HAS_TCP_STATE, r.tcp_state.is_some());
        set(HAS_START, r.start_ns.is_some());
        set(HAS_STOP, r.stop_ns.is_some());
        set(HAS_COUNTERS_ORIG, r.counters_orig.is_some());
        set(HAS_COUNTERS_REPLY, r.counters_reply.is_some());
        let co = r.counters_orig.unwrap_or_default();
        let cr = r.counters_reply.unwrap_or_default();
        RecordRow {
            day: day_of(r.event_ns),
            family,
            snat_ip,
            snat_port: r.reply.dst_port,
            event_us: r.event_ns / 1000,
            node: node.to_string(),
            kind: match r.kind {
                EventKind::New => 0,
                EventKind::Destroy => 1,
                EventKind::Recovered => 2,
            },
            protocol: r.protocol.number(),
            zone: r.zone,
            src_ip: addr_bytes(r.orig.src).0,
            src_port: r.orig.src_port,
            dst_ip: addr_bytes(r.orig.dst).0,
            dst_port: r.orig.dst_port,
            reply_src_ip: addr_bytes(r.reply.src).0,
            reply_src_port: r.reply.src_port,
            mark: r.mark,
            status: r.status,
            tcp_state: r.tcp_state.map_or(0, TcpState::to_kernel),
            tcp_flags_orig: r.tcp_flags_orig,
            tcp_flags_reply: r.tcp_flags_reply,
            present,
            // Wrapping: exact both ways for any pair of u64 times.
            start_before_us: r.start_ns.map_or(0, |s| {
                ((r.event_ns / 1000) as i64).wrapping_sub((s / 1000) as i64)
            }),
            stop_after_us: r.stop_ns.map_or(0, |s| {
                ((s / 1000) as i64).wrapping_sub((r.event_ns / 1000) as i64)
            }),
            orig_packets: co.packets,
            orig_bytes: co.bytes,
            reply_packets: cr.packets,
            reply_bytes: cr.bytes,
        }
    }

    /// The node and record of a row; `Err` names what is wrong (a row
    /// written by something else than this collector).
    pub fn into_record(self) -> Result<(String, ConnRecord), String> {
        let kind = match self.kind {
            0 => EventKind::New,
            1 => EventKind::Destroy,
            2 => EventKind::Recovered,
            k => return Err(format!("unknown kind {k}")),
        };
        let protocol = Protocol::from_number(self.protocol)
            .ok_or_else(|| format!("unknown protocol {}", self.protocol))?;
        if self.family != 4 && self.family != 6 {
            return Err(format!("unknown address family {}", self.family));
        }
        let f = self.family;
        let has = |bit: u8| self.present & bit != 0;
        let rec = ConnRecord {
            kind,
            event_ns: self.event_us * 1000,
            protocol,
            orig: Tuple::new(
                addr_of(self.src_ip, f),
                self.src_port,
                addr_of(self.dst_ip, f),
                self.dst_port,
            ),
            reply: Tuple::new(
                addr_of(self.reply_src_ip, f),
                self.reply_src_port,
                addr_of(self.snat_ip, f),
                self.snat_port,
            ),
            id: 0,
            zone: self.zone,
            mark: self.mark,
            status: self.status,
            tcp_state: has(HAS_TCP_STATE).then(|| TcpState::from_kernel(self.tcp_state)),
            tcp_flags_orig: self.tcp_flags_orig,
            tcp_flags_reply: self.tcp_flags_reply,
            start_ns: has(HAS_START)
                .then(|| (self.event_us as i64).wrapping_sub(self.start_before_us) as u64 * 1000),
            stop_ns: has(HAS_STOP)
                .then(|| (self.event_us as i64).wrapping_add(self.stop_after_us) as u64 * 1000),
            counters_orig: has(HAS_COUNTERS_ORIG).then_some(Counters {
                packets: self.orig_packets,
                bytes: self.orig_bytes,
            }),
            counters_reply: has(HAS_COUNTERS_REPLY).then_some(Counters {
                packets: self.reply_packets,
                bytes: self.reply_bytes,
            }),
        };
        Ok((self.node, rec))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ctw_common::status;

    #[test]
    fn records_round_trip_v4_v6_and_mapped() {
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
        let v6: IpAddr = "fd00::1".parse().unwrap();
        for (a, b) in [(v4, v4), (mapped, mapped), (v6, v6)] {
            let mut r = ConnRecord {
                status: status::SRC_NAT,
                tcp_state: Some(TcpState::Other(200)),
                start_ns: Some(0),
                stop_ns: Some(u64::MAX - u64::MAX % 1000),
                counters_reply: Some(Counters {
                    packets: u64::MAX,
                    bytes: 1,
                }),
                zone: 7,
                ..ConnRecord::new(
                    EventKind::Recovered,
                    u64::MAX - u64::MAX % 1000,
                    Protocol::UdpLite,
                    Tuple::new(a, 1, b, 65535),
                    Tuple::new(b, 65535, a, 2),
                )
            };
            r.id = 0;
            let row = RecordRow::from_record("n", &r);
            assert_eq!(row.day, u16::MAX);
            assert_eq!(row.into_record().unwrap(), ("n".to_string(), r));
        }
    }
}

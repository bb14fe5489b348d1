//! Types shared by the conntrack-watch agent and collector.
//!
//! A [`ConnRecord`] is one conntrack event (NEW or DESTROY) or one entry
//! recovered from a table dump, reduced to what an operator searches on. It is
//! plain data: fixed size, `Copy`, no allocation, so the agent can decode into
//! it on its hot path. This crate has no tokio, netlink or tonic dependency.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod api;
pub mod config;
pub mod metrics;
pub mod nginx;
pub mod ratelimit;
#[cfg(feature = "signal")]
pub mod signal;

/// Nanoseconds since the Unix epoch of `t` (0 before the epoch, `u64::MAX`
/// past year 2554). The one conversion every crate uses.
pub fn unix_ns(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The wall clock now, in ns since the Unix epoch ([`unix_ns`]).
pub fn now_ns() -> u64 {
    unix_ns(std::time::SystemTime::now())
}

/// Layer-4 protocols the product tracks: the ones whose conntrack tuple has
/// source and destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Dccp,
    Sctp,
    #[serde(rename = "udplite")]
    UdpLite,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Dccp,
        Protocol::Sctp,
        Protocol::UdpLite,
    ];

    /// IANA protocol number, as carried in `CTA_PROTO_NUM`.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Dccp => 33,
            Protocol::Sctp => 132,
            Protocol::UdpLite => 136,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Dccp => "dccp",
            Protocol::Sctp => "sctp",
            Protocol::UdpLite => "udplite",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?} (expected one of tcp, udp, dccp, sctp, udplite)")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownProtocol(s.to_string()))
    }
}

/// One direction of a connection: source and destination address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Tuple {
    /// `src:src_port -> dst:dst_port`, in the order a log line shows them.
    pub fn new(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Tuple {
        Tuple {
            src,
            dst,
            src_port,
            dst_port,
        }
    }
}

/// What produced a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A conntrack NEW event.
    New,
    /// A conntrack DESTROY event.
    Destroy,
    /// An entry found in a table dump (start-up or resync after loss) that was
    /// not seen as an event.
    Recovered,
}

/// TCP connection-tracking state (`enum tcp_conntrack` in the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TcpState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
    SynSent2,
    /// A value this build does not know.
    Other(u8),
}

impl TcpState {
    pub fn from_kernel(v: u8) -> TcpState {
        match v {
            0 => TcpState::None,
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::CloseWait,
            6 => TcpState::LastAck,
            7 => TcpState::TimeWait,
            8 => TcpState::Close,
            9 => TcpState::SynSent2,
            v => TcpState::Other(v),
        }
    }

    /// The kernel's `enum tcp_conntrack` value: the inverse of
    /// [`TcpState::from_kernel`].
    pub fn to_kernel(self) -> u8 {
        match self {
            TcpState::None => 0,
            TcpState::SynSent => 1,
            TcpState::SynRecv => 2,
            TcpState::Established => 3,
            TcpState::FinWait => 4,
            TcpState::CloseWait => 5,
            TcpState::LastAck => 6,
            TcpState::TimeWait => 7,
            TcpState::Close => 8,
            TcpState::SynSent2 => 9,
            TcpState::Other(v) => v,
        }
    }

    /// The name `conntrack -L` prints (`ESTABLISHED`, `TIME_WAIT`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
            TcpState::Other(_) => "UNKNOWN",
        }
    }
}

/// Conntrack status bits (`enum ip_conntrack_status` in
/// `include/uapi/linux/netfilter/nf_conntrack_common.h`) the product reports,
/// and the agent's own marks.
///
/// The kernel uses bits 0-15 (as of Linux 6.18, `IPS_HW_OFFLOAD` is bit 15).
/// Bits 24-31 are never sent by the kernel: the agent sets them on records it
/// derives ([`CTW_MARKS`](status::CTW_MARKS)), and every layer (log, uplink, store) keeps them
/// as part of `status`.
pub mod status {
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    /// `IPS_NAT_CLASH` (bit 12, Linux 5.7+): the entry lost a NAT clash at
    /// confirm time (two packets of one new UDP flow on two CPUs). Such a
    /// shadow entry sends no NEW, only a DESTROY, with its own id and
    /// possibly another DNAT target; it is never a connection of its own.
    pub const NAT_CLASH: u32 = 1 << 12;

    /// Agent mark: the source address is outside the configured `pod_cidrs`
    /// (an external client, e.g. of a NodePort), set only when `pod_cidrs`
    /// is configured.
    pub const CTW_EXTERNAL: u32 = 1 << 24;
    /// Agent mark on a DESTROY record the kernel did not send: a re-check
    /// (GET by tuple) found the entry gone. The connection ended at or
    /// before the record's `event_ns` and after `stop_ns`, which holds the
    /// last time the entry was seen alive.
    pub const CTW_GONE: u32 = 1 << 25;
    /// Every agent mark (bits the kernel never sets).
    pub const CTW_MARKS: u32 = 0xff00_0000;
}

/// Packet and byte counters of one direction (needs `nf_conntrack_acct=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// One connection event, decoded from ctnetlink.
///
/// Times are nanoseconds since the Unix epoch. `event_ns` is the kernel's
/// event timestamp when `nf_conntrack_timestamp=1`, else the time the agent
/// received the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRecord {
    pub kind: EventKind,
    pub event_ns: u64,
    pub protocol: Protocol,
    pub orig: Tuple,
    pub reply: Tuple,
    /// Conntrack id (`CTA_ID`), 0 when the kernel did not send one.
    pub id: u32,
    pub zone: u16,
    pub mark: u32,
    /// `CTA_STATUS` bits, see [`status`].
    pub status: u32,
    pub tcp_state: Option<TcpState>,
    /// TCP flags seen in the original / reply direction (`CTA_PROTOINFO_TCP_FLAGS_*`).
    pub tcp_flags_orig: u8,
    pub tcp_flags_reply: u8,
    /// Kernel start / stop timestamps (ns), when `nf_conntrack_timestamp=1`.
    pub start_ns: Option<u64>,
    pub stop_ns: Option<u64>,
    /// Counters per direction, when `nf_conntrack_acct=1` (DESTROY and dumps).
    pub counters_orig: Option<Counters>,
    pub counters_reply: Option<Counters>,
}

impl ConnRecord {
    /// A record with these tuples and nothing else the kernel may send: no
    /// id, zone, mark, status bits, TCP state or flags, timestamps or
    /// counters. Set those with struct update syntax.
    pub fn new(
        kind: EventKind,
        event_ns: u64,
        protocol: Protocol,
        orig: Tuple,
        reply: Tuple,
    ) -> ConnRecord {
        ConnRecord {
            kind,
            event_ns,
            protocol,
            orig,
            reply,
            id: 0,
            zone: 0,
            mark: 0,
            status: 0,
            tcp_state: None,
            tcp_flags_orig: 0,
            tcp_flags_reply: 0,
            start_ns: None,
            stop_ns: None,
            counters_orig: None,
            counters_reply: None,
        }
    }

    /// The source NAT address and port: the destination of the reply tuple.
    pub fn snat(&self) -> (IpAddr, u16) {
        (self.reply.dst, self.reply.dst_port)
    }

    /// Was the entry picked up mid-stream? A NEW for a TCP connection whose
    /// first packet seen was not a SYN (state other than `SYN_SENT`): the
    /// kernel creates such entries (`nf_conntrack_tcp_loose=1`, the default)
    /// when an earlier entry of the same connection expired while it was
    /// idle, e.g. HTTP keepalive past `nf_conntrack_tcp_timeout_established`.
    /// The connection itself started earlier, under the same tuple.
    pub fn midstream(&self) -> bool {
        self.kind == EventKind::New
            && self.protocol == Protocol::Tcp
            && !matches!(self.tcp_state, None | Some(TcpState::SynSent))
    }

    /// Is this record a NAT-clash shadow entry ([`status::NAT_CLASH`])?
    pub fn nat_clash(&self) -> bool {
        self.status & status::NAT_CLASH != 0
    }

    /// The conntrack flags `conntrack -L` prints, e.g. `["ASSURED"]`.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.status & status::SEEN_REPLY == 0 {
            v.push("UNREPLIED");
        }
        if self.status & status::ASSURED != 0 {
            v.push("ASSURED");
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_numbers_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_number(p.number()), Some(p));
            assert_eq!(p.as_str().parse::<Protocol>(), Ok(p));
        }
        assert_eq!(Protocol::from_number(1), None);
        assert!("icmp".parse::<Protocol>().is_err());
        assert_eq!("TCP".parse::<Protocol>(), Ok(Protocol::Tcp));
    }

    #[test]
    fn tcp_state_names() {
        assert_eq!(TcpState::from_kernel(3).name(), "ESTABLISHED");
        assert_eq!(TcpState::from_kernel(7).name(), "TIME_WAIT");
        assert_eq!(TcpState::from_kernel(200), TcpState::Other(200));
        for v in 0..=255u8 {
            assert_eq!(TcpState::from_kernel(v).to_kernel(), v);
        }
    }
}

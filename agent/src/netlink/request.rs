//! Builds ctnetlink requests with netlink-packet-netfilter: a GET for one
//! tuple (live lookup) and a table dump (start-up and resync).

use std::net::IpAddr;

use ctw_common::{Protocol, Tuple};
use netlink_packet_core::{
    DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as NlTuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

/// Which tuple a lookup names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TupleDir {
    /// The original direction: pod address and port to the server.
    Orig,
    /// The reply direction: server back to the SNAT address and port.
    Reply,
}

fn serialize(mut msg: NetlinkMessage<NetfilterMessage>) -> Vec<u8> {
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

fn family_of(ip: IpAddr) -> NetfilterProtoFamily {
    match ip {
        IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
        IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
    }
}

/// `IPCTNL_MSG_CT_GET` for the entry whose `dir` tuple is `t`, in conntrack
/// zone `zone`.
///
/// The kernel looks only in the zone the request names (`CTA_ZONE`, a
/// big-endian u16 in `enum ctattr_type`, `nfnetlink_conntrack.h`); zone 0
/// sends no `CTA_ZONE`, exactly the request the seed made.
pub fn get(protocol: Protocol, t: &Tuple, dir: TupleDir, zone: u16, seq: u32) -> Vec<u8> {
    let tuple = vec![
        NlTuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        NlTuple::Proto(vec![
            ProtoTuple::Protocol(protocol.number().into()),
            ProtoTuple::SourcePort(t.src_port),
            ProtoTuple::DestinationPort(t.dst_port),
        ]),
    ];
    let attr = match dir {
        TupleDir::Orig => ConntrackAttribute::CtaTupleOrig(tuple),
        TupleDir::Reply => ConntrackAttribute::CtaTupleReply(tuple),
    };
    let mut attrs = vec![attr];
    if zone != 0 {
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(
            crate::netlink::decode::CTA_ZONE,
            zone.to_be_bytes().to_vec(),
        )));
    }
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_ACK;
    hdr.sequence_number = seq;
    serialize(NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family_of(t.src), 0, 0),
            ConntrackMessage::Get(attrs),
        )),
    ))
}

/// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP` for every family.
pub fn dump(seq: u32) -> Vec<u8> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    hdr.sequence_number = seq;
    serialize(NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_request_layout() {
        let t = Tuple {
            src: "198.18.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            dst: "198.19.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            src_port: 40000,
            dst_port: 80,
        };
        let b = get(Protocol::Tcp, &t, TupleDir::Reply, 0, 7);
        // nlmsghdr: len, type = (CTNETLINK << 8) | GET, flags REQUEST|ACK, seq.
        assert_eq!(
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), (1 << 8) | 1);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 0x1 | 0x4);
        assert_eq!(u32::from_ne_bytes([b[8], b[9], b[10], b[11]]), 7);
        assert_eq!(b[16], libc::AF_INET as u8);
        // First attribute: CTA_TUPLE_REPLY (2), nested.
        assert_eq!(u16::from_ne_bytes([b[22], b[23]]) & 0x3fff, 2);
        // Zone 0 sends no CTA_ZONE; zone 7 appends it after the tuple.
        let z = get(Protocol::Tcp, &t, TupleDir::Reply, 7, 7);
        assert_eq!(z.len(), b.len() + 8);
        let tail = &z[b.len()..];
        assert_eq!(u16::from_ne_bytes([tail[0], tail[1]]), 6);
        assert_eq!(u16::from_ne_bytes([tail[2], tail[3]]), 18);
        assert_eq!(u16::from_be_bytes([tail[4], tail[5]]), 7);
        assert_eq!(&z[16..b.len()], &b[16..], "same tuple");
        let d = dump(9);
        assert_eq!(u16::from_ne_bytes([d[6], d[7]]), 0x1 | 0x300);
    }
}

//! Zero-allocation decoder for ctnetlink messages (`NETLINK_NETFILTER`,
//! subsystem `NFNL_SUBSYS_CTNETLINK`): events, dump and GET replies, acks.
//!
//! [`messages`] splits one datagram into netlink messages; [`decode`] turns an
//! event into a [`Decoded`], [`decode_entry`] does the same for the answer to
//! a GET or dump request. Both read straight from the receive buffer into a
//! `Copy` [`ConnRecord`]: nothing is allocated per message, and no input makes
//! them panic (the `decode` fuzz target in `fuzz/` checks this).
//!
//! Layout: `nlmsghdr` (16 bytes, host order), `nfgenmsg` (4 bytes), then
//! netlink attributes: `nla_len`/`nla_type` in host order, 4-byte aligned,
//! payloads big-endian. Unknown attributes are skipped so newer kernels do
//! not break the agent; a structure that contradicts itself is an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctw_common::{status, ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

/// Netlink message header length (`NLMSG_HDRLEN`).
pub const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg` length.
pub const NFGENMSG_LEN: usize = 4;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_CREATE: u16 = 0x400;

pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW`.
pub const CT_NEW: u16 = NFNL_SUBSYS_CTNETLINK << 8;
/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE`.
pub const CT_DELETE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | 2;

/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER` are flags, not part of the type.
pub const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

// enum ctattr_type (linux/netfilter/nfnetlink_conntrack.h)
pub const CTA_TUPLE_ORIG: u16 = 1;
pub const CTA_TUPLE_REPLY: u16 = 2;
pub const CTA_STATUS: u16 = 3;
pub const CTA_PROTOINFO: u16 = 4;
pub const CTA_MARK: u16 = 8;
pub const CTA_COUNTERS_ORIG: u16 = 9;
pub const CTA_COUNTERS_REPLY: u16 = 10;
pub const CTA_ID: u16 = 12;
pub const CTA_ZONE: u16 = 18;
pub const CTA_TIMESTAMP: u16 = 20;
/// Event time (ns), sent since Linux 6.14 when `nf_conntrack_timestamp=1`;
/// the value after `CTA_STATUS_MASK` (26) in `enum ctattr_type`.
pub const CTA_TIMESTAMP_EVENT: u16 = 27;

// enum ctattr_tuple
pub const CTA_TUPLE_IP: u16 = 1;
pub const CTA_TUPLE_PROTO: u16 = 2;

// enum ctattr_ip
pub const CTA_IP_V4_SRC: u16 = 1;
pub const CTA_IP_V4_DST: u16 = 2;
pub const CTA_IP_V6_SRC: u16 = 3;
pub const CTA_IP_V6_DST: u16 = 4;

// enum ctattr_l4proto
pub const CTA_PROTO_NUM: u16 = 1;
pub const CTA_PROTO_SRC_PORT: u16 = 2;
pub const CTA_PROTO_DST_PORT: u16 = 3;

// enum ctattr_protoinfo / ctattr_protoinfo_tcp
pub const CTA_PROTOINFO_TCP: u16 = 1;
pub const CTA_PROTOINFO_TCP_STATE: u16 = 1;
pub const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
pub const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;

// enum ctattr_counters
pub const CTA_COUNTERS_PACKETS: u16 = 1;
pub const CTA_COUNTERS_BYTES: u16 = 2;
pub const CTA_COUNTERS32_PACKETS: u16 = 3;
pub const CTA_COUNTERS32_BYTES: u16 = 4;

// enum ctattr_tstamp
pub const CTA_TIMESTAMP_START: u16 = 1;
pub const CTA_TIMESTAMP_STOP: u16 = 2;

/// What is wrong with a message. Carries only static names and numbers, so
/// building one does not allocate either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated netlink header: {have} bytes left, need 16")]
    TruncatedHeader { have: usize },
    #[error("netlink message length {len} outside 16..={available}")]
    BadMessageLength { len: usize, available: usize },
    #[error("truncated {what}: {have} bytes, need {need}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("attribute length {len} in {parent} is shorter than its 4-byte header")]
    AttrTooShort { parent: &'static str, len: usize },
    #[error("attribute length {len} runs past its parent {parent} ({room} bytes left)")]
    AttrOverrun {
        parent: &'static str,
        len: usize,
        room: usize,
    },
    #[error("wrong-size {attr}: {len} bytes, expected {expected}")]
    WrongSize {
        attr: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("duplicate {0}")]
    Duplicate(&'static str),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{0} mixes ipv4 and ipv6 addresses")]
    MixedFamilies(&'static str),
}

/// One netlink message of a datagram, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMessage<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    /// Everything after the 16-byte `nlmsghdr`, up to `nlmsg_len`.
    pub payload: &'a [u8],
}

/// Iterator over the netlink messages of one datagram, see [`messages`].
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

/// Iterate the netlink messages in one datagram; yields `Err` once and stops
/// on a truncated or garbled header.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<RawMessage<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.rest;
        if buf.is_empty() {
            return None;
        }
        let Some(hdr) = buf.first_chunk::<NLMSG_HDRLEN>() else {
            self.rest = &[];
            return Some(Err(DecodeError::TruncatedHeader { have: buf.len() }));
        };
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            self.rest = &[];
            return Some(Err(DecodeError::BadMessageLength {
                len,
                available: buf.len(),
            }));
        }
        let msg = RawMessage {
            msg_type: u16::from_ne_bytes([hdr[4], hdr[5]]),
            flags: u16::from_ne_bytes([hdr[6], hdr[7]]),
            seq: u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
            pid: u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        self.rest = buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    }
}

/// What one message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A connection with ports: NEW or DESTROY event, or a dump/GET entry.
    Conn(ConnRecord),
    /// A valid conntrack message for a protocol without ports (ICMP, GRE ...).
    NoPorts,
    /// `IPCTNL_MSG_CT_NEW` without `NLM_F_CREATE`: an UPDATE event.
    Update,
    /// `NLMSG_DONE`: the end of a dump.
    Done,
    /// `NLMSG_ERROR`: positive errno, 0 for an ack.
    Error(i32),
    /// `NLMSG_OVERRUN`.
    Overrun,
    /// Any other message type (another subsystem, `IPCTNL_MSG_CT_GET` ...).
    Other(u16),
}

/// The kernel's time of an event decoded with receive time `recv_ns`, when
/// the kernel sent one (`nf_conntrack_timestamp=1`): `CTA_TIMESTAMP_EVENT`,
/// else the start (NEW) or stop (DESTROY) time, which [`decode`] put in
/// `event_ns` instead of `recv_ns`. `None` for dump and GET entries, for
/// events without timestamps and for the DESTROY records the agent makes
/// itself ([`status::CTW_GONE`]).
///
/// A NEW's kernel start time stays in `start_ns` only when the kernel sent
/// `CTA_TIMESTAMP_START` (before Linux 6.14): the event time differs from
/// it by some microseconds (the golden `tcp4_ts_acct` capture: 18 us), and
/// the collector joins a NEW and its DESTROY on equal start times.
pub fn kernel_event_ns(r: &ConnRecord, recv_ns: u64) -> Option<u64> {
    let kernel = match r.kind {
        EventKind::New => r.event_ns != recv_ns,
        EventKind::Destroy => r.event_ns != recv_ns && r.status & status::CTW_GONE == 0,
        EventKind::Recovered => false,
    };
    kernel.then_some(r.event_ns)
}

/// Decode an event received on the NEW/DESTROY multicast groups.
///
/// `recv_ns`: wall-clock ns when the datagram was received, used as
/// `event_ns` when the kernel sends no event timestamp.
pub fn decode(msg: &RawMessage<'_>, recv_ns: u64) -> Result<Decoded, DecodeError> {
    match msg.msg_type {
        CT_NEW if msg.flags & NLM_F_CREATE != 0 => {
            decode_conn(msg.payload, EventKind::New, recv_ns)
        }
        CT_NEW => Ok(Decoded::Update),
        _ => decode_common(msg, recv_ns),
    }
}

/// Decode one message of the answer to a GET or dump request: an
/// `IPCTNL_MSG_CT_NEW` message is an entry ([`EventKind::Recovered`]) whatever
/// its flags.
pub fn decode_entry(msg: &RawMessage<'_>, recv_ns: u64) -> Result<Decoded, DecodeError> {
    match msg.msg_type {
        CT_NEW => decode_conn(msg.payload, EventKind::Recovered, recv_ns),
        _ => decode_common(msg, recv_ns),
    }
}

fn decode_common(msg: &RawMessage<'_>, recv_ns: u64) -> Result<Decoded, DecodeError> {
    match msg.msg_type {
        CT_DELETE => decode_conn(msg.payload, EventKind::Destroy, recv_ns),
        NLMSG_DONE => Ok(Decoded::Done),
        NLMSG_OVERRUN => Ok(Decoded::Overrun),
        NLMSG_ERROR => {
            let Some(e) = msg.payload.first_chunk::<4>() else {
                return Err(DecodeError::Truncated {
                    what: "nlmsgerr",
                    need: 4,
                    have: msg.payload.len(),
                });
            };
            let e = i32::from_ne_bytes(*e);
            Ok(Decoded::Error(e.checked_neg().unwrap_or(i32::MAX)))
        }
        t => Ok(Decoded::Other(t)),
    }
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterator over the attributes in `buf`; yields `(type without flags,
/// payload)` and stops after the first error.
#[derive(Debug, Clone)]
struct Attrs<'a> {
    rest: &'a [u8],
    parent: &'static str,
}

fn attrs<'a>(buf: &'a [u8], parent: &'static str) -> Attrs<'a> {
    Attrs { rest: buf, parent }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.rest;
        if buf.is_empty() {
            return None;
        }
        self.rest = &[];
        let Some(h) = buf.first_chunk::<4>() else {
            return Some(Err(DecodeError::Truncated {
                what: "attribute header",
                need: 4,
                have: buf.len(),
            }));
        };
        let len = u16::from_ne_bytes([h[0], h[1]]) as usize;
        let ty = u16::from_ne_bytes([h[2], h[3]]) & NLA_TYPE_MASK;
        if len < 4 {
            return Some(Err(DecodeError::AttrTooShort {
                parent: self.parent,
                len,
            }));
        }
        if len > buf.len() {
            return Some(Err(DecodeError::AttrOverrun {
                parent: self.parent,
                len,
                room: buf.len(),
            }));
        }
        self.rest = buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((ty, &buf[4..len])))
    }
}

/// Marks attribute types seen at one nesting level; a repeat is an error, so
/// that no later attribute can silently override the one the kernel-side BPF
/// filter looked at.
#[derive(Debug, Default)]
struct Seen(u64);

impl Seen {
    fn first(&mut self, ty: u16, name: &'static str) -> Result<(), DecodeError> {
        let bit = 1u64 << (ty & 63);
        if self.0 & bit != 0 {
            return Err(DecodeError::Duplicate(name));
        }
        self.0 |= bit;
        Ok(())
    }
}

fn fixed<const N: usize>(p: &[u8], attr: &'static str) -> Result<[u8; N], DecodeError> {
    p.try_into().map_err(|_| DecodeError::WrongSize {
        attr,
        len: p.len(),
        expected: N,
    })
}

fn be16(p: &[u8], attr: &'static str) -> Result<u16, DecodeError> {
    fixed::<2>(p, attr).map(u16::from_be_bytes)
}

fn be32(p: &[u8], attr: &'static str) -> Result<u32, DecodeError> {
    fixed::<4>(p, attr).map(u32::from_be_bytes)
}

fn be64(p: &[u8], attr: &'static str) -> Result<u64, DecodeError> {
    fixed::<8>(p, attr).map(u64::from_be_bytes)
}

fn u8_attr(p: &[u8], attr: &'static str) -> Result<u8, DecodeError> {
    fixed::<1>(p, attr).map(|[b]| b)
}

/// A tuple as read, before checking that it is complete.
#[derive(Debug, Default, Clone, Copy)]
struct RawTuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
}

/// Names used in errors, per direction.
#[derive(Debug, Clone, Copy)]
struct TupleNames {
    tuple: &'static str,
    ip: &'static str,
    proto: &'static str,
    src: &'static str,
    dst: &'static str,
    num: &'static str,
    src_port: &'static str,
    dst_port: &'static str,
}

const ORIG: TupleNames = TupleNames {
    tuple: "CTA_TUPLE_ORIG",
    ip: "CTA_TUPLE_IP in CTA_TUPLE_ORIG",
    proto: "CTA_TUPLE_PROTO in CTA_TUPLE_ORIG",
    src: "original source address",
    dst: "original destination address",
    num: "original protocol number",
    src_port: "original source port",
    dst_port: "original destination port",
};

const REPLY: TupleNames = TupleNames {
    tuple: "CTA_TUPLE_REPLY",
    ip: "CTA_TUPLE_IP in CTA_TUPLE_REPLY",
    proto: "CTA_TUPLE_PROTO in CTA_TUPLE_REPLY",
    src: "reply source address",
    dst: "reply destination address",
    num: "reply protocol number",
    src_port: "reply source port",
    dst_port: "reply destination port",
};

fn parse_tuple(buf: &[u8], n: &TupleNames) -> Result<RawTuple, DecodeError> {
    let mut t = RawTuple::default();
    let mut seen = Seen::default();
    for a in attrs(buf, n.tuple) {
        let (ty, p) = a?;
        match ty {
            CTA_TUPLE_IP => {
                seen.first(ty, n.ip)?;
                let mut seen_ip = Seen::default();
                for a in attrs(p, n.ip) {
                    let (ty, p) = a?;
                    match ty {
                        CTA_IP_V4_SRC => {
                            seen_ip.first(CTA_IP_V4_SRC, n.src)?;
                            t.src = Some(Ipv4Addr::from(fixed::<4>(p, n.src)?).into());
                        }
                        CTA_IP_V4_DST => {
                            seen_ip.first(CTA_IP_V4_DST, n.dst)?;
                            t.dst = Some(Ipv4Addr::from(fixed::<4>(p, n.dst)?).into());
                        }
                        // The v6 attributes share the "seen" slot of their
                        // v4 twin: a tuple has one source and one destination.
                        CTA_IP_V6_SRC => {
                            seen_ip.first(CTA_IP_V4_SRC, n.src)?;
                            t.src = Some(Ipv6Addr::from(fixed::<16>(p, n.src)?).into());
                        }
                        CTA_IP_V6_DST => {
                            seen_ip.first(CTA_IP_V4_DST, n.dst)?;
                            t.dst = Some(Ipv6Addr::from(fixed::<16>(p, n.dst)?).into());
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                seen.first(ty, n.proto)?;
                let mut seen_proto = Seen::default();
                for a in attrs(p, n.proto) {
                    let (ty, p) = a?;
                    match ty {
                        CTA_PROTO_NUM => {
                            seen_proto.first(ty, n.num)?;
                            t.proto = Some(u8_attr(p, n.num)?);
                        }
                        CTA_PROTO_SRC_PORT => {
                            seen_proto.first(ty, n.src_port)?;
                            t.src_port = Some(be16(p, n.src_port)?);
                        }
                        CTA_PROTO_DST_PORT => {
                            seen_proto.first(ty, n.dst_port)?;
                            t.dst_port = Some(be16(p, n.dst_port)?);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// Addresses of a tuple, checked for presence and a single family.
fn addrs(t: &RawTuple, n: &TupleNames) -> Result<(IpAddr, IpAddr), DecodeError> {
    let src = t.src.ok_or(DecodeError::Missing(n.src))?;
    let dst = t.dst.ok_or(DecodeError::Missing(n.dst))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(DecodeError::MixedFamilies(n.tuple));
    }
    Ok((src, dst))
}

fn ports(t: &RawTuple, n: &TupleNames) -> Result<(u16, u16), DecodeError> {
    Ok((
        t.src_port.ok_or(DecodeError::Missing(n.src_port))?,
        t.dst_port.ok_or(DecodeError::Missing(n.dst_port))?,
    ))
}

fn parse_counters(buf: &[u8], parent: &'static str) -> Result<Counters, DecodeError> {
    let mut c = Counters::default();
    for a in attrs(buf, parent) {
        let (ty, p) = a?;
        match ty {
            CTA_COUNTERS_PACKETS => c.packets = be64(p, "CTA_COUNTERS_PACKETS")?,
            CTA_COUNTERS_BYTES => c.bytes = be64(p, "CTA_COUNTERS_BYTES")?,
            CTA_COUNTERS32_PACKETS => {
                c.packets = u64::from(be32(p, "CTA_COUNTERS32_PACKETS")?);
            }
            CTA_COUNTERS32_BYTES => c.bytes = u64::from(be32(p, "CTA_COUNTERS32_BYTES")?),
            _ => {}
        }
    }
    Ok(c)
}

/// Decode the payload (`nfgenmsg` + attributes) of a conntrack message.
fn decode_conn(payload: &[u8], kind: EventKind, recv_ns: u64) -> Result<Decoded, DecodeError> {
    let Some(body) = payload.get(NFGENMSG_LEN..) else {
        return Err(DecodeError::Truncated {
            what: "nfgenmsg",
            need: NFGENMSG_LEN,
            have: payload.len(),
        });
    };
    let mut orig = None;
    let mut reply = None;
    let mut status = 0;
    let mut mark = 0;
    let mut id = 0;
    let mut zone = 0;
    let mut tcp_state = None;
    let mut tcp_flags_orig = 0;
    let mut tcp_flags_reply = 0;
    let mut start_ns = None;
    let mut stop_ns = None;
    let mut event_ts = None;
    let mut counters_orig = None;
    let mut counters_reply = None;
    let mut seen = Seen::default();

    for a in attrs(body, "message") {
        let (ty, p) = a?;
        match ty {
            CTA_TUPLE_ORIG => {
                seen.first(ty, "CTA_TUPLE_ORIG")?;
                orig = Some(parse_tuple(p, &ORIG)?);
            }
            CTA_TUPLE_REPLY => {
                seen.first(ty, "CTA_TUPLE_REPLY")?;
                reply = Some(parse_tuple(p, &REPLY)?);
            }
            CTA_STATUS => status = be32(p, "CTA_STATUS")?,
            CTA_MARK => mark = be32(p, "CTA_MARK")?,
            CTA_ID => id = be32(p, "CTA_ID")?,
            CTA_ZONE => zone = be16(p, "CTA_ZONE")?,
            CTA_PROTOINFO => {
                for a in attrs(p, "CTA_PROTOINFO") {
                    let (ty, p) = a?;
                    if ty != CTA_PROTOINFO_TCP {
                        continue;
                    }
                    for a in attrs(p, "CTA_PROTOINFO_TCP") {
                        let (ty, p) = a?;
                        match ty {
                            CTA_PROTOINFO_TCP_STATE => {
                                tcp_state = Some(TcpState::from_kernel(u8_attr(
                                    p,
                                    "CTA_PROTOINFO_TCP_STATE",
                                )?));
                            }
                            // struct nf_ct_tcp_flags { __u8 flags; __u8 mask; }
                            CTA_PROTOINFO_TCP_FLAGS_ORIGINAL => {
                                tcp_flags_orig =
                                    fixed::<2>(p, "CTA_PROTOINFO_TCP_FLAGS_ORIGINAL")?[0];
                            }
                            CTA_PROTOINFO_TCP_FLAGS_REPLY => {
                                tcp_flags_reply =
                                    fixed::<2>(p, "CTA_PROTOINFO_TCP_FLAGS_REPLY")?[0];
                            }
                            _ => {}
                        }
                    }
                }
            }
            CTA_COUNTERS_ORIG => counters_orig = Some(parse_counters(p, "CTA_COUNTERS_ORIG")?),
            CTA_COUNTERS_REPLY => counters_reply = Some(parse_counters(p, "CTA_COUNTERS_REPLY")?),
            CTA_TIMESTAMP => {
                for a in attrs(p, "CTA_TIMESTAMP") {
                    let (ty, p) = a?;
                    match ty {
                        CTA_TIMESTAMP_START => start_ns = Some(be64(p, "CTA_TIMESTAMP_START")?),
                        CTA_TIMESTAMP_STOP => stop_ns = Some(be64(p, "CTA_TIMESTAMP_STOP")?),
                        _ => {}
                    }
                }
            }
            CTA_TIMESTAMP_EVENT => event_ts = Some(be64(p, "CTA_TIMESTAMP_EVENT")?),
            _ => {}
        }
    }

    let orig_raw = orig.ok_or(DecodeError::Missing("CTA_TUPLE_ORIG"))?;
    let reply_raw = reply.ok_or(DecodeError::Missing("CTA_TUPLE_REPLY"))?;
    let (osrc, odst) = addrs(&orig_raw, &ORIG)?;
    let (rsrc, rdst) = addrs(&reply_raw, &REPLY)?;
    let num = orig_raw.proto.ok_or(DecodeError::Missing(ORIG.num))?;
    let Some(protocol) = Protocol::from_number(num) else {
        return Ok(Decoded::NoPorts);
    };
    let (osport, odport) = ports(&orig_raw, &ORIG)?;
    let (rsport, rdport) = ports(&reply_raw, &REPLY)?;

    // The kernel's time of the event: CTA_TIMESTAMP_EVENT (Linux 6.14+),
    // else the start (NEW) or stop (DESTROY) time.
    let kernel_ns = event_ts.or(match kind {
        EventKind::New => start_ns,
        EventKind::Destroy => stop_ns,
        EventKind::Recovered => None,
    });
    // A NEW carries CTA_TIMESTAMP_EVENT and no start time: `event_ns` is
    // then its start as far as anyone can tell (`start_ns` stays None).
    let event_ns = kernel_ns.unwrap_or(recv_ns);

    Ok(Decoded::Conn(ConnRecord {
        kind,
        event_ns,
        protocol,
        orig: Tuple {
            src: osrc,
            dst: odst,
            src_port: osport,
            dst_port: odport,
        },
        reply: Tuple {
            src: rsrc,
            dst: rdst,
            src_port: rsport,
            dst_port: rdport,
        },
        id,
        zone,
        mark,
        status,
        tcp_state,
        tcp_flags_orig,
        tcp_flags_reply,
        start_ns,
        stop_ns,
        counters_orig,
        counters_reply,
    }))
}

/// Golden datagrams and message builders shared by the netlink tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// Golden files: raw event datagrams captured from a 6.18 kernel by
    /// `testdata/capture.sh` (which runs `examples/capture_golden.rs` in a
    /// masquerading node namespace). Each holds the NEW and the DESTROY
    /// event of one flow.
    pub(crate) const GOLDEN: &[(&str, &str)] = &[
        ("tcp4", include_str!("testdata/tcp4.hex")),
        ("tcp4_ts_acct", include_str!("testdata/tcp4_ts_acct.hex")),
        ("udp4", include_str!("testdata/udp4.hex")),
        ("udp4_ts_acct", include_str!("testdata/udp4_ts_acct.hex")),
        ("tcp6", include_str!("testdata/tcp6.hex")),
        ("tcp6_ts_acct", include_str!("testdata/tcp6_ts_acct.hex")),
        ("icmp4", include_str!("testdata/icmp4.hex")),
    ];

    /// Golden files for issue 11, captured by `testdata/capture.sh BIN
    /// issue11` on Linux 6.18; `testdata/NAME.events.txt` holds what
    /// `conntrack -E -o extended,id` printed for the same events.
    /// - `zone7_tcp4`: the NEW of a TCP flow moved to conntrack zone 7;
    /// - `tcp4_expire`: NEW (`CTA_TIMESTAMP_EVENT`, no start) and the
    ///   DESTROY the kernel sent itself when TIME_WAIT (1 s) expired;
    /// - `nat_clash_udp4`: the DESTROY of a UDP NAT-clash shadow entry.
    pub(crate) const GOLDEN_ISSUE11: &[(&str, &str)] = &[
        ("zone7_tcp4", include_str!("testdata/zone7_tcp4.hex")),
        ("tcp4_expire", include_str!("testdata/tcp4_expire.hex")),
        (
            "nat_clash_udp4",
            include_str!("testdata/nat_clash_udp4.hex"),
        ),
    ];

    /// `(recv_ns, bytes)` of every datagram in a golden file's text.
    pub(crate) fn parse_hex(text: &str) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# datagram ") {
                let recv_ns = rest
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("recv_ns="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                out.push((recv_ns, Vec::new()));
            } else if !line.starts_with('#') {
                let cur = &mut out.last_mut().expect("hex before a datagram header").1;
                for w in line.split_whitespace() {
                    cur.push(u8::from_str_radix(w, 16).expect("hex byte"));
                }
            }
        }
        out
    }

    pub(crate) fn golden(name: &str) -> Vec<(u64, Vec<u8>)> {
        let text = GOLDEN
            .iter()
            .chain(GOLDEN_ISSUE11)
            .find(|(n, _)| *n == name)
            .expect("golden file")
            .1;
        parse_hex(text)
    }

    /// Every golden datagram: `(file name, recv_ns, bytes)`.
    pub(crate) fn all_golden() -> Vec<(&'static str, u64, Vec<u8>)> {
        GOLDEN
            .iter()
            .chain(GOLDEN_ISSUE11)
            .flat_map(|(n, t)| parse_hex(t).into_iter().map(move |(r, b)| (*n, r, b)))
            .collect()
    }

    /// Builds a netlink message attribute by attribute, like the kernel.
    #[derive(Debug, Default)]
    pub(crate) struct Builder {
        pub(crate) buf: Vec<u8>,
        open: Vec<usize>,
    }

    impl Builder {
        /// nlmsghdr (length filled in by `finish`) and nfgenmsg.
        pub(crate) fn new(msg_type: u16, flags: u16, family: u8) -> Builder {
            let mut b = Builder::default();
            b.buf.extend_from_slice(&0u32.to_ne_bytes());
            b.buf.extend_from_slice(&msg_type.to_ne_bytes());
            b.buf.extend_from_slice(&flags.to_ne_bytes());
            b.buf.extend_from_slice(&[0; 8]);
            b.buf.extend_from_slice(&[family, 0, 0, 0]);
            b
        }
        pub(crate) fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
            let len = 4 + payload.len();
            self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
            self.buf.extend_from_slice(&ty.to_ne_bytes());
            self.buf.extend_from_slice(payload);
            while self.buf.len() % 4 != 0 {
                self.buf.push(0);
            }
            self
        }
        pub(crate) fn nest(&mut self, ty: u16) -> &mut Self {
            self.open.push(self.buf.len());
            self.buf.extend_from_slice(&[0, 0]);
            self.buf.extend_from_slice(&(ty | 0x8000).to_ne_bytes());
            self
        }
        pub(crate) fn end(&mut self) -> &mut Self {
            let start = self.open.pop().expect("open nest");
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
            self
        }
        /// A tuple the way the kernel lays it out.
        pub(crate) fn tuple(
            &mut self,
            ty: u16,
            src: std::net::IpAddr,
            dst: std::net::IpAddr,
            proto: u8,
            ports: Option<(u16, u16)>,
        ) -> &mut Self {
            use std::net::IpAddr;
            self.nest(ty).nest(super::CTA_TUPLE_IP);
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    self.attr(super::CTA_IP_V4_SRC, &s.octets());
                    self.attr(super::CTA_IP_V4_DST, &d.octets());
                }
                (s, d) => {
                    let six = |a: IpAddr| match a {
                        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                        IpAddr::V6(a) => a.octets(),
                    };
                    self.attr(super::CTA_IP_V6_SRC, &six(s));
                    self.attr(super::CTA_IP_V6_DST, &six(d));
                }
            }
            self.end().nest(super::CTA_TUPLE_PROTO);
            self.attr(super::CTA_PROTO_NUM, &[proto]);
            match ports {
                Some((s, d)) => {
                    self.attr(super::CTA_PROTO_SRC_PORT, &s.to_be_bytes());
                    self.attr(super::CTA_PROTO_DST_PORT, &d.to_be_bytes());
                }
                None => {
                    // ICMP-like: id, type, code
                    self.attr(4, &0x4321u16.to_be_bytes());
                    self.attr(5, &[8]);
                    self.attr(6, &[0]);
                }
            }
            self.end().end()
        }
        pub(crate) fn finish(&mut self) -> Vec<u8> {
            let len = self.buf.len() as u32;
            self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
            std::mem::take(&mut self.buf)
        }
    }

    /// Seeded randomness for the property tests (fastrand), with the few
    /// draws they use.
    #[derive(Debug)]
    pub(crate) struct Rng(fastrand::Rng);

    impl Rng {
        pub(crate) fn seeded(seed: u64) -> Self {
            Self(fastrand::Rng::with_seed(seed))
        }
        pub(crate) fn next(&mut self) -> u64 {
            self.0.u64(..)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.0.u64(..n.max(1))
        }
        pub(crate) fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
        pub(crate) fn pick<T: Copy>(&mut self, v: &[T]) -> T {
            v[self.0.usize(..v.len())]
        }
    }

    /// Protocol numbers the random messages use: the port-bearing ones,
    /// ICMP, ICMPv6, GRE and an unknown one.
    pub(crate) const PROTOS: &[u8] = &[6, 17, 33, 132, 136, 1, 58, 47, 200];

    /// A random, well-formed event in the kernel's attribute order.
    pub(crate) fn random_event(rng: &mut Rng) -> Vec<u8> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v6 = rng.chance(30);
        let addr = |rng: &mut Rng| -> IpAddr {
            if v6 {
                IpAddr::V6(Ipv6Addr::from(
                    (u128::from(rng.next()) << 64) | u128::from(rng.next()),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
            }
        };
        let (s, d, n) = (addr(rng), addr(rng), addr(rng));
        let proto = rng.pick(PROTOS);
        let has_ports = ctw_common::Protocol::from_number(proto).is_some();
        let port = |rng: &mut Rng| -> u16 {
            if rng.chance(50) {
                rng.pick(&[0, 22, 53, 80, 443, 3306, 8080, 8443, 65535])
            } else {
                rng.next() as u16
            }
        };
        let (sp, dp, np) = (port(rng), port(rng), port(rng));
        let ports = |a, b| has_ports.then_some((a, b));
        let (ty, flags) = if rng.chance(50) {
            (super::CT_NEW, super::NLM_F_CREATE | 0x200)
        } else {
            (super::CT_DELETE, 0)
        };
        let mut b = Builder::new(ty, flags, if v6 { 10 } else { 2 });
        b.tuple(super::CTA_TUPLE_ORIG, s, d, proto, ports(sp, dp));
        b.tuple(super::CTA_TUPLE_REPLY, d, n, proto, ports(dp, np));
        b.attr(super::CTA_ID, &(rng.next() as u32).to_be_bytes());
        b.attr(
            super::CTA_STATUS,
            &(rng.next() as u32 & 0x3ff).to_be_bytes(),
        );
        b.attr(7, &120u32.to_be_bytes());
        if rng.chance(30) {
            b.attr(super::CTA_MARK, &(rng.next() as u32).to_be_bytes());
        }
        if rng.chance(30) {
            b.nest(super::CTA_COUNTERS_ORIG);
            b.attr(super::CTA_COUNTERS_PACKETS, &rng.next().to_be_bytes());
            b.attr(super::CTA_COUNTERS_BYTES, &rng.next().to_be_bytes());
            b.end();
        }
        if proto == 6 {
            b.nest(super::CTA_PROTOINFO).nest(super::CTA_PROTOINFO_TCP);
            b.attr(super::CTA_PROTOINFO_TCP_STATE, &[rng.below(10) as u8]);
            b.attr(super::CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &[3, 0]);
            b.end().end();
        }
        if rng.chance(30) {
            b.attr(super::CTA_TIMESTAMP_EVENT, &rng.next().to_be_bytes());
        }
        if rng.chance(10) {
            b.attr(99, &[1, 2, 3]); // an attribute from a future kernel
        }
        b.finish()
    }

    /// A copy of `msg` with a few random corruptions: byte changes biased
    /// to the attribute headers, truncation, an inserted chunk.
    pub(crate) fn mutate(rng: &mut Rng, msg: &[u8]) -> Vec<u8> {
        let mut m = msg.to_vec();
        for _ in 0..=rng.below(3) {
            if m.is_empty() {
                break;
            }
            match rng.below(6) {
                0 | 1 => {
                    let i = rng.below(m.len() as u64) as usize;
                    m[i] = rng.next() as u8;
                }
                2 => {
                    // Small change at a likely nla_len / nla_type position.
                    let i = (rng.below(m.len() as u64) as usize) & !3;
                    let j = (i + rng.below(4) as usize).min(m.len() - 1);
                    m[j] = m[j].wrapping_add(rng.pick(&[1, 4, 0xfc, 0xff, 0x80, 0x40]));
                }
                3 => {
                    let n = rng.below(m.len() as u64) as usize;
                    m.truncate(n);
                }
                4 => {
                    let i = rng.below(m.len() as u64) as usize & !3;
                    let chunk: Vec<u8> = (0..4 * (1 + rng.below(3)))
                        .map(|_| rng.next() as u8)
                        .collect();
                    m.splice(i..i, chunk);
                }
                _ => {
                    // Keep nlmsg_len consistent so the message survives the
                    // header check and the attribute walk is exercised.
                    if m.len() >= 4 {
                        let len = m.len() as u32;
                        m[0..4].copy_from_slice(&len.to_ne_bytes());
                    }
                }
            }
        }
        m
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testutil::*;
    use super::*;
    use ctw_common::status;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn one(dgram: &[u8]) -> RawMessage<'_> {
        let mut it = messages(dgram);
        let m = it.next().unwrap().unwrap();
        assert!(it.next().is_none(), "one message per event datagram");
        assert_eq!(m.payload.len() + NLMSG_HDRLEN, dgram.len());
        m
    }

    fn conn(d: Result<Decoded, DecodeError>) -> ConnRecord {
        match d {
            Ok(Decoded::Conn(r)) => r,
            other => panic!("expected a connection, got {other:?}"),
        }
    }

    /// Expected tuples of the golden flows: the pod 198.18.0.2 (or
    /// fd00:198:18:1::2) talks to srv 198.19.0.2 (fd00:198:18:2::2); node
    /// masquerades it to 198.19.0.1 (fd00:198:18:2::1), keeping the port.
    fn expected(name: &str) -> (Protocol, Tuple, Tuple) {
        let (proto, v6, sport, dport) = match name.split('_').next().unwrap() {
            "tcp4" => (Protocol::Tcp, false, 40001, 8080),
            "udp4" => (Protocol::Udp, false, 40002, 5353),
            "tcp6" => (Protocol::Tcp, true, 40003, 8080),
            other => panic!("no expectation for {other}"),
        };
        let (pod, srv, snat) = if v6 {
            (
                ip("fd00:198:18:1::2"),
                ip("fd00:198:18:2::2"),
                ip("fd00:198:18:2::1"),
            )
        } else {
            (ip("198.18.0.2"), ip("198.19.0.2"), ip("198.19.0.1"))
        };
        (
            proto,
            Tuple {
                src: pod,
                dst: srv,
                src_port: sport,
                dst_port: dport,
            },
            Tuple {
                src: srv,
                dst: snat,
                src_port: dport,
                dst_port: sport,
            },
        )
    }

    #[test]
    fn golden_tuples_kinds_and_status() {
        for (name, _) in GOLDEN.iter().filter(|(n, _)| !n.starts_with("icmp")) {
            let (proto, orig, reply) = expected(name);
            let d = golden(name);
            assert_eq!(d.len(), 2, "{name}: NEW and DESTROY");
            let new = conn(decode(&one(&d[0].1), d[0].0));
            let destroy = conn(decode(&one(&d[1].1), d[1].0));
            for (r, kind) in [(&new, EventKind::New), (&destroy, EventKind::Destroy)] {
                assert_eq!(r.kind, kind, "{name}");
                assert_eq!(r.protocol, proto, "{name}");
                assert_eq!(r.orig, orig, "{name}");
                assert_eq!(r.reply, reply, "{name}");
                assert_eq!(r.snat(), (reply.dst, orig.src_port), "{name}");
                assert_eq!(r.zone, 0);
                assert_eq!(r.mark, 0);
                assert_ne!(r.id, 0);
                assert!(r.status & status::CONFIRMED != 0 && r.status & status::SRC_NAT != 0);
            }
            assert_eq!(new.id, destroy.id, "{name}: same conntrack entry");
            assert!(
                new.status & status::SEEN_REPLY == 0,
                "{name}: NEW is unreplied"
            );
            assert!(new.counters_orig.is_none());
            // The NEW carries no start time, only CTA_TIMESTAMP_EVENT.
            assert_eq!(new.start_ns, None, "{name}");
            assert_eq!(
                kernel_event_ns(&new, d[0].0).is_some(),
                name.contains("_ts"),
                "{name}"
            );
            if proto == Protocol::Tcp {
                assert_eq!(new.tcp_state, Some(TcpState::SynSent), "{name}");
                assert_eq!(destroy.tcp_state, Some(TcpState::TimeWait), "{name}");
                assert!(destroy.status & status::ASSURED != 0, "{name}");
                // SYN seen with window scaling / SACK: IP_CT_TCP_FLAG_WINDOW_SCALE|SACK_PERM
                assert_eq!(new.tcp_flags_orig, 0x03, "{name}");
            } else {
                assert_eq!(new.tcp_state, None);
                assert_eq!(destroy.tcp_state, None);
            }
        }
    }

    #[test]
    fn golden_plain_uses_receive_time() {
        for name in ["tcp4", "udp4", "tcp6"] {
            for (recv_ns, bytes) in golden(name) {
                let r = conn(decode(&one(&bytes), recv_ns));
                assert_eq!(r.event_ns, recv_ns, "{name}: no kernel timestamp");
                assert!(r.start_ns.is_none() && r.stop_ns.is_none());
                assert!(r.counters_orig.is_none() && r.counters_reply.is_none());
            }
        }
    }

    #[test]
    fn golden_tcp4_timestamps_and_counters() {
        let d = golden("tcp4_ts_acct");
        let new = conn(decode(&one(&d[0].1), d[0].0));
        // CTA_TIMESTAMP_EVENT, the last attribute of the NEW event
        assert_eq!(new.event_ns, 0x18ea_3c11_8c8b_56a0);
        assert_eq!(new.id, 0x26b3_6f24);
        assert_eq!(new.status, 0x198);
        let destroy = conn(decode(&one(&d[1].1), d[1].0));
        assert_eq!(destroy.event_ns, 0x18ea_3c11_8d21_c0ad);
        assert_eq!(destroy.start_ns, Some(0x18ea_3c11_8c8b_9d44));
        assert_eq!(destroy.stop_ns, Some(0x18ea_3c11_8d21_bf7a));
        assert_eq!(destroy.status, 0x39e);
        assert_eq!(
            destroy.counters_orig,
            Some(Counters {
                packets: 6,
                bytes: 399
            })
        );
        assert_eq!(
            destroy.counters_reply,
            Some(Counters {
                packets: 6,
                bytes: 1136
            })
        );
        // The event time of NEW lies between the start and the stop.
        assert!(destroy.start_ns.unwrap() <= new.event_ns + 1_000_000);
        assert!(new.event_ns < destroy.stop_ns.unwrap());
    }

    #[test]
    fn golden_ts_acct_all_flows() {
        for name in ["tcp4_ts_acct", "udp4_ts_acct", "tcp6_ts_acct"] {
            let d = golden(name);
            let new = conn(decode(&one(&d[0].1), d[0].0));
            let destroy = conn(decode(&one(&d[1].1), d[1].0));
            assert_ne!(new.event_ns, d[0].0, "{name}: kernel event time used");
            assert!(
                destroy.start_ns.is_some() && destroy.stop_ns.is_some(),
                "{name}"
            );
            assert!(destroy.stop_ns >= destroy.start_ns, "{name}");
            let c = destroy.counters_orig.unwrap();
            assert!(c.packets >= 1 && c.bytes >= 28, "{name}: {c:?}");
            assert!(destroy.counters_reply.is_some(), "{name}");
            // Kernel time and the agent's receive time agree within a second.
            assert!(new.event_ns.abs_diff(d[0].0) < 1_000_000_000, "{name}");
        }
    }

    /// `zone7_tcp4.events.txt`: `[NEW] ipv4 2 tcp 6 120 SYN_SENT
    /// src=198.18.0.2 dst=198.19.0.2 sport=40011 dport=8080 [UNREPLIED]
    /// src=198.19.0.2 dst=198.19.0.1 sport=8080 dport=40011 zone=7
    /// id=3331928233` (timestamps off).
    #[test]
    fn golden_zone7_entry() {
        let d = golden("zone7_tcp4");
        assert_eq!(d.len(), 1);
        let r = conn(decode(&one(&d[0].1), d[0].0));
        assert_eq!(r.kind, EventKind::New);
        assert_eq!(r.zone, 7);
        assert_eq!(r.id, 3_331_928_233);
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(
            r.orig,
            Tuple::new(ip("198.18.0.2"), 40011, ip("198.19.0.2"), 8080)
        );
        assert_eq!(
            r.reply,
            Tuple::new(ip("198.19.0.2"), 8080, ip("198.19.0.1"), 40011)
        );
        assert_eq!(r.tcp_state, Some(TcpState::SynSent));
        assert_eq!(r.status & status::SEEN_REPLY, 0, "[UNREPLIED]");
        assert_eq!(r.event_ns, d[0].0, "no timestamps: receive time");
        assert_eq!(kernel_event_ns(&r, d[0].0), None);
        // A dump or GET answer with the same bytes says the same zone.
        assert_eq!(conn(decode_entry(&one(&d[0].1), 1)).zone, 7);
    }

    /// `tcp4_expire.events.txt`: `[NEW] ... sport=40012 dport=8080
    /// [UNREPLIED] ... id=2595743943` and `[DESTROY] ipv4 2 tcp 6 TIME_WAIT
    /// src=198.18.0.2 dst=198.19.0.2 sport=40012 dport=8080 packets=6
    /// bytes=399 src=198.19.0.2 dst=198.19.0.1 sport=8080 dport=40012
    /// packets=6 bytes=1518 [ASSURED] delta-time=1 id=2595743943`
    /// (`nf_conntrack_timestamp=1`, `nf_conntrack_acct=1`,
    /// `nf_conntrack_tcp_timeout_time_wait=1`).
    #[test]
    fn golden_new_event_time_and_kernel_destroy() {
        let d = golden("tcp4_expire");
        let new = conn(decode(&one(&d[0].1), d[0].0));
        let destroy = conn(decode(&one(&d[1].1), d[1].0));
        // NEW: CTA_TIMESTAMP_EVENT (27, last attribute), no CTA_TIMESTAMP.
        assert_eq!(new.event_ns, 0x18ec_ced3_bbdd_6f39);
        assert_eq!((new.start_ns, new.stop_ns), (None, None));
        assert_eq!(kernel_event_ns(&new, d[0].0), Some(new.event_ns));
        assert!(new.event_ns < d[0].0, "the kernel's time precedes the read");
        assert_eq!(new.id, 2_595_743_943);
        assert_eq!(new.tcp_state, Some(TcpState::SynSent));
        // DESTROY by the garbage collector: start, stop and event time.
        assert_eq!(destroy.kind, EventKind::Destroy);
        assert_eq!(destroy.id, new.id);
        assert_eq!(destroy.start_ns, Some(0x18ec_ced3_bbdd_be3f));
        assert_eq!(destroy.stop_ns, Some(0x18ec_ced3_f7f2_6901));
        assert_eq!(destroy.event_ns, 0x18ec_ced3_f86c_7e2d);
        assert_eq!(kernel_event_ns(&destroy, d[1].0), Some(destroy.event_ns));
        // The NEW's event time is within microseconds of the kernel start.
        assert!(new.event_ns.abs_diff(destroy.start_ns.unwrap()) < 1_000_000);
        // delta-time=1: TIME_WAIT was 1 s; the GC found it 8 ms later.
        let lived = destroy.stop_ns.unwrap() - destroy.start_ns.unwrap();
        assert!((1_000_000_000..1_100_000_000).contains(&lived), "{lived}");
        assert!(destroy.event_ns > destroy.stop_ns.unwrap());
        // Protoinfo with the state only: no flags.
        assert_eq!(destroy.tcp_state, Some(TcpState::TimeWait));
        assert_eq!((destroy.tcp_flags_orig, destroy.tcp_flags_reply), (0, 0));
        assert_eq!(
            destroy.counters_orig,
            Some(Counters {
                packets: 6,
                bytes: 399
            })
        );
        assert_eq!(
            destroy.counters_reply,
            Some(Counters {
                packets: 6,
                bytes: 1518
            })
        );
        assert!(destroy.status & status::ASSURED != 0);
    }

    /// `nat_clash_udp4.events.txt`: the winner's `[NEW] ipv4 2 udp 17 1
    /// src=198.18.0.2 dst=198.19.0.100 sport=20001 dport=5353 [UNREPLIED]
    /// src=198.19.0.2 dst=198.19.0.1 sport=5353 dport=20001 id=357113252`,
    /// then the shadow's `[DESTROY] ipv4 2 udp 17 src=198.18.0.2
    /// dst=198.19.0.100 sport=20001 dport=5353 [UNREPLIED] src=198.19.0.3
    /// dst=198.19.0.1 sport=5353 dport=20001 id=1599356118`: another id,
    /// the other backend, and no NEW of its own.
    #[test]
    fn golden_nat_clash_destroy() {
        let d = golden("nat_clash_udp4");
        let r = conn(decode(&one(&d[0].1), d[0].0));
        assert_eq!(r.kind, EventKind::Destroy);
        assert!(r.nat_clash(), "status {:#x}", r.status);
        assert_eq!(r.status, 0x17b8);
        assert_eq!(r.id, 1_599_356_118);
        assert_ne!(r.id, 357_113_252, "not the winner's id");
        assert_eq!(r.protocol, Protocol::Udp);
        assert_eq!(
            r.orig,
            Tuple::new(ip("198.18.0.2"), 20001, ip("198.19.0.100"), 5353)
        );
        assert_eq!(
            r.reply,
            Tuple::new(ip("198.19.0.3"), 5353, ip("198.19.0.1"), 20001)
        );
        assert_eq!(r.tcp_state, None);
        assert_eq!((r.start_ns, r.stop_ns), (None, None));
        assert_eq!(r.event_ns, d[0].0);
        // Kept by a filter on the original destination port like any UDP
        // record: the capture loop decides what a shadow means.
        assert!(crate::filter::Filter::new(&[5353], &[]).keeps(&r));
    }

    /// An ICMP echo NEW never stops the decoding of the messages around it:
    /// it is `NoPorts` (counted as filtered by the capture loop), never an
    /// error.
    #[test]
    fn icmp_between_port_entries_loses_nothing() {
        let icmp = golden("icmp4");
        let tcp = golden("tcp4");
        let mut dgram = tcp[0].1.clone();
        dgram.extend_from_slice(&icmp[0].1);
        dgram.extend_from_slice(&tcp[1].1);
        let got: Vec<Decoded> = messages(&dgram)
            .map(|m| decode(&m.unwrap(), 5).unwrap())
            .collect();
        assert_eq!(got.len(), 3);
        assert!(matches!(got[0], Decoded::Conn(r) if r.kind == EventKind::New));
        assert_eq!(got[1], Decoded::NoPorts);
        assert!(matches!(got[2], Decoded::Conn(r) if r.kind == EventKind::Destroy));
        // Whatever port is watched, ICMP never matches one.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let f = crate::filter::Filter::new(&all, &[])
            .with_match(&[crate::filter::Match::Original, crate::filter::Match::Reply]);
        let prog = crate::netlink::bpf::build(&f);
        for d in &icmp {
            assert_eq!(
                crate::netlink::bpf::run(&prog, &d.1),
                crate::netlink::bpf::DROP
            );
        }
    }

    #[test]
    fn golden_icmp_has_no_ports() {
        let d = golden("icmp4");
        assert_eq!(decode(&one(&d[0].1), d[0].0), Ok(Decoded::NoPorts));
        assert_eq!(decode(&one(&d[1].1), d[1].0), Ok(Decoded::NoPorts));
        assert_eq!(decode_entry(&one(&d[0].1), d[0].0), Ok(Decoded::NoPorts));
    }

    #[test]
    fn golden_destroy_from_conntrack_delete_carries_requester_pid() {
        // The DESTROY events were caused by `conntrack -D`: the kernel puts
        // the requester's port id into the header. decode ignores it.
        for (name, _, bytes) in all_golden() {
            let m = one(&bytes);
            // The issue-11 DESTROY events come from the kernel itself
            // (expiry, clash shadow): port id 0.
            let by_kernel = GOLDEN_ISSUE11.iter().any(|(n, _)| *n == name);
            if m.msg_type == CT_DELETE && by_kernel {
                assert_eq!((m.pid, m.flags), (0, 0), "{name}");
            } else if m.msg_type == CT_DELETE {
                assert_ne!(m.pid, 0, "{name}");
                assert_eq!(m.flags, 0, "{name}");
            } else {
                assert_eq!(m.msg_type, CT_NEW, "{name}");
                assert_eq!(m.flags, NLM_F_CREATE | 0x200, "{name}: NEW|EXCL");
            }
        }
    }

    /// The tuples netlink-packet-netfilter parses from the same bytes.
    /// (src, dst, protocol number, src port, dst port) of one tuple.
    type FlatTuple = (IpAddr, IpAddr, u8, Option<u16>, Option<u16>);

    fn nlpf_tuples(m: &RawMessage<'_>) -> Vec<FlatTuple> {
        use netlink_packet_core::ParseableParametrized;
        use netlink_packet_netfilter::conntrack::{
            ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as T,
        };
        use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
        let msg = NetfilterMessage::parse_with_param(m.payload, m.msg_type).unwrap();
        let attrs = match msg.inner {
            NetfilterMessageInner::Conntrack(
                ConntrackMessage::New(a) | ConntrackMessage::Delete(a),
            ) => a,
            other => panic!("unexpected {other:?}"),
        };
        let mut out = Vec::new();
        for a in attrs {
            let tuple = match a {
                ConntrackAttribute::CtaTupleOrig(t) | ConntrackAttribute::CtaTupleReply(t) => t,
                _ => continue,
            };
            let (mut s, mut d, mut p, mut sp, mut dp) = (None, None, 0, None, None);
            for t in tuple {
                match t {
                    T::Ip(ips) => {
                        for i in ips {
                            match i {
                                IPTuple::SourceAddress(a) => s = Some(a),
                                IPTuple::DestinationAddress(a) => d = Some(a),
                                _ => {}
                            }
                        }
                    }
                    T::Proto(ps) => {
                        for x in ps {
                            match x {
                                ProtoTuple::Protocol(n) => p = u8::from(n),
                                ProtoTuple::SourcePort(v) => sp = Some(v),
                                ProtoTuple::DestinationPort(v) => dp = Some(v),
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push((s.unwrap(), d.unwrap(), p, sp, dp));
        }
        out
    }

    #[test]
    fn golden_tuples_match_netlink_packet_netfilter() {
        for (name, recv_ns, bytes) in all_golden() {
            let m = one(&bytes);
            let theirs = nlpf_tuples(&m);
            assert_eq!(theirs.len(), 2, "{name}");
            match decode(&m, recv_ns).unwrap() {
                Decoded::Conn(r) => {
                    let n = r.protocol.number();
                    let ours = vec![
                        (
                            r.orig.src,
                            r.orig.dst,
                            n,
                            Some(r.orig.src_port),
                            Some(r.orig.dst_port),
                        ),
                        (
                            r.reply.src,
                            r.reply.dst,
                            n,
                            Some(r.reply.src_port),
                            Some(r.reply.dst_port),
                        ),
                    ];
                    assert_eq!(ours, theirs, "{name}");
                }
                Decoded::NoPorts => assert_eq!(theirs[0].2, 1, "{name}: icmp"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn round_trip_from_netlink_packet_netfilter_emitter() {
        use netlink_packet_core::Emitable;
        use netlink_packet_netfilter::conntrack::{
            ConntrackAttribute as A, ConntrackMessage, IPTuple, ProtoTuple, Protocol as P,
            Tuple as T,
        };
        use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
        let mut rng = Rng::seeded(0x1234_5678_9abc_def1);
        for _ in 0..500 {
            let v6 = rng.chance(50);
            let addr = |rng: &mut Rng| -> IpAddr {
                if v6 {
                    IpAddr::V6(((u128::from(rng.next()) << 64) | u128::from(rng.next())).into())
                } else {
                    IpAddr::V4((rng.next() as u32).into())
                }
            };
            let proto = rng.pick(&Protocol::ALL);
            let orig = Tuple {
                src: addr(&mut rng),
                dst: addr(&mut rng),
                src_port: rng.next() as u16,
                dst_port: rng.next() as u16,
            };
            let reply = Tuple {
                src: orig.dst,
                dst: addr(&mut rng),
                src_port: orig.dst_port,
                dst_port: rng.next() as u16,
            };
            let mark = rng.next() as u32;
            let st = rng.next() as u32 & 0x3ff;
            let tuple = |t: &Tuple| {
                vec![
                    T::Ip(vec![
                        IPTuple::SourceAddress(t.src),
                        IPTuple::DestinationAddress(t.dst),
                    ]),
                    T::Proto(vec![
                        ProtoTuple::Protocol(P::from(proto.number())),
                        ProtoTuple::SourcePort(t.src_port),
                        ProtoTuple::DestinationPort(t.dst_port),
                    ]),
                ]
            };
            let attrs = vec![
                A::CtaTupleOrig(tuple(&orig)),
                A::CtaTupleReply(tuple(&reply)),
                A::CtaStatus(netlink_packet_netfilter::conntrack::Status::from_bits_retain(st)),
                A::CtaMark(mark),
                A::CtaTimeout(30),
            ];
            let delete = rng.chance(50);
            let inner = if delete {
                ConntrackMessage::Delete(attrs)
            } else {
                ConntrackMessage::New(attrs)
            };
            let fam = if v6 {
                NetfilterProtoFamily::IPv6
            } else {
                NetfilterProtoFamily::IPv4
            };
            let nf = NetfilterMessage::new(NetfilterHeader::new(fam, 0, 0), inner);
            let mut payload = vec![0; nf.buffer_len()];
            nf.emit(&mut payload);
            let (ty, flags) = if delete {
                (CT_DELETE, 0)
            } else {
                (CT_NEW, NLM_F_CREATE)
            };
            let mut dgram = Vec::new();
            dgram.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
            dgram.extend_from_slice(&ty.to_ne_bytes());
            dgram.extend_from_slice(&flags.to_ne_bytes());
            dgram.extend_from_slice(&[0; 8]);
            dgram.extend_from_slice(&payload);
            let r = conn(decode(&one(&dgram), 42));
            assert_eq!(
                r.kind,
                if delete {
                    EventKind::Destroy
                } else {
                    EventKind::New
                }
            );
            assert_eq!((r.protocol, r.orig, r.reply), (proto, orig, reply));
            assert_eq!((r.mark, r.status, r.event_ns, r.id), (mark, st, 42, 0));
        }
    }

    #[test]
    fn update_and_dump_entries() {
        let d = golden("tcp4_ts_acct");
        let mut bytes = d[0].1.clone();
        // Clear NLM_F_CREATE|NLM_F_EXCL: what an UPDATE event or a dump
        // entry looks like.
        bytes[6..8].copy_from_slice(&0u16.to_ne_bytes());
        let m = one(&bytes);
        assert_eq!(decode(&m, 7), Ok(Decoded::Update));
        let r = conn(decode_entry(&m, 7));
        assert_eq!(r.kind, EventKind::Recovered);
        // An event timestamp still wins; without one the receive time is used.
        assert_eq!(r.event_ns, 0x18ea_3c11_8c8b_56a0);
        let plain = golden("tcp4");
        let mut bytes = plain[0].1.clone();
        bytes[6..8].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(conn(decode_entry(&one(&bytes), 7)).event_ns, 7);
        // A NEW event decoded as an entry is Recovered too.
        assert_eq!(
            conn(decode_entry(&one(&plain[0].1), 7)).kind,
            EventKind::Recovered
        );
        // DESTROY is the same through both.
        let del = one(&plain[1].1);
        assert_eq!(decode(&del, 7), decode_entry(&del, 7));
    }

    #[test]
    fn destroy_event_time_falls_back_to_stop() {
        let d = golden("tcp4_ts_acct");
        let mut bytes = d[1].1.clone();
        // Drop the trailing CTA_TIMESTAMP_EVENT (12 bytes): the event time
        // is then CTA_TIMESTAMP_STOP.
        bytes.truncate(bytes.len() - 12);
        let len = bytes.len() as u32;
        bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        let r = conn(decode(&one(&bytes), 1));
        assert_eq!(r.event_ns, 0x18ea_3c11_8d21_bf7a);
        assert_eq!(r.stop_ns, Some(r.event_ns));
        // A NEW built by hand with CTA_TIMESTAMP START and no event time.
        let mut b = Builder::new(CT_NEW, NLM_F_CREATE, 2);
        b.tuple(
            CTA_TUPLE_ORIG,
            ip("198.18.0.2"),
            ip("198.19.0.2"),
            6,
            Some((1, 2)),
        );
        b.tuple(
            CTA_TUPLE_REPLY,
            ip("198.19.0.2"),
            ip("198.19.0.1"),
            6,
            Some((2, 1)),
        );
        b.nest(CTA_TIMESTAMP)
            .attr(CTA_TIMESTAMP_START, &99u64.to_be_bytes())
            .end();
        let bytes = b.finish();
        assert_eq!(conn(decode(&one(&bytes), 1)).event_ns, 99);
    }

    #[test]
    fn control_messages() {
        let msg = |ty: u16, payload: &[u8]| {
            let mut v = Vec::new();
            v.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
            v.extend_from_slice(&ty.to_ne_bytes());
            v.extend_from_slice(&[0; 10]);
            v.extend_from_slice(payload);
            v
        };
        let mut err = (-libc::ENOENT).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]);
        let cases = [
            (msg(NLMSG_ERROR, &err), Ok(Decoded::Error(libc::ENOENT))),
            (msg(NLMSG_ERROR, &[0; 20]), Ok(Decoded::Error(0))),
            (msg(NLMSG_DONE, &[0; 4]), Ok(Decoded::Done)),
            (msg(NLMSG_OVERRUN, &[]), Ok(Decoded::Overrun)),
            (msg(NLMSG_NOOP, &[]), Ok(Decoded::Other(NLMSG_NOOP))),
            (msg(0x101, &[0; 4]), Ok(Decoded::Other(0x101))),
            (msg(0x0a00, &[0; 4]), Ok(Decoded::Other(0x0a00))),
            (
                msg(NLMSG_ERROR, &[1, 2]),
                Err(DecodeError::Truncated {
                    what: "nlmsgerr",
                    need: 4,
                    have: 2,
                }),
            ),
            (
                msg(CT_DELETE, &[2, 0]),
                Err(DecodeError::Truncated {
                    what: "nfgenmsg",
                    need: 4,
                    have: 2,
                }),
            ),
        ];
        for (bytes, want) in cases {
            let m = one(&bytes);
            assert_eq!(decode(&m, 0), want);
            assert_eq!(decode_entry(&m, 0), want);
        }
        let min = msg(NLMSG_ERROR, &i32::MIN.to_ne_bytes());
        assert_eq!(decode(&one(&min), 0), Ok(Decoded::Error(i32::MAX)));
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let g = all_golden();
        let mut dgram = Vec::new();
        for (_, _, b) in &g {
            dgram.extend_from_slice(b);
        }
        let msgs: Vec<_> = messages(&dgram).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), g.len());
        for (m, (_, _, b)) in msgs.iter().zip(&g) {
            assert_eq!(m.payload, &b[16..]);
        }
        // A message length that is not a multiple of 4 is padded.
        let mut b = Builder::new(NLMSG_DONE, 0, 0);
        b.buf.push(9);
        let mut odd = b.finish();
        assert_eq!(odd.len(), 21);
        odd.extend_from_slice(&[0, 0, 0]);
        odd.extend_from_slice(&g[0].2);
        let kinds: Vec<_> = messages(&odd).map(|m| m.unwrap().msg_type).collect();
        assert_eq!(kinds, vec![NLMSG_DONE, CT_NEW]);
    }

    #[test]
    fn garbled_headers_yield_one_error_and_stop() {
        let g = golden("tcp4");
        let mut dgram = g[0].1.clone();
        dgram.extend_from_slice(&[1, 2, 3]);
        let v: Vec<_> = messages(&dgram).collect();
        assert_eq!(v.len(), 2);
        assert!(v[0].is_ok());
        assert_eq!(v[1], Err(DecodeError::TruncatedHeader { have: 3 }));

        let mut dgram = g[0].1.clone();
        dgram[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        dgram.extend_from_slice(&g[1].1);
        let v: Vec<_> = messages(&dgram).collect();
        assert_eq!(
            v,
            vec![Err(DecodeError::BadMessageLength {
                len: 1000,
                available: g[0].1.len() + g[1].1.len()
            })]
        );
        let mut short = g[0].1.clone();
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(messages(&short).count(), 1);
        assert!(messages(&short).next().unwrap().is_err());
        assert_eq!(messages(&[]).count(), 0);
    }

    fn expect_err(bytes: &[u8], want: DecodeError) {
        assert_eq!(decode(&one(bytes), 0), Err(want));
        assert!(!want.to_string().is_empty());
    }

    #[test]
    fn malformed_attributes_are_errors() {
        let v4 = |s| ip(s);
        // Missing reply tuple.
        let mut b = Builder::new(CT_NEW, NLM_F_CREATE, 2);
        b.tuple(
            CTA_TUPLE_ORIG,
            v4("198.18.0.2"),
            v4("198.19.0.2"),
            6,
            Some((1, 2)),
        );
        expect_err(&b.finish(), DecodeError::Missing("CTA_TUPLE_REPLY"));
        // Missing orig tuple.
        let mut b = Builder::new(CT_DELETE, 0, 2);
        b.tuple(
            CTA_TUPLE_REPLY,
            v4("198.18.0.2"),
            v4("198.19.0.2"),
            6,
            Some((1, 2)),
        );
        expect_err(&b.finish(), DecodeError::Missing("CTA_TUPLE_ORIG"));
        // Duplicate orig tuple.
        let mut b = Builder::new(CT_DELETE, 0, 2);
        b.tuple(
            CTA_TUPLE_ORIG,
            v4("198.18.0.2"),
            v4("198.19.0.2"),
            6,
            Some((1, 2)),
        );
        b.tuple(
            CTA_TUPLE_ORIG,
            v4("198.18.0.2"),
            v4("198.19.0.2"),
            6,
            Some((1, 3)),
        );
        expect_err(&b.finish(), DecodeError::Duplicate("CTA_TUPLE_ORIG"));
        // Wrong-size address.
        let mut b = Builder::new(CT_NEW, NLM_F_CREATE, 2);
        b.nest(CTA_TUPLE_ORIG).nest(CTA_TUPLE_IP);
        b.attr(CTA_IP_V4_SRC, &[198, 18, 0]).end().end();
        expect_err(
            &b.finish(),
            DecodeError::WrongSize {
                attr: "original source address",
                len: 3,
                expected: 4,
            },
        );
        // Wrong-size port.
        let mut b = Builder::new(CT_NEW, NLM_F_CREATE, 2);
        b.nest(CTA_TUPLE_ORIG).nest(CTA_TUPLE_PROTO);
        b.attr(CTA_PROTO_DST_PORT, &[0, 80, 0]).end().end();
        expect_err(
            &b.finish(),
            DecodeError::WrongSize {
                attr: "original destination port",
                len: 3,
                expected: 2,
            },
        );
        // Missing port on a protocol that has ports.
        let mut b = Builder::new(CT_NEW, NLM_F_CREATE, 2);
        b.tuple(CTA_TUPLE_ORIG, v4("198.18.0.2"), v4("198.19.0.2"), 17, None);
        b.tuple(
            CTA_TUPLE_REPLY,
            v4("198.19.0.2"),
            v4("198.19.0.1"),
            17,
            None,
        );
        expect_err(&b.finish(), DecodeError::Missing("original source port"));
        // Mixed families.
        let mut b = Builder::new(CT_NEW, NLM_F_CREATE, 2);
        b.nest(CTA_TUPLE_ORIG).nest(CTA_TUPLE_IP);
        b.attr(CTA_IP_V4_SRC, &[198, 18, 0, 2]);
        b.attr(CTA_IP_V6_DST, &[0xfd; 16]).end().end();
        b.tuple(
            CTA_TUPLE_REPLY,
            v4("198.19.0.2"),
            v4("198.19.0.1"),
            6,
            Some((2, 1)),
        );
        expect_err(&b.finish(), DecodeError::MixedFamilies("CTA_TUPLE_ORIG"));
        // A nested length that runs past its parent.
        let g = golden("tcp4");
        let mut bytes = g[0].1.clone();
        // CTA_TUPLE_IP (at 24) claims 0x40 bytes inside a 0x34-byte tuple.
        bytes[24] = 0x40;
        expect_err(
            &bytes,
            DecodeError::AttrOverrun {
                parent: "CTA_TUPLE_ORIG",
                len: 0x40,
                room: 0x30,
            },
        );
        // A length below the header size.
        let mut bytes = g[0].1.clone();
        bytes[20] = 2;
        expect_err(
            &bytes,
            DecodeError::AttrTooShort {
                parent: "message",
                len: 2,
            },
        );
    }

    #[test]
    fn unknown_attributes_and_flags_are_skipped() {
        let mut b = Builder::new(CT_NEW, NLM_F_CREATE, 10);
        b.attr(200, &[1, 2, 3, 4, 5]);
        b.tuple(
            CTA_TUPLE_ORIG,
            ip("fd00:198:18:1::2"),
            ip("fd00:198:18:2::2"),
            132,
            Some((5, 6)),
        );
        b.nest(CTA_TUPLE_REPLY);
        b.attr(0x3ff, &[]); // unknown, inside a tuple
        b.nest(CTA_TUPLE_IP)
            .attr(CTA_IP_V6_SRC, &[0xfd; 16])
            .attr(CTA_IP_V6_DST, &[0xfe; 16]);
        b.end();
        // NLA_F_NET_BYTEORDER on a type is masked off.
        b.nest(CTA_TUPLE_PROTO).attr(CTA_PROTO_NUM | 0x4000, &[132]);
        b.attr(CTA_PROTO_SRC_PORT, &6u16.to_be_bytes())
            .attr(CTA_PROTO_DST_PORT, &5u16.to_be_bytes());
        b.end().end();
        b.attr(CTA_ZONE, &7u16.to_be_bytes());
        b.attr(CTA_TIMESTAMP_EVENT + 10, &[0; 8]);
        let r = conn(decode(&one(&b.finish()), 5));
        assert_eq!(r.protocol, Protocol::Sctp);
        assert_eq!((r.orig.dst_port, r.reply.dst_port, r.zone), (6, 5, 7));
        assert_eq!(r.reply.src, ip("fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd"));
    }

    #[test]
    fn truncations_and_corruptions_never_panic() {
        let mut rng = Rng::seeded(0x9e37_79b9_7f4a_7c15);
        let mut inputs: Vec<Vec<u8>> = all_golden().into_iter().map(|g| g.2).collect();
        for _ in 0..200 {
            inputs.push(random_event(&mut rng));
        }
        let (mut ok, mut err) = (0, 0);
        for base in &inputs {
            // Every truncation, with nlmsg_len following it.
            for n in 0..base.len() {
                let mut b = base[..n].to_vec();
                if n >= 4 {
                    b[0..4].copy_from_slice(&(n as u32).to_ne_bytes());
                }
                for m in messages(&b) {
                    match m.and_then(|m| decode(&m, 0)) {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            assert!(!e.to_string().is_empty());
                            err += 1;
                        }
                    }
                }
            }
            for _ in 0..50 {
                let b = mutate(&mut rng, base);
                for m in messages(&b) {
                    let _ = m.and_then(|m| decode(&m, 0));
                    if let Ok(m) = m {
                        let _ = decode_entry(&m, 0);
                    }
                }
            }
        }
        assert!(ok > 0 && err > 0);
    }

    #[test]
    fn random_events_decode() {
        let mut rng = Rng::seeded(7);
        for _ in 0..2000 {
            let bytes = random_event(&mut rng);
            let m = one(&bytes);
            match decode(&m, 0).unwrap() {
                Decoded::Conn(r) => assert!(Protocol::ALL.contains(&r.protocol)),
                Decoded::NoPorts => {}
                other => panic!("{other:?}"),
            }
        }
    }
}

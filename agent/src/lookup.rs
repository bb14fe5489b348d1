//! Live lookup of one conntrack entry by five-tuple, with a netlink GET (not a
//! table scan), and the seed's JSON answer shape.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ctw_common::{ConnRecord, Protocol, Tuple};
use serde::Serialize;

use crate::netlink::decode::{self, Decoded};
use crate::netlink::request::{self, TupleDir};
use crate::netlink::socket::RequestSocket;

/// A validated lookup request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupQuery {
    pub protocol: Protocol,
    pub tuple: Tuple,
    pub dir: TupleDir,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error("kernel refused the lookup: {0}")]
    Kernel(std::io::Error),
    #[error("malformed reply: {0}")]
    Malformed(String),
}

/// Ask the kernel for the entry; `Ok(None)` when there is none.
pub fn lookup(q: &LookupQuery) -> Result<Option<ConnRecord>, LookupError> {
    let mut sock = RequestSocket::open(Duration::from_secs(2)).map_err(LookupError::Netlink)?;
    sock.send(&request::get(q.protocol, &q.tuple, q.dir, 1))
        .map_err(LookupError::Netlink)?;
    let mut found = None;
    loop {
        let recv_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let dgram = sock.recv().map_err(LookupError::Netlink)?;
        for msg in decode::messages(dgram) {
            let msg = msg.map_err(|e| LookupError::Malformed(e.to_string()))?;
            match decode::decode_entry(&msg, recv_ns)
                .map_err(|e| LookupError::Malformed(e.to_string()))?
            {
                Decoded::Conn(r) => found = Some(r),
                // The ack closes the answer.
                Decoded::Error(0) | Decoded::Done => return Ok(found),
                Decoded::Error(e) if e == libc::ENOENT => return Ok(None),
                Decoded::Error(e) => {
                    return Err(LookupError::Kernel(std::io::Error::from_raw_os_error(e)))
                }
                _ => {}
            }
        }
    }
}

/// One direction in the seed's JSON.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TupleJson {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl From<&Tuple> for TupleJson {
    fn from(t: &Tuple) -> Self {
        TupleJson {
            src: t.src,
            dst: t.dst,
            src_port: t.src_port,
            dst_port: t.dst_port,
        }
    }
}

/// The seed's answer (`status`, `origin`, `reply`) plus the agent's extras.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct LookupAnswer {
    /// TCP: the conntrack state as found (`ESTABLISHED`, `SYN_SENT`, ...).
    /// Other protocols: `ASSURED`, `REPLIED` or `UNREPLIED`.
    pub status: String,
    pub origin: TupleJson,
    pub reply: TupleJson,
    pub protocol: Protocol,
    pub snat_ip: IpAddr,
    pub snat_port: u16,
    pub flags: Vec<&'static str>,
    pub id: u32,
    pub zone: u16,
    pub mark: u32,
    pub node: String,
}

impl LookupAnswer {
    pub fn new(r: &ConnRecord, node: &str) -> LookupAnswer {
        let status = match r.tcp_state {
            Some(s) => s.name().to_string(),
            None if r.status & ctw_common::status::ASSURED != 0 => "ASSURED".into(),
            None if r.status & ctw_common::status::SEEN_REPLY != 0 => "REPLIED".into(),
            None => "UNREPLIED".into(),
        };
        let (snat_ip, snat_port) = r.snat();
        LookupAnswer {
            status,
            origin: (&r.orig).into(),
            reply: (&r.reply).into(),
            protocol: r.protocol,
            snat_ip,
            snat_port,
            flags: r.flag_names(),
            id: r.id,
            zone: r.zone,
            mark: r.mark,
            node: node.to_string(),
        }
    }
}

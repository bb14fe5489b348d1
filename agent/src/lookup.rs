//! Live lookup of one conntrack entry by five-tuple, with a netlink GET (not a
//! table scan), and the seed's JSON answer shape.

use std::time::Duration;

use ctw_common::{ConnRecord, Protocol, Tuple};

use crate::netlink::decode::{self, Decoded};
use crate::netlink::request::{self, TupleDir};
use crate::netlink::socket::RequestSocket;

/// A validated lookup request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupQuery {
    pub protocol: Protocol,
    /// The tuple to look for, in direction `dir`.
    pub tuple: Tuple,
    pub dir: TupleDir,
    /// Conntrack zone to look in (`CTA_ZONE`); the kernel finds an entry
    /// only in the zone named, 0 when none is given.
    pub zone: u16,
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
    sock.send(&request::get(q.protocol, &q.tuple, q.dir, q.zone, 1))
        .map_err(LookupError::Netlink)?;
    let mut found = None;
    loop {
        let recv_ns = ctw_common::now_ns();
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

pub use ctw_common::api::{LookupAnswer, TupleJson};

//! The event filter in user space: which protocol and original destination
//! port the agent keeps.
//!
//! Invariant: [`Filter::keeps`] has exactly the semantics of the kernel-side
//! BPF program built by [`crate::netlink::bpf::build`] from the same filter;
//! the BPF program may only pass *more* (it fails open on layouts it does not
//! recognise), never less.

use ctw_common::{ConnRecord, Protocol};

/// Ports and protocols to keep. Cheap to copy into the capture thread.
#[derive(Clone, PartialEq, Eq)]
pub struct Filter {
    ports: Box<[u64; 1024]>,
    port_list: Vec<u16>,
    protocols: Vec<Protocol>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("ports", &self.port_list)
            .field("protocols", &self.protocols)
            .finish()
    }
}

impl Filter {
    /// `protocols` empty means every protocol that has ports.
    pub fn new(ports: &[u16], protocols: &[Protocol]) -> Filter {
        let mut bits = Box::new([0u64; 1024]);
        let mut port_list: Vec<u16> = ports.to_vec();
        port_list.sort_unstable();
        port_list.dedup();
        for &p in &port_list {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        let mut protocols: Vec<Protocol> = if protocols.is_empty() {
            Protocol::ALL.to_vec()
        } else {
            protocols.to_vec()
        };
        protocols.sort_unstable();
        protocols.dedup();
        Filter {
            ports: bits,
            port_list,
            protocols,
        }
    }

    /// Sorted, deduplicated watched ports.
    pub fn ports(&self) -> &[u16] {
        &self.port_list
    }

    /// Sorted, deduplicated kept protocols (all port-bearing ones by default).
    pub fn protocols(&self) -> &[Protocol] {
        &self.protocols
    }

    pub fn keeps_port(&self, port: u16) -> bool {
        self.ports[(port / 64) as usize] & (1 << (port % 64)) != 0
    }

    pub fn keeps_protocol(&self, p: Protocol) -> bool {
        self.protocols.contains(&p)
    }

    /// Keep a record when its protocol is kept and its original destination
    /// port is watched.
    pub fn keeps(&self, r: &ConnRecord) -> bool {
        self.keeps_protocol(r.protocol) && self.keeps_port(r.orig.dst_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_protocols() {
        let f = Filter::new(&[443, 80, 80, 0, 65535], &[]);
        assert_eq!(f.ports(), &[0, 80, 443, 65535]);
        assert!(f.keeps_port(80) && f.keeps_port(443) && f.keeps_port(65535) && f.keeps_port(0));
        assert!(!f.keeps_port(81) && !f.keeps_port(8080));
        assert_eq!(f.protocols().len(), 5);
        let g = Filter::new(&[53], &[Protocol::Udp]);
        assert!(g.keeps_protocol(Protocol::Udp) && !g.keeps_protocol(Protocol::Tcp));
    }
}

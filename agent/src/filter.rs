//! The event filter in user space: which protocol and watched port the agent
//! keeps, and the marks it puts on kept records (`pod_cidrs`).
//!
//! A record is kept when its protocol is kept and a watched port is found
//! in one of the places the filter [`Match`]es on: the original destination
//! port (the port the client dialled, the seed's only rule) and, with
//! `match: [original, reply]`, the reply tuple's source port (the port the
//! server really answers from: after a NodePort or other DNAT, the
//! service's port).
//!
//! Invariant: [`Filter::keeps`] has exactly the semantics of the kernel-side
//! BPF program built by [`crate::netlink::bpf::build`] from the same filter;
//! the BPF program may only pass *more* (it fails open on layouts it does not
//! recognise), never less.

use std::net::IpAddr;
use std::str::FromStr;

use ctw_common::{status, ConnRecord, Protocol};
use serde::Deserialize;

/// Which port of an entry makes it watched (config key `match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Match {
    /// The original tuple's destination port (`CTA_TUPLE_ORIG`
    /// `CTA_PROTO_DST_PORT`): what the client connected to.
    Original,
    /// The reply tuple's source port (`CTA_TUPLE_REPLY`
    /// `CTA_PROTO_SRC_PORT`): the port after DNAT, e.g. the backend port of a
    /// NodePort or ClusterIP service.
    Reply,
}

/// An address block such as `198.18.0.0/16` or `fd00:198:18::/48`
/// (config key `pod_cidrs`). Host bits after the prefix are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Does the block hold `ip`? Never for an address of the other family
    /// (an IPv4-mapped IPv6 address is not unwrapped).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDR/PREFIX`; errors name the text and what is wrong with it.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("{s:?}: prefix {p:?} must be 0-{max}"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Cidr, String> {
        s.parse()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Ports and protocols to keep. Cheap to copy into the capture thread.
#[derive(Clone, PartialEq, Eq)]
pub struct Filter {
    ports: Box<[u64; 1024]>,
    port_list: Vec<u16>,
    protocols: Vec<Protocol>,
    match_original: bool,
    match_reply: bool,
    pod_cidrs: Vec<Cidr>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("ports", &self.port_list)
            .field("protocols", &self.protocols)
            .field("match_original", &self.match_original)
            .field("match_reply", &self.match_reply)
            .field("pod_cidrs", &self.pod_cidrs)
            .finish()
    }
}

impl Filter {
    /// `protocols` empty means every protocol that has ports. Matches on the
    /// original destination port only, marks nothing; see
    /// [`Filter::with_match`] and [`Filter::with_pod_cidrs`].
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
            match_original: true,
            match_reply: false,
            pod_cidrs: Vec::new(),
        }
    }

    /// Which ports to match on; an empty list keeps the default
    /// (`[original]`).
    pub fn with_match(mut self, on: &[Match]) -> Filter {
        if !on.is_empty() {
            self.match_original = on.contains(&Match::Original);
            self.match_reply = on.contains(&Match::Reply);
        }
        self
    }

    /// Records whose original source lies outside every block get
    /// [`status::CTW_EXTERNAL`] ([`Filter::mark`]); empty = mark nothing.
    pub fn with_pod_cidrs(mut self, cidrs: &[Cidr]) -> Filter {
        self.pod_cidrs = cidrs.to_vec();
        self
    }

    /// Sorted, deduplicated watched ports.
    pub fn ports(&self) -> &[u16] {
        &self.port_list
    }

    /// Sorted, deduplicated kept protocols (all port-bearing ones by default).
    pub fn protocols(&self) -> &[Protocol] {
        &self.protocols
    }

    /// Is the original destination port matched?
    pub fn matches_original(&self) -> bool {
        self.match_original
    }

    /// Is the reply source port (post-DNAT) matched?
    pub fn matches_reply(&self) -> bool {
        self.match_reply
    }

    pub fn keeps_port(&self, port: u16) -> bool {
        self.ports[(port / 64) as usize] & (1 << (port % 64)) != 0
    }

    pub fn keeps_protocol(&self, p: Protocol) -> bool {
        self.protocols.contains(&p)
    }

    /// The watched port that makes `r` kept, ignoring the protocol: the
    /// original destination port when matched and watched, else the reply
    /// source port when matched and watched, else `None`. Per-port metrics
    /// count under this port.
    pub fn matched_port(&self, r: &ConnRecord) -> Option<u16> {
        if self.match_original && self.keeps_port(r.orig.dst_port) {
            Some(r.orig.dst_port)
        } else if self.match_reply && self.keeps_port(r.reply.src_port) {
            Some(r.reply.src_port)
        } else {
            None
        }
    }

    /// Keep a record when its protocol is kept and a matched port is
    /// watched ([`Filter::matched_port`]).
    pub fn keeps(&self, r: &ConnRecord) -> bool {
        self.keeps_protocol(r.protocol) && self.matched_port(r).is_some()
    }

    /// Put the agent's marks on a kept record: [`status::CTW_EXTERNAL`] when
    /// `pod_cidrs` is set and the original source address is in none of
    /// them (a client from outside the cluster, e.g. of a NodePort).
    pub fn mark(&self, r: &mut ConnRecord) {
        if !self.pod_cidrs.is_empty() && !self.pod_cidrs.iter().any(|c| c.contains(r.orig.src)) {
            r.status |= status::CTW_EXTERNAL;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ctw_common::{EventKind, Tuple};

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

    /// A NodePort entry: client 198.18.9.9:40000 -> node 198.18.0.1:30080,
    /// DNAT to the backend 198.19.0.2:80, masqueraded to 198.19.0.1:40000.
    fn nodeport() -> ConnRecord {
        ConnRecord::new(
            EventKind::New,
            1,
            Protocol::Tcp,
            Tuple::new(
                "198.18.9.9".parse().unwrap(),
                40000,
                "198.18.0.1".parse().unwrap(),
                30080,
            ),
            Tuple::new(
                "198.19.0.2".parse().unwrap(),
                80,
                "198.19.0.1".parse().unwrap(),
                40000,
            ),
        )
    }

    #[test]
    fn reply_match_keeps_the_post_dnat_port() {
        let r = nodeport();
        let seed = Filter::new(&[80], &[]);
        assert!(!seed.keeps(&r), "default: original destination port only");
        assert_eq!(seed.matched_port(&r), None);
        let both = Filter::new(&[80], &[]).with_match(&[Match::Original, Match::Reply]);
        assert!(both.keeps(&r));
        assert_eq!(both.matched_port(&r), Some(80));
        // The original port wins when both are watched.
        let f = Filter::new(&[80, 30080], &[]).with_match(&[Match::Reply, Match::Original]);
        assert_eq!(f.matched_port(&r), Some(30080));
        let reply_only = Filter::new(&[30080], &[]).with_match(&[Match::Reply]);
        assert!(!reply_only.keeps(&r));
        assert!(Filter::new(&[80], &[Protocol::Udp])
            .with_match(&[Match::Reply])
            .matched_port(&r)
            .is_some());
        assert!(!Filter::new(&[80], &[Protocol::Udp])
            .with_match(&[Match::Reply])
            .keeps(&r));
        // An empty list keeps the default.
        assert!(Filter::new(&[30080], &[]).with_match(&[]).keeps(&r));
    }

    #[test]
    fn pod_cidrs_mark_external_sources() {
        let cidrs: Vec<Cidr> = ["198.18.0.0/24", "fd00:198:18:1::/64"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let f = Filter::new(&[80], &[]).with_pod_cidrs(&cidrs);
        let mut r = nodeport();
        f.mark(&mut r);
        assert_eq!(r.status & status::CTW_EXTERNAL, status::CTW_EXTERNAL);
        let mut pod = nodeport();
        pod.orig.src = "198.18.0.77".parse().unwrap();
        f.mark(&mut pod);
        assert_eq!(pod.status, 0);
        pod.orig.src = "fd00:198:18:1::5".parse().unwrap();
        f.mark(&mut pod);
        assert_eq!(pod.status, 0);
        pod.orig.src = "fd00:198:18:2::5".parse().unwrap();
        f.mark(&mut pod);
        assert_eq!(pod.status, status::CTW_EXTERNAL);
        // No pod_cidrs: nothing is marked.
        let mut r = nodeport();
        Filter::new(&[80], &[]).mark(&mut r);
        assert_eq!(r.status, 0);
    }

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "198.18.5.7/16".parse().unwrap();
        assert!(c.contains("198.18.200.1".parse().unwrap()));
        assert!(!c.contains("198.19.0.1".parse().unwrap()));
        assert!(!c.contains("::ffff:198.18.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        let host: Cidr = "fd00::1/128".parse().unwrap();
        assert!(host.contains("fd00::1".parse().unwrap()));
        assert!(!host.contains("fd00::2".parse().unwrap()));
        for (bad, says) in [
            ("198.18.0.0", "ADDRESS/PREFIX"),
            ("198.18.0/16", "not an IP address"),
            ("198.18.0.0/33", "0-32"),
            ("fd00::/129", "0-128"),
            ("fd00::/x", "prefix"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
        assert_eq!(c.to_string(), "198.18.5.7/16");
    }
}

//! Fuzzes the kernel-side BPF filter against the decoder: the program must
//! never drop a datagram that user space would decode into a kept record.
//! The first input byte picks one of a few filters (matching the original
//! destination port, the reply source port or both), the rest is the skb.
#![no_main]

use std::sync::OnceLock;

use ctw_agent::filter::{Filter, Match};
use ctw_agent::netlink::{bpf, decode};
use ctw_common::Protocol;
use libfuzzer_sys::fuzz_target;

fn programs() -> &'static [(Filter, Vec<libc::sock_filter>)] {
    static P: OnceLock<Vec<(Filter, Vec<libc::sock_filter>)>> = OnceLock::new();
    P.get_or_init(|| {
        let wide: Vec<u16> = (1000..3000).chain([80, 443, 8080]).collect();
        [
            Filter::new(&[80, 443, 8080, 5353], &[]),
            Filter::new(&[8080], &[Protocol::Tcp]),
            Filter::new(&[53, 5353], &[Protocol::Udp, Protocol::UdpLite]),
            Filter::new(&wide, &[Protocol::Sctp, Protocol::Dccp, Protocol::Tcp]),
            Filter::new(&[], &[]),
            Filter::new(&[80, 443, 8080, 5353], &[]).with_match(&[Match::Original, Match::Reply]),
            Filter::new(&[80], &[Protocol::Tcp]).with_match(&[Match::Reply]),
            Filter::new(&wide, &[]).with_match(&[Match::Original, Match::Reply]),
        ]
        .into_iter()
        .map(|f| {
            let p = bpf::build(&f);
            (f, p)
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, pkt)) = data.split_first() else {
        return;
    };
    let progs = programs();
    let (filter, prog) = &progs[usize::from(sel) % progs.len()];
    let verdict = bpf::run(prog, pkt);
    assert!(verdict == bpf::ACCEPT || verdict == bpf::DROP);
    let kept = decode::messages(pkt).any(|m| {
        matches!(
            m.and_then(|m| decode::decode(&m, 0)),
            Ok(decode::Decoded::Conn(r)) if filter.keeps(&r)
        )
    });
    if kept {
        assert_eq!(verdict, bpf::ACCEPT, "dropped a datagram user space keeps");
    }
});

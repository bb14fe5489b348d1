//! Fuzzes the ctnetlink decoder with arbitrary datagrams: it must never
//! panic, and every record it returns must be internally consistent.
#![no_main]

use ctw_agent::netlink::decode::{self, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut errors = 0;
    for m in decode::messages(data) {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                errors += 1;
                let _ = e.to_string();
                continue;
            }
        };
        assert!(m.payload.len() + decode::NLMSG_HDRLEN <= data.len());
        for d in [decode::decode(&m, 1), decode::decode_entry(&m, 1)] {
            match d {
                Ok(Decoded::Conn(r)) => {
                    assert_eq!(r.orig.src.is_ipv4(), r.orig.dst.is_ipv4());
                    assert_eq!(r.reply.src.is_ipv4(), r.reply.dst.is_ipv4());
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
    // The iterator stops after its first error.
    assert!(errors <= 1);
});

//! Fuzzes the packed record decoder (`ctw_proto::packed`), which the
//! collector runs on every batch an agent sends: any bytes must decode to
//! records plus a count of errors, never a panic; and the records decoded
//! must encode and decode again to themselves.
#![no_main]

use ctw_proto::packed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let u = packed::decode(data);
    assert_eq!(u.errors == 0, u.first_error.is_none());
    let mut again = Vec::new();
    packed::encode(&u.records, &mut again);
    let v = packed::decode(&again);
    assert_eq!(v.errors, 0);
    assert_eq!(v.records, u.records);
});

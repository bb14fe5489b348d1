//! Fuzzes the HTTP query parameter parsers shared by agent and collector
//! (`ctw_common::api`): arbitrary `key=value` pairs, times and durations must
//! give a value or an error naming a parameter, never a panic.
#![no_main]

use ctw_common::api;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let params: Vec<(String, String)> = text
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    let known = [
        "protocol", "src_ip", "src_port", "dst_ip", "dst_port", "tuple", "node", "zone",
    ];
    match api::check_names(&params, &known).and_then(|_| api::parse_live(&params)) {
        Ok(p) => assert_eq!(p.tuple.src.is_ipv4(), p.tuple.dst.is_ipv4()),
        Err(e) => assert!(!e.message.is_empty()),
    }
    for (_, v) in &params {
        if let Ok(ns) = api::parse_time(v) {
            let _ = api::format_time(ns);
            assert!(api::time_precision_ns(v) >= 1);
        }
        let _ = api::parse_duration(v);
    }
});

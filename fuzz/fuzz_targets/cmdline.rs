//! The kernel command line: arbitrary text into `Config::parse`. Any input gives a
//! configuration (with warnings) or an error naming the key; errors and warnings display,
//! and parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow_metal::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let first = Config::parse(&text);
    match &first {
        Ok((config, warnings)) => {
            let _ = format!("{config:?}");
            for w in warnings {
                assert!(!w.to_string().is_empty());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    assert_eq!(format!("{first:?}"), format!("{:?}", Config::parse(&text)));
});

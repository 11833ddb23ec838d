//! Any bytes a client can send as a text frame: the parser answers with a message or a
//! `BadMessage`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pgrelay::protocol::parse(text);
    }
});

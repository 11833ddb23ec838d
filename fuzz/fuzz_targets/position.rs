//! Any string a client can send as `since` or `Last-Event-ID`: a position or an error, never a
//! panic, and whatever opens re-seals to a token that opens to the same position.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::capture::position::PositionCodec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let codec = PositionCodec::new(&[42; 32]);
    if let Ok(position) = codec.open(text) {
        let token = codec.seal(&position);
        assert_eq!(codec.open(&token), Ok(position));
    }
});

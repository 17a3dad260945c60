//! Bytes in → an upright RGB image or a typed refusal; never a panic, a hang or an allocation
//! beyond what the header's (limited) size allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vae_pipeline::decode::{decode_bytes, DecodeOptions};

fuzz_target!(|data: &[u8]| {
    // 16 Mpx keeps the fuzzer's 2 GB RSS limit meaningful: a larger header must be refused.
    let options = DecodeOptions { max_pixels: 16 << 20, ..DecodeOptions::default() };
    if let Ok(rgb) = decode_bytes(data, &options) {
        let (w, h) = rgb.dimensions();
        assert_eq!(rgb.as_raw().len(), w as usize * h as usize * 3);
    }
});

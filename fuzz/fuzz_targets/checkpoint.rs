#![no_main]
//! See `slimtrain::checkpoint::fuzz`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slimtrain::checkpoint::fuzz(data);
});

#![no_main]
//! See `slimserve::fuzzing::image`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slimserve::fuzzing::image(data);
});

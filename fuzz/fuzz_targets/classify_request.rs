#![no_main]
//! See `slimserve::fuzzing::classify_request`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slimserve::fuzzing::classify_request(data);
});

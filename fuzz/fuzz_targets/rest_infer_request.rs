#![no_main]
//! See `slimserve::fuzzing::rest_infer_request`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slimserve::fuzzing::rest_infer_request(data);
});

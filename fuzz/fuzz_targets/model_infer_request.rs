#![no_main]
//! See `slimserve::fuzzing::model_infer_request`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slimserve::fuzzing::model_infer_request(data);
});

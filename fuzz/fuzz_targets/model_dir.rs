#![no_main]
//! See `slimserve::fuzzing::model_dir`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slimserve::fuzzing::model_dir(data);
});

#![no_main]
//! The VQGAN pickle reader on arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lwm_vision::vqgan::pickle::load_arrays(data);
});

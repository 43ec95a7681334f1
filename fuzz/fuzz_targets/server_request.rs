#![no_main]
//! The server's request parsing on arbitrary bytes, for /v1/chat/completions and
//! /v1/completions: JSON body, fields, messages / prompt, tool grammar, chat rendering.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lwm_server::check_request(data, true, 32000);
    let _ = lwm_server::check_request(data, false, 32000);
});

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| asmn_shared::fuzzing::catalog(data));

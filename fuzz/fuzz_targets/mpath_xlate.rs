#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| reservd_fuzz::mpath_xlate(data));

//! The ManageSieve front end before authentication, fed any bytes a client could send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::config::Protocol;
use mailgate_fuzz::run_front_end;

fuzz_target!(|data: &[u8]| run_front_end(Protocol::Managesieve, data));

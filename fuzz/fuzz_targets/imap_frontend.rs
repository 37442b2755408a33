//! The IMAP front end before authentication, fed any bytes a client could send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate_fuzz::{FrontEnd, run_front_end};

fuzz_target!(|data: &[u8]| run_front_end(FrontEnd::Imap, data));

//! The configuration parser and its validation, fed any text (files and the environment are
//! not read, as `mailgate check --no-files`).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mailgate::config::{Config, Files};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = Config::from_text_with(Path::new("fuzz.yaml"), text, Files::Skip) {
        // The message names the file and a key for every problem.
        let message = error.to_string();
        assert!(message.contains("fuzz.yaml"), "{message}");
    }
});

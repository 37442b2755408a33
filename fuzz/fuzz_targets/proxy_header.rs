//! The PROXY protocol header (v1 and v2) a load balancer puts before a client's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::proxy_protocol::{MAX_HEADER, read_header};
use mailgate_fuzz::paused_runtime;
use tokio::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    paused_runtime().block_on(async {
        let mut stream = data;
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Ok(header) = read_header(&mut stream, deadline).await {
            // What follows the header is the client's, byte for byte.
            let read = data.len() - stream.len();
            let header_length = read - header.rest.len();
            assert!(header_length <= MAX_HEADER);
            assert_eq!(header.rest, data[header_length..read]);
        }
    });
});

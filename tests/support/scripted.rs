//! A scripted upstream on loopback, for what a real server never does (an endless challenge,
//! an answer that quotes the token, bytes after a STARTTLS answer): it reads one line per
//! step and answers with the step's text. With [`plain_connector`] towards it.

use std::time::Duration;

use mailgate::config::{
    DEFAULT_MAX_CONCURRENT_CONNECTS, ForwardClient, MechanismSetting, TlsMode, UpstreamConfig,
};
use mailgate::upstream::Connector;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Steps of a scripted upstream: read a client line starting with the prefix (when there is
/// one), then send the text.
pub type Script = Vec<(Option<&'static str>, &'static str)>;

/// Serves one connection by `script`; yields the lines it read, without their CRLF.
pub async fn scripted_upstream(script: Script) -> (u16, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        let mut received = Vec::new();
        for (prefix, answer) in script {
            if let Some(prefix) = prefix {
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                assert!(line.starts_with(prefix), "{line:?} lacks {prefix:?}");
                received.push(line.trim_end_matches("\r\n").to_owned());
            }
            stream.get_mut().write_all(answer.as_bytes()).await.unwrap();
        }
        received
    });
    (port, task)
}

/// A connector to a plain upstream on loopback `port` (no TLS, no forwarding).
pub fn plain_connector(port: u16, mechanism: MechanismSetting) -> Connector {
    Connector::new(&UpstreamConfig {
        ca_file: None,
        system_roots: false,
        mechanism,
        connect_timeout: Duration::from_secs(5),
        max_concurrent_connects: DEFAULT_MAX_CONCURRENT_CONNECTS,
        forward_client: ForwardClient::None,
        ..UpstreamConfig::new("127.0.0.1".to_owned(), port, TlsMode::None)
    })
    .unwrap()
}

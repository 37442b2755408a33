//! [`ImapClient`]: a minimal IMAP client speaking raw lines, for transcript-like assertions
//! and for the benchmark's byte counting. Literals in responses are skipped by their size.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long any single read may take before the client gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ImapClient {
    reader: BufReader<TcpStream>,
    next_tag: u32,
    /// The server's first line.
    pub greeting: String,
}

/// Everything a command produced: untagged lines (literal bodies left out), the tagged
/// completion, and the byte count including literals.
#[derive(Debug)]
pub struct Completion {
    pub untagged: Vec<String>,
    pub tagged: String,
    pub bytes: usize,
}

impl Completion {
    pub fn is_ok(&self) -> bool {
        self.tagged.split(' ').nth(1) == Some("OK")
    }
}

impl ImapClient {
    /// Connects and reads the greeting.
    pub async fn connect(address: SocketAddr) -> ImapClient {
        let stream = TcpStream::connect(address).await.expect("connect");
        Self::greeted(stream).await
    }

    /// Connects from `source` (another loopback address, such as 127.0.0.2, to look like a
    /// different client) and reads the greeting.
    pub async fn connect_from(address: SocketAddr, source: std::net::IpAddr) -> ImapClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind source");
        let stream = socket.connect(address).await.expect("connect");
        Self::greeted(stream).await
    }

    async fn greeted(stream: TcpStream) -> ImapClient {
        stream.set_nodelay(true).expect("nodelay");
        let mut client = ImapClient {
            reader: BufReader::with_capacity(256 * 1024, stream),
            next_tag: 1,
            greeting: String::new(),
        };
        client.greeting = client.line().await;
        client
    }

    /// The client's end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.reader.get_ref().local_addr().expect("local address")
    }

    /// Reads one line (with its CRLF); panics on EOF or timeout.
    pub async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(READ_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .expect("read timed out")
            .expect("read");
        assert!(n > 0, "server closed the connection");
        line
    }

    /// Reads one line, or `None` at EOF.
    pub async fn line_or_eof(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(READ_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .expect("read timed out")
            .ok()?;
        (n > 0).then_some(line)
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).await.expect("write");
    }

    /// Sends `command` under a fresh tag and reads up to its completion.
    pub async fn command(&mut self, command: &str) -> Completion {
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        self.send_raw(format!("{tag} {command}\r\n").as_bytes())
            .await;
        self.until_tagged(&tag).await
    }

    /// `LOGIN` with quoted strings; returns the completion.
    pub async fn login(&mut self, user: &str, password: &str) -> Completion {
        super::secrets::remember("client password", password);
        self.command(&format!("LOGIN \"{user}\" \"{password}\""))
            .await
    }

    /// Reads responses until `tag`'s completion.
    pub async fn until_tagged(&mut self, tag: &str) -> Completion {
        let mut untagged = Vec::new();
        let mut bytes = 0;
        loop {
            let line = self.line().await;
            bytes += line.len();
            if line.starts_with(&format!("{tag} ")) {
                return Completion {
                    untagged,
                    tagged: line.trim_end().to_owned(),
                    bytes,
                };
            }
            if let Some(size) = literal_size(&line) {
                self.skip(size).await;
                bytes += size;
            }
            untagged.push(line.trim_end().to_owned());
        }
    }

    async fn skip(&mut self, mut remaining: usize) {
        let mut buffer = vec![0u8; 64 * 1024];
        while remaining > 0 {
            let want = remaining.min(buffer.len());
            let n = self.reader.read(&mut buffer[..want]).await.expect("read");
            assert!(n > 0, "server closed inside a literal");
            remaining -= n;
        }
    }
}

/// The size announced by a line ending in `{n}` or `{n+}`.
fn literal_size(line: &str) -> Option<usize> {
    let body = line.trim_end().strip_suffix('}')?;
    let open = body.rfind('{')?;
    body[open + 1..].trim_end_matches('+').parse().ok()
}

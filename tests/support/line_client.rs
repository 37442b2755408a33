//! [`LineClient`]: a raw-line client for POP3 and ManageSieve transcripts, over plain TCP or
//! TLS trusting one CA, that can start TLS in the middle of a session.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mailgate::io::BoxedIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long any single read may take before the client gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

pub struct LineClient {
    io: BufReader<BoxedIo>,
}

impl LineClient {
    /// A plain TCP connection (nothing read yet).
    pub async fn connect(address: SocketAddr) -> LineClient {
        let tcp = TcpStream::connect(address).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        LineClient {
            io: BufReader::new(Box::new(tcp)),
        }
    }

    /// A TLS connection trusting only `ca` (nothing read yet).
    pub async fn connect_tls(address: SocketAddr, ca: &Path) -> LineClient {
        let plain = Self::connect(address).await;
        plain.start_tls(ca).await
    }

    /// The TLS handshake on this connection, trusting only `ca`, for 127.0.0.1.
    ///
    /// # Panics
    /// When bytes the server sent in the clear are still unread (they would be the server's
    /// answer to something pipelined after STARTTLS), or the handshake fails.
    pub async fn start_tls(self, ca: &Path) -> LineClient {
        assert!(
            self.io.buffer().is_empty(),
            "the server sent more after its TLS go-ahead: {:?}",
            String::from_utf8_lossy(self.io.buffer())
        );
        mailgate::tls::install_crypto_provider();
        let config = mailgate::tls::client_config(Some(ca), false).expect("client TLS config");
        let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, self.io.into_inner())
            .await
            .expect("TLS handshake");
        LineClient {
            io: BufReader::new(Box::new(stream)),
        }
    }

    pub async fn send(&mut self, text: &str) {
        self.io
            .get_mut()
            .write_all(text.as_bytes())
            .await
            .expect("write");
    }

    /// One line without its line end; panics on EOF or timeout.
    pub async fn line(&mut self) -> String {
        self.line_or_eof()
            .await
            .expect("the server closed the connection")
    }

    /// One line without its line end, or `None` at EOF (or a reset).
    pub async fn line_or_eof(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(READ_TIMEOUT, self.io.read_line(&mut line))
            .await
            .expect("read timed out")
            .ok()?;
        (n > 0).then(|| line.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Lines up to and including the first that `last` accepts.
    pub async fn until(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = last(&line);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Exactly `n` bytes (a literal's body), as text.
    pub async fn bytes(&mut self, n: usize) -> String {
        let mut body = vec![0u8; n];
        tokio::time::timeout(READ_TIMEOUT, self.io.read_exact(&mut body))
            .await
            .expect("read timed out")
            .expect("read");
        String::from_utf8(body).expect("UTF-8")
    }

    /// Whether the server closed the connection with nothing more to say.
    pub async fn closed(&mut self) -> bool {
        self.line_or_eof().await.is_none()
    }
}

//! A listener behind a load balancer (`accept_proxy`): the PROXY header's client address is what
//! mailgate logs and limits; a trusted peer without a header is refused; a header from an
//! untrusted peer is just a bad command.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::{Mailgate, TEST_TIMEOUT, curl, eventually, free_port, with_timeout};

struct Setup {
    mailgate: Mailgate,
    behind_balancer: SocketAddr,
    direct: SocketAddr,
    admin: u16,
}

impl Setup {
    async fn start() -> Setup {
        let (balanced, direct, admin) = (free_port(), free_port(), free_port());
        // The upstream is never reached: these sessions do not log in.
        let config = format!(
            r#"listeners:
  - name: balanced
    protocol: imap
    listen: "127.0.0.1:{balanced}"
    accept_proxy: ["127.0.0.0/8"]
    max_connections_per_client: 1
    upstream: {{ host: 127.0.0.1, port: 9, tls: none }}
  - name: direct
    protocol: imap
    listen: "127.0.0.1:{direct}"
    upstream: {{ host: 127.0.0.1, port: 9, tls: none }}
tokens:
  auth_server: {{ url: "http://127.0.0.1:9/token" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
"#
        );
        let mailgate = Mailgate::start(&config).await;
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Setup {
            mailgate,
            behind_balancer: at(balanced),
            direct: at(direct),
            admin,
        }
    }

    async fn proxy_headers(&self, result: &str) -> String {
        let text = curl(&[&format!("http://127.0.0.1:{}/metrics", self.admin)])
            .await
            .stdout;
        let series =
            format!("mailgate_proxy_headers_total{{listener=\"balanced\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .unwrap_or("missing")
            .to_owned()
    }
}

fn header(command: v2::Command, client: &str) -> Vec<u8> {
    let addresses = v2::Addresses::from((
        client.parse::<SocketAddr>().unwrap(),
        "192.0.2.1:143".parse::<SocketAddr>().unwrap(),
    ));
    v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses)
        .build()
        .unwrap()
}

struct Connection(BufReader<TcpStream>);

impl Connection {
    /// Connects and writes `first` at once, as a load balancer does.
    async fn open(address: SocketAddr, first: &[u8]) -> Connection {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(first).await.unwrap();
        Connection(BufReader::new(stream))
    }

    /// The next line, or `None` when the connection closed.
    async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), self.0.read_line(&mut line))
            .await
            .expect("an answer in time");
        match read {
            Ok(n) if n > 0 => Some(line.trim_end().to_owned()),
            _ => None,
        }
    }
}

#[tokio::test]
async fn the_header_names_the_client_that_is_logged_and_limited() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let mut first = header(v2::Command::Proxy, "198.51.100.7:40000");
        first.extend_from_slice(b"a NOOP\r\n");
        let mut alice = Connection::open(s.behind_balancer, &first).await;
        assert!(alice.line().await.unwrap().starts_with("* OK"));
        assert_eq!(alice.line().await.unwrap(), "a OK NOOP completed");

        // max_connections_per_client counts the client, not the balancer.
        let again = header(v2::Command::Proxy, "198.51.100.7:40001");
        let mut refused = Connection::open(s.behind_balancer, &again).await;
        let line = refused.line().await.unwrap();
        assert!(line.starts_with("* BYE [UNAVAILABLE]"), "{line}");
        let other = header(v2::Command::Proxy, "198.51.100.8:40000");
        let mut bob = Connection::open(s.behind_balancer, &other).await;
        assert!(bob.line().await.unwrap().starts_with("* OK"));

        // The balancer's own health check.
        let local = header(v2::Command::Local, "198.51.100.9:1");
        let mut check = Connection::open(s.behind_balancer, &local).await;
        assert!(check.line().await.unwrap().starts_with("* OK"));
        assert_eq!(s.proxy_headers("ok").await, "3");
        assert_eq!(s.proxy_headers("local").await, "1");
        drop(alice);
        let logged = eventually(Duration::from_secs(5), || async {
            s.mailgate.output().lines().any(|line| {
                line.contains("session closed") && line.contains("client=198.51.100.7:40000")
            })
        })
        .await;
        assert!(logged, "{}", s.mailgate.output());
    })
    .await;
}

#[tokio::test]
async fn a_trusted_peer_without_a_header_is_refused() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let mut spoofing = Connection::open(s.behind_balancer, b"a LOGIN alice secret\r\n").await;
        assert_eq!(spoofing.line().await, None);
        let counted = eventually(Duration::from_secs(5), || async {
            s.proxy_headers("invalid").await == "1"
        })
        .await;
        assert!(counted, "{}", s.mailgate.output());
    })
    .await;
}

#[tokio::test]
async fn an_untrusted_peer_cannot_claim_another_address() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let mut first = header(v2::Command::Proxy, "198.51.100.7:40000");
        first.extend_from_slice(b"\r\na NOOP\r\n");
        let mut client = Connection::open(s.direct, &first).await;
        assert!(client.line().await.unwrap().starts_with("* OK"));
        assert!(client.line().await.unwrap().starts_with("* BAD"));
        assert!(!s.mailgate.output().contains("198.51.100.7"));
    })
    .await;
}

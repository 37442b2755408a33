//! `upstream.forward_client` against a real Dovecot: clients connect to mailgate from
//! 127.0.0.2 (and 127.0.0.3), mailgate listens on 127.0.0.4 and reaches Dovecot from
//! 127.0.0.1, and Dovecot's login line tells whose address it took. Then what it is for: one
//! client's failed logins no longer slow everyone else down through Dovecot's penalty. Also the
//! upstream side of the modes against scripted upstreams (what goes on the wire, and what the
//! SMTP extension probe does not send).

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine;
use mailgate::config::{ForwardClient, MechanismSetting, TlsMode, UpstreamConfig};
use mailgate::forward::Origin;
use mailgate::login::UpstreamAuth;
use mailgate::secret::Secret;
use mailgate::smtp::backend;
use mailgate::upstream::Connector;
use support::imap_client::ImapClient;
use support::{
    AuthAnswer, DovecotOptions, Mailgate, TEST_TIMEOUT, TestUpstream, curl, eventually, free_port,
    with_timeout,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const ACCOUNT: &str = "acct1";
const USER: &str = "alice@example.test";
const PASSWORD: &str = "client-password-9f3";
/// An account whose token Dovecot's introspection does not know: every login is refused.
const REFUSED_ACCOUNT: &str = "acct-refused";

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Where mailgate listens: not 127.0.0.1, so `lip=` shows whether the address clients reached
/// was forwarded too.
const MAILGATE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// How long Dovecot's log may take to show a login.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// A Dovecot that takes ID and XCLIENT from mailgate (127.0.0.1) and PROXY headers on its
/// haproxy listeners.
fn trusting() -> DovecotOptions {
    DovecotOptions {
        login_trusted_networks: Some("127.0.0.1".to_owned()),
        haproxy_trusted_networks: Some("127.0.0.1".to_owned()),
        ..DovecotOptions::default()
    }
}

/// One listener towards Dovecot.
struct Route {
    protocol: &'static str,
    tls: &'static str,
    forward: &'static str,
    upstream_port: fn(&TestUpstream) -> u16,
}

const IMAP_ID: Route = Route {
    protocol: "imap",
    tls: "implicit",
    forward: "id",
    upstream_port: |up| up.dovecot.imaps_port,
};
const IMAP_PLAIN: Route = Route {
    forward: "none",
    ..IMAP_ID
};
const IMAP_PROXY_V2: Route = Route {
    protocol: "imap",
    tls: "implicit",
    forward: "proxy_v2",
    upstream_port: |up| up.dovecot.imaps_haproxy_port,
};
const SMTP_XCLIENT: Route = Route {
    protocol: "smtp",
    tls: "starttls",
    forward: "xclient",
    upstream_port: |up| up.dovecot.submission_port,
};
const SMTP_PROXY_V2: Route = Route {
    protocol: "smtp",
    tls: "starttls",
    forward: "proxy_v2",
    upstream_port: |up| up.dovecot.submission_haproxy_port,
};

/// Starts mailgate with one listener on 127.0.0.4 for `route`, its admin endpoint on
/// 127.0.0.1; returns it with both addresses.
async fn start(up: &TestUpstream, route: &Route) -> (Mailgate, SocketAddr, SocketAddr) {
    let listen = SocketAddr::from((MAILGATE_IP, free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        r#"listeners:
  - name: {protocol}
    protocol: {protocol}
    listen: "{listen}"
    upstream:
      host: 127.0.0.1
      port: {port}
      tls: {tls}
      ca_file: "{ca}"
      system_roots: false
      forward_client: {forward}
tokens:
  auth_server:
    url: "{url}"
    timeout: 5s
admin:
  listen: "{admin}"
"#,
        protocol = route.protocol,
        port = (route.upstream_port)(up),
        tls = route.tls,
        ca = up.ca_path(),
        forward = route.forward,
        url = up.auth.url(),
    );
    (Mailgate::start(&config).await, listen, admin)
}

/// Logs in over IMAP from `source`; returns the tagged reply, the client's address and how
/// long connect and login took.
async fn imap_login(
    mailgate: SocketAddr,
    source: IpAddr,
    account: &str,
) -> (String, SocketAddr, Duration) {
    let started = Instant::now();
    let mut client = ImapClient::connect_from(mailgate, source).await;
    let login = client.login(account, PASSWORD).await;
    (login.tagged, client.local_addr(), started.elapsed())
}

/// A raw SMTP client bound to `source`.
struct SmtpClient {
    reader: BufReader<TcpStream>,
}

impl SmtpClient {
    async fn connect_from(mailgate: SocketAddr, source: IpAddr) -> SmtpClient {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(source, 0)).expect("bind");
        let stream = socket.connect(mailgate).await.expect("connect");
        let mut client = SmtpClient {
            reader: BufReader::new(stream),
        };
        client.reply().await;
        client
    }

    fn local_addr(&self) -> SocketAddr {
        self.reader.get_ref().local_addr().expect("local address")
    }

    /// Sends `line` and returns the whole reply, lines joined by `\n`.
    async fn command(&mut self, line: &str) -> String {
        let stream = self.reader.get_mut();
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write");
        self.reply().await
    }

    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(TEST_TIMEOUT, self.reader.read_line(&mut line));
            assert!(
                read.await.expect("reply in time").expect("read") > 0,
                "closed"
            );
            let last = line.as_bytes().get(3) == Some(&b' ');
            lines.push(line.trim_end().to_owned());
            if last {
                return lines.join("\n");
            }
        }
    }

    /// EHLO and AUTH PLAIN as `account`; returns the EHLO reply and the AUTH reply.
    async fn login(&mut self, account: &str) -> (String, String) {
        let ehlo = self.command("EHLO client.test").await;
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{account}\0{PASSWORD}"));
        (ehlo, self.command(&format!("AUTH PLAIN {plain}")).await)
    }
}

/// Waits until Dovecot's log has a login line for USER with `addresses` (e.g.
/// `rip=127.0.0.2, rport=40000`).
async fn assert_logged_in_as(up: &TestUpstream, addresses: &str, mailgate: &Mailgate) {
    let logged = eventually(LOG_WAIT, || async {
        up.dovecot
            .log()
            .lines()
            .any(|line| line.contains(&format!("Login: user=<{USER}>")) && line.contains(addresses))
    })
    .await;
    assert!(
        logged,
        "no login with {addresses} in Dovecot's log\n{}\n{}",
        up.dovecot.log(),
        mailgate.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_id_gives_dovecot_the_client_and_the_address_it_reached() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start_with(&trusting()).await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address, _) = start(&up, &IMAP_ID).await;
        let (reply, client, _) = imap_login(address, CLIENT, ACCOUNT).await;
        assert!(reply.contains("OK"), "{reply}\n{}", mailgate.output());
        let expected = format!(
            "rip=127.0.0.2, rport={}, lip=127.0.0.4, lport={}",
            client.port(),
            address.port()
        );
        assert_logged_in_as(&up, &expected, &mailgate).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_proxy_v2_header_goes_before_tls() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start_with(&trusting()).await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address, _) = start(&up, &IMAP_PROXY_V2).await;
        let (reply, client, _) = imap_login(address, CLIENT, ACCOUNT).await;
        assert!(reply.contains("OK"), "{reply}\n{}", mailgate.output());
        let expected = format!(
            "rip=127.0.0.2, rport={}, lip=127.0.0.4, lport={}",
            client.port(),
            address.port()
        );
        assert_logged_in_as(&up, &expected, &mailgate).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_xclient_gives_dovecot_the_client_address() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start_with(&trusting()).await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address, _) = start(&up, &SMTP_XCLIENT).await;
        let mut client = SmtpClient::connect_from(address, CLIENT).await;
        let (ehlo, auth) = client.login(ACCOUNT).await;
        assert!(auth.starts_with("235"), "{auth}\n{}", mailgate.output());
        // XCLIENT is for mailgate, never offered to its clients.
        assert!(!ehlo.contains("XCLIENT"), "{ehlo}");
        let expected = format!("rip=127.0.0.2, rport={}", client.local_addr().port());
        assert_logged_in_as(&up, &expected, &mailgate).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_proxy_v2_logins_and_the_extension_probe_both_pass_dovecots_haproxy_listener() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start_with(&trusting()).await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address, _) = start(&up, &SMTP_PROXY_V2).await;
        // The probe's LOCAL header was taken: Dovecot's own extensions reach clients.
        let probed = eventually(LOG_WAIT, || async {
            let mut client = SmtpClient::connect_from(address, CLIENT).await;
            client
                .command("EHLO client.test")
                .await
                .contains("CHUNKING")
        })
        .await;
        assert!(probed, "the probe never got through\n{}", mailgate.output());
        let mut client = SmtpClient::connect_from(address, CLIENT).await;
        let (_, auth) = client.login(ACCOUNT).await;
        assert!(auth.starts_with("235"), "{auth}\n{}", mailgate.output());
        let expected = format!(
            "rip=127.0.0.2, rport={}, lip=127.0.0.4, lport={}",
            client.local_addr().port(),
            address.port()
        );
        assert_logged_in_as(&up, &expected, &mailgate).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_forwarding_dovecot_sees_mailgate() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start_with(&trusting()).await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address, _) = start(&up, &IMAP_PLAIN).await;
        let (reply, _, _) = imap_login(address, CLIENT, ACCOUNT).await;
        assert!(reply.contains("OK"), "{reply}\n{}", mailgate.output());
        assert_logged_in_as(&up, "rip=127.0.0.1,", &mailgate).await;
        assert!(!up.dovecot.log().contains("rip=127.0.0.2"));
    })
    .await;
}

/// A failed login from 127.0.0.2 (refused twice upstream: mailgate retries with a fresh
/// token), then a good login from 127.0.0.3, through each of two mailgates. With forwarding
/// Dovecot penalises 127.0.0.2 alone; without, it penalises mailgate's address and the good
/// login waits seconds (8 s measured). mailgate's own throttle does not count upstream
/// refusals, and counts per client address anyway, so it delays neither good login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_keeps_one_clients_failures_from_slowing_down_the_others() {
    with_timeout(Duration::from_secs(120), async {
        let options = DovecotOptions {
            auth_penalty: true,
            ..trusting()
        };
        let up = TestUpstream::start_with(&options).await;
        up.auth.grant(ACCOUNT, USER);
        up.auth.set_answer(
            REFUSED_ACCOUNT,
            AuthAnswer::Token {
                user: USER.into(),
                access_token: "never-valid-token".into(),
                expires_in: None,
            },
        );
        let (forwarding, forwarding_address, _) = start(&up, &IMAP_ID).await;
        let (plain, plain_address, _) = start(&up, &IMAP_PLAIN).await;

        // Forwarding first: nothing has failed from mailgate's own address yet.
        let mut good_logins = Vec::new();
        for address in [forwarding_address, plain_address] {
            let (reply, _, _) = imap_login(address, CLIENT, REFUSED_ACCOUNT).await;
            assert!(reply.contains("NO [AUTHENTICATIONFAILED]"), "{reply}");
            let (reply, _, took) = imap_login(address, OTHER_CLIENT, ACCOUNT).await;
            assert!(
                reply.contains("OK"),
                "{reply}\n{}\n{}",
                forwarding.output(),
                plain.output()
            );
            good_logins.push(took);
        }
        let (forwarded, unforwarded) = (good_logins[0], good_logins[1]);
        // Dovecot's penalty starts at 2 s and doubles; a login on loopback takes milliseconds.
        assert!(
            forwarded < Duration::from_millis(1500)
                && unforwarded > forwarded + Duration::from_millis(1500),
            "good login took {forwarded:?} with forwarding, {unforwarded:?} without"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_not_offered_is_counted_and_warned_once_and_the_login_works() {
    with_timeout(TEST_TIMEOUT, async {
        // No login_trusted_networks: Dovecot offers mailgate no XCLIENT.
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address, admin) = start(&up, &SMTP_XCLIENT).await;
        for _ in 0..2 {
            let mut client = SmtpClient::connect_from(address, CLIENT).await;
            let (_, auth) = client.login(ACCOUNT).await;
            assert!(auth.starts_with("235"), "{auth}\n{}", mailgate.output());
        }
        assert_logged_in_as(&up, "rip=127.0.0.1,", &mailgate).await;
        let metrics = curl(&[&format!("http://{admin}/metrics")]).await.stdout;
        let series = |result: &str| {
            format!(
                "mailgate_forward_client_total{{upstream=\"127.0.0.1:{}\",result=\"{result}\"}}",
                up.dovecot.submission_port
            )
        };
        assert!(
            metrics.contains(&format!("{} 2", series("not_offered"))),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("{} 0", series("sent"))),
            "{metrics}"
        );
        let warnings = mailgate
            .output()
            .matches("the upstream does not take the client's address")
            .count();
        assert_eq!(warnings, 1, "{}", mailgate.output());
    })
    .await;
}

// The upstream side against scripted upstreams.

fn connector(port: u16, forward_client: ForwardClient) -> Connector {
    Connector::new(&UpstreamConfig {
        ca_file: None,
        system_roots: false,
        mechanism: MechanismSetting::Auto,
        connect_timeout: Duration::from_secs(5),
        forward_client,
        max_concurrent_connects: mailgate::config::DEFAULT_MAX_CONCURRENT_CONNECTS,
        ..UpstreamConfig::new("127.0.0.1".to_owned(), port, TlsMode::None)
    })
    .unwrap()
}

fn origin() -> Origin {
    Origin::new("127.0.0.2:50000".parse().ok(), "127.0.0.4:587".parse().ok()).unwrap()
}

/// Answers each line from mailgate with the next reply (after the greeting); returns the
/// lines received.
async fn scripted_smtp(
    replies: &'static [&'static str],
) -> (u16, tokio::task::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(b"220 fake ESMTP\r\n")
            .await
            .unwrap();
        let mut received = Vec::new();
        for reply in replies {
            let mut line = String::new();
            if stream.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            received.push(line.trim_end().to_owned());
            stream.get_mut().write_all(reply.as_bytes()).await.unwrap();
        }
        received
    });
    (port, task)
}

const EHLO_WITH_XCLIENT: &str =
    "250-fake\r\n250-XCLIENT ADDR PORT PROTO HELO LOGIN\r\n250 AUTH XOAUTH2\r\n";

#[tokio::test]
async fn xclient_goes_after_ehlo_and_ehlo_follows_the_new_greeting() {
    let (port, server) = scripted_smtp(&[
        EHLO_WITH_XCLIENT,
        "220 fake ESMTP again\r\n",
        "250-fake\r\n250 AUTH XOAUTH2\r\n",
        "235 2.7.0 Logged in\r\n",
    ])
    .await;
    let auth = UpstreamAuth::Bearer {
        user: USER.to_owned(),
        token: Secret::new("tok".to_owned()),
    };
    let connector = connector(port, ForwardClient::Xclient);
    let origin = origin();
    let login = backend::login(&connector, &auth, "client.test", Some(&origin));
    let upstream = with_timeout(Duration::from_secs(10), login).await.unwrap();
    assert_eq!(upstream.completion, "235 2.7.0 Logged in");
    let received = server.await.unwrap();
    assert_eq!(
        received[..3],
        [
            "EHLO client.test",
            "XCLIENT ADDR=127.0.0.2 PORT=50000",
            "EHLO client.test"
        ]
    );
    assert!(received[3].starts_with("AUTH XOAUTH2 "), "{received:?}");
}

#[tokio::test]
async fn the_extension_probe_sends_no_xclient() {
    let (port, server) = scripted_smtp(&[EHLO_WITH_XCLIENT, "221 bye\r\n"]).await;
    let connector = connector(port, ForwardClient::Xclient);
    let probe = backend::probe_extensions(&connector, "mailgate.test");
    with_timeout(Duration::from_secs(10), probe).await.unwrap();
    assert_eq!(server.await.unwrap(), ["EHLO mailgate.test", "QUIT"]);
}

#[tokio::test]
async fn proxy_v2_sends_the_client_or_local_header_before_anything_else() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connector = connector(
        listener.local_addr().unwrap().port(),
        ForwardClient::ProxyV2,
    );
    let signature = b"\r\n\r\n\x00\r\nQUIT\n";
    for (origin, rest) in [
        (
            Some(origin()),
            // PROXY over TCP/IPv4: 127.0.0.2:50000 -> 127.0.0.4:587.
            &[
                0x21, 0x11, 0, 12, 127, 0, 0, 2, 127, 0, 0, 4, 0xc3, 0x50, 0x02, 0x4b,
            ][..],
        ),
        // mailgate's own connection (the probe): LOCAL, no addresses.
        (None, &[0x20, 0x00, 0, 0][..]),
    ] {
        let (connected, accepted) =
            tokio::join!(connector.connect(origin.as_ref()), listener.accept());
        let _upstream = connected.unwrap();
        let (mut stream, _) = accepted.unwrap();
        let mut header = vec![0u8; signature.len() + rest.len()];
        stream.read_exact(&mut header).await.unwrap();
        assert_eq!(header, [&signature[..], rest].concat());
    }
}

/// An SMTP upstream that believes XCLIENT and XFORWARD from anyone who reaches it (as Postfix
/// does for `smtpd_authorized_xclient_hosts`), and records what it takes: `command: LINE`,
/// `content: LINE` for DATA, `chunk: BYTES` for BDAT. Each reply comes 20 ms late, so that
/// pipelined commands queue up behind it.
struct Recorder {
    port: u16,
    taken: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        Recorder::start_with(false).await
    }

    /// With `chunking_after_xclient`, CHUNKING is offered only to a session that sent XCLIENT
    /// (as Postfix may, per client address): the extension probe never sees it.
    async fn start_with(chunking_after_xclient: bool) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let taken = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = taken.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(recorded_session(
                    stream,
                    record.clone(),
                    chunking_after_xclient,
                ));
            }
        });
        Recorder { port, taken, task }
    }

    fn taken(&self) -> Vec<String> {
        self.taken.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn recorded_session(
    stream: TcpStream,
    taken: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    chunking_after_xclient: bool,
) -> Option<()> {
    let mut xclient_seen = false;
    let record = |entry: String| taken.lock().unwrap().push(entry);
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"220 recorder ESMTP\r\n")
        .await
        .ok()?;
    loop {
        let mut line = Vec::new();
        if stream.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        record(format!("command: {line}"));
        let words: Vec<String> = line
            .split_whitespace()
            .map(str::to_ascii_uppercase)
            .collect();
        let reply = match words.first().map(String::as_str).unwrap_or_default() {
            "EHLO" => {
                let chunking = if xclient_seen || !chunking_after_xclient {
                    "250-CHUNKING\r\n"
                } else {
                    ""
                };
                format!(
                    "250-recorder\r\n250-PIPELINING\r\n{chunking}250-XCLIENT ADDR PORT NAME LOGIN\r\n250-XFORWARD ADDR NAME\r\n250 AUTH XOAUTH2\r\n"
                )
            }
            "XCLIENT" => {
                xclient_seen = true;
                "220 recorder ESMTP\r\n".to_owned()
            }
            "AUTH" => "235 2.7.0 Authentication successful\r\n".to_owned(),
            "MAIL" | "RCPT" | "XFORWARD" | "NOOP" | "RSET" => "250 2.0.0 Ok\r\n".to_owned(),
            "DATA" => {
                stream
                    .get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await
                    .ok()?;
                loop {
                    let mut content = Vec::new();
                    stream.read_until(b'\n', &mut content).await.ok()?;
                    let content = String::from_utf8_lossy(&content).trim_end().to_owned();
                    if content == "." {
                        break;
                    }
                    record(format!("content: {content}"));
                }
                "250 2.0.0 Ok: queued\r\n".to_owned()
            }
            "BDAT" => {
                let mut chunk = vec![0u8; words.get(1)?.parse().ok()?];
                stream.read_exact(&mut chunk).await.ok()?;
                record(format!("chunk: {}", String::from_utf8_lossy(&chunk)));
                format!("250 2.0.0 Ok: {} octets\r\n", chunk.len())
            }
            "QUIT" => {
                stream
                    .get_mut()
                    .write_all(b"221 2.0.0 Bye\r\n")
                    .await
                    .ok()?;
                return Some(());
            }
            _ => "502 5.5.2 Error: command not recognized\r\n".to_owned(),
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        stream.get_mut().write_all(reply.as_bytes()).await.ok()?;
    }
}

impl SmtpClient {
    /// Sends `bytes` as they are and reads one reply for each of `replies` commands.
    async fn pipeline(&mut self, bytes: &str, replies: usize) -> Vec<String> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes.as_bytes()).await.expect("write");
        let mut said = Vec::new();
        for _ in 0..replies {
            said.push(self.reply().await);
        }
        said
    }
}

/// A logged-in client tries to speak for mailgate: XCLIENT pipelined right behind AUTH, XFORWARD
/// between pipelined commands. Neither reaches the upstream that would believe it; each gets
/// `502` in its place among the replies; mail still flows, DATA and BDAT content that looks like
/// XCLIENT included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_xclient_never_reaches_an_upstream_that_trusts_mailgate() {
    with_timeout(TEST_TIMEOUT, async {
        let recorder = Recorder::start().await;
        let auth = support::AuthServer::start(None).await;
        auth.grant(ACCOUNT, USER);
        let listen = SocketAddr::from((MAILGATE_IP, free_port()));
        let config = format!(
            "listeners:\n  - name: smtp\n    protocol: smtp\n    listen: \"{listen}\"\n    upstream: {{ host: 127.0.0.1, port: {}, tls: none, forward_client: xclient }}\ntokens:\n  auth_server:\n    url: \"{}\"\n",
            recorder.port,
            auth.url(),
        );
        let mailgate = Mailgate::start(&config).await;
        // Once the upstream's extensions are known, CHUNKING is relayed: BDAT is understood.
        let probed = eventually(LOG_WAIT, || async {
            let mut client = SmtpClient::connect_from(listen, CLIENT).await;
            client.command("EHLO client.test").await.contains("CHUNKING")
        })
        .await;
        assert!(probed, "{}", mailgate.output());

        let mut client = SmtpClient::connect_from(listen, CLIENT).await;
        client.command("EHLO client.test").await;
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{ACCOUNT}\0{PASSWORD}"));
        let login = format!("AUTH PLAIN {plain}\r\nXCLIENT LOGIN=boss ADDR=6.6.6.6\r\n");
        let said = client.pipeline(&login, 2).await;
        assert!(said[0].starts_with("235"), "{said:?}\n{}", mailgate.output());
        assert!(said[1].starts_with("502 5.5.1"), "{said:?}");
        let transaction = "MAIL FROM:<a@example.test>\r\nxforward ADDR=6.6.6.6\r\nRCPT TO:<b@example.test>\r\nDATA\r\n";
        let said = client.pipeline(transaction, 4).await;
        let codes: Vec<&str> = said.iter().map(|reply| &reply[..3]).collect();
        assert_eq!(codes, ["250", "502", "250", "354"], "{said:?}");
        let message = "Subject: hello\r\n\r\nXCLIENT ADDR=7.7.7.7 is only text here\r\n.\r\n";
        assert!(client.pipeline(message, 1).await[0].starts_with("250"));
        let chunk = "XCLIENT ADDR=8.8.8.8\r\n";
        let chunked = format!(
            "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nBDAT {} LAST\r\n{chunk}QUIT\r\n",
            chunk.len()
        );
        let said = client.pipeline(&chunked, 4).await;
        let codes: Vec<&str> = said.iter().map(|reply| &reply[..3]).collect();
        assert_eq!(codes, ["250", "250", "250", "221"], "{said:?}");

        let taken = recorder.taken();
        let spoofs: Vec<&String> = taken
            .iter()
            .filter(|entry| {
                let entry = entry.to_ascii_uppercase();
                entry.starts_with("COMMAND: XFORWARD") || entry.contains("6.6.6.6")
            })
            .collect();
        assert!(spoofs.is_empty(), "{spoofs:?}");
        let xclients: Vec<&String> = taken
            .iter()
            .filter(|entry| entry.starts_with("command: XCLIENT"))
            .collect();
        assert!(
            xclients.len() == 1 && xclients[0].contains("ADDR=127.0.0.2"),
            "only mailgate's own XCLIENT: {taken:?}"
        );
        assert!(taken.contains(&"content: XCLIENT ADDR=7.7.7.7 is only text here".to_owned()));
        assert!(taken.contains(&format!("chunk: {chunk}")), "{taken:?}");
    })
    .await;
}

/// Whether the upstream reads BDAT chunks as content is what it told this session after
/// mailgate's XCLIENT, not what the extension probe (without XCLIENT) saw: otherwise a chunk
/// would be scanned as commands and a line in it cut out of the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_chunks_follow_what_the_upstream_offered_this_session() {
    with_timeout(TEST_TIMEOUT, async {
        let recorder = Recorder::start_with(true).await;
        let auth = support::AuthServer::start(None).await;
        auth.grant(ACCOUNT, USER);
        let listen = SocketAddr::from((MAILGATE_IP, free_port()));
        let config = format!(
            "listeners:\n  - name: smtp\n    protocol: smtp\n    listen: \"{listen}\"\n    upstream: {{ host: 127.0.0.1, port: {}, tls: none, forward_client: xclient }}\ntokens:\n  auth_server:\n    url: \"{}\"\n",
            recorder.port,
            auth.url(),
        );
        let mailgate = Mailgate::start(&config).await;
        let mut client = SmtpClient::connect_from(listen, CLIENT).await;
        client.command("EHLO client.test").await;
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{ACCOUNT}\0{PASSWORD}"));
        let said = client.pipeline(&format!("AUTH PLAIN {plain}\r\n"), 1).await;
        assert!(said[0].starts_with("235"), "{said:?}\n{}", mailgate.output());
        let chunk = "XCLIENT ADDR=8.8.8.8 is a line of the message\r\n";
        let chunked = format!(
            "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nBDAT {} LAST\r\n{chunk}QUIT\r\n",
            chunk.len()
        );
        let said = client.pipeline(&chunked, 4).await;
        let codes: Vec<&str> = said.iter().map(|reply| &reply[..3]).collect();
        assert_eq!(codes, ["250", "250", "250", "221"], "{said:?}");
        assert!(
            recorder.taken().contains(&format!("chunk: {chunk}")),
            "{:?}",
            recorder.taken()
        );
    })
    .await;
}

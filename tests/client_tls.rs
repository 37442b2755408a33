//! TLS towards clients, with real TLS clients (openssl s_client, curl, Python's imaplib and
//! smtplib) against implicit-TLS and STARTTLS listeners of both protocols, logging in through
//! to the real Dovecot; the STARTTLS injection defence; certificate rotation while a session
//! runs; handshake failures counted by reason.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::process::{run_command, run_command_with_input};
use support::{Mailgate, TEST_TIMEOUT, TestCa, TestUpstream, curl, eventually, free_port};

const ACCOUNT: &str = "acct1";
const USER: &str = "alice@example.test";
const PASSWORD: &str = "client-password-tls-4d1";
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// mailgate with four client-facing listeners (IMAP and SMTP, each with STARTTLS required and
/// with implicit TLS), all in front of the test Dovecot, and an admin endpoint.
struct Setup {
    up: TestUpstream,
    mailgate: Mailgate,
    /// The certificate and key mailgate presents (copies, so a test may replace them).
    certs: tempfile::TempDir,
    imap: SocketAddr,
    imaps: SocketAddr,
    smtp: SocketAddr,
    smtps: SocketAddr,
    admin: u16,
}

impl Setup {
    async fn start() -> Setup {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let certs = tempfile::tempdir().unwrap();
        install_certificate(&up.ca, certs.path(), "1");
        let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
        let mailgate = Mailgate::start(&config(&up, certs.path(), &ports)).await;
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Setup {
            imap: at(ports[0]),
            imaps: at(ports[1]),
            smtp: at(ports[2]),
            smtps: at(ports[3]),
            admin: ports[4],
            up,
            mailgate,
            certs,
        }
    }

    fn ca(&self) -> String {
        self.up.ca_path()
    }

    async fn metrics(&self) -> String {
        curl(&[&format!("http://127.0.0.1:{}/metrics", self.admin)])
            .await
            .stdout
    }
}

/// Mounts `ca`'s server certificate and key in `dir` as Kubernetes mounts a cert-manager
/// Secret (`tls.crt`, `tls.key` through the `..data` link); a later call rotates both at once.
fn install_certificate(ca: &TestCa, dir: &Path, generation: &str) {
    let cert = std::fs::read(ca.cert_pem()).unwrap();
    let key = std::fs::read(ca.key_pem()).unwrap();
    support::kubernetes_secret(dir, generation, &[("tls.crt", &cert), ("tls.key", &key)]);
}

fn config(up: &TestUpstream, certs: &Path, ports: &[u16]) -> String {
    let ca = up.ca_path();
    let (cert, key) = (certs.join("tls.crt"), certs.join("tls.key"));
    let listener = |name: &str, protocol: &str, port: u16, mode: &str, upstream: u16| {
        let upstream_tls = if protocol == "imap" {
            "implicit"
        } else {
            "starttls"
        };
        format!(
            r#"  - name: {name}
    protocol: {protocol}
    listen: "127.0.0.1:{port}"
    tls:
      mode: {mode}
      cert_file: "{cert}"
      key_file: "{key}"
    upstream:
      host: 127.0.0.1
      port: {upstream}
      tls: {upstream_tls}
      ca_file: "{ca}"
      system_roots: false
"#,
            cert = cert.display(),
            key = key.display(),
        )
    };
    let dovecot = &up.dovecot;
    format!(
        "listeners:\n{}{}{}{}tokens:\n  auth_server:\n    url: \"{}\"\n    timeout: 5s\nadmin:\n  listen: \"127.0.0.1:{}\"\nconfig_watch_interval: 200ms\n",
        listener("imap", "imap", ports[0], "starttls", dovecot.imaps_port),
        listener("imaps", "imap", ports[1], "implicit", dovecot.imaps_port),
        listener(
            "smtp",
            "smtp",
            ports[2],
            "starttls",
            dovecot.submission_port
        ),
        listener(
            "smtps",
            "smtp",
            ports[3],
            "implicit",
            dovecot.submission_port
        ),
        up.auth.url_with_credentials(),
        ports[4],
    )
}

async fn python(script: &str, args: &[&str]) -> support::CmdOutput {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run_command("python3", &all, None, TOOL_TIMEOUT).await
}

const PYTHON_IMAP: &str = r#"
import imaplib, ssl, sys
host, port, ca, user, password, mode = sys.argv[1:7]
context = ssl.create_default_context(cafile=ca)
if mode == "implicit":
    imap = imaplib.IMAP4_SSL(host, int(port), ssl_context=context)
else:
    imap = imaplib.IMAP4(host, int(port))
    assert "LOGINDISABLED" in imap.capabilities, imap.capabilities
    imap.starttls(ssl_context=context)
    assert "STARTTLS" not in imap.capabilities, imap.capabilities
print(imap.login(user, password)[0])
typ, folders = imap.list()
print(typ, [f.decode() for f in folders])
imap.logout()
"#;

const PYTHON_SMTP: &str = r#"
import smtplib, ssl, sys
host, port, ca, user, password, mode = sys.argv[1:7]
context = ssl.create_default_context(cafile=ca)
if mode == "implicit":
    smtp = smtplib.SMTP_SSL(host, int(port), context=context)
    smtp.ehlo()
else:
    smtp = smtplib.SMTP(host, int(port))
    smtp.ehlo()
    assert smtp.has_extn("starttls") and not smtp.has_extn("auth"), smtp.esmtp_features
    code, _ = smtp.docmd("AUTH", "PLAIN")
    print("before tls", code)
    smtp.starttls(context=context)
    smtp.ehlo()
    assert not smtp.has_extn("starttls"), smtp.esmtp_features
smtp.login(user, password)
smtp.sendmail("alice@example.test", ["bob@example.test"], "Subject: python " + mode + "\r\n\r\nvia smtplib\r\n")
smtp.quit()
print("sent")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_log_in_over_starttls_and_implicit_tls() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        for (address, mode) in [(s.imap, "starttls"), (s.imaps, "implicit")] {
            let (host, port) = (address.ip().to_string(), address.port().to_string());
            let out = python(
                PYTHON_IMAP,
                &[&host, &port, &s.ca(), ACCOUNT, PASSWORD, mode],
            )
            .await;
            assert!(
                out.success() && out.stdout.contains("INBOX"),
                "imaplib {mode}: {out:?}\n{}",
                s.mailgate.output()
            );
        }
        for (address, mode) in [(s.smtp, "starttls"), (s.smtps, "implicit")] {
            let (host, port) = (address.ip().to_string(), address.port().to_string());
            let out = python(
                PYTHON_SMTP,
                &[&host, &port, &s.ca(), ACCOUNT, PASSWORD, mode],
            )
            .await;
            assert!(
                out.success() && out.stdout.contains("sent"),
                "smtplib {mode}: {out:?}\n{}",
                s.mailgate.output()
            );
            if mode == "starttls" {
                assert!(out.stdout.contains("before tls 530"), "{out:?}");
            }
            let subject = format!("Subject: python {mode}");
            let arrived = eventually(Duration::from_secs(10), || async {
                let messages = s.up.sink.messages();
                messages.iter().any(|m| m.data_str().contains(&subject))
            })
            .await;
            assert!(arrived, "{subject} never reached the sink");
        }
        s.mailgate.assert_not_logged(PASSWORD);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_ssl_reqd_lists_and_sends() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let user = format!("{ACCOUNT}:{PASSWORD}");
        for url in [
            format!("imap://{}/", s.imap),
            format!("imaps://{}/", s.imaps),
        ] {
            let out = curl(&[&url, "--ssl-reqd", "--cacert", &s.ca(), "-u", &user]).await;
            assert!(
                out.success() && out.stdout.contains("INBOX"),
                "{url}: {out:?}\n{}",
                s.mailgate.output()
            );
        }
        let message = s.certs.path().join("message.eml");
        std::fs::write(&message, "Subject: curl over TLS\r\n\r\nhello\r\n").unwrap();
        for url in [format!("smtp://{}", s.smtp), format!("smtps://{}", s.smtps)] {
            let out = curl(&[
                &url,
                "--ssl-reqd",
                "--cacert",
                &s.ca(),
                "-u",
                &user,
                "--mail-from",
                "alice@example.test",
                "--mail-rcpt",
                "bob@example.test",
                "-T",
                message.to_str().unwrap(),
            ])
            .await;
            assert!(out.success(), "{url}: {out:?}\n{}", s.mailgate.output());
        }
        let both =
            s.up.sink
                .wait_for_messages(2, Duration::from_secs(10))
                .await;
        let both = both.expect("both mails arrive");
        assert!(both.iter().all(|m| m.data_str().contains("curl over TLS")));
    })
    .await;
}

/// `openssl s_client` speaks the dialogue read from stdin once TLS is up.
async fn s_client(address: SocketAddr, starttls: Option<&str>, ca: &str, input: &str) -> String {
    let connect = address.to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-CAfile",
        ca,
        "-verify_return_error",
        "-crlf",
        "-quiet",
        "-ign_eof",
    ];
    if let Some(protocol) = starttls {
        args.extend(["-starttls", protocol]);
    }
    let out =
        run_command_with_input("openssl", &args, None, Some(input.as_bytes()), TOOL_TIMEOUT).await;
    assert!(!out.timed_out, "s_client hung: {out:?}");
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_starttls_imap_and_smtp() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let imap = s_client(
            s.imap,
            Some("imap"),
            &s.ca(),
            &format!("a CAPABILITY\nb LOGIN {ACCOUNT} {PASSWORD}\nc LIST \"\" \"*\"\nd LOGOUT\n"),
        )
        .await;
        assert!(imap.contains("a OK"), "{imap}\n{}", s.mailgate.output());
        let capability = imap
            .lines()
            .find(|l| l.starts_with("* CAPABILITY"))
            .unwrap();
        assert!(
            !capability.contains("STARTTLS") && capability.contains("AUTH=PLAIN"),
            "{capability}"
        );
        assert!(imap.contains("b OK"), "{imap}\n{}", s.mailgate.output());
        assert!(imap.contains("INBOX") && imap.contains("c OK"), "{imap}");

        let plain = format!("\0{ACCOUNT}\0{PASSWORD}");
        let plain = mailgate::sasl::encode_challenge(plain.as_bytes());
        let smtp = s_client(
            s.smtp,
            Some("smtp"),
            &s.ca(),
            &format!("EHLO client.test\nAUTH PLAIN {plain}\nQUIT\n"),
        )
        .await;
        assert!(smtp.contains("250-AUTH PLAIN LOGIN") || smtp.contains("250 AUTH PLAIN LOGIN"));
        assert!(!smtp.contains("STARTTLS"), "{smtp}");
        assert!(smtp.contains("235 "), "{smtp}\n{}", s.mailgate.output());

        let implicit = s_client(s.imaps, None, &s.ca(), "a NOOP\na LOGOUT\n").await;
        assert!(implicit.contains("a OK NOOP"), "{implicit}");
        let capability = implicit.lines().next().unwrap_or_default();
        assert!(!capability.contains("STARTTLS"), "{capability}");
    })
    .await;
}

/// Issue 13 item 15 (ALPACA): mailgate set no ALPN, so a client offering only another
/// protocol's id (a browser's `http/1.1`) was served. Now it is refused at the handshake and
/// counted; a client offering the listener's id, or none, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_offering_another_protocols_alpn_are_refused() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let imap = "a NOOP\na LOGOUT\n";
        let smtp = "EHLO client.test\nQUIT\n";
        let cases = [
            (s.imaps, None, Some("http/1.1"), imap, None),
            (s.imaps, None, Some("h2,imap"), imap, Some("a OK")),
            (s.imaps, None, None, imap, Some("a OK")),
            (s.imap, Some("imap"), Some("http/1.1"), imap, None),
            (s.imap, Some("imap"), Some("imap"), imap, Some("a OK")),
            (s.smtps, None, Some("http/1.1"), smtp, None),
            (s.smtps, None, Some("smtp"), smtp, Some("221 ")),
            (s.smtps, None, None, smtp, Some("221 ")),
            (s.smtp, Some("smtp"), Some("imap"), smtp, None),
        ];
        for (address, starttls, alpn, input, served) in cases {
            let out = s_client_alpn(address, starttls, alpn, &s.ca(), input).await;
            match served {
                Some(answer) => assert!(
                    out.stdout.contains(answer),
                    "{address} {alpn:?}: {out:?}\n{}",
                    s.mailgate.output()
                ),
                None => assert!(
                    !out.success() && out.stderr.contains("no application protocol"),
                    "{address} {alpn:?} was served: {out:?}"
                ),
            }
        }
        let series = |listener: &str| {
            format!(
                "mailgate_client_tls_handshakes_total{{listener=\"{listener}\",result=\"wrong_alpn\"}}"
            )
        };
        let text = s.metrics().await;
        for (listener, refused) in [("imaps", 1.0), ("imap", 1.0), ("smtps", 1.0), ("smtp", 1.0)] {
            assert_eq!(metric(&text, &series(listener)), refused, "{text}");
        }
    })
    .await;
}

/// `openssl s_client` offering the ALPN ids `alpn` (comma-separated), or none.
async fn s_client_alpn(
    address: SocketAddr,
    starttls: Option<&str>,
    alpn: Option<&str>,
    ca: &str,
    input: &str,
) -> support::CmdOutput {
    let connect = address.to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-CAfile",
        ca,
        "-verify_return_error",
        "-crlf",
        "-quiet",
    ];
    if let Some(protocol) = starttls {
        args.extend(["-starttls", protocol]);
    }
    if let Some(alpn) = alpn {
        args.extend(["-alpn", alpn]);
    }
    let out =
        run_command_with_input("openssl", &args, None, Some(input.as_bytes()), TOOL_TIMEOUT).await;
    assert!(!out.timed_out, "s_client hung: {out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_logins_are_refused_where_tls_is_required() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let mut imap = Plain::connect(s.imap).await;
        let greeting = imap.line().await;
        assert!(
            greeting.contains("STARTTLS LOGINDISABLED") && !greeting.contains("AUTH="),
            "{greeting}"
        );
        imap.send(&format!("a LOGIN {ACCOUNT} {PASSWORD}\r\n"))
            .await;
        assert_eq!(
            imap.line().await,
            "a NO [PRIVACYREQUIRED] Log in after STARTTLS"
        );
        imap.send("b AUTHENTICATE PLAIN\r\n").await;
        assert!(imap.line().await.starts_with("b NO [PRIVACYREQUIRED]"));

        let mut smtp = Plain::connect(s.smtp).await;
        assert!(smtp.line().await.starts_with("220 "));
        smtp.send("EHLO client.test\r\n").await;
        let ehlo = smtp.reply().await;
        assert!(
            ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
            "{ehlo}"
        );
        for command in ["AUTH PLAIN", "MAIL FROM:<alice@example.test>"] {
            smtp.send(&format!("{command}\r\n")).await;
            assert_eq!(
                smtp.line().await,
                "530 5.7.0 Must issue a STARTTLS command first"
            );
        }
        assert_eq!(s.up.auth.requests(ACCOUNT), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_with_starttls_are_not_run_after_the_handshake() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let tls = TlsClient::trusting(&s.up.ca.ca_pem());

        let mut imap = Plain::connect(s.imap).await;
        imap.line().await;
        imap.send("a STARTTLS\r\nb NOOP\r\n").await;
        assert_eq!(imap.line().await, "a OK Begin TLS negotiation now");
        let mut secured = tls.upgrade(imap).await;
        secured.send("c NOOP\r\n").await;
        assert_eq!(secured.line().await, "c OK NOOP completed");

        let mut smtp = Plain::connect(s.smtp).await;
        smtp.line().await;
        smtp.send("EHLO client.test\r\n").await;
        smtp.reply().await;
        smtp.send("STARTTLS\r\nNOOP\r\n").await;
        assert_eq!(smtp.line().await, "220 2.0.0 Ready to start TLS");
        let mut secured = tls.upgrade(smtp).await;
        secured.send("EHLO again.test\r\n").await;
        let ehlo = secured.reply().await;
        assert!(
            ehlo.starts_with("250-") && ehlo.contains("AUTH PLAIN LOGIN"),
            "the NOOP sent before the handshake was answered: {ehlo}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_sessions_and_open_ones_go_on() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let old_ca = TlsClient::trusting(&s.up.ca.ca_pem());
        let mut open = old_ca.connect(s.imaps).await;
        open.line().await;
        open.send(&format!("a LOGIN {ACCOUNT} {PASSWORD}\r\n"))
            .await;
        assert!(open.line_tagged("a").await.starts_with("a OK"));

        let renewed = TestCa::create().await;
        install_certificate(&renewed, s.certs.path(), "2");
        let new_ca = TlsClient::trusting(&renewed.ca_pem());
        let picked_up = eventually(Duration::from_secs(10), || async {
            new_ca.try_connect(s.imaps).await.is_some()
        })
        .await;
        assert!(
            picked_up,
            "new certificate not served\n{}",
            s.mailgate.output()
        );
        assert!(old_ca.try_connect(s.imaps).await.is_none());
        open.send("b NOOP\r\n").await;
        assert!(open.line_tagged("b").await.starts_with("b OK"));

        // A broken pair (this key belongs to another certificate) keeps the current one.
        let before = s.metrics().await;
        let mismatched = std::fs::read(s.up.ca.key_pem()).unwrap();
        let current = std::fs::read(renewed.cert_pem()).unwrap();
        support::kubernetes_secret(
            s.certs.path(),
            "3",
            &[("tls.crt", &current), ("tls.key", &mismatched)],
        );
        let refused = eventually(Duration::from_secs(10), || async {
            metric(
                &s.metrics().await,
                "mailgate_config_reloads_total{result=\"invalid\"}",
            ) > metric(&before, "mailgate_config_reloads_total{result=\"invalid\"}")
        })
        .await;
        assert!(refused, "broken pair not refused\n{}", s.mailgate.output());
        assert!(new_ca.try_connect(s.imaps).await.is_some());
        assert!(
            s.mailgate.output().contains("private key"),
            "{}",
            s.mailgate.output()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_by_reason() {
    support::with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        // A plaintext client on the implicit-TLS port.
        let mut plain = Plain::connect(s.imaps).await;
        plain.send("a LOGIN alice secret\r\n").await;
        // A client that trusts only the public CAs, not the test CA.
        assert!(TlsClient::public().try_connect(s.imaps).await.is_none());
        let series = |result: &str| {
            format!(
                "mailgate_client_tls_handshakes_total{{listener=\"imaps\",result=\"{result}\"}}"
            )
        };
        let counted = eventually(Duration::from_secs(10), || async {
            let text = s.metrics().await;
            metric(&text, &series("not_tls")) == 1.0
                && metric(&text, &series("certificate_refused")) == 1.0
        })
        .await;
        assert!(counted, "{}\n{}", s.metrics().await, s.mailgate.output());
        let text = s.metrics().await;
        assert!(metric(&text, &series("ok")) >= 0.0 && text.contains(&series("timeout")));
    })
    .await;
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(-1.0)
}

/// A line-oriented client over any stream.
struct Lines<S> {
    stream: BufReader<S>,
}

type Plain = Lines<TcpStream>;

impl Plain {
    async fn connect(address: SocketAddr) -> Plain {
        Lines {
            stream: BufReader::new(TcpStream::connect(address).await.unwrap()),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Lines<S> {
    async fn send(&mut self, text: &str) {
        self.stream
            .get_mut()
            .write_all(text.as_bytes())
            .await
            .unwrap();
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut line))
            .await
            .expect("a line in time")
            .unwrap();
        line.trim_end().to_owned()
    }

    /// An SMTP reply, all its lines.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let line = self.line().await;
            all.push_str(&line);
            all.push('\n');
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// IMAP: lines up to the one tagged `tag`, which is returned.
    async fn line_tagged(&mut self, tag: &str) -> String {
        loop {
            let line = self.line().await;
            if line.starts_with(&format!("{tag} ")) {
                return line;
            }
        }
    }
}

/// A TLS client trusting one CA, for 127.0.0.1.
struct TlsClient(tokio_rustls::TlsConnector);

impl TlsClient {
    fn trusting(ca: &Path) -> TlsClient {
        mailgate::tls::install_crypto_provider();
        let config = mailgate::tls::client_config(Some(ca), false).unwrap();
        TlsClient(tokio_rustls::TlsConnector::from(config))
    }

    /// Trusting the system's roots only.
    fn public() -> TlsClient {
        mailgate::tls::install_crypto_provider();
        let config = mailgate::tls::client_config(None, true).unwrap();
        TlsClient(tokio_rustls::TlsConnector::from(config))
    }

    fn server_name() -> rustls_pki_types::ServerName<'static> {
        rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
    }

    async fn upgrade(&self, plain: Plain) -> Lines<tokio_rustls::client::TlsStream<TcpStream>> {
        // Nothing may be buffered: the server's next bytes are its handshake.
        assert!(plain.stream.buffer().is_empty());
        let stream = self
            .0
            .connect(Self::server_name(), plain.stream.into_inner())
            .await
            .expect("handshake");
        Lines {
            stream: BufReader::new(stream),
        }
    }

    async fn try_connect(
        &self,
        address: SocketAddr,
    ) -> Option<Lines<tokio_rustls::client::TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect(address).await.ok()?;
        let mut lines = Lines {
            stream: BufReader::new(self.0.connect(Self::server_name(), tcp).await.ok()?),
        };
        // TLS 1.3 reports a refused certificate only on the first read.
        let greeting = tokio::time::timeout(Duration::from_secs(5), async {
            let mut line = String::new();
            lines
                .stream
                .read_line(&mut line)
                .await
                .ok()
                .filter(|&n| n > 0)?;
            Some(line)
        })
        .await
        .ok()??;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        Some(lines)
    }

    async fn connect(
        &self,
        address: SocketAddr,
    ) -> Lines<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(address).await.unwrap();
        Lines {
            stream: BufReader::new(self.0.connect(Self::server_name(), tcp).await.unwrap()),
        }
    }
}

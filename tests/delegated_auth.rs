//! End to end with delegated client authentication: clients log in to mailgate with a user
//! name and password that an auth server (`client_auth.mode: auth_server`) or an OAuth2
//! provider's password grant (`oauth2_password`) checks, and mailgate logs in to the real
//! Dovecot with a token. Right passwords are remembered for a while, wrong ones never, and a
//! check that cannot be made is a temporary failure.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::imap_client::ImapClient;
use support::oauth2::{ClientCredential, GRANT_PASSWORD, OAuthProvider};
use support::{
    AuthServer, Mailgate, TEST_TIMEOUT, TestUpstream, curl, curl_send_mail, free_port, with_timeout,
};

const LOGIN: &str = "alice";
const ACCOUNT: &str = "acct-alice";
const MAILBOX: &str = "alice@example.test";
const RIGHT: &str = "right-password-51f";
const WRONG: &str = "wrong-password-9c2";
const CLIENT: &str = "mailgate";
const CLIENT_SECRET: &str = "client-secret-77d";
/// Short delays, so that refused logins do not slow the tests.
const THROTTLE: &str = "  throttle: { failure_delay: 50ms, max_failure_delay: 100ms }\n";

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// mailgate's ports: IMAP, SMTP and admin.
struct Ports {
    imap: u16,
    smtp: u16,
    admin: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            imap: free_port(),
            smtp: free_port(),
            admin: free_port(),
        }
    }

    /// The test upstream's listeners with tokens from its auth server, the admin endpoint,
    /// trace logging and the given `client_auth` lines.
    fn config(&self, up: &TestUpstream, client_auth: &str) -> String {
        format!(
            "{}admin: {{ listen: \"127.0.0.1:{}\" }}\nlog: {{ level: trace }}\nclient_auth:\n{client_auth}{THROTTLE}",
            up.mailgate_config(self.imap, self.smtp),
            self.admin
        )
    }

    async fn imap_login(&self, user: &str, password: &str) -> (ImapClient, String) {
        let mut client = ImapClient::connect(localhost(self.imap)).await;
        let login = client.login(user, password).await;
        (client, login.tagged)
    }

    async fn metrics(&self) -> String {
        curl(&[&format!("http://127.0.0.1:{}/metrics", self.admin)])
            .await
            .stdout
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn checks(text: &str, result: &str) -> f64 {
    metric(
        text,
        &format!("mailgate_password_checks_total{{result=\"{result}\"}}"),
    )
}

/// An SMTP session up to the answer to `AUTH PLAIN` with `user` and `password`.
async fn smtp_auth(port: u16, user: &str, password: &str) -> String {
    let stream = TcpStream::connect(localhost(port)).await.expect("connect");
    let mut reader = BufReader::new(stream);
    reply(&mut reader).await;
    reader
        .get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    reply(&mut reader).await;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    let command = format!("AUTH PLAIN {plain}\r\n");
    reader
        .get_mut()
        .write_all(command.as_bytes())
        .await
        .unwrap();
    reply(&mut reader).await
}

/// The last line of one SMTP reply.
async fn reply(reader: &mut BufReader<TcpStream>) -> String {
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line));
        assert!(
            read.await.expect("reply in time").expect("read") > 0,
            "closed"
        );
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.trim_end().to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_server_checks_passwords_and_remembers_only_the_right_one() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.add_password(LOGIN, RIGHT, Some(ACCOUNT));
        let token = up.auth.grant(ACCOUNT, MAILBOX);
        let ports = Ports::new();
        let client_auth = format!(
            "  mode: auth_server\n  auth_server: {{ url: \"{}\" }}\n",
            up.auth.check_url()
        );
        let mailgate = Mailgate::start(&ports.config(&up, &client_auth)).await;

        // The right password logs in through Dovecot, with the token of the account the
        // auth server named.
        let (mut client, login) = ports.imap_login(LOGIN, RIGHT).await;
        assert!(login.contains("OK"), "{login}\n{}", mailgate.output());
        let list = client.command("LIST \"\" \"*\"").await;
        assert!(list.is_ok(), "{list:?}");
        assert!(
            list.untagged.iter().any(|line| line.contains("INBOX")),
            "{list:?}"
        );
        assert_eq!(up.auth.requests(ACCOUNT), 1);
        // The session belongs to the account the auth server named (revocation ends it).
        let mapped = support::eventually(Duration::from_secs(5), || async {
            mailgate.output().lines().any(|line| {
                line.contains("logged in")
                    && line.contains(&format!("account={ACCOUNT}"))
                    && line.contains(&format!("user={LOGIN}"))
            })
        })
        .await;
        assert!(mapped, "{}", mailgate.output());
        let check = &up.auth.password_checks()[0];
        assert_eq!(check.method, "POST");
        assert_eq!(check.content_type.as_deref(), Some("application/json"));
        assert!(!check.has_query, "{check:?}");
        assert_eq!(check.user.as_deref(), Some(LOGIN));
        assert_eq!(check.protocol.as_deref(), Some("imap"));
        assert_eq!(check.client.as_deref(), Some("127.0.0.1"));

        // A mail client's next connection: remembered, not asked again.
        let (_second, login) = ports.imap_login(LOGIN, RIGHT).await;
        assert!(login.contains("OK"), "{login}");
        assert_eq!(up.auth.password_checks().len(), 1);

        // A wrong password is refused, each time by the auth server: never remembered.
        for attempt in 1..=2 {
            let (_client, login) = ports.imap_login(LOGIN, WRONG).await;
            assert!(login.contains("NO [AUTHENTICATIONFAILED]"), "{login}");
            let seen = up.auth.password_checks();
            assert_eq!(seen.len(), 1 + attempt);
            assert!(!seen.last().unwrap().accepted);
        }
        assert_eq!(
            up.auth.requests(ACCOUNT),
            1,
            "no token for a wrong password"
        );

        let text = ports.metrics().await;
        assert_eq!(checks(&text, "ok"), 1.0, "{text}");
        assert_eq!(checks(&text, "remembered"), 1.0, "{text}");
        assert_eq!(checks(&text, "wrong_password"), 2.0, "{text}");
        assert!(text.contains("mailgate_password_checks_total{result=\"unavailable\"} 0"));
        let refused = "mailgate_logins_total{listener=\"imap\",result=\"bad_credentials\"}";
        assert_eq!(metric(&text, refused), 2.0, "{text}");
        for secret in [RIGHT, WRONG, token.as_str()] {
            mailgate.assert_not_logged(secret);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_server_with_basic_auth_lets_the_right_password_send_mail() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let checker = AuthServer::start_with_basic_auth(None, "mailgate", "check-secret-3a").await;
        checker.add_password(MAILBOX, RIGHT, None);
        up.auth.grant(MAILBOX, MAILBOX);
        let ports = Ports::new();
        let password_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(password_file.path(), "check-secret-3a\n").unwrap();
        let client_auth = format!(
            "  mode: auth_server\n  auth_server:\n    url: \"http://mailgate@{}/check\"\n    password_file: \"{}\"\n",
            checker.addr(),
            password_file.path().display()
        );
        let mailgate = Mailgate::start(&ports.config(&up, &client_auth)).await;

        let message = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(message.path(), "Subject: delegated\r\n\r\nhello\r\n").unwrap();
        let credentials = format!("{MAILBOX}:{RIGHT}");
        let smtp = localhost(ports.smtp);
        let sent = curl_send_mail(smtp, &credentials, MAILBOX, "bob@example.test", message.path())
            .await;
        assert!(sent.success(), "{sent:?}\n{}", mailgate.output());
        let received = up.sink.wait_for_message(Duration::from_secs(10)).await;
        assert!(received.data_str().contains("delegated"));
        let check = &checker.password_checks()[0];
        assert!(check.authorized && check.accepted, "{check:?}");
        assert_eq!(check.protocol.as_deref(), Some("smtp"));

        let refused = smtp_auth(ports.smtp, MAILBOX, WRONG).await;
        assert!(refused.starts_with("535 5.7.8"), "{refused}");
        assert_eq!(checker.password_checks().len(), 2);
        assert_eq!(up.auth.requests(MAILBOX), 1, "no token for a wrong password");
        for secret in [RIGHT, WRONG, "check-secret-3a"] {
            mailgate.assert_not_logged(secret);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_server_that_cannot_answer_is_a_temporary_failure_not_a_failed_login() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.add_password(LOGIN, RIGHT, Some(ACCOUNT));
        up.auth.grant(ACCOUNT, MAILBOX);
        let nobody = free_port();
        let ports = Ports::new();
        let unreachable = format!(
            "  mode: auth_server\n  auth_server: {{ url: \"http://127.0.0.1:{nobody}/check\", timeout: 2s }}\n  throttle: {{ block_address_after: 2 }}\n"
        );
        let config = ports.config(&up, &unreachable).replace(THROTTLE, "");
        let mailgate = Mailgate::start(&config).await;
        let (_client, login) = ports.imap_login(LOGIN, RIGHT).await;
        assert!(login.contains("NO [UNAVAILABLE]"), "{login}");
        let answer = smtp_auth(ports.smtp, LOGIN, RIGHT).await;
        assert!(answer.starts_with("454 4.7.0"), "{answer}");
        let text = ports.metrics().await;
        assert_eq!(checks(&text, "unavailable"), 2.0, "{text}");
        let temporary = "mailgate_logins_total{listener=\"imap\",result=\"check_unavailable\"}";
        assert_eq!(metric(&text, temporary), 1.0, "{text}");
        drop(mailgate);

        // An auth server answering 503: temporary too, and not counted against the client,
        // whose address would otherwise be blocked after two failures.
        let reachable = unreachable.replace(
            &format!("http://127.0.0.1:{nobody}/check"),
            &up.auth.check_url(),
        );
        let config = ports.config(&up, &reachable).replace(THROTTLE, "");
        let mailgate = Mailgate::start(&config).await;
        up.auth.set_check_status(Some(503));
        for _ in 0..3 {
            let (_client, login) = ports.imap_login(LOGIN, RIGHT).await;
            assert!(login.contains("NO [UNAVAILABLE]"), "{login}");
        }
        up.auth.set_check_status(None);
        let (_client, login) = ports.imap_login(LOGIN, RIGHT).await;
        assert!(login.contains("OK"), "{login}\n{}", mailgate.output());
        mailgate.assert_not_logged(RIGHT);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_passwords_are_throttled_as_in_static_mode() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.add_password(LOGIN, RIGHT, Some(ACCOUNT));
        up.auth.grant(ACCOUNT, MAILBOX);
        let ports = Ports::new();
        let client_auth = format!(
            "  mode: auth_server\n  auth_server: {{ url: \"{}\" }}\n  throttle: {{ failure_delay: 200ms, max_failure_delay: 400ms, block_address_after: 3 }}\n",
            up.auth.check_url()
        );
        let config = ports.config(&up, &client_auth).replace(THROTTLE, "");
        let mailgate = Mailgate::start(&config).await;
        let mut waited = Vec::new();
        for guess in 0..3 {
            let started = tokio::time::Instant::now();
            let (_client, login) = ports.imap_login(LOGIN, &format!("{WRONG}-{guess}")).await;
            assert!(login.contains("NO [AUTHENTICATIONFAILED]"), "{login}");
            waited.push(started.elapsed());
        }
        // A login waits before its check, longer the more often the address failed.
        assert!(waited[1] >= Duration::from_millis(200), "{waited:?}");
        assert!(waited[2] >= Duration::from_millis(400), "{waited:?}");
        // Blocked now: even the right password is refused without asking the auth server.
        let (_client, login) = ports.imap_login(LOGIN, RIGHT).await;
        assert!(login.contains("NO [UNAVAILABLE]"), "{login}");
        assert_eq!(up.auth.password_checks().len(), 3);
        let text = ports.metrics().await;
        assert_eq!(
            metric(&text, "mailgate_login_blocks_total{scope=\"address\"}"),
            1.0,
            "{text}"
        );
        mailgate.assert_not_logged(WRONG);
    })
    .await;
}

/// The test upstream, an OAuth2 provider whose tokens Dovecot accepts, and mailgate's config
/// checking passwords with the provider's password grant.
async fn password_grant_setup() -> (
    TestUpstream,
    OAuthProvider,
    Ports,
    tempfile::TempDir,
    String,
) {
    let up = TestUpstream::start().await;
    let provider = OAuthProvider::start(&up.introspection).await;
    provider.add_client(CLIENT, ClientCredential::Secret(CLIENT_SECRET.to_owned()));
    provider.add_user(MAILBOX, RIGHT);
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let ports = Ports::new();
    let listeners = ports.config(&up, "");
    let listeners = listeners.split("tokens:").next().unwrap();
    let config = format!(
        r#"{listeners}admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: trace }}
tokens:
  oauth2:
    timeout: 5s
    providers:
      local:
        preset: custom
        token_url: "{token_url}"
        client_id: {CLIENT}
        client_secret_file: "{secret}"
        client_auth_method: basic
client_auth:
  mode: oauth2_password
  oauth2_password: {{ provider: local, scope: "mail" }}
{THROTTLE}"#,
        admin = ports.admin,
        token_url = provider.token_url(),
        secret = secret_file.display(),
    );
    (up, provider, ports, dir, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_grant_token_serves_only_logins_with_the_same_password() {
    with_timeout(TEST_TIMEOUT, async {
        let (up, provider, ports, _dir, config) = password_grant_setup().await;
        let mailgate = Mailgate::start(&config).await;

        // The right password: one grant, and its token logs in to Dovecot.
        let (mut client, login) = ports.imap_login(MAILBOX, RIGHT).await;
        assert!(login.contains("OK"), "{login}\n{}", mailgate.output());
        assert!(client.command("SELECT INBOX").await.is_ok());
        let grant = provider.token_requests().pop().unwrap();
        assert_eq!(grant.grant_type, GRANT_PASSWORD);
        assert_eq!(grant.client_auth.as_str(), "basic");
        assert_eq!(grant.scope.as_deref(), Some("mail"));
        let access_token = grant.access_token.clone().unwrap();

        // The same password again, over IMAP and SMTP: the cached token, no new grant.
        let (_second, login) = ports.imap_login(MAILBOX, RIGHT).await;
        assert!(login.contains("OK"), "{login}");
        let message = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(message.path(), "Subject: granted\r\n\r\nhello\r\n").unwrap();
        let credentials = format!("{MAILBOX}:{RIGHT}");
        let smtp = localhost(ports.smtp);
        let sent = curl_send_mail(
            smtp,
            &credentials,
            MAILBOX,
            "bob@example.test",
            message.path(),
        )
        .await;
        assert!(sent.success(), "{sent:?}\n{}", mailgate.output());
        assert!(
            up.sink
                .wait_for_message(Duration::from_secs(10))
                .await
                .data_str()
                .contains("granted")
        );
        assert_eq!(provider.count(GRANT_PASSWORD), 1);

        // Another password for the same account never gets that token: each try is a grant
        // the provider refuses.
        for attempt in 1..=2 {
            let (_client, login) = ports.imap_login(MAILBOX, WRONG).await;
            assert!(login.contains("NO [AUTHENTICATIONFAILED]"), "{login}");
            assert_eq!(provider.count(GRANT_PASSWORD), 1 + attempt);
            assert_eq!(
                provider.token_requests().pop().unwrap().result,
                "invalid_grant"
            );
        }
        let refused = smtp_auth(ports.smtp, MAILBOX, WRONG).await;
        assert!(refused.starts_with("535 5.7.8"), "{refused}");
        assert_eq!(provider.count(GRANT_PASSWORD), 4);
        assert_eq!(provider.count_ok(GRANT_PASSWORD), 1);

        let text = ports.metrics().await;
        assert_eq!(checks(&text, "ok"), 1.0, "{text}");
        assert_eq!(checks(&text, "remembered"), 2.0, "{text}");
        assert_eq!(checks(&text, "wrong_password"), 3.0, "{text}");
        for secret in [RIGHT, WRONG, CLIENT_SECRET, access_token.as_str()] {
            mailgate.assert_not_logged(secret);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_is_a_temporary_failure_and_remember_zero_grants_every_login() {
    with_timeout(TEST_TIMEOUT, async {
        let (_up, provider, ports, _dir, config) = password_grant_setup().await;
        let config = config.replace(THROTTLE, &format!("  remember: 0s\n{THROTTLE}"));
        let mailgate = Mailgate::start(&config).await;
        provider.fail_next(1, 503, "temporarily_unavailable");
        let (_client, login) = ports.imap_login(MAILBOX, RIGHT).await;
        assert!(login.contains("NO [UNAVAILABLE]"), "{login}");
        // A misconfigured client is the operator's problem, not a wrong password.
        provider.fail_next(1, 401, "invalid_client");
        let answer = smtp_auth(ports.smtp, MAILBOX, RIGHT).await;
        assert!(answer.starts_with("454 4.7.0"), "{answer}");
        for _ in 0..2 {
            let (_client, login) = ports.imap_login(MAILBOX, RIGHT).await;
            assert!(login.contains("OK"), "{login}\n{}", mailgate.output());
        }
        assert_eq!(provider.count_ok(GRANT_PASSWORD), 2, "nothing remembered");
        let text = ports.metrics().await;
        assert_eq!(checks(&text, "unavailable"), 2.0, "{text}");
        assert_eq!(checks(&text, "remembered"), 0.0, "{text}");
        mailgate.assert_not_logged(RIGHT);
        mailgate.assert_not_logged(CLIENT_SECRET);
    })
    .await;
}

//! End to end: real clients (curl, a raw IMAP client) log in to mailgate with plain
//! credentials; mailgate gets tokens from the test auth server and logs in to a real Dovecot
//! with XOAUTH2 or OAUTHBEARER, over implicit TLS or STARTTLS.

mod support;

use std::net::SocketAddr;

use support::imap_client::ImapClient;
use support::{
    AuthAnswer, Mailgate, TEST_TIMEOUT, TestUpstream, curl, curl_send_mail, free_port, with_timeout,
};

const ACCOUNT: &str = "acct1";
const USER: &str = "alice@example.test";
const PASSWORD: &str = "client-password-9f3";

/// How one listener reaches Dovecot.
struct Route {
    protocol: &'static str,
    tls: &'static str,
    mechanism: &'static str,
}

impl Route {
    fn upstream_port(&self, up: &TestUpstream) -> u16 {
        let dovecot = &up.dovecot;
        match (self.protocol, self.tls) {
            ("imap", "implicit") => dovecot.imaps_port,
            ("imap", _) => dovecot.imap_port,
            (_, "implicit") => dovecot.submissions_port,
            _ => dovecot.submission_port,
        }
    }
}

/// A config with one listener on `port` for `route`, tokens from the test auth server.
fn config(up: &TestUpstream, port: u16, route: &Route, auth_url: &str) -> String {
    format!(
        r#"listeners:
  - name: {protocol}
    protocol: {protocol}
    listen: "127.0.0.1:{port}"
    upstream:
      host: 127.0.0.1
      port: {upstream_port}
      tls: {tls}
      ca_file: "{ca}"
      system_roots: false
      mechanism: {mechanism}
tokens:
  auth_server:
    url: "{auth_url}"
    timeout: 2s
"#,
        protocol = route.protocol,
        upstream_port = route.upstream_port(up),
        tls = route.tls,
        ca = up.ca_path(),
        mechanism = route.mechanism,
    )
}

async fn start(up: &TestUpstream, route: &Route) -> (Mailgate, SocketAddr) {
    let port = free_port();
    let mailgate = Mailgate::start(&config(up, port, route, &up.auth.url())).await;
    (mailgate, SocketAddr::from(([127, 0, 0, 1], port)))
}

const IMAPS_XOAUTH2: Route = Route {
    protocol: "imap",
    tls: "implicit",
    mechanism: "xoauth2",
};
const IMAP_STARTTLS_OAUTHBEARER: Route = Route {
    protocol: "imap",
    tls: "starttls",
    mechanism: "oauthbearer",
};
const SUBMISSION_STARTTLS_AUTO: Route = Route {
    protocol: "smtp",
    tls: "starttls",
    mechanism: "auto",
};
const SUBMISSIONS_OAUTHBEARER: Route = Route {
    protocol: "smtp",
    tls: "implicit",
    mechanism: "oauthbearer",
};

async fn curl_imap(
    address: SocketAddr,
    path: &str,
    login_options: &str,
    extra: &[&str],
) -> support::CmdOutput {
    let url = format!("imap://{address}/{path}");
    let user = format!("{ACCOUNT}:{PASSWORD}");
    let mut args = vec![url.as_str(), "-u", &user, "--login-options", login_options];
    args.extend_from_slice(extra);
    curl(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_login_lists_folders_and_appends_over_implicit_tls_xoauth2() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = up.auth.grant(ACCOUNT, USER);
        let (mailgate, address) = start(&up, &IMAPS_XOAUTH2).await;

        // SASL PLAIN and SASL LOGIN (the LOGIN command is the raw client's, below).
        for options in ["AUTH=PLAIN", "AUTH=LOGIN"] {
            let out = curl_imap(address, "", options, &["-X", r#"LIST "" "*""#]).await;
            assert!(
                out.success(),
                "{options}: {out:?}\n{}\n{}",
                mailgate.output(),
                up.dovecot.log()
            );
            assert!(
                out.stdout.contains("INBOX"),
                "{options}: no INBOX in {out:?}"
            );
        }

        let message = mailgate.dir().join("note.eml");
        std::fs::write(
            &message,
            "Subject: appended-through-mailgate\r\n\r\nhello\r\n",
        )
        .unwrap();
        let out = curl_imap(
            address,
            "INBOX",
            "AUTH=PLAIN",
            &["-T", message.to_str().unwrap()],
        )
        .await;
        assert!(out.success(), "append: {out:?}");

        let mut client = ImapClient::connect(address).await;
        assert!(client.login(ACCOUNT, PASSWORD).await.is_ok());
        assert!(client.command("SELECT INBOX").await.is_ok());
        let found = client
            .command(r#"SEARCH SUBJECT "appended-through-mailgate""#)
            .await;
        assert!(
            found
                .untagged
                .iter()
                .any(|l| l.starts_with("* SEARCH ") && l.len() > 9),
            "{found:?}"
        );

        assert_eq!(
            up.auth.requests(ACCOUNT),
            1,
            "one token fetch for every login"
        );
        assert!(up.introspection.checked_tokens().contains(&token));
        mailgate.assert_not_logged(&token);
        mailgate.assert_not_logged(PASSWORD);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_login_over_starttls_with_oauthbearer() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address) = start(&up, &IMAP_STARTTLS_OAUTHBEARER).await;

        let mut client = ImapClient::connect(address).await;
        assert!(client.greeting.starts_with("* OK"), "{}", client.greeting);
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        // The upstream's post-login capabilities reach the client in the tagged OK.
        assert!(login.tagged.contains("CAPABILITY"), "{login:?}");
        let list = client.command(r#"LIST "" "*""#).await;
        assert!(
            list.untagged.iter().any(|l| l.contains("INBOX")),
            "{list:?}"
        );
        let log = up.dovecot.log();
        assert!(log.contains("\tOAUTHBEARER\tservice=imap"), "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_after_login_reach_the_upstream() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (_mailgate, address) = start(&up, &IMAPS_XOAUTH2).await;

        let mut client = ImapClient::connect(address).await;
        client
            .send_raw(
                format!("a LOGIN {ACCOUNT} {PASSWORD}\r\nb SELECT INBOX\r\nc LOGOUT\r\n")
                    .as_bytes(),
            )
            .await;
        assert!(client.until_tagged("a").await.is_ok());
        assert!(client.until_tagged("b").await.is_ok());
        let logout = client.until_tagged("c").await;
        assert!(
            logout.untagged.iter().any(|l| l.starts_with("* BYE")),
            "{logout:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_mail_sent_through_mailgate_arrives() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = up.auth.grant(ACCOUNT, USER);
        for (sent, route) in [&SUBMISSION_STARTTLS_AUTO, &SUBMISSIONS_OAUTHBEARER]
            .into_iter()
            .enumerate()
        {
            let (mailgate, address) = start(&up, route).await;
            let message = mailgate.dir().join("mail.eml");
            let subject = format!("sent-through-mailgate-{}", route.tls);
            std::fs::write(
                &message,
                format!(
                    "From: {USER}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n"
                ),
            )
            .unwrap();
            let user = format!("{ACCOUNT}:{PASSWORD}");
            let out = curl_send_mail(address, &user, USER, "bob@example.test", &message).await;
            assert!(
                out.success(),
                "{out:?}\n{}\n{}",
                mailgate.output(),
                up.dovecot.log()
            );
            let received = up
                .sink
                .wait_for_messages(sent + 1, std::time::Duration::from_secs(10))
                .await
                .and_then(|mut messages| messages.pop())
                .expect("the mail arrives at the sink");
            assert!(received.data_str().contains(&subject), "{received:?}");
            assert_eq!(received.rcpts, ["bob@example.test"]);
            mailgate.assert_not_logged(&token);
            mailgate.assert_not_logged(PASSWORD);
        }
        let log = up.dovecot.log();
        assert!(
            log.contains("\tXOAUTH2\tservice=submission"),
            "auto picks XOAUTH2: {log}"
        );
        assert!(log.contains("\tOAUTHBEARER\tservice=submission"), "{log}");
    })
    .await;
}

/// The EHLO reply of a fresh SMTP session.
async fn smtp_ehlo(address: SocketAddr) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    let mut reply = String::new();
    reader.read_line(&mut reply).await.unwrap();
    reader
        .get_mut()
        .write_all(b"EHLO c.test\r\n")
        .await
        .unwrap();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap() == 0 {
            return reply;
        }
        reply.push_str(&line);
        if line.starts_with("250 ") {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_login_and_ehlo_shows_upstream_extensions() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (mailgate, address) = start(&up, &SUBMISSION_STARTTLS_AUTO).await;
        // mailgate reads the upstream's extensions in the background after it starts; until
        // then EHLO offers only what mailgate vouches for itself.
        let learnt = support::eventually(std::time::Duration::from_secs(10), || async {
            smtp_ehlo(address).await.contains("SIZE")
        })
        .await;
        assert!(learnt, "{}", mailgate.output());
        let url = format!("smtp://{address}");
        let user = format!("{ACCOUNT}:{PASSWORD}");
        let out = curl(&[
            "-v",
            &url,
            "-u",
            &user,
            "--login-options",
            "AUTH=LOGIN",
            "-X",
            "NOOP",
        ])
        .await;
        assert!(out.success(), "{out:?}\n{}", mailgate.output());
        for extension in [
            "SIZE",
            "8BITMIME",
            "PIPELINING",
            "CHUNKING",
            "AUTH PLAIN LOGIN",
        ] {
            assert!(
                out.stderr.contains(extension),
                "{extension} missing: {}",
                out.stderr
            );
        }
        assert!(
            !out.stderr.contains("STARTTLS"),
            "mailgate must not offer STARTTLS"
        );
        assert!(out.stderr.contains("235"), "{}", out.stderr);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_upstream_is_refetched_once_then_the_login_fails() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let first = up.auth.grant(ACCOUNT, USER);
        let (mailgate, address) = start(&up, &IMAPS_XOAUTH2).await;

        let mut client = ImapClient::connect(address).await;
        assert!(client.login(ACCOUNT, PASSWORD).await.is_ok());

        // Revoked early: the cached token is refused, a new one is fetched, the login succeeds.
        up.introspection.revoke(&first);
        let second = up.auth.grant(ACCOUNT, USER);
        let mut client = ImapClient::connect(address).await;
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        assert_eq!(up.auth.requests(ACCOUNT), 2);

        // A token that never works: one retry, then AUTHENTICATIONFAILED.
        up.introspection.revoke(&second);
        up.auth.set_answer(
            ACCOUNT,
            AuthAnswer::Token {
                user: USER.into(),
                access_token: "never-valid-token".into(),
                expires_in: None,
            },
        );
        let mut client = ImapClient::connect(address).await;
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(
            login.tagged.contains("NO [AUTHENTICATIONFAILED]"),
            "{login:?}"
        );
        assert_eq!(
            up.auth.requests(ACCOUNT),
            3,
            "cached token refused, one new fetch"
        );
        mailgate.assert_not_logged("never-valid-token");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_logins_make_one_auth_server_request() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, USER);
        let (port, admin) = (free_port(), free_port());
        let text = format!(
            "{}admin: {{ listen: \"127.0.0.1:{admin}\" }}\n",
            config(&up, port, &IMAPS_XOAUTH2, &up.auth.url())
        );
        let mailgate = Mailgate::start(&text).await;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        // The auth server answers nothing until all fifty logins wait on the same fetch.
        let hold = up.auth.hold();
        let logins = tokio::spawn(futures_join_all((0..50).map(move |_| async move {
            let mut client = ImapClient::connect(address).await;
            client.login(ACCOUNT, PASSWORD).await
        })));
        let all_waiting = support::eventually(std::time::Duration::from_secs(20), || async {
            let metrics = curl(&[&format!("http://127.0.0.1:{admin}/metrics")]).await;
            up.auth.waiting() == 1
                && metrics
                    .stdout
                    .contains("mailgate_token_cache_total{result=\"miss\"} 50")
        })
        .await;
        assert!(
            all_waiting,
            "fifty logins never waited together\n{}",
            mailgate.output()
        );
        drop(hold);
        for login in &logins.await.unwrap() {
            assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
        }
        assert_eq!(up.auth.requests(ACCOUNT), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_accounts_and_unreachable_token_sources_map_to_their_replies() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.set_status(ACCOUNT, 403);
        let (_mailgate, address) = start(&up, &IMAPS_XOAUTH2).await;
        let mut client = ImapClient::connect(address).await;
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(
            login.tagged.contains("NO [AUTHENTICATIONFAILED]"),
            "{login:?}"
        );

        up.auth.set_status(ACCOUNT, 500);
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(login.tagged.contains("NO [UNAVAILABLE]"), "{login:?}");

        // Nothing listens at the auth server's address.
        let dead = format!("http://127.0.0.1:{}/token", free_port());
        let imap_port = free_port();
        let smtp_port = free_port();
        let imap = config(&up, imap_port, &IMAPS_XOAUTH2, &dead);
        let mailgate = Mailgate::start(&imap).await;
        let mut client = ImapClient::connect(SocketAddr::from(([127, 0, 0, 1], imap_port))).await;
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(
            login.tagged.contains("NO [UNAVAILABLE]"),
            "{login:?}\n{}",
            mailgate.output()
        );
        drop(mailgate);

        let smtp = config(&up, smtp_port, &SUBMISSION_STARTTLS_AUTO, &dead);
        let _mailgate = Mailgate::start(&smtp).await;
        let url = format!("smtp://127.0.0.1:{smtp_port}");
        let user = format!("{ACCOUNT}:{PASSWORD}");
        let out = curl(&[
            "-v",
            &url,
            "-u",
            &user,
            "--login-options",
            "AUTH=PLAIN",
            "-X",
            "NOOP",
        ])
        .await;
        assert!(!out.success());
        assert!(out.stderr.contains("454 4.7.0"), "{}", out.stderr);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_is_logged_even_at_trace_level() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = up.auth.grant(ACCOUNT, USER);
        let port = free_port();
        let config = config(&up, port, &IMAPS_XOAUTH2, &up.auth.url());
        let mailgate = Mailgate::start_with_env(&config, &[("RUST_LOG", "trace")]).await;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let out = curl_imap(address, "", "AUTH=PLAIN", &["-X", r#"LIST "" "*""#]).await;
        assert!(out.success(), "{out:?}");
        let mut client = ImapClient::connect(address).await;
        assert!(
            client
                .login(ACCOUNT, "wrong-but-accepted-in-any-mode")
                .await
                .is_ok()
        );
        assert!(
            mailgate.output().contains("logged in"),
            "trace logs were written"
        );
        mailgate.assert_not_logged(&token);
        mailgate.assert_not_logged(PASSWORD);
        mailgate.assert_not_logged("wrong-but-accepted-in-any-mode");
    })
    .await;
}

/// Runs each future as its own task, all at once, and collects their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task"));
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_from_the_auth_server_logs_in_with_plain_upstream() {
    use support::dovecot::{PASSWORD_USER, PASSWORD_USER_SECRET};
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let answer = serde_json::json!({ "user": PASSWORD_USER, "pass": PASSWORD_USER_SECRET });
        up.auth.set_answer(
            ACCOUNT,
            AuthAnswer::Raw {
                status: 200,
                body: answer.to_string(),
            },
        );
        let (imap, address) = start(&up, &IMAPS_XOAUTH2).await;
        let mut client = ImapClient::connect(address).await;
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(login.is_ok(), "{login:?}\n{}", imap.output());
        assert!(client.command("SELECT INBOX").await.is_ok());

        let (smtp, address) = start(&up, &SUBMISSION_STARTTLS_AUTO).await;
        let user = format!("{ACCOUNT}:{PASSWORD}");
        let message = smtp.dir().join("legacy.eml");
        std::fs::write(&message, "Subject: legacy-account\r\n\r\nhi\r\n").unwrap();
        let out = curl_send_mail(address, &user, PASSWORD_USER, "bob@example.test", &message).await;
        assert!(out.success(), "{out:?}\n{}", smtp.output());
        let received = up
            .sink
            .wait_for_message(std::time::Duration::from_secs(10))
            .await;
        assert!(received.data_str().contains("legacy-account"));

        let log = up.dovecot.log();
        assert!(
            log.contains("user=<legacy@example.test>, method=PLAIN"),
            "{log}"
        );
        imap.assert_not_logged(PASSWORD_USER_SECRET);
        smtp.assert_not_logged(PASSWORD_USER_SECRET);
    })
    .await;
}

/// An auth server claiming a lifetime of u64::MAX seconds: the token is cached and renewed
/// as one that lives a year (the renewal's deadline arithmetic used to panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_token_lifetime_is_capped() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.auth.grant_with_expiry(ACCOUNT, USER, u64::MAX);
        let (imap, address) = start(&up, &IMAPS_XOAUTH2).await;
        for _ in 0..2 {
            let mut client = ImapClient::connect(address).await;
            let login = client.login(ACCOUNT, PASSWORD).await;
            assert!(login.is_ok(), "{login:?}\n{}", imap.output());
            assert!(client.command("SELECT INBOX").await.is_ok());
        }
        assert_eq!(up.auth.requests(ACCOUNT), 1);
        assert!(!imap.output().contains("panicked"), "{}", imap.output());
    })
    .await;
}

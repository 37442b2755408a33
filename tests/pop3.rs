//! POP3 end to end: a real mailgate process between real clients (Python's poplib, curl, a raw
//! client) and the real Dovecot, which checks the tokens mailgate fetched from the test auth
//! server. A mail submitted through mailgate's SMTP listener is fetched through its POP3
//! listeners: plain, implicit TLS and STLS with `require`; refusals and temporary failures
//! carry RFC 3206's codes; commands pipelined with the login reach Dovecot.

mod support;

use std::time::Duration;

use support::line_client::LineClient;
use support::process::run_command;
use support::{
    CmdOutput, Listener, Mailgate, TEST_TIMEOUT, TestUpstream, curl, curl_send_mail, free_port,
    metric, with_timeout,
};

const ACCOUNT: &str = "acct1";
const USER: &str = "alice@example.test";
const PASSWORD: &str = "client-password-pop3-8b2";
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// mailgate with POP3 listeners of every client TLS mode, one whose upstream is down, and an
/// SMTP listener to submit mail through.
struct Setup {
    up: TestUpstream,
    mailgate: Mailgate,
    /// Plain towards the client; XOAUTH2 over POP3S upstream.
    plain: Listener,
    /// Implicit TLS towards the client; OAUTHBEARER after STLS upstream.
    pop3s: Listener,
    /// STLS required before any login; the mechanism Dovecot offers first.
    stls: Listener,
    /// Nothing listens at its upstream port.
    down: Listener,
    smtp: Listener,
    admin: u16,
    /// The token the auth server hands out for [`ACCOUNT`].
    token: String,
}

impl Setup {
    async fn start() -> Setup {
        let up = TestUpstream::start().await;
        let token = up.auth.grant(ACCOUNT, USER);
        let dovecot = &up.dovecot;
        let pop3 = |name, port, client_tls, upstream_port, upstream_tls, mechanism| Listener {
            name,
            protocol: "pop3",
            port,
            client_tls,
            upstream_port,
            upstream_tls,
            mechanism,
        };
        let plain = pop3(
            "pop3",
            free_port(),
            None,
            dovecot.pop3s_port,
            "implicit",
            "xoauth2",
        );
        let pop3s = pop3(
            "pop3s",
            free_port(),
            Some("implicit"),
            dovecot.pop3_port,
            "starttls",
            "oauthbearer",
        );
        let stls = pop3(
            "pop3-stls",
            free_port(),
            Some("starttls"),
            dovecot.pop3s_port,
            "implicit",
            "auto",
        );
        let down = pop3(
            "pop3-down",
            free_port(),
            None,
            free_port(),
            "implicit",
            "auto",
        );
        let smtp = Listener {
            protocol: "smtp",
            ..pop3(
                "smtp",
                free_port(),
                None,
                dovecot.submission_port,
                "starttls",
                "auto",
            )
        };
        let admin = free_port();
        let listeners = [plain, pop3s, stls, down, smtp];
        let config = up.config_with(&listeners, &up.auth.url(), admin);
        let mailgate = Mailgate::start(&config).await;
        Setup {
            up,
            mailgate,
            plain,
            pop3s,
            stls,
            down,
            smtp,
            admin,
            token,
        }
    }

    fn ca(&self) -> String {
        self.up.ca_path()
    }

    /// Submits a mail with `subject` to [`USER`] through mailgate's SMTP listener and hands
    /// it from the sink to USER's maildrop.
    async fn mail_through_smtp(&self, subject: &str) {
        let message = self.mailgate.dir().join(format!("{subject}.eml"));
        std::fs::write(
            &message,
            format!(
                "From: {USER}\r\nTo: {USER}\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
            ),
        )
        .unwrap();
        let user = format!("{ACCOUNT}:{PASSWORD}");
        let out = curl_send_mail(self.smtp.address(), &user, USER, USER, &message).await;
        assert!(out.success(), "{out:?}\n{}", self.mailgate.output());
        let mut received = None;
        let arrived = support::eventually(Duration::from_secs(10), || {
            received = self
                .up
                .sink
                .messages()
                .into_iter()
                .find(|m| m.data_str().contains(subject));
            std::future::ready(received.is_some())
        })
        .await;
        assert!(arrived, "the mail never reached the sink");
        let received = received.expect("found");
        self.up.deliver_received(&received).await;
    }

    async fn metrics(&self) -> String {
        curl(&[&format!("http://127.0.0.1:{}/metrics", self.admin)])
            .await
            .stdout
    }

    fn logins(&self, metrics: &str, listener: &str, result: &str) -> f64 {
        let series =
            format!("mailgate_logins_total{{listener=\"{listener}\",result=\"{result}\"}}");
        metric(metrics, &series)
    }
}

const POPLIB: &str = r#"
import poplib, ssl, sys
host, port, ca, user, password, mode, subject = sys.argv[1:8]
context = ssl.create_default_context(cafile=ca)
if mode == "implicit":
    pop = poplib.POP3_SSL(host, int(port), context=context)
else:
    pop = poplib.POP3(host, int(port))
    if mode == "stls":
        capabilities = pop.capa()
        assert "STLS" in capabilities and "USER" not in capabilities, capabilities
        pop.stls(context=context)
print(pop.user(user).decode())
print(pop.pass_(password).decode())
count, size = pop.stat()
print("stat", count, size)
for n in range(1, count + 1):
    text = b"\r\n".join(pop.retr(n)[1]).decode()
    if subject in text:
        print("retrieved", text)
pop.quit()
"#;

async fn poplib(s: &Setup, listener: &Listener, mode: &str, subject: &str) -> CmdOutput {
    let address = listener.address();
    let (host, port) = (address.ip().to_string(), address.port().to_string());
    let args = [
        "-c",
        POPLIB,
        &host,
        &port,
        &s.ca(),
        ACCOUNT,
        PASSWORD,
        mode,
        subject,
    ];
    run_command("python3", &args, None, TOOL_TIMEOUT).await
}

/// `curl -v pop3://ADDRESS/1` (RETR 1) logging in with AUTH PLAIN, plus `extra` arguments.
async fn curl_retr(s: &Setup, url: &str, extra: &[&str]) -> CmdOutput {
    let user = format!("{ACCOUNT}:{PASSWORD}");
    let mut args = vec!["-v", url, "-u", &user, "--login-options", "AUTH=PLAIN"];
    args.extend_from_slice(extra);
    let out = curl(&args).await;
    assert!(
        out.success(),
        "{url} {extra:?}: {out:?}\n{}",
        s.mailgate.output()
    );
    out
}

fn plain_response() -> String {
    mailgate::sasl::encode_challenge(format!("\0{ACCOUNT}\0{PASSWORD}").as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_sent_through_smtp_is_fetched_with_poplib_curl_and_a_raw_client() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let subject = "pop3-through-mailgate";
        s.mail_through_smtp(subject).await;

        // USER/PASS (poplib), STAT and RETR.
        let out = poplib(&s, &s.plain, "plain", subject).await;
        assert!(out.success(), "{out:?}\n{}", s.mailgate.output());
        assert!(out.stdout.contains("stat 1 "), "{out:?}");
        assert!(
            out.stdout.contains(&format!("\r\nSubject: {subject}\r\n"))
                && out.stdout.contains(&format!("\r\n\r\nbody of {subject}")),
            "{out:?}"
        );

        // AUTH PLAIN (curl): after the `+ ` challenge, then with SASL-IR.
        let url = format!("pop3://{}/1", s.plain.address());
        let out = curl_retr(&s, &url, &[]).await;
        assert!(out.stderr.contains("> AUTH PLAIN\r\n"), "{}", out.stderr);
        assert!(out.stderr.contains("< + "), "{}", out.stderr);
        assert!(
            out.stdout.contains(&format!("Subject: {subject}")),
            "{out:?}"
        );
        let out = curl_retr(&s, &url, &["--sasl-ir"]).await;
        let initial = format!("> AUTH PLAIN {}", plain_response());
        assert!(out.stderr.contains(&initial), "{}", out.stderr);
        assert!(
            out.stdout.contains(&format!("body of {subject}")),
            "{out:?}"
        );

        // AUTH PLAIN (a raw client): without an initial response, then with one.
        let mut pop = LineClient::connect(s.plain.address()).await;
        assert!(pop.line().await.starts_with("+OK"));
        pop.send("AUTH PLAIN\r\n").await;
        assert_eq!(pop.line().await, "+ ");
        pop.send(&format!("{}\r\n", plain_response())).await;
        let login = pop.line().await;
        assert!(login.starts_with("+OK"), "{login}\n{}", s.mailgate.output());
        pop.send("STAT\r\n").await;
        assert!(pop.line().await.starts_with("+OK 1 "));
        let mut pop = LineClient::connect(s.plain.address()).await;
        pop.line().await;
        pop.send(&format!("AUTH PLAIN {}\r\n", plain_response()))
            .await;
        assert!(pop.line().await.starts_with("+OK"));
        pop.send("RETR 1\r\n").await;
        let message = pop.until(|line| line == ".").await;
        assert!(message[0].starts_with("+OK"), "{message:?}");
        assert!(
            message
                .iter()
                .any(|line| line == &format!("Subject: {subject}"))
        );

        let metrics = s.metrics().await;
        assert_eq!(s.logins(&metrics, "pop3", "ok"), 5.0, "{metrics}");
        assert!(s.up.dovecot.log().contains("method=XOAUTH2"));
        let pop3_fetches = s.up.auth.request_log().into_iter();
        let pop3_fetches = pop3_fetches.filter(|r| r.proto.as_deref() == Some("pop3"));
        assert_eq!(pop3_fetches.count(), 1, "one token for every POP3 login");
        s.mailgate.assert_not_logged(&s.token);
        s.mailgate.assert_not_logged(PASSWORD);
        s.mailgate.assert_no_secret_logged();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_with_the_login_reach_the_upstream() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        s.mail_through_smtp("pipelined").await;
        let mut pop = LineClient::connect(s.plain.address()).await;
        // One write: the login and the commands after it.
        pop.send(&format!(
            "USER {ACCOUNT}\r\nPASS {PASSWORD}\r\nSTAT\r\nTOP 1 0\r\nQUIT\r\n"
        ))
        .await;
        assert!(pop.line().await.starts_with("+OK"), "greeting");
        assert_eq!(pop.line().await, "+OK Send PASS");
        let login = pop.line().await;
        assert!(login.starts_with("+OK"), "{login}\n{}", s.mailgate.output());
        assert!(pop.line().await.starts_with("+OK 1 "));
        let top = pop.until(|line| line == ".").await;
        assert!(top.contains(&"Subject: pipelined".to_owned()), "{top:?}");
        assert_eq!(pop.line().await, "+OK Logging out.");
        assert!(pop.closed().await);
    })
    .await;
}

/// USER/PASS on a fresh session at `listener`; the answer to PASS.
async fn user_pass(listener: &Listener) -> String {
    let mut pop = LineClient::connect(listener.address()).await;
    assert!(pop.line().await.starts_with("+OK"));
    pop.send(&format!("USER {ACCOUNT}\r\nPASS {PASSWORD}\r\n"))
        .await;
    assert_eq!(pop.line().await, "+OK Send PASS");
    pop.line().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_temporary_failures_carry_their_response_codes() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        // The upstream is down: try later (RFC 3206 4).
        let down = user_pass(&s.down).await;
        assert_eq!(down, "-ERR [SYS/TEMP] Temporary authentication failure");

        // A token Dovecot's introspection refuses, fetched anew once: the credentials (RFC
        // 3206 5).
        s.up.introspection.revoke(&s.token);
        s.up.auth.set_answer(
            ACCOUNT,
            support::AuthAnswer::Token {
                user: USER.into(),
                access_token: "never-valid-pop3-token".into(),
                expires_in: None,
            },
        );
        let refused = user_pass(&s.plain).await;
        assert_eq!(refused, "-ERR [AUTH] Authentication failed");
        let metrics = s.metrics().await;
        assert_eq!(s.logins(&metrics, "pop3", "upstream_rejected"), 1.0);
        assert_eq!(
            s.logins(&metrics, "pop3-down", "upstream_unavailable"),
            1.0,
            "{metrics}"
        );
        s.mailgate.assert_not_logged("never-valid-pop3-token");

        // The token source is down: nothing listens at its address.
        let dead = format!("http://127.0.0.1:{}/token", free_port());
        let listener = Listener {
            port: free_port(),
            ..s.plain
        };
        let config = s.up.config_with(&[listener], &dead, free_port());
        let _mailgate = Mailgate::start(&config).await;
        assert_eq!(
            user_pass(&listener).await,
            "-ERR [SYS/TEMP] Temporary authentication failure"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_over_implicit_tls_and_after_a_required_stls() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let subject = "pop3-over-tls";
        s.mail_through_smtp(subject).await;
        for (listener, mode) in [(&s.pop3s, "implicit"), (&s.stls, "stls")] {
            let out = poplib(&s, listener, mode, subject).await;
            assert!(
                out.success() && out.stdout.contains("retrieved"),
                "{mode}: {out:?}\n{}",
                s.mailgate.output()
            );
        }
        for url in [
            format!("pop3s://{}/1", s.pop3s.address()),
            format!("pop3://{}/1", s.stls.address()),
        ] {
            let out = curl_retr(&s, &url, &["--ssl-reqd", "--cacert", &s.ca()]).await;
            assert!(out.stdout.contains(subject), "{url}: {out:?}");
        }
        let log = s.up.dovecot.log();
        assert!(log.contains("method=OAUTHBEARER"), "{log}");
        let metrics = s.metrics().await;
        assert_eq!(s.logins(&metrics, "pop3s", "ok"), 2.0, "{metrics}");
        assert_eq!(s.logins(&metrics, "pop3-stls", "ok"), 2.0, "{metrics}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_wait_for_stls_and_commands_sent_with_it_are_dropped() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let mut pop = LineClient::connect(s.stls.address()).await;
        assert!(pop.line().await.starts_with("+OK"));
        pop.send("CAPA\r\n").await;
        let capabilities = pop.until(|line| line == ".").await;
        assert!(
            capabilities.contains(&"STLS".to_owned()),
            "{capabilities:?}"
        );
        assert!(
            !capabilities
                .iter()
                .any(|c| c == "USER" || c.starts_with("SASL")),
            "{capabilities:?}"
        );
        let refusal = "-ERR [AUTH] Plaintext authentication disallowed before STLS; use STLS first";
        for command in [
            format!("USER {ACCOUNT}"),
            format!("AUTH PLAIN {}", plain_response()),
        ] {
            pop.send(&format!("{command}\r\n")).await;
            assert_eq!(pop.line().await, refusal);
        }

        // RFC 2595 4 (STARTTLS injection): the USER sent in the clear with STLS is dropped.
        pop.send(&format!("STLS\r\nUSER {ACCOUNT}\r\n")).await;
        assert_eq!(pop.line().await, "+OK Begin TLS negotiation");
        let mut pop = pop.start_tls(&s.up.ca.ca_pem()).await;
        pop.send(&format!("PASS {PASSWORD}\r\n")).await;
        assert_eq!(pop.line().await, "-ERR USER first");
        pop.send("STLS\r\n").await;
        assert_eq!(pop.line().await, "-ERR TLS already active");
        assert_eq!(s.up.auth.requests(ACCOUNT), 0, "no login before TLS");

        pop.send(&format!("USER {ACCOUNT}\r\nPASS {PASSWORD}\r\nSTAT\r\n"))
            .await;
        assert_eq!(pop.line().await, "+OK Send PASS");
        let login = pop.line().await;
        assert!(login.starts_with("+OK"), "{login}\n{}", s.mailgate.output());
        assert!(pop.line().await.starts_with("+OK 0 0"));
    })
    .await;
}

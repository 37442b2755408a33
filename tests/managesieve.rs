//! ManageSieve end to end: a real mailgate process between real clients (`sieve-connect`, a
//! raw client) and the real Dovecot (Pigeonhole), which checks the tokens mailgate fetched from
//! the test auth server. Scripts are put, listed, activated and read back through mailgate's
//! listeners (plain, implicit TLS, STARTTLS with `require`); refusals and temporary failures
//! carry RFC 5804's codes; commands pipelined with the login reach Dovecot.

mod support;

use std::time::Duration;

use support::line_client::LineClient;
use support::process::run_command_with_input;
use support::{
    Listener, Mailgate, TEST_TIMEOUT, TestUpstream, curl, eventually, free_port, metric,
    with_timeout,
};

const ACCOUNT: &str = "sieve1";
const USER: &str = "sieve-user@example.test";
const PASSWORD: &str = "client-password-sieve-3a7";
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
const SCRIPT: &str =
    "require \"fileinto\";\r\nif header :contains \"subject\" \"x\" { fileinto \"X\"; }\r\n";

/// mailgate with ManageSieve listeners of every client TLS mode and one whose upstream is down.
struct Setup {
    up: TestUpstream,
    mailgate: Mailgate,
    /// STARTTLS required before any login; XOAUTH2 after STARTTLS upstream.
    sieve: Listener,
    /// Implicit TLS towards the client; OAUTHBEARER over implicit TLS upstream.
    sieves: Listener,
    /// Plain towards the client; the mechanism Dovecot offers first.
    plain: Listener,
    /// Nothing listens at its upstream port.
    down: Listener,
    admin: u16,
    /// The token the auth server hands out for [`ACCOUNT`].
    token: String,
}

impl Setup {
    async fn start() -> Setup {
        let up = TestUpstream::start().await;
        let token = up.auth.grant(ACCOUNT, USER);
        let dovecot = &up.dovecot;
        let sieve = |name, client_tls, upstream_port, upstream_tls, mechanism| Listener {
            name,
            protocol: "managesieve",
            port: free_port(),
            client_tls,
            upstream_port,
            upstream_tls,
            mechanism,
        };
        let listeners = [
            sieve(
                "sieve",
                Some("starttls"),
                dovecot.sieve_port,
                "starttls",
                "xoauth2",
            ),
            sieve(
                "sieves",
                Some("implicit"),
                dovecot.sieves_port,
                "implicit",
                "oauthbearer",
            ),
            sieve("sieve-plain", None, dovecot.sieve_port, "starttls", "auto"),
            sieve("sieve-down", None, free_port(), "implicit", "auto"),
        ];
        let admin = free_port();
        let config = up.config_with(&listeners, &up.auth.url(), admin);
        let mailgate = Mailgate::start(&config).await;
        let [sieve, sieves, plain, down] = listeners;
        Setup {
            up,
            mailgate,
            sieve,
            sieves,
            plain,
            down,
            admin,
            token,
        }
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

    /// Where Dovecot links the active script (`sieve = file:~/sieve;active=~/.dovecot.sieve`).
    fn active_script(&self) -> std::path::PathBuf {
        let home = self.up.dovecot.dir().join("mail").join(USER);
        std::fs::read_link(home.join(".dovecot.sieve")).unwrap_or_default()
    }
}

/// Whether `line` ends a ManageSieve response (RFC 5804 4: `OK`, `NO` or `BYE`).
fn is_end(line: &str) -> bool {
    ["OK", "NO", "BYE"]
        .iter()
        .any(|status| line == *status || line.starts_with(&format!("{status} ")))
}

/// Reads one response; all its lines.
async fn response(client: &mut LineClient) -> Vec<String> {
    client.until(is_end).await
}

/// The last line of the next response.
async fn completion(client: &mut LineClient) -> String {
    response(client).await.pop().unwrap()
}

fn plain_response() -> String {
    mailgate::sasl::encode_challenge(format!("\0{ACCOUNT}\0{PASSWORD}").as_bytes())
}

/// `AUTHENTICATE "PLAIN"` with the initial response as a quoted string.
fn authenticate() -> String {
    format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", plain_response())
}

/// `PUTSCRIPT "name"` with the script as a non-synchronizing literal.
fn putscript(name: &str) -> String {
    format!("PUTSCRIPT \"{name}\" {{{}+}}\r\n{SCRIPT}\r\n", SCRIPT.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_client_puts_lists_activates_and_gets_a_script() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let ca = s.up.ca.ca_pem();
        // The upstream's capabilities, probed in the background, reach the greeting.
        let relayed = eventually(Duration::from_secs(10), || async {
            let mut client = LineClient::connect_tls(s.sieves.address(), &ca).await;
            let greeting = response(&mut client).await;
            greeting.iter().any(|line| line.contains("fileinto"))
                && greeting.contains(&"\"SASL\" \"PLAIN LOGIN\"".to_owned())
                && greeting.iter().any(|line| line.contains("Pigeonhole"))
        })
        .await;
        assert!(
            relayed,
            "{}\nDOVECOT\n{}",
            s.mailgate.output(),
            s.up.dovecot.log()
        );

        let mut client = LineClient::connect_tls(s.sieves.address(), &ca).await;
        response(&mut client).await;
        // The initial response as a `{n+}` literal.
        let initial = plain_response();
        client
            .send(&format!(
                "AUTHENTICATE \"PLAIN\" {{{}+}}\r\n{initial}\r\n",
                initial.len()
            ))
            .await;
        let login = completion(&mut client).await;
        assert_eq!(login, "OK \"Logged in.\"", "{}", s.mailgate.output());
        client.send(&putscript("raw")).await;
        assert!(completion(&mut client).await.starts_with("OK"));
        client.send("SETACTIVE \"raw\"\r\n").await;
        assert!(completion(&mut client).await.starts_with("OK"));
        client.send("LISTSCRIPTS\r\n").await;
        let listed = response(&mut client).await;
        assert_eq!(listed[0], "\"raw\" ACTIVE", "{listed:?}");
        client.send("GETSCRIPT \"raw\"\r\n").await;
        assert_eq!(client.line().await, format!("{{{}}}", SCRIPT.len()));
        assert_eq!(client.bytes(SCRIPT.len()).await, SCRIPT);
        assert!(completion(&mut client).await.starts_with("OK"));
        client.send("LOGOUT\r\n").await;
        assert!(completion(&mut client).await.starts_with("OK"));
        assert!(client.closed().await);
        assert!(
            s.active_script().ends_with("raw.sieve"),
            "{:?}",
            s.active_script()
        );

        // AUTHENTICATE without an initial response: an empty challenge, then a string.
        let mut client = LineClient::connect_tls(s.sieves.address(), &ca).await;
        response(&mut client).await;
        client.send("AUTHENTICATE \"PLAIN\"\r\n").await;
        assert_eq!(client.line().await, "\"\"");
        client.send(&format!("\"{initial}\"\r\n")).await;
        assert_eq!(completion(&mut client).await, "OK \"Logged in.\"");

        let metrics = s.metrics().await;
        assert_eq!(s.logins(&metrics, "sieves", "ok"), 2.0, "{metrics}");
        assert!(s.up.dovecot.log().contains("method=OAUTHBEARER"));
        s.mailgate.assert_not_logged(&s.token);
        s.mailgate.assert_not_logged(PASSWORD);
        s.mailgate.assert_no_secret_logged();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sieve_connect_uploads_activates_lists_and_downloads_after_starttls() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("filter.sieve");
        std::fs::write(&local, SCRIPT).unwrap();
        let downloaded = dir.path().join("back.sieve");
        let (port, ca) = (s.sieve.port.to_string(), s.up.ca_path());
        let (local, downloaded) = (
            local.display().to_string(),
            downloaded.display().to_string(),
        );
        let actions: [&[&str]; 4] = [
            &["--upload", "--localsieve", &local],
            &["--activate"],
            &["--list"],
            &["--download", "--localsieve", &downloaded],
        ];
        let mut listed = String::new();
        for action in actions {
            let mut args = vec![
                "--server",
                "127.0.0.1",
                "--port",
                &port,
                "--user",
                ACCOUNT,
                "--passwordfd",
                "0",
                "--tlscafile",
                &ca,
                "--tlshostname",
                "localhost",
                "--authmech",
                "PLAIN",
                "--remotesieve",
                "connected",
            ];
            args.extend_from_slice(action);
            let input = format!("{PASSWORD}\n");
            let out = run_command_with_input(
                "sieve-connect",
                &args,
                None,
                Some(input.as_bytes()),
                TOOL_TIMEOUT,
            )
            .await;
            assert!(
                out.success(),
                "{action:?}: {out:?}\n{}",
                s.mailgate.output()
            );
            listed.push_str(&out.stdout);
        }
        assert!(listed.contains("connected"), "{listed}");
        assert_eq!(std::fs::read_to_string(&downloaded).unwrap(), SCRIPT);
        assert!(s.active_script().ends_with("connected.sieve"));
        let metrics = s.metrics().await;
        assert_eq!(s.logins(&metrics, "sieve", "ok"), 4.0, "{metrics}");
        assert!(s.up.dovecot.log().contains("method=XOAUTH2"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_with_the_login_reach_the_upstream() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let mut client = LineClient::connect(s.plain.address()).await;
        // One write: the login and every command after it.
        client
            .send(&format!(
                "{}{}SETACTIVE \"piped\"\r\nLISTSCRIPTS\r\nLOGOUT\r\n",
                authenticate(),
                putscript("piped")
            ))
            .await;
        response(&mut client).await;
        let login = completion(&mut client).await;
        assert_eq!(login, "OK \"Logged in.\"", "{}", s.mailgate.output());
        assert!(completion(&mut client).await.starts_with("OK"), "PUTSCRIPT");
        assert!(completion(&mut client).await.starts_with("OK"), "SETACTIVE");
        let listed = response(&mut client).await;
        assert_eq!(listed[0], "\"piped\" ACTIVE", "{listed:?}");
        assert!(completion(&mut client).await.starts_with("OK"), "LOGOUT");
        assert!(client.closed().await);
        assert!(s.active_script().ends_with("piped.sieve"));
    })
    .await;
}

/// `AUTHENTICATE` on a fresh session at `listener`; its completion.
async fn log_in(listener: &Listener) -> String {
    let mut client = LineClient::connect(listener.address()).await;
    response(&mut client).await;
    client.send(&authenticate()).await;
    completion(&mut client).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_temporary_failures_carry_their_response_codes() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        // RFC 5804 1.3: TRYLATER for what may work later unchanged.
        let trylater = "NO (TRYLATER) \"Temporary failure, try again later\"";
        assert_eq!(log_in(&s.down).await, trylater);

        // A token Dovecot's introspection refuses, fetched anew once: a plain NO.
        s.up.introspection.revoke(&s.token);
        s.up.auth.set_answer(
            ACCOUNT,
            support::AuthAnswer::Token {
                user: USER.into(),
                access_token: "never-valid-sieve-token".into(),
                expires_in: None,
            },
        );
        assert_eq!(log_in(&s.plain).await, "NO \"Authentication failed\"");
        let metrics = s.metrics().await;
        assert_eq!(s.logins(&metrics, "sieve-plain", "upstream_rejected"), 1.0);
        assert_eq!(
            s.logins(&metrics, "sieve-down", "upstream_unavailable"),
            1.0,
            "{metrics}"
        );
        s.mailgate.assert_not_logged("never-valid-sieve-token");

        // The token source is down: nothing listens at its address.
        let dead = format!("http://127.0.0.1:{}/token", free_port());
        let listener = Listener {
            port: free_port(),
            ..s.plain
        };
        let config = s.up.config_with(&[listener], &dead, free_port());
        let _mailgate = Mailgate::start(&config).await;
        assert_eq!(log_in(&listener).await, trylater);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_wait_for_starttls_and_commands_sent_with_it_are_dropped() {
    with_timeout(TEST_TIMEOUT, async {
        let s = Setup::start().await;
        let mut client = LineClient::connect(s.sieve.address()).await;
        let greeting = response(&mut client).await;
        assert!(
            greeting.contains(&"\"STARTTLS\"".to_owned()),
            "{greeting:?}"
        );
        assert!(
            greeting.contains(&"\"SASL\" \"\"".to_owned()),
            "{greeting:?}"
        );
        client.send(&authenticate()).await;
        let refusal = "NO (ENCRYPT-NEEDED) \"Log in after STARTTLS\"";
        assert_eq!(completion(&mut client).await, refusal);

        // STARTTLS injection: the login sent in the clear with STARTTLS is never run.
        client
            .send(&format!("STARTTLS\r\n{}", authenticate()))
            .await;
        assert_eq!(client.line().await, "OK \"Begin TLS negotiation now\"");
        let mut client = client.start_tls(&s.up.ca.ca_pem()).await;
        // RFC 5804 2.2: the capabilities again, unasked, without STARTTLS.
        let capabilities = response(&mut client).await;
        assert_eq!(capabilities.last().unwrap(), "OK \"Capability completed\"");
        assert!(capabilities.contains(&"\"SASL\" \"PLAIN LOGIN\"".to_owned()));
        assert!(!capabilities.contains(&"\"STARTTLS\"".to_owned()));
        client.send("NOOP\r\n").await;
        assert_eq!(completion(&mut client).await, "OK \"NOOP completed\"");
        assert_eq!(s.up.auth.requests(ACCOUNT), 0, "no login before TLS");

        client.send(&authenticate()).await;
        let login = completion(&mut client).await;
        assert_eq!(login, "OK \"Logged in.\"", "{}", s.mailgate.output());
        client.send("LISTSCRIPTS\r\n").await;
        assert!(completion(&mut client).await.starts_with("OK"));
    })
    .await;
}

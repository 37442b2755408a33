//! The operator's side of a pool (issue 16): `mailgate backends` against a running mailgate
//! in front of three real Dovecots: the status, a drain that ends a session after its grace
//! and sends the account's next login elsewhere, undrain, kick, move (kept in the routes file),
//! and the admin endpoint's refusals.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::imap_client::ImapClient;
use support::process::{curl, free_ports, run_command};
use support::{AuthServer, Dovecot, DovecotOptions, Introspection, Mailgate, SmtpSink, TestCa};
use support::{TEST_TIMEOUT, eventually, with_timeout};

const ACCOUNT: &str = "ann@pool.test";
const SERVERS: [&str; 3] = ["a", "b", "c"];
const PASSWORD: &str = "backends-operator-pw";
/// Bound for an effect that follows an answer (a log line, a session's end).
const SETTLE: Duration = Duration::from_secs(15);

/// Three Dovecots and a mailgate pooling them; fields drop in order, mailgate first.
struct Pool {
    mailgate: Mailgate,
    imap: std::net::SocketAddr,
    admin_port: u16,
    dir: tempfile::TempDir,
    dovecots: Vec<Dovecot>,
    _auth: AuthServer,
    _introspection: Introspection,
    _sink: SmtpSink,
    _ca: TestCa,
}

impl Pool {
    async fn start() -> Pool {
        let ca = TestCa::create().await;
        let introspection = Introspection::start().await;
        let auth = AuthServer::start(Some(&introspection)).await;
        let sink = SmtpSink::start().await;
        let dovecots = Dovecot::start_several(
            3,
            &ca,
            &introspection.url(),
            sink.addr(),
            &DovecotOptions::default(),
        )
        .await;
        auth.grant(ACCOUNT, ACCOUNT);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.yaml"), "").unwrap();
        std::fs::write(dir.path().join("password"), PASSWORD).unwrap();
        let [imap_port, admin_port] = free_ports(2)[..] else {
            unreachable!()
        };
        let servers: String = SERVERS
            .iter()
            .zip(&dovecots)
            .map(|(name, dovecot)| {
                format!(
                    "        - {{ name: {name}, host: 127.0.0.1, port: {} }}\n",
                    dovecot.imaps_port
                )
            })
            .collect();
        let config = format!(
            r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{imap_port}"
    upstream:
      servers:
{servers}      routes_file: "{routes}"
      tls: implicit
      ca_file: "{ca}"
      system_roots: false
tokens:
  auth_server: {{ url: "{url}", timeout: 5s }}
admin:
  listen: "127.0.0.1:{admin_port}"
  backends:
    password_file: "{password}"
"#,
            routes = dir.path().join("routes.yaml").display(),
            ca = ca.ca_pem().display(),
            url = auth.url(),
            password = dir.path().join("password").display(),
        );
        let mailgate = Mailgate::start(&config).await;
        Pool {
            mailgate,
            imap: ([127, 0, 0, 1], imap_port).into(),
            admin_port,
            dir,
            dovecots,
            _auth: auth,
            _introspection: introspection,
            _sink: sink,
            _ca: ca,
        }
    }

    /// `mailgate backends ARGS...` with mailgate's configuration.
    async fn backends(&self, args: &[&str]) -> support::process::CmdOutput {
        let config = self.mailgate.config_path();
        let mut all = vec!["--config", config.to_str().unwrap(), "backends"];
        all.extend_from_slice(args);
        let binary = Mailgate::binary();
        run_command(binary.to_str().unwrap(), &all, None, SETTLE).await
    }

    async fn ok(&self, args: &[&str]) -> String {
        let output = self.backends(args).await;
        assert!(
            output.success(),
            "backends {args:?}: {output:?}\n{}",
            self.mailgate.output()
        );
        output.stdout
    }

    /// Logs the account in through mailgate and waits until one Dovecot has a new login of
    /// it; returns the session and that Dovecot's index.
    async fn log_in(&self) -> (ImapClient, usize) {
        let before: Vec<usize> = self.dovecots.iter().map(logins).collect();
        let mut client = ImapClient::connect(self.imap).await;
        let done = client.login(ACCOUNT, "any").await;
        assert!(done.is_ok(), "{done:?}\n{}", self.mailgate.output());
        let landed = || (0..3).find(|&i| logins(&self.dovecots[i]) > before[i]);
        let found = eventually(SETTLE, async || landed().is_some()).await;
        assert!(found, "no Dovecot logged the login");
        (client, landed().unwrap())
    }

    /// Reads until mailgate's `* BYE` saying the operator moved the session, then waits until
    /// mailgate counts no session of the account; panics if the connection closes without it.
    async fn expect_end(&self, client: &mut ImapClient) {
        let goodbye = format!("* BYE {}", mailgate::login::MOVED);
        while client.line().await.trim_end() != goodbye {}
        let gone = eventually(SETTLE, async || {
            let status: serde_json::Value =
                serde_json::from_str(&self.ok(&["--json"]).await).unwrap();
            status
                .as_array()
                .unwrap()
                .iter()
                .all(|server| server["sessions"] == 0)
        })
        .await;
        assert!(gone, "the session is still counted");
    }

    fn routes_file(&self) -> PathBuf {
        self.dir.path().join("routes.yaml")
    }
}

fn logins(dovecot: &Dovecot) -> usize {
    dovecot
        .logins()
        .iter()
        .filter(|user| user.as_str() == ACCOUNT)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_drains_kicks_and_moves_an_account() {
    with_timeout(TEST_TIMEOUT * 2, async {
        let pool = Pool::start().await;
        let status: serde_json::Value = serde_json::from_str(&pool.ok(&["--json"]).await).unwrap();
        let names: Vec<&str> = status
            .as_array()
            .unwrap()
            .iter()
            .map(|server| server["server"].as_str().unwrap())
            .collect();
        assert_eq!(names, SERVERS, "{status}");
        let table = pool.ok(&[]).await;
        assert!(table.starts_with("LISTENER"), "{table}");

        // Drain: the session ends after the grace; the next login goes elsewhere.
        let (mut client, first) = pool.log_in().await;
        let drained = SERVERS[first];
        pool.ok(&["drain", drained, "--grace", "1s"]).await;
        let status: serde_json::Value = serde_json::from_str(&pool.ok(&["--json"]).await).unwrap();
        assert_eq!(status[first]["state"], "draining", "{status}");
        pool.expect_end(&mut client).await;
        let (mut client, second) = pool.log_in().await;
        assert_ne!(second, first, "a login landed on the drained server");
        pool.ok(&["undrain", drained]).await;

        // Kick: the session ends.
        let kicked = pool.ok(&["kick", ACCOUNT]).await;
        assert!(kicked.contains("session(s) ended"), "{kicked}");
        pool.expect_end(&mut client).await;

        // Move: to a server the account is not on; the session ends, the route is kept.
        let (mut client, third) = pool.log_in().await;
        let target = (0..3).find(|&i| i != third).unwrap();
        pool.ok(&["move", ACCOUNT, SERVERS[target]]).await;
        pool.expect_end(&mut client).await;
        let routes = std::fs::read_to_string(pool.routes_file()).unwrap();
        assert!(
            routes.contains(&format!("\"{ACCOUNT}\": \"{}\"", SERVERS[target])),
            "{routes}"
        );
        let (_client, fourth) = pool.log_in().await;
        assert_eq!(fourth, target);

        // The page: a drain by its form needs the CSRF token the page carries.
        let login = format!("admin:{PASSWORD}");
        let page_url = format!("http://127.0.0.1:{}/backends/page", pool.admin_port);
        let page = curl(&["-u", &login, &page_url]).await.stdout;
        assert!(page.contains("id=\"drain-imap-b\""), "{page}");
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a CSRF token");
        let drain = format!("{page_url}/drain");
        let forged = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            &login,
            "-d",
            "server=b",
            &drain,
        ])
        .await;
        assert_eq!(forged.stdout, "403");
        let csrf_field = format!("csrf={csrf}");
        let done = curl(&["-u", &login, "-d", "server=b", "-d", &csrf_field, &drain]).await;
        assert!(done.stdout.contains("id=\"undrain-imap-b\""), "{done:?}");
        pool.ok(&["undrain", "b"]).await;

        // Refusals: an unknown server, a wrong password.
        let unknown = pool.backends(&["drain", "nosuch"]).await;
        assert_eq!(unknown.status, Some(64), "{unknown:?}");
        assert!(unknown.stderr.contains("nosuch"), "{unknown:?}");
        let url = format!("http://127.0.0.1:{}/backends", pool.admin_port);
        let wrong = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            "admin:wrong-password-x",
            &url,
        ])
        .await;
        assert_eq!(wrong.stdout, "401");
        let right = curl(&["-u", &format!("admin:{PASSWORD}"), &url]).await;
        assert!(right.stdout.starts_with('['), "{right:?}");
        pool.mailgate.assert_not_logged(PASSWORD);
    })
    .await;
}

/// Without `admin.backends` the endpoint does not exist and the command says so.
#[tokio::test]
async fn without_the_section_there_are_no_operations() {
    with_timeout(TEST_TIMEOUT, async {
        let [imap_port, admin_port] = free_ports(2)[..] else {
            unreachable!()
        };
        let config = format!(
            r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{imap_port}"
    upstream: {{ host: 127.0.0.1, port: 1, tls: none }}
tokens:
  auth_server: {{ url: "http://127.0.0.1:1/token" }}
admin:
  listen: "127.0.0.1:{admin_port}"
"#
        );
        let mailgate = Mailgate::start(&config).await;
        let url = format!("http://127.0.0.1:{admin_port}/backends");
        let answer = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            "admin:whatever-password",
            &url,
        ])
        .await;
        assert_eq!(answer.stdout, "404");
        let config_path = mailgate.config_path();
        let binary = Mailgate::binary();
        let output = run_command(
            binary.to_str().unwrap(),
            &["--config", config_path.to_str().unwrap(), "backends"],
            None,
            SETTLE,
        )
        .await;
        assert_eq!(output.status, Some(64), "{output:?}");
    })
    .await;
}

/// Over `admin.tls`, the command trusts the certificates of the endpoint's certificate file
/// (here the chain with its CA), or `--ca-file`.
#[tokio::test]
async fn the_command_speaks_https_to_a_tls_endpoint() {
    with_timeout(TEST_TIMEOUT, async {
        let ca = TestCa::create().await;
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, PASSWORD).unwrap();
        let chain = dir.path().join("chain.pem");
        let pem = |path: PathBuf| std::fs::read_to_string(path).unwrap();
        std::fs::write(&chain, pem(ca.cert_pem()) + &pem(ca.ca_pem())).unwrap();
        let [imap_port, admin_port] = free_ports(2)[..] else {
            unreachable!()
        };
        let config = format!(
            r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{imap_port}"
    upstream: {{ host: 127.0.0.1, port: 1, tls: none }}
tokens:
  auth_server: {{ url: "http://127.0.0.1:1/token" }}
admin:
  listen: "127.0.0.1:{admin_port}"
  tls: {{ cert_file: "{cert}", key_file: "{key}" }}
  backends: {{ password_file: "{password}" }}
"#,
            cert = chain.display(),
            key = ca.key_pem().display(),
            password = password.display(),
        );
        let mailgate = Mailgate::start(&config).await;
        let config_path = mailgate.config_path();
        let binary = Mailgate::binary();
        let ca_file = ca.ca_pem();
        let run = async |extra: &[&str]| {
            let mut args = vec!["--config", config_path.to_str().unwrap(), "backends"];
            args.extend_from_slice(extra);
            run_command(binary.to_str().unwrap(), &args, None, SETTLE).await
        };
        let with_ca = run(&["--ca-file", ca_file.to_str().unwrap()]).await;
        assert!(with_ca.success(), "{with_ca:?}");
        assert!(
            with_ca.stdout.contains("No listener has a pool"),
            "{with_ca:?}"
        );
        let with_cert = run(&[]).await;
        assert!(with_cert.success(), "{with_cert:?}");
    })
    .await;
}

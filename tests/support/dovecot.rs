//! [`Dovecot`]: a private Dovecot 2.3 instance on 127.0.0.1 that only accepts OAuth2 bearer
//! logins (XOAUTH2/OAUTHBEARER) checked against an [`Introspection`](super::Introspection)
//! server, and relays submitted mail to an [`SmtpSink`](super::SmtpSink). [`DovecotOptions`]
//! make it trust a peer to name the client (IMAP `ID`, `XCLIENT`, PROXY headers) and keep its
//! auth-failure penalty.
//!
//! Everything lives in a temp dir (config, base_dir, state, log, mail), on ports of its own,
//! under an instance name of its own, so that several run at once as a pool of backends
//! ([`Dovecot::start_several`]). The master runs in the foreground as our child and is killed
//! on drop with everything it started. A test may stop one and start it again on the same
//! ports and mail ([`Dovecot::start_again`]), and ask who logged in ([`Dovecot::logins`]) or
//! is still connected ([`Dovecot::sessions`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::certs::TestCa;
use super::process::{free_ports, pgrep, run_command, send_signal, stop_child, wait_for_port};

/// How long the ports may take to accept connections (measured: about 25 ms).
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the master may take to exit after SIGTERM (measured: about 1.1 s).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long children may linger after the master is gone before they are killed.
const CHILDREN_GRACE: Duration = Duration::from_secs(5);
/// How long `doveadm who` may take (it asks the instance's anvil over a local socket).
const DOVEADM_TIMEOUT: Duration = Duration::from_secs(10);
/// Starts retried when a chosen port was taken by someone else in the meantime.
const START_ATTEMPTS: usize = 3;
/// The uid/gid mail processes run as (Dovecot refuses root): nobody/nogroup on Debian.
const MAIL_UID: u32 = 65534;
/// The one account that logs in with a password (PLAIN/LOGIN) instead of a token: for the
/// auth server's `pass` answers, which fleets use for accounts not yet moved to OAuth2.
pub const PASSWORD_USER: &str = "legacy@example.test";
pub const PASSWORD_USER_SECRET: &str = "legacy-password-7c1";

/// Settings a test may change. The default is a Dovecot that trusts no one to name the client
/// and has no auth-failure penalty.
#[derive(Debug, Clone, Default)]
pub struct DovecotOptions {
    /// `login_trusted_networks`: peers whose IMAP `ID` (`x-originating-ip` ...) and submission
    /// `XCLIENT` name the client (e.g. `127.0.0.1`, mailgate's address towards Dovecot).
    pub login_trusted_networks: Option<String>,
    /// `haproxy_trusted_networks`: peers whose PROXY header Dovecot takes on the `haproxy = yes`
    /// listeners (`imaps_haproxy_port`, `submission_haproxy_port`), which require one.
    pub haproxy_trusted_networks: Option<String>,
    /// Keeps Dovecot's auth-failure penalty per client address (2, 4, 8 ... 15 s).
    pub auth_penalty: bool,
    /// Appended to the configuration (e.g. raised process and connection limits).
    pub tuning: String,
}

impl DovecotOptions {
    /// The lines these options add to the configuration, before `tuning`.
    fn settings(&self) -> String {
        let mut lines = String::new();
        for (name, value) in [
            ("login_trusted_networks", &self.login_trusted_networks),
            ("haproxy_trusted_networks", &self.haproxy_trusted_networks),
        ] {
            if let Some(value) = value {
                lines.push_str(&format!("{name} = {value}\n"));
            }
        }
        if !self.auth_penalty {
            // Tests try wrong tokens on purpose, all from 127.0.0.1.
            lines.push_str(
                "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n",
            );
        }
        lines
    }
}

/// A running Dovecot. Ports are on 127.0.0.1.
pub struct Dovecot {
    dir: tempfile::TempDir,
    child: Option<Child>,
    instance_name: String,
    ca_pem: PathBuf,
    /// IMAP, plain with STARTTLS offered.
    pub imap_port: u16,
    /// IMAP over implicit TLS.
    pub imaps_port: u16,
    /// Submission with STARTTLS.
    pub submission_port: u16,
    /// Submission over implicit TLS.
    pub submissions_port: u16,
    /// IMAP over implicit TLS after a PROXY header (`haproxy = yes`).
    pub imaps_haproxy_port: u16,
    /// Submission with STARTTLS after a PROXY header (`haproxy = yes`).
    pub submission_haproxy_port: u16,
    /// POP3, plain with STLS offered.
    pub pop3_port: u16,
    /// POP3 over implicit TLS.
    pub pop3s_port: u16,
    /// ManageSieve, plain with STARTTLS offered.
    pub sieve_port: u16,
    /// ManageSieve over implicit TLS.
    pub sieves_port: u16,
}

impl Dovecot {
    /// Starts Dovecot with `ca`'s server certificate, checking tokens at `introspection_url`
    /// and relaying submitted mail to `relay` (plain SMTP). Waits until every port accepts.
    ///
    /// # Panics
    /// When Dovecot is not installed or does not come up (the message carries its log).
    pub async fn start(ca: &TestCa, introspection_url: &str, relay: SocketAddr) -> Dovecot {
        Self::start_with(ca, introspection_url, relay, &DovecotOptions::default()).await
    }

    /// Like [`Dovecot::start`], with `tuning` appended to the configuration (e.g. raised
    /// process and connection limits for the benchmark).
    pub async fn start_tuned(
        ca: &TestCa,
        introspection_url: &str,
        relay: SocketAddr,
        tuning: &str,
    ) -> Dovecot {
        let options = DovecotOptions {
            tuning: tuning.to_owned(),
            ..DovecotOptions::default()
        };
        Self::start_with(ca, introspection_url, relay, &options).await
    }

    /// Like [`Dovecot::start`], with `options`.
    pub async fn start_with(
        ca: &TestCa,
        introspection_url: &str,
        relay: SocketAddr,
        options: &DovecotOptions,
    ) -> Dovecot {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(ca, introspection_url, relay, options).await {
                Ok(dovecot) => return dovecot,
                Err(e) => last_error = e,
            }
        }
        panic!("Dovecot did not start after {START_ATTEMPTS} attempts: {last_error}");
    }

    /// Starts `count` independent instances (own temp dir, ports, mail, log and instance
    /// name each) that share `ca`, the token check and the relay, as a pool of backends.
    pub async fn start_several(
        count: usize,
        ca: &TestCa,
        introspection_url: &str,
        relay: SocketAddr,
        options: &DovecotOptions,
    ) -> Vec<Dovecot> {
        let mut started = Vec::with_capacity(count);
        for _ in 0..count {
            started.push(Self::start_with(ca, introspection_url, relay, options).await);
        }
        started
    }

    async fn try_start(
        ca: &TestCa,
        introspection_url: &str,
        relay: SocketAddr,
        options: &DovecotOptions,
    ) -> Result<Dovecot, String> {
        let mut dovecot = Self::configure(ca, introspection_url, relay, options)?;
        dovecot.launch(Instant::now() + START_TIMEOUT).await?;
        Ok(dovecot)
    }

    /// Starts this instance again after [`Dovecot::stop`] or [`Dovecot::stop_gracefully`]
    /// (stopping it first if it still runs), with the same configuration: same ports, mail,
    /// state and log. Waits until every port accepts.
    ///
    /// # Panics
    /// When it does not come up within 15 s (the message carries its log).
    pub async fn start_again(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch(deadline).await {
                Ok(()) => return,
                // A port of ours may be held for a moment by someone else.
                Err(_) if Instant::now() < deadline => {
                    self.stop();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("Dovecot did not start again: {e}"),
            }
        }
    }

    /// Writes the configuration into a fresh temp dir, on ports chosen for it; starts nothing.
    fn configure(
        ca: &TestCa,
        introspection_url: &str,
        relay: SocketAddr,
        options: &DovecotOptions,
    ) -> Result<Dovecot, String> {
        let dir = tempfile::Builder::new()
            .prefix("mailgate-dovecot-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let root = dir.path();
        // tempfile makes 0700 dirs; login processes (dovenull), auth (dovecot) and mail
        // processes (nobody) all need to traverse it.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod: {e}"))?;
        let mail = root.join("mail");
        std::fs::create_dir(&mail).map_err(|e| format!("mkdir mail: {e}"))?;
        std::os::unix::fs::chown(&mail, Some(MAIL_UID), Some(MAIL_UID))
            .map_err(|e| format!("chown mail dir (are we root?): {e}"))?;
        for sub in ["base", "state"] {
            std::fs::create_dir(root.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        let dir_name = root
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("temp dir name")?
            .to_owned();
        // The instance name prefixes every process title, so `pgrep -f` finds all of them.
        let instance_name = dir_name.clone();
        let ports = free_ports(10);
        let (imap, imaps, submission, submissions) = (ports[0], ports[1], ports[2], ports[3]);
        let (imaps_haproxy, submission_haproxy) = (ports[4], ports[5]);
        let (pop3, pop3s) = (ports[6], ports[7]);
        let (sieve, sieves) = (ports[8], ports[9]);

        std::fs::write(
            root.join("dovecot-oauth2.conf.ext"),
            format!(
                "introspection_url = {introspection_url}\n\
                 introspection_mode = post\n\
                 username_attribute = email\n\
                 active_attribute = active\n\
                 active_value = true\n\
                 timeout_msecs = 5000\n"
            ),
        )
        .map_err(|e| format!("write oauth2 conf: {e}"))?;

        std::fs::write(
            root.join("passwd"),
            format!("{PASSWORD_USER}:{{PLAIN}}{PASSWORD_USER_SECRET}\n"),
        )
        .map_err(|e| format!("write passwd: {e}"))?;
        let r = root.display();
        let dh = Path::new("/usr/share/dovecot/dh.pem");
        let ssl_dh = if dh.exists() {
            format!("ssl_dh = <{}\n", dh.display())
        } else {
            String::new()
        };
        let config = format!(
            r#"# Generated by tests/support/dovecot.rs
instance_name = {instance_name}
base_dir = {r}/base
state_dir = {r}/state
log_path = {r}/dovecot.log
listen = 127.0.0.1
protocols = imap submission lmtp pop3 sieve
hostname = mail.localhost
auth_mechanisms = xoauth2 oauthbearer plain login
auth_debug = yes
auth_verbose = yes
auth_failure_delay = 0
disable_plaintext_auth = no
# rport and lport too, so tests see which ports a forwarded client had.
login_log_format_elements = user=<%u> method=%m rip=%r rport=%{{rport}} lip=%l lport=%{{lport}} mpid=%e %c session=<%{{session}}>
mail_location = maildir:~/Maildir
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
{ssl_dh}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN {r}/passwd
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {r}/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_UID} home={r}/mail/%u allow_all_users=yes
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
  inet_listener imaps_haproxy {{
    address = 127.0.0.1
    port = {imaps_haproxy}
    ssl = yes
    haproxy = yes
  }}
}}
service submission-login {{
  inet_listener submission {{
    address = 127.0.0.1
    port = {submission}
  }}
  inet_listener submissions {{
    address = 127.0.0.1
    port = {submissions}
    ssl = yes
  }}
  inet_listener submission_haproxy {{
    address = 127.0.0.1
    port = {submission_haproxy}
    haproxy = yes
  }}
}}
service managesieve-login {{
  inet_listener sieve {{
    address = 127.0.0.1
    port = {sieve}
  }}
  inet_listener sieves {{
    address = 127.0.0.1
    port = {sieves}
    ssl = yes
  }}
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
submission_relay_host = {relay_ip}
submission_relay_port = {relay_port}
submission_relay_trusted = no
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s}
    ssl = yes
  }}
}}
# Dovecot 2.3 wants a UIDL format for POP3.
pop3_uidl_format = %08Xu%08Xv
{settings}{tuning}
"#,
            cert = ca.cert_pem().display(),
            key = ca.key_pem().display(),
            relay_ip = relay.ip(),
            relay_port = relay.port(),
            settings = options.settings(),
            tuning = options.tuning,
        );
        std::fs::write(root.join("dovecot.conf"), config)
            .map_err(|e| format!("write config: {e}"))?;
        Ok(Dovecot {
            dir,
            child: None,
            instance_name,
            ca_pem: ca.ca_pem(),
            imap_port: imap,
            imaps_port: imaps,
            submission_port: submission,
            submissions_port: submissions,
            imaps_haproxy_port: imaps_haproxy,
            submission_haproxy_port: submission_haproxy,
            pop3_port: pop3,
            pop3s_port: pop3s,
            sieve_port: sieve,
            sieves_port: sieves,
        })
    }

    /// Runs the master from the written configuration (its output appended to
    /// `dovecot.stdout`/`dovecot.stderr`) and waits until every port accepts.
    ///
    /// # Errors
    /// When the master exits (e.g. a port is taken) or a port does not accept by `deadline`.
    async fn launch(&mut self, deadline: Instant) -> Result<(), String> {
        let output = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir().join(name))
                .map_err(|e| format!("{name}: {e}"))
        };
        let child = std::process::Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(output("dovecot.stdout")?)
            .stderr(output("dovecot.stderr")?)
            .spawn()
            .map_err(|e| format!("spawn dovecot (run scripts/install-test-deps.sh): {e}"))?;
        self.child = Some(child);
        for port in self.ports() {
            loop {
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                    return Err(format!(
                        "dovecot exited with {status}\n{}",
                        self.diagnostics()
                    ));
                }
                if wait_for_port(Self::addr(port), Duration::from_millis(200)).await {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "port {port} not accepting after {START_TIMEOUT:?}\n{}",
                        self.diagnostics()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every port this instance listens on.
    pub fn ports(&self) -> [u16; 10] {
        [
            self.imap_port,
            self.imaps_port,
            self.submission_port,
            self.submissions_port,
            self.imaps_haproxy_port,
            self.submission_haproxy_port,
            self.pop3_port,
            self.pop3s_port,
            self.sieve_port,
            self.sieves_port,
        ]
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("dovecot.conf")
    }

    /// `127.0.0.1:PORT` for a port of this instance.
    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// The CA that signed Dovecot's certificate.
    pub fn ca_pem(&self) -> &Path {
        &self.ca_pem
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dovecot.log")
    }

    /// The whole Dovecot log so far (auth_debug is on: it says why a token was refused).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The accounts that logged in on this instance by IMAP, POP3, submission or ManageSieve,
    /// oldest first, one entry per login, across restarts: the `user=<...>` of each
    /// `PROTO-login: Info: Login:` line in the log. A login shows here a moment after the
    /// client saw its success (the log process writes it), so wait for it with
    /// [`eventually`](super::eventually).
    pub fn logins(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(login_user)
            .map(str::to_owned)
            .collect()
    }

    /// The protocols (`imap`, `pop3`, `submission`, `sieve`) of `user`'s open sessions on this
    /// instance, one entry per session, as `doveadm who` reads them from the instance's anvil.
    /// A session shows a moment after its login succeeded and leaves a moment after it ends.
    /// Empty when the instance is stopped.
    pub async fn sessions(&self, user: &str) -> Vec<String> {
        let config = self.config_path();
        let config = config.to_str().expect("UTF-8 temp dir");
        let out = run_command(
            "doveadm",
            &["-c", config, "who", "-1", user],
            None,
            DOVEADM_TIMEOUT,
        )
        .await;
        if !out.success() {
            return Vec::new();
        }
        // `username proto pid ip`, after a header line; the mask may match other users too.
        out.stdout
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut columns = line.split_whitespace();
                (columns.next()? == user).then(|| columns.next().map(str::to_owned))?
            })
            .collect()
    }

    /// The log plus whatever the master wrote to stdout/stderr (for failure messages).
    pub fn diagnostics(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- dovecot.log ---\n{}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            self.log(),
            read("dovecot.stderr"),
            read("dovecot.stdout")
        )
    }

    /// Delivers `message` (as on the wire: dot-stuffed, CRLF-terminated) to `user`'s maildrop
    /// through the LMTP socket (RFC 2033), as an MX hands over mail it received by SMTP.
    pub async fn deliver(&self, user: &str, message: &str) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let socket = tokio::net::UnixStream::connect(self.dir().join("base/lmtp"))
            .await
            .expect("connect to LMTP");
        let mut io = tokio::io::BufReader::new(socket);
        let mut expect = async |send: &str, code: &str| {
            if !send.is_empty() {
                io.get_mut().write_all(send.as_bytes()).await.unwrap();
            }
            loop {
                let mut line = String::new();
                io.read_line(&mut line).await.unwrap();
                assert!(line.starts_with(code), "{send:?}: {line:?}");
                if line.as_bytes().get(3) != Some(&b'-') {
                    return;
                }
            }
        };
        expect("", "220").await;
        expect("LHLO mailgate.test\r\n", "250").await;
        expect("MAIL FROM:<sender@example.org>\r\n", "250").await;
        expect(&format!("RCPT TO:<{user}>\r\n"), "250").await;
        expect("DATA\r\n", "354").await;
        expect(&format!("{message}.\r\n"), "250").await;
        expect("QUIT\r\n", "221").await;
    }

    /// Unique per instance; every Dovecot process title starts with it.
    pub fn instance_name(&self) -> &str {
        &self.instance_name
    }

    /// Pids of this instance's processes still alive (master and children).
    pub fn processes(&self) -> Vec<u32> {
        pgrep(&self.instance_name)
    }

    /// Kills the instance as a crash would and waits until every process of it is gone
    /// (blocking, bounded); its ports refuse connections afterwards. Called by `Drop`; calling
    /// it early lets a test check the cleanup, or fail a backend ([`Dovecot::start_again`]).
    /// The master gets SIGKILL, then every process it left too: idle children would exit by
    /// themselves (measured: about 30 ms), but a mail process serving a client only after
    /// about 10 s. Mail and log survive (maildir is safe against crashes).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.signal_leftovers("KILL");
            self.wait_for_children();
        }
    }

    /// Stops the master with SIGTERM (Dovecot's own shutdown), SIGKILL after 10 s, then sends
    /// SIGTERM to the mail processes it left (each says goodbye to its client, e.g. IMAP
    /// `* BYE Server shutting down.`) and waits for every process of this instance to be gone.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, STOP_GRACE);
            self.signal_leftovers("TERM");
            self.wait_for_children();
        }
    }

    /// Sends `signal` to every process of this instance but the log process, which is spared
    /// so that it writes what the others said; it leaves after them.
    fn signal_leftovers(&self, signal: &str) {
        let logger = pgrep(&format!("{}/log", self.instance_name));
        for pid in self.processes() {
            if !logger.contains(&pid) {
                send_signal(pid, signal);
            }
        }
    }

    fn wait_for_children(&self) {
        let deadline = Instant::now() + CHILDREN_GRACE;
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                // Pids of this instance only: the instance name is our unique temp dir name.
                for pid in left {
                    send_signal(pid, "KILL");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The account of a login process's `Login: user=<ACCOUNT>, method=...` line.
fn login_user(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once("-login: Info: Login: user=<")?;
    rest.split_once(">,").map(|(user, _)| user)
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A pool of three real Dovecots behind real mailgate processes (issue 16): every login of an
//! account lands on its rendezvous server, by IMAP and SMTP, through either of two mailgates;
//! a stopped server's accounts fail over at once and no other account moves; a restarted one
//! gets its accounts back once their sessions elsewhere have ended; with every server down
//! logins fail for now and /readyz says why; routes named by the token source, the
//! configuration and the fallback. Which server served a login is read from its Dovecot's log.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use mailgate::backends::ring;
use mailgate::config::pool::account_key;
use support::imap_client::ImapClient;
use support::{AuthAnswer, AuthServer, Dovecot, DovecotOptions, Introspection, Mailgate, SmtpSink};
use support::{TestCa, curl, eventually, free_port, metric, mint_token, with_timeout};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The pool's server names, in the order of the Dovecots.
const SERVERS: [&str; 3] = ["dc1", "dc2", "dc3"];
/// The server that is stopped and started again.
const STOPPED: usize = 1;
const ACCOUNTS: usize = 50;
/// Logins at once: well under Dovecot's default 100 IMAP processes per instance.
const BATCH: usize = 25;
const PASSWORD: &str = "client-password-e17";
/// Bound for an effect that follows an answer (a log line, a probe, a closed session).
const SETTLE: Duration = Duration::from_secs(15);
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// Probes every second; two failures in a row mark a server down, two successes up again
/// (a probe slowed by a busy machine does not move accounts).
const HEALTH: &str = "{interval: 1s, timeout: 3s, rise: 2, fall: 2}";

/// What the backends share; fields drop in order, the Dovecots first.
struct Backends {
    dovecots: Vec<Dovecot>,
    auth: AuthServer,
    introspection: Introspection,
    _sink: SmtpSink,
    ca: TestCa,
}

/// One mailgate in front of the pool: an IMAP and an SMTP listener, the admin endpoint.
struct Gate {
    mailgate: Mailgate,
    imap: SocketAddr,
    smtp: SocketAddr,
    admin: u16,
}

impl Backends {
    async fn start() -> Backends {
        let ca = TestCa::create().await;
        let introspection = Introspection::start().await;
        let auth = AuthServer::start(Some(&introspection)).await;
        let sink = SmtpSink::start().await;
        let options = DovecotOptions::default();
        let dovecots = Dovecot::start_several(
            SERVERS.len(),
            &ca,
            &introspection.url(),
            sink.addr(),
            &options,
        )
        .await;
        Backends {
            dovecots,
            auth,
            introspection,
            _sink: sink,
            ca,
        }
    }

    /// The `upstream` of a listener whose servers are the Dovecots' `port`s, with `routing`
    /// (extra lines, indented as the upstream's keys).
    fn upstream(&self, port: fn(&Dovecot) -> u16, tls: &str, routing: &str) -> String {
        let mut servers = String::new();
        for (name, dovecot) in SERVERS.iter().zip(&self.dovecots) {
            servers.push_str(&format!(
                "        - {{name: {name}, host: 127.0.0.1, port: {}}}\n",
                port(dovecot)
            ));
        }
        format!(
            "    upstream:\n      servers:\n{servers}{routing}      health: {HEALTH}\n      \
             tls: {tls}\n      ca_file: \"{ca}\"\n      system_roots: false\n",
            ca = self.ca.ca_pem().display(),
        )
    }

    /// Starts a mailgate whose IMAP and SMTP listeners route over the pool with `routing`.
    async fn gate(&self, routing: &str) -> Gate {
        let (imap, smtp, admin) = (free_port(), free_port(), free_port());
        let config = format!(
            r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{imap}"
{imap_upstream}  - name: smtp
    protocol: smtp
    listen: "127.0.0.1:{smtp}"
{smtp_upstream}tokens:
  auth_server:
    url: "{url}"
    timeout: 5s
admin:
  listen: "127.0.0.1:{admin}"
"#,
            imap_upstream = self.upstream(|d| d.imaps_port, "implicit", routing),
            smtp_upstream = self.upstream(|d| d.submission_port, "starttls", routing),
            url = self.auth.url(),
        );
        Gate {
            mailgate: Mailgate::start(&config).await,
            imap: SocketAddr::from(([127, 0, 0, 1], imap)),
            smtp: SocketAddr::from(([127, 0, 0, 1], smtp)),
            admin,
        }
    }

    /// How many logins each Dovecot logged so far: a mark to count new logins from.
    fn mark(&self) -> Vec<usize> {
        self.dovecots.iter().map(|d| d.logins().len()).collect()
    }

    /// Waits until `count` logins were logged since `mark`; the servers each account's new
    /// logins landed on.
    async fn landed(&self, mark: &[usize], count: usize) -> BTreeMap<String, BTreeSet<&str>> {
        let new = || -> usize {
            let now = self.mark();
            now.iter().zip(mark).map(|(now, then)| now - then).sum()
        };
        assert!(
            eventually(SETTLE, async || new() >= count).await,
            "{} of {count} logins logged",
            new()
        );
        assert_eq!(new(), count, "more logins logged than made");
        let mut landed: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for ((dovecot, from), name) in self.dovecots.iter().zip(mark).zip(SERVERS) {
            for user in &dovecot.logins()[*from..] {
                landed.entry(user.clone()).or_default().insert(name);
            }
        }
        landed
    }

    /// Lets each of `accounts` log in with a token for itself.
    fn grant(&self, accounts: &[String]) {
        for account in accounts {
            self.auth.grant(account, account);
        }
    }

    /// Answers `account` a fresh token and the server 127.0.0.1:`port`; the token.
    fn answer_with_server(&self, account: &str, port: u16) -> String {
        let token = mint_token();
        self.introspection.add_token(&token, account);
        let body = serde_json::json!({
            "user": account,
            "accessToken": token,
            "host": "127.0.0.1",
            "port": port,
        });
        let answer = AuthAnswer::Raw {
            status: 200,
            body: body.to_string(),
        };
        self.auth.set_answer(account, answer);
        token
    }
}

/// The account names, `u00@pool.test` ...
fn accounts() -> Vec<String> {
    (0..ACCOUNTS)
        .map(|n| format!("u{n:02}@pool.test"))
        .collect()
}

/// The rendezvous choice for `account` among `servers`, by mailgate's own ring.
fn rendezvous<'a>(account: &str, servers: &[&'a str]) -> &'a str {
    let key = account_key(account);
    let index = ring::best(&key, servers.iter().map(|name| (*name, 1))).expect("a server");
    servers[index]
}

/// The servers but [`STOPPED`].
fn still_up() -> Vec<&'static str> {
    let mut servers = SERVERS.to_vec();
    servers.remove(STOPPED);
    servers
}

/// Logs `account` in by IMAP through `address`; the open session and the tagged answer.
async fn imap_login(address: SocketAddr, account: &str) -> (ImapClient, String) {
    let mut client = ImapClient::connect(address).await;
    let answer = client.login(account, PASSWORD).await.tagged;
    (client, answer)
}

/// How a login reaches mailgate.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    Imap,
    Smtp,
}

/// Logs every one of `accounts` in by `protocol` through `address`, [`BATCH`] at once, each
/// session ended by the client; panics on a failed login.
async fn logins(protocol: Protocol, address: SocketAddr, accounts: &[String]) {
    for batch in accounts.chunks(BATCH) {
        let mut tasks = tokio::task::JoinSet::new();
        for account in batch {
            let account = account.clone();
            tasks.spawn(async move {
                match protocol {
                    Protocol::Imap => {
                        let (mut client, answer) = imap_login(address, &account).await;
                        assert!(answer.contains(" OK"), "{account}: {answer}");
                        client.command("LOGOUT").await;
                    }
                    Protocol::Smtp => smtp_login(address, &account).await,
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a login task");
        }
    }
}

/// Logs `account` in by SMTP (AUTH PLAIN) through `address` and quits.
async fn smtp_login(address: SocketAddr, account: &str) {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut session = BufReader::new(stream);
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{account}\0{PASSWORD}"));
    let commands = format!("EHLO client.test\r\nAUTH PLAIN {plain}\r\n");
    session
        .get_mut()
        .write_all(commands.as_bytes())
        .await
        .expect("write");
    let mut line = String::new();
    while !line.starts_with("235 ") {
        line.clear();
        session.read_line(&mut line).await.expect("read");
        assert!(
            !line.is_empty() && !line.starts_with('4') && !line.starts_with('5'),
            "{account}: {line}"
        );
    }
    session
        .get_mut()
        .write_all(b"QUIT\r\n")
        .await
        .expect("write");
}

impl Gate {
    /// Status code and body of `GET path` on the admin endpoint.
    async fn get(&self, path: &str) -> (String, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.admin);
        let out = curl(&["-s", "-o", "-", "-w", "\n%{http_code}", &url]).await;
        let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned())
    }

    /// The value of `name{listener="imap",server=...}` plus `more` labels; -1 when absent.
    async fn imap_metric(&self, name: &str, server: &str, more: &str) -> f64 {
        let series = format!("{name}{{listener=\"imap\",server=\"{server}\"{more}}}");
        metric(&self.get("/metrics").await.1, &series)
    }

    /// Whether the IMAP pool's `server` is marked `up` (1) or down (0) within [`SETTLE`].
    async fn marked(&self, server: &str, up: f64) -> bool {
        eventually(SETTLE, async || {
            self.imap_metric("mailgate_backend_up", server, "").await == up
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_stay_on_their_rendezvous_server_through_failover_and_return() {
    with_timeout(TEST_LIMIT, async {
        let mut pool = Backends::start().await;
        let accounts = accounts();
        pool.grant(&accounts);
        let first = pool.gate("").await;
        let second = pool.gate("").await;
        let home: BTreeMap<&str, &str> = accounts
            .iter()
            .map(|a| (a.as_str(), rendezvous(a, &SERVERS)))
            .collect();
        let used: BTreeSet<&str> = home.values().copied().collect();
        assert_eq!(
            used.len(),
            SERVERS.len(),
            "a server got no account: {home:?}"
        );

        // 200 IMAP logins, half through each mailgate, then one SMTP login per account.
        let mark = pool.mark();
        for gate in [&first, &second, &first, &second] {
            logins(Protocol::Imap, gate.imap, &accounts).await;
        }
        logins(Protocol::Smtp, first.smtp, &accounts).await;
        let landed = pool.landed(&mark, 5 * ACCOUNTS).await;
        for account in &accounts {
            let servers = &landed[account.as_str()];
            let expected = BTreeSet::from([home[account.as_str()]]);
            assert_eq!(servers, &expected, "{account}");
        }
        for gate in [&first, &second] {
            for server in SERVERS {
                let homed = home.values().filter(|h| **h == server).count();
                let ok = gate
                    .imap_metric("mailgate_backend_logins_total", server, ",result=\"ok\"")
                    .await;
                assert_eq!(ok, (2 * homed) as f64, "{server} ok logins");
            }
        }

        let moved = fail_over(&mut pool, &first, &home).await;
        come_back(&mut pool, &first, &moved).await;
        all_down(&mut pool, &first, &accounts).await;
    })
    .await;
}

/// The server [`STOPPED`] killed: its accounts' next login goes to their next choice at once,
/// no other account moves, the probes mark it down and mailgate stays ready. The moved accounts.
async fn fail_over(pool: &mut Backends, gate: &Gate, home: &BTreeMap<&str, &str>) -> Vec<String> {
    let accounts = accounts();
    pool.dovecots[STOPPED].stop();
    let mark = pool.mark();
    logins(Protocol::Imap, gate.imap, &accounts).await;
    let landed = pool.landed(&mark, ACCOUNTS).await;
    let mut moved = Vec::new();
    for account in &accounts {
        let expected = match home[account.as_str()] {
            server if server == SERVERS[STOPPED] => {
                moved.push(account.clone());
                rendezvous(account, &still_up())
            }
            server => server,
        };
        assert_eq!(
            landed[account.as_str()],
            BTreeSet::from([expected]),
            "{account}"
        );
    }
    assert!(
        gate.marked(SERVERS[STOPPED], 0.0).await,
        "dc2 not marked down"
    );
    assert_eq!(gate.get("/readyz").await.0, "200");
    moved
}

/// [`STOPPED`] restarted: an account with a session open on its second server stays there
/// until that session ends; one without goes home as soon as the probes let it.
async fn come_back(pool: &mut Backends, gate: &Gate, moved: &[String]) {
    let (kept, others) = moved.split_first().expect("dc2 had accounts");
    let (mut open, answer) = imap_login(gate.imap, kept).await;
    assert!(answer.contains(" OK"), "{answer}");
    pool.dovecots[STOPPED].start_again().await;
    assert!(
        gate.marked(SERVERS[STOPPED], 1.0).await,
        "dc2 not marked up"
    );
    let mark = pool.mark();
    logins(Protocol::Imap, gate.imap, std::slice::from_ref(kept)).await;
    logins(Protocol::Imap, gate.imap, others).await;
    let landed = pool.landed(&mark, moved.len()).await;
    let away = rendezvous(kept, &still_up());
    assert_eq!(landed[kept.as_str()], BTreeSet::from([away]), "{kept}");
    for account in others {
        assert_eq!(landed[account.as_str()], BTreeSet::from([SERVERS[STOPPED]]));
    }
    // A client closes once the server said BYE; mailgate's splice waits for that close.
    open.command("LOGOUT").await;
    drop(open);
    assert!(
        eventually(SETTLE, async || {
            gate.imap_metric("mailgate_backend_sessions", away, "")
                .await
                == 0.0
        })
        .await,
        "the session on {away} did not end"
    );
    let mark = pool.mark();
    logins(Protocol::Imap, gate.imap, std::slice::from_ref(kept)).await;
    let landed = pool.landed(&mark, 1).await;
    assert_eq!(landed[kept.as_str()], BTreeSet::from([SERVERS[STOPPED]]));
}

/// Every server stopped: logins fail for now, and the probes make mailgate unready.
async fn all_down(pool: &mut Backends, gate: &Gate, accounts: &[String]) {
    for dovecot in &mut pool.dovecots {
        dovecot.stop();
    }
    let (_, answer) = imap_login(gate.imap, &accounts[0]).await;
    assert!(answer.contains(" NO [UNAVAILABLE]"), "{answer}");
    assert!(
        eventually(SETTLE, async || gate.get("/readyz").await.0 == "503").await,
        "still ready"
    );
    let (_, body) = gate.get("/readyz").await;
    assert!(
        body.contains("no server of a listener's pool is up"),
        "{body}"
    );
    let (_, answer) = imap_login(gate.imap, &accounts[1]).await;
    assert!(answer.contains(" NO [UNAVAILABLE]"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_named_by_the_token_source_or_the_routes() {
    with_timeout(TEST_LIMIT, async {
        let pool = Backends::start().await;
        let accounts = accounts();
        let by_source = pool.gate("      routing: from_token_source\n").await;

        // The token source's server wins over the ring; one outside the pool is refused.
        let named = &accounts[0];
        let target = (0..SERVERS.len())
            .find(|i| SERVERS[*i] != rendezvous(named, &SERVERS))
            .expect("another server");
        let named_token = pool.answer_with_server(named, pool.dovecots[target].imaps_port);
        let outside = &accounts[1];
        let outside_token = pool.answer_with_server(outside, free_port());
        let mark = pool.mark();
        logins(Protocol::Imap, by_source.imap, std::slice::from_ref(named)).await;
        let landed = pool.landed(&mark, 1).await;
        assert_eq!(landed[named.as_str()], BTreeSet::from([SERVERS[target]]));
        let (_, answer) = imap_login(by_source.imap, outside).await;
        assert!(answer.contains(" NO "), "{answer}");
        let output = by_source.mailgate.output();
        assert!(output.contains("not a server of the pool"), "{output}");
        for token in [named_token, outside_token] {
            by_source.mailgate.assert_not_logged(&token);
        }

        // Static routes (an account in any case): a routed account on its server, every
        // other on the fallback.
        let routed = accounts
            .iter()
            .find(|a| rendezvous(a, &SERVERS) != SERVERS[2])
            .expect("an account homed elsewhere");
        let unrouted: Vec<String> = accounts
            .iter()
            .filter(|a| *a != routed && rendezvous(a, &SERVERS) != SERVERS[0])
            .take(3)
            .cloned()
            .collect();
        let routing = format!(
            "      routing: static\n      routes: {{\"{}\": {}}}\n      fallback: {}\n",
            routed.to_uppercase(),
            SERVERS[2],
            SERVERS[0]
        );
        let by_routes = pool.gate(&routing).await;
        pool.grant(std::slice::from_ref(routed));
        pool.grant(&unrouted);
        let mark = pool.mark();
        logins(Protocol::Imap, by_routes.imap, std::slice::from_ref(routed)).await;
        logins(Protocol::Imap, by_routes.imap, &unrouted).await;
        let landed = pool.landed(&mark, 1 + unrouted.len()).await;
        assert_eq!(landed[routed.as_str()], BTreeSet::from([SERVERS[2]]));
        for account in &unrouted {
            assert_eq!(
                landed[account.as_str()],
                BTreeSet::from([SERVERS[0]]),
                "{account}"
            );
        }
    })
    .await;
}

//! Replicas sharing one Redis (`tokens.shared.redis`): three real mailgate processes, one real
//! redis-server, one real Dovecot and the local OAuth2 provider. The provider counts and
//! refuses what a real one would: a rotated refresh token presented again revokes its whole
//! family (RFC 9700 reuse detection), so a token redeemed twice shows as failed logins.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::imap_client::ImapClient;
use support::oauth2::{ClientCredential, OAuthProvider};
use support::process::send_signal;
use support::redis::RedisServer;
use support::{DovecotOptions, Mailgate, TestUpstream, curl, eventually, free_port, with_timeout};

const MINUTES: Duration = Duration::from_secs(180);
const CLIENT: &str = "mailgate";
const CLIENT_SECRET: &str = "client-secret-9c2d";
const SCOPE: &str = "mail offline_access";
const ALICE: &str = "alice@example.test";

/// Many logins of one user at once: Dovecot's per-user and per-process defaults raised.
const DOVECOT_TUNING: &str = "
protocol imap {
  mail_max_userip_connections = 2000
}
service imap-login {
  service_count = 0
  client_limit = 1000
}
service imap {
  service_count = 0
  client_limit = 1000
  process_limit = 20
}
default_client_limit = 5000
";

/// One replica's ports and, while it runs, its process.
struct Replica {
    imap: u16,
    admin: u16,
    process: Option<Mailgate>,
}

impl Replica {
    fn imap_address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.imap))
    }
}

/// The shared parts and three replicas.
struct Cluster {
    up: TestUpstream,
    provider: OAuthProvider,
    redis: RedisServer,
    dir: tempfile::TempDir,
    replicas: Vec<Replica>,
    accounts: Vec<String>,
    /// Each account's refresh token as onboarded.
    onboarded: Vec<String>,
    tail: String,
}

impl Cluster {
    /// The parts, with `accounts` (refresh-token accounts, all logging in as Alice) onboarded
    /// into Redis; no replica runs yet.
    async fn start(accounts: usize, tail: &str) -> Cluster {
        let up = TestUpstream::start_with(&DovecotOptions {
            tuning: DOVECOT_TUNING.to_owned(),
            ..DovecotOptions::default()
        })
        .await;
        let provider = OAuthProvider::start(&up.introspection).await;
        provider.add_client(CLIENT, ClientCredential::Secret(CLIENT_SECRET.to_owned()));
        provider.set_reuse_detection(true);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client-secret"), CLIENT_SECRET).unwrap();
        std::fs::write(
            dir.path().join("store-key"),
            "bWFpbGdhdGUtdGVzdC1zdG9yZS1rZXktMzItYnl0ZXM=\n",
        )
        .unwrap();
        let mut cluster = Cluster {
            up,
            provider,
            redis: RedisServer::start().await,
            dir,
            replicas: (0..3)
                .map(|_| Replica {
                    imap: free_port(),
                    admin: free_port(),
                    process: None,
                })
                .collect(),
            accounts: (0..accounts).map(|n| format!("user{n}")).collect(),
            onboarded: Vec::new(),
            tail: tail.to_owned(),
        };
        for account in cluster.accounts.clone() {
            let token = cluster.onboard(&account).await;
            cluster.onboarded.push(token);
        }
        cluster
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replica `n`'s configuration: IMAP to Dovecot, refresh tokens and everything else in
    /// Redis (no store directory).
    fn config(&self, n: usize) -> String {
        let replica = &self.replicas[n];
        let listeners = self.up.mailgate_config(replica.imap, free_port());
        let imap_only = listeners.split("  - name: smtp").next().unwrap();
        let accounts: String = self
            .accounts
            .iter()
            .map(|id| {
                format!(
                    "      {id}: {{ provider: local, grant: refresh_token, user: \"{ALICE}\" }}\n"
                )
            })
            .collect();
        format!(
            r#"{imap_only}admin: {{ listen: "127.0.0.1:{admin}" }}
tokens:
  shared:
    redis: {{ url: "{redis}", timeout: 500ms }}
  oauth2:
    timeout: 5s
    store: {{ key_file: "{key}" }}
    providers:
      local:
        preset: custom
        token_url: "{token_url}"
        client_id: {CLIENT}
        client_secret_file: "{secret}"
        scope: "{SCOPE}"
    accounts:
{accounts}{tail}"#,
            admin = replica.admin,
            redis = self.redis.url(),
            key = self.path("store-key").display(),
            secret = self.path("client-secret").display(),
            token_url = self.provider.token_url(),
            tail = self.tail,
        )
    }

    /// A refresh token for `account` at the provider, imported into Redis as an operator
    /// would (`mailgate accounts import`, with replica 0's configuration).
    async fn onboard(&self, account: &str) -> String {
        let token = self.provider.issue_refresh_token(CLIENT, ALICE, SCOPE);
        let file = self.path(&format!("{account}.rt"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let mut import = Mailgate::spawn(
            &self.config(0),
            &[
                "accounts",
                "import",
                "--no-check",
                "--account",
                account,
                "--refresh-token-file",
                &file.display().to_string(),
            ],
            &[],
        );
        let code = import.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(code, Some(0), "{}", import.output());
        token
    }

    async fn start_all(&mut self) {
        for n in 0..self.replicas.len() {
            self.start_replica(n).await;
        }
    }

    async fn start_replica(&mut self, n: usize) {
        let config = self.config(n);
        self.replicas[n].process = Some(Mailgate::start(&config).await);
    }

    fn replica(&self, n: usize) -> &Mailgate {
        self.replicas[n].process.as_ref().expect("running")
    }

    /// Every replica's output, for failure messages.
    fn output(&self) -> String {
        self.replicas
            .iter()
            .filter_map(|replica| replica.process.as_ref())
            .map(Mailgate::output)
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    async fn readyz(&self, n: usize) -> String {
        curl(&[
            "-w",
            " %{http_code}",
            &format!("http://127.0.0.1:{}/readyz", self.replicas[n].admin),
        ])
        .await
        .stdout
    }

    async fn metrics(&self, n: usize) -> String {
        curl(&[&format!(
            "http://127.0.0.1:{}/metrics",
            self.replicas[n].admin
        )])
        .await
        .stdout
    }

    /// Refresh-token requests the provider got, and how many it answered with tokens.
    fn refreshes(&self) -> (usize, usize) {
        let requests: Vec<_> = self
            .provider
            .token_requests()
            .into_iter()
            .filter(|request| request.grant_type == "refresh_token")
            .collect();
        let granted = requests.iter().filter(|r| r.result == "ok").count();
        (requests.len(), granted)
    }
}

/// Logs `account` in on `address` and out again; the tagged LOGIN completion.
async fn log_in_and_out(address: SocketAddr, account: &str) -> String {
    let mut client = ImapClient::connect(address).await;
    let login = client.login(account, "any-password").await;
    if login.is_ok() {
        client.command("LOGOUT").await;
    }
    login.tagged
}

/// `count` logins at once, spread over the replicas and `accounts`; the ones that failed.
async fn logins_at_once(cluster: &Cluster, count: usize) -> Vec<String> {
    let mut logins = tokio::task::JoinSet::new();
    for n in 0..count {
        let address = cluster.replicas[n % cluster.replicas.len()].imap_address();
        let account = cluster.accounts[n % cluster.accounts.len()].clone();
        logins.spawn(async move { (account.clone(), log_in_and_out(address, &account).await) });
    }
    let mut failed = Vec::new();
    while let Some(done) = logins.join_next().await {
        let (account, tagged) = done.unwrap();
        if !tagged.contains(" OK ") {
            failed.push(format!("{account}: {tagged}"));
        }
    }
    failed
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_make_one_provider_request_per_account() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(10, "").await;
        cluster.start_all().await;

        let failed = logins_at_once(&cluster, 300).await;
        assert!(failed.is_empty(), "{failed:?}\n{}", cluster.output());
        let (requests, granted) = cluster.refreshes();
        assert_eq!(
            (requests, granted),
            (10, 10),
            "one refresh per account over all replicas\n{}",
            cluster.output()
        );
        assert_eq!(cluster.provider.reuses_detected(), 0);
        // Every replica served logins, and those it did not fetch for came from Redis.
        let hits: f64 = {
            let mut sum = 0.0;
            for n in 0..3 {
                let text = cluster.metrics(n).await;
                assert!(
                    metric(
                        &text,
                        "mailgate_logins_total{listener=\"imap\",result=\"ok\"}"
                    ) >= 100.0,
                    "{text}"
                );
                sum += metric(&text, "mailgate_shared_tokens_total{result=\"hit\"}");
            }
            sum
        };
        assert!(hits >= 1.0, "no replica took another's token");
        for n in 0..3 {
            cluster.replica(n).assert_no_secret_logged();
        }
        // Redis holds the refresh tokens sealed: none of them in clear on its disk.
        let files = cluster.redis.files();
        for account in &cluster.accounts {
            assert!(files.contains(account.as_str()));
        }
        for token in cluster.provider.refresh_tokens_issued(ALICE) {
            assert!(!files.contains(&token), "a refresh token in clear in Redis");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotations_while_three_replicas_log_in_never_redeem_a_token_twice() {
    with_timeout(MINUTES, async {
        // Tokens live 3 s and are renewed 2 s before expiry: every round needs a refresh,
        // and the replicas' background renewals race the logins' fetches.
        let mut cluster =
            Cluster::start(1, "  cache: { refresh_margin: 2s, default_ttl: 3s }\n").await;
        cluster
            .provider
            .set_access_token_lifetime(Duration::from_secs(3));
        cluster.start_all().await;

        for round in 0..50 {
            let failed = logins_at_once(&cluster, 6).await;
            assert!(
                failed.is_empty(),
                "round {round}: {failed:?}\n{}",
                cluster.output()
            );
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let (requests, granted) = cluster.refreshes();
        assert_eq!(
            cluster.provider.reuses_detected(),
            0,
            "{}",
            cluster.output()
        );
        assert_eq!(requests, granted, "every refresh was granted");
        assert!(
            requests >= 25,
            "the tokens were really refreshed in the rounds ({requests})"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_refresh_is_taken_over_after_its_lease() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(1, "").await;
        cluster.start_all().await;
        let hold = cluster.provider.hold();
        // Replica 0 takes the account's locks and waits for the provider...
        let first = tokio::spawn(log_in_and_out(cluster.replicas[0].imap_address(), "user0"));
        assert!(
            eventually(Duration::from_secs(10), || async {
                cluster.provider.held_requests() == 1
            })
            .await
        );
        // ...and dies there: its request is abandoned unanswered, nothing was rotated.
        let pid = cluster.replica(0).pid().unwrap();
        send_signal(pid, "KILL");
        let _ = first.await;
        assert!(
            eventually(Duration::from_secs(5), || async {
                cluster.provider.held_requests() == 0
            })
            .await
        );
        drop(hold);
        // Replica 1 waits out the dead holder's lease, then refreshes itself.
        let tagged = log_in_and_out(cluster.replicas[1].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}\n{}", cluster.output());
        let tagged = log_in_and_out(cluster.replicas[2].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}\n{}", cluster.output());
        let (_, granted) = cluster.refreshes();
        assert_eq!(granted, 1, "{}", cluster.output());
        assert_eq!(cluster.provider.reuses_detected(), 0);
        // The account's token survives: a restarted replica 0 logs in too.
        cluster.replicas[0].process = None;
        cluster.start_replica(0).await;
        let tagged = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}\n{}", cluster.output());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logins_with_a_cached_token_outlive_a_redis_outage_and_the_rest_recover() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(2, "").await;
        cluster.start_all().await;
        // user0's token is cached on replica 0; user1 has none anywhere.
        let tagged = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}");

        cluster.redis.stop();
        let cached = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(cached.contains(" OK "), "{cached}\n{}", cluster.output());
        let uncached = log_in_and_out(cluster.replicas[1].imap_address(), "user1").await;
        assert!(
            uncached.contains("NO [UNAVAILABLE]"),
            "{uncached}\n{}",
            cluster.output()
        );
        assert!(
            cluster
                .readyz(1)
                .await
                .contains("the shared Redis does not answer"),
            "{}",
            cluster.readyz(1).await
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        cluster.redis.run().await;

        assert!(
            eventually(Duration::from_secs(20), || async {
                log_in_and_out(cluster.replicas[1].imap_address(), "user1")
                    .await
                    .contains(" OK ")
            })
            .await,
            "{}",
            cluster.output()
        );
        for n in 0..3 {
            assert!(
                eventually(Duration::from_secs(20), || async {
                    cluster.readyz(n).await.ends_with(" 200")
                })
                .await,
                "{}",
                cluster.readyz(n).await
            );
        }
        assert_eq!(cluster.provider.reuses_detected(), 0);
        let text = cluster.metrics(1).await;
        assert!(
            metric(
                &text,
                "mailgate_redis_calls_total{op=\"token_claim\",result=\"unreachable\"}"
            ) + metric(
                &text,
                "mailgate_redis_calls_total{op=\"token_claim\",result=\"timeout\"}"
            ) >= 1.0,
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_redis_costs_logins_no_more_than_its_deadline() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(2, "").await;
        cluster.start_all().await;
        let tagged = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(tagged.contains(" OK "), "{tagged}");

        // Accepting connections, answering nothing: the worst a Redis can do.
        cluster.redis.freeze(true);
        let cached = tokio::time::timeout(
            Duration::from_secs(10),
            log_in_and_out(cluster.replicas[0].imap_address(), "user0"),
        )
        .await
        .expect("a cached login does not wait for Redis");
        assert!(cached.contains(" OK "), "{cached}");
        let uncached = tokio::time::timeout(
            Duration::from_secs(10),
            log_in_and_out(cluster.replicas[2].imap_address(), "user1"),
        )
        .await
        .expect("an uncached login fails within the deadline");
        assert!(uncached.contains("NO [UNAVAILABLE]"), "{uncached}");
        cluster.redis.freeze(false);
        assert!(
            eventually(Duration::from_secs(20), || async {
                log_in_and_out(cluster.replicas[2].imap_address(), "user1")
                    .await
                    .contains(" OK ")
            })
            .await,
            "{}",
            cluster.output()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_grant_on_one_replica_ends_the_accounts_sessions_on_all() {
    with_timeout(MINUTES, async {
        let mut cluster = Cluster::start(2, "").await;
        cluster.start_all().await;
        let mut sessions = Vec::new();
        for n in 0..3 {
            let mut client = ImapClient::connect(cluster.replicas[n].imap_address()).await;
            let login = client.login("user0", "any-password").await;
            assert!(login.is_ok(), "{login:?}");
            sessions.push(client);
        }
        let mut other = ImapClient::connect(cluster.replicas[1].imap_address()).await;
        assert!(other.login("user1", "any-password").await.is_ok());

        // user0's grant family is revoked, its access token too. Replicas 1 and 2 hold that
        // token for an hour; replica 0 finds out at the next login and must tell them.
        assert!(cluster.provider.revoke_family(&cluster.onboarded[0]));
        let refused = log_in_and_out(cluster.replicas[0].imap_address(), "user0").await;
        assert!(
            refused.contains("NO [AUTHENTICATIONFAILED]"),
            "{refused}\n{}",
            cluster.output()
        );
        for (n, session) in sessions.iter_mut().enumerate() {
            let bye = tokio::time::timeout(Duration::from_secs(8), session.line())
                .await
                .unwrap_or_else(|_| panic!("replica {n} kept the session\n{}", cluster.output()));
            assert_eq!(
                bye, "* BYE Access to this account was revoked; log in again\r\n",
                "replica {n}"
            );
        }
        assert!(
            other.command("NOOP").await.is_ok(),
            "user1's session goes on"
        );
    })
    .await;
}

//! Replicas sharing one Redis (`tokens.shared.redis`), as the replicas tests and the replicas
//! benchmark run them: mailgate processes with an IMAP listener each, one redis-server, one
//! Dovecot and the local OAuth2 provider, with refresh-token accounts (all logging in as
//! Alice) onboarded into Redis. The provider revokes a family when a rotated refresh token is
//! presented again (RFC 9700 reuse detection), so a token redeemed twice shows as failures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::imap_client::ImapClient;
use super::oauth2::{ClientCredential, OAuthProvider};
use super::redis::RedisServer;
use super::{DovecotOptions, Mailgate, TestUpstream, curl, free_port};

pub const CLIENT: &str = "mailgate";
const CLIENT_SECRET: &str = "client-secret-9c2d";
const SCOPE: &str = "mail offline_access";
pub const ALICE: &str = "alice@example.test";

/// Many logins of one user at once: Dovecot's per-user and per-process defaults raised.
pub const DOVECOT_TUNING: &str = "
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
pub struct Replica {
    pub imap: u16,
    pub admin: u16,
    pub process: Option<Mailgate>,
}

impl Replica {
    pub fn imap_address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.imap))
    }
}

/// The shared parts and the replicas.
pub struct Cluster {
    pub up: TestUpstream,
    pub provider: OAuthProvider,
    pub redis: RedisServer,
    dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub accounts: Vec<String>,
    /// Each account's refresh token as onboarded.
    pub onboarded: Vec<String>,
    /// Configuration lines after the accounts (e.g. `tokens.cache`), indented two spaces.
    tail: String,
}

impl Cluster {
    /// The parts and `replicas` replicas' ports, with `accounts` (refresh-token accounts, all
    /// logging in as Alice) onboarded into Redis; no replica runs yet.
    pub async fn start(replicas: usize, accounts: usize, tail: &str) -> Cluster {
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
            replicas: (0..replicas)
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replica `n`'s configuration: IMAP to Dovecot, refresh tokens and everything else in
    /// Redis (no store directory).
    pub fn config(&self, n: usize) -> String {
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
        device_url: "{device_url}"
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
            device_url = self.provider.device_url(),
            tail = self.tail,
        )
    }

    /// A refresh token for `account` at the provider, imported into Redis as an operator
    /// would (`mailgate accounts import`, with replica 0's configuration).
    pub async fn onboard(&self, account: &str) -> String {
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

    pub async fn start_all(&mut self) {
        for n in 0..self.replicas.len() {
            self.start_replica(n).await;
        }
    }

    pub async fn start_replica(&mut self, n: usize) {
        let config = self.config(n);
        self.replicas[n].process = Some(Mailgate::start(&config).await);
    }

    pub fn replica(&self, n: usize) -> &Mailgate {
        self.replicas[n].process.as_ref().expect("running")
    }

    /// Every replica's output, for failure messages.
    pub fn output(&self) -> String {
        self.replicas
            .iter()
            .filter_map(|replica| replica.process.as_ref())
            .map(Mailgate::output)
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    pub async fn readyz(&self, n: usize) -> String {
        curl(&[
            "-w",
            " %{http_code}",
            &format!("http://127.0.0.1:{}/readyz", self.replicas[n].admin),
        ])
        .await
        .stdout
    }

    pub async fn metrics(&self, n: usize) -> String {
        curl(&[&format!(
            "http://127.0.0.1:{}/metrics",
            self.replicas[n].admin
        )])
        .await
        .stdout
    }

    /// Refresh-token requests the provider got, and how many it answered with tokens.
    pub fn refreshes(&self) -> (usize, usize) {
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
pub async fn log_in_and_out(address: SocketAddr, account: &str) -> String {
    let mut client = ImapClient::connect(address).await;
    let login = client.login(account, "any-password").await;
    if login.is_ok() {
        client.command("LOGOUT").await;
    }
    login.tagged
}

/// `count` logins at once, spread over the replicas and `accounts`; the ones that failed.
pub async fn logins_at_once(cluster: &Cluster, count: usize) -> Vec<String> {
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

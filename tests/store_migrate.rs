//! `mailgate store migrate`: the real binary moves refresh-token records from a file store to
//! a real redis-server and back; `accounts` then reads them from Redis, a record that differs
//! at the destination is kept, and a dry run changes nothing.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use mailgate::secret::Secret;
use mailgate::token::oauth2::store::TokenStore as _;
use mailgate::token::oauth2::store::file::FileStore;
use support::redis::RedisServer;
use support::{Mailgate, with_timeout};

const MINUTE: Duration = Duration::from_secs(60);
/// 32 bytes, base64.
const STORE_KEY: &str = "bWFpbGdhdGUtdGVzdC1zdG9yZS1rZXktMzItYnl0ZXM=";
const ALICE_TOKEN: &str = "rt-Alice-5tq9Vw2mXz";
const BOB_TOKEN: &str = "rt-Bob-8Lk3Hs1pQe";
const BOB_NEWER_TOKEN: &str = "rt-Bob-Newer-4Jd7Rf";
const CAROL_TOKEN: &str = "rt-Carol-2Wn6Ty0Ub";

struct Setup {
    dir: tempfile::TempDir,
    redis: RedisServer,
}

/// Which stores a configuration names.
#[derive(Clone, Copy)]
enum Stores<'a> {
    /// The file store in this directory.
    File(&'a Path),
    /// Redis only, as replicas run.
    Redis,
    /// Both, as a migration needs.
    Both(&'a Path),
}

impl Setup {
    async fn start() -> Self {
        for token in [ALICE_TOKEN, BOB_TOKEN, BOB_NEWER_TOKEN, CAROL_TOKEN] {
            support::secrets::remember("refresh token", token);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store-key"), format!("{STORE_KEY}\n")).unwrap();
        Setup {
            dir,
            redis: RedisServer::start().await,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A configuration with `accounts` (ids of refresh_token accounts) and `stores`; the
    /// provider is never asked.
    fn config(&self, accounts: &[&str], stores: Stores) -> String {
        let key = self.path("store-key").display().to_string();
        let store = match stores {
            Stores::File(dir) | Stores::Both(dir) => {
                format!("{{ dir: \"{}\", key_file: \"{key}\" }}", dir.display())
            }
            Stores::Redis => format!("{{ key_file: \"{key}\" }}"),
        };
        let shared = match stores {
            Stores::File(_) => String::new(),
            Stores::Redis | Stores::Both(_) => format!(
                "  shared:\n    redis: {{ url: \"{}\" }}\n",
                self.redis.url()
            ),
        };
        let accounts: String = accounts
            .iter()
            .map(|id| {
                format!(
                    "      {id}: {{ provider: local, grant: refresh_token, user: \"{id}@example.test\" }}\n"
                )
            })
            .collect();
        format!(
            r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:1143"
    upstream: {{ host: 127.0.0.1, port: 993, tls: implicit }}
tokens:
  oauth2:
    timeout: 2s
    store: {store}
    providers:
      local:
        preset: custom
        token_url: "http://127.0.0.1:9/token"
        client_id: mailgate
    accounts:
{accounts}{shared}"#
        )
    }

    /// `mailgate accounts import --no-check` of `token` for `account`.
    async fn import(&self, config: &str, account: &str, token: &str) {
        let file = self.path(&format!("{account}.rt"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let file = file.display().to_string();
        let (code, out, err) = command(
            config,
            &[
                "accounts",
                "import",
                "--account",
                account,
                "--refresh-token-file",
                &file,
                "--no-check",
            ],
        )
        .await;
        assert_eq!(code, Some(0), "{out}{err}");
    }

    /// The refresh token of each of `accounts` in the file store in `dir` (`None`: no record).
    async fn tokens_in(&self, dir: &Path, accounts: &[&str]) -> Vec<Option<String>> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(STORE_KEY)
            .unwrap();
        let store = FileStore::at(dir, &Secret::new(key)).unwrap();
        let mut tokens = Vec::new();
        for account in accounts {
            let record = store.load(account).await.unwrap();
            tokens.push(record.and_then(|r| r.refresh_token.map(|t| t.expose().clone())));
        }
        tokens
    }
}

/// Runs `mailgate ARGS --config FILE` to completion: exit code, stdout, stderr.
async fn command(config: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut run = Mailgate::spawn(config, args, &[]);
    let code = run.wait_exit(MINUTE).await;
    (code, run.stdout(), run.stderr())
}

/// The line of `output` that starts with `prefix`.
fn line<'a>(output: &'a str, prefix: &str) -> &'a str {
    output
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_move_to_redis_and_back_and_a_conflict_is_kept() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let files = s.path("tokens");
        // carol's record is in the directory, but the migration's configuration no longer
        // names her.
        let onboarding = s.config(&["alice", "bob", "carol"], Stores::File(&files));
        s.import(&onboarding, "alice", ALICE_TOKEN).await;
        s.import(&onboarding, "bob", BOB_TOKEN).await;
        s.import(&onboarding, "carol", CAROL_TOKEN).await;
        let both = s.config(&["alice", "bob"], Stores::Both(&files));
        let redis = s.config(&["alice", "bob"], Stores::Redis);

        let (code, out, err) =
            command(&both, &["store", "migrate", "--to", "redis", "--dry-run"]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert_eq!(line(&out, "alice:"), "alice: would be moved");
        assert_eq!(line(&out, "bob:"), "bob: would be moved");
        assert_eq!(
            s.redis.cli(&["DBSIZE"]).await.trim(),
            "0",
            "a dry run writes nothing"
        );
        let (_, listing, _) = command(&redis, &["accounts"]).await;
        assert!(
            line(&listing, "alice").contains("never authorized"),
            "{listing}"
        );

        let (code, out, err) = command(&both, &["store", "migrate", "--to", "redis"]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert_eq!(line(&out, "alice:"), "alice: moved");
        assert_eq!(line(&out, "bob:"), "bob: moved");
        assert!(line(&out, "carol.token:").contains("skipped"), "{out}");
        // The source is left as it was.
        assert_eq!(
            s.tokens_in(&files, &["alice", "bob", "carol"]).await,
            [
                Some(ALICE_TOKEN.into()),
                Some(BOB_TOKEN.into()),
                Some(CAROL_TOKEN.into())
            ]
        );
        let (code, listing, _) = command(&redis, &["accounts"]).await;
        assert_eq!(code, Some(0));
        for account in ["alice", "bob"] {
            assert!(
                line(&listing, account).contains("not yet tried"),
                "{listing}"
            );
        }
        let (code, out, _) = command(&both, &["store", "migrate", "--to", "redis"]).await;
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(line(&out, "bob:"), "bob: already there");

        // bob is authorized anew against Redis: the older copy in the directory is no
        // reason to overwrite it.
        s.import(&redis, "bob", BOB_NEWER_TOKEN).await;
        let (code, out, _) = command(&both, &["store", "migrate", "--to", "redis"]).await;
        assert_eq!(code, Some(1), "{out}");
        assert_eq!(line(&out, "alice:"), "alice: already there");
        // Neither token was redeemed yet: the line says so, and how to replace it.
        assert_eq!(
            line(&out, "bob:"),
            "bob: conflict: Redis holds another record (never redeemed; the source's: never \
             redeemed); left as it is (--overwrite replaces it)"
        );

        let back = s.path("tokens-back");
        let both_back = s.config(&["alice", "bob"], Stores::Both(&back));
        let (code, out, err) = command(
            &both_back,
            &["store", "migrate", "--to", "file", "--dry-run"],
        )
        .await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(!back.exists(), "a dry run creates nothing");
        let (code, out, err) = command(&both_back, &["store", "migrate", "--to", "file"]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert_eq!(line(&out, "alice:"), "alice: moved");
        assert_eq!(
            s.tokens_in(&back, &["alice", "bob"]).await,
            [Some(ALICE_TOKEN.into()), Some(BOB_NEWER_TOKEN.into())]
        );
        let (_, listing, _) = command(
            &s.config(&["alice", "bob"], Stores::File(&back)),
            &["accounts"],
        )
        .await;
        assert!(line(&listing, "bob").contains("not yet tried"), "{listing}");

        // --overwrite puts the directory's older token back into Redis.
        let (code, out, _) =
            command(&both, &["store", "migrate", "--to", "redis", "--overwrite"]).await;
        assert_eq!(code, Some(0), "{out}");
        assert!(
            line(&out, "bob:").starts_with("bob: moved, replacing"),
            "{out}"
        );
        let again = s.path("tokens-again");
        let both_again = s.config(&["alice", "bob"], Stores::Both(&again));
        let (code, out, _) = command(&both_again, &["store", "migrate", "--to", "file"]).await;
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(
            s.tokens_in(&again, &["bob"]).await,
            [Some(BOB_TOKEN.into())]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_needs_both_stores_in_the_configuration() {
    with_timeout(MINUTE, async {
        let s = Setup::start().await;
        let files = s.path("tokens");
        for (stores, missing) in [
            (Stores::File(&files), "tokens.shared.redis"),
            (Stores::Redis, "tokens.oauth2.store.dir"),
        ] {
            for to in ["redis", "file"] {
                let config = s.config(&["alice"], stores);
                let (code, out, err) = command(&config, &["store", "migrate", "--to", to]).await;
                assert_eq!(code, Some(64), "{out}{err}");
                assert!(err.contains(missing), "{err}");
            }
        }
        let (code, _, err) = command(
            &s.config(&["alice"], Stores::Both(&files)),
            &["store", "migrate", "--to", "redis"],
        )
        .await;
        assert_eq!(code, Some(64));
        assert!(err.contains("does not exist"), "{err}");
    })
    .await;
}

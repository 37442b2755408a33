//! Access tokens shared by replicas: a second cache level behind each replica's own, one hash
//! per token key (`exp`, the expiry in Unix milliseconds, and `token`, sealed), living until
//! the token is within the refresh margin of its expiry. A miss takes the key's flight lock
//! in the same round trip, so one replica fetches while the others wait for its token.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::cache::expiry_from_now;
use super::oauth2::store::seal::Sealer;
use super::{ServerAddress, Token, TokenError, TokenKey};
use crate::login::UpstreamAuth;
use crate::replicas::news::{self, News};
use crate::replicas::{Redis, SharedError, lock, millis};
use crate::secret::Secret;

/// How often a replica waiting for another's fetch looks again.
const FLIGHT_POLL: Duration = Duration::from_millis(25);
/// How long a replica killed mid-fetch holds the others up; a fetch that outlasts it only
/// costs one more fetch (the refresh itself is under the store's lease).
const FLIGHT_LEASE: Duration = Duration::from_secs(6);

/// A sealed access token takes a few kilobytes; anything this much larger is not one.
const MAX_SEALED_BYTES: usize = 64 * 1024;

/// Lua: the expiry of the entry `key` as a number and as stored, if it is one of ours: an
/// entry of another type, without a token or with one larger than `max` bytes, or whose expiry
/// is no whole number of milliseconds (another writer's, a corrupted one) counts as absent and
/// is written over.
const EXPIRY_LUA: &str = "local function expiry(key, max)
  if redis.call('TYPE', key).ok ~= 'hash' then return nil end
  local size = redis.call('HSTRLEN', key, 'token')
  if size == 0 or size > tonumber(max) then return nil end
  local exp = redis.call('HGET', key, 'exp')
  if exp and #exp <= 15 and string.match(exp, '^%d+$') then return tonumber(exp), exp end
end
";

/// The shared token if it expires after `ARGV[2]`; else the flight lock (`{2, fence}`), or
/// `{0, ''}` while another replica holds it.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{EXPIRY_LUA}local exp, stored = expiry(KEYS[1], ARGV[3])
if exp and exp > tonumber(ARGV[2]) then
  return {{1, redis.call('HGET', KEYS[1], 'token'), stored}}
end
{}return {{2, tostring(fence), ''}}",
        lock::acquire_lua(2, 3, 1, "{0, '', ''}")
    ))
});

/// Stores a token unless a later-expiring one is there already.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{EXPIRY_LUA}local exp = expiry(KEYS[1], ARGV[4])
if exp and exp >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'exp', ARGV[1], 'token', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1"
    ))
});

/// Drops the token expiring at `ARGV[1]` (the one the upstream refused), not a newer one.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('HGET', KEYS[1], 'exp') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

/// A token as sealed into Redis.
#[derive(Serialize, Deserialize)]
struct Sealed {
    user: String,
    /// `bearer` or `password` (an auth server may hand out a password).
    kind: String,
    secret: String,
    /// Whether the source said how long it lives (else the default lifetime applies).
    lifetime_known: bool,
    /// The backend the source named, as `[host, port]`; absent from records written before
    /// sources could name one, and from tokens without one (so those read the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server: Option<(String, u16)>,
}

/// What a claim found.
pub enum Claim {
    /// The shared token, with its lifetime from now, and its expiry (Unix ms).
    Token(Token, u64),
    /// A token that does not open (sealed with another key): to be fetched anew.
    Unreadable,
    /// This replica fetches; the others wait until it stores the token or lets go.
    Fetch(lock::Held),
    /// Another replica is fetching.
    Busy,
}

pub struct SharedTokens {
    redis: Arc<Redis>,
    sealer: Sealer,
    /// A token is not shared closer than this to its expiry (the cache's refresh margin).
    margin: Duration,
}

impl SharedTokens {
    /// # Errors
    /// The key is not 32 bytes.
    pub fn new(redis: Arc<Redis>, key: &Secret<Vec<u8>>, margin: Duration) -> Result<Self, String> {
        Ok(Self {
            redis,
            sealer: Sealer::new(key).map_err(|e| e.to_string())?,
            margin,
        })
    }

    /// A token for `key` expiring after `later_than` (Unix ms), fetched once by one replica
    /// for all: `fetch` runs here only if this replica got the flight lock, and waits for the
    /// other's token otherwise (until `wait` has passed).
    ///
    /// Returns the token and its expiry (Unix ms) as the replicas know it.
    ///
    /// # Errors
    /// What `fetch` reported; [`TokenError::Unavailable`] when Redis failed or another
    /// replica's fetch took longer than `wait`.
    pub async fn get_or_fetch<F>(
        &self,
        key: &TokenKey,
        later_than: u64,
        wait: Duration,
        fetch: F,
    ) -> Result<(Token, u64), TokenError>
    where
        F: AsyncFnOnce() -> Result<Token, TokenError>,
    {
        let started = Instant::now();
        let deadline = started + wait;
        let mut later_than = later_than;
        let mut waited = false;
        let result = loop {
            match self.claim(key, later_than).await.map_err(unavailable)? {
                Claim::Token(token, expires_at) => {
                    self.redis.metrics().shared_token("hit");
                    break Ok((token, expires_at));
                }
                Claim::Fetch(held) => {
                    self.redis.metrics().shared_token("fetched");
                    let fetched = self.fetch_and_share(key, fetch).await;
                    held.release().await;
                    break fetched;
                }
                Claim::Unreadable => later_than = u64::MAX,
                Claim::Busy if Instant::now() < deadline => {
                    waited = true;
                    tokio::time::sleep(FLIGHT_POLL).await;
                }
                Claim::Busy => {
                    self.redis.metrics().shared_token("wait_timeout");
                    break Err(TokenError::Unavailable(
                        "another replica's token request is taking too long".to_owned(),
                    ));
                }
            }
        };
        if waited {
            let seconds = started.elapsed().as_secs_f64();
            self.redis
                .metrics()
                .lock_waited("shared_token_flight", seconds);
        }
        result
    }

    /// `fetch`, then the token shared; with its expiry as the replicas know it.
    async fn fetch_and_share<F>(&self, key: &TokenKey, fetch: F) -> Result<(Token, u64), TokenError>
    where
        F: AsyncFnOnce() -> Result<Token, TokenError>,
    {
        let token = fetch().await?;
        let expires_at = expiry_from_now(token.lifetime.unwrap_or(self.margin * 2));
        if let Err(error) = self.put(key, &token, expires_at).await {
            tracing::warn!(%error, "cannot share a fetched token with the other replicas");
        }
        Ok((token, expires_at))
    }

    async fn claim(&self, key: &TokenKey, later_than: u64) -> Result<Claim, SharedError> {
        let name = name(key);
        let mut call = CLAIM.key(self.redis.key("access", &name));
        call.key(self.redis.key("flight", &name))
            .key(lock::fence_key(&self.redis))
            .arg(millis(FLIGHT_LEASE))
            .arg(later_than)
            .arg(MAX_SEALED_BYTES);
        let (found, value, expires_at): (u8, Vec<u8>, String) =
            self.redis.eval("token_claim", &call).await?;
        match found {
            1 => Ok(expires_at
                .parse()
                .ok()
                .and_then(|expires_at| Some((self.open(key, expires_at, &value)?, expires_at)))
                .map_or(Claim::Unreadable, |(token, expires_at)| {
                    Claim::Token(token, expires_at)
                })),
            2 => {
                let fence = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| SharedError::Refused("bad fence".to_owned()))?;
                Ok(Claim::Fetch(lock::hold(
                    &self.redis,
                    &self.redis.key("flight", &name),
                    fence,
                    FLIGHT_LEASE,
                )))
            }
            _ => Ok(Claim::Busy),
        }
    }

    /// The shared token in `sealed`, or `None` when it does not open (another key) or is
    /// too close to its expiry to hand out.
    fn open(&self, key: &TokenKey, expires_at: u64, sealed: &[u8]) -> Option<Token> {
        let plain = self.sealer.open(&aad(key), sealed).ok()?;
        let token: Sealed = serde_json::from_slice(plain.expose()).ok()?;
        let lifetime = Duration::from_millis(expires_at.checked_sub(unix_millis())?);
        let auth = match token.kind.as_str() {
            "bearer" => UpstreamAuth::Bearer {
                user: token.user,
                token: Secret::new(token.secret),
            },
            "password" => UpstreamAuth::Password {
                user: token.user,
                password: Secret::new(token.secret),
            },
            _ => return None,
        };
        // Checked again: the record is sealed, but what it holds stays canonical only if
        // every way in checks it.
        let server = match token.server {
            Some((host, port)) => Some(ServerAddress::new(&host, port).ok()?),
            None => None,
        };
        Some(Token {
            auth,
            lifetime: token.lifetime_known.then_some(lifetime),
            server,
        })
    }

    /// Shares `token`, which expires at `expires_at`, for as long as it may be handed out.
    async fn put(&self, key: &TokenKey, token: &Token, expires_at: u64) -> Result<(), SharedError> {
        let lifetime = Duration::from_millis(expires_at.saturating_sub(unix_millis()));
        let Some(shared_for) = lifetime.checked_sub(self.margin).filter(|d| !d.is_zero()) else {
            return Ok(());
        };
        let (kind, user, secret) = match &token.auth {
            UpstreamAuth::Bearer { user, token } => ("bearer", user, token),
            UpstreamAuth::Password { user, password } => ("password", user, password),
        };
        let plain = Secret::new(
            serde_json::to_vec(&Sealed {
                user: user.clone(),
                kind: kind.to_owned(),
                secret: secret.expose().clone(),
                lifetime_known: token.lifetime.is_some(),
                server: token
                    .server
                    .as_ref()
                    .map(|server| (server.host.clone(), server.port)),
            })
            .map_err(|_| SharedError::Refused("encoding".to_owned()))?,
        );
        let sealed = self
            .sealer
            .seal(&aad(key), plain.expose())
            .map_err(|_| SharedError::Refused("sealing".to_owned()))?;
        let mut call = PUT.key(self.redis.key("access", &name(key)));
        call.arg(expires_at)
            .arg(sealed)
            .arg(millis(shared_for))
            .arg(MAX_SEALED_BYTES);
        let _: u8 = self.redis.eval("token_put", &call).await?;
        Ok(())
    }

    /// Drops the shared token of `key` that expires at `expires_at`, after the upstream
    /// refused it.
    pub async fn forget(&self, key: &TokenKey, expires_at: u64) {
        let mut call = FORGET.key(self.redis.key("access", &name(key)));
        call.arg(expires_at);
        let _: Result<u8, _> = self.redis.eval("token_forget", &call).await;
    }

    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    /// Drops every shared token of the account `news` is about, then tells the other
    /// replicas, which drop theirs (and for a revocation end its sessions).
    pub async fn announce(&self, news: News) {
        forget_account(&self.redis, news.account()).await;
        news::publish(&self.redis, &news).await;
    }
}

/// Drops every shared token of `account`, then tells the other replicas: what a process
/// without a token cache (a command) does after authorizing an account.
pub async fn account_replaced(redis: &Redis, account: &str) {
    forget_account(redis, account).await;
    news::publish(redis, &News::Replaced(account.to_owned())).await;
}

async fn forget_account(redis: &Redis, account: &str) {
    let mut command = redis::cmd("DEL");
    for key in TokenKey::every_shared(account) {
        command.arg(redis.key("access", &name(&key)));
    }
    let _: Result<u64, _> = redis.run("token_forget", &command).await;
}

/// The key's name in Redis: account and protocol (tokens a password got are never shared).
fn name(key: &TokenKey) -> String {
    let protocol = key.protocol.map_or("any", |protocol| protocol.name());
    format!("{}:{protocol}", key.account)
}

/// Bound to the key, so a token cannot be moved to another account's entry.
fn aad(key: &TokenKey) -> String {
    format!("access token\0{}", name(key))
}

pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

fn unavailable(error: SharedError) -> TokenError {
    TokenError::Unavailable(format!("shared state: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::testing::RedisServer;

    fn bearer(secret: &str) -> Token {
        Token {
            auth: UpstreamAuth::Bearer {
                user: "alice@example.test".to_owned(),
                token: Secret::new(secret.to_owned()),
            },
            lifetime: Some(Duration::from_secs(3600)),
            server: None,
        }
    }

    fn shared(server: &RedisServer) -> SharedTokens {
        SharedTokens::new(
            server.handle(),
            &Secret::new(vec![7; 32]),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    /// The server a source named reaches the other replicas with the token.
    #[tokio::test]
    async fn a_token_keeps_its_server_across_replicas() {
        let server = RedisServer::start();
        let (fetching, other) = (shared(&server), shared(&server));
        let named = Some(ServerAddress::new("::1", 1143).unwrap());
        for (account, chosen) in [("alice", named), ("bob", None)] {
            let key = TokenKey::shared(account, None);
            let token = Token {
                server: chosen.clone(),
                ..bearer("at-1")
            };
            fetching
                .get_or_fetch(&key, 0, Duration::from_secs(1), async || Ok(token))
                .await
                .unwrap();
            let (got, _) = other
                .get_or_fetch(&key, 0, Duration::from_secs(1), async || {
                    Err(TokenError::Unavailable("fetched twice".to_owned()))
                })
                .await
                .unwrap();
            assert_eq!(got.server, chosen, "{account}");
        }
    }

    /// A record sealed before tokens had a server reads as one without; one whose server
    /// is no server does not open.
    #[tokio::test]
    async fn records_without_a_server_read_and_bad_servers_do_not() {
        let server = RedisServer::start();
        let shared = shared(&server);
        let key = TokenKey::shared("alice", None);
        let expires_at = unix_millis() + 3_600_000;
        let old = r#"{"user":"alice","kind":"bearer","secret":"at-1","lifetime_known":true}"#;
        let sealed = shared.sealer.seal(&aad(&key), old.as_bytes()).unwrap();
        let token = shared.open(&key, expires_at, &sealed).unwrap();
        assert_eq!(token.server, None);
        for bad in [r#"["imap.example.test",0]"#, r#"["evil/path",143]"#] {
            let record = old.replace('}', &format!(r#","server":{bad}}}"#));
            let sealed = shared.sealer.seal(&aad(&key), record.as_bytes()).unwrap();
            assert!(shared.open(&key, expires_at, &sealed).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_entry_another_writer_spoiled_is_fetched_over() {
        let server = RedisServer::start();
        let shared = shared(&server);
        let key = TokenKey::shared("alice", None);
        let entry = "test:access:alice:any";
        let spoilt: [&[&str]; 5] = [
            &["SET", entry, "not a hash"],
            &["HSET", entry, "exp", "99999999999999"],
            &["HSET", entry, "exp", "soon", "token", "x"],
            // Later than any expiry a replica asks for: it must not be handed out forever.
            &["HSET", entry, "exp", "1e20", "token", "x"],
            &[
                "EVAL",
                "redis.call('HSET', KEYS[1], 'exp', '99999999999999', 'token', string.rep('x', 8388608))",
                "1",
                entry,
            ],
        ];
        for spoil in spoilt {
            server.cli(&["DEL", entry]);
            server.cli(spoil);
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                shared.get_or_fetch(&key, 0, Duration::from_secs(1), async || {
                    Ok(bearer("at-fresh"))
                }),
            )
            .await
            .unwrap_or_else(|_| panic!("{spoil:?}: no answer"));
            let (token, _) = got.unwrap_or_else(|error| panic!("{spoil:?}: {error}"));
            assert!(
                matches!(&token.auth, UpstreamAuth::Bearer { token, .. } if token.expose() == "at-fresh")
            );
            // Shared from then on: another replica gets it without fetching.
            let again = shared
                .get_or_fetch(&key, 0, Duration::from_secs(1), async || {
                    Err(TokenError::Unavailable("fetched twice".to_owned()))
                })
                .await;
            assert!(again.is_ok(), "{spoil:?}");
        }
    }
}

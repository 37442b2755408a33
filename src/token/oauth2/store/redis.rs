//! The token store in Redis: one hash per account (`gen`, and `record` sealed as the file
//! store seals it), written by a compare-and-swap script; the lease is a replicas' lock held
//! across the provider's answer, so one replica at a time redeems an account's token.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;

use super::seal::Sealer;
use super::{Expect, Lease, StoreError, Stored, Swap, TokenStore, next_generation};
use crate::replicas::{Redis, SharedError, lock};
use crate::secret::Secret;
use crate::token::BoxFuture;

/// A sealed record takes a few hundred bytes; anything this much larger is not one (the file
/// store's bound), and is refused without being fetched.
const MAX_RECORD_BYTES: usize = 64 * 1024;

/// The hash's generation and record, or nil when the record is larger than `ARGV[1]` bytes.
static LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('HSTRLEN', KEYS[1], 'record') > tonumber(ARGV[1]) then return false end
return redis.call('HMGET', KEYS[1], 'gen', 'record')",
    )
});

/// Writes `ARGV[3]` (the sealed record) if the hash's generation is what `ARGV[1]` / `ARGV[2]`
/// expect, as the next generation (`ARGV[4]` when there is none, or none of ours); else
/// answers what is there (its record only up to `ARGV[5]` bytes). Writing whatever is there
/// replaces a value of another type too.
static SWAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if ARGV[1] == 'any' and redis.call('TYPE', KEYS[1]).ok ~= 'hash' then
  redis.call('DEL', KEYS[1])
end
local current = redis.call('HGET', KEYS[1], 'gen')
local met = ARGV[1] == 'any' or (ARGV[1] == 'absent' and not current) or (ARGV[1] == 'gen' and current == ARGV[2])
if not met then
  local record = ''
  if redis.call('HSTRLEN', KEYS[1], 'record') <= tonumber(ARGV[5]) then
    record = redis.call('HGET', KEYS[1], 'record') or ''
  end
  return {0, current or '', record}
end
local known = current and #current <= 15 and string.match(current, '^%d+$') and tonumber(current)
local next = known and (known + 1) or tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'gen', next, 'record', ARGV[3])
return {1, tostring(next), ''}",
    )
});

pub struct RedisStore {
    redis: Arc<Redis>,
    sealer: Sealer,
    /// How long a lease outlives a holder cut off from Redis: longer than a redemption may
    /// take, so that it has ended (or failed) before another replica redeems.
    lease: Duration,
}

impl RedisStore {
    /// # Errors
    /// The key is not 32 bytes.
    pub fn new(
        redis: Arc<Redis>,
        key: &Secret<Vec<u8>>,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            redis,
            sealer: Sealer::new(key)?,
            lease,
        })
    }

    /// The record `sealed` for `account` as generation `generation`.
    fn open(&self, account: &str, generation: u64, sealed: &[u8]) -> Result<Stored, StoreError> {
        let plain = self.sealer.open(account, sealed)?;
        let mut record: Stored =
            serde_json::from_slice(plain.expose()).map_err(|_| StoreError::Corrupt)?;
        record.generation = generation;
        Ok(record)
    }

    async fn load_record(&self, account: &str) -> Result<Option<Stored>, StoreError> {
        let mut call = LOAD.key(self.redis.key("token", account));
        call.arg(MAX_RECORD_BYTES);
        let found: Option<(Option<String>, Option<Vec<u8>>)> =
            self.redis.eval("token_load", &call).await.map_err(io)?;
        let (generation, sealed) = found.ok_or(StoreError::Corrupt)?;
        match (generation, sealed) {
            (Some(generation), Some(sealed)) => self
                .open(account, parse_generation(&generation)?, &sealed)
                .map(Some),
            _ => Ok(None),
        }
    }

    async fn swap_record(
        &self,
        account: &str,
        expect: Expect,
        record: Stored,
    ) -> Result<Swap, StoreError> {
        let plain = Secret::new(record.to_json());
        let sealed = self.sealer.seal(account, plain.expose())?;
        let (kind, expected) = match expect {
            Expect::Absent => ("absent", 0),
            Expect::Generation(generation) => ("gen", generation),
            Expect::Anything => ("any", 0),
        };
        let mut call = SWAP.key(self.redis.key("token", account));
        call.arg(kind)
            .arg(expected)
            .arg(sealed)
            .arg(next_generation(None))
            .arg(MAX_RECORD_BYTES);
        let (written, generation, current): (u8, String, Vec<u8>) =
            self.redis.eval("token_swap", &call).await.map_err(io)?;
        if written == 1 {
            return Ok(Swap::Written(parse_generation(&generation)?));
        }
        if generation.is_empty() {
            return Ok(Swap::Conflict(None));
        }
        // As the file store: what is there must be readable to be told about.
        let current = self.open(account, parse_generation(&generation)?, &current)?;
        Ok(Swap::Conflict(Some(current)))
    }

    async fn try_lease_of(&self, account: &str) -> Result<Option<Lease>, StoreError> {
        let held = lock::try_acquire(&self.redis, &self.redis.key("lease", account), self.lease)
            .await
            .map_err(io)?;
        Ok(held.map(|held| {
            let (stop, keeper) = held.into_parts();
            Lease::released_by(stop, keeper)
        }))
    }
}

impl TokenStore for RedisStore {
    fn load<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(self.load_record(account))
    }

    fn swap<'a>(
        &'a self,
        account: &'a str,
        expect: Expect,
        record: Stored,
    ) -> BoxFuture<'a, Result<Swap, StoreError>> {
        Box::pin(self.swap_record(account, expect, record))
    }

    fn try_lease<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(self.try_lease_of(account))
    }
}

fn parse_generation(text: &str) -> Result<u64, StoreError> {
    text.parse().map_err(|_| StoreError::Corrupt)
}

fn io(error: SharedError) -> StoreError {
    StoreError::Io(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::testing::{RedisCluster, RedisSentinel, RedisServer};
    use crate::token::oauth2::store::contract;

    fn record(token: &str) -> Stored {
        Stored {
            refresh_token: Some(Secret::new(token.to_owned())),
            refreshed_at: None,
            access_expires_at: None,
            refresh_expires_at: None,
            generation: 0,
        }
    }

    fn store(server: &RedisServer, key_byte: u8) -> RedisStore {
        let lease = Duration::from_secs(6);
        RedisStore::new(server.handle(), &Secret::new(vec![key_byte; 32]), lease).unwrap()
    }

    #[tokio::test]
    async fn the_redis_store_keeps_the_contract() {
        let server = RedisServer::start();
        let open = |byte| -> Arc<dyn TokenStore> { Arc::new(store(&server, byte)) };
        contract::suite(&open(9), &open(9), &open(10)).await;
    }

    #[tokio::test]
    async fn the_redis_store_keeps_the_contract_on_a_cluster() {
        let cluster = RedisCluster::start();
        let open = |byte| -> Arc<dyn TokenStore> {
            let key = Secret::new(vec![byte; 32]);
            Arc::new(RedisStore::new(cluster.handle(), &key, Duration::from_secs(6)).unwrap())
        };
        contract::suite(&open(9), &open(9), &open(10)).await;
    }

    #[tokio::test]
    async fn records_follow_the_primary_the_sentinel_names_through_a_failover() {
        let watched = RedisSentinel::start();
        let store = RedisStore::new(
            watched.handle(),
            &Secret::new(vec![5; 32]),
            Duration::from_secs(6),
        )
        .unwrap();
        let Swap::Written(first) = store
            .swap("alice", Expect::Absent, record("rt-1"))
            .await
            .unwrap()
        else {
            panic!("the first write conflicted");
        };
        watched.fail_over();
        // The old primary is a replica now: a write there is refused once, then the handle
        // asks the Sentinel again.
        let written = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match store
                    .swap("alice", Expect::Generation(first), record("rt-2"))
                    .await
                {
                    Ok(swap) => return swap,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await
        .expect("a write on the new primary");
        assert_eq!(written, Swap::Written(first + 1));
        let loaded = store.load("alice").await.unwrap().unwrap();
        assert_eq!(
            loaded.refresh_token.map(|token| token.expose().clone()),
            Some("rt-2".to_owned())
        );
    }

    #[tokio::test]
    async fn redis_holds_only_sealed_records() {
        let server = RedisServer::start();
        let store = store(&server, 1);
        let record = Stored {
            refresh_token: Some(Secret::new("rt-very-secret".to_owned())),
            refreshed_at: None,
            access_expires_at: None,
            refresh_expires_at: None,
            generation: 0,
        };
        store.swap("alice", Expect::Absent, record).await.unwrap();
        let dump = server.dump();
        assert!(dump.contains("token:alice"), "{dump}");
        assert!(!dump.contains("rt-very-secret"));
    }

    /// Redis's count of bytes it sent to clients.
    fn bytes_sent(server: &RedisServer) -> u64 {
        let stats = server.cli(&["INFO", "stats"]);
        stats
            .lines()
            .find_map(|line| line.strip_prefix("total_net_output_bytes:"))
            .and_then(|count| count.trim().parse().ok())
            .unwrap()
    }

    #[tokio::test]
    async fn a_huge_record_is_refused_without_being_fetched() {
        let server = RedisServer::start();
        let store = store(&server, 1);
        // 8 MiB where a record takes a few hundred bytes: another writer's, or a corruption.
        server.cli(&[
            "EVAL",
            "redis.call('HSET', KEYS[1], 'gen', '1', 'record', string.rep('x', 8388608))",
            "1",
            "test:token:alice",
        ]);
        let before = bytes_sent(&server);
        assert!(store.load("alice").await.is_err());
        let swapped = store
            .swap(
                "alice",
                Expect::Generation(0),
                Stored {
                    refresh_token: None,
                    refreshed_at: None,
                    access_expires_at: None,
                    refresh_expires_at: None,
                    generation: 0,
                },
            )
            .await;
        assert!(swapped.is_err());
        let sent = bytes_sent(&server) - before;
        assert!(sent < 1024 * 1024, "{sent} bytes sent");
    }

    #[tokio::test]
    async fn a_new_authorization_replaces_whatever_another_writer_left() {
        let server = RedisServer::start();
        let store = store(&server, 1);
        let record = || Stored {
            refresh_token: Some(Secret::new("rt-new".to_owned())),
            refreshed_at: None,
            access_expires_at: None,
            refresh_expires_at: None,
            generation: 0,
        };
        let spoilt: [&[&str]; 2] = [
            &["HSET", "test:token:alice", "gen", "garbage", "record", "x"],
            &["SET", "test:token:alice", "not a hash"],
        ];
        for spoil in spoilt {
            server.cli(&["DEL", "test:token:alice"]);
            server.cli(spoil);
            assert!(store.load("alice").await.is_err(), "{spoil:?}");
            let swapped = store.swap("alice", Expect::Anything, record()).await;
            assert!(
                matches!(swapped, Ok(Swap::Written(_))),
                "{spoil:?}: {swapped:?}"
            );
            let loaded = store.load("alice").await.unwrap().unwrap();
            assert_eq!(loaded.refresh_token.unwrap().expose(), "rt-new");
        }
    }
}

//! A lock across replicas: `SET NX PX` with a fencing number from a counter, renewed every
//! third of its lease while held, released by compare-and-delete, so a holder that stalled
//! past its lease can neither renew nor release the next holder's lock. A holder killed or
//! cut off from Redis loses it when the lease runs out: the lease must outlast what the
//! holder does under it.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;

use super::{Redis, SharedError, millis};

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{}return fence", acquire_lua(1, 2, 1, "0"))));

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

/// A held lock; dropping it releases it in the background, [`Held::release`] before it
/// returns (a process about to exit must not leave its locks to run out).
pub struct Held {
    /// Stops the renewal, which then releases the lock.
    stop: tokio::sync::oneshot::Sender<()>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Releases the lock and waits until Redis has been told (within its deadline).
    pub async fn release(self) {
        let Held { stop, keeper } = self;
        drop(stop);
        let _ = keeper.await;
    }

    /// What stops the renewal when dropped, and the task that releases the lock then.
    pub fn into_parts(
        self,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        (self.stop, self.keeper)
    }
}

/// Takes the lock `key` for `lease` if nobody holds it.
///
/// # Errors
/// Redis failed or did not answer in time.
pub async fn try_acquire(
    redis: &Arc<Redis>,
    key: &str,
    lease: Duration,
) -> Result<Option<Held>, SharedError> {
    let mut call = ACQUIRE.key(key);
    call.key(fence_key(redis)).arg(millis(lease));
    let fence: u64 = redis.eval("lock", &call).await?;
    Ok((fence != 0).then(|| hold(redis, key, fence, lease)))
}

/// The lock `key`, taken with `fence` for `lease` (by a script that took it along with
/// something else).
pub fn hold(redis: &Arc<Redis>, key: &str, fence: u64, lease: Duration) -> Held {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let lock = Lock {
        redis: redis.clone(),
        key: key.to_owned(),
        fence,
        lease,
    };
    let keeper = tokio::spawn(lock.keep(stopped));
    Held { stop, keeper }
}

/// Lua that takes lock `KEYS[lock]` with a fencing number from `KEYS[fence]` for
/// `ARGV[lease]` milliseconds, leaving the number in `fence`, or returns `when_held` when the
/// lock is held; for scripts that take a lock along with something else. A key without a
/// lease is no holder's (`PTTL` -1): it is taken over rather than waited for forever.
pub fn acquire_lua(lock: usize, fence: usize, lease: usize, when_held: &str) -> String {
    format!(
        "if redis.call('PTTL', KEYS[{lock}]) >= 0 then return {when_held} end
local fence = redis.call('INCR', KEYS[{fence}])
redis.call('SET', KEYS[{lock}], fence, 'PX', ARGV[{lease}])
"
    )
}

/// The counter fencing numbers come from.
pub fn fence_key(redis: &Redis) -> String {
    redis.key("fence", "locks")
}

/// A lock held, as its keeper renews and releases it.
struct Lock {
    redis: Arc<Redis>,
    key: String,
    fence: u64,
    lease: Duration,
}

impl Lock {
    /// Renews the lock every third of its lease until the holder lets go, then releases it.
    async fn keep(self, mut stopped: tokio::sync::oneshot::Receiver<()>) {
        let mut renewing = true;
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                () = tokio::time::sleep(self.lease / 3), if renewing => renewing = self.renew().await,
            }
        }
        let mut call = RELEASE.key(&self.key);
        call.arg(self.fence);
        let _: Result<u64, _> = self.redis.eval("lock_release", &call).await;
    }

    /// Whether to go on renewing: not once another holder has the lock.
    async fn renew(&self) -> bool {
        let mut call = RENEW.key(&self.key);
        call.arg(self.fence).arg(millis(self.lease));
        match self.redis.eval::<u64>("lock_renew", &call).await {
            Ok(0) => {
                self.redis.metrics.redis_lock_stolen();
                tracing::warn!(
                    lock = self.key.as_str(),
                    "a lock's lease ran out while held; another holder has it now"
                );
                false
            }
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(
                    lock = self.key.as_str(),
                    %error,
                    "cannot renew a lock held; it runs out with its lease unless Redis answers again"
                );
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::testing::RedisServer;

    #[tokio::test]
    async fn a_lock_key_without_a_lease_does_not_block_forever() {
        let server = RedisServer::start();
        let redis = server.handle();
        // No holder of ours leaves a lock without its lease: another writer's key, or one made
        // persistent, would hold every replica off for good.
        server.cli(&["SET", "test:lease:alice", "1"]);
        let lease = Duration::from_secs(6);
        let held = try_acquire(&redis, "test:lease:alice", lease)
            .await
            .unwrap();
        assert!(held.is_some());
        let again = try_acquire(&redis, "test:lease:alice", lease)
            .await
            .unwrap();
        assert!(again.is_none(), "a lock with its lease is held");
        held.unwrap().release().await;
        assert!(
            try_acquire(&redis, "test:lease:alice", lease)
                .await
                .unwrap()
                .is_some()
        );
    }
}

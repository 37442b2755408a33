//! A lock across replicas: `SET NX PX` with a fencing number from a counter, renewed while
//! held, released by compare-and-delete, so a holder that stalled past its lease can neither
//! renew nor release the next holder's lock. A holder killed outright loses it when the
//! lease runs out.

use std::sync::Arc;
use std::time::Duration;

use std::sync::LazyLock;

use redis::Script;

use super::{Redis, SharedError, millis};

/// How long a lock outlives a holder that stopped renewing it (killed, cut off).
pub const LOCK_LEASE: Duration = Duration::from_secs(6);

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

/// Takes the lock `key` if nobody holds it.
///
/// # Errors
/// Redis failed or did not answer in time.
pub async fn try_acquire(redis: &Arc<Redis>, key: &str) -> Result<Option<Held>, SharedError> {
    let mut call = ACQUIRE.key(key);
    call.key(fence_key(redis)).arg(lease_millis());
    let fence: u64 = redis.eval("lock", &call).await?;
    Ok((fence != 0).then(|| hold(redis, key, fence)))
}

/// The lock `key`, taken with `fence` (by a script that took it along with something else).
pub fn hold(redis: &Arc<Redis>, key: &str, fence: u64) -> Held {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let keeper = tokio::spawn(keep(redis.clone(), key.to_owned(), fence, stopped));
    Held { stop, keeper }
}

/// Lua that takes lock `KEYS[lock]` with a fencing number from `KEYS[fence]` for
/// `ARGV[lease]` milliseconds, leaving the number in `fence`, or returns `when_held` when the
/// lock is held; for scripts that take a lock along with something else.
pub fn acquire_lua(lock: usize, fence: usize, lease: usize, when_held: &str) -> String {
    format!(
        "if redis.call('EXISTS', KEYS[{lock}]) == 1 then return {when_held} end
local fence = redis.call('INCR', KEYS[{fence}])
redis.call('SET', KEYS[{lock}], fence, 'PX', ARGV[{lease}])
"
    )
}

/// The counter fencing numbers come from.
pub fn fence_key(redis: &Redis) -> String {
    redis.key("fence", "locks")
}

/// The lease in the milliseconds scripts take.
pub fn lease_millis() -> u64 {
    millis(LOCK_LEASE)
}

/// Renews the lock every third of its lease until the holder drops it, then releases it.
async fn keep(
    redis: Arc<Redis>,
    key: String,
    fence: u64,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut renewing = true;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            () = tokio::time::sleep(LOCK_LEASE / 3), if renewing => {
                let mut call = RENEW.key(&key);
                call.arg(fence).arg(millis(LOCK_LEASE));
                let renewed: Result<u64, _> = redis.eval("lock_renew", &call).await;
                if renewed == Ok(0) {
                    // Our lease ran out and another replica holds the lock now.
                    redis.metrics.redis_lock_stolen();
                    tracing::warn!(lock = key.as_str(), "a lock lease ran out while held; another replica took it");
                    renewing = false;
                }
            }
        }
    }
    let mut call = RELEASE.key(&key);
    call.arg(fence);
    let _: Result<u64, _> = redis.eval("lock_release", &call).await;
}

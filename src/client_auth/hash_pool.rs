//! A bounded pool for argon2 password checks: a few dedicated threads, each reusing one memory
//! buffer while it is busy, behind a semaphore that callers wait on with a deadline.
//!
//! Argon2 is built to be expensive (19 MiB and tens of milliseconds with the default
//! parameters). Unbounded, parallel wrong-password logins ran hundreds at once and the
//! allocator kept gigabytes afterwards; here at most `workers` checks run, each in memory its
//! thread keeps for the next one. The idle worker used last takes the next job, so a trickle
//! of logins keeps one buffer warm, and a worker idle for [`IDLE_RELEASE`] frees its buffer:
//! memory follows the load instead of staying at its peak.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use subtle::ConstantTimeEq as _;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::admission::{Overloaded, Slots};
use crate::secret::Secret;

/// How long a worker keeps its memory without a job. Long enough that a burst of logins
/// reuses it, short enough that a quiet service returns to its idle size soon after.
pub const IDLE_RELEASE: Duration = Duration::from_secs(10);

/// The way to one idle worker.
type Worker = SyncSender<Job>;

/// Idle workers, the one that finished last at the end. Locked only to take or return one,
/// never while a worker waits for a job.
type Idle = Mutex<Vec<Worker>>;

struct Job {
    hash: Secret<String>,
    password: Secret<String>,
    answer: oneshot::Sender<bool>,
    /// How the worker running this job returns itself to the idle list.
    worker: Worker,
    /// Released when the worker is idle again, so a permit always means an idle worker.
    _permit: OwnedSemaphorePermit,
}

pub struct HashPool {
    /// One per worker.
    slots: Slots,
    /// Dropping the pool drops these, which ends the idle workers' waits.
    idle: Arc<Idle>,
}

impl HashPool {
    /// Starts `workers` threads; a check waits at most `queue_timeout` for one of them.
    ///
    /// # Panics
    /// When the operating system refuses to start a thread (at start-up or reload).
    pub fn new(workers: usize, queue_timeout: Duration) -> Self {
        let workers = workers.max(1);
        let idle = Arc::new(Mutex::new(Vec::with_capacity(workers)));
        for index in 0..workers {
            let (worker, jobs) = sync_channel(1);
            let returns = Arc::downgrade(&idle);
            std::thread::Builder::new()
                .name(format!("mailgate-hash-{index}"))
                .spawn(move || work(&jobs, &returns))
                .expect("starting a password-check thread");
            lock(&idle).push(worker);
        }
        Self {
            slots: Slots::new(workers, queue_timeout),
            idle,
        }
    }

    /// Waits for a free worker, at most the queue timeout. Holding the returned permit, the
    /// caller may still decide not to check (e.g. the client got blocked while it waited).
    ///
    /// # Errors
    /// [`Overloaded`] when no worker became free in time.
    pub async fn admit(&self) -> Result<Admitted, Overloaded> {
        self.slots.take().await.map(Admitted)
    }

    /// Whether `password` matches the argon2 PHC string `hash`, checked in constant time by
    /// the worker `admitted` stands for.
    ///
    /// # Errors
    /// [`Overloaded`] if the workers are gone (never while the pool lives).
    pub async fn verify(
        &self,
        admitted: Admitted,
        hash: &Secret<String>,
        password: &Secret<String>,
    ) -> Result<bool, Overloaded> {
        // Holding a permit means a worker is idle.
        let worker = lock(&self.idle).pop().ok_or(Overloaded)?;
        let (answer, answered) = oneshot::channel();
        let job = Job {
            hash: hash.clone(),
            password: password.clone(),
            answer,
            worker: worker.clone(),
            _permit: admitted.0,
        };
        // An idle worker's channel is empty, so this never blocks.
        worker.try_send(job).map_err(|_| Overloaded)?;
        answered.await.map_err(|_| Overloaded)
    }
}

/// A free worker, reserved.
pub struct Admitted(OwnedSemaphorePermit);

fn lock(idle: &Idle) -> std::sync::MutexGuard<'_, Vec<Worker>> {
    idle.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A worker: takes jobs until the pool is dropped, reusing its memory between them and
/// freeing it after [`IDLE_RELEASE`] without one.
fn work(jobs: &Receiver<Job>, returns: &Weak<Idle>) {
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let job = if memory.is_empty() {
            jobs.recv().ok()
        } else {
            match jobs.recv_timeout(IDLE_RELEASE) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => {
                    memory = Vec::new();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => None,
            }
        };
        let Some(job) = job else { return };
        let matches = matches(&job.hash, &job.password, &mut memory);
        let _ = job.answer.send(matches);
        // Idle again before the permit is released; a pool that is gone ends this worker.
        let Some(idle) = returns.upgrade() else {
            return;
        };
        lock(&idle).push(job.worker);
    }
}

/// Computes the hash of `password` with `hash`'s parameters and salt into `memory`, grown
/// to the parameters' block count when needed, and compares in constant time.
fn matches(hash: &Secret<String>, password: &Secret<String>, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash.expose()) else {
        return false;
    };
    let (Ok(algorithm), Ok(params), Some(expected), Some(salt)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
        parsed.hash,
        parsed.salt,
    ) else {
        return false;
    };
    let version = parsed
        .version
        .map_or(Ok(Version::default()), Version::try_from);
    let Ok(version) = version else { return false };
    let mut salt_buffer = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buffer) else {
        return false;
    };
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), Block::new());
    }
    let mut output = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params);
    argon2
        .hash_password_into_with_memory(
            password.expose().as_bytes(),
            salt,
            &mut output,
            &mut memory[..],
        )
        .is_ok()
        && bool::from(output.ct_eq(expected.as_bytes()))
}

/// Why no hash could be made.
#[derive(Debug, thiserror::Error)]
pub enum NewHashError {
    #[error("the system gave no random salt")]
    Randomness,
    #[error("argon2: {0}")]
    Argon2(argon2::password_hash::Error),
}

/// Bytes of random salt in a new hash (RFC 9106 section 3.1 recommends 16).
const SALT_BYTES: usize = 16;

/// A new argon2id PHC string for `password`, with a random salt and the parameters mailgate's
/// documentation asks for (the argon2 crate's defaults, OWASP's: 19 MiB, 2 passes, 1 lane), so
/// every hash made this way costs the same as the decoy of unknown accounts.
///
/// # Errors
/// When the system has no randomness, or argon2 refuses the input.
pub fn new_hash(password: &Secret<String>) -> Result<Secret<String>, NewHashError> {
    use argon2::PasswordHasher as _;
    use ring::rand::SecureRandom as _;
    let mut salt = [0u8; SALT_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| NewHashError::Randomness)?;
    let salt =
        argon2::password_hash::SaltString::encode_b64(&salt).map_err(NewHashError::Argon2)?;
    let hash = Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map_err(NewHashError::Argon2)?;
    Ok(Secret::new(hash.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use argon2::PasswordHasher as _;
    use argon2::password_hash::SaltString;

    /// A cheap hash (64 KiB, one pass) so tests stay fast.
    pub(crate) fn test_hash(password: &str) -> Secret<String> {
        let params = Params::new(64, 1, 1, None).unwrap();
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
        Secret::new(
            argon2
                .hash_password(password.as_bytes(), &salt)
                .unwrap()
                .to_string(),
        )
    }

    #[tokio::test]
    async fn checks_passwords_in_the_pool() {
        let pool = HashPool::new(2, Duration::from_secs(5));
        let check = |hash: Secret<String>, password: &str| {
            let password = Secret::new(password.to_owned());
            let pool = &pool;
            async move {
                let admitted = pool.admit().await.unwrap();
                pool.verify(admitted, &hash, &password).await
            }
        };
        assert_eq!(check(test_hash("right"), "right").await, Ok(true));
        assert_eq!(check(test_hash("right"), "wrong").await, Ok(false));
        let broken = Secret::new("$argon2id$nonsense".to_owned());
        assert_eq!(check(broken, "x").await, Ok(false));
    }

    #[test]
    fn new_hashes_have_the_documented_parameters_and_a_fresh_salt() {
        let password = Secret::new("correct horse".to_owned());
        let first = new_hash(&password).unwrap();
        let second = new_hash(&password).unwrap();
        assert!(
            first
                .expose()
                .starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            first.expose()
        );
        assert_ne!(first.expose(), second.expose());
        assert!(matches(&first, &password, &mut Vec::new()));
    }

    #[tokio::test]
    async fn a_full_pool_refuses_after_the_queue_timeout() {
        let pool = HashPool::new(1, Duration::from_millis(50));
        let held = pool.admit().await.unwrap();
        assert!(pool.admit().await.is_err());
        drop(held);
        let admitted = pool.admit().await.unwrap();
        let right = Secret::new("right".to_owned());
        let matches = pool.verify(admitted, &test_hash("right"), &right).await;
        assert_eq!(matches, Ok(true));
    }
}

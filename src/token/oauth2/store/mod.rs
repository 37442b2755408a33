//! Where refresh tokens outlive the process: one record per account behind one contract that
//! every backend keeps: the local [`file`] store, or [`redis`] for replicas.
//!
//! The contract:
//! - every record carries a generation, set by the store on each write;
//! - a writer reads the newest record before it uses one (a token stored by another process
//!   since, `mailgate authorize` or `accounts import`, wins over the copy in memory);
//! - writes are compare-and-swap on the generation that was read, so a decision taken on an
//!   older record never overwrites a newer one;
//! - a lease gives one process at a time the right to redeem an account's refresh token, held
//!   across the provider's answer, so two processes never redeem the same token.

pub mod file;
pub mod migrate;
pub mod redis;
pub mod seal;

#[cfg(test)]
pub mod contract;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;
use crate::token::BoxFuture;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("token store I/O: {0}")]
    Io(String),
    /// Wrong key, or a file changed by someone else: the two cannot be told apart.
    #[error("a token store record does not decrypt (wrong store key, or a corrupted record)")]
    Undecryptable,
    #[error("a token store record is corrupted")]
    Corrupt,
    /// Another process held the account's lease for the whole wait.
    #[error("another process is renewing this account's token; try again")]
    Busy,
}

/// What is kept for one account. Backends write it with [`Stored::to_json`]: `Secret` never
/// serializes its value, by design.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Stored {
    /// `None` once the provider refused it: the account needs re-authorization.
    pub refresh_token: Option<Secret<String>>,
    /// Unix seconds of the last successful grant; `None` for a token stored but never
    /// redeemed (imported). Written as 0 then, which earlier versions read as a time (they
    /// refuse a null), so that rolling back keeps every record readable.
    #[serde(default, deserialize_with = "zero_is_none")]
    pub refreshed_at: Option<u64>,
    /// Unix seconds when the last access token expires, if the provider said.
    #[serde(default)]
    pub access_expires_at: Option<u64>,
    /// Unix seconds when the refresh token itself expires, if the provider said.
    #[serde(default)]
    pub refresh_expires_at: Option<u64>,
    /// Set by the store on every write; what a compare-and-swap compares. Records written
    /// before generations existed read as 0.
    #[serde(default)]
    pub generation: u64,
}

impl Stored {
    /// The record as JSON, the refresh token included (backends encrypt it).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::json!({
            "refresh_token": self.refresh_token.as_ref().map(|token| token.expose().clone()),
            "refreshed_at": self.refreshed_at.unwrap_or(0),
            "access_expires_at": self.access_expires_at,
            "refresh_expires_at": self.refresh_expires_at,
            "generation": self.generation,
        })
        .to_string()
        .into_bytes()
    }
}

fn zero_is_none<'de, D: serde::Deserializer<'de>>(reader: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<u64>::deserialize(reader)?.filter(|&seconds| seconds != 0))
}

/// What a write requires of the record it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No record yet.
    Absent,
    /// The record of this generation, as read before.
    Generation(u64),
    /// Whatever is there, readable or not: a new authorization replaces a record that no
    /// longer decrypts (a rotated store key).
    Anything,
}

impl Expect {
    /// What to expect of the store after reading `record`.
    pub fn after_reading(record: Option<&Stored>) -> Self {
        record.map_or(Expect::Absent, |record| {
            Expect::Generation(record.generation)
        })
    }

    pub fn is_met_by(self, current: Option<&Stored>) -> bool {
        match self {
            Expect::Anything => true,
            other => other == Expect::after_reading(current),
        }
    }
}

/// The outcome of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swap {
    /// Written, as this generation.
    Written(u64),
    /// The store holds another record (here as it is now); nothing was written.
    Conflict(Option<Stored>),
}

/// The right to redeem one account's refresh token until dropped or released.
pub struct Lease {
    held: Box<dyn Send + Sync>,
    /// Finishes the release once `held` is dropped (a backend that releases over the
    /// network).
    releasing: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    /// A lease that ends when `held` is dropped.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            held: Box::new(held),
            releasing: None,
        }
    }

    /// A lease that ends in `releasing` once `held` is dropped.
    pub fn released_by(
        held: impl Send + Sync + 'static,
        releasing: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            held: Box::new(held),
            releasing: Some(releasing),
        }
    }

    /// Ends the lease and waits until the store knows: what a process that may exit next
    /// must do, so that nobody waits for the lease to run out.
    pub async fn release(self) {
        drop(self.held);
        if let Some(releasing) = self.releasing {
            let _ = releasing.await;
        }
    }
}

/// The contract above; see [`file::FileStore`] and [`crate::replicas::store::RedisStore`].
pub trait TokenStore: Send + Sync {
    /// The account's newest record; `None` if none was ever stored.
    ///
    /// # Errors
    /// The record cannot be read, does not decrypt, or is not a record.
    fn load<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>>;

    /// Writes `record` as the next generation if the current record is what `expect` says;
    /// atomically and durably.
    ///
    /// # Errors
    /// Reading or writing failed; the old record is then untouched.
    fn swap<'a>(
        &'a self,
        account: &'a str,
        expect: Expect,
        record: Stored,
    ) -> BoxFuture<'a, Result<Swap, StoreError>>;

    /// The account's lease if nobody holds it now; `None` if somebody does.
    ///
    /// # Errors
    /// The lease cannot be taken for another reason than being held.
    fn try_lease<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<Option<Lease>, StoreError>>;
}

/// One more than the current generation; after an unreadable record (whose generation is
/// unknown) or none, the clock's milliseconds, which no earlier write reached.
pub fn next_generation(current: Option<u64>) -> u64 {
    match current {
        Some(current) => current + 1,
        None => {
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(1));
            millis.max(1)
        }
    }
}

/// How often a lease held elsewhere is tried again while waiting for it.
const LEASE_POLL: Duration = Duration::from_millis(20);

/// Waits up to `wait` for the account's lease.
///
/// # Errors
/// [`StoreError::Busy`] when another holder kept it that long.
pub async fn lease(
    store: &Arc<dyn TokenStore>,
    account: &str,
    wait: Duration,
) -> Result<Lease, StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(lease) = store.try_lease(account).await? {
            return Ok(lease);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Busy);
        }
        tokio::time::sleep(LEASE_POLL).await;
    }
}

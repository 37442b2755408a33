//! Moving records from one store to another (`mailgate store migrate`): per account, under
//! both stores' leases (no process redeems the token meanwhile) and the destination's
//! compare-and-swap; the source is only read.

use std::sync::Arc;
use std::time::Duration;

use super::{Expect, StoreError, Stored, Swap, TokenStore, lease};

/// What became, or with a dry run would become, of one account's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written to the destination; `replaced`: over another record (`overwrite`).
    Moved { replaced: bool },
    /// The destination holds the same refresh token already.
    AlreadyThere,
    /// The source holds no record for the account.
    NothingToMove,
    /// The destination holds something else, left as it is.
    Conflict(Conflict),
}

/// What the destination holds instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// Another record: each side's, whose times tell the operator which one is in use.
    Differs {
        source: Box<Stored>,
        destination: Box<Stored>,
    },
    /// A record that cannot be read.
    Unreadable(StoreError),
}

impl Outcome {
    /// Whether the destination now serves the account as the source did.
    pub fn is_done(&self) -> bool {
        !matches!(self, Outcome::Conflict(_))
    }
}

/// Why an account was not moved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    #[error("at the source: {0}")]
    Source(StoreError),
    #[error("at the destination: {0}")]
    Destination(StoreError),
}

/// One migration's stores and choices.
pub struct Migration {
    pub from: Arc<dyn TokenStore>,
    pub to: Arc<dyn TokenStore>,
    /// Replace a destination record that differs (or cannot be read).
    pub overwrite: bool,
    /// Decide, take no lease, write nothing.
    pub dry_run: bool,
    /// How long to wait for a lease held by a refresh under way.
    pub lease_wait: Duration,
}

impl Migration {
    /// Moves `account`'s record.
    ///
    /// # Errors
    /// A store failed, a lease stayed held for `lease_wait`, or the source record cannot be
    /// read.
    pub async fn account(&self, account: &str) -> Result<Outcome, MoveError> {
        if self.dry_run {
            return self.move_record(account).await;
        }
        let source = lease(&self.from, account, self.lease_wait)
            .await
            .map_err(MoveError::Source)?;
        let destination = match lease(&self.to, account, self.lease_wait).await {
            Ok(destination) => destination,
            Err(error) => {
                source.release().await;
                return Err(MoveError::Destination(error));
            }
        };
        let moved = self.move_record(account).await;
        // Released before the command goes on (and exits): nobody waits for them to run out.
        destination.release().await;
        source.release().await;
        moved
    }

    /// [`Migration::account`] under both leases (or none for a dry run).
    async fn move_record(&self, account: &str) -> Result<Outcome, MoveError> {
        let Some(record) = self.from.load(account).await.map_err(MoveError::Source)? else {
            return Ok(Outcome::NothingToMove);
        };
        // The refresh token decides: the times beside it are only what was last seen.
        let (expect, replaced) = match self.to.load(account).await {
            Ok(None) => (Expect::Absent, false),
            Ok(Some(there)) if there.refresh_token == record.refresh_token => {
                return Ok(Outcome::AlreadyThere);
            }
            Ok(Some(there)) if self.overwrite => (Expect::Generation(there.generation), true),
            Ok(Some(there)) => {
                return Ok(Outcome::Conflict(Conflict::Differs {
                    source: Box::new(record),
                    destination: Box::new(there),
                }));
            }
            Err(error @ (StoreError::Undecryptable | StoreError::Corrupt)) => {
                if !self.overwrite {
                    return Ok(Outcome::Conflict(Conflict::Unreadable(error)));
                }
                (Expect::Anything, true)
            }
            Err(error) => return Err(MoveError::Destination(error)),
        };
        if self.dry_run {
            return Ok(Outcome::Moved { replaced });
        }
        match self
            .to
            .swap(account, expect, record.clone())
            .await
            .map_err(MoveError::Destination)?
        {
            Swap::Written(_) => Ok(Outcome::Moved { replaced }),
            // Under the lease only a writer that ignores it (an older mailgate) gets here.
            Swap::Conflict(Some(there)) => Ok(Outcome::Conflict(Conflict::Differs {
                source: Box::new(record),
                destination: Box::new(there),
            })),
            Swap::Conflict(None) => Err(MoveError::Destination(StoreError::Io(
                "the record there was removed meanwhile; try again".to_owned(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::file::FileStore;
    use super::*;
    use crate::secret::Secret;

    fn record(token: Option<&str>) -> Stored {
        Stored {
            refresh_token: token.map(|token| Secret::new(token.to_owned())),
            refreshed_at: Some(1_700_000_000),
            access_expires_at: None,
            refresh_expires_at: None,
            generation: 0,
        }
    }

    fn store(dir: &std::path::Path, key: u8) -> Arc<dyn TokenStore> {
        Arc::new(FileStore::open(dir, &Secret::new(vec![key; 32])).unwrap())
    }

    struct Stores {
        _dir: tempfile::TempDir,
        from: Arc<dyn TokenStore>,
        to: Arc<dyn TokenStore>,
        /// The destination's directory under another key.
        to_other_key: Arc<dyn TokenStore>,
    }

    fn stores() -> Stores {
        let dir = tempfile::tempdir().unwrap();
        Stores {
            from: store(&dir.path().join("from"), 1),
            to: store(&dir.path().join("to"), 1),
            to_other_key: store(&dir.path().join("to"), 2),
            _dir: dir,
        }
    }

    fn migration(stores: &Stores, overwrite: bool, dry_run: bool) -> Migration {
        Migration {
            from: stores.from.clone(),
            to: stores.to.clone(),
            overwrite,
            dry_run,
            lease_wait: Duration::from_millis(100),
        }
    }

    async fn put(store: &Arc<dyn TokenStore>, account: &str, token: Option<&str>) {
        let expect = Expect::after_reading(store.load(account).await.unwrap().as_ref());
        store.swap(account, expect, record(token)).await.unwrap();
    }

    async fn token_at(store: &Arc<dyn TokenStore>, account: &str) -> Option<Option<String>> {
        let stored = store.load(account).await.unwrap()?;
        Some(stored.refresh_token.map(|token| token.expose().clone()))
    }

    #[tokio::test]
    async fn a_record_is_moved_once_and_then_found_there() {
        let s = stores();
        put(&s.from, "alice", Some("rt-alice")).await;
        put(&s.from, "gone", None).await;
        let run = migration(&s, false, false);
        assert_eq!(
            run.account("alice").await,
            Ok(Outcome::Moved { replaced: false })
        );
        assert_eq!(
            token_at(&s.to, "alice").await,
            Some(Some("rt-alice".into()))
        );
        // The source is left as it was.
        assert_eq!(
            token_at(&s.from, "alice").await,
            Some(Some("rt-alice".into()))
        );
        assert_eq!(run.account("alice").await, Ok(Outcome::AlreadyThere));
        // A record that says the account needs re-authorization moves as it is.
        assert!(run.account("gone").await.unwrap().is_done());
        assert_eq!(token_at(&s.to, "gone").await, Some(None));
        assert_eq!(run.account("nobody").await, Ok(Outcome::NothingToMove));
        assert_eq!(token_at(&s.to, "nobody").await, None);
    }

    #[tokio::test]
    async fn another_token_there_is_kept_unless_overwritten() {
        let s = stores();
        put(&s.from, "alice", Some("rt-old")).await;
        put(&s.to, "alice", Some("rt-newer")).await;
        let outcome = migration(&s, false, false).account("alice").await;
        let Ok(Outcome::Conflict(Conflict::Differs {
            source,
            destination,
        })) = &outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!(source.refresh_token, record(Some("rt-old")).refresh_token);
        assert_eq!(
            destination.refresh_token,
            record(Some("rt-newer")).refresh_token
        );
        assert!(!outcome.unwrap().is_done());
        assert_eq!(
            token_at(&s.to, "alice").await,
            Some(Some("rt-newer".into()))
        );
        assert_eq!(
            migration(&s, true, true).account("alice").await,
            Ok(Outcome::Moved { replaced: true })
        );
        assert_eq!(
            token_at(&s.to, "alice").await,
            Some(Some("rt-newer".into()))
        );
        assert_eq!(
            migration(&s, true, false).account("alice").await,
            Ok(Outcome::Moved { replaced: true })
        );
        assert_eq!(token_at(&s.to, "alice").await, Some(Some("rt-old".into())));
    }

    #[tokio::test]
    async fn an_unreadable_record_is_reported_on_either_side() {
        let s = stores();
        put(&s.from, "alice", Some("rt-alice")).await;
        put(&s.to_other_key, "alice", Some("rt-foreign")).await;
        assert_eq!(
            migration(&s, false, false).account("alice").await,
            Ok(Outcome::Conflict(Conflict::Unreadable(
                StoreError::Undecryptable
            )))
        );
        assert_eq!(
            migration(&s, true, false).account("alice").await,
            Ok(Outcome::Moved { replaced: true })
        );
        assert_eq!(
            token_at(&s.to, "alice").await,
            Some(Some("rt-alice".into()))
        );
        let backwards = Migration {
            from: s.to_other_key.clone(),
            to: s.from.clone(),
            ..migration(&s, false, false)
        };
        assert_eq!(
            backwards.account("alice").await,
            Err(MoveError::Source(StoreError::Undecryptable))
        );
    }

    #[tokio::test]
    async fn a_dry_run_writes_nothing() {
        let s = stores();
        put(&s.from, "alice", Some("rt-alice")).await;
        assert_eq!(
            migration(&s, false, true).account("alice").await,
            Ok(Outcome::Moved { replaced: false })
        );
        assert_eq!(token_at(&s.to, "alice").await, None);
    }

    #[tokio::test]
    async fn a_refresh_under_way_holds_the_move_back() {
        let s = stores();
        put(&s.from, "alice", Some("rt-alice")).await;
        let refreshing = s.to.try_lease("alice").await.unwrap().unwrap();
        assert_eq!(
            migration(&s, false, false).account("alice").await,
            Err(MoveError::Destination(StoreError::Busy))
        );
        drop(refreshing);
        assert!(
            migration(&s, false, false)
                .account("alice")
                .await
                .unwrap()
                .is_done()
        );
    }
}

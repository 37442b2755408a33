//! The store contract as one test suite, run against every backend: `one` and `other` are two
//! handles on the same store, as two processes would hold them; `rekeyed` is a third with
//! another key.

use std::sync::Arc;
use std::time::Duration;

use super::{Expect, StoreError, Stored, Swap, TokenStore, lease};
use crate::secret::Secret;

fn record(token: &str) -> Stored {
    Stored {
        refresh_token: Some(Secret::new(token.to_owned())),
        refreshed_at: Some(1_700_000_000),
        access_expires_at: None,
        refresh_expires_at: None,
        generation: 0,
    }
}

fn token(record: Option<Stored>) -> Option<String> {
    record
        .and_then(|record| record.refresh_token)
        .map(|token| token.expose().clone())
}

pub async fn suite(
    one: &Arc<dyn TokenStore>,
    other: &Arc<dyn TokenStore>,
    rekeyed: &Arc<dyn TokenStore>,
) {
    absent_until_written(one.as_ref(), other.as_ref()).await;
    only_a_new_authorization_replaces_what_does_not_decrypt(one.as_ref(), rekeyed.as_ref()).await;
    generations_grow_and_stale_writes_conflict(one.as_ref(), other.as_ref()).await;
    a_lease_excludes_other_holders(one, other).await;
}

async fn absent_until_written(one: &dyn TokenStore, other: &dyn TokenStore) {
    assert_eq!(one.load("absent").await.unwrap(), None);
    let Swap::Written(generation) = one
        .swap("absent", Expect::Absent, record("rt-1"))
        .await
        .unwrap()
    else {
        panic!("writing a new account conflicted");
    };
    let seen = other.load("absent").await.unwrap().unwrap();
    assert_eq!(seen.generation, generation);
    assert_eq!(token(Some(seen)).as_deref(), Some("rt-1"));
    // Expecting no record where there is one writes nothing.
    assert!(matches!(
        other
            .swap("absent", Expect::Absent, record("rt-other"))
            .await
            .unwrap(),
        Swap::Conflict(Some(_))
    ));
    assert_eq!(
        token(one.load("absent").await.unwrap()).as_deref(),
        Some("rt-1")
    );
}

async fn generations_grow_and_stale_writes_conflict(one: &dyn TokenStore, other: &dyn TokenStore) {
    let Swap::Written(first) = one
        .swap("cas", Expect::Absent, record("rt-1"))
        .await
        .unwrap()
    else {
        panic!("writing a new account conflicted");
    };
    // Another process re-authorizes the account meanwhile.
    let Swap::Written(second) = other
        .swap("cas", Expect::Generation(first), record("rt-reauthorized"))
        .await
        .unwrap()
    else {
        panic!("a write on the newest generation conflicted");
    };
    assert!(second > first);
    // A decision taken on the first record is refused, and told what is there now.
    match one
        .swap("cas", Expect::Generation(first), record("rt-stale"))
        .await
        .unwrap()
    {
        Swap::Conflict(Some(now)) => {
            assert_eq!(now.generation, second);
            assert_eq!(token(Some(now)).as_deref(), Some("rt-reauthorized"));
        }
        other => panic!("a stale write was not refused: {other:?}"),
    }
    assert_eq!(
        token(one.load("cas").await.unwrap()).as_deref(),
        Some("rt-reauthorized")
    );
    assert!(matches!(
        one.swap("cas", Expect::Anything, record("rt-forced"))

            .await.unwrap(),
        Swap::Written(third) if third > second
    ));
}

async fn a_lease_excludes_other_holders(one: &Arc<dyn TokenStore>, other: &Arc<dyn TokenStore>) {
    let held = lease(one, "leased", Duration::from_secs(1)).await.unwrap();
    assert!(matches!(
        lease(other, "leased", Duration::from_millis(100)).await,
        Err(StoreError::Busy)
    ));
    // Other accounts are not held up.
    drop(lease(other, "free", Duration::ZERO).await.unwrap());
    // Writes do not need the lease: a holder's own swap goes through.
    assert!(matches!(
        one.swap("leased", Expect::Absent, record("rt"))
            .await
            .unwrap(),
        Swap::Written(_)
    ));
    drop(held);
    // A backend may release in the background: soon, not necessarily at once.
    drop(
        lease(other, "leased", Duration::from_secs(2))
            .await
            .unwrap(),
    );
}

async fn only_a_new_authorization_replaces_what_does_not_decrypt(
    one: &dyn TokenStore,
    rekeyed: &dyn TokenStore,
) {
    one.swap("rekeyed", Expect::Absent, record("rt-old-key"))
        .await
        .unwrap();
    assert_eq!(
        rekeyed.load("rekeyed").await,
        Err(StoreError::Undecryptable)
    );
    assert_eq!(
        rekeyed
            .swap("rekeyed", Expect::Absent, record("rt-new-key"))
            .await,
        Err(StoreError::Undecryptable)
    );
    assert!(matches!(
        rekeyed
            .swap("rekeyed", Expect::Anything, record("rt-new-key"))
            .await
            .unwrap(),
        Swap::Written(_)
    ));
    assert_eq!(
        token(rekeyed.load("rekeyed").await.unwrap()).as_deref(),
        Some("rt-new-key")
    );
}

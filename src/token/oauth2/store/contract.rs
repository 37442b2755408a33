//! The store contract as one test suite, run against every backend: `one` and `other` are two
//! handles on the same store, as two processes would hold them.

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

pub async fn suite(one: &Arc<dyn TokenStore>, other: &Arc<dyn TokenStore>) {
    absent_until_written(one.as_ref(), other.as_ref());
    generations_grow_and_stale_writes_conflict(one.as_ref(), other.as_ref());
    a_lease_excludes_other_holders(one, other).await;
}

fn absent_until_written(one: &dyn TokenStore, other: &dyn TokenStore) {
    assert_eq!(one.load("absent").unwrap(), None);
    let Swap::Written(generation) = one.swap("absent", Expect::Absent, record("rt-1")).unwrap()
    else {
        panic!("writing a new account conflicted");
    };
    let seen = other.load("absent").unwrap().unwrap();
    assert_eq!(seen.generation, generation);
    assert_eq!(token(Some(seen)).as_deref(), Some("rt-1"));
    // Expecting no record where there is one writes nothing.
    assert!(matches!(
        other
            .swap("absent", Expect::Absent, record("rt-other"))
            .unwrap(),
        Swap::Conflict(Some(_))
    ));
    assert_eq!(token(one.load("absent").unwrap()).as_deref(), Some("rt-1"));
}

fn generations_grow_and_stale_writes_conflict(one: &dyn TokenStore, other: &dyn TokenStore) {
    let Swap::Written(first) = one.swap("cas", Expect::Absent, record("rt-1")).unwrap() else {
        panic!("writing a new account conflicted");
    };
    // Another process re-authorizes the account meanwhile.
    let Swap::Written(second) = other
        .swap("cas", Expect::Generation(first), record("rt-reauthorized"))
        .unwrap()
    else {
        panic!("a write on the newest generation conflicted");
    };
    assert!(second > first);
    // A decision taken on the first record is refused, and told what is there now.
    match one
        .swap("cas", Expect::Generation(first), record("rt-stale"))
        .unwrap()
    {
        Swap::Conflict(Some(now)) => {
            assert_eq!(now.generation, second);
            assert_eq!(token(Some(now)).as_deref(), Some("rt-reauthorized"));
        }
        other => panic!("a stale write was not refused: {other:?}"),
    }
    assert_eq!(
        token(one.load("cas").unwrap()).as_deref(),
        Some("rt-reauthorized")
    );
    assert!(matches!(
        one.swap("cas", Expect::Anything, record("rt-forced"))

            .unwrap(),
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
        one.swap("leased", Expect::Absent, record("rt")).unwrap(),
        Swap::Written(_)
    ));
    drop(held);
    drop(lease(other, "leased", Duration::ZERO).await.unwrap());
}

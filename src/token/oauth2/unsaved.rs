//! Records the store did not take: kept in memory (the token stays usable), counted, shown as
//! not ready, written again with backoff by a task, and settled before a process exits. A
//! redeemed token keeps the account's lease until written: the store's record names the token
//! it replaced, which the provider must not see again from another process.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::store::Swap;
use super::{Account, BACKOFF_START, GrantState, OAuth2, STORE_RETRY_MAX, Unsaved, lock};

impl OAuth2 {
    /// Writes `unsaved` by compare-and-swap; whether the store now holds it or something
    /// newer. If the store cannot take it now, it is kept in memory, counted, shown, and
    /// tried again.
    pub(super) async fn write(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
        unsaved: Unsaved,
    ) -> bool {
        let was_unsaved = state.unsaved.is_some();
        match self
            .swap(id, unsaved.replaces, unsaved.record.clone())
            .await
        {
            Ok(Swap::Written(_)) => {
                if was_unsaved {
                    tracing::info!(account = id, "token store written again");
                }
                self.clear_unsaved(account, state);
                true
            }
            Ok(Swap::Conflict(_)) => {
                tracing::warn!(
                    account = id,
                    "the token store holds a newer record for this account; keeping it"
                );
                self.clear_unsaved(account, state);
                true
            }
            Err(error) => {
                self.metrics.store_write_failure();
                lock(&account.status).last_error = Some(error.clone());
                state.store_backoff =
                    (state.store_backoff * 2).clamp(BACKOFF_START, STORE_RETRY_MAX);
                state.store_retry_after = Some(Instant::now() + state.store_backoff);
                let holds_token = unsaved.record.refresh_token.is_some();
                state.unsaved = Some(unsaved);
                if holds_token {
                    tracing::error!(
                        account = id,
                        %error,
                        "cannot write the token store; keeping the refresh token in memory and retrying"
                    );
                    account.grant.unsaved.store(true, Ordering::SeqCst);
                    self.update_unsaved();
                } else {
                    // Only that the token was refused is unwritten: nothing is lost, and this
                    // process will not try the refused token again.
                    tracing::error!(
                        account = id,
                        %error,
                        "cannot record in the token store that the refresh token was refused"
                    );
                }
                false
            }
        }
    }

    pub(super) fn clear_unsaved(&self, account: &Account, state: &mut GrantState) {
        state.unsaved = None;
        // Dropped, it is released in the background.
        state.kept_lease = None;
        state.store_retry_after = None;
        state.store_backoff = Duration::ZERO;
        if account.grant.unsaved.swap(false, Ordering::SeqCst) {
            self.update_unsaved();
        }
    }

    /// Shows how many accounts hold an unwritten token (metric, readiness), and keeps a task
    /// retrying them while there are any.
    pub(super) fn update_unsaved(&self) {
        let count = self.grants.unsaved_count();
        self.metrics
            .token_store_unsaved(i64::try_from(count).unwrap_or(i64::MAX));
        if let Some(health) = &self.health {
            health.set_token_store_unwritten(count > 0);
        }
        if self.any_unsaved() {
            self.start_retrying();
        }
    }

    fn any_unsaved(&self) -> bool {
        self.accounts
            .values()
            .any(|account| account.grant.unsaved.load(Ordering::SeqCst))
    }

    fn start_retrying(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.retrying.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.this.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(BACKOFF_START).await;
                let Some(oauth2) = this.upgrade() else {
                    return;
                };
                oauth2.retry_due().await;
                if oauth2.any_unsaved() {
                    continue;
                }
                oauth2.retrying.store(false, Ordering::SeqCst);
                // A write that failed after the pass above found the task still running.
                if !oauth2.any_unsaved() || oauth2.retrying.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    /// Writes the unwritten records whose retry time has come, skipping accounts whose grant
    /// is under way (it writes itself) or whose lease another process holds.
    async fn retry_due(&self) {
        let recovered = self.redis.as_ref().is_some_and(|redis| {
            let recoveries = redis.recoveries();
            self.seen_recoveries.swap(recoveries, Ordering::SeqCst) != recoveries
        });
        for (id, account) in &self.accounts {
            if !account.grant.unsaved.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(mut state) = account.grant.state.try_lock() else {
                continue;
            };
            if !recovered
                && state
                    .store_retry_after
                    .is_some_and(|after| Instant::now() < after)
            {
                continue;
            }
            self.write_under_lease(id, account, &mut state, Duration::ZERO)
                .await;
        }
    }

    /// Writes the account's unwritten record, if any, holding its lease (waited for up to
    /// `wait`), so that no other process redeems or writes meanwhile.
    async fn write_under_lease(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
        wait: Duration,
    ) {
        let Some(store) = self.store.clone() else {
            return;
        };
        if state.unsaved.is_none() {
            return;
        }
        let Ok(lease) = self.own_lease(&store, id, state, wait).await else {
            return;
        };
        if let Some(unsaved) = state.unsaved.take() {
            self.write(id, account, state, unsaved).await;
        }
        self.let_go(state, lease).await;
    }

    /// Before the process exits: waits for the grants under way (their answers are written
    /// too), then writes every record the store has not taken, trying again until
    /// `deadline`; whether all are written. Says loudly which are not.
    pub async fn settle(&self, deadline: Instant) -> bool {
        let Some(this) = self.this.upgrade() else {
            return !self.any_unsaved();
        };
        loop {
            // Every account at once: one stuck grant must not use up the others' time.
            let mut rounds = tokio::task::JoinSet::new();
            for id in self.accounts.keys() {
                let (this, id) = (this.clone(), id.clone());
                rounds.spawn(async move {
                    if let Some(account) = this.accounts.get(&id) {
                        let settled = this.settle_account(&id, account, deadline);
                        let _ = tokio::time::timeout_at(deadline, settled).await;
                    }
                });
            }
            while rounds.join_next().await.is_some() {}
            if !self.any_unsaved() || Instant::now() + BACKOFF_START >= deadline {
                break;
            }
            tokio::time::sleep(BACKOFF_START).await;
        }
        for (id, account) in &self.accounts {
            if account.grant.unsaved.load(Ordering::SeqCst) {
                tracing::error!(
                    account = id.as_str(),
                    "exiting with a refresh token the token store never took; the account may need re-authorization"
                );
            }
        }
        !self.any_unsaved()
    }

    async fn settle_account(&self, id: &str, account: &Account, deadline: Instant) {
        let mut state = account.grant.state.lock().await;
        let wait = deadline.saturating_duration_since(Instant::now());
        self.write_under_lease(id, account, &mut state, wait).await;
    }
}

//! mailgate's own OAuth2 client as a token source: per account, a client-credentials grant
//! (RFC 6749 4.4), a refresh-token grant from the encrypted [`store`] (RFC 6749 6), or a
//! service-account JWT bearer grant (RFC 7523 2.1).
//!
//! Grants of one account run one at a time, in this process (a mutex) and across processes
//! (the store's lease). Each refresh reads the store's newest record first, so a token stored
//! by `mailgate authorize` or an import since wins over anything in memory; a rotated token is
//! written by compare-and-swap before the access token that came with it is handed out. A
//! write that fails is kept in memory, retried with backoff and at shutdown, and shown as
//! not ready until it lands. `invalid_grant` marks the account as needing re-authorization;
//! a refusal of mailgate's own client settings marks it misconfigured; temporary failures
//! back off.

pub mod flows;
pub mod provider;
pub mod store;
mod unsaved;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{AccountConfig, Grant, OAuth2Config, Protocol};
use crate::health::Health;
use crate::login::UpstreamAuth;
use crate::metrics::Metrics;
use crate::replicas::Redis;
use crate::secret::Secret;
use provider::{GRANT_CLIENT_CREDENTIALS, GRANT_REFRESH_TOKEN, GrantError, Provider, TokenAnswer};
use store::file::FileStore;
use store::redis::RedisStore;
use store::{Expect, StoreError, Stored, Swap, TokenStore};

use super::{BoxFuture, Token, TokenError, TokenKey, TokenSource};

/// After a temporary failure an account waits this long before the provider is asked
/// again, doubled per failure up to the maximum (with jitter), so an outage is not hammered.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often an unwritten record is tried again at most, and how long a grant waits for
/// another process's grant of the same account beyond the provider's own timeout.
const STORE_RETRY_MAX: Duration = Duration::from_secs(60);
const LEASE_EXTRA_WAIT: Duration = Duration::from_secs(5);

/// How long a process waits for an account's lease: a grant holding it ends within the
/// provider's timeout.
pub fn lease_wait(config: &OAuth2Config) -> Duration {
    config.timeout + LEASE_EXTRA_WAIT
}

/// Where an account stands, as `mailgate accounts` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountState {
    /// The last grant worked.
    Ok,
    /// No grant was tried yet (since start, or since an import with `--no-check`).
    NotYetTried,
    /// A `refresh_token` account with nothing in the store.
    NeverAuthorized,
    /// The provider refused the refresh token (`invalid_grant`).
    NeedsReauthorization,
    /// The store could not be read for this account (wrong key, corrupted file).
    StoreError,
    /// The provider refused mailgate's own settings (`invalid_client`,
    /// `unauthorized_client`, a client-credentials `invalid_grant`, ...): the operator must
    /// fix them; retrying will not.
    Misconfigured,
    /// The last grant failed for a reason other than the above.
    Failing,
}

impl AccountState {
    pub const ALL: [AccountState; 7] = [
        AccountState::Ok,
        AccountState::NotYetTried,
        AccountState::NeverAuthorized,
        AccountState::NeedsReauthorization,
        AccountState::StoreError,
        AccountState::Misconfigured,
        AccountState::Failing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AccountState::Ok => "ok",
            AccountState::NotYetTried => "not_yet_tried",
            AccountState::NeverAuthorized => "never_authorized",
            AccountState::NeedsReauthorization => "needs_reauthorization",
            AccountState::StoreError => "store_error",
            AccountState::Misconfigured => "misconfigured",
            AccountState::Failing => "failing",
        }
    }
}

/// What is known of one account, without any secret.
#[derive(Debug, Clone)]
pub struct AccountStatus {
    pub state: AccountState,
    /// Unix seconds of the last successful grant.
    pub refreshed_at: Option<u64>,
    /// Unix seconds when the last access token expires.
    pub access_expires_at: Option<u64>,
    /// Unix seconds when the refresh token expires, if the provider said.
    pub refresh_expires_at: Option<u64>,
    /// The last error, made safe to show.
    pub last_error: Option<String>,
    /// A refresh token is held in memory that the store has not taken yet.
    pub unsaved: bool,
}

/// How people are told that an account's refresh token is held only in memory.
pub const UNSAVED: &str = "refresh token not written to the store (retrying)";

/// A span of seconds as account times are shown to people: whole minutes (`42m`, `3h 5m`),
/// or `<1m`.
pub fn span_in_minutes(seconds: u64) -> String {
    if seconds < 60 {
        return "<1m".to_owned();
    }
    humantime::format_duration(std::time::Duration::from_secs(seconds / 60 * 60)).to_string()
}

/// One configured account.
struct Account {
    config: AccountConfig,
    provider: Arc<Provider>,
    /// Held during a grant: one grant per account at a time, across reloads too.
    grant: Arc<AccountGrant>,
    status: Mutex<AccountStatus>,
}

/// Why an account got no token.
enum Failure {
    Grant(GrantError),
    /// A refresh-token account without a refresh token: `NeverAuthorized` (nothing stored)
    /// or `NeedsReauthorization` (the provider refused the last one).
    NotAuthorized(AccountState),
    /// The store could not be read.
    Store(String),
}

impl From<GrantError> for Failure {
    fn from(error: GrantError) -> Self {
        Failure::Grant(error)
    }
}

/// The grant state of every account, kept across configuration reloads: a reload builds a
/// new [`OAuth2`], and its grants must queue behind the old one's, and a record the old one
/// could not write must not be forgotten.
#[derive(Default)]
pub struct GrantStates(Mutex<HashMap<String, Arc<AccountGrant>>>);

impl GrantStates {
    fn of(&self, account: &str) -> Arc<AccountGrant> {
        lock(&self.0).entry(account.to_owned()).or_default().clone()
    }

    /// Accounts holding a refresh token the store has not taken, whichever configuration
    /// they came from.
    fn unsaved_count(&self) -> usize {
        lock(&self.0)
            .values()
            .filter(|grant| grant.unsaved.load(Ordering::SeqCst))
            .count()
    }

    /// For a new configuration: what it no longer names is forgotten, and the failures of
    /// the accounts it names no longer hold their grants back (their settings may be fixed).
    fn reconfigured(&self, accounts: &BTreeMap<String, AccountConfig>) {
        lock(&self.0).retain(|id, grant| {
            let kept = accounts.contains_key(id);
            if !kept && grant.unsaved.load(Ordering::SeqCst) {
                tracing::warn!(
                    account = id.as_str(),
                    "account removed from the configuration with a refresh token the store never took"
                );
            }
            // A grant under way keeps its own state; it ends with the outcome it gets.
            if kept && let Ok(mut state) = grant.state.try_lock() {
                state.retry_after = None;
                state.backoff = Duration::ZERO;
            }
            kept
        });
    }
}

/// One account's grant state, and whether it holds an unwritten record (readable without
/// waiting for a grant under way).
#[derive(Default)]
pub struct AccountGrant {
    state: tokio::sync::Mutex<GrantState>,
    unsaved: AtomicBool,
}

#[derive(Default)]
pub struct GrantState {
    /// A record from the provider's answer that the store has not taken yet.
    unsaved: Option<Unsaved>,
    /// The lease, kept while `unsaved` holds a token this process redeemed: until the store
    /// takes it, no other process may redeem the token it replaces (the store's newest).
    kept_lease: Option<store::Lease>,
    /// After a failure that retrying soon will not fix: no request before this, and what
    /// logins get until then.
    retry_after: Option<(Instant, TokenError)>,
    backoff: Duration,
    /// When the unwritten record is tried again, and the wait after that.
    store_retry_after: Option<Instant>,
    store_backoff: Duration,
}

/// A record the store did not take, and the generation it was meant to replace: it is the
/// newest only while the store still holds that generation.
struct Unsaved {
    record: Stored,
    replaces: Expect,
}

pub struct OAuth2 {
    accounts: HashMap<String, Account>,
    grants: Arc<GrantStates>,
    store: Option<Arc<dyn TokenStore>>,
    /// The replicas' shared state, told of new authorizations.
    redis: Option<Arc<Redis>>,
    /// How long a grant waits for the store's lease.
    lease_wait: Duration,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
    /// Itself, for the tasks that run grants and retry unwritten records.
    this: Weak<OAuth2>,
    /// That task is running.
    retrying: AtomicBool,
    /// The times the shared Redis answered again after not answering, as last seen: an
    /// unwritten record is written at once then, not after its backoff.
    seen_recoveries: std::sync::atomic::AtomicU64,
}

impl OAuth2 {
    /// The store is Redis when `redis` is given, else the file store.
    ///
    /// # Errors
    /// A provider's HTTP client or the store cannot be set up.
    pub async fn new(
        config: &OAuth2Config,
        grants: &Arc<GrantStates>,
        metrics: Arc<Metrics>,
        health: Option<Arc<Health>>,
        redis: Option<Arc<Redis>>,
    ) -> Result<Arc<Self>, String> {
        let mut providers = BTreeMap::new();
        for (name, provider) in &config.providers {
            providers.insert(
                name.clone(),
                Arc::new(Provider::new(name, provider, config.timeout)?),
            );
        }
        let store: Option<Arc<dyn TokenStore>> = match (&config.store, &redis) {
            (Some(store), Some(redis)) => {
                let key = store.key.as_ref().ok_or("token store without a key")?;
                Some(Arc::new(
                    RedisStore::new(redis.clone(), key, lease_wait(config))
                        .map_err(|e| e.to_string())?,
                ))
            }
            (Some(store), None) => {
                let key = store.key.as_ref().ok_or("token store without a key")?;
                let dir = store
                    .dir
                    .as_ref()
                    .ok_or("token store without a directory")?;
                Some(Arc::new(
                    FileStore::open(dir, key).map_err(|e| e.to_string())?,
                ))
            }
            (None, _) => None,
        };
        let mut accounts = HashMap::new();
        for (id, account) in &config.accounts {
            let provider = providers
                .get(&account.provider)
                .ok_or_else(|| format!("account {id}: no provider {}", account.provider))?
                .clone();
            accounts.insert(
                id.clone(),
                Account {
                    config: account.clone(),
                    provider,
                    grant: grants.of(id),
                    status: Mutex::new(AccountStatus {
                        state: AccountState::NotYetTried,
                        refreshed_at: None,
                        access_expires_at: None,
                        refresh_expires_at: None,
                        last_error: None,
                        unsaved: false,
                    }),
                },
            );
        }
        grants.reconfigured(&config.accounts);
        let oauth2 = Arc::new_cyclic(|this| Self {
            accounts,
            grants: grants.clone(),
            store,
            redis,
            lease_wait: lease_wait(config),
            metrics,
            health,
            this: this.clone(),
            retrying: AtomicBool::new(false),
            seen_recoveries: std::sync::atomic::AtomicU64::new(0),
        });
        oauth2.load_states().await;
        // A record the previous configuration could not write is retried by this one.
        oauth2.update_unsaved();
        Ok(oauth2)
    }

    /// The provider and settings of `account`.
    pub fn account(&self, account: &str) -> Option<(Arc<Provider>, AccountConfig)> {
        self.accounts
            .get(account)
            .map(|found| (found.provider.clone(), found.config.clone()))
    }

    /// Stores the refresh token a flow (or an import) just obtained for `id`, and makes it
    /// the one in use.
    ///
    /// # Errors
    /// `id` is not a refresh-token account, there is no store, or writing it failed.
    pub async fn authorized(
        &self,
        id: &str,
        refresh_token: Secret<String>,
        answer: Option<&TokenAnswer>,
    ) -> Result<(), String> {
        let account = self
            .accounts
            .get(id)
            .filter(|account| account.config.grant == Grant::RefreshToken)
            .ok_or_else(|| {
                format!("{id} is not a refresh_token account in tokens.oauth2.accounts")
            })?;
        let mut state = account.grant.state.lock().await;
        let now = provider::unix_now();
        // A flow's code redemption is a grant; an imported token was never redeemed here.
        let record = Stored {
            refresh_token: Some(refresh_token),
            refreshed_at: answer.map(|_| now),
            access_expires_at: answer
                .and_then(|answer| answer.expires_in)
                .map(|lifetime| now + lifetime.as_secs()),
            refresh_expires_at: answer
                .and_then(|answer| answer.refresh_expires_in)
                .map(|lifetime| now + lifetime.as_secs()),
            generation: 0,
        };
        let store = self.store.clone().ok_or("no token store configured")?;
        let lease = self
            .own_lease(&store, id, &mut state, self.lease_wait)
            .await
            .map_err(|e| e.to_string())?;
        let written = self.replace_record(id, record.clone()).await;
        if written.is_ok() {
            // Whatever this process could not write is older than this authorization.
            self.clear_unsaved(account, &mut state);
        }
        self.let_go(&mut state, lease).await;
        written?;
        state.retry_after = None;
        {
            let mut status = lock(&account.status);
            apply_stored(&mut status, &record);
            status.last_error = None;
        }
        self.update_gauge();
        if let Some(redis) = &self.redis {
            super::shared::account_replaced(redis, id).await;
        }
        tracing::info!(account = id, "account authorized; refresh token stored");
        Ok(())
    }

    /// Writes `record` over whatever the store holds for `id` (a new authorization), under
    /// the lease.
    async fn replace_record(&self, id: &str, record: Stored) -> Result<(), String> {
        // Under the lease nobody else redeems or writes: one read tells what to replace.
        for _ in 0..4 {
            let expect = match self.load(id).await {
                Ok(current) => Expect::after_reading(current.as_ref()),
                Err(_) => Expect::Anything,
            };
            // Only a writer that ignores the lease (an older mailgate) makes this conflict.
            if let Swap::Written(_) = self.swap(id, expect, record.clone()).await? {
                return Ok(());
            }
        }
        Err("the token store keeps changing; try again".to_owned())
    }

    /// The providers of the accounts, each once.
    pub fn providers(&self) -> Vec<Arc<Provider>> {
        let mut providers: Vec<Arc<Provider>> = Vec::new();
        for account in self.accounts.values() {
            if !providers
                .iter()
                .any(|known| Arc::ptr_eq(known, &account.provider))
            {
                providers.push(account.provider.clone());
            }
        }
        providers
    }

    /// Whether `account` is one of this source's accounts.
    pub fn has(&self, account: &str) -> bool {
        self.accounts.contains_key(account)
    }

    /// Every account with its provider name, grant and status, sorted by id.
    pub fn statuses(&self) -> Vec<(String, String, Grant, AccountStatus)> {
        let mut all: Vec<_> = self
            .accounts
            .iter()
            .map(|(id, account)| {
                (
                    id.clone(),
                    account.provider.name.clone(),
                    account.config.grant,
                    AccountStatus {
                        unsaved: account.grant.unsaved.load(Ordering::Relaxed),
                        ..lock(&account.status).clone()
                    },
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Reads what the store says about every refresh-token account, so that the states are
    /// right before the first login.
    async fn load_states(&self) {
        for (id, account) in &self.accounts {
            if account.config.grant != Grant::RefreshToken {
                continue;
            }
            let loaded = self.load(id).await;
            let mut status = lock(&account.status);
            match loaded {
                Ok(Some(stored)) => apply_stored(&mut status, &stored),
                Ok(None) => status.state = AccountState::NeverAuthorized,
                Err(error) => {
                    tracing::error!(account = id.as_str(), %error, "cannot read the token store");
                    status.state = AccountState::StoreError;
                    status.last_error = Some(error.to_string());
                }
            }
        }
        self.update_gauge();
    }

    async fn fetch_account(&self, id: &str, account: &Account) -> Result<Token, TokenError> {
        let mut state = account.grant.state.lock().await;
        if let Some((after, error)) = &state.retry_after
            && Instant::now() < *after
        {
            return Err(match error {
                TokenError::Unavailable(_) => TokenError::Unavailable(format!(
                    "provider failing; next try in {} ms",
                    (*after - Instant::now()).as_millis()
                )),
                permanent => permanent.clone(),
            });
        }
        let started = Instant::now();
        let result = self.run_grant(id, account, &mut state).await;
        if !matches!(result, Err(Failure::NotAuthorized(_) | Failure::Store(_))) {
            self.metrics
                .token_fetch("oauth2", started.elapsed().as_secs_f64());
            let label = match &result {
                Ok(_) => "ok",
                Err(Failure::Grant(GrantError::InvalidGrant(_))) => "invalid_grant",
                // invalid_client, unauthorized_client, ...: a configuration to fix.
                Err(Failure::Grant(GrantError::Refused(_))) => "refused",
                Err(_) => "error",
            };
            self.metrics.token_request("oauth2", label);
        }
        match result {
            Ok(answer) => {
                state.retry_after = None;
                state.backoff = Duration::ZERO;
                Ok(self.granted(account, answer))
            }
            Err(failure) => Err(self.failed(id, account, &mut state, failure)),
        }
    }

    async fn run_grant(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
    ) -> Result<TokenAnswer, Failure> {
        let provider = &account.provider;
        let scope = provider.scope(account.config.scope.as_deref(), account.config.grant);
        match account.config.grant {
            Grant::ClientCredentials => {
                let params = scope
                    .map(|scope| vec![("scope", Secret::new(scope))])
                    .unwrap_or_default();
                Ok(provider.grant(GRANT_CLIENT_CREDENTIALS, params).await?)
            }
            Grant::JwtBearer => {
                let scope = scope.unwrap_or_default();
                Ok(provider
                    .service_account_grant(&account.config.user, &scope)
                    .await?)
            }
            Grant::RefreshToken => {
                self.refresh_grant(id, account, state, scope.as_deref())
                    .await
            }
        }
    }

    /// Redeems the account's newest refresh token under the store's lease (no other process
    /// redeems it meanwhile), then writes the outcome by compare-and-swap: the rotated token,
    /// or that the token is gone.
    async fn refresh_grant(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
        scope: Option<&str>,
    ) -> Result<TokenAnswer, Failure> {
        let store = self.store()?;
        let lease = self
            .own_lease(&store, id, state, self.lease_wait)
            .await
            .map_err(|error| match error {
                StoreError::Busy => Failure::Grant(GrantError::Temporary(error.to_string())),
                other => Failure::Store(other.to_string()),
            })?;
        let outcome = self.redeem_newest(id, account, state, scope).await;
        self.let_go(state, lease).await;
        outcome
    }

    /// [`OAuth2::refresh_grant`] under the lease.
    async fn redeem_newest(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
        scope: Option<&str>,
    ) -> Result<TokenAnswer, Failure> {
        let (token, replaces) = self.newest(id, account, state).await?;
        match refresh(&account.provider, &token, scope).await {
            Ok(answer) => {
                let now = provider::unix_now();
                let record = Stored {
                    refresh_token: Some(answer.refresh_token.clone().unwrap_or(token)),
                    refreshed_at: Some(now),
                    access_expires_at: answer.expires_in.map(|lifetime| now + lifetime.as_secs()),
                    refresh_expires_at: answer
                        .refresh_expires_in
                        .map(|lifetime| now + lifetime.as_secs()),
                    generation: 0,
                };
                self.write(id, account, state, Unsaved { record, replaces })
                    .await;
                Ok(answer)
            }
            Err(GrantError::InvalidGrant(detail)) => {
                // Recorded before the lease is released: no process (nor a restart) tries
                // the refused token again.
                let record = Stored {
                    refresh_token: None,
                    refreshed_at: None,
                    access_expires_at: None,
                    refresh_expires_at: None,
                    generation: 0,
                };
                self.write(id, account, state, Unsaved { record, replaces })
                    .await;
                Err(Failure::Grant(GrantError::InvalidGrant(detail)))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// The refresh token to redeem and the record it comes from: the store's newest, unless
    /// this process holds a newer one it could not write (the store still holds the record
    /// that one replaces).
    async fn newest(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
    ) -> Result<(Secret<String>, Expect), Failure> {
        let stored = match self.load(id).await {
            Ok(stored) => stored,
            // An unreadable store does not stop the token held in memory.
            Err(error) => {
                return match &state.unsaved {
                    Some(unsaved) => unsaved_token(unsaved),
                    None => Err(Failure::Store(error)),
                };
            }
        };
        let expect = Expect::after_reading(stored.as_ref());
        if let Some(unsaved) = &state.unsaved {
            if unsaved.replaces == expect {
                return unsaved_token(unsaved);
            }
            tracing::warn!(
                account = id,
                "the token store holds a newer record than the one this process could not write; using the store's"
            );
            self.clear_unsaved(account, state);
        }
        match stored.map(|stored| stored.refresh_token) {
            None => Err(Failure::NotAuthorized(AccountState::NeverAuthorized)),
            Some(None) => Err(Failure::NotAuthorized(AccountState::NeedsReauthorization)),
            Some(Some(token)) => Ok((token, expect)),
        }
    }

    fn granted(&self, account: &Account, answer: TokenAnswer) -> Token {
        let now = provider::unix_now();
        {
            let mut status = lock(&account.status);
            status.state = AccountState::Ok;
            status.refreshed_at = Some(now);
            status.access_expires_at = answer.expires_in.map(|lifetime| now + lifetime.as_secs());
            if let Some(lifetime) = answer.refresh_expires_in {
                status.refresh_expires_at = Some(now + lifetime.as_secs());
            }
            if !account.grant.unsaved.load(Ordering::SeqCst) {
                status.last_error = None;
            }
        }
        self.update_gauge();
        Token {
            auth: UpstreamAuth::Bearer {
                user: account.config.user.clone(),
                token: answer.access_token,
            },
            lifetime: answer.expires_in,
            server: None,
        }
    }

    /// Acts on a failed grant and says what the login gets.
    fn failed(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
        failure: Failure,
    ) -> TokenError {
        match failure {
            Failure::Grant(GrantError::InvalidGrant(detail))
                if account.config.grant == Grant::RefreshToken =>
            {
                tracing::error!(
                    account = id,
                    provider = account.provider.name.as_str(),
                    reason = detail.as_str(),
                    "refresh token refused: the account needs re-authorization (mailgate authorize --account ...)"
                );
                self.metrics.reauthorization_needed();
                self.set_state(account, AccountState::NeedsReauthorization, Some(detail));
                TokenError::NeedsReauthorization
            }
            // The provider refuses mailgate's own client (invalid_client,
            // unauthorized_client, invalid_scope), or an assertion or client-credentials
            // grant outright: only the operator can fix that.
            Failure::Grant(GrantError::InvalidGrant(detail) | GrantError::Refused(detail)) => {
                tracing::error!(
                    account = id,
                    provider = account.provider.name.as_str(),
                    reason = detail.as_str(),
                    "the provider refuses this account's OAuth2 settings: fix the configuration; logins fail until then"
                );
                back_off(state, TokenError::Misconfigured(detail.clone()));
                self.set_state(account, AccountState::Misconfigured, Some(detail.clone()));
                TokenError::Misconfigured(detail)
            }
            Failure::NotAuthorized(why) => {
                tracing::warn!(
                    account = id,
                    state = why.label(),
                    "no refresh token for this account: authorize it with mailgate authorize --account ..."
                );
                let last_error = lock(&account.status).last_error.clone();
                self.set_state(account, why, last_error);
                TokenError::NeedsReauthorization
            }
            Failure::Store(error) => {
                tracing::error!(account = id, %error, "cannot read the token store");
                self.set_state(account, AccountState::StoreError, Some(error.clone()));
                TokenError::Unavailable(error)
            }
            Failure::Grant(other) => {
                let detail = other.to_string();
                back_off(state, TokenError::Unavailable(detail.clone()));
                tracing::warn!(
                    account = id,
                    provider = account.provider.name.as_str(),
                    reason = detail.as_str(),
                    backoff_ms = u64::try_from(state.backoff.as_millis()).unwrap_or(u64::MAX),
                    "token grant failed"
                );
                let store_error = lock(&account.status).state == AccountState::StoreError;
                if !store_error {
                    self.set_state(account, AccountState::Failing, Some(detail.clone()));
                }
                TokenError::Unavailable(detail)
            }
        }
    }

    fn store(&self) -> Result<Arc<dyn TokenStore>, Failure> {
        self.store
            .clone()
            .ok_or_else(|| Failure::Store("no token store configured".to_owned()))
    }

    /// The account's lease: the one this process kept, or else taken (waited for up to
    /// `wait`).
    async fn own_lease(
        &self,
        store: &Arc<dyn TokenStore>,
        id: &str,
        state: &mut GrantState,
        wait: Duration,
    ) -> Result<store::Lease, StoreError> {
        match state.kept_lease.take() {
            Some(lease) => Ok(lease),
            None => self.lease(store, id, wait).await,
        }
    }

    /// Releases `lease`, unless `state` holds a redeemed token the store has not taken: the
    /// lease is kept with it then (and renewed, where the store renews leases).
    async fn let_go(&self, state: &mut GrantState, lease: store::Lease) {
        let redeemed = state
            .unsaved
            .as_ref()
            .is_some_and(|unsaved| unsaved.record.refresh_token.is_some());
        if redeemed {
            state.kept_lease = Some(lease);
        } else {
            lease.release().await;
        }
    }

    /// The account's lease, waited for up to `wait` (the wait measured).
    async fn lease(
        &self,
        store: &Arc<dyn TokenStore>,
        id: &str,
        wait: Duration,
    ) -> Result<store::Lease, StoreError> {
        let started = Instant::now();
        let lease = store::lease(store, id, wait).await;
        self.metrics
            .lock_waited("token_store_lease", started.elapsed().as_secs_f64());
        lease
    }

    async fn load(&self, id: &str) -> Result<Option<Stored>, String> {
        match &self.store {
            Some(store) => store.load(id).await.map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }

    async fn swap(&self, id: &str, expect: Expect, record: Stored) -> Result<Swap, String> {
        match &self.store {
            Some(store) => store
                .swap(id, expect, record)
                .await
                .map_err(|e| e.to_string()),
            None => Err("no token store configured".to_owned()),
        }
    }

    fn set_state(&self, account: &Account, state: AccountState, error: Option<String>) {
        {
            let mut status = lock(&account.status);
            status.state = state;
            status.last_error = error;
        }
        self.update_gauge();
    }

    fn update_gauge(&self) {
        for state in AccountState::ALL {
            let count = self
                .accounts
                .values()
                .filter(|account| lock(&account.status).state == state)
                .count();
            self.metrics
                .oauth2_accounts(state.label(), i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

impl TokenSource for OAuth2 {
    /// The grant runs in a task of its own, to its end even if the login waiting for it goes
    /// away (`login_timeout`, a closed connection, a drain): dropped mid-request, it would
    /// lose a refresh token the provider has already rotated.
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
        Box::pin(async move {
            if !self.accounts.contains_key(&key.account) {
                return Err(TokenError::Refused);
            }
            let Some(this) = self.this.upgrade() else {
                return Err(TokenError::Unavailable("shutting down".to_owned()));
            };
            let id = key.account.clone();
            tokio::spawn(async move {
                let Some(account) = this.accounts.get(&id) else {
                    return Err(TokenError::Refused);
                };
                this.fetch_account(&id, account).await
            })
            .await
            .unwrap_or_else(|error| Err(TokenError::Unavailable(error.to_string())))
        })
    }

    fn probe(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// One token serves IMAP and SMTP alike: the scopes cover both.
    fn key(&self, account: &str, _protocol: Protocol) -> TokenKey {
        TokenKey::shared(account, None)
    }
}

/// A refresh-token grant (RFC 6749 6).
async fn refresh(
    provider: &Provider,
    refresh_token: &Secret<String>,
    scope: Option<&str>,
) -> Result<TokenAnswer, GrantError> {
    let mut params = vec![("refresh_token", refresh_token.clone())];
    if let Some(scope) = scope {
        params.push(("scope", Secret::new(scope.to_owned())));
    }
    provider.grant(GRANT_REFRESH_TOKEN, params).await
}

/// The token of a record this process could not write.
fn unsaved_token(unsaved: &Unsaved) -> Result<(Secret<String>, Expect), Failure> {
    match &unsaved.record.refresh_token {
        Some(token) => Ok((token.clone(), unsaved.replaces)),
        None => Err(Failure::NotAuthorized(AccountState::NeedsReauthorization)),
    }
}

/// After a failure that retrying at once would not fix: the next tries wait, doubling up to
/// the maximum, and logins get `error` meanwhile.
fn back_off(state: &mut GrantState, error: TokenError) {
    state.backoff = (state.backoff * 2).clamp(BACKOFF_START, BACKOFF_MAX);
    state.retry_after = Some((Instant::now() + jitter(state.backoff), error));
}

fn apply_stored(status: &mut AccountStatus, stored: &Stored) {
    status.state = match (&stored.refresh_token, stored.refreshed_at) {
        (None, _) => AccountState::NeedsReauthorization,
        (Some(_), None) => AccountState::NotYetTried,
        (Some(_), Some(_)) => AccountState::Ok,
    };
    status.refreshed_at = stored.refreshed_at;
    status.access_expires_at = stored.access_expires_at;
    status.refresh_expires_at = stored.refresh_expires_at;
}

/// Up to a fifth more or less, so that accounts failing together do not retry together.
fn jitter(wait: Duration) -> Duration {
    use std::hash::BuildHasher as _;
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let fraction = 0.8 + 0.4 * (random % 1000) as f64 / 1000.0;
    wait.mul_f64(fraction)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

//! mailgate's own OAuth2 client as a token source: per account, a client-credentials grant
//! (RFC 6749 4.4), a refresh-token grant from the encrypted [`store`] (RFC 6749 6), or a
//! service-account JWT bearer grant (RFC 7523 2.1).
//!
//! Grants of one account run one at a time, so a rotated refresh token is always the one used
//! next; it is written to the store before the access token that came with it is handed out.
//! `invalid_grant` marks the account as needing re-authorization; temporary failures back off.

pub mod flows;
pub mod provider;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{AccountConfig, Grant, OAuth2Config, Protocol};
use crate::login::UpstreamAuth;
use crate::metrics::Metrics;
use crate::secret::Secret;
use provider::{GRANT_CLIENT_CREDENTIALS, GRANT_REFRESH_TOKEN, GrantError, Provider, TokenAnswer};
use store::{Store, Stored};

use super::{BoxFuture, Token, TokenError, TokenKey, TokenSource};

/// After a temporary failure an account waits this long before the provider is asked
/// again, doubled per failure up to the maximum (with jitter), so an outage is not hammered.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Where an account stands, as `mailgate accounts` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountState {
    /// Tokens can be had (the last grant worked, or none was tried yet).
    Ok,
    /// A `refresh_token` account with nothing in the store.
    NeverAuthorized,
    /// The provider refused the refresh token (`invalid_grant`).
    NeedsReauthorization,
    /// The store could not be read for this account (wrong key, corrupted file).
    StoreError,
    /// The last grant failed for a reason other than the above.
    Failing,
}

impl AccountState {
    pub const ALL: [AccountState; 5] = [
        AccountState::Ok,
        AccountState::NeverAuthorized,
        AccountState::NeedsReauthorization,
        AccountState::StoreError,
        AccountState::Failing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AccountState::Ok => "ok",
            AccountState::NeverAuthorized => "never_authorized",
            AccountState::NeedsReauthorization => "needs_reauthorization",
            AccountState::StoreError => "store_error",
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
}

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
    grant: Arc<tokio::sync::Mutex<GrantState>>,
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
/// new [`OAuth2`], and its grants must queue behind the old one's and use the refresh token
/// the old one rotated to, or the provider would see a used token and refuse the account.
#[derive(Default)]
pub struct GrantStates(Mutex<HashMap<String, Arc<tokio::sync::Mutex<GrantState>>>>);

impl GrantStates {
    fn of(&self, account: &str) -> Arc<tokio::sync::Mutex<GrantState>> {
        lock(&self.0).entry(account.to_owned()).or_default().clone()
    }
}

#[derive(Default)]
pub struct GrantState {
    /// The refresh token in use, once loaded from the store.
    refresh_token: Option<Secret<String>>,
    /// Whether the store was read for this account.
    loaded: bool,
    /// After a temporary failure: no request before this, and the next wait.
    retry_after: Option<Instant>,
    backoff: Duration,
}

pub struct OAuth2 {
    accounts: HashMap<String, Account>,
    store: Option<Arc<Store>>,
    metrics: Arc<Metrics>,
}

impl OAuth2 {
    /// # Errors
    /// A provider's HTTP client or the store cannot be set up.
    pub fn new(
        config: &OAuth2Config,
        grants: &GrantStates,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let mut providers = BTreeMap::new();
        for (name, provider) in &config.providers {
            providers.insert(
                name.clone(),
                Arc::new(Provider::new(name, provider, config.timeout)?),
            );
        }
        let store = match &config.store {
            Some(store) => {
                let key = store.key.as_ref().ok_or("token store without a key")?;
                Some(Arc::new(
                    Store::open(&store.dir, key).map_err(|e| e.to_string())?,
                ))
            }
            None => None,
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
                        state: AccountState::Ok,
                        refreshed_at: None,
                        access_expires_at: None,
                        refresh_expires_at: None,
                        last_error: None,
                    }),
                },
            );
        }
        let oauth2 = Self {
            accounts,
            store,
            metrics,
        };
        oauth2.load_states();
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
        let mut state = account.grant.lock().await;
        let now = provider::unix_now();
        let record = Stored {
            refresh_token: Some(refresh_token.clone()),
            refreshed_at: now,
            access_expires_at: answer
                .and_then(|answer| answer.expires_in)
                .map(|lifetime| now + lifetime.as_secs()),
            refresh_expires_at: answer
                .and_then(|answer| answer.refresh_expires_in)
                .map(|lifetime| now + lifetime.as_secs()),
        };
        self.save(id, record).await?;
        state.refresh_token = Some(refresh_token);
        state.loaded = true;
        state.retry_after = None;
        {
            let mut status = lock(&account.status);
            status.state = AccountState::Ok;
            status.refreshed_at = Some(now);
            status.last_error = None;
        }
        self.update_gauge();
        tracing::info!(account = id, "account authorized; refresh token stored");
        Ok(())
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
                    lock(&account.status).clone(),
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Reads what the store says about every refresh-token account, so that the states are
    /// right before the first login (blocking: called at start).
    fn load_states(&self) {
        for (id, account) in &self.accounts {
            if account.config.grant != Grant::RefreshToken {
                continue;
            }
            let loaded = self.store.as_ref().map(|store| store.load(id));
            let mut status = lock(&account.status);
            match loaded {
                Some(Ok(Some(stored))) => apply_stored(&mut status, &stored),
                Some(Ok(None)) | None => status.state = AccountState::NeverAuthorized,
                Some(Err(error)) => {
                    tracing::error!(account = id.as_str(), %error, "cannot read the token store");
                    status.state = AccountState::StoreError;
                    status.last_error = Some(error.to_string());
                }
            }
        }
        self.update_gauge();
    }

    async fn fetch_account(&self, id: &str, account: &Account) -> Result<Token, TokenError> {
        let mut state = account.grant.lock().await;
        if let Some(after) = state.retry_after
            && Instant::now() < after
        {
            let wait = after - Instant::now();
            return Err(TokenError::Unavailable(format!(
                "provider failing; next try in {} ms",
                wait.as_millis()
            )));
        }
        // Without a refresh token in memory, look at the store again: `mailgate authorize` may
        // have put one there since.
        if state.refresh_token.is_none() {
            state.loaded = false;
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
            Err(error) => {
                let refused = match (&error, &state.refresh_token) {
                    (Failure::Grant(GrantError::InvalidGrant(_)), Some(token))
                        if account.config.grant == Grant::RefreshToken =>
                    {
                        Some(token.clone())
                    }
                    _ => None,
                };
                let error = self.failed(id, account, &mut state, error);
                if let Some(refused) = refused {
                    // Recorded before the account's next grant can start: a restart must not
                    // try the refused token again.
                    self.forget(id, &refused).await;
                }
                Err(error)
            }
        }
    }

    /// Runs the account's grant; for a refresh token, persists a rotated one first.
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
                let refresh_token = self.refresh_token(id, state).await?;
                let answer = match refresh(provider, &refresh_token, scope.as_deref()).await {
                    // Another process (mailgate authorize, test-login, a second replica) may
                    // have rotated the token since: try once with what the store holds now.
                    Err(GrantError::InvalidGrant(detail)) => {
                        let stored = self.load(id).await.map_err(Failure::Store)?;
                        match stored.and_then(|stored| stored.refresh_token) {
                            Some(newer) if newer != refresh_token => {
                                state.refresh_token = Some(newer.clone());
                                refresh(provider, &newer, scope.as_deref()).await?
                            }
                            _ => return Err(Failure::Grant(GrantError::InvalidGrant(detail))),
                        }
                    }
                    other => other?,
                };
                self.remember(id, account, state, &answer).await;
                Ok(answer)
            }
        }
    }

    /// The refresh token to use: from memory, or read from the store.
    async fn refresh_token(
        &self,
        id: &str,
        state: &mut GrantState,
    ) -> Result<Secret<String>, Failure> {
        let mut never_stored = false;
        if !state.loaded {
            let stored = self.load(id).await.map_err(Failure::Store)?;
            never_stored = stored.is_none();
            state.refresh_token = stored.and_then(|stored| stored.refresh_token);
            state.loaded = true;
        }
        state
            .refresh_token
            .clone()
            .ok_or(Failure::NotAuthorized(if never_stored {
                AccountState::NeverAuthorized
            } else {
                AccountState::NeedsReauthorization
            }))
    }

    /// Keeps the new refresh token (rotation) in memory and writes the record durably before
    /// the access token is used: a crash at any moment leaves a usable refresh token behind.
    async fn remember(
        &self,
        id: &str,
        account: &Account,
        state: &mut GrantState,
        answer: &TokenAnswer,
    ) {
        if let Some(rotated) = &answer.refresh_token {
            state.refresh_token = Some(rotated.clone());
        }
        let now = provider::unix_now();
        let record = Stored {
            refresh_token: state.refresh_token.clone(),
            refreshed_at: now,
            access_expires_at: answer.expires_in.map(|lifetime| now + lifetime.as_secs()),
            refresh_expires_at: answer
                .refresh_expires_in
                .map(|lifetime| now + lifetime.as_secs()),
        };
        if let Err(error) = self.save(id, record).await {
            // The new token stays in memory, so this process keeps working; the next grant
            // writes again.
            self.metrics.store_write_failure();
            tracing::error!(account = id, %error, "cannot write the token store; keeping the refresh token in memory");
            lock(&account.status).last_error = Some(error);
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
            status.last_error = None;
        }
        self.update_gauge();
        Token {
            auth: UpstreamAuth::Bearer {
                user: account.config.user.clone(),
                token: answer.access_token,
            },
            lifetime: answer.expires_in,
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
                state.refresh_token = None;
                self.metrics.reauthorization_needed();
                self.set_state(account, AccountState::NeedsReauthorization, Some(detail));
                TokenError::NeedsReauthorization
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
                state.backoff = (state.backoff * 2).clamp(BACKOFF_START, BACKOFF_MAX);
                state.retry_after = Some(Instant::now() + jitter(state.backoff));
                let detail = other.to_string();
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

    /// Records in the store that the refresh token is gone, so a restart does not retry it;
    /// unless the store holds another one by now (authorized again meanwhile).
    async fn forget(&self, id: &str, refused: &Secret<String>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let record = Stored {
            refresh_token: None,
            refreshed_at: provider::unix_now(),
            access_expires_at: None,
            refresh_expires_at: None,
        };
        let (account, refused) = (id.to_owned(), refused.clone());
        let written = tokio::task::spawn_blocking(move || {
            store.save_unless(&account, &record, |stored| {
                stored
                    .refresh_token
                    .as_ref()
                    .is_some_and(|token| token != &refused)
            })
        })
        .await;
        let error = match written {
            Ok(Ok(_)) => return,
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        self.metrics.store_write_failure();
        tracing::error!(account = id, %error, "cannot write the token store");
    }

    async fn load(&self, id: &str) -> Result<Option<Stored>, String> {
        let Some(store) = self.store.clone() else {
            return Ok(None);
        };
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || store.load(&id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn save(&self, id: &str, record: Stored) -> Result<(), String> {
        let Some(store) = self.store.clone() else {
            return Err("no token store configured".to_owned());
        };
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || store.save(&id, &record))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
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
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
        Box::pin(async move {
            let Some(account) = self.accounts.get(&key.account) else {
                return Err(TokenError::Refused);
            };
            self.fetch_account(&key.account, account).await
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

fn apply_stored(status: &mut AccountStatus, stored: &Stored) {
    status.state = if stored.refresh_token.is_some() {
        AccountState::Ok
    } else {
        AccountState::NeedsReauthorization
    };
    status.refreshed_at = Some(stored.refreshed_at);
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

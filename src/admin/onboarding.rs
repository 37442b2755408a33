//! The onboarding page: every OAuth2 account with its state, and Connect / Re-authorize
//! buttons that run the authorization-code flow (PKCE and `state`) through the provider and
//! back to `/oauth/callback`, or the device flow. Plain server-rendered HTML, no JavaScript;
//! every page behind basic auth, every form with a CSRF token, nothing cached, a strict
//! Content-Security-Policy, and no secret ever rendered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use maud::{DOCTYPE, Markup, html};
use subtle::ConstantTimeEq as _;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::throttle::AdminThrottle;
use super::{AdminRequest, AdminRuntime, Reply, check_basic_auth, plain, reply};
use crate::config::{Grant, OnboardingConfig};
use crate::jwt;
use crate::secret::Secret;
use crate::token::oauth2::flows::{self, Pending};
use crate::token::oauth2::provider::Provider;
use crate::token::oauth2::span_in_minutes;
use crate::token::oauth2::{AccountState, AccountStatus, OAuth2, UNSAVED};

const REALM: &str = "mailgate onboarding";
/// How long a started authorization waits for the provider's redirect.
const AUTHORIZATION_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Authorizations under way at once; older ones are dropped first.
const MAX_PENDING: usize = 64;
/// Device flows polling at once, over all accounts; the oldest is ended first. Each polls the
/// provider every few seconds with the one client id, which providers throttle.
const MAX_DEVICE_FLOWS: usize = 64;
/// A press of "Device code" within this time of the account's running flow shows that flow
/// instead of asking the provider for another code; later, a new flow replaces it.
const DEVICE_RESTART_AFTER: Duration = Duration::from_secs(60);
/// A device-flow page refreshes itself this often while it waits.
const DEVICE_REFRESH_SECS: u32 = 3;
const STYLE: &str = include_str!("onboarding.css");

/// Who may use the page and where providers send the browser back.
pub struct Settings {
    user: String,
    password: Option<Secret<String>>,
    redirect_url: Option<String>,
    /// The Content-Security-Policy: forms may post here and go on to the providers.
    policy: String,
}

impl Settings {
    pub fn new(config: &OnboardingConfig, providers: &[Arc<Provider>]) -> Self {
        let mut form_targets = vec!["'self'".to_owned()];
        for provider in providers {
            if let Some(origin) = provider
                .authorize_url
                .as_deref()
                .and_then(|url| url::Url::parse(url).ok())
                .map(|url| url.origin().ascii_serialization())
            {
                form_targets.push(origin);
            }
        }
        form_targets.dedup();
        Self {
            user: config.user.clone(),
            password: config.password.clone(),
            redirect_url: config.redirect_url.clone(),
            policy: format!(
                "default-src 'none'; style-src 'self'; form-action {}; frame-ancestors 'none'; base-uri 'none'",
                form_targets.join(" ")
            ),
        }
    }
}

/// Flows under way; they outlive reloads.
pub struct Flows {
    /// Put in every form and required back: a page of another site cannot know it.
    csrf: Secret<String>,
    /// Code flows by their `state`.
    pending: Mutex<HashMap<String, Started>>,
    /// Device flows by account (one each), shared with the tasks that poll for them.
    devices: Arc<Mutex<Devices>>,
}

#[derive(Default)]
struct Devices {
    by_account: HashMap<String, Device>,
    /// Numbers the flows, so a replaced flow's task cannot write over its successor.
    started: u64,
}

/// An account's device flow.
struct Device {
    id: u64,
    flow: DeviceFlow,
    at: Instant,
    /// Held while the flow's task polls; dropping it ends the polling.
    stop: Option<oneshot::Sender<()>>,
}

struct Started {
    account: String,
    provider: Arc<Provider>,
    pending: Pending,
    at: Instant,
}

#[derive(Clone)]
enum DeviceFlow {
    Starting,
    Waiting { uri: String, code: String },
    Done,
    Failed(String),
}

impl Flows {
    /// # Errors
    /// The system's random source failed: without a CSRF token nobody can tell its forms apart
    /// from another site's, so the start fails.
    pub fn new() -> Result<Self, String> {
        Self::with_csrf(jwt::random_id())
    }

    /// The token every form carries.
    pub(super) fn csrf(&self) -> &str {
        self.csrf.expose()
    }

    /// Whether a form's `csrf` field is the token.
    pub(super) fn csrf_matches(&self, token: Option<&str>) -> bool {
        token.is_some_and(|token| bool::from(token.as_bytes().ct_eq(self.csrf.expose().as_bytes())))
    }

    fn with_csrf(csrf: Result<String, String>) -> Result<Self, String> {
        Ok(Self {
            csrf: Secret::new(csrf.map_err(|error| format!("CSRF token: {error}"))?),
            pending: Mutex::new(HashMap::new()),
            devices: Arc::new(Mutex::new(Devices::default())),
        })
    }
}

pub async fn respond(
    request: &AdminRequest,
    settings: &Settings,
    runtime: &AdminRuntime,
    flows: &Flows,
    throttle: &AdminThrottle,
) -> Reply {
    let login = settings
        .password
        .as_ref()
        .map(|password| (settings.user.as_str(), password));
    if let Err(refused) = check_basic_auth(request, login, REALM, throttle).await {
        return *refused;
    }
    let Some(oauth2) = runtime.oauth2.clone() else {
        return page(
            "Accounts",
            html! { p { "No OAuth2 accounts are configured (tokens.oauth2)." } },
        );
    };
    let reply = match (&request.method, request.path.as_str()) {
        (&Method::GET, "/") => see_other("/accounts"),
        (&Method::GET, "/accounts") => {
            let backends = runtime.backends.is_some();
            accounts(request, settings, &oauth2, flows, backends)
        }
        (&Method::POST, "/accounts/connect") => match form_account(request, flows, &oauth2) {
            Ok(account) => connect(settings, &oauth2, flows, &account),
            Err(refused) => *refused,
        },
        (&Method::POST, "/accounts/device") => match form_account(request, flows, &oauth2) {
            Ok(account) => start_device(&oauth2, flows, account),
            Err(refused) => *refused,
        },
        (&Method::GET, "/accounts/device") => device_page(request, flows),
        (&Method::GET, "/oauth/callback") => callback(request, &oauth2, flows).await,
        (&Method::GET, "/static/onboarding.css") => {
            reply(StatusCode::OK, "text/css; charset=utf-8", STYLE.to_owned())
        }
        (_, "/" | "/accounts" | "/accounts/connect" | "/accounts/device" | "/oauth/callback") => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => super::not_found(),
    };
    secured(reply, settings)
}

/// Nothing from these pages is cached, framed, or sent on as a Referer (the callback URL
/// carries a code).
fn secured(reply: Reply, settings: &Settings) -> Reply {
    secured_with(reply, HeaderValue::from_str(&settings.policy).ok())
}

/// The headers of every admin page for a browser: nothing cached, framed or sent on as a
/// Referer, and the content security `policy`.
pub(super) fn secured_with(mut reply: Reply, policy: Option<HeaderValue>) -> Reply {
    let headers = reply.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Some(policy) = policy {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    reply
}

/// The accounts' table; `backends`: a link to the backends' page (its own login).
fn accounts(
    request: &AdminRequest,
    settings: &Settings,
    oauth2: &OAuth2,
    flows: &Flows,
    backends: bool,
) -> Reply {
    let authorized = query_param(&request.query, "authorized")
        .filter(|account| oauth2.account(account).is_some());
    let now = crate::token::oauth2::provider::unix_now();
    let body = html! {
        @if backends {
            nav { a href=(super::backends_page::PATH) { "Backends" } }
        }
        @if let Some(account) = &authorized {
            p.notice.ok { "Authorized " strong { (account) } ": its refresh token is in the token store." }
        }
        table {
            thead { tr { th { "Account" } th { "Mailbox" } th { "Provider" } th { "Grant" } th { "State" } th { "Last refresh" } th { "Last error" } th {} } }
            tbody {
                @for (id, provider, grant, status) in oauth2.statuses() {
                    tr {
                        td { (id) }
                        td { (oauth2.account(&id).map(|(_, settings)| settings.user).unwrap_or_default()) }
                        td { (provider) }
                        td { (grant.name()) }
                        td.state { span class=(format!("state {}", status.state.label())) { (state_text(&status, now)) } }
                        td { (status.refreshed_at.map(|at| ago(at, now)).unwrap_or_else(|| "never".to_owned())) }
                        td.error { (status.last_error.clone().unwrap_or_default()) }
                        td.actions {
                            @if grant == Grant::RefreshToken {
                                @let label = if status.state == AccountState::NeverAuthorized { "Connect" } else { "Re-authorize" };
                                @if settings.redirect_url.is_some() {
                                    (action_form("/accounts/connect", &id, flows, label, "connect"))
                                }
                                (action_form("/accounts/device", &id, flows, "Device code", "device"))
                            }
                        }
                    }
                }
            }
        }
    };
    page("Accounts", body)
}

fn action_form(action: &str, account: &str, flows: &Flows, label: &str, id: &str) -> Markup {
    html! {
        form method="post" action=(action) {
            input type="hidden" name="account" value=(account);
            input type="hidden" name="csrf" value=(flows.csrf());
            button type="submit" id=(format!("{id}-{account}")) { (label) }
        }
    }
}

fn state_text(status: &AccountStatus, now: u64) -> String {
    let state = match status.state {
        AccountState::Ok => match status.access_expires_at {
            Some(at) if at > now => format!("ok, expires in {}", span_in_minutes(at - now)),
            _ => "ok".to_owned(),
        },
        AccountState::NeverAuthorized => "never authorized".to_owned(),
        AccountState::NeedsReauthorization => "needs re-authorization".to_owned(),
        AccountState::NotYetTried => "not yet tried".to_owned(),
        AccountState::StoreError => "store error".to_owned(),
        AccountState::Misconfigured => "misconfigured".to_owned(),
        AccountState::Failing => "failing".to_owned(),
    };
    if status.unsaved {
        return format!("{state}; {UNSAVED}");
    }
    state
}

fn ago(at: u64, now: u64) -> String {
    format!("{} ago", span_in_minutes(now.saturating_sub(at)))
}

/// The account named by a POSTed form whose CSRF token is right.
fn form_account(
    request: &AdminRequest,
    flows: &Flows,
    oauth2: &OAuth2,
) -> Result<String, Box<Reply>> {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, v)| v.as_str())
    };
    if !flows.csrf_matches(field("csrf")) {
        tracing::warn!(client = %request.client, "onboarding form without a valid CSRF token refused");
        return Err(Box::new(plain(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token\n",
        )));
    }
    match field("account") {
        Some(account)
            if oauth2
                .account(account)
                .is_some_and(|(_, s)| s.grant == Grant::RefreshToken) =>
        {
            Ok(account.to_owned())
        }
        _ => Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            "not a refresh_token account\n",
        ))),
    }
}

/// Starts the code flow and sends the browser to the provider.
fn connect(settings: &Settings, oauth2: &OAuth2, flows: &Flows, account: &str) -> Reply {
    let Some((provider, config)) = oauth2.account(account) else {
        return super::not_found();
    };
    let started = flows::start(
        &provider,
        config.scope.as_deref(),
        Some(&config.user),
        settings.redirect_url.as_deref(),
    );
    let pending = match started {
        Ok(pending) => pending,
        Err(error) => {
            return page(
                "Cannot connect",
                html! { p.notice.error { (error.to_string()) } },
            );
        }
    };
    let url = pending.url.clone();
    let mut all = lock(&flows.pending);
    all.retain(|_, started| started.at.elapsed() < AUTHORIZATION_TIMEOUT);
    if all.len() >= MAX_PENDING
        && let Some(oldest) = all
            .iter()
            .min_by_key(|(_, started)| started.at)
            .map(|(state, _)| state.clone())
    {
        all.remove(&oldest);
    }
    all.insert(
        pending.state().expose().clone(),
        Started {
            account: account.to_owned(),
            provider,
            pending,
            at: Instant::now(),
        },
    );
    tracing::info!(account, "onboarding: authorization started");
    see_other(&url)
}

/// The provider's redirect: checks `state`, exchanges the code, stores the refresh token.
async fn callback(request: &AdminRequest, oauth2: &OAuth2, flows: &Flows) -> Reply {
    let state = query_param(&request.query, "state").unwrap_or_default();
    let started = lock(&flows.pending).remove(&state);
    let Some(started) = started.filter(|started| started.at.elapsed() < AUTHORIZATION_TIMEOUT)
    else {
        tracing::warn!(client = %request.client, "onboarding: a redirect with an unknown or expired state was refused");
        let mut refused = page(
            "Authorization refused",
            html! {
                p.notice.error { "This authorization was not started here, or it expired. Nothing was stored." }
                p { a href="/accounts" { "Back to the accounts" } }
            },
        );
        *refused.status_mut() = StatusCode::BAD_REQUEST;
        return refused;
    };
    let account = started.account.as_str();
    if let Some(error) = query_param(&request.query, "error") {
        let text = crate::sanitize::for_log(&error);
        tracing::warn!(
            account,
            error = text.as_str(),
            "onboarding: the provider did not authorize"
        );
        return page(
            "Not authorized",
            html! {
                p.notice.error { "The provider answered: " (text) }
                p { a href="/accounts" { "Back to the accounts" } }
            },
        );
    }
    let Some(code) = query_param(&request.query, "code") else {
        return plain(StatusCode::BAD_REQUEST, "no code\n");
    };
    let stored = match started.pending.finish(&started.provider, &code).await {
        Ok(answer) => match answer.refresh_token.clone() {
            Some(refresh) => oauth2.authorized(account, refresh, Some(&answer)).await,
            None => Err("the provider issued no refresh token".to_owned()),
        },
        Err(error) => Err(error.to_string()),
    };
    match stored {
        Ok(()) => see_other(&format!("/accounts?authorized={}", encode(account))),
        Err(error) => {
            tracing::warn!(account, %error, "onboarding: authorization failed");
            page(
                "Authorization failed",
                html! {
                    p.notice.error { (error) }
                    p { a href="/accounts" { "Back to the accounts" } }
                },
            )
        }
    }
}

/// Starts the device flow in the background, one per account: a flow started within
/// [`DEVICE_RESTART_AFTER`] and still polling is shown again, an older one is replaced (its
/// polling ends). Its page shows the code and waits.
fn start_device(oauth2: &Arc<OAuth2>, flows: &Flows, account: String) -> Reply {
    let Some((provider, config)) = oauth2.account(&account) else {
        return super::not_found();
    };
    let target = format!("/accounts/device?account={}", encode(&account));
    let (id, stopped) = {
        let mut devices = lock(&flows.devices);
        if devices.by_account.get(&account).is_some_and(|device| {
            device.stop.is_some() && device.at.elapsed() < DEVICE_RESTART_AFTER
        }) {
            return see_other(&target);
        }
        devices.make_room(&account);
        devices.start(&account)
    };
    tracing::info!(account, "onboarding: device flow started");
    let devices = flows.devices.clone();
    let oauth2 = oauth2.clone();
    tokio::spawn(async move {
        let show_devices = devices.clone();
        let show_account = account.clone();
        let polled = flows::device(&provider, config.scope.as_deref(), move |code| {
            let waiting = DeviceFlow::Waiting {
                uri: code.verification_uri.clone(),
                code: code.user_code.clone(),
            };
            lock(&show_devices).update(&show_account, id, waiting, false);
        });
        // Replaced or ended: stop polling (a token already received is still stored below).
        let result = tokio::select! {
            biased;
            result = polled => result,
            _ = stopped => return,
        };
        let outcome = match result {
            Ok(answer) => match answer.refresh_token.clone() {
                Some(refresh) => oauth2
                    .authorized(&account, refresh, Some(&answer))
                    .await
                    .map(|()| DeviceFlow::Done)
                    .unwrap_or_else(DeviceFlow::Failed),
                None => DeviceFlow::Failed("the provider issued no refresh token".to_owned()),
            },
            Err(error) => DeviceFlow::Failed(error.to_string()),
        };
        lock(&devices).update(&account, id, outcome, true);
    });
    see_other(&target)
}

impl Devices {
    /// Ends the oldest polling flow of another account when [`MAX_DEVICE_FLOWS`] would poll
    /// with `account`'s new one (its own previous flow is replaced anyway).
    fn make_room(&mut self, account: &str) {
        let others: Vec<_> = self
            .by_account
            .iter_mut()
            .filter(|(other, device)| other.as_str() != account && device.stop.is_some())
            .collect();
        if others.len() < MAX_DEVICE_FLOWS {
            return;
        }
        let oldest = others.into_iter().min_by_key(|(_, device)| device.at);
        if let Some((other, device)) = oldest {
            tracing::warn!(
                account = other.as_str(),
                "onboarding: device flow ended, {MAX_DEVICE_FLOWS} were under way"
            );
            device.stop = None;
            device.flow = DeviceFlow::Failed(format!(
                "Ended: {MAX_DEVICE_FLOWS} device flows were under way. Start it again."
            ));
        }
    }

    /// A new flow for `account`, replacing (and so stopping) its previous one; its number
    /// and the signal that ends it.
    fn start(&mut self, account: &str) -> (u64, oneshot::Receiver<()>) {
        self.started += 1;
        let (stop, stopped) = oneshot::channel();
        let device = Device {
            id: self.started,
            flow: DeviceFlow::Starting,
            at: Instant::now(),
            stop: Some(stop),
        };
        self.by_account.insert(account.to_owned(), device);
        (self.started, stopped)
    }

    /// Records flow `id`'s progress while it is live: not replaced, not ended; `finished`
    /// ends it.
    fn update(&mut self, account: &str, id: u64, flow: DeviceFlow, finished: bool) {
        let live = |device: &&mut Device| device.id == id && device.stop.is_some();
        if let Some(device) = self.by_account.get_mut(account).filter(live) {
            device.flow = flow;
            if finished {
                device.stop = None;
            }
        }
    }
}

fn device_page(request: &AdminRequest, flows: &Flows) -> Reply {
    let account = query_param(&request.query, "account").unwrap_or_default();
    let flow = lock(&flows.devices)
        .by_account
        .get(&account)
        .map(|device| device.flow.clone());
    let waiting = matches!(
        flow,
        Some(DeviceFlow::Starting | DeviceFlow::Waiting { .. })
    );
    let body = html! {
        @match flow {
            Some(DeviceFlow::Starting) => p { "Asking the provider for a code ..." },
            Some(DeviceFlow::Waiting { uri, code }) => {
                p { "To authorize " strong { (account) } ", open " a href=(uri) { (uri) } " and enter the code:" }
                p.code id="user-code" { (code) }
                p { "This page waits for the sign-in to finish." }
            }
            Some(DeviceFlow::Done) => p.notice.ok id="device-done" { "Authorized " strong { (account) } "." },
            Some(DeviceFlow::Failed(error)) => p.notice.error { (error) },
            None => p { "No device flow was started for this account." },
        }
        p { a href="/accounts" { "Back to the accounts" } }
    };
    let mut reply = page("Device code", body);
    if waiting {
        reply.headers_mut().insert(
            header::REFRESH,
            HeaderValue::from_str(&DEVICE_REFRESH_SECS.to_string()).expect("digits"),
        );
    }
    reply
}

fn page(title: &str, body: Markup) -> Reply {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "mailgate: " (title) }
                link rel="stylesheet" href="/static/onboarding.css";
            }
            body {
                header { h1 { "mailgate" } p { (title) } }
                main { (body) }
            }
        }
    };
    reply(
        StatusCode::OK,
        "text/html; charset=utf-8",
        markup.into_string(),
    )
}

fn see_other(location: &str) -> Reply {
    let mut reply = plain(StatusCode::SEE_OTHER, "see other\n");
    if let Ok(value) = HeaderValue::from_str(location) {
        reply.headers_mut().insert(header::LOCATION, value);
    }
    reply
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13 item 16: a failed random source left an empty CSRF token, which a form with an
    /// empty `csrf` field matches.
    #[test]
    fn no_flows_without_randomness() {
        let failed = Flows::with_csrf(Err("no randomness from the system".to_owned()));
        assert!(failed.is_err());
        assert!(!Flows::new().unwrap().csrf.expose().is_empty());
    }
}

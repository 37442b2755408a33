//! What a listener's sessions share, built from the configuration: the login driver with its
//! protocol and upstream, the front-end settings, client TLS, and the token and throttle state
//! behind them.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, AdminRuntime};
use crate::backends::Pool;
use crate::client_auth::throttle::Throttle;
use crate::client_tls::ClientTls;
use crate::config::{Config, ListenerConfig, TlsMode};
use crate::driver::{LoginDriver, Shared};
use crate::frontend::settings::FrontendSettings;
use crate::login::Closing;
use crate::metrics::{ListenerLabels, Metrics};
use crate::protocols;
use crate::proxy_protocol::TrustedProxies;
use crate::replicas::Redis;
use crate::token::cache::TokenCache;
use crate::token::oauth2::OAuth2;
use crate::token::sources::Sources;

use super::{Lasting, StartError};

/// One listener's fixed parts, shared by its sessions; replaced whole on reload.
pub(super) struct ListenerRuntime {
    pub(super) driver: LoginDriver,
    pub(super) settings: FrontendSettings,
    /// TLS from the first byte (implicit TLS); STARTTLS is in `settings`.
    pub(super) implicit_tls: Option<Arc<ClientTls>>,
    pub(super) trusted_proxies: TrustedProxies,
    pub(super) idle_timeout: Duration,
    pub(super) max_connections: usize,
    pub(super) max_connections_per_client: usize,
    pub(super) labels: ListenerLabels,
}

/// The admin endpoint's settings for `config`: TLS, the onboarding page and the token
/// service over the shared OAuth2 accounts and token cache, the backend operations.
pub(super) fn admin_runtime(
    config: &Config,
    shared: &Shared,
) -> Result<AdminRuntime, crate::tls::TlsError> {
    let Some(admin) = &config.admin else {
        return Ok(AdminRuntime::default());
    };
    let tls = match &admin.tls {
        Some(files) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
            &files.cert_file,
            &files.key_file,
            None,
        )?)),
        None => None,
    };
    let providers = shared
        .oauth2
        .as_ref()
        .map(|oauth2| oauth2.providers())
        .unwrap_or_default();
    Ok(AdminRuntime {
        tls,
        onboarding: admin
            .onboarding
            .as_ref()
            .map(|onboarding| admin::onboarding::Settings::new(onboarding, &providers)),
        token_service: admin
            .token_service
            .as_ref()
            .map(admin::token_service::Settings::new),
        oauth2: shared.oauth2.clone(),
        tokens: Some(shared.tokens.clone()),
        backends: admin
            .backends
            .as_ref()
            .and_then(admin::backends::Settings::new)
            .map(|settings| (settings, shared.backends.clone())),
    })
}

/// The throttle `config` sets, counting with the other replicas through `redis` if shared.
pub(super) fn throttle(
    config: &Config,
    metrics: &Arc<Metrics>,
    redis: Option<&Arc<Redis>>,
) -> Result<Arc<Throttle>, StartError> {
    let throttle = Throttle::new(&config.client_auth.throttle, metrics.clone())
        .map_err(StartError::ClientAuth)?;
    match redis {
        Some(redis) => throttle.shared_through(redis.clone()),
        None => Ok(throttle),
    }
    .map(Arc::new)
    .map_err(StartError::ClientAuth)
}

/// The token cache in front of the sources `config` names, and its OAuth2 accounts; with
/// `tokens.shared`, both backed by the replicas' Redis.
pub(super) async fn token_state(
    config: &Config,
    lasting: &Lasting,
) -> Result<(Arc<TokenCache>, Option<Arc<OAuth2>>), StartError> {
    let metrics = &lasting.metrics;
    let redis = config
        .tokens
        .shared
        .as_ref()
        .map(|shared| Redis::new(shared, metrics.clone(), Some(lasting.health.clone())))
        .transpose()
        .map_err(StartError::TokenSource)?;
    let sources = Sources::new(
        &config.tokens,
        &lasting.grants,
        metrics,
        &lasting.health,
        redis.clone(),
    )
    .await
    .map_err(StartError::TokenSource)?;
    metrics.export_sources(sources.auth_server.is_some(), sources.oauth2.is_some());
    let oauth2 = sources.oauth2.clone();
    let end_sessions = config
        .tokens
        .end_sessions_on_revoke
        .then(|| lasting.registry.clone());
    let mut tokens = TokenCache::new(
        &config.tokens.cache,
        Arc::new(sources),
        metrics.clone(),
        end_sessions,
    )
    .with_max_concurrent_fetches(config.tokens.max_concurrent_fetches);
    if let (Some(redis), Some(shared)) = (&redis, &config.tokens.shared) {
        let key = shared.key.as_ref().ok_or_else(|| {
            StartError::TokenSource("tokens.shared has no key to seal with".to_owned())
        })?;
        tokens = tokens
            .shared_through(redis.clone(), key)
            .map_err(StartError::TokenSource)?;
    }
    let tokens = Arc::new(tokens);
    if let Some(redis) = &redis {
        tokens.follow_the_news(redis);
    }
    Ok((tokens, oauth2))
}

pub(super) fn listener_runtime(
    listener: &ListenerConfig,
    shared: &Shared,
    config: &Config,
) -> Result<ListenerRuntime, StartError> {
    let protocol = protocols::named(listener.protocol);
    let pool = Pool::new(
        &listener.name,
        protocol,
        &listener.upstream,
        &config.hostname,
        &shared.backends,
        &shared.metrics,
    )
    .map_err(|error| StartError::Upstream {
        name: listener.name.clone(),
        reason: error.to_string(),
    })?;
    shared.metrics.export_listener(&listener.name);
    let client_tls = client_tls(listener, &shared.metrics)?;
    let (implicit_tls, starttls) = match listener.tls.as_ref().map(|tls| tls.mode) {
        Some(TlsMode::Implicit) => (client_tls, None),
        Some(TlsMode::Starttls) => (None, client_tls),
        Some(TlsMode::None) | None => (None, None),
    };
    let trusted_proxies = TrustedProxies::new(&listener.accept_proxy);
    if !listener.accept_proxy.is_empty() {
        for result in crate::proxy_protocol::RESULTS {
            shared.metrics.proxy_header(&listener.name, result, 0);
        }
    }
    Ok(ListenerRuntime {
        driver: LoginDriver::new(
            listener.name.clone(),
            protocol,
            pool,
            listener.login_timeout,
            shared,
            config.hostname.clone(),
        ),
        settings: FrontendSettings {
            hostname: config.hostname.clone(),
            pre_auth_timeout: listener.pre_auth_timeout,
            pre_auth_lifetime: listener.pre_auth_lifetime,
            client: None,
            starttls,
            max_line_length: listener.max_line_length,
            max_literal_size: listener.max_literal_size,
            local: None,
        },
        implicit_tls,
        trusted_proxies,
        idle_timeout: listener.idle_timeout,
        max_connections: listener.max_connections,
        max_connections_per_client: listener.max_connections_per_client(),
        labels: ListenerLabels {
            listener: listener.name.clone(),
        },
    })
}

/// The listener's TLS towards clients, with the certificate as its files hold it now (a
/// reload builds a new one: new handshakes get the new certificate, open sessions keep theirs).
fn client_tls(
    listener: &ListenerConfig,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<ClientTls>>, StartError> {
    let Some(tls) = &listener.tls else {
        return Ok(None);
    };
    let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    if tls.mode == TlsMode::None {
        return Ok(None);
    }
    let alpn = protocols::named(listener.protocol).alpn_id();
    let config = crate::tls::server_config(cert_file, key_file, Some(alpn)).map_err(|error| {
        StartError::ClientTls {
            name: listener.name.clone(),
            reason: error.to_string(),
        }
    })?;
    Ok(Some(Arc::new(ClientTls::new(
        config,
        tls.require,
        &listener.name,
        metrics.clone(),
    ))))
}

impl ListenerRuntime {
    /// The protocol's untagged goodbye (IMAP `* BYE`, SMTP `421`) for a session mailgate ends
    /// outside its dialogue.
    pub(super) fn goodbye(&self, why: Closing) -> Vec<u8> {
        self.driver.protocol.goodbye(why, &self.settings.hostname)
    }
}

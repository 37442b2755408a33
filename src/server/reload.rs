//! Applying a configuration, at start and on reload: SIGHUP, or a change to the file or to a
//! file it reads. A configuration that is invalid or cannot be applied changes nothing.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::admin::{self};
use crate::client_auth::ClientAuth;
use crate::client_auth::throttle::Throttle;
use crate::config::Config;
use crate::driver::Shared;
use crate::token::cache::TokenCache;

use super::accept::bind;
use super::runtime::{admin_runtime, listener_runtime, throttle, token_state};
use super::{RunningAdmin, Server, StartError};

/// What `check` would warn about in the running configuration (expiring certificates, ...).
pub(super) fn log_warnings(config: &Config) {
    for warning in config.warnings(crate::config::Files::Read, std::time::SystemTime::now()) {
        tracing::warn!(key = warning.key, "{}", warning.reason);
    }
}

/// What the files a configuration reads held when it was applied: a hash of each file's
/// content (`None`: unreadable). Reading through the path follows symlinks, so Kubernetes'
/// swap of a Secret volume's `..data` link shows as a change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Fingerprints(Vec<(PathBuf, Option<u64>)>);

impl Fingerprints {
    pub(super) async fn of(paths: Vec<PathBuf>) -> Self {
        let mut all = Vec::with_capacity(paths.len());
        for path in paths {
            let content = tokio::fs::read(&path).await.ok().map(|bytes| {
                use std::hash::BuildHasher as _;
                // A fixed-key hash: only compared within this process.
                std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default(
                )
                .hash_one(&bytes)
            });
            all.push((path, content));
        }
        Self(all)
    }
}

impl Server {
    /// Re-reads the configuration (SIGHUP); an invalid or unbindable one changes nothing.
    pub(super) async fn reload(&mut self) {
        let Some(file) = &self.file else {
            return;
        };
        match tokio::fs::read_to_string(&file.path).await {
            Ok(text) => self.reload_from(text, false).await,
            Err(error) => {
                tracing::error!(%error, "cannot read the configuration; keeping the running one");
                self.lasting.metrics.config_reload("invalid");
            }
        }
    }

    /// Reloads when the configuration file or a file it reads has changed.
    pub(super) async fn watch(&mut self) {
        let Some(file) = &self.file else {
            return;
        };
        let Ok(text) = tokio::fs::read_to_string(&file.path).await else {
            return;
        };
        let files_changed =
            Fingerprints::of(self.config.referenced_files()).await != self.fingerprints;
        if files_changed || text != file.text {
            if files_changed {
                tracing::info!("a file the configuration reads has changed; reloading");
            }
            self.reload_from(text, files_changed).await;
        }
    }

    /// Applies the configuration file's new `text`; with `files_changed` even when the text
    /// is the same (the secrets, keys or CA files it names changed).
    async fn reload_from(&mut self, text: String, files_changed: bool) {
        let Some(file) = &self.file else {
            return;
        };
        let result = match Config::from_text(&file.path, &text) {
            Err(error) => {
                for line in error.to_string().lines() {
                    tracing::error!(
                        problem = line,
                        "configuration refused; keeping the running one"
                    );
                }
                "invalid"
            }
            Ok(config) if config == self.config && !files_changed => "unchanged",
            Ok(config) => match self.apply(config).await {
                Ok(()) => {
                    tracing::info!("configuration reloaded");
                    log_warnings(&self.config);
                    // New credentials for the token source show in readiness at once.
                    self.check_health();
                    "ok"
                }
                Err(error) => {
                    tracing::error!(%error, "configuration not applied; keeping the running one");
                    "failed"
                }
            },
        };
        if let Some(file) = &mut self.file {
            file.text = text;
        }
        // Noted whatever the outcome: a broken file is reported once, not on every tick.
        self.fingerprints = Fingerprints::of(self.config.referenced_files()).await;
        self.lasting.metrics.config_reload(result);
    }

    /// Makes `config` the running configuration: binds what is new first (all or nothing),
    /// then swaps listener runtimes and closes removed listeners. Open sessions keep theirs.
    pub(super) async fn apply(&mut self, config: Config) -> Result<(), StartError> {
        let (tokens, oauth2) = if config.tokens == self.config.tokens {
            (self.shared.tokens.clone(), self.shared.oauth2.clone())
        } else {
            token_state(&config, &self.lasting).await?
        };
        let shared = Shared {
            oauth2,
            client_auth: self.client_auth_for(&config)?,
            throttle: self.throttle_for(&config, &tokens)?,
            tokens,
            metrics: self.lasting.metrics.clone(),
            backends: self.lasting.backends.clone(),
        };
        let mut prepared = Vec::new();
        for listener in &config.listeners {
            let runtime = Arc::new(listener_runtime(listener, &shared, &config)?);
            let tcp = if self.listeners.contains_key(&listener.listen) {
                None
            } else {
                Some(bind(listener).await?)
            };
            prepared.push((listener.listen, runtime, tcp));
        }
        let admin = self.prepare_admin(&config).await?;
        // Routing shares the tokens' Redis: the backends follow it when it changes.
        self.lasting.backends.shared_through(shared.tokens.redis());

        let mut running = std::mem::take(&mut self.listeners);
        for (address, runtime, tcp) in prepared {
            let entry = match (tcp, running.remove(&address)) {
                (Some(tcp), _) => self.spawn_listener(tcp, runtime),
                (None, Some(existing)) => {
                    *existing.runtime.write().unwrap_or_else(|e| e.into_inner()) = runtime;
                    existing
                }
                (None, None) => continue,
            };
            self.listeners.insert(address, entry);
        }
        for address in running.keys() {
            tracing::info!(%address, "listener closed");
        }
        if config.admin.is_none() {
            self.admin = None;
        } else if let Some(admin) = admin {
            self.admin = Some(admin);
        }
        if let Some(apply_level) = &self.log_level
            && config.log.level != self.config.log.level
        {
            apply_level(&config.log.level);
        }
        self.lasting
            .admin
            .update(admin_runtime(&config, &shared).map_err(StartError::AdminTls)?);
        if !Arc::ptr_eq(&self.shared.tokens, &shared.tokens) {
            self.shared.tokens.retire();
        }
        self.shared = shared;
        self.config = config;
        Ok(())
    }

    /// Keeps the password checks (and their workers' memory) unless their settings changed.
    fn client_auth_for(&self, config: &Config) -> Result<Arc<ClientAuth>, StartError> {
        if config.client_auth == self.config.client_auth {
            return Ok(self.shared.client_auth.clone());
        }
        ClientAuth::new(&config.client_auth, self.lasting.metrics.clone())
            .map(Arc::new)
            .map_err(StartError::ClientAuth)
    }

    /// Keeps the failure counts across a reload unless their rules, or where replicas share
    /// them, changed.
    fn throttle_for(
        &self,
        config: &Config,
        tokens: &TokenCache,
    ) -> Result<Arc<Throttle>, StartError> {
        if config.client_auth.throttle == self.config.client_auth.throttle
            && config.tokens.shared == self.config.tokens.shared
        {
            return Ok(self.shared.throttle.clone());
        }
        throttle(config, &self.lasting.metrics, tokens.redis())
    }

    /// Binds the admin endpoint if it is new or moved; `None` means keep the current one.
    async fn prepare_admin(&self, config: &Config) -> Result<Option<RunningAdmin>, StartError> {
        let Some(admin_config) = &config.admin else {
            return Ok(None);
        };
        if self.admin.as_ref().map(|a| a.address) == Some(admin_config.listen) {
            return Ok(None);
        }
        let address = admin_config.listen;
        let tcp = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::BindAdmin { address, source })?;
        tracing::info!(%address, "admin endpoint listening (/metrics, /healthz, /readyz)");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(admin::serve(tcp, self.lasting.admin.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Some(RunningAdmin {
            address,
            _stop: stop,
        }))
    }
}

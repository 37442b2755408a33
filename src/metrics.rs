//! Prometheus metrics: one registry, typed label sets, bounded label values only
//! (listener names, fixed result words; never account names).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::ForwardClient;
use crate::forward::Forwarded;
use crate::login::LoginError;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerResultLabels {
    pub listener: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub listener: String,
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenRequestLabels {
    pub source: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResultLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LockLabels {
    pub lock: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// `host:port` of a configured upstream: bounded by the configuration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

/// A server of a listener's pool: bounded by the configuration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub listener: String,
    pub server: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendResultLabels {
    pub listener: String,
    pub server: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    pub upstream: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s: loopback peers answer in milliseconds, remote IdPs and upstreams in hundreds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn duration_histogram() -> Histogram {
    // 1 s .. ~18 h: sessions range from a single send to an IMAP IDLE held all day.
    Histogram::new(exponential_buckets(1.0, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ListenerLabels, Counter>,
    pub connections_active: Family<ListenerLabels, Gauge>,
    pub connections_rejected: Family<ListenerLabels, Counter>,
    pub connections_evicted: Family<ListenerLabels, Counter>,
    pub logins: Family<ListenerResultLabels, Counter>,
    pub token_requests: Family<TokenRequestLabels, Counter>,
    pub token_cache: Family<ResultLabels, Counter>,
    pub token_cache_evictions: Family<CauseLabels, Counter>,
    pub token_cache_entries: Gauge,
    pub token_fetch_seconds: Family<SourceLabels, Histogram>,
    pub upstream_connect_seconds: Family<UpstreamLabels, Histogram>,
    pub upstream_auth_seconds: Family<UpstreamLabels, Histogram>,
    pub tls_handshake_failures: Family<UpstreamLabels, Counter>,
    pub forward_client: Family<ForwardLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub session_duration_seconds: Family<ListenerLabels, Histogram>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub failed_login_delay_seconds: Histogram,
    pub password_checks: Family<ResultLabels, Counter>,
    pub login_blocks: Family<ScopeLabels, Counter>,
    pub oauth2_accounts: Family<StateLabels, Gauge>,
    pub token_refreshes_ahead: Family<ResultLabels, Counter>,
    pub token_store_write_failures: Counter,
    pub token_store_unsaved_accounts: Gauge,
    pub reauthorizations_needed: Counter,
    pub sessions_revoked: Counter,
    pub token_service_requests: Family<ResultLabels, Counter>,
    pub admin_connections_limited: Family<ReasonLabels, Counter>,
    pub client_tls_handshakes: Family<ListenerResultLabels, Counter>,
    pub proxy_headers: Family<ListenerResultLabels, Counter>,
    pub redis_calls: Family<OpResultLabels, Counter>,
    pub redis_call_seconds: Family<OpLabels, Histogram>,
    pub redis_up: Gauge,
    pub redis_locks_stolen: Counter,
    pub shared_tokens: Family<ResultLabels, Counter>,
    pub lock_wait_seconds: Family<LockLabels, Histogram>,
    pub backend_sessions: Family<BackendLabels, Gauge>,
    pub backend_logins: Family<BackendResultLabels, Counter>,
    pub backend_up: Family<BackendLabels, Gauge>,
    pub backend_check_seconds: Family<BackendLabels, Histogram>,
    pub backend_rerouted_logins: Family<BackendLabels, Counter>,
    pub backend_draining: Family<ServerLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::with_prefix("mailgate"),
            connections: Family::default(),
            connections_active: Family::default(),
            connections_rejected: Family::default(),
            connections_evicted: Family::default(),
            logins: Family::default(),
            token_requests: Family::default(),
            token_cache: Family::default(),
            token_cache_evictions: Family::default(),
            token_cache_entries: Gauge::default(),
            token_fetch_seconds: Family::new_with_constructor(latency_histogram),
            upstream_connect_seconds: Family::new_with_constructor(latency_histogram),
            upstream_auth_seconds: Family::new_with_constructor(latency_histogram),
            tls_handshake_failures: Family::default(),
            forward_client: Family::default(),
            bytes: Family::default(),
            session_duration_seconds: Family::new_with_constructor(duration_histogram),
            config_reloads: Family::default(),
            failed_login_delay_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 8)),
            password_checks: Family::default(),
            login_blocks: Family::default(),
            oauth2_accounts: Family::default(),
            token_refreshes_ahead: Family::default(),
            token_store_write_failures: Counter::default(),
            token_store_unsaved_accounts: Gauge::default(),
            reauthorizations_needed: Counter::default(),
            sessions_revoked: Counter::default(),
            token_service_requests: Family::default(),
            admin_connections_limited: Family::default(),
            client_tls_handshakes: Family::default(),
            proxy_headers: Family::default(),
            redis_calls: Family::default(),
            // 50 µs .. ~0.8 s: Redis answers in well under a millisecond when healthy.
            redis_call_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00005, 2.0, 15))
            }),
            redis_up: Gauge::default(),
            redis_locks_stolen: Counter::default(),
            shared_tokens: Family::default(),
            lock_wait_seconds: Family::new_with_constructor(latency_histogram),
            backend_sessions: Family::default(),
            backend_logins: Family::default(),
            backend_up: Family::default(),
            backend_check_seconds: Family::new_with_constructor(latency_histogram),
            backend_rerouted_logins: Family::default(),
            backend_draining: Family::default(),
        };
        let metrics = metrics.register_all();
        metrics.export_fixed_series();
        metrics
    }

    /// Prometheus' advice: series whose labels are known up front are exported at 0 from the
    /// start, so that `increase()` and `rate()` see the first event. These are the ones
    /// whose labels do not depend on the configuration.
    fn export_fixed_series(&self) {
        for result in ["ok", "unchanged", "invalid", "failed"] {
            let _ = self.config_reloads.get_or_create(&ResultLabels { result });
        }
        for result in ["hit", "miss"] {
            let _ = self.token_cache.get_or_create(&ResultLabels { result });
        }
        for cause in ["expired", "explicit", "replaced", "size"] {
            let _ = self
                .token_cache_evictions
                .get_or_create(&CauseLabels { cause });
        }
        for result in ["ok", "refused", "error"] {
            let _ = self
                .token_refreshes_ahead
                .get_or_create(&ResultLabels { result });
        }
        for scope in ["address", "network", "account"] {
            let _ = self.login_blocks.get_or_create(&ScopeLabels { scope });
        }
    }

    /// Exports a listener's series at 0 (see [`Metrics::export_fixed_series`]).
    pub fn export_listener(&self, listener: &str) {
        let labels = ListenerLabels {
            listener: listener.to_owned(),
        };
        let _ = self.connections.get_or_create(&labels);
        let _ = self.connections_active.get_or_create(&labels);
        let _ = self.connections_rejected.get_or_create(&labels);
        let _ = self.connections_evicted.get_or_create(&labels);
        let _ = self.session_duration_seconds.get_or_create(&labels);
        for result in std::iter::once("ok").chain(LoginError::ALL.iter().map(|e| e.label())) {
            let _ = self.logins.get_or_create(&ListenerResultLabels {
                listener: listener.to_owned(),
                result,
            });
        }
        for direction in ["client_to_upstream", "upstream_to_client"] {
            let _ = self.bytes_counter(listener, direction);
        }
    }

    /// Exports the forwarding series of an upstream at 0 (see [`Metrics::export_fixed_series`]).
    pub fn export_forwarding(&self, upstream: &UpstreamLabels, mode: ForwardClient) {
        for &outcome in Forwarded::possible(mode) {
            let _ = self
                .forward_client
                .get_or_create(&forward_labels(upstream, outcome));
        }
    }

    pub fn forwarded(&self, upstream: &UpstreamLabels, outcome: Forwarded) {
        self.forward_client
            .get_or_create(&forward_labels(upstream, outcome))
            .inc();
    }

    /// Exports the series of the configured token sources at 0.
    pub fn export_sources(&self, auth_server: bool, oauth2: bool) {
        let sources: [(bool, &'static str, &[&'static str]); 2] = [
            (auth_server, "auth_server", &["ok", "refused", "error"]),
            (
                oauth2,
                "oauth2",
                &["ok", "invalid_grant", "refused", "error"],
            ),
        ];
        for (configured, source, results) in sources {
            if configured {
                for &result in results {
                    let _ = self
                        .token_requests
                        .get_or_create(&TokenRequestLabels { source, result });
                }
                let _ = self
                    .token_fetch_seconds
                    .get_or_create(&SourceLabels { source });
            }
        }
    }

    /// Exports one series of the configured password checks at 0.
    pub fn export_password_check(&self, result: &'static str) {
        let _ = self.password_checks.get_or_create(&ResultLabels { result });
    }

    fn register_all(mut self) -> Self {
        let registry = &mut self.registry;
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Version of this build (always 1)", build_info);
        registry.register(
            "connections",
            "Client connections accepted",
            self.connections.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now",
            self.connections_active.clone(),
        );
        registry.register(
            "connections_rejected",
            "Client connections refused because the listener was at max_connections",
            self.connections_rejected.clone(),
        );
        registry.register(
            "connections_evicted",
            "Client connections closed before login to admit a new one when the listener was at max_connections",
            self.connections_evicted.clone(),
        );
        registry.register("logins", "Client logins by result", self.logins.clone());
        registry.register(
            "token_requests",
            "Requests sent to token sources, by source and result",
            self.token_requests.clone(),
        );
        registry.register(
            "token_cache",
            "Token cache look-ups by result",
            self.token_cache.clone(),
        );
        registry.register(
            "token_cache_evictions",
            "Tokens dropped from the cache, by cause (expired, size, explicit, replaced)",
            self.token_cache_evictions.clone(),
        );
        registry.register(
            "token_cache_entries",
            "Tokens in the cache",
            self.token_cache_entries.clone(),
        );
        registry.register(
            "token_fetch_seconds",
            "Time to get a token from its source",
            self.token_fetch_seconds.clone(),
        );
        registry.register(
            "upstream_connect_seconds",
            "Time to connect to the upstream, TLS handshake included",
            self.upstream_connect_seconds.clone(),
        );
        registry.register(
            "upstream_auth_seconds",
            "Time from starting an upstream connection to its authentication result",
            self.upstream_auth_seconds.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes with upstreams",
            self.tls_handshake_failures.clone(),
        );
        registry.register(
            "forward_client",
            "Client addresses told to upstreams (forward_client), by result (sent, not_offered, refused)",
            self.forward_client.clone(),
        );
        registry.register(
            "bytes",
            "Bytes spliced after authentication, by direction",
            self.bytes.clone(),
        );
        registry.register(
            "session_duration_seconds",
            "Lifetime of client sessions that logged in",
            self.session_duration_seconds.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            self.config_reloads.clone(),
        );
        registry.register(
            "failed_login_delay_seconds",
            "How long logins waited before their password check for recent failures of their address or account",
            self.failed_login_delay_seconds.clone(),
        );
        registry.register(
            "password_checks",
            "Client password checks by result (ok, remembered, wrong_password, unknown_account, unavailable, overloaded)",
            self.password_checks.clone(),
        );
        registry.register(
            "oauth2_accounts",
            "OAuth2 accounts by state (ok, not_yet_tried, never_authorized, needs_reauthorization, store_error, misconfigured, failing)",
            self.oauth2_accounts.clone(),
        );
        registry.register(
            "token_refreshes_ahead",
            "Tokens renewed in the background before they expire, by result",
            self.token_refreshes_ahead.clone(),
        );
        registry.register(
            "token_store_write_failures",
            "Failed writes of the refresh-token store (the token is kept in memory and retried)",
            self.token_store_write_failures.clone(),
        );
        registry.register(
            "token_store_unsaved_accounts",
            "Accounts whose current refresh token the store has not taken yet (retried with backoff and at shutdown)",
            self.token_store_unsaved_accounts.clone(),
        );
        registry.register(
            "reauthorizations_needed",
            "Refresh tokens refused by their provider (invalid_grant)",
            self.reauthorizations_needed.clone(),
        );
        registry.register(
            "sessions_revoked",
            "Open sessions ended because their account was refused for good",
            self.sessions_revoked.clone(),
        );
        registry.register(
            "token_service_requests",
            "Requests to this mailgate's token service, by result (ok, refused, forbidden, unauthorized, error)",
            self.token_service_requests.clone(),
        );
        registry.register(
            "admin_connections_limited",
            "Admin endpoint connections hit by a limit, by reason (per_address, full: closed; probes_only: only /healthz, /readyz and /metrics served)",
            self.admin_connections_limited.clone(),
        );
        registry.register(
            "client_tls_handshakes",
            "TLS handshakes with clients, by result (ok, timeout, closed, not_tls, incompatible, certificate_refused, wrong_alpn, error)",
            self.client_tls_handshakes.clone(),
        );
        registry.register(
            "proxy_headers",
            "PROXY protocol headers from load balancers, by result (ok, local, invalid, timeout)",
            self.proxy_headers.clone(),
        );
        registry.register(
            "redis_calls",
            "Calls to the shared Redis (tokens.shared.redis), by operation and result (ok, refused, timeout, unreachable)",
            self.redis_calls.clone(),
        );
        registry.register(
            "redis_call_seconds",
            "Time of calls to the shared Redis, by operation",
            self.redis_call_seconds.clone(),
        );
        registry.register(
            "redis_up",
            "Whether the shared Redis answered the last call (1) or not (0)",
            self.redis_up.clone(),
        );
        registry.register(
            "redis_locks_stolen",
            "Locks whose lease ran out while held, so another replica took them (a stalled holder)",
            self.redis_locks_stolen.clone(),
        );
        registry.register(
            "lock_wait_seconds",
            "Time waited for a lock another holder had: lock=token_store_lease (an account's refresh, any process) or shared_token_flight (another replica fetching the same token)",
            self.lock_wait_seconds.clone(),
        );
        registry.register(
            "backend_sessions",
            "Sessions open (and logins under way) on each server of a listener's pool",
            self.backend_sessions.clone(),
        );
        registry.register(
            "backend_logins",
            "Logins routed to each server of a listener's pool, by result (ok or the failure label of mailgate_logins_total)",
            self.backend_logins.clone(),
        );
        registry.register(
            "backend_up",
            "Whether each server of a pool takes logins by its health checks (1) or not (0)",
            self.backend_up.clone(),
        );
        registry.register(
            "backend_check_seconds",
            "Time taken by a server's health check (connect, TLS, greeting, capabilities)",
            self.backend_check_seconds.clone(),
        );
        registry.register(
            "backend_rerouted_logins",
            "Logins that went elsewhere than their server's by rendezvous hashing (down or drained), by that server: users moved",
            self.backend_rerouted_logins.clone(),
        );
        registry.register(
            "backend_draining",
            "Whether a server is drained by the operator (1): no new logins",
            self.backend_draining.clone(),
        );
        registry.register(
            "shared_tokens",
            "Access tokens sought in Redis on a local cache miss, by result (hit, fetched, wait_timeout)",
            self.shared_tokens.clone(),
        );
        registry.register(
            "login_blocks",
            "Client addresses or accounts blocked after too many failed logins, by scope",
            self.login_blocks.clone(),
        );
        self
    }

    /// Counts a login on a server of a pool.
    pub fn backend_login(&self, listener: &str, server: &str, result: &'static str) {
        self.backend_logins
            .get_or_create(&BackendResultLabels {
                listener: listener.to_owned(),
                server: server.to_owned(),
                result,
            })
            .inc();
    }

    /// Marks `server` drained or not.
    pub fn backend_draining(&self, server: &str, draining: bool) {
        self.backend_draining
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .set(i64::from(draining));
    }

    pub fn login(&self, listener: &str, result: &'static str) {
        self.logins
            .get_or_create(&ListenerResultLabels {
                listener: listener.to_owned(),
                result,
            })
            .inc();
    }

    /// Counts `count` handshakes (0 exports the series).
    pub fn client_tls_handshake(&self, listener: &str, result: &'static str, count: u64) {
        self.client_tls_handshakes
            .get_or_create(&ListenerResultLabels {
                listener: listener.to_owned(),
                result,
            })
            .inc_by(count);
    }

    /// Counts `count` PROXY headers (0 exports the series).
    pub fn proxy_header(&self, listener: &str, result: &'static str, count: u64) {
        self.proxy_headers
            .get_or_create(&ListenerResultLabels {
                listener: listener.to_owned(),
                result,
            })
            .inc_by(count);
    }

    pub fn token_request(&self, source: &'static str, result: &'static str) {
        self.token_requests
            .get_or_create(&TokenRequestLabels { source, result })
            .inc();
    }

    pub fn token_fetch(&self, source: &'static str, seconds: f64) {
        self.token_fetch_seconds
            .get_or_create(&SourceLabels { source })
            .observe(seconds);
    }

    pub fn failure_delay(&self, delay: std::time::Duration) {
        self.failed_login_delay_seconds.observe(delay.as_secs_f64());
    }

    pub fn password_check(&self, result: &'static str) {
        self.password_checks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn oauth2_accounts(&self, state: &'static str, count: i64) {
        self.oauth2_accounts
            .get_or_create(&StateLabels { state })
            .set(count);
    }

    pub fn refresh_ahead(&self, result: &'static str) {
        self.token_refreshes_ahead
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn store_write_failure(&self) {
        self.token_store_write_failures.inc();
    }

    pub fn token_store_unsaved(&self, accounts: i64) {
        self.token_store_unsaved_accounts.set(accounts);
    }

    pub fn redis_call(&self, op: &'static str, result: &'static str, seconds: f64) {
        self.redis_calls
            .get_or_create(&OpResultLabels { op, result })
            .inc();
        self.redis_call_seconds
            .get_or_create(&OpLabels { op })
            .observe(seconds);
    }

    pub fn lock_waited(&self, lock: &'static str, seconds: f64) {
        self.lock_wait_seconds
            .get_or_create(&LockLabels { lock })
            .observe(seconds);
    }

    pub fn redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    pub fn redis_lock_stolen(&self) {
        self.redis_locks_stolen.inc();
    }

    /// `hit` (another replica's token), `fetched` (this replica fetched for all),
    /// `wait_timeout`.
    pub fn shared_token(&self, result: &'static str) {
        self.shared_tokens
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn reauthorization_needed(&self) {
        self.reauthorizations_needed.inc();
    }

    pub fn token_service(&self, result: &'static str) {
        self.token_service_requests
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts `count` connections (0 exports the series).
    pub fn admin_connection_limited(&self, reason: &'static str, count: u64) {
        self.admin_connections_limited
            .get_or_create(&ReasonLabels { reason })
            .inc_by(count);
    }

    pub fn login_block(&self, scope: &'static str) {
        self.login_blocks
            .get_or_create(&ScopeLabels { scope })
            .inc();
    }

    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn token_cache(&self, result: &'static str) {
        self.token_cache
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The counter for one listener and direction, to hold for a session's lifetime.
    pub fn bytes_counter(&self, listener: &str, direction: &'static str) -> Counter {
        self.bytes
            .get_or_create(&BytesLabels {
                listener: listener.to_owned(),
                direction,
            })
            .clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

fn forward_labels(upstream: &UpstreamLabels, outcome: Forwarded) -> ForwardLabels {
    ForwardLabels {
        upstream: upstream.upstream.clone(),
        result: outcome.label(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_documented_ones() {
        let metrics = Metrics::new();
        metrics.login("imap", "ok");
        metrics.token_request("auth_server", "ok");
        metrics.token_fetch("auth_server", 0.01);
        metrics.token_cache("hit");
        let upstream = UpstreamLabels {
            upstream: "mx:25".into(),
        };
        metrics.export_forwarding(&upstream, ForwardClient::Xclient);
        metrics.forwarded(&upstream, Forwarded::Sent);
        metrics
            .bytes_counter("imap", "client_to_upstream")
            .inc_by(5);
        metrics
            .connections
            .get_or_create(&ListenerLabels {
                listener: "imap".into(),
            })
            .inc();
        let text = metrics.encode();
        for expected in [
            "mailgate_logins_total{listener=\"imap\",result=\"ok\"} 1",
            "mailgate_token_requests_total{source=\"auth_server\",result=\"ok\"} 1",
            "mailgate_token_cache_total{result=\"hit\"} 1",
            "mailgate_bytes_total{listener=\"imap\",direction=\"client_to_upstream\"} 5",
            "mailgate_connections_total{listener=\"imap\"} 1",
            "mailgate_forward_client_total{upstream=\"mx:25\",result=\"sent\"} 1",
            "mailgate_forward_client_total{upstream=\"mx:25\",result=\"not_offered\"} 0",
            "mailgate_token_fetch_seconds_bucket",
            "mailgate_build_info{version=",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
    }
}

//! Prometheus metrics: one registry, typed label sets, bounded label values only
//! (listener names, fixed result words; never account names).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
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

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ListenerLabels, Counter>,
    pub connections_active: Family<ListenerLabels, Gauge>,
    pub logins: Family<LoginLabels, Counter>,
    pub token_requests: Family<TokenRequestLabels, Counter>,
    pub token_cache: Family<ResultLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub token_fetch_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mailgate");
        let connections = Family::default();
        let connections_active = Family::default();
        let logins = Family::default();
        let token_requests = Family::default();
        let token_cache = Family::default();
        let bytes = Family::default();
        // 1 ms .. ~16 s: loopback auth servers answer in milliseconds, remote IdPs in hundreds.
        let token_fetch_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "connections",
            "Client connections accepted",
            connections.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now",
            connections_active.clone(),
        );
        registry.register("logins", "Client logins by result", logins.clone());
        registry.register(
            "token_requests",
            "Requests sent to token sources, by source and result",
            token_requests.clone(),
        );
        registry.register(
            "token_cache",
            "Token cache look-ups by result",
            token_cache.clone(),
        );
        registry.register(
            "bytes",
            "Bytes spliced after authentication, by direction",
            bytes.clone(),
        );
        registry.register(
            "token_fetch_seconds",
            "Time to get a token from its source",
            token_fetch_seconds.clone(),
        );
        Self {
            registry,
            connections,
            connections_active,
            logins,
            token_requests,
            token_cache,
            bytes,
            token_fetch_seconds,
        }
    }

    pub fn login(&self, listener: &str, result: &'static str) {
        self.logins
            .get_or_create(&LoginLabels {
                listener: listener.to_owned(),
                result,
            })
            .inc();
    }

    pub fn token_request(&self, source: &'static str, result: &'static str) {
        self.token_requests
            .get_or_create(&TokenRequestLabels { source, result })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_documented_ones() {
        let metrics = Metrics::new();
        metrics.login("imap", "ok");
        metrics.token_request("auth_server", "ok");
        metrics.token_cache("hit");
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
            "mailgate_token_fetch_seconds_bucket",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
    }
}

//! mailgate: an IMAP/SMTP proxy that takes plain client logins and authenticates upstream
//! with OAuth2 bearer tokens (SASL XOAUTH2 / OAUTHBEARER).
//!
//! # Layout
//! - [`config`]: YAML configuration, defaults, validation.
//! - [`server`]: listeners, accept loop, one task per connection.
//! - [`imap`], [`smtp`]: protocol front ends (client side before auth) and backends (upstream login).
//! - [`proxy`]: the protocol-independent login driver and the [`proxy::Authenticator`] trait.
//! - [`token`]: token sources (authentication server) and the token cache.
//! - [`upstream`], [`tls`]: connecting to upstreams.
//! - [`splice`]: copying bytes both ways after authentication.
//! - [`sasl`]: SASL encoding and decoding as pure functions.
//! - [`metrics`], [`admin`]: Prometheus metrics and the HTTP admin endpoints.
#![forbid(unsafe_code)]

pub mod admin;
pub mod client_auth;
pub mod config;
pub mod health;
pub mod imap;
pub mod io;
pub mod metrics;
pub mod proxy;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod smtp;
pub mod splice;
pub mod tls;
pub mod token;
pub mod upstream;

//! mailgate: an IMAP/SMTP proxy that takes plain client logins and authenticates upstream
//! with OAuth2 bearer tokens (SASL XOAUTH2 / OAUTHBEARER).
//!
//! # Layout
//! - [`config`]: YAML configuration, defaults, validation.
//! - [`commands`]: `authorize`, `accounts`, `test-login` for people.
//! - [`server`]: listeners, accept loop, one task per connection.
//! - [`client_tls`], [`proxy_protocol`]: what comes before a front end: TLS towards clients,
//!   the PROXY header of a load balancer.
//! - [`frontend`]: the seam a protocol plugs into ([`frontend::MailProtocol`],
//!   [`frontend::Dialogue`]), the one session loop before login, the framers, and the
//!   settings a front end works with (names, limits, the STARTTLS offer).
//! - [`imap`], [`smtp`]: the protocols, each a dialogue (client side before auth), a backend
//!   (upstream login), a reply table and a response boundary; [`protocols`] chooses one by name.
//! - [`login`]: the vocabulary of a login (credentials, upstream auth, errors, the
//!   [`login::Authenticator`] trait the session loop calls).
//! - [`driver`]: the login driver, the same for every protocol.
//! - [`client_auth`]: checking client passwords (argon2 in a bounded pool, or delegated to an
//!   auth server or an OAuth2 password grant, bounded too); brute-force defence.
//! - [`limits`]: what a client may get wrong before authentication.
//! - [`sanitize`]: foreign text made safe for logs and the wire.
//! - [`token`]: token sources (authentication server, OAuth2 accounts) and the token cache.
//! - [`jwt`], [`http`]: signed assertions; HTTP towards token sources, password checks and
//!   providers.
//! - [`sessions`]: logged-in sessions by account, to end them when an account is revoked.
//! - [`upstream`], [`tls`]: connecting to upstreams.
//! - [`x509`]: a certificate's expiry and public key.
//! - [`forward`]: telling upstreams the client's address (PROXY v2 header, outcomes).
//! - [`splice`]: copying bytes both ways after authentication.
//! - [`sasl`]: SASL encoding and decoding as pure functions.
//! - [`metrics`], [`admin`]: Prometheus metrics and the HTTP admin endpoints.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backends;
pub mod client_auth;
pub mod client_tls;
pub mod commands;
pub mod config;
pub mod driver;
pub mod forward;
pub mod frontend;
pub mod health;
pub mod http;
pub mod imap;
pub mod io;
pub mod jwt;
pub mod limits;
pub mod login;
pub mod managesieve;
pub mod metrics;
pub mod pop3;
pub mod protocols;
pub mod proxy_protocol;
pub mod replicas;
pub mod sanitize;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod sessions;
pub mod smtp;
pub mod splice;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod x509;

//! The settings a front end works with before authentication: names, limits and deadlines,
//! and whether STARTTLS is offered.
//!
//! Kept apart from [`crate::login`], which everything depends on, because they name the
//! client TLS configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::client_tls::ClientTls;
use crate::frontend::framer::ClientLimits;

/// Names and limits a front end works with before authentication.
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// Shown in greetings.
    pub hostname: String,
    /// How long the client may stay silent, and how long one reply may take to be read.
    pub pre_auth_timeout: Duration,
    /// How long a session may take from connect to a successful login, however busy.
    pub pre_auth_lifetime: Duration,
    /// The client's address, as the listener saw it.
    pub client: Option<SocketAddr>,
    /// TLS the client may start with STARTTLS; `None` when the listener has none or the
    /// session runs over TLS already.
    pub starttls: Option<Arc<ClientTls>>,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// IMAP: longest literal.
    pub max_literal_size: usize,
    /// The listener's address the client connected to.
    pub local: Option<SocketAddr>,
}

impl FrontendSettings {
    /// The limits on one message of a protocol with literals (IMAP, ManageSieve).
    pub(crate) fn client_limits(&self) -> ClientLimits {
        ClientLimits {
            max_line: self.max_line_length,
            max_literal: self.max_literal_size,
        }
    }

    /// What the session offers before the client starts TLS.
    pub fn tls_offer(&self) -> TlsOffer {
        match &self.starttls {
            None => TlsOffer::None,
            Some(tls) if tls.required => TlsOffer::Required,
            Some(_) => TlsOffer::Optional,
        }
    }

    /// When the session's lifetime before authentication runs out, for a session started now.
    pub fn lifetime_end(&self) -> Instant {
        Instant::now() + self.pre_auth_lifetime
    }

    /// The deadline for the next read or write: `pre_auth_timeout` from now, but never past
    /// `lifetime_end`.
    pub fn next_deadline(&self, lifetime_end: Instant) -> Instant {
        (Instant::now() + self.pre_auth_timeout).min(lifetime_end)
    }
}

/// Whether a front end offers STARTTLS, and whether logins wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsOffer {
    /// No STARTTLS: the listener has no TLS, or the session has it already.
    #[default]
    None,
    /// STARTTLS offered; logins allowed without it.
    Optional,
    /// STARTTLS offered; no login before it.
    Required,
}

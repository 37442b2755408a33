//! Every reply the SMTP front end sends before authentication, and the one table that turns a
//! failure into a reply code with an enhanced status code (RFC 3463, RFC 2034, RFC 4954 6).

use std::fmt;

use crate::login::{Closing, LoginError, MOVED};
use crate::sanitize;
use crate::sasl::SaslError;

/// One single-line SMTP reply: code, enhanced status code, text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    status: &'static str,
    text: String,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Self {
        Self {
            code,
            status,
            text: text.into(),
        }
    }

    /// The reply as sent, CRLF included.
    pub fn to_bytes(&self) -> Vec<u8> {
        format!("{self}\r\n").into_bytes()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.status, self.text)
    }
}

/// Everything that can go wrong before authentication, as the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("login failed: {0}")]
    Login(LoginError),
    #[error("bad SASL response: {0}")]
    Sasl(SaslError),
    #[error("authentication cancelled by the client")]
    AuthCancelled,
    #[error("unsupported SASL mechanism")]
    UnsupportedMechanism,
    #[error("command out of sequence")]
    BadSequence,
    #[error("command needs authentication")]
    AuthRequired,
    #[error("command needs STARTTLS first")]
    StartTlsRequired,
    #[error("STARTTLS while TLS is active")]
    TlsActive,
    #[error("command not implemented")]
    NotImplemented,
    #[error("unknown command")]
    UnknownCommand,
    #[error("syntax error in arguments")]
    Syntax,
    #[error("control characters in a command")]
    ControlCharacters,
    #[error("EHLO or HELO without a usable domain")]
    BadDomain,
    #[error("line too long")]
    LineTooLong,
    #[error("too many errors")]
    TooManyErrors,
    #[error("too many failed logins")]
    TooManyAuthFailures,
    #[error("pre-authentication timeout")]
    Timeout,
    #[error("pre-authentication lifetime over")]
    LifetimeOver,
    #[error("listener at its connection limit")]
    TooManyConnections,
    #[error("shutting down")]
    ShuttingDown,
    #[error("account access revoked")]
    Revoked,
    #[error("session moved by the operator")]
    Moved,
}

impl From<Closing> for Failure {
    fn from(why: Closing) -> Self {
        match why {
            Closing::TooManyConnections => Failure::TooManyConnections,
            Closing::ShuttingDown => Failure::ShuttingDown,
            Closing::Revoked => Failure::Revoked,
            Closing::Moved => Failure::Moved,
            Closing::IdleTimeout => Failure::Timeout,
            Closing::LifetimeOver => Failure::LifetimeOver,
        }
    }
}

/// The one place deciding how a failure looks on the wire.
pub fn failure(failure: Failure, hostname: &str) -> Reply {
    match failure {
        Failure::Login(LoginError::BadCredentials | LoginError::UpstreamRejected) => {
            Reply::new(535, "5.7.8", "Authentication credentials invalid")
        }
        Failure::Login(LoginError::NeedsReauthorization) => {
            Reply::new(535, "5.7.8", "account needs re-authorization")
        }
        // RFC 3463 X.3.5, system incorrectly configured: permanent, for the administrator.
        Failure::Login(LoginError::Misconfigured) => Reply::new(
            535,
            "5.3.5",
            "Account misconfigured at its identity provider; contact the administrator",
        ),
        Failure::Login(LoginError::Throttled) => {
            Reply::new(454, "4.7.0", "Too many failed logins, try again later")
        }
        Failure::Login(
            LoginError::Overloaded
            | LoginError::CheckUnavailable
            | LoginError::TokenUnavailable
            | LoginError::UpstreamUnavailable,
        ) => Reply::new(454, "4.7.0", "Temporary authentication failure"),
        Failure::Sasl(SaslError::Base64) => Reply::new(501, "5.5.2", "Invalid base64 data"),
        Failure::Sasl(SaslError::MalformedPlain | SaslError::NotUtf8) => {
            Reply::new(501, "5.5.4", "Malformed SASL message")
        }
        // RFC 4954 6: a refused identity is an invalid credential, not a syntax problem.
        Failure::Sasl(SaslError::ProxyAuthorization | SaslError::BadUser) => {
            Reply::new(535, "5.7.8", "Authentication credentials invalid")
        }
        Failure::AuthCancelled => Reply::new(501, "5.7.0", "Authentication cancelled"),
        Failure::UnsupportedMechanism => {
            Reply::new(504, "5.5.4", "Unrecognized authentication type")
        }
        Failure::BadSequence => Reply::new(503, "5.5.1", "Send EHLO first"),
        Failure::AuthRequired => Reply::new(530, "5.7.0", "Authentication required"),
        // RFC 3207 4.
        Failure::StartTlsRequired => {
            Reply::new(530, "5.7.0", "Must issue a STARTTLS command first")
        }
        Failure::TlsActive => Reply::new(503, "5.5.1", "TLS already active"),
        Failure::NotImplemented => Reply::new(502, "5.5.1", "Command not implemented"),
        Failure::UnknownCommand => Reply::new(500, "5.5.2", "Command unrecognized"),
        Failure::Syntax => Reply::new(501, "5.5.4", "Syntax error in parameters"),
        Failure::ControlCharacters => {
            Reply::new(501, "5.5.2", "Control characters are not allowed")
        }
        Failure::BadDomain => Reply::new(501, "5.5.4", "Invalid domain name"),
        Failure::LineTooLong => Reply::new(500, "5.5.2", "Line too long"),
        Failure::TooManyErrors => Reply::new(421, "4.7.0", "Too many errors, closing connection"),
        Failure::TooManyAuthFailures => Reply::new(
            421,
            "4.7.0",
            "Too many authentication failures, closing connection",
        ),
        Failure::Timeout => Reply::new(421, "4.4.2", format!("{hostname} Timeout")),
        Failure::LifetimeOver => Reply::new(
            421,
            "4.4.2",
            format!("{hostname} Too long without authenticating"),
        ),
        Failure::TooManyConnections => Reply::new(
            421,
            "4.7.0",
            format!("{hostname} Too many connections, try again later"),
        ),
        // RFC 3463 4.3.2: system not accepting network messages.
        Failure::ShuttingDown => {
            Reply::new(421, "4.3.2", format!("{hostname} Service shutting down"))
        }
        Failure::Revoked => Reply::new(
            421,
            "4.7.0",
            format!("{hostname} Access to this account was revoked"),
        ),
        Failure::Moved => Reply::new(421, "4.3.2", format!("{hostname} {MOVED}")),
    }
}

/// RFC 2034 3: the greeting carries no enhanced status code.
pub fn greeting(hostname: &str) -> Vec<u8> {
    format!("220 {} ESMTP mailgate\r\n", sanitize::for_wire(hostname)).into_bytes()
}

/// Whether a SASL error is a protocol error (`501`) rather than refused credentials (`535`).
pub fn is_malformed(error: SaslError) -> bool {
    matches!(
        error,
        SaslError::Base64 | SaslError::MalformedPlain | SaslError::NotUtf8
    )
}

/// The EHLO reply (RFC 5321 4.1.1.1): the host name, then one keyword line each.
pub fn ehlo(hostname: &str, extensions: &[String]) -> Vec<u8> {
    let mut lines = Vec::with_capacity(extensions.len() + 1);
    lines.push(hostname);
    lines.extend(extensions.iter().map(String::as_str));
    let mut out = String::new();
    for (index, line) in lines.iter().enumerate() {
        let separator = if index + 1 == lines.len() { ' ' } else { '-' };
        out.push_str(&format!("250{separator}{line}\r\n"));
    }
    out.into_bytes()
}

/// RFC 2034 3: nor does the reply to HELO.
pub fn helo(hostname: &str) -> Vec<u8> {
    format!("250 {hostname}\r\n").into_bytes()
}

/// RFC 3207 4: the client starts the handshake after this reply.
pub fn ready_for_tls() -> Reply {
    Reply::new(220, "2.0.0", "Ready to start TLS")
}

pub fn ok() -> Reply {
    Reply::new(250, "2.0.0", "OK")
}

pub fn help() -> Reply {
    Reply::new(214, "2.0.0", "Authenticate with AUTH PLAIN or AUTH LOGIN")
}

pub fn bye() -> Reply {
    Reply::new(221, "2.0.0", "Bye")
}

/// RFC 4954 4: a server challenge is `334` and base64 text, with no status code.
pub fn challenge(base64: &str) -> Vec<u8> {
    format!("334 {base64}\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_an_enhanced_code_of_its_class() {
        let all = [
            Failure::Login(LoginError::BadCredentials),
            Failure::Login(LoginError::TokenUnavailable),
            Failure::Sasl(SaslError::Base64),
            Failure::Sasl(SaslError::ProxyAuthorization),
            Failure::AuthCancelled,
            Failure::UnsupportedMechanism,
            Failure::BadSequence,
            Failure::AuthRequired,
            Failure::NotImplemented,
            Failure::UnknownCommand,
            Failure::Syntax,
            Failure::LineTooLong,
            Failure::TooManyErrors,
            Failure::TooManyAuthFailures,
            Failure::Timeout,
            Failure::LifetimeOver,
            Failure::ControlCharacters,
            Failure::BadDomain,
            Failure::Login(LoginError::NeedsReauthorization),
            Failure::Login(LoginError::Throttled),
        ];
        for item in all {
            let reply = failure(item, "mx").to_string();
            let class = &reply[..1];
            assert_eq!(&reply[4..5], class, "{reply}");
            assert_eq!(&reply[5..6], ".", "{reply}");
        }
    }

    #[test]
    fn login_errors() {
        let rejected = failure(Failure::Login(LoginError::UpstreamRejected), "mx");
        assert_eq!(
            rejected.to_string(),
            "535 5.7.8 Authentication credentials invalid"
        );
        let unavailable = failure(Failure::Login(LoginError::UpstreamUnavailable), "mx");
        assert_eq!(
            unavailable.to_string(),
            "454 4.7.0 Temporary authentication failure"
        );
    }

    #[test]
    fn ehlo_lines() {
        let reply = ehlo("mx", &["SIZE 10".to_string(), "AUTH PLAIN".to_string()]);
        assert_eq!(reply, b"250-mx\r\n250-SIZE 10\r\n250 AUTH PLAIN\r\n");
        assert_eq!(ehlo("mx", &[]), b"250 mx\r\n");
    }
}

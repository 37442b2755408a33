//! Every reply the IMAP front end sends on its own, and the one mapping from failures to
//! `NO`/`BAD`/`BYE` (response codes from RFC 5530).

use crate::frontend::settings::TlsOffer;
use crate::login::{Closing, LoginError, MOVED};
use crate::sanitize;
use crate::sasl::{self, SaslError};

/// What mailgate offers before authentication. No IMAP4rev2: it would oblige us to answer
/// ENABLE and more (RFC 9051 7.2.2).
const BASE_CAPABILITIES: &str = "IMAP4rev1 SASL-IR LITERAL+ ID";
const AUTH_CAPABILITIES: &str = "AUTH=PLAIN AUTH=LOGIN";

/// The capabilities for a session's TLS state: STARTTLS only before TLS (RFC 9051 6.2.1), and
/// LOGINDISABLED without any AUTH= while a login must wait for it (RFC 9051 6.2.3, 7.2.2).
pub fn capabilities(offer: TlsOffer) -> String {
    match offer {
        TlsOffer::None => format!("{BASE_CAPABILITIES} {AUTH_CAPABILITIES}"),
        TlsOffer::Optional => format!("{BASE_CAPABILITIES} STARTTLS {AUTH_CAPABILITIES}"),
        TlsOffer::Required => format!("{BASE_CAPABILITIES} STARTTLS LOGINDISABLED"),
    }
}

pub const BYE_LOGOUT: &str = "Logging out";
pub const BYE_IDLE: &str = "Autologout; idle too long";
pub const BYE_LIFETIME: &str = "Autologout; too long without logging in";
pub const BYE_TOO_MANY_ERRORS: &str = "Too many invalid commands";
pub const BYE_TOO_MANY_FAILURES: &str = "Too many failed logins";

/// The untagged greeting (RFC 9051 7.1.1), listing capabilities so clients skip a round trip.
pub fn greeting(hostname: &str, offer: TlsOffer) -> String {
    let hostname = sanitize::for_wire(hostname);
    let capabilities = capabilities(offer);
    format!("* OK [CAPABILITY {capabilities}] {hostname} mailgate ready\r\n")
}

/// The goodbye for a session mailgate ends itself.
pub fn closing(why: Closing) -> String {
    match why {
        Closing::TooManyConnections => too_many_connections(),
        Closing::ShuttingDown => shutting_down(),
        Closing::Revoked => revoked(),
        Closing::Moved => bye(MOVED),
        Closing::IdleTimeout => bye(BYE_IDLE),
        Closing::LifetimeOver => bye(BYE_LIFETIME),
    }
}

/// Sent instead of a greeting when the listener is at its connection limit (RFC 9051 7.1.5),
/// and to a session closed before login to make room.
pub fn too_many_connections() -> String {
    bye("[UNAVAILABLE] Too many connections, try again later")
}

/// Sent to spliced sessions when mailgate stops.
pub fn shutting_down() -> String {
    bye("Server shutting down")
}

/// Sent to spliced sessions whose account its token source refused for good.
pub fn revoked() -> String {
    bye("Access to this account was revoked; log in again")
}

pub fn capability(tag: &str, offer: TlsOffer) -> String {
    let capabilities = capabilities(offer);
    format!("* CAPABILITY {capabilities}\r\n{tag} OK Capability completed\r\n")
}

/// RFC 9051 6.2.1: the client starts the handshake after this line.
pub fn begin_tls(tag: &str) -> String {
    ok(tag, "Begin TLS negotiation now")
}

/// A login before STARTTLS where TLS is required (RFC 5530 PRIVACYREQUIRED).
pub fn privacy_required(tag: &str) -> String {
    no(tag, "[PRIVACYREQUIRED] Log in after STARTTLS")
}

/// RFC 2971: the server's identification; only a name, nothing that helps an attacker.
pub fn id(tag: &str) -> String {
    format!("* ID (\"name\" \"mailgate\")\r\n{tag} OK ID completed\r\n")
}

pub fn ok(tag: &str, text: &str) -> String {
    format!("{tag} OK {text}\r\n")
}

/// `tag` is `None` when the tag could not be read from a malformed command.
pub fn bad(tag: Option<&str>, text: &str) -> String {
    format!("{} BAD {text}\r\n", tag.unwrap_or("*"))
}

pub fn no(tag: &str, text: &str) -> String {
    format!("{tag} NO {text}\r\n")
}

pub fn bye(text: &str) -> String {
    format!("* BYE {text}\r\n")
}

/// Asks for a synchronizing literal (RFC 9051 7.5).
pub const CONTINUE_LITERAL: &str = "+ Ready for literal data\r\n";

/// An AUTHENTICATE challenge (RFC 9051 7.5): `+ `, the base64 text, CRLF.
pub fn challenge(raw: &[u8]) -> String {
    format!("+ {}\r\n", sasl::encode_challenge(raw))
}

/// The answer to a login the proxy could not complete.
pub fn login_failed(tag: &str, error: LoginError) -> String {
    match error {
        LoginError::BadCredentials | LoginError::UpstreamRejected => {
            no(tag, "[AUTHENTICATIONFAILED] Authentication failed")
        }
        LoginError::NeedsReauthorization => {
            no(tag, "[AUTHENTICATIONFAILED] account needs re-authorization")
        }
        // RFC 5530 3: CONTACTADMIN, a failure only the administrator can fix; no retry helps.
        LoginError::Misconfigured => no(
            tag,
            "[CONTACTADMIN] Account misconfigured at its identity provider",
        ),
        LoginError::Throttled => no(tag, "[UNAVAILABLE] Too many failed logins, try again later"),
        LoginError::Overloaded
        | LoginError::CheckUnavailable
        | LoginError::TokenUnavailable
        | LoginError::UpstreamUnavailable => {
            no(tag, "[UNAVAILABLE] Temporary failure, try again later")
        }
    }
}

/// The answer to credentials that could not be decoded.
///
/// Broken encodings are protocol errors (`BAD`, RFC 9051 6.2.2); decodable but unusable
/// credentials are refused like wrong ones.
pub fn credentials_refused(tag: &str, error: SaslError) -> String {
    match error {
        SaslError::Base64 | SaslError::MalformedPlain => bad(Some(tag), "Invalid SASL response"),
        SaslError::ProxyAuthorization => no(tag, "[AUTHORIZATIONFAILED] Authorization refused"),
        SaslError::NotUtf8 | SaslError::BadUser => {
            no(tag, "[AUTHENTICATIONFAILED] Authentication failed")
        }
    }
}

/// Whether [`credentials_refused`] answers `BAD` for this error.
pub fn is_malformed(error: SaslError) -> bool {
    matches!(error, SaslError::Base64 | SaslError::MalformedPlain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_failures_map_to_codes() {
        assert_eq!(
            login_failed("a", LoginError::UpstreamRejected),
            "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        );
        assert_eq!(
            login_failed("a", LoginError::TokenUnavailable),
            "a NO [UNAVAILABLE] Temporary failure, try again later\r\n"
        );
    }

    #[test]
    fn greeting_drops_control_characters_from_the_hostname() {
        assert_eq!(
            greeting("mx\r\n* BYE", TlsOffer::None),
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] mx* BYE mailgate ready\r\n"
        );
    }
}

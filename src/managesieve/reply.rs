//! What mailgate itself says to ManageSieve clients (RFC 5804): the capability response built
//! from the upstream's, and one table turning each failure into `NO`/`BYE` with the RFC 5804
//! 1.3 response code where one fits.

use super::syntax::{self, quote};
use crate::frontend::settings::TlsOffer;
use crate::login::{Closing, LoginError, MOVED};
use crate::sanitize;
use crate::sasl::{self, SaslError};

/// Named when the upstream's own name is not known yet.
const IMPLEMENTATION: &str = "mailgate";
/// RFC 5804 1.7: the protocol version a server speaking RFC 5804 announces.
const VERSION: &str = "1.0";
/// The mechanisms mailgate offers clients.
const SASL: &str = "PLAIN LOGIN";
/// The upstream's capabilities a client may rely on before logging in (RFC 5804 1.7), relayed
/// in this order; the SASL mechanisms and STARTTLS are mailgate's own.
const RELAYED: [&str; 5] = [
    "IMPLEMENTATION",
    "SIEVE",
    "NOTIFY",
    "MAXREDIRECTS",
    "VERSION",
];

pub const BYE_TOO_MANY_ERRORS: &str = "Too many invalid commands";
pub const BYE_TOO_MANY_FAILURES: &str = "Too many failed logins";

/// The capability response (RFC 5804 1.7) without its `OK`: the upstream's relayed lines,
/// validated, stripped to printable ASCII and quoted anew, with mailgate's SASL and STARTTLS.
/// Before TLS that a listener requires, SASL is empty (RFC 5804 1.7 allows it), so clients
/// start TLS first.
pub fn capabilities(upstream: &[String], offer: TlsOffer) -> String {
    let relayed = |name: &str| {
        upstream
            .iter()
            .filter_map(|line| syntax::capability(line))
            .find(|(found, _)| found == name)
            // Quoted strings may hold control characters (RFC 5804 4): not relayed.
            .map(|(_, value)| sanitize::for_wire(&value))
    };
    let sasl = if offer == TlsOffer::Required {
        ""
    } else {
        SASL
    };
    let mut entries: Vec<(&str, Option<String>)> = Vec::new();
    for name in RELAYED {
        let value = relayed(name);
        match name {
            "IMPLEMENTATION" => {
                entries.push((
                    name,
                    Some(value.unwrap_or_else(|| IMPLEMENTATION.to_owned())),
                ));
                entries.push(("SASL", Some(sasl.to_owned())));
            }
            // Required (RFC 5804 1.7): an empty list until the upstream's is known.
            "SIEVE" => entries.push((name, Some(value.unwrap_or_default()))),
            "VERSION" => {
                if offer != TlsOffer::None {
                    entries.push(("STARTTLS", None));
                }
                entries.push((name, Some(value.unwrap_or_else(|| VERSION.to_owned()))));
            }
            _ => entries.extend(value.map(|value| (name, Some(value)))),
        }
    }
    entries
        .into_iter()
        .filter_map(|(name, value)| match value {
            None => Some(format!("\"{name}\"\r\n")),
            Some(value) => Some(format!("\"{name}\" {}\r\n", quote(value.as_bytes())?)),
        })
        .collect()
}

/// RFC 5804 1.7: the greeting is the capability response.
pub fn greeting(upstream: &[String], offer: TlsOffer, hostname: &str) -> String {
    let text = format!("{} ManageSieve ready", sanitize::for_wire(hostname));
    capabilities(upstream, offer) + &ok(&text)
}

/// The answer to CAPABILITY (RFC 5804 2.4).
pub fn capability(upstream: &[String], offer: TlsOffer) -> String {
    capabilities(upstream, offer) + &ok("Capability completed")
}

/// RFC 5804 2.2: the client starts the handshake after this line.
pub fn begin_tls() -> String {
    ok("Begin TLS negotiation now")
}

/// RFC 5804 2.13: NOOP's optional string comes back in a `TAG` response code; `None` for a
/// tag with control characters, which quoted strings allow but clients must not get echoed.
pub fn noop(tag: Option<&[u8]>) -> Option<String> {
    match tag {
        None => Some(ok("NOOP completed")),
        Some(tag) if tag.iter().any(u8::is_ascii_control) => None,
        Some(tag) => Some(format!("OK (TAG {}) \"NOOP completed\"\r\n", quote(tag)?)),
    }
}

/// RFC 5804 2.1: a server challenge is a string holding base64.
pub fn challenge(raw: &[u8]) -> String {
    format!("\"{}\"\r\n", sasl::encode_challenge(raw))
}

/// A login before STARTTLS where the listener requires TLS (RFC 5804 1.3 ENCRYPT-NEEDED).
pub fn encrypt_needed() -> String {
    no(Some("ENCRYPT-NEEDED"), "Log in after STARTTLS")
}

/// The answer to a login mailgate could not complete. RFC 5804 1.3: TRYLATER marks what may
/// work later without any change by the client; it has no code for plain refusals.
pub fn login_failed(error: LoginError) -> String {
    match error {
        LoginError::BadCredentials | LoginError::UpstreamRejected => {
            no(None, "Authentication failed")
        }
        LoginError::NeedsReauthorization => no(None, "Account needs re-authorization"),
        LoginError::Misconfigured => no(None, "Account misconfigured at its identity provider"),
        LoginError::Throttled => no(Some("TRYLATER"), "Too many failed logins, try again later"),
        LoginError::Overloaded
        | LoginError::CheckUnavailable
        | LoginError::TokenUnavailable
        | LoginError::UpstreamUnavailable => {
            no(Some("TRYLATER"), "Temporary failure, try again later")
        }
    }
}

/// The answer to credentials that could not be decoded.
pub fn credentials_refused(error: SaslError) -> String {
    match error {
        SaslError::Base64 | SaslError::MalformedPlain => no(None, "Invalid SASL response"),
        SaslError::ProxyAuthorization => no(None, "Authorization refused"),
        SaslError::NotUtf8 | SaslError::BadUser => no(None, "Authentication failed"),
    }
}

/// Whether [`credentials_refused`] answers a client error (counted as one) rather than a
/// failed login.
pub fn is_malformed(error: SaslError) -> bool {
    matches!(error, SaslError::Base64 | SaslError::MalformedPlain)
}

/// The goodbye for a session mailgate ends itself: TRYLATER where a reconnect soon may work.
pub fn closing(why: Closing) -> String {
    match why {
        Closing::TooManyConnections => {
            bye(Some("TRYLATER"), "Too many connections, try again later")
        }
        Closing::ShuttingDown => bye(Some("TRYLATER"), "Server shutting down"),
        Closing::Revoked => bye(None, "Access to this account was revoked; log in again"),
        Closing::Moved => bye(Some("TRYLATER"), MOVED),
        Closing::IdleTimeout => bye(None, "Autologout; idle too long"),
        Closing::LifetimeOver => bye(None, "Autologout; too long without logging in"),
    }
}

pub fn ok(text: &str) -> String {
    response("OK", None, text)
}

pub fn no(code: Option<&str>, text: &str) -> String {
    response("NO", code, text)
}

pub fn bye(code: Option<&str>, text: &str) -> String {
    response("BYE", code, text)
}

/// `status [(code)] "text"`; the texts are mailgate's own, so they always quote.
fn response(status: &str, code: Option<&str>, text: &str) -> String {
    let text = quote(text.as_bytes()).unwrap_or_default();
    match code {
        Some(code) => format!("{status} ({code}) {text}\r\n"),
        None => format!("{status} {text}\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_codes() {
        assert_eq!(
            login_failed(LoginError::UpstreamRejected),
            "NO \"Authentication failed\"\r\n"
        );
        assert_eq!(
            login_failed(LoginError::TokenUnavailable),
            "NO (TRYLATER) \"Temporary failure, try again later\"\r\n"
        );
        assert_eq!(
            closing(Closing::ShuttingDown),
            "BYE (TRYLATER) \"Server shutting down\"\r\n"
        );
    }

    #[test]
    fn relayed_capabilities_are_validated_and_requoted() {
        let upstream = [
            "\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"".to_owned(),
            "\"SASL\" \"XOAUTH2 OAUTHBEARER\"".to_owned(),
            "\"sieve\" \"fileinto vacation\"".to_owned(),
            "\"NOTIFY\" \"mailto\"".to_owned(),
            "\"STARTTLS\"".to_owned(),
            "\"MAXREDIRECTS\" {1}\r\n5\r\nOK".to_owned(),
            "\"VERSION\" \"1.0\"".to_owned(),
        ];
        assert_eq!(
            capabilities(&upstream, TlsOffer::None),
            "\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"\r\n\"SASL\" \"PLAIN LOGIN\"\r\n\
             \"SIEVE\" \"fileinto vacation\"\r\n\"NOTIFY\" \"mailto\"\r\n\"VERSION\" \"1.0\"\r\n"
        );
        assert_eq!(
            capabilities(&[], TlsOffer::Required),
            "\"IMPLEMENTATION\" \"mailgate\"\r\n\"SASL\" \"\"\r\n\"SIEVE\" \"\"\r\n\
             \"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\n"
        );
    }

    #[test]
    fn noop_tags_with_control_characters_are_not_echoed() {
        // Found by the managesieve_frontend fuzz target: the client's tag came back raw.
        assert_eq!(noop(Some(b"a\x1a\"b")), None);
        assert_eq!(noop(Some(b"a\tb")), None);
        assert_eq!(
            noop(Some(b"a\"b")).unwrap(),
            "OK (TAG \"a\\\"b\") \"NOOP completed\"\r\n"
        );
    }

    #[test]
    fn relayed_capabilities_carry_no_control_characters() {
        // Legal in a quoted string (RFC 5804 4 SAFE-CHAR), but a terminal escape or a
        // backspace from the upstream must not reach clients.
        let upstream = [
            "\"IMPLEMENTATION\" \"Evil\u{1b}[2J\u{8}\u{7f}\tServer\"".to_owned(),
            "\"SIEVE\" \"fileinto\u{7}\"".to_owned(),
        ];
        assert_eq!(
            capabilities(&upstream, TlsOffer::None),
            "\"IMPLEMENTATION\" \"Evil[2JServer\"\r\n\"SASL\" \"PLAIN LOGIN\"\r\n\
             \"SIEVE\" \"fileinto\"\r\n\"VERSION\" \"1.0\"\r\n"
        );
    }
}

//! Every line the POP3 front end sends before authentication, and the one table that turns a
//! failure into an `-ERR` with its response code (RFC 2449 8, RFC 3206).

use crate::frontend::settings::TlsOffer;
use crate::login::{Closing, LoginError, MOVED};
use crate::sanitize;
use crate::sasl::SaslError;

/// RFC 3206 5: the failure lies with the credentials; the client may ask the user again.
const AUTH: &str = "[AUTH] ";
/// RFC 3206 4: likely to pass; the client should try later without asking the user anything.
const SYS_TEMP: &str = "[SYS/TEMP] ";
/// RFC 3206 4: will not pass until someone fixes it; the client should tell the user.
const SYS_PERM: &str = "[SYS/PERM] ";

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
    #[error("PASS without USER")]
    PassWithoutUser,
    #[error("login needs STLS first")]
    StlsRequired,
    #[error("STLS while TLS is active")]
    TlsActive,
    #[error("STLS not offered")]
    StlsNotOffered,
    #[error("APOP refused")]
    ApopRefused,
    #[error("command valid only after login")]
    NotAuthorized,
    #[error("unknown command")]
    UnknownCommand,
    #[error("syntax error in arguments")]
    Syntax,
    #[error("control characters in a command")]
    ControlCharacters,
    #[error("line too long")]
    LineTooLong,
    #[error("too many errors")]
    TooManyErrors,
}

/// The one place deciding how a failure looks on the wire.
pub fn failure(failure: Failure) -> Vec<u8> {
    match failure {
        Failure::Login(error) => login_failure(error),
        // RFC 5034 4: a message that does not decode ends the exchange with -ERR.
        Failure::Sasl(SaslError::Base64) => err("", "Invalid base64 data"),
        Failure::Sasl(SaslError::MalformedPlain | SaslError::NotUtf8) => {
            err("", "Malformed SASL message")
        }
        // A refused identity is a credential problem, not a syntax one.
        Failure::Sasl(SaslError::ProxyAuthorization | SaslError::BadUser) => {
            err(AUTH, "Authentication failed")
        }
        Failure::AuthCancelled => err("", "Authentication cancelled"),
        Failure::UnsupportedMechanism => err("", "Unsupported authentication mechanism"),
        Failure::PassWithoutUser => err("", "USER first"),
        // Dovecot answers the same, so clients that know it know this: the login itself was
        // refused, and `STLS` (which CAPA lists) is the way on (RFC 2595 4).
        Failure::StlsRequired => err(
            AUTH,
            "Plaintext authentication disallowed before STLS; use STLS first",
        ),
        Failure::TlsActive => err("", "TLS already active"),
        Failure::StlsNotOffered => err("", "STLS not available"),
        Failure::ApopRefused => err("", "APOP not supported; use USER/PASS or AUTH"),
        // RFC 1939 3: a command in the wrong state is answered -ERR.
        Failure::NotAuthorized => err("", "Not logged in"),
        Failure::UnknownCommand => err("", "Unknown command"),
        Failure::Syntax => err("", "Syntax error in arguments"),
        Failure::ControlCharacters => err("", "Control characters are not allowed"),
        Failure::LineTooLong => err("", "Line too long"),
        Failure::TooManyErrors => err(SYS_TEMP, "Too many errors, closing connection"),
    }
}

/// A failed login. Throttling is `[SYS/TEMP]`, not `[AUTH]`: the credentials may be right,
/// and asking the user for a new password would only add failures; nor `[LOGIN-DELAY]`
/// (RFC 2449 8.1.2 ties it to the LOGIN-DELAY policy on recent successful logins, which
/// mailgate does not advertise) or `[IN-USE]` (a locked maildrop).
fn login_failure(error: LoginError) -> Vec<u8> {
    match error {
        LoginError::BadCredentials | LoginError::UpstreamRejected => {
            err(AUTH, "Authentication failed")
        }
        LoginError::NeedsReauthorization => err(AUTH, "Account needs re-authorization"),
        // Nothing the user types helps: the administrator must act (RFC 3206 4).
        LoginError::Misconfigured => err(
            SYS_PERM,
            "Account misconfigured at its identity provider; contact the administrator",
        ),
        LoginError::Throttled => err(SYS_TEMP, "Too many failed logins, try again later"),
        LoginError::Overloaded
        | LoginError::CheckUnavailable
        | LoginError::TokenUnavailable
        | LoginError::UpstreamUnavailable => err(SYS_TEMP, "Temporary authentication failure"),
    }
}

/// The last line when mailgate ends a session: an `-ERR` the client reads as the answer to
/// whatever it sends next, then the close (as Dovecot ends idle sessions).
pub fn goodbye(why: Closing, hostname: &str) -> Vec<u8> {
    let hostname = sanitize::for_wire(hostname);
    let (code, text) = match why {
        Closing::TooManyConnections => (SYS_TEMP, "Too many connections, try again later"),
        Closing::ShuttingDown => (SYS_TEMP, "Service shutting down"),
        // The account is refused for good: a retry would fail the same way.
        Closing::Revoked => (AUTH, "Access to this account was revoked"),
        Closing::Moved => (SYS_TEMP, MOVED),
        Closing::IdleTimeout => (SYS_TEMP, "Timeout"),
        Closing::LifetimeOver => (SYS_TEMP, "Too long without authenticating"),
    };
    err(code, &format!("{hostname} {text}"))
}

/// RFC 1939 4. No `<timestamp>` in it: that would offer APOP (RFC 1939 7), which needs the
/// server to hold each plaintext password to check an MD5 digest of it. mailgate can check
/// only a password it is given, against a hash or an auth server, so it offers none.
pub fn greeting(hostname: &str) -> Vec<u8> {
    ok(&format!("{} mailgate ready", sanitize::for_wire(hostname)))
}

/// RFC 2449 5, what mailgate itself offers before login (the upstream's list applies after
/// it, and RFC 2449 5 has clients ask again then):
/// - `USER` and `SASL PLAIN LOGIN` unless a login must wait for TLS (RFC 2595 4);
/// - `STLS` while offered (RFC 2595 4);
/// - `RESP-CODES` and `AUTH-RESP-CODE`: every refusal carries RFC 3206's codes;
/// - `PIPELINING`: commands are answered strictly in order, and what follows the login
///   command goes on to the upstream, which Dovecot and every large provider pipeline too.
///
/// No `IMPLEMENTATION`: it is informational only (RFC 2449 6.9), and the greeting names
/// mailgate already. No `TOP`, `UIDL`, `EXPIRE`...: those describe the maildrop, which is
/// the upstream's.
pub fn capabilities(tls: TlsOffer) -> Vec<u8> {
    let mut lines = vec!["+OK Capability list follows"];
    if tls != TlsOffer::Required {
        lines.extend(["USER", "SASL PLAIN LOGIN"]);
    }
    if tls != TlsOffer::None {
        lines.push("STLS");
    }
    lines.extend(["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "."]);
    multi_line(&lines)
}

/// The mechanism list for a bare `AUTH`, as Dovecot and Outlook-era clients use it (it
/// predates CAPA; RFC 5034 itself always names a mechanism).
pub fn mechanisms() -> Vec<u8> {
    multi_line(&["+OK", "PLAIN", "LOGIN", "."])
}

/// RFC 1939 5: USER is answered whether or not the mailbox exists.
pub fn user_accepted() -> Vec<u8> {
    ok("Send PASS")
}

/// RFC 2595 4: the handshake starts after this line.
pub fn begin_tls() -> Vec<u8> {
    ok("Begin TLS negotiation")
}

pub fn signing_off(hostname: &str) -> Vec<u8> {
    ok(&format!(
        "{} mailgate signing off",
        sanitize::for_wire(hostname)
    ))
}

/// RFC 5034 4: a challenge is `+`, a space and base64 (nothing for an empty one).
pub fn challenge(base64: &str) -> Vec<u8> {
    format!("+ {base64}\r\n").into_bytes()
}

fn ok(text: &str) -> Vec<u8> {
    format!("+OK {text}\r\n").into_bytes()
}

fn err(code: &str, text: &str) -> Vec<u8> {
    format!("-ERR {code}{text}\r\n").into_bytes()
}

fn multi_line(lines: &[&str]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|line| [line, "\r\n"])
        .collect::<String>()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn permanent_and_temporary_login_failures() {
        for error in [
            LoginError::BadCredentials,
            LoginError::UpstreamRejected,
            LoginError::NeedsReauthorization,
        ] {
            assert!(text(failure(Failure::Login(error))).starts_with("-ERR [AUTH] "));
        }
        for error in [
            LoginError::Throttled,
            LoginError::Overloaded,
            LoginError::CheckUnavailable,
            LoginError::TokenUnavailable,
            LoginError::UpstreamUnavailable,
        ] {
            assert!(text(failure(Failure::Login(error))).starts_with("-ERR [SYS/TEMP] "));
        }
        let misconfigured = failure(Failure::Login(LoginError::Misconfigured));
        assert!(text(misconfigured).starts_with("-ERR [SYS/PERM] "));
    }

    #[test]
    fn capabilities_follow_the_tls_offer() {
        let common = "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n.\r\n";
        let head = "+OK Capability list follows\r\n";
        assert_eq!(
            text(capabilities(TlsOffer::None)),
            format!("{head}USER\r\nSASL PLAIN LOGIN\r\n{common}")
        );
        assert_eq!(
            text(capabilities(TlsOffer::Optional)),
            format!("{head}USER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n{common}")
        );
        assert_eq!(
            text(capabilities(TlsOffer::Required)),
            format!("{head}STLS\r\n{common}")
        );
    }

    #[test]
    fn goodbyes_and_greeting_are_single_safe_lines() {
        assert_eq!(
            text(goodbye(Closing::ShuttingDown, "mx\r\n-ERR x")),
            "-ERR [SYS/TEMP] mx-ERR x Service shutting down\r\n"
        );
        assert_eq!(text(greeting("mx")), "+OK mx mailgate ready\r\n");
    }
}

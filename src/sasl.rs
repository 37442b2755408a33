//! SASL as pure functions: the server side mailgate offers clients (PLAIN, LOGIN), what
//! upstreams expect (XOAUTH2, OAUTHBEARER per RFC 7628, PLAIN), and picking a mechanism.
//! No I/O here.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::config::MechanismSetting;
use crate::login::{BackendError, Credentials, UpstreamAuth};
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64")]
    Base64,
    #[error("malformed PLAIN message")]
    MalformedPlain,
    #[error("authorization identity differs from authentication identity")]
    ProxyAuthorization,
    #[error("credentials are not UTF-8")]
    NotUtf8,
    /// Empty, or holding control characters, which no account id has and which would forge
    /// log lines.
    #[error("unusable user name")]
    BadUser,
}

/// Decodes base64 as sent in SASL exchanges; an empty line or `=` is the empty response.
pub fn decode_base64(encoded: &[u8]) -> Result<Secret<Vec<u8>>, SaslError> {
    let trimmed = encoded.trim_ascii();
    if trimmed == b"=" {
        return Ok(Secret::new(Vec::new()));
    }
    BASE64
        .decode(trimmed)
        .map(Secret::new)
        .map_err(|_| SaslError::Base64)
}

pub fn encode_base64(raw: &Secret<Vec<u8>>) -> Secret<String> {
    Secret::new(BASE64.encode(raw.expose()))
}

/// Base64 of a server challenge, which holds no secret.
pub fn encode_challenge(raw: &[u8]) -> String {
    BASE64.encode(raw)
}

/// Decodes a PLAIN message (RFC 4616): `[authzid] NUL authcid NUL passwd`.
///
/// An authorization identity is accepted only when empty or equal to the authentication
/// identity: mailgate does not act on behalf of other accounts.
pub fn decode_plain(message: &Secret<Vec<u8>>) -> Result<Credentials, SaslError> {
    let mut parts = message.expose().split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::MalformedPlain);
    };
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::ProxyAuthorization);
    }
    credentials(authcid, password)
}

/// Builds credentials from a user name and password received separately (IMAP LOGIN, SASL LOGIN).
pub fn credentials(user: &[u8], password: &[u8]) -> Result<Credentials, SaslError> {
    let account = std::str::from_utf8(user).map_err(|_| SaslError::NotUtf8)?;
    let password = std::str::from_utf8(password).map_err(|_| SaslError::NotUtf8)?;
    if account.is_empty() || account.chars().any(crate::sanitize::is_hidden) {
        return Err(SaslError::BadUser);
    }
    Ok(Credentials {
        account: account.to_owned(),
        password: Secret::new(password.to_owned()),
    })
}

/// A mechanism mailgate offers clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMechanism {
    Plain,
    Login,
}

/// SASL LOGIN's prompts (not standardised, but every client expects these words).
const LOGIN_USERNAME_PROMPT: &[u8] = b"Username:";
const LOGIN_PASSWORD_PROMPT: &[u8] = b"Password:";

/// The server side of one PLAIN or LOGIN exchange with a client, the same for IMAP
/// AUTHENTICATE (RFC 9051 6.2.2) and SMTP AUTH (RFC 4954 4). Front ends frame the lines,
/// base64-decode responses, handle `*` (cancel) and encode challenges in their own syntax.
#[derive(Debug)]
pub struct SaslServer(Stage);

#[derive(Debug)]
enum Stage {
    /// PLAIN without an initial response: waiting for the message.
    Plain,
    /// LOGIN: waiting for the user name.
    User,
    /// LOGIN: waiting for the password.
    Password(Secret<Vec<u8>>),
}

/// What happens after a step of the exchange.
#[derive(Debug)]
pub enum SaslStep {
    /// Send `challenge` (raw, before base64) and feed the client's response to the server.
    Challenge {
        server: SaslServer,
        challenge: &'static [u8],
    },
    /// The exchange is over.
    Done(Result<Credentials, SaslError>),
}

impl SaslServer {
    /// Starts an exchange, with the client's initial response if it sent one (RFC 4959,
    /// RFC 4954 4). LOGIN's initial response is the user name, as clients send it.
    pub fn start(
        mechanism: ServerMechanism,
        initial_response: Option<Secret<Vec<u8>>>,
    ) -> SaslStep {
        match (mechanism, initial_response) {
            (ServerMechanism::Plain, None) => Self::ask(Stage::Plain, b""),
            (ServerMechanism::Login, None) => Self::ask(Stage::User, LOGIN_USERNAME_PROMPT),
            (mechanism, Some(response)) => {
                let first = match mechanism {
                    ServerMechanism::Plain => Stage::Plain,
                    ServerMechanism::Login => Stage::User,
                };
                SaslServer(first).step(response)
            }
        }
    }

    /// Takes the client's decoded response to the last challenge.
    pub fn step(self, response: Secret<Vec<u8>>) -> SaslStep {
        match self.0 {
            Stage::Plain => SaslStep::Done(decode_plain(&response)),
            Stage::User => Self::ask(Stage::Password(response), LOGIN_PASSWORD_PROMPT),
            Stage::Password(user) => SaslStep::Done(credentials(user.expose(), response.expose())),
        }
    }

    fn ask(stage: Stage, challenge: &'static [u8]) -> SaslStep {
        SaslStep::Challenge {
            server: SaslServer(stage),
            challenge,
        }
    }
}

/// A bearer-token mechanism spoken towards the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    XOAuth2,
    OAuthBearer,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The client message carrying the token.
    pub fn initial_response(
        self,
        user: &str,
        token: &Secret<String>,
        host: &str,
        port: u16,
    ) -> Secret<Vec<u8>> {
        let token = token.expose();
        let message = match self {
            Mechanism::XOAuth2 => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
            // RFC 7628 section 3.1: gs2 header with the authzid, then key/value pairs.
            Mechanism::OAuthBearer => format!(
                "n,a={},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01",
                gs2_saslname(user)
            ),
        };
        Secret::new(message.into_bytes())
    }

    /// What the client answers to a server's error challenge so that the server can send
    /// its final failure: an empty response for XOAUTH2, `%x01` for OAUTHBEARER (RFC 7628 3.2.3).
    pub fn failure_acknowledgement(self) -> &'static [u8] {
        match self {
            Mechanism::XOAuth2 => b"",
            Mechanism::OAuthBearer => b"\x01",
        }
    }

    /// Picks the mechanism to use, given whether the upstream advertises a mechanism by name.
    ///
    /// `auto` prefers XOAUTH2, which every large provider speaks, then OAUTHBEARER.
    pub fn choose(setting: MechanismSetting, offers: impl Fn(&str) -> bool) -> Option<Mechanism> {
        match setting {
            MechanismSetting::Xoauth2 => Some(Mechanism::XOAuth2),
            MechanismSetting::Oauthbearer => Some(Mechanism::OAuthBearer),
            MechanismSetting::Auto => [Mechanism::XOAuth2, Mechanism::OAuthBearer]
                .into_iter()
                .find(|mechanism| offers(mechanism.name())),
        }
    }
}

/// Encodes a PLAIN message for a password login upstream.
pub fn plain_message(user: &str, password: &Secret<String>) -> Secret<Vec<u8>> {
    Secret::new(format!("\0{user}\0{}", password.expose()).into_bytes())
}

/// One SASL exchange mailgate runs towards an upstream, whatever the protocol.
pub struct Exchange {
    pub mechanism: &'static str,
    /// The client message, before base64.
    pub message: Secret<Vec<u8>>,
    /// What answers an error challenge after the message; `None` cancels the exchange.
    pub acknowledgement: Option<&'static [u8]>,
}

impl Exchange {
    /// The exchange for `auth` given what the upstream `offers`: a bearer mechanism picked by
    /// `setting`, or PLAIN for a password. `Ok(None)`: a password, and no PLAIN on offer.
    ///
    /// # Errors
    /// A token, and no bearer mechanism both sides speak.
    pub fn for_upstream(
        auth: &UpstreamAuth,
        setting: MechanismSetting,
        (host, port): (&str, u16),
        offers: impl Fn(&str) -> bool,
    ) -> Result<Option<Exchange>, BackendError> {
        match auth {
            UpstreamAuth::Bearer { user, token } => {
                let mechanism =
                    Mechanism::choose(setting, offers).ok_or(BackendError::NoMechanism)?;
                Ok(Some(Exchange {
                    mechanism: mechanism.name(),
                    message: mechanism.initial_response(user, token, host, port),
                    acknowledgement: Some(mechanism.failure_acknowledgement()),
                }))
            }
            UpstreamAuth::Password { user, password } => Ok(offers("PLAIN").then(|| Exchange {
                mechanism: "PLAIN",
                message: plain_message(user, password),
                acknowledgement: None,
            })),
        }
    }

    /// The line answering an error challenge: the acknowledgement in base64, or `*`, which
    /// cancels (RFC 4954 4, RFC 9051 6.2.2).
    pub fn challenge_answer(&self) -> String {
        match self.acknowledgement {
            Some(bytes) => {
                let encoded = encode_base64(&Secret::new(bytes.to_vec()));
                format!("{}\r\n", encoded.expose())
            }
            None => "*\r\n".to_owned(),
        }
    }
}

/// Everything of `auth` that goes on the wire in a login, as it may come back in an error
/// text: the token or password itself, and the SASL message.
pub fn sent_forms(auth: &UpstreamAuth, exchange: Option<&Exchange>) -> Vec<Secret<Vec<u8>>> {
    let secret = match auth {
        UpstreamAuth::Bearer { token, .. } => token,
        UpstreamAuth::Password { password, .. } => password,
    };
    let mut sent = vec![Secret::new(secret.expose().as_bytes().to_vec())];
    sent.extend(exchange.map(|exchange| exchange.message.clone()));
    sent
}

/// RFC 5801 saslname: `,` and `=` are escaped.
fn gs2_saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(bytes: &[u8]) -> Secret<Vec<u8>> {
        Secret::new(bytes.to_vec())
    }

    #[test]
    fn plain_with_and_without_authzid() {
        let credentials = decode_plain(&secret(b"\0alice\0pw")).unwrap();
        assert_eq!(credentials.account, "alice");
        assert_eq!(credentials.password.expose(), "pw");
        assert!(decode_plain(&secret(b"alice\0alice\0pw")).is_ok());
        assert_eq!(
            decode_plain(&secret(b"bob\0alice\0pw")),
            Err(SaslError::ProxyAuthorization)
        );
        assert_eq!(
            decode_plain(&secret(b"alice\0pw")),
            Err(SaslError::MalformedPlain)
        );
        assert_eq!(decode_plain(&secret(b"\0\0pw")), Err(SaslError::BadUser));
        assert_eq!(
            decode_plain(&secret(b"\0a\nINFO forged\x1b[31m\0pw")),
            Err(SaslError::BadUser)
        );
        assert_eq!(
            decode_plain(&secret(b"\0a\0b\0c")),
            Err(SaslError::MalformedPlain)
        );
    }

    fn done(step: SaslStep) -> Result<Credentials, SaslError> {
        match step {
            SaslStep::Done(result) => result,
            SaslStep::Challenge { challenge, .. } => panic!("challenge {challenge:?}"),
        }
    }

    fn challenged(step: SaslStep, expected: &[u8]) -> SaslServer {
        match step {
            SaslStep::Challenge { server, challenge } => {
                assert_eq!(challenge, expected);
                server
            }
            SaslStep::Done(result) => panic!("done {result:?}"),
        }
    }

    #[test]
    fn server_plain_with_and_without_initial_response() {
        let credentials = done(SaslServer::start(
            ServerMechanism::Plain,
            Some(secret(b"\0alice\0pw")),
        ))
        .unwrap();
        assert_eq!(credentials.account, "alice");
        let server = challenged(SaslServer::start(ServerMechanism::Plain, None), b"");
        assert_eq!(
            done(server.step(secret(b"\0bob\0pw"))).unwrap().account,
            "bob"
        );
    }

    #[test]
    fn server_login_asks_for_user_then_password() {
        let server = challenged(
            SaslServer::start(ServerMechanism::Login, None),
            b"Username:",
        );
        let server = challenged(server.step(secret(b"alice")), b"Password:");
        let credentials = done(server.step(secret(b"pw"))).unwrap();
        assert_eq!(credentials.password.expose(), "pw");
        let server = challenged(
            SaslServer::start(ServerMechanism::Login, Some(secret(b"carol"))),
            b"Password:",
        );
        assert_eq!(done(server.step(secret(b"x"))).unwrap().account, "carol");
    }

    #[test]
    fn base64_empty_response_forms() {
        assert!(decode_base64(b"=").unwrap().expose().is_empty());
        assert!(decode_base64(b"").unwrap().expose().is_empty());
        assert_eq!(decode_base64(b"!!"), Err(SaslError::Base64));
    }

    #[test]
    fn xoauth2_message() {
        let token = Secret::new("tok".to_string());
        let message = Mechanism::XOAuth2.initial_response("a@b.c", &token, "h", 993);
        assert_eq!(message.expose(), b"user=a@b.c\x01auth=Bearer tok\x01\x01");
    }

    #[test]
    fn oauthbearer_message_escapes_saslname() {
        let token = Secret::new("tok".to_string());
        let message = Mechanism::OAuthBearer.initial_response("a=b,c", &token, "mx", 587);
        assert_eq!(
            message.expose(),
            b"n,a=a=3Db=2Cc,\x01host=mx\x01port=587\x01auth=Bearer tok\x01\x01"
        );
    }

    #[test]
    fn exchanges_for_tokens_and_passwords() {
        let bearer = UpstreamAuth::Bearer {
            user: "u".into(),
            token: Secret::new("t".into()),
        };
        let offers = |name: &str| name == "OAUTHBEARER" || name == "PLAIN";
        let exchange = Exchange::for_upstream(&bearer, MechanismSetting::Auto, ("h", 1), offers)
            .unwrap()
            .unwrap();
        assert_eq!(exchange.mechanism, "OAUTHBEARER");
        assert_eq!(exchange.challenge_answer(), "AQ==\r\n");

        let password = UpstreamAuth::Password {
            user: "u".into(),
            password: Secret::new("p".into()),
        };
        let exchange = Exchange::for_upstream(&password, MechanismSetting::Auto, ("h", 1), offers)
            .unwrap()
            .unwrap();
        assert_eq!(exchange.message.expose(), b"\0u\0p");
        assert_eq!(exchange.challenge_answer(), "*\r\n");
        let none = |_: &str| false;
        assert!(
            Exchange::for_upstream(&password, MechanismSetting::Auto, ("h", 1), none)
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            Exchange::for_upstream(&bearer, MechanismSetting::Auto, ("h", 1), none),
            Err(BackendError::NoMechanism)
        ));
    }

    #[test]
    fn auto_prefers_xoauth2() {
        let both = |name: &str| name == "XOAUTH2" || name == "OAUTHBEARER";
        assert_eq!(
            Mechanism::choose(MechanismSetting::Auto, both),
            Some(Mechanism::XOAuth2)
        );
        assert_eq!(
            Mechanism::choose(MechanismSetting::Auto, |n| n == "OAUTHBEARER"),
            Some(Mechanism::OAuthBearer)
        );
        assert_eq!(Mechanism::choose(MechanismSetting::Auto, |_| false), None);
    }
}

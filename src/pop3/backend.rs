//! POP3 upstream login: greeting, CAPA (RFC 2449), STLS if configured (RFC 2595), then AUTH
//! with a bearer token (RFC 5034, RFC 7628) or a password (AUTH PLAIN, else USER/PASS),
//! leaving the stream in the TRANSACTION state, ready to splice.

use std::io;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::config::TlsMode;
use crate::forward::Origin;
use crate::io::{BoxedIo, LINGER_TIMEOUT, read_more, replaying, say_goodbye};
use crate::login::{BackendError, Upstream, UpstreamAuth};
use crate::sanitize;
use crate::sasl::{self, Exchange};
use crate::secret::Secret;
use crate::upstream::Connector;

/// RFC 5034 4: an AUTH command with its initial response must fit RFC 2449 4's 255 octets
/// (CRLF included); a longer one goes after the server's `+ `. Dovecot takes longer lines,
/// but other servers need not.
pub const MAX_INITIAL_RESPONSE_LINE: usize = 255;
/// RFC 2449 4 keeps response lines to 512 octets; challenges (RFC 5034 4 lifts the limit for
/// them) carry an error report of a few hundred. A line past this is a broken upstream.
const MAX_RESPONSE_LINE: usize = 8192;
/// A CAPA list longer than this is a broken upstream: real ones have about a dozen lines.
const MAX_CAPABILITY_LINES: usize = 256;
/// How long mailgate waits for any one command to be written and answered, and for the STLS
/// handshake. Dovecot answers a refused token about 2 s late and up to 15 s under its auth
/// penalty.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Logs in upstream and returns the authenticated stream with the upstream's `+OK` line as
/// the completion, for the client. The client's address goes only in a PROXY v2 header
/// (`forward_client: proxy_v2`, done by the connector): Dovecot's POP3 takes nothing else.
///
/// # Errors
/// - [`BackendError::Rejected`]: the upstream refused the login with `-ERR [AUTH]` or an
///   `-ERR` without a response code.
/// - [`BackendError::Protocol`]: a refusal that a fresh token would not fix
///   (`[SYS/TEMP]`, `[SYS/PERM]`, `[IN-USE]`, `[LOGIN-DELAY]`), or an unexpected response.
/// - [`BackendError::NoMechanism`]: no mechanism both sides speak.
/// - [`BackendError::Io`]: connect, TLS, read or write failed, or the upstream went silent.
///
/// No error carries the token or password, whichever command the upstream quoted it in.
pub async fn login(
    connector: &Connector,
    auth: &UpstreamAuth,
    origin: Option<&Origin>,
) -> Result<Upstream, BackendError> {
    unredacted_login(connector, auth, origin)
        .await
        .map_err(|error| error.without(&sasl::sent_forms(auth, None)))
}

/// The login's dialogue; its errors may still quote what was sent, so [`login`] redacts them.
async fn unredacted_login(
    connector: &Connector,
    auth: &UpstreamAuth,
    origin: Option<&Origin>,
) -> Result<Upstream, BackendError> {
    let (mut connection, capabilities) = open(connector, origin).await?;
    let offered = sasl_mechanisms(&capabilities);
    let offers = |name: &str| offered.iter().any(|offer| offer == name);
    let target = (connector.host(), connector.port());
    let exchange = Exchange::for_upstream(auth, connector.mechanism(), target, offers)?;
    let sent = sasl::sent_forms(auth, exchange.as_ref());
    let answer = match (&exchange, auth) {
        (Some(exchange), _) => connection.authenticate(exchange).await,
        (None, UpstreamAuth::Password { user, password }) => {
            connection.user_pass(user, password).await
        }
        (None, UpstreamAuth::Bearer { .. }) => Err(BackendError::NoMechanism),
    };
    let completion = answer.map_err(|error| error.without(&sent))?;
    Ok(Upstream {
        io: connection.into_io(),
        completion: sanitize::for_wire(&completion),
        account: None,
        xclient_guard: None,
    })
}

/// Opens a session as a login would, without a client (`proxy_v2`: a LOCAL header), and ends
/// it with `QUIT`: the health check of a pool's server. Nothing authenticates, so the session
/// never reaches the UPDATE state (RFC 1939 6) and the maildrop is untouched.
///
/// # Errors
/// As for [`login`]: connect, TLS or a read fails, or the greeting is `-ERR`.
pub async fn check_health(connector: &Connector) -> Result<(), BackendError> {
    let (mut connection, _) = open(connector, None).await?;
    say_goodbye(&mut connection.io, b"QUIT\r\n", LINGER_TIMEOUT).await;
    Ok(())
}

/// The part of a session shared by [`login`] and [`check_health`]: connects, reads the
/// greeting and the capabilities, and starts TLS when configured (reading the capabilities
/// again after it).
async fn open(
    connector: &Connector,
    origin: Option<&Origin>,
) -> Result<(Connection, Vec<String>), BackendError> {
    let mut connection = Connection::new(connector.connect(origin).await?);
    expect_ok(&connection.read_line().await?)?;
    let mut capabilities = connection.capabilities().await?;
    if connector.tls_mode() == TlsMode::Starttls {
        expect_ok(&connection.command(b"STLS\r\n").await?)?;
        // RFC 2595 4: bytes before the handshake must not be read as if they came after it.
        if !connection.buffer.is_empty() {
            return Err(BackendError::Protocol(
                "upstream sent data after its STLS response".to_owned(),
            ));
        }
        connection.io = connector.start_tls(connection.io).await?;
        // RFC 2595 4: capabilities learnt before TLS are forgotten.
        capabilities = connection.capabilities().await?;
    }
    tracing::debug!(
        capabilities = sanitize::for_log(&capabilities.join(", ")),
        "upstream capabilities"
    );
    Ok((connection, capabilities))
}

/// Upper-cased mechanism names from the `SASL` capability (RFC 2449 6.3).
fn sasl_mechanisms(capabilities: &[String]) -> Vec<String> {
    capabilities
        .iter()
        .filter_map(|line| {
            let mut words = line.split_ascii_whitespace();
            words
                .next()
                .is_some_and(|keyword| keyword.eq_ignore_ascii_case("SASL"))
                .then_some(words)
        })
        .flatten()
        .map(str::to_ascii_uppercase)
        .collect()
}

/// One response line, as read: `+OK ...`, `-ERR ...`, or a SASL challenge `+ ...`.
#[derive(Debug, PartialEq, Eq)]
enum Response {
    Ok(String),
    Err(String),
    Challenge,
}

impl Response {
    fn parse(line: &str) -> Result<Response, BackendError> {
        // RFC 1939 3: status indicators are upper case; RFC 5034 4: a challenge is `+ `.
        if line == "+OK" || line.starts_with("+OK ") {
            Ok(Response::Ok(line.to_owned()))
        } else if line == "-ERR" || line.starts_with("-ERR ") {
            Ok(Response::Err(line.to_owned()))
        } else if line == "+" || line.starts_with("+ ") {
            Ok(Response::Challenge)
        } else {
            Err(BackendError::Protocol(format!(
                "unexpected response: {}",
                sanitize::for_log(line)
            )))
        }
    }
}

/// The `+OK` line of a command other than the login, whose `-ERR` is no rejection of the
/// credentials (the upstream refuses STLS or CAPA, or its greeting says go away).
fn expect_ok(response: &Response) -> Result<(), BackendError> {
    match response {
        Response::Ok(_) => Ok(()),
        Response::Err(line) => Err(BackendError::Protocol(sanitize::for_log(line))),
        Response::Challenge => Err(BackendError::Protocol("unexpected challenge".to_owned())),
    }
}

/// The answer to a login: its `+OK` line, or the refusal classified.
///
/// RFC 3206: `[AUTH]`, like an `-ERR` without a code from servers that predate it, is about
/// the credentials, so a fresh token may help; `[SYS/TEMP]`, `[SYS/PERM]` (RFC 3206 4),
/// `[IN-USE]` and `[LOGIN-DELAY]` (RFC 2449 8.1) are not, whatever the token.
fn login_answer(response: Response) -> Result<String, BackendError> {
    match response {
        Response::Ok(line) => Ok(line),
        Response::Err(line) => {
            let text = sanitize::for_log(&line);
            let code = line
                .strip_prefix("-ERR [")
                .and_then(|rest| rest.split_once(']'))
                .map(|(code, _)| code.to_ascii_uppercase());
            match code.as_deref() {
                None | Some("AUTH") => Err(BackendError::Rejected(text)),
                Some(_) => Err(BackendError::Protocol(text)),
            }
        }
        Response::Challenge => Err(BackendError::Protocol(
            "challenge after the SASL exchange ended".to_owned(),
        )),
    }
}

/// An upstream stream with the bytes read past the last response line.
struct Connection {
    io: BoxedIo,
    buffer: Vec<u8>,
}

impl Connection {
    fn new(io: BoxedIo) -> Self {
        Self {
            io,
            buffer: Vec::new(),
        }
    }

    /// RFC 2449 5: the capability lines; none from a server that predates CAPA (`-ERR`).
    async fn capabilities(&mut self) -> Result<Vec<String>, BackendError> {
        if let Response::Err(_) = self.command(b"CAPA\r\n").await? {
            return Ok(Vec::new());
        }
        let mut lines = Vec::new();
        loop {
            let line = self.read_text().await?;
            if line == "." {
                return Ok(lines);
            }
            if lines.len() == MAX_CAPABILITY_LINES {
                return Err(BackendError::Protocol(format!(
                    "CAPA longer than {MAX_CAPABILITY_LINES} lines"
                )));
            }
            // RFC 1939 3: a line starting with `.` is byte-stuffed.
            lines.push(line.strip_prefix('.').unwrap_or(&line).to_owned());
        }
    }

    /// RFC 5034 4. The message goes on the AUTH line when it fits, else after `+ `; an error
    /// challenge after it (RFC 7628 3.2.2) is answered so that the server sends its `-ERR`.
    async fn authenticate(&mut self, exchange: &Exchange) -> Result<String, BackendError> {
        let mechanism = exchange.mechanism;
        tracing::debug!(mechanism, "authenticating upstream");
        let encoded = sasl::encode_base64(&exchange.message);
        // RFC 5034 4: `=` is an empty initial response.
        let response = match encoded.expose().as_str() {
            "" => "=",
            response => response,
        };
        let with_initial = Secret::new(format!("AUTH {mechanism} {response}\r\n"));
        let answer = if with_initial.expose().len() <= MAX_INITIAL_RESPONSE_LINE {
            self.command(with_initial.expose().as_bytes()).await?
        } else {
            let ready = self
                .command(format!("AUTH {mechanism}\r\n").as_bytes())
                .await?;
            if ready != Response::Challenge {
                return login_answer(ready);
            }
            let line = Secret::new(format!("{}\r\n", encoded.expose()));
            self.command(line.expose().as_bytes()).await?
        };
        if answer != Response::Challenge {
            return login_answer(answer);
        }
        tracing::debug!(mechanism, "upstream sent an error challenge");
        // XOAUTH2: an empty line; OAUTHBEARER: %x01 (RFC 7628 3.2.3); PLAIN: `*`.
        let last = self.command(exchange.challenge_answer().as_bytes()).await?;
        match login_answer(last) {
            Ok(_) => Err(BackendError::Protocol(
                "upstream accepted after an error challenge".to_owned(),
            )),
            error => error,
        }
    }

    /// RFC 1939 7: USER, then PASS; the password is the rest of the PASS line.
    async fn user_pass(
        &mut self,
        user: &str,
        password: &Secret<String>,
    ) -> Result<String, BackendError> {
        if user.contains(['\r', '\n']) || password.expose().contains(['\r', '\n']) {
            return Err(BackendError::Protocol(
                "credentials not sendable with USER/PASS".to_owned(),
            ));
        }
        tracing::debug!("logging in upstream with USER/PASS");
        let answer = self.command(format!("USER {user}\r\n").as_bytes()).await?;
        login_answer(answer)?;
        let pass = Secret::new(format!("PASS {}\r\n", password.expose()));
        let answer = self.command(pass.expose().as_bytes()).await?;
        login_answer(answer)
    }

    /// Writes `line` and reads the response line, within [`REPLY_TIMEOUT`] for both.
    async fn command(&mut self, line: &[u8]) -> Result<Response, BackendError> {
        let exchange = async {
            self.io.write_all(line).await?;
            self.io.flush().await?;
            self.read_text_now().await
        };
        let line = tokio::time::timeout(REPLY_TIMEOUT, exchange)
            .await
            .map_err(|_| timed_out())??;
        Response::parse(&line)
    }

    async fn read_line(&mut self) -> Result<Response, BackendError> {
        Response::parse(&self.read_text().await?)
    }

    /// The next line without its CRLF, within [`REPLY_TIMEOUT`].
    async fn read_text(&mut self) -> Result<String, BackendError> {
        tokio::time::timeout(REPLY_TIMEOUT, self.read_text_now())
            .await
            .map_err(|_| timed_out())?
    }

    async fn read_text_now(&mut self) -> Result<String, BackendError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                return Ok(String::from_utf8_lossy(line).into_owned());
            }
            if self.buffer.len() > MAX_RESPONSE_LINE {
                return Err(BackendError::Protocol(format!(
                    "upstream line longer than {MAX_RESPONSE_LINE} bytes"
                )));
            }
            read_more(&mut self.io, &mut self.buffer).await?;
        }
    }

    /// The stream, replaying anything the upstream sent after the last line read.
    fn into_io(self) -> BoxedIo {
        replaying(self.buffer, self.io)
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "upstream reply timed out")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(line: &str) -> Result<String, BackendError> {
        login_answer(Response::parse(line).unwrap())
    }

    #[test]
    fn responses() {
        assert_eq!(
            Response::parse("+OK Logged in.").unwrap(),
            Response::Ok("+OK Logged in.".to_owned())
        );
        assert_eq!(Response::parse("+ ").unwrap(), Response::Challenge);
        assert_eq!(Response::parse("+ eyJ9").unwrap(), Response::Challenge);
        assert_eq!(Response::parse("+").unwrap(), Response::Challenge);
        assert!(Response::parse("+OKAY").is_err());
        assert!(Response::parse("* OK imap").is_err());
    }

    #[test]
    fn refusals_are_classified_by_response_code() {
        assert_eq!(answer("+OK Logged in.").unwrap(), "+OK Logged in.");
        for rejected in ["-ERR [AUTH] Authentication failed.", "-ERR bad", "-ERR"] {
            assert!(
                matches!(answer(rejected), Err(BackendError::Rejected(_))),
                "{rejected}"
            );
        }
        for temporary in [
            "-ERR [SYS/TEMP] Try later",
            "-ERR [SYS/PERM] Broken",
            "-ERR [IN-USE] Locked",
            "-ERR [LOGIN-DELAY] Wait",
        ] {
            assert!(
                matches!(answer(temporary), Err(BackendError::Protocol(_))),
                "{temporary}"
            );
        }
    }

    #[test]
    fn mechanisms_from_the_sasl_capability() {
        let lines = vec![
            "TOP".to_owned(),
            "sasl PLAIN xoauth2 OAUTHBEARER".to_owned(),
        ];
        assert_eq!(sasl_mechanisms(&lines), ["PLAIN", "XOAUTH2", "OAUTHBEARER"]);
        assert!(sasl_mechanisms(&["USER".to_owned()]).is_empty());
    }
}

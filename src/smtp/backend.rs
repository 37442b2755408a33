//! The upstream side: greeting, EHLO, optional STARTTLS (RFC 3207), then SASL AUTH with a
//! bearer token or password (RFC 4954, RFC 7628), leaving an authenticated stream.
//!
//! Replies are framed with smtp-proto's incremental `ResponseReceiver`: it handles multi-line
//! replies, keeps the extension lines as text (`EhloResponse` would fold unknown keywords into
//! a bitmask) and caps a reply at `MAX_RESPONSE_LENGTH` bytes.

use std::io;
use std::net::IpAddr;
use std::str::SplitAsciiWhitespace;
use std::time::Duration;

use smtp_proto::Response;
use smtp_proto::response::parser::{MAX_RESPONSE_LENGTH, ResponseReceiver};
use tokio::time::Instant;

use crate::config::{ForwardClient, TlsMode};
use crate::forward::{Forwarded, Origin};
use crate::io::{BoxedIo, LINGER_TIMEOUT, read_more, replaying, say_goodbye, write_all_by};
use crate::login::{BackendError, Upstream, UpstreamAuth, XclientGuard};
use crate::sanitize;
use crate::sasl::{self, Exchange};
use crate::secret::Secret;
use crate::upstream::Connector;

/// RFC 5321 4.5.3.1.4: servers need not accept command lines over 512 octets (CRLF included);
/// Dovecot refuses AUTH lines over about 1020. Longer initial responses go after a `334`.
pub const MAX_INITIAL_RESPONSE_LINE: usize = 512;
/// How long mailgate waits for any one upstream reply. Dovecot delays a refusal by about 2 s
/// and up to 15 s under its auth penalty; RFC 5321 4.5.3.2 allows servers minutes, but a
/// client waiting at a login prompt does not.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Logs in upstream and returns the authenticated stream with the final `235` reply. With
/// `forward_client: xclient` and the client's `origin`, the upstream learns the client's
/// address by XCLIENT first, if it offers it.
///
/// # Errors
/// [`BackendError::Rejected`] for a refused login (`535` and other non-syntax `5xx`),
/// [`BackendError::NoMechanism`] when no usable AUTH mechanism is offered,
/// [`BackendError::Protocol`] for unexpected or temporary (`4xx`) replies,
/// [`BackendError::Io`] when the connection fails, closes, or a reply times out.
///
/// No error carries the token or password, whichever command the upstream quoted it in.
pub async fn login(
    connector: &Connector,
    auth: &UpstreamAuth,
    helo: &str,
    origin: Option<&Origin>,
) -> Result<Upstream, BackendError> {
    unredacted_login(connector, auth, helo, origin)
        .await
        .map_err(|error| error.without(&sasl::sent_forms(auth, None)))
}

/// The login's dialogue; its errors may still quote what was sent, so [`login`] redacts them.
async fn unredacted_login(
    connector: &Connector,
    auth: &UpstreamAuth,
    helo: &str,
    origin: Option<&Origin>,
) -> Result<Upstream, BackendError> {
    let (mut connection, extensions) = open(connector, helo, origin).await?;
    tracing::debug!(
        extensions = sanitize::for_log(&extensions.join(", ")),
        "upstream EHLO extensions"
    );
    let xclient_guard =
        (connector.forward_client() == ForwardClient::Xclient).then(|| XclientGuard {
            chunking: extension(&extensions, "CHUNKING").next().is_some(),
        });
    let offered = auth_mechanisms(&extensions);
    let offers = |name: &str| offered.iter().any(|offer| offer == name);
    let target = (connector.host(), connector.port());
    let exchange = Exchange::for_upstream(auth, connector.mechanism(), target, offers)?
        .ok_or(BackendError::NoMechanism)?;
    let sent = sasl::sent_forms(auth, Some(&exchange));
    let reply = authenticate(&mut connection, &exchange)
        .await
        .and_then(|reply| match reply.code {
            235 => Ok(reply),
            _ => Err(classify(&reply)),
        })
        .map_err(|error| error.without(&sent))?;
    Ok(Upstream {
        completion: completion_line(&reply),
        io: connection.into_io(),
        account: None,
        xclient_guard,
    })
}

/// Connects, reads the greeting, says EHLO (again after STARTTLS when configured) and returns
/// the extension lines as sent, without the host name line; then QUITs. There is no client,
/// so nothing is forwarded (`proxy_v2`: a LOCAL header). Also the health check of a pool's
/// server: nothing authenticates.
///
/// # Errors
/// As for [`login`], except that no authentication is attempted: a greeting other than `220`
/// (`421`, `554`) is an error.
pub async fn probe_extensions(
    connector: &Connector,
    helo: &str,
) -> Result<Vec<String>, BackendError> {
    let (mut connection, extensions) = open(connector, helo, None).await?;
    // A polite goodbye; the extensions are already known, so its answer does not matter.
    say_goodbye(&mut connection.io, b"QUIT\r\n", LINGER_TIMEOUT).await;
    Ok(extensions)
}

/// The part of a session shared by [`login`] and [`probe_extensions`].
async fn open(
    connector: &Connector,
    helo: &str,
    origin: Option<&Origin>,
) -> Result<(Connection, Vec<String>), BackendError> {
    let mut connection = Connection::new(connector.connect(origin).await?);
    expect(connection.read_reply().await?, 220)?;
    let ehlo = format!("EHLO {helo}\r\n");
    let mut extensions = ehlo_extensions(connection.command(ehlo.as_bytes()).await?)?;
    if connector.tls_mode() == TlsMode::Starttls {
        expect(connection.command(b"STARTTLS\r\n").await?, 220)?;
        // RFC 3207 6: bytes received before the handshake must not be trusted after it.
        if !connection.buffer.is_empty() {
            return Err(BackendError::Protocol(
                "upstream sent data after its STARTTLS reply".to_owned(),
            ));
        }
        connection.io = connector.start_tls(connection.io).await?;
        // RFC 3207 4.2: everything learnt before TLS is discarded.
        extensions = ehlo_extensions(connection.command(ehlo.as_bytes()).await?)?;
    }
    if let Some(origin) = origin.filter(|_| connector.forward_client() == ForwardClient::Xclient) {
        extensions = xclient(&mut connection, connector, origin, &ehlo, extensions).await?;
    }
    Ok((connection, extensions))
}

/// Postfix's XCLIENT (XCLIENT_README): the upstream takes the client's address as the
/// session's, greets anew (`220`) and expects EHLO again. Not offered or refused, the session
/// goes on as it was: the login still works, the operator is told once and the metric counts.
async fn xclient(
    connection: &mut Connection,
    connector: &Connector,
    origin: &Origin,
    ehlo: &str,
    extensions: Vec<String>,
) -> Result<Vec<String>, BackendError> {
    if extension(&extensions, "XCLIENT").next().is_none() {
        connector.forwarded(Forwarded::NotOffered);
        return Ok(extensions);
    }
    let reply = connection
        .command(xclient_command(origin).as_bytes())
        .await?;
    if reply.code != 220 {
        tracing::debug!(reply = reply_text(&reply), "upstream refused XCLIENT");
        connector.forwarded(Forwarded::Refused);
        return Ok(extensions);
    }
    connector.forwarded(Forwarded::Sent);
    ehlo_extensions(connection.command(ehlo.as_bytes()).await?)
}

/// `XCLIENT ADDR=... PORT=...`, IPv6 addresses prefixed `IPV6:`. The values are socket
/// addresses, so they need no xtext encoding (RFC 3461 4: only `+`, `=` and controls do).
fn xclient_command(origin: &Origin) -> String {
    let address = match origin.client.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("IPV6:{ip}"),
    };
    format!("XCLIENT ADDR={address} PORT={}\r\n", origin.client.port())
}

/// Sends the AUTH command and SASL response; returns the final reply.
async fn authenticate(
    connection: &mut Connection,
    exchange: &Exchange,
) -> Result<Response<String>, BackendError> {
    let name = exchange.mechanism;
    tracing::debug!(mechanism = name, "authenticating upstream");
    let encoded = sasl::encode_base64(&exchange.message);
    let with_initial = Secret::new(format!("AUTH {name} {}\r\n", encoded.expose()));
    let reply = if with_initial.expose().len() <= MAX_INITIAL_RESPONSE_LINE {
        connection.command(with_initial.expose().as_bytes()).await?
    } else {
        let ready = connection
            .command(format!("AUTH {name}\r\n").as_bytes())
            .await?;
        if ready.code != 334 {
            return Err(classify(&ready));
        }
        let response = Secret::new(format!("{}\r\n", encoded.expose()));
        connection.command(response.expose().as_bytes()).await?
    };
    if reply.code != 334 {
        return Ok(reply);
    }
    // RFC 7628 3.2.3: a challenge after the token reports the error; the client acknowledges
    // it and the server then sends its final failure. PLAIN has no such step: cancel.
    let answer = exchange.challenge_answer();
    let last = connection.command(answer.as_bytes()).await?;
    if last.code == 235 {
        return Err(BackendError::Protocol(
            "upstream accepted after an error challenge".to_owned(),
        ));
    }
    Ok(last)
}

/// Classifies a reply that is not the expected one.
///
/// `5xx` is a refusal, except `50x` (RFC 5321 4.2.1: syntax, or not implemented), which means
/// mailgate spoke wrongly and a fresh token would not help; `4xx` is temporary.
fn classify(reply: &Response<String>) -> BackendError {
    let text = reply_text(reply);
    match reply.code {
        500..=509 => BackendError::Protocol(text),
        510..=599 => BackendError::Rejected(text),
        _ => BackendError::Protocol(text),
    }
}

/// The reply to a command other than AUTH, if it has `code`. Any other reply is a protocol
/// error, `5xx` included: a refused greeting (`421`, `554`), EHLO or STARTTLS says nothing of
/// the credentials, so a fresh token would not help.
fn expect(reply: Response<String>, code: u16) -> Result<Response<String>, BackendError> {
    if reply.code == code {
        Ok(reply)
    } else {
        Err(BackendError::Protocol(reply_text(&reply)))
    }
}

/// The extension lines of a `250` EHLO reply, after the host name line. Lines with anything
/// but printable ASCII are dropped: they may be relayed to clients (RFC 5321 4.1.1.1 allows
/// nothing else in an ehlo-line).
fn ehlo_extensions(reply: Response<String>) -> Result<Vec<String>, BackendError> {
    let reply = expect(reply, 250)?;
    Ok(reply
        .message
        .split('\n')
        .skip(1)
        .map(str::trim)
        .filter(|line| !line.is_empty() && line.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .map(str::to_owned)
        .collect())
}

/// The parameters of each extension line with `keyword`, compared case-insensitively
/// (RFC 5321 2.4).
fn extension<'a>(
    extensions: &'a [String],
    keyword: &'a str,
) -> impl Iterator<Item = SplitAsciiWhitespace<'a>> {
    extensions.iter().filter_map(move |line| {
        let mut words = line.split_ascii_whitespace();
        words.next()?.eq_ignore_ascii_case(keyword).then_some(words)
    })
}

/// Upper-cased mechanism names from the `AUTH` extension line (RFC 4954 3).
fn auth_mechanisms(extensions: &[String]) -> Vec<String> {
    extension(extensions, "AUTH")
        .flatten()
        .map(str::to_ascii_uppercase)
        .collect()
}

/// A reply as one line of text for errors and logs, lines joined by `/`, made safe to log:
/// some servers echo the offending command, and with it the token, in their error text.
fn reply_text(reply: &Response<String>) -> String {
    let text = reply
        .message
        .split('\n')
        .map(sanitize::for_log)
        .collect::<Vec<_>>()
        .join(" / ");
    format!("{}{text}", status_prefix(reply))
}

/// The upstream's final reply to relay to the client as one line: its first line, printable
/// ASCII only, e.g. `235 2.7.0 Logged in.`.
fn completion_line(reply: &Response<String>) -> String {
    let first = reply.message.split('\n').next().unwrap_or_default();
    sanitize::for_wire(&format!("{}{first}", status_prefix(reply)))
}

/// `235 2.7.0 ` or, without an enhanced status code, `235 `.
fn status_prefix(reply: &Response<String>) -> String {
    match reply.esc {
        [0, _, _] => format!("{} ", reply.code),
        [class, subject, detail] => format!("{} {class}.{subject}.{detail} ", reply.code),
    }
}

/// An upstream stream with the bytes read past the last reply.
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

    /// Sends `line` and reads the reply, each within [`REPLY_TIMEOUT`].
    async fn command(&mut self, line: &[u8]) -> Result<Response<String>, BackendError> {
        write_all_by(&mut self.io, line, Instant::now() + REPLY_TIMEOUT).await?;
        self.read_reply().await
    }

    /// Reads one complete reply, multi-line included; bytes after it stay buffered.
    async fn read_reply(&mut self) -> Result<Response<String>, BackendError> {
        tokio::time::timeout(REPLY_TIMEOUT, self.receive())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream reply timed out"))?
    }

    async fn receive(&mut self) -> Result<Response<String>, BackendError> {
        let mut receiver = ResponseReceiver::default();
        loop {
            let mut bytes = self.buffer.iter();
            let result = receiver.parse(&mut bytes);
            let consumed = self.buffer.len() - bytes.len();
            self.buffer.drain(..consumed);
            match result {
                Ok(reply) => return Ok(reply),
                Err(smtp_proto::Error::NeedsMoreData { .. }) => {
                    read_more(&mut self.io, &mut self.buffer).await?
                }
                Err(smtp_proto::Error::ResponseTooLong) => {
                    return Err(BackendError::Protocol(format!(
                        "upstream reply longer than {MAX_RESPONSE_LENGTH} bytes"
                    )));
                }
                Err(error) => {
                    return Err(BackendError::Protocol(format!(
                        "malformed upstream reply: {error:?}"
                    )));
                }
            }
        }
    }

    /// The stream, replaying anything the upstream sent after the last reply.
    fn into_io(self) -> BoxedIo {
        replaying(self.buffer, self.io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Response<String> {
        ResponseReceiver::default()
            .parse(&mut text.as_bytes().iter())
            .unwrap()
    }

    #[test]
    fn multi_line_ehlo_keeps_lines_as_text() {
        let reply = parse("250-mx.example\r\n250-8BITMIME\r\n250-SIZE 100\r\n250 AUTH XOAUTH2\r\n");
        assert_eq!(
            ehlo_extensions(reply).unwrap(),
            ["8BITMIME", "SIZE 100", "AUTH XOAUTH2"]
        );
    }

    #[test]
    fn extension_lines_with_control_characters_are_dropped() {
        let reply = parse(
            "250-mx\r\n250-SIZE 1000 \x1b]0;owned\x07\r\n250-8BITMIME \x00nul\r\n250 PIPELINING\r\n",
        );
        assert_eq!(ehlo_extensions(reply).unwrap(), ["PIPELINING"]);
    }

    #[test]
    fn mechanisms_from_the_auth_line() {
        let lines = vec!["SIZE 1".to_owned(), "auth xoauth2 OAuthBearer".to_owned()];
        assert_eq!(auth_mechanisms(&lines), ["XOAUTH2", "OAUTHBEARER"]);
    }

    #[test]
    fn xclient_lines() {
        let origin =
            |client: &str| Origin::new(client.parse().ok(), "127.0.0.1:587".parse().ok()).unwrap();
        assert_eq!(
            xclient_command(&origin("127.0.0.2:50000")),
            "XCLIENT ADDR=127.0.0.2 PORT=50000\r\n"
        );
        assert_eq!(
            xclient_command(&origin("[2001:db8::2]:1025")),
            "XCLIENT ADDR=IPV6:2001:db8::2 PORT=1025\r\n"
        );
        assert_eq!(
            xclient_command(&origin("[::ffff:192.0.2.1]:7")),
            "XCLIENT ADDR=192.0.2.1 PORT=7\r\n"
        );
    }

    #[test]
    fn extension_keywords_are_case_insensitive() {
        let lines = vec!["xclient ADDR PORT".to_owned(), "SIZE 1".to_owned()];
        assert_eq!(extension(&lines, "XCLIENT").count(), 1);
        assert_eq!(extension(&lines, "AUTH").count(), 0);
    }

    #[test]
    fn classification() {
        let refused = parse("535 5.7.8 Authentication failed\r\n");
        assert!(
            matches!(classify(&refused), BackendError::Rejected(text) if text == "535 5.7.8 Authentication failed")
        );
        let too_long = parse("500 5.5.2 Line too long\r\n");
        assert!(matches!(classify(&too_long), BackendError::Protocol(_)));
        let echo = format!("500 5.5.2 Unknown: AUTH XOAUTH2 {}\r\n", "QUFB".repeat(20));
        assert_eq!(
            classify(&parse(&echo)).to_string(),
            "upstream protocol error: 500 5.5.2 Unknown: AUTH XOAUTH2 [redacted]"
        );
        let later = parse("454 4.7.0 Temporary failure\r\n");
        assert!(matches!(classify(&later), BackendError::Protocol(_)));
    }
}

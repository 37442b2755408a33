//! IMAP upstream login: greeting, STARTTLS if configured, capabilities, then AUTHENTICATE with
//! a bearer token (XOAUTH2 / OAUTHBEARER) or a password, leaving the stream ready to splice.

use std::io;
use std::time::Duration;

use imap_codec::decode::Decoder;
use imap_codec::encode::{Encoder, Fragment};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::imap_types::response::{
    Capability, Code, Data, GreetingKind, Response, Status, StatusKind,
};
use imap_codec::{CommandCodec, GreetingCodec, ResponseCodec};
use tokio::time::Instant;

use crate::config::{ForwardClient, TlsMode};
use crate::forward::{Forwarded, Origin};
use crate::frontend::framer::Framer;
use crate::io::{BoxedIo, LINGER_TIMEOUT, replaying, say_goodbye, write_all_by};
use crate::login::{BackendError, Upstream, UpstreamAuth};
use crate::sanitize;
use crate::sasl::{self, Exchange};
use crate::secret::Secret;
use crate::upstream::Connector;

/// Largest upstream response read during login. Greetings and CAPABILITY lines are a few
/// hundred bytes; this bounds what a misbehaving server can make us hold.
const MAX_RESPONSE_SIZE: u32 = 64 * 1024;

/// How long to wait for upstream bytes during login. Dovecot answers a refused token about 2 s
/// late and delays repeated failures up to 15 s; twice that still catches a dead server.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Logs in upstream and returns the stream in the authenticated state. With
/// `forward_client: id` and the client's `origin`, an `ID` with the client's address goes
/// first, in the same write as the login command, if the upstream offers ID.
///
/// [`Upstream::completion`] is the upstream's tagged OK after the tag, e.g.
/// `OK [CAPABILITY IMAP4rev1 ...] Logged in`, for the front end to relay under the client's tag.
/// Bytes the upstream sent after that line stay in [`Upstream::io`].
///
/// # Errors
/// - [`BackendError::Rejected`]: the upstream answered the login with `NO`.
/// - [`BackendError::NoMechanism`]: no mechanism both sides speak.
/// - [`BackendError::Protocol`]: an unexpected greeting or response, `BAD`, `BYE`.
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
    if let Some(origin) = origin.filter(|_| connector.forward_client() == ForwardClient::Id) {
        // RFC 2971 3: servers that take ID say so in CAPABILITY; others would answer BAD.
        if capabilities.has("ID") {
            connection.queue_id(origin);
        } else {
            connector.forwarded(Forwarded::NotOffered);
        }
    }
    let offers = |name: &str| capabilities.offers_mechanism(name);
    let target = (connector.host(), connector.port());
    let exchange = Exchange::for_upstream(auth, connector.mechanism(), target, offers)?;
    let sent = sasl::sent_forms(auth, exchange.as_ref());
    let completion = match (exchange, auth) {
        (Some(exchange), _) => {
            let initial_response = capabilities.has("SASL-IR");
            connection.authenticate(&exchange, initial_response).await
        }
        // A password without AUTHENTICATE PLAIN: the LOGIN command, unless it is disabled.
        (None, UpstreamAuth::Password { user, password }) if !capabilities.has("LOGINDISABLED") => {
            connection.login_command(user, password).await
        }
        (None, _) => return Err(BackendError::NoMechanism),
    };
    if let Some(outcome) = connection.id_outcome() {
        connector.forwarded(outcome);
    }
    let completion = completion
        .and_then(Completion::into_result)
        .map_err(|error| error.without(&sent))?;
    Ok(Upstream {
        io: connection.into_io(),
        completion: sanitize::for_wire(&completion),
        account: None,
        xclient_guard: None,
    })
}

/// Opens a session as a login would, without a client (`proxy_v2`: a LOCAL header), and ends
/// it with `LOGOUT`: the health check of a pool's server. Nothing authenticates.
///
/// # Errors
/// As for [`login`]: connect, TLS or a read fails, or the greeting is not `OK`.
pub async fn check_health(connector: &Connector) -> Result<(), BackendError> {
    let (mut connection, _) = open(connector, None).await?;
    let tag = connection.next_tag();
    say_goodbye(
        &mut connection.io,
        format!("{tag} LOGOUT\r\n").as_bytes(),
        LINGER_TIMEOUT,
    )
    .await;
    Ok(())
}

/// The part of a session shared by [`login`] and [`check_health`]: connects, reads the
/// greeting, starts TLS when configured and learns the capabilities (from the greeting, else
/// by CAPABILITY).
async fn open(
    connector: &Connector,
    origin: Option<&Origin>,
) -> Result<(Connection, Capabilities), BackendError> {
    let mut connection = Connection::new(connector.connect(origin).await?);
    let mut capabilities = connection.greeting().await?;
    if connector.tls_mode() == TlsMode::Starttls {
        let plain = connection.starttls().await?;
        connection = Connection::new(connector.start_tls(plain).await?);
        // RFC 9051 6.2.1: capabilities learnt before TLS must be forgotten.
        capabilities = None;
    }
    let capabilities = match capabilities {
        Some(capabilities) => capabilities,
        None => connection.capability().await?,
    };
    tracing::debug!(
        capabilities = sanitize::for_log(&capabilities.0.join(" ")),
        "upstream capabilities"
    );
    Ok((connection, capabilities))
}

/// Capability names as the upstream advertised them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Capabilities(Vec<String>);

impl Capabilities {
    fn from_codec(list: &[Capability<'_>]) -> Self {
        Self(list.iter().map(ToString::to_string).collect())
    }

    /// Capability names compare case-insensitively (RFC 9051 7.2.2).
    fn has(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|offered| offered.eq_ignore_ascii_case(name))
    }

    fn offers_mechanism(&self, mechanism: &str) -> bool {
        self.has(&format!("AUTH={mechanism}"))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one upstream response means to the login.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A continuation request (`+ ...`).
    Continue,
    /// The tagged completion of our command.
    Done(Completion),
    /// An untagged CAPABILITY response.
    Capabilities(Capabilities),
    /// The upstream is closing.
    Bye(String),
    /// Another untagged response, which the login does not need.
    Other,
}

/// A tagged completion.
#[derive(Debug, PartialEq, Eq)]
struct Completion {
    kind: StatusKind,
    /// The line after the tag, without CRLF: `OK [CAPABILITY ...] Logged in`.
    line: String,
    /// The text after any response code.
    text: String,
    has_code: bool,
}

impl Completion {
    /// # Errors
    /// `NO` is a rejection, `BAD` a protocol error; their text is made safe to log, since
    /// some servers echo the command (and with it the token).
    fn into_result(self) -> Result<String, BackendError> {
        match self.kind {
            StatusKind::Ok => Ok(self.line),
            StatusKind::No => Err(BackendError::Rejected(sanitize::for_log(&self.line))),
            StatusKind::Bad => Err(BackendError::Protocol(sanitize::for_log(&self.line))),
        }
    }

    /// For commands other than the login, a `NO` is not about credentials: the upstream is
    /// unusable (e.g. it refuses STARTTLS), so a fresh token would not help.
    fn into_protocol_result(self) -> Result<String, BackendError> {
        self.into_result().map_err(|error| match error {
            BackendError::Rejected(text) => BackendError::Protocol(text),
            other => other,
        })
    }

    /// Adds the capabilities announced in an untagged response to a bare `OK`, so clients that
    /// only look at the completion (RFC 9051 6.2.2 allows it) still learn them.
    fn with_capabilities(mut self, capabilities: Option<Capabilities>) -> Self {
        if let (StatusKind::Ok, false, Some(capabilities)) =
            (self.kind, self.has_code, capabilities)
        {
            self.line = format!("OK [CAPABILITY {}] {}", capabilities.0.join(" "), self.text);
            self.has_code = true;
        }
        self
    }
}

/// Interprets a decoded response; `message` is its raw bytes, `tag` the tag we wait for.
fn classify(response: &Response<'_>, message: &[u8], tag: &str) -> Result<Event, BackendError> {
    let event = match response {
        Response::CommandContinuationRequest(_) => Event::Continue,
        Response::Data(Data::Capability(list)) => {
            Event::Capabilities(Capabilities::from_codec(list.as_ref()))
        }
        Response::Status(Status::Bye(bye)) => Event::Bye(bye.text.as_ref().to_owned()),
        Response::Status(Status::Tagged(tagged)) if tagged.tag.as_ref() == tag => {
            let line = message.get(tag.len() + 1..).unwrap_or_default();
            let line = String::from_utf8_lossy(line).trim_end().to_owned();
            Event::Done(Completion {
                kind: tagged.body.kind,
                line,
                text: tagged.body.text.as_ref().to_owned(),
                has_code: tagged.body.code.is_some(),
            })
        }
        Response::Status(Status::Tagged(tagged)) => {
            return Err(BackendError::Protocol(format!(
                "response for unknown tag {}",
                sanitize::for_log(tagged.tag.as_ref())
            )));
        }
        Response::Data(_) | Response::Status(Status::Untagged(_)) => Event::Other,
    };
    Ok(event)
}

/// Capabilities from a greeting, if it carried any; `Err` unless the greeting is `OK`.
fn greeting_capabilities(message: &[u8]) -> Result<Option<Capabilities>, BackendError> {
    let (_, greeting) = GreetingCodec::new()
        .decode(message)
        .map_err(|_| BackendError::Protocol("malformed greeting".to_owned()))?;
    match greeting.kind {
        GreetingKind::Ok => Ok(match greeting.code {
            Some(Code::Capability(list)) => Some(Capabilities::from_codec(list.as_ref())),
            _ => None,
        }),
        // PREAUTH would skip our login; BYE means it will not talk to us.
        GreetingKind::PreAuth | GreetingKind::Bye => Err(BackendError::Protocol(format!(
            "greeting: {}",
            sanitize::for_log(greeting.text.as_ref())
        ))),
    }
}

/// RFC 2971 `ID` with the keys Dovecot takes from trusted peers (`login_trusted_networks`) as
/// the client's: the values are socket addresses and ports, which need no escaping in a quoted
/// string (RFC 9051 4.3).
fn id_command(tag: &str, origin: &Origin) -> String {
    let (client, local) = (origin.client, origin.local);
    format!(
        "{tag} ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \
         \"x-connected-ip\" \"{}\" \"x-connected-port\" \"{}\")\r\n",
        client.ip(),
        client.port(),
        local.ip(),
        local.port()
    )
}

/// The client-address `ID` (`forward_client: id`) through its life: it is written with the
/// login's first line (RFC 9051 5.5 pipelining: ID changes no state the login depends on),
/// and its completion, which arrives first, is read before the login's responses.
enum PipelinedId {
    None,
    Queued { tag: String, command: String },
    Sent { tag: String },
    Answered(StatusKind),
}

/// The upstream stream during login, with its framer and tag counter.
struct Connection {
    io: BoxedIo,
    framer: Framer,
    tags: u32,
    /// Capabilities from untagged responses since the last command.
    announced: Option<Capabilities>,
    id: PipelinedId,
}

impl Connection {
    fn new(io: BoxedIo) -> Self {
        Self {
            io,
            framer: Framer::new(MAX_RESPONSE_SIZE),
            tags: 0,
            announced: None,
            id: PipelinedId::None,
        }
    }

    /// Makes the next command go out after an `ID` with the client's addresses.
    fn queue_id(&mut self, origin: &Origin) {
        let tag = self.next_tag();
        let command = id_command(&tag, origin);
        self.id = PipelinedId::Queued { tag, command };
    }

    /// What became of the queued `ID`, once the upstream answered it.
    fn id_outcome(&self) -> Option<Forwarded> {
        match self.id {
            PipelinedId::Answered(StatusKind::Ok) => Some(Forwarded::Sent),
            PipelinedId::Answered(_) => Some(Forwarded::Refused),
            PipelinedId::None | PipelinedId::Queued { .. } | PipelinedId::Sent { .. } => None,
        }
    }

    fn next_tag(&mut self) -> String {
        self.tags += 1;
        format!("M{}", self.tags)
    }

    async fn greeting(&mut self) -> Result<Option<Capabilities>, BackendError> {
        self.read_message().await?;
        greeting_capabilities(self.framer.fragmentizer().message_bytes())
    }

    /// RFC 9051 6.2.1. Returns the plain stream for the TLS handshake.
    ///
    /// # Errors
    /// The upstream refused, or sent bytes after its OK: those would be read as if they had
    /// come through TLS (the STARTTLS command injection problem, RFC 9051 11.1).
    async fn starttls(mut self) -> Result<BoxedIo, BackendError> {
        let tag = self.next_tag();
        self.send(format!("{tag} STARTTLS\r\n").as_bytes()).await?;
        self.completion(&tag).await?.into_protocol_result()?;
        let (rest, io) = (self.framer.into_unparsed(), self.io);
        if !rest.is_empty() {
            return Err(BackendError::Protocol(
                "data after the STARTTLS response".to_owned(),
            ));
        }
        Ok(io)
    }

    async fn capability(&mut self) -> Result<Capabilities, BackendError> {
        let tag = self.next_tag();
        self.send(format!("{tag} CAPABILITY\r\n").as_bytes())
            .await?;
        self.completion(&tag).await?.into_protocol_result()?;
        self.announced
            .take()
            .filter(|capabilities| !capabilities.is_empty())
            .ok_or_else(|| BackendError::Protocol("no CAPABILITY response".to_owned()))
    }

    /// RFC 9051 6.2.2. An error challenge after our response (RFC 7628 3.2.2) is answered
    /// so the server can send its tagged NO.
    async fn authenticate(
        &mut self,
        exchange: &Exchange,
        initial_response: bool,
    ) -> Result<Completion, BackendError> {
        let tag = self.next_tag();
        let mechanism = exchange.mechanism;
        tracing::debug!(mechanism, "authenticating upstream");
        let encoded = sasl::encode_base64(&exchange.message);
        // RFC 4959: `=` stands for an empty initial response.
        let response = match encoded.expose().as_str() {
            "" => "=",
            response => response,
        };
        if initial_response {
            let command = Secret::new(format!("{tag} AUTHENTICATE {mechanism} {response}\r\n"));
            self.send(command.expose().as_bytes()).await?;
        } else {
            self.send(format!("{tag} AUTHENTICATE {mechanism}\r\n").as_bytes())
                .await?;
            if let Some(completion) = self.until_continue(&tag).await? {
                return Ok(completion);
            }
            let line = Secret::new(format!("{}\r\n", encoded.expose()));
            self.send(line.expose().as_bytes()).await?;
        }
        if let Some(completion) = self.until_continue(&tag).await? {
            return Ok(completion);
        }
        tracing::debug!(mechanism, "upstream sent an error challenge");
        // RFC 7628 3.2.2 acknowledgement, or RFC 9051 6.2.2 `*` (the server answers BAD).
        let answer = exchange.challenge_answer();
        self.send(answer.as_bytes()).await?;
        match self.until_continue(&tag).await? {
            Some(completion) => Ok(completion),
            None => Err(BackendError::Protocol(
                "second challenge after the failure acknowledgement".to_owned(),
            )),
        }
    }

    /// LOGIN with the user name and password as imap-codec encodes them (atom, quoted or
    /// literal), waiting for the continuation before each synchronizing literal.
    async fn login_command(
        &mut self,
        user: &str,
        password: &Secret<String>,
    ) -> Result<Completion, BackendError> {
        let tag = self.next_tag();
        let unsendable = || BackendError::Protocol("credentials not sendable with LOGIN".into());
        let body =
            CommandBody::login(user, password.expose().as_str()).map_err(|_| unsendable())?;
        let command = Command::new(tag.as_str(), body).map_err(|_| unsendable())?;
        tracing::debug!("logging in upstream with LOGIN");
        for fragment in CommandCodec::new().encode(&command) {
            let data = match fragment {
                Fragment::Line { data }
                | Fragment::Literal {
                    data,
                    mode: LiteralMode::NonSync,
                } => data,
                Fragment::Literal {
                    data,
                    mode: LiteralMode::Sync,
                } => match self.until_continue(&tag).await? {
                    // The server refused the literal.
                    Some(completion) => return Ok(completion),
                    None => data,
                },
            };
            self.send(Secret::new(data).expose()).await?;
        }
        self.completion(&tag).await
    }

    /// Reads until our tagged completion, collecting untagged capabilities.
    async fn completion(&mut self, tag: &str) -> Result<Completion, BackendError> {
        let completion = self.until_continue(tag).await?;
        completion.ok_or_else(|| BackendError::Protocol("unexpected continuation".to_owned()))
    }

    /// Reads until a continuation request (`None`) or our tagged completion (`Some`), after
    /// the completion of a pipelined `ID`.
    async fn until_continue(&mut self, tag: &str) -> Result<Option<Completion>, BackendError> {
        if let PipelinedId::Sent { tag: id_tag } =
            std::mem::replace(&mut self.id, PipelinedId::None)
        {
            let answer = self
                .responses_until(&id_tag)
                .await?
                .ok_or_else(|| BackendError::Protocol("continuation request for ID".to_owned()))?;
            if answer.kind != StatusKind::Ok {
                tracing::debug!(
                    reply = sanitize::for_log(&answer.line),
                    "upstream refused ID"
                );
            }
            self.id = PipelinedId::Answered(answer.kind);
        }
        self.responses_until(tag).await
    }

    async fn responses_until(&mut self, tag: &str) -> Result<Option<Completion>, BackendError> {
        loop {
            self.read_message().await?;
            let message = self.framer.fragmentizer().message_bytes();
            let response = match self
                .framer
                .fragmentizer()
                .decode_message(&ResponseCodec::new())
            {
                Ok(response) => response,
                Err(_) => return Err(BackendError::Protocol("malformed response".to_owned())),
            };
            match classify(&response, message, tag)? {
                Event::Continue => return Ok(None),
                Event::Done(completion) => {
                    let announced = self.announced.clone();
                    return Ok(Some(completion.with_capabilities(announced)));
                }
                Event::Capabilities(capabilities) => self.announced = Some(capabilities),
                Event::Bye(text) => {
                    let text = sanitize::for_log(&text);
                    return Err(BackendError::Protocol(format!("BYE {text}")));
                }
                Event::Other => {}
            }
        }
    }

    /// Reads until the framer holds one complete message.
    async fn read_message(&mut self) -> Result<(), BackendError> {
        loop {
            match self.framer.progress() {
                Some(_) if self.framer.fragmentizer().is_message_complete() => return Ok(()),
                Some(_) => continue,
                None => {}
            }
            let filled = tokio::time::timeout(RESPONSE_TIMEOUT, self.framer.fill(&mut self.io))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream went silent"))??;
            if !filled {
                return Err(BackendError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Sends `bytes` (after a queued ID), giving up after [`RESPONSE_TIMEOUT`]: an upstream
    /// that never reads must not hold the login.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.announced = None;
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        if let PipelinedId::Queued { tag, command } =
            std::mem::replace(&mut self.id, PipelinedId::None)
        {
            write_all_by(&mut self.io, command.as_bytes(), deadline).await?;
            self.id = PipelinedId::Sent { tag };
        }
        write_all_by(&mut self.io, bytes, deadline).await?;
        Ok(())
    }

    /// The stream, replaying whatever the upstream sent after the last response we read.
    fn into_io(self) -> BoxedIo {
        replaying(self.framer.into_unparsed(), self.io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ForwardClient, MechanismSetting, UpstreamConfig};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    const DOVECOT_GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED AUTH=XOAUTH2 AUTH=OAUTHBEARER] Dovecot (Debian) ready.\r\n";

    fn event(line: &[u8]) -> Event {
        let (_, response) = ResponseCodec::new().decode(line).unwrap();
        classify(&response, line, "M1").unwrap()
    }

    #[test]
    fn greeting_capabilities_are_read_case_insensitively() {
        let capabilities = greeting_capabilities(DOVECOT_GREETING).unwrap().unwrap();
        assert!(capabilities.has("sasl-ir"));
        assert!(capabilities.has("LOGINDISABLED"));
        assert!(capabilities.offers_mechanism("XOAUTH2"));
        assert!(capabilities.offers_mechanism("OAUTHBEARER"));
        assert!(!capabilities.offers_mechanism("PLAIN"));
        assert_eq!(greeting_capabilities(b"* OK ready\r\n").unwrap(), None);
        assert!(greeting_capabilities(b"* PREAUTH hi\r\n").is_err());
        assert!(greeting_capabilities(b"* BYE busy\r\n").is_err());
    }

    #[test]
    fn error_challenge_is_a_continuation() {
        // Dovecot's XOAUTH2 refusal: base64 of {"status":"401","schemes":"bearer","scope":"mail"}
        let challenge =
            b"+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=\r\n";
        assert_eq!(event(challenge), Event::Continue);
        assert_eq!(event(b"+ \r\n"), Event::Continue);
        assert_eq!(event(b"+\r\n"), Event::Continue);
    }

    #[test]
    fn tagged_completion_keeps_the_line_after_the_tag() {
        let Event::Done(done) = event(b"M1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n") else {
            panic!("not a completion");
        };
        assert_eq!(
            done.into_result().unwrap(),
            "OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
        );
        let Event::Done(done) = event(b"M1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        else {
            panic!("not a completion");
        };
        assert!(
            matches!(done.into_result(), Err(BackendError::Rejected(text)) if text.contains("AUTHENTICATIONFAILED"))
        );
        assert!(matches!(event(b"* BYE going\r\n"), Event::Bye(_)));
        assert_eq!(event(b"* 3 EXISTS\r\n"), Event::Other);
        let (_, other) = ResponseCodec::new().decode(b"M9 OK x\r\n").unwrap();
        assert!(classify(&other, b"M9 OK x\r\n", "M1").is_err());
    }

    #[test]
    fn untagged_capabilities_complete_a_bare_ok() {
        let Event::Capabilities(capabilities) = event(b"* CAPABILITY IMAP4rev1 IDLE\r\n") else {
            panic!("not capabilities");
        };
        let Event::Done(done) = event(b"M1 OK Logged in\r\n") else {
            panic!("not a completion");
        };
        let line = done
            .with_capabilities(Some(capabilities))
            .into_result()
            .unwrap();
        assert_eq!(line, "OK [CAPABILITY IMAP4REV1 IDLE] Logged in");
    }

    // A scripted upstream on loopback.

    async fn upstream(
        mechanism: MechanismSetting,
        tls: TlsMode,
        forward_client: ForwardClient,
    ) -> (Connector, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = UpstreamConfig {
            ca_file: None,
            system_roots: tls != TlsMode::None,
            mechanism,
            connect_timeout: Duration::from_secs(5),
            forward_client,
            max_concurrent_connects: crate::config::DEFAULT_MAX_CONCURRENT_CONNECTS,
            ..UpstreamConfig::new(
                "127.0.0.1".to_owned(),
                listener.local_addr().unwrap().port(),
                tls,
            )
        };
        (Connector::new(&config).unwrap(), listener)
    }

    /// Accepts one connection, plays `script` (`S:` lines are sent, `C:` lines expected, `C: (any)`
    /// matches any line), closes.
    async fn play(listener: TcpListener, script: &'static [&'static str]) {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        for step in script {
            if let Some(line) = step.strip_prefix("S: ") {
                stream.get_mut().write_all(line.as_bytes()).await.unwrap();
            } else if let Some(expected) = step.strip_prefix("C: ") {
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                if expected != "(any)" {
                    assert_eq!(line, expected);
                }
            }
        }
    }

    fn bearer(token: &str) -> UpstreamAuth {
        UpstreamAuth::Bearer {
            user: "a@b.c".to_owned(),
            token: Secret::new(token.to_owned()),
        }
    }

    async fn run(
        mechanism: MechanismSetting,
        auth: UpstreamAuth,
        script: &'static [&'static str],
    ) -> Result<Upstream, BackendError> {
        run_with(mechanism, TlsMode::None, auth, script).await
    }

    async fn run_with(
        mechanism: MechanismSetting,
        tls: TlsMode,
        auth: UpstreamAuth,
        script: &'static [&'static str],
    ) -> Result<Upstream, BackendError> {
        let (connector, listener) = upstream(mechanism, tls, ForwardClient::None).await;
        run_on(connector, listener, auth, None, script).await
    }

    /// A login with `forward_client: id` from a client at 127.0.0.2:50000 to 127.0.0.1:143.
    async fn run_forwarding(script: &'static [&'static str]) -> Result<Upstream, BackendError> {
        let (connector, listener) =
            upstream(MechanismSetting::Auto, TlsMode::None, ForwardClient::Id).await;
        let origin = Origin::new("127.0.0.2:50000".parse().ok(), "127.0.0.1:143".parse().ok());
        run_on(connector, listener, bearer("tok"), origin, script).await
    }

    async fn run_on(
        connector: Connector,
        listener: TcpListener,
        auth: UpstreamAuth,
        origin: Option<Origin>,
        script: &'static [&'static str],
    ) -> Result<Upstream, BackendError> {
        let server = tokio::spawn(play(listener, script));
        let login = login(&connector, &auth, origin.as_ref());
        let result = tokio::time::timeout(Duration::from_secs(5), login)
            .await
            .unwrap();
        if let Ok(mut upstream) = result {
            let mut rest = vec![0u8; 64];
            let n = upstream.io.read(&mut rest).await.unwrap();
            rest.truncate(n);
            drop(upstream.io);
            server.await.unwrap();
            return Ok(Upstream {
                io: Box::new(tokio::io::empty()),
                account: None,
                xclient_guard: None,
                completion: format!(
                    "{}|{}",
                    upstream.completion,
                    String::from_utf8(rest).unwrap()
                ),
            });
        }
        server.abort();
        result
    }

    /// Found by fuzzing: only the login's own errors were scrubbed, so a refusal of an earlier
    /// command quoting the secret carried it into the log.
    #[tokio::test]
    async fn no_error_carries_the_token_whichever_command_it_answers() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n",
            "C: M1 STARTTLS\r\n",
            "S: M1 NO tok-Zq81x no TLS today\r\n",
        ];
        let result = run_with(
            MechanismSetting::Auto,
            TlsMode::Starttls,
            bearer("tok-Zq81x"),
            script,
        )
        .await;
        let Err(error) = result else {
            panic!("a refused STARTTLS logged in");
        };
        assert!(
            !format!("{error} {error:?}").contains("tok-Zq81x"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn xoauth2_with_initial_response_keeps_bytes_after_the_ok() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n",
            // base64 of "user=a@b.c\x01auth=Bearer tok\x01\x01"
            "C: M1 AUTHENTICATE XOAUTH2 dXNlcj1hQGIuYwFhdXRoPUJlYXJlciB0b2sBAQ==\r\n",
            "S: M1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 1 EXISTS\r\n",
        ];
        let upstream = run(MechanismSetting::Auto, bearer("tok"), script)
            .await
            .unwrap();
        assert_eq!(
            upstream.completion,
            "OK [CAPABILITY IMAP4rev1 IDLE] Logged in|* 1 EXISTS\r\n"
        );
    }

    #[test]
    fn id_line_carries_both_addresses() {
        let origin = Origin::new(
            "[2001:db8::2]:50000".parse().ok(),
            "[2001:db8::1]:993".parse().ok(),
        )
        .unwrap();
        assert_eq!(
            id_command("M1", &origin),
            "M1 ID (\"x-originating-ip\" \"2001:db8::2\" \"x-originating-port\" \"50000\" \
             \"x-connected-ip\" \"2001:db8::1\" \"x-connected-port\" \"993\")\r\n"
        );
    }

    #[tokio::test]
    async fn id_is_pipelined_with_the_login_and_answered_first() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=XOAUTH2] ready\r\n",
            "C: M1 ID (\"x-originating-ip\" \"127.0.0.2\" \"x-originating-port\" \"50000\" \"x-connected-ip\" \"127.0.0.1\" \"x-connected-port\" \"143\")\r\n",
            "C: M2 AUTHENTICATE XOAUTH2 dXNlcj1hQGIuYwFhdXRoPUJlYXJlciB0b2sBAQ==\r\n",
            "S: * ID (\"name\" \"Dovecot\")\r\nM1 OK ID completed.\r\n",
            "S: M2 OK [CAPABILITY IMAP4rev1] Logged in\r\n",
        ];
        let upstream = run_forwarding(script).await.unwrap();
        assert_eq!(upstream.completion, "OK [CAPABILITY IMAP4rev1] Logged in|");
    }

    #[tokio::test]
    async fn id_goes_before_the_first_line_of_a_login_without_initial_response() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 ID AUTH=XOAUTH2] ready\r\n",
            "C: (any)",
            "C: M2 AUTHENTICATE XOAUTH2\r\n",
            "S: * ID NIL\r\nM1 BAD not now\r\n+ \r\n",
            "C: dXNlcj1hQGIuYwFhdXRoPUJlYXJlciB0b2sBAQ==\r\n",
            "S: M2 OK Logged in\r\n",
        ];
        // A refused ID does not stop the login.
        let upstream = run_forwarding(script).await.unwrap();
        assert_eq!(upstream.completion, "OK Logged in|");
    }

    #[tokio::test]
    async fn no_id_to_a_server_that_does_not_offer_it() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n",
            "C: M1 AUTHENTICATE XOAUTH2 dXNlcj1hQGIuYwFhdXRoPUJlYXJlciB0b2sBAQ==\r\n",
            "S: M1 OK Logged in\r\n",
        ];
        let upstream = run_forwarding(script).await.unwrap();
        assert_eq!(upstream.completion, "OK Logged in|");
    }

    #[tokio::test]
    async fn refused_token_acknowledges_the_challenge() {
        let script = &[
            "S: * OK ready\r\n",
            "C: M1 CAPABILITY\r\n",
            "S: * CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER\r\nM1 OK done\r\n",
            "C: M2 AUTHENTICATE OAUTHBEARER\r\n",
            "S: + \r\n",
            // The OAUTHBEARER message names the port, which differs per run.
            "C: (any)",
            "S: + eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n",
            "C: AQ==\r\n",
            "S: M2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
        ];
        let result = run(MechanismSetting::Auto, bearer("tok"), script).await;
        match result {
            Err(BackendError::Rejected(text)) => {
                assert_eq!(text, "NO [AUTHENTICATIONFAILED] Authentication failed.");
            }
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => panic!("unexpected success"),
        }
    }

    #[tokio::test]
    async fn no_common_mechanism() {
        let script = &["S: * OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"];
        let result = run(MechanismSetting::Auto, bearer("tok"), script).await;
        assert!(matches!(result, Err(BackendError::NoMechanism)));
    }

    #[tokio::test]
    async fn password_falls_back_to_login_with_literals() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1] ready\r\n",
            "C: M1 LOGIN a@b.c {5}\r\n",
            "S: + go\r\n",
            "C: p\"w\\\n",
            "S: * CAPABILITY IMAP4rev1 IDLE\r\nM1 OK Logged in\r\n",
        ];
        let auth = UpstreamAuth::Password {
            user: "a@b.c".to_owned(),
            password: Secret::new("p\"w\\\n".to_owned()),
        };
        let upstream = run(MechanismSetting::Auto, auth, script).await.unwrap();
        assert_eq!(
            upstream.completion,
            "OK [CAPABILITY IMAP4REV1 IDLE] Logged in|"
        );
    }

    #[tokio::test]
    async fn xoauth2_without_initial_response_answers_the_challenge_with_an_empty_line() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 AUTH=OAUTHBEARER] ready\r\n",
            "C: M1 AUTHENTICATE XOAUTH2\r\n",
            "S: + \r\n",
            "C: dXNlcj1hQGIuYwFhdXRoPUJlYXJlciB0b2sBAQ==\r\n",
            "S: + eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=\r\n",
            "C: \r\n",
            "S: M1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
        ];
        let result = run(MechanismSetting::Xoauth2, bearer("tok"), script).await;
        assert!(matches!(result, Err(BackendError::Rejected(_))));
    }

    #[tokio::test]
    async fn password_uses_plain_when_offered_and_respects_logindisabled() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n",
            // base64 of "\0a@b.c\0pw"
            "C: M1 AUTHENTICATE PLAIN AGFAYi5jAHB3\r\n",
            "S: M1 OK Logged in\r\n",
        ];
        let password = || UpstreamAuth::Password {
            user: "a@b.c".to_owned(),
            password: Secret::new("pw".to_owned()),
        };
        let upstream = run(MechanismSetting::Auto, password(), script)
            .await
            .unwrap();
        assert_eq!(upstream.completion, "OK Logged in|");
        let script = &["S: * OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=XOAUTH2] hi\r\n"];
        let result = run(MechanismSetting::Auto, password(), script).await;
        assert!(matches!(result, Err(BackendError::NoMechanism)));
    }

    #[tokio::test]
    async fn a_refused_starttls_is_an_unavailable_upstream_not_bad_credentials() {
        crate::tls::install_crypto_provider();
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2] ready\r\n",
            "C: M1 STARTTLS\r\n",
            "S: M1 NO [UNAVAILABLE] TLS not available now\r\n",
        ];
        let result = run_with(
            MechanismSetting::Auto,
            TlsMode::Starttls,
            bearer("tok"),
            script,
        )
        .await;
        assert!(
            matches!(result, Err(BackendError::Protocol(_))),
            "{:?}",
            result.err()
        );
    }

    #[tokio::test]
    async fn an_echoed_token_in_a_refusal_is_redacted() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n",
            "C: (any)",
            // The server quotes the client's SASL message (base64 of user=a@b.c ... secret-token).
            "S: M1 NO [AUTHENTICATIONFAILED] refused dXNlcj1hQGIuYwFhdXRoPUJlYXJlciBzZWNyZXQtdG9rZW4BAQ== \x1b[31m\r\n",
        ];
        let result = run(MechanismSetting::Auto, bearer("secret-token"), script).await;
        let Err(BackendError::Rejected(text)) = result else {
            panic!("expected a rejection");
        };
        assert!(!text.contains("dXNlcj1"), "{text}");
        assert!(
            text.contains("[redacted]") && !text.contains('\x1b'),
            "{text}"
        );
    }

    /// Issue 13 item 19: an echo split into words of 40 characters or fewer passed the
    /// long-word redaction, and only the whole base64 message was replaced.
    #[tokio::test]
    async fn a_payload_echoed_in_short_words_is_redacted() {
        // The message is base64 of "user=a@b.c\x01auth=Bearer SECRETTOKENabc123xyz\x01\x01".
        let fragments = [
            // The message's own base64 in 20-character words.
            "dXNlcj1hQGIuYwFhdXRo",
            "PUJlYXJlciBTRUNSRVRU",
            "T0tFTmFiYzEyM3h5egEB",
            // "earer SECRETTOKENabc123xyz\x01\x01", "TOKENabc", "ETTOKEN": encoded anew at the
            // other two alignments, padded.
            "ZWFyZXIgU0VDUkVUVE9LRU5hYmMxMjN4eXoBAQ==",
            "VE9LRU5hYmM=",
            "RVRUT0tFTg==",
            // Plain pieces of the token.
            "TOKENabc123xyz",
            "SECRETTOKENa",
        ];
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n",
            "C: (any)",
            "S: M1 NO [AUTHENTICATIONFAILED] you sent dXNlcj1hQGIuYwFhdXRo PUJlYXJlciBTRUNSRVRU \
             T0tFTmFiYzEyM3h5egEB ZWFyZXIgU0VDUkVUVE9LRU5hYmMxMjN4eXoBAQ== VE9LRU5hYmM= \
             RVRUT0tFTg== TOKENabc123xyz SECRETTOKENa\r\n",
        ];
        let result = run(
            MechanismSetting::Auto,
            bearer("SECRETTOKENabc123xyz"),
            script,
        )
        .await;
        let Err(BackendError::Rejected(text)) = result else {
            panic!("expected a rejection");
        };
        for fragment in fragments {
            assert!(!text.contains(fragment), "{fragment} in {text}");
        }
        assert!(
            text.starts_with("NO [AUTHENTICATIONFAILED] you sent [redacted]"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_short_password_echoed_in_a_refusal_is_redacted() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n",
            "C: (any)",
            // base64 of "\0a@b.c\0Tr0ub4dor&3x", and the password itself.
            "S: M1 NO [AUTHENTICATIONFAILED] no for AGFAYi5jAFRyMHViNGRvciYzeA== (Tr0ub4dor&3x)\r\n",
        ];
        let auth = UpstreamAuth::Password {
            user: "a@b.c".to_owned(),
            password: Secret::new("Tr0ub4dor&3x".to_owned()),
        };
        let Err(BackendError::Rejected(text)) = run(MechanismSetting::Auto, auth, script).await
        else {
            panic!("expected a rejection");
        };
        assert!(
            !text.contains("Tr0ub4dor") && !text.contains("AGFAYi5j"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bye_and_bad_are_protocol_errors() {
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n",
            "C: (any)",
            "S: * BYE shutting down\r\n",
        ];
        let result = run(MechanismSetting::Auto, bearer("tok"), script).await;
        assert!(matches!(result, Err(BackendError::Protocol(_))));
        let script = &[
            "S: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n",
            "C: (any)",
            "S: M1 BAD what\r\n",
        ];
        let result = run(MechanismSetting::Auto, bearer("tok"), script).await;
        assert!(matches!(result, Err(BackendError::Protocol(_))));
    }
}

//! TLS towards clients: the handshake of an implicit-TLS listener or after STARTTLS, with a
//! deadline, each outcome counted by reason so an operator can tell a client that distrusts
//! the certificate from a port scanner.

use std::io;
use std::sync::Arc;

use rustls::AlertDescription;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;

use crate::io::BoxedIo;
use crate::metrics::Metrics;

/// One listener's TLS towards clients.
pub struct ClientTls {
    acceptor: TlsAcceptor,
    /// With STARTTLS: no login before TLS.
    pub required: bool,
    listener: String,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("required", &self.required)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// How a handshake ended: the `result` label of `mailgate_client_tls_handshakes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Ok,
    /// The client did not finish in time.
    Timeout,
    /// The client closed during the handshake.
    Closed,
    /// The bytes were not TLS (a plaintext client on an implicit-TLS port, a scanner).
    NotTls,
    /// No protocol version or cipher suite in common (e.g. a TLS 1.0-only client).
    Incompatible,
    /// The client refused mailgate's certificate (untrusted CA, wrong name, expired).
    CertificateRefused,
    /// The client offered ALPN ids, none of them the listener's protocol.
    WrongAlpn,
    Error,
}

impl Handshake {
    pub const ALL: [Handshake; 8] = [
        Handshake::Ok,
        Handshake::Timeout,
        Handshake::Closed,
        Handshake::NotTls,
        Handshake::Incompatible,
        Handshake::CertificateRefused,
        Handshake::WrongAlpn,
        Handshake::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Handshake::Ok => "ok",
            Handshake::Timeout => "timeout",
            Handshake::Closed => "closed",
            Handshake::NotTls => "not_tls",
            Handshake::Incompatible => "incompatible",
            Handshake::CertificateRefused => "certificate_refused",
            Handshake::WrongAlpn => "wrong_alpn",
            Handshake::Error => "error",
        }
    }

    /// Classifies a failed handshake from what tokio-rustls reports.
    fn of_error(error: &io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            return Handshake::Closed;
        }
        let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return match error.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Handshake::Closed,
                _ => Handshake::Error,
            };
        };
        match tls {
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                Handshake::NotTls
            }
            rustls::Error::PeerIncompatible(_) => Handshake::Incompatible,
            rustls::Error::NoApplicationProtocol => Handshake::WrongAlpn,
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA => Handshake::CertificateRefused,
                AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
                    Handshake::Incompatible
                }
                _ => Handshake::Error,
            },
            _ => Handshake::Error,
        }
    }
}

impl ClientTls {
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        required: bool,
        listener: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        for result in Handshake::ALL {
            metrics.client_tls_handshake(listener, result.label(), 0);
        }
        Self {
            acceptor: TlsAcceptor::from(config),
            required,
            listener: listener.to_owned(),
            metrics,
        }
    }

    /// Runs the server side of a handshake over `io`, giving up at `deadline`; `None` when it
    /// failed (counted and logged).
    pub async fn accept(&self, io: BoxedIo, deadline: Instant) -> Option<BoxedIo> {
        let outcome = match timeout_at(deadline, self.acceptor.accept(io)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err((Handshake::of_error(&error), Some(error))),
            Err(_elapsed) => Err((Handshake::Timeout, None)),
        };
        match outcome {
            Ok(stream) => {
                self.count(Handshake::Ok);
                let (_, connection) = stream.get_ref();
                tracing::debug!(
                    version = ?connection.protocol_version(),
                    cipher = ?connection.negotiated_cipher_suite().map(|suite| suite.suite()),
                    "client TLS established"
                );
                Some(Box::new(stream))
            }
            Err((result, error)) => {
                self.count(result);
                tracing::info!(
                    reason = result.label(),
                    error = error.as_ref().map(tracing::field::display),
                    "client TLS handshake failed"
                );
                None
            }
        }
    }

    fn count(&self, result: Handshake) {
        self.metrics
            .client_tls_handshake(&self.listener, result.label(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_rustls_reports() {
        let wrap = |error: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, error);
        let cases = [
            (
                wrap(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
                Handshake::CertificateRefused,
            ),
            (
                wrap(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::NoCipherSuitesInCommon,
                )),
                Handshake::Incompatible,
            ),
            (
                wrap(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                Handshake::NotTls,
            ),
            (
                io::Error::from(io::ErrorKind::UnexpectedEof),
                Handshake::Closed,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(Handshake::of_error(&error), expected, "{error}");
        }
    }
}

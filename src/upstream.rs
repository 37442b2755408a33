//! Connecting to an upstream server: TCP with a timeout, a PROXY protocol header if configured,
//! then implicit TLS, or STARTTLS on request. Protocol dialogue lives in `imap::backend` and
//! `smtp::backend`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{ForwardClient, MechanismSetting, TlsMode, UpstreamConfig};
use crate::forward::{self, Forwarded, Origin};
use crate::io::BoxedIo;
use crate::metrics::{Metrics, UpstreamLabels};
use crate::tls::{TlsError, client_config};

/// Everything needed to open a connection to one configured upstream.
#[derive(Clone)]
pub struct Connector {
    config: UpstreamConfig,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    observer: Option<Observer>,
    /// Whether a failed forwarding was logged at warn already: once per listener (and reload)
    /// tells the operator; every login would flood the log.
    warned: Arc<AtomicBool>,
    /// Bounds the connects under way (`max_concurrent_connects`), shared by clones.
    connects: Arc<tokio::sync::Semaphore>,
}

/// Where connect latency, TLS failures and forwardings are recorded.
#[derive(Clone)]
struct Observer {
    metrics: Arc<Metrics>,
    labels: UpstreamLabels,
}

impl Connector {
    /// # Errors
    /// The TLS configuration cannot be built or the host is not a valid server name.
    pub fn new(config: &UpstreamConfig) -> Result<Self, TlsError> {
        let tls = match config.tls {
            TlsMode::None => None,
            TlsMode::Implicit | TlsMode::Starttls => {
                let name = ServerName::try_from(config.host.clone()).map_err(|_| {
                    TlsError::Rustls(rustls::Error::General(format!(
                        "invalid server name {:?}",
                        config.host
                    )))
                })?;
                Some((
                    TlsConnector::from(client_config(
                        config.ca_file.as_deref(),
                        config.system_roots,
                    )?),
                    name,
                ))
            }
        };
        Ok(Self {
            config: config.clone(),
            tls,
            observer: None,
            warned: Arc::new(AtomicBool::new(false)),
            connects: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_connects.max(1),
            )),
        })
    }

    /// Records connect latency, TLS handshake failures and forwardings under
    /// `upstream="host:port"`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        metrics.export_forwarding(&self.labels(), self.config.forward_client);
        self.observer = Some(Observer {
            metrics,
            labels: self.labels(),
        });
        self
    }

    /// The metric labels of this upstream.
    pub fn labels(&self) -> UpstreamLabels {
        UpstreamLabels {
            upstream: format!("{}:{}", self.config.host, self.config.port),
        }
    }

    pub fn host(&self) -> &str {
        &self.config.host
    }

    pub fn port(&self) -> u16 {
        self.config.port
    }

    pub fn tls_mode(&self) -> TlsMode {
        self.config.tls
    }

    pub fn mechanism(&self) -> MechanismSetting {
        self.config.mechanism
    }

    pub fn forward_client(&self) -> ForwardClient {
        self.config.forward_client
    }

    /// Counts a forwarding of the client's address; the first failure is logged at warn, since
    /// the upstream then sees mailgate's address (and penalises it for everyone's failures).
    pub fn forwarded(&self, outcome: Forwarded) {
        if let Some(observer) = &self.observer {
            observer.metrics.forwarded(&observer.labels, outcome);
        }
        let mode = self.config.forward_client;
        match outcome {
            Forwarded::Sent => tracing::debug!(?mode, "client address forwarded upstream"),
            _ if !self.warned.swap(true, Ordering::Relaxed) => tracing::warn!(
                ?mode,
                result = outcome.label(),
                "the upstream does not take the client's address; it sees mailgate's \
                 (is mailgate's address among the upstream's trusted networks?)"
            ),
            _ => tracing::debug!(
                ?mode,
                result = outcome.label(),
                "client address not forwarded"
            ),
        }
    }

    /// Opens TCP, sends the PROXY header (`forward_client: proxy_v2`) and, for implicit TLS,
    /// completes the handshake; all within `connect_timeout`. `origin` is the client's, for
    /// the header; without it the header is LOCAL (a connection on mailgate's own behalf).
    ///
    /// # Errors
    /// Unreachable host, timeout, or a failed handshake (certificate included).
    pub async fn connect(&self, origin: Option<&Origin>) -> io::Result<BoxedIo> {
        let address = (self.config.host.as_str(), self.config.port);
        let connect = async {
            // Never closed, so a turn always comes (or the timeout ends the wait).
            let _turn = self.connects.acquire().await;
            let mut tcp = TcpStream::connect(address).await?;
            tcp.set_nodelay(true)?;
            if self.config.forward_client == ForwardClient::ProxyV2 {
                self.send_proxy_header(&mut tcp, origin).await?;
            }
            match self.config.tls {
                TlsMode::Implicit => self.start_tls(Box::new(tcp)).await,
                TlsMode::Starttls | TlsMode::None => Ok(Box::new(tcp) as BoxedIo),
            }
        };
        let started = tokio::time::Instant::now();
        let connected = tokio::time::timeout(self.config.connect_timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out"))?;
        if let (Ok(_), Some(observer)) = (&connected, &self.observer) {
            observer
                .metrics
                .upstream_connect_seconds
                .get_or_create(&observer.labels)
                .observe(started.elapsed().as_secs_f64());
        }
        connected
    }

    /// The header goes before anything else, TLS included: the upstream's listener reads it,
    /// not its TLS layer.
    async fn send_proxy_header(
        &self,
        tcp: &mut TcpStream,
        origin: Option<&Origin>,
    ) -> io::Result<()> {
        let header = match origin {
            Some(origin) => forward::proxy_v2_header(origin)?,
            None => forward::proxy_v2_local()?,
        };
        // One write, one segment, as the PROXY protocol asks: Dovecot peeks at it in one recv.
        tcp.write_all(&header).await?;
        if origin.is_some() {
            self.forwarded(Forwarded::Sent);
        }
        Ok(())
    }

    /// Runs the TLS handshake over `io`, after the protocol's STARTTLS exchange, within
    /// `connect_timeout`: a server that stalls the handshake must not hold the login.
    ///
    /// # Errors
    /// TLS is not configured for this upstream, or the handshake fails or times out.
    pub async fn start_tls(&self, io: BoxedIo) -> io::Result<BoxedIo> {
        let Some((connector, name)) = &self.tls else {
            return Err(io::Error::other("TLS is not configured for this upstream"));
        };
        let handshake = connector.connect(name.clone(), io);
        let stream = tokio::time::timeout(self.config.connect_timeout, handshake)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream TLS handshake timed out",
                ))
            });
        let stream = stream.inspect_err(|_| {
            if let Some(observer) = &self.observer {
                observer
                    .metrics
                    .tls_handshake_failures
                    .get_or_create(&observer.labels)
                    .inc();
            }
        })?;
        Ok(Box::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ForwardClient;

    #[tokio::test]
    async fn connects_beyond_the_limit_wait_within_the_timeout() {
        crate::tls::install_crypto_provider();
        // Accepts and never answers the TLS handshake: each connect holds its turn.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(stream);
            }
        });
        let config = UpstreamConfig {
            ca_file: None,
            system_roots: true,
            mechanism: MechanismSetting::Auto,
            connect_timeout: Duration::from_millis(500),
            max_concurrent_connects: 1,
            forward_client: ForwardClient::None,
            ..UpstreamConfig::new("127.0.0.1".to_owned(), port, TlsMode::Implicit)
        };
        let connector = Connector::new(&config).unwrap();
        let watch = async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            // Both are under way; the second waits for its turn.
            accepted.load(std::sync::atomic::Ordering::SeqCst)
        };
        let (first, second, midway) =
            tokio::join!(connector.connect(None), connector.connect(None), watch);
        assert_eq!(midway, 1);
        for result in [first, second] {
            assert!(matches!(result, Err(e) if e.kind() == io::ErrorKind::TimedOut));
        }
    }
}

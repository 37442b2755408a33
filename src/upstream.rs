//! Connecting to an upstream server: TCP with a timeout, then implicit TLS, or STARTTLS on request.
//! Protocol dialogue lives in `imap::backend` and `smtp::backend`.

use std::io;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{MechanismSetting, TlsMode, UpstreamConfig};
use crate::io::BoxedIo;
use crate::metrics::{Metrics, UpstreamLabels};
use crate::tls::{TlsError, client_config};

/// Everything needed to open a connection to one configured upstream.
#[derive(Clone)]
pub struct Connector {
    config: UpstreamConfig,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    observer: Option<Observer>,
}

/// Where connect latency and TLS failures are recorded.
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
        })
    }

    /// Records connect latency and TLS handshake failures under `upstream="host:port"`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
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

    /// Opens TCP and, for implicit TLS, completes the handshake; all within `connect_timeout`.
    ///
    /// # Errors
    /// Unreachable host, timeout, or a failed handshake (certificate included).
    pub async fn connect(&self) -> io::Result<BoxedIo> {
        let address = (self.config.host.as_str(), self.config.port);
        let connect = async {
            let tcp = TcpStream::connect(address).await?;
            tcp.set_nodelay(true)?;
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

    /// Runs the TLS handshake over `io`, after the protocol's STARTTLS exchange.
    ///
    /// # Errors
    /// TLS is not configured for this upstream, or the handshake fails.
    pub async fn start_tls(&self, io: BoxedIo) -> io::Result<BoxedIo> {
        let Some((connector, name)) = &self.tls else {
            return Err(io::Error::other("TLS is not configured for this upstream"));
        };
        let stream = connector.connect(name.clone(), io).await.inspect_err(|_| {
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

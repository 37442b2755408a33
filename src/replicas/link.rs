//! How the handle reaches Redis: one server (standalone, or a primary behind a Service)
//! through the crate's reconnecting connection manager; the primary that Redis Sentinel
//! names, asked again when it stops being one (a failover); or a Redis Cluster through its
//! cluster connection (slots followed, nodes reconnected by the crate). All speak RESP3, so
//! subscriptions arrive as pushes, and all are set up lazily: a Redis that is down at start
//! is a temporary failure, not a refusal to start.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo as _, Pipeline, ProtocolVersion, RedisFuture};
use redis::{ConnectionAddr, RedisResult, TlsCertificates, Value};

use crate::config::RedisConfig;

/// How often the connection manager tries to reconnect before a call gives up; the next
/// call starts again.
const RECONNECT_TRIES: usize = 2;

pub type PushSender = tokio::sync::mpsc::UnboundedSender<redis::PushInfo>;

pub enum Link {
    Single(ConnectionManager),
    Sentinel(Box<Sentinel>),
    Cluster(Box<Cluster>),
}

pub struct Sentinel {
    /// Where a Sentinel answers.
    sentinel: redis::Client,
    /// The name it knows the primary by.
    name: String,
    /// How the primary is reached once named: the URL's credentials, database and TLS.
    node: ConnectionInfo,
    /// The primary's connection, until a call finds it is no longer the primary.
    primary: tokio::sync::Mutex<Option<ConnectionManager>>,
    manager: ConnectionManagerConfig,
    /// Subscribed channels, subscribed again on the next primary.
    channels: std::sync::Mutex<Vec<String>>,
}

pub struct Cluster {
    client: ClusterClient,
    /// Connected by the first call that succeeds.
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

impl Link {
    /// The link `config` asks for, its pushes sent to `pushes`.
    ///
    /// # Errors
    /// The URL or the TLS settings are unusable.
    pub fn new(config: &RedisConfig, pushes: PushSender) -> Result<Self, String> {
        let (info, certificates) = connection_info(config)?;
        if config.cluster {
            return cluster(config, info, certificates, pushes);
        }
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(RECONNECT_TRIES)
            .set_max_delay(config.timeout)
            .set_push_sender(pushes)
            .set_automatic_resubscription();
        let client = match certificates {
            Some(certificates) => redis::Client::build_with_tls(info, certificates),
            None => redis::Client::open(info),
        }
        .map_err(setup_error)?;
        if let Some(primary) = &config.sentinel {
            return sentinel(primary, client.get_connection_info().clone(), manager);
        }
        ConnectionManager::new_lazy_with_config(client, manager)
            .map(Link::Single)
            .map_err(setup_error)
    }

    /// A connection for one call (cheap: both kinds are shared handles).
    ///
    /// # Errors
    /// A cluster could not be reached for the first time.
    pub async fn connection(&self) -> RedisResult<Connection> {
        match self {
            Link::Single(manager) => Ok(Connection::Single(manager.clone())),
            Link::Sentinel(sentinel) => sentinel.primary().await.map(Connection::Single),
            Link::Cluster(cluster) => cluster
                .connection
                .get_or_try_init(|| cluster.client.get_async_connection())
                .await
                .cloned()
                .map(Connection::Cluster),
        }
    }

    /// After a failed call (`None`: no answer in time): with Sentinel, a primary that went
    /// away, stopped answering or became a replica is asked for again by the next call.
    pub async fn failed(&self, error: Option<&redis::RedisError>) {
        let Link::Sentinel(sentinel) = self else {
            return;
        };
        let moved = error.is_none_or(|error| {
            error.code().is_some_and(|code| code == "READONLY")
                || error.is_connection_dropped()
                || error.is_connection_refusal()
                || error.is_io_error()
                || error.is_timeout()
        });
        if moved {
            *sentinel.primary.lock().await = None;
        }
    }

    /// Subscribes `connection` to `channel`, and with Sentinel the next primary too.
    pub async fn subscribe(&self, connection: &mut Connection, channel: &str) -> RedisResult<()> {
        connection.subscribe(channel).await?;
        if let Link::Sentinel(sentinel) = self {
            let mut channels = sentinel.channels.lock().unwrap_or_else(|e| e.into_inner());
            if !channels.iter().any(|known| known == channel) {
                channels.push(channel.to_owned());
            }
        }
        Ok(())
    }

    /// Whether keys must share one hash slot (multi-key scripts run on one node).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Link::Cluster(_))
    }
}

pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Single(manager) => manager.subscribe(channel).await,
            Connection::Cluster(cluster) => cluster.subscribe(channel).await,
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(manager) => manager.req_packed_command(cmd),
            Connection::Cluster(cluster) => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(manager) => manager.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(manager) => manager.get_db(),
            Connection::Cluster(cluster) => cluster.get_db(),
        }
    }
}

impl Sentinel {
    /// The primary's connection: the one in use, or a new one to the primary the
    /// Sentinels name now (subscribed to the channels the last one was).
    async fn primary(&self) -> RedisResult<ConnectionManager> {
        let mut primary = self.primary.lock().await;
        if let Some(manager) = &*primary {
            return Ok(manager.clone());
        }
        let client = self.ask_for_primary().await?;
        let mut manager = ConnectionManager::new_lazy_with_config(client, self.manager.clone())?;
        let channels = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for channel in channels {
            manager.subscribe(&channel).await?;
        }
        *primary = Some(manager.clone());
        Ok(manager)
    }

    /// A client for the primary the Sentinel names now (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    async fn ask_for_primary(&self) -> RedisResult<redis::Client> {
        let mut sentinel = self.sentinel.get_multiplexed_async_connection().await?;
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.name)
            .query_async(&mut sentinel)
            .await?;
        let Some((host, port)) = named else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the Sentinel knows no primary by that name",
            )));
        };
        let addr = match self.node.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        redis::Client::open(self.node.clone().set_addr(addr))
    }
}

/// `url` names one Sentinel; the primary is reached with its credentials and TLS.
fn sentinel(
    primary_name: &str,
    info: ConnectionInfo,
    manager: ConnectionManagerConfig,
) -> Result<Link, String> {
    // The Sentinel itself is asked without the data nodes' credentials and database.
    let sentinel_address = info
        .clone()
        .set_redis_settings(redis::RedisConnectionInfo::default());
    Ok(Link::Sentinel(Box::new(Sentinel {
        sentinel: redis::Client::open(sentinel_address).map_err(setup_error)?,
        name: primary_name.to_owned(),
        node: info,
        primary: tokio::sync::Mutex::new(None),
        manager,
        channels: std::sync::Mutex::new(Vec::new()),
    })))
}

fn cluster(
    config: &RedisConfig,
    seed: ConnectionInfo,
    certificates: Option<TlsCertificates>,
    pushes: PushSender,
) -> Result<Link, String> {
    let settings = seed.redis_settings().clone();
    let mut builder = ClusterClientBuilder::new(vec![seed])
        .connection_timeout(config.timeout)
        .response_timeout(config.timeout)
        .retries(u32::try_from(RECONNECT_TRIES).unwrap_or(2))
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(pushes);
    if let Some(username) = settings.username() {
        builder = builder.username(username);
    }
    if let Some(password) = settings.password() {
        builder = builder.password(password);
    }
    if let Some(certificates) = certificates {
        builder = builder.certs(certificates);
    }
    let client = builder.build().map_err(setup_error)?;
    Ok(Link::Cluster(Box::new(Cluster {
        client,
        connection: tokio::sync::OnceCell::new(),
    })))
}

/// Where to connect and as whom (RESP3: pushes carry the news), and the trust roots when a
/// CA file replaces the system's.
fn connection_info(
    config: &RedisConfig,
) -> Result<(ConnectionInfo, Option<TlsCertificates>), String> {
    let mut url = url::Url::parse(config.url.expose())
        .map_err(|_| "tokens.shared.redis.url is not a URL".to_owned())?;
    if config.tls && url.scheme() == "redis" {
        url.set_scheme("rediss")
            .map_err(|()| "tokens.shared.redis.url cannot take TLS".to_owned())?;
    }
    let info = url
        .as_str()
        .into_connection_info()
        .map_err(|_| "tokens.shared.redis.url is not a Redis URL".to_owned())?;
    let mut settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    if let Some(username) = &config.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    let certificates = match &config.ca_file {
        Some(path) if url.scheme() == "rediss" => Some(TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(path).map_err(|error| {
                format!("tokens.shared.redis.ca_file {}: {error}", path.display())
            })?),
        }),
        _ => None,
    };
    Ok((info.set_redis_settings(settings), certificates))
}

/// The error kind only: its text may quote the URL.
fn setup_error(error: redis::RedisError) -> String {
    format!("tokens.shared.redis: {:?}", error.kind())
}

//! How the handle reaches Redis: one server (standalone, or a primary behind a Service)
//! through the crate's reconnecting connection manager, or a Redis Cluster through its
//! cluster connection (slots followed, nodes reconnected by the crate). Both speak RESP3, so
//! subscriptions arrive as pushes, and both are set up lazily: a Redis that is down at start
//! is a temporary failure, not a refusal to start.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo as _, Pipeline, ProtocolVersion, RedisFuture};
use redis::{RedisResult, TlsCertificates, Value};

use crate::config::RedisConfig;

/// How often the connection manager tries to reconnect before a call gives up; the next
/// call starts again.
const RECONNECT_TRIES: usize = 2;

pub type PushSender = tokio::sync::mpsc::UnboundedSender<redis::PushInfo>;

pub enum Link {
    Single(ConnectionManager),
    Cluster(Box<Cluster>),
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
        let client = match certificates {
            Some(certificates) => redis::Client::build_with_tls(info, certificates),
            None => redis::Client::open(info),
        }
        .map_err(setup_error)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(RECONNECT_TRIES)
            .set_max_delay(config.timeout)
            .set_push_sender(pushes)
            .set_automatic_resubscription();
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
            Link::Cluster(cluster) => cluster
                .connection
                .get_or_try_init(|| cluster.client.get_async_connection())
                .await
                .cloned()
                .map(Connection::Cluster),
        }
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

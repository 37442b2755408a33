//! A real `redis-server` for unit tests, on a Unix socket in a temporary directory (no port to
//! collide on); a real three-node Redis Cluster, and a primary with a replica watched by a
//! Sentinel, on loopback ports; stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::Redis;
use crate::config::{RedisConfig, SharedConfig};
use crate::metrics::Metrics;
use crate::secret::Secret;

pub struct RedisServer {
    child: Child,
    dir: tempfile::TempDir,
    password: Option<String>,
}

impl RedisServer {
    /// # Panics
    /// redis-server is not installed (scripts/install-test-deps.sh installs it) or does not
    /// come up within 10 s.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`RedisServer::start`], refusing clients without `password` (`requirepass`).
    pub fn start_with(password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(
                password
                    .map(|password| ["--requirepass", password])
                    .into_iter()
                    .flatten(),
            )
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .args(["--rdbcompression", "no", "--unixsocketperm", "700"])
            .arg("--unixsocket")
            .arg(dir.path().join("redis.sock"))
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/install-test-deps.sh)");
        let server = Self {
            child,
            dir,
            password: password.map(str::to_owned),
        };
        for _ in 0..500 {
            if server.cli(&["PING"]).trim() == "PONG" {
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not come up");
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// A handle as one replica holds it.
    pub fn handle(&self) -> Arc<Redis> {
        self.handle_keyed(7)
    }

    /// A handle whose sealing key is 32 times `key_byte`: another deployment's, when it is
    /// not 7.
    pub fn handle_keyed(&self, key_byte: u8) -> Arc<Redis> {
        let url = format!("redis+unix://{}", self.socket().display());
        handle_with(url, false, None, self.password.clone(), key_byte)
    }

    /// `redis-cli COMMAND...`'s output.
    pub fn cli(&self, command: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-s")
            .arg(self.socket())
            .args(
                self.password
                    .iter()
                    .flat_map(|password| ["-a", password.as_str()]),
            )
            .arg("--no-auth-warning")
            .args(command)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Everything Redis holds, as its dump file has it (uncompressed).
    pub fn dump(&self) -> String {
        self.cli(&["SAVE"]);
        String::from_utf8_lossy(&std::fs::read(self.dir.path().join("dump.rdb")).unwrap())
            .into_owned()
    }
}

/// A handle as one replica holds it on the Redis at `url`.
fn handle(url: String, cluster: bool, password: Option<String>) -> Arc<Redis> {
    handle_with(url, cluster, None, password, 7)
}

fn handle_with(
    url: String,
    cluster: bool,
    sentinel: Option<String>,
    password: Option<String>,
    key_byte: u8,
) -> Arc<Redis> {
    let config = SharedConfig {
        redis: RedisConfig {
            url: Secret::new(url),
            tls: false,
            cluster,
            sentinel,
            ca_file: None,
            username: None,
            password_file: None,
            password_env: None,
            password: password.map(Secret::new),
            key_prefix: "test:".to_owned(),
            timeout: Duration::from_secs(2),
        },
        key_file: None,
        key_env: None,
        key: Some(Secret::new(vec![key_byte; 32])),
    };
    Redis::new(&config, Arc::new(Metrics::new()), None).unwrap()
}

/// Three masters, no replicas, every slot assigned.
pub struct RedisCluster {
    nodes: Vec<(Child, u16)>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// # Panics
    /// redis-server or redis-cli is missing, or the cluster is not formed within 20 s.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for n in 0..3 {
            let (port, bus) = (free_port(), free_port());
            let node_dir = dir.path().join(format!("node{n}"));
            std::fs::create_dir(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (run scripts/install-test-deps.sh)");
            nodes.push((child, port));
        }
        let cluster = Self { nodes, _dir: dir };
        for (_, port) in &cluster.nodes {
            wait_for(|| cli(*port, &["PING"]).trim() == "PONG");
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(_, port)| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(created.status.success(), "{created:?}");
        for (_, port) in &cluster.nodes {
            wait_for(|| cli(*port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
        }
        cluster
    }

    /// A handle as one replica holds it, given the first node only.
    pub fn handle(&self) -> Arc<Redis> {
        handle(
            format!("redis://127.0.0.1:{}/0", self.nodes[0].1),
            true,
            None,
        )
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A primary and its replica, watched by one Sentinel that knows the primary as `primary`.
pub struct RedisSentinel {
    processes: Vec<Child>,
    primary: u16,
    replica: u16,
    sentinel: u16,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    /// # Panics
    /// redis-server is missing, or the Sentinel does not see both within 30 s.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (primary, replica, sentinel) = (free_port(), free_port(), free_port());
        let server = |port: u16, extra: &[&str]| {
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .args(extra)
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (run scripts/install-test-deps.sh)")
        };
        let mut processes = vec![server(primary, &[])];
        wait_for(|| cli(primary, &["PING"]).trim() == "PONG");
        processes.push(server(
            replica,
            &["--replicaof", "127.0.0.1", &primary.to_string()],
        ));
        wait_for(|| cli(replica, &["INFO", "replication"]).contains("master_link_status:up"));
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {sentinel}\nbind 127.0.0.1\nsentinel monitor primary 127.0.0.1 {primary} 1\nsentinel down-after-milliseconds primary 2000\nsentinel failover-timeout primary 10000\n"
            ),
        )
        .unwrap();
        processes.push(
            Command::new("redis-server")
                .arg(&config)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel"),
        );
        let watched = Self {
            processes,
            primary,
            replica,
            sentinel,
            _dir: dir,
        };
        wait_for(|| {
            cli(sentinel, &["SENTINEL", "REPLICAS", "primary"]).contains(&replica.to_string())
        });
        watched
    }

    /// A handle as one replica holds it, given the Sentinel only.
    pub fn handle(&self) -> Arc<Redis> {
        let url = format!("redis://127.0.0.1:{}/0", self.sentinel);
        handle_with(url, false, Some("primary".to_owned()), None, 7)
    }

    /// Waits until the replica has what the primary was written, then has the Sentinel
    /// promote it; returns once the Sentinel names it.
    pub fn fail_over(&self) {
        cli(self.primary, &["WAIT", "1", "5000"]);
        // Refused (NOGOODSLAVE) until the Sentinel has heard from the replica itself.
        wait_for(|| cli(self.sentinel, &["SENTINEL", "FAILOVER", "primary"]).starts_with("OK"));
        let promoted = self.replica.to_string();
        wait_for(|| {
            cli(
                self.sentinel,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "primary"],
            )
            .contains(&promoted)
                && cli(self.replica, &["ROLE"]).starts_with("master")
        });
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn cli(port: u16, command: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(command)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn wait_for(ready: impl Fn() -> bool) {
    for _ in 0..1500 {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis did not get ready");
}

/// A loopback port nobody listens on now (the kernel's choice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

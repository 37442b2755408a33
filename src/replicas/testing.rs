//! A real `redis-server` for unit tests, on a Unix socket in a temporary directory (no port to
//! collide on), stopped when dropped.

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
        let config = SharedConfig {
            redis: RedisConfig {
                url: Secret::new(format!("redis+unix://{}", self.socket().display())),
                tls: false,
                ca_file: None,
                username: None,
                password_file: None,
                password_env: None,
                password: self.password.clone().map(Secret::new),
                key_prefix: "test:".to_owned(),
                timeout: Duration::from_secs(2),
            },
            key_file: None,
            key_env: None,
            key: Some(Secret::new(vec![key_byte; 32])),
        };
        Redis::new(&config, Arc::new(Metrics::new()), None).unwrap()
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

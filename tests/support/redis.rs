//! A private `redis-server` on a free loopback port, holding nothing on disk (`--save ''`,
//! no append-only file): a stop or a kill loses what it held, as a Redis without persistence
//! does. It can be started again on the same port. Killed on drop.
//!
//! ```ignore
//! let mut redis = RedisServer::start().await;
//! let config = format!("tokens:\n  shared:\n    redis: {{ url: \"{}\" }}\n", redis.url());
//! redis.kill();   // Redis gone at once
//! redis.run().await; // back, empty, on the same port
//! ```

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{free_port, run_command, stop_child};

/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    port: u16,
    /// Its working directory (nothing is written there, but Redis needs one).
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    ///
    /// # Panics
    /// redis-server is not installed (scripts/install-test-deps.sh installs it) or does not
    /// answer within 10 s.
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        server.run().await;
        server
    }

    /// `redis://127.0.0.1:PORT/0`, for `tokens.shared.redis.url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it again, empty, on the same port after [`RedisServer::stop`] or
    /// [`RedisServer::kill`].
    ///
    /// # Panics
    /// It is running, or does not answer within 10 s.
    pub async fn run(&mut self) {
        assert!(self.child.is_none(), "redis-server is running already");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/install-test-deps.sh)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if self.cli(&["PING"]).await.trim() == "PONG" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Stops it as an operator would (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
    }

    /// Kills it (SIGKILL): connections drop mid-call, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis-cli COMMAND...`'s output (empty when it does not answer within 10 s).
    pub async fn cli(&self, command: &[&str]) -> String {
        let port = self.port.to_string();
        let mut args = vec!["-h", "127.0.0.1", "-p", &port];
        args.extend_from_slice(command);
        run_command("redis-cli", &args, None, Duration::from_secs(10))
            .await
            .stdout
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

//! A private `redis-server` on a free loopback port, with an append-only file so that a stop
//! and a start (a Redis restart) keep what it held; it can also be frozen (`SIGSTOP`), as a
//! Redis that accepts connections but never answers. Stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{free_port, send_signal, stop_child};

pub struct RedisServer {
    port: u16,
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
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.run().await;
        server
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts it again on the same port and data after [`RedisServer::stop`].
    pub async fn run(&mut self) {
        assert!(self.child.is_none(), "redis-server is running already");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/install-test-deps.sh)");
        self.child = Some(child);
        for _ in 0..500 {
            if self.cli(&["PING"]).await.trim() == "PONG" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Stops it (SIGTERM: it writes its data and exits).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
    }

    /// Kills it (SIGKILL): gone at once, as a crashed Redis; what the append-only file holds
    /// comes back with [`RedisServer::run`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (`true`) or thaws it: connections are accepted by the kernel, nothing is
    /// answered.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id();
        send_signal(pid, if frozen { "STOP" } else { "CONT" });
    }

    /// `redis-cli COMMAND...`'s output.
    pub async fn cli(&self, command: &[&str]) -> String {
        let port = self.port.to_string();
        let mut args = vec!["-h", "127.0.0.1", "-p", &port];
        args.extend_from_slice(command);
        super::process::run_command("redis-cli", &args, None, Duration::from_secs(10))
            .await
            .stdout
    }

    /// The append-only files, as bytes made text: what Redis keeps on disk.
    pub fn files(&self) -> String {
        let mut text = String::new();
        for path in walk(self.dir.path().to_owned()) {
            text.push_str(&String::from_utf8_lossy(
                &std::fs::read(path).unwrap_or_default(),
            ));
        }
        text
    }
}

fn walk(dir: PathBuf) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(path));
        } else {
            files.push(path);
        }
    }
    files
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

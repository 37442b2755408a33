//! [`Mailgate`]: the real `mailgate` binary run as a child process with a test config.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::process::{send_signal, stop_child, wait_for_port};

/// How long every listen address in the config may take to accept connections.
pub const MAILGATE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long mailgate may take to drain and exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running `mailgate serve --config FILE`; stdout and stderr go to files in its temp dir.
/// Killed on drop.
pub struct Mailgate {
    dir: tempfile::TempDir,
    child: Option<Child>,
    listen: Vec<SocketAddr>,
}

/// Every value of a key named `listen` anywhere in the YAML (listeners and metrics).
pub fn listen_addrs(config_yaml: &str) -> Vec<SocketAddr> {
    fn walk(value: &serde_json::Value, out: &mut Vec<SocketAddr>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    if key == "listen" {
                        if let Some(addr) = v.as_str().and_then(|s| s.parse().ok()) {
                            out.push(addr);
                        }
                    } else {
                        walk(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let value: serde_json::Value = serde_saphyr::from_str(config_yaml)
        .unwrap_or_else(|e| panic!("test config is not YAML: {e}\n{config_yaml}"));
    let mut out = Vec::new();
    walk(&value, &mut out);
    out
}

impl Mailgate {
    /// The binary cargo built for this package: cargo names it to tests and benches; the
    /// demo example, which cargo does not tell, is given it in `MAILGATE_BIN`.
    pub fn binary() -> PathBuf {
        option_env!("CARGO_BIN_EXE_mailgate")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("MAILGATE_BIN").map(PathBuf::from))
            .expect("MAILGATE_BIN names the mailgate binary")
    }

    /// Writes `config_yaml` to a file, starts `mailgate serve --config FILE` and waits until
    /// every `listen` address in the config accepts connections.
    ///
    /// # Panics
    /// When the process exits or the ports do not open within [`MAILGATE_START_TIMEOUT`]
    /// (the message carries mailgate's output).
    pub async fn start(config_yaml: &str) -> Mailgate {
        Self::start_with_env(config_yaml, &[]).await
    }

    /// Like [`Mailgate::start`] with extra environment variables (e.g. a password for
    /// `password_env`). `RUST_LOG` is not set unless given here.
    pub async fn start_with_env(config_yaml: &str, env: &[(&str, &str)]) -> Mailgate {
        let mut mailgate = Self::spawn(config_yaml, &["serve"], env);
        let deadline = Instant::now() + MAILGATE_START_TIMEOUT;
        for addr in mailgate.listen.clone() {
            loop {
                if let Some(status) = mailgate.try_wait() {
                    panic!(
                        "mailgate exited with {status} before listening on {addr}\n{}",
                        mailgate.output()
                    );
                }
                if wait_for_port(addr, Duration::from_millis(200)).await {
                    break;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "mailgate not accepting on {addr} after {MAILGATE_START_TIMEOUT:?}\n{}",
                        mailgate.output()
                    );
                }
            }
        }
        mailgate
    }

    /// Writes the config and spawns `mailgate ARGS... --config FILE` without waiting for
    /// anything (for tests of start-up failures: see [`Mailgate::wait_exit`]).
    pub fn spawn(config_yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Mailgate {
        let dir = tempfile::Builder::new()
            .prefix("mailgate-run-")
            .tempdir()
            .expect("temp dir for mailgate");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod mailgate dir");
        let config_path = dir.path().join("mailgate.yaml");
        std::fs::write(&config_path, config_yaml).expect("write mailgate config");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("stdout file");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file");
        let child = std::process::Command::new(Self::binary())
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", Self::binary().display()));
        Mailgate {
            listen: listen_addrs(config_yaml),
            dir,
            child: Some(child),
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code (`None` when it
    /// is still running, or was killed by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// The listen addresses found in the config, in order.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("mailgate.yaml")
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("stdout.log")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// A temp dir that lives as long as this process (for secret files and the like).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stdout_path()).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// stdout and stderr together, labelled (for failure messages and secret-leak checks).
    pub fn output(&self) -> String {
        format!(
            "--- mailgate stdout ---\n{}\n--- mailgate stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Panics when `secret` appears in mailgate's stdout or stderr.
    pub fn assert_not_logged(&self, secret: &str) {
        assert!(!secret.is_empty(), "empty secret");
        for (name, text) in [("stdout", self.stdout()), ("stderr", self.stderr())] {
            assert!(
                !text.contains(secret),
                "secret {secret:?} appears in mailgate {name}:\n{text}"
            );
        }
    }

    /// Stops at once: SIGTERM, then a second stop signal (SIGINT), which makes mailgate exit
    /// without its drain delay and grace period; SIGKILL if it is still there after 10 s.
    /// Blocking; called by `Drop`. Tests of the graceful stop send their own signals.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                send_signal(child.id(), "TERM");
                // The second signal is only a second one once the first was handled.
                std::thread::sleep(Duration::from_millis(50));
                send_signal(child.id(), "INT");
            }
            stop_child(&mut child, STOP_GRACE);
        }
    }
}

impl Drop for Mailgate {
    fn drop(&mut self) {
        self.stop();
    }
}

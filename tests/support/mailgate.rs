//! [`Mailgate`]: the real `mailgate` binary run as a child process with a test config, at trace
//! level unless the test chooses a level, its output checked for every remembered secret when
//! it is dropped (see [`super::secrets`]).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::process::{send_signal, stop_child, wait_for_port};
use super::secrets;

/// How long every listen address in the config may take to accept connections.
pub const MAILGATE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long mailgate may take to drain and exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running `mailgate serve --config FILE`; stdout and stderr go to files in its temp dir.
/// Stopped on drop, and then its output is scanned for every secret in [`secrets`]: a leak
/// panics (naming the kind of secret and where, never the secret) unless the test is already
/// panicking.
pub struct Mailgate {
    dir: tempfile::TempDir,
    child: Option<Child>,
    listen: Vec<SocketAddr>,
    /// The environment it was started with, to find the secrets `*_env` keys name.
    env: Vec<(String, String)>,
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
    /// `password_env`). `RUST_LOG` is `trace` unless given here or the config sets
    /// `log.level` (which `RUST_LOG` would override).
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
    /// anything (for tests of start-up failures: see [`Mailgate::wait_exit`]). The log level
    /// is chosen as in [`Mailgate::start_with_env`].
    pub fn spawn(config_yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Mailgate {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if !env.iter().any(|(k, _)| k == "RUST_LOG") && !sets_log_level(config_yaml) {
            // Trace, so that the secret scan sees everything mailgate could ever log.
            env.push(("RUST_LOG".to_owned(), "trace".to_owned()));
        }
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        secrets::remember_config(config_yaml, &env_refs);
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
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", Self::binary().display()));
        Mailgate {
            listen: listen_addrs(config_yaml),
            dir,
            child: Some(child),
            env,
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

    /// Panics when mailgate's stdout or stderr holds a secret from [`secrets`] (as is, encoded
    /// or inside base64), naming its kind and line and keeping a copy of the output; the
    /// message never carries the secret. Called on drop; a test may call it earlier.
    pub fn assert_no_secret_logged(&self) {
        // The configuration now (a test may have rotated secrets since the start).
        if let Ok(config) = std::fs::read_to_string(self.config_path()) {
            let env: Vec<(&str, &str)> = self
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            secrets::remember_config(&config, &env);
        }
        for (name, path) in [
            ("stdout.log", self.stdout_path()),
            ("stderr.log", self.stderr_path()),
        ] {
            let text = std::fs::read(&path).unwrap_or_default();
            let Some(leak) = secrets::scan(&String::from_utf8_lossy(&text)) else {
                continue;
            };
            let kept = keep_copy(&path, name);
            panic!(
                "mailgate logged a secret: {} ({}) in {name} line {}; output kept at {kept}",
                leak.kind, leak.form, leak.line
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
        // A panic while panicking aborts the test binary; the first failure says enough.
        if !std::thread::panicking() {
            self.assert_no_secret_logged();
        }
    }
}

/// Whether the config sets `log.level` (then `RUST_LOG` must not override it).
fn sets_log_level(config_yaml: &str) -> bool {
    serde_saphyr::from_str::<serde_json::Value>(config_yaml)
        .ok()
        .and_then(|config| config.get("log")?.get("level").cloned())
        .is_some()
}

/// Copies a log that leaked into a directory that outlives the test; its path, for the message.
fn keep_copy(path: &Path, name: &str) -> String {
    let kept = tempfile::Builder::new()
        .prefix("mailgate-leak-")
        .tempdir()
        .map(tempfile::TempDir::keep);
    match kept {
        Ok(dir) => {
            let target = dir.join(name);
            match std::fs::copy(path, &target) {
                Ok(_) => target.display().to_string(),
                Err(error) => format!("(copy failed: {error})"),
            }
        }
        Err(error) => format!("(no directory: {error})"),
    }
}

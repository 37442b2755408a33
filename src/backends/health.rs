//! The health of one server of a pool: checked in the background on an interval, with
//! rise/fall thresholds, and told of failed login connects. A server starts up, so that a
//! start or reload does not refuse logins until the first checks are in.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::HealthConfig;
use crate::frontend::MailProtocol;
use crate::metrics::{BackendLabels, Metrics};
use crate::upstream::Connector;

/// Longest last-error text kept for `mailgate backends`.
const MAX_ERROR_CHARS: usize = 200;

/// What a health check or a login connect found.
pub enum Outcome {
    Passed,
    Failed(String),
}

/// One server's health, shared by the pools of every reload that name it at the same address.
pub struct ServerHealth {
    labels: BackendLabels,
    settings: Mutex<(HealthConfig, Arc<Checked>)>,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

#[derive(Clone, Default)]
struct State {
    down: bool,
    /// Checks in a row that disagree with `down`.
    streak: u32,
    last_error: Option<String>,
    last_check: Option<SystemTime>,
}

/// What `mailgate backends` shows of a server's health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthView {
    pub up: bool,
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch.
    pub last_check: Option<u64>,
}

impl ServerHealth {
    pub fn new(
        labels: BackendLabels,
        settings: HealthConfig,
        checked: Checked,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.backend_up.get_or_create(&labels).set(1);
        Self {
            labels,
            settings: Mutex::new((settings, Arc::new(checked))),
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    pub fn is_up(&self) -> bool {
        !self.lock().down
    }

    pub fn view(&self) -> HealthView {
        let state = self.lock().clone();
        HealthView {
            up: !state.down,
            last_error: state.last_error,
            last_check: state.last_check.and_then(|at| {
                at.duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|since| since.as_secs())
            }),
        }
    }

    /// A reload may change the thresholds, the interval and how the server is reached.
    pub fn configure(&self, settings: HealthConfig, checked: Checked) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = (settings, Arc::new(checked));
    }

    fn settings(&self) -> (HealthConfig, Arc<Checked>) {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts a check or a login connect; returns whether the server went up or down.
    pub fn record(&self, outcome: Outcome) -> Option<bool> {
        let (settings, _) = self.settings();
        let mut state = self.lock();
        state.last_check = Some(SystemTime::now());
        let passed = matches!(outcome, Outcome::Passed);
        if let Outcome::Failed(error) = outcome {
            state.last_error = Some(error.chars().take(MAX_ERROR_CHARS).collect());
        }
        if passed != state.down {
            state.streak = 0;
            return None;
        }
        state.streak += 1;
        let needed = if state.down {
            settings.rise
        } else {
            settings.fall
        };
        if state.streak < needed {
            return None;
        }
        state.down = !passed;
        state.streak = 0;
        drop(state);
        let labels = &self.labels;
        self.metrics
            .backend_up
            .get_or_create(labels)
            .set(i64::from(passed));
        if passed {
            tracing::info!(listener = %labels.listener, server = %labels.server, "backend up");
        } else {
            tracing::warn!(
                listener = %labels.listener,
                server = %labels.server,
                error = self.lock().last_error.as_deref().unwrap_or_default(),
                "backend down: its accounts go to their next choice"
            );
        }
        Some(passed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a check needs: the protocol and the server's connector as the latest reload built
/// them.
pub struct Checked {
    pub protocol: &'static dyn MailProtocol,
    pub connector: Connector,
    pub hostname: String,
}

/// Checks `health` every interval until it is dropped (its last pool is gone); `changed` is
/// told when the server goes up or down.
pub fn watch(health: &Arc<ServerHealth>, changed: impl Fn() + Send + 'static) {
    let health: Weak<ServerHealth> = Arc::downgrade(health);
    tokio::spawn(async move {
        loop {
            let Some(strong) = health.upgrade() else {
                return;
            };
            let (settings, checked) = strong.settings();
            let started = Instant::now();
            let check = checked
                .protocol
                .check_health(&checked.connector, &checked.hostname);
            let outcome = match tokio::time::timeout(settings.timeout, check).await {
                Ok(Ok(())) => Outcome::Passed,
                Ok(Err(error)) => Outcome::Failed(error.to_string()),
                Err(_) => Outcome::Failed(format!(
                    "no answer within health.timeout ({})",
                    humantime::format_duration(settings.timeout)
                )),
            };
            strong
                .metrics
                .backend_check_seconds
                .get_or_create(&strong.labels)
                .observe(started.elapsed().as_secs_f64());
            if strong.record(outcome).is_some() {
                changed();
            }
            drop((strong, checked));
            tokio::time::sleep(settings.interval.max(Duration::from_millis(10))).await;
        }
    });
}

//! The backend operations (`/backends`), with `admin.backends`: the status of every pool's
//! servers, and the operator's drain, undrain, kick and move, which `mailgate backends` and
//! the onboarding page send. Basic auth; JSON answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode, header};

use super::onboarding::Flows;
use super::throttle::AdminThrottle;
use super::{AdminRequest, Reply, backends_page, check_basic_auth, reply};
use crate::backends::{Backends, DEFAULT_DRAIN_GRACE, OperationError};
use crate::config::BackendsAdminConfig;
use crate::sanitize::{Escaped, is_hidden};
use crate::secret::Secret;

const REALM: &str = "mailgate backends";

/// The longest account name: an address's limit (RFC 5321 section 4.5.3.1: 64 + 1 + 255).
pub const MAX_ACCOUNT_BYTES: usize = 320;
/// A server name is a configuration key; longer ones are not ours.
const MAX_SERVER_BYTES: usize = 255;
/// A drain longer than a day is a mistake in the unit, not a plan.
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// The operator's login.
pub struct Settings {
    user: String,
    password: Secret<String>,
}

impl Settings {
    /// `None` when the password was not read (the configuration was then refused).
    pub fn new(config: &BackendsAdminConfig) -> Option<Self> {
        Some(Self {
            user: config.user.clone(),
            password: config.password.clone()?,
        })
    }

    /// Checks the request's basic auth; returns the operator's user name.
    ///
    /// # Errors
    /// The reply to send instead (401 or 429).
    pub async fn authorize(
        &self,
        request: &AdminRequest,
        throttle: &AdminThrottle,
    ) -> Result<(), Box<Reply>> {
        let login = [(self.user.as_str(), &self.password)];
        check_basic_auth(request, login, REALM, throttle)
            .await
            .map(drop)
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

/// One operation on the backends, its input checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Drain { server: String, grace: Duration },
    Undrain { server: String },
    Kick { account: String },
    Move { account: String, server: String },
}

/// Why a request names no valid action (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(String);

impl Action {
    /// The action `name` (the path's last part) with the fields `form` gives.
    ///
    /// # Errors
    /// An unknown action, a missing or malformed field.
    pub fn parse(name: &str, form: &BTreeMap<String, String>) -> Result<Self, BadInput> {
        let field = |key: &str| {
            form.get(key)
                .map(String::as_str)
                .ok_or_else(|| BadInput(format!("{key} missing")))
        };
        let server = || field("server").and_then(checked_server);
        let account = || field("account").and_then(checked_account);
        match name {
            "drain" => Ok(Self::Drain {
                server: server()?,
                grace: match form.get("grace").filter(|grace| !grace.is_empty()) {
                    Some(grace) => checked_grace(grace)?,
                    None => DEFAULT_DRAIN_GRACE,
                },
            }),
            "undrain" => Ok(Self::Undrain { server: server()? }),
            "kick" => Ok(Self::Kick {
                account: account()?,
            }),
            "move" => Ok(Self::Move {
                account: account()?,
                server: server()?,
            }),
            _ => Err(BadInput(
                "no such action: drain, undrain, kick or move".to_owned(),
            )),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Drain { .. } => "drain",
            Self::Undrain { .. } => "undrain",
            Self::Kick { .. } => "kick",
            Self::Move { .. } => "move",
        }
    }

    /// Does it; the answer's fields besides the action.
    async fn run(&self, backends: &Arc<Backends>) -> Result<serde_json::Value, OperationError> {
        Ok(match self {
            Self::Drain { server, grace } => {
                backends.drain(server, *grace).await?;
                serde_json::json!({ "server": server, "grace_seconds": grace.as_secs() })
            }
            Self::Undrain { server } => {
                let was = backends.undrain(server).await?;
                serde_json::json!({ "server": server, "was_drained": was })
            }
            Self::Kick { account } => {
                let ended = backends.kick(account).await;
                serde_json::json!({ "account": account, "sessions_ended": ended })
            }
            Self::Move { account, server } => {
                let ended = backends.move_account(account, server).await?;
                serde_json::json!({ "account": account, "server": server, "sessions_ended": ended })
            }
        })
    }

    /// What the action works on, for the log (an account escaped: it is foreign text).
    fn target(&self) -> String {
        match self {
            Self::Drain { server, .. } | Self::Undrain { server } => server.clone(),
            Self::Kick { account } => Escaped(account).to_string(),
            Self::Move { account, server } => format!("{} to {server}", Escaped(account)),
        }
    }
}

fn checked_text(text: &str, max: usize, what: &str) -> Result<String, BadInput> {
    if text.is_empty() || text.len() > max || text.chars().any(is_hidden) {
        return Err(BadInput(format!(
            "{what}: 1 to {max} bytes, no control characters"
        )));
    }
    Ok(text.to_owned())
}

fn checked_server(server: &str) -> Result<String, BadInput> {
    checked_text(server, MAX_SERVER_BYTES, "server")
}

fn checked_account(account: &str) -> Result<String, BadInput> {
    checked_text(account, MAX_ACCOUNT_BYTES, "account")
}

fn checked_grace(grace: &str) -> Result<Duration, BadInput> {
    match humantime::parse_duration(grace) {
        Ok(grace) if grace <= MAX_DRAIN_GRACE => Ok(grace),
        _ => Err(BadInput(format!(
            "grace: a duration such as 30s, at most {}",
            humantime::format_duration(MAX_DRAIN_GRACE)
        ))),
    }
}

/// The request's fields: a JSON object of strings, or a form.
///
/// # Errors
/// A JSON body that is not such an object.
pub fn fields(request: &AdminRequest) -> Result<BTreeMap<String, String>, BadInput> {
    let json = request
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if json {
        return serde_json::from_slice(&request.body)
            .map_err(|_| BadInput("the body is not a JSON object of strings".to_owned()));
    }
    Ok(url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect())
}

/// Does `action` for the operator `user` and logs it; the JSON answer.
pub async fn perform(backends: &Arc<Backends>, user: &str, action: &Action) -> Reply {
    let result = action.run(backends).await;
    let outcome = match &result {
        Ok(_) => "ok".to_owned(),
        Err(error) => error.to_string(),
    };
    tracing::info!(
        operator = %Escaped(user),
        action = action.name(),
        target = %action.target(),
        result = %outcome,
        "backend operation"
    );
    match result {
        Ok(mut answer) => {
            answer["action"] = action.name().into();
            json(StatusCode::OK, &answer)
        }
        Err(error) => {
            let code = match error {
                OperationError::NoSuchServer(_) => StatusCode::NOT_FOUND,
                OperationError::NowhereToKeep(_) => StatusCode::CONFLICT,
                OperationError::Unwritten(..) => StatusCode::INTERNAL_SERVER_ERROR,
                // Redis is down: try again when it answers.
                OperationError::Unshared(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            error_reply(code, &error.to_string())
        }
    }
}

/// Serves `/backends` (GET: the status), `/backends/ACTION` (POST) and the page for a
/// browser ([`backends_page`]).
pub async fn respond(
    request: &AdminRequest,
    settings: &Settings,
    backends: &Arc<Backends>,
    throttle: &AdminThrottle,
    flows: &Flows,
) -> Reply {
    if let Err(refused) = settings.authorize(request, throttle).await {
        return *refused;
    }
    if request.path.starts_with(backends_page::PATH) {
        return backends_page::respond(request, settings.user(), backends, flows).await;
    }
    match (&request.method, request.path.strip_prefix("/backends")) {
        (&Method::GET, Some("" | "/")) => json(StatusCode::OK, &backends.status()),
        (&Method::POST, Some(path)) if path.starts_with('/') => {
            let action = fields(request).and_then(|form| Action::parse(&path[1..], &form));
            match action {
                Ok(action) => perform(backends, settings.user(), &action).await,
                Err(bad) => error_reply(StatusCode::BAD_REQUEST, &bad.0),
            }
        }
        (&Method::GET, _) => error_reply(StatusCode::NOT_FOUND, "not found"),
        _ => error_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /backends, or POST /backends/ACTION",
        ),
    }
}

fn json(code: StatusCode, value: &impl serde::Serialize) -> Reply {
    let body = serde_json::to_string(value).unwrap_or_default();
    let mut answer = reply(code, "application/json", body);
    answer.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    answer
}

fn error_reply(code: StatusCode, message: &str) -> Reply {
    json(code, &serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn actions_are_read_with_their_fields() {
        assert_eq!(
            Action::parse("drain", &form(&[("server", "b"), ("grace", "30s")])),
            Ok(Action::Drain {
                server: "b".to_owned(),
                grace: Duration::from_secs(30)
            })
        );
        assert_eq!(
            Action::parse("drain", &form(&[("server", "b")])),
            Ok(Action::Drain {
                server: "b".to_owned(),
                grace: DEFAULT_DRAIN_GRACE
            })
        );
        assert_eq!(
            Action::parse("move", &form(&[("account", "A@x"), ("server", "c")])),
            Ok(Action::Move {
                account: "A@x".to_owned(),
                server: "c".to_owned()
            })
        );
    }

    #[test]
    fn bad_input_is_refused() {
        let long = "a".repeat(MAX_ACCOUNT_BYTES + 1);
        for (name, fields) in [
            ("reboot", form(&[("server", "b")])),
            ("drain", form(&[])),
            ("drain", form(&[("server", "b"), ("grace", "soon")])),
            ("drain", form(&[("server", "b"), ("grace", "2days")])),
            ("kick", form(&[("account", "")])),
            ("kick", form(&[("account", "a\r\nb")])),
            ("kick", form(&[("account", long.as_str())])),
            ("move", form(&[("account", "a")])),
        ] {
            assert!(Action::parse(name, &fields).is_err(), "{name} {fields:?}");
        }
    }
}

//! `mailgate backends`: the status of the pools' servers and the operator's drain, undrain,
//! kick and move, asked of the running process's admin endpoint (`/backends`) with the
//! `admin.backends` login.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, print_table};
use crate::config::{AdminConfig, BackendsAdminConfig, Config};
use crate::http::{classify, read_bounded};
use crate::secret::Secret;

/// The admin endpoint answers at once; a drain or move only records and signals.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What to ask: the status, or one operation with its fields.
pub enum Request {
    Status,
    Drain {
        server: String,
        grace: Option<String>,
    },
    Undrain {
        server: String,
    },
    Kick {
        account: String,
    },
    Move {
        account: String,
        server: String,
    },
}

impl Request {
    /// The action's path and fields (`None` for the status).
    fn form(&self) -> Option<(&'static str, Vec<(&'static str, &str)>)> {
        Some(match self {
            Self::Status => return None,
            Self::Drain { server, grace } => {
                let mut fields = vec![("server", server.as_str())];
                fields.extend(grace.as_deref().map(|grace| ("grace", grace)));
                ("drain", fields)
            }
            Self::Undrain { server } => ("undrain", vec![("server", server.as_str())]),
            Self::Kick { account } => ("kick", vec![("account", account.as_str())]),
            Self::Move { account, server } => (
                "move",
                vec![("account", account.as_str()), ("server", server.as_str())],
            ),
        })
    }
}

/// How to print and whom to trust.
pub struct Options<'a> {
    pub json: bool,
    /// Trust roots for the admin endpoint's certificate instead of `admin.tls.cert_file`.
    pub ca_file: Option<&'a Path>,
}

/// `mailgate backends [--json]` and its actions.
pub async fn run(config: &Config, request: &Request, options: &Options<'_>) -> u8 {
    let Some((admin, login)) = config
        .admin
        .as_ref()
        .and_then(|admin| Some((admin, admin.backends.as_ref()?)))
    else {
        eprintln!("no admin.backends section in the configuration");
        return EXIT_USAGE;
    };
    let Some(password) = &login.password else {
        eprintln!("admin.backends has no password");
        return EXIT_USAGE;
    };
    let ca_file = options
        .ca_file
        .or(admin.tls.as_ref().map(|tls| tls.cert_file.as_path()));
    let client = match crate::http::client(REQUEST_TIMEOUT, ca_file) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("{error}");
            return EXIT_FAILED;
        }
    };
    let base = base_url(admin);
    let sent = match request.form() {
        None => client.get(format!("{base}/backends")),
        Some((action, fields)) => client
            .post(format!("{base}/backends/{action}"))
            .json(&fields.into_iter().collect::<BTreeMap<_, _>>()),
    };
    let answer = match ask(sent, login, password).await {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if options.json {
        println!("{answer}");
    } else if let Request::Status = request {
        print_status(&answer);
    } else {
        println!("{}", describe(&answer));
    }
    EXIT_OK
}

/// Where the running process listens: its admin address, loopback for an unspecified one.
fn base_url(admin: &AdminConfig) -> String {
    let mut address = admin.listen;
    if address.ip().is_unspecified() {
        let loopback = match address {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        address.set_ip(loopback);
    }
    let scheme = if admin.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{address}")
}

/// Sends the request with the login; the JSON answer, or the exit code after saying why not.
async fn ask(
    request: reqwest::RequestBuilder,
    login: &BackendsAdminConfig,
    password: &Secret<String>,
) -> Result<serde_json::Value, u8> {
    let response = request
        .basic_auth(&login.user, Some(password.expose()))
        .send()
        .await
        .map_err(|error| {
            eprintln!("cannot reach the admin endpoint: {}", classify(error));
            EXIT_FAILED
        })?;
    let status = response.status();
    let body = read_bounded(response).await.map_err(|error| {
        eprintln!("cannot read the answer: {error}");
        EXIT_FAILED
    })?;
    let answer: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    if status.is_success()
        && let Some(answer) = answer
    {
        return Ok(answer);
    }
    let reason = answer
        .as_ref()
        .and_then(|answer| answer.get("error"))
        .and_then(serde_json::Value::as_str)
        .map_or_else(|| status.to_string(), |error| format!("{status}: {error}"));
    eprintln!("refused: {reason}");
    Err(match status {
        StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => EXIT_USAGE,
        _ => EXIT_FAILED,
    })
}

fn print_status(answer: &serde_json::Value) {
    let text = |server: &serde_json::Value, key: &str| match &server[key] {
        serde_json::Value::String(text) => crate::sanitize::Escaped(text).to_string(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let rows: Vec<[String; 8]> = answer
        .as_array()
        .into_iter()
        .flatten()
        .map(|server| {
            [
                "listener",
                "server",
                "address",
                "weight",
                "state",
                "sessions",
                "users",
                "last_error",
            ]
            .map(|key| text(server, key))
        })
        .collect();
    if rows.is_empty() {
        println!("No listener has a pool of servers.");
        return;
    }
    print_table(
        &[
            "LISTENER",
            "SERVER",
            "ADDRESS",
            "WEIGHT",
            "STATE",
            "SESSIONS",
            "USERS",
            "LAST ERROR",
        ],
        &rows,
    );
}

/// One line for a person about what an action did.
fn describe(answer: &serde_json::Value) -> String {
    let field = |key: &str| {
        answer[key]
            .as_str()
            .map(|text| crate::sanitize::Escaped(text).to_string())
            .unwrap_or_default()
    };
    let ended = answer["sessions_ended"].as_u64().unwrap_or_default();
    match answer["action"].as_str() {
        Some("drain") => format!(
            "{}: no new logins; its sessions end after {}",
            field("server"),
            humantime::format_duration(Duration::from_secs(
                answer["grace_seconds"].as_u64().unwrap_or_default()
            ))
        ),
        Some("undrain") if answer["was_drained"] == true => {
            format!("{}: takes logins again", field("server"))
        }
        Some("undrain") => format!("{}: was not drained", field("server")),
        Some("kick") => format!("{}: {ended} session(s) ended", field("account")),
        Some("move") => format!(
            "{}: routed to {}; {ended} session(s) elsewhere ended",
            field("account"),
            field("server")
        ),
        _ => answer.to_string(),
    }
}

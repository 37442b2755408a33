//! The backends' page for a browser (`/backends/page`, linked from the onboarding page): the
//! pools' servers with drain and undrain buttons, kick and move forms. Behind the
//! `admin.backends` login like the JSON operations; every form carries the onboarding page's
//! CSRF token.

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use maud::{DOCTYPE, Markup, html};

use super::backends::{Action, fields, perform};
use super::onboarding::{Flows, secured_with};
use super::{AdminRequest, Reply, plain, reply};
use crate::backends::Backends;

pub const PATH: &str = "/backends/page";

/// Serves the page (GET) and its forms (POST `PATH/ACTION`): after an action, back to the
/// page with its result above the table.
pub async fn respond(
    request: &AdminRequest,
    user: &str,
    backends: &Arc<Backends>,
    flows: &Flows,
) -> Reply {
    let reply = match (&request.method, request.path.strip_prefix(PATH)) {
        (&Method::GET, Some("")) => page(backends, flows, None),
        (&Method::POST, Some(action)) if action.starts_with('/') => {
            let form: BTreeMap<String, String> = fields(request).unwrap_or_default();
            if !flows.csrf_matches(form.get("csrf").map(String::as_str)) {
                tracing::warn!(client = %request.client, "backends form without a valid CSRF token refused");
                return plain(StatusCode::FORBIDDEN, "missing or wrong CSRF token\n");
            }
            let result = match Action::parse(&action[1..], &form) {
                Ok(action) => {
                    let answer = perform(backends, user, &action).await;
                    let ok = answer.status().is_success();
                    (ok, if ok { "done" } else { "refused" }.to_owned())
                }
                Err(bad) => (false, bad.to_string()),
            };
            page(backends, flows, Some(result))
        }
        _ => plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    };
    secured(reply)
}

fn page(backends: &Backends, flows: &Flows, result: Option<(bool, String)>) -> Reply {
    let csrf = html! { input type="hidden" name="csrf" value=(flows.csrf()); };
    let body = html! {
        @if let Some((ok, text)) = &result {
            p class=(if *ok { "notice ok" } else { "notice error" }) { (text) }
        }
        table {
            thead { tr { th { "Listener" } th { "Server" } th { "State" } th { "Sessions" } th { "Users" } th { "Last error" } th {} } }
            tbody {
                @for server in backends.status() {
                    tr {
                        td { (server.listener) }
                        td { (server.server) }
                        td { (server.state) }
                        td { (server.sessions) }
                        td { (server.users) }
                        td { (server.health.last_error.clone().unwrap_or_default()) }
                        td {
                            @let action = if server.state == "draining" { "undrain" } else { "drain" };
                            form method="post" action=(format!("{PATH}/{action}")) {
                                (csrf)
                                input type="hidden" name="server" value=(server.server);
                                button type="submit" id=(format!("{action}-{}-{}", server.listener, server.server)) { (action) }
                            }
                        }
                    }
                }
            }
        }
        (account_form("kick", false, &csrf))
        (account_form("move", true, &csrf))
    };
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "mailgate: backends" } }
            body { h1 { "Backends" } (body) }
        }
    };
    reply(
        StatusCode::OK,
        "text/html; charset=utf-8",
        markup.into_string(),
    )
}

fn account_form(action: &str, with_server: bool, csrf: &Markup) -> Markup {
    html! {
        form method="post" action=(format!("{PATH}/{action}")) {
            (csrf)
            input type="text" name="account" placeholder="account" required;
            @if with_server {
                input type="text" name="server" placeholder="server" required;
            }
            button type="submit" id=(action) { (action) }
        }
    }
}

/// No script, forms only to this endpoint (see [`secured_with`]).
fn secured(reply: Reply) -> Reply {
    let policy = "default-src 'none'; form-action 'self'; frame-ancestors 'none'";
    secured_with(reply, Some(HeaderValue::from_static(policy)))
}

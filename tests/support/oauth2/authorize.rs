//! The authorization endpoint (RFC 6749 section 4.1, RFC 7636 section 4.3): a plain HTML
//! consent page (no JavaScript) whose form posts back here, then a redirect carrying a code or
//! an error. What the page shows is kept server-side; the form carries only its id.

use tokio::time::Instant;

use super::GRANT_AUTHORIZATION_CODE;
use super::crypto::{is_pkce_syntax, random_token};
use super::server::{HttpReply, HttpRequest};
use super::state::{AuthorizationCode, Form, PendingAuthorization, Shared};

/// `GET /authorize?response_type=code&client_id&redirect_uri&scope&state&code_challenge&
/// code_challenge_method=S256`: the consent page, or an error.
pub(super) fn show(shared: &Shared, req: &HttpRequest) -> HttpReply {
    let query = match Form::parse(req.query.as_bytes()) {
        Ok(query) => query,
        Err(error) => return error_page(&error.description),
    };
    let mut st = shared.lock();
    // Section 4.1.2.1: with a missing or wrong client or redirect URI the user is told, and
    // nothing is sent to the (possibly attacker's) redirect URI.
    let Some(client_id) = query.get("client_id") else {
        return error_page("client_id missing");
    };
    let Some(client) = st.clients.get(client_id) else {
        return error_page("unknown client");
    };
    let Some(redirect_uri) = query
        .get("redirect_uri")
        .filter(|uri| client.redirect_uris.iter().any(|r| r == uri))
    else {
        return error_page("redirect_uri missing or not registered for this client");
    };
    let state = query.get("state");
    // Every other problem goes back to the client (section 4.1.2.1).
    let refuse = |code: &str, description: &str| {
        HttpReply::redirect(redirect_with(
            redirect_uri,
            &[
                ("error", Some(code)),
                ("error_description", Some(description)),
                ("state", state),
            ],
        ))
    };
    match query.get("response_type") {
        Some("code") => {}
        None => return refuse("invalid_request", "response_type missing"),
        Some(_) => return refuse("unsupported_response_type", "only code is supported"),
    }
    if let Some(allowed) = &client.allowed_grants
        && !allowed.iter().any(|g| g == GRANT_AUTHORIZATION_CODE)
    {
        return refuse("unauthorized_client", "authorization_code not allowed");
    }
    let Some(challenge) = query.get("code_challenge") else {
        return refuse("invalid_request", "code_challenge required");
    };
    // RFC 7636 section 4.3: a missing method means plain, which this server refuses
    // (section 4.4.1: "transform algorithm not supported").
    if query.get("code_challenge_method") != Some("S256") {
        return refuse("invalid_request", "code_challenge_method must be S256");
    }
    if !is_pkce_syntax(challenge) {
        return refuse("invalid_request", "malformed code_challenge");
    }
    let id = random_token("ar-");
    let pending = PendingAuthorization {
        client_id: client_id.to_owned(),
        redirect_uri: redirect_uri.to_owned(),
        scope: query.get("scope").map(str::to_owned),
        state: state.map(str::to_owned),
        code_challenge: challenge.to_owned(),
    };
    let page = consent_page(&id, &pending, st.consenting_user.as_deref(), None);
    st.pending.insert(id, pending);
    HttpReply::html(200, page)
}

/// `POST /authorize` from the consent page: `request`, `decision=approve|deny`, and without a
/// consenting user `username` and `password`. Redirects with `code` and `state`, or with
/// `error=access_denied`; a wrong password shows the page again.
pub(super) fn decide(shared: &Shared, req: &HttpRequest) -> HttpReply {
    if !req.is_form() {
        return error_page("form expected");
    }
    let form = match Form::parse(&req.body) {
        Ok(form) => form,
        Err(error) => return error_page(&error.description),
    };
    let Some(id) = form.get("request") else {
        return error_page("request missing");
    };
    let mut st = shared.lock();
    let Some(pending) = st.pending.get(id) else {
        return error_page("unknown or finished authorization request");
    };
    let user = match (form.get("decision"), &st.consenting_user) {
        (Some("deny"), _) => None,
        (Some("approve"), Some(user)) => Some(user.clone()),
        (Some("approve"), None) => match (form.get("username"), form.get("password")) {
            (Some(user), Some(password))
                if st.users.get(user).map(String::as_str) == Some(password) =>
            {
                Some(user.to_owned())
            }
            _ => {
                let page = consent_page(id, pending, None, Some("Wrong user name or password."));
                return HttpReply::html(200, page);
            }
        },
        _ => return error_page("decision must be approve or deny"),
    };
    let Some(pending) = st.pending.remove(id) else {
        return error_page("unknown or finished authorization request");
    };
    let state = pending.state.as_deref();
    let Some(user) = user else {
        return HttpReply::redirect(redirect_with(
            &pending.redirect_uri,
            &[
                ("error", Some("access_denied")),
                ("error_description", Some("the user denied access")),
                ("state", state),
            ],
        ));
    };
    let code = random_token("ac-");
    super::super::secrets::remember("OAuth authorization code", &code);
    let grant = st.new_grant();
    let expires_at = Instant::now() + st.settings.code_lifetime;
    let location = redirect_with(
        &pending.redirect_uri,
        &[("code", Some(&code)), ("state", state)],
    );
    st.codes.insert(
        code,
        AuthorizationCode {
            client_id: pending.client_id,
            redirect_uri: pending.redirect_uri,
            scope: pending.scope,
            code_challenge: pending.code_challenge,
            user,
            expires_at,
            used: false,
            grant,
        },
    );
    HttpReply::redirect(location)
}

/// `uri` with `params` added to its query (those with a value), keeping its own query
/// (RFC 6749 section 3.1.2).
fn redirect_with(uri: &str, params: &[(&str, Option<&str>)]) -> String {
    let mut url = url::Url::parse(uri).expect("registered redirect URIs parse");
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in params {
            if let Some(value) = value {
                query.append_pair(name, value);
            }
        }
    }
    url.into()
}

fn consent_page(
    id: &str,
    pending: &PendingAuthorization,
    user: Option<&str>,
    error: Option<&str>,
) -> String {
    let who = match user {
        Some(user) => format!(
            "<p>Signed in as <strong id=\"user\">{}</strong>.</p>\n",
            escape(user)
        ),
        None => "<p><label>User name <input id=\"username\" name=\"username\" \
                 autocomplete=\"username\"></label></p>\n\
                 <p><label>Password <input id=\"password\" name=\"password\" \
                 type=\"password\" autocomplete=\"current-password\"></label></p>\n"
            .to_owned(),
    };
    let error = error
        .map(|e| format!("<p id=\"error\" role=\"alert\">{}</p>\n", escape(e)))
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\
         <title>Authorize {client}</title></head>\n<body>\n<h1>Authorize access</h1>\n\
         <p>The application <strong id=\"client\">{client}</strong> asks for \
         <code id=\"scope\">{scope}</code>.</p>\n{error}\
         <form method=\"post\" action=\"/authorize\">\n\
         <input type=\"hidden\" name=\"request\" value=\"{id}\">\n{who}\
         <button id=\"approve\" type=\"submit\" name=\"decision\" value=\"approve\">Approve</button>\n\
         <button id=\"deny\" type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\n\
         </form>\n</body>\n</html>\n",
        client = escape(&pending.client_id),
        scope = escape(pending.scope.as_deref().unwrap_or("")),
        id = escape(id),
    )
}

/// A 400 page for problems the user must see (never a redirect).
pub(super) fn error_page(message: &str) -> HttpReply {
    HttpReply::html(
        400,
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\
             <title>Error</title></head>\n<body>\n<h1>Error</h1>\n\
             <p id=\"error\">{}</p>\n</body>\n</html>\n",
            escape(message)
        ),
    )
}

/// `text` safe inside HTML text and double-quoted attributes.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// The `name`/`value` pairs of the `<input type="hidden">` fields in a page of this provider,
/// so a test can post a consent form back without a browser.
pub fn hidden_fields(html: &str) -> Vec<(String, String)> {
    let attribute = |tag: &str, name: &str| {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let end = tag[start..].find('"')? + start;
        Some(unescape(&tag[start..end]))
    };
    html.split("<input")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            if attribute(tag, "type")? != "hidden" {
                return None;
            }
            Some((
                attribute(tag, "name")?,
                attribute(tag, "value").unwrap_or_default(),
            ))
        })
        .collect()
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

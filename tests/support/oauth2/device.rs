//! The device authorization grant (RFC 8628): `POST /devicecode` hands out a device code and a
//! user code, the user decides at `GET|POST /device` (or the test calls
//! `approve_device`/`deny_device`), and the client polls the token endpoint ([`poll`]).

use std::time::Duration;

use tokio::time::Instant;

use super::GRANT_DEVICE_CODE;
use super::authorize::{error_page, escape};
use super::client_auth::authenticate;
use super::crypto::{random_below, random_token};
use super::grants::answer_with_refresh;
use super::server::{HttpReply, HttpRequest};
use super::state::{DeviceDecision, DeviceGrant, Form, OAuthError, Shared, State};
use super::token::Answer;

/// RFC 8628 section 6.1: a base-20 alphabet without vowels (no words) or look-alikes, eight
/// characters (20^8, about 34 bits), shown as `XXXX-XXXX`.
const USER_CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
const USER_CODE_LEN: usize = 8;
/// RFC 8628 section 3.5: on `slow_down` "the interval MUST be increased by 5 seconds for this
/// and all subsequent requests".
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// `POST /devicecode` (RFC 8628 sections 3.1 and 3.2).
pub(super) fn authorize(shared: &Shared, req: &HttpRequest) -> HttpReply {
    let form = if !req.query.is_empty() {
        Err(OAuthError::invalid_request(
            "parameters belong in the body, not the URI",
        ))
    } else if !req.is_form() {
        Err(OAuthError::invalid_request(
            "body must be application/x-www-form-urlencoded",
        ))
    } else {
        Form::parse(&req.body)
    };
    let form = match form {
        Ok(form) => form,
        Err(error) => return error.reply(),
    };
    let mut st = shared.lock();
    let client = match authenticate(shared, &mut st, req, &form) {
        Ok(client) => client,
        Err(error) => return error.reply(),
    };
    if let Some(allowed) = &st.clients[&client.id].allowed_grants
        && !allowed.iter().any(|g| g == GRANT_DEVICE_CODE)
    {
        return OAuthError::unauthorized_client("device_code not allowed").reply();
    }
    let user_code = loop {
        let code: String = random_below(20, USER_CODE_LEN)
            .into_iter()
            .map(|i| char::from(USER_CODE_ALPHABET[usize::from(i)]))
            .collect();
        if st.device_by_user_code(&code).is_none() {
            break code;
        }
    };
    let device_code = random_token("dc-");
    super::super::secrets::remember("OAuth device code", &device_code);
    let interval = st.settings.device_interval_secs;
    let lifetime = st.settings.device_lifetime;
    let shown = show_user_code(&user_code);
    st.devices.insert(
        device_code.clone(),
        DeviceGrant {
            client_id: client.id,
            user_code,
            scope: form.get("scope").map(str::to_owned),
            expires_at: req.arrived + lifetime,
            interval: Duration::from_secs(interval),
            last_poll: None,
            decision: DeviceDecision::Pending,
            redeemed: false,
        },
    );
    let verification_uri = format!("http://{}/device", shared.addr);
    HttpReply::json(
        200,
        &serde_json::json!({
            "device_code": device_code,
            "user_code": shown,
            "verification_uri": verification_uri,
            "verification_uri_complete": format!("{verification_uri}?user_code={shown}"),
            "expires_in": lifetime.as_secs(),
            "interval": interval,
        }),
    )
    .with_header("cache-control", "no-store")
}

fn show_user_code(code: &str) -> String {
    format!("{}-{}", &code[..4], &code[4..])
}

/// A device-code token request (RFC 8628 sections 3.4 and 3.5), timed by its arrival.
pub(super) fn poll(
    shared: &Shared,
    st: &mut State,
    client_id: &str,
    form: &Form,
    arrived: Instant,
) -> Result<Answer, OAuthError> {
    let code = form
        .get("device_code")
        .ok_or_else(|| OAuthError::invalid_request("device_code missing"))?;
    let Some(device) = st.devices.get_mut(code) else {
        return Err(OAuthError::invalid_grant("unknown device code"));
    };
    if device.client_id != client_id {
        return Err(OAuthError::invalid_grant(
            "device code was issued to another client",
        ));
    }
    if device.redeemed {
        return Err(OAuthError::invalid_grant("device code already used"));
    }
    if arrived >= device.expires_at {
        return Err(OAuthError::new(400, "expired_token", "device code expired"));
    }
    let too_soon = device
        .last_poll
        .is_some_and(|last| arrived.saturating_duration_since(last) < device.interval);
    device.last_poll = Some(arrived);
    if too_soon {
        device.interval += SLOW_DOWN_STEP;
        return Err(OAuthError::new(
            400,
            "slow_down",
            "polling faster than the interval",
        ));
    }
    let user = match &device.decision {
        DeviceDecision::Pending => {
            return Err(OAuthError::new(
                400,
                "authorization_pending",
                "the user has not decided yet",
            ));
        }
        DeviceDecision::Denied => {
            return Err(OAuthError::new(
                400,
                "access_denied",
                "the user denied access",
            ));
        }
        DeviceDecision::Approved(user) => user.clone(),
    };
    device.redeemed = true;
    let scope = device.scope.clone();
    let grant = st.new_grant();
    Ok(answer_with_refresh(
        shared,
        st,
        &user,
        client_id,
        scope.as_deref(),
        grant,
    ))
}

/// Approves (`Some(user)`) or denies (`None`) the undecided, unexpired grant with `user_code`;
/// whether there was one.
pub(super) fn decide_for(shared: &Shared, user_code: &str, user: Option<&str>) -> bool {
    let mut st = shared.lock();
    match st.device_by_user_code(user_code) {
        Some(device)
            if device.decision == DeviceDecision::Pending && Instant::now() < device.expires_at =>
        {
            device.decision = match user {
                Some(user) => DeviceDecision::Approved(user.to_owned()),
                None => DeviceDecision::Denied,
            };
            true
        }
        _ => false,
    }
}

pub(super) fn pending_user_codes(shared: &Shared) -> Vec<String> {
    let now = Instant::now();
    shared
        .lock()
        .devices
        .values()
        .filter(|d| d.decision == DeviceDecision::Pending && now < d.expires_at)
        .map(|d| show_user_code(&d.user_code))
        .collect()
}

/// `GET /device[?user_code=XXXX-XXXX]`: the verification page.
pub(super) fn show(shared: &Shared, req: &HttpRequest) -> HttpReply {
    let query = match Form::parse(req.query.as_bytes()) {
        Ok(query) => query,
        Err(error) => return error_page(&error.description),
    };
    let user = shared.lock().consenting_user.clone();
    HttpReply::html(
        200,
        device_page(query.get("user_code").unwrap_or(""), user.as_deref(), None),
    )
}

/// `POST /device`: `user_code`, `decision=approve|deny`, and without a consenting user
/// `username` and `password`.
pub(super) fn decide(shared: &Shared, req: &HttpRequest) -> HttpReply {
    if !req.is_form() {
        return error_page("form expected");
    }
    let form = match Form::parse(&req.body) {
        Ok(form) => form,
        Err(error) => return error_page(&error.description),
    };
    let user_code = form.get("user_code").unwrap_or("");
    let consenting = shared.lock().consenting_user.clone();
    let user = match (form.get("decision"), consenting) {
        (Some("deny"), _) => None,
        (Some("approve"), Some(user)) => Some(user),
        (Some("approve"), None) => {
            let (name, password) = (form.get("username"), form.get("password"));
            let known = name
                .is_some_and(|name| shared.lock().users.get(name).map(String::as_str) == password);
            if !known {
                let page = device_page(user_code, None, Some("Wrong user name or password."));
                return HttpReply::html(200, page);
            }
            name.map(str::to_owned)
        }
        _ => return error_page("decision must be approve or deny"),
    };
    if !decide_for(shared, user_code, user.as_deref()) {
        return error_page("unknown, expired or already decided code");
    }
    let outcome = if user.is_some() { "approved" } else { "denied" };
    HttpReply::html(
        200,
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\
             <title>Device {outcome}</title></head>\n<body>\n\
             <p id=\"result\">Device {outcome}. You may close this window.</p>\n\
             </body>\n</html>\n"
        ),
    )
}

fn device_page(user_code: &str, user: Option<&str>, error: Option<&str>) -> String {
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
         <title>Connect a device</title></head>\n<body>\n<h1>Connect a device</h1>\n{error}\
         <form method=\"post\" action=\"/device\">\n\
         <p><label>Code <input id=\"user_code\" name=\"user_code\" value=\"{code}\" \
         autocomplete=\"off\"></label></p>\n{who}\
         <button id=\"approve\" type=\"submit\" name=\"decision\" value=\"approve\">Approve</button>\n\
         <button id=\"deny\" type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\n\
         </form>\n</body>\n</html>\n",
        code = escape(user_code),
    )
}

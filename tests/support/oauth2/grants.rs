//! The grants of the token endpoint but the device grant (in `device`): client credentials
//! (RFC 6749 section 4.4), refresh token (section 6), authorization code with PKCE (section
//! 4.1.3, RFC 7636), password (section 4.3) and Google-style JWT bearer (RFC 7523 section 2.1).

use tokio::time::Instant;

use super::client_auth::AuthedClient;
use super::crypto::{self, is_pkce_syntax, peek_claims, pkce_s256, unix_now};
use super::state::{Form, OAuthError, RefreshStatus, Shared, State};
use super::token::Answer;

/// Google: a service-account assertion's `exp` is "a maximum of 1 hour after the issued time".
const MAX_SERVICE_ACCOUNT_ASSERTION_SECS: i64 = 3600;

/// Access and refresh token for `user` in grant family `grant`.
pub(super) fn answer_with_refresh(
    shared: &Shared,
    st: &mut State,
    user: &str,
    client_id: &str,
    scope: Option<&str>,
    grant: u64,
) -> Answer {
    let (access_token, expires_in) = shared.issue_access(st, user, client_id, scope, grant);
    let refresh_token = shared.issue_refresh(st, user, client_id, scope, grant);
    Answer {
        access_token,
        expires_in,
        refresh_token: Some(refresh_token),
        scope: scope.map(str::to_owned),
        user: user.to_owned(),
    }
}

/// RFC 6749 section 4.4: confidential clients only, an app-only token for the client's
/// mailbox, never a refresh token (section 4.4.3).
pub(super) fn client_credentials(
    shared: &Shared,
    st: &mut State,
    client: &AuthedClient,
    form: &Form,
) -> Result<Answer, OAuthError> {
    if client.public {
        return Err(OAuthError::unauthorized_client(
            "public clients cannot use client_credentials",
        ));
    }
    // Optional in RFC 6749, required by Microsoft (`https://outlook.office365.com/.default`).
    let scope = form
        .get("scope")
        .ok_or_else(|| OAuthError::invalid_request("scope missing"))?;
    let user = st.clients[&client.id]
        .mailbox
        .clone()
        .unwrap_or_else(|| client.id.clone());
    let grant = st.new_grant();
    let (access_token, expires_in) = shared.issue_access(st, &user, &client.id, Some(scope), grant);
    Ok(Answer {
        access_token,
        expires_in,
        refresh_token: None,
        scope: Some(scope.to_owned()),
        user,
    })
}

/// RFC 6749 section 6, with rotation (OAuth 2.0 Security BCP, RFC 9700 section 4.14.2).
pub(super) fn refresh(
    shared: &Shared,
    st: &mut State,
    client: &AuthedClient,
    form: &Form,
) -> Result<Answer, OAuthError> {
    let presented = form
        .get("refresh_token")
        .ok_or_else(|| OAuthError::invalid_request("refresh_token missing"))?;
    let Some(refresh) = st.refresh_tokens.get(presented) else {
        return Err(OAuthError::invalid_grant("unknown refresh token"));
    };
    if refresh.client_id != client.id {
        return Err(OAuthError::invalid_grant(
            "refresh token was issued to another client",
        ));
    }
    match refresh.status {
        RefreshStatus::Active => {}
        RefreshStatus::Rotated => {
            if st.settings.reuse_detection {
                let grant = refresh.grant;
                shared.revoke_grant(st, grant);
                st.reuses_detected += 1;
            }
            return Err(OAuthError::invalid_grant("refresh token already used"));
        }
        RefreshStatus::Revoked => return Err(OAuthError::invalid_grant("refresh token revoked")),
    }
    // Section 6: the scope "MUST NOT include any scope not originally granted".
    let granted = refresh.scope.clone();
    let scope = match form.get("scope") {
        Some(asked) if !is_subset(asked, granted.as_deref()) => {
            return Err(OAuthError::invalid_scope("scope exceeds what was granted"));
        }
        Some(asked) => Some(asked.to_owned()),
        None => granted.clone(),
    };
    let (user, grant) = (refresh.user.clone(), refresh.grant);
    let (access_token, expires_in) =
        shared.issue_access(st, &user, &client.id, scope.as_deref(), grant);
    let refresh_token = if st.settings.rotation {
        if let Some(old) = st.refresh_tokens.get_mut(presented) {
            old.status = RefreshStatus::Rotated;
        }
        Some(shared.issue_refresh(st, &user, &client.id, granted.as_deref(), grant))
    } else {
        None
    };
    Ok(Answer {
        access_token,
        expires_in,
        refresh_token,
        scope,
        user,
    })
}

/// Whether every space-separated scope in `asked` is in `granted` (RFC 6749 section 3.3).
fn is_subset(asked: &str, granted: Option<&str>) -> bool {
    let granted: Vec<&str> = granted.unwrap_or("").split(' ').collect();
    asked
        .split(' ')
        .filter(|s| !s.is_empty())
        .all(|s| granted.contains(&s))
}

/// RFC 6749 section 4.1.3 with RFC 7636 section 4.6: single-use, short-lived codes bound to
/// client, redirect URI and an S256 challenge.
pub(super) fn code(
    shared: &Shared,
    st: &mut State,
    client: &AuthedClient,
    form: &Form,
) -> Result<Answer, OAuthError> {
    let code = form
        .get("code")
        .ok_or_else(|| OAuthError::invalid_request("code missing"))?;
    let Some(entry) = st.codes.get(code) else {
        return Err(OAuthError::invalid_grant("unknown code"));
    };
    if entry.used {
        // Section 4.1.2: a code used twice revokes the tokens issued from it.
        let grant = entry.grant;
        shared.revoke_grant(st, grant);
        return Err(OAuthError::invalid_grant("code already used"));
    }
    if Instant::now() >= entry.expires_at {
        return Err(OAuthError::invalid_grant("code expired"));
    }
    if entry.client_id != client.id {
        return Err(OAuthError::invalid_grant(
            "code was issued to another client",
        ));
    }
    if form.get("redirect_uri") != Some(entry.redirect_uri.as_str()) {
        return Err(OAuthError::invalid_grant(
            "redirect_uri differs from the authorization request",
        ));
    }
    let Some(verifier) = form.get("code_verifier") else {
        return Err(OAuthError::invalid_grant("code_verifier missing"));
    };
    if !is_pkce_syntax(verifier) || pkce_s256(verifier) != entry.code_challenge {
        return Err(OAuthError::invalid_grant("PKCE verification failed"));
    }
    let (user, scope, grant) = (entry.user.clone(), entry.scope.clone(), entry.grant);
    if let Some(entry) = st.codes.get_mut(code) {
        entry.used = true;
    }
    Ok(answer_with_refresh(
        shared,
        st,
        &user,
        &client.id,
        scope.as_deref(),
        grant,
    ))
}

/// RFC 6749 section 4.3.
pub(super) fn password(
    shared: &Shared,
    st: &mut State,
    client: &AuthedClient,
    form: &Form,
) -> Result<Answer, OAuthError> {
    let (Some(user), Some(password)) = (form.get("username"), form.get("password")) else {
        return Err(OAuthError::invalid_request(
            "username and password required",
        ));
    };
    if st.users.get(user).map(String::as_str) != Some(password) {
        return Err(OAuthError::invalid_grant("wrong user name or password"));
    }
    let grant = st.new_grant();
    Ok(answer_with_refresh(
        shared,
        st,
        user,
        &client.id,
        form.get("scope"),
        grant,
    ))
}

/// RFC 7523 section 2.1 as Google runs it for service accounts with domain-wide delegation:
/// `iss` the service account, `sub` the user impersonated (the account itself when absent),
/// `scope`, `aud` the token endpoint, `exp` at most an hour after `iat`. Failures are
/// `invalid_grant` (RFC 7523 section 3.1), a missing scope `invalid_scope`.
pub(super) fn service_account(
    shared: &Shared,
    st: &mut State,
    form: &Form,
) -> Result<Answer, OAuthError> {
    let bad = OAuthError::invalid_grant;
    let assertion = form
        .get("assertion")
        .ok_or_else(|| OAuthError::invalid_request("assertion missing"))?;
    let iss = peek_claims(assertion)
        .map_err(bad)?
        .get("iss")
        .and_then(|v| v.as_str().map(str::to_owned))
        .ok_or_else(|| bad("iss missing"))?;
    let key = st
        .service_accounts
        .get(&iss)
        .ok_or_else(|| bad("unknown service account"))?;
    let jwt = crypto::verify_rs256(assertion, key).map_err(bad)?;
    if !jwt.audience_is(&shared.token_url()) {
        return Err(bad("aud is not the token endpoint"));
    }
    if jwt.claim_time("iat").is_none() {
        return Err(bad("iat missing"));
    }
    jwt.check_times(unix_now(), MAX_SERVICE_ACCOUNT_ASSERTION_SECS)
        .map_err(bad)?;
    let user = match jwt.claims.get("sub") {
        None => iss.clone(),
        Some(sub) => sub
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("sub is not a string"))?
            .to_owned(),
    };
    let scope = jwt
        .claim_str("scope")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| OAuthError::invalid_scope("scope missing"))?
        .to_owned();
    let grant = st.new_grant();
    let (access_token, expires_in) = shared.issue_access(st, &user, &iss, Some(&scope), grant);
    Ok(Answer {
        access_token,
        expires_in,
        refresh_token: None,
        scope: Some(scope),
        user,
    })
}

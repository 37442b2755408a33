//! The commands for people besides `serve` and `check`: authorizing an account, listing
//! accounts, importing a refresh token, moving the tokens between stores ([`store`]), one
//! test login with every step shown, and hashing a client password. Each prints for a person
//! (or JSON for scripts) and returns the process exit code.

use std::io::{IsTerminal as _, Read as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::client_auth::hash_pool::new_hash;
use crate::config::{Config, Grant, ListenerConfig, Protocol};
use crate::frontend::OnBehalf;
use crate::health::Health;
use crate::login::UpstreamAuth;
use crate::metrics::Metrics;
use crate::protocols;
use crate::replicas::Redis;
use crate::secret::Secret;
use crate::token::auth_server::is_usable_token;
use crate::token::oauth2::flows::{self, FlowError};
use crate::token::oauth2::{AccountState, AccountStatus, OAuth2, UNSAVED, span_in_minutes};
use crate::token::sources::Sources;
use crate::token::{TokenError, TokenSource};
use crate::upstream::Connector;

pub mod backends;
pub mod store;

/// Exit codes, as `check` uses them.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 64;

/// How long a command that redeemed a refresh token keeps trying to store the rotated one
/// before it exits (and the token with it).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `authorize` waits for the browser to come back.
const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The loopback redirect URL suggested when none is configured (docs/configuration.md uses it).
const EXAMPLE_REDIRECT_URL: &str = "http://localhost:8400/callback";

async fn oauth2(config: &Config) -> Result<Arc<OAuth2>, u8> {
    let Some(oauth2) = &config.tokens.oauth2 else {
        eprintln!("no tokens.oauth2 section in the configuration");
        return Err(EXIT_USAGE);
    };
    let metrics = Arc::new(Metrics::new());
    let redis = shared_state(config, &metrics)?;
    OAuth2::new(oauth2, &Arc::default(), metrics, None, redis)
        .await
        .map_err(|error| {
            eprintln!("cannot set up OAuth2: {error}");
            EXIT_FAILED
        })
}

/// The Redis replicas share, if the configuration names one.
fn shared_state(config: &Config, metrics: &Arc<Metrics>) -> Result<Option<Arc<Redis>>, u8> {
    config
        .tokens
        .shared
        .as_ref()
        .map(|shared| Redis::new(shared, metrics.clone(), None))
        .transpose()
        .map_err(|error| {
            eprintln!("cannot set up the shared state: {error}");
            EXIT_FAILED
        })
}

/// `mailgate authorize --account ID [--device]`.
pub async fn authorize(config: &Config, account: &str, device: bool) -> u8 {
    let oauth2 = match oauth2(config).await {
        Ok(oauth2) => oauth2,
        Err(code) => return code,
    };
    let Some((provider, settings)) = oauth2.account(account) else {
        eprintln!("no account {account} in tokens.oauth2.accounts");
        return EXIT_USAGE;
    };
    if settings.grant != Grant::RefreshToken {
        eprintln!(
            "account {account} uses the {} grant, which needs no authorization",
            settings.grant.name()
        );
        return EXIT_USAGE;
    }
    if !device && provider.redirect_url.is_none() {
        eprintln!(
            "provider {name} has no redirect_url, which the browser flow needs: add \
             `redirect_url: {EXAMPLE_REDIRECT_URL}` to tokens.oauth2.providers.{name} (and register \
             it with the provider), or run `mailgate authorize --account {account} --device`",
            name = provider.name
        );
        return EXIT_USAGE;
    }
    let answer = if device {
        flows::device(&provider, settings.scope.as_deref(), |code| {
            println!("To authorize {account} ({}):", settings.user);
            println!(
                "  open {} and enter the code {}",
                code.verification_uri, code.user_code
            );
            if let Some(complete) = &code.verification_uri_complete {
                println!("  (or open {complete})");
            }
            println!("Waiting for the sign-in to finish ...");
        })
        .await
    } else {
        code_flow(&provider, account, &settings).await
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("authorization failed: {error}");
            return EXIT_FAILED;
        }
    };
    let Some(refresh_token) = answer.refresh_token.clone() else {
        eprintln!("authorization failed: {}", FlowError::NoRefreshToken);
        return EXIT_FAILED;
    };
    match oauth2
        .authorized(account, refresh_token, Some(&answer))
        .await
    {
        Ok(()) => {
            println!("Authorized {account}; its refresh token is in the token store.");
            EXIT_OK
        }
        Err(error) => {
            eprintln!("cannot store the refresh token: {error}");
            EXIT_FAILED
        }
    }
}

async fn code_flow(
    provider: &crate::token::oauth2::provider::Provider,
    account: &str,
    settings: &crate::config::AccountConfig,
) -> Result<crate::token::oauth2::provider::TokenAnswer, FlowError> {
    let pending = flows::start(
        provider,
        settings.scope.as_deref(),
        Some(&settings.user),
        None,
    )?;
    println!(
        "To authorize {account} ({}), open this URL in a browser:",
        settings.user
    );
    println!();
    println!("  {}", pending.url);
    println!();
    println!(
        "mailgate waits for the provider to redirect back to {} ...",
        pending.redirect_uri
    );
    let code = flows::wait_for_code(&pending, AUTHORIZE_TIMEOUT).await?;
    pending.finish(provider, code.expose()).await
}

/// `mailgate accounts [--json]`.
pub async fn accounts(config: &Config, json: bool) -> u8 {
    let statuses = match &config.tokens.oauth2 {
        Some(_) => match oauth2(config).await {
            Ok(oauth2) => oauth2.statuses(),
            Err(code) => return code,
        },
        None => Vec::new(),
    };
    let now = crate::token::oauth2::provider::unix_now();
    if json {
        let rows: Vec<serde_json::Value> = statuses
            .iter()
            .map(|(id, provider, grant, status)| {
                serde_json::json!({
                    "account": id,
                    "source": format!("oauth2/{provider}"),
                    "grant": grant.name(),
                    "state": status.state.label(),
                    "refreshed_at": status.refreshed_at,
                    "access_expires_at": status.access_expires_at,
                    "refresh_expires_at": status.refresh_expires_at,
                    "last_error": status.last_error,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return EXIT_OK;
    }
    let rows: Vec<[String; 4]> = statuses
        .iter()
        .map(|(id, provider, grant, status)| {
            [
                id.clone(),
                format!("oauth2/{provider}"),
                grant.name().to_owned(),
                describe(status, *grant, now),
            ]
        })
        .collect();
    print_table(&["ACCOUNT", "SOURCE", "GRANT", "STATE"], &rows);
    if config.tokens.auth_server.is_some() {
        println!("Other accounts: from the authentication server (tokens.auth_server).");
    } else {
        println!("Other accounts: refused (no tokens.auth_server).");
    }
    EXIT_OK
}

fn describe(status: &AccountStatus, grant: Grant, now: u64) -> String {
    let mut text = match status.state {
        AccountState::Ok => "ok".to_owned(),
        AccountState::NotYetTried => "not yet tried".to_owned(),
        AccountState::NeverAuthorized => "never authorized (mailgate authorize)".to_owned(),
        AccountState::NeedsReauthorization => {
            "needs re-authorization (mailgate authorize)".to_owned()
        }
        AccountState::StoreError => "store error".to_owned(),
        AccountState::Misconfigured => {
            "misconfigured (fix the provider or account settings)".to_owned()
        }
        AccountState::Failing => "failing".to_owned(),
    };
    if status.state == AccountState::Ok && grant == Grant::RefreshToken {
        if let Some(at) = status.access_expires_at {
            text.push_str(&format!(", access token {}", relative(at, now)));
        }
        if let Some(at) = status.refreshed_at {
            text.push_str(&format!(", refreshed {}", relative(at, now)));
        }
        if let Some(at) = status.refresh_expires_at {
            text.push_str(&format!(", refresh token {}", relative(at, now)));
        }
    }
    if status.unsaved {
        text.push_str(&format!("; {UNSAVED}"));
    }
    if let Some(error) = &status.last_error {
        text.push_str(&format!(" ({error})"));
    }
    text
}

/// `expires in 42m` / `expired 3m ago` / `5m ago` for a Unix time.
fn relative(at: u64, now: u64) -> String {
    match at.cmp(&now) {
        std::cmp::Ordering::Greater => format!("expires in {}", span_in_minutes(at - now)),
        _ => format!("{} ago", span_in_minutes(now - at)),
    }
}

/// Columns padded to their widest cell; the last one as it is.
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(*header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
}

/// `mailgate accounts import --account ID --refresh-token-file FILE [--no-check]` (`-`:
/// standard input). With `check`, the token is redeemed once, so a wrong or used token shows
/// now rather than at the first login.
pub async fn import(config: &Config, account: &str, file: &Path, check: bool) -> u8 {
    let oauth2 = match oauth2(config).await {
        Ok(oauth2) => oauth2,
        Err(code) => return code,
    };
    let mut text = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(file).map(|read| text = read)
    };
    if let Err(error) = read {
        eprintln!("cannot read {}: {error}", file.display());
        return EXIT_USAGE;
    }
    let token = Secret::new(text.trim().to_owned());
    if !is_usable_token(token.expose()) {
        eprintln!(
            "{}: not a refresh token (printable ASCII without spaces)",
            file.display()
        );
        return EXIT_USAGE;
    }
    if let Err(error) = oauth2.authorized(account, token, None).await {
        eprintln!("{error}");
        return EXIT_USAGE;
    }
    if !check {
        println!(
            "Stored the refresh token for {account}, not yet tried; it is used at the next login."
        );
        return EXIT_OK;
    }
    let fetched = oauth2.fetch(&oauth2.key(account, Protocol::Imap)).await;
    if !settled(Some(&oauth2)).await {
        return EXIT_FAILED;
    }
    match fetched {
        Ok(_) => {
            println!("Stored the refresh token for {account}; the provider accepted it.");
            EXIT_OK
        }
        Err(TokenError::NeedsReauthorization) => {
            eprintln!(
                "the provider refused the refresh token for {account} (invalid_grant); the account needs authorization"
            );
            EXIT_FAILED
        }
        Err(error) => {
            eprintln!("stored the refresh token for {account}, but redeeming it failed: {error}");
            EXIT_FAILED
        }
    }
}

/// The longest password `hash-password` reads from standard input: longer than any a client
/// can send in one SMTP AUTH line (12288 bytes, base64 included).
const MAX_PASSWORD_BYTES: u64 = 12 * 1024;

/// `mailgate hash-password`: reads a password (at a terminal twice without echo, else one line
/// of standard input) and prints the argon2id PHC string for `client_auth.accounts`.
pub fn hash_password() -> u8 {
    let password = if std::io::stdin().is_terminal() {
        password_from_terminal()
    } else {
        password_from_stdin()
    };
    let password = match password {
        Ok(password) => password,
        Err(reason) => {
            eprintln!("{reason}");
            return EXIT_USAGE;
        }
    };
    match new_hash(&password) {
        Ok(hash) => {
            println!("{}", hash.expose());
            EXIT_OK
        }
        Err(error) => {
            eprintln!("cannot hash the password: {error}");
            EXIT_FAILED
        }
    }
}

/// Asks twice, as `htpasswd` does, since a typo cannot be seen.
fn password_from_terminal() -> Result<Secret<String>, String> {
    let ask = |prompt: &str| {
        read_hidden(prompt).map_err(|error| format!("cannot read the password: {error}"))
    };
    let password = ask("Password: ")?;
    if ask("Again: ")? != password {
        return Err("the passwords differ".to_owned());
    }
    one_password(password)
}

/// Reads one line from the terminal without echo, in getpass(3)'s order: echo and signal
/// keys off, and what was typed ahead discarded, before the prompt appears; the settings
/// restored after. (Ctrl-C then reads as a control character, refused as a password.)
fn read_hidden(prompt: &str) -> std::io::Result<Secret<String>> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    use std::io::{BufRead as _, Write as _};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let shown = tcgetattr(&tty)?;
    let mut hidden = shown.clone();
    hidden
        .local_modes
        .remove(LocalModes::ECHO | LocalModes::ISIG);
    hidden.local_modes.insert(LocalModes::ECHONL);
    tcsetattr(&tty, OptionalActions::Flush, &hidden)?;
    let mut line = String::new();
    let read = (&tty)
        .write_all(prompt.as_bytes())
        .and_then(|()| std::io::BufReader::new(&tty).read_line(&mut line));
    let restored = tcsetattr(&tty, OptionalActions::Flush, &shown);
    read?;
    restored?;
    Ok(Secret::new(
        line.strip_suffix('\n').unwrap_or(&line).to_owned(),
    ))
}

/// One line; its line end (`\n` or `\r\n`) is not part of the password.
fn password_from_stdin() -> Result<Secret<String>, String> {
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_PASSWORD_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|error| format!("cannot read the password from standard input: {error}"))?;
    if text.len() as u64 > MAX_PASSWORD_BYTES {
        return Err(format!(
            "the password is longer than {MAX_PASSWORD_BYTES} bytes"
        ));
    }
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    one_password(Secret::new(line.to_owned()))
}

/// Refuses what no client could log in with: nothing, or control characters (the front ends
/// refuse them in commands; IMAP and SMTP commands end at a line end, SASL PLAIN fields at
/// a NUL).
fn one_password(password: Secret<String>) -> Result<Secret<String>, String> {
    let text = password.expose();
    if text.is_empty() {
        return Err("the password is empty".to_owned());
    }
    if text.chars().any(char::is_control) {
        return Err("the password must be one line without control characters".to_owned());
    }
    Ok(password)
}

/// `mailgate test-login ACCOUNT --listener NAME`: a token and one upstream login, each step
/// printed (never the token itself), with mailgate's debug events for the upstream dialogue.
pub async fn test_login(config: &Config, account: &str, listener: &str) -> u8 {
    let Some(listener) = config.listeners.iter().find(|l| l.name == listener) else {
        let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        eprintln!(
            "no listener {listener}; the configuration has: {}",
            names.join(", ")
        );
        return EXIT_USAGE;
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(Duration::from_secs(30)));
    let redis = match shared_state(config, &metrics) {
        Ok(redis) => redis,
        Err(code) => return code,
    };
    let sources =
        match Sources::new(&config.tokens, &Arc::default(), &metrics, &health, redis).await {
            Ok(sources) => sources,
            Err(error) => {
                eprintln!("cannot set up the token sources: {error}");
                return EXIT_FAILED;
            }
        };
    let source = match sources.oauth2.as_ref().and_then(|o| o.account(account)) {
        Some((provider, settings)) => {
            format!(
                "OAuth2 provider {} ({} grant)",
                provider.name,
                settings.grant.name()
            )
        }
        None if sources.auth_server.is_some() => "the authentication server".to_owned(),
        None => {
            "none: the account is neither an OAuth2 account nor served by an authentication server"
                .to_owned()
        }
    };
    println!("1. Token for {account} from {source}");
    let key = sources.key(account, listener.protocol);
    let fetched = sources.fetch(&key).await;
    if !settled(sources.oauth2.as_deref()).await {
        return EXIT_FAILED;
    }
    let token = match fetched {
        Ok(token) => token,
        Err(error) => {
            println!("   failed: {error}");
            if error == TokenError::NeedsReauthorization {
                println!("   run: mailgate authorize --account {account}");
            }
            return EXIT_FAILED;
        }
    };
    let user = match &token.auth {
        UpstreamAuth::Bearer {
            user,
            token: secret,
        } => {
            println!(
                "   ok: user {user}, bearer token of {} characters (not shown)",
                secret.expose().len()
            );
            user
        }
        UpstreamAuth::Password { user, .. } => {
            println!("   ok: user {user}, a password (not shown)");
            user
        }
    };
    match token.lifetime {
        Some(lifetime) => println!("   expires in {}", humantime::format_duration(lifetime)),
        None => println!("   no expiry given"),
    }
    let tls = match listener.upstream.tls {
        crate::config::TlsMode::Implicit => "implicit TLS",
        crate::config::TlsMode::Starttls => "STARTTLS",
        crate::config::TlsMode::None => "no TLS",
    };
    println!(
        "2. Upstream login as {user} to {}:{} ({tls}, {} listener)",
        listener.upstream.host,
        listener.upstream.port,
        listener.protocol.name()
    );
    upstream_login(listener, &token.auth, &config.hostname).await
}

/// Whether the store holds every refresh token this process got: what only its memory holds
/// is lost when it exits.
async fn settled(oauth2: Option<&OAuth2>) -> bool {
    let Some(oauth2) = oauth2 else {
        return true;
    };
    if oauth2
        .settle(tokio::time::Instant::now() + SETTLE_TIMEOUT)
        .await
    {
        return true;
    }
    eprintln!(
        "the token store did not take the refresh token the provider rotated to; it is lost with this process, and the account needs re-authorization"
    );
    false
}

async fn upstream_login(listener: &ListenerConfig, auth: &UpstreamAuth, hostname: &str) -> u8 {
    let connector = match Connector::new(&listener.upstream) {
        Ok(connector) => connector,
        Err(error) => {
            println!("   failed: {error}");
            return EXIT_FAILED;
        }
    };
    // No client: a proxy_v2 upstream gets a LOCAL header, id and xclient send nothing.
    let on_behalf = OnBehalf {
        helo: hostname,
        origin: None,
    };
    let protocol = protocols::named(listener.protocol);
    let result = protocol.log_in_upstream(&connector, auth, on_behalf).await;
    match result {
        Ok(upstream) => {
            println!("   ok: the upstream answered: {}", upstream.completion);
            EXIT_OK
        }
        Err(error) => {
            println!("   failed: {error}");
            EXIT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_like_a_person_would_say_them() {
        assert_eq!(relative(1_000 + 42 * 60, 1_000), "expires in 42m");
        assert_eq!(relative(1_000, 1_000 + 3 * 3600), "3h ago");
        assert_eq!(relative(1_000, 1_010), "<1m ago");
    }
}

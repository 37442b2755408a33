//! Checks of the `admin` section: where the onboarding page and the token service may listen,
//! and their secrets, read once from files or the environment.

use super::tokens::{check_endpoint, secret_from};
use super::{
    AdminConfig, BackendsAdminConfig, CertificateFiles, OAuth2Config, Problems, TokenServiceConfig,
};
use crate::secret::Secret;

impl AdminConfig {
    pub(super) fn resolve(&mut self, oauth2: Option<&OAuth2Config>, problems: &mut Problems) {
        let loopback = self.listen.ip().is_loopback();
        if let Some(tls) = &self.tls {
            check_certificate(tls, "admin.tls", problems);
        }
        if let Some(onboarding) = &mut self.onboarding {
            onboarding.password = admin_password(
                onboarding.password_file.as_ref(),
                onboarding.password_env.as_deref(),
                "admin.onboarding",
                problems,
            );
            if let Some(url) = &onboarding.redirect_url
                && let Err(reason) = check_endpoint(url)
            {
                problems.add("admin.onboarding.redirect_url", reason);
            }
            if let Some(url) = &onboarding.redirect_url
                && !url.ends_with("/oauth/callback")
            {
                problems.add(
                    "admin.onboarding.redirect_url",
                    "must be this endpoint's /oauth/callback, e.g. https://HOST:PORT/oauth/callback",
                );
            }
        }
        if let Some(service) = &mut self.token_service {
            service.resolve(oauth2, problems);
        }
        if let Some(backends) = &mut self.backends {
            backends.resolve(problems);
        }
        let serves_secrets =
            self.onboarding.is_some() || self.token_service.is_some() || self.backends.is_some();
        if serves_secrets && !loopback && self.tls.is_none() {
            problems.add(
                "admin.tls",
                "the onboarding page, the token service and the backend operations handle passwords and tokens: off loopback they need admin.tls",
            );
        }
    }
}

impl BackendsAdminConfig {
    fn resolve(&mut self, problems: &mut Problems) {
        let key = "admin.backends";
        if self.user.is_empty() || self.user.contains(':') {
            problems.add(
                format!("{key}.user"),
                "a basic-auth user name: not empty, no ':'",
            );
        }
        self.password = admin_password(
            self.password_file.as_ref(),
            self.password_env.as_deref(),
            key,
            problems,
        );
    }
}

/// Shorter passwords fall to guessing within the throttle's budget; an empty one is none.
pub const MIN_ADMIN_PASSWORD_BYTES: usize = 12;

impl TokenServiceConfig {
    fn resolve(&mut self, oauth2: Option<&OAuth2Config>, problems: &mut Problems) {
        let key = "admin.token_service";
        let legacy = self.password_file.is_some() || self.password_env.is_some();
        if legacy || self.clients.is_empty() {
            self.password = admin_password(
                self.password_file.as_ref(),
                self.password_env.as_deref(),
                key,
                problems,
            );
        }
        if legacy && self.clients.contains_key(&self.user) {
            problems.add(
                format!("{key}.clients.{}", self.user),
                format!("{key}.user is already this name"),
            );
        }
        for (name, client) in &mut self.clients {
            let key = format!("{key}.clients.{name}");
            if name.is_empty() || name.contains(':') {
                problems.add(&key, "a basic-auth user name: not empty, no ':'");
            }
            client.password = admin_password(
                client.password_file.as_ref(),
                client.password_env.as_deref(),
                &key,
                problems,
            );
            check_accounts(
                &client.accounts,
                oauth2,
                &format!("{key}.accounts"),
                problems,
            );
        }
    }
}

/// The accounts a token-service client may fetch: `*` or accounts that exist.
fn check_accounts(
    accounts: &[String],
    oauth2: Option<&OAuth2Config>,
    key: &str,
    problems: &mut Problems,
) {
    if accounts.is_empty() {
        problems.add(
            key,
            "lists no account: name the client's accounts, or \"*\" for all",
        );
    }
    for (index, account) in accounts.iter().enumerate() {
        let known = oauth2.is_some_and(|oauth2| oauth2.accounts.contains_key(account));
        if account != "*" && !known {
            problems.add(
                format!("{key}[{index}]"),
                "not an account of tokens.oauth2.accounts",
            );
        }
    }
}

/// The basic-auth password of `key` (`KEY.password_file` or `KEY.password_env`), refused
/// when missing or shorter than [`MIN_ADMIN_PASSWORD_BYTES`].
fn admin_password(
    file: Option<&std::path::PathBuf>,
    env: Option<&str>,
    key: &str,
    problems: &mut Problems,
) -> Option<Secret<String>> {
    if file.is_none() && env.is_none() {
        problems.add(key, "needs password_file or password_env (basic auth)");
        return None;
    }
    let password = secret_from(file, env, &format!("{key}.password"), problems)?;
    if password.expose().len() < MIN_ADMIN_PASSWORD_BYTES {
        let source = if env.is_some() {
            "password_env"
        } else {
            "password_file"
        };
        let length = password.expose().len();
        problems.add(
            format!("{key}.{source}"),
            format!(
                "the password has {length} bytes; at least {MIN_ADMIN_PASSWORD_BYTES} are needed"
            ),
        );
    }
    Some(password)
}

/// A readable certificate chain and private key (checked when files are read).
pub(crate) fn check_certificate(files: &CertificateFiles, key: &str, problems: &mut Problems) {
    if problems.reads_files()
        && let Err(error) = crate::tls::server_config(&files.cert_file, &files.key_file, None)
    {
        problems.add(key, error.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Files};

    #[test]
    fn token_service_clients_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "twelve-bytes").unwrap();
        let password = password.display();
        let text = format!(
            r#"
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:1143", upstream: {{ host: mail.example, port: 143, tls: none }} }}
tokens:
  auth_server: {{ url: "http://127.0.0.1:8080/token" }}
admin:
  listen: "127.0.0.1:9090"
  token_service:
    password_file: "{password}"
    clients:
      "a:b": {{ password_file: "{password}", accounts: [] }}
      mailgate: {{ password_file: "{password}", accounts: ["*"] }}
      printer: {{ password_file: "{password}", accounts: ["*", nobody] }}
"#
        );
        let mut config = Config::parse(&text).unwrap();
        let keys: Vec<String> = config
            .resolve_and_validate(Files::Read)
            .into_iter()
            .map(|problem| problem.key)
            .collect();
        assert_eq!(
            keys,
            [
                "admin.token_service.clients.mailgate",
                "admin.token_service.clients.a:b",
                "admin.token_service.clients.a:b.accounts",
                "admin.token_service.clients.printer.accounts[1]",
            ]
        );
    }
}

//! Checks of the `admin` section: where the onboarding page and the token service may listen,
//! and their secrets, read once from files or the environment.

use super::tokens::{check_endpoint, secret_from};
use super::{AdminConfig, CertificateFiles, Problems};

impl AdminConfig {
    pub(super) fn resolve(&mut self, problems: &mut Problems) {
        let loopback = self.listen.ip().is_loopback();
        if let Some(tls) = &self.tls {
            check_certificate(tls, "admin.tls", problems);
        }
        if let Some(onboarding) = &mut self.onboarding {
            onboarding.password = secret_from(
                onboarding.password_file.as_ref(),
                onboarding.password_env.as_deref(),
                "admin.onboarding.password",
                problems,
            );
            require_password(
                &onboarding.password_file,
                &onboarding.password_env,
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
            service.password = secret_from(
                service.password_file.as_ref(),
                service.password_env.as_deref(),
                "admin.token_service.password",
                problems,
            );
            require_password(
                &service.password_file,
                &service.password_env,
                "admin.token_service",
                problems,
            );
        }
        let serves_secrets = self.onboarding.is_some() || self.token_service.is_some();
        if serves_secrets && !loopback && self.tls.is_none() {
            problems.add(
                "admin.tls",
                "the onboarding page and the token service handle passwords and tokens: off loopback they need admin.tls",
            );
        }
    }
}

fn require_password(
    file: &Option<std::path::PathBuf>,
    env: &Option<String>,
    key: &str,
    problems: &mut Problems,
) {
    if file.is_none() && env.is_none() {
        problems.add(key, "needs password_file or password_env (basic auth)");
    }
}

/// A readable certificate chain and private key (checked when files are read).
pub(crate) fn check_certificate(files: &CertificateFiles, key: &str, problems: &mut Problems) {
    if problems.reads_files()
        && let Err(error) = crate::tls::server_config(&files.cert_file, &files.key_file, None)
    {
        problems.add(key, error.to_string());
    }
}

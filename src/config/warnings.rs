//! What a valid configuration may still get wrong (passwords in clear, certificates about to
//! expire): `check` prints these and `serve` logs them at every start and reload, but neither
//! refuses the file for them.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{ClientAuthMode, Config, Files, Problem, TlsMode};

/// A certificate expiring sooner than this is worth a warning: enough time to renew one by
/// hand, and ACME clients renew at 30 days left, so a warning means renewal is not working.
const CERTIFICATE_WARNING_DAYS: i64 = 30;

impl Config {
    /// Everything worth a warning, each with its key path; with [`Files::Read`], the
    /// certificate files are read too.
    pub fn warnings(&self, files: Files, now: SystemTime) -> Vec<Problem> {
        let mut found = self.plaintext_passwords();
        if files == Files::Read {
            found.extend(
                self.certificates()
                    .into_iter()
                    .filter_map(|(key, path)| expiry_warning(key, &path, now)),
            );
        }
        found
    }

    /// Listeners off loopback where clients may send the passwords mailgate checks in clear:
    /// no TLS, or STARTTLS without `require`.
    fn plaintext_passwords(&self) -> Vec<Problem> {
        let mode = self.client_auth.mode;
        if mode == ClientAuthMode::Any {
            return Vec::new();
        }
        self.listeners
            .iter()
            .enumerate()
            .filter(|(_, listener)| !listener.listen.ip().is_loopback())
            .filter(|(_, listener)| match &listener.tls {
                None => true,
                Some(tls) => {
                    tls.mode == TlsMode::None || (tls.mode == TlsMode::Starttls && !tls.require)
                }
            })
            .map(|(i, listener)| Problem {
                key: format!("listeners[{i}].tls"),
                reason: format!(
                    "client passwords (client_auth.mode {}) may cross the network in clear on {}: use tls mode starttls with require: true, or implicit",
                    mode.name(),
                    listener.listen
                ),
            })
            .collect()
    }

    /// Every certificate mailgate presents (listeners, admin endpoint) or signs with (client
    /// assertions), with its key path.
    fn certificates(&self) -> Vec<(String, PathBuf)> {
        let mut found = Vec::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            if let Some(tls) = listener
                .tls
                .as_ref()
                .filter(|tls| tls.mode != TlsMode::None)
                && let Some(cert_file) = &tls.cert_file
            {
                found.push((format!("listeners[{i}].tls.cert_file"), cert_file.clone()));
            }
        }
        if let Some(tls) = self.admin.as_ref().and_then(|admin| admin.tls.as_ref()) {
            found.push(("admin.tls.cert_file".to_owned(), tls.cert_file.clone()));
        }
        for (name, provider) in self.tokens.oauth2.iter().flat_map(|o| &o.providers) {
            if let Some(certificate) = &provider.client_certificate {
                found.push((
                    format!("tokens.oauth2.providers.{name}.client_certificate.cert_file"),
                    certificate.cert_file.clone(),
                ));
            }
        }
        found
    }
}

/// A warning when the certificate in `path` expires within [`CERTIFICATE_WARNING_DAYS`] (or
/// has expired). An unreadable file is the validation's business, not a warning.
fn expiry_warning(key: String, path: &Path, now: SystemTime) -> Option<Problem> {
    let at = crate::x509::earliest_expiry(path).ok()?;
    let days = crate::x509::days_left(at, now);
    let date = format!("{}-{:02}-{:02}", at.year(), u8::from(at.month()), at.day());
    let left = match days {
        ..0 => {
            return Some(Problem {
                key,
                reason: format!("the certificate in {} expired on {date}", path.display()),
            });
        }
        0 => "within a day".to_owned(),
        1 => "in 1 day".to_owned(),
        2..CERTIFICATE_WARNING_DAYS => format!("in {days} days"),
        _ => return None,
    };
    let reason = format!(
        "the certificate in {} expires {left}, on {date}: renew it",
        path.display()
    );
    Some(Problem { key, reason })
}

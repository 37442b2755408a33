//! Every secret this test process handed to mailgate or minted for it, remembered process-wide,
//! so that the output of each mailgate run can be checked for all of them: [`Mailgate`] scans
//! its stdout and stderr when dropped (see [`scan`]).
//!
//! Remembered without a test asking: tokens the auth server and the OAuth2 provider mint, the
//! client secrets, user passwords and basic-auth passwords they are given, credentials the
//! provider receives (client assertions, PKCE verifiers), passwords [`ImapClient::login`] and
//! [`curl`]'s `-u` log in with, the secrets a mailgate config names (URL passwords, secret files,
//! `*_env` values, account hashes), and every `const` in `tests/` whose name ends in `PASSWORD`
//! or `SECRET` (the convention for a password a test types itself). Anything else: [`remember`].
//!
//! [`Mailgate`]: super::Mailgate
//! [`ImapClient::login`]: super::imap_client::ImapClient::login
//! [`curl`]: super::curl

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

use base64::Engine as _;

/// Shorter strings (`pw`, `x`) turn up in logs by chance, so they are not remembered.
pub const MIN_LEN: usize = 8;

/// secret -> what it is (the first kind it was remembered as).
fn registry() -> &'static Mutex<BTreeMap<String, String>> {
    static SECRETS: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();
    SECRETS.get_or_init(|| {
        let mut secrets = BTreeMap::new();
        for (name, value) in source_constants() {
            if distinctive(&value) {
                secrets.insert(value, format!("test constant {name}"));
            }
        }
        Mutex::new(secrets)
    })
}

/// Remembers `secret` as a `kind` ("client password", "auth-server token", ...); the kind,
/// never the secret, names it when it leaks.
pub fn remember(kind: &str, secret: &str) {
    if !distinctive(secret) {
        return;
    }
    let mut secrets = registry().lock().unwrap_or_else(|e| e.into_inner());
    secrets
        .entry(secret.to_owned())
        .or_insert_with(|| kind.to_owned());
}

/// Long enough, and not a lone lowercase word such as `password`, which logs say innocently.
fn distinctive(secret: &str) -> bool {
    secret.len() >= MIN_LEN && !secret.bytes().all(|b| b.is_ascii_lowercase())
}

/// `const NAME: &str = "VALUE";` in the test sources, for names ending in PASSWORD or SECRET.
fn source_constants() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.flatten().map(|entry| entry.path()) {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                found.extend(text.lines().filter_map(secret_constant));
            }
        }
    }
    found
}

fn secret_constant(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().trim_start_matches("pub ");
    let (name, value) = rest.strip_prefix("const ")?.split_once(": &str = \"")?;
    let value = value.strip_suffix("\";")?;
    let secret_name = name.ends_with("PASSWORD") || name.ends_with("SECRET");
    (secret_name && !value.contains('\\')).then(|| (name.to_owned(), value.to_owned()))
}

/// Remembers the secrets a mailgate configuration names: passwords in URLs, the contents of
/// secret files and `*_env` variables (`env` first, then this process's), account hashes.
///
/// Panics on YAML it cannot parse: its secrets would go unscanned, and an error message that
/// quotes the broken file is just where one would leak.
pub fn remember_config(config_yaml: &str, env: &[(&str, &str)]) {
    let value = serde_saphyr::from_str::<serde_json::Value>(config_yaml).unwrap_or_else(|error| {
        panic!("the secret scan cannot read this mailgate configuration ({error}); remember its secrets another way")
    });
    walk_config(&value, None, env);
}

fn walk_config(value: &serde_json::Value, key: Option<&str>, env: &[(&str, &str)]) {
    match value {
        serde_json::Value::Object(map) => {
            for (name, v) in map {
                if name == "accounts" {
                    remember_hashes(v);
                }
                walk_config(v, Some(name), env);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| walk_config(v, key, env)),
        serde_json::Value::String(text) => remember_config_string(key.unwrap_or(""), text, env),
        _ => {}
    }
}

fn remember_config_string(key: &str, text: &str, env: &[(&str, &str)]) {
    if let Ok(url) = url::Url::parse(text)
        && let Some(password) = url.password()
    {
        remember("password in a configured URL", &percent_decode(password));
    }
    match key {
        "password_file" | "client_secret_file" => {
            if let Ok(content) = std::fs::read_to_string(text) {
                remember(
                    &format!("{key} content"),
                    content.trim_end_matches(['\n', '\r']),
                );
            }
        }
        "key_file" | "service_account_file" => {
            if let Ok(content) = std::fs::read_to_string(text) {
                remember_key_material(key, &content);
            }
        }
        "accounts_file" => {
            if let Ok(content) = std::fs::read_to_string(text)
                && let Ok(map) = serde_saphyr::from_str::<serde_json::Value>(&content)
            {
                remember_hashes(&map);
            }
        }
        _ if key.ends_with("_env") => {
            let value = env
                .iter()
                .find(|(name, _)| *name == text)
                .map(|(_, value)| (*value).to_owned())
                .or_else(|| std::env::var(text).ok());
            if let Some(value) = value {
                remember(&format!("{key} variable"), &value);
            }
        }
        _ => {}
    }
}

/// A private key's base64 lines (PEM, or PEM inside a service account's JSON), else the
/// whole content (the store key).
fn remember_key_material(key: &str, content: &str) {
    let kind = format!("{key} content");
    if content.contains("-----BEGIN") {
        for line in content.split(['\n', '"']).flat_map(|l| l.split("\\n")) {
            let line = line.trim();
            if line.len() >= 16 && !line.starts_with("-----") && is_base64_text(line) {
                remember(&kind, line);
            }
        }
    } else {
        remember(&kind, content.trim());
    }
}

/// `%XX` escapes undone (URL user info, where `+` stays itself).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn remember_hashes(accounts: &serde_json::Value) {
    if let serde_json::Value::Object(map) = accounts {
        for hash in map.values().filter_map(|v| v.as_str()) {
            if hash.starts_with("$argon2") {
                remember("client account hash", hash);
            }
        }
    }
}

fn is_base64_text(text: &str) -> bool {
    text.bytes().all(is_base64_byte)
}

fn is_base64_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'=')
}

/// A remembered secret found in some text: what it is and how it was written, never itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    pub kind: String,
    /// `as is`, `percent-encoded`, `hex`, `as a byte list`, `escaped`, or `inside base64`.
    pub form: &'static str,
    /// 1-based line of `text` where it starts.
    pub line: usize,
}

/// The first remembered secret in `text`, in any of the forms it could take in a log: as is,
/// percent-encoded (form bodies, URLs), hex, a byte list (`Debug` of bytes), `Debug`-escaped,
/// or inside base64 (SASL PLAIN, XOAUTH2 and OAUTHBEARER, basic auth).
///
/// One pass over `text` for all of them (trace logs run to megabytes, and test code is not
/// optimised): every form is a byte string of at least [`MIN_LEN`] bytes, looked up by its
/// first bytes at each position.
pub fn scan(text: &str) -> Option<Leak> {
    let secrets = registry().lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut needles: Vec<(Vec<u8>, &str, &'static str)> = Vec::new();
    for (secret, kind) in &secrets {
        for (form, written) in written_forms(secret) {
            needles.push((written, kind, form));
        }
    }
    let key = |bytes: &[u8]| u64::from_le_bytes(bytes[..MIN_LEN].try_into().unwrap());
    // A cheap filter on the first two bytes before the map lookup.
    let mut first_two = vec![false; 1 << 16];
    let mut by_start: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, (bytes, _, _)) in needles.iter().enumerate() {
        first_two[usize::from(bytes[0]) << 8 | usize::from(bytes[1])] = true;
        by_start.entry(key(bytes)).or_default().push(i);
    }
    let hay = text.as_bytes();
    for at in 0..hay.len().saturating_sub(MIN_LEN - 1) {
        if !first_two[usize::from(hay[at]) << 8 | usize::from(hay[at + 1])] {
            continue;
        }
        let Some(candidates) = by_start.get(&key(&hay[at..])) else {
            continue;
        };
        if let Some(&i) = candidates
            .iter()
            .find(|&&i| hay[at..].starts_with(&needles[i].0))
        {
            let (_, kind, form) = &needles[i];
            return Some(Leak {
                kind: (*kind).to_owned(),
                form,
                line: hay[..at].iter().filter(|&&b| b == b'\n').count() + 1,
            });
        }
    }
    None
}

/// The ways a secret may be written out, with a name for each; none shorter than the secret.
fn written_forms(secret: &str) -> Vec<(&'static str, Vec<u8>)> {
    let bytes = secret.as_bytes();
    let mut forms = vec![("as is", bytes.to_vec())];
    let encoded: String = url::form_urlencoded::byte_serialize(bytes).collect();
    let in_path = encoded.replace('+', "%20");
    let escaped = format!("{secret:?}");
    let escaped = escaped[1..escaped.len() - 1].to_owned();
    for (form, text) in [
        ("percent-encoded", encoded),
        ("percent-encoded", in_path),
        ("escaped", escaped),
    ] {
        if text != secret {
            forms.push((form, text.into_bytes()));
        }
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    forms.push(("hex", hex.into_bytes()));
    let list = format!("{bytes:?}");
    forms.push((
        "as a byte list",
        list.as_bytes()[1..list.len() - 1].to_vec(),
    ));
    for core in base64_cores(bytes) {
        forms.push(("inside base64", core));
    }
    forms
}

/// What every base64 encoding of a text holding `secret` contains, whatever comes before or
/// after it: for each of the three alignments and both alphabets, the characters whose six
/// bits all come from the secret.
fn base64_cores(secret: &[u8]) -> Vec<Vec<u8>> {
    let engines = [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let bits = secret.len() * 8;
    let mut cores = Vec::new();
    for before in 0..3usize {
        let first = (before * 8).div_ceil(6);
        let end = (before * 8 + bits) / 6;
        let padded = [&vec![0u8; before][..], secret].concat();
        for engine in &engines {
            let encoded = engine.encode(&padded);
            cores.push(encoded.as_bytes()[first..end].to_vec());
        }
    }
    cores
}

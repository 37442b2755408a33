//! The command line: `check` accepts good configs and reports every problem of a bad one as
//! `PATH: key.path: reason` with exit code 64; `serve` refuses a bad config the same way.

mod support;

use std::process::Command;
use std::time::Duration;

use support::Mailgate;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const GOOD: &str = r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:1143"
    upstream: { host: mail.example, port: 993, tls: implicit }
tokens:
  auth_server: { url: "http://svc:s3cret-pw@127.0.0.1:8080/token?key=qu3ry-key" }
"#;

fn mailgate(args: &[&str]) -> std::process::Output {
    Command::new(Mailgate::binary())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_a_good_config_and_prints_it_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "good.yaml", GOOD);
    let out = mailgate(&["check", "--config", &path, "--print"]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("mail.example"), "{printed}");
    assert!(
        printed.contains("idle_timeout"),
        "defaults are shown: {printed}"
    );
    assert!(!printed.contains("s3cret-pw"), "{printed}");
    assert!(!printed.contains("qu3ry-key"), "{printed}");
    assert!(
        printed.contains("http://svc:[redacted]@127.0.0.1:8080/token?key=[redacted]"),
        "{printed}"
    );
    assert!(printed.contains("level: info"), "{printed}");
}

#[test]
fn check_says_so_when_a_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "good.yaml", GOOD);
    let out = mailgate(&["check", "--config", &path]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{path}: configuration is valid (1 listener)\n")
    );
}

#[test]
fn check_reports_every_problem_with_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = GOOD
        .replace("port: 993", "port: 0")
        .replace("127.0.0.1:1143", "0.0.0.0:1143");
    let path = write(&dir, "bad.yaml", &bad);
    let out = mailgate(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(64));
    let errors = String::from_utf8(out.stderr).unwrap();
    assert!(
        errors.contains(&format!(
            "{path}: listeners[0].upstream.port: must not be 0"
        )),
        "{errors}"
    );
    assert!(
        errors.contains(&format!("{path}: listeners[0].listen: ")),
        "{errors}"
    );
    assert!(!errors.contains("s3cret-pw"));
}

#[test]
fn unknown_keys_and_bad_values_name_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "typo.yaml",
        &GOOD.replace("tls: implicit", "tls: implicit, mechanizm: auto"),
    );
    let out = mailgate(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(64));
    let errors = String::from_utf8(out.stderr).unwrap();
    assert!(
        errors.starts_with(&format!("{path}: listeners[0].upstream.mechanizm: ")),
        "{errors}"
    );

    let path = write(
        &dir,
        "duration.yaml",
        &GOOD.replace("tls: implicit", "tls: implicit, connect_timeout: soon"),
    );
    let errors = String::from_utf8(mailgate(&["check", "--config", &path]).stderr).unwrap();
    assert!(
        errors.contains("listeners[0].upstream.connect_timeout"),
        "{errors}"
    );
}

#[test]
fn serve_refuses_a_bad_config_with_64_and_the_config_may_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "bad.yaml",
        "listeners: []\ntokens: { auth_server: { url: \"http://127.0.0.1:1/t\" } }\n",
    );
    let out = mailgate(&["serve", "--config", &path]);
    assert_eq!(out.status.code(), Some(64));
    let errors = String::from_utf8(out.stderr).unwrap();
    assert!(errors.contains(&format!("{path}: listeners: ")), "{errors}");

    let good = write(&dir, "good.yaml", GOOD);
    let out = Command::new(Mailgate::binary())
        .arg("check")
        .env("MAILGATE_CONFIG", &good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn secrets_can_come_from_files_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let password = write(&dir, "pw", "from-file\n");
    let text = GOOD.replace(
        r#"url: "http://svc:s3cret-pw@127.0.0.1:8080/token?key=qu3ry-key" }"#,
        &format!(r#"url: "http://svc@127.0.0.1:8080/token", password_file: "{password}" }}"#),
    );
    let path = write(&dir, "file.yaml", &text);
    assert!(mailgate(&["check", "--config", &path]).status.success());

    let text = GOOD.replace(
        r#"url: "http://svc:s3cret-pw@127.0.0.1:8080/token?key=qu3ry-key" }"#,
        r#"url: "http://svc@127.0.0.1:8080/token", password_env: MAILGATE_TEST_UNSET_VAR }"#,
    );
    let path = write(&dir, "env.yaml", &text);
    let out = mailgate(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("tokens.auth_server.password_env")
    );
}

#[test]
fn help_documents_both_commands() {
    let out = mailgate(&["--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("serve") && help.contains("check"), "{help}");
}

#[test]
fn a_start_failure_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = write(
        &dir,
        "taken.yaml",
        &GOOD.replace("127.0.0.1:1143", &format!("127.0.0.1:{port}")),
    );
    let out = mailgate(&["serve", "--config", &path]);
    assert_eq!(out.status.code(), Some(1));
    let errors = String::from_utf8(out.stderr).unwrap();
    assert_eq!(errors.matches("cannot listen").count(), 1, "{errors}");
}

/// The example configurations shipped in deploy/ (files, and the one inside the sidecar
/// manifest) pass `check --no-files`, which leaves out their production secret files, without
/// a warning.
#[test]
fn shipped_examples_pass_check_without_their_secret_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(root.join("deploy/kubernetes-sidecar.yaml")).unwrap();
    let embedded = manifest
        .split("\n---")
        .find(|document| document.contains("kind: ConfigMap"))
        .and_then(|document| document.split("config.yaml: |\n").nth(1))
        .expect("the sidecar manifest's ConfigMap");
    let embedded: String = embedded
        .lines()
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    let mut examples = vec![write(&dir, "sidecar.yaml", &embedded)];
    for example in [
        "deploy/config.example.yaml",
        "deploy/config.dovecot.yaml",
        "deploy/config.pool.yaml",
        "deploy/systemd/mailgate.yaml",
    ] {
        examples.push(root.join(example).display().to_string());
    }
    // Issue 13 item 20: nor do they draw a warning (the systemd example took passwords in
    // clear on 0.0.0.0).
    for example in examples {
        let out = mailgate(&["check", "--no-files", "--config", &example]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{example}: {stderr}");
        assert!(stderr.is_empty(), "{example}: {stderr}");
    }
}

/// Every complete configuration in README.md and docs/ (a YAML block with both `listeners:`
/// and `tokens:` at the top level) passes `check --no-files`: the docs cannot drift from
/// what mailgate accepts.
#[test]
fn complete_configs_in_the_docs_pass_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let mut documents = vec![root.join("README.md")];
    let mut folders = vec![root.join("docs")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                documents.push(path);
            }
        }
    }
    let mut checked = 0;
    for document in documents {
        let text = std::fs::read_to_string(&document).unwrap();
        for (i, block) in text.split("```yaml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap();
            let top_level = |key: &str| block.lines().any(|line| line.starts_with(key));
            if !(top_level("listeners:") && top_level("tokens:")) {
                continue;
            }
            let path = write(&dir, &format!("block-{checked}.yaml"), block);
            let out = mailgate(&["check", "--no-files", "--config", &path]);
            assert!(
                out.status.success(),
                "{} block {i}: {}",
                document.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} complete configs found");
}

/// A configuration with a listener and the admin endpoint presenting `ca`'s server
/// certificate, and a provider signing assertions with `cert` and `key`.
fn with_certificates(
    ca: &support::TestCa,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> String {
    format!(
        r#"listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:1993"
    tls: {{ mode: implicit, cert_file: "{server_cert}", key_file: "{server_key}" }}
    upstream: {{ host: mail.example, port: 993, tls: implicit }}
admin:
  listen: "127.0.0.1:9090"
  tls: {{ cert_file: "{server_cert}", key_file: "{server_key}" }}
tokens:
  oauth2:
    providers:
      m365:
        preset: microsoft
        tenant: contoso.onmicrosoft.com
        client_id: "00000000-0000-0000-0000-000000000000"
        client_certificate: {{ cert_file: "{cert}", key_file: "{key}" }}
    accounts:
      printer: {{ provider: m365, grant: client_credentials, user: "printer@contoso.example" }}
"#,
        server_cert = ca.cert_pem().display(),
        server_key = ca.key_pem().display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// Issue 13 item 15: a client certificate with another pair's key passed `check`; Microsoft
/// refuses every assertion signed with it (AADSTS700027), but only at runtime.
#[tokio::test]
async fn check_refuses_a_client_certificate_whose_key_is_anothers() {
    support::with_timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let ca = support::TestCa::create().await;
        let (ours, other) = (
            support::TestKeys::rsa(dir.path()).await,
            support::TestKeys::rsa(dir.path()).await,
        );
        let config = write(
            &dir,
            "mismatch.yaml",
            &with_certificates(&ca, &ours.cert_pem, &other.key_pem),
        );
        let out = mailgate(&["check", "--config", &config]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        let key = other.key_pem.display().to_string();
        assert!(
            stderr.contains("tokens.oauth2.providers.m365.client_certificate:")
                && stderr.contains(&format!(
                    "{key}: the key does not belong to the certificate"
                )),
            "{stderr}"
        );
        let config = write(
            &dir,
            "pair.yaml",
            &with_certificates(&ca, &ours.cert_pem, &ours.key_pem),
        );
        let out = mailgate(&["check", "--config", &config]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}

/// Issue 13 item 15: nothing warned of a certificate about to expire. The test CA's
/// certificates live two days; a client certificate made for 400 days draws no warning.
#[tokio::test]
async fn check_warns_of_certificates_that_expire_within_30_days() {
    support::with_timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let ca = support::TestCa::create().await;
        let keys = support::TestKeys::rsa(dir.path()).await;
        let lasting = keys.dir.join("lasting.pem");
        let out = support::process::run_command(
            "openssl",
            &[
                "req", "-new", "-x509", "-key", "key.pem", "-out", "lasting.pem", "-days", "400",
                "-subj", "/CN=mailgate test client",
            ],
            Some(&keys.dir),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.success(), "{}", out.stderr);
        let config = write(
            &dir,
            "config.yaml",
            &with_certificates(&ca, &lasting, &keys.key_pem),
        );
        let out = mailgate(&["check", "--config", &config]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let server_cert = ca.cert_pem().display().to_string();
        for key in ["listeners[0].tls.cert_file", "admin.tls.cert_file"] {
            assert!(
                stderr.contains(&format!(
                    "{config}: {key}: warning: the certificate in {server_cert} expires in 1 day, on "
                )),
                "{key}: {stderr}"
            );
        }
        assert!(!stderr.contains("client_certificate"), "{stderr}");
        assert_eq!(stderr.lines().count(), 2, "{stderr}");
    })
    .await;
}

/// Issue 13 item 20: nothing warned that a listener off loopback takes the passwords mailgate
/// checks in clear (no TLS, or STARTTLS without `require`).
#[test]
fn check_warns_when_checked_passwords_may_cross_the_network_in_clear() {
    let listener = |name: &str, protocol: &str, listen: &str, tls: &str| {
        format!(
            "  - {{ name: {name}, protocol: {protocol}, listen: \"{listen}\", {tls}upstream: {{ host: mail.example, port: 993, tls: implicit }} }}\n"
        )
    };
    let files = "cert_file: /x/tls.crt, key_file: /x/tls.key";
    let listeners = [
        listener("lan", "imap", "0.0.0.0:1143", ""),
        listener("local", "imap", "127.0.0.1:1144", ""),
        listener(
            "lax",
            "smtp",
            "0.0.0.0:1587",
            &format!("tls: {{ mode: starttls, require: false, {files} }}, "),
        ),
        listener(
            "strict",
            "smtp",
            "0.0.0.0:1588",
            &format!("tls: {{ mode: starttls, {files} }}, "),
        ),
        listener(
            "implicit",
            "imap",
            "[::]:1993",
            &format!("tls: {{ mode: implicit, {files} }}, "),
        ),
    ]
    .concat();
    let config = |client_auth: &str| {
        format!(
            "listeners:\n{listeners}tokens:\n  auth_server: {{ url: \"http://127.0.0.1:8080/token\" }}\nclient_auth: {client_auth}\n"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let checked = write(
        &dir,
        "checked.yaml",
        &config("{ mode: auth_server, auth_server: { url: \"http://127.0.0.1:8080/check\" } }"),
    );
    let out = mailgate(&["check", "--no-files", "--config", &checked]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        warnings,
        [
            format!(
                "{checked}: listeners[0].tls: warning: client passwords (client_auth.mode auth_server) may cross the network in clear on 0.0.0.0:1143: use tls mode starttls with require: true, or implicit"
            ),
            format!(
                "{checked}: listeners[2].tls: warning: client passwords (client_auth.mode auth_server) may cross the network in clear on 0.0.0.0:1587: use tls mode starttls with require: true, or implicit"
            ),
        ],
        "{stderr}"
    );
    // Mode any checks no password: nothing to protect.
    let unchecked = write(
        &dir,
        "unchecked.yaml",
        &config("{ mode: any, allow_remote: true }"),
    );
    let out = mailgate(&["check", "--no-files", "--config", &unchecked]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
}

/// Issue 13 item 20: the chart's values schema took any `config`, so a typo passed `helm
/// install` and the pods crash-looped on exit 64. It embeds the schema mailgate makes of its
/// own file, and must be regenerated (scripts/chart-schema.sh) when the types change.
#[test]
fn the_charts_values_schema_embeds_the_current_config_schema() {
    let out = mailgate(&["config-schema"]);
    assert!(out.status.success(), "{out:?}");
    let mut generated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let definitions = generated
        .as_object_mut()
        .and_then(|schema| schema.remove("definitions"))
        .unwrap();
    generated.as_object_mut().unwrap().remove("$schema");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart = std::fs::read_to_string(root.join("helm/mailgate/values.schema.json")).unwrap();
    let chart: serde_json::Value = serde_json::from_str(&chart).unwrap();
    let stale = "helm/mailgate/values.schema.json is stale: run scripts/chart-schema.sh";
    assert_eq!(chart["properties"]["config"], generated, "{stale}");
    let embedded: serde_json::Map<String, serde_json::Value> = chart["definitions"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|(name, schema)| (name.clone(), schema.clone()))
        .collect();
    assert_eq!(serde_json::Value::Object(embedded), definitions, "{stale}");
}

#[tokio::test]
async fn admin_passwords_shorter_than_twelve_bytes_are_refused_by_check_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(&dir, "empty", "\n");
    let short = write(&dir, "short", "eleven-byte");
    let good = write(&dir, "good", "twelve-bytes");
    let admin = support::free_port();
    let config = |onboarding: &str, service: &str| {
        format!(
            "{GOOD}admin:\n  listen: \"127.0.0.1:{admin}\"\n  onboarding: {{ password_file: \"{onboarding}\" }}\n  token_service: {{ password_file: \"{service}\" }}\n"
        )
    };

    let path = write(&dir, "empty.yaml", &config(&empty, &good));
    let out = mailgate(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(64));
    let errors = String::from_utf8(out.stderr).unwrap();
    assert!(
        errors.contains(&format!(
            "{path}: admin.onboarding.password_file: the password has 0 bytes; at least 12"
        )),
        "{errors}"
    );
    // `serve` refuses it too, instead of answering `curl -u admin: .../accounts`.
    let mut serving = Mailgate::spawn(&config(&empty, &good), &["serve"], &[]);
    let code = serving.wait_exit(std::time::Duration::from_secs(10)).await;
    assert_eq!(code, Some(64), "{}", serving.output());
    assert!(
        serving.stderr().contains("admin.onboarding.password_file"),
        "{}",
        serving.output()
    );

    let path = write(&dir, "short.yaml", &config(&good, &short));
    let errors = String::from_utf8(mailgate(&["check", "--config", &path]).stderr).unwrap();
    assert!(
        errors.contains("admin.token_service.password_file: the password has 11 bytes"),
        "{errors}"
    );
    let client = config(&good, &good).replace(
        &format!("token_service: {{ password_file: \"{good}\" }}"),
        &format!(
            "token_service: {{ clients: {{ sidecar: {{ password_file: \"{short}\", accounts: [\"*\"] }} }} }}"
        ),
    );
    let path = write(&dir, "client.yaml", &client);
    let errors = String::from_utf8(mailgate(&["check", "--config", &path]).stderr).unwrap();
    assert!(
        errors.contains("admin.token_service.clients.sidecar.password_file: the password has 11"),
        "{errors}"
    );

    let path = write(&dir, "good.yaml", &config(&good, &good));
    let out = mailgate(&["check", "--config", &path]);
    assert!(out.status.success(), "{out:?}");
}

/// `hash-password` with the password on standard input; its output, or the reason on stderr.
fn hash_password(input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(Mailgate::binary())
        .arg("hash-password")
        .env_remove("MAILGATE_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_makes_a_hash_a_static_login_accepts() {
    use std::net::SocketAddr;
    use support::imap_client::ImapClient;
    use support::{TEST_TIMEOUT, TestUpstream, free_port, with_timeout};

    const ACCOUNT: &str = "printer-2f";
    const PASSWORD: &str = "staple battery 42";
    with_timeout(TEST_TIMEOUT, async {
        support::secrets::remember("client password", PASSWORD);
        let out = hash_password(&format!("{PASSWORD}\n"));
        assert!(out.status.success(), "{out:?}");
        let printed = String::from_utf8(out.stdout).unwrap();
        let hash = printed.strip_suffix('\n').unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{printed}"
        );
        assert!(!printed.contains(PASSWORD), "{printed}");

        let up = TestUpstream::start().await;
        up.auth.grant(ACCOUNT, "printer@example.test");
        let (imap, smtp) = (free_port(), free_port());
        let config = format!(
            "{}client_auth:\n  mode: static\n  accounts:\n    {ACCOUNT}: \"{hash}\"\n",
            up.mailgate_config(imap, smtp)
        );
        let mailgate = Mailgate::start(&config).await;
        let address = SocketAddr::from(([127, 0, 0, 1], imap));
        let mut client = ImapClient::connect(address).await;
        let wrong = client.login(ACCOUNT, "staple battery 43").await;
        assert!(
            wrong.tagged.contains("NO [AUTHENTICATIONFAILED]"),
            "{wrong:?}"
        );
        let login = client.login(ACCOUNT, PASSWORD).await;
        assert!(login.is_ok(), "{login:?}\n{}", mailgate.output());
    })
    .await;
}

#[test]
fn hash_password_refuses_what_no_client_can_log_in_with() {
    for (input, reason) in [
        ("\n", "the password is empty"),
        ("one\ntwo\n", "the password must be one line"),
    ] {
        let out = hash_password(input);
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        let errors = String::from_utf8(out.stderr).unwrap();
        assert!(errors.contains(reason), "{errors}");
    }
    // A Windows line end is not part of the password either.
    let out = hash_password("pw\r\n");
    assert!(out.status.success(), "{out:?}");
}

/// At a terminal (a pseudo-terminal from util-linux `script`) the password is asked for twice
/// and never echoed; the hash printed is the password's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_asks_at_a_terminal_without_echo() {
    use argon2::{PasswordHash, PasswordVerifier as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const PASSWORD: &str = "typed-not-shown-5x";
    support::with_timeout(support::TEST_TIMEOUT, async {
        let command = format!("{} hash-password", Mailgate::binary().display());
        let mut terminal = tokio::process::Command::new("script")
            .args(["--quiet", "--return", "--command", &command, "/dev/null"])
            .env_remove("MAILGATE_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("util-linux script");
        let mut keyboard = terminal.stdin.take().unwrap();
        let mut screen = terminal.stdout.take().unwrap();
        let mut shown = String::new();
        // Types the password once the prompt is on the screen.
        for prompt in ["Password: ", "Again: "] {
            while !shown.contains(prompt) {
                let mut chunk = [0u8; 256];
                let read = screen.read(&mut chunk).await.unwrap();
                assert!(read > 0, "the terminal closed: {shown:?}");
                shown.push_str(&String::from_utf8_lossy(&chunk[..read]));
            }
            keyboard
                .write_all(format!("{PASSWORD}\r").as_bytes())
                .await
                .unwrap();
        }
        screen.read_to_string(&mut shown).await.unwrap();
        assert!(terminal.wait().await.unwrap().success(), "{shown:?}");
        assert!(!shown.contains(PASSWORD), "echoed: {shown:?}");
        let hash = shown
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with("$argon2id$"))
            .unwrap_or_else(|| panic!("no hash in {shown:?}"));
        let parsed = PasswordHash::new(hash).unwrap();
        assert!(
            argon2::Argon2::default()
                .verify_password(PASSWORD.as_bytes(), &parsed)
                .is_ok()
        );
    })
    .await;
}

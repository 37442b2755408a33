//! The command line: `check` accepts good configs and reports every problem of a bad one as
//! `PATH: key.path: reason` with exit code 64; `serve` refuses a bad config the same way.

mod support;

use std::process::Command;

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
/// manifest) pass `check --no-files`, which leaves out their production secret files.
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
        "deploy/systemd/mailgate.yaml",
    ] {
        examples.push(root.join(example).display().to_string());
    }
    for example in examples {
        let out = mailgate(&["check", "--no-files", "--config", &example]);
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

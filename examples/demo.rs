//! The demo behind `scripts/demo.sh`: a real Dovecot that accepts only OAuth2 bearer tokens,
//! an authentication server handing out tokens, and mailgate in front; then a plain-password
//! IMAP login that lists folders and a plain-password SMTP submission whose mail arrives.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::{Mailgate, TestUpstream, curl, curl_send_mail, free_port};

const ACCOUNT: &str = "demo-account";
const USER: &str = "demo@example.test";

#[tokio::main]
async fn main() {
    let up = TestUpstream::start().await;
    let token = up.auth.grant_with_expiry(ACCOUNT, USER, 3600);
    step("Upstream");
    println!("Dovecot (token-only: XOAUTH2/OAUTHBEARER, no passwords)");
    println!("  IMAPS      127.0.0.1:{}", up.dovecot.imaps_port);
    println!(
        "  submission 127.0.0.1:{} (STARTTLS)",
        up.dovecot.submission_port
    );
    println!(
        "authentication server {}  ({ACCOUNT} -> {USER}, token {}...)",
        up.auth.url(),
        &token[..8]
    );

    let (imap, smtp, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        "{}admin:\n  listen: \"127.0.0.1:{admin}\"\n",
        up.mailgate_config(imap, smtp)
    );
    let mailgate = Mailgate::start(&config).await;
    step("mailgate configuration");
    print!("{config}");
    println!(
        "\nNo client_auth section: mode `any`, so mailgate takes the user name as the account id and\n\
         accepts any password (allowed only on loopback). For real clients use client_auth.mode: static\n\
         with argon2 hashes (docs/configuration.md)."
    );

    step(&format!(
        "IMAP: curl logs in to mailgate as {ACCOUNT} (any password) and lists folders"
    ));
    let url = format!("imap://127.0.0.1:{imap}/");
    let credentials = format!("{ACCOUNT}:any-password");
    let args = [
        url.as_str(),
        "-u",
        &credentials,
        "--login-options",
        "AUTH=LOGIN",
        "-X",
        r#"LIST "" "*""#,
    ];
    println!("$ curl {}", shell_words(&args));
    let out = curl(&args).await;
    print!("{}", out.stdout);
    check(out.success(), &out.stderr);

    step("SMTP: curl submits a mail to mailgate with AUTH PLAIN");
    let message = mailgate.dir().join("demo.eml");
    std::fs::write(
        &message,
        format!("From: {USER}\r\nTo: friend@example.test\r\nSubject: Hello through mailgate\r\n\r\nSent with a password; delivered with OAuth2.\r\n"),
    )
    .expect("write the demo message");
    let smtp = std::net::SocketAddr::from(([127, 0, 0, 1], smtp));
    println!(
        "$ curl smtp://{smtp} -u {credentials} --login-options AUTH=PLAIN --mail-from {USER} --mail-rcpt friend@example.test -T {}",
        message.display()
    );
    let out = curl_send_mail(smtp, &credentials, USER, "friend@example.test", &message).await;
    check(out.success(), &out.stderr);
    let received = up.sink.wait_for_message(Duration::from_secs(10)).await;
    println!(
        "arrived at the relay behind Dovecot: from {} to {:?}",
        received.from, received.rcpts
    );
    for line in received
        .data_str()
        .lines()
        .filter(|l| l.starts_with("Subject:"))
    {
        println!("  {line}");
    }

    step("What happened upstream (Dovecot's log)");
    for line in up.dovecot.log().lines().filter(|l| l.contains("Login:")) {
        println!("  {line}");
    }

    step(&format!("Metrics (http://127.0.0.1:{admin}/metrics)"));
    let out = curl(&[&format!("http://127.0.0.1:{admin}/metrics")]).await;
    for line in out
        .stdout
        .lines()
        .filter(|l| l.starts_with("mailgate_logins_total") || l.starts_with("mailgate_token_"))
    {
        if !line.contains("_bucket") {
            println!("  {line}");
        }
    }
    println!(
        "\nDemo finished: one password login over IMAP, one mail sent over SMTP, both through OAuth2 upstream."
    );
    println!(
        "Everything stops now. To try by hand, run the commands above while a demo runs, e.g. with\n\
         `scripts/demo.sh --keep` (it then waits for Ctrl-C)."
    );
    if std::env::args().any(|arg| arg == "--keep") {
        println!("Waiting for Ctrl-C ...");
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Arguments quoted for a POSIX shell, so a printed command can be pasted.
fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|arg| {
            if arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=@".contains(c))
            {
                (*arg).to_owned()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn check(ok: bool, detail: &str) {
    if !ok {
        eprintln!("demo step failed: {detail}");
        std::process::exit(1);
    }
}

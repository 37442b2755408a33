//! Running external programs (openssl, curl, pgrep) with a bounded wait, and finding free ports.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Default bound for a curl run; each call also passes `--max-time` to curl itself.
pub const CURL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished program left behind.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit code; `None` when killed by a signal (or by our timeout).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// True when the timeout fired and the program was killed.
    pub timed_out: bool,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// Runs `program args...` with stdin closed; kills it when `timeout` passes.
///
/// # Panics
/// When the program cannot be spawned (not installed).
pub async fn run_command(
    program: &str,
    args: &[&str],
    cwd: Option<&Path>,
    timeout: Duration,
) -> CmdOutput {
    run_command_with_input(program, args, cwd, None, timeout).await
}

/// Like [`run_command`], writing `input` (when given) to the program's stdin, then closing it.
///
/// # Panics
/// When the program cannot be spawned (not installed).
pub async fn run_command_with_input(
    program: &str,
    args: &[&str],
    cwd: Option<&Path>,
    input: Option<&[u8]>,
    timeout: Duration,
) -> CmdOutput {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (run scripts/install-test-deps.sh)"));
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use tokio::io::AsyncWriteExt as _;
        // A program that exits early closes its end: what it did not read does not matter.
        let _ = stdin.write_all(input).await;
    }
    // Dropping the wait_with_output future drops the child, which kills it (kill_on_drop).
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => CmdOutput {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: false,
        },
        Ok(Err(e)) => panic!("waiting for {program}: {e}"),
        Err(_) => CmdOutput {
            status: None,
            stdout: String::new(),
            stderr: format!("{program} killed after {timeout:?}"),
            timed_out: true,
        },
    }
}

/// Runs the `curl` binary with `args` (add `-sS --max-time N` yourself or use [`curl`]).
/// The password of a `-u user:password` and an `--oauth2-bearer` token are remembered as
/// secrets.
pub async fn curl_with_timeout(args: &[&str], timeout: Duration) -> CmdOutput {
    for pair in args.windows(2) {
        match (pair[0], pair[1].split_once(':')) {
            ("-u", Some((_, password))) => {
                super::secrets::remember("client password (curl -u)", password);
            }
            ("--oauth2-bearer", _) => super::secrets::remember("bearer token (curl)", pair[1]),
            _ => {}
        }
    }
    run_command("curl", args, None, timeout).await
}

/// Runs `curl -sS --max-time 20 ARGS...`, bounded by [`CURL_TIMEOUT`].
pub async fn curl(args: &[&str]) -> CmdOutput {
    let mut all = vec!["-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    curl_with_timeout(&all, CURL_TIMEOUT).await
}

/// Submits the message file `message` through `smtp` with curl: `AUTH PLAIN` as `credentials`
/// (`user:password`), envelope `from` and one recipient `to`.
pub async fn curl_send_mail(
    smtp: std::net::SocketAddr,
    credentials: &str,
    from: &str,
    to: &str,
    message: &std::path::Path,
) -> CmdOutput {
    let url = format!("smtp://{smtp}");
    let message = message.to_str().expect("UTF-8 path");
    curl(&[
        &url,
        "-u",
        credentials,
        "--login-options",
        "AUTH=PLAIN",
        "--mail-from",
        from,
        "--mail-rcpt",
        to,
        "-T",
        message,
    ])
    .await
}

/// Listening ports for test processes come from just below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), which the kernel never hands out by itself:
/// neither to `bind(0)` nor to outgoing connections. Each port is handed out once per test
/// process, and one still in use by anything else is skipped, so a port chosen here cannot be
/// taken by someone else between choosing it and the server binding it.
const TEST_PORT_SPAN: u16 = 12_000;

fn test_port_range() -> std::ops::Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let end = ephemeral_start.max(TEST_PORT_SPAN + 1024);
    end - TEST_PORT_SPAN..end
}

/// A free port on 127.0.0.1 that no other caller in this process gets (see `TEST_PORT_SPAN`).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let range = test_port_range();
    let span = u32::from(range.end - range.start);
    // Start somewhere different per process, so that processes running at once rarely meet.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = range.start + offset as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free test port in {range:?}");
}

/// `n` distinct free ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

/// Waits until `addr` accepts a TCP connection or `timeout` passes; polls every 20 ms.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        if let Ok(Ok(_)) = attempt {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` in `/proc/PID/status`); 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Whether process `pid` exists and has not exited (a zombie waiting to be reaped has).
pub fn is_running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "PID (COMMAND) STATE ...": the command may hold spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Pids of processes whose command line contains `pattern` (via `pgrep -f`), excluding pgrep.
pub fn pgrep(pattern: &str) -> Vec<u32> {
    let out = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(pattern)
        .output()
        .expect("run pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Sends `signal` (e.g. "TERM", "KILL") to `pid` with the `kill` command; errors are ignored
/// (the process may already be gone).
pub fn send_signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Stops `child`: SIGTERM, wait up to `grace`, then SIGKILL and reap. Blocking (for `Drop`).
pub fn stop_child(child: &mut std::process::Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    send_signal(child.id(), "TERM");
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

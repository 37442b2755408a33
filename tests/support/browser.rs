//! [`Browser`]: a headless Chromium driven through chromedriver with the W3C WebDriver protocol
//! (HTTP/JSON on 127.0.0.1), for end-to-end tests of the HTML pages mailgate serves.
//!
//! One `Browser` is one chromedriver, started in its own process group, holding one session:
//! one Chromium with a fresh profile. Its temp dir holds the profile, a private `HOME` (so
//! nothing is written to the real one), chromedriver's log and Chromium's stderr; the dir's
//! name is a marker that appears on every command line of the instance (chromedriver's
//! `--log-path`, Chromium's `--user-data-dir`, the crash handler's `--database` under `HOME`),
//! which is how [`Browser::processes`] finds them. [`Browser::stop`] (also on drop) kills the
//! group and anything left carrying the marker, and waits, bounded, until nothing is.
//!
//! Chromium stays on the loopback interface: background services are switched off by flags,
//! and `--host-resolver-rules` makes every host name but `localhost` unresolvable, so whatever
//! Chromium still tries on its own (it does try: account checks, the updater) fails inside the
//! browser without a DNS query or a connection. Tests use `127.0.0.1` addresses.
//!
//! Every method is bounded. The page-level methods panic on failure, with the current URL and
//! the start of the page source in the message.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

use super::process::{free_port, pgrep, send_signal};

/// The chromedriver binary (Debian's `chromium-driver`: `/usr/bin/chromedriver`).
const CHROMEDRIVER: &str = "chromedriver";
/// Chromium binaries, best first. Debian's `/usr/bin/chromium` is a shell wrapper that adds
/// flags of its own (`--enable-remote-extensions`, extensions from /usr/share/chromium, Google
/// API keys in the environment); the binary behind it takes exactly the flags given here.
const CHROMIUM_BINARIES: &[&str] = &["/usr/lib/chromium/chromium", "/usr/bin/chromium"];
/// Window and viewport size in CSS pixels, and so the size of every screenshot. The window
/// alone leaves a smaller viewport (about 1280x757), so the viewport is set as well.
pub const VIEWPORT: (u32, u32) = (1280, 900);

/// How long chromedriver may take to answer `/status` (measured: about 50 ms).
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long creating the session (starting Chromium) may take (measured: about 1 s; the whole
/// start, 1.4 to 1.8 s, 2.5 s with other browsers starting at the same time).
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// The deadline of any one WebDriver command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// chromedriver's own page-load deadline; below [`COMMAND_TIMEOUT`] so that its error (which
/// says what was loading) arrives before ours.
const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of each request made to describe a failure (URL, page source).
const CONTEXT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long ending the session (Chromium's own shutdown) may take in [`Browser::quit`].
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the process group gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long processes carrying the marker may linger after the group is gone.
const LEFTOVER_GRACE: Duration = Duration::from_secs(5);
/// Starts retried when chromedriver could not listen (its port taken in the meantime).
const START_ATTEMPTS: usize = 3;
/// How often the `wait_*` methods look again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How much page source a failure message shows.
const SOURCE_SNIPPET_CHARS: usize = 2_000;
/// Answers larger than this are refused. A 1280x900 screenshot is well below 5 MB in base64.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// The key under which W3C WebDriver returns an element reference (its "web element
/// identifier").
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium's command line besides `--user-data-dir` (and `--log-net-log`), each for a reason.
/// chromedriver adds its own automation flags (`--enable-automation`, `--disable-sync`,
/// `--disable-background-networking`, `--no-first-run`, ...) in front of these.
const CHROMIUM_ARGS: &[&str] = &[
    // The new headless mode is the real browser without a window.
    "--headless=new",
    // The sandbox needs a non-root user or the setuid helper; tests run as root.
    "--no-sandbox",
    "--disable-gpu",
    // Containers often have a tiny /dev/shm; Chromium crashes when it runs out.
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
    "--force-device-scale-factor=1",
    "--hide-scrollbars",
    "--lang=en-US",
    // Quiet start: no first-run page, no default-browser question, no search engine choice.
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-search-engine-choice-screen",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--password-store=basic",
    "--use-mock-keychain",
    // No network of its own: no background services, updates, metrics, reporting, field
    // trials, safe browsing, time queries, translation, hints or model downloads.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-field-trial-config",
    "--safebrowsing-disable-auto-update",
    "--metrics-recording-only",
    "--disable-breakpad",
    "--disable-features=OptimizationHints,OptimizationGuideModelDownloading,\
     OptimizationGuideOnDeviceModel,MediaRouter,DialMediaRouteProvider,Translate,\
     NetworkTimeServiceQuerying,AutofillServerCommunication,\
     CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
    // Direct connections whatever the environment's proxy variables say.
    "--no-proxy-server",
    // The guarantee: no host name resolves (so no DNS query, no connection) except the
    // loopback ones. What Chromium still starts by itself (Google account checks, the
    // updater, a search engine preconnect) fails at once with ERR_NAME_NOT_RESOLVED.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
];

/// How to start a [`Browser`]; `BrowserOptions::default()` is what [`Browser::start`] uses.
#[derive(Debug, Clone, Default)]
pub struct BrowserOptions {
    /// Write Chromium's net log (every DNS query, connection and request) to this file. The
    /// file is complete JSON only after [`Browser::quit`] (Chromium closes it on shutdown).
    pub net_log: Option<PathBuf>,
}

/// An error answer from chromedriver, or no answer.
#[derive(Debug, Clone)]
struct WebDriverError {
    /// The HTTP status, when there was an answer.
    status: Option<u16>,
    /// The W3C error code (`no such element`, `timeout`, ...), or `transport`/`bad answer`.
    error: String,
    message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(status) => write!(f, "{} (HTTP {status}): {}", self.error, self.message),
            None => write!(f, "{}: {}", self.error, self.message),
        }
    }
}

impl WebDriverError {
    fn transport(message: impl std::fmt::Display) -> WebDriverError {
        WebDriverError {
            status: None,
            error: "transport".to_owned(),
            message: message.to_string(),
        }
    }

    fn bad_answer(message: impl std::fmt::Display) -> WebDriverError {
        WebDriverError {
            status: None,
            error: "bad answer".to_owned(),
            message: message.to_string(),
        }
    }

    /// The element is not there (yet): worth looking again while waiting.
    fn is_missing_element(&self) -> bool {
        matches!(
            self.error.as_str(),
            "no such element" | "stale element reference"
        )
    }
}

/// A headless Chromium with one WebDriver session. Stops everything on drop.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT` of chromedriver.
    base: String,
    /// Empty until the session exists (and after [`Browser::quit`] ended it).
    session: String,
    /// chromedriver; its pid is the process group of the whole instance.
    child: Option<Child>,
    marker: String,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port, waits until it answers, and opens a session with a
    /// headless Chromium on a fresh profile and a [`VIEWPORT`]-sized page.
    ///
    /// # Panics
    /// When chromedriver or Chromium is not installed or does not come up (the message has
    /// chromedriver's log and Chromium's stderr).
    pub async fn start() -> Browser {
        Self::start_with(BrowserOptions::default()).await
    }

    /// Like [`Browser::start`], with `options`.
    pub async fn start_with(options: BrowserOptions) -> Browser {
        mailgate::tls::install_crypto_provider();
        let chromium = CHROMIUM_BINARIES
            .iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or_else(|| {
                panic!("no Chromium in {CHROMIUM_BINARIES:?} (run scripts/install-test-deps.sh)")
            });
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(chromium, &options).await {
                Ok(browser) => return browser,
                Err(e) => last_error = e,
            }
        }
        panic!("browser did not start after {START_ATTEMPTS} attempts: {last_error}");
    }

    async fn try_start(chromium: &str, options: &BrowserOptions) -> Result<Browser, String> {
        let dir = tempfile::Builder::new()
            .prefix("mailgate-browser-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let marker = dir
            .path()
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or("temp dir name is not UTF-8")?
            .to_owned();
        let home = dir.path().join("home");
        let profile = dir.path().join("profile");
        for path in [&home, &profile] {
            std::fs::create_dir(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(COMMAND_TIMEOUT)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;

        let port = free_port();
        // Chromium inherits chromedriver's stderr: its own log lines land in chromium.log.
        let stderr = std::fs::File::create(dir.path().join("chromium.log"))
            .map_err(|e| format!("log file: {e}"))?;
        let mut command = std::process::Command::new(CHROMEDRIVER);
        command
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.path().join("chromedriver.log").display()
            ))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for var in [
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
        ] {
            command.env_remove(var);
        }
        // Its own process group, so that one signal reaches chromedriver and all of Chromium.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .map_err(|e| format!("spawn {CHROMEDRIVER} (run scripts/install-test-deps.sh): {e}"))?;

        // From here on, dropping `browser` cleans up whatever was started.
        let mut browser = Browser {
            http,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            child: Some(child),
            marker,
            dir,
        };
        browser.wait_until_ready().await?;

        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|&arg| arg.to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        if let Some(net_log) = &options.net_log {
            args.push(format!("--log-net-log={}", net_log.display()));
        }
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "timeouts": {
                        "pageLoad": PAGE_LOAD_TIMEOUT.as_millis() as u64,
                        "script": PAGE_LOAD_TIMEOUT.as_millis() as u64,
                        "implicit": 0,
                    },
                    "goog:loggingPrefs": { "browser": "SEVERE" },
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": args,
                    },
                }
            }
        });
        let answer = browser
            .send(
                Method::POST,
                "/session",
                Some(capabilities),
                SESSION_TIMEOUT,
            )
            .await
            .map_err(|e| format!("new session: {e}\n{}", browser.log()))?;
        browser.session = answer
            .get("sessionId")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("new session: no sessionId in {answer}"))?
            .to_owned();

        // The window leaves less than its height to the page; fix the viewport itself.
        browser
            .cdp_raw(
                "Emulation.setDeviceMetricsOverride",
                json!({
                    "width": VIEWPORT.0,
                    "height": VIEWPORT.1,
                    "deviceScaleFactor": 1,
                    "mobile": false,
                }),
            )
            .await
            .map_err(|e| format!("set viewport: {e}\n{}", browser.log()))?;
        // chromedriver's first tab shows the new tab page (a URL given on Chromium's command
        // line does not change that); start from a blank page instead.
        browser
            .command(Method::POST, "/url", Some(json!({ "url": "about:blank" })))
            .await
            .map_err(|e| format!("open about:blank: {e}\n{}", browser.log()))?;
        Ok(browser)
    }

    /// Polls `/status` until chromedriver says it is ready; fails early if it exits (a port
    /// taken by someone else, a missing library).
    async fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DRIVER_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                return Err(format!("chromedriver exited with {status}\n{}", self.log()));
            }
            let status = self
                .send(Method::GET, "/status", None, Duration::from_millis(500))
                .await;
            if let Ok(value) = status
                && value.get("ready").and_then(Value::as_bool) == Some(true)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "chromedriver not ready after {DRIVER_START_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The instance's temp dir (profile, private `HOME`, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Unique per instance; on the command line of each of its processes.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Pids of this instance's processes still alive (chromedriver, Chromium and its helpers).
    pub fn processes(&self) -> Vec<u32> {
        pgrep(&self.marker)
    }

    /// The end of chromedriver's log (which records every command with its parameters,
    /// including the header [`Browser::set_basic_auth`] sets) and of Chromium's stderr.
    pub fn log(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let start = text.len().saturating_sub(8_000);
            let start = (start..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            text[start..].to_owned()
        };
        format!(
            "--- chromedriver.log (end) ---\n{}\n--- chromium.log (end) ---\n{}",
            tail("chromedriver.log"),
            tail("chromium.log")
        )
    }

    /// Kills chromedriver and every Chromium process of this instance, and waits until none is
    /// left (blocking, bounded: SIGTERM to the process group, SIGKILL after [`STOP_GRACE`],
    /// then SIGKILL to anything still carrying the marker). Called by `Drop`; calling it early
    /// lets a test check the cleanup.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = child.id();
        signal_group(group, "TERM");
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever of the group outlived chromedriver (or chromedriver itself).
        signal_group(group, "KILL");
        let _ = child.wait();
        // Chromium's crash handlers run in sessions of their own; they exit when the browser
        // is gone, and carry the marker (their database is under our HOME) in case they don't.
        let deadline = Instant::now() + LEFTOVER_GRACE;
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for pid in left {
                    send_signal(pid, "KILL");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the session the polite way (Chromium shuts down, flushing its net log; bounded by
    /// [`QUIT_TIMEOUT`]), then [`Browser::stop`]s.
    pub async fn quit(mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = self.send(Method::DELETE, &path, None, QUIT_TIMEOUT).await;
            self.session.clear();
        }
        self.stop();
    }

    // ---- the WebDriver wire -----------------------------------------------------------------

    /// One HTTP request to chromedriver; the answer's `value`. Success is HTTP 200 with
    /// `{"value": ...}`; an error has another status and `{"value": {"error", "message", ...}}`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, WebDriverError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let mut response = request.send().await.map_err(WebDriverError::transport)?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(WebDriverError::transport)? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(WebDriverError::bad_answer(format!(
                    "answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let mut answer: Value = serde_json::from_slice(&bytes).map_err(|e| {
            WebDriverError::bad_answer(format!(
                "HTTP {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })?;
        let value = answer
            .get_mut("value")
            .map(Value::take)
            .unwrap_or(Value::Null);
        if status == 200 {
            return Ok(value);
        }
        let field = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        Err(WebDriverError {
            status: Some(status),
            error: field("error"),
            // The stack trace is chromedriver's own, and useless here.
            message: field("message"),
        })
    }

    /// A command of this session: `path` is relative to `/session/{id}`.
    async fn command(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        let path = format!("/session/{}{path}", self.session);
        self.send(method, &path, body, COMMAND_TIMEOUT).await
    }

    async fn cdp_raw(&self, cmd: &str, params: Value) -> Result<Value, WebDriverError> {
        self.command(
            Method::POST,
            "/goog/cdp/execute",
            Some(json!({ "cmd": cmd, "params": params })),
        )
        .await
    }

    /// Where the browser is and the start of what it shows, for failure messages; each part
    /// bounded by [`CONTEXT_TIMEOUT`].
    async fn context(&self) -> String {
        let get = |path: &'static str| async move {
            match tokio::time::timeout(CONTEXT_TIMEOUT, self.command(Method::GET, path, None)).await
            {
                Ok(Ok(Value::String(text))) => text,
                Ok(Ok(other)) => other.to_string(),
                Ok(Err(e)) => format!("<unknown: {e}>"),
                Err(_) => format!("<no answer within {CONTEXT_TIMEOUT:?}>"),
            }
        };
        let url = get("/url").await;
        let source = get("/source").await;
        let snippet: String = source.chars().take(SOURCE_SNIPPET_CHARS).collect();
        let more = if snippet.len() < source.len() {
            "\n[...]"
        } else {
            ""
        };
        format!("current URL: {url}\npage source:\n{snippet}{more}")
    }

    /// `result`'s value, or a panic naming `what` failed and where the browser was.
    async fn check<T>(&self, what: &str, result: Result<T, WebDriverError>) -> T {
        match result {
            Ok(value) => value,
            Err(e) => {
                let context = self.context().await;
                panic!("browser: {what} failed: {e}\n{context}");
            }
        }
    }

    async fn check_string(&self, what: &str, result: Result<Value, WebDriverError>) -> String {
        match self.check(what, result).await {
            Value::String(text) => text,
            other => {
                let context = self.context().await;
                panic!("browser: {what}: expected a string, got {other}\n{context}");
            }
        }
    }

    // ---- pages ------------------------------------------------------------------------------

    /// Navigates to `url` and waits until it has loaded (chromedriver's page-load wait: the
    /// `load` event, after redirects).
    pub async fn goto(&self, url: &str) {
        let result = self
            .command(Method::POST, "/url", Some(json!({ "url": url })))
            .await;
        self.check(&format!("goto {url}"), result).await;
    }

    /// The URL of the page shown now.
    pub async fn current_url(&self) -> String {
        let result = self.command(Method::GET, "/url", None).await;
        self.check_string("current_url", result).await
    }

    /// The page's DOM serialised as HTML (not the bytes the server sent).
    pub async fn page_source(&self) -> String {
        let result = self.command(Method::GET, "/source", None).await;
        self.check_string("page_source", result).await
    }

    /// The document's title.
    pub async fn title(&self) -> String {
        let result = self.command(Method::GET, "/title", None).await;
        self.check_string("title", result).await
    }

    /// Sends a Chrome DevTools Protocol command to the page's target; its result.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Value {
        let result = self.cdp_raw(cmd, params).await;
        self.check(&format!("CDP {cmd}"), result).await
    }

    /// Makes every request of this tab carry `Authorization: Basic base64(user:password)`
    /// from now on: navigations, form posts, the requests after a redirect or a refresh, and
    /// subresources (CDP `Network.setExtraHTTPHeaders`). Credentials in the URL
    /// (`http://user:pass@host/`) are not reliable in Chrome; without credentials, a server
    /// that answers 401 with a `WWW-Authenticate` challenge leaves an empty page (headless
    /// Chromium cancels the login prompt).
    pub async fn set_basic_auth(&self, user: &str, password: &str) {
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let authorization = format!("Basic {credentials}");
        self.set_extra_headers(&[("Authorization", &authorization)])
            .await;
    }

    /// Stops sending the header [`Browser::set_basic_auth`] set (and any other extra header).
    pub async fn clear_basic_auth(&self) {
        self.set_extra_headers(&[]).await;
    }

    /// Replaces the extra headers every request of this tab carries.
    pub async fn set_extra_headers(&self, headers: &[(&str, &str)]) {
        let result = self.cdp_raw("Network.enable", json!({})).await;
        self.check("CDP Network.enable", result).await;
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Value::from(*value)))
            .collect();
        // The header values are not repeated in the failure message: they may be credentials.
        let result = self
            .cdp_raw("Network.setExtraHTTPHeaders", json!({ "headers": headers }))
            .await;
        self.check("CDP Network.setExtraHTTPHeaders", result).await;
    }

    /// Saves a PNG of the viewport ([`VIEWPORT`]) to `path` (parent dirs created) and returns
    /// its bytes.
    pub async fn screenshot(&self, path: impl AsRef<Path>) -> Vec<u8> {
        let path = path.as_ref();
        let result = self.command(Method::GET, "/screenshot", None).await;
        let encoded = self.check_string("screenshot", result).await;
        let png = match base64::engine::general_purpose::STANDARD.decode(encoded.as_bytes()) {
            Ok(png) => png,
            Err(e) => panic!("browser: screenshot is not base64: {e}"),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
        }
        std::fs::write(path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        png
    }

    /// The console's error entries since the last call (or the start): failed loads, CSP
    /// violations, script errors. Reading them empties the list.
    pub async fn console_errors(&self) -> Vec<String> {
        let result = self
            .command(Method::POST, "/se/log", Some(json!({ "type": "browser" })))
            .await;
        let entries = self.check("console_errors", result).await;
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry.get("level").and_then(Value::as_str) == Some("SEVERE"))
            .map(|entry| {
                entry
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    }

    // ---- elements ---------------------------------------------------------------------------

    /// The first element matching `css` now, `None` when there is none.
    pub async fn try_find(&self, css: &str) -> Option<Element<'_>> {
        let result = self.find_raw(css).await;
        match result {
            Ok(element) => Some(element),
            Err(e) if e.is_missing_element() => None,
            Err(e) => self.check(&format!("find `{css}`"), Err(e)).await,
        }
    }

    /// The first element matching `css`.
    ///
    /// # Panics
    /// When there is none (no waiting: see [`Browser::wait_for`]).
    pub async fn find(&self, css: &str) -> Element<'_> {
        let result = self.find_raw(css).await;
        self.check(&format!("find `{css}`"), result).await
    }

    /// Every element matching `css`, in document order (none is no error).
    pub async fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        let result = self
            .command(
                Method::POST,
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await
            .and_then(|value| {
                value
                    .as_array()
                    .ok_or_else(|| WebDriverError::bad_answer(format!("not a list: {value}")))?
                    .iter()
                    .map(|reference| self.element(css, reference))
                    .collect::<Result<Vec<_>, _>>()
            });
        self.check(&format!("find_all `{css}`"), result).await
    }

    /// Waits until an element matches `css` (looking every 50 ms) and returns it.
    ///
    /// # Panics
    /// When none appears within `timeout`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element<'_> {
        let outcome = tokio::time::timeout(timeout, async {
            loop {
                match self.find_raw(css).await {
                    Ok(element) => return Ok(element),
                    Err(e) if e.is_missing_element() => {}
                    Err(e) => return Err(e),
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await;
        match outcome {
            Ok(result) => self.check(&format!("wait_for `{css}`"), result).await,
            Err(_) => {
                let context = self.context().await;
                panic!("browser: no element matches `{css}` after {timeout:?}\n{context}");
            }
        }
    }

    /// Waits until the current URL satisfies `predicate` (looking every 50 ms), for pages that
    /// redirect or refresh themselves (`<meta http-equiv="refresh">`); returns that URL.
    ///
    /// # Panics
    /// When it does not within `timeout`.
    pub async fn wait_until_url(
        &self,
        mut predicate: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> String {
        let mut last = String::new();
        let outcome = tokio::time::timeout(timeout, async {
            loop {
                match self.command(Method::GET, "/url", None).await {
                    Ok(Value::String(url)) if predicate(&url) => return Ok(url),
                    Ok(Value::String(url)) => last = url,
                    Ok(other) => last = other.to_string(),
                    Err(e) => return Err(e),
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await;
        match outcome {
            Ok(result) => self.check("wait_until_url", result).await,
            Err(_) => {
                let context = self.context().await;
                panic!(
                    "browser: the URL did not become the expected one within {timeout:?} \
                     (last seen: {last})\n{context}"
                );
            }
        }
    }

    /// Types `text` into the field matching `css` after clearing it.
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await;
        field.send_keys(text).await;
    }

    async fn find_raw(&self, css: &str) -> Result<Element<'_>, WebDriverError> {
        let reference = self
            .command(
                Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        self.element(css, &reference)
    }

    fn element(&self, css: &str, reference: &Value) -> Result<Element<'_>, WebDriverError> {
        let id = reference
            .get(ELEMENT_KEY)
            .and_then(Value::as_str)
            .ok_or_else(|| WebDriverError::bad_answer(format!("not an element: {reference}")))?;
        Ok(Element {
            browser: self,
            id: id.to_owned(),
            css: css.to_owned(),
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `signal` to every process in process group `group`; errors are ignored (the group may
/// be gone already).
fn signal_group(group: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg("-s")
        .arg(signal)
        .arg("--")
        .arg(format!("-{group}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// An element of the page shown when it was found (a later navigation makes it stale).
pub struct Element<'b> {
    browser: &'b Browser,
    id: String,
    /// The selector that found it, for failure messages.
    css: String,
}

impl Element<'_> {
    async fn command(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        let path = format!("/element/{}{path}", self.id);
        self.browser.command(method, &path, body).await
    }

    /// Clicks it (scrolled into view first) and waits for a navigation the click started.
    pub async fn click(&self) {
        let result = self.command(Method::POST, "/click", Some(json!({}))).await;
        self.browser
            .check(&format!("click `{}`", self.css), result)
            .await;
    }

    /// Its rendered text (what a person sees, whitespace collapsed).
    pub async fn text(&self) -> String {
        let result = self.command(Method::GET, "/text", None).await;
        self.browser
            .check_string(&format!("text of `{}`", self.css), result)
            .await
    }

    /// The value of attribute `name` as written in the HTML, `None` when absent. (A form
    /// field's current value is [`Element::property`] `value`.)
    pub async fn attribute(&self, name: &str) -> Option<String> {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':'),
            "unusual attribute name {name:?}"
        );
        let result = self
            .command(Method::GET, &format!("/attribute/{name}"), None)
            .await;
        match self
            .browser
            .check(&format!("attribute {name} of `{}`", self.css), result)
            .await
        {
            Value::Null => None,
            Value::String(text) => Some(text),
            other => Some(other.to_string()),
        }
    }

    /// The DOM property `name` (`value`, `checked`, ...); `Null` when it has none.
    pub async fn property(&self, name: &str) -> Value {
        assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "unusual property name {name:?}"
        );
        let result = self
            .command(Method::GET, &format!("/property/{name}"), None)
            .await;
        self.browser
            .check(&format!("property {name} of `{}`", self.css), result)
            .await
    }

    /// Types `text` into it (a form field), as key presses.
    pub async fn send_keys(&self, text: &str) {
        let result = self
            .command(Method::POST, "/value", Some(json!({ "text": text })))
            .await;
        self.browser
            .check(&format!("send_keys to `{}`", self.css), result)
            .await;
    }

    /// Empties it (a form field).
    pub async fn clear(&self) {
        let result = self.command(Method::POST, "/clear", Some(json!({}))).await;
        self.browser
            .check(&format!("clear `{}`", self.css), result)
            .await;
    }
}

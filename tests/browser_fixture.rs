//! Proves the browser fixture ([`support::Browser`]) against a small real web site on
//! 127.0.0.1 that requires HTTP basic auth: a form with a hidden field posts, gets a 303 to a
//! page that refreshes itself (`<meta http-equiv="refresh">`) to a last page. The site records
//! every request, so the tests see what the browser really sent. Also: failures name the page,
//! nothing is left running after a stop, and Chromium talks to nobody but 127.0.0.1.

mod support;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::{Browser, BrowserOptions, TEST_TIMEOUT, with_timeout};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

const USER: &str = "admin";
const PASSWORD: &str = "s3cret-Ad!min";
/// The hidden field's value, as a server-side form token would be.
const FORM_TOKEN: &str = "tok-7f3a9";
/// How long a page may take to refresh itself (it says 1 s).
const REFRESH_WAIT: Duration = Duration::from_secs(10);

// ---- the site ---------------------------------------------------------------------------------

/// One request as the site saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorized: bool,
    body: String,
}

#[derive(Default)]
struct SiteState {
    seen: Mutex<Vec<Seen>>,
    /// The `account` field of the last accepted form post.
    account: Mutex<String>,
}

/// A web site on 127.0.0.1 that answers 401 with a basic-auth challenge unless a request
/// carries `USER:PASSWORD`. Stops when dropped.
struct Site {
    addr: SocketAddr,
    state: Arc<SiteState>,
    task: JoinHandle<()>,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const FORM_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Onboarding</title>
<style>body { font-family: sans-serif; margin: 2em; } .step { color: #225; }</style>
</head><body>
<h1 id="heading">Connect a mailbox</h1>
<ol><li class="step">Name the account</li><li class="step">Connect</li><li class="step">Done</li></ol>
<form method="post" action="/submit">
<input type="hidden" name="form_token" value="FORM_TOKEN">
<label>Account <input type="text" name="account" id="account" value="placeholder"></label>
<button type="submit" id="connect">Connect</button>
</form>
</body></html>
"#;

const WAIT_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Connecting</title>
<meta http-equiv="refresh" content="1;url=/done">
</head><body><p id="status">Connecting, one moment...</p></body></html>
"#;

const BROKEN_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Broken</title></head>
<body><p>An image that is not there: <img src="/missing.png" alt="missing"></p></body></html>
"#;

impl Site {
    async fn start() -> Site {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind site on 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(SiteState::default());
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in the JoinSet so that aborting this task drops them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = task_state.clone();
                        conns.spawn(async move {
                            let service = service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(state.handle(req).await) }
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Site { addr, state, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// `METHOD /path` of every request but the favicon's, in order.
    fn pages(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.path != "/favicon.ico")
            .map(|s| format!("{} {}", s.method, s.path))
            .collect()
    }
}

fn page(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

impl SiteState {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        let authorized = parts
            .headers
            .get("authorization")
            .is_some_and(|value| value.as_bytes() == expected.as_bytes());
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        self.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            authorized,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        if !authorized {
            // RFC 7617 §2: the challenge that makes a browser ask for credentials.
            let mut response = page(
                401,
                "text/html",
                "<h1 id=\"refused\">401 Unauthorized</h1>".to_owned(),
            );
            response.headers_mut().insert(
                "www-authenticate",
                "Basic realm=\"fixture\", charset=\"UTF-8\""
                    .parse()
                    .unwrap(),
            );
            return response;
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/") => page(
                200,
                "text/html; charset=utf-8",
                FORM_PAGE.replace("FORM_TOKEN", FORM_TOKEN),
            ),
            ("POST", "/submit") => {
                let form: Vec<(String, String)> =
                    url::form_urlencoded::parse(&body).into_owned().collect();
                let field =
                    |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
                if field("form_token").as_deref() != Some(FORM_TOKEN) {
                    return page(400, "text/plain", "bad form token".to_owned());
                }
                *self.account.lock().unwrap() = field("account").unwrap_or_default();
                // RFC 9110 §15.4.4: 303 turns the POST into a GET of the new location.
                let mut response = page(303, "text/plain", String::new());
                response
                    .headers_mut()
                    .insert("location", "/wait".parse().unwrap());
                response
            }
            ("GET", "/wait") => page(200, "text/html; charset=utf-8", WAIT_PAGE.to_owned()),
            ("GET", "/done") => {
                let account = self.account.lock().unwrap().clone();
                // The test's own input, but escaped all the same.
                let account = account
                    .replace('&', "&amp;")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;");
                page(
                    200,
                    "text/html; charset=utf-8",
                    format!(
                        "<!doctype html><html><head><title>Done</title></head><body>\
                         <p id=\"result\">Connected {account}</p></body></html>"
                    ),
                )
            }
            ("GET", "/broken") => page(200, "text/html; charset=utf-8", BROKEN_PAGE.to_owned()),
            // No icon, and no console error about one either.
            ("GET", "/favicon.ico") => page(204, "image/x-icon", String::new()),
            _ => page(404, "text/plain", "not found".to_owned()),
        }
    }
}

// ---- helpers ----------------------------------------------------------------------------------

/// Width and height from a PNG's IHDR chunk (PNG spec §11.2.2), after checking the signature.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24, "PNG too short: {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
    assert_eq!(&png[12..16], b"IHDR", "first chunk is not IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (width, height)
}

/// Runs `test` on its own task and returns its panic message (it must panic).
async fn panic_message(test: impl std::future::Future<Output = ()> + Send + 'static) -> String {
    let error = tokio::spawn(test)
        .await
        .expect_err("the task was expected to panic");
    let payload = error.into_panic();
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

// ---- tests ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_post_redirect_and_refresh_all_carry_basic_auth() {
    with_timeout(TEST_TIMEOUT, async {
        let site = Site::start().await;
        let mut browser = Browser::start().await;
        assert_eq!(browser.current_url().await, "about:blank");
        browser.set_basic_auth(USER, PASSWORD).await;

        browser.goto(&site.url("/")).await;
        assert_eq!(browser.title().await, "Onboarding");
        assert_eq!(browser.current_url().await, site.url("/"));
        assert_eq!(
            browser.find("#heading").await.text().await,
            "Connect a mailbox"
        );
        let mut steps = Vec::new();
        for step in browser.find_all("li.step").await {
            steps.push(step.text().await);
        }
        assert_eq!(steps, ["Name the account", "Connect", "Done"]);
        assert!(browser.find_all("table").await.is_empty());
        assert!(browser.try_find("#nothing-here").await.is_none());
        assert!(browser.page_source().await.contains("form_token"));

        let hidden = browser.find("input[name=form_token]").await;
        assert_eq!(hidden.attribute("type").await.as_deref(), Some("hidden"));
        assert_eq!(hidden.attribute("value").await.as_deref(), Some(FORM_TOKEN));
        assert_eq!(hidden.attribute("data-absent").await, None);
        assert_eq!(hidden.text().await, "", "a hidden field shows no text");

        browser.fill("#account", "acme & co").await;
        let account = browser.find("#account").await;
        assert_eq!(account.property("value").await, "acme & co");
        assert_eq!(
            account.attribute("value").await.as_deref(),
            Some("placeholder"),
            "the attribute keeps what the HTML said"
        );

        let dir = tempfile::tempdir().unwrap();
        let form_png = browser.screenshot(dir.path().join("shots/form.png")).await;
        assert_eq!(png_size(&form_png), support::browser::VIEWPORT);
        assert!(
            form_png.len() > 5_000,
            "a page with text: {} bytes",
            form_png.len()
        );
        assert_eq!(
            std::fs::read(dir.path().join("shots/form.png")).unwrap(),
            form_png
        );
        assert_eq!(browser.console_errors().await, Vec::<String>::new());

        browser.find("#connect").await.click().await;
        // The click's navigation (POST, 303, GET /wait) has loaded; the refresh comes later.
        let status = browser.wait_for("#status", REFRESH_WAIT).await;
        assert_eq!(status.text().await, "Connecting, one moment...");
        let done = browser
            .wait_until_url(|url| url.ends_with("/done"), REFRESH_WAIT)
            .await;
        assert_eq!(done, site.url("/done"));
        let result = browser.wait_for("#result", REFRESH_WAIT).await;
        assert_eq!(result.text().await, "Connected acme & co");
        assert_eq!(browser.title().await, "Done");

        assert_eq!(
            site.pages(),
            ["GET /", "POST /submit", "GET /wait", "GET /done"],
            "{:?}",
            site.seen()
        );
        let seen = site.seen();
        assert!(
            seen.iter().all(|s| s.authorized),
            "a request without the credentials: {seen:?}"
        );
        let post = seen.iter().find(|s| s.method == "POST").unwrap();
        assert_eq!(
            post.body,
            format!("form_token={FORM_TOKEN}&account=acme+%26+co")
        );

        // A failed load is a console error.
        browser.goto(&site.url("/broken")).await;
        let errors = browser.console_errors().await;
        assert!(
            errors
                .iter()
                .any(|e| e.contains("/missing.png") && e.contains("404")),
            "{errors:?}"
        );
        assert!(
            browser.console_errors().await.is_empty(),
            "reading empties the list"
        );

        assert!(!browser.processes().is_empty());
        browser.stop();
        assert_eq!(
            browser.processes(),
            Vec::<u32>::new(),
            "left running after stop"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_the_site_refuses_and_the_page_stays_empty() {
    with_timeout(TEST_TIMEOUT, async {
        let site = Site::start().await;
        let browser = Browser::start().await;

        // Headless Chromium cancels the login prompt: no hang, an empty page.
        browser.goto(&site.url("/")).await;
        assert!(browser.try_find("#connect").await.is_none());
        assert!(!site.seen().is_empty());
        assert!(
            site.seen().iter().all(|s| !s.authorized),
            "{:?}",
            site.seen()
        );

        browser.set_basic_auth(USER, "wrong").await;
        browser.goto(&site.url("/")).await;
        assert!(browser.try_find("#connect").await.is_none());

        browser.set_basic_auth(USER, PASSWORD).await;
        browser.goto(&site.url("/")).await;
        browser.find("#connect").await;
        assert!(site.seen().last().unwrap().authorized);

        browser.clear_basic_auth().await;
        browser.goto(&site.url("/")).await;
        assert!(browser.try_find("#connect").await.is_none());
        assert!(!site.seen().last().unwrap().authorized);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_name_the_url_and_show_the_page() {
    with_timeout(TEST_TIMEOUT, async {
        let site = Arc::new(Site::start().await);
        let url = site.url("/");

        let marker = Arc::new(Mutex::new(String::new()));
        let (task_site, task_marker) = (site.clone(), marker.clone());
        let message = panic_message(async move {
            let browser = Browser::start().await;
            *task_marker.lock().unwrap() = browser.marker().to_owned();
            browser.set_basic_auth(USER, PASSWORD).await;
            browser.goto(&task_site.url("/")).await;
            browser
                .wait_for("#never-there", Duration::from_millis(300))
                .await;
        })
        .await;
        assert!(message.contains("`#never-there`"), "{message}");
        assert!(
            message.contains(&format!("current URL: {url}")),
            "{message}"
        );
        assert!(message.contains("Connect a mailbox"), "{message}");
        // The browser was dropped while the task unwound.
        let marker = marker.lock().unwrap().clone();
        assert!(!marker.is_empty());
        assert_eq!(support::process::pgrep(&marker), Vec::<u32>::new());

        let task_site = site.clone();
        let message = panic_message(async move {
            let browser = Browser::start().await;
            browser.set_basic_auth(USER, PASSWORD).await;
            browser.goto(&task_site.url("/")).await;
            browser.find("#connect").await.click().await;
            browser
                .wait_until_url(
                    |url| url.ends_with("/elsewhere"),
                    Duration::from_millis(300),
                )
                .await;
        })
        .await;
        assert!(message.contains("last seen: "), "{message}");
        assert!(message.contains("/wait"), "{message}");
        assert!(message.contains("Connecting, one moment"), "{message}");

        let message = panic_message(async move {
            let browser = Browser::start().await;
            browser.find("#connect").await;
        })
        .await;
        assert!(
            message.contains("find `#connect` failed: no such element"),
            "{message}"
        );
        assert!(message.contains("current URL: "), "{message}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_leaves_no_process_and_no_files() {
    with_timeout(TEST_TIMEOUT, async {
        let started = Instant::now();
        let browser = Browser::start().await;
        let start_time = started.elapsed();
        let dir = browser.dir().to_owned();
        let marker = browser.marker().to_owned();

        let processes = browser.processes();
        // chromedriver, the browser, its zygotes, GPU, network and storage services, a
        // renderer, and the crash handlers: well over three.
        assert!(processes.len() > 3, "{processes:?}");
        // The crash handlers run in sessions of their own, outside the process group: the
        // marker finds them (their database is under the private HOME, not the real one).
        let command_lines: Vec<String> = processes
            .iter()
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
            .collect();
        let crash_handler = format!("--database={}/home/", dir.display());
        assert!(
            command_lines
                .iter()
                .any(|line| line.contains("chrome_crashpad_handler")
                    && line.contains(&crash_handler)),
            "{command_lines:#?}"
        );
        assert!(
            command_lines
                .iter()
                .any(|line| line.starts_with("chromedriver --port=")),
            "{command_lines:#?}"
        );

        let stopping = Instant::now();
        drop(browser);
        let stop_time = stopping.elapsed();
        assert_eq!(support::process::pgrep(&marker), Vec::<u32>::new());
        assert!(!dir.exists(), "temp dir left behind: {}", dir.display());
        eprintln!("browser start {start_time:?}, stop {stop_time:?}");
    })
    .await;
}

/// Chromium's net log lists every DNS query, connection and request it made: with the
/// fixture's flags there is no DNS query at all, and every connection goes to 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_talks_to_nobody_but_loopback() {
    with_timeout(TEST_TIMEOUT, async {
        let site = Site::start().await;
        let dir = tempfile::tempdir().unwrap();
        let net_log = dir.path().join("net-log.json");
        let browser = Browser::start_with(BrowserOptions {
            net_log: Some(net_log.clone()),
        })
        .await;
        browser.set_basic_auth(USER, PASSWORD).await;
        browser.goto(&site.url("/")).await;
        browser.find("#connect").await.click().await;
        browser
            .wait_until_url(|url| url.ends_with("/done"), REFRESH_WAIT)
            .await;
        // Chromium's own background work starts in the first seconds; give it time to try.
        tokio::time::sleep(Duration::from_secs(3)).await;
        browser.quit().await;

        let (events, event_types) = read_net_log(&net_log);
        let event_type = |event: &Value| {
            let id = event["type"].as_u64().unwrap_or(u64::MAX);
            event_types.get(&id).cloned().unwrap_or_default()
        };
        let mut loopback_connections = 0;
        for event in &events {
            let kind = event_type(event);
            let params = &event["params"];
            match kind.as_str() {
                "DNS_TRANSACTION" | "HOST_RESOLVER_DNS_TASK" => {
                    panic!("a DNS lookup: {event}")
                }
                "TCP_CONNECT" | "TCP_CONNECT_ATTEMPT" | "UDP_BYTES_SENT" => {
                    let mut addresses: Vec<&str> = Vec::new();
                    for key in ["address", "remote_address"] {
                        addresses.extend(params[key].as_str());
                    }
                    if let Some(list) = params["address_list"].as_array() {
                        addresses.extend(list.iter().filter_map(Value::as_str));
                    }
                    for address in addresses {
                        assert!(
                            address.starts_with("127.0.0.1:"),
                            "{kind} to {address}: {event}"
                        );
                        loopback_connections += 1;
                    }
                }
                _ => {}
            }
        }
        assert!(
            loopback_connections > 0,
            "the net log shows no connection at all: is it complete?"
        );
    })
    .await;
}

/// The events of a net log file and the names of its event types.
fn read_net_log(path: &Path) -> (Vec<Value>, std::collections::HashMap<u64, String>) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read net log {}: {e}", path.display()));
    let log: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("net log {} is not complete JSON: {e}", path.display()));
    let event_types = log["constants"]["logEventTypes"]
        .as_object()
        .expect("net log constants")
        .iter()
        .filter_map(|(name, id)| Some((id.as_u64()?, name.clone())))
        .collect();
    let events = log["events"].as_array().expect("net log events").clone();
    (events, event_types)
}

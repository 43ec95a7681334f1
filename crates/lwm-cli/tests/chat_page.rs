//! The chat page `lwm serve` serves at `/` (crates/lwm-server/src/chat.html), driven in real
//! headless Chromium through chromedriver (the W3C WebDriver protocol, spoken here over a
//! plain socket: a handful of JSON calls needs no client crate). The page streams a greedy
//! answer from the default model; it must arrive in pieces and equal the server's
//! non-streamed answer to the same messages, a follow-up must carry the conversation,
//! server errors must show, and Stop must end the stream (the server counts a cancel).
//!
//! Skips with a note when the model, `chromium` or `chromedriver` is missing, unless
//! `LWM_REQUIRE_BROWSER=1` (set by CI, which installs Debian's chromium + chromium-driver).
//! `LWM_CHROMIUM` / `LWM_CHROMEDRIVER` name other binaries.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{default_model, Server};

/// Start `lwm serve` on a free loopback port with one engine thread and no worker pool
/// (the CI cores are shared with the browser); returns it and its base URL.
fn start_server(model: &str) -> (Server, String) {
    common::start_server(model, &["--threads", "1"])
}

/// One HTTP/1.1 request; returns (status, headers, body). The body is read by its
/// Content-Length where there is one: chromedriver keeps the connection open regardless
/// of `Connection: close`.
fn http(method: &str, url: &str, path: &str, body: Option<&Value>) -> (u16, String, String) {
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect to {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok());
    let mut bytes = Vec::new();
    match length {
        Some(n) => {
            bytes.resize(n, 0);
            r.read_exact(&mut bytes).unwrap();
        }
        None => {
            r.read_to_end(&mut bytes).unwrap();
        }
    }
    let rest = String::from_utf8_lossy(&bytes).into_owned();
    let body = if lower.contains("transfer-encoding: chunked") {
        dechunk(&rest)
    } else {
        rest
    };
    (status, head, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A binary from `var`, else the first of `names` on PATH.
fn find_binary(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// `None` (skip, with a note) when a browser piece is missing, unless CI requires it.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = find_binary(
        "LWM_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let driver = find_binary("LWM_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let missing = [("chromium", c.is_none()), ("chromedriver", d.is_none())]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" and ");
            assert!(
                std::env::var("LWM_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "LWM_REQUIRE_BROWSER=1 but {missing} not found (apt-get install chromium chromium-driver)"
            );
            eprintln!("note: skipping the browser test: {missing} not found (Debian: apt-get install chromium chromium-driver)");
            None
        }
    }
}

/// A WebDriver session on a chromedriver child process.
struct Browser {
    _driver: Server,
    url: String,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        // chromedriver has no "pick a free port and tell me" mode: take one from the OS.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Server(
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display())),
        );
        let url = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            // --no-sandbox: CI runs as root; /dev/shm may be small in containers.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1000,800"],
        }}}});
        let mut b = Browser {
            _driver: driver,
            url,
            session: String::new(),
        };
        let v = b.call("POST", "/session", Some(&caps));
        b.session = v["sessionId"].as_str().expect("a session id").to_string();
        let version = v["capabilities"]["browserVersion"].as_str().unwrap_or("?");
        eprintln!("browser: {} {version}", chromium.display());
        b
    }

    /// One WebDriver command; panics with the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, _, reply) = http(method, &self.url, path, body);
        let v: Value = serde_json::from_str(&reply)
            .unwrap_or_else(|_| panic!("WebDriver {method} {path}: {status} {reply}"));
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, Some(&body))
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    fn find(&self, css: &str) -> String {
        let v = self.session_call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().expect("an element id").to_string()
    }

    /// Types `text` as key presses (WebDriver's private-use characters are keys: U+E007
    /// Enter, U+E008 Shift, U+E000 releases the modifiers).
    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.session_call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        );
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.session_call("POST", &format!("/element/{e}/click"), json!({}));
    }

    /// Replaces an input's value the way a user would: clear it, then type.
    fn set(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.session_call("POST", &format!("/element/{e}/clear"), json!({}));
        self.type_into(css, text);
    }

    fn js(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Polls `script` until it returns something truthy; returns that.
    fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.js(script);
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; page: {}",
                self.js("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                "DELETE",
                &self.url,
                &format!("/session/{}", self.session),
                None,
            );
        }
    }
}

/// The server's own non-streamed answer to `messages` (greedy).
fn reference_answer(url: &str, messages: &Value, max_tokens: u32) -> String {
    let body = json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0});
    let (status, _, reply) = http("POST", url, "/v1/chat/completions", Some(&body));
    assert_eq!(status, 200, "{reply}");
    let v: Value = serde_json::from_str(&reply).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Records every distinct text the newest assistant message shows while it streams, so the
/// test sees the answer grow rather than trusting the page's own chunk count alone.
const OBSERVE: &str = r#"
    window.seen = [];
    const list = document.getElementById('messages');
    new MutationObserver(() => {
        const all = list.querySelectorAll('.msg.assistant .content');
        const t = all.length ? all[all.length - 1].textContent : '';
        const last = window.seen[window.seen.length - 1];
        if (!last || last[0] !== all.length || last[1] !== t) window.seen.push([all.length, t]);
    }).observe(list, {subtree: true, childList: true, characterData: true});
"#;

const LAST_ASSISTANT: &str = "const a = document.querySelectorAll('.msg.assistant'); \
     const m = a[a.length - 1]";

/// Waits for the stream to end (state idle, a finish reason on the newest assistant
/// message); returns (text, chunks, finish, texts seen while streaming).
fn finished_turn(b: &Browser, n_assistant: usize) -> (String, u64, String, Vec<String>) {
    let script = format!(
        "{LAST_ASSISTANT}; return document.body.dataset.state === 'idle' && a.length === {n_assistant} \
         && m.dataset.finish ? [m.querySelector('.content').textContent, \
         Number(m.dataset.chunks), m.dataset.finish, window.seen] : null"
    );
    let v = b.wait_for("the streamed answer", &script, Duration::from_secs(300));
    // Only the texts of this turn's message (the observer also saw the ones before).
    let seen = v[3]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s[0] == json!(n_assistant))
        .map(|s| s[1].as_str().unwrap().to_string())
        .collect();
    (
        v[0].as_str().unwrap().to_string(),
        v[1].as_u64().unwrap(),
        v[2].as_str().unwrap().to_string(),
        seen,
    )
}

/// The answer grew on the page: every text seen is a prefix of the final one, and at least
/// one non-empty text was seen before the last.
fn assert_incremental(text: &str, chunks: u64, seen: &[String]) {
    assert!(chunks >= 2, "the page counted {chunks} chunks for {text:?}");
    assert!(
        seen.iter().all(|s| text.starts_with(s.as_str())),
        "texts seen while streaming are not prefixes of {text:?}: {seen:?}"
    );
    let partial = seen
        .iter()
        .filter(|s| !s.is_empty() && s.len() < text.len())
        .count();
    assert!(
        partial >= 1,
        "no partial answer was ever shown (seen: {seen:?})"
    );
}

#[test]
fn chat_page_in_headless_chromium() {
    let Some(model) = default_model() else { return };
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let t0 = Instant::now();
    let (_server, url) = start_server(&model);
    let model_id = Path::new(&model)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let b = Browser::start(&chromium, &chromedriver);
    b.goto(&format!("{url}/"));
    let shown = b.wait_for(
        "the model id",
        "const t = document.getElementById('model').textContent; \
         return t.includes('loading') ? null : t",
        Duration::from_secs(30),
    );
    assert_eq!(shown, json!(model_id));

    // Shift+Enter is a new line in the message, not a send.
    b.type_into("#message", "one\u{E008}\u{E007}\u{E000}two");
    let v = b.js("return [document.getElementById('message').value, \
                  document.querySelectorAll('.msg').length]");
    assert_eq!(v, json!(["one\ntwo", 0]));
    b.set("#message", "");

    // Turn 1, sent with Enter, greedy.
    let system = "You are a helpful assistant. Answer briefly.";
    let max_tokens = 24;
    b.click("summary");
    b.set("#system", system);
    b.set("#max-tokens", &max_tokens.to_string());
    b.set("#temperature", "0");
    b.js(OBSERVE);
    let q1 = "Name three colors.";
    b.type_into("#message", &format!("{q1}\u{E007}"));
    let (a1, chunks1, finish1, seen1) = finished_turn(&b, 1);
    assert_incremental(&a1, chunks1, &seen1);
    assert!(["stop", "length"].contains(&finish1.as_str()), "{finish1}");
    let mut messages =
        json!([{"role": "system", "content": system}, {"role": "user", "content": q1}]);
    assert_eq!(a1, reference_answer(&url, &messages, max_tokens));

    // Turn 2, sent with the button: the page must send the first turn along.
    let q2 = "And three animals?";
    b.type_into("#message", q2);
    b.click("#send");
    let (a2, chunks2, _, seen2) = finished_turn(&b, 2);
    assert_incremental(&a2, chunks2, &seen2);
    let turns = messages.as_array_mut().unwrap();
    turns.push(json!({"role": "assistant", "content": a1}));
    turns.push(json!({"role": "user", "content": q2}));
    assert_eq!(a2, reference_answer(&url, &messages, max_tokens));
    let users =
        b.js("return [...document.querySelectorAll('.msg.user .content')].map(e => e.textContent)");
    assert_eq!(users, json!([q1, q2]));

    // A request the server refuses: its error message is shown, as the server words it.
    b.set("#max-tokens", "100000");
    b.type_into("#message", "Hi\u{E007}");
    let shown = b.wait_for(
        "the error message",
        "const e = document.querySelector('.msg.error'); \
         return document.body.dataset.state === 'idle' && e ? e.textContent : null",
        Duration::from_secs(60),
    );
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000});
    let (status, _, reply) = http("POST", &url, "/v1/chat/completions", Some(&body));
    assert_eq!(status, 400, "{reply}");
    let expected: Value = serde_json::from_str(&reply).unwrap();
    let expected = expected["error"]["message"].as_str().unwrap();
    assert!(
        shown.as_str().unwrap().contains(expected),
        "page shows {shown}, server says {expected:?}"
    );

    // Stop: a long answer is cut off once it has started; the server sees the client go.
    b.set("#max-tokens", "1000");
    b.type_into(
        "#message",
        "Count from 1 to 500, separated by commas.\u{E007}",
    );
    b.wait_for(
        "the long answer to start",
        &format!("{LAST_ASSISTANT}; return a.length === 3 && Number(m.dataset.chunks) >= 2"),
        Duration::from_secs(120),
    );
    b.click("#stop");
    let finish = b.wait_for(
        "the page to stop",
        &format!(
            "{LAST_ASSISTANT}; return document.body.dataset.state === 'idle' && m.dataset.finish"
        ),
        Duration::from_secs(30),
    );
    assert_eq!(finish, json!("stopped"));
    let t_stop = Instant::now();
    loop {
        let (_, _, text) = http("GET", &url, "/metrics", None);
        let cancelled = text
            .lines()
            .find_map(|l| l.strip_prefix("lwm_cancelled_requests_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if cancelled >= 1.0 {
            break;
        }
        assert!(
            t_stop.elapsed() < Duration::from_secs(30),
            "the server did not cancel the stopped request:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // CI greps this line (.ci/run).
    println!(
        "chat page: passed in headless Chromium ({} + {} chunks streamed, greedy answers equal \
         the non-streamed ones, error shown, stop cancelled; {:.0} s)",
        chunks1,
        chunks2,
        t0.elapsed().as_secs_f64()
    );
}

/// `GET /` is the page itself, without a browser: HTML with the ids the page's users and
/// the browser test rely on, and a CSP that keeps it to this server.
#[test]
fn get_root_serves_the_chat_page() {
    let Some(model) = default_model() else { return };
    let (_server, url) = start_server(&model);
    let (status, head, body) = http("GET", &url, "/", None);
    assert_eq!(status, 200, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(head.contains("content-security-policy:"), "{head}");
    for id in [
        "id=\"message\"",
        "id=\"send\"",
        "id=\"stop\"",
        "id=\"model\"",
        "id=\"messages\"",
        "id=\"system\"",
        "id=\"max-tokens\"",
        "id=\"temperature\"",
        "id=\"api-key\"",
    ] {
        assert!(body.contains(id), "GET / lacks {id}");
    }
    // Self-contained: nothing loaded from elsewhere, model text never parsed as HTML.
    for banned in ["src=\"http", "href=\"http", "@import", "innerHTML"] {
        assert!(!body.contains(banned), "GET / contains {banned}");
    }
}

//! A small HTTP/1.1 server for the pull tests, on std's `TcpListener`: fixed answers by path,
//! `Range` requests, a request log, faults on demand (a connection dropped mid-file, a
//! corrupt body, `Range` ignored), and a fake hub repo (`serve_repo`). The engine's unit
//! tests and the CLI tests (`#[path]`-included) share this one file; it needs std,
//! serde_json and sha2 only.
#![allow(dead_code)] // each test binary uses its own subset

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// How a route misbehaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// The first request gets the headers of the whole answer and only this many body
    /// bytes, then the connection closes; later requests are served normally.
    DropOnceAfter(usize),
    /// The first request gets this many body bytes, then nothing for 30 s (a stalled
    /// transfer); later requests are served normally.
    StallOnceAfter(usize),
    /// Every request gets the body with its middle byte changed.
    Corrupt,
    /// `Range` headers are ignored (a 200 with the whole body).
    IgnoreRange,
}

#[derive(Debug, Clone, Default)]
pub struct Route {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub fault: Fault,
}

/// One request the server saw: the path (with query) and the headers, names lower-cased.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    hits: HashMap<String, usize>,
    log: Vec<Seen>,
}

pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        TestServer { url, state }
    }

    pub fn route(&self, path: &str, route: Route) {
        let mut st = self.state.lock().unwrap();
        st.routes.insert(path.to_string(), route);
        st.hits.remove(path);
    }

    pub fn bytes(&self, path: &str, body: &[u8]) {
        self.route(
            path,
            Route {
                status: 200,
                body: body.to_vec(),
                ..Default::default()
            },
        );
    }

    pub fn json(&self, path: &str, v: &serde_json::Value) {
        self.route(
            path,
            Route {
                status: 200,
                body: serde_json::to_vec(v).unwrap(),
                headers: vec![("Content-Type".into(), "application/json".into())],
                ..Default::default()
            },
        );
    }

    pub fn redirect(&self, path: &str, location: &str) {
        self.route(
            path,
            Route {
                status: 302,
                headers: vec![("Location".into(), location.into())],
                ..Default::default()
            },
        );
    }

    /// Change the fault of an existing route (its hit count starts again).
    pub fn set_fault(&self, path: &str, fault: Fault) {
        let mut st = self.state.lock().unwrap();
        st.routes.get_mut(path).expect("route").fault = fault;
        st.hits.remove(path);
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    /// The requests whose path (without query) is `path`.
    pub fn requests_for(&self, path: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|s| s.path.split('?').next() == Some(path))
            .collect()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut it = line.split_whitespace();
    let method = it.next().unwrap_or("").to_string();
    let path = it.next().unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    let (route, hit) = {
        let mut st = state.lock().unwrap();
        st.log.push(Seen {
            path: path.clone(),
            headers,
        });
        let key = if st.routes.contains_key(&path) {
            path.clone()
        } else {
            path.split('?').next().unwrap_or("").to_string()
        };
        let route = st.routes.get(&key).cloned();
        let hit = st.hits.entry(key).or_insert(0);
        *hit += 1;
        (route, *hit)
    };
    let route = route.unwrap_or(Route {
        status: 404,
        body: br#"{"error":"not found"}"#.to_vec(),
        ..Default::default()
    });
    let mut body = route.body.clone();
    if route.fault == Fault::Corrupt && !body.is_empty() {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let mut status = route.status;
    let mut extra = route.headers.clone();
    if status == 200 && route.fault != Fault::IgnoreRange {
        if let Some(start) = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse::<usize>().ok())
        {
            let total = body.len();
            if start >= total {
                status = 416;
                extra.push(("Content-Range".into(), format!("bytes */{total}")));
                body.clear();
            } else {
                status = 206;
                extra.push((
                    "Content-Range".into(),
                    format!("bytes {start}-{}/{total}", total - 1),
                ));
                body = body[start..].to_vec();
            }
        }
    }
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\nAccept-Ranges: bytes\r\n",
        body.len()
    );
    for (k, v) in &extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut conn = conn;
    let _ = conn.write_all(head.as_bytes());
    if method == "HEAD" {
        return;
    }
    match route.fault {
        Fault::DropOnceAfter(n) if hit == 1 => {
            let _ = conn.write_all(&body[..n.min(body.len())]);
            let _ = conn.flush();
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        Fault::StallOnceAfter(n) if hit == 1 => {
            let _ = conn.write_all(&body[..n.min(body.len())]);
            let _ = conn.flush();
            std::thread::sleep(std::time::Duration::from_secs(30));
        }
        _ => {
            let _ = conn.write_all(&body);
            let _ = conn.flush();
        }
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A file of a fake hub repo.
pub struct HubFile {
    pub path: String,
    pub bytes: Vec<u8>,
    /// Stored in LFS: the tree lists its sha256 and `resolve` redirects to `/cdn/<sha256>`.
    pub lfs: bool,
}

impl HubFile {
    pub fn new(path: &str, bytes: &[u8], lfs: bool) -> HubFile {
        HubFile {
            path: path.to_string(),
            bytes: bytes.to_vec(),
            lfs,
        }
    }
}

/// A 40-hex stand-in for a git blob id.
pub fn fake_oid(b: &[u8]) -> String {
    sha256_hex(b)[..40].to_string()
}

/// Serve repo `ORG/NAME` at `commit` as the hub does: `/api/models/ORG/NAME`,
/// `/api/models/ORG/NAME/tree/COMMIT`, `/ORG/NAME/resolve/COMMIT/FILE` (LFS files through a
/// redirect to `/cdn/SHA256`).
pub fn serve_repo(server: &TestServer, repo: &str, commit: &str, files: &[HubFile]) {
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|f| serde_json::json!({ "rfilename": f.path }))
        .collect();
    server.json(
        &format!("/api/models/{repo}"),
        &serde_json::json!({ "id": repo, "sha": commit, "siblings": siblings }),
    );
    let tree: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let mut e = serde_json::json!({
                "type": "file",
                "path": f.path,
                "size": f.bytes.len(),
                "oid": fake_oid(&f.bytes),
            });
            if f.lfs {
                e["lfs"] = serde_json::json!({
                    "oid": sha256_hex(&f.bytes),
                    "size": f.bytes.len(),
                    "pointerSize": 134,
                });
                e["size"] = serde_json::json!(134);
            }
            e
        })
        .collect();
    server.json(
        &format!("/api/models/{repo}/tree/{commit}"),
        &serde_json::Value::Array(tree),
    );
    for f in files {
        let path = format!("/{repo}/resolve/{commit}/{}", f.path);
        if f.lfs {
            let cdn = format!("/cdn/{}", sha256_hex(&f.bytes));
            server.redirect(&path, &format!("{}{cdn}", server.url));
            server.bytes(&cdn, &f.bytes);
        } else {
            server.bytes(&path, &f.bytes);
        }
    }
}

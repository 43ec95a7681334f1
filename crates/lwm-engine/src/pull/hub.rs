//! Hugging Face hub pulls with our client, into the standard hub cache layout
//! (`models--ORG--NAME/blobs/<sha256-or-oid>`, `snapshots/<commit>/<file>` as a relative
//! link to its blob, `refs/main`), so `huggingface-cli` and `lwm` share one cache.
//!
//! The hub API: `GET {endpoint}/api/models/{org}/{name}` (the commit `sha`, `siblings[].rfilename`),
//! `GET .../tree/{commit}?recursive=true` (`path`, `size`, `oid`, `lfs.oid` = sha256), files from
//! `{endpoint}/{org}/{name}/resolve/{commit}/{file}`. LFS files are checked by their sha256.

use super::client::{encode_path, http_status, Client, Download};
use crate::location::{hub_cache_dir, ModelLocation};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// `hf:ORG/NAME` or `hf:ORG/NAME:QUANT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub org: String,
    pub name: String,
    /// A GGUF quant tag (`Q4_K_M`, `q8_0`, ...), matched case-insensitively.
    pub quant: Option<String>,
}

impl std::fmt::Display for HubSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hf:{}/{}", self.org, self.name)?;
        if let Some(q) = &self.quant {
            write!(f, ":{q}")?;
        }
        Ok(())
    }
}

impl HubSpec {
    /// Parse what follows `hf:`: `ORG/NAME` or `ORG/NAME:QUANT`.
    pub fn parse(s: &str) -> Result<HubSpec> {
        let bad = |why: &str| anyhow!("hf:{s}: {why}; expected hf:ORG/NAME or hf:ORG/NAME:QUANT");
        let (repo, quant) = match s.split_once(':') {
            Some((r, q)) => (r, Some(q)),
            None => (s, None),
        };
        let Some((org, name)) = repo.split_once('/') else {
            return Err(bad("no ORG/NAME"));
        };
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['.', '-'])
                && !p.contains("--")
                && !p.contains("..")
        };
        if !part_ok(org) || !part_ok(name) {
            return Err(bad("ORG and NAME are letters, digits, '-', '_' and '.'"));
        }
        let quant = match quant {
            None => None,
            Some(q)
                if !q.is_empty()
                    && q.len() <= 64
                    && q.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) =>
            {
                Some(q.to_string())
            }
            Some(_) => return Err(bad("QUANT is a tag like Q4_K_M")),
        };
        Ok(HubSpec {
            org: org.to_string(),
            name: name.to_string(),
            quant,
        })
    }

    /// `ORG/NAME`.
    pub fn repo_id(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }

    /// The same repo without a quant.
    pub fn without_quant(&self) -> HubSpec {
        HubSpec {
            quant: None,
            ..self.clone()
        }
    }

    /// `CACHE/models--ORG--NAME`.
    pub fn repo_dir(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}--{}", self.org, self.name))
    }
}

/// Where the hub is and how to talk to it.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `$HF_ENDPOINT`, default `https://huggingface.co` (no trailing `/`).
    pub endpoint: String,
    /// The hub cache root (`model_source::hub_cache_dir`).
    pub cache: PathBuf,
    /// `$HF_TOKEN` (or the token file `huggingface-cli login` writes), sent as a bearer token.
    pub token: Option<String>,
    /// `$HF_HUB_OFFLINE`: never contact the hub.
    pub offline: bool,
}

impl HubConfig {
    pub fn from_env() -> HubConfig {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        HubConfig {
            endpoint: endpoint.trim().trim_end_matches('/').to_string(),
            cache: hub_cache_dir(),
            token: hf_token(),
            offline: env_flag("HF_HUB_OFFLINE"),
        }
    }
}

/// `NAME` set to 1/true/yes/on.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// `$HF_TOKEN`, `$HUGGING_FACE_HUB_TOKEN`, else the file `$HF_TOKEN_PATH` or `$HF_HOME/token`
/// (`~/.cache/huggingface/token`).
fn hf_token() -> Option<String> {
    for v in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Ok(t) = std::env::var(v) {
            if !t.trim().is_empty() {
                return Some(t.trim().to_string());
            }
        }
    }
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("token")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token"))
        })?;
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// One file of the repo, as the hub lists it.
#[derive(Debug, Clone, Default)]
struct RemoteFile {
    path: String,
    size: Option<u64>,
    /// The git blob id (what the hub cache names non-LFS blobs by).
    oid: Option<String>,
    /// The LFS sha256 (what the hub cache names LFS blobs by, and what they are checked by).
    sha256: Option<String>,
}

/// What to fetch (or find) of a repo, and what `--model` then points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selection {
    pub files: Vec<String>,
    pub kind: SelectionKind,
    /// A choice made for the user (e.g. the default quant), to be said.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SelectionKind {
    /// config.json + tokenizer + weights: the snapshot directory is the model.
    HfDir,
    /// A GGUF file (the first part of a split one).
    Gguf { main: String },
}

/// The small files of a Hugging Face model directory that `lwm` reads when present.
const HF_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// The quant used when a GGUF repo has several and none is named.
pub const DEFAULT_QUANT: &str = "Q4_K_M";

/// A GGUF model in a repo: one file, or the parts of a split one.
#[derive(Debug, Clone)]
pub(crate) struct GgufGroup {
    pub quant: Option<String>,
    pub parts: Vec<String>,
    /// `N` of `-0000K-of-0000N.gguf`.
    pub split_total: Option<u32>,
}

impl GgufGroup {
    /// The quant tag, or the file name when the name carries none.
    pub fn label(&self) -> String {
        self.quant.clone().unwrap_or_else(|| self.parts[0].clone())
    }
}

fn is_gguf(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".gguf")
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `NAME-00001-of-00003.gguf` -> (`NAME`, 1, 3).
fn split_part(path: &str) -> Option<(&str, u32, u32)> {
    let stem = &path[..path.len().checked_sub(5)?];
    let n = stem.len();
    if n < 15 || !stem.is_char_boundary(n - 15) {
        return None;
    }
    let tail = &stem[n - 15..];
    let b = tail.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b[0] != b'-' || &tail[6..10] != "-of-" || !digits(1..6) || !digits(10..15) {
        return None;
    }
    Some((
        &stem[..n - 15],
        tail[1..6].parse().ok()?,
        tail[10..15].parse().ok()?,
    ))
}

/// The quant tag a GGUF file name carries (`SmolLM2-135M-Instruct-Q4_K_M.gguf` -> `Q4_K_M`,
/// `model.q8_0.gguf` -> `Q8_0`, `x-UD-IQ2_XXS-00001-of-00002.gguf` -> `IQ2_XXS`), upper-cased.
pub fn gguf_quant(file: &str) -> Option<String> {
    let name = base_name(file);
    if !is_gguf(name) {
        return None;
    }
    let stem = match split_part(name) {
        Some((s, _, _)) => s,
        None => &name[..name.len() - 5],
    };
    stem.split(['-', '.'])
        .rev()
        .map(str::to_ascii_uppercase)
        .find(|t| is_quant_tag(t))
}

fn is_quant_tag(t: &str) -> bool {
    if matches!(t, "F16" | "F32" | "BF16" | "FP16" | "FP32" | "F64") || t.starts_with("MXFP4") {
        return true;
    }
    let rest = t
        .strip_prefix("IQ")
        .or_else(|| t.strip_prefix("TQ"))
        .or_else(|| t.strip_prefix('Q'));
    let Some(rest) = rest else { return false };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0
        && rest[digits..].split('_').skip(1).all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        && (rest.len() == digits || rest[digits..].starts_with('_'))
}

/// The GGUF models among `files` (vision projectors `mmproj*` left out), in listing order.
pub(crate) fn gguf_groups(files: &[String]) -> Vec<GgufGroup> {
    let mut groups: Vec<(String, GgufGroup)> = Vec::new();
    for f in files.iter().filter(|f| is_gguf(f)) {
        if base_name(f).to_ascii_lowercase().starts_with("mmproj") {
            continue;
        }
        let (key, total) = match split_part(f) {
            Some((stem, _, total)) => (stem.to_string(), Some(total)),
            None => (f.clone(), None),
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.parts.push(f.clone()),
            None => groups.push((
                key,
                GgufGroup {
                    quant: gguf_quant(f),
                    parts: vec![f.clone()],
                    split_total: total,
                },
            )),
        }
    }
    groups
        .into_iter()
        .map(|(_, mut g)| {
            g.parts.sort();
            g
        })
        .collect()
}

pub(crate) fn labels(groups: &[GgufGroup]) -> String {
    let mut v: Vec<String> = Vec::new();
    for g in groups {
        let l = g.label();
        if !v.contains(&l) {
            v.push(l);
        }
    }
    v.join(", ")
}

/// Pick what of `files` (a repo's or a cached snapshot's file list) makes the model.
pub(crate) fn select(spec: &HubSpec, files: &[String], quant: Option<&str>) -> Result<Selection> {
    let repo = spec.without_quant();
    let groups = gguf_groups(files);
    let top_level = |f: &&String| !f.contains('/');
    let has = |name: &str| files.iter().any(|f| f == name);
    let gguf = |g: &GgufGroup, note: Option<String>| -> Result<Selection> {
        if let Some(total) = g.split_total {
            if g.parts.len() != total as usize {
                bail!(
                    "{repo}: {} is split in {total} parts but {} are there",
                    g.label(),
                    g.parts.len()
                );
            }
        }
        Ok(Selection {
            files: g.parts.clone(),
            kind: SelectionKind::Gguf {
                main: g.parts[0].clone(),
            },
            note,
        })
    };
    if let Some(q) = quant {
        if groups.is_empty() {
            if has("config.json") {
                bail!("{repo} has no GGUF files (a safetensors repo): use {repo} without :{q}");
            }
            bail!("{repo} has no GGUF files, so :{q} names nothing");
        }
        let matched = match_quant(&groups, q);
        return match matched.as_slice() {
            [] => bail!(
                "{repo}: no GGUF for quant {q}; available: {}",
                labels(&groups)
            ),
            [g] => gguf(g, None),
            several => bail!(
                "{repo}: several GGUF files match {q}: {}",
                several
                    .iter()
                    .map(|g| g.parts[0].as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    let mut weights: Vec<String> = files
        .iter()
        .filter(top_level)
        .filter(|f| f.ends_with(".safetensors"))
        .cloned()
        .collect();
    let mut index = "model.safetensors.index.json";
    if weights.is_empty() {
        weights = files
            .iter()
            .filter(top_level)
            .filter(|f| f.starts_with("pytorch_model") && f.ends_with(".bin"))
            .cloned()
            .collect();
        index = "pytorch_model.bin.index.json";
    }
    if has("config.json") && !weights.is_empty() {
        let mut picked: Vec<String> = HF_FILES
            .iter()
            .chain(std::iter::once(&index))
            .filter(|f| has(f))
            .map(|f| f.to_string())
            .collect();
        weights.sort();
        picked.extend(weights);
        return Ok(Selection {
            files: picked,
            kind: SelectionKind::HfDir,
            note: None,
        });
    }
    match groups.as_slice() {
        [] => {
            let mut shown: Vec<&str> = files.iter().take(12).map(String::as_str).collect();
            if files.len() > 12 {
                shown.push("...");
            }
            bail!(
                "{repo} has no model files lwm can load (no .gguf, no config.json with .safetensors or .bin weights); its files: {}",
                if shown.is_empty() { "none".to_string() } else { shown.join(", ") }
            )
        }
        [g] => gguf(g, None),
        several => {
            let def = several
                .iter()
                .filter(|g| g.quant.as_deref() == Some(DEFAULT_QUANT))
                .collect::<Vec<_>>();
            match def.as_slice() {
                [g] => gguf(
                    g,
                    Some(format!(
                        "{repo} has several quants ({}); taking {DEFAULT_QUANT} (name one with {repo}:QUANT)",
                        labels(&groups)
                    )),
                ),
                _ => bail!(
                    "{repo} has several GGUF files; name one with {repo}:QUANT (available: {})",
                    labels(&groups)
                ),
            }
        }
    }
}

/// The GGUF models of `groups` for quant `q`: those whose parsed tag is `q` (any case), else
/// those whose file name carries `q` as a whole word (e.g. `UD-Q4_K_XL`).
pub(crate) fn match_quant<'g>(groups: &'g [GgufGroup], q: &str) -> Vec<&'g GgufGroup> {
    let exact: Vec<&GgufGroup> = groups
        .iter()
        .filter(|g| {
            g.quant
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(q))
        })
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    let ql = q.to_ascii_lowercase();
    groups
        .iter()
        .filter(|g| contains_tag(&base_name(&g.parts[0]).to_ascii_lowercase(), &ql))
        .collect()
}

/// `tag` occurs in `name` delimited by non-alphanumerics (so `q4_k` is not in `x-q4_k_m`).
fn contains_tag(name: &str, tag: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    name.match_indices(tag).any(|(i, _)| {
        !word(name[..i].chars().next_back()) && !word(name[i + tag.len()..].chars().next())
    })
}

/// A path from the hub that may become a file under the snapshot: relative, no `..`.
fn safe_rel_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// A commit or blob name from the hub that becomes a file name: hex/alphanumerics only.
fn safe_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn hub_error(spec: &HubSpec, cfg: &HubConfig, e: anyhow::Error) -> anyhow::Error {
    let repo = spec.without_quant();
    match http_status(&e) {
        Some(401) | Some(403) => e.context(format!(
            "{repo}: access denied by {}: a private or gated repo needs HF_TOKEN (and accepting its terms on the hub)",
            cfg.endpoint
        )),
        Some(404) => e.context(format!("{repo}: no such model repo on {}", cfg.endpoint)),
        _ => e.context(format!("{repo}: cannot list the repo on {}", cfg.endpoint)),
    }
}

/// The repo's current commit and files (sizes and hashes where the tree listing gives them).
fn listing(client: &Client, cfg: &HubConfig, spec: &HubSpec) -> Result<(String, Vec<RemoteFile>)> {
    let repo = spec.without_quant();
    let api = format!("{}/api/models/{}/{}", cfg.endpoint, spec.org, spec.name);
    let info = client
        .get_json(&api, "application/json")
        .map_err(|e| hub_error(spec, cfg, e))?
        .value;
    let commit = info
        .get("sha")
        .and_then(|v| v.as_str())
        .filter(|s| safe_name(s))
        .with_context(|| format!("{api}: malformed model info (no commit `sha`)"))?
        .to_string();
    let siblings = info
        .get("siblings")
        .and_then(|v| v.as_array())
        .with_context(|| format!("{api}: malformed model info (no `siblings` list)"))?;
    let mut files: Vec<RemoteFile> = Vec::new();
    for s in siblings {
        let p = s
            .get("rfilename")
            .and_then(|v| v.as_str())
            .with_context(|| {
                format!("{api}: malformed model info (a sibling without `rfilename`)")
            })?;
        if !safe_rel_path(p) {
            bail!("{api}: refusing the file name {p:?}");
        }
        files.push(RemoteFile {
            path: p.to_string(),
            ..Default::default()
        });
    }
    // Sizes and hashes: the tree listing, page by page.
    let mut url = Some(format!("{api}/tree/{commit}?recursive=true"));
    let mut pages = 0;
    while let Some(u) = url.take() {
        pages += 1;
        if pages > 1000 {
            bail!("{api}: the tree listing does not end");
        }
        let page = match client.get_json(&u, "application/json") {
            Ok(p) => p,
            Err(e) if http_status(&e) == Some(404) && pages == 1 => {
                client.note(&format!(
                    "{repo}: {u} is not served; file sizes and hashes are unknown, only lengths are checked"
                ));
                break;
            }
            Err(e) => return Err(hub_error(spec, cfg, e)),
        };
        let entries = page
            .value
            .as_array()
            .with_context(|| format!("{u}: malformed tree listing (not a list)"))?;
        for e in entries {
            if e.get("type").and_then(|t| t.as_str()) == Some("directory") {
                continue;
            }
            let Some(p) = e.get("path").and_then(|v| v.as_str()) else {
                bail!("{u}: malformed tree listing (an entry without `path`)");
            };
            let lfs = e.get("lfs");
            let sha256 = lfs
                .and_then(|l| l.get("oid").or_else(|| l.get("sha256")))
                .and_then(|v| v.as_str())
                .map(|s| s.trim_start_matches("sha256:").to_ascii_lowercase());
            if sha256.as_ref().is_some_and(|s| !safe_name(s)) {
                bail!("{u}: malformed tree listing (bad sha256 for {p})");
            }
            let size = lfs
                .and_then(|l| l.get("size"))
                .or_else(|| e.get("size"))
                .and_then(|v| v.as_u64());
            let oid = e
                .get("oid")
                .and_then(|v| v.as_str())
                .filter(|s| safe_name(s))
                .map(str::to_string);
            match files.iter_mut().find(|f| f.path == p) {
                Some(f) => {
                    f.size = size;
                    f.oid = oid;
                    f.sha256 = sha256;
                }
                None if safe_rel_path(p) => files.push(RemoteFile {
                    path: p.to_string(),
                    size,
                    oid,
                    sha256,
                }),
                None => bail!("{u}: refusing the file name {p:?}"),
            }
        }
        url = page.next;
    }
    Ok((commit, files))
}

/// Pull `spec` from the hub into the cache (files already there are kept) and return where
/// the model lies. `HF_HUB_OFFLINE` refuses.
pub fn pull(client: &Client, cfg: &HubConfig, spec: &HubSpec) -> Result<ModelLocation> {
    if cfg.offline {
        bail!(
            "{spec}: HF_HUB_OFFLINE is set, so {} is not contacted",
            cfg.endpoint
        );
    }
    let client = client.clone().with_bearer(cfg.token.clone());
    let (commit, files) = listing(&client, cfg, spec)?;
    let names: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    let sel = select(spec, &names, spec.quant.as_deref())?;
    if let Some(n) = &sel.note {
        client.note(n);
    }
    let repo_dir = spec.repo_dir(&cfg.cache);
    let snapshot = repo_dir.join("snapshots").join(&commit);
    for name in &sel.files {
        let f = files
            .iter()
            .find(|f| &f.path == name)
            .expect("selected from this listing");
        fetch_file(&client, cfg, spec, &commit, f, &repo_dir)
            .with_context(|| format!("{}: {} failed", spec.without_quant(), f.path))?;
    }
    let refs = repo_dir.join("refs");
    std::fs::create_dir_all(&refs).with_context(|| format!("cannot create {}", refs.display()))?;
    let tmp = refs.join(format!(".main.{}", std::process::id()));
    std::fs::write(&tmp, &commit).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, refs.join("main"))
        .with_context(|| format!("cannot write {}", refs.join("main").display()))?;
    Ok(match sel.kind {
        SelectionKind::HfDir => ModelLocation::HfDir(snapshot),
        SelectionKind::Gguf { main } => ModelLocation::Gguf(snapshot.join(main)),
    })
}

/// Bring one file into `blobs/` (unless a blob of the right size is there) and link it from
/// the snapshot.
fn fetch_file(
    client: &Client,
    cfg: &HubConfig,
    spec: &HubSpec,
    commit: &str,
    f: &RemoteFile,
    repo_dir: &Path,
) -> Result<()> {
    let blobs = repo_dir.join("blobs");
    let link = repo_dir.join("snapshots").join(commit).join(&f.path);
    let size_ok = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && f.size.is_none_or(|s| m.len() == s))
            .unwrap_or(false)
    };
    if size_ok(&link) {
        return Ok(());
    }
    let url = format!(
        "{}/{}/{}/resolve/{commit}/{}",
        cfg.endpoint,
        spec.org,
        spec.name,
        encode_path(&f.path)
    );
    let blob_name = match f.sha256.clone().or_else(|| f.oid.clone()) {
        Some(b) => {
            let blob = blobs.join(&b);
            if !size_ok(&blob) {
                client.download(&Download {
                    url: &url,
                    dest: &blob,
                    partial: Some(blobs.join(format!("{b}.incomplete"))),
                    size: f.size,
                    sha256: f.sha256.as_deref(),
                    label: &f.path,
                })?;
            }
            b
        }
        None => {
            // No hash listed: download, then name the blob by the sha256 we computed.
            let tmp_name: String = f
                .path
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let tmp = blobs.join(format!(".lwm-{tmp_name}"));
            let got = client.download(&Download {
                url: &url,
                dest: &tmp,
                partial: Some(blobs.join(format!(".lwm-{tmp_name}.incomplete"))),
                size: f.size,
                sha256: None,
                label: &f.path,
            })?;
            std::fs::rename(&tmp, blobs.join(&got.sha256)).with_context(|| {
                format!("cannot move {} into {}", tmp.display(), blobs.display())
            })?;
            got.sha256
        }
    };
    let depth = f.path.matches('/').count();
    let target = format!("{}blobs/{blob_name}", "../".repeat(2 + depth));
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link)
            .with_context(|| format!("cannot replace {}", link.display()))?;
    }
    make_link(&blobs.join(&blob_name), &target, &link)
}

#[cfg(unix)]
fn make_link(_blob: &Path, target: &str, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} -> {target}", link.display()))
}

#[cfg(not(unix))]
fn make_link(blob: &Path, _target: &str, link: &Path) -> Result<()> {
    std::fs::copy(blob, link)
        .map(|_| ())
        .with_context(|| format!("cannot copy {} to {}", blob.display(), link.display()))
}

/// The snapshot `refs/main` names, else the first snapshot there.
pub(crate) fn snapshot_dir(repo_dir: &Path) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    let rev = std::fs::read_to_string(repo_dir.join("refs/main"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| safe_name(s));
    if let Some(r) = rev {
        if snapshots.join(&r).is_dir() {
            return Some(snapshots.join(r));
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.into_iter().next()
}

/// The files under `dir` (relative, `/`-separated; links followed, broken ones left out).
pub(crate) fn walk_files(dir: &Path) -> Vec<String> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<String>, depth: usize) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                if depth < 16 {
                    go(root, &p, out, depth + 1);
                }
            } else if let Ok(rel) = p.strip_prefix(root) {
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out, 0);
    out.sort();
    out
}

/// Find `spec` in the local hub cache (nothing is downloaded): the snapshot `refs/main`
/// names, holding a complete model (a GGUF quant, all parts of a split one, or config.json
/// with its weights and every shard its index names).
pub fn resolve_in_cache(cache: &Path, spec: &HubSpec) -> Result<ModelLocation> {
    let repo_dir = spec.repo_dir(cache);
    let repo = spec.without_quant();
    if !repo_dir.is_dir() {
        bail!(
            "{repo} is not in the local hub cache ({} does not exist)",
            repo_dir.display()
        );
    }
    let snap = snapshot_dir(&repo_dir).with_context(|| {
        format!(
            "{repo} is not in the local hub cache (no snapshots in {})",
            repo_dir.join("snapshots").display()
        )
    })?;
    let files = walk_files(&snap);
    let sel = select(spec, &files, spec.quant.as_deref()).with_context(|| {
        format!(
            "{spec} is not complete in the local hub cache (snapshot {})",
            snap.display()
        )
    })?;
    match sel.kind {
        SelectionKind::Gguf { main } => Ok(ModelLocation::Gguf(snap.join(main))),
        SelectionKind::HfDir => {
            for index in [
                "model.safetensors.index.json",
                "pytorch_model.bin.index.json",
            ] {
                let Ok(text) = std::fs::read_to_string(snap.join(index)) else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: malformed JSON", snap.join(index).display()))?;
                let missing: Vec<&str> = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        let mut shards: Vec<&str> = m.values().filter_map(|s| s.as_str()).collect();
                        shards.sort();
                        shards.dedup();
                        shards
                            .into_iter()
                            .filter(|s| !files.iter().any(|f| f == s))
                            .collect()
                    })
                    .unwrap_or_default();
                if !missing.is_empty() {
                    bail!(
                        "{repo} is not complete in the local hub cache: {} lacks {}",
                        snap.display(),
                        missing.join(", ")
                    );
                }
            }
            Ok(ModelLocation::HfDir(snap))
        }
    }
}

//! Images in chat requests (`image_url` content parts) for LWM vision-language models.
//!
//! Each image is read from a `data:image/png|jpeg;base64,...` URL or, when the server
//! allows a local media directory, from a file under it (`file://` URL or absolute path);
//! checked (PNG or JPEG, at most `MAX_IMAGE_SIDE` pixels a side, read from the header before
//! decoding); preprocessed as the original does (shorter side to the frame size, centre
//! crop) and encoded by the VQGAN. A request's images, in order, are the frames of LWM's
//! vision chat prompt (`lwm_vision::vision_chat::chat_prompt`), the layout `lwm
//! vision-chat` builds, so the API and the CLI give the same answer.

use crate::openai::ApiError;
use anyhow::{Context, Result};
use base64::Engine as _;
use lwm_vision::vqgan::preprocess::{decode_image_within, process_frame};
use lwm_vision::vqgan::Vqgan;
use std::path::{Path, PathBuf};

/// Largest width or height accepted (a small PNG can inflate to gigabytes).
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// One `image_url` content part: where it was (`messages[i].content[j]`) and its URL.
#[derive(Debug, Clone)]
pub struct ImagePart {
    pub param: String,
    pub url: String,
}

/// The VQGAN and the rules for images of one server.
pub struct VisionInput {
    vqgan: Vqgan,
    frame_size: usize,
    /// Local files are read only under this (canonical) directory.
    media_root: Option<PathBuf>,
    pub max_images: usize,
}

impl VisionInput {
    pub fn load(
        vqgan: &Path,
        frame_size: usize,
        media_root: Option<&Path>,
        max_images: usize,
    ) -> Result<Self> {
        let vqgan = Vqgan::open(vqgan)?;
        if frame_size == 0 || !frame_size.is_multiple_of(vqgan.factor) {
            anyhow::bail!(
                "--frame-size {frame_size} is not a multiple of the VQGAN's factor {}",
                vqgan.factor
            );
        }
        let media_root = media_root
            .map(|d| {
                d.canonicalize()
                    .with_context(|| format!("--allowed-media-path {}", d.display()))
            })
            .transpose()?;
        Ok(Self {
            vqgan,
            frame_size,
            media_root,
            max_images,
        })
    }

    /// The VQGAN (also the decoder of generated images).
    pub fn vqgan(&self) -> &Vqgan {
        &self.vqgan
    }

    /// The VQGAN codes of every image, in order (one frame each).
    pub fn encode(&self, parts: &[ImagePart]) -> Result<Vec<Vec<u32>>, ApiError> {
        if parts.len() > self.max_images {
            return Err(ApiError::bad(
                &parts[self.max_images].param,
                format!(
                    "{} images, but this server takes at most {} per request (--max-images)",
                    parts.len(),
                    self.max_images
                ),
            ));
        }
        let s = self.frame_size;
        parts
            .iter()
            .map(|p| {
                let bytes = self.fetch(&p.url).map_err(|m| ApiError::bad(&p.param, m))?;
                let img = decode_image_within(&bytes, MAX_IMAGE_SIDE)
                    .map_err(|e| ApiError::bad(&p.param, format!("{e:#}")))?;
                self.vqgan
                    .encode(&process_frame(&img, s), 1, s, s)
                    .map_err(|e| ApiError::bad(&p.param, format!("cannot encode the image: {e:#}")))
            })
            .collect()
    }

    /// The bytes an image URL names.
    fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        if let Some(rest) = url.strip_prefix("data:") {
            let (meta, data) = rest
                .split_once(',')
                .ok_or("a data: URL needs a ',' before its data")?;
            let mime = meta.split(';').next().unwrap_or_default();
            if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
                return Err(format!(
                    "the data: URL holds '{mime}', not an image/png or image/jpeg"
                ));
            }
            if !meta.split(';').any(|p| p == "base64") {
                return Err("the data: URL must be base64 (data:image/png;base64,...)".into());
            }
            return base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| format!("the data: URL's base64 is invalid: {e}"));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Err(
                "remote image URLs are not fetched; send the image as a data: URL (data:image/png;base64,...)"
                    .into(),
            );
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        let Some(root) = &self.media_root else {
            return Err(
                "local image files are not allowed (start lwm serve with --allowed-media-path DIR); send a data: URL"
                    .into(),
            );
        };
        let path = Path::new(path);
        if !path.is_absolute() {
            return Err(format!("'{}' is not an absolute path", path.display()));
        }
        // Canonical paths, so neither `..` nor a symlink leads outside the directory.
        let real = path
            .canonicalize()
            .map_err(|e| format!("cannot read '{}': {e}", path.display()))?;
        if !real.starts_with(root) {
            return Err(format!(
                "'{}' is outside the allowed media directory {}",
                path.display(),
                root.display()
            ));
        }
        std::fs::read(&real).map_err(|e| format!("cannot read '{}': {e}", path.display()))
    }
}

//! `lwm serve`: the flags of `lwm-server`, the model loaded, then `lwm_server::run`.

use anyhow::Result;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model id clients must use (default: the model file's name without extension).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest prompt accepted, in tokens (default: the context length minus one).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for (also the default when it asks for none).
    #[arg(long, default_value_t = 1024)]
    pub max_tokens_limit: usize,
    /// Requests generated at once (round-robin, one token each per round).
    #[arg(long, default_value_t = 8)]
    pub max_active: usize,
    /// Requests waiting beyond the active ones; more are refused with 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Idle KV caches kept for prompt-prefix reuse.
    #[arg(long, default_value_t = 4)]
    pub prompt_cache: usize,
    /// Most choices (`n`) one request may ask for; each is its own generation.
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (default: the
    /// environment variable LWM_API_KEY, which keeps the key out of `ps`).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Allow browsers on this origin to call the API (CORS); `*` for any, repeat or
    /// comma-separate for several.
    #[arg(long, value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// VQGAN weights for an LWM vision-language model's `image_url` inputs (default: `vqgan`
    /// next to the params, when there).
    #[arg(long)]
    pub vqgan: Option<std::path::PathBuf>,
    /// Frame size fed to the VQGAN (256 for LWM's).
    #[arg(long, default_value_t = 256)]
    pub frame_size: usize,
    /// Images may also be local files under this directory (`file://` URLs); otherwise
    /// only data: URLs.
    #[arg(long)]
    pub allowed_media_path: Option<std::path::PathBuf>,
    /// Most images (video frames) one request may carry.
    #[arg(long, default_value_t = 64)]
    pub max_images: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let engine = a.model.load()?;
    let options = lwm_server::ServerOptions {
        host: a.host,
        port: a.port,
        served_model_name: a.served_model_name,
        max_body_bytes: a.max_body_bytes,
        max_prompt_tokens: a.max_prompt_tokens,
        max_tokens_limit: a.max_tokens_limit,
        max_active: a.max_active,
        max_queue: a.max_queue,
        prompt_cache: a.prompt_cache,
        prefill_chunk: a.model.prefill_chunk,
        max_n: a.max_n,
        api_key: a
            .api_key
            .or_else(|| std::env::var("LWM_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        cors_origins: a.cors_origin,
        vqgan: a.vqgan,
        frame_size: a.frame_size,
        allowed_media_path: a.allowed_media_path,
        max_images: a.max_images,
    };
    lwm_server::run(engine, options)
}

//! `lwm convert`: LWM JAX checkpoint <-> Hugging Face safetensors directory.

use anyhow::{bail, Result};
use clap::Args;
use lwm::convert::{hf_to_jax, jax_to_hf, DEFAULT_CHUNK_BYTES};
use lwm::weights::jax::{load_config, params_path, JaxLayout};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ConvertArgs {
    /// `params::FILE` or a JAX model directory (holding `params`) -> HF; a directory with
    /// `model.safetensors` + `config.json` -> JAX.
    pub input: String,
    /// Output: a directory for HF, a file for JAX.
    #[arg(short, long)]
    pub out: PathBuf,
    /// LWM preset whose theta and context go into config.json (e.g. lwm-chat-1m).
    #[arg(long)]
    pub preset: Option<String>,
    /// RoPE theta for config.json (JAX files carry none; LLaMAConfig's default is 10000).
    #[arg(long)]
    pub theta: Option<f64>,
    /// Context length for config.json.
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// Layer layout of a written JAX file (default: the one recorded, else scanned).
    #[arg(long, value_parser = ["scanned", "unscanned"])]
    pub layout: Option<String>,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    if let Some(params) = params_path(&a.input) {
        let mut config = load_config(&params)?;
        if let Some(p) = &a.preset {
            config.apply_preset(lwm::config::lwm_preset(p)?);
        }
        if let Some(t) = a.theta {
            config.theta = t;
        }
        if let Some(m) = a.max_sequence_length {
            config.max_sequence_length = m;
        }
        eprintln!(
            "converting {} -> {} (Hugging Face layout)",
            params.display(),
            a.out.display()
        );
        jax_to_hf(&params, &config, &a.out)?;
        let tok = params
            .parent()
            .unwrap_or(Path::new("."))
            .join("tokenizer.model");
        if tok.is_file() {
            std::fs::copy(&tok, a.out.join("tokenizer.model"))?;
        }
        println!("{}", a.out.display());
        return Ok(());
    }
    let dir = Path::new(&a.input);
    if dir.join("model.safetensors").is_file() {
        let layout = a.layout.as_deref().map(|l| match l {
            "unscanned" => JaxLayout::Unscanned,
            _ => JaxLayout::Scanned,
        });
        eprintln!(
            "converting {} -> {} (tux streaming params)",
            dir.display(),
            a.out.display()
        );
        hf_to_jax(dir, &a.out, layout, DEFAULT_CHUNK_BYTES)?;
        println!("{}", a.out.display());
        return Ok(());
    }
    bail!(
        "{}: not a JAX checkpoint (params::FILE or a directory with `params`) nor a directory with model.safetensors",
        a.input
    )
}

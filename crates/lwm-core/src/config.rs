//! Model hyper-parameters: one `ModelConfig` for every source (GGUF metadata, Hugging Face
//! `config.json`, LWM presets), plus the `--theta` / `--max-sequence-length` overrides that
//! the original exposed through `update_llama_config`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How RoPE pairs the channels of one head.
///
/// * `Interleaved`: pairs (x[2i], x[2i+1]) — LWM's JAX weights and GGUF `llama` files
///   (llama.cpp's converter permutes Hugging Face q/k rows back to this layout).
/// * `RotateHalf`: pairs (x[i], x[i + D/2]) — Hugging Face `LlamaForCausalLM` weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RopeLayout {
    Interleaved,
    RotateHalf,
}

/// RoPE frequency scaling declared by a model file (`rope_scaling` in HF, `rope.scaling.*` in GGUF).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF "linear").
    Linear {
        factor: f64,
    },
    /// YaRN: low frequencies interpolated by `factor`, high ones kept, a linear ramp between
    /// the dims that turn `beta_fast` and `beta_slow` times over `original_max_position`
    /// tokens; cos/sin scaled by `attention_factor` (default `0.1·ln(factor) + 1`).
    Yarn {
        factor: f64,
        original_max_position: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
    },
    /// Llama 3.1: wavelengths above `original_max_position / low_freq_factor` divided by
    /// `factor`, below `original_max_position / high_freq_factor` kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE base frequency (`theta` in LWM, `rope_theta` in HF, `rope.freq_base` in GGUF).
    pub theta: f64,
    pub rope_layout: RopeLayout,
    pub rope_scaling: RopeScaling,
    /// Longest sequence the model was built for (`max_sequence_length` in LWM).
    pub max_sequence_length: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Vision vocabulary of the LWM vision-language models (0 for text-only models).
    pub vision_vocab_size: usize,
}

/// One row of the original README's model table: theta and context per released model.
#[derive(Debug, Clone, Copy)]
pub struct LwmPreset {
    pub name: &'static str,
    pub theta: f64,
    pub max_sequence_length: usize,
    pub vision: bool,
}

/// Every LWM model in the original README (LLaMA-2 7B shape). Theta is 10M for 128K/256K,
/// 25M for 512K, 50M for 1M and for all vision models.
pub const LWM_PRESETS: &[LwmPreset] = &[
    LwmPreset {
        name: "lwm-text-128k",
        theta: 10_000_000.0,
        max_sequence_length: 131_072,
        vision: false,
    },
    LwmPreset {
        name: "lwm-text-chat-128k",
        theta: 10_000_000.0,
        max_sequence_length: 131_072,
        vision: false,
    },
    LwmPreset {
        name: "lwm-text-256k",
        theta: 10_000_000.0,
        max_sequence_length: 262_144,
        vision: false,
    },
    LwmPreset {
        name: "lwm-text-chat-256k",
        theta: 10_000_000.0,
        max_sequence_length: 262_144,
        vision: false,
    },
    LwmPreset {
        name: "lwm-text-512k",
        theta: 25_000_000.0,
        max_sequence_length: 524_288,
        vision: false,
    },
    LwmPreset {
        name: "lwm-text-chat-512k",
        theta: 25_000_000.0,
        max_sequence_length: 524_288,
        vision: false,
    },
    LwmPreset {
        name: "lwm-text-1m",
        theta: 50_000_000.0,
        max_sequence_length: 1_048_576,
        vision: false,
    },
    LwmPreset {
        name: "lwm-text-chat-1m",
        theta: 50_000_000.0,
        max_sequence_length: 1_048_576,
        vision: false,
    },
    LwmPreset {
        name: "lwm-32k",
        theta: 50_000_000.0,
        max_sequence_length: 32_768,
        vision: true,
    },
    LwmPreset {
        name: "lwm-chat-32k",
        theta: 50_000_000.0,
        max_sequence_length: 32_768,
        vision: true,
    },
    LwmPreset {
        name: "lwm-chat-128k",
        theta: 50_000_000.0,
        max_sequence_length: 131_072,
        vision: true,
    },
    LwmPreset {
        name: "lwm-chat-1m",
        theta: 50_000_000.0,
        max_sequence_length: 1_048_576,
        vision: true,
    },
];

pub fn lwm_preset(name: &str) -> Result<&'static LwmPreset> {
    let key = name.to_ascii_lowercase();
    LWM_PRESETS.iter().find(|p| p.name == key).with_context(|| {
        let names: Vec<_> = LWM_PRESETS.iter().map(|p| p.name).collect();
        format!(
            "unknown preset '{name}'; known presets: {}",
            names.join(", ")
        )
    })
}

impl ModelConfig {
    /// The LLaMA-2 7B shape every released LWM model uses (vocab 32000, no GQA, untied head).
    pub fn llama2_7b() -> Self {
        Self {
            architecture: "llama".into(),
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            theta: 10_000.0,
            rope_layout: RopeLayout::Interleaved,
            rope_scaling: RopeScaling::None,
            max_sequence_length: 4096,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            vision_vocab_size: 0,
        }
    }

    /// Apply an LWM preset's theta and context length (the shape comes from the weights).
    pub fn apply_preset(&mut self, preset: &LwmPreset) {
        self.theta = preset.theta;
        self.max_sequence_length = preset.max_sequence_length;
        if preset.vision && self.vision_vocab_size == 0 {
            self.vision_vocab_size = 8448;
        }
    }

    /// Parse a Hugging Face `config.json` (LlamaForCausalLM and compatible).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            architectures: Vec<String>,
            model_type: Option<String>,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rms_norm_eps: Option<f64>,
            rope_theta: Option<f64>,
            max_position_embeddings: Option<usize>,
            #[serde(default)]
            tie_word_embeddings: bool,
            bos_token_id: Option<serde_json::Value>,
            eos_token_id: Option<serde_json::Value>,
            rope_scaling: Option<serde_json::Value>,
        }
        let hf: Hf =
            serde_json::from_str(text).context("config.json is not a valid LLaMA config")?;
        let model_type = hf.model_type.clone().unwrap_or_default();
        let is_llama =
            model_type == "llama" || hf.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama && !model_type.is_empty() {
            bail!("config.json declares model_type '{model_type}'; only LLaMA-architecture models are supported");
        }
        let heads = hf.num_attention_heads;
        if heads == 0 || (!hf.hidden_size.is_multiple_of(heads) && hf.head_dim.is_none()) {
            bail!(
                "config.json: hidden_size {} is not divisible by num_attention_heads {heads}",
                hf.hidden_size
            );
        }
        let first_id = |v: &Option<serde_json::Value>| -> Option<u32> {
            match v {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
                Some(serde_json::Value::Array(a)) => {
                    a.first().and_then(|x| x.as_u64()).map(|x| x as u32)
                }
                _ => None,
            }
        };
        let rope_scaling =
            parse_hf_rope_scaling(hf.rope_scaling.as_ref(), hf.max_position_embeddings)?;
        let cfg = Self {
            architecture: "llama".into(),
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / heads),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_layout: RopeLayout::RotateHalf,
            rope_scaling,
            max_sequence_length: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: first_id(&hf.bos_token_id),
            eos_token_id: first_id(&hf.eos_token_id),
            vision_vocab_size: 0,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reject shapes the forward pass cannot run, with the offending numbers.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.num_attention_heads == 0 || c.num_key_value_heads == 0 {
            bail!("model config has zero attention heads");
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            bail!(
                "model config: {} attention heads is not a multiple of {} key/value heads",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            bail!(
                "model config: head_dim {} must be even and non-zero for RoPE",
                c.head_dim
            );
        }
        if c.hidden_size == 0
            || c.num_hidden_layers == 0
            || c.vocab_size == 0
            || c.intermediate_size == 0
        {
            bail!("model config has a zero dimension: {c:?}");
        }
        if !(c.theta.is_finite() && c.theta > 1.0) {
            bail!(
                "model config: RoPE theta {} must be a finite number > 1",
                c.theta
            );
        }
        Ok(())
    }

    /// Parameter count of the text transformer (embeddings, layers, norms, head).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let f = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        let vision = 2 * (self.vision_vocab_size as u64) * h;
        v * h + self.num_hidden_layers as u64 * layer + h + head + vision
    }

    /// Bytes of KV cache per token at `bytes_per_elem` (4 for f32, 2 for f16).
    pub fn kv_bytes_per_token(&self, bytes_per_elem: f64) -> f64 {
        (2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim) as f64
            * bytes_per_elem
    }
}

fn parse_hf_rope_scaling(
    v: Option<&serde_json::Value>,
    max_position_embeddings: Option<usize>,
) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let factor = v.get("factor").and_then(|f| f.as_f64());
    let num = |k: &str| v.get(k).and_then(|f| f.as_f64());
    let original = v
        .get("original_max_position_embeddings")
        .and_then(|f| f.as_u64())
        .map(|x| x as usize)
        .or(max_position_embeddings);
    match (kind, factor) {
        ("default", _) => Ok(RopeScaling::None),
        ("linear", Some(factor)) if factor > 0.0 => Ok(RopeScaling::Linear { factor }),
        ("yarn", Some(factor)) if factor > 0.0 && original.is_some() => Ok(RopeScaling::Yarn {
            factor,
            original_max_position: original.unwrap_or_default(),
            beta_fast: num("beta_fast").unwrap_or(32.0),
            beta_slow: num("beta_slow").unwrap_or(1.0),
            attention_factor: num("attention_factor"),
        }),
        ("llama3", Some(factor)) if factor > 0.0 && original.is_some() => Ok(RopeScaling::Llama3 {
            factor,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position: original.unwrap_or_default(),
        }),
        _ => bail!(
            "config.json: rope_scaling {v} is not supported (supported: linear, yarn, llama3)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_lwm_readme_table() {
        assert_eq!(lwm_preset("lwm-text-1m").unwrap().theta, 5e7);
        assert_eq!(lwm_preset("LWM-Text-Chat-512K").unwrap().theta, 2.5e7);
        assert_eq!(
            lwm_preset("lwm-text-256k").unwrap().max_sequence_length,
            262_144
        );
        assert_eq!(lwm_preset("lwm-text-128k").unwrap().theta, 1e7);
        assert!(lwm_preset("lwm-text-2m")
            .unwrap_err()
            .to_string()
            .contains("known presets"));
    }

    #[test]
    fn llama2_7b_parameter_count_matches_the_original() {
        // lwm-facts.md §2: text 7B = 6,738,415,616; vision adds vte and vision_head.
        let mut c = ModelConfig::llama2_7b();
        assert_eq!(c.parameter_count(), 6_738_415_616);
        c.vision_vocab_size = 8448;
        assert_eq!(c.parameter_count(), 6_807_621_632);
    }

    #[test]
    fn hf_config_of_lwm_text_chat_1m() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":32000,
            "hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":32,"rms_norm_eps":1e-6,"rope_theta":5e7,"max_position_embeddings":1048576,
            "bos_token_id":1,"eos_token_id":2,"pad_token_id":0,"rope_scaling":null,"tie_word_embeddings":false}"#;
        let c = ModelConfig::from_hf_json(json).unwrap();
        assert_eq!(c.theta, 5e7);
        assert_eq!(c.max_sequence_length, 1_048_576);
        assert_eq!(c.rope_layout, RopeLayout::RotateHalf);
        assert_eq!(c.head_dim, 128);
    }

    #[test]
    fn bad_hf_configs_are_rejected_with_reasons() {
        let e = ModelConfig::from_hf_json("{").unwrap_err();
        assert!(format!("{e:#}").contains("config.json"));
        let json = r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#;
        let e = ModelConfig::from_hf_json(json).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");
    }

    #[test]
    fn hf_rope_scaling_yarn_and_llama3_are_read() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}"#,
        )
        .unwrap();
        assert_eq!(
            parse_hf_rope_scaling(Some(&v), Some(131072)).unwrap(),
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position: 32768,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: None
            }
        );
        let v: serde_json::Value = serde_json::from_str(
            r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        )
        .unwrap();
        assert!(matches!(
            parse_hf_rope_scaling(Some(&v), None).unwrap(),
            RopeScaling::Llama3 { factor, .. } if factor == 8.0
        ));
        let v: serde_json::Value =
            serde_json::from_str(r#"{"type":"dynamic","factor":2.0}"#).unwrap();
        assert!(parse_hf_rope_scaling(Some(&v), None)
            .unwrap_err()
            .to_string()
            .contains("not supported"));
    }
}

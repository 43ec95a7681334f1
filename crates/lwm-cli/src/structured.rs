//! Structured-output flags of `lwm generate` and `lwm chat`.

use anyhow::{bail, Context, Result};
use clap::Args;
use lwm::constrain::{Constraint, Grammar};
use lwm::generate::Engine;
use std::path::PathBuf;

#[derive(Args, Clone, Default)]
#[command(next_help_heading = "Structured output")]
pub struct StructuredArgs {
    /// Answer with JSON valid under the JSON schema in this file (every token is masked by
    /// the grammar, so the output always parses and validates).
    #[arg(long, conflicts_with_all = ["choices", "regex", "json_object"])]
    pub json_schema: Option<PathBuf>,
    /// Answer with exactly one of these comma-separated strings.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["regex", "json_object"])]
    pub choices: Option<Vec<String>>,
    /// Answer with text matching this regular expression (Rust regex syntax), whole.
    #[arg(long, conflicts_with = "json_object")]
    pub regex: Option<String>,
    /// Answer with any JSON object.
    #[arg(long)]
    pub json_object: bool,
}

impl StructuredArgs {
    pub fn constraint(&self) -> Result<Option<Constraint>> {
        if let Some(path) = &self.json_schema {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let schema = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
            return Ok(Some(Constraint::JsonSchema(schema)));
        }
        if let Some(c) = &self.choices {
            if c.iter().any(|s| s.is_empty()) {
                bail!("--choices: empty choice in {:?}", c.join(","));
            }
            return Ok(Some(Constraint::Choices(c.clone())));
        }
        if let Some(r) = &self.regex {
            return Ok(Some(Constraint::Regex(r.clone())));
        }
        Ok(self.json_object.then_some(Constraint::JsonObject))
    }

    /// Compile against the engine's vocabulary (None without a constraint flag).
    pub fn grammar(&self, engine: &Engine) -> Result<Option<Grammar>> {
        self.constraint()?
            .map(|c| engine.compile_constraint(&c))
            .transpose()
    }
}

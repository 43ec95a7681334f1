//! Structured output: a grammar (JSON schema, `{"type":"object"}`, a list of choices, a
//! regex) compiled by llguidance against our vocabulary; at every decoding step it gives
//! the set of tokens that keep the output a prefix of some string in the language, and the
//! sampler only draws from that set. End-of-generation is allowed only once the output is
//! complete, so a finished answer always parses (and validates against the schema).

use anyhow::{anyhow, bail, Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory, TokenParser};
mod unique;
use lwm_core::tokenizer::Tokenizer;
use serde_json::Value;
use std::sync::Arc;
use unique::{take_unique_items, UniqueSpec, UniqueTracker};

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON value valid under this JSON schema.
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `response_format: json_object`).
    JsonObject,
    /// Exactly one of these strings.
    Choices(Vec<String>),
    /// A string matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// A grammar in llguidance's Lark syntax (see [`tool_call_grammar`]).
    Lark(String),
}

/// Whether the model must call a tool or may answer in text instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolMode {
    /// Exactly one tool call.
    Required,
    /// Text, or exactly one tool call.
    Auto,
}

/// The grammar of a Hermes-style tool call, `<tool_call>{"name": ..., "arguments": {...}}
/// </tool_call>`, over `tools` (name, JSON schema of the arguments): the arguments always
/// parse and match the named tool's schema. With [`ToolMode::Auto`] the output may instead be
/// plain text that does not start with `<` or whitespace (so a call cannot hide in "text").
pub fn tool_call_grammar(tools: &[(String, Value)], mode: ToolMode) -> Result<Constraint> {
    if tools.is_empty() {
        bail!("tool calls: give at least one tool");
    }
    for (name, params) in tools {
        let mut p = params.clone();
        if !take_unique_items(&mut p)?.is_empty() {
            bail!("tool '{name}': uniqueItems is enforced in response_format schemas, not in tool parameters");
        }
    }
    let alternatives: Vec<Value> = tools
        .iter()
        .map(|(name, params)| {
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = compact_json(serde_json::json!({"anyOf": alternatives}));
    let call = format!("call: \"<tool_call>\" %json {schema} \"</tool_call>\"\n");
    Ok(Constraint::Lark(match mode {
        ToolMode::Required => format!("start: call\n{call}"),
        ToolMode::Auto => format!("start: TEXT | call\n{call}TEXT: /[^<\\s](.|\\n)*/\n"),
    }))
}

impl Constraint {
    /// The grammar for llguidance, and the `uniqueItems` rules it cannot express (enforced
    /// by `GrammarState` on top of its mask).
    fn top_level(&self) -> Result<(TopLevelGrammar, UniqueSpec)> {
        let mut unique = UniqueSpec::default();
        let grammar = match self {
            Constraint::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    bail!("a JSON schema must be an object (or true/false), got {schema}");
                }
                let mut schema = schema.clone();
                unique = take_unique_items(&mut schema)?;
                TopLevelGrammar::from_json_schema(compact_json(schema))
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(compact_json(
                serde_json::json!({"type": "object"}),
            )),
            Constraint::Choices(choices) => {
                if choices.is_empty() {
                    bail!("choices: give at least one choice");
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex_escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Constraint::Regex(rx) => {
                if rx.is_empty() {
                    bail!("regex: the pattern is empty");
                }
                TopLevelGrammar::from_regex(rx)
            }
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        Ok((grammar, unique))
    }
}

/// Whitespace between JSON tokens is fixed (", " and ": ") unless the schema says otherwise
/// through llguidance's `x-guidance` key: with flexible whitespace a small model can spend
/// its whole budget on newlines and never close the object.
fn compact_json(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
        });
    }
    schema
}

/// Escape regex meta characters so a choice is matched literally.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The vocabulary as llguidance sees it (a byte trie over every token id) and the grammar
/// compiler built on it. Building it walks the whole vocabulary once: do it once per model.
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    eos_id: u32,
    /// Each token's bytes (what `uniqueItems` checks read).
    words: Arc<Vec<Vec<u8>>>,
}

impl GrammarCompiler {
    /// `vocab_size` is the model's logit count (it may exceed the tokenizer's; the extra ids
    /// are never allowed). The end-of-generation token the grammar allows once the output is
    /// complete is the end-of-turn token when the tokenizer has one, else EOS.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self> {
        let eos_id = tokenizer.eot_id().or(tokenizer.eos_id()).context(
            "structured output needs an end-of-generation token; the tokenizer has none",
        )?;
        let n_tok = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                if id as usize >= n_tok {
                    return Vec::new();
                }
                let bytes = tokenizer.token_bytes(id);
                // Special tokens are never produced as text: llguidance recognises them by
                // this marker byte and keeps them out of every mask (EOS aside).
                if tokenizer.is_special(id) || id == eos_id {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(&bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let plain: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                if (id as usize) < n_tok {
                    tokenizer.token_bytes(id)
                } else {
                    Vec::new()
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab_size as u32, eos_id);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| anyhow!("structured output: cannot index the vocabulary: {e}"))?;
        factory.set_stderr_log_level(0);
        Ok(Self {
            factory: Arc::new(factory),
            eos_id,
            words: Arc::new(plain),
        })
    }

    /// Compile a constraint; an invalid schema or regex fails here with llguidance's message.
    pub fn compile(&self, constraint: &Constraint) -> Result<Grammar> {
        let (grammar, unique) = constraint.top_level()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| anyhow!("invalid {}: {e}", constraint.kind()))?;
        let grammar = Grammar {
            parser,
            eos_id: self.eos_id,
            unique: Arc::new(unique),
            words: self.words.clone(),
        };
        // A grammar that matches nothing (a schema that only refers to itself, `{"$ref":
        // "#"}`) compiles, but allows no first token: refuse it here, as the caller's error,
        // rather than fail the generation's first step (the server's 500).
        grammar.start().allowed(self.words.len()).map_err(|e| {
            let why = format!("{e:#}");
            let why = why.lines().next().unwrap_or_default();
            anyhow!(
                "invalid {}: no output can match it ({why})",
                constraint.kind()
            )
        })?;
        Ok(grammar)
    }
}

impl Constraint {
    fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::JsonObject => "json_object grammar",
            Constraint::Choices(_) => "choices",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "grammar",
        }
    }
}

/// A compiled grammar, ready to constrain one generation (clone it for each).
pub struct Grammar {
    parser: TokenParser,
    eos_id: u32,
    unique: Arc<UniqueSpec>,
    words: Arc<Vec<Vec<u8>>>,
}

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Self {
            parser: self.parser.deep_clone(),
            eos_id: self.eos_id,
            unique: self.unique.clone(),
            words: self.words.clone(),
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Grammar {
    /// Start matching from the beginning of the output.
    pub fn start(&self) -> GrammarState {
        GrammarState {
            matcher: Matcher::new(Ok(self.parser.deep_clone())),
            allowed: Vec::new(),
            eos_id: self.eos_id,
            unique: self.unique.clone(),
            words: self.words.clone(),
            tracker: UniqueTracker::default(),
        }
    }
}

/// The grammar's position in one generation.
pub struct GrammarState {
    matcher: Matcher,
    allowed: Vec<bool>,
    eos_id: u32,
    unique: Arc<UniqueSpec>,
    words: Arc<Vec<Vec<u8>>>,
    tracker: UniqueTracker,
}

impl GrammarState {
    /// Tokens allowed next, one flag per logit (`n_vocab` of them). Once the output is
    /// complete and nothing more may follow, only the end-of-generation token is allowed.
    pub fn allowed(&mut self, n_vocab: usize) -> Result<&[bool]> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| anyhow!("structured output: {e}"))?;
        self.allowed.clear();
        self.allowed
            .extend((0..n_vocab).map(|id| mask.is_allowed(id as u32)));
        if !self.unique.is_empty() && self.tracker.active() {
            for (id, ok) in self.allowed.iter_mut().enumerate() {
                if *ok && id as u32 != self.eos_id {
                    let bytes = self.words.get(id).map_or(&[][..], |w| w.as_slice());
                    *ok = self.tracker.allows(&self.unique, bytes);
                }
            }
        }
        if !self.allowed.iter().any(|&a| a) {
            bail!("structured output: the grammar allows no token here");
        }
        Ok(&self.allowed)
    }

    /// Advance past a sampled token (not called for the end-of-generation token).
    pub fn consume(&mut self, id: u32) -> Result<()> {
        self.matcher
            .consume_token(id)
            .map_err(|e| anyhow!("structured output: token {id} rejected: {e}"))?;
        if !self.unique.is_empty() {
            let bytes = self
                .words
                .get(id as usize)
                .map_or(&[][..], |w| w.as_slice());
            self.tracker.feed(&self.unique, bytes);
        }
        Ok(())
    }

    /// True when the output is complete and nothing may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_makes_choices_literal() {
        assert_eq!(regex_escape("a.b|c"), "a\\.b\\|c");
        assert_eq!(regex_escape("plain"), "plain");
    }

    #[test]
    fn compact_json_keeps_explicit_options() {
        let s =
            compact_json(serde_json::json!({"type": "object", "x-guidance": {"lenient": true}}));
        assert_eq!(s["x-guidance"], serde_json::json!({"lenient": true}));
        let s = compact_json(serde_json::json!({"type": "object"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
    }
}

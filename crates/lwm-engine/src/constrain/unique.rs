//! `uniqueItems` for structured output. llguidance does not implement it, so the schema
//! reaches llguidance without it and the rule is enforced here, on top of the grammar's
//! mask: a token is refused when it would complete an array item equal to an earlier one,
//! or (for arrays of enum strings) when the item it leaves open can no longer become an
//! unused value, so the generation can never paint itself into a corner.
//!
//! Supported: arrays of strings (an `enum` or `const` of strings, or `"type": "string"`)
//! reached from the root through `properties` and `items`: the "tag a document with unique
//! tags from a list" case. `uniqueItems: true` anywhere else is an error, never ignored.

use anyhow::{bail, Result};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(Vec<u8>),
    Item,
}

/// What the items of a unique array may be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Items {
    /// One of these strings (JSON-escaped, without quotes).
    Enum(Vec<Vec<u8>>),
    /// Any string.
    Text,
}

/// The unique arrays of a schema, by their path from the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UniqueSpec {
    arrays: Vec<(Vec<Step>, Items)>,
}

impl UniqueSpec {
    pub fn is_empty(&self) -> bool {
        self.arrays.is_empty()
    }
}

fn escaped(s: &str) -> Vec<u8> {
    let q = Value::String(s.to_string()).to_string();
    q.as_bytes()[1..q.len() - 1].to_vec()
}

/// Take `uniqueItems` out of `schema` (llguidance refuses the key) and return what must be
/// enforced; `uniqueItems: true` where it cannot be enforced is an error naming the place.
pub fn take_unique_items(schema: &mut Value) -> Result<UniqueSpec> {
    let mut spec = UniqueSpec::default();
    walk(schema, &mut Vec::new(), &mut spec)?;
    if let Some(place) = find_unique(schema, "#") {
        bail!(
            "uniqueItems is enforced only on arrays of strings reached through 'properties' \
             and 'items' (found at {place})"
        );
    }
    Ok(spec)
}

fn walk(node: &mut Value, path: &mut Vec<Step>, spec: &mut UniqueSpec) -> Result<()> {
    let Value::Object(m) = node else {
        return Ok(());
    };
    match m.get("uniqueItems") {
        Some(Value::Bool(true)) => {
            let place = describe(path);
            let items = m.get("items").ok_or_else(|| {
                anyhow::anyhow!("uniqueItems at {place} needs an 'items' schema of strings")
            })?;
            let strings = |v: &Value| -> Option<Vec<Vec<u8>>> {
                v.as_array()?
                    .iter()
                    .map(|x| x.as_str().map(escaped))
                    .collect()
            };
            let kind = if let Some(e) = items.get("enum") {
                Items::Enum(strings(e).ok_or_else(|| {
                    anyhow::anyhow!(
                        "uniqueItems at {place}: the items' enum must hold only strings"
                    )
                })?)
            } else if let Some(Value::String(c)) = items.get("const") {
                Items::Enum(vec![escaped(c)])
            } else if items.get("type").and_then(Value::as_str) == Some("string") {
                Items::Text
            } else {
                bail!(
                    "uniqueItems at {place} is enforced only for items that are strings \
                     (an enum, a const or \"type\": \"string\")"
                );
            };
            spec.arrays.push((path.clone(), kind));
            m.remove("uniqueItems");
        }
        Some(Value::Bool(false)) => {
            m.remove("uniqueItems");
        }
        Some(v) => bail!("uniqueItems must be a boolean, got {v}"),
        None => {}
    }
    if let Some(Value::Object(props)) = m.get_mut("properties") {
        for (k, v) in props.iter_mut() {
            path.push(Step::Key(escaped(k)));
            walk(v, path, spec)?;
            path.pop();
        }
    }
    if let Some(items @ Value::Object(_)) = m.get_mut("items") {
        path.push(Step::Item);
        walk(items, path, spec)?;
        path.pop();
    }
    Ok(())
}

fn describe(path: &[Step]) -> String {
    let mut s = String::from("#");
    for p in path {
        match p {
            Step::Key(k) => {
                s.push('/');
                s.push_str(&String::from_utf8_lossy(k));
            }
            Step::Item => s.push_str("/[]"),
        }
    }
    s
}

/// A `uniqueItems: true` left anywhere (under anyOf, $defs, ...), as a JSON pointer.
fn find_unique(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::Object(m) => {
            if m.get("uniqueItems") == Some(&Value::Bool(true)) {
                return Some(at.to_string());
            }
            m.iter()
                .find_map(|(k, v)| find_unique(v, &format!("{at}/{k}")))
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_unique(v, &format!("{at}/{i}"))),
        _ => None,
    }
}

#[derive(Debug, Clone)]
enum Frame {
    Object {
        key: Option<Vec<u8>>,
        expect_key: bool,
    },
    Array {
        /// The unique-array rule of this array, if any (index into the spec).
        unique: Option<usize>,
        items: Vec<Vec<u8>>,
        /// Just past a ',' : an item must follow.
        after_comma: bool,
    },
}

/// Where the output stands in its JSON, byte by byte (the grammar guarantees it is valid
/// JSON so far; this only follows the nesting, the keys and the strings).
#[derive(Debug, Clone, Default)]
pub struct UniqueTracker {
    stack: Vec<Frame>,
    in_string: bool,
    escape: bool,
    string_is_key: bool,
    current: Vec<u8>,
}

impl UniqueTracker {
    fn path(&self) -> Vec<Step> {
        let mut p = Vec::new();
        for f in &self.stack {
            match f {
                Frame::Object { key, .. } => p.push(Step::Key(key.clone().unwrap_or_default())),
                Frame::Array { .. } => p.push(Step::Item),
            }
        }
        p
    }

    /// True while the output is inside a unique array: only then can a token break the rule.
    pub fn active(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame::Array {
                unique: Some(_),
                ..
            })
        )
    }

    /// Feed bytes; false if they break the rule.
    pub fn feed(&mut self, spec: &UniqueSpec, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    self.current.push(b);
                } else if b == b'\\' {
                    self.escape = true;
                    self.current.push(b);
                } else if b == b'"' {
                    self.in_string = false;
                    let s = std::mem::take(&mut self.current);
                    match self.stack.last_mut() {
                        Some(Frame::Object { key, .. }) if self.string_is_key => *key = Some(s),
                        Some(Frame::Array {
                            unique: Some(_),
                            items,
                            ..
                        }) => {
                            if items.contains(&s) {
                                return false;
                            }
                            items.push(s);
                        }
                        _ => {}
                    }
                } else {
                    self.current.push(b);
                }
                continue;
            }
            match b {
                b'{' => self.stack.push(Frame::Object {
                    key: None,
                    expect_key: true,
                }),
                b'[' => {
                    // The array sits at the parent's key or item position: the path so far.
                    let path = self.path();
                    let unique = spec.arrays.iter().position(|(p, _)| *p == path);
                    self.stack.push(Frame::Array {
                        unique,
                        items: Vec::new(),
                        after_comma: false,
                    });
                }
                b'}' | b']' => {
                    self.stack.pop();
                }
                b'"' => {
                    self.in_string = true;
                    self.string_is_key = matches!(
                        self.stack.last(),
                        Some(Frame::Object {
                            expect_key: true,
                            ..
                        })
                    );
                    if let Some(Frame::Array { after_comma, .. }) = self.stack.last_mut() {
                        *after_comma = false;
                    }
                }
                b':' => {
                    if let Some(Frame::Object { expect_key, .. }) = self.stack.last_mut() {
                        *expect_key = false;
                    }
                }
                b',' => match self.stack.last_mut() {
                    Some(Frame::Object { expect_key, .. }) => *expect_key = true,
                    Some(Frame::Array { after_comma, .. }) => *after_comma = true,
                    None => {}
                },
                _ => {}
            }
        }
        true
    }

    /// After a token: can the open item (if any) of a unique enum array still become a value
    /// not used yet?
    fn can_finish(&self, spec: &UniqueSpec) -> bool {
        let Some(Frame::Array {
            unique: Some(u),
            items,
            after_comma,
        }) = self.stack.last()
        else {
            return true;
        };
        let Items::Enum(values) = &spec.arrays[*u].1 else {
            return true;
        };
        let open = if self.in_string {
            Some(self.current.as_slice())
        } else if *after_comma {
            Some(&[][..])
        } else {
            None
        };
        match open {
            None => true,
            Some(prefix) => values
                .iter()
                .any(|v| v.starts_with(prefix) && !items.contains(v)),
        }
    }

    /// Would these bytes keep the rule (no duplicate, no dead end)?
    pub fn allows(&self, spec: &UniqueSpec, bytes: &[u8]) -> bool {
        let mut t = self.clone();
        t.feed(spec, bytes) && t.can_finish(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags_schema() -> Value {
        serde_json::json!({"type": "object", "properties": {
            "tags": {"type": "array", "items": {"enum": ["sports", "science", "music"]}, "uniqueItems": true},
            "notes": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
            "free": {"type": "array", "items": {"type": "string"}}
        }})
    }

    #[test]
    fn strips_the_key_and_finds_the_arrays() {
        let mut s = tags_schema();
        let spec = take_unique_items(&mut s).unwrap();
        assert_eq!(spec.arrays.len(), 2);
        assert!(!s.to_string().contains("uniqueItems"));
        let mut bad = serde_json::json!({"anyOf": [{"type": "array", "uniqueItems": true}]});
        assert!(take_unique_items(&mut bad).is_err());
        let mut bad =
            serde_json::json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true});
        assert!(take_unique_items(&mut bad).is_err());
    }

    #[test]
    fn refuses_duplicates_and_dead_ends() {
        let mut s = tags_schema();
        let spec = take_unique_items(&mut s).unwrap();
        let mut t = UniqueTracker::default();
        assert!(t.feed(&spec, br#"{"tags": ["sports", "sc"#));
        assert!(t.active());
        assert!(t.allows(&spec, b"ience\""));
        assert!(t.feed(&spec, b"ience\", "));
        // "s" may still become nothing new once sports and science are used...
        assert!(!t.allows(&spec, b"\"s"));
        assert!(!t.allows(&spec, b"\"sports\""));
        assert!(t.allows(&spec, b"\"mu"));
        assert!(t.feed(&spec, b"\"music\""));
        // ...and with every value used, no further item may start.
        assert!(!t.allows(&spec, b", "));
        assert!(t.allows(&spec, b"]"));
        assert!(t.feed(&spec, br#"], "notes": ["a\"b", "#));
        assert!(!t.allows(&spec, br#""a\"b""#));
        assert!(t.allows(&spec, br#""a\"bc""#));
        assert!(t.feed(&spec, br#""x"], "free": ["#));
        assert!(!t.active());
        assert!(t.feed(&spec, br#""x", "x"]}"#));
    }
}

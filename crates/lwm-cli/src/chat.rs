//! The interactive side of `lwm chat`: where turns come from (line editing and history on
//! a terminal, plain lines from a pipe) and the slash commands.

use anyhow::{bail, Context, Result};
use lwm::chat_template::ChatMessage;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

pub const HELP: &str = "commands: /clear (forget the conversation), /save FILE, /load FILE (the conversation as JSON), /exit; an empty line or Ctrl-D quits";

/// Where chat turns come from.
pub enum Lines {
    /// A terminal: rustyline's editing, with history kept in `$LWM_HOME/chat_history`.
    Editor(Box<rustyline::DefaultEditor>, Option<PathBuf>),
    /// A pipe or file: one turn per line.
    Stdin,
}

impl Lines {
    pub fn open() -> Self {
        if !std::io::stdin().is_terminal() {
            return Lines::Stdin;
        }
        match rustyline::DefaultEditor::new() {
            Ok(mut ed) => {
                let history = lwm::model_source::lwm_home().join("chat_history");
                let _ = ed.load_history(&history);
                Lines::Editor(Box::new(ed), Some(history))
            }
            Err(e) => {
                tracing::warn!("no line editing ({e}); reading plain lines");
                Lines::Stdin
            }
        }
    }

    /// The next line without its newline; `None` at end of input (Ctrl-D) or Ctrl-C.
    pub fn next(&mut self, prompt: &str) -> Result<Option<String>> {
        match self {
            Lines::Editor(ed, history) => match ed.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = ed.add_history_entry(line.as_str());
                        if let Some(h) = history {
                            if let Some(dir) = h.parent() {
                                let _ = std::fs::create_dir_all(dir);
                            }
                            let _ = ed.save_history(h);
                        }
                    }
                    Ok(Some(line))
                }
                Err(
                    rustyline::error::ReadlineError::Eof
                    | rustyline::error::ReadlineError::Interrupted,
                ) => Ok(None),
                Err(e) => Err(e).context("reading the chat input"),
            },
            Lines::Stdin => {
                eprint!("{prompt}");
                let mut line = String::new();
                if std::io::stdin().lock().read_line(&mut line)? == 0 {
                    return Ok(None);
                }
                Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
            }
        }
    }
}

/// A line that starts with `/`.
#[derive(Debug, PartialEq, Eq)]
pub enum Slash {
    Clear,
    Save(PathBuf),
    Load(PathBuf),
    Exit,
    Help,
    /// Unknown, or missing its argument: the text to print.
    Bad(String),
}

pub fn parse(line: &str) -> Option<Slash> {
    let line = line.trim();
    let rest = line.strip_prefix('/')?;
    let (cmd, arg) = match rest.split_once(char::is_whitespace) {
        Some((c, a)) => (c, a.trim()),
        None => (rest, ""),
    };
    let file = |make: fn(PathBuf) -> Slash| {
        if arg.is_empty() {
            Slash::Bad(format!("/{cmd} needs a file name"))
        } else {
            make(PathBuf::from(arg))
        }
    };
    Some(match cmd {
        "clear" => Slash::Clear,
        "save" => file(Slash::Save),
        "load" => file(Slash::Load),
        "exit" | "quit" | "bye" => Slash::Exit,
        "help" | "?" => Slash::Help,
        other => Slash::Bad(format!("unknown command /{other}")),
    })
}

/// Write the conversation as a JSON list of `{role, content}`.
pub fn save(path: &Path, messages: &[ChatMessage]) -> Result<()> {
    let text = serde_json::to_string_pretty(messages)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Read a conversation written by [`save`] (or any JSON list of `{role, content}`).
pub fn load(path: &Path) -> Result<Vec<ChatMessage>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let messages: Vec<ChatMessage> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a conversation (a JSON list of {{\"role\", \"content\"}})",
            path.display()
        )
    })?;
    for m in &messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            bail!("{}: unknown role '{}'", path.display(), m.role);
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slash_commands_parse_and_bad_ones_say_why() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse(" /clear "), Some(Slash::Clear));
        assert_eq!(
            parse("/save a b.json"),
            Some(Slash::Save("a b.json".into()))
        );
        assert_eq!(parse("/load x"), Some(Slash::Load("x".into())));
        assert_eq!(parse("/quit"), Some(Slash::Exit));
        assert_eq!(
            parse("/save"),
            Some(Slash::Bad("/save needs a file name".into()))
        );
        assert!(matches!(parse("/nope"), Some(Slash::Bad(m)) if m.contains("/nope")));
    }

    #[test]
    fn a_saved_conversation_loads_back_and_a_bad_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("lwm-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.json");
        let m = vec![ChatMessage::system("s"), ChatMessage::user("u")];
        save(&p, &m).unwrap();
        assert_eq!(load(&p).unwrap(), m);
        std::fs::write(&p, r#"[{"role":"robot","content":"x"}]"#).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("robot"));
        std::fs::write(&p, "{").unwrap();
        assert!(load(&p)
            .unwrap_err()
            .to_string()
            .contains("not a conversation"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The errors a caller may want to tell apart (the server maps them to HTTP statuses).
//! Functions return `anyhow::Result` with one of these at the root where the cause is
//! the request or the machine rather than a bug or a broken file; find it with
//! `err.downcast_ref::<lwm::Error>()`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt} tokens but the context is {context}; shorten it or raise --max-sequence-length"
    )]
    ContextExceeded { prompt: usize, context: usize },
    /// The run would not fit in the memory left (the message has the plan's figures).
    #[error("{0}")]
    OutOfMemory(String),
    /// A parameter out of range or inconsistent (sampling settings, a grammar).
    #[error("{0}")]
    InvalidRequest(String),
}

impl Error {
    /// The `lwm::Error` at the root of `err`, if any.
    pub fn of(err: &anyhow::Error) -> Option<&Error> {
        err.chain().find_map(|e| e.downcast_ref::<Error>())
    }
}

//! `lwm-engine`: a loaded model producing text — the engine and its one generation state
//! machine (`generate`), sampling, grammar constraints (`constrain`), chat templates, the
//! prompt cache, where models come from (`model_source`) and how they are downloaded (`pull`),
//! and RingAttention over threads or MPI processes (`ring`), all on `lwm-core`.

pub mod chat_template;
pub mod constrain;
pub mod generate;
pub mod location;
pub mod model_source;
pub mod prompt_cache;
pub mod pull;
pub mod ring;
pub mod sampling;

//! Training: blockwise attention with a blockwise backward (`attention_grad`), a trainable
//! LLaMA matching the inference forward (`model`), packed data with segment ids (`data`,
//! `packing`), loss weighting, the optimizer loop, and the sequence split over a ring of
//! threads (`ring_grad`) or processes (`seq_parallel`).

pub mod attention_grad;
pub mod attention_kernel;
pub mod attention_rows;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod loss;
pub mod model;
pub mod optim;
pub mod packing;
pub mod precision;
pub mod ring_grad;
pub mod run;
pub mod schedule;
pub mod seq_parallel;

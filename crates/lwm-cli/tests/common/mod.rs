//! Helpers shared by the CLI test binaries: run the built `lwm`, find the default model.
#![allow(dead_code)] // each test binary uses its own subset

use std::process::{Command, Output};

/// Run the `lwm` binary under test with `args`, capturing its output.
pub fn lwm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args(args)
        .output()
        .expect("run lwm")
}

/// The default model's path (`LWM_DEFAULT_MODEL` or the cache), or `None` with a note so
/// the test can skip when it was never fetched.
pub fn default_model() -> Option<String> {
    if let Ok(p) = std::env::var("LWM_DEFAULT_MODEL") {
        return Some(p);
    }
    let p = lwm::model_source::default_model_path();
    if p.exists() {
        Some(p.display().to_string())
    } else {
        eprintln!("note: default model missing (run `lwm fetch default`); skipping");
        None
    }
}

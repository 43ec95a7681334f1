#![allow(dead_code)] // not every target uses every helper
// Shared by the targets (`#[path]`-included): a per-process scratch directory on tmpfs
// where the input is written for the entry points that take a path.
use std::path::PathBuf;

pub fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("lwm-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh, empty scratch directory for one input.
pub fn fresh_dir() -> PathBuf {
    let dir = scratch().join("in");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

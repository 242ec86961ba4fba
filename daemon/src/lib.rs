//! trellis-rs: Microsoft TRELLIS (image/text → 3D through structured 3D latents) in Rust.
//!
//! Follow one request: [`cli`] (or the daemon server) → [`hub`] resolves the model repository →
//! [`pipelines`] run conditioner → sparse-structure flow → structure decoder → SLat flow → SLat
//! decoders ([`models`], built from [`modules`] and the `trellis-kernels` crate) → [`representations`]
//! → [`export`]. [`runtime`] owns devices, precision and weight loading; [`parity`] proves each
//! network matches the original PyTorch code.

pub mod bench;
pub mod cli;
pub mod client;
pub mod export;
pub mod hub;
pub mod jobs;
pub mod models;
pub mod modules;
pub mod parity;
pub mod pipelines;
pub mod representations;
pub mod runtime;
pub mod server;
pub mod tiny_repos;

use std::path::PathBuf;

/// The reference fixture directory: `$TRELLIS_REFERENCE_DIR`, else `../shared/reference` next to
/// the repository (the layout of a checkout and of CI).
pub fn reference_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TRELLIS_REFERENCE_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference")
}

/// [`reference_dir`] when it holds a fixture set (its `README.md`); otherwise `None`, after telling
/// the terminal that `what` was skipped and why. The note is written to stderr directly, past the
/// test harness's output capture, so a passing `cargo test` still shows what did not run.
pub fn reference_dir_or_skip(what: &str) -> Option<PathBuf> {
    let dir = reference_dir();
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "note: skipped {what}: no reference fixture set at {} (put ../shared/reference beside the \
         repository or set TRELLIS_REFERENCE_DIR)",
        dir.display()
    );
    None
}

/// The tiny model repositories for tests ([`tiny_repos::cached`] under the system's temporary
/// folder): generated from seeded random weights on first use, so no fixture set is needed.
pub fn test_tiny_repos() -> tiny_repos::TinyRepos {
    let parent = std::env::temp_dir().join("trellis-rs-tiny-repos");
    match tiny_repos::cached(&parent) {
        Ok(r) => r,
        Err(e) => panic!(
            "writing the tiny repositories under {}: {e:#}",
            parent.display()
        ),
    }
}

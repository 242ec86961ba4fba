//! trellis-rs: Microsoft TRELLIS (image/text → 3D through structured 3D latents) in Rust.
//!
//! Follow one request: [`cli`] (or the daemon server) → [`hub`] resolves the model repository →
//! [`pipelines`] run conditioner → sparse-structure flow → structure decoder → SLat flow → SLat
//! decoders ([`models`], built from [`modules`] and the `trellis-kernels` crate) → [`representations`]
//! → [`export`]. [`runtime`] owns devices, precision and weight loading; [`parity`] proves each
//! network matches the original PyTorch code.

pub mod bench;
pub mod cli;
pub mod export;
pub mod hub;
pub mod models;
pub mod modules;
pub mod parity;
pub mod pipelines;
pub mod postprocessing;
pub mod representations;
pub mod runtime;

use std::path::PathBuf;

/// The reference fixture directory: `$TRELLIS_REFERENCE_DIR`, else `../shared/reference` next to
/// the repository (the layout of a checkout and of CI).
pub fn reference_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TRELLIS_REFERENCE_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference")
}

//! Parity of whole pipeline runs (samplers, multi-image modes, text, variants, voxelisation).

use anyhow::Result;

use super::{Fixture, Outcome};

pub const KINDS: &[&str] = &["pipelines"];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    Ok(Outcome::Skipped(format!(
        "{} is not implemented yet",
        fx.kind
    )))
}

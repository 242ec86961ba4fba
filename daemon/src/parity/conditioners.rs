//! Parity of the conditioners (DINOv2 with registers, CLIP text) and image preprocessing.

use anyhow::Result;

use super::{Fixture, Outcome};

pub const KINDS: &[&str] = &[
    "conditioner:dinov2_with_registers",
    "conditioner:clip_text",
    "preprocess:image",
];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    Ok(Outcome::Skipped(format!(
        "{} is not implemented yet",
        fx.kind
    )))
}

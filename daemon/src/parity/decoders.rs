//! Parity of the SLat decoders and their representations (Gaussians, radiance field, mesh).

use anyhow::Result;

use super::{Fixture, Outcome};

pub const KINDS: &[&str] = &[
    "model:SLatGaussianDecoder",
    "model:SLatRadianceFieldDecoder",
    "model:SLatMeshDecoder",
];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    Ok(Outcome::Skipped(format!(
        "{} is not implemented yet",
        fx.kind
    )))
}

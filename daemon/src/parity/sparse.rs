//! Parity of the sparse core: sparse conv, spatial ops, sparse attention, SLat flow and encoder.

use anyhow::Result;

use super::{Fixture, Outcome};

pub const KINDS: &[&str] = &[
    "module:SparseConv3d",
    "module:sparse_spatial",
    "module:SparseMultiHeadAttention",
    "model:SLatFlowModel",
    "model:SLatEncoder",
];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    Ok(Outcome::Skipped(format!(
        "{} is not implemented yet",
        fx.kind
    )))
}

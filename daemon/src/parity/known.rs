//! Checks known to diverge from the recorded reference tensors, each with the reason we believe
//! the reference itself is not reproducible. A listed check still runs and still FAILS the
//! fixture in `trellisd parity` (exit status 1); the list only lets the test suite tell these
//! documented gaps from new regressions, and prints the reason next to the failure.
//!
//! Remove an entry as soon as its cause is understood and reproduced.

/// One documented divergence: a fixture kind and the check-name prefixes it covers.
#[derive(Debug)]
pub struct KnownDivergence {
    pub kind: &'static str,
    /// Check names (as the handler records them) starting with any of these are covered.
    pub check_prefixes: &'static [&'static str],
    pub reason: &'static str,
}

const SPCONV_PAIRS: &str = "the original's spconv CPU run (SPCONV_ALGO=native) paired some voxels with a \
wrong neighbour (e.g. models/slat_flow input_block0 conv1: voxel (0,5,6,14) offset (0,0,-1) took row 497 of \
the other batch element, while conv2 on the same coords did not); replaying the wrong pair matches to 3e-7, \
so the recorded SLatFlowModel outputs downstream of such a conv are not reproducible by a correct \
submanifold convolution";

const MESH_SUBDIVIDE: &str = "SLatMeshDecoder: after the first SparseSubdivideBlock3d our network differs \
from the recorded one by ~3e-3 (raw_out 1e-2) although the swin torso matches to 3e-7 and FlexiCubes on \
the recorded raw_out is exact; suspected spconv indice-pair reuse (the block's 3x3 convs and 1x1 skip \
share one indice_key), not yet reproduced";

pub const KNOWN: &[KnownDivergence] = &[
    KnownDivergence {
        kind: "model:SLatFlowModel",
        check_prefixes: &["out_fp32_same_weights"],
        reason: SPCONV_PAIRS,
    },
    KnownDivergence {
        kind: "model:SLatMeshDecoder",
        check_prefixes: &["upsample", "raw_out", "mesh"],
        reason: MESH_SUBDIVIDE,
    },
    KnownDivergence {
        kind: "pipelines",
        check_prefixes: &["variant_torus_slat"],
        reason: SPCONV_PAIRS,
    },
    KnownDivergence {
        kind: "pipelines",
        check_prefixes: &["img_mesh"],
        reason: MESH_SUBDIVIDE,
    },
];

/// The documented divergence covering `check` of a fixture of `kind`, if any.
pub fn explain(kind: &str, check: &str) -> Option<&'static KnownDivergence> {
    KNOWN
        .iter()
        .find(|k| k.kind == kind && k.check_prefixes.iter().any(|p| check.starts_with(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_only_listed_kind_and_check() {
        assert!(explain("model:SLatMeshDecoder", "raw_out").is_some());
        assert!(explain("model:SLatMeshDecoder", "torso_out").is_none());
        assert!(explain("model:SLatGaussianDecoder", "raw_out").is_none());
        assert!(explain("pipelines", "img_slat").is_none());
    }
}

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
wrong neighbour, through the data race of its CPU scatter_add (e.g. models/slat_flow input_block0 conv1: voxel (0,5,6,14) offset (0,0,-1) took row 497 of \
the other batch element, while conv2 on the same coords did not); replaying the wrong pair matches to 3e-7, \
so the recorded SLatFlowModel outputs downstream of such a conv are not reproducible by a correct \
submanifold convolution";

const MESH_SUBDIVIDE: &str = "SLatMeshDecoder: the recorded subdivide blocks carry spconv 2.3.8's CPU \
scatter_add data race (OpenMP threads share its row pointers, so an output row now and then gets another \
row's product; fixture block 0 row 166 took row 409's offset-(0,-1,+1) product, replayed to 7e-6; the model \
handler leaves such isolated rows out); hits before a GroupNorm spread to every row (raw_out ~1e-2), so \
raw_out and the meshes built from it are timing dependent and not reproducible";

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

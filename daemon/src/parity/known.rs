//! Checks known to diverge from the recorded reference tensors, each with the reason we believe
//! the reference itself is not reproducible. A listed check still runs and still FAILS the
//! fixture in `trellisd parity` (exit status 1); the list only lets the test suite tell these
//! documented gaps from new regressions, and prints the reason next to the failure.
//!
//! Entries are pinned to the SHA-256 of the recorded `io.safetensors` they describe, so the same
//! check failing on any other fixture set is an ordinary failure.
//!
//! Each entry's cause is shown by re-running the original code (`tools/reference/`); the
//! deterministic values it gives are in `tests/reference-rerun`, where these checks pass.

/// One documented divergence: the recorded file it is about (SHA-256 of its `io.safetensors`:
/// a divergence is a property of one recording, never of a kind in general), its kind and the
/// check-name prefixes it covers.
#[derive(Debug)]
pub struct KnownDivergence {
    pub io_sha256: &'static str,
    pub kind: &'static str,
    /// Check names (as the handler records them) starting with any of these are covered.
    pub check_prefixes: &'static [&'static str],
    pub reason: &'static str,
}

const SPCONV_PAIRS: &str = "recorded with spconv 2.3.8's CPU scatter_add, whose OpenMP threads share \
their buf/out_ptr pointers (e.g. models/slat_flow input_block0 conv1: voxel (0,5,6,14) offset (0,0,-1) \
took row 497 of the other batch element); the original code re-run single-threaded on the same \
weights and inputs lands where we do (slat_flow_fp16 out_fp32_same_weights 8.662e-2 from the recorded \
value, variant_torus_slat 5.33e-2) and differs on every two-thread run: compare with \
`--rerun tests/reference-rerun` (tools/reference/README.md)";

const MESH_SUBDIVIDE: &str = "SLatMeshDecoder: the recorded subdivide blocks carry spconv 2.3.8's CPU \
scatter_add data race (OpenMP threads share its row pointers, so an output row now and then gets another \
row's product; fixture block 0 row 166 took row 409's offset-(0,-1,+1) product, replayed to 7e-6); hits \
before a GroupNorm spread to every row; the original re-run single-threaded is 1.028e-2 from the recorded \
raw_out, as we are, and two-thread re-runs give 1.4e-2..3.3e-2: compare with \
`--rerun tests/reference-rerun` (tools/reference/README.md)";

const PIPELINES_IO: &str = "f3ab5d65e55e8993c80774abf71ac66a7c3713a6f0ba56a2da038cf0b84c7e3d";

pub const KNOWN: &[KnownDivergence] = &[
    KnownDivergence {
        // shared/reference models/slat_flow_fp16
        io_sha256: "4b7cc88e6cc2ad0e1cb4cf70b4f1430a0ca0a6ecfa64f2b45158d36bb80c4f82",
        kind: "model:SLatFlowModel",
        check_prefixes: &["out_fp32_same_weights"],
        reason: SPCONV_PAIRS,
    },
    KnownDivergence {
        // shared/reference models/slat_mesh_decoder
        io_sha256: "a459b241304bd5d89bb32ab1d1ccc0b52425fa7aca07fb7dc11368ff4c05ade7",
        kind: "model:SLatMeshDecoder",
        check_prefixes: &["upsample", "raw_out", "mesh"],
        reason: MESH_SUBDIVIDE,
    },
    KnownDivergence {
        // shared/reference pipelines
        io_sha256: PIPELINES_IO,
        kind: "pipelines",
        check_prefixes: &["variant_torus_slat"],
        reason: SPCONV_PAIRS,
    },
    KnownDivergence {
        // shared/reference pipelines
        io_sha256: PIPELINES_IO,
        kind: "pipelines",
        check_prefixes: &["img_mesh"],
        reason: MESH_SUBDIVIDE,
    },
];

/// The documented divergence covering `check` of the fixture of `kind` whose `io.safetensors`
/// has SHA-256 `io_sha256`, if any.
pub fn explain(kind: &str, check: &str, io_sha256: &str) -> Option<&'static KnownDivergence> {
    KNOWN.iter().find(|k| {
        k.io_sha256 == io_sha256
            && k.kind == kind
            && k.check_prefixes.iter().any(|p| check.starts_with(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_only_listed_recording_kind_and_check() {
        let mesh = "a459b241304bd5d89bb32ab1d1ccc0b52425fa7aca07fb7dc11368ff4c05ade7";
        assert!(explain("model:SLatMeshDecoder", "raw_out", mesh).is_some());
        assert!(explain("model:SLatMeshDecoder", "torso_out", mesh).is_none());
        assert!(explain("model:SLatGaussianDecoder", "raw_out", mesh).is_none());
        assert!(explain("pipelines", "img_slat", PIPELINES_IO).is_none());
        assert!(explain("pipelines", "variant_torus_slat", PIPELINES_IO).is_some());
        // The same check of another recording (another fixture set) is never excused.
        assert!(explain("model:SLatMeshDecoder", "raw_out", &"0".repeat(64)).is_none());
    }
}

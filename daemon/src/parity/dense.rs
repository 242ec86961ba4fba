//! Parity of the dense building blocks and the sparse-structure networks.
//!
//! Every size comes from the fixture (config, meta.json conventions, tensor shapes); every tensor the
//! meta lists as an output or intermediate is compared.

use std::ops::Range;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};

use super::fixture::tol;
use super::{Fixture, Outcome, Report};
use crate::modules::embedders::{AbsolutePositionEmbedder, TimestepEmbedder};
use crate::modules::norm::{
    f_layer_norm, sparse_group_norm, ChannelLayerNorm32, GroupNorm32, LayerNorm32, MultiHeadRMSNorm,
};

pub const KINDS: &[&str] = &[
    "module:TimestepEmbedder",
    "module:AbsolutePositionEmbedder",
    "module:norms",
    "module:patchify",
    "module:MultiHeadAttention",
    "module:ModulatedTransformerCrossBlock",
    "model:SparseStructureEncoder",
    "model:SparseStructureDecoder",
    "model:SparseStructureFlowModel",
];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    match fx.kind.as_str() {
        "module:TimestepEmbedder" => timestep_embedder(fx),
        "module:AbsolutePositionEmbedder" => abs_pos_embedder(fx),
        "module:norms" => norms(fx),
        _ => Ok(Outcome::Skipped(format!(
            "{} is not implemented yet",
            fx.kind
        ))),
    }
}

/// The names meta.json lists under `tensors`, in file order.
fn meta_tensors(fx: &Fixture) -> Vec<String> {
    fx.meta
        .get("tensors")
        .and_then(|t| t.as_object())
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// The stated tolerance of a tensor, else `default`.
fn tol_of(fx: &Fixture, name: &str, default: f64) -> f64 {
    fx.stated_tolerance(name).unwrap_or(default)
}

fn usize_arg(args: &serde_json::Value, key: &str) -> Result<usize> {
    args.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| anyhow!("config: integer argument {key:?} missing"))
}

/// A `conventions` entry of meta.json as text.
fn convention<'a>(fx: &'a Fixture, key: &str) -> Option<&'a str> {
    fx.meta.get("conventions")?.get(key)?.as_str()
}

/// The first integer inside the first parentheses of `s` (`"GroupNorm32(32, 32) ..."` → 32).
fn first_paren_int(s: &str) -> Option<usize> {
    let inner = s.split_once('(')?.1;
    let num: String = inner
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    num.parse().ok()
}

/// The number after the word `eps` in `s` (`"eps 1e-5"`, `"eps=1e-6"`).
fn eps_in(s: &str) -> Option<f64> {
    let rest = s.split_once("eps")?.1;
    let rest = rest.trim_start_matches([' ', '=', ':']);
    let tok: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    tok.parse().ok()
}

/// Row ranges of each batch element from sparse coords `[N, 4]` (batch column first, blocks contiguous).
pub fn batch_ranges(coords: &Tensor) -> Result<Vec<Range<usize>>> {
    let c: Vec<Vec<i64>> = coords.to_dtype(DType::I64)?.to_vec2()?;
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut cur: Option<i64> = None;
    for (i, row) in c.iter().enumerate() {
        let b = *row
            .first()
            .ok_or_else(|| anyhow!("coords have no batch column"))?;
        match cur {
            Some(p) if p == b => {}
            Some(p) if b < p => bail!("coords: batch blocks are not sorted (row {i})"),
            _ => {
                if let Some(last) = out.last_mut() {
                    last.end = i;
                }
                // batch indices without rows get empty ranges, as the original's layout does
                let prev = cur.map(|p| p + 1).unwrap_or(0);
                for _ in prev..b {
                    out.push(i..i);
                }
                out.push(i..c.len());
                cur = Some(b);
            }
        }
    }
    Ok(out)
}

fn timestep_embedder(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let args = fx.config_args()?.clone();
    let hidden = usize_arg(&args, "hidden_size")?;
    let freq = args
        .get("frequency_embedding_size")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(256);
    let (vb, check) = fx.weights(DType::F32)?;
    let emb = TimestepEmbedder::new(vb, hidden, freq)?;
    check.finish()?;
    let t = fx.io("t")?;
    let mut report = Report::default();
    if fx.has_io("t_freq") {
        let tf = crate::modules::embedders::timestep_embedding(&t, freq)?;
        report.close(
            "t_freq",
            &tf,
            &fx.io("t_freq")?,
            tol_of(fx, "t_freq", tol::FORWARD),
        )?;
    }
    let out = emb.forward(&t)?;
    report.close("out", &out, &fx.io("out")?, tol_of(fx, "out", tol::FORWARD))?;
    Ok(Outcome::Checked(report))
}

fn abs_pos_embedder(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let mut report = Report::default();
    for name in meta_tensors(fx) {
        let Some(stem) = name.strip_suffix("_out") else {
            continue;
        };
        let pos = fx.io(&format!("{stem}_pos"))?;
        let expected = fx.io(&name)?;
        let channels = expected.dim(1)?;
        let ape = AbsolutePositionEmbedder::new(channels, pos.dim(1)?)?;
        let got = ape.forward(&pos)?;
        report.close(&name, &got, &expected, tol_of(fx, &name, tol::FORWARD))?;
    }
    if report.checks.is_empty() {
        bail!("no <name>_out / <name>_pos pair in meta.json");
    }
    Ok(Outcome::Checked(report))
}

fn opt_io(fx: &Fixture, name: &str) -> Option<Tensor> {
    fx.has_io(name).then(|| fx.io(name).ok()).flatten()
}

fn norms(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let names = meta_tensors(fx);
    let mut report = Report::default();
    let has = |n: &str| names.iter().any(|x| x == n);
    let conv = |key: &str| convention(fx, key).unwrap_or("");

    if has("group_out") {
        let groups = first_paren_int(conv("group"))
            .ok_or_else(|| anyhow!("conventions.group does not state GroupNorm32(groups, C)"))?;
        let eps = eps_in(conv("group")).unwrap_or(1e-5);
        let n = GroupNorm32::from_parts(
            groups,
            opt_io(fx, "group_weight"),
            opt_io(fx, "group_bias"),
            eps,
        );
        let y = n.forward(&fx.io("group_in")?)?;
        report.close(
            "group_out",
            &y,
            &fx.io("group_out")?,
            tol_of(fx, "group_out", tol::FORWARD),
        )?;
    }
    if has("chln_out") {
        let eps = eps_in(conv("chln")).unwrap_or(1e-5);
        let n =
            ChannelLayerNorm32::from_parts(opt_io(fx, "chln_weight"), opt_io(fx, "chln_bias"), eps);
        let y = n.forward(&fx.io("chln_in")?)?;
        report.close(
            "chln_out",
            &y,
            &fx.io("chln_out")?,
            tol_of(fx, "chln_out", tol::FORWARD),
        )?;
    }
    if has("ln_affine_out") {
        let eps = eps_in(conv("ln_affine")).unwrap_or(1e-6);
        let n = LayerNorm32::from_parts(
            opt_io(fx, "ln_affine_weight"),
            opt_io(fx, "ln_affine_bias"),
            eps,
        );
        let y = n.forward(&fx.io("ln_in")?)?;
        report.close(
            "ln_affine_out",
            &y,
            &fx.io("ln_affine_out")?,
            tol_of(fx, "ln_affine_out", tol::FORWARD),
        )?;
    }
    if has("ln_plain_out") {
        let eps = eps_in(conv("ln_plain")).unwrap_or(1e-6);
        let y = LayerNorm32::from_parts(None, None, eps).forward(&fx.io("ln_in")?)?;
        report.close(
            "ln_plain_out",
            &y,
            &fx.io("ln_plain_out")?,
            tol_of(fx, "ln_plain_out", tol::FORWARD),
        )?;
    }
    if has("f_layer_norm_out") {
        let y = f_layer_norm(&fx.io("ln_in")?)?;
        report.close(
            "f_layer_norm_out",
            &y,
            &fx.io("f_layer_norm_out")?,
            tol_of(fx, "f_layer_norm_out", tol::FORWARD),
        )?;
    }
    if has("rms_out") {
        let gamma = fx.io("rms_gamma")?;
        let dim = gamma.dim(1)?;
        let y = MultiHeadRMSNorm::from_gamma(gamma, dim).forward(&fx.io("rms_in")?)?;
        report.close(
            "rms_out",
            &y,
            &fx.io("rms_out")?,
            tol_of(fx, "rms_out", tol::FORWARD),
        )?;
    }
    if has("sparse_gn_out") {
        let groups = first_paren_int(conv("sparse_gn")).ok_or_else(|| {
            anyhow!("conventions.sparse_gn does not state SparseGroupNorm32(groups, C)")
        })?;
        let eps = eps_in(conv("sparse_gn")).unwrap_or(1e-5);
        let ranges = batch_ranges(&fx.io("sparse_gn_coords")?).context("sparse_gn_coords")?;
        let w = opt_io(fx, "sparse_gn_weight");
        let b = opt_io(fx, "sparse_gn_bias");
        let y = sparse_group_norm(
            &fx.io("sparse_gn_in")?,
            &ranges,
            groups,
            w.as_ref(),
            b.as_ref(),
            eps,
        )?;
        report.close(
            "sparse_gn_out",
            &y,
            &fx.io("sparse_gn_out")?,
            tol_of(fx, "sparse_gn_out", tol::FORWARD),
        )?;
    }
    // Every output the meta lists must have been compared.
    for n in names.iter().filter(|n| n.ends_with("_out")) {
        if !report.checks.iter().any(|c| &c.name == n) {
            bail!("meta.json lists {n:?}, which this handler does not know");
        }
    }
    Ok(Outcome::Checked(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parses_conventions() {
        assert_eq!(
            first_paren_int("GroupNorm32(32, 32) eps 1e-5 over"),
            Some(32)
        );
        assert_eq!(
            first_paren_int("SparseGroupNorm32(8, 32): GroupNorm"),
            Some(8)
        );
        assert_eq!(eps_in("GroupNorm32(32, 32) eps 1e-5 over"), Some(1e-5));
        assert_eq!(
            eps_in("LayerNorm32(C, elementwise_affine=True, eps=1e-6)"),
            Some(1e-6)
        );
        assert_eq!(eps_in("no number"), None);
    }

    #[test]
    fn batch_ranges_from_coords() {
        let c = Tensor::new(&[[0i32, 1, 1, 1], [0, 2, 2, 2], [2, 0, 0, 0]], &Device::Cpu).unwrap();
        assert_eq!(batch_ranges(&c).unwrap(), vec![0..2, 2..2, 2..3]);
        let bad = Tensor::new(&[[1i32, 1, 1, 1], [0, 2, 2, 2]], &Device::Cpu).unwrap();
        assert!(batch_ranges(&bad).is_err());
    }
}

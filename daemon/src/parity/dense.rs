//! Parity of the dense building blocks and the sparse-structure networks.
//!
//! Every size comes from the fixture (config, meta.json conventions, tensor shapes); every tensor the
//! meta lists as an output or intermediate is compared.

use std::collections::hash_map::Entry;
use std::ops::Range;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

use super::fixture::{differing, tol};
use super::{Fixture, Outcome, Report};
use crate::models::config::{
    SparseStructureDecoderConfig, SparseStructureEncoderConfig, SparseStructureFlowConfig,
};
use crate::models::ss_flow::{SparseStructureFlowModel, SparseStructureFlowTrace};
use crate::models::ss_vae::{occupied_coords, SparseStructureDecoder, SparseStructureEncoder};
use crate::modules::attention::MultiHeadAttention;
use crate::modules::embedders::{AbsolutePositionEmbedder, TimestepEmbedder};
use crate::modules::norm::{
    f_layer_norm, sparse_group_norm, ChannelLayerNorm32, GroupNorm32, LayerNorm32, MultiHeadRMSNorm,
};
use crate::modules::patchify as spatial;
use crate::modules::transformer::{CrossBlockConfig, ModulatedTransformerCrossBlock};

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
        "module:patchify" => patchify(fx),
        "module:MultiHeadAttention" => attention(fx),
        "module:ModulatedTransformerCrossBlock" => cross_block(fx),
        "model:SparseStructureFlowModel" => ss_flow(fx),
        "model:SparseStructureEncoder" => ss_encoder(fx),
        "model:SparseStructureDecoder" => ss_decoder(fx),
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

/// The stated tolerance of a tensor (also `"rel_l2 ~1e-2 (...)"`), else `default`.
fn tol_of(fx: &Fixture, name: &str, default: f64) -> f64 {
    if let Some(t) = fx.stated_tolerance(name) {
        return t;
    }
    fx.meta
        .get("tensors")
        .and_then(|t| t.get(name))
        .and_then(|t| t.get("tolerance"))
        .and_then(|t| t.as_str())
        .and_then(|s| {
            s.split_whitespace().find_map(|w| {
                w.trim_start_matches(['~', '<', '='])
                    .trim_end_matches([',', ';', ')'])
                    .parse::<f64>()
                    .ok()
            })
        })
        .unwrap_or(default)
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
    let c: Vec<Vec<i64>> = coords
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::I64)?
        .to_vec2()?;
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

fn bool_arg(args: &serde_json::Value, key: &str, default: bool) -> bool {
    args.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
}

fn patchify(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let names = meta_tensors(fx);
    let has = |n: &str| names.iter().any(|x| x == n);
    let mut report = Report::default();
    if has("patchified") {
        let x = fx.io("x")?;
        let want = fx.io("patchified")?;
        let p = x.dim(2)? / want.dim(2)?.max(1);
        let got = spatial::patchify(&x, p)?;
        report.close(
            "patchified",
            &got,
            &want,
            tol_of(fx, "patchified", tol::FORWARD),
        )?;
        if has("unpatchified") {
            let back = spatial::unpatchify(&want, p)?;
            report.close(
                "unpatchified",
                &back,
                &fx.io("unpatchified")?,
                tol_of(fx, "unpatchified", tol::FORWARD),
            )?;
        }
    }
    if has("shuffle_out") {
        let x = fx.io("shuffle_in")?;
        let want = fx.io("shuffle_out")?;
        let s = want.dim(2)? / x.dim(2)?.max(1);
        let got = spatial::pixel_shuffle_3d(&x, s)?;
        report.close(
            "shuffle_out",
            &got,
            &want,
            tol_of(fx, "shuffle_out", tol::FORWARD),
        )?;
    }
    if report.checks.is_empty() {
        bail!("meta.json lists no patchified / shuffle_out tensor");
    }
    Ok(Outcome::Checked(report))
}

fn attention(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let args = fx.config_args()?.clone();
    let channels = usize_arg(&args, "channels")?;
    let heads = usize_arg(&args, "num_heads")?;
    let qkv_bias = bool_arg(&args, "qkv_bias", true);
    let qk_rms = bool_arg(&args, "qk_rms_norm", false);
    if let Some(m) = args.get("attn_mode").and_then(|v| v.as_str()) {
        if m != "full" {
            bail!("MultiHeadAttention: attn_mode {m:?} (the original implements only \"full\")");
        }
    }
    let kind = args.get("type").and_then(|v| v.as_str()).unwrap_or("self");
    let (vb, check) = fx.weights(DType::F32)?;
    let attn = match kind {
        "self" => MultiHeadAttention::new_self(vb, channels, heads, qkv_bias, qk_rms)?,
        "cross" => {
            let ctx = args
                .get("ctx_channels")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(channels);
            MultiHeadAttention::new_cross(vb, channels, ctx, heads, qkv_bias, qk_rms)?
        }
        other => bail!("MultiHeadAttention: unknown type {other:?}"),
    };
    check.finish()?;
    let ctx = opt_io(fx, "context");
    let out = attn.forward(&fx.io("x")?, ctx.as_ref())?;
    let mut report = Report::default();
    report.close("out", &out, &fx.io("out")?, tol_of(fx, "out", tol::FORWARD))?;
    Ok(Outcome::Checked(report))
}

fn cross_block(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let args = fx.config_args()?.clone();
    let channels = usize_arg(&args, "channels")?;
    let cfg = CrossBlockConfig {
        channels,
        ctx_channels: usize_arg(&args, "ctx_channels")?,
        num_heads: usize_arg(&args, "num_heads")?,
        mlp_ratio: args
            .get("mlp_ratio")
            .and_then(|v| v.as_f64())
            .unwrap_or(4.0),
        qk_rms_norm: bool_arg(&args, "qk_rms_norm", false),
        qk_rms_norm_cross: bool_arg(&args, "qk_rms_norm_cross", false),
        qkv_bias: bool_arg(&args, "qkv_bias", true),
        share_mod: bool_arg(&args, "share_mod", false),
    };
    if let Some(m) = args.get("attn_mode").and_then(|v| v.as_str()) {
        if m != "full" {
            bail!("ModulatedTransformerCrossBlock: attn_mode {m:?} is not implemented upstream");
        }
    }
    let (vb, check) = fx.weights(DType::F32)?;
    let block = ModulatedTransformerCrossBlock::new(vb, &cfg)?;
    check.finish()?;
    let tr = block.forward_trace(&fx.io("x")?, &fx.io("mod")?, &fx.io("context")?)?;
    let mut report = Report::default();
    let inputs = ["x", "mod", "context"];
    for name in meta_tensors(fx) {
        let got = match name.as_str() {
            n if inputs.contains(&n) => continue,
            "adaln" => &tr.adaln,
            "after_self_attn" => &tr.after_self_attn,
            "after_cross_attn" => &tr.after_cross_attn,
            "out" => &tr.out,
            other => bail!("meta.json lists {other:?}, which this handler does not know"),
        };
        report.close(&name, got, &fx.io(&name)?, tol_of(fx, &name, tol::FORWARD))?;
    }
    Ok(Outcome::Checked(report))
}

/// The typed config of a model fixture (`config.json`'s `args`).
fn model_config<T: serde::de::DeserializeOwned>(fx: &Fixture) -> Result<T> {
    let args = fx.config_args()?.clone();
    serde_json::from_value(args).with_context(|| format!("{}: config.json args", fx.dir.display()))
}

/// A traced flow tensor by its fixture name (`out`, `input_layer_out`, `t_emb`, `block<i>`).
fn flow_tensor<'a>(tr: &'a SparseStructureFlowTrace, name: &str) -> Option<&'a Tensor> {
    match name {
        "out" => Some(&tr.out),
        "input_layer_out" => Some(&tr.input_layer_out),
        "t_emb" => Some(&tr.t_emb),
        _ => {
            let i: usize = name.strip_prefix("block")?.parse().ok()?;
            tr.blocks.get(i)
        }
    }
}

fn ss_flow(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let cfg: SparseStructureFlowConfig = model_config(fx)?;
    let (x, t, cond) = (fx.io("x")?, fx.io("t")?, fx.io("cond")?);
    let run = |run: Run| -> Result<SparseStructureFlowTrace> {
        let (vb, check) = fx.weights(DType::F32)?;
        let model = SparseStructureFlowModel::new(&cfg, vb, run_precision(run, cfg.use_fp16).0)?;
        check.finish()?;
        let trace = model.forward_trace(&x, &t, &cond)?;
        // The untraced forward hands each block's last residual to the next block's first norm
        // (fused on the GPU): it must give the traced forward's numbers exactly.
        let plain = model.forward(&x, &t, &cond)?;
        ensure!(
            plain.dims() == trace.out.dims() && differing(&plain, &trace.out)? == 0.0,
            "SparseStructureFlowModel: forward and forward_trace differ"
        );
        Ok(trace)
    };
    let mut traces = std::collections::HashMap::new();
    let mut report = Report::default();
    for name in meta_tensors(fx) {
        if ["x", "t", "cond"].contains(&name.as_str()) {
            continue;
        }
        let (stem, r) = split_run(&name);
        let trace = match traces.entry(r) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(run(r)?),
        };
        let got = flow_tensor(trace, stem)
            .ok_or_else(|| anyhow!("meta.json lists {name:?}, unknown to this handler"))?;
        let default_tol = run_precision(r, cfg.use_fp16).1;
        report.close(&name, got, &fx.io(&name)?, tol_of(fx, &name, default_tol))?;
    }
    Ok(Outcome::Checked(report))
}

/// Which run of a model fixture an output name refers to: `<stem>_fp32_same_weights` is the fp16
/// checkpoint's (rounded) weights run fully in float32; `<stem>_mixed_fp16` and a plain `<stem>` are
/// the checkpoint's own precision (the naming of the `*_fp16` flow fixtures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Run {
    Own,
    Fp32,
}

fn split_run(name: &str) -> (&str, Run) {
    if let Some(stem) = name.strip_suffix("_fp32_same_weights") {
        (stem, Run::Fp32)
    } else {
        (name.strip_suffix("_mixed_fp16").unwrap_or(name), Run::Own)
    }
}

/// The torso dtype of a run, and the tolerance its outputs get unless meta.json states one.
fn run_precision(run: Run, use_fp16: bool) -> (DType, f64) {
    match run {
        Run::Own if use_fp16 => (DType::F16, tol::FP16),
        _ => (DType::F32, tol::FORWARD),
    }
}

/// meta.json's tensor names, once io.safetensors is known to record none that meta.json leaves
/// out (an unlisted tensor is one no handler checks: it fails the fixture).
fn listed_tensors(fx: &Fixture) -> Result<Vec<String>> {
    let names = meta_tensors(fx);
    if let Some(extra) = fx.io_names().into_iter().find(|n| !names.contains(n)) {
        bail!("io.safetensors records {extra:?}, which meta.json does not list");
    }
    Ok(names)
}

/// The `k` of an optional SS VAE intermediate named `<prefix><k>` (`enc_block3` → 3).
fn block_index(stem: &str, prefix: &str) -> Option<usize> {
    let k = stem.strip_prefix(prefix)?;
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    k.parse().ok()
}

/// Entry `k` of a forward trace; the error names the tensor and how many entries there are.
fn traced<'a>(trace: &'a [Tensor], k: usize, name: &str, what: &str) -> Result<&'a Tensor> {
    trace.get(k).ok_or_else(|| {
        anyhow!(
            "meta.json lists {name:?}, but the {what} has {} entries in blocks and middle_block",
            trace.len()
        )
    })
}

fn ss_encoder(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let cfg: SparseStructureEncoderConfig = model_config(fx)?;
    let names = listed_tensors(fx)?;
    let input = names
        .iter()
        .find(|n| *n == "x" || n.starts_with("x_"))
        .ok_or_else(|| anyhow!("meta.json lists no input x / x_*"))?
        .clone();
    let x = fx.io(&input)?;
    let run = |run: Run| -> Result<_> {
        let (vb, check) = fx.weights(DType::F32)?;
        let enc = SparseStructureEncoder::new(&cfg, vb, run_precision(run, cfg.use_fp16).0)?;
        check.finish()?;
        enc.forward_raw_traced(&x)
    };
    let mut runs = std::collections::HashMap::new();
    let mut report = Report::default();
    for name in names.iter().filter(|n| **n != input) {
        let (stem, r) = split_run(name);
        let (post, trace) = match runs.entry(r) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(run(r)?),
        };
        let got = match stem {
            "z" | "mean" => &post.mean,
            "logvar" => &post.logvar,
            _ => match block_index(stem, "enc_block") {
                Some(k) => traced(trace, k, name, "encoder")?,
                None => bail!("meta.json lists {name:?}, which this handler does not know"),
            },
        };
        let default_tol = run_precision(r, cfg.use_fp16).1;
        report.close(name, got, &fx.io(name)?, tol_of(fx, name, default_tol))?;
    }
    Ok(Outcome::Checked(report))
}

/// Coordinates that differ between `got` and `want` ([N, 4] int) and are not explained by a
/// reference logit within `margin` of 0, as a fraction of the reference count.
fn coords_error(got: &Tensor, want: &Tensor, logits: &Tensor, margin: f32) -> Result<f64> {
    use std::collections::BTreeSet;
    let set = |t: &Tensor| -> Result<BTreeSet<Vec<i64>>> {
        Ok(t.to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec2::<i64>()?
            .into_iter()
            .collect())
    };
    let (g, w) = (set(got)?, set(want)?);
    let (_, _, x, y, z) = logits.dims5()?;
    let l: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut unexplained = 0usize;
    for c in g.symmetric_difference(&w) {
        let idx = |v: i64, n: usize| usize::try_from(v).ok().filter(|&v| v < n);
        let near_zero = match (
            idx(c[0], usize::MAX),
            idx(c[1], x),
            idx(c[2], y),
            idx(c[3], z),
        ) {
            (Some(b), Some(i), Some(j), Some(k)) => l
                .get(((b * x + i) * y + j) * z + k)
                .is_some_and(|v| v.abs() < margin),
            _ => false,
        };
        if !near_zero {
            unexplained += 1;
        }
    }
    Ok(unexplained as f64 / w.len().max(1) as f64)
}

fn ss_decoder(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let cfg: SparseStructureDecoderConfig = model_config(fx)?;
    let names = listed_tensors(fx)?;
    let z = fx.io("z")?;
    let run = |run: Run| -> Result<(Tensor, Vec<Tensor>)> {
        let (vb, check) = fx.weights(DType::F32)?;
        let dec = SparseStructureDecoder::new(&cfg, vb, run_precision(run, cfg.use_fp16).0)?;
        check.finish()?;
        dec.forward_traced(&z)
    };
    let mut runs = std::collections::HashMap::new();
    let mut report = Report::default();
    for name in names {
        if name == "z" {
            continue;
        }
        let (stem, r) = split_run(&name);
        let (ours, trace) = match runs.entry(r) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(run(r)?),
        };
        let default_tol = run_precision(r, cfg.use_fp16).1;
        match stem {
            "logits" => {
                report.close(&name, ours, &fx.io(&name)?, tol_of(fx, &name, default_tol))?
            }
            "coords" => {
                // the reference logits of the same run explain near-zero disagreements
                let suffix = &name["coords".len()..];
                let reference = fx
                    .io(&format!("logits{suffix}"))
                    .with_context(|| format!("{name} needs the reference logits{suffix}"))?;
                let got = occupied_coords(ours)?;
                let err = coords_error(&got, &fx.io(&name)?, &reference, 1e-4)?;
                report.record(&name, err, 0.0);
            }
            _ => match block_index(stem, "dec_block") {
                Some(k) => {
                    let got = traced(trace, k, &name, "decoder")?;
                    report.close(&name, got, &fx.io(&name)?, tol_of(fx, &name, default_tol))?
                }
                None => bail!("meta.json lists {name:?}, which this handler does not know"),
            },
        }
    }
    Ok(Outcome::Checked(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::weights;
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

    #[test]
    fn run_names() {
        assert_eq!(split_run("out_fp32_same_weights"), ("out", Run::Fp32));
        assert_eq!(split_run("out_mixed_fp16"), ("out", Run::Own));
        assert_eq!(split_run("logits"), ("logits", Run::Own));
        assert_eq!(run_precision(Run::Own, true).0, DType::F16);
        assert_eq!(run_precision(Run::Fp32, true).0, DType::F32);
        assert_eq!(run_precision(Run::Own, false).0, DType::F32);
    }

    /// An fp16 SparseStructureDecoder fixture named like the `*_fp16` flow fixtures
    /// (`logits_mixed_fp16`, `logits_fp32_same_weights`): each output is compared with the run of
    /// the matching precision (the handler used to reject these names).
    #[test]
    fn ss_decoder_fp16_fixture_names() {
        use candle_nn::{VarBuilder, VarMap};
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let args = serde_json::json!({"out_channels": 1, "latent_channels": 2, "num_res_blocks": 1,
            "channels": [8, 4], "num_res_blocks_middle": 1, "use_fp16": true});
        let cfg: SparseStructureDecoderConfig = serde_json::from_value(args.clone()).unwrap();
        let vm = VarMap::new();
        SparseStructureDecoder::new(
            &cfg,
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
            DType::F32,
        )
        .unwrap();
        for (i, var) in vm.all_vars().iter().enumerate() {
            let t = Tensor::randn(0f32, 0.3, var.shape(), &dev).unwrap();
            let t = if i % 3 == 0 { (t + 1.0).unwrap() } else { t };
            var.set(&t).unwrap();
        }
        vm.save(dir.path().join("model.safetensors")).unwrap();
        let load = |dtype| {
            let (vb, _) =
                weights::from_safetensors(&dir.path().join("model.safetensors"), DType::F32, &dev)
                    .unwrap();
            SparseStructureDecoder::new(&cfg, vb, dtype).unwrap()
        };
        let z = Tensor::randn(0f32, 1.0, (1, 2, 2, 2, 2), &dev).unwrap();
        let mixed = load(DType::F16).forward(&z).unwrap();
        let full = load(DType::F32).forward(&z).unwrap();
        assert!(crate::parity::fixture::rel_l2(&mixed, &full).unwrap() > 1e-6);
        let io = std::collections::HashMap::from([
            ("z".to_string(), z),
            ("logits_mixed_fp16".to_string(), mixed),
            ("logits_fp32_same_weights".to_string(), full),
        ]);
        candle_core::safetensors::save(&io, dir.path().join("io.safetensors")).unwrap();
        let t = |s: &[usize], tol: &str| serde_json::json!({"shape": s, "dtype": "float32", "desc": "", "tolerance": tol});
        let meta = serde_json::json!({"kind": "model:SparseStructureDecoder", "tensors": {
            "z": t(&[1, 2, 2, 2, 2], ""),
            "logits_mixed_fp16": t(&[1, 1, 8, 8, 8], "rel_l2 1e-6"),
            "logits_fp32_same_weights": t(&[1, 1, 8, 8, 8], "rel_l2 1e-6")}});
        std::fs::write(dir.path().join("meta.json"), meta.to_string()).unwrap();
        let config = serde_json::json!({"name": "SparseStructureDecoder", "args": args});
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let mut fx = Fixture::open(dir.path(), &dev).unwrap();
        let Outcome::Checked(report) = check(&mut fx).unwrap() else {
            panic!("skipped")
        };
        let mut names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["logits_fp32_same_weights", "logits_mixed_fp16"]);
        assert!(report.passed(), "{:?}", report.checks);
    }
}

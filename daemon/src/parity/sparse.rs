//! Parity of the sparse core: sparse conv, spatial ops, sparse attention, SLat flow and encoder.
//!
//! Every handler computes what it can name after the fixture's `meta.json` tensors and then
//! compares *every* listed tensor that is not an input; a listed tensor we did not produce is a
//! failed check, so nothing the fixture records is silently ignored.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};

use super::fixture::tol;
use super::{Fixture, Outcome, Report};
use crate::models::config::ModelConfig;
use crate::models::slat_flow::SLatFlowModel;
use crate::models::slat_vae::encoder::SLatEncoder;
use crate::modules::sparse::attention::{AttnMode, SparseMultiHeadAttention};
use crate::modules::sparse::conv::SparseConv3d;
use crate::modules::sparse::spatial::{SparseDownsample, SparseSubdivide, SparseUpsample};
use crate::modules::sparse::tensor::SparseTensor;

pub const KINDS: &[&str] = &[
    "module:SparseConv3d",
    "module:sparse_spatial",
    "module:SparseMultiHeadAttention",
    "model:SLatFlowModel",
    "model:SLatEncoder",
];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let kind = fx.kind.clone();
    match kind.as_str() {
        "module:SparseConv3d" => sparse_conv(fx),
        "module:sparse_spatial" => sparse_spatial(fx),
        "module:SparseMultiHeadAttention" => sparse_attention(fx),
        "model:SLatFlowModel" => slat_flow(fx),
        "model:SLatEncoder" => slat_encoder(fx),
        other => bail!("sparse parity: unknown kind {other}"),
    }
}

/// What a handler produced, by meta.json tensor name.
type Produced = HashMap<String, Tensor>;

/// The tolerance meta.json states for a tensor: `Some(None)` = "exact", `Some(Some(x))` = rel L2
/// (as [`Fixture::stated_tolerance`] reads it), `None` = none stated.
fn stated(fx: &Fixture, name: &str) -> Option<Option<f64>> {
    let t = fx.meta.get("tensors")?.get(name)?.get("tolerance")?;
    if t.as_str().map(str::trim) == Some("exact") {
        return Some(None);
    }
    fx.stated_tolerance(name).map(Some)
}

/// Compares every meta.json tensor except `inputs` with what was produced.
fn compare_all(
    fx: &Fixture,
    produced: &Produced,
    inputs: &[&str],
    default_tol: f64,
) -> Result<Report> {
    let mut report = Report::default();
    let tensors = fx
        .meta
        .get("tensors")
        .and_then(|t| t.as_object())
        .ok_or_else(|| anyhow!("{}: meta.json has no \"tensors\" map", fx.dir.display()))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        if inputs.contains(&name.as_str()) {
            continue;
        }
        let expected = fx.io(name)?;
        let Some(actual) = produced.get(name.as_str()) else {
            eprintln!("  {name}: listed in meta.json but not computed");
            report.record(name, f64::INFINITY, 0.0);
            continue;
        };
        let integer = expected.dtype().is_int();
        match stated(fx, name) {
            _ if integer => report.exact(name, actual, &expected)?,
            Some(None) => report.exact(name, actual, &expected)?,
            Some(Some(t)) => report.close(name, actual, &expected, t)?,
            None => report.close(name, actual, &expected, default_tol)?,
        }
    }
    Ok(report)
}

fn arg_usize(args: &serde_json::Value, key: &str) -> Result<usize> {
    args.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| anyhow!("config.json: no integer argument {key:?}"))
}

fn arg_opt_usize(args: &serde_json::Value, key: &str) -> Option<usize> {
    args.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
}

fn sparse_input(fx: &Fixture, coords: &str, feats: &str) -> Result<SparseTensor> {
    SparseTensor::from_tensors(&fx.io(coords)?, fx.io(feats)?)
}

fn sparse_conv(fx: &mut Fixture) -> Result<Outcome> {
    let args = fx.config_args()?.clone();
    let cin = arg_usize(&args, "in_channels")?;
    let cout = arg_usize(&args, "out_channels")?;
    let k = arg_usize(&args, "kernel_size")?;
    let (vb, check) = fx.weights(DType::F32)?;
    let conv = SparseConv3d::new(cin, cout, k, vb.clone())?;
    check.finish()?;
    let x = sparse_input(fx, "coords", "feats_in")?;
    let y = conv.forward(&x)?;
    let mut p = Produced::new();
    p.insert("feats_out".into(), y.feats().clone());
    p.insert("dense_out_at_sites".into(), y.feats().clone());
    let w = vb.get((cout, k, k, k, cin), "conv.weight")?;
    p.insert(
        "dense_weight_oixyz".into(),
        w.permute((0, 4, 1, 2, 3))?.contiguous()?,
    );
    Ok(Outcome::Checked(compare_all(
        fx,
        &p,
        &["coords", "feats_in"],
        tol::FORWARD,
    )?))
}

fn sparse_spatial(fx: &mut Fixture) -> Result<Outcome> {
    let x = sparse_input(fx, "coords_in", "feats_in")?;
    let d = SparseDownsample::new(2).forward(&x)?;
    let mut p = Produced::new();
    p.insert("down_coords".into(), d.coords_tensor()?);
    p.insert("down_feats".into(), d.feats().clone());
    let inv = d
        .geometry()
        .upsample_cache()
        .ok_or_else(|| anyhow!("downsample did not record its inverse index"))?
        .inverse
        .iter()
        .map(|&i| i as i64)
        .collect::<Vec<_>>();
    p.insert("down_inverse_idx".into(), Tensor::new(inv, &fx.device)?);
    // Upsample the recorded coarse feats through our own downsample's cache.
    let up_in = d.replace(fx.io("up_feats_in")?)?;
    let u = SparseUpsample::new(2).forward(&up_in)?;
    p.insert("up_coords".into(), u.coords_tensor()?);
    p.insert("up_feats".into(), u.feats().clone());
    let s = SparseSubdivide.forward(&x)?;
    p.insert("subdiv_coords".into(), s.coords_tensor()?);
    p.insert("subdiv_feats".into(), s.feats().clone());
    Ok(Outcome::Checked(compare_all(
        fx,
        &p,
        &["coords_in", "feats_in", "up_feats_in"],
        tol::FORWARD,
    )?))
}

/// `shift_window` as an int or a list of equal ints.
fn shift_arg(args: &serde_json::Value) -> Result<Option<usize>> {
    match args.get("shift_window") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) if v.is_u64() => Ok(v.as_u64().map(|x| x as usize)),
        Some(serde_json::Value::Array(a)) => {
            let v: Vec<u64> = a.iter().filter_map(|x| x.as_u64()).collect();
            if v.len() != a.len() || v.is_empty() || v.iter().any(|&x| x != v[0]) {
                bail!("shift_window {a:?}: only equal shifts on all axes are supported");
            }
            Ok(Some(v[0] as usize))
        }
        Some(v) => bail!("shift_window {v}: not an integer"),
    }
}

fn sparse_attention(fx: &mut Fixture) -> Result<Outcome> {
    let args = fx.config_args()?.clone();
    let channels = arg_usize(&args, "channels")?;
    let heads = arg_usize(&args, "num_heads")?;
    let ty = args.get("type").and_then(|v| v.as_str()).unwrap_or("self");
    let mode = args
        .get("attn_mode")
        .and_then(|v| v.as_str())
        .unwrap_or("full");
    let qk_rms = args
        .get("qk_rms_norm")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let (vb, check) = fx.weights(DType::F32)?;
    let x = sparse_input(fx, "coords", "x")?;
    let mut p = Produced::new();
    let mut inputs = vec!["coords", "x"];
    match ty {
        "self" => {
            let mode =
                AttnMode::from_args(mode, arg_opt_usize(&args, "window_size"), shift_arg(&args)?)?;
            let attn = SparseMultiHeadAttention::new_self(channels, heads, mode, qk_rms, vb)?;
            check.finish()?;
            let t = attn.self_projections(&x)?;
            p.insert("qkv".into(), t.qkv);
            if let Some(q) = t.q_normed {
                p.insert("q_normed".into(), q);
            }
            if let Some(k) = t.k_normed {
                p.insert("k_normed".into(), k);
            }
            p.insert("out".into(), attn.forward(&x)?.feats().clone());
            if let AttnMode::Windowed { window, shift } = mode {
                let part = x
                    .geometry()
                    .window_partition([window; 3], [shift as i32; 3])?;
                let n = x.rows();
                p.insert(
                    "window_xyz".into(),
                    Tensor::from_vec(part.window_xyz.clone(), (n, 3), &fx.device)?,
                );
                let lens: Vec<i32> = part.seq_lens.iter().map(|&l| l as i32).collect();
                let batch: Vec<i32> = part.seq_batch.iter().map(|&b| b as i32).collect();
                p.insert("window_seq_lens".into(), Tensor::new(lens, &fx.device)?);
                p.insert("window_seq_batch".into(), Tensor::new(batch, &fx.device)?);
            }
        }
        "cross" => {
            let ctx_channels = arg_opt_usize(&args, "ctx_channels").unwrap_or(channels);
            let attn =
                SparseMultiHeadAttention::new_cross(channels, ctx_channels, heads, qk_rms, vb)?;
            check.finish()?;
            p.insert(
                "out".into(),
                attn.forward_cross(&x, &fx.io("context")?)?.feats().clone(),
            );
            inputs.push("context");
        }
        other => bail!("SparseMultiHeadAttention type {other:?} unknown"),
    }
    Ok(Outcome::Checked(compare_all(
        fx,
        &p,
        &inputs,
        tol::FORWARD,
    )?))
}

/// `model:SLatFlowModel`: a float32 fixture (`out` + intermediates) or a `use_fp16` one
/// (`out_mixed_fp16` from the float16 torso, `out_fp32_same_weights` in float32).
fn slat_flow(fx: &mut Fixture) -> Result<Outcome> {
    let ModelConfig::SLatFlow { config, .. } = model_config(fx)? else {
        bail!("{}: config.json is not an SLatFlowModel", fx.dir.display());
    };
    let x = sparse_input(fx, "coords", "feats")?;
    let (t, cond) = (fx.io("t")?, fx.io("cond")?);
    let mut p = Produced::new();
    let run = |dtype: DType, p: &mut Produced, traced: bool| -> Result<Tensor> {
        let (vb, check) = fx.weights(DType::F32)?;
        let model = SLatFlowModel::new(&config, vb, dtype)?;
        check.finish()?;
        if traced {
            p.insert("t_emb".into(), model.timestep_embedding(&t)?);
            let mut hook = |name: &str, h: &SparseTensor| -> Result<Option<Tensor>> {
                p.insert(format!("{name}_feats"), h.feats().to_dtype(DType::F32)?);
                p.insert(format!("{name}_coords"), h.coords_tensor()?);
                Ok(None)
            };
            let out = model
                .forward_traced(&x, &t, &cond, &mut hook)?
                .feats()
                .clone();
            // Teacher forcing: every block starts from the original's recorded input, so each
            // block is checked on its own (an error is not carried into the later blocks).
            let mut hook = |name: &str, h: &SparseTensor| -> Result<Option<Tensor>> {
                let key = format!("{name}_feats");
                if !fx.has_io(&key) {
                    return Ok(None);
                }
                p.insert(
                    format!("{key} (teacher-forced)"),
                    h.feats().to_dtype(DType::F32)?,
                );
                Ok(Some(fx.io(&key)?))
            };
            let forced = model.forward_traced(&x, &t, &cond, &mut hook)?;
            p.insert("out (teacher-forced)".into(), forced.feats().clone());
            Ok(out)
        } else {
            Ok(model.forward(&x, &t, &cond)?.feats().clone())
        }
    };
    let mut default_tol = tol::FORWARD;
    if fx.has_io("out_mixed_fp16") || fx.has_io("out_fp32_same_weights") {
        if fx.has_io("out_mixed_fp16") {
            let out = run(DType::F16, &mut p, false)?;
            p.insert("out_mixed_fp16".into(), out);
            default_tol = tol::FP16;
        }
        if fx.has_io("out_fp32_same_weights") {
            let out = run(DType::F32, &mut p, false)?;
            p.insert("out_fp32_same_weights".into(), out);
        }
    } else {
        let dtype = if config.use_fp16 {
            DType::F16
        } else {
            DType::F32
        };
        let out = run(dtype, &mut p, true)?;
        p.insert("out".into(), out);
    }
    let mut report = compare_all(fx, &p, &["coords", "feats", "t", "cond"], default_tol)?;
    let mut forced: Vec<(&String, &Tensor)> = p
        .iter()
        .filter(|(k, _)| k.ends_with("(teacher-forced)"))
        .collect();
    forced.sort_by_key(|(k, _)| k.as_str());
    for (name, actual) in forced {
        let base = name.trim_end_matches(" (teacher-forced)");
        let tol = fx.stated_tolerance(base).unwrap_or(default_tol);
        report.close(name, actual, &fx.io(base)?, tol)?;
    }
    Ok(Outcome::Checked(report))
}

fn model_config(fx: &Fixture) -> Result<ModelConfig> {
    let cfg = fx
        .config
        .as_ref()
        .ok_or_else(|| anyhow!("{}: no config.json", fx.dir.display()))?;
    ModelConfig::from_json(&fx.dir.join("config.json").display().to_string(), cfg)
}

/// A hook that records `<prefix><i>_feats` / `<prefix><i>_coords` after every block.
fn record_blocks<'a>(
    p: &'a mut Produced,
    prefix: &'a str,
) -> impl FnMut(usize, &SparseTensor) -> Result<()> + 'a {
    move |i, h| {
        p.insert(
            format!("{prefix}{i}_feats"),
            h.feats().to_dtype(DType::F32)?,
        );
        p.insert(format!("{prefix}{i}_coords"), h.coords_tensor()?);
        Ok(())
    }
}

fn slat_encoder(fx: &mut Fixture) -> Result<Outcome> {
    let ModelConfig::SLatEncoder { config, .. } = model_config(fx)? else {
        bail!("{}: config.json is not an SLatEncoder", fx.dir.display());
    };
    let (vb, check) = fx.weights(DType::F32)?;
    let enc = SLatEncoder::new(&config, vb, DType::F32)?;
    check.finish()?;
    let x = sparse_input(fx, "coords", "feats")?;
    let mut p = Produced::new();
    let post = enc.forward_traced(&x, None, &mut record_blocks(&mut p, "block"))?;
    p.insert("z".into(), post.z.feats().clone());
    p.insert("mean".into(), post.mean);
    p.insert("logvar".into(), post.logvar);
    Ok(Outcome::Checked(compare_all(
        fx,
        &p,
        &["coords", "feats"],
        tol::FORWARD,
    )?))
}

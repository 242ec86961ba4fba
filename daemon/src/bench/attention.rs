//! `trellisd bench attention`: the fused attention kernel on TRELLIS's shapes, beside the device's
//! matrix-product rate, in TFLOP/s (4·Lq·Lk·D per head and batch element; 2·M·N·K for the
//! product). Shapes: the SS flow's self-attention (batch 2 under CFG, 4096 tokens, 16 × 64), its
//! cross-attention to DINOv2's 1374 tokens and to CLIP's 77, the SLat flow's variable-length
//! self-attention (two elements of ~3,900 tokens) and the decoders' 8³ windows (~20,000 voxels in
//! windows of at most 512), and text-xlarge's 16 × 80 heads. On a GPU: the tensor-core kernel in
//! the run's half dtype (float16 unless `--precision bf16`) in every build the GPU runs (mma.sync
//! with 64 and 128 query rows per block, with and without cp.async staging; on sm_90 also the
//! wgmma builds; `*` marks the tiling picked by default; a build whose output differs from the
//! 128-row mma.sync one is marked WRONG), against a cuBLAS 8192³ product in the same dtype;
//! on the CPU: the float32 kernel, against candle's float32 product of 2048³.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use trellis_kernels::attention::AttnGroup;

struct Case {
    name: &'static str,
    heads: usize,
    /// Head dimension.
    d: usize,
    groups: Vec<AttnGroup>,
    nq: usize,
    nk: usize,
}

fn dense(name: &'static str, batch: usize, lq: usize, lk: usize) -> Case {
    Case {
        name,
        heads: 16,
        d: 64,
        groups: (0..batch)
            .map(|i| AttnGroup {
                q: i * lq..(i + 1) * lq,
                kv: i * lk..(i + 1) * lk,
            })
            .collect(),
        nq: batch * lq,
        nk: batch * lk,
    }
}

fn cases() -> Vec<Case> {
    let mut windows = Vec::new();
    let mut start = 0;
    // ~20,000 voxels in windows of 8³ along a shell: sizes 20..512 in a fixed pattern.
    let mut i = 0u64;
    while start < 20_000 {
        let len = (20 + (i * 7919) % 493) as usize;
        let len = len.min(20_000 - start);
        windows.push(AttnGroup {
            q: start..start + len,
            kv: start..start + len,
        });
        start += len;
        i += 1;
    }
    vec![
        dense("SS flow self 1 x 4096", 1, 4096, 4096),
        dense("SS flow self 2 x 4096", 2, 4096, 4096),
        dense("SS flow cross 2 x 4096 -> 1374", 2, 4096, 1374),
        dense("text cross 2 x 4096 -> 77", 2, 4096, 77),
        Case {
            name: "SLat flow varlen 3,900 + 3,800",
            heads: 16,
            d: 64,
            groups: vec![
                AttnGroup {
                    q: 0..3900,
                    kv: 0..3900,
                },
                AttnGroup {
                    q: 3900..7700,
                    kv: 3900..7700,
                },
            ],
            nq: 7700,
            nk: 7700,
        },
        Case {
            name: "decoder windows 20,000 (12 heads)",
            heads: 12,
            d: 64,
            groups: windows,
            nq: 20_000,
            nk: 20_000,
        },
        Case {
            d: 80,
            ..dense("text-xlarge self 2 x 4096 (16 x 80)", 2, 4096, 4096)
        },
    ]
}

fn flops(c: &Case) -> f64 {
    let d = c.d;
    c.groups
        .iter()
        .map(|g| 4.0 * g.q.len() as f64 * g.kv.len() as f64 * d as f64)
        .sum::<f64>()
        * c.heads as f64
}

/// Median seconds of `reps` synchronised runs of `f` after one warm-up.
fn time(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(super::median(&t))
}

pub fn run(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let dtype = if dev.is_cuda() {
        match crate::runtime::precision::get() {
            crate::runtime::precision::PrecisionChoice::Bf16 => DType::BF16,
            _ => DType::F16,
        }
    } else {
        DType::F32
    };
    let n = if dev.is_cuda() { 8192 } else { 2048 };
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let reps = if dev.is_cuda() { 10 } else { 2 };
    let s = time(dev, reps, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    let mm = 2.0 * (n as f64).powi(3) / s / 1e12;
    writeln!(
        out,
        "matrix product {n}^3 {dtype:?}: {:.2} ms, {mm:.1} TFLOP/s",
        s * 1e3
    )?;
    for c in cases() {
        let d = c.d;
        let q = Tensor::randn(0f32, 1.0, (c.nq, c.heads, d), dev)?.to_dtype(dtype)?;
        let k = Tensor::randn(0f32, 1.0, (c.nk, c.heads, d), dev)?.to_dtype(dtype)?;
        let v = Tensor::randn(0f32, 1.0, (c.nk, c.heads, d), dev)?.to_dtype(dtype)?;
        // (label, seconds) per tiling
        let mut runs: Vec<(String, f64)> = Vec::new();
        if dev.is_cuda() {
            #[cfg(feature = "cuda")]
            {
                use crate::runtime::cuda_ops::{device_arch, flash_attention_tiled, FlashTiling};
                let arch = match dev {
                    Device::Cuda(d) => device_arch(d),
                    _ => 0,
                };
                let pick = FlashTiling::for_groups(&c.groups, arch);
                // Every build is also compared with the mma.sync 128-row kernel's output, so a
                // wrong kernel cannot pass for a fast one.
                let run = |t: FlashTiling| -> Result<Tensor> {
                    Ok(flash_attention_tiled(&q, &k, &v, &c.groups, None, Some(t))?
                        .to_dtype(DType::F32)?)
                };
                let reference = run(FlashTiling::new(128, true))?;
                for tiling in FlashTiling::VARIANTS {
                    if !tiling.runs_on(arch) {
                        continue;
                    }
                    let diff = (run(tiling)? - &reference)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    let s = time(dev, reps, || {
                        flash_attention_tiled(&q, &k, &v, &c.groups, None, Some(tiling))?;
                        Ok(())
                    })?;
                    let mut label = tiling.label();
                    if tiling == pick {
                        label.push_str(" *");
                    }
                    if diff > 2e-2 {
                        label.push_str(&format!(" WRONG (max |diff| {diff:.2e})"));
                    }
                    runs.push((label, s));
                }
            }
            #[cfg(not(feature = "cuda"))]
            {
                anyhow::bail!("a CUDA device in a build without CUDA")
            }
        } else {
            let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            let (qv, kv, vv) = (flat(&q)?, flat(&k)?, flat(&v)?);
            let shape = trellis_kernels::attention::AttnShape {
                heads: c.heads,
                head_dim: d,
                v_dim: d,
            };
            let scale = 1.0 / (d as f32).sqrt();
            let s = time(dev, 1, || {
                trellis_kernels::attention::varlen_attention(
                    &qv, &kv, &vv, &c.groups, shape, scale,
                )?;
                Ok(())
            })?;
            runs.push(("f32 kernel".into(), s));
        }
        for (label, s) in runs {
            let rate = flops(&c) / s / 1e12;
            writeln!(
                out,
                "{:<40} {:<16} {:>9.3} ms  {:>7.1} TFLOP/s  ({:.0}% of the product's rate)",
                c.name,
                label,
                s * 1e3,
                rate,
                100.0 * rate / mm
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_cover_their_rows_and_count_flops() {
        for c in cases() {
            let rows: usize = c.groups.iter().map(|g| g.q.len()).sum();
            assert_eq!(rows, c.nq, "{}", c.name);
            assert!(c.groups.iter().all(|g| g.kv.end <= c.nk), "{}", c.name);
        }
        let c = dense("x", 1, 10, 20);
        assert_eq!(flops(&c), 4.0 * 10.0 * 20.0 * 64.0 * 16.0);
    }
}

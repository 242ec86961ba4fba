//! `trellisd bench sparse-conv`: the half-precision tensor-core sparse conv on the SLat flow's io
//! block shapes (a 20,000-voxel shell at 64^3 and its 2x-downsampled geometry), every tiling
//! (`TRELLIS_CONV_TILE` / `TRELLIS_CONV_ORDER` values) side by side in one process, in TFLOP/s of
//! useful products (2 x neighbour pairs x Cin x Cout). On any device it first prints the tiles'
//! mean active kernel offsets in storage order and in neighbour-mask order (the steps the kernels
//! run are those times the channel slices); the timings need a CUDA device.
//!
//! The 2048 -> 128 case reads its rows through `nbr >> 3` (src_shift 3) from a feats table of
//! rows / 8 parents; its neighbour map is the shell's own. (The flow's upsampling block reads
//! its 3,928 coarse rows through the upsample's index instead, `SparseConv3d::forward_upsampled`:
//! the gather pattern differs, the work is the same.)

use std::io::Write;
#[cfg(feature = "cuda")]
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use trellis_kernels::sparse_conv::{mask_order, submanifold_neighbours, NeighbourMap};

/// One conv of the flow: label, geometry (0: the shell, 1: its 2x downsample), channels, shift.
#[cfg(feature = "cuda")]
struct Case {
    name: &'static str,
    coarse: bool,
    cin: usize,
    cout: usize,
    src_shift: u32,
}

#[cfg(feature = "cuda")]
const CASES: [Case; 4] = [
    Case {
        name: "up block 2048->128, shift 3",
        coarse: false,
        cin: 2048,
        cout: 128,
        src_shift: 3,
    },
    Case {
        name: "io 128->128",
        coarse: false,
        cin: 128,
        cout: 128,
        src_shift: 0,
    },
    Case {
        name: "down 128->1024",
        coarse: true,
        cin: 128,
        cout: 1024,
        src_shift: 0,
    },
    Case {
        name: "down 1024->1024",
        coarse: true,
        cin: 1024,
        cout: 1024,
        src_shift: 0,
    },
];

/// The shell's coords halved (x / 2, y / 2, z / 2), deduplicated, in lexicographic order.
fn downsample(coords: &[i32]) -> Vec<i32> {
    let mut c: Vec<[i32; 4]> = coords
        .chunks_exact(4)
        .map(|r| [r[0], r[1] / 2, r[2] / 2, r[3] / 2])
        .collect();
    c.sort_unstable();
    c.dedup();
    c.into_iter().flatten().collect()
}

/// Mean number of kernel offsets with a neighbour for some row of a `tile`-row tile, rows taken
/// in `order` (storage order when `None`).
pub fn mean_active_offsets(map: &NeighbourMap, tile: usize, order: Option<&[i32]>) -> f64 {
    let rows = map.rows;
    if rows == 0 || tile == 0 {
        return 0.0;
    }
    let v = map.volume;
    let mut total = 0usize;
    for t0 in (0..rows).step_by(tile) {
        let mut mask = 0u64;
        for i in t0..(t0 + tile).min(rows) {
            let r = order.map_or(i, |o| o[i] as usize);
            for k in 0..v.min(64) {
                if map.table[r * v + k] >= 0 {
                    mask |= 1 << k;
                }
            }
        }
        total += mask.count_ones() as usize;
    }
    total as f64 / rows.div_ceil(tile) as f64
}

pub fn run(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let fine = super::shell_coords(64, 20_000);
    let coarse = downsample(&fine);
    let maps = [
        submanifold_neighbours(&fine, [3, 3, 3])?,
        submanifold_neighbours(&coarse, [3, 3, 3])?,
    ];
    for (name, map) in ["shell", "2x downsample"].iter().zip(&maps) {
        let pairs = map.table.iter().filter(|&&s| s >= 0).count();
        let order = mask_order(&map.table, map.volume);
        writeln!(
            out,
            "{name}: {} rows, {:.1} neighbours per row; active offsets per tile of 128 rows {:.1} \
             (mask order {:.1}), of 64 rows {:.1} (mask order {:.1})",
            map.rows,
            pairs as f64 / map.rows.max(1) as f64,
            mean_active_offsets(map, 128, None),
            mean_active_offsets(map, 128, Some(&order)),
            mean_active_offsets(map, 64, None),
            mean_active_offsets(map, 64, Some(&order)),
        )?;
    }
    if !dev.is_cuda() {
        writeln!(out, "(the kernel timings need a CUDA device)")?;
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    time_tilings(dev, &maps, out)?;
    Ok(())
}

#[cfg(feature = "cuda")]
fn time_tilings(dev: &Device, maps: &[NeighbourMap; 2], out: &mut dyn Write) -> Result<()> {
    use crate::runtime::cuda_ops::{
        conv_async, conv_gemm_weight, sparse_conv_gemm_gather, sparse_conv_half_with, ConvTile,
    };
    use candle_core::{DType, Tensor};
    let dtype = match crate::runtime::precision::get() {
        crate::runtime::precision::PrecisionChoice::Bf16 => DType::BF16,
        _ => DType::F16,
    };
    let mut tilings: Vec<(String, ConvTile, bool)> = [64, 128]
        .into_iter()
        .map(|rows| {
            let t = ConvTile::Mma {
                rows,
                staged_async: conv_async(),
            };
            (format!("old m{rows}"), t, false)
        })
        .collect();
    for (label, t) in ConvTile::K64_LABELS {
        tilings.push((label.to_string(), t, false));
        tilings.push((format!("{label} ordered"), t, true));
    }
    tilings.push(("gemm first".to_string(), ConvTile::GemmGather, false));
    let reps = 20;
    for case in &CASES {
        let map = &maps[usize::from(case.coarse)];
        let rows = map.rows;
        let pairs = map.table.iter().filter(|&&s| s >= 0).count();
        let flops = 2.0 * pairs as f64 * case.cin as f64 * case.cout as f64;
        let sources = rows.div_ceil(1 << case.src_shift);
        let feats = Tensor::randn(0f32, 1.0, (sources, case.cin), dev)?.to_dtype(dtype)?;
        let scale = 1.0 / ((27 * case.cin) as f64).sqrt();
        let weight =
            (Tensor::randn(0f32, 1.0, (case.cout, 27, case.cin), dev)? * scale)?.to_dtype(dtype)?;
        let bias = Tensor::zeros(case.cout, DType::F32, dev)?;
        let w_kc = conv_gemm_weight(&weight)?;
        let nbr = Tensor::from_slice(&map.table, map.table.len(), dev)?;
        let order = mask_order(&map.table, map.volume);
        let order = Tensor::from_vec(order, rows, dev)?;
        let mut reference: Option<Tensor> = None;
        for (label, tile, ordered) in &tilings {
            let o = if *ordered { Some(&order) } else { None };
            // the GEMM-first path with its reordered weight made once, as the conv layer keeps it
            let run = || {
                if *tile == ConvTile::GemmGather {
                    let b = Some(&bias);
                    sparse_conv_gemm_gather(&feats, &nbr, &w_kc, b, case.src_shift, 27)
                } else {
                    sparse_conv_half_with(
                        &feats,
                        &nbr,
                        &weight,
                        Some(&bias),
                        case.src_shift,
                        *tile,
                        o,
                    )
                }
            };
            let y = run()?.to_dtype(DType::F32)?;
            dev.synchronize()?;
            let mut t = Vec::with_capacity(reps);
            for _ in 0..reps {
                let s = Instant::now();
                run()?;
                dev.synchronize()?;
                t.push(s.elapsed().as_secs_f64());
            }
            let s = super::median(&t);
            // the largest difference from the first tiling's output, relative to its largest value
            let diff = match &reference {
                None => {
                    reference = Some(y);
                    0.0
                }
                Some(r) => {
                    let d = (&y - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let m = r.abs()?.max_all()?.to_scalar::<f32>()?;
                    d / m.max(1e-30)
                }
            };
            writeln!(
                out,
                "{:<28} {rows:>6} rows {:<16} {:>8.3} ms {:>7.1} TFLOP/s  (max diff vs old m64 {diff:.1e})",
                case.name,
                label,
                s * 1e3,
                flops / s / 1e12,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_halves_and_dedups() {
        let c = [0, 0, 0, 0, 0, 1, 1, 1, 0, 2, 0, 0, 1, 3, 3, 3];
        assert_eq!(downsample(&c), vec![0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn mask_order_never_adds_active_offsets_on_a_shell() {
        let coords = super::super::shell_coords(32, 3000);
        let map = submanifold_neighbours(&coords, [3, 3, 3]).unwrap();
        let order = mask_order(&map.table, map.volume);
        let plain = mean_active_offsets(&map, 128, None);
        let sorted = mean_active_offsets(&map, 128, Some(&order));
        assert!(plain > 0.0 && plain <= 27.0);
        assert!(sorted <= plain, "{sorted} > {plain}");
    }
}

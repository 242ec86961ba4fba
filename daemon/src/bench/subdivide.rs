//! `trellisd bench subdivide-conv`: the first convolution of the mesh decoder's
//! `SparseSubdivideBlock3d`, computed both ways in one process on the same data: the explicit
//! way (`SparseSubdivide` copies every voxel's feats to its 8 children, then a 3×3×3 submanifold
//! conv on the fine grid) and `subdivided_conv` (the same values from the coarse rows, 8 merged
//! taps per child). Shapes are the official upsample block 0 (768 → 192 channels) on a voxel
//! shell at 64³ (5,000 voxels, so the explicit path stays under a minute on 2 cores).

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use trellis_kernels::sparse_conv::{
    subdivide_coords, subdivided_conv, submanifold_conv, submanifold_neighbours,
};

use super::{lcg_vec, shell_coords};

const VOXELS: usize = 5_000;
const CIN: usize = 768;
const COUT: usize = 192;

pub fn run(_dev: &candle_core::Device, out: &mut dyn Write) -> Result<()> {
    let coords = shell_coords(64, VOXELS);
    let n = coords.len() / 4;
    let feats = lcg_vec(n * CIN, 1);
    let weight: Vec<f32> = lcg_vec(COUT * 27 * CIN, 2)
        .into_iter()
        .map(|w| w / (27.0 * CIN as f32).sqrt())
        .collect();
    let bias = lcg_vec(COUT, 3);
    writeln!(
        out,
        "subdivide-conv: {n} voxels at 64^3 -> {} children, {CIN} -> {COUT} channels, threads {}",
        8 * n,
        rayon::current_num_threads()
    )?;

    let t = Instant::now();
    let fine_coords = subdivide_coords(&coords);
    let fine_feats: Vec<f32> = feats
        .chunks_exact(CIN)
        .flat_map(|row| std::iter::repeat_n(row, 8).flatten().copied())
        .collect();
    let fine_map = submanifold_neighbours(&fine_coords, [3, 3, 3])?;
    let explicit = submanifold_conv(&fine_feats, CIN, &fine_map, &weight, Some(&bias), COUT)?;
    let t_explicit = t.elapsed().as_secs_f64();
    let copied_mib = (fine_feats.len() * 4) as f64 / (1 << 20) as f64;
    drop(fine_feats);

    let t = Instant::now();
    let map = submanifold_neighbours(&coords, [3, 3, 3])?;
    let merged = subdivided_conv(&feats, CIN, &map, &weight, Some(&bias), COUT)?;
    let t_merged = t.elapsed().as_secs_f64();

    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in merged.iter().zip(&explicit) {
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let flop = |taps: f64, rows: f64| 2.0 * taps * rows * (CIN * COUT) as f64 / 1e9;
    writeln!(
        out,
        "  explicit subdivide + conv: {t_explicit:.2} s ({:.0} GFLOP; the 8x copy of the input is {copied_mib:.0} MiB)",
        flop(27.0, (8 * n) as f64)
    )?;
    writeln!(
        out,
        "  subdivided_conv:           {t_merged:.2} s ({:.0} GFLOP, no copy)",
        flop(8.0, (8 * n) as f64)
    )?;
    writeln!(
        out,
        "  speed-up {:.2}x; rel L2 between the two {:.2e}",
        t_explicit / t_merged,
        (num / den.max(1e-300)).sqrt()
    )?;
    Ok(())
}

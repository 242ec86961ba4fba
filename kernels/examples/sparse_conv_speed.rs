//! Times `submanifold_conv` (3x3x3) on a thick spherical shell: `cargo run --release -p
//! trellis-kernels --example sparse_conv_speed [RES] [CHANNELS] [REPEATS]` (default 128^3, 96 ch,
//! the size class of the mesh decoder's second upsampling stage).

use std::time::Instant;

use trellis_kernels::sparse_conv::{submanifold_conv, submanifold_neighbours};

fn main() {
    let mut args = std::env::args().skip(1);
    let res: i32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let ch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(96);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let c = res as f32 / 2.0;
    let mut coords = Vec::new();
    for x in 0..res {
        for y in 0..res {
            for z in 0..res {
                let d = [x, y, z].map(|v| v as f32 + 0.5 - c);
                let r = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
                if (r - 0.375 * res as f32).abs() < 1.5 {
                    coords.extend([0, x, y, z]);
                }
            }
        }
    }
    let n = coords.len() / 4;
    let map = submanifold_neighbours(&coords, [3, 3, 3]).expect("valid coords");
    let pairs = map.table.iter().filter(|&&j| j >= 0).count();
    let mut s = 7u64;
    let mut val = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let feats: Vec<f32> = (0..n * ch).map(|_| val()).collect();
    let weight: Vec<f32> = (0..ch * 27 * ch).map(|_| val()).collect();
    for _ in 0..reps {
        let t = Instant::now();
        let y = submanifold_conv(&feats, ch, &map, &weight, None, ch).expect("valid sizes");
        let secs = t.elapsed().as_secs_f64();
        let gflop = 2.0 * pairs as f64 * (ch * ch) as f64 / 1e9;
        let sum: f64 = y.iter().map(|v| v.abs() as f64).sum::<f64>() / y.len() as f64;
        println!(
            "{n} voxels ({:.1} neighbours each), {ch}->{ch}: {secs:.3}s, {:.1} GFLOP/s, checksum {sum:.6}",
            pairs as f64 / n as f64,
            gflop / secs
        );
    }
}

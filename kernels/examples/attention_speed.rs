//! Times `varlen_attention` on one full self-attention group (default: the SLat flow's 3,928
//! coarse tokens, 16 heads of 64): `cargo run --release -p trellis-kernels --example
//! attention_speed [TOKENS] [REPEATS]`.

use std::time::Instant;

use trellis_kernels::attention::{varlen_attention, AttnGroup, AttnShape};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3928);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let (h, d) = (16, 64);
    let mut s = 1u64;
    let mut val = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let q: Vec<f32> = (0..n * h * d).map(|_| val()).collect();
    let k: Vec<f32> = (0..n * h * d).map(|_| val()).collect();
    let v: Vec<f32> = (0..n * h * d).map(|_| val()).collect();
    let groups = [AttnGroup { q: 0..n, kv: 0..n }];
    let shape = AttnShape {
        heads: h,
        head_dim: d,
        v_dim: d,
    };
    for _ in 0..reps {
        let t = Instant::now();
        let o = varlen_attention(&q, &k, &v, &groups, shape, 0.125).expect("valid shapes");
        let secs = t.elapsed().as_secs_f64();
        let gflop = 4.0 * (n * n * h * d) as f64 / 1e9;
        let sum: f64 = o.iter().map(|x| x.abs() as f64).sum::<f64>() / o.len() as f64;
        println!(
            "{n} tokens, {h}x{d}: {secs:.3}s, {:.1} GFLOP/s, checksum {sum:.6}",
            gflop / secs
        );
    }
}

//! Float32 `x [M, K] · Wᵀ + b` (W `[N, K]`, the Linear layers' shapes in DINOv2-L and the flows)
//! through `sgemm` (weights packed once) and through the `gemm` crate the way candle calls it
//! (bias added by a separate pass, as candle's Linear does), on 1 and 2 rayon threads; best of
//! REPEATS runs, GFLOP/s:
//! `cargo run --release -p trellis-kernels --example sgemm_speed [REPEATS] [KC] [MC]`.

use std::time::Instant;

use trellis_kernels::sgemm::{self, Activation, Blocking, PackedWeights};

const SHAPES: [(usize, usize, usize); 8] = [
    (1374, 1024, 1024),
    (1374, 1024, 3072),
    (1374, 1024, 4096),
    (1374, 4096, 1024),
    (4096, 1024, 1024),
    (4096, 1024, 3072),
    (4096, 1024, 4096),
    (3928, 4096, 1024),
];

fn gemm_crate(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: y is m x n row-major, x m x k row-major, w n x k row-major read as its transpose.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    };
    for row in y.chunks_exact_mut(n) {
        for (v, bv) in row.iter_mut().zip(b) {
            *v += bv;
        }
    }
}

/// CPU seconds this thread has run (what a loaded machine's time slicing does not inflate).
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let reps = arg(1, 3);
    let def = Blocking::default();
    let blocking = Blocking {
        kc: arg(2, def.kc),
        mc: arg(3, def.mc),
    };
    let only = std::env::var("SHAPES").ok();
    println!("sgemm available: {}, {blocking:?}", sgemm::available());
    let mut s = 1u64;
    let mut val = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    // MKN=m,k,n[;m,k,n...] replaces the shape list
    let custom: Vec<(usize, usize, usize)> = std::env::var("MKN")
        .ok()
        .map(|v| {
            v.split(';')
                .filter_map(|t| {
                    let d: Vec<usize> = t.split(',').filter_map(|x| x.parse().ok()).collect();
                    (d.len() == 3).then(|| (d[0], d[1], d[2]))
                })
                .collect()
        })
        .unwrap_or_else(|| SHAPES.to_vec());
    for (i, (m, k, n)) in custom.into_iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|v| v == i.to_string()))
        {
            continue;
        }
        let x: Vec<f32> = (0..m * k).map(|_| val()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| val()).collect();
        let b: Vec<f32> = (0..n).map(|_| val()).collect();
        let t = Instant::now();
        let pw = PackedWeights::pack(&w, n, k).expect("AVX-512F and FMA");
        let pack_s = t.elapsed().as_secs_f64();
        let mut y0 = vec![0f32; m * n];
        let mut y1 = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let mut line = format!("M={m:5} K={k:5} N={n:5} (pack {:5.1} ms)", pack_s * 1e3);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let (mut best_g, mut best_s) = (f64::INFINITY, f64::INFINITY);
            let (mut cpu_g, mut cpu_s) = (f64::INFINITY, f64::INFINITY);
            pool.install(|| {
                for _ in 0..=reps {
                    let (t, c) = (Instant::now(), thread_cpu_s());
                    gemm_crate(&mut y0, &x, &w, &b, (m, k, n));
                    best_g = best_g.min(t.elapsed().as_secs_f64());
                    cpu_g = cpu_g.min(thread_cpu_s() - c);
                    let (t, c) = (Instant::now(), thread_cpu_s());
                    sgemm::linear_with(&x, m, &pw, Some(&b), Activation::None, &mut y1, blocking);
                    best_s = best_s.min(t.elapsed().as_secs_f64());
                    cpu_s = cpu_s.min(thread_cpu_s() - c);
                }
            });
            let diff = y0
                .iter()
                .zip(&y1)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            line += &format!(
                " | {threads}t gemm {:6.1} sgemm {:6.1} GFLOP/s (max diff {diff:.1e})",
                flop / best_g / 1e9,
                flop / best_s / 1e9
            );
            if threads == 1 {
                // per CPU second of the (only) thread: unaffected by other processes' slices
                line += &format!(
                    " [cpu-time gemm {:6.1} sgemm {:6.1}]",
                    flop / cpu_g / 1e9,
                    flop / cpu_s / 1e9
                );
            }
        }
        println!("{line}");
    }
}

//! Vectorised float32 row primitives for the CPU kernels: softmax, tanh-GELU, layer-norm
//! statistics, and the `exp` / `tanh` they are built on.
//!
//! The code is plain Rust over 16-lane arrays, written so that the compiler turns each lane loop
//! into SIMD instructions; every public function picks, once per process, a copy compiled for
//! AVX-512F, for AVX2 + FMA, or for the baseline target (`is_x86_feature_detected!`). All copies
//! compute the same formulas, so results differ between them only by floating-point contraction
//! (FMA), far inside the parity tolerances.
//!
//! `exp` uses a Cody–Waite reduction `x = n ln2 + r`, `|r| <= ln2/2`, and the classic Cephes
//! degree-6 polynomial for `e^r` (relative error about 1e-7 over the float32 range); inputs are
//! clamped to `[-87.3, 88.4]`, so `exp(-inf)` gives about 1e-38 instead of 0, which only
//! matters below float32's normal range.

const LANES: usize = 16;

/// Picks the widest compiled copy of a function the CPU runs: `dispatch!(name(args))` calls
/// `name_avx512`, `name_avx2` or `name_base`.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($a: $t),*) $(-> $r)? { body($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn mid($($a: $t),*) $(-> $r)? { body($($a),*) }
                match level() {
                    // SAFETY: `level` reported that this CPU has the features the copy is compiled for.
                    Level::Avx512 => return unsafe { wide($($a),*) },
                    Level::Avx2 => return unsafe { mid($($a),*) },
                    Level::Base => {}
                }
            }
            body($($a),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    Base,
}

#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var_os("TRELLIS_NO_SIMD").is_some() {
            Level::Base
        } else if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            Level::Avx512
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Level::Avx2
        } else {
            Level::Base
        }
    })
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds a float below 2^22 in magnitude to the nearest integer, which
/// then sits in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x` for one value, branch-free (see the module doc).
#[inline(always)]
fn exp1(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.376_26);
    let t = x * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    // the integer n, from the low mantissa bits of t
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n, n in [-126, 127]
    er * f32::from_bits((ni.wrapping_add(127) << 23) as u32)
}

/// [`exp1`] on 16 lanes with AVX-512, the polynomial and the reduction on fused multiply-adds
/// (so it may differ from `exp1` in the last bit).
///
/// # Safety
/// The CPU has AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let s = _mm512_set1_ps;
    let x = _mm512_min_ps(_mm512_max_ps(x, s(-87.336_54)), s(88.376_26));
    let t = _mm512_add_ps(_mm512_mul_ps(x, s(LOG2E)), s(ROUND_MAGIC));
    let n = _mm512_sub_ps(t, s(ROUND_MAGIC));
    let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000));
    let r = _mm512_fnmadd_ps(n, s(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, s(LN2_LO), r);
    let mut p = s(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, s(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, s(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, s(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, s(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, s(0.5));
    let er = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), s(1.0));
    let pow = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        ni,
        _mm512_set1_epi32(127),
    )));
    _mm512_mul_ps(er, pow)
}

/// `tanh(x)` as `1 - 2 / (e^{2x} + 1)`, with `x` clamped to ±9 (tanh is 1 to float32 precision
/// beyond); small `|x|` use the odd Taylor series, where the formula above loses digits.
#[inline(always)]
fn tanh1(x: f32) -> f32 {
    let xc = x.clamp(-9.0, 9.0);
    let e = exp1(2.0 * xc);
    let big = 1.0 - 2.0 / (e + 1.0);
    let x2 = xc * xc;
    // x - x^3/3 + 2x^5/15 - 17x^7/315: error < 1e-8 for |x| < 0.0625
    let small = xc * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))));
    if xc.abs() < 0.0625 {
        small
    } else {
        big
    }
}

multiversion! {
    /// `x[i] = e^{x[i]}` in place.
    pub fn exp_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = exp1(*v);
        }
    }
}

/// Softmax of `scale * x` for one row, in place: `x[i] = e^{scale x[i] - m} / Σ` with `m`
/// the largest `scale x[i]`.
pub fn softmax_row(x: &mut [f32], scale: f32) {
    let sum = exp_shifted_row(x, scale);
    let inv = 1.0 / sum;
    scale_in_place(x, inv);
}

multiversion! {
    /// The unnormalised softmax of `scale * x` in place, `x[i] = e^{scale x[i] - m}` with `m`
    /// the largest `scale x[i]`; returns `Σ x[i]` (summed in 16 float32 lanes), by which the
    /// caller divides (attention divides its output rows instead of the scores).
    pub fn exp_shifted_row(x: &mut [f32], scale: f32) -> f32 {
        if x.is_empty() {
            return 1.0;
        }
        let mut scale = scale;
        if scale < 0.0 {
            // the maximum of scale * x is then not scale * max(x): fold the scale in first
            x.iter_mut().for_each(|v| *v *= scale);
            scale = 1.0;
        }
        let mut mx = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                mx[l] = mx[l].max(c[l]);
            }
        }
        let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for m in mx {
            max = max.max(m);
        }
        let shift = max * scale;
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let e = exp1(c[l] * scale - shift);
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut sum = 0f32;
        for v in chunks.into_remainder() {
            *v = exp1(*v * scale - shift);
            sum += *v;
        }
        sum + acc.iter().sum::<f32>()
    }
}

multiversion! {
    /// `x[i] *= s`.
    pub fn scale_in_place(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

multiversion! {
    /// GELU, tanh approximation (`torch.nn.GELU(approximate="tanh")`), in place:
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    pub fn gelu_tanh_in_place(x: &mut [f32]) {
        const C: f32 = 0.797_884_6; // sqrt(2 / pi)
        for v in x.iter_mut() {
            let u = *v;
            *v = 0.5 * u * (1.0 + tanh1(C * u * (1.0 + 0.044715 * u * u)));
        }
    }
}

/// `erf(x)`, Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), branch-free.
#[inline(always)]
fn erf1(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp1(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

multiversion! {
    /// GELU, exact form (`torch.nn.GELU()`), in place: `0.5 x (1 + erf(x / sqrt 2))`.
    pub fn gelu_erf_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            let u = *v;
            *v = 0.5 * u * (1.0 + erf1(u * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// Two-pass statistics of one row: `(mean, biased variance)`, summed in 16 lanes.
    pub fn mean_var(x: &[f32]) -> (f32, f32) {
        let n = x.len().max(1) as f32;
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        let rest: f32 = chunks.remainder().iter().sum();
        let mean = (rest + acc.iter().sum::<f32>()) / n;
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let d = c[l] - mean;
                acc[l] += d * d;
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
        (mean, (rest + acc.iter().sum::<f32>()) / n)
    }
}

multiversion! {
    /// `dst[i] = (x[i] - mean) * rstd * w[i] + b[i]` (`w`, `b` optional, the length of `x`),
    /// then, with `modulation = Some((shift, scale))`, `dst[i] = dst[i] * (1 + scale[i]) + shift[i]`.
    pub fn normalize_row(
        x: &[f32],
        mean: f32,
        rstd: f32,
        affine: Option<(&[f32], &[f32])>,
        modulation: Option<(&[f32], &[f32])>,
        dst: &mut [f32]
    ) {
        match affine {
            Some((w, b)) => {
                for i in 0..x.len() {
                    dst[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            }
            None => {
                for i in 0..x.len() {
                    dst[i] = (x[i] - mean) * rstd;
                }
            }
        }
        if let Some((shift, scale)) = modulation {
            for i in 0..x.len() {
                dst[i] = dst[i] * (1.0 + scale[i]) + shift[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_matches_libm() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")) {
            return;
        }
        /// # Safety
        /// AVX-512F and FMA.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn exp_all(xs: &[f32]) -> Vec<f32> {
            use std::arch::x86_64::*;
            let mut out = vec![0f32; xs.len()];
            for (c, o) in xs.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                _mm512_storeu_ps(o.as_mut_ptr(), exp_avx512(_mm512_loadu_ps(c.as_ptr())));
            }
            out
        }
        // a whole number of 16-lane vectors
        let xs: Vec<f32> = (-8700..8804).map(|i| i as f32 * 0.01).collect();
        // SAFETY: AVX-512F and FMA were detected.
        let ys = unsafe { exp_all(&xs) };
        let mut worst = 0f64;
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).exp();
            worst = worst.max(((*y as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let xs: Vec<f32> = (-8700..8800).map(|i| i as f32 * 0.01).collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).exp();
            worst = worst.max(((*y as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        let mut edge = [-1000f32, -87.5, 0.0, 88.3];
        exp_in_place(&mut edge);
        assert!(edge[0] >= 0.0 && edge[0] < 1e-37, "{}", edge[0]);
        assert_eq!(edge[2], 1.0);
        assert!(edge[3].is_finite() && edge[3] > 2e38);
    }

    #[test]
    fn softmax_and_gelu_match_float64() {
        let row: Vec<f32> = (0..1037)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        let mut got = row.clone();
        softmax_row(&mut got, 0.125);
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let e: Vec<f64> = row
            .iter()
            .map(|&v| ((v as f64 - m) * 0.125).exp())
            .collect();
        let z: f64 = e.iter().sum();
        for (g, w) in got.iter().zip(&e) {
            assert!(
                (*g as f64 - w / z).abs() < 1e-6 * (w / z) + 1e-9,
                "{g} vs {}",
                w / z
            );
        }
        let xs: Vec<f32> = (-600..600).map(|i| i as f32 * 0.017).collect();
        let mut g = xs.clone();
        gelu_tanh_in_place(&mut g);
        for (x, y) in xs.iter().zip(&g) {
            let x = *x as f64;
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!(
                (*y as f64 - want).abs() < 5e-7 * (1.0 + want.abs()),
                "gelu({x}) = {y}, want {want}"
            );
        }
    }

    #[test]
    fn gelu_erf_matches_float64() {
        // erf of float64 via its Taylor series (|x| <= 6 / sqrt 2 converges in < 200 terms)
        fn erf64(x: f64) -> f64 {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 * sum.abs().max(1e-300) {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let xs: Vec<f32> = (-600..600).map(|i| i as f32 * 0.01).collect();
        let mut g = xs.clone();
        gelu_erf_in_place(&mut g);
        for (x, y) in xs.iter().zip(&g) {
            let x = *x as f64;
            let want = 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            assert!(
                (*y as f64 - want).abs() < 5e-7 * (1.0 + want.abs()),
                "gelu({x}) = {y}, want {want}"
            );
        }
    }

    #[test]
    fn normalize_matches_the_formula() {
        let x: Vec<f32> = (0..70)
            .map(|i| (i as f32 * 0.7).sin() * 3.0 + 1.0)
            .collect();
        let (mean, var) = mean_var(&x);
        let m64 = x.iter().map(|&v| v as f64).sum::<f64>() / 70.0;
        let v64 = x.iter().map(|&v| (v as f64 - m64).powi(2)).sum::<f64>() / 70.0;
        assert!((mean as f64 - m64).abs() < 1e-6 && (var as f64 - v64).abs() < 1e-5);
        let w: Vec<f32> = (0..70).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..70).map(|i| i as f32 * -0.02).collect();
        let mut y = vec![0f32; 70];
        let rstd = 1.0 / (var + 1e-6).sqrt();
        normalize_row(&x, mean, rstd, Some((&w, &b)), Some((&b, &w)), &mut y);
        for i in 0..70 {
            let n = (x[i] - mean) * rstd * w[i] + b[i];
            let want = n * (1.0 + w[i]) + b[i];
            assert!((y[i] - want).abs() < 1e-5, "{i}: {} vs {want}", y[i]);
        }
    }
}

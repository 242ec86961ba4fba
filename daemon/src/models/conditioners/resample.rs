//! Separable convolution resampling as Pillow does it (`libImaging/Resample.c`), which
//! `TrellisImageTo3DPipeline.preprocess_image` relies on through `Image.resize(.., LANCZOS)`, and the
//! same kernel in floating point for torch's `interpolate(mode="bicubic", antialias=True)` (used by
//! the DINOv2 position-embedding interpolation; torch ported Pillow's antialiased kernels).
//!
//! Pillow's 8-bit path: per output sample the filter weights (support scaled by the reduction
//! factor, normalised to sum 1) are converted to fixed point with 22 fraction bits, rounded away
//! from zero; each pass accumulates `pixel * weight` on top of a half-unit bias and keeps
//! `clamp(sum >> 22, 0, 255)`. The horizontal pass runs first, over the source rows the vertical
//! pass needs, and its output is stored as 8-bit before the vertical pass.

/// A resampling filter of Pillow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Truncated sinc, support 3 (`Image.Resampling.LANCZOS`).
    Lanczos,
    /// Cubic convolution with a = -0.5, support 2 (`BICUBIC`, also torch's antialiased bicubic).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// The filter taps of every output sample along one axis.
#[derive(Debug, Clone)]
pub struct Coeffs {
    /// Taps per output sample (the stride of `weights`).
    pub ksize: usize,
    /// Per output sample: first source index and number of taps.
    pub bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` normalised weights (unused taps are 0).
    pub weights: Vec<f64>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` for the source interval `[in0, in1)` of an axis of `in_size`
    /// samples mapped onto `out_size` samples (`in0`/`in1` are single precision as in Pillow).
    pub fn new(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Self {
        let scale = f64::from(in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0.0f64; out_size * ksize];
        for xx in 0..out_size {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; both ends are then clamped to the axis.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin as i64).max(0) as usize;
            let k = &mut weights[xx * ksize..xx * ksize + ksize];
            let mut total = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(n) {
                *w = filter.eval((x as f64 + xmin as f64 - center + 0.5) * inv);
                total += *w;
            }
            if total != 0.0 {
                for w in k.iter_mut().take(n) {
                    *w /= total;
                }
            }
            bounds.push((xmin, n));
        }
        Self {
            ksize,
            bounds,
            weights,
        }
    }

    /// The weights in Pillow's 8-bit fixed point (rounded half away from zero).
    fn fixed_point(&self) -> Vec<i32> {
        let one = f64::from(1u32 << PRECISION_BITS);
        self.weights
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect()
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes a 4-channel 8-bit image (`in_w x in_h`, rows produced by `row(y, buf)` into a buffer of
/// `in_w * 4` bytes) to `out_w x out_h` exactly like Pillow's `ImagingResample` on a 4-band image
/// with box `(0, 0, in_w, in_h)`. Rows are requested lazily, so the source may be virtual (a crop
/// with zero fill). Returns `out_w * out_h * 4` bytes.
pub fn resample_rgba8(
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
    mut row: impl FnMut(usize, &mut [u8]),
) -> Vec<u8> {
    const CH: usize = 4;
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let vert = Coeffs::new(in_h, 0.0, in_h as f32, out_h, filter);
    let (first, last) = match (vert.bounds.first(), vert.bounds.last()) {
        (Some(f), Some(l)) => (f.0, l.0 + l.1),
        _ => (0, 0),
    };
    // Horizontal pass (or the untouched source rows the vertical pass reads).
    let (rows_from, rows_to) = if need_v { (first, last) } else { (0, in_h) };
    let tmp_w = if need_h { out_w } else { in_w };
    let mut tmp = vec![0u8; tmp_w * (rows_to - rows_from) * CH];
    let mut line = vec![0u8; in_w * CH];
    if need_h {
        let horiz = Coeffs::new(in_w, 0.0, in_w as f32, out_w, filter);
        let kk = horiz.fixed_point();
        for (r, y) in (rows_from..rows_to).enumerate() {
            row(y, &mut line);
            let out = &mut tmp[r * out_w * CH..(r + 1) * out_w * CH];
            for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                let k = &kk[xx * horiz.ksize..xx * horiz.ksize + n];
                let mut acc = [1i64 << (PRECISION_BITS - 1); CH];
                for (x, &w) in k.iter().enumerate() {
                    let p = &line[(xmin + x) * CH..(xmin + x) * CH + CH];
                    for c in 0..CH {
                        acc[c] += i64::from(p[c]) * i64::from(w);
                    }
                }
                for c in 0..CH {
                    out[xx * CH + c] = clip8(acc[c]);
                }
            }
        }
    } else {
        for (r, y) in (rows_from..rows_to).enumerate() {
            row(y, &mut tmp[r * in_w * CH..(r + 1) * in_w * CH]);
        }
    }
    if !need_v {
        return tmp;
    }
    // Vertical pass over the intermediate rows (bounds shifted by the first row used).
    let kk = vert.fixed_point();
    let mut out = vec![0u8; tmp_w * out_h * CH];
    for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
        let k = &kk[yy * vert.ksize..yy * vert.ksize + n];
        let ymin = ymin - rows_from;
        let dst = &mut out[yy * tmp_w * CH..(yy + 1) * tmp_w * CH];
        for xx in 0..tmp_w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); CH];
            for (y, &w) in k.iter().enumerate() {
                let p = &tmp[((ymin + y) * tmp_w + xx) * CH..((ymin + y) * tmp_w + xx) * CH + CH];
                for c in 0..CH {
                    acc[c] += i64::from(p[c]) * i64::from(w);
                }
            }
            for c in 0..CH {
                dst[xx * CH + c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Resizes `planes` channel-first float planes of `in_h x in_w` to `out_h x out_w` with the
/// floating-point form of the same kernel (torch `interpolate(.., antialias=True)` with
/// `align_corners=False` and an explicit output size): width first, then height.
pub fn resample_planes_f32(
    data: &[f32],
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    filter: Filter,
) -> Vec<f32> {
    let horiz = Coeffs::new(in_w, 0.0, in_w as f32, out_w, filter);
    let vert = Coeffs::new(in_h, 0.0, in_h as f32, out_h, filter);
    let mut tmp = vec![0f32; planes * in_h * out_w];
    for p in 0..planes {
        for y in 0..in_h {
            let src = &data[(p * in_h + y) * in_w..(p * in_h + y + 1) * in_w];
            for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                let s: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| f64::from(src[xmin + i]) * w)
                    .sum();
                tmp[(p * in_h + y) * out_w + xx] = s as f32;
            }
        }
    }
    let mut out = vec![0f32; planes * out_h * out_w];
    for p in 0..planes {
        for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
            let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
            for xx in 0..out_w {
                let s: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| f64::from(tmp[(p * in_h + ymin + i) * out_w + xx]) * w)
                    .sum();
                out[(p * out_h + yy) * out_w + xx] = s as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_stay_inside_the_axis() {
        for (inn, out) in [(100usize, 518usize), (700, 518), (518, 37), (5, 3)] {
            let c = Coeffs::new(inn, 0.0, inn as f32, out, Filter::Lanczos);
            for (i, &(xmin, n)) in c.bounds.iter().enumerate() {
                assert!(xmin + n <= inn, "{inn}->{out} sample {i}");
                let s: f64 = c.weights[i * c.ksize..i * c.ksize + n].iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "{inn}->{out} sample {i}: {s}");
            }
        }
    }

    #[test]
    fn same_size_bicubic_is_the_identity() {
        let data: Vec<f32> = (0..2 * 5 * 7).map(|i| (i as f32 * 0.37).sin()).collect();
        let out = resample_planes_f32(&data, 2, 5, 7, 5, 7, Filter::Bicubic);
        for (a, b) in out.iter().zip(&data) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn float_kernel_matches_torch_antialiased_bicubic() {
        // Reference: torch 2.11 `F.interpolate(x, size, mode="bicubic", align_corners=False,
        // antialias=True)` of these inputs (upscale 3x3 -> 5x4 and downscale 4x4 -> 2x3).
        let up_in = [
            0.0, 2.032653, 3.156349, 2.889628, 1.404965, -0.5523497, -2.014727, -2.247358, -1.0938,
        ];
        let up_out = [
            -0.3381356, 1.127113, 2.747464, 3.507098, 1.194316, 1.705496, 1.992227, 1.874753,
            2.967185, 2.096433, 0.5702422, -0.6545975, -0.1218374, -0.6796053, -1.080795,
            -1.073895, -2.377651, -2.56885, -2.014503, -1.062139,
        ];
        let down_in = [
            0.0, 2.032653, 3.156349, 2.889628, 1.404965, -0.5523497, -2.014727, -2.247358, -1.0938,
            0.9504409, 2.97096, 4.064505, 3.763798, 2.257297, 0.300562, -1.139087,
        ];
        let down_out = [
            0.4471756, 0.8020825, 0.8441414, 1.388081, 1.239629, 0.9979759,
        ];
        let up = resample_planes_f32(&up_in, 1, 3, 3, 5, 4, Filter::Bicubic);
        let down = resample_planes_f32(&down_in, 1, 4, 4, 2, 3, Filter::Bicubic);
        for (got, want) in up.iter().zip(&up_out).chain(down.iter().zip(&down_out)) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn constant_image_stays_constant_through_the_fixed_point_passes() {
        let (w, h) = (23usize, 17usize);
        let px = [200u8, 10, 99, 255];
        let out = resample_rgba8(w, h, 41, 9, Filter::Lanczos, |_, buf| {
            for p in buf.chunks_mut(4) {
                p.copy_from_slice(&px);
            }
        });
        assert_eq!(out.len(), 41 * 9 * 4);
        for p in out.chunks(4) {
            assert_eq!(p, px);
        }
    }

    #[test]
    fn fixed_point_passes_agree_with_the_float_kernel_within_one_level() {
        // Smooth data (no clipping): the 8-bit result may differ from the exact float
        // convolution only by the intermediate and final rounding.
        let (w, h, ow, oh) = (31usize, 19usize, 12usize, 44usize);
        let val = |x: usize, y: usize| {
            (128.0 + 100.0 * ((x as f32) * 0.3 + (y as f32) * 0.2).sin()) as u8
        };
        let out = resample_rgba8(w, h, ow, oh, Filter::Lanczos, |y, buf| {
            for (x, p) in buf.chunks_mut(4).enumerate() {
                p.copy_from_slice(&[val(x, y), 0, 0, 255]);
            }
        });
        let plane: Vec<f32> = (0..h)
            .flat_map(|y| (0..w).map(move |x| val(x, y) as f32))
            .collect();
        let exact = resample_planes_f32(&plane, 1, h, w, oh, ow, Filter::Lanczos);
        for (i, e) in exact.iter().enumerate() {
            let got = out[i * 4] as f32;
            assert!(
                (got - e.clamp(0.0, 255.0)).abs() <= 1.5,
                "sample {i}: {got} vs {e}"
            );
        }
    }
}

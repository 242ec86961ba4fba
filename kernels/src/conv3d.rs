//! Dense 3-D convolution (`torch.nn.Conv3d`: cross-correlation, NCDHW, cubic kernel, equal stride and
//! zero padding on every axis) and `pixel_shuffle_3d` (trellis/modules/spatial.py), float32 on CPU.
//!
//! Memory stays bounded: the input is never unfolded whole. Output rows (one `(od, oh)` pair each)
//! are processed in tiles of about [`TILE_BUDGET`] unfolded floats (at least [`MIN_TILE_POSITIONS`]
//! positions); each tile unfolds only the input it needs (`im2col`), and one GEMM
//! `weight [Cout, Cin·k³] × cols [Cin·k³, tile]` produces the tile's outputs. Tiles run in parallel
//! with rayon, a bounded number at a time.

use rayon::prelude::*;

/// Floats of unfolded input per tile aimed at (1 MiB: the tile stays in the core's cache while the
/// GEMM packs it, which matters for narrow layers).
pub const TILE_BUDGET: usize = 1 << 18;

/// Fewest output positions per tile, so that wide layers (large `Cin·k³`, weights far larger than
/// the cache) still reuse each weight over many positions.
pub const MIN_TILE_POSITIONS: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Conv3dError {
    #[error("conv3d: {0}")]
    Shape(String),
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dShape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Input spatial size `[D, H, W]`.
    pub input: [usize; 3],
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Conv3dShape {
    /// Output spatial size `[(D + 2p - k) / s + 1, ...]`.
    pub fn output(&self) -> Result<[usize; 3], Conv3dError> {
        if self.kernel == 0 || self.stride == 0 {
            return Err(Conv3dError::Shape(
                "kernel and stride must be positive".into(),
            ));
        }
        let mut out = [0; 3];
        for (o, &i) in out.iter_mut().zip(&self.input) {
            let padded = i + 2 * self.padding;
            if padded < self.kernel {
                return Err(Conv3dError::Shape(format!(
                    "input size {:?} with padding {} is smaller than the kernel {}",
                    self.input, self.padding, self.kernel
                )));
            }
            *o = (padded - self.kernel) / self.stride + 1;
        }
        Ok(out)
    }

    fn check(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<[usize; 3], Conv3dError> {
        let out = self.output()?;
        let n_in = self.batch * self.in_channels * self.input.iter().product::<usize>();
        if input.len() != n_in {
            return Err(Conv3dError::Shape(format!(
                "input has {} values, expected {n_in} ({:?})",
                input.len(),
                self
            )));
        }
        let n_w = self.out_channels * self.in_channels * self.kernel.pow(3);
        if weight.len() != n_w {
            return Err(Conv3dError::Shape(format!(
                "weight has {} values, expected {n_w} ([{}, {}, {k}, {k}, {k}])",
                weight.len(),
                self.out_channels,
                self.in_channels,
                k = self.kernel
            )));
        }
        if let Some(b) = bias {
            if b.len() != self.out_channels {
                return Err(Conv3dError::Shape(format!(
                    "bias has {} values, expected {}",
                    b.len(),
                    self.out_channels
                )));
            }
        }
        Ok(out)
    }
}

/// Input coordinate of output index `o` at kernel offset `k`, if inside `[0, size)`.
#[inline]
fn source(o: usize, k: usize, stride: usize, pad: usize, size: usize) -> Option<usize> {
    let i = (o * stride + k).checked_sub(pad)?;
    (i < size).then_some(i)
}

/// Unfolds the input of batch `b` needed by output rows `row0 .. row0 + rows` (a row is one
/// `(od, oh)` pair, `OW` positions) into `cols [Cin·k³, rows·OW]` (row-major).
fn im2col_rows(
    input: &[f32],
    s: &Conv3dShape,
    out: [usize; 3],
    b: usize,
    row0: usize,
    rows: usize,
    cols: &mut [f32],
) {
    let [d, h, w] = s.input;
    let [_, oh_n, ow_n] = out;
    let k = s.kernel;
    let (st, pad) = (s.stride, s.padding);
    let ncols = rows * ow_n;
    let chan = d * h * w;
    for ci in 0..s.in_channels {
        let src_c = &input[(b * s.in_channels + ci) * chan..][..chan];
        for kd in 0..k {
            for kh in 0..k {
                for kw in 0..k {
                    let r = ((ci * k + kd) * k + kh) * k + kw;
                    let dst_row = &mut cols[r * ncols..][..ncols];
                    for (i, dst) in dst_row.chunks_mut(ow_n).enumerate() {
                        let (od, oh) = ((row0 + i) / oh_n, (row0 + i) % oh_n);
                        let src = match (source(od, kd, st, pad, d), source(oh, kh, st, pad, h)) {
                            (Some(id), Some(ih)) => &src_c[(id * h + ih) * w..][..w],
                            _ => {
                                dst.fill(0.0);
                                continue;
                            }
                        };
                        if st == 1 {
                            // valid ow: 0 <= ow + kw - pad < w
                            let lo = pad.saturating_sub(kw).min(ow_n);
                            let hi = (w + pad).saturating_sub(kw).clamp(lo, ow_n);
                            dst[..lo].fill(0.0);
                            dst[hi..].fill(0.0);
                            if hi > lo {
                                let start = lo + kw - pad;
                                dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                            }
                        } else {
                            for (ow, v) in dst.iter_mut().enumerate() {
                                *v = source(ow, kw, st, pad, w).map_or(0.0, |iw| src[iw]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `[Cout, n] = weight [Cout, K] × cols [K, n]` (+ bias per row), written into `dst` (row-major).
fn gemm_rows(
    weight: &[f32],
    cols: &[f32],
    bias: Option<&[f32]>,
    cout: usize,
    kk: usize,
    n: usize,
    dst: &mut [f32],
) {
    debug_assert!(weight.len() >= cout * kk && cols.len() >= kk * n && dst.len() >= cout * n);
    match bias {
        Some(b) => {
            for (row, &bv) in dst.chunks_mut(n).zip(b) {
                row.fill(bv);
            }
        }
        None => dst[..cout * n].fill(0.0),
    }
    // SAFETY: the three buffers hold at least m·k, k·n and m·n floats (checked above in debug, and
    // by construction in `conv3d`), the strides describe row-major matrices inside them, and `dst`
    // does not alias the inputs.
    unsafe {
        gemm::gemm(
            cout,
            n,
            kk,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            weight.as_ptr(),
            1,
            kk as isize,
            cols.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `Conv3d` forward: `input [B, Cin, D, H, W]`, `weight [Cout, Cin, k, k, k]`, optional `bias [Cout]`
/// → `[B, Cout, OD, OH, OW]` (row-major slices).
pub fn conv3d(
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &Conv3dShape,
) -> Result<Vec<f32>, Conv3dError> {
    let kk = s.in_channels * s.kernel.pow(3);
    let positions = (TILE_BUDGET / kk.max(1)).max(MIN_TILE_POSITIONS);
    conv3d_tiled(input, weight, bias, s, positions)
}

/// [`conv3d`] unfolding about `positions` output positions (whole output rows, at least one) per tile.
pub fn conv3d_tiled(
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &Conv3dShape,
    positions: usize,
) -> Result<Vec<f32>, Conv3dError> {
    let out = s.check(input, weight, bias)?;
    let [od_n, oh_n, ow_n] = out;
    let kk = s.in_channels * s.kernel.pow(3);
    let cout = s.out_channels;
    let rows_per_batch = od_n * oh_n;
    let out_chan = rows_per_batch * ow_n;
    let mut output = vec![0f32; s.batch * cout * out_chan];
    if output.is_empty() {
        return Ok(output);
    }
    let rows = positions.div_ceil(ow_n).clamp(1, rows_per_batch);
    // every (batch, first row, row count) tile
    let tiles: Vec<(usize, usize, usize)> = (0..s.batch)
        .flat_map(|b| {
            (0..rows_per_batch)
                .step_by(rows)
                .map(move |r0| (b, r0, rows.min(rows_per_batch - r0)))
        })
        .collect();
    // a bounded number of tiles in flight: their outputs wait in memory until copied
    let at_once = rayon::current_num_threads().max(1) * 8;
    for group in tiles.chunks(at_once) {
        let results: Vec<Vec<f32>> = group
            .par_iter()
            .map_init(Vec::new, |cols: &mut Vec<f32>, &(b, r0, nr)| {
                let n = nr * ow_n;
                cols.resize(kk * n, 0.0);
                im2col_rows(input, s, out, b, r0, nr, cols);
                let mut local = vec![0f32; cout * n];
                gemm_rows(weight, cols, bias, cout, kk, n, &mut local);
                local
            })
            .collect();
        for (&(b, r0, nr), local) in group.iter().zip(results) {
            let n = nr * ow_n;
            for (co, src) in local.chunks(n).enumerate() {
                let off = (b * cout + co) * out_chan + r0 * ow_n;
                output[off..off + n].copy_from_slice(src);
            }
        }
    }
    Ok(output)
}

/// Direct seven-loop convolution, for tests.
pub fn conv3d_naive(
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &Conv3dShape,
) -> Result<Vec<f32>, Conv3dError> {
    let out = s.check(input, weight, bias)?;
    let [d, h, w] = s.input;
    let k = s.kernel;
    let mut o = vec![0f32; s.batch * s.out_channels * out.iter().product::<usize>()];
    let mut idx = 0;
    for b in 0..s.batch {
        for co in 0..s.out_channels {
            for od in 0..out[0] {
                for oh in 0..out[1] {
                    for ow in 0..out[2] {
                        let mut acc = bias.map_or(0.0, |b| b[co] as f64);
                        for ci in 0..s.in_channels {
                            for kd in 0..k {
                                let Some(id) = source(od, kd, s.stride, s.padding, d) else {
                                    continue;
                                };
                                for kh in 0..k {
                                    let Some(ih) = source(oh, kh, s.stride, s.padding, h) else {
                                        continue;
                                    };
                                    for kw in 0..k {
                                        let Some(iw) = source(ow, kw, s.stride, s.padding, w)
                                        else {
                                            continue;
                                        };
                                        let x = input[(((b * s.in_channels + ci) * d + id) * h
                                            + ih)
                                            * w
                                            + iw];
                                        let wt = weight[(((co * s.in_channels + ci) * k + kd) * k
                                            + kh)
                                            * k
                                            + kw];
                                        acc += x as f64 * wt as f64;
                                    }
                                }
                            }
                        }
                        o[idx] = acc as f32;
                        idx += 1;
                    }
                }
            }
        }
    }
    Ok(o)
}

/// `pixel_shuffle_3d`: `[B, C·s³, H, W, D]` → `[B, C, H·s, W·s, D·s]` with
/// `out[b, c, s·h+i, s·w+j, s·d+k] = in[b, c·s³ + i·s² + j·s + k, h, w, d]`.
pub fn pixel_shuffle_3d(
    input: &[f32],
    batch: usize,
    channels: usize,
    dims: [usize; 3],
    scale: usize,
) -> Result<Vec<f32>, Conv3dError> {
    let s3 = scale.pow(3);
    if scale == 0 || !channels.is_multiple_of(s3) {
        return Err(Conv3dError::Shape(format!(
            "pixel_shuffle_3d: {channels} channels are not a multiple of {scale}^3"
        )));
    }
    let [h, w, d] = dims;
    let vol = h * w * d;
    if input.len() != batch * channels * vol {
        return Err(Conv3dError::Shape(format!(
            "pixel_shuffle_3d: input has {} values, expected {}",
            input.len(),
            batch * channels * vol
        )));
    }
    let c_out = channels / s3;
    let (oh, ow, od) = (h * scale, w * scale, d * scale);
    let out_vol = oh * ow * od;
    let mut out = vec![0f32; batch * c_out * out_vol];
    out.par_chunks_mut(out_vol.max(1))
        .enumerate()
        .for_each(|(bc, dst)| {
            let (b, c) = (bc / c_out, bc % c_out);
            for i in 0..scale {
                for j in 0..scale {
                    for k in 0..scale {
                        let src_c = (b * channels + c * s3 + (i * scale + j) * scale + k) * vol;
                        let src = &input[src_c..src_c + vol];
                        for x in 0..h {
                            for y in 0..w {
                                let row = &src[(x * w + y) * d..][..d];
                                let base = ((x * scale + i) * ow + (y * scale + j)) * od + k;
                                for (z, &v) in row.iter().enumerate() {
                                    dst[base + z * scale] = v;
                                }
                            }
                        }
                    }
                }
            }
        });
    Ok(out)
}

/// `ChannelLayerNorm32` on `[B, C, P]` (P = all spatial positions): for every `(b, p)`, normalise
/// the C values over the channel axis (two-pass mean and biased variance in f32), then
/// `* weight[c] + bias[c]`.
pub fn channel_layer_norm(
    x: &[f32],
    batch: usize,
    channels: usize,
    positions: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
) -> Result<Vec<f32>, Conv3dError> {
    if x.len() != batch * channels * positions {
        return Err(Conv3dError::Shape(format!(
            "channel_layer_norm: {} values are not [{batch}, {channels}, {positions}]",
            x.len()
        )));
    }
    for (what, v) in [("weight", weight), ("bias", bias)] {
        if v.is_some_and(|v| v.len() != channels) {
            return Err(Conv3dError::Shape(format!(
                "channel_layer_norm: {what} must have {channels} values"
            )));
        }
    }
    if x.is_empty() {
        return Ok(Vec::new());
    }
    const CHUNK: usize = 2048;
    // per (b, p): mean and 1/sqrt(var + eps), computed on contiguous position chunks
    let mut mean = vec![0f32; batch * positions];
    let mut rstd = vec![0f32; batch * positions];
    let c_inv = 1.0 / channels.max(1) as f32;
    mean.par_chunks_mut(positions)
        .zip(rstd.par_chunks_mut(positions))
        .enumerate()
        .for_each(|(b, (mean_b, rstd_b))| {
            let xb = &x[b * channels * positions..][..channels * positions];
            mean_b
                .par_chunks_mut(CHUNK)
                .zip(rstd_b.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(ci, (m, r))| {
                    let p0 = ci * CHUNK;
                    let n = m.len();
                    m.fill(0.0);
                    for c in 0..channels {
                        for (acc, &v) in m.iter_mut().zip(&xb[c * positions + p0..][..n]) {
                            *acc += v;
                        }
                    }
                    m.iter_mut().for_each(|v| *v *= c_inv);
                    r.fill(0.0);
                    for c in 0..channels {
                        let row = &xb[c * positions + p0..][..n];
                        for ((acc, &v), &mu) in r.iter_mut().zip(row).zip(m.iter()) {
                            let d = v - mu;
                            *acc += d * d;
                        }
                    }
                    r.iter_mut()
                        .for_each(|v| *v = 1.0 / (*v * c_inv + eps).sqrt());
                });
        });
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(positions)
        .enumerate()
        .for_each(|(bc, dst)| {
            let (b, c) = (bc / channels, bc % channels);
            let w = weight.map_or(1.0, |w| w[c]);
            let bi = bias.map_or(0.0, |v| v[c]);
            let src = &x[bc * positions..][..positions];
            let (m, r) = (
                &mean[b * positions..][..positions],
                &rstd[b * positions..][..positions],
            );
            for (((o, &v), &mu), &rs) in dst.iter_mut().zip(src).zip(m).zip(r) {
                *o = (v - mu) * rs * w + bi;
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn compare(s: Conv3dShape, positions: usize, with_bias: bool) {
        let n_in = s.batch * s.in_channels * s.input.iter().product::<usize>();
        let input = values(n_in, 1);
        let weight = values(s.out_channels * s.in_channels * s.kernel.pow(3), 2);
        let bias = values(s.out_channels, 3);
        let b = with_bias.then_some(bias.as_slice());
        let fast = conv3d_tiled(&input, &weight, b, &s, positions).unwrap();
        let slow = conv3d_naive(&input, &weight, b, &s).unwrap();
        assert_eq!(fast.len(), slow.len());
        let e = max_rel(&fast, &slow);
        assert!(e < 1e-5, "{s:?} positions {positions}: {e}");
        if positions == 1 {
            let default_tiles = conv3d(&input, &weight, b, &s).unwrap();
            assert!(max_rel(&default_tiles, &fast) < 1e-5);
        }
    }

    #[test]
    fn k3_pad1_matches_naive_for_any_tile_size() {
        let s = Conv3dShape {
            batch: 2,
            in_channels: 3,
            out_channels: 5,
            input: [6, 4, 7],
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        for positions in [1, 5, 7, 29, 100, usize::MAX / 4] {
            compare(s, positions, true);
        }
        compare(s, 1, false);
    }

    #[test]
    fn stride2_kernel2_and_pointwise_match_naive() {
        let down = Conv3dShape {
            batch: 1,
            in_channels: 4,
            out_channels: 6,
            input: [8, 6, 4],
            kernel: 2,
            stride: 2,
            padding: 0,
        };
        compare(down, 50, true);
        let point = Conv3dShape {
            kernel: 1,
            stride: 1,
            ..down
        };
        compare(point, 50, true);
        let odd = Conv3dShape {
            input: [5, 7, 3],
            kernel: 3,
            stride: 2,
            padding: 1,
            ..down
        };
        compare(odd, 10, true);
    }

    #[test]
    fn bad_sizes_are_errors() {
        let s = Conv3dShape {
            batch: 1,
            in_channels: 2,
            out_channels: 2,
            input: [2, 2, 2],
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        assert!(conv3d(&[0.0; 15], &[0.0; 108], None, &s).is_err());
        assert!(conv3d(&[0.0; 16], &[0.0; 107], None, &s).is_err());
        assert!(conv3d(&[0.0; 16], &[0.0; 108], Some(&[0.0]), &s).is_err());
        let tiny = Conv3dShape { padding: 0, ..s };
        assert!(tiny.output().is_err());
    }

    #[test]
    fn channel_layer_norm_normalises_each_position() {
        let (b, c, p) = (2, 5, 3000);
        let x = values(b * c * p, 7);
        let w = values(c, 8);
        let bias = values(c, 9);
        let y = channel_layer_norm(&x, b, c, p, Some(&w), Some(&bias), 1e-5).unwrap();
        for (bb, pp) in [(0, 0), (1, 2999), (1, 2048), (0, 1234)] {
            let col: Vec<f64> = (0..c).map(|cc| x[(bb * c + cc) * p + pp] as f64).collect();
            let m = col.iter().sum::<f64>() / c as f64;
            let v = col.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
            for cc in 0..c {
                let want = (col[cc] - m) / (v + 1e-5).sqrt() * w[cc] as f64 + bias[cc] as f64;
                let got = y[(bb * c + cc) * p + pp] as f64;
                assert!((got - want).abs() < 1e-4, "{got} vs {want}");
            }
        }
        assert!(channel_layer_norm(&x, b, c, p + 1, None, None, 1e-5).is_err());
        assert!(channel_layer_norm(&x, b, c, p, Some(&w[..2]), None, 1e-5).is_err());
    }

    #[test]
    fn pixel_shuffle_formula() {
        let (b, c, dims, s) = (2, 16, [2, 3, 1], 2);
        let input: Vec<f32> = (0..b * c * 6).map(|i| i as f32).collect();
        let out = pixel_shuffle_3d(&input, b, c, dims, s).unwrap();
        let (co, oh, ow, od) = (2, 4, 6, 2);
        for bb in 0..b {
            for cc in 0..co {
                for x in 0..oh {
                    for y in 0..ow {
                        for z in 0..od {
                            let (h, i, w, j, d, k) = (x / s, x % s, y / s, y % s, z / s, z % s);
                            let src = (((bb * c + cc * 8 + i * 4 + j * 2 + k) * 2 + h) * 3 + w) + d;
                            let dst = (((bb * co + cc) * oh + x) * ow + y) * od + z;
                            assert_eq!(out[dst], input[src]);
                        }
                    }
                }
            }
        }
        assert!(pixel_shuffle_3d(&input, b, 12, [2, 3, 1], 2).is_err());
    }
}

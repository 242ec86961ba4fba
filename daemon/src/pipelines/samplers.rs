//! Flow-matching Euler samplers; twin of `trellis/pipelines/samplers/{flow_euler,
//! classifier_free_guidance_mixin,guidance_interval_mixin}.py` plus the multi-image injection of
//! `TrellisImageTo3DPipeline.inject_sampler_multi_image`.
//!
//! The sampler is generic over the network: it calls a [`Velocity`] closure with the current sample
//! (a dense `[B, C, R, R, R]` tensor or the feats `[N, C]` of a sparse tensor — the closure knows
//! which), the model time `1000 t` as a float32 tensor `[B]`, and a condition with batch `B`.
//!
//! * time grid: `t = linspace(1, 0, steps + 1)`, `t <- r t / (1 + (r - 1) t)` (r = `rescale_t`),
//!   computed in float64 like numpy;
//! * Euler step: `x <- x - (t - t_prev) v`; `pred_x0 = (1 - σ) x - (σ + (1 - σ) t) v`;
//! * guidance: plain (`FlowEulerSampler`), always CFG (`FlowEulerCfgSampler`) or CFG only while
//!   `cfg_interval.0 <= t <= cfg_interval.1` (`FlowEulerGuidanceIntervalSampler`), where CFG is
//!   `v = (1 + s) v(cond) - s v(neg_cond)`;
//! * a condition of batch 1 is repeated to the batch of the sample.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};

use crate::models::config::{SamplerConfig, SamplerKind, SamplerParams};

/// The network as the sampler sees it: `(x_t, 1000 t [B], cond [B, ...]) -> v`.
pub type Velocity<'a> = dyn FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a;

/// Resolved sampler call parameters (pipeline.json `params` overridden by the caller).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSettings {
    pub steps: usize,
    pub rescale_t: f64,
    pub cfg_strength: f64,
    pub cfg_interval: (f64, f64),
    /// Run a guided step's conditional and unconditional model calls as one call on both stacked
    /// along the first dim (`[x; x]`, `[t; t]`, `[cond; neg]`) instead of two, when the velocity
    /// closure takes a doubled batch (the GPU stages at tier `high` set it). The same maths; only
    /// the matrix products' blocking, and so the last bits, may differ.
    pub cfg_batched: bool,
}

impl SamplerSettings {
    /// The original's keyword defaults (steps 50, rescale_t 1, cfg_strength 3, interval [0, 1])
    /// with every key `params` sets; rejects values no sampler can run.
    pub fn resolve(params: &SamplerParams) -> Result<Self> {
        let s = Self {
            steps: params.steps.unwrap_or(50),
            rescale_t: params.rescale_t.unwrap_or(1.0),
            cfg_strength: params.cfg_strength.unwrap_or(3.0),
            cfg_interval: params.cfg_interval.unwrap_or((0.0, 1.0)),
            cfg_batched: false,
        };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.steps >= 1,
            "sampler steps must be at least 1 (got {})",
            self.steps
        );
        ensure!(
            self.rescale_t.is_finite() && self.rescale_t > 0.0,
            "sampler rescale_t must be a positive number (got {})",
            self.rescale_t
        );
        ensure!(
            self.cfg_strength.is_finite(),
            "sampler cfg_strength must be a finite number (got {})",
            self.cfg_strength
        );
        ensure!(
            self.cfg_interval.0.is_finite() && self.cfg_interval.1.is_finite(),
            "sampler cfg_interval must be finite (got {:?})",
            self.cfg_interval
        );
        Ok(())
    }

    /// `(t, t_prev)` of every step.
    pub fn time_pairs(&self) -> Vec<(f64, f64)> {
        let n = self.steps;
        let r = self.rescale_t;
        let ts: Vec<f64> = (0..=n)
            .map(|i| {
                // numpy linspace: start + i * step, the last point exactly `stop`.
                let t = if i == n {
                    0.0
                } else {
                    1.0 - i as f64 * (1.0 / n as f64)
                };
                r * t / (1.0 + (r - 1.0) * t)
            })
            .collect();
        ts.windows(2).map(|w| (w[0], w[1])).collect()
    }
}

/// How the conditions enter each step.
pub enum Conditioning<'a> {
    /// One condition (batch 1 or the batch of x) and its negative.
    Single { cond: &'a Tensor, neg: &'a Tensor },
    /// Several images `[n, ...]`; step i conditions on image `i % n` (cond and neg branch alike).
    Stochastic { conds: &'a Tensor, neg: &'a Tensor },
    /// Several images `[n, ...]`; v(cond) is the mean of the per-image predictions.
    MultiDiffusion { conds: &'a Tensor, neg: &'a Tensor },
}

/// One finished step, for progress reporting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEvent {
    /// 1-based.
    pub step: usize,
    pub steps: usize,
    pub t: f64,
}

/// Sampler output.
pub struct SampleOutput {
    pub samples: Tensor,
    /// `x_t` after every step (only when asked for).
    pub pred_x_t: Vec<Tensor>,
    /// x_0 prediction of every step (only when asked for).
    pub pred_x0: Vec<Tensor>,
}

/// Optional hooks of one sampling run.
#[derive(Default)]
pub struct Hooks<'a> {
    pub on_step: Option<&'a mut dyn FnMut(StepEvent)>,
    pub cancel: Option<&'a AtomicBool>,
    /// Keep `pred_x_t` / `pred_x0` of every step.
    pub keep_trajectory: bool,
}

/// A `FlowEuler*Sampler` with its constructor argument `sigma_min`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowEulerSampler {
    pub kind: SamplerKind,
    pub sigma_min: f64,
}

impl FlowEulerSampler {
    pub fn from_config(c: &SamplerConfig) -> Self {
        Self {
            kind: c.kind,
            sigma_min: c.args.sigma_min,
        }
    }

    /// Whether the step at time `t` uses classifier-free guidance.
    pub fn guided_at(&self, t: f64, s: &SamplerSettings) -> bool {
        match self.kind {
            SamplerKind::FlowEuler => false,
            SamplerKind::FlowEulerCfg => true,
            SamplerKind::FlowEulerGuidanceInterval => {
                s.cfg_interval.0 <= t && t <= s.cfg_interval.1
            }
        }
    }

    /// Runs the sampler from `noise`; `batch` is the number of samples in `noise` (its first dim
    /// for dense tensors, the number of batch elements of the coords for sparse feats).
    pub fn sample(
        &self,
        model: &mut Velocity<'_>,
        noise: &Tensor,
        batch: usize,
        cond: &Conditioning<'_>,
        settings: &SamplerSettings,
        hooks: Hooks<'_>,
    ) -> Result<SampleOutput> {
        settings.validate()?;
        ensure!(batch >= 1, "sampler: empty batch");
        let Hooks {
            mut on_step,
            cancel,
            keep_trajectory,
        } = hooks;
        let pairs = settings.time_pairs();
        let mut memo = ConditionMemo::new();
        let mut x = noise.clone();
        let mut out = SampleOutput {
            samples: noise.clone(),
            pred_x_t: vec![],
            pred_x0: vec![],
        };
        for (i, &(t, t_prev)) in pairs.iter().enumerate() {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                bail!("cancelled at step {} of {}", i + 1, pairs.len());
            }
            let v = self.velocity(model, &x, batch, t, i, cond, settings, &mut memo)?;
            if keep_trajectory {
                let sm = self.sigma_min;
                let x0 = (x.affine(1.0 - sm, 0.0)? - v.affine(sm + (1.0 - sm) * t, 0.0)?)?;
                out.pred_x0.push(x0);
            }
            x = (&x - v.affine(t - t_prev, 0.0)?)?;
            if keep_trajectory {
                out.pred_x_t.push(x.clone());
            }
            if let Some(cb) = on_step.as_mut() {
                cb(StepEvent {
                    step: i + 1,
                    steps: pairs.len(),
                    t,
                });
            }
        }
        out.samples = x;
        Ok(out)
    }

    /// The (guided) velocity at time `t` for sample `x`: one model call, or two with
    /// classifier-free guidance; `step` picks the image of stochastic multi-image conditioning.
    /// Samplers that do more than plain Euler steps (RePaint-style region edits) build on it.
    /// `memo` keeps the condition tensors derived per step for the whole run (see
    /// [`ConditionMemo`]).
    #[allow(clippy::too_many_arguments)]
    pub fn velocity(
        &self,
        model: &mut Velocity<'_>,
        x: &Tensor,
        batch: usize,
        t: f64,
        step: usize,
        cond: &Conditioning<'_>,
        s: &SamplerSettings,
        memo: &mut ConditionMemo,
    ) -> Result<Tensor> {
        let t_in = Tensor::full((1000.0 * t) as f32, batch, x.device())?;
        // one image of several, the same tensor at every step that picks it
        let image = |memo: &mut ConditionMemo, conds: &Tensor, i: usize| {
            memo.get(ConditionKey::Image(conds.id(), i), || {
                Ok(conds.narrow(0, i, 1)?)
            })
        };
        let mut eval = |memo: &mut ConditionMemo, c: &Tensor| -> Result<Tensor> {
            let c = memo.get(ConditionKey::Repeat(c.id(), batch), || {
                repeat_to_batch(c, batch)
            })?;
            let v = model(x, &t_in, &c)?;
            ensure!(
                v.dims() == x.dims(),
                "the flow model returned shape {:?} for a sample of shape {:?}",
                v.dims(),
                x.dims()
            );
            Ok(v)
        };
        let guided = self.guided_at(t, s);
        let cfg = |pos: Tensor, neg: Tensor| -> Result<Tensor> {
            Ok((pos.affine(1.0 + s.cfg_strength, 0.0)? - neg.affine(s.cfg_strength, 0.0)?)?)
        };
        if guided && s.cfg_batched {
            let pos_cond = match cond {
                Conditioning::Single { cond, .. } => Some((*cond).clone()),
                Conditioning::Stochastic { conds, .. } => {
                    let n = conds.dim(0)?;
                    ensure!(n >= 1, "multi-image conditioning without images");
                    Some(image(memo, conds, step % n)?)
                }
                Conditioning::MultiDiffusion { .. } => None,
            };
            let neg = match cond {
                Conditioning::Single { neg, .. }
                | Conditioning::Stochastic { neg, .. }
                | Conditioning::MultiDiffusion { neg, .. } => *neg,
            };
            if let Some(c) = pos_cond {
                let paired = memo.get(ConditionKey::Pair(c.id(), neg.id(), batch), || {
                    Ok(Tensor::cat(
                        &[repeat_to_batch(&c, batch)?, repeat_to_batch(neg, batch)?],
                        0,
                    )?)
                })?;
                let (pos, neg) = velocity_pair(model, x, t, &paired)?;
                return cfg(pos, neg);
            }
        }
        match cond {
            Conditioning::Single { cond, neg } => {
                let pos = eval(memo, cond)?;
                if guided {
                    cfg(pos, eval(memo, neg)?)
                } else {
                    Ok(pos)
                }
            }
            Conditioning::Stochastic { conds, neg } => {
                let n = conds.dim(0)?;
                ensure!(n >= 1, "multi-image conditioning without images");
                let c = image(memo, conds, step % n)?;
                let pos = eval(memo, &c)?;
                if guided {
                    cfg(pos, eval(memo, neg)?)
                } else {
                    Ok(pos)
                }
            }
            Conditioning::MultiDiffusion { conds, neg } => {
                let n = conds.dim(0)?;
                ensure!(n >= 1, "multi-image conditioning without images");
                // sum(preds) / len(preds), summed in order like the original.
                let mut sum: Option<Tensor> = None;
                for i in 0..n {
                    let c = image(memo, conds, i)?;
                    let p = eval(memo, &c)?;
                    sum = Some(match sum {
                        None => p,
                        Some(acc) => (acc + p)?,
                    });
                }
                let Some(sum) = sum else {
                    bail!("multi-image conditioning without images")
                };
                let pos = (sum / n as f64)?;
                if guided {
                    cfg(pos, eval(memo, neg)?)
                } else {
                    Ok(pos)
                }
            }
        }
    }
}

/// The conditional and unconditional velocities of `x` from one model call on both stacked along
/// the first dim: `model([x; x], [t; t], paired)` with `paired` = `[cond; neg]` (each repeated to
/// the batch), split back into its two halves.
fn velocity_pair(
    model: &mut Velocity<'_>,
    x: &Tensor,
    t: f64,
    paired: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let t2 = Tensor::full((1000.0 * t) as f32, paired.dim(0)?, x.device())?;
    let x2 = Tensor::cat(&[x, x], 0)?;
    let v = model(&x2, &t2, paired)?;
    ensure!(
        v.dims() == x2.dims(),
        "the flow model returned shape {:?} for a paired sample of shape {:?}",
        v.dims(),
        x2.dims()
    );
    let n = x.dim(0)?;
    Ok((v.narrow(0, 0, n)?, v.narrow(0, n, n)?))
}

/// Which derived condition a [`ConditionMemo`] entry is: the tensor repeated to a batch, one
/// image of several, or a condition and its negative paired for one CFG-batched call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKey {
    Repeat(candle_core::TensorId, usize),
    Image(candle_core::TensorId, usize),
    Pair(candle_core::TensorId, candle_core::TensorId, usize),
}

/// The condition tensors one sampling run derives from its conditions (repeats to the batch,
/// single images, CFG pairs), each made once, so that every step hands the network the same
/// tensor: the flows keep their cross-attention projections per condition tensor
/// ([`crate::modules::context`]). Made per run, dropped with it.
#[derive(Debug, Default)]
pub struct ConditionMemo {
    made: Vec<(ConditionKey, Tensor)>,
}

impl ConditionMemo {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tensor for `key`, made by `make` the first time.
    pub fn get(
        &mut self,
        key: ConditionKey,
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        if let Some((_, t)) = self.made.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
        let t = make()?;
        self.made.push((key, t.clone()));
        Ok(t)
    }
}

/// Repeats a batch-1 condition to `batch` rows; any other batch must equal `batch`.
pub fn repeat_to_batch(c: &Tensor, batch: usize) -> Result<Tensor> {
    let b = c.dim(0)?;
    if b == batch {
        return Ok(c.clone());
    }
    ensure!(
        b == 1,
        "condition batch {b} does not match the sample batch {batch}"
    );
    let mut reps = vec![1usize; c.rank()];
    reps[0] = batch;
    Ok(c.repeat(reps)?)
}

/// Float32 view for samplers (fp16 networks still sample in float32, as the original does).
pub fn as_f32(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn gi() -> FlowEulerSampler {
        FlowEulerSampler {
            kind: SamplerKind::FlowEulerGuidanceInterval,
            sigma_min: 1e-5,
        }
    }

    fn settings(steps: usize, r: f64, s: f64) -> SamplerSettings {
        SamplerSettings {
            cfg_batched: false,
            steps,
            rescale_t: r,
            cfg_strength: s,
            cfg_interval: (0.5, 1.0),
        }
    }

    #[test]
    fn time_grid_matches_readme() {
        let p = settings(4, 3.0, 7.5).time_pairs();
        let t: Vec<f64> = p.iter().map(|x| x.0).chain([p[3].1]).collect();
        for (a, b) in t.iter().zip([1.0, 0.9, 0.75, 0.5, 0.0]) {
            assert!((a - b).abs() < 1e-12, "{t:?}");
        }
    }

    #[test]
    fn zero_steps_and_bad_values_are_rejected() {
        let p = SamplerParams {
            steps: Some(0),
            ..Default::default()
        };
        assert!(SamplerSettings::resolve(&p)
            .unwrap_err()
            .to_string()
            .contains("steps"));
        let p = SamplerParams {
            rescale_t: Some(-1.0),
            ..Default::default()
        };
        assert!(SamplerSettings::resolve(&p).is_err());
        let p = SamplerParams {
            steps: Some(3),
            ..Default::default()
        };
        assert_eq!(SamplerSettings::resolve(&p).unwrap().steps, 3);
    }

    /// A linear "network" v = a x + cond_scalar, checked against a scalar recomputation.
    #[test]
    fn euler_cfg_interval_and_multi_image_rules() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
        let conds = Tensor::new(&[[0.3f32], [-0.7]], &dev).unwrap(); // 2 "images"
        let neg = Tensor::new(&[[0.1f32]], &dev).unwrap();
        let calls = std::cell::RefCell::new(Vec::new());
        let mut model = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
            let tv = t.to_vec1::<f32>()?;
            assert_eq!(tv.len(), 2);
            let cv = c.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(cv.len(), 2, "cond repeated to the batch");
            calls.borrow_mut().push((tv[0], cv[0]));
            let cb = c.broadcast_as(x.dims())?;
            Ok(((x * 0.5)? + cb)?)
        };
        let s = settings(4, 3.0, 2.0);
        for mode in 0..3 {
            calls.borrow_mut().clear();
            let single = conds.narrow(0, 0, 1).unwrap();
            let cond = conditioning(mode, &single, &conds, &neg);
            let mut events = vec![];
            let mut cb = |e: StepEvent| events.push(e.step);
            let out = gi()
                .sample(
                    &mut model,
                    &x0,
                    2,
                    &cond,
                    &s,
                    Hooks {
                        on_step: Some(&mut cb),
                        cancel: None,
                        keep_trajectory: true,
                    },
                )
                .unwrap();
            assert_eq!(events, vec![1, 2, 3, 4]);
            // Scalar reference.
            let mut x: Vec<f64> = vec![0.5, -1.0, 2.0, 0.25];
            for (i, (t, tp)) in s.time_pairs().into_iter().enumerate() {
                let c_at = |k: usize| [0.3f64, -0.7][k];
                let vpos = |xv: f64| -> f64 {
                    match mode {
                        0 => 0.5 * xv + c_at(0),
                        1 => 0.5 * xv + c_at(i % 2),
                        _ => ((0.5 * xv + c_at(0)) + (0.5 * xv + c_at(1))) / 2.0,
                    }
                };
                let guided = (0.5..=1.0).contains(&t);
                for xv in x.iter_mut() {
                    let mut v = vpos(*xv);
                    if guided {
                        v = 3.0 * v - 2.0 * (0.5 * *xv + 0.1);
                    }
                    *xv -= (t - tp) * v;
                }
            }
            let got: Vec<f32> = out.samples.flatten_all().unwrap().to_vec1().unwrap();
            for (g, e) in got.iter().zip(&x) {
                assert!(
                    (*g as f64 - e).abs() < 1e-5,
                    "mode {mode}: {got:?} vs {x:?}"
                );
            }
            assert_eq!(out.pred_x_t.len(), 4);
            assert_eq!(out.pred_x0.len(), 4);
            // Model time input is 1000 t, first step t = 1.
            assert!((calls.borrow()[0].0 - 1000.0).abs() < 1e-3);
            // Number of evaluations: steps inside [0.5, 1] (t = 1, 0.9, 0.75, 0.5) are guided.
            let per_step = if mode == 2 { 3 } else { 2 };
            assert_eq!(calls.borrow().len(), 4 * per_step, "mode {mode}");
        }
    }

    /// With `cfg_batched`, a guided step is one model call on `[x; x]`, `[t; t]`, `[cond; neg]`
    /// and the samples equal the two-call sampler's; unguided steps and multidiffusion still
    /// make their usual calls.
    /// Conditioning mode 0 (one condition), 1 (stochastic) or 2 (multidiffusion) of the tests.
    fn conditioning<'a>(
        mode: usize,
        single: &'a Tensor,
        conds: &'a Tensor,
        neg: &'a Tensor,
    ) -> Conditioning<'a> {
        match mode {
            0 => Conditioning::Single { cond: single, neg },
            1 => Conditioning::Stochastic { conds, neg },
            _ => Conditioning::MultiDiffusion { conds, neg },
        }
    }

    #[test]
    fn batched_guidance_is_one_call_with_the_same_samples() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
        let conds = Tensor::new(&[[0.3f32], [-0.7]], &dev).unwrap();
        let neg = Tensor::new(&[[0.1f32]], &dev).unwrap();
        let single = conds.narrow(0, 0, 1).unwrap();
        for mode in 0..3 {
            let cond = conditioning(mode, &single, &conds, &neg);
            let run = |batched: bool| -> (Vec<f32>, Vec<usize>) {
                let mut sizes = Vec::new();
                let mut model = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
                    assert_eq!(t.dim(0)?, x.dim(0)?);
                    assert_eq!(c.dim(0)?, x.dim(0)?);
                    sizes.push(x.dim(0)?);
                    // depends on t too, so the halves' t must line up
                    let tb = t.unsqueeze(1)?.broadcast_as(x.dims())?;
                    Ok(((x * 0.5)? + c.broadcast_as(x.dims())? + (tb * 1e-3)?)?)
                };
                let s = SamplerSettings {
                    cfg_batched: batched,
                    ..settings(4, 3.0, 2.0)
                };
                let out = gi()
                    .sample(
                        &mut model,
                        &x0,
                        2,
                        &cond,
                        &s,
                        Hooks {
                            on_step: None,
                            cancel: None,
                            keep_trajectory: false,
                        },
                    )
                    .unwrap();
                (out.samples.flatten_all().unwrap().to_vec1().unwrap(), sizes)
            };
            let (plain, plain_calls) = run(false);
            let (paired, paired_calls) = run(true);
            for (a, b) in plain.iter().zip(&paired) {
                assert!((a - b).abs() < 1e-6, "mode {mode}: {plain:?} vs {paired:?}");
            }
            // steps at t = 1, 0.9, 0.75, 0.5: all guided ([0.5, 1]); multidiffusion is not paired
            let want: Vec<usize> = match mode {
                2 => vec![2; 12],
                _ => vec![4; 4],
            };
            assert_eq!(paired_calls, want, "mode {mode}");
            assert_eq!(plain_calls.len(), if mode == 2 { 12 } else { 8 });
        }
    }

    #[test]
    fn cancel_flag_stops_before_the_next_step() {
        let dev = Device::Cpu;
        let x0 = Tensor::zeros((1, 3), DType::F32, &dev).unwrap();
        let c = Tensor::zeros((1, 1), DType::F32, &dev).unwrap();
        let flag = AtomicBool::new(false);
        let mut n = 0;
        let mut model = |x: &Tensor, _t: &Tensor, _c: &Tensor| -> Result<Tensor> {
            n += 1;
            flag.store(true, Ordering::Relaxed);
            Ok(x.clone())
        };
        let e = gi()
            .sample(
                &mut model,
                &x0,
                1,
                &Conditioning::Single { cond: &c, neg: &c },
                &settings(5, 1.0, 0.0),
                Hooks {
                    on_step: None,
                    cancel: Some(&flag),
                    keep_trajectory: false,
                },
            )
            .err()
            .unwrap();
        assert!(e.to_string().contains("cancelled at step 2"), "{e}");
    }
}

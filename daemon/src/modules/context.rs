//! The condition of a flow's cross-attention layers, kept across the steps of one sampling stage.
//!
//! Every step of a flow sampler calls the network with the same condition tokens (the image's
//! DINOv2 features and the negative condition), so each cross-attention layer's `to_kv`
//! projection of them is the same at every step: a [`ContextCache`] made per stage keeps it.
//! The cache also finds the batch elements whose condition is all zeros (the image pipelines'
//! negative condition, `torch.zeros_like(cond)`): their keys are all equal and their values are
//! all equal, so softmax attention gives every query the same output, `to_out(v)` of a zero
//! token; that row is computed once and those elements skip `to_q`, the attention and `to_out`
//! (the original computes them and gets the same numbers up to rounding).
//!
//! It also keeps the timestep side of the last forward ([`TimestepMemo`]): the conditional and
//! unconditional calls of a guided step that run one after the other share the sampler's `t`
//! tensor, so the second reuses the first's timestep embedding and every layer's modulation
//! (the same values; no `t_embedder`, SiLU or `adaLN_modulation` launch).

use std::collections::VecDeque;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};

/// `TRELLIS_CONTEXT_CACHE=0` turns the cache off (every forward projects its context and runs
/// every batch element's cross-attention, as the original does), to measure what it saves. Read
/// once per process.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TRELLIS_CONTEXT_CACHE").as_deref() != Ok("0"))
}

/// `TRELLIS_TIMESTEP_MEMO=0` turns the [`TimestepMemo`] off (each forward embeds its timesteps
/// and makes every layer's modulation), to measure what it saves; it is also off when the
/// context cache is ([`enabled`]). Read once per process.
pub fn timestep_memo_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    enabled() && *ON.get_or_init(|| std::env::var("TRELLIS_TIMESTEP_MEMO").as_deref() != Ok("0"))
}

/// Contexts kept at once (the conditional, negative and paired conditions of one stage).
const CAPACITY: usize = 3;

/// One cross-attention layer's projections of a context, made by that layer on first use: `k`
/// and `v` of the non-zero batch elements (`nonzero`, in batch order; shapes are the layer's
/// own), and with any all-zero element the output row such an element gets.
#[derive(Debug, Clone)]
pub struct CrossKv {
    pub nonzero: Vec<usize>,
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
    /// `to_out(v(0))`, `[C]`, when some batch element's context is all zeros.
    pub zero_out: Option<Tensor>,
}

impl CrossKv {
    /// One layer's projections of `tokens` `[B, L, Cc]` whose all-zero elements are `zero`:
    /// `project` maps the non-zero elements' tokens (stacked in batch order) to their keys and
    /// values, `zero_row` maps one zero token `[1, 1, Cc]` to the `[C]` output row such an element
    /// gets (`to_out(v(0))`; called only when some element is all zeros).
    pub fn make(
        tokens: &Tensor,
        zero: &[bool],
        project: impl FnOnce(&Tensor) -> Result<(Tensor, Tensor)>,
        zero_row: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let nonzero: Vec<usize> = (0..zero.len()).filter(|&i| !zero[i]).collect();
        let (k, v) = if nonzero.is_empty() {
            (None, None)
        } else {
            let (k, v) = project(&select_batch(tokens, &nonzero)?)?;
            (Some(k), Some(v))
        };
        let zero_out = if nonzero.len() < zero.len() {
            let z = tokens.narrow(0, 0, 1)?.narrow(1, 0, 1)?.zeros_like()?;
            Some(zero_row(&z)?)
        } else {
            None
        };
        Ok(Self {
            nonzero,
            k,
            v,
            zero_out,
        })
    }

    /// The layer's output rows for a batch whose element `i` has `lens[i]` rows: the rows of
    /// `computed` (the non-zero elements' outputs, stacked in batch order) and, for the elements
    /// whose context is all zeros (`zero`), the zero row repeated; `[sum(lens), C]` in `dtype`.
    pub fn join(
        &self,
        zero: &[bool],
        lens: &[usize],
        computed: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Tensor> {
        let zero_out = self
            .zero_out
            .as_ref()
            .context("context: no zero-context row")?;
        let c = zero_out.dim(0)?;
        let constant = zero_out.to_dtype(dtype)?.reshape((1, c))?;
        let mut parts = Vec::with_capacity(lens.len());
        let mut row = 0;
        for (&n, &z) in lens.iter().zip(zero) {
            if n == 0 {
                continue;
            }
            if z {
                // a broadcast view: `cat` makes the one copy
                parts.push(constant.broadcast_as((n, c))?);
            } else {
                let o = computed.context("context: no output for a non-zero element")?;
                parts.push(o.narrow(0, row, n)?);
                row += n;
            }
        }
        Ok(match parts.len() {
            0 => Tensor::zeros((0, c), dtype, zero_out.device())?,
            _ => Tensor::cat(&parts, 0)?,
        })
    }
}

/// A context as the cross-attention layers see it: the tokens in the torso dtype, which batch
/// elements are all zeros, and each layer's projections.
#[derive(Debug)]
pub struct CachedContext {
    tokens: Tensor,
    zero: Vec<bool>,
    layers: Vec<Option<CrossKv>>,
}

/// What layer `i` gets of a [`CachedContext`].
pub struct LayerContext<'a> {
    pub tokens: &'a Tensor,
    pub zero: &'a [bool],
    pub kv: &'a mut Option<CrossKv>,
}

impl CachedContext {
    /// `tokens` `[B, L, C]`; finds the all-zero batch elements (one small read back).
    pub fn new(tokens: Tensor) -> Result<Self> {
        let (b, _, _) = tokens.dims3()?;
        let peak = tokens
            .abs()?
            .max_keepdim(2)?
            .max_keepdim(1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        ensure!(
            peak.len() == b,
            "context: {} peaks for batch {b}",
            peak.len()
        );
        Ok(Self {
            tokens,
            zero: peak.iter().map(|&m| m == 0.0).collect(),
            layers: Vec::new(),
        })
    }

    /// Which batch elements are all zeros.
    pub fn zero(&self) -> &[bool] {
        &self.zero
    }

    /// Layer `i`'s view (its projections made on its first call).
    pub fn layer(&mut self, i: usize) -> LayerContext<'_> {
        if self.layers.len() <= i {
            self.layers.resize(i + 1, None);
        }
        LayerContext {
            tokens: &self.tokens,
            zero: &self.zero,
            kv: &mut self.layers[i],
        }
    }
}

/// The context one cross-attention block attends to: the tokens (already in the block's dtype
/// for the dense blocks), or one layer's view of a kept context.
pub enum CrossContext<'a> {
    Tokens(&'a Tensor),
    Cached(LayerContext<'a>),
}

/// A flow's condition for one forward: the tokens in the torso dtype, or the context kept in a
/// [`ContextCache`] (when one is given and [`enabled`]).
pub enum FlowContext<'a> {
    Tokens(Tensor),
    Cached(&'a mut CachedContext),
}

impl<'a> FlowContext<'a> {
    /// `cond` `[B, L, C]` in `dtype`, through `cache` when one is given and [`enabled`].
    pub fn new(cond: &Tensor, dtype: DType, cache: Option<&'a mut ContextCache>) -> Result<Self> {
        Ok(match cache.filter(|_| enabled()) {
            Some(c) => Self::Cached(c.get(cond, dtype)?),
            None => Self::Tokens(cond.to_dtype(dtype)?),
        })
    }

    /// What cross-attention block `i` attends to.
    pub fn layer(&mut self, i: usize) -> CrossContext<'_> {
        match self {
            Self::Tokens(t) => CrossContext::Tokens(t),
            Self::Cached(c) => CrossContext::Cached(c.layer(i)),
        }
    }
}

/// The contexts of one sampling stage, matched by tensor identity (a clone of the same tensor
/// matches; equal values in another tensor do not), the last [`CAPACITY`] kept. Drop it when the
/// stage ends: it holds every layer's keys and values on the stage's device.
#[derive(Debug, Default)]
pub struct ContextCache {
    entries: VecDeque<(Tensor, CachedContext)>,
    timestep: Option<TimestepMemo>,
}

/// What a flow forward made from its timesteps `t`, for the next forward given the same `t`
/// tensor (matched by identity, like the contexts): `layers[0]` is the embedding the blocks take
/// (after any shared modulation, in the torso dtype), then each layer's own modulation in the
/// order the flow runs them.
#[derive(Debug, Clone)]
pub struct TimestepMemo {
    key: Tensor,
    pub layers: Vec<Tensor>,
}

impl ContextCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The layers kept from the last forward at timesteps `t` (the same tensor), when
    /// [`timestep_memo_enabled`].
    pub fn timestep(&self, t: &Tensor) -> Option<Vec<Tensor>> {
        self.timestep
            .as_ref()
            .filter(|m| timestep_memo_enabled() && m.key.id() == t.id())
            .map(|m| m.layers.clone())
    }

    /// Keeps `layers` (see [`TimestepMemo`]) made at timesteps `t`, replacing any earlier ones.
    pub fn keep_timestep(&mut self, t: &Tensor, layers: Vec<Tensor>) {
        if timestep_memo_enabled() {
            self.timestep = Some(TimestepMemo {
                key: t.clone(),
                layers,
            });
        }
    }

    /// The cached context of `cond` `[B, L, C]` in `dtype`, made when new.
    pub fn get(&mut self, cond: &Tensor, dtype: DType) -> Result<&mut CachedContext> {
        let hit = self
            .entries
            .iter()
            .position(|(key, c)| key.id() == cond.id() && c.tokens.dtype() == dtype);
        let i = match hit {
            Some(i) => i,
            None => {
                if self.entries.len() >= CAPACITY {
                    self.entries.pop_front();
                }
                let made = CachedContext::new(cond.to_dtype(dtype)?)?;
                self.entries.push_back((cond.clone(), made));
                self.entries.len() - 1
            }
        };
        Ok(&mut self.entries[i].1)
    }

    /// How many contexts are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Batch elements `idx` (ascending) of `t` along dim 0: a narrow when they are consecutive.
pub fn select_batch(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let consecutive = idx.windows(2).all(|w| w[1] == w[0] + 1);
    Ok(match idx.first() {
        Some(&first) if consecutive => t.narrow(0, first, idx.len())?,
        _ => {
            let ids: Vec<u32> = idx
                .iter()
                .map(|&i| u32::try_from(i))
                .collect::<std::result::Result<_, _>>()?;
            let n = ids.len();
            t.contiguous()?
                .index_select(&Tensor::from_vec(ids, n, t.device())?, 0)?
        }
    })
}

/// Rows `ranges` (ascending, disjoint) of `t` `[N, C]` as one tensor: a narrow when they touch.
pub fn select_rows(t: &Tensor, ranges: &[std::ops::Range<usize>]) -> Result<Tensor> {
    let touching = ranges.windows(2).all(|w| w[1].start == w[0].end);
    if let (true, Some(first), Some(last)) = (touching, ranges.first(), ranges.last()) {
        return Ok(t.narrow(0, first.start, last.end - first.start)?);
    }
    let ids: Vec<u32> = ranges
        .iter()
        .flat_map(|r| r.clone())
        .map(u32::try_from)
        .collect::<std::result::Result<_, _>>()?;
    let n = ids.len();
    Ok(t.contiguous()?
        .index_select(&Tensor::from_vec(ids, n, t.device())?, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_zero_elements_and_matches_by_identity() {
        let dev = Device::Cpu;
        let cond = Tensor::randn(0f32, 1.0, (1, 5, 4), &dev).unwrap();
        let pair = Tensor::cat(&[cond.clone(), cond.zeros_like().unwrap()], 0).unwrap();
        let mut cache = ContextCache::new();
        let c = cache.get(&pair, DType::F32).unwrap();
        assert_eq!(c.zero(), &[false, true]);
        c.layer(3).kv.replace(CrossKv {
            nonzero: vec![0],
            k: None,
            v: None,
            zero_out: None,
        });
        // the same tensor (or a clone) finds the entry and its layer slots
        let again = cache.get(&pair.clone(), DType::F32).unwrap();
        assert!(again.layer(3).kv.is_some());
        assert!(again.layer(0).kv.is_none());
        assert_eq!(cache.len(), 1);
        // equal values in another tensor are another entry; the oldest goes past CAPACITY
        for _ in 0..CAPACITY {
            let other = pair.copy().unwrap();
            assert!(cache.get(&other, DType::F32).unwrap().layer(3).kv.is_none());
        }
        assert_eq!(cache.len(), CAPACITY);
        assert!(cache.get(&pair, DType::F32).unwrap().layer(3).kv.is_none());
    }

    #[test]
    fn keeps_one_timestep_matched_by_identity() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[500f32], &dev).unwrap();
        let mut cache = ContextCache::new();
        assert!(cache.timestep(&t).is_none());
        let layer = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        cache.keep_timestep(&t, vec![layer.clone()]);
        let kept = cache.timestep(&t.clone()).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].id(), layer.id());
        // the same value in another tensor (the next step's `t`) is not a match, and replaces it
        let next = Tensor::new(&[500f32], &dev).unwrap();
        assert!(cache.timestep(&next).is_none());
        cache.keep_timestep(&next, vec![]);
        assert!(cache.timestep(&t).is_none());
        assert_eq!(cache.timestep(&next).map(|l| l.len()), Some(0));
    }

    #[test]
    fn selects_batch_elements_and_rows() {
        let dev = Device::Cpu;
        let t = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((4, 3))
            .unwrap();
        let v = |t: Tensor| t.to_vec2::<f32>().unwrap();
        assert_eq!(
            v(select_batch(&t, &[1, 2]).unwrap()),
            v(t.narrow(0, 1, 2).unwrap())
        );
        assert_eq!(
            v(select_batch(&t, &[0, 3]).unwrap()),
            vec![vec![0., 1., 2.], vec![9., 10., 11.]]
        );
        assert_eq!(
            v(select_rows(&t, &[0..1, 1..2]).unwrap()),
            v(t.narrow(0, 0, 2).unwrap())
        );
        assert_eq!(
            v(select_rows(&t, &[0..1, 2..4]).unwrap()),
            vec![vec![0., 1., 2.], vec![6., 7., 8.], vec![9., 10., 11.]]
        );
    }
}

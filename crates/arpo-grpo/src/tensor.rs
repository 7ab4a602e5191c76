//! The loss on candle tensors, built from differentiable ops only so that `backward` reaches
//! the log-probs.

use candle_core::{D, DType, Tensor};

use crate::slices::MASKED_MEAN_EPS;
use crate::{GrpoError, KlEstimator, LossAggMode, LossMetrics, PolicyLossConfig};

/// The inputs of [`policy_loss`]. `logp`, `old_logp`, `mask`, and when given `ref_logp`,
/// `entropy` and `rollout_logp` share one shape: `[batch, tokens]`, or `[tokens]` for a single sequence.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossInputs<'a> {
    /// Log-probs of the sampled tokens under the policy being trained: the tensor the gradient
    /// flows to. f32 or f64 (bf16/f16 are computed in f32).
    pub logp: &'a Tensor,
    /// Log-probs under the sampling policy (treated as constants).
    pub old_logp: &'a Tensor,
    /// Per token (the shape of `logp`), or one per sequence (`[batch]` for `[batch, tokens]`
    /// log-probs, a scalar for `[tokens]`). Treated as constants.
    pub advantages: &'a Tensor,
    /// Non-zero where a token is trained; any dtype.
    pub mask: &'a Tensor,
    /// Log-probs under the reference policy; required when a KL penalty is configured.
    pub ref_logp: Option<&'a Tensor>,
    /// Per-token entropies, for the `entropy` metric only.
    pub entropy: Option<&'a Tensor>,
    /// Log-probs under the sampler that produced the tokens, when it differs from the learner
    /// (a quantized model, a vLLM/SGLang server). Required when
    /// [`PolicyLossConfig::rollout_is_cap`] is set, ignored otherwise. Treated as constants.
    pub rollout_logp: Option<&'a Tensor>,
}

/// The loss to call `backward` on, and its metrics.
#[derive(Debug, Clone)]
pub struct PolicyLoss {
    /// A scalar tensor (f32, or f64 when `logp` is f64) attached to `logp`'s graph.
    pub loss: Tensor,
    pub metrics: LossMetrics,
}

/// The reference's clipped policy loss on tensors (see [`token_policy_loss`] for the per-token
/// formula), aggregated with `config.loss_agg_mode`, plus `coef · aggregate(kl)` when a KL
/// penalty is configured. With `config.rollout_is_cap` set, each token's clipped term is first
/// multiplied by its truncated importance weight (see [`rollout_is_weight`]; a constant, and not
/// applied to the KL term).
///
/// Masked tokens contribute nothing, not even NaN: their log-ratio and advantage are replaced
/// by 0 (with `where_cond`, which passes no gradient to the masked side) before any arithmetic.
/// For gradient accumulation over several calls, scale each loss by
/// [`LossAggMode::micro_batch_weight`].
///
/// [`token_policy_loss`]: crate::token_policy_loss
/// [`rollout_is_weight`]: crate::rollout_is_weight
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use arpo_grpo::{PolicyLossConfig, PolicyLossInputs, policy_loss};
///
/// let dev = Device::Cpu;
/// // Two sequences of three tokens, the last token of the second one is padding.
/// let logp = Var::new(&[[-1.0f32, -0.5, -2.0], [-0.1, -0.3, 0.0]], &dev)?;
/// let old = Tensor::new(&[[-1.0f32, -0.5, -2.0], [-0.1, -0.3, 0.0]], &dev)?;
/// let adv = Tensor::new(&[1.0f32, -0.5], &dev)?; // one advantage per sequence
/// let mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 0]], &dev)?;
/// let out = policy_loss(
///     &PolicyLossInputs {
///         logp: logp.as_tensor(), old_logp: &old, advantages: &adv, mask: &mask,
///         ref_logp: None, entropy: None, rollout_logp: None,
///     },
///     &PolicyLossConfig::default(),
/// )?;
/// // Ratio 1 everywhere: each sequence's token mean is −A, then the mean over sequences:
/// // (−1 + 0.5) / 2 = −0.25.
/// assert!((out.metrics.loss + 0.25).abs() < 1e-6);
/// let grads = out.loss.backward()?;
/// let g = grads.get(&logp).unwrap().to_vec2::<f32>()?;
/// // ∂/∂logp of −A·r/(n·B) = −A/(n·B): −1/6 on the first row, 0.5/4 on the second, 0 on padding.
/// assert!((g[0][0] + 1.0 / 6.0).abs() < 1e-6 && (g[1][0] - 0.125).abs() < 1e-6);
/// assert_eq!(g[1][2], 0.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn policy_loss(
    inputs: &PolicyLossInputs<'_>,
    config: &PolicyLossConfig,
) -> Result<PolicyLoss, GrpoError> {
    config.validate()?;
    let dtype = match inputs.logp.dtype() {
        DType::F64 => DType::F64,
        DType::F32 | DType::BF16 | DType::F16 => DType::F32,
        other => return Err(GrpoError::NotFloat { dtype: other }),
    };
    let dims = inputs.logp.dims().to_vec();
    let (batch, tokens) = match dims.as_slice() {
        [t] => (1, *t),
        [b, t] => (*b, *t),
        _ => {
            return Err(GrpoError::BadShape {
                name: "logp",
                got: dims,
                expected: "pass [batch, tokens] or [tokens]".into(),
            });
        }
    };
    if batch == 0 {
        return Err(GrpoError::EmptyBatch);
    }
    let as_rows = |t: &Tensor| t.reshape((batch, tokens));
    let same_shape = |name: &'static str, t: &Tensor| -> Result<Tensor, GrpoError> {
        if t.dims() != dims.as_slice() {
            return Err(GrpoError::BadShape {
                name,
                got: t.dims().to_vec(),
                expected: format!("must match logp's shape {dims:?}"),
            });
        }
        Ok(as_rows(t)?)
    };

    let logp = as_rows(inputs.logp)?.to_dtype(dtype)?;
    let old = same_shape("old_logp", inputs.old_logp)?
        .detach()
        .to_dtype(dtype)?;
    let mask = same_shape("mask", inputs.mask)?.detach().ne(0u8)?;
    let adv = advantages_as_rows(inputs.advantages, &dims, batch, tokens)?
        .detach()
        .to_dtype(dtype)?;
    let maskf = mask.to_dtype(dtype)?;
    let zeros = logp.zeros_like()?;

    // Masked tokens: log-ratio 0 and advantage 0, so ratio 1 and a finite zero loss.
    let x = mask.where_cond(&(&logp - &old)?, &zeros)?;
    let a = mask.where_cond(&adv, &zeros)?;
    let (lo, hi) = config.log_ratio_bounds();
    let ratio = x.exp()?;
    let clipped_ratio = x.clamp(lo, hi)?.exp()?;
    let neg_a = a.neg()?;
    let l1 = (&neg_a * &ratio)?;
    let l2 = (&neg_a * &clipped_ratio)?;
    let l3 = neg_a.affine(config.clip_ratio_dual, 0.0)?;
    let higher = l1.maximum(&l2)?;
    let lower = higher.minimum(&l3)?;
    let negative = a.lt(0.0)?;
    let per_token = negative.where_cond(&lower, &higher)?;

    let mode = config.loss_agg_mode;
    // Truncated importance sampling: min(exp(old − rollout), cap), 1 on masked tokens.
    let is_weight = match config.rollout_is_cap {
        None => None,
        Some(cap) => {
            let Some(rollout) = inputs.rollout_logp else {
                return Err(GrpoError::MissingInput {
                    name: "rollout_logp",
                    hint: "rollout_is_cap is set: pass the sampler's log-probs of the tokens",
                });
            };
            let rollout = same_shape("rollout_logp", rollout)?
                .detach()
                .to_dtype(dtype)?;
            let y = mask.where_cond(&(&old - &rollout)?, &zeros)?;
            Some(y.exp()?.clamp(0.0, cap)?)
        }
    };
    let per_token = match &is_weight {
        Some(w) => (&per_token * w)?,
        None => per_token,
    };
    let pg_loss = aggregate(&per_token, &maskf, mode)?;
    let mut loss = pg_loss.clone();
    let mut kl_loss = None;
    if let Some(kl) = config.kl {
        let Some(ref_logp) = inputs.ref_logp else {
            return Err(GrpoError::BadShape {
                name: "ref_logp",
                got: vec![],
                expected: "a KL penalty is configured: pass the reference policy's log-probs"
                    .into(),
            });
        };
        let ref_logp = same_shape("ref_logp", ref_logp)?.detach().to_dtype(dtype)?;
        let d = mask.where_cond(&(&logp - &ref_logp)?, &zeros)?;
        let kld = match kl.estimator {
            KlEstimator::Kl => d,
            KlEstimator::LowVarKl => {
                let k = d.neg()?;
                ((k.exp()? - &k)? - 1.0)?.clamp(-10.0, 10.0)?
            }
        };
        let kl_agg = aggregate(&kld, &maskf, mode)?;
        loss = (&loss + kl_agg.affine(kl.coef, 0.0)?)?;
        kl_loss = Some(scalar(&kl_agg)?);
    }

    // Metrics, detached.
    let fraction = |flags: &Tensor| -> Result<f64, GrpoError> {
        scalar(&aggregate(&flags.to_dtype(dtype)?, &maskf, mode)?)
    };
    let (l1d, l2d, l3d, higher_d) = (l1.detach(), l2.detach(), l3.detach(), higher.detach());
    let xd = x.detach();
    let pg_clipfrac_higher = fraction(&l1d.lt(&l2d)?)?;
    let dual = (higher_d.gt(&l3d)?.to_dtype(dtype)? * negative.to_dtype(dtype)?)?;
    let pg_clipfrac_lower = scalar(&aggregate(&dual, &maskf, mode)?)?;
    let ppo_kl = scalar(&aggregate(&xd.neg()?, &maskf, mode)?)?;
    let ratio_mean = scalar(&aggregate(&ratio.detach(), &maskf, mode)?)?;
    let rollout_is_weight = match &is_weight {
        Some(w) => Some(scalar(&aggregate(w, &maskf, mode)?)?),
        None => None,
    };
    let masked_logp = mask.where_cond(&logp.detach(), &zeros)?;
    let entropy_estimate = scalar(&aggregate(&masked_logp.neg()?, &maskf, mode)?)?;
    let entropy = match inputs.entropy {
        Some(e) => {
            let e = same_shape("entropy", e)?.detach().to_dtype(dtype)?;
            let e = mask.where_cond(&e, &zeros)?;
            Some(scalar(&aggregate(&e, &maskf, mode)?)?)
        }
        None => None,
    };
    let tokens_trained = maskf.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let metrics = LossMetrics {
        loss: scalar(&loss)?,
        pg_loss: scalar(&pg_loss)?,
        kl_loss,
        pg_clipfrac_higher,
        pg_clipfrac_lower,
        ppo_kl,
        ratio_mean,
        rollout_is_weight,
        entropy,
        entropy_estimate,
        sequences: batch,
        tokens: tokens_trained.round() as usize,
    };
    Ok(PolicyLoss { loss, metrics })
}

/// Broadcasts the advantages to `[batch, tokens]`.
fn advantages_as_rows(
    adv: &Tensor,
    logp_dims: &[usize],
    batch: usize,
    tokens: usize,
) -> Result<Tensor, GrpoError> {
    let rows = (batch, tokens);
    if adv.dims() == logp_dims {
        return Ok(adv.reshape(rows)?);
    }
    match (logp_dims.len(), adv.dims()) {
        (2, [b]) if *b == batch => Ok(adv.unsqueeze(1)?.broadcast_as(rows)?.contiguous()?),
        (1, []) => Ok(adv.reshape((1, 1))?.broadcast_as(rows)?.contiguous()?),
        _ => Err(GrpoError::BadShape {
            name: "advantages",
            got: adv.dims().to_vec(),
            expected: format!(
                "pass logp's shape {logp_dims:?} (per token), or one per sequence ([batch] for [batch, tokens] log-probs, a scalar for [tokens])"
            ),
        }),
    }
}

/// verl's masked mean, per the aggregation mode. `values` is already zero where masked.
fn aggregate(values: &Tensor, maskf: &Tensor, mode: LossAggMode) -> Result<Tensor, GrpoError> {
    let masked = (values * maskf)?;
    Ok(match mode {
        LossAggMode::SeqMeanTokenMean => {
            let per_seq = masked
                .sum(D::Minus1)?
                .div(&(maskf.sum(D::Minus1)? + MASKED_MEAN_EPS)?)?;
            per_seq.mean(0)?
        }
        LossAggMode::TokenMean => masked
            .sum_all()?
            .div(&(maskf.sum_all()? + MASKED_MEAN_EPS)?)?,
    })
}

fn scalar(t: &Tensor) -> Result<f64, GrpoError> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

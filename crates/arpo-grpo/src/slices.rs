//! The loss on plain `f64` slices, with its analytic gradient: for tests, for checking the
//! tensor form, and for users without candle tensors.

use crate::{GrpoError, KlEstimator, LossAggMode, LossMetrics, PolicyLossConfig};

/// The masked-mean epsilon of verl's `masked_mean`: `Σ m·v / (Σ m + 1e-8)`.
pub const MASKED_MEAN_EPS: f64 = 1e-8;

/// The clipped loss of one token, with what decided it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLoss {
    /// `max(−A·r, −A·clip(r))`, then for A < 0 `min(·, −clip_ratio_dual·A)`.
    pub loss: f64,
    /// `r = exp(logp − old_logp)`.
    pub ratio: f64,
    /// The ratio clip is active (`−A·r < −A·clip(r)`).
    pub clipped: bool,
    /// The dual clip is active (A < 0 and the clipped loss exceeds `−clip_ratio_dual·A`).
    pub dual_clipped: bool,
    /// `∂loss/∂logp`. At exact ties of `max`/`min`/`clamp` the subgradient is split evenly
    /// between the two sides, as candle's and PyTorch's backward of `maximum`/`minimum` do.
    pub dloss_dlogp: f64,
}

/// Weights of the two sides of `max(a, b)` (or `min`) in its gradient, given its value.
fn tie_weights(value: f64, a: f64, b: f64) -> (f64, f64) {
    let (ea, eb) = (
        f64::from(u8::from(value == a)),
        f64::from(u8::from(value == b)),
    );
    (ea / (1.0 + eb), eb / (1.0 + ea))
}

/// `clamp(x, lo, hi)` as `min(max(x, lo), hi)` and its derivative.
fn clamp_with_grad(x: f64, lo: f64, hi: f64) -> (f64, f64) {
    let m = x.max(lo);
    let dm = tie_weights(m, x, lo).0;
    let c = m.min(hi);
    let dc = tie_weights(c, m, hi).0;
    (c, dm * dc)
}

/// The reference's per-token policy loss (`compute_policy_loss` of verl/ARPO).
///
/// `r = exp(logp − old_logp)`, `clip(r) = exp(clamp(logp − old_logp, ln(1 − ε_low),
/// ln(1 + ε_high)))`, `pg = max(−A·r, −A·clip(r))`, and for `A < 0`: `min(pg, −dual·A)`.
///
/// ```
/// use arpo_grpo::{PolicyLossConfig, token_policy_loss};
///
/// // A = 1, r = 1.5 > 1.3: the loss is clipped to −1.3 and has no gradient.
/// let t = token_policy_loss(1.5f64.ln(), 0.0, 1.0, &PolicyLossConfig::default());
/// assert!((t.loss + 1.3).abs() < 1e-12 && t.clipped && t.dloss_dlogp == 0.0);
/// ```
pub fn token_policy_loss(
    logp: f64,
    old_logp: f64,
    advantage: f64,
    config: &PolicyLossConfig,
) -> TokenLoss {
    let (lo, hi) = config.log_ratio_bounds();
    let x = logp - old_logp;
    let ratio = x.exp();
    let (cx, dcx) = clamp_with_grad(x, lo, hi);
    let clipped_ratio = cx.exp();
    let a = advantage;
    let l1 = -a * ratio;
    let l2 = -a * clipped_ratio;
    let l3 = -a * config.clip_ratio_dual;
    let higher = l1.max(l2);
    let (w1, w2) = tie_weights(higher, l1, l2);
    let d_higher = w1 * (-a * ratio) + w2 * (-a * clipped_ratio * dcx);
    let lower = higher.min(l3);
    let d_lower = tie_weights(lower, higher, l3).0 * d_higher;
    let negative = a < 0.0;
    TokenLoss {
        loss: if negative { lower } else { higher },
        ratio,
        clipped: l1 < l2,
        dual_clipped: negative && higher > l3,
        dloss_dlogp: if negative { d_lower } else { d_higher },
    }
}

/// The KL estimate of one token and its derivative with respect to `logp`.
///
/// - `kl`: `logp − ref_logp`;
/// - `low_var_kl`: `clamp(exp(k) − k − 1, −10, 10)` with `k = ref_logp − logp`.
///
/// ```
/// use arpo_grpo::{KlEstimator, token_kl};
///
/// // k = ln 2: exp(k) − k − 1 = 1 − ln 2
/// let (kl, _) = token_kl(KlEstimator::LowVarKl, 0.0, 2f64.ln());
/// assert!((kl - (1.0 - 2f64.ln())).abs() < 1e-12);
/// ```
pub fn token_kl(estimator: KlEstimator, logp: f64, ref_logp: f64) -> (f64, f64) {
    match estimator {
        KlEstimator::Kl => (logp - ref_logp, 1.0),
        KlEstimator::LowVarKl => {
            let k = ref_logp - logp;
            let raw = k.exp() - k - 1.0;
            let (value, dclamp) = clamp_with_grad(raw, -10.0, 10.0);
            // d(exp(k) − k − 1)/dlogp = −(exp(k) − 1)
            (value, dclamp * -(k.exp() - 1.0))
        }
    }
}

/// The truncated importance weight of one token (verl's TIS, `tis_imp_ratio_cap`):
/// `min(exp(old_logp − rollout_logp), cap)`, with `old_logp` the learner's log-prob of the token
/// and `rollout_logp` the sampler's. It multiplies the token's clipped policy-gradient loss as a
/// constant (no gradient flows through it).
///
/// ```
/// use arpo_grpo::rollout_is_weight;
///
/// // The learner gives the token twice the sampler's probability: weight 2, unless capped.
/// assert!((rollout_is_weight(2f64.ln(), 0.0, 5.0) - 2.0).abs() < 1e-12);
/// assert_eq!(rollout_is_weight(3f64.ln(), 0.0, 2.0), 2.0);
/// ```
pub fn rollout_is_weight(old_logp: f64, rollout_logp: f64, cap: f64) -> f64 {
    (old_logp - rollout_logp).exp().min(cap)
}

/// One sequence of the slice form. Every slice has the sequence's length; tokens with
/// `mask[t] == false` (prompt, screenshots, padding) are ignored whatever their values.
#[derive(Debug, Clone, Copy)]
pub struct SequenceInput<'a> {
    /// Log-probs of the sampled tokens under the policy being trained.
    pub logp: &'a [f64],
    /// Log-probs under the policy that sampled (for ARPO: the current weights before the
    /// update, recomputed for injected episodes too).
    pub old_logp: &'a [f64],
    /// Per-token advantages (GRPO: the trajectory's advantage on every token).
    pub advantages: &'a [f64],
    /// Which tokens are trained.
    pub mask: &'a [bool],
    /// Log-probs under the reference policy (needed when a KL penalty is configured).
    pub ref_logp: Option<&'a [f64]>,
    /// Per-token entropies of the policy, for the `entropy` metric.
    pub entropy: Option<&'a [f64]>,
    /// Log-probs under the sampler that produced the tokens, when it differs from the learner
    /// (needed when [`PolicyLossConfig::rollout_is_cap`] is set, ignored otherwise).
    pub rollout_logp: Option<&'a [f64]>,
}

/// The loss of a batch, its metrics, and `∂loss/∂logp` for every token.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceLoss {
    pub loss: f64,
    pub metrics: LossMetrics,
    /// Same shape as the input: one vector per sequence (0 on masked tokens).
    pub grad_logp: Vec<Vec<f64>>,
}

/// The aggregated policy loss of a batch of sequences (the same formulas as
/// [`policy_loss`](crate::policy_loss), in `f64`).
///
/// ```
/// use arpo_grpo::{PolicyLossConfig, SequenceInput, policy_loss_slices};
///
/// // One sequence, two trained tokens at ratio 1 with A = 0.5: the loss is −A·r = −0.5.
/// let seq = SequenceInput {
///     logp: &[-1.0, -2.0, -0.5], old_logp: &[-1.0, -2.0, -0.9],
///     advantages: &[0.5; 3], mask: &[true, true, false],
///     ref_logp: None, entropy: None, rollout_logp: None,
/// };
/// let out = policy_loss_slices(&[seq], &PolicyLossConfig::default())?;
/// assert!((out.loss + 0.5).abs() < 1e-8);
/// assert_eq!(out.metrics.tokens, 2);
/// # Ok::<(), arpo_grpo::GrpoError>(())
/// ```
pub fn policy_loss_slices(
    sequences: &[SequenceInput<'_>],
    config: &PolicyLossConfig,
) -> Result<SliceLoss, GrpoError> {
    config.validate()?;
    if sequences.is_empty() {
        return Err(GrpoError::EmptyBatch);
    }
    for seq in sequences {
        let n = seq.logp.len();
        let check = |name, len| {
            if len == n {
                Ok(())
            } else {
                Err(GrpoError::LengthMismatch {
                    name,
                    got: len,
                    expected: n,
                    hint: "every per-token slice of a sequence has the length of its logp",
                })
            }
        };
        check("old_logp", seq.old_logp.len())?;
        check("advantages", seq.advantages.len())?;
        check("mask", seq.mask.len())?;
        if let Some(r) = seq.ref_logp {
            check("ref_logp", r.len())?;
        }
        if let Some(e) = seq.entropy {
            check("entropy", e.len())?;
        }
        if let Some(r) = seq.rollout_logp {
            check("rollout_logp", r.len())?;
        }
        if config.rollout_is_cap.is_some() && seq.rollout_logp.is_none() {
            return Err(GrpoError::MissingInput {
                name: "rollout_logp",
                hint: "rollout_is_cap is set: pass the sampler's log-probs of the tokens",
            });
        }
        if config.kl.is_some() && seq.ref_logp.is_none() {
            return Err(GrpoError::LengthMismatch {
                name: "ref_logp",
                got: 0,
                expected: n,
                hint: "a KL penalty is configured: pass the reference policy's log-probs",
            });
        }
    }
    let with_entropy = sequences.iter().all(|s| s.entropy.is_some());
    let b = sequences.len() as f64;
    let total_tokens: usize = sequences
        .iter()
        .map(|s| s.mask.iter().filter(|&&m| m).count())
        .sum();

    // Sums of the per-token quantities, each weighted as the aggregation mode says.
    #[derive(Default)]
    struct Acc {
        pg: f64,
        kl: f64,
        clip_hi: f64,
        clip_lo: f64,
        ppo_kl: f64,
        ratio: f64,
        entropy: f64,
        neg_logp: f64,
        is_weight: f64,
    }
    let mut acc = Acc::default();
    let mut grad_logp = Vec::with_capacity(sequences.len());
    for seq in sequences {
        let n_seq = seq.mask.iter().filter(|&&m| m).count();
        let weight = match config.loss_agg_mode {
            LossAggMode::SeqMeanTokenMean => 1.0 / ((n_seq as f64 + MASKED_MEAN_EPS) * b),
            LossAggMode::TokenMean => 1.0 / (total_tokens as f64 + MASKED_MEAN_EPS),
        };
        let mut grad = vec![0.0; seq.logp.len()];
        for t in 0..seq.logp.len() {
            if !seq.mask[t] {
                continue;
            }
            let tok = token_policy_loss(seq.logp[t], seq.old_logp[t], seq.advantages[t], config);
            let is_weight = match (config.rollout_is_cap, seq.rollout_logp) {
                (Some(cap), Some(r)) => rollout_is_weight(seq.old_logp[t], r[t], cap),
                _ => 1.0,
            };
            let mut d = is_weight * tok.dloss_dlogp;
            acc.pg += weight * is_weight * tok.loss;
            acc.is_weight += weight * is_weight;
            if let (Some(kl), Some(r)) = (config.kl, seq.ref_logp) {
                let (k, dk) = token_kl(kl.estimator, seq.logp[t], r[t]);
                acc.kl += weight * k;
                d += kl.coef * dk;
            }
            grad[t] = weight * d;
            acc.clip_hi += weight * f64::from(u8::from(tok.clipped));
            acc.clip_lo += weight * f64::from(u8::from(tok.dual_clipped));
            acc.ppo_kl += weight * (seq.old_logp[t] - seq.logp[t]);
            acc.ratio += weight * tok.ratio;
            acc.neg_logp -= weight * seq.logp[t];
            if let Some(e) = seq.entropy {
                acc.entropy += weight * e[t];
            }
        }
        grad_logp.push(grad);
    }
    let kl_loss = config.kl.map(|_| acc.kl);
    let loss = acc.pg + config.kl.map_or(0.0, |kl| kl.coef * acc.kl);
    Ok(SliceLoss {
        loss,
        metrics: LossMetrics {
            loss,
            pg_loss: acc.pg,
            kl_loss,
            pg_clipfrac_higher: acc.clip_hi,
            pg_clipfrac_lower: acc.clip_lo,
            ppo_kl: acc.ppo_kl,
            ratio_mean: acc.ratio,
            rollout_is_weight: config.rollout_is_cap.map(|_| acc.is_weight),
            entropy: with_entropy.then_some(acc.entropy),
            entropy_estimate: acc.neg_logp,
            sequences: sequences.len(),
            tokens: total_tokens,
        },
        grad_logp,
    })
}

//! Policy-loss settings and the metrics both loss forms report.

use serde::{Deserialize, Serialize};

use crate::GrpoError;

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LossAggMode {
    /// Masked token mean within each sequence, then the mean over sequences. The reference
    /// (verl's masked mean over a micro-batch of one trajectory, averaged by gradient
    /// accumulation). A sequence without trained tokens counts as a zero.
    #[default]
    #[serde(rename = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    /// Masked mean over all tokens of the batch (DAPO): long sequences weigh more.
    #[serde(rename = "token-mean")]
    TokenMean,
}

/// The size of a (micro-)batch, for [`LossAggMode::micro_batch_weight`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchCount {
    pub sequences: usize,
    /// Trained (mask = 1) tokens.
    pub tokens: usize,
}

impl LossAggMode {
    /// The factor by which to multiply the loss of a micro-batch before `backward` when
    /// gradients are accumulated over a mini-batch, so that the accumulated gradient is that of
    /// the loss aggregated over the whole mini-batch: `micro.sequences / total.sequences` for
    /// seq-mean-token-mean (the reference's `loss / gradient_accumulation` with micro-batches of
    /// one), `micro.tokens / total.tokens` for token-mean. 0 when the total is 0.
    ///
    /// ```
    /// use arpo_grpo::{BatchCount, LossAggMode};
    ///
    /// let micro = BatchCount { sequences: 1, tokens: 30 };
    /// let total = BatchCount { sequences: 8, tokens: 120 };
    /// assert_eq!(LossAggMode::SeqMeanTokenMean.micro_batch_weight(micro, total), 0.125);
    /// assert_eq!(LossAggMode::TokenMean.micro_batch_weight(micro, total), 0.25);
    /// ```
    pub fn micro_batch_weight(self, micro: BatchCount, total: BatchCount) -> f64 {
        let (part, whole) = match self {
            LossAggMode::SeqMeanTokenMean => (micro.sequences, total.sequences),
            LossAggMode::TokenMean => (micro.tokens, total.tokens),
        };
        if whole == 0 {
            0.0
        } else {
            part as f64 / whole as f64
        }
    }
}

/// The KL estimator of the optional penalty to a reference policy (verl's `kl_penalty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KlEstimator {
    /// `logp − ref_logp` (k1).
    #[serde(rename = "kl")]
    Kl,
    /// `exp(k) − k − 1` with `k = ref_logp − logp`, clamped to [−10, 10] (Schulman's k3).
    #[serde(rename = "low_var_kl")]
    LowVarKl,
}

/// A KL penalty to a reference policy, added to the loss as `coef · aggregate(kl)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlPenalty {
    pub estimator: KlEstimator,
    pub coef: f64,
}

/// The clipped policy loss. [`Default`] is the reference: clip to [1 − 0.2, 1 + 0.3], dual clip
/// 3, seq-mean-token-mean, no KL, no rollout importance weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyLossConfig {
    /// ε_low: the ratio is clipped below at `1 − clip_ratio_low` (0.2).
    pub clip_ratio_low: f64,
    /// ε_high: the ratio is clipped above at `1 + clip_ratio_high` (0.3, "clip-higher").
    pub clip_ratio_high: f64,
    /// For negative advantages the per-token loss is at most `−clip_ratio_dual · A` (3.0).
    pub clip_ratio_dual: f64,
    pub loss_agg_mode: LossAggMode,
    /// Off by default (the reference runs with `disable_kl: true`).
    pub kl: Option<KlPenalty>,
    /// Truncated importance sampling for a sampler that differs from the learner (verl's
    /// `tis_imp_ratio_cap`: a quantized in-process model, vLLM, SGLang): each token's clipped
    /// policy-gradient term is multiplied by the constant `min(exp(old_logp − rollout_logp), cap)`,
    /// `old_logp` the learner's log-prob and `rollout_logp` the sampler's. `None` (the default,
    /// the reference) multiplies by 1; when set it must be a finite number > 0 and the loss needs
    /// the sampler's log-probs.
    pub rollout_is_cap: Option<f64>,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        Self {
            clip_ratio_low: 0.2,
            clip_ratio_high: 0.3,
            clip_ratio_dual: 3.0,
            loss_agg_mode: LossAggMode::SeqMeanTokenMean,
            kl: None,
            rollout_is_cap: None,
        }
    }
}

impl PolicyLossConfig {
    /// Checks the ranges: `0 ≤ clip_ratio_low < 1`, `clip_ratio_high ≥ 0`,
    /// `clip_ratio_dual > 1`, a finite `coef ≥ 0`, a finite `rollout_is_cap > 0`.
    pub fn validate(&self) -> Result<(), GrpoError> {
        let bad = |field, reason: String| Err(GrpoError::InvalidConfig { field, reason });
        if !(self.clip_ratio_low >= 0.0 && self.clip_ratio_low < 1.0) {
            return bad(
                "clip_ratio_low",
                format!("must be in [0, 1), got {}", self.clip_ratio_low),
            );
        }
        if !(self.clip_ratio_high >= 0.0 && self.clip_ratio_high.is_finite()) {
            return bad(
                "clip_ratio_high",
                format!("must be a finite number >= 0, got {}", self.clip_ratio_high),
            );
        }
        if !(self.clip_ratio_dual > 1.0 && self.clip_ratio_dual.is_finite()) {
            return bad(
                "clip_ratio_dual",
                format!(
                    "must be a finite number > 1 (use a large value to turn the dual clip off), got {}",
                    self.clip_ratio_dual
                ),
            );
        }
        if let Some(kl) = self.kl
            && !(kl.coef >= 0.0 && kl.coef.is_finite())
        {
            return bad(
                "kl.coef",
                format!("must be a finite number >= 0, got {}", kl.coef),
            );
        }
        if let Some(cap) = self.rollout_is_cap
            && !(cap > 0.0 && cap.is_finite())
        {
            return bad(
                "rollout_is_cap",
                format!(
                    "must be a finite number > 0 (2 is usual; leave it unset to turn the importance weight off), got {cap}"
                ),
            );
        }
        Ok(())
    }

    /// `(ln(1 − clip_ratio_low), ln(1 + clip_ratio_high))`: the log-ratio is clamped to this
    /// range before `exp`, as in the reference.
    pub fn log_ratio_bounds(&self) -> (f64, f64) {
        (
            (1.0 - self.clip_ratio_low).ln(),
            self.clip_ratio_high.ln_1p(),
        )
    }
}

/// What a loss computation reports (verl's `actor/*` metrics). Every per-token quantity is
/// aggregated over the trained tokens with the config's [`LossAggMode`], like the loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossMetrics {
    /// `pg_loss + coef · kl_loss`: the value of the returned loss.
    pub loss: f64,
    /// The clipped policy-gradient loss (each token's term times its rollout importance weight
    /// when [`PolicyLossConfig::rollout_is_cap`] is set).
    pub pg_loss: f64,
    /// The aggregated KL estimate to the reference policy, when a penalty is configured.
    pub kl_loss: Option<f64>,
    /// Fraction of tokens where the ratio clip is active (`−A·r < −A·clip(r)`: the loss was
    /// clipped to a higher value), verl's `pg_clipfrac_higher`.
    pub pg_clipfrac_higher: f64,
    /// Fraction of tokens where the dual clip is active (A < 0 and the clipped loss exceeds
    /// `−clip_ratio_dual · A`: clipped to a lower value), verl's `pg_clipfrac_lower`.
    pub pg_clipfrac_lower: f64,
    /// `old_logp − logp`, an estimate of KL(old ‖ new), verl's `ppo_kl`.
    pub ppo_kl: f64,
    /// Mean of `exp(logp − old_logp)`.
    pub ratio_mean: f64,
    /// Mean of the truncated importance weight `min(exp(old_logp − rollout_logp), cap)`, when
    /// [`PolicyLossConfig::rollout_is_cap`] is set.
    #[serde(default)]
    pub rollout_is_weight: Option<f64>,
    /// Mean of the given per-token entropies.
    pub entropy: Option<f64>,
    /// `−logp` of the sampled tokens: a one-sample entropy estimate, verl's `entropy_loss`.
    pub entropy_estimate: f64,
    /// Number of sequences.
    pub sequences: usize,
    /// Number of trained tokens.
    pub tokens: usize,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_reference() {
        let c = PolicyLossConfig::default();
        assert_eq!(
            (c.clip_ratio_low, c.clip_ratio_high, c.clip_ratio_dual),
            (0.2, 0.3, 3.0)
        );
        assert_eq!(c.loss_agg_mode, LossAggMode::SeqMeanTokenMean);
        assert!(c.kl.is_none());
        assert!(c.rollout_is_cap.is_none());
        let (lo, hi) = c.log_ratio_bounds();
        assert!((lo - 0.8f64.ln()).abs() < 1e-15 && (hi - 1.3f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn config_uses_verl_names() {
        let c: PolicyLossConfig = serde_json::from_str(
            r#"{"loss_agg_mode": "token-mean", "kl": {"estimator": "low_var_kl", "coef": 0.01}}"#,
        )
        .unwrap();
        assert_eq!(c.loss_agg_mode, LossAggMode::TokenMean);
        assert_eq!(
            c.kl,
            Some(KlPenalty {
                estimator: KlEstimator::LowVarKl,
                coef: 0.01
            })
        );
        assert_eq!(c.clip_ratio_high, 0.3);
        let c: PolicyLossConfig = serde_json::from_str(r#"{"rollout_is_cap": 2.0}"#).unwrap();
        assert_eq!(c.rollout_is_cap, Some(2.0));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for c in [
            PolicyLossConfig {
                clip_ratio_low: 1.0,
                ..Default::default()
            },
            PolicyLossConfig {
                clip_ratio_high: -0.1,
                ..Default::default()
            },
            PolicyLossConfig {
                clip_ratio_dual: 1.0,
                ..Default::default()
            },
            PolicyLossConfig {
                kl: Some(KlPenalty {
                    estimator: KlEstimator::Kl,
                    coef: f64::NAN,
                }),
                ..Default::default()
            },
            PolicyLossConfig {
                rollout_is_cap: Some(0.0),
                ..Default::default()
            },
            PolicyLossConfig {
                rollout_is_cap: Some(-1.0),
                ..Default::default()
            },
            PolicyLossConfig {
                rollout_is_cap: Some(f64::INFINITY),
                ..Default::default()
            },
        ] {
            assert!(c.validate().is_err(), "{c:?}");
        }
        let err = PolicyLossConfig {
            rollout_is_cap: Some(-2.0),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rollout_is_cap") && err.contains("-2"),
            "{err}"
        );
    }

    #[test]
    fn micro_batch_weight_of_an_empty_total_is_zero() {
        let zero = BatchCount::default();
        assert_eq!(LossAggMode::TokenMean.micro_batch_weight(zero, zero), 0.0);
    }
}

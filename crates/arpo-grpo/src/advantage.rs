//! Group-relative advantages from scalar outcome rewards.

use std::collections::HashMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::GrpoError;

/// How a group's rewards become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// `A_i = (r_i − mean) / (std + eps)`, std unbiased (N − 1). The reference.
    #[default]
    Grpo,
    /// Dr. GRPO: `A_i = r_i − mean` (no division by the std).
    DrGrpo,
    /// RLOO: `A_i = r_i − mean of the other rewards of the group`.
    Rloo,
}

/// Advantage settings. [`Default`] is the reference: GRPO with `eps = 1e-6`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvantageConfig {
    pub estimator: AdvantageEstimator,
    /// Added to the std before dividing (GRPO only).
    pub eps: f64,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            estimator: AdvantageEstimator::Grpo,
            eps: 1e-6,
        }
    }
}

impl AdvantageConfig {
    /// Checks that `eps` is a finite non-negative number.
    pub fn validate(&self) -> Result<(), GrpoError> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(GrpoError::InvalidConfig {
                field: "eps",
                reason: format!("must be a finite number >= 0, got {}", self.eps),
            });
        }
        Ok(())
    }
}

/// The advantages of one group (all rollouts of one task in one step), in the rewards' order.
///
/// - GRPO: `(r_i − mean) / (std + eps)` with the unbiased std (divide by N − 1);
/// - Dr. GRPO: `r_i − mean`;
/// - RLOO: `r_i − (Σ_{j≠i} r_j) / (N − 1)`.
///
/// A group of one has mean 0 and std 1, as in verl (so GRPO gives `r / (1 + eps)` and the
/// others give `r`). A group of equal rewards gets exactly zero advantages. Every token of a
/// trajectory's assistant turns gets its trajectory's advantage.
///
/// ```
/// use arpo_grpo::{AdvantageConfig, group_advantages};
///
/// // mean 0.25, unbiased std sqrt((0.75² + 3 · 0.25²) / 3) = 0.5
/// let a = group_advantages(&[1.0, 0.0, 0.0, 0.0], &AdvantageConfig::default())?;
/// assert!((a[0] - 0.75 / 0.500001).abs() < 1e-12);
/// assert!((a[1] + 0.25 / 0.500001).abs() < 1e-12);
/// # Ok::<(), arpo_grpo::GrpoError>(())
/// ```
pub fn group_advantages(rewards: &[f64], config: &AdvantageConfig) -> Result<Vec<f64>, GrpoError> {
    let mut out = vec![0.0; rewards.len()];
    group_advantages_into(rewards, config, &mut out)?;
    Ok(out)
}

/// [`group_advantages`] writing into `out` (same length as `rewards`), without allocating.
pub fn group_advantages_into(
    rewards: &[f64],
    config: &AdvantageConfig,
    out: &mut [f64],
) -> Result<(), GrpoError> {
    config.validate()?;
    if out.len() != rewards.len() {
        return Err(GrpoError::LengthMismatch {
            name: "out",
            got: out.len(),
            expected: rewards.len(),
            hint: "pass one output slot per reward",
        });
    }
    if let Some((index, &value)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(GrpoError::NonFiniteReward { index, value });
    }
    let n = rewards.len();
    if n == 0 {
        return Ok(());
    }
    if n == 1 {
        // verl: a group of one has mean 0 and std 1.
        out[0] = match config.estimator {
            AdvantageEstimator::Grpo => rewards[0] / (1.0 + config.eps),
            AdvantageEstimator::DrGrpo | AdvantageEstimator::Rloo => rewards[0],
        };
        return Ok(());
    }
    // Deviations are taken from the first reward, so that equal rewards give exactly zero and
    // adding a constant to all rewards changes nothing but rounding.
    let first = rewards[0];
    let nf = n as f64;
    let shifted_mean = rewards.iter().map(|r| r - first).sum::<f64>() / nf;
    let centered = |r: f64| (r - first) - shifted_mean;
    match config.estimator {
        AdvantageEstimator::Grpo => {
            let var = rewards.iter().map(|&r| centered(r).powi(2)).sum::<f64>() / (nf - 1.0);
            let denom = var.sqrt() + config.eps;
            for (o, &r) in out.iter_mut().zip(rewards) {
                let c = centered(r);
                // c == 0 also covers eps = 0 with equal rewards (0 / 0).
                *o = if c == 0.0 { 0.0 } else { c / denom };
            }
        }
        AdvantageEstimator::DrGrpo => {
            for (o, &r) in out.iter_mut().zip(rewards) {
                *o = centered(r);
            }
        }
        AdvantageEstimator::Rloo => {
            // r_i − (S − r_i)/(N − 1) = N/(N − 1) · (r_i − S/N)
            let scale = nf / (nf - 1.0);
            for (o, &r) in out.iter_mut().zip(rewards) {
                *o = scale * centered(r);
            }
        }
    }
    Ok(())
}

/// Advantages for a flat batch where `group_ids[i]` names the group of `rewards[i]` (verl's
/// `index`/`uid` form). Groups need not be contiguous; each keeps its members' order.
///
/// ```
/// use arpo_grpo::{AdvantageConfig, AdvantageEstimator, batch_advantages};
///
/// let config = AdvantageConfig { estimator: AdvantageEstimator::DrGrpo, ..Default::default() };
/// let a = batch_advantages(&["a", "b", "a", "b"], &[1.0, 2.0, 0.0, 2.0], &config)?;
/// assert_eq!(a, [0.5, 0.0, -0.5, 0.0]);
/// # Ok::<(), arpo_grpo::GrpoError>(())
/// ```
pub fn batch_advantages<K: Eq + Hash>(
    group_ids: &[K],
    rewards: &[f64],
    config: &AdvantageConfig,
) -> Result<Vec<f64>, GrpoError> {
    if group_ids.len() != rewards.len() {
        return Err(GrpoError::LengthMismatch {
            name: "group_ids",
            got: group_ids.len(),
            expected: rewards.len(),
            hint: "pass one group id per reward",
        });
    }
    let mut members: HashMap<&K, Vec<usize>> = HashMap::new();
    for (i, id) in group_ids.iter().enumerate() {
        members.entry(id).or_default().push(i);
    }
    let mut out = vec![0.0; rewards.len()];
    for indices in members.values() {
        let group: Vec<f64> = indices.iter().map(|&i| rewards[i]).collect();
        let adv = group_advantages(&group, config).map_err(|e| match e {
            GrpoError::NonFiniteReward { index, value } => GrpoError::NonFiniteReward {
                index: indices[index],
                value,
            },
            other => other,
        })?;
        for (&i, a) in indices.iter().zip(adv) {
            out[i] = a;
        }
    }
    Ok(out)
}

/// The reference's "invalid group" threshold: a group whose reward std is below it gives
/// (almost) zero advantages, hence no gradient.
pub const INVALID_GROUP_STD: f64 = 0.01;

/// The unbiased standard deviation (divide by N − 1) of a group's rewards; `None` for fewer
/// than two rewards.
pub fn reward_std(rewards: &[f64]) -> Option<f64> {
    let first = *rewards.first()?;
    if rewards.len() < 2 {
        return None;
    }
    let nf = rewards.len() as f64;
    let mean = rewards.iter().map(|r| r - first).sum::<f64>() / nf;
    let var = rewards
        .iter()
        .map(|r| ((r - first) - mean).powi(2))
        .sum::<f64>()
        / (nf - 1.0);
    Some(var.sqrt())
}

/// Whether a group is "invalid" in the reference's metric `num_invalid_group`: at least two
/// rewards and `reward_std < INVALID_GROUP_STD`.
pub fn is_invalid_group(rewards: &[f64]) -> bool {
    reward_std(rewards).is_some_and(|s| s < INVALID_GROUP_STD)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(estimator: AdvantageEstimator) -> AdvantageConfig {
        AdvantageConfig {
            estimator,
            ..AdvantageConfig::default()
        }
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn golden_grpo_one_success_in_four() {
        // r = [1, 0, 0, 0]: mean 0.25; unbiased var = (0.75² + 3·0.25²)/3 = 0.75/3 = 0.25, std 0.5.
        // A = (r − 0.25)/(0.5 + 1e-6): 0.75/0.500001 = 1.499997000006, −0.25/0.500001 = −0.499999000002
        let a = group_advantages(&[1.0, 0.0, 0.0, 0.0], &AdvantageConfig::default()).unwrap();
        close(
            &a,
            &[
                1.499997000006,
                -0.499999000002,
                -0.499999000002,
                -0.499999000002,
            ],
            1e-11,
        );
    }

    #[test]
    fn golden_grpo_with_a_format_failure() {
        // r = eval + 0.5·format = [1, 0, −0.5]: mean 1/6; deviations 5/6, −1/6, −2/3;
        // unbiased var = (25/36 + 1/36 + 16/36)/2 = 42/72 = 7/12, std = 0.7637626158259734.
        let a = group_advantages(&[1.0, 0.0, -0.5], &AdvantageConfig::default()).unwrap();
        let d = 0.7637626158259734 + 1e-6;
        close(
            &a,
            &[(5.0 / 6.0) / d, (-1.0 / 6.0) / d, (-2.0 / 3.0) / d],
            1e-12,
        );
    }

    #[test]
    fn golden_dr_grpo_and_rloo() {
        let r = [1.0, 0.0, 0.0, 0.0];
        // Dr. GRPO: r − 0.25.
        let a = group_advantages(&r, &cfg(AdvantageEstimator::DrGrpo)).unwrap();
        close(&a, &[0.75, -0.25, -0.25, -0.25], 1e-15);
        // RLOO: r_0 − mean(0,0,0) = 1; r_1 − mean(1,0,0) = −1/3.
        let a = group_advantages(&r, &cfg(AdvantageEstimator::Rloo)).unwrap();
        close(&a, &[1.0, -1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0], 1e-15);
        // RLOO on [3, 1]: 3 − 1 = 2, 1 − 3 = −2.
        let a = group_advantages(&[3.0, 1.0], &cfg(AdvantageEstimator::Rloo)).unwrap();
        close(&a, &[2.0, -2.0], 1e-15);
    }

    #[test]
    fn group_of_one_has_mean_zero_and_std_one() {
        let a = group_advantages(&[1.0], &AdvantageConfig::default()).unwrap();
        assert_eq!(a, [1.0 / 1.000001]);
        let a = group_advantages(&[-0.5], &cfg(AdvantageEstimator::DrGrpo)).unwrap();
        assert_eq!(a, [-0.5]);
        let a = group_advantages(&[0.25], &cfg(AdvantageEstimator::Rloo)).unwrap();
        assert_eq!(a, [0.25]);
        assert!(
            group_advantages(&[], &AdvantageConfig::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn equal_rewards_give_exact_zeros_even_without_eps() {
        let zero_eps = AdvantageConfig {
            eps: 0.0,
            ..AdvantageConfig::default()
        };
        // 0.1 · 3 is not exactly 0.3 in binary: a naive mean would leave 1e-17 residues.
        let a = group_advantages(&[0.1, 0.1, 0.1], &zero_eps).unwrap();
        assert_eq!(a, [0.0, 0.0, 0.0]);
    }

    #[test]
    fn non_finite_rewards_are_rejected_with_their_index() {
        let err = group_advantages(&[0.0, f64::NAN], &AdvantageConfig::default()).unwrap_err();
        assert!(matches!(err, GrpoError::NonFiniteReward { index: 1, .. }));
        let err = batch_advantages(
            &[7, 8, 7],
            &[0.0, 1.0, f64::INFINITY],
            &AdvantageConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(err, GrpoError::NonFiniteReward { index: 2, .. }));
        let bad = AdvantageConfig {
            eps: -1.0,
            ..AdvantageConfig::default()
        };
        assert!(group_advantages(&[0.0, 1.0], &bad).is_err());
    }

    #[test]
    fn batch_form_matches_per_group_form() {
        let ids = ["x", "y", "x", "x", "y"];
        let r = [1.0, 0.5, 0.0, 0.0, 0.0];
        let a = batch_advantages(&ids, &r, &AdvantageConfig::default()).unwrap();
        let gx = group_advantages(&[1.0, 0.0, 0.0], &AdvantageConfig::default()).unwrap();
        let gy = group_advantages(&[0.5, 0.0], &AdvantageConfig::default()).unwrap();
        assert_eq!(a, [gx[0], gy[0], gx[1], gx[2], gy[1]]);
        assert!(batch_advantages(&ids[..2], &r, &AdvantageConfig::default()).is_err());
    }

    #[test]
    fn invalid_groups_use_the_unbiased_std() {
        assert!(is_invalid_group(&[0.0; 8]));
        // [0, 0.014]: unbiased std 0.0098995 < 0.01 (the population std 0.007 would be too).
        assert!(is_invalid_group(&[0.0, 0.014]));
        // [0, 0.015]: unbiased std 0.0106 >= 0.01.
        assert!(!is_invalid_group(&[0.0, 0.015]));
        assert!(!is_invalid_group(&[1.0]));
        assert_eq!(reward_std(&[1.0, 0.0, 0.0, 0.0]), Some(0.5));
    }

    #[test]
    fn config_deserializes_with_defaults() {
        let c: AdvantageConfig = serde_json::from_str(r#"{"estimator": "dr_grpo"}"#).unwrap();
        assert_eq!(c.estimator, AdvantageEstimator::DrGrpo);
        assert_eq!(c.eps, 1e-6);
    }
}

//! The sampler/learner gap: how far the log-probs the rollout sampler reported for its tokens
//! (`Response::logprobs`: an in-process model with 8-bit/4-bit weights, vLLM, SGLang, our
//! server) are from the learner's own, exact "old" log-probs of the same tokens, and the
//! sampler's log-probs as the loss's `rollout_logp` for truncated importance sampling
//! (`algorithm.rollout_is_cap`, verl's `tis_imp_ratio_cap`).
//!
//! Per trained token, with `r = exp(learner − sampler)`: the k1 estimate of
//! KL(sampler ‖ learner) is `sampler − learner` (the tokens were drawn from the sampler), the
//! k3 estimate `r − 1 − ln r` (never negative), and the importance weight `min(r, cap)`.
//!
//! Left out, and given weight 1 (no correction): tokens of a turn whose response has no
//! log-prob per sampled token (a server that omits them), non-finite sampler log-probs, and
//! replayed episodes (their log-probs come from the weights of the step that stored them: the
//! gap would be the policy's drift, and ARPO recomputes their old log-probs without any
//! behaviour-policy correction).

use arpo_grpo::PolicyLossConfig;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::learner::Sample;

/// Sums over tokens of the sampler/learner gap; [`RolloutGap::merge`] adds micro-batches and
/// optimizer steps together.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutGap {
    /// Tokens that had a sampler log-prob.
    pub tokens: usize,
    /// Σ (sampler − learner) log-prob.
    pub log_ratio_sum: f64,
    /// Σ (r − 1 − ln r), `r = exp(learner − sampler)`.
    pub k3_sum: f64,
    /// max r (0 without tokens).
    pub ratio_max: f64,
    /// Σ min(r, cap) when a cap is set.
    pub is_weight_sum: f64,
}

impl RolloutGap {
    /// Adds one token's log-probs under the sampler and the learner.
    pub fn add_token(&mut self, sampler: f64, learner: f64, cap: Option<f64>) {
        let d = learner - sampler; // ln r
        self.tokens += 1;
        self.log_ratio_sum -= d;
        // r − 1 − ln r, with exp_m1 for precision when the two agree closely.
        self.k3_sum += d.exp_m1() - d;
        let r = d.exp();
        self.ratio_max = self.ratio_max.max(r);
        if let Some(cap) = cap {
            self.is_weight_sum += arpo_grpo::rollout_is_weight(learner, sampler, cap);
        }
    }

    pub fn merge(&mut self, other: &RolloutGap) {
        self.tokens += other.tokens;
        self.log_ratio_sum += other.log_ratio_sum;
        self.k3_sum += other.k3_sum;
        self.ratio_max = self.ratio_max.max(other.ratio_max);
        self.is_weight_sum += other.is_weight_sum;
    }

    fn mean(&self, sum: f64) -> Option<f64> {
        (self.tokens > 0).then(|| sum / self.tokens as f64)
    }

    /// Mean of `sampler − learner`: the k1 estimate of KL(sampler ‖ learner).
    pub fn kl(&self) -> Option<f64> {
        self.mean(self.log_ratio_sum)
    }

    /// Mean of `r − 1 − ln r`: the k3 estimate of KL(sampler ‖ learner).
    pub fn kl_k3(&self) -> Option<f64> {
        self.mean(self.k3_sum)
    }

    /// The largest `r = exp(learner − sampler)`.
    pub fn ratio_max(&self) -> Option<f64> {
        (self.tokens > 0).then_some(self.ratio_max)
    }

    /// Mean of the importance weight `min(r, cap)` (meaningful when a cap was given).
    pub fn is_weight_mean(&self) -> Option<f64> {
        self.mean(self.is_weight_sum)
    }
}

/// The sampler's log-probs of a sample's trained tokens (its turns' sampled tokens in order),
/// with the learner's `learner_old` where there is none (so that the importance weight is 1
/// there), and the gap over the tokens that have one. `learner_old` holds the learner's old
/// log-probs of the same tokens; `cap` is `algorithm.rollout_is_cap`.
pub fn sampler_logprobs(
    sample: &Sample,
    learner_old: &[f32],
    cap: Option<f64>,
) -> Result<(Vec<f32>, RolloutGap), TrainerError> {
    let turns = &sample.trajectory.turns;
    let n: usize = turns.iter().map(|t| t.response.token_ids.len()).sum();
    if learner_old.len() != n {
        return Err(TrainerError::learner_msg(format!(
            "task {}: {} learner log-probs for {n} sampled tokens",
            sample.trajectory.task_id,
            learner_old.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut gap = RolloutGap::default();
    let mut at = 0;
    for turn in turns {
        let k = turn.response.token_ids.len();
        let learner = &learner_old[at..at + k];
        at += k;
        let sampler = &turn.response.logprobs;
        if sample.injected || sampler.len() != k {
            out.extend_from_slice(learner);
            continue;
        }
        for (&s, &l) in sampler.iter().zip(learner) {
            if s.is_finite() {
                gap.add_token(f64::from(s), f64::from(l), cap);
                out.push(s);
            } else {
                out.push(l);
            }
        }
    }
    Ok((out, gap))
}

/// [`sampler_logprobs`] for a learner on tensors: `learner_old` is the tensor of the learner's
/// old log-probs the loss gets; the sampler's come back as a tensor of its shape for
/// `PolicyLossInputs::rollout_logp` when `loss.rollout_is_cap` is set (`None` otherwise, which
/// the loss does not need), with the gap either way.
pub fn rollout_logp_tensor(
    sample: &Sample,
    learner_old: &Tensor,
    loss: &PolicyLossConfig,
) -> Result<(Option<Tensor>, RolloutGap), TrainerError> {
    let err = |e: candle_core::Error| TrainerError::learner("the sampler's log-probs", e);
    let old = learner_old
        .detach()
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)?;
    let (values, gap) = sampler_logprobs(sample, &old, loss.rollout_is_cap)?;
    let tensor = match loss.rollout_is_cap {
        Some(_) => {
            Some(Tensor::from_vec(values, learner_old.shape(), learner_old.device()).map_err(err)?)
        }
        None => None,
    };
    Ok((tensor, gap))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use arpo_core::{EpisodeEnd, Response, Screenshot, Trajectory, Turn};
    use candle_core::Device;

    use super::*;

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-6, "got {got}, want {want}");
    }

    fn turn(token_ids: Vec<u32>, logprobs: Vec<f32>) -> Turn {
        Turn {
            screenshot: Screenshot::new(vec![], 1, 1),
            response: Response {
                text: String::new(),
                token_ids,
                logprobs,
                finish_reason: Default::default(),
            },
            actions: vec![],
            format_error: None,
            env_error: None,
        }
    }

    fn sample(turns: Vec<Turn>, injected: bool) -> Sample {
        Sample {
            trajectory: Trajectory {
                task_id: "t".into(),
                instruction: String::new(),
                turns,
                end: EpisodeEnd::Finished,
                eval_result: 1.0,
                format_reward: 0.0,
            },
            advantage: 1.0,
            old_logprobs: None,
            injected,
        }
    }

    /// A hand-built batch: turn 1 has sampler log-probs, turn 2 has none (a server that omits
    /// them), turn 3 has them again.
    ///
    /// | token | sampler    | learner     | sampler − learner | r = exp(learner − sampler) | r − 1 − ln r         |
    /// |-------|------------|-------------|-------------------|----------------------------|----------------------|
    /// | 1     | −1         | −1          | 0                 | 1                          | 0                    |
    /// | 2     | ln 0.5     | ln 0.25     | ln 2              | 0.5                        | 0.5 − 1 + ln 2       |
    /// | 3     | (none)     | −3          | left out          |                            |                      |
    /// | 4     | ln 0.2     | ln 0.6      | −ln 3             | 3                          | 3 − 1 − ln 3         |
    ///
    /// rollout_kl = (0 + ln 2 − ln 3)/3 = ln(2/3)/3 = −0.135155;
    /// k3 = (0 + (ln 2 − 0.5) + (2 − ln 3))/3 = (1.5 + ln 2 − ln 3)/3 = 0.364845;
    /// ratio_max = 3; tokens 3; weights with cap 2: (1 + 0.5 + 2)/3 = 7/6.
    #[test]
    fn the_gap_of_a_hand_built_batch() {
        let ln = |x: f32| x.ln();
        let s = sample(
            vec![
                turn(vec![1, 2], vec![-1.0, ln(0.5)]),
                turn(vec![3], vec![]),
                turn(vec![4], vec![ln(0.2)]),
            ],
            false,
        );
        let learner = [-1.0, ln(0.25), -3.0, ln(0.6)];
        let (values, gap) = sampler_logprobs(&s, &learner, Some(2.0)).unwrap();
        // The turn without log-probs takes the learner's (weight 1).
        assert_eq!(values, vec![-1.0, ln(0.5), -3.0, ln(0.2)]);
        assert_eq!(gap.tokens, 3);
        let (l2, l3) = (2f64.ln(), 3f64.ln());
        close(gap.kl().unwrap(), (l2 - l3) / 3.0);
        close(gap.kl_k3().unwrap(), (1.5 + l2 - l3) / 3.0);
        close(gap.ratio_max().unwrap(), 3.0);
        close(gap.is_weight_mean().unwrap(), 7.0 / 6.0);

        // Merging two halves gives the whole.
        let first = sample(vec![turn(vec![1, 2], vec![-1.0, ln(0.5)])], false);
        let second = sample(
            vec![turn(vec![3], vec![]), turn(vec![4], vec![ln(0.2)])],
            false,
        );
        let (_, mut a) = sampler_logprobs(&first, &learner[..2], Some(2.0)).unwrap();
        let (_, b) = sampler_logprobs(&second, &learner[2..], Some(2.0)).unwrap();
        a.merge(&b);
        assert_eq!(a.tokens, 3);
        close(a.kl().unwrap(), gap.kl().unwrap());
        close(a.ratio_max().unwrap(), 3.0);
    }

    #[test]
    fn replayed_episodes_and_missing_log_probs_are_left_out() {
        let s = sample(vec![turn(vec![1, 2], vec![-0.5, -0.7])], true);
        let (values, gap) = sampler_logprobs(&s, &[-1.0, -2.0], Some(2.0)).unwrap();
        assert_eq!(values, vec![-1.0, -2.0]);
        assert_eq!(gap.tokens, 0);
        assert_eq!((gap.kl(), gap.kl_k3(), gap.ratio_max()), (None, None, None));
        // A response with fewer log-probs than tokens, and a non-finite one.
        let s = sample(
            vec![
                turn(vec![1, 2], vec![-0.5]),
                turn(vec![3, 4], vec![f32::NEG_INFINITY, -0.5]),
            ],
            false,
        );
        let (values, gap) = sampler_logprobs(&s, &[-1.0, -2.0, -3.0, -0.5], None).unwrap();
        assert_eq!(values, vec![-1.0, -2.0, -3.0, -0.5]);
        assert_eq!(gap.tokens, 1);
        close(gap.kl().unwrap(), 0.0);
        close(gap.ratio_max().unwrap(), 1.0);
        // Learner log-probs that do not match the sampled tokens are an error.
        let err = sampler_logprobs(&s, &[-1.0], None).unwrap_err().to_string();
        assert!(
            err.contains("1 learner log-probs for 4 sampled tokens"),
            "{err}"
        );
    }

    #[test]
    fn the_tensor_for_the_loss_only_when_a_cap_is_set() {
        let s = sample(vec![turn(vec![1, 2], vec![-0.5, -0.25])], false);
        let old = Tensor::new(&[-1.0f32, -0.25], &Device::Cpu).unwrap();
        let (t, gap) = rollout_logp_tensor(&s, &old, &PolicyLossConfig::default()).unwrap();
        assert!(t.is_none());
        assert_eq!(gap.tokens, 2);
        close(gap.kl().unwrap(), 0.25);
        let loss = PolicyLossConfig {
            rollout_is_cap: Some(2.0),
            ..Default::default()
        };
        let (t, _) = rollout_logp_tensor(&s, &old, &loss).unwrap();
        assert_eq!(t.unwrap().to_vec1::<f32>().unwrap(), vec![-0.5, -0.25]);
    }
}

//! Metrics and per-task results: what `training_metrics.json` and
//! `task_results/task_<id>_results.json` hold.

use std::collections::BTreeMap;
use std::path::Path;

use arpo_core::Trajectory;
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::learner::UpdateStats;
use crate::rollout::{DroppedRollout, RolloutReport};
use crate::rollout_gap::RolloutGap;

/// One training step.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Global step, from 0.
    pub step: u64,
    /// Epoch, from 0.
    pub epoch: usize,
    /// Mean reward (`eval_result + 0.5 * format_reward`) of the step's own rollouts.
    pub avg_reward: f64,
    /// Share of the step's own rollouts that succeeded (`eval_result > success_threshold`).
    pub success_rate: f64,
    /// Share of the step's own rollouts that ended on an unparsable response.
    pub format_error_rate: f64,
    pub rollouts: usize,
    pub dropped_rollouts: usize,
    /// Episodes in the replay buffer after the step.
    pub replay_size: usize,
    /// Tasks with at least one stored success after the step.
    pub replay_tasks: usize,
    /// Groups that got a replayed success.
    pub injected_groups: usize,
    /// Groups whose rewards all failed (before injection).
    pub all_failed_groups: usize,
    /// Groups with reward std < 0.01 after injection: zero advantage, nothing learnt.
    pub invalid_groups: usize,
    pub loss: f64,
    pub pg_clipfrac_higher: f64,
    pub pg_clipfrac_lower: f64,
    pub ppo_kl: f64,
    pub entropy: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub optimizer_steps: usize,
    pub skipped_optimizer_steps: usize,
    /// Trained (assistant) tokens.
    pub tokens: usize,
    pub generated_tokens: usize,
    pub env_steps: usize,
    pub rollout_seconds: f64,
    pub update_seconds: f64,
    /// The sampler/learner gap over the step's trained tokens that have a sampler log-prob
    /// (`rollout_kl_tokens` of them; turns without log-probs and replayed episodes are left
    /// out): the mean of `sampler_logp − learner_old_logp`, the k1 estimate of
    /// KL(sampler ‖ learner). Near 0 when the rollout model is the learner's weights; grows with
    /// quantized rollout weights or a server's different kernels. `None` without such tokens.
    #[serde(default)]
    pub rollout_kl: Option<f64>,
    /// The mean of `r − 1 − ln r`, `r = exp(learner_old_logp − sampler_logp)`: the k3 estimate
    /// of the same KL, never negative.
    #[serde(default)]
    pub rollout_kl_k3: Option<f64>,
    /// The largest `r` of those tokens.
    #[serde(default)]
    pub rollout_ratio_max: Option<f64>,
    /// Tokens that entered the three above.
    #[serde(default)]
    pub rollout_kl_tokens: usize,
    /// The mean truncated importance weight `min(r, algorithm.rollout_is_cap)` of those tokens,
    /// when the cap is set.
    #[serde(default)]
    pub rollout_is_weight: Option<f64>,
}

impl StepMetrics {
    /// The rollout side of a step: its own rollouts' rates (replayed episodes come later and do
    /// not count), dropped rollouts, tokens, env steps, time.
    pub fn from_rollouts(step: u64, epoch: usize, report: &RolloutReport, threshold: f64) -> Self {
        let own: Vec<&Trajectory> = report
            .groups
            .iter()
            .flat_map(|g| g.trajectories.iter())
            .collect();
        let n = own.len().max(1) as f64;
        let share =
            |f: &dyn Fn(&Trajectory) -> bool| own.iter().filter(|t| f(t)).count() as f64 / n;
        Self {
            step,
            epoch,
            rollouts: own.len(),
            dropped_rollouts: report.dropped.len(),
            avg_reward: own.iter().map(|t| t.reward()).sum::<f64>() / n,
            success_rate: share(&|t| t.eval_result > threshold),
            format_error_rate: share(&|t| t.format_reward < 0.0),
            generated_tokens: report.generated_tokens,
            env_steps: report.env_steps,
            rollout_seconds: report.seconds,
            ..Self::default()
        }
    }

    /// The update side of a step from its optimizer steps: means of the per-step statistics,
    /// the last learning rate, total tokens, counts of steps taken and skipped.
    pub fn absorb_updates(&mut self, stats: &[UpdateStats]) {
        let k = stats.len().max(1) as f64;
        let mean = |f: fn(&UpdateStats) -> f64| stats.iter().map(f).sum::<f64>() / k;
        self.optimizer_steps = stats.len();
        self.skipped_optimizer_steps = stats.iter().filter(|s| s.skipped).count();
        self.loss = mean(|s| s.loss);
        self.pg_clipfrac_higher = mean(|s| s.pg_clipfrac_higher);
        self.pg_clipfrac_lower = mean(|s| s.pg_clipfrac_lower);
        self.ppo_kl = mean(|s| s.ppo_kl);
        self.entropy = mean(|s| s.entropy);
        self.grad_norm = mean(|s| s.grad_norm);
        self.lr = stats.last().map_or(0.0, |s| s.lr);
        self.tokens = stats.iter().map(|s| s.tokens).sum();
    }

    /// The sampler/learner gap of the step's batch; `capped`: `algorithm.rollout_is_cap` is set.
    pub fn absorb_rollout_gap(&mut self, gap: &RolloutGap, capped: bool) {
        self.rollout_kl = gap.kl();
        self.rollout_kl_k3 = gap.kl_k3();
        self.rollout_ratio_max = gap.ratio_max();
        self.rollout_kl_tokens = gap.tokens;
        self.rollout_is_weight = if capped { gap.is_weight_mean() } else { None };
    }
}

/// One epoch: the means of its steps (sums for counts), and validation when it ran.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub steps: usize,
    pub avg_reward: f64,
    pub success_rate: f64,
    pub format_error_rate: f64,
    pub rollouts: usize,
    pub dropped_rollouts: usize,
    pub replay_size: usize,
    pub replay_tasks: usize,
    pub injected_groups: usize,
    pub invalid_groups: usize,
    pub loss: f64,
    pub pg_clipfrac_higher: f64,
    pub pg_clipfrac_lower: f64,
    pub ppo_kl: f64,
    pub entropy: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
    pub generated_tokens: usize,
    pub env_steps: usize,
    pub rollout_seconds: f64,
    pub update_seconds: f64,
    /// The sampler/learner gap over the epoch's trained tokens that have a sampler log-prob
    /// (`rollout_kl_tokens` of them; turns without log-probs and replayed episodes are left
    /// out): the mean of `sampler_logp − learner_old_logp`, the k1 estimate of
    /// KL(sampler ‖ learner). Near 0 when the rollout model is the learner's weights; grows with
    /// quantized rollout weights or a server's different kernels. `None` without such tokens.
    #[serde(default)]
    pub rollout_kl: Option<f64>,
    /// The mean of `r − 1 − ln r`, `r = exp(learner_old_logp − sampler_logp)`: the k3 estimate
    /// of the same KL, never negative.
    #[serde(default)]
    pub rollout_kl_k3: Option<f64>,
    /// The largest `r` of those tokens in the epoch.
    #[serde(default)]
    pub rollout_ratio_max: Option<f64>,
    /// Tokens that entered the three above.
    #[serde(default)]
    pub rollout_kl_tokens: usize,
    /// The mean truncated importance weight `min(r, algorithm.rollout_is_cap)` of those tokens,
    /// when the cap is set.
    #[serde(default)]
    pub rollout_is_weight: Option<f64>,
    /// Success rate on the held-out tasks at validation temperature, when validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_success_rate: Option<f64>,
}

impl EpochMetrics {
    /// Aggregates the steps of one epoch (rates weighted by rollouts).
    pub fn from_steps(epoch: usize, steps: &[StepMetrics]) -> Self {
        let n = steps.len().max(1) as f64;
        let rollouts: usize = steps.iter().map(|s| s.rollouts).sum();
        let weighted = |f: fn(&StepMetrics) -> f64| {
            if rollouts == 0 {
                0.0
            } else {
                steps.iter().map(|s| f(s) * s.rollouts as f64).sum::<f64>() / rollouts as f64
            }
        };
        let mean = |f: fn(&StepMetrics) -> f64| steps.iter().map(f).sum::<f64>() / n;
        // The gap's means weighted by the steps' tokens that entered them.
        let gap_tokens: usize = steps.iter().map(|s| s.rollout_kl_tokens).sum();
        let gap_mean = |f: fn(&StepMetrics) -> Option<f64>| {
            let with: Vec<(f64, usize)> = steps
                .iter()
                .filter_map(|s| f(s).map(|v| (v, s.rollout_kl_tokens)))
                .collect();
            let tokens: usize = with.iter().map(|(_, t)| t).sum();
            (tokens > 0)
                .then(|| with.iter().map(|(v, t)| v * *t as f64).sum::<f64>() / tokens as f64)
        };
        let last = steps.last();
        Self {
            epoch,
            steps: steps.len(),
            avg_reward: weighted(|s| s.avg_reward),
            success_rate: weighted(|s| s.success_rate),
            format_error_rate: weighted(|s| s.format_error_rate),
            rollouts,
            dropped_rollouts: steps.iter().map(|s| s.dropped_rollouts).sum(),
            replay_size: last.map_or(0, |s| s.replay_size),
            replay_tasks: last.map_or(0, |s| s.replay_tasks),
            injected_groups: steps.iter().map(|s| s.injected_groups).sum(),
            invalid_groups: steps.iter().map(|s| s.invalid_groups).sum(),
            loss: mean(|s| s.loss),
            pg_clipfrac_higher: mean(|s| s.pg_clipfrac_higher),
            pg_clipfrac_lower: mean(|s| s.pg_clipfrac_lower),
            ppo_kl: mean(|s| s.ppo_kl),
            entropy: mean(|s| s.entropy),
            grad_norm: mean(|s| s.grad_norm),
            lr: last.map_or(0.0, |s| s.lr),
            tokens: steps.iter().map(|s| s.tokens).sum(),
            generated_tokens: steps.iter().map(|s| s.generated_tokens).sum(),
            env_steps: steps.iter().map(|s| s.env_steps).sum(),
            rollout_seconds: steps.iter().map(|s| s.rollout_seconds).sum(),
            update_seconds: steps.iter().map(|s| s.update_seconds).sum(),
            rollout_kl: gap_mean(|s| s.rollout_kl),
            rollout_kl_k3: gap_mean(|s| s.rollout_kl_k3),
            rollout_ratio_max: steps
                .iter()
                .filter_map(|s| s.rollout_ratio_max)
                .reduce(f64::max),
            rollout_kl_tokens: gap_tokens,
            rollout_is_weight: gap_mean(|s| s.rollout_is_weight),
            val_success_rate: None,
        }
    }
}

/// `training_metrics.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricsHistory {
    pub experiment: String,
    pub steps: Vec<StepMetrics>,
    pub epochs: Vec<EpochMetrics>,
}

/// One attempt at a task, as `task_<id>_results.json` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub step: u64,
    pub epoch: usize,
    /// Which rollout of the group.
    pub rollout: usize,
    /// `training` or `validation`.
    pub phase: String,
    /// `None` when the rollout was dropped.
    pub reward: Option<f64>,
    pub eval_result: Option<f64>,
    pub success: bool,
    pub steps: usize,
    /// The actions carried out, as JSON (arpo-core's `Action` form).
    pub actions: Vec<serde_json::Value>,
    /// How the episode ended (`finished`, `format_error`, `max_steps`, ..., or `dropped`).
    pub end: String,
    pub format_errors: Vec<String>,
    pub env_errors: Vec<String>,
}

impl Attempt {
    pub fn from_trajectory(
        t: &Trajectory,
        step: u64,
        epoch: usize,
        rollout: usize,
        phase: &str,
        success_threshold: f64,
    ) -> Self {
        Self {
            step,
            epoch,
            rollout,
            phase: phase.into(),
            reward: Some(t.reward()),
            eval_result: Some(t.eval_result),
            success: t.eval_result > success_threshold,
            steps: t.turns.len(),
            actions: t
                .turns
                .iter()
                .flat_map(|turn| turn.actions.iter())
                .filter_map(|a| serde_json::to_value(a).ok())
                .collect(),
            end: serde_json::to_value(t.end)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            format_errors: t
                .turns
                .iter()
                .filter_map(|t| t.format_error.clone())
                .collect(),
            env_errors: t.turns.iter().filter_map(|t| t.env_error.clone()).collect(),
        }
    }

    pub fn dropped(d: &DroppedRollout, step: u64, epoch: usize, phase: &str) -> Self {
        Self {
            step,
            epoch,
            rollout: d.rollout,
            phase: phase.into(),
            reward: None,
            eval_result: None,
            success: false,
            steps: 0,
            actions: Vec::new(),
            end: "dropped".into(),
            format_errors: Vec::new(),
            env_errors: vec![d.error.clone()],
        }
    }
}

/// `task_<id>_results.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskResults {
    pub task_id: String,
    pub instruction: String,
    pub attempts: usize,
    pub successes: usize,
    pub success_rate: f64,
    pub history: Vec<Attempt>,
}

impl TaskResults {
    pub fn push(&mut self, attempt: Attempt) {
        self.attempts += 1;
        self.successes += usize::from(attempt.success);
        self.success_rate = self.successes as f64 / self.attempts as f64;
        self.history.push(attempt);
    }
}

/// All tasks' results, keyed by task id.
pub type TaskResultsMap = BTreeMap<String, TaskResults>;

/// A file name made safe from a task id (path separators and odd characters become `_`).
pub fn task_file_name(task_id: &str) -> String {
    let safe: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("task_{safe}_results.json")
}

/// Writes JSON atomically (temp file + rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainerError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainerError::io(path, e))?;
    write_atomic(path, text.as_bytes())
}

/// Writes bytes atomically (temp file + rename) creating the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainerError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| TrainerError::io(parent, e))?;
    }
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, bytes).map_err(|e| TrainerError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainerError::io(path, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn epoch_rates_are_weighted_by_rollouts() {
        // 2 rollouts at 100% and 6 at 0%: 2/8 = 0.25, not the 0.5 a plain mean would give.
        let a = StepMetrics {
            rollouts: 2,
            success_rate: 1.0,
            loss: 1.0,
            replay_size: 1,
            ..Default::default()
        };
        let b = StepMetrics {
            rollouts: 6,
            success_rate: 0.0,
            loss: 3.0,
            replay_size: 4,
            ..Default::default()
        };
        let e = EpochMetrics::from_steps(0, &[a, b]);
        assert_eq!(e.success_rate, 0.25);
        assert_eq!(e.loss, 2.0);
        assert_eq!(e.replay_size, 4, "the buffer size at the end of the epoch");
        assert_eq!(e.rollouts, 8);
    }

    #[test]
    fn step_and_epoch_metrics_carry_the_sampler_learner_gap() {
        // Step 1: two tokens, (sampler, learner) = (−1, −1) and (ln 0.2, ln 0.6):
        // rollout_kl = (0 − ln 3)/2, k3 = (0 + 2 − ln 3)/2, ratio_max 3, weights (1 + 2)/2.
        let mut gap = RolloutGap::default();
        gap.add_token(-1.0, -1.0, Some(2.0));
        gap.add_token(0.2f64.ln(), 0.6f64.ln(), Some(2.0));
        let mut a = StepMetrics::default();
        a.absorb_rollout_gap(&gap, true);
        let l3 = 3f64.ln();
        assert!((a.rollout_kl.unwrap() + l3 / 2.0).abs() < 1e-12);
        assert!((a.rollout_kl_k3.unwrap() - (2.0 - l3) / 2.0).abs() < 1e-12);
        assert!((a.rollout_ratio_max.unwrap() - 3.0).abs() < 1e-12);
        assert_eq!(a.rollout_kl_tokens, 2);
        assert!((a.rollout_is_weight.unwrap() - 1.5).abs() < 1e-12);
        // Without a cap there is no weight to report.
        let mut no_cap = StepMetrics::default();
        no_cap.absorb_rollout_gap(&gap, false);
        assert_eq!(no_cap.rollout_is_weight, None);
        // Step 2: no sampler log-probs at all: nothing, not a perfect 0.
        let mut b = StepMetrics::default();
        b.absorb_rollout_gap(&RolloutGap::default(), true);
        assert_eq!((b.rollout_kl, b.rollout_ratio_max), (None, None));
        // Step 3: one token, (ln 0.5, ln 0.25): kl ln 2, ratio 0.5.
        let mut gap = RolloutGap::default();
        gap.add_token(0.5f64.ln(), 0.25f64.ln(), Some(2.0));
        let mut c = StepMetrics::default();
        c.absorb_rollout_gap(&gap, true);
        // The epoch: token-weighted means over steps 1 and 3, the max ratio, 3 tokens.
        let e = EpochMetrics::from_steps(0, &[a, b, c]);
        assert_eq!(e.rollout_kl_tokens, 3);
        assert!((e.rollout_kl.unwrap() - (2f64.ln() - l3) / 3.0).abs() < 1e-12);
        assert!((e.rollout_ratio_max.unwrap() - 3.0).abs() < 1e-12);
        assert!((e.rollout_is_weight.unwrap() - 3.5 / 3.0).abs() < 1e-12);
        // Metrics written before these fields existed still load (resume).
        let old: StepMetrics = serde_json::from_str(r#"{"step": 3, "epoch": 0, "avg_reward": 0.5, "success_rate": 0.5, "format_error_rate": 0.0, "rollouts": 2, "dropped_rollouts": 0, "replay_size": 0, "replay_tasks": 0, "injected_groups": 0, "all_failed_groups": 0, "invalid_groups": 0, "loss": 0.1, "pg_clipfrac_higher": 0.0, "pg_clipfrac_lower": 0.0, "ppo_kl": 0.0, "entropy": 1.0, "grad_norm": 0.5, "lr": 1e-6, "optimizer_steps": 1, "skipped_optimizer_steps": 0, "tokens": 10, "generated_tokens": 10, "env_steps": 2, "rollout_seconds": 1.0, "update_seconds": 1.0}"#).unwrap();
        assert_eq!(
            (old.step, old.rollout_kl, old.rollout_kl_tokens),
            (3, None, 0)
        );
    }

    #[test]
    fn task_file_names_are_safe() {
        assert_eq!(
            task_file_name("chrome/abc-1"),
            "task_chrome_abc-1_results.json"
        );
        assert_eq!(task_file_name("../x"), "task_.._x_results.json");
    }
}

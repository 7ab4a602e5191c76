//! Evaluation: success rate with a 95% Wilson score interval, per-task table, JSON report.

use std::collections::BTreeMap;

use arpo_core::{Environment, Policy, Task};
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::rollout::{RolloutEvent, RolloutSettings, run_rollouts};

/// The Wilson score interval of `successes` out of `n` at `z` (1.96 for 95%).
/// `(0, 0)`-free: with `n = 0` it is `(0, 1)`.
pub fn wilson_interval(successes: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = successes as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// One task's line of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEval {
    pub task_id: String,
    pub attempts: usize,
    pub successes: usize,
    pub mean_eval_result: f64,
    pub dropped: usize,
}

/// An evaluation report (`cargo xtask eval --out report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// A label for `compare` (the model directory, or `--label`).
    pub label: String,
    pub model: String,
    pub tasks_spec: String,
    pub attempts_per_task: usize,
    pub temperature: f64,
    pub seed: u64,
    pub episodes: usize,
    pub successes: usize,
    pub success_rate: f64,
    /// 95% Wilson interval of the success rate.
    pub ci95: (f64, f64),
    pub per_task: Vec<TaskEval>,
}

impl EvalReport {
    /// A plain-text table: one line per task, then the total.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<40} {:>8} {:>9} {:>8}\n",
            "task", "attempts", "successes", "rate"
        );
        for t in &self.per_task {
            out += &format!(
                "{:<40} {:>8} {:>9} {:>7.1}%\n",
                t.task_id,
                t.attempts,
                t.successes,
                100.0 * t.successes as f64 / t.attempts.max(1) as f64
            );
        }
        out += &format!(
            "{:<40} {:>8} {:>9} {:>7.1}%  (95% CI {:.1}%..{:.1}%)\n",
            "total",
            self.episodes,
            self.successes,
            100.0 * self.success_rate,
            100.0 * self.ci95.0,
            100.0 * self.ci95.1
        );
        out
    }
}

/// Rolls every task out `settings.group_size` times and scores the result. A success is an
/// evaluation above `success_threshold`; dropped rollouts count as attempts without success.
#[allow(clippy::too_many_arguments)]
pub async fn evaluate<P, E>(
    policy: &P,
    envs: &mut [E],
    tasks: &[Task],
    settings: &RolloutSettings,
    seed: u64,
    success_threshold: f64,
    label: &str,
    tasks_spec: &str,
    observer: &mut dyn FnMut(RolloutEvent),
) -> Result<EvalReport, TrainerError>
where
    P: Policy + ?Sized,
    E: Environment,
{
    let report = run_rollouts(policy, envs, tasks, settings, seed, observer).await?;
    let mut per_task: BTreeMap<String, TaskEval> = BTreeMap::new();
    for g in &report.groups {
        let e = per_task.entry(g.task_id.clone()).or_insert(TaskEval {
            task_id: g.task_id.clone(),
            attempts: 0,
            successes: 0,
            mean_eval_result: 0.0,
            dropped: 0,
        });
        for t in &g.trajectories {
            e.attempts += 1;
            e.successes += usize::from(t.eval_result > success_threshold);
            e.mean_eval_result += t.eval_result;
        }
    }
    for d in &report.dropped {
        if let Some(e) = per_task.get_mut(&d.task_id) {
            e.attempts += 1;
            e.dropped += 1;
        }
    }
    for e in per_task.values_mut() {
        let scored = e.attempts - e.dropped;
        if scored > 0 {
            e.mean_eval_result /= scored as f64;
        }
    }
    let episodes: usize = per_task.values().map(|t| t.attempts).sum();
    let successes: usize = per_task.values().map(|t| t.successes).sum();
    Ok(EvalReport {
        label: label.to_string(),
        model: policy.describe(),
        tasks_spec: tasks_spec.to_string(),
        attempts_per_task: settings.group_size,
        temperature: settings.sampling.temperature,
        seed,
        episodes,
        successes,
        success_rate: if episodes == 0 {
            0.0
        } else {
            successes as f64 / episodes as f64
        },
        ci95: wilson_interval(successes, episodes, 1.96),
        per_task: per_task.into_values().collect(),
    })
}

/// Reports side by side: one row per report (label, success rate, interval, episodes), then
/// one column per report for every task.
pub fn compare_table(reports: &[EvalReport]) -> String {
    let mut out = format!(
        "{:<28} {:>8} {:>20} {:>9}\n",
        "run", "success", "95% CI", "episodes"
    );
    for r in reports {
        out += &format!(
            "{:<28} {:>7.1}% {:>9.1}%..{:>5.1}% {:>9}\n",
            r.label,
            100.0 * r.success_rate,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1,
            r.episodes
        );
    }
    let mut tasks: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.per_task.iter().map(|t| t.task_id.as_str()))
        .collect();
    tasks.sort_unstable();
    tasks.dedup();
    if !tasks.is_empty() {
        out += &format!("\n{:<40}", "task");
        for r in reports {
            out += &format!(" {:>14}", truncate(&r.label, 14));
        }
        out.push('\n');
        for task in tasks {
            out += &format!("{:<40}", truncate(task, 40));
            for r in reports {
                match r.per_task.iter().find(|t| t.task_id == task) {
                    Some(t) => {
                        out += &format!(" {:>14}", format!("{}/{}", t.successes, t.attempts))
                    }
                    None => out += &format!(" {:>14}", "-"),
                }
            }
            out.push('\n');
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_matches_hand_computed_values() {
        // 7/10 at z = 1.96: centre (0.7 + 0.19208) / 1.38416 = 0.644492,
        // half 1.96 * sqrt(0.021 + 0.0096040) / 1.38416 = 0.247719 -> [0.396773, 0.892211].
        let (lo, hi) = wilson_interval(7, 10, 1.96);
        assert!((lo - 0.396_773).abs() < 1e-5, "{lo}");
        assert!((hi - 0.892_211).abs() < 1e-5, "{hi}");
        // 0/10: lower bound 0, upper z²/(n+z²) = 3.8416 / 13.8416 = 0.277540.
        let (lo, hi) = wilson_interval(0, 10, 1.96);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.277_540).abs() < 1e-5, "{hi}");
        assert_eq!(wilson_interval(0, 0, 1.96), (0.0, 1.0));
    }
}

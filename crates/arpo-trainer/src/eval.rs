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
    /// Scored episodes (dropped rollouts are not among them).
    pub episodes: usize,
    pub successes: usize,
    /// Rollouts dropped because their environment kept failing (not scored).
    #[serde(default)]
    pub dropped: usize,
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
                100.0 * t.successes as f64 / (t.attempts - t.dropped).max(1) as f64
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
    observer: &mut dyn FnMut(RolloutEvent<'_>),
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
    // A dropped rollout (the environment kept failing) is no episode of the agent's: it counts
    // neither as a success nor as a failure, and is reported beside the rate.
    let episodes: usize = per_task.values().map(|t| t.attempts - t.dropped).sum();
    let successes: usize = per_task.values().map(|t| t.successes).sum();
    let dropped: usize = per_task.values().map(|t| t.dropped).sum();
    Ok(EvalReport {
        label: label.to_string(),
        model: policy.describe(),
        tasks_spec: tasks_spec.to_string(),
        attempts_per_task: settings.group_size,
        temperature: settings.sampling.temperature,
        seed,
        episodes,
        successes,
        dropped,
        success_rate: if episodes == 0 {
            0.0
        } else {
            successes as f64 / episodes as f64
        },
        ci95: wilson_interval(successes, episodes, 1.96),
        per_task: per_task.into_values().collect(),
    })
}

/// Reports that share a label (e.g. one run per training seed), pooled: the episodes of all of
/// them, the interval of the pooled rate, and each report's own rate.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledReport {
    /// All the label's reports as one: summed episodes and successes per task.
    pub pooled: EvalReport,
    /// Each report's success rate, in the order given.
    pub runs: Vec<f64>,
}

impl PooledReport {
    /// Mean and sample standard deviation of the runs' rates (`None` with fewer than two).
    pub fn spread(&self) -> Option<(f64, f64)> {
        let k = self.runs.len();
        if k < 2 {
            return None;
        }
        let mean = self.runs.iter().sum::<f64>() / k as f64;
        let var = self.runs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1) as f64;
        Some((mean, var.sqrt()))
    }
}

/// Groups reports by label (in order of first appearance) and pools each group.
pub fn pool_by_label(reports: &[EvalReport]) -> Vec<PooledReport> {
    let mut out: Vec<PooledReport> = Vec::new();
    for r in reports {
        let Some(g) = out.iter_mut().find(|g| g.pooled.label == r.label) else {
            out.push(PooledReport {
                pooled: r.clone(),
                runs: vec![r.success_rate],
            });
            continue;
        };
        g.runs.push(r.success_rate);
        let p = &mut g.pooled;
        p.episodes += r.episodes;
        p.successes += r.successes;
        p.dropped += r.dropped;
        p.success_rate = if p.episodes == 0 {
            0.0
        } else {
            p.successes as f64 / p.episodes as f64
        };
        p.ci95 = wilson_interval(p.successes, p.episodes, 1.96);
        if p.model != r.model {
            p.model = format!("{}, {}", p.model, r.model);
        }
        for t in &r.per_task {
            match p.per_task.iter_mut().find(|x| x.task_id == t.task_id) {
                Some(x) => {
                    let n = (x.attempts + t.attempts).max(1) as f64;
                    x.mean_eval_result = (x.mean_eval_result * x.attempts as f64
                        + t.mean_eval_result * t.attempts as f64)
                        / n;
                    x.attempts += t.attempts;
                    x.successes += t.successes;
                    x.dropped += t.dropped;
                }
                None => p.per_task.push(t.clone()),
            }
        }
    }
    out
}

/// Reports side by side: one row per report (label, success rate, interval, episodes), then
/// one column per report for every task. Reports with the same label are pooled
/// ([`pool_by_label`]); their row also lists each run's rate and their mean ± sd.
pub fn compare_table(reports: &[EvalReport]) -> String {
    let groups = pool_by_label(reports);
    let mut out = compare_rows(&groups);
    let pooled: Vec<EvalReport> = groups.into_iter().map(|g| g.pooled).collect();
    out += &task_columns(&pooled);
    out
}

/// The per-run column of a pooled row: each run's rate, then mean ± sd.
pub fn runs_cell(g: &PooledReport) -> String {
    let rates: Vec<String> = g.runs.iter().map(|r| format!("{:.1}", 100.0 * r)).collect();
    match g.spread() {
        Some((mean, sd)) => format!(
            "{} (mean {:.1} ± {:.1})",
            rates.join(", "),
            100.0 * mean,
            100.0 * sd
        ),
        None => rates.join(", "),
    }
}

fn compare_rows(groups: &[PooledReport]) -> String {
    let mut out = format!(
        "{:<28} {:>8} {:>20} {:>9}  {}\n",
        "run", "success", "95% CI", "episodes", "per run (%)"
    );
    for g in groups {
        let r = &g.pooled;
        out += &format!(
            "{:<28} {:>7.1}% {:>9.1}%..{:>5.1}% {:>9}  {}\n",
            r.label,
            100.0 * r.success_rate,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1,
            r.episodes,
            runs_cell(g)
        );
    }
    out
}

fn task_columns(reports: &[EvalReport]) -> String {
    let mut out = String::new();
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

    fn report(label: &str, task_successes: &[(&str, usize, usize)]) -> EvalReport {
        let episodes = task_successes.iter().map(|t| t.1).sum();
        let successes = task_successes.iter().map(|t| t.2).sum();
        EvalReport {
            label: label.into(),
            model: format!("m-{label}"),
            tasks_spec: "sim:heldout".into(),
            attempts_per_task: 1,
            temperature: 0.5,
            seed: 0,
            episodes,
            successes,
            dropped: 0,
            success_rate: successes as f64 / episodes as f64,
            ci95: wilson_interval(successes, episodes, 1.96),
            per_task: task_successes
                .iter()
                .map(|(id, a, s)| TaskEval {
                    task_id: (*id).into(),
                    attempts: *a,
                    successes: *s,
                    mean_eval_result: *s as f64 / *a as f64,
                    dropped: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn reports_with_one_label_are_pooled() {
        let reports = [
            report("arpo", &[("a", 4, 1), ("b", 4, 2)]),
            report("base", &[("a", 4, 0), ("b", 4, 1)]),
            report("arpo", &[("a", 4, 3), ("b", 4, 2)]),
        ];
        let g = pool_by_label(&reports);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].pooled.label, "arpo");
        // 1+2+3+2 = 8 of 16.
        assert_eq!((g[0].pooled.successes, g[0].pooled.episodes), (8, 16));
        assert_eq!(g[0].pooled.success_rate, 0.5);
        assert_eq!(g[0].pooled.ci95, wilson_interval(8, 16, 1.96));
        assert_eq!(g[0].runs, vec![3.0 / 8.0, 5.0 / 8.0]);
        // mean 0.5, sd sqrt(2 * 0.125^2 / 1) = 0.176777.
        let (mean, sd) = g[0].spread().unwrap();
        assert!(
            (mean - 0.5).abs() < 1e-12 && (sd - 0.176_777).abs() < 1e-6,
            "{sd}"
        );
        let a = g[0]
            .pooled
            .per_task
            .iter()
            .find(|t| t.task_id == "a")
            .unwrap();
        assert_eq!((a.attempts, a.successes), (8, 4));
        assert_eq!(g[1].runs.len(), 1);
        assert!(g[1].spread().is_none());
        let table = compare_table(&reports);
        assert!(table.contains("37.5, 62.5 (mean 50.0 ± 17.7)"), "{table}");
    }

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

//! Sweeps: ARPO against GRPO (and the base model) over training seeds, each final checkpoint
//! evaluated on task sets, summarised with the seed as the unit.
//!
//! `cargo xtask sweep` trains one run per algorithm and seed ([`Algorithm::overrides`]: ARPO is
//! GRPO plus the replay buffer), writes everything under one directory ([`SweepLayout`]),
//! evaluates each final checkpoint (and, with `--base`, the base model with each seed's
//! evaluation seed) on every task set, and writes `sweep.json` ([`SweepReport`]) and `sweep.md`.
//! Per task set ([`TaskSetSummary`]) the labels are compared by [`crate::compare`] (mean, sd and
//! 95% Student t interval across seeds, Welch t-tests), and, because the runs of one seed share
//! the training task order and the evaluation's sampling seed, by a paired t-test on the
//! per-seed differences ([`paired_t_test`]).
//!
//! ```
//! use arpo_trainer::sweep::paired_t_test;
//!
//! // GRPO and ARPO of seeds 1..=3: ARPO is ahead in every seed, by 5 to 10 points.
//! let p = paired_t_test(&[0.20, 0.30, 0.25], &[0.30, 0.35, 0.30]).unwrap();
//! assert!((p.mean_diff - 0.2 / 3.0).abs() < 1e-12);
//! assert_eq!(p.df, 2.0);
//! assert!(p.t > 0.0 && p.p_two_sided < 0.1);
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Config;
use crate::compare::{AcrossRuns, Comparison, compare, student_t_cdf};
use crate::eval::EvalReport;

/// What a sweep trains: the two algorithms of the ARPO paper's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Group-relative policy optimisation: no replay buffer.
    Grpo,
    /// GRPO plus the per-task replay buffer of successful episodes.
    Arpo,
}

impl Algorithm {
    /// Every algorithm, baseline first (the order of the report: each later one minus each
    /// earlier one, so differences read "ARPO − GRPO").
    pub const ALL: [Algorithm; 2] = [Algorithm::Grpo, Algorithm::Arpo];

    /// `arpo` or `grpo` (case-insensitive); `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The label of its runs' evaluation reports.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Grpo => "grpo",
            Algorithm::Arpo => "arpo",
        }
    }

    /// The config overrides that make a run this algorithm: the replay buffer on or off (the
    /// only difference, as in the README's comparison runs).
    pub fn overrides(self) -> Vec<String> {
        vec![format!(
            "algorithm.enable_replay={}",
            self == Algorithm::Arpo
        )]
    }
}

/// The label of the untrained base model's reports.
pub const BASE_LABEL: &str = "base";

/// The config keys a sweep sets for each run itself (a `--set` of one of them would be
/// overwritten, so it is refused).
pub const SWEEP_KEYS: [&str; 7] = [
    "data.seed",
    "algorithm.enable_replay",
    "trainer.experiment_name",
    "trainer.save_checkpoint_path",
    "trainer.results_path",
    "trainer.logs_path",
    "trainer.load_checkpoint_path",
];

/// Where a sweep writes, all under one directory:
///
/// ```text
/// <out>/sweep.json, sweep.md                   the report (rewritten after every run)
/// <out>/runs/<exp>/config.yaml                 the run's resolved config (a rerun checks it)
/// <out>/runs/<exp>/output.log                  the training process's stdout and stderr
/// <out>/runs/<exp>/training.log                the run's log (trainer.logs_path)
/// <out>/runs/<exp>/run.json                    wall time of the training ([`TrainingRecord`])
/// <out>/checkpoints/<exp>/epoch_<N>/           trainer.save_checkpoint_path
/// <out>/results/<exp>/training_metrics.json    trainer.results_path
/// <out>/evals/<task set>/<label>_s<seed>.json  `cargo xtask eval --out` reports
/// ```
///
/// `<exp>` is `<algorithm>_s<seed>` ([`SweepLayout::experiment`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepLayout {
    pub out: PathBuf,
}

impl SweepLayout {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self { out: out.into() }
    }

    /// The experiment name of a run (and the file name of its reports).
    pub fn experiment(label: &str, seed: u64) -> String {
        format!("{label}_s{seed}")
    }

    pub fn run_dir(&self, experiment: &str) -> PathBuf {
        self.out.join("runs").join(experiment)
    }

    /// The run's own overrides: seed, algorithm, name, and every path under `out`.
    pub fn run_overrides(&self, algorithm: Algorithm, seed: u64) -> Vec<String> {
        let exp = Self::experiment(algorithm.name(), seed);
        let mut sets = vec![format!("data.seed={seed}")];
        sets.extend(algorithm.overrides());
        sets.extend([
            format!("trainer.experiment_name={exp}"),
            format!(
                "trainer.save_checkpoint_path={}",
                self.out.join("checkpoints").display()
            ),
            format!(
                "trainer.results_path={}",
                self.out.join("results").display()
            ),
            format!("trainer.logs_path={}", self.run_dir(&exp).display()),
            "trainer.load_checkpoint_path=\"\"".to_string(),
        ]);
        sets
    }

    /// The evaluation report of `label` with evaluation seed `seed` on `task_set`.
    pub fn eval_report(&self, task_set: &str, label: &str, seed: u64) -> PathBuf {
        self.out
            .join("evals")
            .join(task_set_slug(task_set))
            .join(format!("{}.json", Self::experiment(label, seed)))
    }

    pub fn json(&self) -> PathBuf {
        self.out.join("sweep.json")
    }

    pub fn markdown(&self) -> PathBuf {
        self.out.join("sweep.md")
    }
}

/// A task set as a folder name: `sim:heldout` → `sim_heldout`, a task index file by its stem
/// (`configs/colour_label_unseen.json` → `colour_label_unseen`).
pub fn task_set_slug(spec: &str) -> String {
    let name = if spec.ends_with(".json") {
        Path::new(spec)
            .file_stem()
            .map_or_else(|| spec.to_string(), |s| s.to_string_lossy().into_owned())
    } else {
        spec.to_string()
    };
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The checkpoint a finished run of `config` ends with: `epoch_<total_episodes − 1>` (the last
/// epoch is always saved). Complete when it holds `trainer_state.json` (checkpoints are renamed
/// into place whole).
pub fn final_checkpoint(config: &Config) -> PathBuf {
    config.checkpoint_dir().join(format!(
        "epoch_{}",
        config.trainer.total_episodes.saturating_sub(1)
    ))
}

/// The success rates of the run's epochs in its `training_metrics.json` (training
/// temperature; `None` when the file is missing or an epoch lacks the rate).
fn epoch_success_rates(results_dir: &Path) -> Option<Vec<f64>> {
    let text = std::fs::read_to_string(results_dir.join("training_metrics.json")).ok()?;
    let metrics: serde_json::Value = serde_json::from_str(&text).ok()?;
    metrics
        .get("epochs")?
        .as_array()?
        .iter()
        .map(|e| e["success_rate"].as_f64())
        .collect()
}

/// The success rate of the run's last epoch in its `training_metrics.json` (training
/// temperature; `None` when the file or the epoch is missing).
pub fn final_training_success(results_dir: &Path) -> Option<f64> {
    epoch_success_rates(results_dir)?.last().copied()
}

/// Epochs averaged by [`late_training_success`].
pub const LATE_EPOCHS: usize = 5;

/// The mean success rate of the run's last [`LATE_EPOCHS`] epochs (of all of them when it has
/// fewer): what a run holds at its end, less noisy than the last epoch alone.
pub fn late_training_success(results_dir: &Path) -> Option<f64> {
    let rates = epoch_success_rates(results_dir)?;
    let late = &rates[rates.len().saturating_sub(LATE_EPOCHS)..];
    (!late.is_empty()).then(|| late.iter().sum::<f64>() / late.len() as f64)
}

/// `runs/<exp>/run.json`: how the training process of a run went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// Wall-clock seconds of the training process that finished the run.
    pub wall_seconds: f64,
    /// It continued a run stopped in an earlier sweep (the wall time is that of the last part).
    pub resumed: bool,
}

/// A paired t-test of `b − a` over pairs (here: the runs of one seed), i.e. a one-sample t-test
/// of the differences against 0 on `n − 1` degrees of freedom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedTest {
    pub a: String,
    pub b: String,
    /// The seeds both labels have (ascending): the pairs.
    pub seeds: Vec<u64>,
    pub n: usize,
    /// Mean of the differences `b_s − a_s`.
    pub mean_diff: f64,
    /// Sample standard deviation of the differences (n − 1 in the denominator).
    pub sd_diff: f64,
    /// Standard error of the mean difference, `sd_diff / √n`.
    pub se: f64,
    pub t: f64,
    pub df: f64,
    pub p_two_sided: f64,
    /// 95% interval of the mean difference: `mean_diff ± t(0.975, n − 1) · se`.
    pub ci95: (f64, f64),
}

/// The paired t-test of `b[i] − a[i]`. `None` with fewer than two pairs, slices of different
/// lengths, or differences without spread (the statistic is undefined). The labels and seeds of
/// the result are empty; [`TaskSetSummary::new`] fills them in.
pub fn paired_t_test(a: &[f64], b: &[f64]) -> Option<PairedTest> {
    if a.len() != b.len() {
        return None;
    }
    let diffs: Vec<f64> = a.iter().zip(b).map(|(a, b)| b - a).collect();
    // The statistics of the differences are those of one sample: its mean, sd and t-interval.
    let d = AcrossRuns::of(&diffs)?;
    let se = d.sd / (d.n as f64).sqrt();
    if se == 0.0 {
        return None;
    }
    let df = (d.n - 1) as f64;
    let t = d.mean / se;
    Some(PairedTest {
        a: String::new(),
        b: String::new(),
        seeds: Vec::new(),
        n: d.n,
        mean_diff: d.mean,
        sd_diff: d.sd,
        se,
        t,
        df,
        p_two_sided: (2.0 * (1.0 - student_t_cdf(t.abs(), df))).clamp(0.0, 1.0),
        ci95: d.ci95,
    })
}

/// One evaluation of a sweep: a report (its label is the algorithm or `base`) and the seed of
/// the run (for `base`: the evaluation seed).
#[derive(Debug, Clone, PartialEq)]
pub struct SeededReport {
    pub seed: u64,
    pub report: EvalReport,
}

/// Everything the sweep says about one task set.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSetSummary {
    pub tasks: String,
    /// The labels across seeds and the Welch tests between them ([`crate::compare`]).
    pub comparison: Comparison,
    /// Each later label against each earlier one, paired by seed.
    pub paired: Vec<PairedTest>,
    /// Each label's rate per seed.
    pub per_seed: Vec<(String, BTreeMap<u64, f64>)>,
}

impl TaskSetSummary {
    /// The summary of `reports` (labels in order of first appearance: put the baselines first,
    /// so that every difference reads "later − earlier").
    pub fn new(tasks: &str, reports: &[SeededReport]) -> Self {
        let plain: Vec<EvalReport> = reports.iter().map(|r| r.report.clone()).collect();
        let comparison = compare(&plain);
        let per_seed: Vec<(String, BTreeMap<u64, f64>)> = comparison
            .labels
            .iter()
            .map(|l| {
                let mut rates = BTreeMap::new();
                for r in reports.iter().filter(|r| r.report.label == l.label) {
                    rates.entry(r.seed).or_insert(r.report.success_rate);
                }
                (l.label.clone(), rates)
            })
            .collect();
        let mut paired = Vec::new();
        for (j, (b, rb)) in per_seed.iter().enumerate() {
            for (a, ra) in &per_seed[..j] {
                let seeds: Vec<u64> = ra.keys().filter(|s| rb.contains_key(s)).copied().collect();
                let xa: Vec<f64> = seeds.iter().map(|s| ra[s]).collect();
                let xb: Vec<f64> = seeds.iter().map(|s| rb[s]).collect();
                if let Some(mut p) = paired_t_test(&xa, &xb) {
                    p.a = a.clone();
                    p.b = b.clone();
                    p.seeds = seeds;
                    paired.push(p);
                }
            }
        }
        Self {
            tasks: tasks.to_string(),
            comparison,
            paired,
            per_seed,
        }
    }

    /// The numbers of the summary, for `sweep.json`.
    pub fn stats(&self) -> TaskSetStats {
        TaskSetStats {
            tasks: self.tasks.clone(),
            labels: self
                .comparison
                .labels
                .iter()
                .map(|l| LabelStats {
                    label: l.label.clone(),
                    runs: l.runs.len(),
                    rates: l.runs.iter().map(|r| r.success_rate).collect(),
                    mean: l.across_runs.as_ref().map(|a| a.mean),
                    sd: l.across_runs.as_ref().map(|a| a.sd),
                    ci95: l.across_runs.as_ref().map(|a| a.ci95),
                    pooled_rate: l.pooled.success_rate,
                    pooled_episodes: l.pooled.episodes,
                })
                .collect(),
            welch: self
                .comparison
                .tests
                .iter()
                .map(|w| WelchStats {
                    a: w.a.clone(),
                    b: w.b.clone(),
                    diff: w.diff,
                    se: w.se,
                    t: w.t,
                    df: w.df,
                    p_two_sided: w.p_two_sided,
                    ci95: w.ci95,
                })
                .collect(),
            paired: self.paired.clone(),
        }
    }

    /// A Markdown section: the `compare` table and its Welch tests, the rates per seed, and the
    /// paired tests.
    pub fn markdown(&self) -> String {
        let mut out = format!("## {}\n\n", self.tasks);
        out += &self.comparison.markdown();
        out += "\nPer seed (%):\n\n| seed |";
        for (label, _) in &self.per_seed {
            out += &format!(" {label} |");
        }
        out += "\n|---:|";
        out += &"---:|".repeat(self.per_seed.len());
        out.push('\n');
        let mut seeds: Vec<u64> = self
            .per_seed
            .iter()
            .flat_map(|(_, r)| r.keys().copied())
            .collect();
        seeds.sort_unstable();
        seeds.dedup();
        for s in seeds {
            out += &format!("| {s} |");
            for (_, rates) in &self.per_seed {
                match rates.get(&s) {
                    Some(r) => out += &format!(" {:.1} |", 100.0 * r),
                    None => out += " - |",
                }
            }
            out.push('\n');
        }
        if self.paired.is_empty() {
            out += "\nNo paired test: it needs two seeds or more that both labels have, and \
                    differences that vary.\n";
        } else {
            out += "\nPaired by seed (the runs of a seed share the training task order and the \
                    evaluation seed):\n\n";
            for p in &self.paired {
                out += &format!("- {}\n", paired_sentence(p));
            }
        }
        out
    }
}

fn paired_sentence(p: &PairedTest) -> String {
    format!(
        "{} − {}: {:+.1} points (95% CI {:+.1}..{:+.1}), sd {:.1}, t = {:.2}, df = {}, p = {:.3} (seeds {})",
        p.b,
        p.a,
        100.0 * p.mean_diff,
        100.0 * p.ci95.0,
        100.0 * p.ci95.1,
        100.0 * p.sd_diff,
        p.t,
        p.df,
        p.p_two_sided,
        p.seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One label of a task set in `sweep.json` (rates are fractions in 0..=1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelStats {
    pub label: String,
    pub runs: usize,
    pub rates: Vec<f64>,
    /// Across runs, with two runs or more.
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    /// 95% Student t interval of the mean (not clipped).
    pub ci95: Option<(f64, f64)>,
    /// All the label's episodes as one sample (not a basis for comparing labels).
    pub pooled_rate: f64,
    pub pooled_episodes: usize,
}

/// A Welch t-test of `mean(b) − mean(a)` in `sweep.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WelchStats {
    pub a: String,
    pub b: String,
    pub diff: f64,
    pub se: f64,
    pub t: f64,
    pub df: f64,
    pub p_two_sided: f64,
    pub ci95: (f64, f64),
}

/// The statistics of one task set in `sweep.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSetStats {
    pub tasks: String,
    pub labels: Vec<LabelStats>,
    pub welch: Vec<WelchStats>,
    pub paired: Vec<PairedTest>,
}

/// One evaluation of a run in `sweep.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEval {
    pub tasks: String,
    /// The `cargo xtask eval --out` report.
    pub report: PathBuf,
    pub episodes: usize,
    pub successes: usize,
    pub success_rate: f64,
}

/// One run of `sweep.json`: a training run of an algorithm, or the base model under a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRun {
    /// `arpo`, `grpo`, or `base`.
    pub algorithm: String,
    /// The training seed (`data.seed`), which is also the evaluation's sampling seed.
    pub seed: u64,
    /// The model evaluated: the final checkpoint, or the base model.
    pub model: PathBuf,
    /// The training process's wall time (`None` for the base, or when not recorded).
    pub wall_seconds: Option<f64>,
    /// The training continued a run an earlier sweep had stopped.
    #[serde(default)]
    pub resumed: bool,
    /// The last training epoch's success rate (training temperature).
    pub final_training_success_rate: Option<f64>,
    /// The mean success rate of the last [`LATE_EPOCHS`] training epochs.
    #[serde(default)]
    pub late_training_success_rate: Option<f64>,
    pub evals: Vec<RunEval>,
}

/// `sweep.json`: what was run, every run, and the statistics of each task set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    pub config: PathBuf,
    /// The `--set` overrides given to every run.
    pub overrides: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub seeds: Vec<u64>,
    pub task_sets: Vec<String>,
    /// Attempts per task of each evaluation.
    pub attempts: usize,
    pub runs: Vec<SweepRun>,
    pub stats: Vec<TaskSetStats>,
}

impl SweepReport {
    /// `sweep.md`: the runs, then one section per task set (`summaries`, in the order of
    /// `task_sets`).
    pub fn markdown(&self, summaries: &[TaskSetSummary]) -> String {
        let mut out = format!(
            "# Sweep: {}\n\nConfig `{}`{}; algorithms {}; seeds {}; {} attempt(s) per task. \
             Each training seed is also its evaluation's sampling seed (the base model is \
             evaluated once per seed). The run is the unit of every statistic below.\n\n",
            self.title(),
            self.config.display(),
            if self.overrides.is_empty() {
                String::new()
            } else {
                format!(" with `--set {}`", self.overrides.join("` `--set "))
            },
            self.algorithms
                .iter()
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", "),
            self.seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.attempts
        );
        out += &format!(
            "| run | seed | training wall time | final training success | last {LATE_EPOCHS} epochs' training success |"
        );
        for t in &self.task_sets {
            out += &format!(" {t} |");
        }
        out += "\n|---|---:|---:|---:|---:|";
        out += &"---:|".repeat(self.task_sets.len());
        out.push('\n');
        for r in &self.runs {
            out += &format!(
                "| {} | {} | {} | {} |",
                r.algorithm,
                r.seed,
                r.wall_seconds.map_or_else(
                    || "-".to_string(),
                    |s| format!("{s:.0} s{}", if r.resumed { " (resumed)" } else { "" })
                ),
                r.final_training_success_rate
                    .map_or_else(|| "-".to_string(), |s| format!("{:.1}%", 100.0 * s))
            );
            out += &format!(
                " {} |",
                r.late_training_success_rate
                    .map_or_else(|| "-".to_string(), |s| format!("{:.1}%", 100.0 * s))
            );
            for t in &self.task_sets {
                match r.evals.iter().find(|e| &e.tasks == t) {
                    Some(e) => {
                        out += &format!(
                            " {:.1}% ({}/{}) |",
                            100.0 * e.success_rate,
                            e.successes,
                            e.episodes
                        );
                    }
                    None => out += " - |",
                }
            }
            out.push('\n');
        }
        for s in summaries {
            out.push('\n');
            out += &s.markdown();
        }
        out
    }

    fn title(&self) -> String {
        self.algorithms
            .iter()
            .map(|a| a.name().to_uppercase())
            .collect::<Vec<_>>()
            .join(" vs ")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_parse_and_switch_the_replay_buffer() {
        assert_eq!(Algorithm::parse("ARPO"), Some(Algorithm::Arpo));
        assert_eq!(Algorithm::parse(" grpo"), Some(Algorithm::Grpo));
        assert_eq!(Algorithm::parse("ppo"), None);
        assert_eq!(
            Algorithm::Arpo.overrides(),
            ["algorithm.enable_replay=true"]
        );
        assert_eq!(
            Algorithm::Grpo.overrides(),
            ["algorithm.enable_replay=false"]
        );
    }

    #[test]
    fn run_overrides_make_a_valid_config_with_every_path_under_out() {
        let layout = SweepLayout::new("/tmp/sw");
        let sets = layout.run_overrides(Algorithm::Grpo, 3);
        let c = Config::from_yaml_str("trainer:\n  total_episodes: 4\n", &sets).unwrap();
        assert_eq!(c.data.seed, 3);
        assert!(!c.algorithm.enable_replay);
        assert_eq!(c.checkpoint_dir(), Path::new("/tmp/sw/checkpoints/grpo_s3"));
        assert_eq!(c.results_dir(), Path::new("/tmp/sw/results/grpo_s3"));
        assert_eq!(c.trainer.logs_path, Path::new("/tmp/sw/runs/grpo_s3"));
        assert_eq!(
            final_checkpoint(&c),
            Path::new("/tmp/sw/checkpoints/grpo_s3/epoch_3")
        );
        for s in &sets {
            let key = s.split_once('=').unwrap().0;
            assert!(SWEEP_KEYS.contains(&key), "{key} missing from SWEEP_KEYS");
        }
    }

    #[test]
    fn task_sets_become_folder_names() {
        assert_eq!(task_set_slug("sim:heldout"), "sim_heldout");
        assert_eq!(
            task_set_slug("configs/colour_label_unseen.json"),
            "colour_label_unseen"
        );
        assert_eq!(
            SweepLayout::new("o").eval_report("sim:train", "base", 2),
            Path::new("o/evals/sim_train/base_s2.json")
        );
    }

    #[test]
    fn no_paired_test_without_pairs_or_spread() {
        assert!(paired_t_test(&[0.1], &[0.2]).is_none());
        assert!(paired_t_test(&[0.1, 0.2], &[0.2]).is_none());
        assert!(paired_t_test(&[0.25, 0.5], &[0.5, 0.75]).is_none());
    }
}

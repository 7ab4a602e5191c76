//! Comparing evaluation reports with the training run as the unit.
//!
//! Episodes of one run share its weights, so episodes of different runs (training seeds) are not
//! independent draws of one success rate: a pooled binomial interval over all of them measures
//! the evaluation's noise and ignores the seed-to-seed spread, which for RL is most of the
//! uncertainty. When several reports share a label, [`compare`] summarises the label by its runs'
//! rates (mean, sample sd, a 95% Student t interval on n − 1 degrees of freedom) and keeps the
//! pooled rate, labelled as such, beside it; two labels with at least two runs each are compared
//! by a Welch t-test on their runs' rates.
//!
//! ```
//! use arpo_trainer::compare::{student_t_quantile, welch_t_test};
//!
//! assert!((student_t_quantile(0.975, 2.0) - 4.302_653).abs() < 1e-6);
//! // b − a: +5 points, t = 1.61 on 2.6 df, not significant.
//! let w = welch_t_test(&[0.12, 0.10, 0.08], &[0.20, 0.15, 0.10]).unwrap();
//! assert!(w.t > 0.0 && w.p_two_sided > 0.05);
//! ```

use std::path::Path;

use crate::TrainerError;
use crate::eval::{EvalReport, pool_by_label, wilson_interval};

/// Mean, spread and 95% t-interval of the runs' success rates (fractions in 0..=1).
#[derive(Debug, Clone, PartialEq)]
pub struct AcrossRuns {
    /// Number of runs (the unit of the statistics).
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator).
    pub sd: f64,
    /// 95% Student t interval of the mean: `mean ± t(0.975, n − 1) · sd / √n`. Not clipped to
    /// 0..=1: with few runs it can reach past either end, which is what the data support.
    pub ci95: (f64, f64),
}

impl AcrossRuns {
    /// The statistics of `rates`; `None` with fewer than two runs (no spread to estimate).
    pub fn of(rates: &[f64]) -> Option<Self> {
        let n = rates.len();
        if n < 2 {
            return None;
        }
        let (mean, sd) = mean_sd(rates);
        let half = student_t_quantile(0.975, (n - 1) as f64) * sd / (n as f64).sqrt();
        Some(Self {
            n,
            mean,
            sd,
            ci95: (mean - half, mean + half),
        })
    }
}

/// One run (report) of a label.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRate {
    pub model: String,
    pub episodes: usize,
    pub successes: usize,
    pub success_rate: f64,
}

/// Everything `compare` says about one label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSummary {
    pub label: String,
    /// Each run's rate, in the order given.
    pub runs: Vec<RunRate>,
    /// With two runs or more: the statistics across runs (the honest interval).
    pub across_runs: Option<AcrossRuns>,
    /// All the label's episodes as one sample (per-task counts summed); its `ci95` is the Wilson
    /// interval of the pooled rate, which treats every episode as independent.
    pub pooled: EvalReport,
}

/// A Welch t-test between two labels' run rates: `diff = mean(b) − mean(a)`.
#[derive(Debug, Clone, PartialEq)]
pub struct WelchTest {
    pub a: String,
    pub b: String,
    pub diff: f64,
    /// Standard error of the difference.
    pub se: f64,
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    pub p_two_sided: f64,
    /// 95% interval of the difference: `diff ± t(0.975, df) · se`.
    pub ci95: (f64, f64),
}

/// The reports summarised per label (in order of first appearance) and the pairwise tests
/// between labels that have two runs or more (each later label against each earlier one).
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub labels: Vec<LabelSummary>,
    pub tests: Vec<WelchTest>,
    /// Every report, in the order given (for the per-task columns).
    reports: Vec<EvalReport>,
}

/// Reads `cargo xtask eval --out` reports.
pub fn load_reports(paths: &[impl AsRef<Path>]) -> Result<Vec<EvalReport>, TrainerError> {
    paths
        .iter()
        .map(|p| {
            let p = p.as_ref();
            let text = std::fs::read_to_string(p).map_err(|e| TrainerError::io(p, e))?;
            serde_json::from_str::<EvalReport>(&text).map_err(|e| {
                TrainerError::io(
                    p,
                    format!("not a report of `cargo xtask eval --out` ({e}); make one with `cargo xtask eval --out FILE`"),
                )
            })
        })
        .collect()
}

/// Summarises `reports` per label and tests the differences between labels.
pub fn compare(reports: &[EvalReport]) -> Comparison {
    let pooled = pool_by_label(reports);
    let labels: Vec<LabelSummary> = pooled
        .into_iter()
        .map(|g| {
            let runs: Vec<RunRate> = reports
                .iter()
                .filter(|r| r.label == g.pooled.label)
                .map(|r| RunRate {
                    model: r.model.clone(),
                    episodes: r.episodes,
                    successes: r.successes,
                    success_rate: r.success_rate,
                })
                .collect();
            let rates: Vec<f64> = runs.iter().map(|r| r.success_rate).collect();
            let mut pooled = g.pooled;
            pooled.ci95 = wilson_interval(pooled.successes, pooled.episodes, 1.96);
            LabelSummary {
                label: pooled.label.clone(),
                across_runs: AcrossRuns::of(&rates),
                runs,
                pooled,
            }
        })
        .collect();
    let mut tests = Vec::new();
    for (j, b) in labels.iter().enumerate() {
        for a in &labels[..j] {
            let ra: Vec<f64> = a.runs.iter().map(|r| r.success_rate).collect();
            let rb: Vec<f64> = b.runs.iter().map(|r| r.success_rate).collect();
            if let Some(mut w) = welch_t_test(&ra, &rb) {
                w.a = a.label.clone();
                w.b = b.label.clone();
                tests.push(w);
            }
        }
    }
    Comparison {
        labels,
        tests,
        reports: reports.to_vec(),
    }
}

/// Welch's unequal-variance t-test of `mean(b) − mean(a)`. `None` when either side has fewer
/// than two values or both have no spread (the statistic is undefined). The labels of the
/// result are empty; [`compare`] fills them in.
pub fn welch_t_test(a: &[f64], b: &[f64]) -> Option<WelchTest> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (ma, sa) = mean_sd(a);
    let (mb, sb) = mean_sd(b);
    let va = sa * sa / a.len() as f64;
    let vb = sb * sb / b.len() as f64;
    let se = (va + vb).sqrt();
    if se == 0.0 {
        return None;
    }
    let df = (va + vb).powi(2) / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
    let diff = mb - ma;
    let t = diff / se;
    let p_two_sided = (2.0 * (1.0 - student_t_cdf(t.abs(), df))).clamp(0.0, 1.0);
    let half = student_t_quantile(0.975, df) * se;
    Some(WelchTest {
        a: String::new(),
        b: String::new(),
        diff,
        se,
        t,
        df,
        p_two_sided,
        ci95: (diff - half, diff + half),
    })
}

fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The CDF of Student's t distribution with `df` (> 0, not necessarily whole) degrees of
/// freedom: `1 − I_x(df/2, 1/2) / 2` at `x = df / (df + t²)` for `t ≥ 0`, by symmetry below.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return if t > 0.0 { 1.0 } else { 0.0 };
    }
    let x = df / (df + t * t);
    let tail = 0.5 * regularized_incomplete_beta(x, df / 2.0, 0.5);
    if t >= 0.0 { 1.0 - tail } else { tail }
}

/// The `p`-quantile (0 < p < 1) of Student's t with `df` degrees of freedom, by bisection on
/// [`student_t_cdf`] (monotone; 200 halvings reach f64 resolution).
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if p < 0.5 {
        return -student_t_quantile(1.0 - p, df);
    }
    let mut hi = 1.0;
    while student_t_cdf(hi, df) < p {
        hi *= 2.0;
        if hi > 1e300 {
            return f64::INFINITY;
        }
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= f64::EPSILON * hi {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// `I_x(a, b)`, the regularized incomplete beta function, by its continued fraction (modified
/// Lentz), evaluated on the side of `x` where it converges fast.
fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_continued_fraction(1.0 - x, b, a) / b
    }
}

fn beta_continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..=1000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let even = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / guard(1.0 + even * d);
        c = guard(1.0 + even / c);
        h *= d * c;
        let odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / guard(1.0 + odd * d);
        c = guard(1.0 + odd / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, nine coefficients; about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// A t-interval as percentages, clipped to 0..=100 for display only.
fn pct_interval((lo, hi): (f64, f64)) -> String {
    format!("{}..{}", pct(lo.max(0.0)), pct(hi.min(1.0)))
}

impl Comparison {
    /// A plain-text report: one row per label (across-run statistics, then the pooled rate),
    /// the tests between labels, then one column per label for every task (pooled counts).
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<24} {:>4}  {:>13}  {:>14}  {:>27}  {}\n",
            "label", "runs", "mean ± sd", "95% t-interval", "pooled (Wilson 95%)", "per run (%)"
        );
        for s in &self.labels {
            let (mean_sd, t_ci) = match &s.across_runs {
                Some(a) => (
                    format!("{} ± {}", pct(a.mean), pct(a.sd)),
                    pct_interval(a.ci95),
                ),
                None => ("-".to_string(), "- (one run)".to_string()),
            };
            out += &format!(
                "{:<24} {:>4}  {:>13}  {:>14}  {:>27}  {}\n",
                truncate(&s.label, 24),
                s.runs.len(),
                mean_sd,
                t_ci,
                format!(
                    "{}% ({}) of {}",
                    pct(s.pooled.success_rate),
                    pct_interval(s.pooled.ci95),
                    s.pooled.episodes
                ),
                runs_list(s)
            );
        }
        out += "\nThe run is the unit: mean, sd and the Student t interval are over the runs' rates.\n\
                The pooled rate counts every episode as independent; its interval ignores the\n\
                run-to-run spread and is not a basis for comparing labels.\n";
        if !self.tests.is_empty() {
            out += "\nWelch t-test on the runs' rates:\n";
            for w in &self.tests {
                out += &format!("  {}\n", welch_sentence(w));
            }
        }
        out += &self.task_columns();
        out
    }

    /// The label rows as a Markdown table, then the tests as a list (for the README).
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| label | runs | per run (%) | mean ± sd across runs | 95% t-interval (runs) | pooled rate, episodes (Wilson 95%) |\n\
             |---|---:|---|---:|---:|---:|\n",
        );
        for s in &self.labels {
            let (mean_sd, t_ci) = match &s.across_runs {
                Some(a) => (
                    format!("{}% ± {}", pct(a.mean), pct(a.sd)),
                    format!("{}%", pct_interval(a.ci95)),
                ),
                None => ("-".to_string(), "-".to_string()),
            };
            out += &format!(
                "| {} | {} | {} | {} | {} | {}%, {} ({}%) |\n",
                s.label,
                s.runs.len(),
                runs_list(s),
                mean_sd,
                t_ci,
                pct(s.pooled.success_rate),
                s.pooled.episodes,
                pct_interval(s.pooled.ci95)
            );
        }
        if !self.tests.is_empty() {
            out.push('\n');
            for w in &self.tests {
                out += &format!("- {}\n", welch_sentence(w));
            }
        }
        out
    }

    fn task_columns(&self) -> String {
        let pooled: Vec<&EvalReport> = self.labels.iter().map(|s| &s.pooled).collect();
        let mut tasks: Vec<&str> = self
            .reports
            .iter()
            .flat_map(|r| r.per_task.iter().map(|t| t.task_id.as_str()))
            .collect();
        tasks.sort_unstable();
        tasks.dedup();
        if tasks.is_empty() {
            return String::new();
        }
        let mut out = format!("\n{:<40}", "task (pooled successes/attempts)");
        for r in &pooled {
            out += &format!(" {:>14}", truncate(&r.label, 14));
        }
        out.push('\n');
        for task in tasks {
            out += &format!("{:<40}", truncate(task, 40));
            for r in &pooled {
                let cell = match r.per_task.iter().find(|t| t.task_id == task) {
                    Some(t) => format!("{}/{}", t.successes, t.attempts),
                    None => "-".to_string(),
                };
                out += &format!(" {cell:>14}");
            }
            out.push('\n');
        }
        out
    }
}

fn runs_list(s: &LabelSummary) -> String {
    s.runs
        .iter()
        .map(|r| pct(r.success_rate))
        .collect::<Vec<_>>()
        .join(", ")
}

fn welch_sentence(w: &WelchTest) -> String {
    format!(
        "{} − {}: {:+.1} points (95% CI {:+.1}..{:+.1}), t = {:.2}, df = {:.1}, p = {:.2}",
        w.b,
        w.a,
        100.0 * w.diff,
        100.0 * w.ci95.0,
        100.0 * w.ci95.1,
        w.t,
        w.df,
        w.p_two_sided
    )
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::eval::TaskEval;

    /// A report of `successes` out of `episodes`, spread over two tasks.
    fn report(label: &str, run: usize, episodes: usize, successes: usize) -> EvalReport {
        let half = episodes / 2;
        let s_a = successes.min(half);
        EvalReport {
            label: label.into(),
            model: format!("checkpoints/{label}_s{run}"),
            tasks_spec: "configs/colour_label_unseen.json".into(),
            attempts_per_task: 4,
            temperature: 0.5,
            seed: 0,
            episodes,
            successes,
            dropped: 0,
            success_rate: successes as f64 / episodes as f64,
            ci95: wilson_interval(successes, episodes, 1.96),
            per_task: vec![
                TaskEval {
                    task_id: "a".into(),
                    attempts: half,
                    successes: s_a,
                    mean_eval_result: 0.0,
                    dropped: 0,
                },
                TaskEval {
                    task_id: "b".into(),
                    attempts: episodes - half,
                    successes: successes - s_a,
                    mean_eval_result: 0.0,
                    dropped: 0,
                },
            ],
        }
    }

    fn close(x: f64, want: f64, tol: f64) -> bool {
        (x - want).abs() <= tol
    }

    #[test]
    fn t_quantiles_match_the_tables() {
        // scipy.stats.t.ppf(0.975, df) for df = 1, 2, 4, 10, 30, 2.5.
        for (df, want) in [
            (1.0, 12.706_204_736_174_694),
            (2.0, 4.302_652_729_749_462),
            (4.0, 2.776_445_105_197_793),
            (10.0, 2.228_138_851_986_274),
            (30.0, 2.042_272_456_301_238),
            (2.5, 3.574_654_842_003_682),
        ] {
            let q = student_t_quantile(0.975, df);
            assert!(close(q, want, 1e-9), "df {df}: {q} vs {want}");
            assert!(close(student_t_quantile(0.025, df), -want, 1e-9));
        }
        // scipy.stats.t.cdf: (1.4, 2.5), (-0.7, 3.3), (2.0, 7).
        assert!(close(
            student_t_cdf(1.4, 2.5),
            0.863_641_127_456_543_9,
            1e-10
        ));
        assert!(close(
            student_t_cdf(-0.7, 3.3),
            0.265_044_039_661_629_1,
            1e-10
        ));
        assert!(close(student_t_cdf(2.0, 7.0), 0.957_190_335_718_512, 1e-10));
        assert_eq!(student_t_cdf(0.0, 3.0), 0.5);
    }

    /// The README's unseen-instance evaluation: 256 episodes per run, three seeds per label.
    /// ARPO 55, 39, 27 successes (21.5, 15.2, 10.5%); GRPO 35, 24, 24 (13.7, 9.4, 9.4%).
    /// Expected values by hand with numpy/scipy (not this code):
    ///   arpo = [55, 39, 27] / 256: mean 0.157552, sd (ddof 1) 0.054873,
    ///     t(0.975, 2) = 4.302653, half = 4.302653 * 0.054873 / sqrt(3) = 0.136313
    ///     -> [0.021240, 0.293865]
    ///   grpo = [35, 24, 24] / 256: mean 0.108073, sd 0.024808 -> [0.046446, 0.169699]
    ///   Welch: se = sqrt(0.054873²/3 + 0.024808²/3) = 0.034768, t = 0.049479 / 0.034768
    ///     = 1.423111, df = 2.784782, p = 0.256468 (scipy.stats.ttest_ind(equal_var=False)),
    ///     95% CI of the difference -0.066168..0.165126.
    ///   Pooled: arpo 121/768 = 0.157552, grpo 83/768 = 0.108073 (the old "2.9 standard errors"
    ///     is (p1 - p2) / sqrt(p1 q1 / 768 + p2 q2 / 768) = 2.86).
    #[test]
    fn compare_on_report_files_gives_hand_computed_across_run_intervals() {
        let dir = tempfile::tempdir().unwrap();
        let runs = [
            report("base", 0, 256, 38),
            report("grpo", 1, 256, 35),
            report("grpo", 2, 256, 24),
            report("grpo", 3, 256, 24),
            report("arpo", 1, 256, 55),
            report("arpo", 2, 256, 39),
            report("arpo", 3, 256, 27),
        ];
        let paths: Vec<_> = runs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let p = dir.path().join(format!("r{i}.json"));
                std::fs::write(&p, serde_json::to_string_pretty(r).unwrap()).unwrap();
                p
            })
            .collect();
        let reports = load_reports(&paths).unwrap();
        let c = compare(&reports);
        assert_eq!(
            c.labels
                .iter()
                .map(|s| s.label.as_str())
                .collect::<Vec<_>>(),
            ["base", "grpo", "arpo"]
        );
        assert!(c.labels[0].across_runs.is_none());

        let arpo = c.labels[2].across_runs.as_ref().unwrap();
        assert_eq!(arpo.n, 3);
        assert!(close(arpo.mean, 0.157_552, 1e-6), "{arpo:?}");
        assert!(close(arpo.sd, 0.054_873, 1e-6), "{arpo:?}");
        assert!(close(arpo.ci95.0, 0.021_240, 1e-6), "{arpo:?}");
        assert!(close(arpo.ci95.1, 0.293_865, 1e-6), "{arpo:?}");
        let grpo = c.labels[1].across_runs.as_ref().unwrap();
        assert!(close(grpo.ci95.0, 0.046_446, 1e-6), "{grpo:?}");
        assert!(close(grpo.ci95.1, 0.169_699, 1e-6), "{grpo:?}");

        let pooled = &c.labels[2].pooled;
        assert_eq!((pooled.successes, pooled.episodes), (121, 768));
        assert_eq!(pooled.ci95, wilson_interval(121, 768, 1.96));

        // Tests: grpo vs base and arpo vs base need two runs on both sides: only arpo vs grpo.
        assert_eq!(c.tests.len(), 1);
        let w = &c.tests[0];
        assert_eq!((w.a.as_str(), w.b.as_str()), ("grpo", "arpo"));
        assert!(close(w.t, 1.423_111, 1e-5), "{w:?}");
        assert!(close(w.df, 2.784_782, 1e-5), "{w:?}");
        assert!(close(w.p_two_sided, 0.256_468, 1e-5), "{w:?}");
        assert!(close(w.ci95.0, -0.066_168, 1e-5), "{w:?}");
        assert!(close(w.ci95.1, 0.165_126, 1e-5), "{w:?}");

        let table = c.table();
        assert!(table.contains("15.8 ± 5.5"), "{table}");
        assert!(table.contains("2.1..29.4"), "{table}");
        assert!(table.contains("arpo − grpo: +4.9 points"), "{table}");
        assert!(table.contains("p = 0.26"), "{table}");
        let md = c.markdown();
        assert!(
            md.contains("| arpo | 3 | 21.5, 15.2, 10.5 | 15.8% ± 5.5 | 2.1..29.4% | 15.8%, 768 (13.3..18.5%) |"),
            "{md}"
        );
    }

    /// Two runs per label (the README's training-task table: 8 tasks × 16 attempts per run).
    /// ARPO 122, 96 of 128; GRPO 48, 80 of 128. scipy: t = 2.182821, df = 1.919562,
    /// p = 0.166047; arpo mean 0.851563, sd 0.143631, t(0.975, 1) = 12.706205 -> the interval
    /// -0.438911..2.142036 (two runs say little).
    #[test]
    fn two_runs_give_the_wide_interval_of_one_degree_of_freedom() {
        let reports = [
            report("grpo", 1, 128, 48),
            report("grpo", 2, 128, 80),
            report("arpo", 1, 128, 122),
            report("arpo", 2, 128, 96),
        ];
        let c = compare(&reports);
        let arpo = c.labels[1].across_runs.as_ref().unwrap();
        assert!(close(arpo.ci95.0, -0.438_911, 1e-5), "{arpo:?}");
        assert!(close(arpo.ci95.1, 2.142_036, 1e-5), "{arpo:?}");
        let w = &c.tests[0];
        assert!(close(w.t, 2.182_821, 1e-5), "{w:?}");
        assert!(close(w.df, 1.919_562, 1e-5), "{w:?}");
        assert!(close(w.p_two_sided, 0.166_047, 1e-5), "{w:?}");
        // Displayed clipped to 0..100.
        assert!(c.table().contains("0.0..100.0"), "{}", c.table());
    }

    #[test]
    fn no_test_without_spread_or_with_one_run() {
        assert!(welch_t_test(&[0.1], &[0.2, 0.3]).is_none());
        assert!(welch_t_test(&[0.1, 0.1], &[0.2, 0.2]).is_none());
        assert!(AcrossRuns::of(&[0.3]).is_none());
    }

    #[test]
    fn a_file_that_is_not_a_report_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        std::fs::write(&p, "{}").unwrap();
        let e = load_reports(&[&p]).unwrap_err().to_string();
        assert!(e.contains("cargo xtask eval --out"), "{e}");
    }
}

//! `cargo xtask sweep`'s statistics: the paired t-test by seed, and the report of a sweep built
//! from evaluation report files, against values computed outside this code (mpmath's regularized
//! incomplete beta for the t distribution, 30 digits; the formulas written next to each value).

use std::path::PathBuf;

use arpo_trainer::compare::load_reports;
use arpo_trainer::eval::{EvalReport, TaskEval, wilson_interval};
use arpo_trainer::sweep::{
    Algorithm, RunEval, SeededReport, SweepReport, SweepRun, TaskSetSummary,
    final_training_success, late_training_success, paired_t_test,
};

fn close(x: f64, want: f64, tol: f64) -> bool {
    (x - want).abs() <= tol
}

/// Differences b − a = [0.1, 0.2, 0.05, 0.15, 0.0]:
///   mean 0.1; deviations 0, 0.1, −0.05, 0.05, −0.1, squares summing to 0.025, so
///   sd = √(0.025 / 4) = 0.0790569415042, se = sd / √5 = 0.0353553390593, t = 0.1 / se = 2√2
///   = 2.82842712475 on 4 df; two-sided p = 2 (1 − F_t4(2√2)) = 0.0474206555843;
///   t(0.975, 4) = 2.7764451052, 95% CI 0.1 ± 2.7764451052 · se = 0.00183784192612..0.198162158074.
#[test]
fn late_training_success_is_the_mean_of_the_last_five_epochs() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(late_training_success(dir.path()), None, "no metrics file");
    let write = |rates: &[f64]| {
        let epochs: Vec<_> = rates
            .iter()
            .map(|r| serde_json::json!({ "success_rate": r }))
            .collect();
        let metrics = serde_json::json!({ "experiment": "x", "steps": [], "epochs": epochs });
        std::fs::write(
            dir.path().join("training_metrics.json"),
            metrics.to_string(),
        )
        .expect("write");
    };
    // By hand: (0.3 + 0.4 + 0.5 + 0.6 + 0.8) / 5 = 0.52; the last epoch 0.8.
    write(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]);
    assert!(close(
        late_training_success(dir.path()).expect("rate"),
        0.52,
        1e-12
    ));
    assert_eq!(final_training_success(dir.path()), Some(0.8));
    // Fewer than five epochs: all of them, (0.2 + 0.4 + 0.9) / 3 = 0.5.
    write(&[0.2, 0.4, 0.9]);
    assert!(close(
        late_training_success(dir.path()).expect("rate"),
        0.5,
        1e-12
    ));
    write(&[]);
    assert_eq!(late_training_success(dir.path()), None, "no epoch yet");
}

#[test]
fn paired_t_test_matches_the_hand_computed_values() {
    let a = [0.30, 0.25, 0.40, 0.35, 0.50];
    let b = [0.40, 0.45, 0.45, 0.50, 0.50];
    let p = paired_t_test(&a, &b).unwrap();
    assert_eq!(p.n, 5);
    assert_eq!(p.df, 4.0);
    assert!(close(p.mean_diff, 0.1, 1e-12), "{p:?}");
    assert!(close(p.sd_diff, 0.079_056_941_504_2, 1e-12), "{p:?}");
    assert!(close(p.se, 0.035_355_339_059_3, 1e-12), "{p:?}");
    assert!(close(p.t, 2.828_427_124_75, 1e-9), "{p:?}");
    assert!(close(p.p_two_sided, 0.047_420_655_584_3, 1e-9), "{p:?}");
    assert!(close(p.ci95.0, 0.001_837_841_926_12, 1e-9), "{p:?}");
    assert!(close(p.ci95.1, 0.198_162_158_074, 1e-9), "{p:?}");
    // The other way round: the same test with the sign flipped.
    let q = paired_t_test(&b, &a).unwrap();
    assert!(close(q.t, -p.t, 1e-12) && close(q.p_two_sided, p.p_two_sided, 1e-12));
}

/// A report of `successes` of 32 episodes (8 tasks × 4 attempts) for `label`, run `seed`.
fn report(label: &str, seed: u64, successes: usize) -> EvalReport {
    let per_task: Vec<TaskEval> = (0..8)
        .map(|i| {
            let s = successes.saturating_sub(4 * i).min(4);
            TaskEval {
                task_id: format!("sim-task-{i}"),
                attempts: 4,
                successes: s,
                mean_eval_result: s as f64 / 4.0,
                dropped: 0,
            }
        })
        .collect();
    EvalReport {
        label: label.into(),
        model: format!("checkpoints/{label}_s{seed}/epoch_10"),
        tasks_spec: "configs/colour_label_unseen.json".into(),
        attempts_per_task: 4,
        temperature: 0.5,
        seed,
        episodes: 32,
        successes,
        dropped: 0,
        success_rate: successes as f64 / 32.0,
        ci95: wilson_interval(successes, 32, 1.96),
        per_task,
    }
}

/// Three seeds; successes of 32: base 4, 3, 5; GRPO 8, 12, 10; ARPO 12, 14, 13 (seeds 1, 2, 3).
/// Expected (rates r = successes / 32; mpmath, 30 digits):
///   base: mean 0.125, sd 0.03125, t-interval 0.0473706965078..0.202629303492
///   grpo: mean 0.3125, sd 0.0625, t-interval 0.157241393016..0.467758606984
///   arpo: mean 0.40625, sd 0.03125, t-interval 0.328620696508..0.483879303492
///   Welch arpo − grpo: diff 0.09375, t 2.32379000772, df 2.94117647059, p 0.104478886685
///   paired arpo − grpo: diffs 0.125, 0.0625, 0.09375: mean 0.09375, sd 0.03125,
///     se 0.03125 / √3 = 0.0180421959122, t = 3√3 = 5.19615242271 on 2 df, p 0.035098718646,
///     CI 0.0161206965078..0.171379303492 (pairing removes the seed-to-seed spread both share:
///     the Welch test of the same runs says p = 0.10)
///   paired grpo − base: mean 0.1875, sd 0.0826797284708, t 3.92792202425, p 0.0591249277192
///   paired arpo − base: mean 0.28125, sd 0.0541265877365, t 9.0, p 0.0121216600928
#[test]
fn a_sweep_report_from_eval_report_files_gives_the_hand_computed_tables() {
    let dir = tempfile::tempdir().unwrap();
    // Written as `cargo xtask sweep` lays them out; seeds of a label out of order on purpose:
    // the pairs are made by seed, not by position.
    let runs = [
        ("base", [(1, 4), (2, 3), (3, 5)]),
        ("grpo", [(3, 10), (1, 8), (2, 12)]),
        ("arpo", [(2, 14), (3, 13), (1, 12)]),
    ];
    let mut paths: Vec<(u64, PathBuf)> = Vec::new();
    for (label, seeds) in runs {
        for (seed, successes) in seeds {
            let p = dir.path().join(format!("{label}_s{seed}.json"));
            let json = serde_json::to_string_pretty(&report(label, seed, successes)).unwrap();
            std::fs::write(&p, json).unwrap();
            paths.push((seed, p));
        }
    }
    let files: Vec<&PathBuf> = paths.iter().map(|(_, p)| p).collect();
    let reports: Vec<SeededReport> = load_reports(&files)
        .unwrap()
        .into_iter()
        .zip(&paths)
        .map(|(report, (seed, _))| SeededReport {
            seed: *seed,
            report,
        })
        .collect();
    let summary = TaskSetSummary::new("configs/colour_label_unseen.json", &reports);

    let stats = summary.stats();
    let labels: Vec<&str> = stats.labels.iter().map(|l| l.label.as_str()).collect();
    assert_eq!(labels, ["base", "grpo", "arpo"]);
    for (l, mean, sd, lo, hi) in [
        (0, 0.125, 0.031_25, 0.047_370_696_507_8, 0.202_629_303_492),
        (1, 0.3125, 0.0625, 0.157_241_393_016, 0.467_758_606_984),
        (2, 0.406_25, 0.031_25, 0.328_620_696_508, 0.483_879_303_492),
    ] {
        let s = &stats.labels[l];
        assert_eq!(s.runs, 3);
        assert!(close(s.mean.unwrap(), mean, 1e-12), "{s:?}");
        assert!(close(s.sd.unwrap(), sd, 1e-12), "{s:?}");
        let ci = s.ci95.unwrap();
        assert!(close(ci.0, lo, 1e-9) && close(ci.1, hi, 1e-9), "{s:?}");
    }
    let welch = stats
        .welch
        .iter()
        .find(|w| (w.a.as_str(), w.b.as_str()) == ("grpo", "arpo"))
        .unwrap();
    assert!(close(welch.diff, 0.093_75, 1e-12), "{welch:?}");
    assert!(close(welch.t, 2.323_790_007_72, 1e-9), "{welch:?}");
    assert!(close(welch.df, 2.941_176_470_59, 1e-9), "{welch:?}");
    assert!(
        close(welch.p_two_sided, 0.104_478_886_685, 1e-9),
        "{welch:?}"
    );

    // Each later label against each earlier one: grpo − base, arpo − base, arpo − grpo.
    let pairs: Vec<(&str, &str)> = summary
        .paired
        .iter()
        .map(|p| (p.b.as_str(), p.a.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [("grpo", "base"), ("arpo", "base"), ("arpo", "grpo")]
    );
    for (i, mean, sd, t, p) in [
        (
            0,
            0.1875,
            0.082_679_728_470_8,
            3.927_922_024_25,
            0.059_124_927_719_2,
        ),
        (1, 0.281_25, 0.054_126_587_736_5, 9.0, 0.012_121_660_092_8),
        (2, 0.093_75, 0.031_25, 5.196_152_422_71, 0.035_098_718_646),
    ] {
        let q = &summary.paired[i];
        assert_eq!(q.seeds, [1, 2, 3]);
        assert_eq!(q.df, 2.0);
        assert!(close(q.mean_diff, mean, 1e-12), "{q:?}");
        assert!(close(q.sd_diff, sd, 1e-9), "{q:?}");
        assert!(close(q.t, t, 1e-9), "{q:?}");
        assert!(close(q.p_two_sided, p, 1e-9), "{q:?}");
    }
    let arpo_grpo = &summary.paired[2];
    assert!(close(arpo_grpo.se, 0.018_042_195_912_2, 1e-12));
    assert!(close(arpo_grpo.ci95.0, 0.016_120_696_507_8, 1e-9));
    assert!(close(arpo_grpo.ci95.1, 0.171_379_303_492, 1e-9));

    let md = summary.markdown();
    // The `compare` table (runs in the order given), its Welch test, the per-seed table (by
    // seed), the paired test.
    assert!(
        md.contains("| arpo | 3 | 43.8, 40.6, 37.5 | 40.6% ± 3.1 | 32.9..48.4% |"),
        "{md}"
    );
    assert!(
        md.contains(
            "- arpo − grpo: +9.4 points (95% CI -3.6..+22.4), t = 2.32, df = 2.9, p = 0.10"
        ),
        "{md}"
    );
    assert!(md.contains("| seed | base | grpo | arpo |"), "{md}");
    assert!(md.contains("| 1 | 12.5 | 25.0 | 37.5 |"), "{md}");
    assert!(md.contains("| 2 | 9.4 | 37.5 | 43.8 |"), "{md}");
    // 31.25 and 43.75 are ties: std's formatting rounds them to even.
    assert!(md.contains("| 3 | 15.6 | 31.2 | 40.6 |"), "{md}");
    assert!(
        md.contains(
            "- arpo − grpo: +9.4 points (95% CI +1.6..+17.1), sd 3.1, t = 5.20, df = 2, p = 0.035 (seeds 1, 2, 3)"
        ),
        "{md}"
    );

    // sweep.json and sweep.md: the runs' rows, then the section.
    let sweep = SweepReport {
        config: "configs/embedded_default.yaml".into(),
        overrides: vec!["trainer.total_episodes=11".into()],
        algorithms: vec![Algorithm::Grpo, Algorithm::Arpo],
        seeds: vec![1, 2, 3],
        task_sets: vec!["configs/colour_label_unseen.json".into()],
        attempts: 4,
        runs: reports
            .iter()
            .map(|r| SweepRun {
                algorithm: r.report.label.clone(),
                seed: r.seed,
                model: r.report.model.clone().into(),
                wall_seconds: (r.report.label != "base").then_some(512.3),
                resumed: false,
                final_training_success_rate: (r.report.label != "base").then_some(0.703),
                late_training_success_rate: (r.report.label != "base").then_some(0.8156),
                evals: vec![RunEval {
                    tasks: r.report.tasks_spec.clone(),
                    report: format!("{}_s{}.json", r.report.label, r.seed).into(),
                    episodes: r.report.episodes,
                    successes: r.report.successes,
                    success_rate: r.report.success_rate,
                }],
            })
            .collect(),
        stats: vec![stats],
    };
    let text = sweep.markdown(std::slice::from_ref(&summary));
    assert!(
        text.contains("| run | seed | training wall time | final training success | last 5 epochs' training success | configs/colour_label_unseen.json |"),
        "{text}"
    );
    assert!(
        text.contains("| arpo | 1 | 512 s | 70.3% | 81.6% | 37.5% (12/32) |"),
        "{text}"
    );
    assert!(
        text.contains("| base | 3 | - | - | - | 15.6% (5/32) |"),
        "{text}"
    );
    assert!(text.contains(&md), "{text}");
    let back: SweepReport =
        serde_json::from_str(&serde_json::to_string_pretty(&sweep).unwrap()).unwrap();
    assert_eq!(back, sweep);
}

//! `cargo xtask sweep` as a user runs it: a real sweep of ARPO and GRPO over two seeds (the
//! small run of one epoch each), evaluated with the base model on two task sets; the report
//! files hold a row per run; a rerun of the same command trains and evaluates nothing.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use arpo_trainer::eval::EvalReport;
use arpo_trainer::sweep::SweepReport;

/// `cargo xtask sweep` with `args`, the small run's overrides and one epoch per run.
fn sweep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["sweep", "--config", "configs/embedded_default.yaml"])
        .args(args)
        .args(
            crate::SMALL_RUN
                .iter()
                .chain(&["trainer.total_episodes=1"])
                .flat_map(|s| ["--set", s]),
        )
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_BACKTRACE", "0")
        .env_remove("FAILPOINTS")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_tiny_sweep_reports_every_run_and_a_rerun_skips_them_all() {
    let _one = crate::ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let out_arg = out.display().to_string();
    let args = [
        "--algorithms",
        "arpo,grpo",
        "--seeds",
        "1,2",
        "--eval",
        "configs/embedded_tasks.json,sim:heldout",
        "--max-tasks",
        "2",
        "--attempts",
        "1",
        "--base",
        "--out",
        &out_arg,
    ];
    let first = sweep(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(
        stderr(&first).matches(": training (log: ").count(),
        4,
        "{}",
        stderr(&first)
    );

    let text = std::fs::read_to_string(out.join("sweep.json")).unwrap();
    let report: SweepReport = serde_json::from_str(&text).unwrap();
    let rows: Vec<(&str, u64)> = report
        .runs
        .iter()
        .map(|r| (r.algorithm.as_str(), r.seed))
        .collect();
    assert_eq!(
        rows,
        [
            ("base", 1),
            ("base", 2),
            ("grpo", 1),
            ("grpo", 2),
            ("arpo", 1),
            ("arpo", 2)
        ]
    );
    for r in &report.runs {
        let sets: Vec<&str> = r.evals.iter().map(|e| e.tasks.as_str()).collect();
        assert_eq!(
            sets,
            ["configs/embedded_tasks.json", "sim:heldout"],
            "{r:?}"
        );
        for e in &r.evals {
            let eval: EvalReport =
                serde_json::from_str(&std::fs::read_to_string(&e.report).unwrap()).unwrap();
            assert_eq!(
                (eval.label.as_str(), eval.seed, eval.attempts_per_task),
                (r.algorithm.as_str(), r.seed, 1)
            );
            assert_eq!(eval.per_task.len(), 2, "{eval:?}");
            assert_eq!(
                (eval.successes, eval.success_rate),
                (e.successes, e.success_rate)
            );
        }
        if r.algorithm == "base" {
            assert_eq!(r.model, Path::new("fixtures/models/uitars-tiny-base"));
            assert!(r.wall_seconds.is_none() && r.final_training_success_rate.is_none());
        } else {
            let name = format!("{}_s{}", r.algorithm, r.seed);
            assert_eq!(r.model, out.join("checkpoints").join(&name).join("epoch_0"));
            assert!(r.model.join("model.safetensors").is_file(), "{r:?}");
            assert!(r.wall_seconds.is_some_and(|s| s > 0.0), "{r:?}");
            assert!(r.final_training_success_rate.is_some(), "{r:?}");
            let yaml =
                std::fs::read_to_string(out.join("runs").join(&name).join("config.yaml")).unwrap();
            let replay = format!("enable_replay: {}", r.algorithm == "arpo");
            assert!(yaml.contains(&replay), "{name}: {yaml}");
            assert!(
                yaml.contains(&format!("seed: {}", r.seed)),
                "{name}: {yaml}"
            );
        }
    }
    assert_eq!(report.stats.len(), 2);
    for s in &report.stats {
        let labels: Vec<(&str, usize)> = s
            .labels
            .iter()
            .map(|l| (l.label.as_str(), l.runs))
            .collect();
        assert_eq!(labels, [("base", 2), ("grpo", 2), ("arpo", 2)], "{s:?}");
    }
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    for row in ["| base | 1 | - | - |", "| grpo | 2 |", "| arpo | 1 |"] {
        assert!(md.contains(row), "{row} missing:\n{md}");
    }
    for section in [
        "## configs/embedded_tasks.json",
        "## sim:heldout",
        "| seed | base | grpo | arpo |",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }

    // The same command again: every run and evaluation is found done, the report is the same.
    let again = sweep(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    let log = stderr(&again);
    assert!(!log.contains(": training"), "{log}");
    assert_eq!(log.matches(": skipping training, ").count(), 4, "{log}");
    assert_eq!(log.matches(": skipping ").count(), 4 + 6 * 2, "{log}");
    assert_eq!(
        std::fs::read_to_string(out.join("sweep.json")).unwrap(),
        text
    );
}

#[test]
fn bad_arguments_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let out_arg = out.display().to_string();
    for (args, says) in [
        (
            [
                "--algorithms",
                "arpo,ppo",
                "--seeds",
                "1",
                "--eval",
                "sim:heldout",
            ],
            "unknown algorithm \"ppo\" in --algorithms: use arpo",
        ),
        (
            [
                "--algorithms",
                "arpo",
                "--seeds",
                "",
                "--eval",
                "sim:heldout",
            ],
            "--seeds is empty",
        ),
        (
            [
                "--algorithms",
                "arpo",
                "--seeds",
                "1",
                "--eval",
                "sim:unseen",
            ],
            "unknown split \"unseen\"",
        ),
        (
            [
                "--algorithms",
                "arpo",
                "--seeds",
                "1",
                "--eval",
                "missing.json",
            ],
            "missing.json: no such file",
        ),
        (
            [
                "--algorithms",
                "arpo",
                "--seeds",
                "1",
                "--set",
                "data.seed=4",
            ],
            "the sweep sets data.seed itself",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .args(["sweep", "--out", &out_arg])
            .args(args)
            .args(if args.contains(&"--eval") {
                &[][..]
            } else {
                &["--eval", "sim:heldout"][..]
            })
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

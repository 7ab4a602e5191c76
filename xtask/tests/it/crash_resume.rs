//! Crash safety as a user meets it: a real `cargo xtask train` process killed with SIGKILL
//! mid-rollout, mid-update and mid-checkpoint write, each time restarted with `--resume`, ends
//! with the same final weights and metrics as a run that was never interrupted; the
//! half-written checkpoint of the third kill is never picked up.
//!
//! The kills land at named fault points of the training loop (`fail` crate, `FAILPOINTS`):
//! the point sleeps, the test sees the process stop using CPU there, and sends SIGKILL.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command};

/// The small run of this test, writing under `out`.
fn train(out: &Path, fail_points: Option<&str>, resume: bool) -> Command {
    let mut c = crate::small_train(
        out,
        "crash",
        &[
            "trainer.total_episodes=3",
            "trainer.save_freq=1",
            "trainer.save_limit=-1",
            "trainer.logger=[console, jsonl]",
        ],
    );
    if resume {
        c.arg("--resume");
    }
    if let Some(f) = fail_points {
        c.env("FAILPOINTS", f);
    }
    c
}

/// Waits until `child` is parked at its fault point, then kills it with SIGKILL: nothing of the
/// process runs after this (no destructors, no flushes).
fn kill_when_parked(mut child: Child, out: &Path, what: &str) {
    crate::wait_until_parked(&mut child, out, what);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn run_to_end(mut c: Command, out: &Path, what: &str) {
    let status = c.status().unwrap();
    assert!(
        status.success(),
        "{what}: {status}\n{}",
        crate::stderr_of(out)
    );
}

/// The metrics without wall-clock times.
fn metrics(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("results/crash/training_metrics.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !k.ends_with("_seconds"));
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

fn weights(out: &Path, epoch: usize) -> Vec<u8> {
    std::fs::read(out.join(format!("checkpoints/crash/epoch_{epoch}/model.safetensors"))).unwrap()
}

#[test]
fn a_run_killed_three_times_and_resumed_ends_as_an_uninterrupted_one() {
    let _one = crate::ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let reference = tempfile::tempdir().unwrap();
    run_to_end(
        train(reference.path(), None, false),
        reference.path(),
        "the uninterrupted run",
    );

    let crashed = tempfile::tempdir().unwrap();
    let dir = crashed.path();
    // 1. Mid-rollout of the first step: nothing saved yet; --resume starts fresh.
    let child = train(dir, Some("train::rollout=2*off->sleep(600000)"), false)
        .spawn()
        .unwrap();
    kill_when_parked(child, dir, "kill 1 (mid-rollout)");
    // 2. Mid-update, at the 4th optimizer step (the second of epoch 1; epoch_0 is saved by then).
    let child = train(dir, Some("train::update=3*off->sleep(600000)"), true)
        .spawn()
        .unwrap();
    kill_when_parked(child, dir, "kill 2 (mid-update)");
    // 3. Mid-checkpoint write of epoch 1: epoch_0 is complete, epoch_1 only half written.
    let child = train(dir, Some("train::checkpoint=sleep(600000)"), true)
        .spawn()
        .unwrap();
    kill_when_parked(child, dir, "kill 3 (mid-checkpoint)");
    let checkpoints = dir.join("checkpoints/crash");
    assert!(checkpoints.join("epoch_0/trainer_state.json").is_file());
    assert!(
        checkpoints
            .join(".epoch_1.partial/model.safetensors")
            .is_file(),
        "the third kill landed mid-write"
    );
    assert!(
        !checkpoints
            .join(".epoch_1.partial/trainer_state.json")
            .exists()
    );
    assert!(!checkpoints.join("epoch_1").exists());
    assert_eq!(
        arpo_trainer::train::latest_checkpoint(&checkpoints).map(|(n, _)| n),
        Some(0),
        "the half-written checkpoint is never picked up"
    );
    // 4. Resume to the end.
    run_to_end(train(dir, None, true), dir, "the resumed run");

    assert_eq!(metrics(dir), metrics(reference.path()));
    assert_eq!(metrics(dir)["steps"].as_array().map(Vec::len), Some(3));
    assert!(
        weights(dir, 2) == weights(reference.path(), 2),
        "the final weights differ from the uninterrupted run's"
    );
    // The jsonl log holds each step once.
    let lines = std::fs::read_to_string(dir.join("results/crash/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
}

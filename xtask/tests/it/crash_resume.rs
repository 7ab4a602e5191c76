//! Crash safety as a user meets it: a real `cargo xtask train` process killed with SIGKILL
//! mid-rollout, mid-update and mid-checkpoint write, each time restarted with `--resume`, ends
//! with the same final weights and metrics as a run that was never interrupted; the
//! half-written checkpoint of the third kill is never picked up.
//!
//! The kills land at named fault points of the training loop (`fail` crate, `FAILPOINTS`):
//! the point sleeps, the test sees the process stop using CPU there, and sends SIGKILL.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo xtask train` on a small embedded run writing under `out`.
fn train(out: &Path, fail_points: Option<&str>, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(workspace())
        .args([
            "train",
            "--quiet",
            "--config",
            "configs/embedded_default.yaml",
        ])
        .args(
            [
                "data.max_tasks=2",
                "data.rollout_batch_size=2",
                "worker.actor.global_batch_size=1", // 2 optimizer steps per training step
                "worker.rollout.n=4",
                "env.num_envs=4",
                "env.max_steps=3",
                "worker.rollout.limit_images=3",
                "trainer.total_episodes=3",
                "trainer.save_freq=1",
                "trainer.save_limit=-1",
                "trainer.logger=[console, jsonl]",
                "trainer.experiment_name=crash",
            ]
            .iter()
            .flat_map(|s| ["--set".to_string(), s.to_string()]),
        )
        .args([
            "--set",
            &format!(
                "trainer.save_checkpoint_path={}",
                out.join("checkpoints").display()
            ),
            "--set",
            &format!("trainer.results_path={}", out.join("results").display()),
            "--set",
            &format!("trainer.logs_path={}", out.join("logs").display()),
        ])
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("FAILPOINTS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        c.arg("--resume");
    }
    if let Some(f) = fail_points {
        c.env("FAILPOINTS", f);
    }
    c
}

/// User + system CPU ticks of a process.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the command name: 12 and 13 here (0-based 11, 12).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Waits until `child` sits still (no CPU for 1.5 s: asleep at its fault point), then kills it
/// with SIGKILL. Panics if it exits first or never stops.
fn kill_when_parked(mut child: Child, what: &str) {
    let pid = child.id();
    let started = Instant::now();
    let mut last = None;
    let mut still_since = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("{what}: the run exited ({status}) before reaching its fault point:\n{err}");
        }
        let now = cpu_ticks(pid);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{what}: never reached its fault point"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGKILL: nothing of the process runs after this (no destructors, no flushes).
    child.kill().unwrap();
    child.wait().unwrap();
}

fn run_to_end(mut c: Command, what: &str) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
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
        "the uninterrupted run",
    );

    let crashed = tempfile::tempdir().unwrap();
    let dir = crashed.path();
    // 1. Mid-rollout of the first step: nothing saved yet; --resume starts fresh.
    let child = train(dir, Some("train::rollout=2*off->sleep(600000)"), false)
        .spawn()
        .unwrap();
    kill_when_parked(child, "kill 1 (mid-rollout)");
    // 2. Mid-update, at the 4th optimizer step (the second of epoch 1; epoch_0 is saved by then).
    let child = train(dir, Some("train::update=3*off->sleep(600000)"), true)
        .spawn()
        .unwrap();
    kill_when_parked(child, "kill 2 (mid-update)");
    // 3. Mid-checkpoint write of epoch 1: epoch_0 is complete, epoch_1 only half written.
    let child = train(dir, Some("train::checkpoint=sleep(600000)"), true)
        .spawn()
        .unwrap();
    kill_when_parked(child, "kill 3 (mid-checkpoint)");
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
    run_to_end(train(dir, None, true), "the resumed run");

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

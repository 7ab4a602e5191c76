//! The tests of the cargo xtask binary, one test binary: each runs a real `cargo xtask train`.

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod crash_resume;
mod dashboard_live;
mod sweep;

/// One real training run at a time: the tests tell a run parked at its fault point by its CPU
/// time standing still, which a second run competing for the 2 cores could fake.
pub static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The overrides of a small embedded run: 2 tasks, groups of 4, 2 optimizer steps per step.
pub const SMALL_RUN: [&str; 7] = [
    "data.max_tasks=2",
    "data.rollout_batch_size=2",
    "worker.actor.global_batch_size=1", // 2 optimizer steps per training step
    "worker.rollout.n=4",
    "env.num_envs=4",
    "env.max_steps=3",
    "worker.rollout.limit_images=3",
];

/// `cargo xtask train` of a small embedded run (2 tasks, groups of 4, 2 optimizer steps per
/// step) named `experiment`, writing under `out`, with `sets` added (`KEY=VALUE`). Its stdout
/// is dropped, its stderr appended to `out/stderr.log` (a pipe nobody reads could fill and stall
/// the run), and no fault point is on.
pub fn small_train(out: &Path, experiment: &str, sets: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    let paths = [
        format!(
            "trainer.save_checkpoint_path={}",
            out.join("checkpoints").display()
        ),
        format!("trainer.results_path={}", out.join("results").display()),
        format!("trainer.logs_path={}", out.join("logs").display()),
        format!("trainer.experiment_name={experiment}"),
    ];
    c.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args([
            "train",
            "--quiet",
            "--config",
            "configs/embedded_default.yaml",
        ])
        .args(
            SMALL_RUN
                .iter()
                .chain(sets)
                .map(|s| s.to_string())
                .chain(paths)
                .flat_map(|s| ["--set".to_string(), s]),
        )
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("FAILPOINTS")
        .stdout(Stdio::null())
        .stderr(stderr_log(out));
    c
}

fn stderr_log(out: &Path) -> std::fs::File {
    std::fs::create_dir_all(out).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("stderr.log"))
        .unwrap()
}

/// What the runs under `out` wrote on stderr.
pub fn stderr_of(out: &Path) -> String {
    std::fs::read_to_string(out.join("stderr.log")).unwrap_or_default()
}

/// User + system CPU ticks of a process.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the command name: 12 and 13 here (0-based 11, 12).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Waits until `child` sits still (no CPU for 1.5 s: asleep at its fault point). Panics, with
/// the stderr of the runs under `out`, if it exits first, and if it never stops.
pub fn wait_until_parked(child: &mut Child, out: &Path, what: &str) {
    let pid = child.id();
    let started = Instant::now();
    let (mut last, mut still_since) = (None, Instant::now());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{what}: the run exited ({status}) before reaching its fault point:\n{}",
                stderr_of(out)
            );
        }
        let now = cpu_ticks(pid);
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if still_since.elapsed() > Duration::from_millis(1500) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{what}: never reached its fault point"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

//! The dashboard of a real `cargo xtask train --dashboard` run, read by a real browser while the
//! run is in the middle of training: headless Chromium's DOM must show the success-rate curve
//! with one point per finished step, and the agent's recorded screenshots.
//!
//! The run is held mid-update at a fault point (`FAILPOINTS`, see `crash_resume.rs`) so that
//! "finished steps" is a fixed number while the browser looks. Needs Debian's `chromium`
//! (`.ci/run` installs it and sets `ARPO_REQUIRE_CHROMIUM`); without it the test says so and
//! passes only when `ARPO_REQUIRE_CHROMIUM` is unset.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

#[test]
fn the_live_page_of_a_training_run_shows_its_finished_steps() {
    let _one = crate::ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let chromium = std::env::var("ARPO_CHROMIUM").unwrap_or_else(|_| "chromium".to_string());
    if Command::new(&chromium).arg("--version").output().is_err() {
        assert!(
            std::env::var_os("ARPO_REQUIRE_CHROMIUM").is_none(),
            "ARPO_REQUIRE_CHROMIUM is set but {chromium} does not run: apt-get install chromium"
        );
        eprintln!("skipped: no {chromium} (apt-get install chromium; .ci/run does)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.current_dir(workspace())
        .args(["train", "--quiet", "--dashboard", &addr])
        .args(
            [
                "data.max_tasks=2",
                "data.rollout_batch_size=2",
                "worker.actor.global_batch_size=1", // 2 optimizer steps per training step
                "worker.rollout.n=4",
                "env.num_envs=4",
                "env.max_steps=3",
                "worker.rollout.limit_images=3",
                "trainer.total_episodes=6",
                "trainer.experiment_name=live",
            ]
            .iter()
            .flat_map(|s| ["--set".to_string(), s.to_string()]),
        )
        .args([
            "--set",
            &format!(
                "trainer.save_checkpoint_path={}",
                out.path().join("ck").display()
            ),
            "--set",
            &format!(
                "trainer.results_path={}",
                out.path().join("results").display()
            ),
            "--set",
            &format!("trainer.logs_path={}", out.path().join("logs").display()),
        ])
        .env("RAYON_NUM_THREADS", "1")
        // Held at the 8th optimizer step: the second update of step 3, steps 0-2 finished.
        .env("FAILPOINTS", "train::update=7*off->sleep(600000)")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let started = Instant::now();
    let (mut last, mut still_since) = (None, Instant::now());
    loop {
        assert!(child.try_wait().unwrap().is_none(), "the run exited early");
        let now = cpu_ticks(pid);
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if still_since.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "never held");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results/live/training_metrics.json")).unwrap(),
    )
    .unwrap();
    let finished = metrics["steps"].as_array().unwrap().len();
    assert_eq!(finished, 3);
    let profile = tempfile::tempdir().unwrap();
    let page = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("http://{addr}/"))
        .output()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let dom = String::from_utf8_lossy(&page.stdout);
    assert!(
        dom.contains(&format!(
            r#"data-metric="success_rate" data-points="{finished}""#
        )),
        "no success-rate curve of {finished} points in:\n{dom}"
    );
    assert!(
        dom.contains(r#"src="/episodes/"#),
        "no recorded screenshot in:\n{dom}"
    );
}

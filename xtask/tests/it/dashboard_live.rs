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

use std::process::Command;

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
    let mut cmd = crate::small_train(out.path(), "live", &["trainer.total_episodes=6"]);
    cmd.args(["--dashboard", &addr])
        // Held at the 8th optimizer step: the second update of step 3, steps 0-2 finished.
        .env("FAILPOINTS", "train::update=7*off->sleep(600000)");
    let mut child = cmd.spawn().unwrap();
    crate::wait_until_parked(&mut child, out.path(), "the dashboard run");
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

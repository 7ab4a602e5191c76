//! The VMware provider end to end: the fake vmrun drives the VM lifecycle, the scripted guest
//! server answers on the IP it reports; reset retries, pause between steps, the VM pool.

#![cfg(unix)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{FakeGuest, Script, fake_vmrun, vmrun_calls};
use arpo_core::{Action, Environment, Point};
use arpo_env_vmware::{
    EnvConfig, GuestConfig, OsworldEnv, OsworldTask, VmwareProvider, vmware_pool,
};
use serde_json::json;

fn config(cache: &Path, pause: bool) -> EnvConfig {
    EnvConfig {
        guest: GuestConfig {
            request_timeout: Duration::from_secs(2),
            execute_timeout: Duration::from_secs(2),
            open_timeout: Duration::from_secs(2),
            attempts: 2,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        },
        cache_dir: cache.to_path_buf(),
        step_pause: Duration::ZERO,
        wait_pause: Duration::ZERO,
        reset_attempts: 2,
        ready_timeout: Duration::from_secs(2),
        ready_poll: Duration::from_millis(20),
        pause_between_steps: pause,
        download_timeout: Duration::from_secs(1),
        ..EnvConfig::default()
    }
}

fn task() -> arpo_core::Task {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/osworld/examples/os/b3d4a89c-53f2-4d6b-8b6a-541fb5d205fa.json");
    OsworldTask::load(&path).expect("task").to_task(Some("os"))
}

#[tokio::test]
async fn reset_retries_a_missing_ip_and_pauses_the_vm_between_steps() {
    let guest = FakeGuest::start(Arc::new(Mutex::new(Script::default())));
    let dir = tempfile::tempdir().expect("tmp");
    let vmx = dir.path().join("Ubuntu0.vmx");
    std::fs::write(&vmx, "").expect("vmx");
    std::fs::write(
        dir.path().join("state.json"),
        json!({"ip": "127.0.0.1"}).to_string(),
    )
    .expect("state");
    // The first getGuestIPAddress prints VMware's error with exit 0; the reset tries again.
    std::fs::write(
        dir.path().join("script.json"),
        json!({"getGuestIPAddress": [{"stdout": "Error: Unable to get the IP address\n", "exit": 0}]}).to_string(),
    )
    .expect("script");
    let mut provider = VmwareProvider::new(fake_vmrun(dir.path(), Duration::from_secs(20)), vmx);
    provider.guest_port = guest.addr.port();
    let cache = tempfile::tempdir().expect("cache");
    let mut env = OsworldEnv::new(Box::new(provider), config(cache.path(), true));

    env.reset(&task()).await.expect("reset");
    env.step(&Action::Click {
        point: Point::new(3.0, 4.0),
    })
    .await
    .expect("step");
    env.step(&Action::CallUser).await.expect("call_user");
    assert_eq!(
        env.evaluate(Some(&Action::CallUser)).await.expect("eval"),
        1.0
    );

    assert_eq!(
        vmrun_calls(dir.path()),
        [
            // attempt 1: the IP never came
            "revertToSnapshot",
            "list",
            "start",
            "list",
            "getGuestIPAddress",
            // attempt 2 (the VM runs already: no second start)
            "revertToSnapshot",
            "list",
            "start",
            "list",
            "getGuestIPAddress",
            // paused after reset, unpaused for the click, paused while the model thinks,
            // unpaused for call_user (which ends the episode: no pause after it)
            "pause",
            "unpause",
            "pause",
            "unpause",
        ]
    );
}

#[tokio::test]
async fn a_pool_gives_one_env_per_vm_with_its_own_cache() {
    let dir = tempfile::tempdir().expect("tmp");
    let vmrun = fake_vmrun(dir.path(), Duration::from_secs(5));
    let vmxs = [dir.path().join("a.vmx"), dir.path().join("b.vmx")];
    let config = config(dir.path(), false);
    let envs = vmware_pool(&vmrun, &vmxs, &config);
    let described: Vec<String> = envs.iter().map(OsworldEnv::describe).collect();
    assert_eq!(
        [config.for_env(0).cache_dir, config.for_env(1).cache_dir],
        [dir.path().join("env0"), dir.path().join("env1")]
    );
    assert_eq!(
        described,
        [
            format!("vmware {}", vmxs[0].display()),
            format!("vmware {}", vmxs[1].display()),
        ]
    );
}

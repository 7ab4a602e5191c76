//! The vmrun driver against `fixtures/fake-vmrun/vmrun`: command lines, timeouts, error messages.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arpo_env_vmware::{HostType, Vmrun, VmrunConfig, VmrunFailure, VmwareError};

struct Fake {
    dir: tempfile::TempDir,
    vmx: PathBuf,
}

fn fake_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fake-vmrun/vmrun")
}

impl Fake {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmx = dir.path().join("Ubuntu0.vmx");
        std::fs::write(&vmx, "config.version = \"8\"\n").expect("write vmx");
        Self { dir, vmx }
    }

    fn script(&self, json: serde_json::Value) {
        std::fs::write(self.dir.path().join("script.json"), json.to_string()).expect("script");
    }

    fn vmrun(&self, host: HostType, timeout: Duration) -> Vmrun {
        // The fake reads its state folder from the environment: set it per call through a
        // wrapper so that parallel tests do not share one variable.
        let wrapper = self.dir.path().join("vmrun-wrapper.sh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nFAKE_VMRUN_DIR='{}' exec python3 '{}' \"$@\"\n",
                self.dir.path().display(),
                fake_binary().display()
            ),
        )
        .expect("wrapper");
        make_executable(&wrapper);
        Vmrun::new(VmrunConfig {
            binary: wrapper,
            host_type: host,
            headless: true,
            timeout,
            ip_timeout: timeout,
        })
    }

    fn calls(&self) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(self.dir.path().join("calls.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("call line"))
            .collect()
    }
}

#[cfg(unix)]
fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn start_revert_ip_use_the_documented_command_lines() {
    let fake = Fake::new();
    let vmrun = fake.vmrun(HostType::Workstation, Duration::from_secs(20));
    let vmx = fake.vmx.to_str().expect("utf8 path");

    vmrun
        .revert_to_snapshot(&fake.vmx, "init_state")
        .await
        .expect("revert");
    vmrun.ensure_running(&fake.vmx).await.expect("start");
    let ip = vmrun.guest_ip(&fake.vmx).await.expect("ip");
    assert_eq!(ip.to_string(), "192.168.56.101");
    vmrun.pause(&fake.vmx).await.expect("pause");
    vmrun.unpause(&fake.vmx).await.expect("unpause");
    vmrun.snapshot(&fake.vmx, "mine").await.expect("snapshot");
    assert_eq!(
        vmrun.list_snapshots(&fake.vmx).await.expect("snapshots"),
        vec!["init_state".to_string(), "mine".to_string()]
    );
    vmrun.stop(&fake.vmx, false).await.expect("stop");

    assert_eq!(
        fake.calls(),
        vec![
            args(&["-T", "ws", "revertToSnapshot", vmx, "init_state"]),
            args(&["-T", "ws", "list"]),
            args(&["-T", "ws", "start", vmx, "nogui"]),
            args(&["-T", "ws", "list"]),
            args(&["-T", "ws", "getGuestIPAddress", vmx, "-wait"]),
            args(&["-T", "ws", "pause", vmx]),
            args(&["-T", "ws", "unpause", vmx]),
            args(&["-T", "ws", "snapshot", vmx, "mine"]),
            args(&["-T", "ws", "listSnapshots", vmx]),
            args(&["-T", "ws", "stop", vmx, "soft"]),
        ]
    );
}

#[tokio::test]
async fn a_running_vm_is_not_started_again_and_fusion_uses_t_fusion() {
    let fake = Fake::new();
    let vmrun = fake.vmrun(HostType::Fusion, Duration::from_secs(20));
    vmrun.start(&fake.vmx).await.expect("start");
    vmrun.ensure_running(&fake.vmx).await.expect("ensure");
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1], args(&["-T", "fusion", "list"]));
}

#[tokio::test]
async fn ip_error_printed_with_exit_zero_is_an_error() {
    let fake = Fake::new();
    fake.script(serde_json::json!({
        "getGuestIPAddress": [{"stdout": "Error: Unable to get the IP address\n", "exit": 0}]
    }));
    let vmrun = fake.vmrun(HostType::Workstation, Duration::from_secs(20));
    let err = vmrun.guest_ip(&fake.vmx).await.expect_err("must fail");
    match &err {
        VmwareError::VmrunFailed {
            failure, exit_code, ..
        } => {
            assert_eq!(*failure, VmrunFailure::IpUnavailable);
            assert_eq!(*exit_code, Some(0));
        }
        other => panic!("wrong error {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("Unable to get the IP address"), "{text}");
    assert!(text.contains("VMware Tools"), "{text}");
    assert!(text.contains("Ubuntu0.vmx"), "{text}");
}

#[tokio::test]
async fn ip_output_that_is_not_an_ip_is_rejected() {
    let fake = Fake::new();
    fake.script(serde_json::json!({
        "getGuestIPAddress": [{"stdout": "unknown\n"}, {"stdout": "fe80::1\n"}]
    }));
    let vmrun = fake.vmrun(HostType::Workstation, Duration::from_secs(20));
    let err = vmrun.guest_ip(&fake.vmx).await.expect_err("not an ip");
    assert!(
        matches!(&err, VmwareError::InvalidIp { output, .. } if output == "unknown"),
        "{err:?}"
    );
    // IPv6 is an IP.
    let ip = vmrun.guest_ip(&fake.vmx).await.expect("ipv6");
    assert_eq!(ip.to_string(), "fe80::1");
}

#[tokio::test]
async fn a_hanging_vmrun_is_killed_at_the_timeout() {
    let fake = Fake::new();
    fake.script(serde_json::json!({"getGuestIPAddress": [{"hang": 30}]}));
    let vmrun = fake.vmrun(HostType::Workstation, Duration::from_millis(1500));
    let started = Instant::now();
    let err = vmrun.guest_ip(&fake.vmx).await.expect_err("timeout");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    match &err {
        VmwareError::VmrunTimeout {
            command, seconds, ..
        } => {
            assert_eq!(command, "getGuestIPAddress");
            assert_eq!(*seconds, 1.5);
        }
        other => panic!("wrong error {other:?}"),
    }
    assert!(err.to_string().contains("VMware Tools"), "{err}");
}

#[tokio::test]
async fn player_without_snapshots_says_to_use_pro() {
    let fake = Fake::new();
    fake.script(serde_json::json!({"revertToSnapshot": [{
        "stdout": "Error: The operation is not supported for the specified parameters\n",
        "exit": 255
    }]}));
    let vmrun = fake.vmrun(HostType::Player, Duration::from_secs(20));
    let err = vmrun
        .revert_to_snapshot(&fake.vmx, "init_state")
        .await
        .expect_err("player");
    let text = err.to_string();
    assert!(text.contains("Workstation Pro or Fusion Pro"), "{text}");
    assert_eq!(
        fake.calls()[0][..3],
        args(&["-T", "player", "revertToSnapshot"])[..]
    );
}

#[tokio::test]
async fn missing_snapshot_missing_vm_and_not_powered_on_are_typed() {
    let fake = Fake::new();
    let vmrun = fake.vmrun(HostType::Workstation, Duration::from_secs(20));
    let kind = |e: VmwareError| match e {
        VmwareError::VmrunFailed { failure, .. } => failure,
        other => panic!("wrong error {other:?}"),
    };
    let err = vmrun
        .revert_to_snapshot(&fake.vmx, "nope")
        .await
        .expect_err("no snapshot");
    assert!(
        err.to_string().contains("vmrun snapshot <vmx> init_state"),
        "{err}"
    );
    assert_eq!(kind(err), VmrunFailure::SnapshotNotFound);
    let missing = fake.dir.path().join("missing.vmx");
    assert_eq!(
        kind(vmrun.start(&missing).await.expect_err("missing vm")),
        VmrunFailure::VmNotFound
    );
    assert_eq!(
        kind(vmrun.guest_ip(&fake.vmx).await.expect_err("off")),
        VmrunFailure::NotPoweredOn
    );
    assert_eq!(
        kind(vmrun.pause(&fake.vmx).await.expect_err("off")),
        VmrunFailure::NotPoweredOn
    );
}

#[tokio::test]
async fn a_missing_binary_says_what_to_install() {
    let vmrun = Vmrun::new(VmrunConfig {
        binary: PathBuf::from("/nonexistent/vmrun"),
        host_type: HostType::Workstation,
        headless: true,
        timeout: Duration::from_secs(5),
        ip_timeout: Duration::from_secs(5),
    });
    let err = vmrun.list().await.expect_err("no binary");
    assert!(matches!(err, VmwareError::VmrunNotFound { .. }));
    assert!(
        err.to_string().contains("Workstation Pro / Fusion Pro"),
        "{err}"
    );
}

#[tokio::test]
async fn start_that_leaves_the_vm_stopped_is_an_error() {
    let fake = Fake::new();
    // `start` "succeeds" but does nothing: the VM never shows up in `list`.
    fake.script(serde_json::json!({"start": [{"stdout": ""}]}));
    let vmrun = fake.vmrun(HostType::Workstation, Duration::from_secs(20));
    let err = vmrun
        .ensure_running(&fake.vmx)
        .await
        .expect_err("not running");
    assert!(err.to_string().contains("not in `vmrun list`"), "{err}");
}

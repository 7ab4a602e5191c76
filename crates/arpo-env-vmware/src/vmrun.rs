//! The `vmrun` driver: VMware's command line, with a timeout on every call and typed errors.
//!
//! `vmrun` reports most failures as a line `Error: ...` on stdout, sometimes with exit status 0
//! (`getGuestIPAddress` does this when the guest has no IP yet), and it can hang. Every call here
//! runs under a timeout (the process is killed when it expires), any `Error:` output is an error
//! whatever the exit status, and the known messages become a [`VmrunFailure`] that says what to
//! check.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::VmwareError;

/// The VMware product `vmrun -T` talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostType {
    /// VMware Fusion (macOS): `-T fusion`.
    Fusion,
    /// VMware Workstation (Linux, Windows): `-T ws`.
    Workstation,
    /// VMware Workstation Player: `-T player` (no snapshots).
    Player,
}

impl HostType {
    /// `fusion` on macOS, `ws` elsewhere.
    pub fn for_this_os() -> Self {
        if cfg!(target_os = "macos") {
            Self::Fusion
        } else {
            Self::Workstation
        }
    }

    /// The word after `-T`.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Fusion => "fusion",
            Self::Workstation => "ws",
            Self::Player => "player",
        }
    }

    /// Parses `fusion`, `ws` (or `workstation`), `player`.
    pub fn parse(word: &str) -> Option<Self> {
        match word.trim().to_ascii_lowercase().as_str() {
            "fusion" => Some(Self::Fusion),
            "ws" | "workstation" => Some(Self::Workstation),
            "player" => Some(Self::Player),
            _ => None,
        }
    }
}

/// What a failed `vmrun` call reported, classified from its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmrunFailure {
    /// `Error: Unable to get the IP address`.
    IpUnavailable,
    /// `Error: The virtual machine is not powered on`.
    NotPoweredOn,
    /// `Error: The operation is not supported`: snapshots on VMware Player, or a wrong `-T`.
    NotSupported,
    /// `Error: A snapshot with the name does not exist`.
    SnapshotNotFound,
    /// `Error: Cannot open VM: ...` / `The virtual machine cannot be found` / `file not found`.
    VmNotFound,
    /// `Error: The virtual machine is in use` / locked by another process.
    VmInUse,
    /// `Error: The VMware Tools are not running in the virtual machine`.
    ToolsNotRunning,
    /// `Error: Cannot connect to the host` / the VMware services are not running.
    HostUnreachable,
    /// Any other `Error:` output or non-zero exit.
    Other,
}

impl VmrunFailure {
    /// Classifies vmrun's output (case-insensitive).
    pub fn classify(output: &str) -> Self {
        let text = output.to_ascii_lowercase();
        let has = |needle: &str| text.contains(needle);
        if has("unable to get the ip address") {
            Self::IpUnavailable
        } else if has("not powered on") {
            Self::NotPoweredOn
        } else if has("snapshot") && (has("does not exist") || has("not found")) {
            Self::SnapshotNotFound
        } else if has("not supported") {
            Self::NotSupported
        } else if has("tools are not running") || has("tools is not running") {
            Self::ToolsNotRunning
        } else if has("cannot be found")
            || has("cannot open vm")
            || has("file not found")
            || has("does not exist")
        {
            Self::VmNotFound
        } else if has("in use") || has("locked") {
            Self::VmInUse
        } else if has("cannot connect to the host") || has("unable to connect to host") {
            Self::HostUnreachable
        } else {
            Self::Other
        }
    }

    /// What the user should check.
    pub fn hint(self) -> &'static str {
        match self {
            Self::IpUnavailable => {
                "is VMware Tools (open-vm-tools) running in the guest? the VM may still be booting; retry, or check the guest's network adapter (NAT)"
            }
            Self::NotPoweredOn => "the VM is not running: start it first (vmrun start)",
            Self::NotSupported => {
                "VMware Workstation Player and the free editions have no snapshots: use VMware Workstation Pro or Fusion Pro (and -T ws / -T fusion, not -T player)"
            }
            Self::SnapshotNotFound => {
                "create the snapshot first (vmrun snapshot <vmx> init_state, with the VM at its clean state), or set the snapshot name the task expects"
            }
            Self::VmNotFound => "check the .vmx path: it must be an existing VMware VM file",
            Self::VmInUse => {
                "the VM is locked by another VMware process or window: close it there, or remove stale .lck folders next to the .vmx when no VMware runs"
            }
            Self::ToolsNotRunning => "install or start VMware Tools (open-vm-tools) in the guest",
            Self::HostUnreachable => {
                "the VMware services are not running: start VMware Workstation/Fusion once, or restart its services"
            }
            Self::Other => "run the same vmrun command by hand to see VMware's full message",
        }
    }
}

/// How to run `vmrun`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmrunConfig {
    /// The `vmrun` binary.
    pub binary: PathBuf,
    pub host_type: HostType,
    /// Start VMs with `nogui`.
    pub headless: bool,
    /// The limit of each call but `getGuestIPAddress`.
    pub timeout: Duration,
    /// The limit of `getGuestIPAddress -wait`.
    pub ip_timeout: Duration,
}

impl Default for VmrunConfig {
    fn default() -> Self {
        Self {
            binary: find_vmrun(),
            host_type: HostType::for_this_os(),
            headless: true,
            timeout: Duration::from_secs(120),
            ip_timeout: Duration::from_secs(300),
        }
    }
}

/// The `vmrun` to use: `$VMRUN`, else `vmrun` on the `PATH`, else VMware's default install path,
/// else plain `vmrun` (which then fails with [`VmwareError::VmrunNotFound`]).
pub fn find_vmrun() -> PathBuf {
    if let Some(path) = std::env::var_os("VMRUN").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let exe = if cfg!(windows) { "vmrun.exe" } else { "vmrun" };
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(exe);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let defaults: &[&str] = if cfg!(target_os = "macos") {
        &["/Applications/VMware Fusion.app/Contents/Library/vmrun"]
    } else if cfg!(windows) {
        &[
            r"C:\Program Files (x86)\VMware\VMware Workstation\vmrun.exe",
            r"C:\Program Files\VMware\VMware Workstation\vmrun.exe",
        ]
    } else {
        &["/usr/bin/vmrun", "/usr/local/bin/vmrun"]
    };
    defaults
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(exe))
}

/// The `vmrun` driver.
#[derive(Debug, Clone)]
pub struct Vmrun {
    config: VmrunConfig,
}

impl Vmrun {
    pub fn new(config: VmrunConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &VmrunConfig {
        &self.config
    }

    /// Runs `vmrun -T <host> <args...>` under `timeout`; returns stdout when it succeeded.
    async fn run(
        &self,
        command: &str,
        vmx: Option<&Path>,
        rest: &[&str],
        timeout: Duration,
        timeout_hint: &str,
    ) -> Result<String, VmwareError> {
        let vmx_text = vmx.map(|p| p.display().to_string()).unwrap_or_default();
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.arg("-T")
            .arg(self.config.host_type.as_arg())
            .arg(command);
        if let Some(vmx) = vmx {
            cmd.arg(vmx);
        }
        cmd.args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        tracing::debug!(binary = %self.config.binary.display(), command, vmx = %vmx_text, ?rest, "vmrun");
        let child = cmd.spawn().map_err(|e| VmwareError::VmrunNotFound {
            path: self.config.binary.clone(),
            reason: e.to_string(),
        })?;
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                return Err(VmwareError::VmrunNotFound {
                    path: self.config.binary.clone(),
                    reason: e.to_string(),
                });
            }
            // Dropping the future drops the child, which kills it (kill_on_drop).
            Err(_) => {
                return Err(VmwareError::VmrunTimeout {
                    command: command.to_owned(),
                    vmx: vmx_text,
                    seconds: timeout.as_secs_f64(),
                    hint: timeout_hint.to_owned(),
                });
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let error_line = stdout
            .lines()
            .chain(stderr.lines())
            .find(|l| l.trim_start().starts_with("Error"));
        if !output.status.success() || error_line.is_some() {
            let message = match error_line {
                Some(line) => line.trim().to_owned(),
                None => format!("{}{}", stdout.trim(), stderr.trim()),
            };
            return Err(VmwareError::VmrunFailed {
                command: command.to_owned(),
                vmx: vmx_text,
                failure: VmrunFailure::classify(&message),
                exit_code: output.status.code(),
                output: message,
            });
        }
        Ok(stdout)
    }

    fn generic_hint(&self) -> &'static str {
        "VMware may be hung or waiting for an answer in a dialog: open the VMware window, or run the same vmrun command by hand"
    }

    /// `vmrun list`: the .vmx paths of the running VMs.
    pub async fn list(&self) -> Result<Vec<PathBuf>, VmwareError> {
        let out = self
            .run("list", None, &[], self.config.timeout, self.generic_hint())
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("Total running VMs"))
            .map(PathBuf::from)
            .collect())
    }

    /// Whether `vmx` is among the running VMs.
    pub async fn is_running(&self, vmx: &Path) -> Result<bool, VmwareError> {
        let running = self.list().await?;
        let wanted = std::fs::canonicalize(vmx).unwrap_or_else(|_| vmx.to_path_buf());
        Ok(running.iter().any(|p| {
            p == vmx || p == &wanted || std::fs::canonicalize(p).is_ok_and(|c| c == wanted)
        }))
    }

    /// `vmrun start <vmx> nogui|gui`.
    pub async fn start(&self, vmx: &Path) -> Result<(), VmwareError> {
        let mode = if self.config.headless { "nogui" } else { "gui" };
        self.run(
            "start",
            Some(vmx),
            &[mode],
            self.config.timeout,
            "VMware may be waiting for an answer in a dialog (\"I copied it\" / \"I moved it\"): start once without headless to answer it",
        )
        .await
        .map(drop)
    }

    /// Starts the VM unless it already runs (`list` first, as OSWorld does), then checks it runs.
    pub async fn ensure_running(&self, vmx: &Path) -> Result<(), VmwareError> {
        if self.is_running(vmx).await? {
            return Ok(());
        }
        self.start(vmx).await?;
        if self.is_running(vmx).await? {
            Ok(())
        } else {
            Err(VmwareError::VmrunFailed {
                command: "start".to_owned(),
                vmx: vmx.display().to_string(),
                failure: VmrunFailure::Other,
                exit_code: Some(0),
                output: "vmrun start succeeded but the VM is not in `vmrun list`".to_owned(),
            })
        }
    }

    /// `vmrun stop <vmx> soft|hard`.
    pub async fn stop(&self, vmx: &Path, hard: bool) -> Result<(), VmwareError> {
        let mode = if hard { "hard" } else { "soft" };
        self.run(
            "stop",
            Some(vmx),
            &[mode],
            self.config.timeout,
            self.generic_hint(),
        )
        .await
        .map(drop)
    }

    /// `vmrun revertToSnapshot <vmx> <name>`.
    pub async fn revert_to_snapshot(&self, vmx: &Path, name: &str) -> Result<(), VmwareError> {
        self.run(
            "revertToSnapshot",
            Some(vmx),
            &[name],
            self.config.timeout,
            self.generic_hint(),
        )
        .await
        .map(drop)
    }

    /// `vmrun snapshot <vmx> <name>`.
    pub async fn snapshot(&self, vmx: &Path, name: &str) -> Result<(), VmwareError> {
        self.run(
            "snapshot",
            Some(vmx),
            &[name],
            self.config.timeout,
            self.generic_hint(),
        )
        .await
        .map(drop)
    }

    /// `vmrun listSnapshots <vmx>`: the snapshot names.
    pub async fn list_snapshots(&self, vmx: &Path) -> Result<Vec<String>, VmwareError> {
        let out = self
            .run(
                "listSnapshots",
                Some(vmx),
                &[],
                self.config.timeout,
                self.generic_hint(),
            )
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("Total snapshots"))
            .map(str::to_owned)
            .collect())
    }

    /// `vmrun getGuestIPAddress <vmx> -wait`, bounded by the IP timeout, validated as an IP.
    pub async fn guest_ip(&self, vmx: &Path) -> Result<IpAddr, VmwareError> {
        let out = self
            .run(
                "getGuestIPAddress",
                Some(vmx),
                &["-wait"],
                self.config.ip_timeout,
                VmrunFailure::IpUnavailable.hint(),
            )
            .await?;
        let text = out.trim();
        text.parse::<IpAddr>().map_err(|_| VmwareError::InvalidIp {
            vmx: vmx.display().to_string(),
            output: text.to_owned(),
        })
    }

    /// `vmrun pause <vmx>`.
    pub async fn pause(&self, vmx: &Path) -> Result<(), VmwareError> {
        self.run(
            "pause",
            Some(vmx),
            &[],
            self.config.timeout,
            self.generic_hint(),
        )
        .await
        .map(drop)
    }

    /// `vmrun unpause <vmx>`.
    pub async fn unpause(&self, vmx: &Path) -> Result<(), VmwareError> {
        self.run(
            "unpause",
            Some(vmx),
            &[],
            self.config.timeout,
            self.generic_hint(),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_vmwares_messages() {
        // Messages as vmrun prints them (OSWorld issues #22, #42, #65, #151 and VMware's docs).
        let cases = [
            (
                "Error: Unable to get the IP address",
                VmrunFailure::IpUnavailable,
            ),
            (
                "Error: The virtual machine is not powered on: /vms/u.vmx",
                VmrunFailure::NotPoweredOn,
            ),
            (
                "Error: The operation is not supported for the specified parameters",
                VmrunFailure::NotSupported,
            ),
            (
                "Error: A snapshot with the name does not exist",
                VmrunFailure::SnapshotNotFound,
            ),
            (
                "Error: Cannot open VM: /vms/u.vmx, The virtual machine cannot be found",
                VmrunFailure::VmNotFound,
            ),
            (
                "Error: The virtual machine is in use by another process",
                VmrunFailure::VmInUse,
            ),
            (
                "Error: The VMware Tools are not running in the virtual machine: /vms/u.vmx",
                VmrunFailure::ToolsNotRunning,
            ),
            ("Error: Unknown error", VmrunFailure::Other),
        ];
        for (text, want) in cases {
            assert_eq!(VmrunFailure::classify(text), want, "{text}");
        }
    }

    #[test]
    fn host_type_words() {
        assert_eq!(HostType::parse("WS"), Some(HostType::Workstation));
        assert_eq!(HostType::parse("fusion"), Some(HostType::Fusion));
        assert_eq!(HostType::Player.as_arg(), "player");
        assert_eq!(HostType::parse("esx"), None);
    }
}

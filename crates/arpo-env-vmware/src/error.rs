//! The crate's one error type.

use std::path::PathBuf;

use arpo_core::EnvError;

use crate::vmrun::VmrunFailure;

/// Everything that can go wrong driving VMware, the guest server, a task or an evaluator.
#[derive(Debug, thiserror::Error)]
pub enum VmwareError {
    /// The `vmrun` binary could not be started.
    #[error(
        "cannot run vmrun at {path}: {reason}: install VMware Workstation Pro / Fusion Pro, or pass the vmrun path (--vmrun or VMRUN)"
    )]
    VmrunNotFound { path: PathBuf, reason: String },
    /// `vmrun` did not finish in time; it was killed.
    #[error("vmrun {command} for {vmx} did not finish within {seconds} s and was killed: {hint}")]
    VmrunTimeout {
        command: String,
        vmx: String,
        seconds: f64,
        hint: String,
    },
    /// `vmrun` reported an error (on stdout with exit 0, or with a non-zero exit status).
    #[error("vmrun {command} for {vmx} failed (exit {exit_code:?}): {output:?}: {hint}", hint = failure.hint())]
    VmrunFailed {
        command: String,
        vmx: String,
        failure: VmrunFailure,
        exit_code: Option<i32>,
        output: String,
    },
    /// `getGuestIPAddress` printed something that is not an IP address.
    #[error(
        "vmrun getGuestIPAddress returned {output:?} for {vmx}, which is not an IP address: is VMware Tools (open-vm-tools) running in the guest?"
    )]
    InvalidIp { vmx: String, output: String },
    /// The guest server could not be reached, after retries.
    #[error(
        "guest server at {url} unreachable during {operation} after {attempts} attempts: {reason}: is the VM running and its server (port 5000) up?"
    )]
    GuestUnreachable {
        url: String,
        operation: String,
        attempts: u32,
        reason: String,
    },
    /// The guest server did not answer in time.
    #[error("guest server at {url} did not answer {operation} within {seconds} s: {hint}")]
    GuestTimeout {
        url: String,
        operation: String,
        seconds: f64,
        hint: String,
    },
    /// The guest server answered with an error status.
    #[error("guest server at {url} answered {operation} with HTTP {status}: {body:?}")]
    GuestStatus {
        url: String,
        operation: String,
        status: u16,
        body: String,
    },
    /// The guest server answered something we cannot read.
    #[error("guest server at {url} answered {operation} with an unreadable body: {reason}")]
    GuestProtocol {
        url: String,
        operation: String,
        reason: String,
    },
    /// `/screenshot` did not return a PNG or JPEG image.
    #[error("screenshot from {url} is not a PNG or JPEG image: {reason}")]
    BadScreenshot { url: String, reason: String },
    /// A task file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// A task or index file is not what OSWorld writes.
    #[error("invalid OSWorld task {what}: {reason}")]
    InvalidTask { what: String, reason: String },
    /// A field of a task file that we use is missing or malformed.
    #[error("invalid OSWorld task {file}: field {field}: {reason}")]
    TaskField {
        file: String,
        field: String,
        reason: String,
    },
    /// An `upload_file` step names a host path outside the examples folder and the env's cache.
    #[error(
        "task {task_id}: upload_file local_path {path:?} is refused: {reason}: a task may upload only files under the examples folder or the environment's cache folder"
    )]
    UnsafeUpload {
        task_id: String,
        path: String,
        reason: String,
    },
    /// A download went past the configured size cap.
    #[error(
        "download of {url} is larger than the cap of {limit} bytes ({seen} bytes seen): raise max_download_bytes in the environment's settings, or pre-fill the cache at {cache}"
    )]
    DownloadTooLarge {
        url: String,
        limit: u64,
        seen: u64,
        cache: PathBuf,
    },
    /// OSWorld's evaluator worker cannot start or cannot import `desktop_env`.
    #[error(
        "the OSWorld evaluator worker ({python}) is not usable: {reason}: install it with `{install}`"
    )]
    WorkerUnavailable {
        python: String,
        reason: String,
        install: String,
    },
    /// The worker did not answer in time; it was killed.
    #[error(
        "the OSWorld evaluator worker did not answer {op} within {seconds} s: it was killed and is restarted at the next request; raise the worker timeout if the evaluator is slow"
    )]
    WorkerTimeout { op: String, seconds: f64 },
    /// The worker answered with an error, or died.
    #[error(
        "the OSWorld evaluator worker failed {op}: {reason} (its stderr is in the log, target osworld_worker)"
    )]
    WorkerFailed { op: String, reason: String },
    /// The task needs setup steps, getters or metrics this crate does not implement.
    #[error("task {task_id} needs what is not supported yet: {}", missing.join(", "))]
    Unsupported {
        task_id: String,
        missing: Vec<String>,
    },
    /// A setup step failed.
    #[error("setup step {step} failed: {reason}")]
    Setup { step: String, reason: String },
    /// A host-side download failed.
    #[error(
        "download of {url} failed: {reason}: check the network of the host, or pre-fill the cache at {cache}"
    )]
    Download {
        url: String,
        cache: PathBuf,
        reason: String,
    },
    /// An evaluator could not be computed.
    #[error("evaluator {metric} failed: {reason}")]
    Evaluation { metric: String, reason: String },
    /// A local file operation failed.
    #[error("{operation} {path}: {reason}")]
    Io {
        operation: String,
        path: PathBuf,
        reason: String,
    },
}

impl VmwareError {
    pub(crate) fn io(operation: &str, path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Self::Io {
            operation: operation.to_owned(),
            path: path.into(),
            reason: err.to_string(),
        }
    }

    /// The `EnvError` a rollout engine sees, with `operation` naming what the environment was doing.
    pub fn into_env_error(self, operation: &str) -> EnvError {
        match self {
            Self::Unsupported { task_id, missing } => EnvError::Unsupported {
                task_id,
                reason: format!("needs {}", missing.join(", ")),
            },
            Self::InvalidTask { what, reason } => EnvError::Unsupported {
                task_id: what,
                reason,
            },
            Self::VmrunTimeout {
                command,
                seconds,
                hint,
                ..
            } => EnvError::Timeout {
                operation: format!("{operation}: vmrun {command}"),
                seconds,
                hint,
            },
            Self::GuestTimeout {
                operation: op,
                seconds,
                hint,
                ..
            } => EnvError::Timeout {
                operation: format!("{operation}: {op}"),
                seconds,
                hint,
            },
            Self::WorkerTimeout { op, seconds } => EnvError::Timeout {
                operation: format!("{operation}: OSWorld evaluator worker {op}"),
                seconds,
                hint: "the worker was killed and restarts at the next request".into(),
            },
            Self::TaskField { ref file, .. }
            | Self::UnsafeUpload {
                task_id: ref file, ..
            } => EnvError::Unsupported {
                task_id: file.clone(),
                reason: self.to_string(),
            },
            Self::Evaluation { .. } | Self::WorkerFailed { .. } => {
                EnvError::Evaluation(self.to_string())
            }
            other => EnvError::Unavailable {
                operation: operation.to_owned(),
                reason: other.to_string(),
            },
        }
    }
}

//! The trainer's error type.

use std::path::PathBuf;

/// A boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can stop a training or evaluation run.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The config text is not YAML.
    #[error("config is not valid YAML: {reason}")]
    ConfigSyntax { reason: String },
    /// A key is unknown or its value has the wrong type.
    #[error("config key `{path}`: {reason} (see configs/embedded_default.yaml for every key)")]
    ConfigKey { path: String, reason: String },
    /// A `--set` override could not be applied.
    #[error("--set {spec}: {reason}")]
    ConfigOverride { spec: String, reason: String },
    /// Values out of range.
    #[error("invalid config:\n  - {}", problems.join("\n  - "))]
    ConfigInvalid { problems: Vec<String> },
    /// A config error, with the file it came from.
    #[error("{path}: {source}")]
    ConfigFile {
        path: PathBuf,
        #[source]
        source: Box<TrainerError>,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    /// A task set could not be read.
    #[error("task set {spec}: {reason}")]
    Tasks { spec: String, reason: String },
    /// The policy failed on a whole batch.
    #[error("policy {policy} failed: {source}")]
    Policy {
        policy: String,
        #[source]
        source: arpo_core::PolicyError,
    },
    /// The learner (scoring, loss, optimizer, checkpoint) failed.
    #[error("learner: {what}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    Learner {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The replay buffer refused an operation.
    #[error("replay buffer: {0}")]
    Replay(#[from] arpo_replay::ReplayError),
    /// Advantages or the policy loss could not be computed.
    #[error("advantages/loss: {0}")]
    Algorithm(#[from] arpo_grpo::GrpoError),
    /// The pre-flight checks failed; each problem says how to fix it.
    #[error("pre-flight check failed:\n  - {}", problems.join("\n  - "))]
    Preflight { problems: Vec<String> },
    /// A checkpoint or trainer state could not be used for `--resume`.
    #[error("cannot resume from {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    /// Every rollout of a step was dropped: nothing to learn from.
    #[error(
        "step {step}: all {dropped} rollouts were dropped because the environment failed (last error: {last_error}); check the environment with `cargo xtask test-env`"
    )]
    AllRolloutsDropped {
        step: u64,
        dropped: usize,
        last_error: String,
    },
    /// A single checked episode (`cargo xtask test-env`) could not run to its evaluation.
    #[error("task {task_id}: the environment failed at {stage}: {error}{}", if hint.is_empty() { String::new() } else { format!(": {hint}") })]
    EpisodeBroken {
        task_id: String,
        stage: crate::rollout::EnvStage,
        error: String,
        hint: String,
    },
    /// An environment's screen is not the size the config asks for (`env.screen_size`).
    #[error(
        "task {task_id}: the environment's screenshot is {}x{}, but env.screen_size is {expected}: set the VM's display resolution (OSWorld's tasks expect 1920x1080) or change env.screen_size (0 or absent: accept any size)",
        actual.0, actual.1
    )]
    ScreenMismatch {
        expected: arpo_core::ScreenSize,
        actual: (u32, u32),
        task_id: String,
    },
    /// Recording episodes or writing TensorBoard files failed.
    #[error(transparent)]
    Dashboard(#[from] arpo_dashboard::DashboardError),
    /// A piece of the system this command needs is not built in this checkout.
    #[error("{what} is not available: {reason}")]
    Missing { what: String, reason: String },
}

impl TrainerError {
    /// Attaches the config file a config error came from.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            e @ (Self::ConfigSyntax { .. }
            | Self::ConfigKey { .. }
            | Self::ConfigOverride { .. }
            | Self::ConfigInvalid { .. }) => Self::ConfigFile {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
            e => e,
        }
    }

    /// A file operation on `path` failed with `e` (an `io::Error`, a JSON error, or a message).
    pub fn io(path: impl Into<PathBuf>, e: impl Into<BoxError>) -> Self {
        Self::Io {
            path: path.into(),
            source: e.into(),
        }
    }

    /// The learner failed at `what` because of `e`.
    pub fn learner(what: impl Into<String>, e: impl Into<BoxError>) -> Self {
        Self::Learner {
            what: what.into(),
            source: Some(e.into()),
        }
    }

    /// The learner failed, as `what` says.
    pub fn learner_msg(what: impl Into<String>) -> Self {
        Self::Learner {
            what: what.into(),
            source: None,
        }
    }
}

//! The dashboard's error type.

use std::path::PathBuf;

/// What can fail while recording episodes, writing TensorBoard files or serving the page.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// Reading or writing a run's file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A run's JSON file could not be parsed.
    #[error("{path} is not what the trainer writes: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The directory given is not a run's results directory.
    #[error(
        "{path} holds no training_metrics.json and no episodes/: give a run's results directory, e.g. results/embedded_arpo"
    )]
    NotARun { path: PathBuf },
    /// The page's address could not be bound.
    #[error(
        "cannot listen on {addr}: {source} (is another dashboard running? pick another port with --addr)"
    )]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl DashboardError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

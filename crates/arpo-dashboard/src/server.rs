//! The page and its JSON API, served from a run's files.
//!
//! | route | answers |
//! |---|---|
//! | `GET /` | the page (one HTML file, no external scripts: it works offline) |
//! | `GET /api/summary` | experiment, steps and epochs done, recorded episode steps |
//! | `GET /api/curves?max_points=N` | step and epoch curves, downsampled to N points (400) |
//! | `GET /api/episodes/{step}` | that step's `step.json` |
//! | `GET /episodes/{step}/{file}` | a screenshot |
//! | `GET /api/tasks` | per task: attempts, successes, recent outcomes, dropped |
//! | `GET /api/replay` | `replay_buffer_stats.json` |
//!
//! The page polls `/api/summary` every two seconds and fetches the rest only when it changed;
//! screenshots load lazily, as a trajectory is opened.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::DashboardError;
use crate::episodes::{read_step, recorded_steps, step_dir};
use crate::run::{RunDir, RunProgress};

/// The default address: loopback, on the port Ray's dashboard uses (the seed's users know it).
pub const DEFAULT_ADDR: &str = "127.0.0.1:8265";

const PAGE: &str = include_str!("page.html");

/// The dashboard's routes over the run in `run_dir` (which may still be empty).
pub fn router(run_dir: PathBuf) -> Router {
    let run = Arc::new(RunDir::new(&run_dir));
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/summary", get(summary))
        .route("/api/curves", get(curves))
        .route("/api/episodes/{step}", get(episodes))
        .route("/episodes/{step}/{file}", get(screenshot))
        .route("/api/tasks", get(tasks))
        .route("/api/replay", get(replay))
        .with_state(run)
}

/// Serves the dashboard of `run_dir` on `addr` until the process ends. Bind a non-loopback
/// address only on purpose: the page shows everything the run saw.
pub async fn serve(run_dir: PathBuf, addr: SocketAddr) -> Result<(), DashboardError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DashboardError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(%local, run = %run_dir.display(), "dashboard listening");
    axum::serve(listener, router(run_dir))
        .await
        .map_err(|source| DashboardError::Bind { addr, source })
}

/// Serves the dashboard of `run_dir` on `addr` from a thread of its own (with its own small
/// runtime, so that a training loop busy on its threads never stalls the page), for the life
/// of the process. Binds before returning: a taken port is an error here, not later in the
/// thread. Returns the address bound (useful with port 0).
pub fn serve_in_background(
    run_dir: PathBuf,
    addr: SocketAddr,
) -> Result<SocketAddr, DashboardError> {
    let bind_error = |source| DashboardError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(bind_error)?;
    std::thread::Builder::new()
        .name("arpo-dashboard".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => axum::serve(l, router(run_dir)).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!("dashboard on {local} stopped: {e}");
                }
            });
        })
        .map_err(bind_error)?;
    tracing::info!(%local, "dashboard listening");
    Ok(local)
}

type Shared = State<Arc<RunDir>>;

/// Runs file reading off the async workers.
async fn blocking<T, F>(run: Arc<RunDir>, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&RunDir) -> Result<T, DashboardError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&run)).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => error_response(&e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn error_response(e: &DashboardError) -> Response {
    let status = match e {
        DashboardError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            StatusCode::NOT_FOUND
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, e.to_string()).into_response()
}

#[derive(Debug, Serialize)]
struct Summary {
    #[serde(flatten)]
    progress: RunProgress,
    recorded_steps: Vec<u64>,
}

async fn summary(State(run): Shared) -> Response {
    blocking(run, |run| {
        Ok(Summary {
            progress: run.progress()?,
            recorded_steps: recorded_steps(&run.episodes_dir())?,
        })
    })
    .await
}

#[derive(Debug, Deserialize)]
struct CurvesQuery {
    max_points: Option<usize>,
}

async fn curves(State(run): Shared, Query(q): Query<CurvesQuery>) -> Response {
    let max_points = q.max_points.unwrap_or(400).clamp(2, 10_000);
    blocking(run, move |run| run.curves(max_points)).await
}

async fn episodes(State(run): Shared, Path(step): Path<u64>) -> Response {
    blocking(run, move |run| read_step(&run.episodes_dir(), step)).await
}

async fn tasks(State(run): Shared) -> Response {
    blocking(run, |run| run.tasks(20)).await
}

async fn replay(State(run): Shared) -> Response {
    blocking(run, |run| run.replay()).await
}

/// A screenshot file: a plain name of the step's directory, nothing else.
async fn screenshot(State(run): Shared, Path((step, file)): Path<(u64, String)>) -> Response {
    let content_type = if file.ends_with(".png") {
        "image/png"
    } else if file.ends_with(".jpg") {
        "image/jpeg"
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let plain = !file.is_empty()
        && !file.starts_with('.')
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !plain {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = step_dir(&run.episodes_dir(), step).join(&file);
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type),
                // A step's files rarely change (retention only removes; a resumed run may record a step again).
                (header::CACHE_CONTROL, "max-age=60"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

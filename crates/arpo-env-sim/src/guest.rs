//! The OSWorld guest HTTP protocol over a simulated desktop.
//!
//! Serves what an agent and an evaluator need: `GET /screenshot`, `POST /execute` (and
//! `/setup/execute`) with `python -c "import pyautogui; ..."` programs (parsed, never run),
//! `POST /setup/sim` to load a task, `POST /screen_size`, `GET /platform`,
//! `GET /cursor_position` and `POST /file` (virtual files: [`SCORE_FILE`], [`STATE_FILE`],
//! [`TASK_FILE`]).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let state = arpo_env_sim::guest::GuestState::new(336, 224).expect("valid size");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:5000").await?;
//! arpo_env_sim::guest::serve(listener, state).await
//! # }
//! ```

use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{Form, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::desktop::{Desktop, Scene};
use crate::pyautogui::parse_program;
use crate::session::Session;
use crate::task::{Split, TaskSpec};
use crate::{Catalogue, SimError};

pub use crate::SCORE_FILE;
/// The file holding the whole desktop state as JSON.
pub const STATE_FILE: &str = "/sim/state.json";
pub use crate::TASK_FILE;

/// The shared state of a guest server: one simulated desktop.
#[derive(Debug, Clone)]
pub struct GuestState {
    inner: Arc<Mutex<Session>>,
}

fn blank_spec() -> TaskSpec {
    TaskSpec {
        id: "sim-blank".into(),
        family: "blank".into(),
        split: Split::Train,
        instruction: String::new(),
        scene: Scene {
            icons: vec![],
            windows: vec![],
            templates: vec![],
        },
        checks: vec![],
        infeasible: false,
        oracle: vec![],
    }
}

fn catalogue() -> &'static Catalogue {
    static CATALOGUE: OnceLock<Catalogue> = OnceLock::new();
    CATALOGUE.get_or_init(Catalogue::default)
}

impl GuestState {
    /// A guest with an empty desktop of `width` x `height` pixels.
    pub fn new(width: u32, height: u32) -> Result<Self, SimError> {
        Ok(Self {
            inner: Arc::new(Mutex::new(Session::new(blank_spec(), width, height)?)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        // A panic while holding the lock cannot leave a half-applied call behind (calls are
        // applied whole), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a task (resets the desktop to its initial scene).
    pub fn load(&self, spec: TaskSpec) -> Result<(), SimError> {
        let mut s = self.lock();
        let next = Session::new(spec, s.width, s.height)?;
        *s = next;
        Ok(())
    }

    /// A copy of the current desktop.
    pub fn desktop(&self) -> Desktop {
        self.lock().desktop.clone()
    }

    /// The screen size.
    pub fn screen_size(&self) -> (u32, u32) {
        let s = self.lock();
        (s.width, s.height)
    }
}

/// The guest protocol's routes over `state`.
pub fn router(state: GuestState) -> Router {
    Router::new()
        .route("/screenshot", get(screenshot))
        .route("/execute", post(execute))
        .route("/setup/execute", post(execute))
        .route("/setup/sim", post(setup_sim))
        .route("/screen_size", post(screen_size).get(screen_size))
        .route("/platform", get(platform))
        .route("/cursor_position", get(cursor_position))
        .route("/file", post(file))
        .with_state(state)
}

/// Serves the guest protocol on `listener` until the future is dropped (or the listener fails).
pub async fn serve(listener: tokio::net::TcpListener, state: GuestState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "status": "error", "message": message.into() })),
    )
        .into_response()
}

async fn screenshot(State(state): State<GuestState>) -> Response {
    let mut s = state.lock();
    match s.screenshot() {
        Ok(shot) => ([(header::CONTENT_TYPE, "image/png")], shot.bytes).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    command: Value,
    #[serde(default)]
    #[allow(dead_code)]
    shell: bool,
}

/// The python code of a `python -c <code>` command (a list of words or a shell string).
pub fn python_code(command: &Value) -> Result<String, String> {
    let words: Vec<String> = match command {
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("command word {v} is not a string"))
            })
            .collect::<Result<_, _>>()?,
        Value::String(line) => shell_split(line).map_err(|e| e.to_string())?,
        other => return Err(format!("command must be a list or a string, got {other}")),
    };
    match words.as_slice() {
        [python, flag, code] if is_python(python) && flag == "-c" => Ok(code.clone()),
        _ => Err(format!(
            "only `python -c \"<pyautogui program>\"` runs on the simulated desktop, got {words:?}"
        )),
    }
}

fn is_python(word: &str) -> bool {
    let name = word.rsplit('/').next().unwrap_or(word);
    name == "python" || name == "python3"
}

/// Splits a command line into words the way a POSIX shell does for quotes and backslashes
/// (the `shlex` crate: `#` at the start of a word begins a comment, as in a shell).
pub fn shell_split(line: &str) -> Result<Vec<String>, SimError> {
    shlex::split(line).ok_or_else(|| SimError::CommandLine {
        reason: "an unterminated quote or a trailing backslash".into(),
    })
}

fn exec_result(returncode: i32, error: String) -> Response {
    Json(json!({ "status": "success", "output": "", "error": error, "returncode": returncode }))
        .into_response()
}

async fn execute(State(state): State<GuestState>, Json(req): Json<ExecuteRequest>) -> Response {
    let code = match python_code(&req.command) {
        Ok(code) => code,
        Err(reason) => return exec_result(1, reason),
    };
    let calls = match parse_program(&code) {
        Ok(calls) => calls,
        Err(e) => return exec_result(1, e.to_string()),
    };
    let mut s = state.lock();
    for call in &calls {
        if let Err(reason) = s.apply_call(call) {
            return exec_result(1, reason);
        }
    }
    exec_result(0, String::new())
}

#[derive(Debug, Deserialize)]
struct SetupSim {
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    spec: Option<TaskSpec>,
}

async fn setup_sim(State(state): State<GuestState>, Json(req): Json<SetupSim>) -> Response {
    let spec = match (req.spec, req.task_id) {
        (Some(spec), _) => spec,
        (None, Some(id)) => match catalogue().spec(&id) {
            Ok(spec) => spec.clone(),
            Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
        },
        (None, None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the sim setup step needs \"task_id\" or \"spec\"",
            );
        }
    };
    let id = spec.id.clone();
    match state.load(spec) {
        Ok(()) => (StatusCode::OK, format!("loaded {id}")).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn screen_size(State(state): State<GuestState>) -> Response {
    let (width, height) = state.screen_size();
    Json(json!({ "width": width, "height": height })).into_response()
}

async fn platform() -> &'static str {
    "Linux"
}

async fn cursor_position(State(state): State<GuestState>) -> Response {
    let s = state.lock();
    let (x, y) = s.desktop.pointer;
    let k = s.scale as i32;
    Json(json!([x * k, y * k])).into_response()
}

#[derive(Debug, Deserialize)]
struct FileRequest {
    file_path: String,
}

async fn file(State(state): State<GuestState>, Form(req): Form<FileRequest>) -> Response {
    let s = state.lock();
    let body = match req.file_path.as_str() {
        SCORE_FILE => {
            let ok = !s.spec.infeasible && s.checks_hold();
            if ok { "1" } else { "0" }.to_string()
        }
        STATE_FILE => serde_json::to_string(&s.desktop).unwrap_or_default(),
        TASK_FILE => serde_json::to_string(&s.spec).unwrap_or_default(),
        other => {
            return (StatusCode::NOT_FOUND, format!("file {other} not found: the simulated desktop serves {SCORE_FILE}, {STATE_FILE} and {TASK_FILE}"))
                .into_response();
        }
    };
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_split_follows_posix_quoting() {
        assert_eq!(
            shell_split(r#"python -c "import pyautogui; pyautogui.write(\"a b\")""#)
                .expect("splits"),
            vec![
                "python",
                "-c",
                r#"import pyautogui; pyautogui.write("a b")"#
            ]
        );
        assert_eq!(
            shell_split(r"a 'b c' d\ e").expect("splits"),
            vec!["a", "b c", "d e"]
        );
        assert!(shell_split("'open").is_err());
    }

    /// Command lines as OSWorld's clients quote them (Python's `shlex.quote` wraps in single
    /// quotes and writes a quote as `'"'"'`); the expected words are what Python's
    /// `shlex.split`, which the real guest server runs, makes of each line.
    #[test]
    fn shell_split_agrees_with_the_osworld_guest_on_quoted_programs() {
        let cases: [(&str, [&str; 3]); 4] = [
            (
                r#"python3 -c 'import pyautogui; pyautogui.typewrite("it'"'"'s")' "#,
                [
                    "python3",
                    "-c",
                    r#"import pyautogui; pyautogui.typewrite("it's")"#,
                ],
            ),
            (
                "python -c 'import pyautogui\npyautogui.write('\"'\"'say \"hi\" \\\\n $HOME `x`'\"'\"')\n# done'",
                [
                    "python",
                    "-c",
                    "import pyautogui\npyautogui.write('say \"hi\" \\\\n $HOME `x`')\n# done",
                ],
            ),
            (
                "/usr/bin/python3\t-c  \"print(\\\"\\\\\\\\\\\")\"",
                ["/usr/bin/python3", "-c", r#"print("\\")"#],
            ),
            (
                r#"python -c "pyautogui.write(\"a b\")""#,
                ["python", "-c", r#"pyautogui.write("a b")"#],
            ),
        ];
        for (line, words) in cases {
            assert_eq!(shell_split(line).expect("splits"), words, "{line}");
        }
        // A `#` word begins a comment here; Python's shlex.split passes it on as python's
        // argv[1:], which runs the same program, so both accept the command.
        assert_eq!(python_code(&json!("python -c 'x' # c")).expect("ok"), "x");
        for bad in [r#"python -c "x"#, r"python -c x\"] {
            assert!(shell_split(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn python_code_accepts_list_and_string_commands() {
        let list = json!(["python", "-c", "pyautogui.click(1, 2)"]);
        assert_eq!(python_code(&list).expect("ok"), "pyautogui.click(1, 2)");
        let line = json!("python3 -c 'pyautogui.click(1, 2)'");
        assert_eq!(python_code(&line).expect("ok"), "pyautogui.click(1, 2)");
        assert!(python_code(&json!(["bash", "-c", "ls"])).is_err());
        assert!(python_code(&json!(["python", "script.py"])).is_err());
    }
}

//! A scripted OSWorld guest server for tests, with fault injection (500s, a hang, going down).
//!
//! It runs on its own thread and runtime, so that "down" really closes every connection.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde_json::{Value, json};

#[derive(Debug, Default)]
pub struct Script {
    /// Every `/execute` and `/setup/execute` command, in order, with its endpoint.
    pub executed: Vec<(String, Value)>,
    /// Other setup calls: (endpoint, JSON body).
    pub setup_calls: Vec<(String, Value)>,
    /// `/setup/upload`: path → bytes.
    pub uploads: HashMap<String, Vec<u8>>,
    /// Files `/file` serves.
    pub files: HashMap<String, Vec<u8>>,
    /// Files `GET /cloud/<name>` serves (stand-ins for a task's cloud_file URLs).
    pub cloud: HashMap<String, Vec<u8>>,
    /// `/execute` outputs by command (JSON text of the command).
    pub outputs: HashMap<String, String>,
    /// The next N requests answer 500.
    pub fail_next: u32,
    /// Requests hang (60 s) while set.
    pub hang: bool,
    /// `/screenshot` answers this body instead of a PNG.
    pub bad_screenshot: Option<Vec<u8>>,
    pub requests: u32,
}

pub type Shared = Arc<Mutex<Script>>;

pub fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb([30, 60, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

/// Applies faults; `Some(response)` short-cuts the handler.
async fn fault(state: &Shared) -> Option<Response> {
    let hang = {
        let mut s = state.lock().expect("lock");
        s.requests += 1;
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Some(
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"status": "error", "message": "injected"})),
                )
                    .into_response(),
            );
        }
        s.hang
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    None
}

async fn screenshot(State(state): State<Shared>) -> Response {
    if let Some(r) = fault(&state).await {
        return r;
    }
    let bad = state.lock().expect("lock").bad_screenshot.clone();
    match bad {
        Some(body) => body.into_response(),
        None => ([("content-type", "image/png")], png(64, 48)).into_response(),
    }
}

async fn execute_at(state: Shared, endpoint: &str, body: Value) -> Response {
    if let Some(r) = fault(&state).await {
        return r;
    }
    let command = body.get("command").cloned().unwrap_or(Value::Null);
    let mut s = state.lock().expect("lock");
    s.executed.push((endpoint.to_owned(), command.clone()));
    let output = s
        .outputs
        .get(&command.to_string())
        .cloned()
        .unwrap_or_default();
    axum::Json(json!({"status": "success", "output": output, "error": "", "returncode": 0}))
        .into_response()
}

async fn execute(State(state): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    execute_at(state, "/execute", body).await
}

async fn setup_execute(
    State(state): State<Shared>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    execute_at(state, "/setup/execute", body).await
}

async fn setup_call(state: Shared, endpoint: &str, body: Value) -> Response {
    if let Some(r) = fault(&state).await {
        return r;
    }
    state
        .lock()
        .expect("lock")
        .setup_calls
        .push((endpoint.to_owned(), body));
    "ok".into_response()
}

async fn launch(State(s): State<Shared>, axum::Json(b): axum::Json<Value>) -> Response {
    setup_call(s, "/setup/launch", b).await
}
async fn open_file(State(s): State<Shared>, axum::Json(b): axum::Json<Value>) -> Response {
    setup_call(s, "/setup/open_file", b).await
}
async fn activate(State(s): State<Shared>, axum::Json(b): axum::Json<Value>) -> Response {
    setup_call(s, "/setup/activate_window", b).await
}
async fn close(State(s): State<Shared>, axum::Json(b): axum::Json<Value>) -> Response {
    setup_call(s, "/setup/close_window", b).await
}

async fn change_wallpaper(State(s): State<Shared>, axum::Json(b): axum::Json<Value>) -> Response {
    setup_call(s, "/setup/change_wallpaper", b).await
}

async fn upload(State(state): State<Shared>, mut form: Multipart) -> Response {
    if let Some(r) = fault(&state).await {
        return r;
    }
    let mut path = None;
    let mut data = None;
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("file_path") => path = field.text().await.ok(),
            Some("file_data") => data = field.bytes().await.ok().map(|b| b.to_vec()),
            _ => {}
        }
    }
    match (path, data) {
        (Some(p), Some(d)) => {
            state.lock().expect("lock").uploads.insert(p, d);
            "uploaded".into_response()
        }
        _ => (StatusCode::BAD_REQUEST, "file_path and file_data needed").into_response(),
    }
}

#[derive(serde::Deserialize)]
struct FileRequest {
    file_path: String,
}

/// `/file` reads its form with axum's decoder, so the client's encoding is checked against another
/// implementation than its own.
async fn file(State(state): State<Shared>, Form(req): Form<FileRequest>) -> Response {
    if let Some(r) = fault(&state).await {
        return r;
    }
    match state.lock().expect("lock").files.get(&req.file_path) {
        Some(bytes) => bytes.clone().into_response(),
        None => (StatusCode::NOT_FOUND, "File not found").into_response(),
    }
}

async fn cloud(
    State(state): State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match state.lock().expect("lock").cloud.get(&name) {
        Some(bytes) => bytes.clone().into_response(),
        None => (StatusCode::NOT_FOUND, "no such cloud file").into_response(),
    }
}

/// 1 MiB of bytes, for download size caps.
async fn blob() -> Response {
    vec![7u8; 1 << 20].into_response()
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/screenshot", get(screenshot))
        .route("/execute", post(execute))
        .route("/setup/execute", post(setup_execute))
        .route("/setup/launch", post(launch))
        .route("/setup/open_file", post(open_file))
        .route("/setup/activate_window", post(activate))
        .route("/setup/close_window", post(close))
        .route("/setup/change_wallpaper", post(change_wallpaper))
        .route("/setup/upload", post(upload))
        .route("/file", post(file))
        .route("/blob", get(blob))
        .route("/cloud/{name}", get(cloud))
        .with_state(state)
}

/// A running fake guest; dropping it (or `stop`) shuts it down with all its connections.
pub struct FakeGuest {
    pub addr: SocketAddr,
    pub state: Shared,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeGuest {
    pub fn start(state: Shared) -> Self {
        Self::start_on(state, "127.0.0.1:0".parse().expect("addr"))
    }

    pub fn start_on(state: Shared, addr: SocketAddr) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let listener = rt
                .block_on(tokio::net::TcpListener::bind(addr))
                .expect("bind");
            addr_tx
                .send(listener.local_addr().expect("addr"))
                .expect("send");
            rt.spawn(async move {
                let _ = axum::serve(listener, router(st)).await;
            });
            let _ = stop_rx.recv();
            rt.shutdown_background();
        });
        let addr = addr_rx.recv().expect("server address");
        Self {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `fixtures/fake-vmrun/vmrun` with its state in `dir` (through a wrapper script, so that
/// parallel tests do not share an environment variable).
#[cfg(unix)]
pub fn fake_vmrun(dir: &std::path::Path, timeout: Duration) -> arpo_env_vmware::Vmrun {
    use std::os::unix::fs::PermissionsExt;
    let fake =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fake-vmrun/vmrun");
    let wrapper = dir.join("vmrun-wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nFAKE_VMRUN_DIR='{}' exec python3 '{}' \"$@\"\n",
            dir.display(),
            fake.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    arpo_env_vmware::Vmrun::new(arpo_env_vmware::VmrunConfig {
        binary: wrapper,
        host_type: arpo_env_vmware::HostType::Workstation,
        headless: true,
        timeout,
        ip_timeout: timeout,
    })
}

/// The commands (third argument on) the fake vmrun received.
pub fn vmrun_calls(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let args: Vec<String> = serde_json::from_str(l).expect("call");
            args.get(2).cloned().unwrap_or_default()
        })
        .collect()
}

/// OSWorld's published `evaluation_examples/examples` (read, never copied into the repository):
/// `$ARPO_OSWORLD_EXAMPLES` (an `evaluation_examples` folder), else the one shared next to this
/// checkout (`../shared/osworld/...`), else this machine's `/work/shared/osworld/...`.
pub fn osworld_examples() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        std::env::var_os("ARPO_OSWORLD_EXAMPLES").map(std::path::PathBuf::from),
        Some(root.join("../shared/osworld/evaluation_examples")),
        Some(std::path::PathBuf::from(
            "/work/shared/osworld/evaluation_examples",
        )),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(|d| d.join("examples"))
        .find(|d| d.is_dir())
}

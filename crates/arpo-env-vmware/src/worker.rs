//! OSWorld's own evaluator (the `desktop-env` package) in a long-lived Python worker.
//!
//! The worker (`python/osworld_worker.py`, built into this crate) reads one JSON request a line
//! on stdin and answers one JSON line on stdout; what it logs or prints goes to stderr, which is
//! forwarded to our `tracing` log (target `osworld_worker`). A request that takes longer than the
//! timeout kills the worker; a dead worker is started again at the next request.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::VmwareError;
use crate::raw::RawStep;

/// The worker's source, written next to the env's cache when no script path is configured.
pub const WORKER_SCRIPT: &str = include_str!("../python/osworld_worker.py");

/// The metric, getter and setup step names of `desktop-env` 1.0.2, as its worker's `hello`
/// lists them (`python/osworld_names.py` writes this file).
pub const BUNDLED_NAMES: &str = include_str!("osworld_names.json");

/// The command that installs what the worker needs (README, "OSWorld's evaluator").
pub const INSTALL_COMMAND: &str = "python3 -m venv .venv-osworld && .venv-osworld/bin/pip install --no-deps desktop-env==1.0.2 && .venv-osworld/bin/pip install -r crates/arpo-env-vmware/python/requirements.txt easyocr, then set env.osworld.python to .venv-osworld/bin/python";

/// Where and how the worker runs.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// The Python interpreter (a virtualenv's `bin/python`), default `python3`.
    pub python: String,
    /// Folders put first on the worker's `PYTHONPATH` (tests: a stand-in `easyocr`).
    pub pythonpath: Vec<PathBuf>,
    /// The longest one evaluation or setup step may take.
    pub timeout: Duration,
    /// The longest the worker may take to start and import `desktop_env`.
    pub start_timeout: Duration,
    /// The worker's working folder: OSWorld's setup steps and getters read account settings at
    /// paths relative to it (`evaluation_examples/settings/...`), so the folder holding
    /// `evaluation_examples`. `None`: ours.
    pub workdir: Option<PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            python: "python3".to_owned(),
            pythonpath: Vec::new(),
            timeout: Duration::from_secs(600),
            start_timeout: Duration::from_secs(120),
            workdir: None,
        }
    }
}

/// What OSWorld's `DesktopEnv` hands its getters and setup controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSpec {
    pub vm_ip: String,
    pub server_port: u16,
    pub chromium_port: u16,
    pub vlc_port: u16,
    /// This environment's own task cache folder (absolute).
    pub cache_dir: PathBuf,
    pub client_password: String,
    pub screen_width: u32,
    pub screen_height: u32,
}

impl GuestSpec {
    /// The host and port of a guest server URL (`http://192.168.1.5:5000`).
    pub fn host_port(url: &str) -> Option<(String, u16)> {
        let parsed = reqwest::Url::parse(url).ok()?;
        let host = parsed.host_str()?.trim_matches(['[', ']']).to_owned();
        Some((host, parsed.port_or_known_default()?))
    }
}

/// The names OSWorld's evaluator knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsworldNames {
    pub desktop_env: String,
    pub metrics: Vec<String>,
    pub getters: Vec<String>,
    pub setup_steps: Vec<String>,
}

impl OsworldNames {
    /// The names of `desktop-env` 1.0.2, bundled with this crate.
    pub fn bundled() -> Self {
        serde_json::from_str(BUNDLED_NAMES).unwrap_or(Self {
            desktop_env: "unknown".into(),
            metrics: Vec::new(),
            getters: Vec::new(),
            setup_steps: Vec::new(),
        })
    }

    pub fn has_metric(&self, name: &str) -> bool {
        self.metrics.iter().any(|m| m == name)
    }

    pub fn has_getter(&self, name: &str) -> bool {
        self.getters.iter().any(|g| g == name)
    }

    pub fn has_setup_step(&self, name: &str) -> bool {
        self.setup_steps.iter().any(|s| s == name)
    }
}

#[derive(Debug)]
struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// A handle on one worker process, started at the first request.
#[derive(Debug)]
pub struct OsworldWorker {
    config: WorkerConfig,
    /// Where the worker's script is written.
    scratch: PathBuf,
    running: tokio::sync::Mutex<Option<Running>>,
    next_id: AtomicU64,
    starts: AtomicU64,
}

impl OsworldWorker {
    /// A worker that writes its script under `scratch` (created when needed).
    pub fn new(config: WorkerConfig, scratch: &Path) -> Self {
        Self {
            config,
            scratch: scratch.to_path_buf(),
            running: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            starts: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// How many times a worker process was started (restarts included).
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    fn unavailable(&self, reason: String) -> VmwareError {
        VmwareError::WorkerUnavailable {
            python: self.config.python.clone(),
            reason,
            install: INSTALL_COMMAND.to_owned(),
        }
    }

    async fn spawn(&self) -> Result<Running, VmwareError> {
        std::fs::create_dir_all(&self.scratch)
            .map_err(|e| VmwareError::io("create folder", &self.scratch, e))?;
        let script = self.scratch.join("osworld_worker.py");
        std::fs::write(&script, WORKER_SCRIPT).map_err(|e| VmwareError::io("write", &script, e))?;
        let mut paths: Vec<PathBuf> = self.config.pythonpath.clone();
        if let Some(old) = std::env::var_os("PYTHONPATH") {
            paths.extend(std::env::split_paths(&old));
        }
        let mut command = tokio::process::Command::new(&self.config.python);
        command
            .arg("-u")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.config.workdir {
            command.current_dir(dir);
        }
        if !paths.is_empty()
            && let Ok(joined) = std::env::join_paths(paths)
        {
            command.env("PYTHONPATH", joined);
        }
        let mut child = command
            .spawn()
            .map_err(|e| self.unavailable(format!("cannot start it: {e}")))?;
        self.starts.fetch_add(1, Ordering::Relaxed);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(self.unavailable("its standard streams were not piped".into()));
        };
        let pid = child.id().unwrap_or(0);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "osworld_worker", pid, "{line}");
            }
        });
        tracing::info!(python = %self.config.python, pid, "OSWorld evaluator worker started");
        Ok(Running {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        })
    }

    /// Sends one request and waits for its answer; the answer's fields (less `id` and `ok`).
    async fn request(
        &self,
        op: &str,
        mut body: Value,
        timeout: Duration,
    ) -> Result<Value, VmwareError> {
        let mut guard = self.running.lock().await;
        // A worker that died since the last request (killed, out of memory) is replaced now.
        if let Some(r) = guard.as_mut()
            && let Ok(Some(status)) = r.child.try_wait()
        {
            tracing::warn!(%status, "the OSWorld evaluator worker had exited; starting a new one");
            *guard = None;
        }
        let fresh = guard.is_none();
        if fresh {
            *guard = Some(self.spawn().await?);
        }
        // A fresh worker imports desktop_env first: give it the start time too.
        let limit = if fresh {
            timeout + self.config.start_timeout
        } else {
            timeout
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Value::Object(map) = &mut body {
            map.insert("id".into(), json!(id));
            map.insert("op".into(), json!(op));
        }
        let mut line = body.to_string();
        line.push('\n');
        let Some(running) = guard.as_mut() else {
            return Err(self.unavailable("it is not running".into()));
        };
        let exchange = async {
            running.stdin.write_all(line.as_bytes()).await?;
            running.stdin.flush().await?;
            loop {
                match running.stdout.next_line().await? {
                    None => return Ok(None),
                    Some(l) => match serde_json::from_str::<Value>(&l) {
                        Ok(v) if v.get("id") == Some(&json!(id)) => return Ok(Some(v)),
                        _ => {
                            tracing::warn!(target: "osworld_worker", line = %l, "unexpected line on stdout")
                        }
                    },
                }
            }
        };
        let outcome: Result<std::io::Result<Option<Value>>, _> =
            tokio::time::timeout(limit, exchange).await;
        let died = |guard: &mut Option<Running>, why: String| {
            // The worker is gone or unusable: drop it, the next request starts a new one.
            if let Some(mut r) = guard.take() {
                let _ = r.child.start_kill();
            }
            VmwareError::WorkerFailed {
                op: op.to_owned(),
                reason: format!(
                    "the worker process ended ({why}); it is restarted at the next request"
                ),
            }
        };
        let answer = match outcome {
            Err(_) => {
                if let Some(mut r) = guard.take() {
                    let _ = r.child.start_kill();
                    let _ = r.child.wait().await;
                }
                return Err(VmwareError::WorkerTimeout {
                    op: op.to_owned(),
                    seconds: limit.as_secs_f64(),
                });
            }
            Ok(Err(e)) => return Err(died(&mut guard, e.to_string())),
            Ok(Ok(None)) => {
                let status = match guard.as_mut() {
                    Some(r) => r
                        .child
                        .wait()
                        .await
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    None => String::new(),
                };
                let err = died(&mut guard, format!("end of its output, {status}"));
                if fresh {
                    // It died while starting: most often Python or desktop_env is missing.
                    return Err(self.unavailable(format!(
                        "it exited at start ({status}); its stderr is in the log"
                    )));
                }
                return Err(err);
            }
            Ok(Ok(Some(v))) => v,
        };
        drop(guard);
        if answer.get("ok").and_then(Value::as_bool) == Some(true) {
            return Ok(answer);
        }
        let error = answer
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no error message")
            .to_owned();
        match answer.get("kind").and_then(Value::as_str) {
            Some("import") => {
                Err(self.unavailable(format!("importing desktop_env failed: {error}")))
            }
            _ => Err(VmwareError::WorkerFailed {
                op: op.to_owned(),
                reason: error,
            }),
        }
    }

    /// Starts the worker when needed and checks that it imports `desktop_env`; its names.
    pub async fn hello(&self) -> Result<OsworldNames, VmwareError> {
        let answer = self
            .request("hello", json!({}), self.config.timeout)
            .await?;
        serde_json::from_value(answer).map_err(|e| VmwareError::WorkerFailed {
            op: "hello".into(),
            reason: format!("unreadable answer: {e}"),
        })
    }

    /// OSWorld's `DesktopEnv.evaluate` (postconfig, infeasible, getters, metrics, conj) on the
    /// guest; `last_action_fail`: the episode ended with FAIL (`call_user`).
    pub async fn evaluate(
        &self,
        guest: &GuestSpec,
        evaluator: &Value,
        last_action_fail: bool,
    ) -> Result<f64, VmwareError> {
        let last = if last_action_fail {
            json!("FAIL")
        } else {
            Value::Null
        };
        let answer = self
            .request(
                "evaluate",
                json!({"env": guest, "evaluator": evaluator, "last_action": last}),
                self.config.timeout,
            )
            .await?;
        answer
            .get("score")
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite())
            .ok_or_else(|| VmwareError::WorkerFailed {
                op: "evaluate".into(),
                reason: format!("the answer has no finite score: {answer}"),
            })
    }

    /// One setup step through OSWorld's `SetupController`.
    pub async fn setup_step(&self, guest: &GuestSpec, step: &RawStep) -> Result<(), VmwareError> {
        self.request(
            "setup",
            json!({"env": guest, "step": step}),
            self.config.timeout,
        )
        .await
        .map(|_| ())
    }

    /// Stops the worker process (a later request starts a new one).
    pub async fn stop(&self) {
        if let Some(mut r) = self.running.lock().await.take() {
            let _ = r.child.start_kill();
            let _ = r.child.wait().await;
        }
    }

    /// The process id of the running worker, if one runs (tests kill it to check restarts).
    pub async fn pid(&self) -> Option<u32> {
        self.running
            .lock()
            .await
            .as_ref()
            .and_then(|r| r.child.id())
    }
}

//! OSWorld's setup steps (`SetupController`): what `reset` runs before the agent starts, and what
//! an evaluator's `postconfig` runs before it scores.
//!
//! As in OSWorld, a step the guest answers with an error status (a window that is not there, a
//! command that fails) is logged and setup goes on; an unreachable guest or a failed download
//! stops it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::VmwareError;
use crate::guest::GuestClient;
use crate::raw::RawStep;

/// The setup step types implemented here.
pub const SUPPORTED_STEPS: &[&str] = &[
    "launch",
    "open",
    "execute",
    "command",
    "sleep",
    "activate_window",
    "close_window",
    "download",
    "upload_file",
];

/// When an `execute` step repeats: until the return code, or a text in stdout or stderr.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Until {
    pub returncode: Option<i64>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
}

impl Until {
    fn is_empty(&self) -> bool {
        self.returncode.is_none() && self.stdout.is_none() && self.stderr.is_none()
    }
}

/// One parsed setup step.
#[derive(Debug, Clone, PartialEq)]
pub enum SetupStep {
    /// `launch`: start a program, do not wait.
    Launch {
        command: Value,
        shell: bool,
    },
    /// `open`: open a file and wait for its window.
    Open {
        path: String,
    },
    /// `execute` / `command`: run a command; optionally keep its stdout/stderr in the task cache.
    Execute {
        command: Value,
        shell: bool,
        stdout: Option<String>,
        stderr: Option<String>,
        until: Until,
    },
    Sleep {
        seconds: f64,
    },
    ActivateWindow {
        window_name: String,
        strict: bool,
        by_class: bool,
    },
    CloseWindow {
        window_name: String,
        strict: bool,
        by_class: bool,
    },
    /// `download`: fetch each URL on the host (cached by URL), upload it to `path` in the guest.
    Download {
        files: Vec<(String, String)>,
    },
    /// `upload_file`: upload a host file to `path` in the guest.
    UploadFile {
        files: Vec<(PathBuf, String)>,
    },
}

/// A JSON boolean, or OSWorld's occasional `"true"` string.
pub(crate) fn truthy(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.to_ascii_lowercase().as_str(), "true" | "1" | "yes"),
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        _ => false,
    }
}

fn text(params: &Value, key: &str) -> Option<String> {
    params.get(key).and_then(Value::as_str).map(str::to_owned)
}

impl SetupStep {
    /// Parses a `{type, parameters}` step; `Err("setup step <type>")` for what we do not support
    /// (or `Err("setup step <type> (<problem>)")` when its parameters are malformed).
    pub fn parse(raw: &RawStep) -> Result<Self, String> {
        let p = &raw.parameters;
        let kind = raw.kind.as_str();
        let bad = |what: &str| format!("setup step {kind} ({what})");
        let command = || match p.get("command") {
            Some(c @ (Value::String(_) | Value::Array(_))) => Ok(c.clone()),
            _ => Err(bad("no command")),
        };
        let window = || {
            text(p, "window_name")
                .filter(|w| !w.is_empty())
                .ok_or_else(|| bad("no window_name"))
        };
        Ok(match kind {
            "launch" => Self::Launch {
                command: command()?,
                shell: truthy(p.get("shell")),
            },
            "open" => Self::Open {
                path: text(p, "path").ok_or_else(|| bad("no path"))?,
            },
            "execute" | "command" => {
                let until = p.get("until").cloned().unwrap_or(Value::Null);
                Self::Execute {
                    command: command()?,
                    shell: truthy(p.get("shell")),
                    stdout: text(p, "stdout").filter(|s| !s.is_empty()),
                    stderr: text(p, "stderr").filter(|s| !s.is_empty()),
                    until: Until {
                        returncode: until.get("returncode").and_then(Value::as_i64),
                        stdout: text(&until, "stdout"),
                        stderr: text(&until, "stderr"),
                    },
                }
            }
            "sleep" => Self::Sleep {
                seconds: p
                    .get("seconds")
                    .and_then(Value::as_f64)
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| bad("no seconds"))?,
            },
            "activate_window" => Self::ActivateWindow {
                window_name: window()?,
                strict: truthy(p.get("strict")),
                by_class: truthy(p.get("by_class")),
            },
            "close_window" => Self::CloseWindow {
                window_name: window()?,
                strict: truthy(p.get("strict")),
                by_class: truthy(p.get("by_class")),
            },
            "download" => Self::Download {
                files: file_pairs(p, "url").ok_or_else(|| bad("files need url and path"))?,
            },
            "upload_file" => Self::UploadFile {
                files: file_pairs(p, "local_path")
                    .ok_or_else(|| bad("files need local_path and path"))?
                    .into_iter()
                    .map(|(local, path)| (PathBuf::from(local), path))
                    .collect(),
            },
            other => return Err(format!("setup step {other}")),
        })
    }

    /// The step's type name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Launch { .. } => "launch",
            Self::Open { .. } => "open",
            Self::Execute { .. } => "execute",
            Self::Sleep { .. } => "sleep",
            Self::ActivateWindow { .. } => "activate_window",
            Self::CloseWindow { .. } => "close_window",
            Self::Download { .. } => "download",
            Self::UploadFile { .. } => "upload_file",
        }
    }
}

/// Parses every step, or names every one we do not support.
pub(crate) fn parse_steps(raw: &[RawStep]) -> Result<Vec<SetupStep>, Vec<String>> {
    let mut steps = Vec::new();
    let mut missing = Vec::new();
    for step in raw {
        match SetupStep::parse(step) {
            Ok(s) => steps.push(s),
            Err(m) => missing.push(m),
        }
    }
    if missing.is_empty() {
        Ok(steps)
    } else {
        Err(missing)
    }
}

fn file_pairs(p: &Value, source_key: &str) -> Option<Vec<(String, String)>> {
    p.get("files")?
        .as_array()?
        .iter()
        .map(|f| {
            let source = f.get(source_key)?.as_str().filter(|s| !s.is_empty())?;
            let path = f.get("path")?.as_str().filter(|s| !s.is_empty())?;
            Some((source.to_owned(), path.to_owned()))
        })
        .collect()
}

/// What setup steps need besides the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct SetupContext {
    /// The task's cache folder (`stdout`/`stderr` files of `execute`, getters' files).
    pub task_cache: PathBuf,
    /// The download cache, shared by tasks, keyed by URL.
    pub download_cache: PathBuf,
    /// Replaces `{CLIENT_PASSWORD}` in commands.
    pub client_password: String,
    /// Replaces `{SCREEN_WIDTH}`, `{SCREEN_HEIGHT}` and their `_HALF`s.
    pub screen: (u32, u32),
    pub download_timeout: Duration,
    /// The largest download kept; a larger one stops with [`VmwareError::DownloadTooLarge`].
    pub max_download_bytes: u64,
    /// The folders `upload_file` may read from (the examples folder, the env's cache); a
    /// relative `local_path` is looked up in each, in order.
    pub upload_roots: Vec<PathBuf>,
}

/// `{CLIENT_PASSWORD}`, `{SCREEN_WIDTH}`, `{SCREEN_HEIGHT}`, `{SCREEN_WIDTH_HALF}`,
/// `{SCREEN_HEIGHT_HALF}` replaced in a command (a string or each string of a list).
pub fn substitute(command: &Value, ctx: &SetupContext) -> Value {
    let (w, h) = ctx.screen;
    let apply = |s: &str| {
        s.replace("{CLIENT_PASSWORD}", &ctx.client_password)
            .replace("{SCREEN_WIDTH_HALF}", &(w / 2).to_string())
            .replace("{SCREEN_HEIGHT_HALF}", &(h / 2).to_string())
            .replace("{SCREEN_WIDTH}", &w.to_string())
            .replace("{SCREEN_HEIGHT}", &h.to_string())
    };
    match command {
        Value::String(s) => Value::String(apply(s)),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Value::String(apply(s)),
                    other => other.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// OSWorld's `launch` splits a plain string command on whitespace unless `shell`.
fn launch_command(command: &Value, shell: bool) -> Value {
    match command {
        Value::String(s) if !shell && s.split_whitespace().count() > 1 => Value::Array(
            s.split_whitespace()
                .map(|p| Value::String(p.to_owned()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A file name that is safe inside a cache folder.
pub(crate) fn safe_file_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let cleaned: String = base
        .chars()
        .map(|c| if c.is_control() || c == ':' { '_' } else { c })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => "file".to_owned(),
        _ => cleaned,
    }
}

/// The cache file of a URL: `<cache>/<fnv1a64(url) hex>_<file name>`.
pub fn download_cache_path(cache: &Path, url: &str, guest_path: &str) -> PathBuf {
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in url.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    cache.join(format!("{hash:016x}_{}", safe_file_name(guest_path)))
}

/// Why an `upload_file` `local_path` is refused before anything is read: absolute paths and
/// `..` components could name any host file.
pub fn upload_path_problem(local: &Path) -> Option<&'static str> {
    use std::path::Component;
    if local.as_os_str().is_empty() {
        return Some("it is empty");
    }
    for c in local.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Some("it is absolute (give a path relative to the examples folder)");
            }
            Component::ParentDir => return Some("it climbs out with `..`"),
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    None
}

/// The host file of an `upload_file` `local_path`: the first of `roots` that holds it, checked
/// (after resolving links) to stay inside that root.
pub fn resolve_upload(local: &Path, roots: &[PathBuf]) -> Result<PathBuf, String> {
    if let Some(problem) = upload_path_problem(local) {
        return Err(problem.to_owned());
    }
    for root in roots {
        let candidate = root.join(local);
        if !candidate.is_file() {
            continue;
        }
        let (Ok(real), Ok(real_root)) = (candidate.canonicalize(), root.canonicalize()) else {
            continue;
        };
        if !real.starts_with(&real_root) {
            return Err(format!(
                "it resolves (through a link) to {}, outside {}",
                real.display(),
                real_root.display()
            ));
        }
        return Ok(real);
    }
    Err(format!(
        "no such file under {}",
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

/// Every `upload_file` path of `steps` checked before any step runs.
pub fn check_uploads(task_id: &str, steps: &[SetupStep]) -> Result<(), VmwareError> {
    for step in steps {
        if let SetupStep::UploadFile { files } = step {
            for (local, _) in files {
                if let Some(reason) = upload_path_problem(local) {
                    return Err(VmwareError::UnsafeUpload {
                        task_id: task_id.to_owned(),
                        path: local.display().to_string(),
                        reason: reason.to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Fetches `url` into `dest` unless it is there: streamed to a temporary file (never more than
/// `max_bytes`), then renamed, so that a partial download is never taken for the file.
pub async fn fetch_cached(
    url: &str,
    dest: &Path,
    timeout: Duration,
    max_bytes: u64,
) -> Result<(), VmwareError> {
    if dest.is_file() {
        return Ok(());
    }
    let cache = dest.parent().unwrap_or(Path::new(".")).to_path_buf();
    let fail = |reason: String| VmwareError::Download {
        url: url.to_owned(),
        cache: cache.clone(),
        reason,
    };
    std::fs::create_dir_all(&cache).map_err(|e| VmwareError::io("create folder", &cache, e))?;
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let too_large = |seen: u64| VmwareError::DownloadTooLarge {
        url: url.to_owned(),
        limit: max_bytes,
        seen,
        cache: cache.clone(),
    };
    let mut last = String::new();
    for attempt in 1..=3u32 {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => {
                if let Some(len) = r.content_length().filter(|l| *l > max_bytes) {
                    return Err(too_large(len));
                }
                let tmp = dest.with_extension(format!("part{}", std::process::id()));
                match stream_to(r, &tmp, max_bytes).await {
                    Ok(()) => {
                        std::fs::rename(&tmp, dest)
                            .map_err(|e| VmwareError::io("rename", &tmp, e))?;
                        return Ok(());
                    }
                    Err(Streamed::TooLarge(seen)) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(too_large(seen));
                    }
                    Err(Streamed::Io(e)) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(VmwareError::io("write", &tmp, e));
                    }
                    Err(Streamed::Http(e)) => {
                        let _ = std::fs::remove_file(&tmp);
                        last = e;
                    }
                }
            }
            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
            Err(e) => last = e.to_string(),
        }
        tracing::warn!(url, attempt, error = %last, "download failed");
        if attempt < 3 {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
    }
    Err(fail(last))
}

enum Streamed {
    TooLarge(u64),
    Io(std::io::Error),
    Http(String),
}

/// Writes a response body to `path` chunk by chunk, stopping past `max_bytes`.
async fn stream_to(
    mut response: reqwest::Response,
    path: &Path,
    max_bytes: u64,
) -> Result<(), Streamed> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).map_err(Streamed::Io)?;
    let mut seen = 0u64;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Streamed::Http(e.to_string()))?
    {
        seen += chunk.len() as u64;
        if seen > max_bytes {
            return Err(Streamed::TooLarge(seen));
        }
        file.write_all(&chunk).map_err(Streamed::Io)?;
    }
    file.flush().map_err(Streamed::Io)
}

/// Logs a guest error status and goes on (OSWorld's behaviour); other errors stop setup.
fn tolerate(step: &str, result: Result<String, VmwareError>) -> Result<(), VmwareError> {
    match result {
        Ok(_) => Ok(()),
        Err(VmwareError::GuestStatus { status, body, .. }) => {
            tracing::warn!(step, status, body, "setup step answered an error; going on");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Runs the steps in order.
pub async fn run_steps(
    steps: &[SetupStep],
    guest: &GuestClient,
    ctx: &SetupContext,
) -> Result<(), VmwareError> {
    for step in steps {
        tracing::info!(step = step.name(), "setup");
        run_step(step, guest, ctx).await?;
    }
    Ok(())
}

async fn run_step(
    step: &SetupStep,
    guest: &GuestClient,
    ctx: &SetupContext,
) -> Result<(), VmwareError> {
    match step {
        SetupStep::Launch { command, shell } => tolerate(
            "launch",
            guest.launch(&launch_command(command, *shell), *shell).await,
        ),
        SetupStep::Open { path } => tolerate("open", guest.open_file(path).await),
        SetupStep::Sleep { seconds } => {
            tokio::time::sleep(Duration::from_secs_f64(*seconds)).await;
            Ok(())
        }
        SetupStep::ActivateWindow {
            window_name,
            strict,
            by_class,
        } => tolerate(
            "activate_window",
            guest.activate_window(window_name, *strict, *by_class).await,
        ),
        SetupStep::CloseWindow {
            window_name,
            strict,
            by_class,
        } => tolerate(
            "close_window",
            guest.close_window(window_name, *strict, *by_class).await,
        ),
        SetupStep::Execute {
            command,
            shell,
            stdout,
            stderr,
            until,
        } => {
            let command = substitute(command, ctx);
            let mut failures = 0;
            loop {
                let done = match guest.execute(&command, *shell, true).await {
                    Ok(out) => {
                        for (name, content) in [(stdout, &out.output), (stderr, &out.error)] {
                            if let Some(name) = name {
                                let path = ctx.task_cache.join(safe_file_name(name));
                                std::fs::create_dir_all(&ctx.task_cache).map_err(|e| {
                                    VmwareError::io("create folder", &ctx.task_cache, e)
                                })?;
                                std::fs::write(&path, content)
                                    .map_err(|e| VmwareError::io("write", &path, e))?;
                            }
                        }
                        until.is_empty()
                            || until.returncode.is_some_and(|c| out.returncode == Some(c))
                            || until
                                .stdout
                                .as_ref()
                                .is_some_and(|s| out.output.contains(s))
                            || until.stderr.as_ref().is_some_and(|s| out.error.contains(s))
                    }
                    Err(VmwareError::GuestStatus { status, body, .. }) => {
                        tracing::warn!(status, body, "setup execute failed");
                        failures += 1;
                        until.is_empty()
                    }
                    Err(e) => return Err(e),
                };
                if done || failures >= 5 {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        SetupStep::Download { files } => {
            for (url, path) in files {
                let cached = download_cache_path(&ctx.download_cache, url, path);
                fetch_cached(url, &cached, ctx.download_timeout, ctx.max_download_bytes).await?;
                let data =
                    std::fs::read(&cached).map_err(|e| VmwareError::io("read", &cached, e))?;
                tolerate("download (upload)", guest.upload(path, data).await)?;
            }
            Ok(())
        }
        SetupStep::UploadFile { files } => {
            for (local, path) in files {
                let host = resolve_upload(local, &ctx.upload_roots).map_err(|reason| {
                    VmwareError::UnsafeUpload {
                        task_id: ctx
                            .task_cache
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        path: local.display().to_string(),
                        reason,
                    }
                })?;
                let data = std::fs::read(&host).map_err(|e| VmwareError::Setup {
                    step: "upload_file".into(),
                    reason: format!("cannot read {}: {e}", host.display()),
                })?;
                tolerate("upload_file", guest.upload(path, data).await)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(kind: &str, parameters: Value) -> RawStep {
        RawStep {
            kind: kind.into(),
            parameters,
        }
    }

    #[test]
    fn parses_the_supported_steps_and_names_the_others() {
        let step = SetupStep::parse(&raw(
            "command",
            json!({"command": ["grep", "x"], "stdout": "grep.out", "shell": "true"}),
        ))
        .expect("command");
        assert_eq!(
            step,
            SetupStep::Execute {
                command: json!(["grep", "x"]),
                shell: true,
                stdout: Some("grep.out".into()),
                stderr: None,
                until: Until::default(),
            }
        );
        assert_eq!(
            SetupStep::parse(&raw("chrome_open_tabs", json!({"urls_to_open": []}))),
            Err("setup step chrome_open_tabs".to_string())
        );
        assert_eq!(
            SetupStep::parse(&raw("sleep", json!({}))),
            Err("setup step sleep (no seconds)".to_string())
        );
        assert_eq!(
            SetupStep::parse(&raw(
                "download",
                json!({"files": [{"url": "u", "path": "/p"}]})
            )),
            Ok(SetupStep::Download {
                files: vec![("u".into(), "/p".into())]
            })
        );
    }

    #[test]
    fn substitutes_password_and_screen() {
        let ctx = SetupContext {
            task_cache: PathBuf::new(),
            download_cache: PathBuf::new(),
            client_password: "pw".into(),
            screen: (1920, 1080),
            download_timeout: Duration::from_secs(1),
            max_download_bytes: 1 << 20,
            upload_roots: Vec::new(),
        };
        assert_eq!(
            substitute(
                &json!([
                    "echo {CLIENT_PASSWORD} | sudo -S x",
                    "{SCREEN_WIDTH}x{SCREEN_HEIGHT}",
                    "{SCREEN_WIDTH_HALF},{SCREEN_HEIGHT_HALF}",
                    3
                ]),
                &ctx
            ),
            json!(["echo pw | sudo -S x", "1920x1080", "960,540", 3])
        );
    }

    #[test]
    fn launch_splits_plain_strings_like_osworld() {
        assert_eq!(
            launch_command(&json!("code /tmp/a.txt"), false),
            json!(["code", "/tmp/a.txt"])
        );
        assert_eq!(
            launch_command(&json!("code /tmp/a.txt"), true),
            json!("code /tmp/a.txt")
        );
    }

    #[test]
    fn cache_paths_are_keyed_by_url_and_safe() {
        let a = download_cache_path(Path::new("/c"), "https://x/1", "/home/user/a.txt");
        let b = download_cache_path(Path::new("/c"), "https://x/2", "/home/user/a.txt");
        assert_ne!(a, b);
        assert!(a.to_string_lossy().ends_with("_a.txt"));
        assert_eq!(safe_file_name("../.."), "file");
        assert_eq!(safe_file_name("GLUE: A.pdf"), "GLUE_ A.pdf");
    }

    #[test]
    fn upload_paths_outside_the_roots_are_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join("a.txt"), "a").expect("write");
        std::fs::write(outside.path().join("secret"), "s").expect("write");
        let roots = vec![root.path().to_path_buf()];
        assert!(resolve_upload(Path::new("a.txt"), &roots).is_ok());
        for bad in ["/etc/passwd", "../secret", "x/../../secret", ""] {
            assert!(upload_path_problem(Path::new(bad)).is_some(), "{bad}");
            assert!(resolve_upload(Path::new(bad), &roots).is_err(), "{bad}");
        }
        assert!(resolve_upload(Path::new("missing.txt"), &roots).is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
                .expect("symlink");
            let err = resolve_upload(Path::new("link"), &roots).expect_err("a link out");
            assert!(err.contains("outside"), "{err}");
        }
    }
}

//! The client of OSWorld's guest HTTP server (`desktop_env/server/main.py`, port 5000).
//!
//! Every request has a timeout. Connection errors and 5xx answers are retried with exponential
//! backoff; a timeout is not retried (an action that timed out may have run, and must not run
//! twice). Screenshots are checked to be PNG or JPEG and their size is read from the image.

use std::io::Cursor;
use std::time::{Duration, Instant};

use arpo_core::Screenshot;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::VmwareError;

/// Timeouts and retries of the guest client.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestConfig {
    /// The limit of an ordinary request (screenshot, file, window operations).
    pub request_timeout: Duration,
    /// The limit of `/execute` (OSWorld's controller uses 90 s; the server kills commands at 120 s).
    pub execute_timeout: Duration,
    /// The limit of `/setup/open_file`, which blocks until the window shows.
    pub open_timeout: Duration,
    /// Tries per request on connection errors and 5xx answers.
    pub attempts: u32,
    /// The first backoff; it doubles after each failure, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            execute_timeout: Duration::from_secs(90),
            open_timeout: Duration::from_secs(180),
            attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The answer of `/execute`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecOutput {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub returncode: Option<i64>,
}

/// A client of one guest server.
#[derive(Debug, Clone)]
pub struct GuestClient {
    base: String,
    http: reqwest::Client,
    config: GuestConfig,
}

impl GuestClient {
    /// A client of the server at `base` (`http://192.168.56.101:5000`; a trailing `/` is ignored).
    pub fn new(base: &str, config: GuestConfig) -> Result<Self, VmwareError> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(VmwareError::GuestProtocol {
                url: base,
                operation: "connect".into(),
                reason: "the guest URL must start with http:// or https://".into(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| VmwareError::GuestProtocol {
                url: base.clone(),
                operation: "connect".into(),
                reason: e.to_string(),
            })?;
        Ok(Self { base, http, config })
    }

    /// The client of OSWorld's server on a VM's IP (port 5000).
    pub fn for_ip(ip: std::net::IpAddr, config: GuestConfig) -> Result<Self, VmwareError> {
        let host = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        };
        Self::new(&format!("http://{host}:5000"), config)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn config(&self) -> &GuestConfig {
        &self.config
    }

    /// Sends a request built by `make` (called once per try) and returns a non-5xx answer.
    async fn send(
        &self,
        operation: &str,
        timeout: Duration,
        make: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, VmwareError> {
        let url = format!("{}{operation}", self.base);
        let attempts = self.config.attempts.max(1);
        let mut backoff = self.config.backoff;
        let mut last_error = String::new();
        let mut last_status = None;
        for attempt in 1..=attempts {
            match make(&self.http, &url).timeout(timeout).send().await {
                Ok(response) if response.status().is_server_error() => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    tracing::warn!(%url, status, attempt, "guest server error");
                    last_status = Some((status, truncate(&body, 500)));
                }
                Ok(response) => return Ok(response),
                Err(e) if e.is_timeout() => {
                    return Err(VmwareError::GuestTimeout {
                        url: self.base.clone(),
                        operation: operation.to_owned(),
                        seconds: timeout.as_secs_f64(),
                        hint: "the guest may be frozen or its screen locked; check the VM's window"
                            .into(),
                    });
                }
                Err(e) => {
                    tracing::warn!(%url, attempt, error = %e, "guest unreachable");
                    last_status = None;
                    last_error = error_chain(&e);
                }
            }
            if attempt < attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.config.max_backoff);
            }
        }
        Err(match last_status {
            Some((status, body)) => VmwareError::GuestStatus {
                url: self.base.clone(),
                operation: operation.to_owned(),
                status,
                body,
            },
            None => VmwareError::GuestUnreachable {
                url: self.base.clone(),
                operation: operation.to_owned(),
                attempts,
                reason: last_error,
            },
        })
    }

    /// Fails on any non-2xx status with its body.
    async fn expect_ok(
        &self,
        operation: &str,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, VmwareError> {
        if response.status().is_success() {
            Ok(response)
        } else {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            Err(VmwareError::GuestStatus {
                url: self.base.clone(),
                operation: operation.to_owned(),
                status,
                body: truncate(&body, 500),
            })
        }
    }

    async fn bytes(
        &self,
        operation: &str,
        response: reqwest::Response,
    ) -> Result<Vec<u8>, VmwareError> {
        response
            .bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| self.read_error(operation, &e))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        operation: &str,
        response: reqwest::Response,
    ) -> Result<T, VmwareError> {
        let bytes = self.bytes(operation, response).await?;
        serde_json::from_slice(&bytes).map_err(|e| VmwareError::GuestProtocol {
            url: self.base.clone(),
            operation: operation.to_owned(),
            reason: format!("{e}: {:?}", truncate(&String::from_utf8_lossy(&bytes), 200)),
        })
    }

    fn read_error(&self, operation: &str, e: &reqwest::Error) -> VmwareError {
        if e.is_timeout() {
            VmwareError::GuestTimeout {
                url: self.base.clone(),
                operation: operation.to_owned(),
                seconds: self.config.request_timeout.as_secs_f64(),
                hint: "the answer stopped half way".into(),
            }
        } else {
            VmwareError::GuestUnreachable {
                url: self.base.clone(),
                operation: operation.to_owned(),
                attempts: 1,
                reason: error_chain(e),
            }
        }
    }

    /// `GET /screenshot`: a PNG or JPEG screenshot with its size.
    pub async fn screenshot(&self) -> Result<Screenshot, VmwareError> {
        let op = "/screenshot";
        let response = self
            .send(op, self.config.request_timeout, |c, u| c.get(u))
            .await?;
        let response = self.expect_ok(op, response).await?;
        let bytes = self.bytes(op, response).await?;
        decode_screenshot(bytes).map_err(|reason| VmwareError::BadScreenshot {
            url: self.base.clone(),
            reason,
        })
    }

    /// Polls `GET /screenshot` until it answers 200 with an image, or `timeout` passes.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
        poll: Duration,
    ) -> Result<Screenshot, VmwareError> {
        let started = Instant::now();
        let url = format!("{}/screenshot", self.base);
        let mut last;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let attempt = self
                .http
                .get(&url)
                .timeout(
                    left.min(Duration::from_secs(10))
                        .max(Duration::from_millis(100)),
                )
                .send()
                .await;
            match attempt {
                Ok(response) if response.status().is_success() => match response.bytes().await {
                    Ok(bytes) => match decode_screenshot(bytes.to_vec()) {
                        Ok(shot) => return Ok(shot),
                        Err(reason) => last = reason,
                    },
                    Err(e) => last = error_chain(&e),
                },
                Ok(response) => last = format!("HTTP {}", response.status().as_u16()),
                Err(e) => last = error_chain(&e),
            }
            if started.elapsed() + poll >= timeout {
                return Err(VmwareError::GuestTimeout {
                    url: self.base.clone(),
                    operation: "readiness (GET /screenshot)".into(),
                    seconds: timeout.as_secs_f64(),
                    hint: format!(
                        "last answer: {last}; is OSWorld's server running in the guest (port 5000) and the guest's firewall open?"
                    ),
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// `POST /execute` (or `/setup/execute` when `setup`): runs a command in the guest.
    ///
    /// A 500 answer (a failing or timed-out command) is an error after the retries.
    pub async fn execute(
        &self,
        command: &Value,
        shell: bool,
        setup: bool,
    ) -> Result<ExecOutput, VmwareError> {
        let op = if setup { "/setup/execute" } else { "/execute" };
        let body = json!({"command": command, "shell": shell});
        let response = self
            .send(op, self.config.execute_timeout, |c, u| {
                c.post(u).json(&body)
            })
            .await?;
        let response = self.expect_ok(op, response).await?;
        self.json(op, response).await
    }

    /// Runs an action program the way OSWorld's controller does:
    /// `["python", "-c", "import pyautogui; ...; <program>"]` through `/execute`.
    pub async fn execute_pyautogui(&self, program: &str) -> Result<ExecOutput, VmwareError> {
        let command = crate::pyautogui::python_command(program);
        self.execute(&json!(command), false, false).await
    }

    async fn post_setup(
        &self,
        op: &str,
        body: Value,
        timeout: Duration,
    ) -> Result<String, VmwareError> {
        let response = self.send(op, timeout, |c, u| c.post(u).json(&body)).await?;
        let response = self.expect_ok(op, response).await?;
        let bytes = self.bytes(op, response).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `POST /setup/launch`: starts a program and does not wait for it.
    pub async fn launch(&self, command: &Value, shell: bool) -> Result<String, VmwareError> {
        self.post_setup(
            "/setup/launch",
            json!({"command": command, "shell": shell}),
            self.config.request_timeout,
        )
        .await
    }

    /// `POST /setup/open_file`: opens a file and waits for its window.
    pub async fn open_file(&self, path: &str) -> Result<String, VmwareError> {
        self.post_setup(
            "/setup/open_file",
            json!({"path": path}),
            self.config.open_timeout,
        )
        .await
    }

    /// `POST /setup/activate_window`.
    pub async fn activate_window(
        &self,
        window_name: &str,
        strict: bool,
        by_class: bool,
    ) -> Result<String, VmwareError> {
        self.post_setup(
            "/setup/activate_window",
            json!({"window_name": window_name, "strict": strict, "by_class": by_class}),
            self.config.request_timeout,
        )
        .await
    }

    /// `POST /setup/close_window`.
    pub async fn close_window(
        &self,
        window_name: &str,
        strict: bool,
        by_class: bool,
    ) -> Result<String, VmwareError> {
        self.post_setup(
            "/setup/close_window",
            json!({"window_name": window_name, "strict": strict, "by_class": by_class}),
            self.config.request_timeout,
        )
        .await
    }

    /// `POST /setup/upload`: writes `data` to `path` in the guest (multipart `file_path` + `file_data`).
    pub async fn upload(&self, path: &str, data: Vec<u8>) -> Result<String, VmwareError> {
        let op = "/setup/upload";
        let file_name = path.rsplit(['/', '\\']).next().unwrap_or(path).to_owned();
        let response = self
            .send(op, self.config.request_timeout * 4, |c, u| {
                let part =
                    reqwest::multipart::Part::bytes(data.clone()).file_name(file_name.clone());
                let form = reqwest::multipart::Form::new()
                    .text("file_path", path.to_owned())
                    .part("file_data", part);
                c.post(u).multipart(form)
            })
            .await?;
        let response = self.expect_ok(op, response).await?;
        let bytes = self.bytes(op, response).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `POST /file`: the file at `path` in the guest, `None` when the server says it does not exist.
    pub async fn file(&self, path: &str) -> Result<Option<Vec<u8>>, VmwareError> {
        let op = "/file";
        let response = self
            .send(op, self.config.request_timeout * 4, |c, u| {
                c.post(u).form(&[("file_path", path)])
            })
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = self.expect_ok(op, response).await?;
        self.bytes(op, response).await.map(Some)
    }

    /// `POST /screen_size`.
    pub async fn screen_size(&self) -> Result<(u32, u32), VmwareError> {
        #[derive(Deserialize)]
        struct Size {
            width: u32,
            height: u32,
        }
        let op = "/screen_size";
        let response = self
            .send(op, self.config.request_timeout, |c, u| c.post(u))
            .await?;
        let response = self.expect_ok(op, response).await?;
        let size: Size = self.json(op, response).await?;
        Ok((size.width, size.height))
    }

    /// `GET /platform` (`Linux`, `Windows`, `Darwin`).
    pub async fn platform(&self) -> Result<String, VmwareError> {
        let op = "/platform";
        let response = self
            .send(op, self.config.request_timeout, |c, u| c.get(u))
            .await?;
        let response = self.expect_ok(op, response).await?;
        let bytes = self.bytes(op, response).await?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
    }

    /// `GET /cursor_position`.
    pub async fn cursor_position(&self) -> Result<(i64, i64), VmwareError> {
        let op = "/cursor_position";
        let response = self
            .send(op, self.config.request_timeout, |c, u| c.get(u))
            .await?;
        let response = self.expect_ok(op, response).await?;
        let (x, y): (f64, f64) = self.json(op, response).await?;
        Ok((x.round() as i64, y.round() as i64))
    }

    /// `GET /accessibility`: the accessibility tree XML.
    pub async fn accessibility_tree(&self) -> Result<String, VmwareError> {
        #[derive(Deserialize)]
        struct Tree {
            #[serde(rename = "AT")]
            at: Option<String>,
        }
        let op = "/accessibility";
        let response = self
            .send(op, self.config.request_timeout, |c, u| c.get(u))
            .await?;
        let response = self.expect_ok(op, response).await?;
        let tree: Tree = self.json(op, response).await?;
        Ok(tree.at.unwrap_or_default())
    }

    /// `GET /terminal`: the text of the open terminal.
    pub async fn terminal_output(&self) -> Result<Option<String>, VmwareError> {
        #[derive(Deserialize)]
        struct Terminal {
            output: Option<String>,
        }
        let op = "/terminal";
        let response = self
            .send(op, self.config.request_timeout, |c, u| c.get(u))
            .await?;
        let response = self.expect_ok(op, response).await?;
        let terminal: Terminal = self.json(op, response).await?;
        Ok(terminal.output)
    }
}

/// Checks the bytes are a PNG or JPEG image and reads its size.
pub fn decode_screenshot(bytes: Vec<u8>) -> Result<Screenshot, String> {
    if arpo_core::ImageFormat::sniff(&bytes).is_none() {
        let head: String = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "{} bytes starting with {head}, neither PNG nor JPEG",
            bytes.len()
        ));
    }
    let (width, height) = image::ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| format!("cannot read the image size: {e}"))?;
    Ok(Screenshot::new(bytes, width, height))
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

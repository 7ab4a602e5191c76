//! The remote [`Policy`]: UI-TARS through any OpenAI-compatible server (arpo-serve, vLLM,
//! SGLang), with the sampled token ids and their log-probs.
//!
//! Prompts are built with [`arpo_core::protocol::build_messages`], the same as the local
//! policy's. Token ids come from the log-prob entries: `token_id:<id>` when the server honours
//! vLLM's `return_tokens_as_token_ids` (arpo-serve and vLLM do), else the entry's `bytes`
//! mapped through the model's byte-level BPE vocabulary (`tokenizer.json`, SGLang).
//!
//! One policy may spread its requests over several servers (the least busy live one first);
//! a server that does not answer is set aside for a while, its request retried on another,
//! and the failure logged and counted ([`RemotePolicy::server_failures`]). With no model name
//! the first model `GET /v1/models` lists is used. Weights reach every server through the
//! engine's own route ([`WeightSync`]); a server a push did not reach gets no requests until a
//! later push does, so rollouts never sample stale weights.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arpo_core::protocol::{PromptConfig, build_messages};
use arpo_core::{
    AgentContext, ChatMessage, ContentPart, FinishReason, Policy, PolicyError, Response,
    SamplingParams,
};
use async_trait::async_trait;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::api::{ChatCompletion, ErrorBody, ModelList, TokenLogprob};
use crate::error::ServeError;

/// The environment variable the api key is read from when the config gives none.
pub const API_KEY_ENV: &str = "ARPO_SERVER_API_KEY";

/// How long a server that failed is passed over (unless every server is down).
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Where and how the remote policy asks.
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePolicyConfig {
    /// The OpenAI base URLs, e.g. `http://localhost:9000/v1`; requests are spread over them.
    pub base_urls: Vec<String>,
    /// The `model` of each request (the served name, or a LoRA adapter's name); empty: the
    /// first model the server lists (`GET /v1/models`).
    pub model: String,
    /// Sent as `Authorization: Bearer <key>` on every request.
    pub api_key: Option<String>,
    pub prompt: PromptConfig,
    /// Per-request time limit.
    pub timeout: Duration,
    /// Most requests in flight at once over all servers (each server batches its share).
    pub max_concurrency: usize,
    /// Ask for vLLM's `return_tokens_as_token_ids` (turn off for servers that reject it).
    pub token_ids_in_logprobs: bool,
}

impl RemotePolicyConfig {
    /// `base_url` may list several servers separated by commas; the api key is read from
    /// [`API_KEY_ENV`] when set.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        let base_url = base_url.into();
        Self {
            base_urls: split_urls(&base_url),
            model: model.into(),
            api_key: std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty()),
            prompt: PromptConfig::default(),
            timeout: Duration::from_secs(600),
            max_concurrency: 64,
            token_ids_in_logprobs: true,
        }
    }

    /// Adds servers to spread requests over (commas allowed inside each entry).
    pub fn with_more_urls<S: AsRef<str>>(mut self, urls: &[S]) -> Self {
        for url in urls {
            for u in split_urls(url.as_ref()) {
                if !self.base_urls.contains(&u) {
                    self.base_urls.push(u);
                }
            }
        }
        self
    }
}

fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// How trained weights reach the serving engine (`worker.rollout.weight_sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSync {
    /// A PEFT adapter directory through `POST /v1/load_lora_adapter` (vLLM, arpo-serve); the
    /// adapter's name becomes the model of further requests.
    LoraAdapter,
    /// A full checkpoint directory through SGLang's `POST /update_weights_from_disk`.
    SglangDisk,
    /// A full checkpoint directory through arpo-serve's `POST /v1/reload_weights`.
    ArpoReload,
    /// The server keeps its weights (evaluation, or weights synced by other means).
    None,
}

impl WeightSync {
    pub const NAMES: [&'static str; 4] = ["lora_adapter", "sglang_disk", "arpo_reload", "none"];

    /// Whether the push is a LoRA adapter (else a full checkpoint, or nothing).
    pub fn is_adapter(self) -> bool {
        self == Self::LoraAdapter
    }
}

impl FromStr for WeightSync {
    type Err = ServeError;

    fn from_str(s: &str) -> Result<Self, ServeError> {
        match s {
            "lora_adapter" => Ok(Self::LoraAdapter),
            "sglang_disk" => Ok(Self::SglangDisk),
            "arpo_reload" => Ok(Self::ArpoReload),
            "none" => Ok(Self::None),
            other => Err(ServeError::WeightSync {
                given: other.to_string(),
            }),
        }
    }
}

/// The text of an error, without its kind's prefix.
fn message(error: &PolicyError) -> &str {
    match error {
        PolicyError::InvalidInput(m) | PolicyError::Generation(m) | PolicyError::Server(m) => m,
    }
}

/// One error from one per server: a single one as it is; several as one naming each (a
/// client error when every server refused, else a server error).
fn combine(mut errors: Vec<PolicyError>, what: &str) -> PolicyError {
    if errors.len() == 1 {
        return errors.remove(0);
    }
    let joined = errors.iter().map(message).collect::<Vec<_>>().join("; ");
    if errors
        .iter()
        .all(|e| matches!(e, PolicyError::InvalidInput(_)))
    {
        PolicyError::InvalidInput(format!("every model server refused {what}: {joined}"))
    } else {
        PolicyError::Server(format!("every model server failed {what}: {joined}"))
    }
}

/// The path as the server must read it: a relative path would be taken from the server's own
/// working directory.
fn absolute(path: &Path) -> Result<std::path::PathBuf, PolicyError> {
    std::path::absolute(path).map_err(|e| {
        PolicyError::InvalidInput(format!("cannot make {} absolute: {e}", path.display()))
    })
}

/// What one server went through: requests sent and failures (transport errors, 5xx, failed
/// weight pushes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFailures {
    pub url: String,
    pub requests: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// The last weight push did not reach it: it gets no requests until one does.
    pub stale: bool,
}

#[derive(Debug)]
struct Endpoint {
    url: String,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    down_until: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    /// Holds weights older than the last push (see [`RemotePolicy::push_weights`]).
    stale: AtomicBool,
}

impl Endpoint {
    fn record_failure(&self, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_string());
    }

    fn is_down(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| t > now)
    }

    fn mark_down(&self, error: &str) {
        self.record_failure(error);
        *self
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now() + DOWN_FOR);
    }

    fn mark_up(&self) {
        *self
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// Counts a request in flight on an endpoint while alive.
struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A failed call: `retry` when another server may do better.
struct Failure {
    error: PolicyError,
    retry: bool,
}

/// Maps a log-prob entry to its token id with a byte-level BPE vocabulary.
#[derive(Debug, Clone)]
pub struct TokenMapper {
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenMapper {
    /// Reads the model's `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, ServeError> {
        let tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| ServeError::Tokenizer {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// The id of one log-prob entry: `token_id:<id>`, else its bytes in the byte-level
    /// alphabet, else its text as a special token.
    pub fn token_id(&self, entry: &TokenLogprob) -> Option<u32> {
        if let Some(id) = parse_token_id(&entry.token) {
            return Some(id);
        }
        if let Some(bytes) = &entry.bytes {
            let spelled = byte_level_spelling(bytes);
            if let Some(id) = self.tokenizer.token_to_id(&spelled) {
                return Some(id);
            }
        }
        self.tokenizer.token_to_id(&entry.token)
    }
}

/// `token_id:123` -> 123.
pub fn parse_token_id(token: &str) -> Option<u32> {
    token.strip_prefix("token_id:")?.parse().ok()
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the others
/// are shifted to U+0100 and up in byte order.
fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

fn byte_char(b: u8) -> char {
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// How a byte-level BPE vocabulary spells these bytes (`" hi\n"` -> `"ĠhiĊ"`).
pub fn byte_level_spelling(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_char(b)).collect()
}

/// The bytes a byte-level BPE vocabulary entry stands for (`"ĠhiĊ"` -> `" hi\n"`); `None`
/// when a character is outside that alphabet.
pub fn byte_level_bytes(spelled: &str) -> Option<Vec<u8>> {
    spelled
        .chars()
        .map(|c| {
            let code = c as u32;
            match u8::try_from(code) {
                Ok(b) if printable(b) => Some(b),
                Ok(_) => None,
                Err(_) => (0..=255u8)
                    .filter(|&x| !printable(x))
                    .nth(code.checked_sub(256)? as usize),
            }
        })
        .collect()
}

/// A [`Policy`] over one or more OpenAI-compatible servers.
#[derive(Debug, Clone)]
pub struct RemotePolicy {
    config: RemotePolicyConfig,
    client: reqwest::Client,
    mapper: Option<TokenMapper>,
    endpoints: Arc<Vec<Endpoint>>,
    /// The model `GET /v1/models` named, when the config names none.
    listed_model: Arc<tokio::sync::OnceCell<String>>,
}

impl RemotePolicy {
    /// `mapper` is needed for servers that do not name tokens by id (SGLang); arpo-serve and
    /// vLLM do not need it.
    pub fn new(
        config: RemotePolicyConfig,
        mapper: Option<TokenMapper>,
    ) -> Result<Self, ServeError> {
        if config.base_urls.is_empty() {
            return Err(ServeError::Url {
                url: String::new(),
                reason: "no server url given (e.g. http://localhost:9000/v1)".into(),
            });
        }
        for url in &config.base_urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ServeError::Url {
                    url: url.clone(),
                    reason:
                        "it must start with http:// or https:// (e.g. http://localhost:9000/v1)"
                            .into(),
                });
            }
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| ServeError::Http {
                url: config.base_urls.join(","),
                reason: e.to_string(),
            })?;
        let endpoints = config
            .base_urls
            .iter()
            .map(|url| Endpoint {
                url: url.clone(),
                in_flight: AtomicUsize::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                down_until: Mutex::new(None),
                last_error: Mutex::new(None),
                stale: AtomicBool::new(false),
            })
            .collect();
        Ok(Self {
            config,
            client,
            mapper,
            endpoints: Arc::new(endpoints),
            listed_model: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    pub fn config(&self) -> &RemotePolicyConfig {
        &self.config
    }

    /// Sends further requests to `model` (e.g. a freshly loaded adapter).
    pub fn set_model(&mut self, model: impl Into<String>) {
        self.config.model = model.into();
    }

    /// Per server: requests sent, failures, the last failure.
    pub fn server_failures(&self) -> Vec<ServerFailures> {
        self.endpoints
            .iter()
            .map(|e| ServerFailures {
                url: e.url.clone(),
                requests: e.requests.load(Ordering::Relaxed),
                failures: e.failures.load(Ordering::Relaxed),
                last_error: e
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
                stale: e.stale.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// The order to try the servers in: live ones by fewest requests in flight (round-robin
    /// among equals), then the ones set aside; never one that missed the last weight push.
    fn order(&self) -> Vec<usize> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = self.endpoints.len();
        let start = NEXT.fetch_add(1, Ordering::Relaxed) % n;
        let now = Instant::now();
        let mut order: Vec<usize> = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| !self.endpoints[i].stale.load(Ordering::Relaxed))
            .collect();
        order.sort_by_key(|&i| {
            let e = &self.endpoints[i];
            (e.is_down(now), e.in_flight.load(Ordering::Relaxed))
        });
        order
    }

    /// One call on one server: the answer's text, or a failure (retryable when the server
    /// did not answer or answered 5xx).
    async fn call(
        &self,
        endpoint: &Endpoint,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<String, Failure> {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(endpoint);
        endpoint.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = self.authorized(self.client.request(method.clone(), url));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| Failure {
            error: PolicyError::Server(format!("{method} {url}: {e}")),
            retry: true,
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| Failure {
            error: PolicyError::Server(format!("{method} {url}: reading the answer: {e}")),
            retry: true,
        })?;
        if status.is_success() {
            return Ok(text);
        }
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| text.chars().take(500).collect());
        let message = format!("{method} {url} answered {status}: {message}");
        Err(if status.is_client_error() {
            Failure {
                error: PolicyError::InvalidInput(message),
                retry: false,
            }
        } else {
            Failure {
                error: PolicyError::Server(message),
                retry: true,
            }
        })
    }

    /// `path` on one server after another until one answers; a server that fails is set
    /// aside and reported.
    async fn send_any(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, PolicyError> {
        let order = self.order();
        if order.is_empty() {
            return Err(PolicyError::Server(format!(
                "no model server holds the current weights: the last weight push failed on each of {} (see the log)",
                self.config.base_urls.join(", ")
            )));
        }
        let mut errors = Vec::new();
        for i in order {
            let endpoint = &self.endpoints[i];
            let url = format!("{}{path}", endpoint.url);
            match self.call(endpoint, method.clone(), &url, body).await {
                Ok(text) => {
                    endpoint.mark_up();
                    return Ok(text);
                }
                Err(Failure {
                    error,
                    retry: false,
                }) => return Err(error),
                Err(Failure { error, retry: true }) => {
                    endpoint.mark_down(message(&error));
                    if self.endpoints.len() > 1 {
                        tracing::warn!(server = %endpoint.url, error = %message(&error), "model server failed; retrying on another");
                    }
                    errors.push(error);
                }
            }
        }
        Err(combine(errors, "the request"))
    }

    /// `path` on every server, their answers in order.
    async fn send_all(&self, path: &str, body: &Value) -> Vec<Result<String, PolicyError>> {
        let calls = self.endpoints.iter().map(|endpoint| async move {
            let url = format!("{}{path}", endpoint.url);
            self.call(endpoint, reqwest::Method::POST, &url, Some(body))
                .await
                .map_err(|f| f.error)
        });
        futures::future::join_all(calls).await
    }

    /// Records a weight push's outcome per server: a server it did not reach holds other
    /// weights, so it gets no more requests until a later push reaches it (rollouts stay
    /// on-policy); that is logged and counted. Fails only when no server took the push.
    fn settle_push<T>(
        &self,
        results: Vec<Result<T, PolicyError>>,
        what: &str,
    ) -> Result<(), PolicyError> {
        let mut errors = Vec::new();
        for (endpoint, result) in self.endpoints.iter().zip(results) {
            match result {
                Ok(_) => endpoint.stale.store(false, Ordering::Relaxed),
                Err(error) => {
                    endpoint.stale.store(true, Ordering::Relaxed);
                    endpoint.record_failure(message(&error));
                    errors.push(error);
                }
            }
        }
        if errors.len() == self.endpoints.len() {
            return Err(combine(errors, what));
        }
        for f in self.server_failures().iter().filter(|f| f.stale) {
            tracing::warn!(server = %f.url, error = ?f.last_error, "{what} failed on this model server: it gets no requests until a later push reaches it");
        }
        Ok(())
    }

    /// The model requests go to: the configured one, else the first `GET /v1/models` lists.
    pub async fn model(&self) -> Result<String, PolicyError> {
        if !self.config.model.is_empty() {
            return Ok(self.config.model.clone());
        }
        self.listed_model
            .get_or_try_init(|| async {
                let text = self.send_any(reqwest::Method::GET, "/models", None).await?;
                let list: ModelList = serde_json::from_str(&text).map_err(|e| {
                    PolicyError::Server(format!(
                        "GET /v1/models did not answer a model list ({e}): is this an OpenAI-compatible server?"
                    ))
                })?;
                list.data.first().map(|m| m.id.clone()).ok_or_else(|| {
                    PolicyError::Server(
                        "GET /v1/models lists no model: set worker.rollout.server_model".into(),
                    )
                })
            })
            .await
            .cloned()
    }

    /// Asks every server for its model list (with the api key): the model requests will go
    /// to, or what is wrong with which server.
    pub async fn preflight(&self) -> Result<String, PolicyError> {
        let mut problems = Vec::new();
        for endpoint in self.endpoints.iter() {
            let url = format!("{}/models", endpoint.url);
            if let Err(f) = self.call(endpoint, reqwest::Method::GET, &url, None).await {
                problems.push(f.error.to_string());
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError::Server(format!(
                "model server check failed: {} (start one with `cargo xtask serve --model <dir>`; with --api-key, set worker.rollout.server_api_key or {API_KEY_ENV})",
                problems.join("; ")
            )));
        }
        self.model().await
    }

    /// vLLM's `POST /v1/load_lora_adapter` (a PEFT adapter directory the servers can read),
    /// on every server.
    pub async fn load_lora_adapter(&self, name: &str, path: &Path) -> Result<(), PolicyError> {
        let body = json!({"lora_name": name, "lora_path": absolute(path)?});
        let results = self.send_all("/load_lora_adapter", &body).await;
        self.settle_push(results, "loading the lora adapter")
    }

    /// vLLM's `POST /v1/unload_lora_adapter`, on every server (all must succeed).
    pub async fn unload_lora_adapter(&self, name: &str) -> Result<(), PolicyError> {
        self.send_all("/unload_lora_adapter", &json!({"lora_name": name}))
            .await
            .into_iter()
            .try_for_each(|r| r.map(|_| ()))
    }

    /// Pushes new adapter weights after a training update: unloads `name` if the server has
    /// it, loads it again from `path`, and sends further requests to it.
    pub async fn push_lora_adapter(&mut self, name: &str, path: &Path) -> Result<(), PolicyError> {
        self.push_weights(WeightSync::LoraAdapter, path, name)
            .await?;
        self.set_model(name);
        Ok(())
    }

    /// Full weights from a checkpoint directory (arpo-serve's `/v1/reload_weights`).
    pub async fn reload_weights(&self, path: &Path) -> Result<(), PolicyError> {
        let body = json!({"model_path": absolute(path)?});
        let results = self.send_all("/reload_weights", &body).await;
        self.settle_push(results, "reloading the weights")
    }

    /// SGLang's `POST /update_weights_from_disk` (at the server root, not under `/v1`); its
    /// answer says `success`.
    pub async fn update_weights_from_disk(&self, path: &Path) -> Result<(), PolicyError> {
        let body = json!({"model_path": absolute(path)?});
        let calls = self.endpoints.iter().map(|endpoint| {
            let body = &body;
            async move {
                let root = endpoint.url.strip_suffix("/v1").unwrap_or(&endpoint.url);
                let url = format!("{root}/update_weights_from_disk");
                let text = self
                    .call(endpoint, reqwest::Method::POST, &url, Some(body))
                    .await
                    .map_err(|f| f.error)?;
                let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if answer.get("success").and_then(Value::as_bool) == Some(false) {
                    return Err(PolicyError::Server(format!(
                        "POST {url} did not load {}: {}",
                        path.display(),
                        answer
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or(&text)
                    )));
                }
                Ok(())
            }
        });
        let results = futures::future::join_all(calls).await;
        self.settle_push(results, "updating the weights from disk")
    }

    /// Sends the weights in `dir` to every server the way `sync` says (for
    /// [`WeightSync::LoraAdapter`], `dir` is a PEFT adapter loaded as `adapter`; the caller
    /// then sends requests to `adapter`).
    pub async fn push_weights(
        &self,
        sync: WeightSync,
        dir: &Path,
        adapter: &str,
    ) -> Result<(), PolicyError> {
        match sync {
            WeightSync::LoraAdapter => {
                // A first push finds nothing to unload; any other failure shows in the load.
                let _ = self.unload_lora_adapter(adapter).await;
                self.load_lora_adapter(adapter, dir).await
            }
            WeightSync::SglangDisk => self.update_weights_from_disk(dir).await,
            WeightSync::ArpoReload => self.reload_weights(dir).await,
            WeightSync::None => Ok(()),
        }
    }

    /// The request body for one agent context.
    pub fn request_body(
        &self,
        model: &str,
        messages: &[ChatMessage],
        sampling: &SamplingParams,
    ) -> Value {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let parts: Vec<Value> = m
                    .content
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => json!({"type": "text", "text": text}),
                        ContentPart::Image { image } => {
                            let mime = image.format().map_or("image/png", |f| f.mime());
                            let data = base64::engine::general_purpose::STANDARD.encode(&image.bytes);
                            json!({"type": "image_url", "image_url": {"url": format!("data:{mime};base64,{data}")}})
                        }
                    })
                    .collect();
                json!({"role": m.role.as_str(), "content": parts})
            })
            .collect();
        let mut body = json!({
            "model": model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "logprobs": true,
        });
        if let Some(map) = body.as_object_mut() {
            if sampling.top_k > 0 {
                map.insert("top_k".into(), json!(sampling.top_k));
            }
            if let Some(seed) = sampling.seed {
                // vLLM (and OpenAI) take a signed 64-bit seed: the low 63 bits keep it distinct.
                map.insert("seed".into(), json!(seed & (i64::MAX as u64)));
            }
            if self.config.token_ids_in_logprobs {
                map.insert("return_tokens_as_token_ids".into(), json!(true));
            }
        }
        body
    }

    async fn act_one(
        &self,
        context: &AgentContext,
        sampling: &SamplingParams,
    ) -> Result<Response, PolicyError> {
        let model = self.model().await?;
        let messages = build_messages(context, &self.config.prompt);
        let body = self.request_body(&model, &messages, sampling);
        let text = self
            .send_any(reqwest::Method::POST, "/chat/completions", Some(&body))
            .await?;
        let answer: ChatCompletion = serde_json::from_str(&text).map_err(|e| {
            PolicyError::Server(format!("the server's answer is not a chat completion: {e}"))
        })?;
        response_from_completion(&answer, self.mapper.as_ref())
    }
}

/// Turns a chat completion (with log-probs) into a [`Response`].
pub fn response_from_completion(
    answer: &ChatCompletion,
    mapper: Option<&TokenMapper>,
) -> Result<Response, PolicyError> {
    let choice = answer
        .choices
        .first()
        .ok_or_else(|| PolicyError::Server("the server answered no choices".into()))?;
    let entries = choice.logprobs.as_ref().map(|l| &l.content).ok_or_else(|| {
        PolicyError::Server(
            "the server returned no logprobs: training needs the sampled token ids; use a server that supports `logprobs`".into(),
        )
    })?;
    let mut token_ids = Vec::with_capacity(entries.len());
    let mut logprobs = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let id = parse_token_id(&entry.token)
            .or_else(|| mapper.and_then(|m| m.token_id(entry)))
            .ok_or_else(|| {
                PolicyError::Server(format!(
                    "cannot map token {i} ({:?}) to an id: give the remote policy the model's tokenizer.json, or use a server that honours return_tokens_as_token_ids",
                    entry.token
                ))
            })?;
        token_ids.push(id);
        logprobs.push(entry.logprob);
    }
    Ok(Response {
        text: choice.message.content.clone().unwrap_or_default(),
        token_ids,
        logprobs,
        finish_reason: match choice.finish_reason.as_deref() {
            Some("length") => FinishReason::Length,
            _ => FinishReason::Stop,
        },
    })
}

#[async_trait]
impl Policy for RemotePolicy {
    /// One request per context, at most `max_concurrency` in flight; with a seed, context `i`
    /// samples with `seed + i` so that a group of identical contexts still differs.
    async fn act(
        &self,
        contexts: &[AgentContext],
        sampling: &SamplingParams,
    ) -> Result<Vec<Response>, PolicyError> {
        let limit = Arc::new(tokio::sync::Semaphore::new(
            self.config.max_concurrency.max(1),
        ));
        let calls = contexts.iter().enumerate().map(|(i, context)| {
            let limit = limit.clone();
            let mut sampling = sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            async move {
                let _permit = limit
                    .acquire()
                    .await
                    .map_err(|e| PolicyError::Server(e.to_string()))?;
                self.act_one(context, &sampling).await
            }
        });
        futures::future::join_all(calls).await.into_iter().collect()
    }

    fn describe(&self) -> String {
        let model = match (self.config.model.as_str(), self.listed_model.get()) {
            ("", Some(listed)) => listed.as_str(),
            ("", None) => "the server's first",
            (named, _) => named,
        };
        format!("{} (model {model})", self.config.base_urls.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_matches_gpt2() {
        // Values from GPT-2's bytes_to_unicode: space is U+0120 'Ġ', newline U+010A 'Ċ',
        // byte 0 is U+0100, 0x7F is U+0121 ('!'..'~' keep their place), 0xAD is U+0143.
        assert_eq!(byte_level_spelling(b" hi\n"), "\u{120}hi\u{10A}");
        assert_eq!(byte_level_spelling(&[0]), "\u{100}");
        assert_eq!(byte_level_spelling(&[0x7F]), "\u{121}");
        assert_eq!(byte_level_spelling(&[0xAD]), "\u{143}");
        assert_eq!(byte_level_spelling(&[0xC3, 0xA9]), "Ã©");
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(byte_level_bytes(&byte_level_spelling(&all)), Some(all));
        assert_eq!(byte_level_bytes("\u{120}hi"), Some(b" hi".to_vec()));
        assert_eq!(byte_level_bytes("\u{4E2D}"), None);
        assert_eq!(
            byte_level_bytes(" "),
            None,
            "a raw space is not in the alphabet"
        );
    }

    #[test]
    fn token_id_prefix() {
        assert_eq!(parse_token_id("token_id:151645"), Some(151645));
        assert_eq!(parse_token_id("token_id:x"), None);
        assert_eq!(parse_token_id("hello"), None);
    }
}

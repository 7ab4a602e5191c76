//! The HTTP layer: routes, request checks, answers and server-sent events.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arpo_core::{ChatMessage, ContentPart, Role, SamplingParams};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::api::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChoiceLogprobs, ChunkChoice, Delta, LoadLoraRequest, MessageContent, ModelCard, ModelList,
    PromptTokensDetails, ReloadWeightsRequest, RequestPart, TokenLogprob, TopLogprob,
    UnloadLoraRequest, Usage,
};
use crate::batch::{ChoiceSpec, Event, Job, Queue, spawn_engine_thread};
use crate::engine::{Engine, EngineError, GeneratedToken};
use crate::error::{ApiError, ServeError};
use crate::images::{ImageLimits, load_image_url};

/// How the server behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// The name clients put in `model` for the base weights.
    pub served_model_name: String,
    /// When set, every request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most sequences generated together.
    pub max_batch: usize,
    /// Most requests waiting; more are answered 503.
    pub max_queue: usize,
    pub image_limits: ImageLimits,
    /// Most images in one request.
    pub max_images: usize,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// `max_tokens` when a request does not say (capped by what the context leaves).
    pub default_max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most LoRA adapters loaded at once (vLLM's `--max-loras`); more are refused with 409.
    pub max_loras: usize,
    /// Most memory the loaded adapters may take together, in bytes, as the engine counts it
    /// ([`Engine::adapter_bytes`]: a merged copy of the model per adapter for `ModelEngine`).
    pub max_lora_bytes: u64,
    /// Serve without `api_key` on an address other machines can reach (by default refused).
    pub allow_unauthenticated: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            served_model_name: "ui-tars".into(),
            api_key: None,
            max_batch: 16,
            max_queue: 256,
            image_limits: ImageLimits::default(),
            max_images: 16,
            max_request_bytes: 64 * 1024 * 1024,
            default_max_tokens: 1024,
            max_n: 16,
            max_loras: 4,
            max_lora_bytes: 16 << 30,
            allow_unauthenticated: false,
        }
    }
}

impl ServeConfig {
    /// Refuses an address other machines can reach when no api key is set (unless
    /// `allow_unauthenticated`): a server there would run anyone's requests and weight loads.
    pub fn check_bind(&self, addr: SocketAddr) -> Result<(), ServeError> {
        if addr.ip().is_loopback() || self.api_key.is_some() || self.allow_unauthenticated {
            Ok(())
        } else {
            Err(ServeError::Unauthenticated {
                addr: addr.to_string(),
            })
        }
    }
}

struct AppState<E: Engine> {
    engine: Arc<E>,
    queue: Arc<Queue<E::Prompt>>,
    config: ServeConfig,
    created: u64,
    /// Held while an adapter loads: the bound on adapters is checked and the load done as one.
    adapter_loading: tokio::sync::Mutex<()>,
}

impl<E: Engine> std::fmt::Debug for AppState<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_engine: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `addr` and serves `engine` in the background of the current tokio runtime.
    pub async fn start<E: Engine>(
        engine: Arc<E>,
        config: ServeConfig,
        addr: SocketAddr,
    ) -> Result<Self, ServeError> {
        config.check_bind(addr)?;
        let queue = Arc::new(Queue::new(config.max_queue.max(1)));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(ServeError::Serve)?;
        let thread = spawn_engine_thread(engine.clone(), queue.clone(), config.max_batch)
            .map_err(ServeError::Serve)?;
        let state = Arc::new(AppState {
            engine,
            queue: queue.clone(),
            config,
            created: now(),
            adapter_loading: tokio::sync::Mutex::new(()),
        });
        let app = router(state);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        });
        Ok(Self {
            addr,
            shutdown: Some(tx),
            task,
            stop_engine: Box::new(move || {
                queue.shutdown();
                drop(thread);
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL, `http://<addr>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Serves until the process gets Ctrl-C, then stops.
    pub async fn run_until_ctrl_c(self) -> Result<(), ServeError> {
        let _ = tokio::signal::ctrl_c().await;
        self.shutdown().await
    }

    /// Stops accepting connections, lets open ones finish, stops the engine thread.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (self.stop_engine)();
        match self.task.await {
            Ok(result) => result.map_err(ServeError::Serve),
            Err(e) => Err(ServeError::Serve(std::io::Error::other(e.to_string()))),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn router<E: Engine>(state: Arc<AppState<E>>) -> Router {
    Router::new()
        .route("/health", get(health::<E>))
        .route("/v1/models", get(models::<E>))
        .route("/v1/chat/completions", post(chat_completions::<E>))
        .route("/v1/load_lora_adapter", post(load_lora::<E>))
        .route("/v1/unload_lora_adapter", post(unload_lora::<E>))
        .route("/v1/reload_weights", post(reload_weights::<E>))
        .route("/update_weights_from_disk", post(reload_weights::<E>))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route: the server offers /health, /v1/models, /v1/chat/completions, /v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/reload_weights, /update_weights_from_disk",
    )
}

fn authorize<E: Engine>(state: &AppState<E>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.config.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if key_matches(given, key) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// Compares in time independent of where the key and the given one differ (`subtle`); a length
/// difference returns early, which reveals only the key's length.
fn key_matches(given: &str, key: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.as_bytes().ct_eq(key.as_bytes()))
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than the server's limit of {limit} bytes: send less, or start the server with a larger --max-request-bytes"
            ),
        )
        .code("request_too_large")
    })
}

async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    parse_json(&read_body(body, limit).await?)
}

/// Parses a request body in one pass; a wrong field is named by its path
/// (`messages[0].content`), a missing one by its name.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return ApiError::invalid(format!("the body is not valid json: {inner}"));
        }
        let path = e.path().to_string();
        let message = inner.to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let param = match (path.as_str(), missing) {
            (".", Some(field)) => Some(field.to_string()),
            (".", None) => None,
            (p, Some(field)) => Some(format!("{p}.{field}")),
            (p, None) => Some(p.to_string()),
        };
        match param {
            Some(param) => {
                ApiError::invalid(format!("invalid value for {param:?}: {message}")).param(param)
            }
            None => ApiError::invalid(format!(
                "invalid request: {message} (the body must be a json object)"
            )),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("the body is not valid json: {e}")))?;
    Ok(value)
}

async fn health<E: Engine>(State(state): State<Arc<AppState<E>>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let info = state.engine.info();
    axum::Json(serde_json::json!({
        "status": "ok",
        "model": state.config.served_model_name,
        "model_source": info.model_source,
        "device": info.device,
        "waiting": state.queue.waiting(),
        "running": state.queue.running(),
    }))
    .into_response()
}

async fn models<E: Engine>(State(state): State<Arc<AppState<E>>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let info = state.engine.info();
    let base = state.config.served_model_name.clone();
    let mut data = vec![ModelCard {
        id: base.clone(),
        object: "model".into(),
        created: state.created,
        owned_by: "arpo-rs".into(),
        root: info.model_source.clone(),
        parent: None,
        max_model_len: info.max_context,
    }];
    for name in state.engine.adapters() {
        data.push(ModelCard {
            id: name.clone(),
            object: "model".into(),
            created: state.created,
            owned_by: "arpo-rs".into(),
            root: name,
            parent: Some(base.clone()),
            max_model_len: info.max_context,
        });
    }
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

async fn load_lora<E: Engine>(
    State(state): State<Arc<AppState<E>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let req: LoadLoraRequest = read_json(body, 1 << 20).await?;
    let _loading = state.adapter_loading.lock().await;
    if req.lora_name.is_empty() || req.lora_name == state.config.served_model_name {
        return Err(ApiError::invalid(format!(
            "lora_name {:?} is empty or the base model's name: pick another",
            req.lora_name
        ))
        .param("lora_name"));
    }
    if state.engine.adapters().contains(&req.lora_name) {
        return Err(ApiError::invalid(format!(
            "the lora adapter {:?} is already loaded: unload it first with POST /v1/unload_lora_adapter",
            req.lora_name
        ))
        .param("lora_name"));
    }
    check_adapter_room(&state)?;
    let engine = state.engine.clone();
    let name = req.lora_name.clone();
    tokio::task::spawn_blocking(move || {
        engine.load_adapter(&req.lora_name, &PathBuf::from(req.lora_path))
    })
    .await
    .map_err(|e| ApiError::internal(format!("adapter loading panicked: {e}")))??;
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

/// Refuses a new adapter when the count or memory bound would be passed.
fn check_adapter_room<E: Engine>(state: &AppState<E>) -> Result<(), ApiError> {
    let config = &state.config;
    let loaded = state.engine.adapters();
    let full = |what: String| {
        ApiError::new(StatusCode::CONFLICT, "invalid_request_error", what)
            .param("lora_name")
            .code("too_many_adapters")
    };
    if loaded.len() >= config.max_loras {
        return Err(full(format!(
            "{} lora adapters are loaded ({loaded:?}), the server's limit (--max-loras {}): unload one with POST /v1/unload_lora_adapter, or restart the server with a larger --max-loras",
            loaded.len(),
            config.max_loras
        )));
    }
    let each = state.engine.adapter_bytes();
    let needed = each.saturating_mul(loaded.len() as u64 + 1);
    if needed > config.max_lora_bytes {
        return Err(full(format!(
            "one more lora adapter would take {needed} bytes of adapter memory ({each} each), over the server's limit of {} (--max-lora-memory-mb): unload one with POST /v1/unload_lora_adapter, or restart the server with a larger limit",
            config.max_lora_bytes
        )));
    }
    Ok(())
}

async fn unload_lora<E: Engine>(
    State(state): State<Arc<AppState<E>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let req: UnloadLoraRequest = read_json(body, 1 << 20).await?;
    let engine = state.engine.clone();
    let name = req.lora_name.clone();
    tokio::task::spawn_blocking(move || engine.unload_adapter(&req.lora_name))
        .await
        .map_err(|e| ApiError::internal(format!("adapter unloading panicked: {e}")))??;
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}

async fn reload_weights<E: Engine>(
    State(state): State<Arc<AppState<E>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let req: ReloadWeightsRequest = read_json(body, 1 << 20).await?;
    let engine = state.engine.clone();
    let path = req.model_path.clone();
    tokio::task::spawn_blocking(move || engine.reload_weights(&PathBuf::from(req.model_path)))
        .await
        .map_err(|e| ApiError::internal(format!("weight reloading panicked: {e}")))??;
    Ok(axum::Json(serde_json::json!({
        "success": true,
        "message": format!("weights reloaded from {path}"),
    }))
    .into_response())
}

/// A request after its checks: what the engine thread needs.
struct Checked {
    messages: Vec<ChatMessage>,
    adapter: Option<String>,
    model: String,
    choices: Vec<ChoiceSpec>,
    max_tokens: Option<usize>,
    stops: Vec<String>,
    logprobs: bool,
    token_ids: bool,
    stream: bool,
    include_usage: bool,
}

fn check_request<E: Engine>(
    state: &AppState<E>,
    req: ChatCompletionRequest,
) -> Result<Checked, ApiError> {
    let config = &state.config;
    let model = req
        .model
        .clone()
        .unwrap_or_else(|| config.served_model_name.clone());
    let adapter = if model == config.served_model_name {
        None
    } else if state.engine.adapters().contains(&model) {
        Some(model.clone())
    } else {
        let mut available = vec![config.served_model_name.clone()];
        available.extend(state.engine.adapters());
        return Err(ApiError::model_not_found(&model, &available));
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(
            ApiError::invalid(format!("temperature must be 0 or more, got {temperature}"))
                .param("temperature"),
        );
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::invalid(format!("top_p must be in (0, 1], got {top_p}")).param("top_p"),
        );
    }
    let top_k = req.top_k.unwrap_or(-1);
    if top_k < -1 {
        return Err(ApiError::invalid(format!(
            "top_k must be -1 (off), 0 (off) or a positive count, got {top_k}"
        ))
        .param("top_k"));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens must be at least 1").param("max_tokens"));
    }
    // Checked here, before any arithmetic: no client number reaches a sum unbounded.
    let max_context = state.engine.info().max_context;
    let max_tokens = match max_tokens {
        None => None,
        Some(m) => match usize::try_from(m) {
            Ok(m) if m <= max_context => Some(m),
            _ => {
                return Err(ApiError::invalid(format!(
                    "max_tokens is {m} but the model's context holds {max_context} tokens (prompt included): ask for fewer"
                ))
                .param("max_tokens")
                .code("context_length_exceeded"));
            }
        },
    };
    let n = req.n.unwrap_or(1);
    if n == 0 || n > config.max_n as u64 {
        return Err(ApiError::invalid(format!(
            "n must be between 1 and {}, got {n}",
            config.max_n
        ))
        .param("n"));
    }
    let logprobs = req.logprobs.unwrap_or(false);
    let top_logprobs = req.top_logprobs.unwrap_or(0);
    if top_logprobs > 20 {
        return Err(ApiError::invalid(format!(
            "top_logprobs must be between 0 and 20, got {top_logprobs}"
        ))
        .param("top_logprobs"));
    }
    if top_logprobs > 0 && !logprobs {
        return Err(
            ApiError::invalid("top_logprobs needs logprobs set to true").param("top_logprobs")
        );
    }
    let stops = req.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 16 || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop must be at most 16 non-empty strings").param("stop"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty").param("messages"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    let mut images = 0;
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].role {other:?} is not supported: use system, user or assistant"
                ))
                .param(format!("messages[{i}].role")));
            }
        };
        let mut content = Vec::new();
        match m.content {
            None => {}
            Some(MessageContent::Text(text)) => content.push(ContentPart::Text { text }),
            Some(MessageContent::Parts(parts)) => {
                for part in parts {
                    match part {
                        RequestPart::Text { text } => content.push(ContentPart::Text { text }),
                        RequestPart::ImageUrl { image_url } => {
                            images += 1;
                            if images > config.max_images {
                                return Err(ApiError::invalid(format!(
                                    "the request has more than {} images, the server's limit (--max-images)",
                                    config.max_images
                                ))
                                .param("messages")
                                .code("too_many_images"));
                            }
                            let image = load_image_url(&image_url.url, &config.image_limits)
                                .map_err(|e| e.param(format!("messages[{i}].content")))?;
                            content.push(ContentPart::Image { image });
                        }
                    }
                }
            }
        }
        messages.push(ChatMessage { role, content });
    }
    let choices = (0..n)
        .map(|k| ChoiceSpec {
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                max_tokens: max_tokens.unwrap_or(config.default_max_tokens),
                seed: req.seed.map(|s| s.wrapping_add(k)),
            },
            top_logprobs: top_logprobs as usize,
        })
        .collect();
    Ok(Checked {
        messages,
        adapter,
        model,
        choices,
        max_tokens,
        stops,
        logprobs,
        token_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

async fn chat_completions<E: Engine>(
    State(state): State<Arc<AppState<E>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let bytes = read_body(body, state.config.max_request_bytes).await?;
    // Parsing (up to --max-request-bytes of json), image decoding and tokenization compute:
    // off the async threads, so one large request never stalls the others.
    let prep_state = state.clone();
    let (mut checked, prompt) = tokio::task::spawn_blocking(move || {
        let req: ChatCompletionRequest = parse_json(&bytes)?;
        let checked = check_request(&prep_state, req)?;
        let prompt = prep_state
            .engine
            .prepare(&checked.messages, checked.max_tokens.unwrap_or(1))?;
        Ok::<_, ApiError>((checked, prompt))
    })
    .await
    .map_err(|e| ApiError::internal(format!("request preparation panicked: {e}")))??;
    let prompt_tokens = state.engine.prompt_tokens(&prompt);
    if checked.max_tokens.is_none() {
        let room = state
            .engine
            .info()
            .max_context
            .saturating_sub(prompt_tokens);
        for c in &mut checked.choices {
            c.sampling.max_tokens = c.sampling.max_tokens.min(room).max(1);
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let n = checked.choices.len();
    state.queue.submit(Job {
        prompt: Arc::new(prompt),
        adapter: checked.adapter.clone(),
        choices: checked.choices.clone(),
        stops: checked.stops.clone(),
        events: tx,
    })?;
    let meta = AnswerMeta {
        id: format!("chatcmpl-{}", request_id()),
        created: now(),
        model: checked.model.clone(),
        prompt_tokens: prompt_tokens as u64,
        logprobs: checked.logprobs,
        token_ids: checked.token_ids,
    };
    if checked.stream {
        Ok(stream_answer(state, meta, n, checked.include_usage, rx).into_response())
    } else {
        Ok(axum::Json(collect_answer(&*state.engine, &meta, n, rx).await?).into_response())
    }
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{nanos:x}{:04x}",
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

struct AnswerMeta {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: u64,
    logprobs: bool,
    token_ids: bool,
}

fn token_logprob<E: Engine>(engine: &E, token: &GeneratedToken, as_ids: bool) -> TokenLogprob {
    let name = |id: u32| {
        let piece = engine.token_piece(id);
        let text = if as_ids {
            format!("token_id:{id}")
        } else {
            String::from_utf8_lossy(&piece.bytes).into_owned()
        };
        (text, piece.bytes)
    };
    let (text, bytes) = name(token.id);
    TokenLogprob {
        token: text,
        logprob: token.logprob,
        bytes: Some(bytes),
        top_logprobs: token
            .top
            .iter()
            .map(|&(id, logprob)| {
                let (text, bytes) = name(id);
                TopLogprob {
                    token: text,
                    logprob,
                    bytes: Some(bytes),
                }
            })
            .collect(),
    }
}

fn engine_failure(error: EngineError) -> ApiError {
    ApiError::from(error)
}

async fn collect_answer<E: Engine>(
    engine: &E,
    meta: &AnswerMeta,
    n: usize,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<ChatCompletion, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut tokens: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut counts = vec![0u64; n];
    let mut reasons: Vec<Option<&'static str>> = vec![None; n];
    let mut cached_tokens = 0u64;
    while reasons.iter().any(Option::is_none) {
        let Some(event) = rx.recv().await else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_shutting_down",
                "the server stopped before the answer was complete: retry",
            ));
        };
        match event {
            Event::Token {
                choice,
                delta,
                token,
            } if choice < n => {
                texts[choice].push_str(&delta);
                counts[choice] += 1;
                if meta.logprobs {
                    tokens[choice].push(token_logprob(engine, &token, meta.token_ids));
                }
            }
            Event::Finished {
                choice,
                delta,
                reason,
                cached_tokens: cached,
            } if choice < n => {
                texts[choice].push_str(&delta);
                reasons[choice] = Some(reason);
                cached_tokens = cached_tokens.max(cached as u64);
            }
            Event::Failed { error, .. } => return Err(engine_failure(error)),
            _ => {}
        }
    }
    let completion_tokens: u64 = counts.iter().sum();
    let choices = texts
        .into_iter()
        .zip(tokens)
        .zip(reasons)
        .enumerate()
        .map(|(i, ((text, tokens), reason))| Choice {
            index: i as u32,
            message: AssistantMessage {
                role: "assistant".into(),
                content: Some(text),
            },
            logprobs: meta.logprobs.then_some(ChoiceLogprobs { content: tokens }),
            finish_reason: reason.map(str::to_string),
        })
        .collect();
    Ok(ChatCompletion {
        id: meta.id.clone(),
        object: "chat.completion".into(),
        created: meta.created,
        model: meta.model.clone(),
        choices,
        usage: Usage {
            prompt_tokens: meta.prompt_tokens,
            completion_tokens,
            total_tokens: meta.prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        },
    })
}

fn stream_answer<E: Engine>(
    state: Arc<AppState<E>>,
    meta: AnswerMeta,
    n: usize,
    include_usage: bool,
    rx: mpsc::UnboundedReceiver<Event>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    struct Streamer<E: Engine> {
        state: Arc<AppState<E>>,
        meta: AnswerMeta,
        rx: mpsc::UnboundedReceiver<Event>,
        pending: std::collections::VecDeque<SseEvent>,
        finished: Vec<bool>,
        completion_tokens: u64,
        cached_tokens: u64,
        include_usage: bool,
        done: bool,
    }
    impl<E: Engine> Streamer<E> {
        fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> SseEvent {
            let chunk = ChatCompletionChunk {
                id: self.meta.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.meta.created,
                model: self.meta.model.clone(),
                choices,
                usage,
            };
            SseEvent::default().data(serde_json::to_string(&chunk).unwrap_or_default())
        }
    }
    let mut streamer = Streamer {
        state,
        meta,
        rx,
        pending: std::collections::VecDeque::new(),
        finished: vec![false; n],
        completion_tokens: 0,
        cached_tokens: 0,
        include_usage,
        done: false,
    };
    for i in 0..n {
        let first = streamer.chunk(
            vec![ChunkChoice {
                index: i as u32,
                delta: Delta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        );
        streamer.pending.push_back(first);
    }
    let stream = futures::stream::unfold(streamer, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            if s.finished.iter().all(|f| *f) {
                if s.include_usage {
                    let usage = Usage {
                        prompt_tokens: s.meta.prompt_tokens,
                        completion_tokens: s.completion_tokens,
                        total_tokens: s.meta.prompt_tokens + s.completion_tokens,
                        prompt_tokens_details: Some(PromptTokensDetails {
                            cached_tokens: s.cached_tokens,
                        }),
                    };
                    let chunk = s.chunk(vec![], Some(usage));
                    s.pending.push_back(chunk);
                }
                s.pending.push_back(SseEvent::default().data("[DONE]"));
                s.done = true;
                continue;
            }
            match s.rx.recv().await {
                None => {
                    let body = ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_shutting_down",
                        "the server stopped before the answer was complete: retry",
                    )
                    .body();
                    s.pending.push_back(
                        SseEvent::default().data(serde_json::to_string(&body).unwrap_or_default()),
                    );
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                Some(Event::Token {
                    choice,
                    delta,
                    token,
                }) => {
                    s.completion_tokens += 1;
                    if delta.is_empty() && !s.meta.logprobs {
                        continue;
                    }
                    let logprobs = s.meta.logprobs.then(|| ChoiceLogprobs {
                        content: vec![token_logprob(&*s.state.engine, &token, s.meta.token_ids)],
                    });
                    let chunk = s.chunk(
                        vec![ChunkChoice {
                            index: choice as u32,
                            delta: Delta {
                                role: None,
                                content: Some(delta),
                            },
                            logprobs,
                            finish_reason: None,
                        }],
                        None,
                    );
                    s.pending.push_back(chunk);
                }
                Some(Event::Finished {
                    choice,
                    delta,
                    reason,
                    cached_tokens,
                }) => {
                    s.cached_tokens = s.cached_tokens.max(cached_tokens as u64);
                    if let Some(f) = s.finished.get_mut(choice) {
                        *f = true;
                    }
                    let chunk = s.chunk(
                        vec![ChunkChoice {
                            index: choice as u32,
                            delta: Delta {
                                role: None,
                                content: Some(delta),
                            },
                            logprobs: None,
                            finish_reason: Some(reason.to_string()),
                        }],
                        None,
                    );
                    s.pending.push_back(chunk);
                }
                Some(Event::Failed { error, .. }) => {
                    let body = engine_failure(error).body();
                    s.pending.push_back(
                        SseEvent::default().data(serde_json::to_string(&body).unwrap_or_default()),
                    );
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    #[test]
    fn key_matches_only_the_whole_key() {
        assert!(key_matches("s3cret", "s3cret"));
        for given in [
            "", "s3cre", "s3cret2", "s3creT", "S3cret", "s3cret\0", "\0s3cret",
        ] {
            assert!(!key_matches(given, "s3cret"), "{given:?}");
        }
        assert!(!key_matches("s3cret", ""));
    }
}

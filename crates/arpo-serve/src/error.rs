//! Errors: the crate's error enum, and the HTTP error answers in OpenAI's shape.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::{ErrorBody, ErrorDetail};
use crate::engine::EngineError;

/// Errors of `arpo-serve` outside a request (binding, the remote policy's setup).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "cannot listen on {addr}: {source} (is another server already on that port? pick another with --port)"
    )]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve on {addr} without an api key: other machines can reach that address: start with --api-key <KEY> (or ARPO_SERVE_API_KEY), bind 127.0.0.1, or pass --allow-unauthenticated on a trusted network"
    )]
    Unauthenticated { addr: String },
    #[error("the server stopped with an error: {0}")]
    Serve(std::io::Error),
    #[error("cannot read tokenizer {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("invalid server url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error(
        "unknown weight sync {given:?}: use lora_adapter (vLLM, arpo-serve), sglang_disk (SGLang), arpo_reload (arpo-serve, full weights) or none"
    )]
    WeightSync { given: String },
    #[error("request to {url} failed: {reason}")]
    Http { url: String, reason: String },
}

/// An error answer: an HTTP status and OpenAI's error JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds, for 503 answers.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong api key: send the header `Authorization: Bearer <key>` with the key the server was started with (--api-key)",
        )
        .code("invalid_api_key")
    }

    pub fn model_not_found(name: &str, available: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model {name:?} does not exist here: use one of {available:?} (GET /v1/models lists them)"
            ),
        )
        .param("model")
        .code("model_not_found")
    }

    pub fn queue_full(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            format!(
                "the request queue is full: retry in {retry_after} s, or start the server with a larger --max-queue"
            ),
        )
        .code("queue_full");
        e.retry_after = Some(retry_after);
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::ContextTooLong { .. } => Self::invalid(e.to_string())
                .param("messages")
                .code("context_length_exceeded"),
            EngineError::InvalidInput(_) => Self::invalid(e.to_string()).param("messages"),
            EngineError::UnknownAdapter { .. } => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                e.to_string(),
            )
            .param("model")
            .code("model_not_found"),
            EngineError::Load { .. } => Self::invalid(e.to_string()).code("load_failed"),
            EngineError::Unsupported(_) => {
                Self::new(StatusCode::NOT_IMPLEMENTED, "not_supported", e.to_string())
            }
            EngineError::Generation(_) => Self::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.retry_after;
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

//! The OpenAI-compatible UI-TARS server, and a [`Policy`](arpo_core::Policy) client of any
//! OpenAI-compatible server.
//!
//! - [`Server`] serves an [`Engine`] over HTTP (axum): `POST /v1/chat/completions` (text and
//!   `image_url` parts, sampling settings, `n`, `seed`, `stop`, `logprobs`/`top_logprobs`,
//!   server-sent-event streaming, `usage`), `GET /v1/models`, `GET /health`, vLLM's
//!   `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, and `/v1/reload_weights` for full
//!   checkpoints (SGLang's `/update_weights_from_disk` too). Bad input is answered with a 4xx
//!   and OpenAI's error JSON, parsed in one pass off the async threads; client numbers are
//!   checked before any arithmetic; loaded adapters are bounded in count and memory; a
//!   non-loopback address is refused without an api key unless explicitly allowed.
//! - Dynamic batching: concurrent requests are generated together, up to `max_batch`
//!   sequences; a bounded queue answers 503 with `Retry-After` when full.
//! - [`Engine`] is the seam to the model: tokenization + "generate this batch".
//!   [`ScriptedEngine`] is a deterministic stand-in (no weights) that the tests of the HTTP
//!   layer use.
//! - [`RemotePolicy`]: the [`Policy`](arpo_core::Policy) of the trainer over any
//!   OpenAI-compatible server (this one, vLLM, SGLang), or several: the same UI-TARS prompts
//!   as the local policy, token ids and log-probs from the answer's `logprobs`, the model name
//!   from `/v1/models` when none is given, an api key on every request, requests spread over
//!   the servers with failover, and weight pushes after each update ([`WeightSync`]).
//!
//! ```
//! use std::sync::Arc;
//! use arpo_serve::{ScriptedEngine, ServeConfig, Server};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let engine = Arc::new(ScriptedEngine::default());
//! let server = Server::start(engine, ServeConfig::default(), "127.0.0.1:0".parse().unwrap())
//!     .await
//!     .unwrap();
//! println!("serving on {}", server.base_url());
//! server.shutdown().await.unwrap();
//! # });
//! ```

pub mod api;
mod batch;
mod check;
pub mod engine;
mod error;
mod images;
mod model_engine;
pub mod remote;
pub mod scripted;
mod server;
mod text;

pub use check::{ServerCheck, check_server};
pub use engine::{
    Engine, EngineError, EngineFinish, EngineInfo, Finished, Flow, GeneratedToken, SequenceRequest,
    TokenPiece,
};
pub use error::{ApiError, ServeError};
pub use images::{ImageLimits, check_image, load_image_url};
pub use model_engine::ModelEngine;
pub use remote::{RemotePolicy, RemotePolicyConfig, ServerFailures, TokenMapper, WeightSync};
pub use scripted::ScriptedEngine;
pub use server::{ServeConfig, Server};

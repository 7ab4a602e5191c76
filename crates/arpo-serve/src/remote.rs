//! The remote [`Policy`]: UI-TARS through any OpenAI-compatible server (arpo-serve, vLLM,
//! SGLang), with the sampled token ids and their log-probs.
//!
//! Prompts are built with [`arpo_core::protocol::build_messages`], the same as the local
//! policy's. Token ids come from the log-prob entries: `token_id:<id>` when the server honours
//! vLLM's `return_tokens_as_token_ids` (arpo-serve and vLLM do), else the entry's `bytes`
//! mapped through the model's byte-level BPE vocabulary (`tokenizer.json`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arpo_core::protocol::{PromptConfig, build_messages};
use arpo_core::{
    AgentContext, ChatMessage, ContentPart, FinishReason, Policy, PolicyError, Response,
    SamplingParams,
};
use async_trait::async_trait;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::api::{ChatCompletion, ErrorBody, TokenLogprob};
use crate::error::ServeError;

/// Where and how the remote policy asks.
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePolicyConfig {
    /// The OpenAI base URL, e.g. `http://localhost:9000/v1`.
    pub base_url: String,
    /// The `model` of each request (the served name, or a LoRA adapter's name).
    pub model: String,
    pub api_key: Option<String>,
    pub prompt: PromptConfig,
    /// Per-request time limit.
    pub timeout: Duration,
    /// Most requests in flight at once (the server batches them).
    pub max_concurrency: usize,
    /// Ask for vLLM's `return_tokens_as_token_ids` (turn off for servers that reject it).
    pub token_ids_in_logprobs: bool,
}

impl RemotePolicyConfig {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            model: model.into(),
            api_key: None,
            prompt: PromptConfig::default(),
            timeout: Duration::from_secs(600),
            max_concurrency: 64,
            token_ids_in_logprobs: true,
        }
    }
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

/// A [`Policy`] over an OpenAI-compatible server.
#[derive(Debug, Clone)]
pub struct RemotePolicy {
    config: RemotePolicyConfig,
    client: reqwest::Client,
    mapper: Option<TokenMapper>,
}

impl RemotePolicy {
    /// `mapper` is needed for servers that do not name tokens by id (SGLang); arpo-serve and
    /// vLLM do not need it.
    pub fn new(
        config: RemotePolicyConfig,
        mapper: Option<TokenMapper>,
    ) -> Result<Self, ServeError> {
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            return Err(ServeError::Url {
                url: config.base_url.clone(),
                reason: "it must start with http:// or https:// (e.g. http://localhost:9000/v1)"
                    .into(),
            });
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| ServeError::Http {
                url: config.base_url.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            config,
            client,
            mapper,
        })
    }

    pub fn config(&self) -> &RemotePolicyConfig {
        &self.config
    }

    /// Sends further requests to `model` (e.g. a freshly loaded adapter).
    pub fn set_model(&mut self, model: impl Into<String>) {
        self.config.model = model.into();
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.post(format!("{}{path}", self.config.base_url));
        match &self.config.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn send(&self, path: &str, body: &Value) -> Result<String, PolicyError> {
        let url = format!("{}{path}", self.config.base_url);
        let response = self
            .post(path)
            .json(body)
            .send()
            .await
            .map_err(|e| PolicyError::Server(format!("POST {url}: {e}")))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| PolicyError::Server(format!("POST {url}: reading the answer: {e}")))?;
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| text.chars().take(500).collect());
            return Err(if status.is_client_error() {
                PolicyError::InvalidInput(format!("POST {url} answered {status}: {message}"))
            } else {
                PolicyError::Server(format!("POST {url} answered {status}: {message}"))
            });
        }
        Ok(text)
    }

    /// vLLM's `POST /v1/load_lora_adapter` (a PEFT adapter directory the server can read).
    pub async fn load_lora_adapter(&self, name: &str, path: &Path) -> Result<(), PolicyError> {
        self.send(
            "/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path}),
        )
        .await
        .map(|_| ())
    }

    /// vLLM's `POST /v1/unload_lora_adapter`.
    pub async fn unload_lora_adapter(&self, name: &str) -> Result<(), PolicyError> {
        self.send("/unload_lora_adapter", &json!({"lora_name": name}))
            .await
            .map(|_| ())
    }

    /// Pushes new adapter weights after a training update: unloads `name` if the server has
    /// it, loads it again from `path`, and sends further requests to it.
    pub async fn push_lora_adapter(&mut self, name: &str, path: &Path) -> Result<(), PolicyError> {
        // A first push finds nothing to unload; any other failure shows up in the load.
        let _ = self.unload_lora_adapter(name).await;
        self.load_lora_adapter(name, path).await?;
        self.set_model(name);
        Ok(())
    }

    /// Full weights from a checkpoint directory (arpo-serve's `/v1/reload_weights`).
    pub async fn reload_weights(&self, path: &Path) -> Result<(), PolicyError> {
        self.send("/reload_weights", &json!({"model_path": path}))
            .await
            .map(|_| ())
    }

    /// The request body for one agent context.
    pub fn request_body(&self, messages: &[ChatMessage], sampling: &SamplingParams) -> Value {
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
            "model": self.config.model,
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
                map.insert("seed".into(), json!(seed));
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
        let messages = build_messages(context, &self.config.prompt);
        let body = self.request_body(&messages, sampling);
        let text = self.send("/chat/completions", &body).await?;
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
        format!("{} (model {})", self.config.base_url, self.config.model)
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

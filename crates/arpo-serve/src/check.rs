//! The end-to-end check of a running server behind `cargo xtask test-server`: health, the model
//! list, then one UI-TARS step on a real screenshot.

use std::time::{Duration, Instant};

use arpo_core::protocol::{PromptConfig, build_messages};
use arpo_core::{AgentContext, SamplingParams, Screenshot};
use serde_json::Value;

use crate::api::{ChatCompletion, ErrorBody, ModelList, Usage};
use crate::error::ServeError;
use crate::remote::{RemotePolicy, RemotePolicyConfig};

/// What a server check found.
#[derive(Debug, Clone)]
pub struct ServerCheck {
    /// `GET /health`'s body (JSON when the server sends JSON, else its text as a string).
    pub health: Value,
    /// The model the step was asked of.
    pub model: String,
    /// The answer's text.
    pub response: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    /// Time of the chat-completion request alone.
    pub latency: Duration,
}

/// Checks the OpenAI-compatible server at `base_url` (`http://host:port/v1`).
pub async fn check_server(
    base_url: &str,
    api_key: Option<&str>,
    model: Option<&str>,
    screenshot: Screenshot,
    instruction: &str,
    max_tokens: usize,
) -> Result<ServerCheck, ServeError> {
    let base_url = base_url.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| http_error(base_url, e.to_string()))?;
    let get = |url: String| {
        let request = client.get(url);
        match api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    };

    let root = base_url.strip_suffix("/v1").unwrap_or(base_url);
    let health_url = format!("{root}/health");
    let response = get(health_url.clone()).send().await.map_err(|e| {
        http_error(
            &health_url,
            format!("{e}: is the server running? start it with `cargo xtask serve --model <dir>`"),
        )
    })?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| http_error(&health_url, e.to_string()))?;
    if !status.is_success() {
        return Err(http_error(
            &health_url,
            format!("answered {status}: {}", error_message(&text)),
        ));
    }
    let health = serde_json::from_str(&text).unwrap_or(Value::String(text));

    let models_url = format!("{base_url}/models");
    let response = get(models_url.clone())
        .send()
        .await
        .map_err(|e| http_error(&models_url, e.to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| http_error(&models_url, e.to_string()))?;
    if !status.is_success() {
        return Err(http_error(
            &models_url,
            format!("answered {status}: {}", error_message(&text)),
        ));
    }
    let models: ModelList = serde_json::from_str(&text)
        .map_err(|e| http_error(&models_url, format!("not a model list: {e}")))?;
    let model = match model {
        Some(m) => m.to_string(),
        None => models
            .data
            .first()
            .map(|m| m.id.clone())
            .ok_or_else(|| http_error(&models_url, "the server lists no models".into()))?,
    };

    let mut config = RemotePolicyConfig::new(base_url, model.clone());
    config.api_key = api_key.map(str::to_string);
    let policy = RemotePolicy::new(config, None)?;
    let context = AgentContext {
        instruction: instruction.to_string(),
        screenshots: vec![screenshot],
        responses: vec![],
    };
    let messages = build_messages(&context, &PromptConfig::default());
    let mut body = policy.request_body(&model, &messages, &SamplingParams::greedy(max_tokens));
    if let Some(map) = body.as_object_mut() {
        // Plain OpenAI: any server answers this.
        map.remove("logprobs");
        map.remove("return_tokens_as_token_ids");
    }
    let chat_url = format!("{base_url}/chat/completions");
    let mut request = client.post(&chat_url).json(&body);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let started = Instant::now();
    let response = request
        .send()
        .await
        .map_err(|e| http_error(&chat_url, e.to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| http_error(&chat_url, e.to_string()))?;
    let latency = started.elapsed();
    if !status.is_success() {
        return Err(http_error(
            &chat_url,
            format!("answered {status}: {}", error_message(&text)),
        ));
    }
    let answer: ChatCompletion = serde_json::from_str(&text)
        .map_err(|e| http_error(&chat_url, format!("not a chat completion: {e}")))?;
    let choice = answer
        .choices
        .first()
        .ok_or_else(|| http_error(&chat_url, "the answer has no choices".into()))?;
    Ok(ServerCheck {
        health,
        model,
        response: choice.message.content.clone().unwrap_or_default(),
        finish_reason: choice.finish_reason.clone(),
        usage: answer.usage,
        latency,
    })
}

fn error_message(text: &str) -> String {
    serde_json::from_str::<ErrorBody>(text)
        .map(|e| e.error.message)
        .unwrap_or_else(|_| text.chars().take(300).collect())
}

fn http_error(url: &str, reason: String) -> ServeError {
    ServeError::Http {
        url: url.to_string(),
        reason,
    }
}

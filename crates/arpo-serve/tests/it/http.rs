//! The HTTP server on a loopback port, driven by a real HTTP client, over the deterministic
//! `ScriptedEngine` (see its docs for the answers it writes).

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use arpo_core::{ChatMessage, ContentPart, Role, SamplingParams, Screenshot};
use arpo_serve::api::{ChatCompletion, ChatCompletionChunk, ErrorBody};
use arpo_serve::scripted::IM_END;
use arpo_serve::{Engine, Flow, ImageLimits, ScriptedEngine, SequenceRequest, ServeConfig, Server};
use base64::Engine as _;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn start(engine: Arc<ScriptedEngine>, config: ServeConfig) -> Server {
    Server::start(
        engine,
        config,
        "127.0.0.1:0".parse().expect("loopback address"),
    )
    .await
    .expect("the server binds a free loopback port")
}

fn png(width: u32, height: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([shade, (x % 256) as u8, (y % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png encodes");
    out.into_inner()
}

fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A user message with `images` screenshots (different pixels each).
fn request_with_images(images: usize, extra: Value) -> Value {
    let mut content = vec![json!({"type": "text", "text": "Open the settings menu"})];
    for i in 0..images {
        content.push(json!({"type": "image_url", "image_url": {"url": data_url(&png(40, 30, i as u8 * 60))}}));
    }
    let mut body = json!({
        "model": "ui-tars",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "temperature": 0.0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// The same conversation as `request_with_images`, as chat messages.
fn messages_with_images(images: usize) -> Vec<ChatMessage> {
    let mut content = vec![ContentPart::Text {
        text: "Open the settings menu".into(),
    }];
    for i in 0..images {
        content.push(ContentPart::Image {
            image: Screenshot::new(png(40, 30, i as u8 * 60), 40, 30),
        });
    }
    vec![
        ChatMessage::text(Role::System, "You are a helpful assistant."),
        ChatMessage {
            role: Role::User,
            content,
        },
    ]
}

/// Greedy generation in-process, without HTTP: (text, token ids, logprobs).
fn in_process(engine: &ScriptedEngine, messages: &[ChatMessage]) -> (String, Vec<u32>, Vec<f32>) {
    let prompt = engine.prepare(messages, 256).expect("prompt fits");
    let mut ids = Vec::new();
    let mut lps = Vec::new();
    let batch = [SequenceRequest {
        prompt: &prompt,
        sampling: SamplingParams::greedy(256),
        top_logprobs: 0,
        adapter: None,
    }];
    engine.generate(&batch, &mut |_, t| {
        ids.push(t.id);
        lps.push(t.logprob);
        Flow::Continue
    });
    let text: Vec<u8> = ids
        .iter()
        .filter(|&&id| id < 256)
        .map(|&id| id as u8)
        .collect();
    (String::from_utf8(text).expect("ascii"), ids, lps)
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("the server answers")
}

async fn error_of(response: reqwest::Response) -> (u16, ErrorBody) {
    let status = response.status().as_u16();
    let body: ErrorBody = response.json().await.expect("an OpenAI error body");
    (status, body)
}

#[tokio::test]
async fn greedy_answers_with_0_1_3_images_equal_in_process_generation() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let server = start(engine.clone(), ServeConfig::default()).await;
    let url = format!("{}/chat/completions", server.base_url());
    for images in [0, 1, 3] {
        let response = post(&url, &request_with_images(images, json!({}))).await;
        assert_eq!(response.status(), 200);
        let answer: ChatCompletion = response.json().await?;
        let content = answer.choices[0]
            .message
            .content
            .clone()
            .unwrap_or_default();
        assert!(
            content.starts_with(&format!(
                "Thought: I see {images} screenshot(s).\nAction: click(start_box='("
            )),
            "{content}"
        );
        let (expected, ids, _) = in_process(&engine, &messages_with_images(images));
        assert_eq!(content, expected);
        assert_eq!(answer.choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(answer.object, "chat.completion");
        assert_eq!(answer.model, "ui-tars");
        // Every answer byte is one token, plus <|im_end|>.
        assert_eq!(answer.usage.completion_tokens, ids.len() as u64);
        assert_eq!(answer.usage.completion_tokens, content.len() as u64 + 1);
        let prompt = engine.prepare(&messages_with_images(images), 1)?;
        assert_eq!(answer.usage.prompt_tokens, prompt.tokens as u64);
        assert_eq!(
            answer.usage.total_tokens,
            answer.usage.prompt_tokens + answer.usage.completion_tokens
        );
    }
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn logprobs_are_the_engines_with_bytes_and_top_alternatives() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let server = start(engine.clone(), ServeConfig::default()).await;
    let url = format!("{}/chat/completions", server.base_url());
    let body = request_with_images(1, json!({"logprobs": true, "top_logprobs": 3}));
    let answer: ChatCompletion = post(&url, &body).await.json().await?;
    let (_, ids, lps) = in_process(&engine, &messages_with_images(1));
    let content = answer.choices[0]
        .logprobs
        .as_ref()
        .map(|l| l.content.clone())
        .unwrap_or_default();
    assert_eq!(content.len(), ids.len());
    for (i, entry) in content.iter().enumerate() {
        // The scripted engine's log-probs cycle -0.125, -0.25, -0.375, -0.5.
        let expected = [-0.125, -0.25, -0.375, -0.5][i % 4];
        assert_eq!(entry.logprob, expected);
        assert_eq!(entry.logprob, lps[i]);
        assert_eq!(entry.top_logprobs.len(), 3);
        assert_eq!(entry.top_logprobs[0].logprob, entry.logprob);
        assert_eq!(entry.top_logprobs[0].token, entry.token);
        assert_eq!(entry.top_logprobs[1].logprob, expected - 1.0);
    }
    let last = content.last().map(|e| e.token.clone()).unwrap_or_default();
    assert_eq!(last, "<|im_end|>");
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|e| e.bytes.clone().unwrap_or_default())
        .collect();
    let text = answer.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert_eq!(bytes, format!("{text}<|im_end|>").into_bytes());

    // vLLM's return_tokens_as_token_ids names tokens by id.
    let body = request_with_images(
        0,
        json!({"logprobs": true, "return_tokens_as_token_ids": true}),
    );
    let answer: ChatCompletion = post(&url, &body).await.json().await?;
    let tokens: Vec<String> = answer.choices[0]
        .logprobs
        .as_ref()
        .map(|l| l.content.iter().map(|e| e.token.clone()).collect())
        .unwrap_or_default();
    assert_eq!(tokens.first().map(String::as_str), Some("token_id:84")); // 'T'
    assert_eq!(tokens.last(), Some(&format!("token_id:{IM_END}")));
    server.shutdown().await?;
    Ok(())
}

async fn stream_chunks(url: &str, body: &Value) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let response = post(url, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let text = response.text().await?;
    Ok(text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect())
}

#[tokio::test]
async fn streamed_chunks_concatenate_to_the_non_streaming_answer() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let server = start(engine, ServeConfig::default()).await;
    let url = format!("{}/chat/completions", server.base_url());
    for stop in [json!(null), json!(["\nAction"])] {
        let plain: ChatCompletion = post(&url, &request_with_images(1, json!({"stop": stop})))
            .await
            .json()
            .await?;
        let body = request_with_images(
            1,
            json!({"stream": true, "stream_options": {"include_usage": true}, "stop": stop}),
        );
        let events = stream_chunks(&url, &body).await?;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let mut text = String::new();
        let mut finish = None;
        let mut usage = None;
        for data in &events[..events.len() - 1] {
            let chunk: ChatCompletionChunk = serde_json::from_str(data)?;
            assert_eq!(chunk.object, "chat.completion.chunk");
            for choice in &chunk.choices {
                text.push_str(choice.delta.content.as_deref().unwrap_or(""));
                if choice.finish_reason.is_some() {
                    finish = choice.finish_reason.clone();
                }
            }
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
        }
        assert_eq!(Some(text), plain.choices[0].message.content);
        assert_eq!(finish, plain.choices[0].finish_reason);
        assert_eq!(usage, Some(plain.usage));
    }
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn stop_strings_max_tokens_n_and_seed() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let server = start(engine, ServeConfig::default()).await;
    let url = format!("{}/chat/completions", server.base_url());

    let answer: ChatCompletion = post(&url, &request_with_images(2, json!({"stop": "\nAction"})))
        .await
        .json()
        .await?;
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some("Thought: I see 2 screenshot(s).")
    );
    assert_eq!(answer.choices[0].finish_reason.as_deref(), Some("stop"));

    let answer: ChatCompletion = post(&url, &request_with_images(0, json!({"max_tokens": 5})))
        .await
        .json()
        .await?;
    assert_eq!(answer.choices[0].message.content.as_deref(), Some("Thoug"));
    assert_eq!(answer.choices[0].finish_reason.as_deref(), Some("length"));
    assert_eq!(answer.usage.completion_tokens, 5);

    let sampled = json!({"temperature": 1.0, "n": 3, "seed": 7});
    let a: ChatCompletion = post(&url, &request_with_images(1, sampled.clone()))
        .await
        .json()
        .await?;
    let b: ChatCompletion = post(&url, &request_with_images(1, sampled))
        .await
        .json()
        .await?;
    assert_eq!(a.choices.len(), 3);
    let texts = |c: &ChatCompletion| -> Vec<String> {
        c.choices
            .iter()
            .map(|c| c.message.content.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b), "the same seed gives the same samples");
    assert_ne!(texts(&a)[0], texts(&a)[1], "each choice has its own seed");
    assert_eq!(
        a.choices.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    server.shutdown().await?;
    Ok(())
}

/// A PNG whose header says 0×0 (with correct CRCs, so only the size is wrong).
fn zero_sized_png() -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&0u32.to_be_bytes());
    ihdr.extend_from_slice(&0u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png.extend_from_slice(&0u32.to_be_bytes());
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    png
}

fn with_image_url(url: &str) -> Value {
    json!({
        "model": "ui-tars",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    })
}

#[tokio::test]
async fn bad_inputs_get_4xx_with_openai_error_json() -> TestResult {
    let engine = Arc::new(ScriptedEngine::new(2048));
    let config = ServeConfig {
        image_limits: ImageLimits {
            max_bytes: 4000,
            max_pixels: 100 * 100,
            allowed_local_media_path: None,
        },
        max_images: 2,
        max_request_bytes: 200_000,
        ..ServeConfig::default()
    };
    let server = start(engine, config).await;
    let url = format!("{}/chat/completions", server.base_url());
    let client = reqwest::Client::new();

    let raw = client.post(&url).body("{\"messages\": [").send().await?;
    let (status, body) = error_of(raw).await;
    assert_eq!(
        (status, body.error.kind.as_str()),
        (400, "invalid_request_error")
    );

    let raw = client.post(&url).body("[1, 2]").send().await?;
    assert_eq!(error_of(raw).await.0, 400);

    let cases: Vec<(Value, u16, Option<&str>, Option<&str>)> = vec![
        (
            request_with_images(0, json!({"temperature": "hot"})),
            400,
            Some("temperature"),
            None,
        ),
        (
            request_with_images(0, json!({"n": -1})),
            400,
            Some("n"),
            None,
        ),
        (
            request_with_images(0, json!({"messages": "hello"})),
            400,
            Some("messages"),
            None,
        ),
        (
            request_with_images(0, json!({"temperature": -0.5})),
            400,
            Some("temperature"),
            None,
        ),
        (
            request_with_images(0, json!({"top_p": 0.0})),
            400,
            Some("top_p"),
            None,
        ),
        (
            request_with_images(0, json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            request_with_images(0, json!({"n": 0})),
            400,
            Some("n"),
            None,
        ),
        (
            request_with_images(0, json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            request_with_images(0, json!({"messages": []})),
            400,
            Some("messages"),
            None,
        ),
        (
            request_with_images(0, json!({"model": "gpt-4"})),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            with_image_url(&format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(b"hello, not an image")
            )),
            400,
            Some("messages[0].content"),
            Some("invalid_image"),
        ),
        (
            with_image_url("data:image/png;base64,@@@"),
            400,
            Some("messages[0].content"),
            Some("invalid_image"),
        ),
        (
            with_image_url(&data_url(&zero_sized_png())),
            400,
            Some("messages[0].content"),
            Some("invalid_image"),
        ),
        // Over the pixel limit (101×100 > 100×100).
        (
            with_image_url(&data_url(&png(101, 100, 0))),
            400,
            Some("messages[0].content"),
            Some("image_too_large"),
        ),
        // Over the byte limit (noise does not compress).
        (
            with_image_url(&data_url(&noise_png(80, 80))),
            400,
            Some("messages[0].content"),
            Some("image_too_large"),
        ),
        // Truncated PNG: the header reads, the pixels do not.
        (
            with_image_url(&data_url(&png(60, 60, 1)[..200])),
            400,
            Some("messages[0].content"),
            Some("invalid_image"),
        ),
        (
            with_image_url("https://example.com/a.png"),
            400,
            Some("messages[0].content"),
            Some("invalid_image"),
        ),
        (
            with_image_url("file:///etc/passwd"),
            400,
            Some("messages[0].content"),
            Some("invalid_image"),
        ),
        (
            request_with_images(3, json!({})),
            400,
            Some("messages"),
            Some("too_many_images"),
        ),
        (
            request_with_images(
                0,
                json!({"messages": [{"role": "user", "content": "x".repeat(3000)}]}),
            ),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        // More than the whole context (2048): the number itself is wrong.
        (
            request_with_images(0, json!({"max_tokens": 5000})),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        // Fits alone, not after the prompt.
        (
            request_with_images(0, json!({"max_tokens": 2040})),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            request_with_images(0, json!({"max_tokens": u64::MAX})),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            request_with_images(0, json!({"max_completion_tokens": u64::MAX})),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            request_with_images(0, json!({"max_tokens": 1e30})),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            request_with_images(0, json!({"n": u64::MAX})),
            400,
            Some("n"),
            None,
        ),
        (
            request_with_images(0, json!({"logprobs": true, "top_logprobs": u64::MAX})),
            400,
            Some("top_logprobs"),
            None,
        ),
        (json!({"model": "ui-tars"}), 400, Some("messages"), None),
        (
            json!({"messages": [{"content": "no role"}]}),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
            400,
            Some("messages[0].content"),
            None,
        ),
    ];
    for (body, want_status, want_param, want_code) in cases {
        let (status, err) = error_of(post(&url, &body).await).await;
        let shown = serde_json::to_string(&body)?
            .chars()
            .take(160)
            .collect::<String>();
        assert_eq!(status, want_status, "{shown}: {:?}", err.error);
        assert_eq!(
            err.error.param.as_deref(),
            want_param,
            "{shown}: {:?}",
            err.error
        );
        if want_code.is_some() {
            assert_eq!(err.error.code.as_deref(), want_code, "{shown}");
        }
        assert!(!err.error.message.is_empty());
        assert!(!err.error.kind.is_empty());
    }

    // Json followed by something else.
    let raw = client
        .post(&url)
        .body("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]} trailing")
        .send()
        .await?;
    assert_eq!(error_of(raw).await.0, 400);

    // Numbers at the edge that are fine: the seed wraps by design (seed + choice index).
    let ok = post(
        &url,
        &request_with_images(
            0,
            json!({"seed": u64::MAX, "n": 2, "temperature": 1.0, "top_k": i64::MAX}),
        ),
    )
    .await;
    assert_eq!(ok.status(), 200);

    // A body over --max-request-bytes.
    let big = json!({"messages": [{"role": "user", "content": "y".repeat(300_000)}]});
    let (status, err) = error_of(post(&url, &big).await).await;
    assert_eq!(status, 413);
    assert_eq!(err.error.kind, "invalid_request_error");

    // Unknown route, and the server is still healthy after all that.
    let (status, _) = error_of(
        client
            .get(format!("{}/nope", server.base_url()))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 404);
    let health = client
        .get(format!("http://{}/health", server.local_addr()))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    server.shutdown().await?;
    Ok(())
}

fn noise_png(width: u32, height: u32) -> Vec<u8> {
    let mut state = 0x1234_5678_u32;
    let img = image::RgbImage::from_fn(width, height, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let [a, b, c, _] = state.to_le_bytes();
        image::Rgb([a, b, c])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png encodes");
    out.into_inner()
}

#[tokio::test]
async fn file_urls_only_under_the_allowed_directory() -> TestResult {
    let dir = tempfile::tempdir()?;
    let inside = dir.path().join("shot.png");
    std::fs::write(&inside, png(30, 30, 9))?;
    let engine = Arc::new(ScriptedEngine::default());
    let config = ServeConfig {
        image_limits: ImageLimits {
            allowed_local_media_path: Some(dir.path().to_path_buf()),
            ..ImageLimits::default()
        },
        ..ServeConfig::default()
    };
    let server = start(engine, config).await;
    let url = format!("{}/chat/completions", server.base_url());
    let ok = post(
        &url,
        &with_image_url(&format!("file://{}", inside.display())),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let escape = format!("file://{}/../../etc/passwd", dir.path().display());
    let (status, err) = error_of(post(&url, &with_image_url(&escape)).await).await;
    assert_eq!(status, 400);
    assert_eq!(err.error.code.as_deref(), Some("invalid_image"));
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn api_key_is_required_when_set_and_not_otherwise() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let open = start(engine.clone(), ServeConfig::default()).await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/models", open.base_url()))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    open.shutdown().await?;

    let config = ServeConfig {
        api_key: Some("s3cret".into()),
        ..ServeConfig::default()
    };
    let locked = start(engine, config).await;
    let base = locked.base_url();
    let chat = format!("{base}/chat/completions");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Bearer s3cret2"),
        Some("Bearer s3cre"),
        Some("Bearer "),
    ] {
        let mut req = client.post(&chat).json(&request_with_images(0, json!({})));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let (status, err) = error_of(req.send().await?).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(err.error.kind, "authentication_error");
    }
    for path in [
        format!("{base}/models"),
        format!("http://{}/health", locked.local_addr()),
    ] {
        assert_eq!(client.get(&path).send().await?.status(), 401);
        let r = client.get(&path).bearer_auth("s3cret").send().await?;
        assert_eq!(r.status(), 200);
    }
    let r = client
        .post(&chat)
        .bearer_auth("s3cret")
        .json(&request_with_images(1, json!({})))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    locked.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn adapter_load_and_unload_change_the_answer() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let server = start(engine, ServeConfig::default()).await;
    let base = server.base_url();
    let chat = format!("{base}/chat/completions");
    let client = reqwest::Client::new();
    let adapter = tempfile::tempdir()?;
    std::fs::write(adapter.path().join("adapter_config.json"), "{}")?;

    let before: ChatCompletion = post(&chat, &request_with_images(1, json!({})))
        .await
        .json()
        .await?;

    let r = post(
        &format!("{base}/load_lora_adapter"),
        &json!({"lora_name": "step1", "lora_path": "/no/such/dir"}),
    )
    .await;
    let (status, err) = error_of(r).await;
    assert_eq!(status, 400);
    assert_eq!(err.error.code.as_deref(), Some("load_failed"));

    let load = json!({"lora_name": "step1", "lora_path": adapter.path()});
    let r = post(&format!("{base}/load_lora_adapter"), &load).await;
    assert_eq!(r.status(), 200);
    let (status, _) = error_of(post(&format!("{base}/load_lora_adapter"), &load).await).await;
    assert_eq!(status, 400, "loading the same name twice is refused");

    let models: Value = client
        .get(format!("{base}/models"))
        .send()
        .await?
        .json()
        .await?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec!["ui-tars", "step1"]);

    let with: ChatCompletion = post(&chat, &request_with_images(1, json!({"model": "step1"})))
        .await
        .json()
        .await?;
    let with_text = with.choices[0].message.content.clone().unwrap_or_default();
    assert!(
        with_text.starts_with("Thought: I see 1 screenshot(s) with step1."),
        "{with_text}"
    );
    assert_ne!(Some(with_text), before.choices[0].message.content);
    assert_eq!(with.model, "step1");

    let r = post(
        &format!("{base}/unload_lora_adapter"),
        &json!({"lora_name": "step1"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (status, err) =
        error_of(post(&chat, &request_with_images(1, json!({"model": "step1"}))).await).await;
    assert_eq!(
        (status, err.error.code.as_deref()),
        (404, Some("model_not_found"))
    );
    let (status, _) = error_of(
        post(
            &format!("{base}/unload_lora_adapter"),
            &json!({"lora_name": "step1"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 404);

    // Full weights from a checkpoint directory.
    let ckpt = tempfile::tempdir()?;
    let (status, _) = error_of(
        post(
            &format!("{base}/reload_weights"),
            &json!({"model_path": ckpt.path()}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "a directory without config.json is refused");
    std::fs::write(ckpt.path().join("config.json"), "{}")?;
    let r = post(
        &format!("{base}/reload_weights"),
        &json!({"model_path": ckpt.path()}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let after: ChatCompletion = post(&chat, &request_with_images(1, json!({})))
        .await
        .json()
        .await?;
    let after_text = after.choices[0].message.content.clone().unwrap_or_default();
    assert!(
        after_text.starts_with("Thought: I see 1 screenshot(s) v1."),
        "{after_text}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn concurrent_requests_are_generated_in_one_batch() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default().with_step_cost(Duration::from_millis(2)));
    let config = ServeConfig {
        max_batch: 8,
        ..ServeConfig::default()
    };
    let server = start(engine.clone(), config).await;
    let url = format!("{}/chat/completions", server.base_url());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            post(&url, &request_with_images(i % 2, json!({})))
                .await
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await?, 200);
    }
    let sizes = engine.batch_sizes();
    assert_eq!(sizes.iter().sum::<usize>(), 8);
    assert!(sizes.iter().all(|&s| s <= 8));
    assert!(
        sizes.iter().any(|&s| s > 1),
        "requests that arrive while a batch runs are batched together: {sizes:?}"
    );
    server.shutdown().await?;
    Ok(())
}

/// 32 concurrent clients × 20 requests against a small queue: every answer is a 200 or a 503
/// with Retry-After and OpenAI's error JSON, and the server is healthy after.
#[tokio::test]
async fn load_32_clients_x_20_requests_small_queue() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let config = ServeConfig {
        max_batch: 8,
        max_queue: 4,
        ..ServeConfig::default()
    };
    let server = start(engine.clone(), config).await;
    let url = format!("{}/chat/completions", server.base_url());
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..32 {
        let url = url.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut busy) = (0u32, 0u32);
            for r in 0..20 {
                let body = request_with_images((c + r) % 2, json!({"max_tokens": 64}));
                let response = client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .expect("answered");
                match response.status().as_u16() {
                    200 => {
                        let answer: ChatCompletion = response.json().await.expect("json");
                        assert_eq!(answer.usage.completion_tokens, 64);
                        ok += 1;
                    }
                    503 => {
                        assert_eq!(
                            response
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()),
                            Some("1")
                        );
                        let err: ErrorBody = response.json().await.expect("error json");
                        assert_eq!(err.error.code.as_deref(), Some("queue_full"));
                        busy += 1;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, busy)
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let (o, b) = t.await?;
        ok += o;
        busy += b;
    }
    assert_eq!(ok + busy, 640);
    assert!(ok > 0);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(engine.batch_sizes().iter().all(|&s| s <= 8));
    let health: Value = client
        .get(format!("http://{}/health", server.local_addr()))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["waiting"], 0);
    let after = post(&url, &request_with_images(1, json!({}))).await;
    assert_eq!(after.status(), 200);
    eprintln!(
        "load test: {ok} answered, {busy} refused with 503, {:?}",
        started.elapsed()
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after() -> TestResult {
    // One sequence at a time, one waiting: the third concurrent request finds the queue full.
    let engine = Arc::new(ScriptedEngine::default().with_step_cost(Duration::from_millis(5)));
    let config = ServeConfig {
        max_batch: 1,
        max_queue: 1,
        ..ServeConfig::default()
    };
    let server = start(engine, config).await;
    let url = format!("{}/chat/completions", server.base_url());
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let r = post(&url, &request_with_images(0, json!({}))).await;
            let retry = r.headers().get("retry-after").is_some();
            (r.status().as_u16(), retry)
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await?);
    }
    assert!(statuses.contains(&(503, true)), "{statuses:?}");
    assert!(statuses.iter().any(|s| s.0 == 200), "{statuses:?}");
    assert!(statuses.iter().all(|s| s.0 == 200 || *s == (503, true)));
    server.shutdown().await?;
    Ok(())
}

mod remote {
    use super::*;
    use arpo_core::protocol::{
        CoordinateSystem, ParseConfig, PromptConfig, build_messages, parse_response,
    };
    use arpo_core::{Action, AgentContext, FinishReason, Policy};
    use arpo_serve::api::TokenLogprob;
    use arpo_serve::{RemotePolicy, RemotePolicyConfig, TokenMapper, WeightSync};

    fn context(steps: usize) -> AgentContext {
        AgentContext {
            instruction: "Open the settings menu".into(),
            screenshots: (0..=steps)
                .map(|i| Screenshot::new(png(64, 48, i as u8 * 40), 64, 48))
                .collect(),
            responses: (0..steps)
                .map(|i| format!("Thought: step {i}\nAction: click(start_box='(100,200)')"))
                .collect(),
        }
    }

    #[tokio::test]
    async fn remote_policy_matches_in_process_generation_and_parses() -> TestResult {
        let engine = Arc::new(ScriptedEngine::default());
        let server = start(engine.clone(), ServeConfig::default()).await;
        let policy =
            RemotePolicy::new(RemotePolicyConfig::new(server.base_url(), "ui-tars"), None)?;
        let contexts = [context(0), context(1), context(2)];
        let responses = policy.act(&contexts, &SamplingParams::greedy(256)).await?;
        assert_eq!(responses.len(), 3);
        for (ctx, response) in contexts.iter().zip(&responses) {
            let messages = build_messages(ctx, &PromptConfig::default());
            let (text, ids, lps) = in_process(&engine, &messages);
            assert_eq!(response.text, text);
            assert_eq!(response.token_ids, ids);
            assert_eq!(response.logprobs, lps);
            assert_eq!(response.token_ids.last(), Some(&IM_END));
            assert_eq!(response.finish_reason, FinishReason::Stop);
            // The prompt carries min(steps + 1, limit_images = 5) screenshots.
            assert!(text.starts_with(&format!(
                "Thought: I see {} screenshot(s).",
                ctx.screenshots.len()
            )));
            let parsed = parse_response(
                &response.text,
                &ParseConfig::new(CoordinateSystem::Relative1000, 1000, 1000),
            )?;
            assert!(matches!(parsed.actions.as_slice(), [Action::Click { .. }]));
        }
        server.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn remote_policy_pushes_lora_adapters_and_reports_server_errors() -> TestResult {
        let engine = Arc::new(ScriptedEngine::default());
        let server = start(
            engine,
            ServeConfig {
                api_key: Some("k".into()),
                ..ServeConfig::default()
            },
        )
        .await;
        let mut config = RemotePolicyConfig::new(server.base_url(), "ui-tars");
        let unauthorized = RemotePolicy::new(config.clone(), None)?;
        let err = unauthorized
            .act(&[context(0)], &SamplingParams::greedy(32))
            .await;
        assert!(
            matches!(err, Err(arpo_core::PolicyError::InvalidInput(ref m)) if m.contains("401")),
            "{err:?}"
        );

        config.api_key = Some("k".into());
        let mut policy = RemotePolicy::new(config, None)?;
        let before = policy
            .act(&[context(1)], &SamplingParams::greedy(256))
            .await?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("adapter_config.json"), "{}")?;
        policy.push_lora_adapter("policy", dir.path()).await?;
        policy.push_lora_adapter("policy", dir.path()).await?; // a second push replaces it
        assert_eq!(policy.config().model, "policy");
        let after = policy
            .act(&[context(1)], &SamplingParams::greedy(256))
            .await?;
        assert_ne!(before[0].text, after[0].text);
        assert!(
            after[0]
                .text
                .starts_with("Thought: I see 2 screenshot(s) with policy.")
        );

        let err = policy
            .load_lora_adapter("x", Path::new("/no/such/adapter"))
            .await;
        assert!(
            matches!(err, Err(arpo_core::PolicyError::InvalidInput(ref m)) if m.contains("adapter_config.json")),
            "{err:?}"
        );
        server.shutdown().await?;
        Ok(())
    }

    use std::path::Path;

    /// With no model name, requests go to the first model the server lists (not `""`, which
    /// every engine answers 404); the api key goes with every request and the pre-flight.
    #[tokio::test]
    async fn remote_policy_without_a_model_name_and_with_an_api_key() -> TestResult {
        let engine = Arc::new(ScriptedEngine::default());
        let server = start(
            engine.clone(),
            ServeConfig {
                served_model_name: "served-name".into(),
                api_key: Some("k3y".into()),
                ..ServeConfig::default()
            },
        )
        .await;
        let mut config = RemotePolicyConfig::new(server.base_url(), "");
        config.api_key = Some("wrong".into());
        let wrong = RemotePolicy::new(config.clone(), None)?;
        let err = wrong.preflight().await;
        assert!(
            matches!(err, Err(arpo_core::PolicyError::Server(ref m)) if m.contains("401") && m.contains("server_api_key")),
            "{err:?}"
        );
        config.api_key = Some("k3y".into());
        let policy = RemotePolicy::new(config, None)?;
        assert_eq!(policy.preflight().await?, "served-name");
        let responses = policy
            .act(&[context(0), context(1)], &SamplingParams::greedy(256))
            .await?;
        for (ctx, response) in [context(0), context(1)].iter().zip(&responses) {
            let (text, ids, _) =
                in_process(&engine, &build_messages(ctx, &PromptConfig::default()));
            assert_eq!(response.text, text);
            assert_eq!(response.token_ids, ids);
        }
        assert!(
            policy.describe().contains("model served-name"),
            "{}",
            policy.describe()
        );
        // A named model that is not there is the server's 404, not a silent fallback.
        let mut named = RemotePolicyConfig::new(server.base_url(), "nope");
        named.api_key = Some("k3y".into());
        let err = RemotePolicy::new(named, None)?
            .act(&[context(0)], &SamplingParams::greedy(8))
            .await;
        assert!(
            matches!(err, Err(arpo_core::PolicyError::InvalidInput(ref m)) if m.contains("404")),
            "{err:?}"
        );
        server.shutdown().await?;
        Ok(())
    }

    /// Weight paths reach the server absolute: a relative one would be read from the server's
    /// own working directory (vLLM answered 404 "No adapter found" for one).
    #[tokio::test]
    async fn weight_pushes_send_absolute_paths() -> TestResult {
        let engine = Arc::new(ScriptedEngine::default());
        let server = start(engine.clone(), ServeConfig::default()).await;
        let dir = tempfile::tempdir_in(".")?;
        std::fs::write(dir.path().join("adapter_config.json"), "{}")?;
        let relative = Path::new(dir.path().file_name().ok_or("a name")?);
        assert!(relative.is_relative());
        let mut policy =
            RemotePolicy::new(RemotePolicyConfig::new(server.base_url(), "ui-tars"), None)?;
        policy.push_lora_adapter("rel", relative).await?;
        let sent = engine.adapter_path("rel").ok_or("the adapter is loaded")?;
        assert_eq!(Path::new(&sent), std::env::current_dir()?.join(relative));
        server.shutdown().await?;
        Ok(())
    }

    /// Seeds go out as vLLM takes them (at most i64::MAX; vLLM answered 400 to a larger one).
    #[test]
    fn seeds_fit_a_signed_64_bit_integer() -> TestResult {
        let policy =
            RemotePolicy::new(RemotePolicyConfig::new("http://127.0.0.1:1/v1", "m"), None)?;
        let mut sampling = SamplingParams::greedy(8);
        for (seed, want) in [(u64::MAX, i64::MAX as u64), (1 << 63, 0), (17, 17)] {
            sampling.seed = Some(seed);
            let body = policy.request_body("m", &[], &sampling);
            assert_eq!(body["seed"].as_u64(), Some(want), "seed {seed}");
        }
        Ok(())
    }

    /// Another engine's model list with only ids (SGLang-like) still names the model.
    #[test]
    fn a_model_list_with_only_ids_parses() -> TestResult {
        let list: arpo_serve::api::ModelList =
            serde_json::from_str(r#"{"object": "list", "data": [{"id": "m"}]}"#)?;
        assert_eq!(list.data[0].id, "m");
        // vLLM's card of a loaded LoRA adapter (0.32, abridged).
        let list: arpo_serve::api::ModelList = serde_json::from_str(
            r#"{"object": "list", "data": [
                {"id": "base", "object": "model", "created": 1, "owned_by": "vllm", "root": "/m", "parent": null, "max_model_len": 4096},
                {"id": "arpo-policy", "object": "model", "created": 1, "owned_by": "vllm", "root": "/p", "parent": "base", "max_model_len": null}
            ]}"#,
        )?;
        assert_eq!(list.data[1].id, "arpo-policy");
        assert_eq!(list.data[1].max_model_len, 0);
        Ok(())
    }

    /// A port nothing listens on (bound, then released).
    fn dead_url() -> Result<String, Box<dyn std::error::Error>> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        drop(listener);
        Ok(format!("http://{addr}/v1"))
    }

    /// Requests spread over every live server; one that is down is retried on another and
    /// reported; weights reach every server.
    #[tokio::test]
    async fn requests_spread_over_servers_and_a_dead_one_is_retried_elsewhere() -> TestResult {
        let engines = [
            Arc::new(ScriptedEngine::default().with_step_cost(Duration::from_millis(2))),
            Arc::new(ScriptedEngine::default().with_step_cost(Duration::from_millis(2))),
        ];
        let a = start(engines[0].clone(), ServeConfig::default()).await;
        let b = start(engines[1].clone(), ServeConfig::default()).await;
        let dead = dead_url()?;
        let list = format!("{}, {dead}", a.base_url());
        let config = RemotePolicyConfig::new(list, "ui-tars").with_more_urls(&[b.base_url()]);
        assert_eq!(
            config.base_urls,
            vec![a.base_url(), dead.clone(), b.base_url()]
        );
        let policy = RemotePolicy::new(config, None)?;
        let contexts: Vec<AgentContext> = (0..12).map(|i| context(i % 3)).collect();
        let responses = policy.act(&contexts, &SamplingParams::greedy(256)).await?;
        let served: Vec<usize> = engines
            .iter()
            .map(|e| e.batch_sizes().iter().sum())
            .collect();
        for (ctx, response) in contexts.iter().zip(&responses) {
            let (text, _, _) =
                in_process(&engines[0], &build_messages(ctx, &PromptConfig::default()));
            assert_eq!(response.text, text);
        }
        assert_eq!(served.iter().sum::<usize>(), 12, "{served:?}");
        assert!(
            served.iter().all(|&n| n >= 2),
            "both live servers serve: {served:?}"
        );
        let report = policy.server_failures();
        let dead_report = report
            .iter()
            .find(|r| r.url == dead)
            .ok_or("dead server listed")?;
        assert!(dead_report.failures >= 1, "{report:?}");
        assert!(dead_report.last_error.is_some());
        assert!(
            report
                .iter()
                .filter(|r| r.url != dead)
                .all(|r| r.failures == 0),
            "{report:?}"
        );

        // Every server down: one error naming each.
        let all_dead = RemotePolicy::new(
            RemotePolicyConfig::new(format!("{dead},{}", dead_url()?), "ui-tars"),
            None,
        )?;
        let err = all_dead
            .act(&[context(0)], &SamplingParams::greedy(8))
            .await;
        assert!(
            matches!(err, Err(arpo_core::PolicyError::Server(ref m)) if m.starts_with("every model server failed") && m.contains(&dead)),
            "{err:?}"
        );

        // Full weights to both live servers, by arpo's route and by SGLang's (which this
        // server also offers, at its root): the scripted answer names the weights version.
        let live = RemotePolicy::new(
            RemotePolicyConfig::new(format!("{},{}", a.base_url(), b.base_url()), "ui-tars"),
            None,
        )?;
        let ckpt = tempfile::tempdir()?;
        std::fs::write(ckpt.path().join("config.json"), "{}")?;
        live.push_weights(WeightSync::ArpoReload, ckpt.path(), "unused")
            .await?;
        live.push_weights(WeightSync::SglangDisk, ckpt.path(), "unused")
            .await?;
        live.push_weights(WeightSync::None, Path::new("/no/such/dir"), "unused")
            .await?;
        for _ in 0..2 {
            let r = live
                .act(&[context(0)], &SamplingParams::greedy(256))
                .await?;
            assert!(
                r[0].text.starts_with("Thought: I see 1 screenshot(s) v2."),
                "{}",
                r[0].text
            );
        }
        // A failed push names the server and the reason.
        let err = live
            .push_weights(WeightSync::ArpoReload, Path::new("/no/such/dir"), "unused")
            .await;
        assert!(
            matches!(err, Err(arpo_core::PolicyError::InvalidInput(ref m)) if m.contains("config.json")),
            "{err:?}"
        );
        // ... and then no server holds the weights being trained: no request goes out.
        assert!(live.server_failures().iter().all(|f| f.stale));
        let err = live.act(&[context(0)], &SamplingParams::greedy(8)).await;
        assert!(
            matches!(err, Err(arpo_core::PolicyError::Server(ref m)) if m.starts_with("no model server holds the current weights")),
            "{err:?}"
        );

        // A push that misses one server (down) succeeds on the others; the missed one gets no
        // requests until a later push reaches it, so every rollout samples the new weights.
        let partly = RemotePolicy::new(
            RemotePolicyConfig::new(format!("{},{dead}", a.base_url()), "ui-tars"),
            None,
        )?;
        partly
            .push_weights(WeightSync::ArpoReload, ckpt.path(), "unused")
            .await?;
        let report = partly.server_failures();
        assert_eq!(
            report
                .iter()
                .map(|f| (f.stale, f.failures))
                .collect::<Vec<_>>(),
            vec![(false, 0), (true, 1)],
            "{report:?}"
        );
        let r = partly
            .act(&vec![context(0); 4], &SamplingParams::greedy(256))
            .await?;
        assert!(
            r.iter()
                .all(|r| r.text.starts_with("Thought: I see 1 screenshot(s) v3."))
        );
        assert_eq!(
            partly.server_failures()[1].requests,
            1,
            "only the push went to it"
        );

        assert_eq!("sglang_disk".parse::<WeightSync>()?, WeightSync::SglangDisk);
        let bad = "nccl".parse::<WeightSync>().map_err(|e| e.to_string());
        assert!(
            matches!(bad, Err(ref m) if m.contains("lora_adapter")),
            "{bad:?}"
        );
        a.shutdown().await?;
        b.shutdown().await?;
        Ok(())
    }

    /// Without `token_id:` names (SGLang), ids come from the entries' bytes through the
    /// model's byte-level vocabulary; the reference ids are the tokenizer's own encoding.
    #[test]
    fn token_bytes_map_back_to_the_tokenizers_ids() -> TestResult {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models/tiny-qwen2vl/tokenizer.json");
        let mapper = TokenMapper::from_file(&path)?;
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| e.to_string())?;
        let text = "Thought: click the é button\nAction: click(start_box='(12,34)')<|im_end|>";
        let encoding = tokenizer.encode(text, false).map_err(|e| e.to_string())?;
        let ids = encoding.get_ids();
        assert!(ids.len() > 10);
        for &id in ids {
            // What a server puts in `bytes`: the token's raw bytes (the literal text of a special token).
            let spelled = tokenizer.id_to_token(id).ok_or("id in vocab")?;
            let bytes: Vec<u8> = if spelled.starts_with("<|") {
                spelled.clone().into_bytes()
            } else {
                spelled.chars().map(unbyte).collect()
            };
            let entry = TokenLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                logprob: -1.0,
                bytes: Some(bytes),
                top_logprobs: vec![],
            };
            assert_eq!(mapper.token_id(&entry), Some(id), "{spelled:?}");
        }
        Ok(())
    }

    /// The inverse of GPT-2's byte alphabet, written out from its definition.
    fn unbyte(c: char) -> u8 {
        let printable: Vec<u32> = (0x21..=0x7E)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let code = c as u32;
        if printable.contains(&code) {
            return code as u8;
        }
        let others: Vec<u32> = (0..256).filter(|b| !printable.contains(b)).collect();
        others[(code - 256) as usize] as u8
    }
}

/// What `cargo xtask test-server` does, against the server with the fixture screenshot.
#[tokio::test]
async fn server_check_with_the_fixture_screenshot() -> TestResult {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/screenshots/desktop.png");
    let shot = arpo_serve::check_image(std::fs::read(&path)?, &ImageLimits::default())
        .map_err(|e| e.message)?;
    assert_eq!((shot.width, shot.height), (640, 400));
    let engine = Arc::new(ScriptedEngine::default());
    let server = start(
        engine,
        ServeConfig {
            api_key: Some("k".into()),
            ..ServeConfig::default()
        },
    )
    .await;
    let check = arpo_serve::check_server(
        &server.base_url(),
        Some("k"),
        None,
        shot.clone(),
        "Open the Documents folder",
        256,
    )
    .await?;
    assert_eq!(check.model, "ui-tars");
    assert_eq!(check.health["status"], "ok");
    assert!(
        check
            .response
            .starts_with("Thought: I see 1 screenshot(s).\nAction: click(")
    );
    assert_eq!(check.finish_reason.as_deref(), Some("stop"));
    let wrong_key =
        arpo_serve::check_server(&server.base_url(), Some("x"), None, shot, "t", 8).await;
    let message = wrong_key.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("401") && message.contains("api key"),
        "{message}"
    );
    let addr = server.local_addr();
    server.shutdown().await?;
    let down = arpo_serve::check_server(
        &format!("http://{addr}/v1"),
        None,
        None,
        Screenshot::new(vec![], 1, 1),
        "t",
        8,
    )
    .await;
    let message = down.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("is the server running"), "{message}");
    Ok(())
}

/// A 10k-key body without `messages` is answered 400 in well under a second, and requests
/// sent at the same time are served. (Parsing it once per key, as a field-by-field search
/// for the culprit would, takes 10k parses of 10k keys: many seconds.)
#[tokio::test]
async fn a_10k_key_body_is_refused_fast_while_others_are_served() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let server = start(engine, ServeConfig::default()).await;
    let url = format!("{}/chat/completions", server.base_url());
    let mut hostile = serde_json::Map::new();
    for i in 0..10_000 {
        hostile.insert(format!("key{i}"), json!(i));
    }
    let hostile = Value::Object(hostile);
    let hostile_calls = (0..4).map(|_| {
        let url = url.clone();
        let hostile = hostile.clone();
        async move {
            let started = std::time::Instant::now();
            let (status, err) = error_of(post(&url, &hostile).await).await;
            (status, err, started.elapsed())
        }
    });
    let normal_calls = (0..4).map(|i| {
        let url = url.clone();
        async move {
            let r = post(&url, &request_with_images(i % 2, json!({}))).await;
            r.status().as_u16()
        }
    });
    let (hostile, normal) = tokio::join!(
        futures::future::join_all(hostile_calls),
        futures::future::join_all(normal_calls)
    );
    for (status, err, took) in hostile {
        assert_eq!(status, 400, "{:?}", err.error);
        assert_eq!(err.error.param.as_deref(), Some("messages"));
        assert!(took < Duration::from_millis(500), "took {took:?}");
    }
    assert_eq!(normal, vec![200; 4]);
    server.shutdown().await?;
    Ok(())
}

/// At most `max_loras` adapters and `max_lora_bytes` of them: the next load is refused with
/// 409 and a message naming the limit; after an unload it fits again.
#[tokio::test]
async fn adapter_loads_are_bounded_by_count_and_memory() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("adapter_config.json"), "{}")?;
    let load = |base: String, name: &str| {
        let body = json!({"lora_name": name, "lora_path": dir.path()});
        async move { post(&format!("{base}/load_lora_adapter"), &body).await }
    };
    // Count: 2 adapters.
    let engine = Arc::new(ScriptedEngine::default().with_adapter_bytes(100));
    let config = ServeConfig {
        max_loras: 2,
        max_lora_bytes: 10_000,
        ..ServeConfig::default()
    };
    let server = start(engine, config).await;
    let base = server.base_url();
    assert_eq!(load(base.clone(), "a").await.status(), 200);
    assert_eq!(load(base.clone(), "b").await.status(), 200);
    let (status, err) = error_of(load(base.clone(), "c").await).await;
    assert_eq!(status, 409);
    assert_eq!(err.error.code.as_deref(), Some("too_many_adapters"));
    assert!(
        err.error.message.contains("--max-loras 2"),
        "{}",
        err.error.message
    );
    let r = post(
        &format!("{base}/unload_lora_adapter"),
        &json!({"lora_name": "a"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(load(base.clone(), "c").await.status(), 200);
    server.shutdown().await?;

    // Memory: 100 bytes each, 250 allowed: two fit, the third (300) does not.
    let engine = Arc::new(ScriptedEngine::default().with_adapter_bytes(100));
    let config = ServeConfig {
        max_loras: 10,
        max_lora_bytes: 250,
        ..ServeConfig::default()
    };
    let server = start(engine, config).await;
    let base = server.base_url();
    assert_eq!(load(base.clone(), "a").await.status(), 200);
    assert_eq!(load(base.clone(), "b").await.status(), 200);
    let (status, err) = error_of(load(base.clone(), "c").await).await;
    assert_eq!(status, 409);
    assert!(
        err.error.message.contains("300 bytes"),
        "{}",
        err.error.message
    );
    server.shutdown().await?;
    Ok(())
}

/// A non-loopback address needs an api key, unless allowed explicitly.
#[tokio::test]
async fn non_loopback_bind_needs_an_api_key_or_an_explicit_allow() -> TestResult {
    let engine = Arc::new(ScriptedEngine::default());
    let everywhere: std::net::SocketAddr = "0.0.0.0:0".parse()?;
    let refused = Server::start(engine.clone(), ServeConfig::default(), everywhere).await;
    match refused {
        Err(arpo_serve::ServeError::Unauthenticated { addr }) => assert_eq!(addr, "0.0.0.0:0"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let with_key = ServeConfig {
        api_key: Some("k".into()),
        ..ServeConfig::default()
    };
    Server::start(engine.clone(), with_key, everywhere)
        .await?
        .shutdown()
        .await?;
    let allowed = ServeConfig {
        allow_unauthenticated: true,
        ..ServeConfig::default()
    };
    Server::start(engine.clone(), allowed, everywhere)
        .await?
        .shutdown()
        .await?;
    // Loopback is fine without a key (v4 and v6).
    ServeConfig::default().check_bind("127.0.0.1:9000".parse()?)?;
    ServeConfig::default().check_bind("[::1]:9000".parse()?)?;
    assert!(
        ServeConfig::default()
            .check_bind("192.168.1.5:9000".parse()?)
            .is_err()
    );
    Ok(())
}

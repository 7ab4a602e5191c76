//! The HTTP server over the real candle model (`ModelEngine` on the tiny fixture
//! `fixtures/models/tiny-qwen2vl`, random weights) on a loopback port: answers, token ids and
//! log-probs equal in-process generation; `RemotePolicy` equals `LocalPolicy`; LoRA adapters
//! saved by the trainer load, change the answer to the merged model's, and unload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arpo_core::protocol::PromptConfig;
use arpo_core::{
    AgentContext, ChatMessage, ContentPart, Environment, FinishReason, Policy, Response, Role,
    SamplingParams, Screenshot,
};
use arpo_env_sim::{Catalogue, SimEnv};
use arpo_model::train::lora::LoraConfig;
use arpo_model::train::trainable::Trainable;
use arpo_model::{LocalPolicy, UiTars};
use arpo_serve::api::{ChatCompletion, ErrorBody};
use arpo_serve::remote::parse_token_id;
use arpo_serve::{
    EngineError, ImageLimits, ModelEngine, RemotePolicy, RemotePolicyConfig, ServeConfig, Server,
};
use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Generated tokens per answer: small, so each test stays fast.
const MAX_TOKENS: usize = 12;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-qwen2vl")
}

fn load_uitars() -> Result<UiTars, Box<dyn std::error::Error>> {
    let dir = model_dir();
    let dir = dir.to_str().ok_or("utf-8 fixture path")?;
    Ok(UiTars::load(dir, DType::F32, &Device::Cpu)?)
}

/// The server over a `ModelEngine` of the fixture model, on a free loopback port.
async fn start(max_batch: usize) -> Result<Server, Box<dyn std::error::Error>> {
    let engine = Arc::new(ModelEngine::new(
        load_uitars()?,
        model_dir().display().to_string(),
    ));
    let config = ServeConfig {
        max_batch,
        ..ServeConfig::default()
    };
    Ok(Server::start(engine, config, "127.0.0.1:0".parse()?).await?)
}

/// A golden fixture image, as the server sees it after its checks.
fn golden_image(name: &str) -> Result<Screenshot, Box<dyn std::error::Error>> {
    let path = model_dir().join("../tiny-qwen2vl-golden/images").join(name);
    let shot = arpo_serve::check_image(std::fs::read(&path)?, &ImageLimits::default())
        .map_err(|e| e.message)?;
    Ok(shot)
}

/// A system message and a user message with an instruction and `images` fixture images.
fn conversation(images: usize) -> Result<Vec<ChatMessage>, Box<dyn std::error::Error>> {
    let names = [
        "a_56x84.png",
        "b_112x56.png",
        "c_101x75.png",
        "d_300x200.png",
    ];
    let mut content = vec![ContentPart::Text {
        text: "Open the settings menu and turn on dark mode.".into(),
    }];
    for name in names.iter().take(images) {
        content.push(ContentPart::Image {
            image: golden_image(name)?,
        });
    }
    Ok(vec![
        ChatMessage::text(Role::System, "You are a helpful assistant."),
        ChatMessage {
            role: Role::User,
            content,
        },
    ])
}

/// The chat-completions body of `messages` (images as base64 data urls), greedy, with the
/// sampled tokens' log-probs named `token_id:<id>`.
fn body(messages: &[ChatMessage], model: &str, max_tokens: usize) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| {
            let parts: Vec<Value> = m
                .content
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => json!({"type": "text", "text": text}),
                    ContentPart::Image { image } => json!({
                        "type": "image_url",
                        "image_url": {"url": format!(
                            "data:image/png;base64,{}",
                            base64::engine::general_purpose::STANDARD.encode(&image.bytes)
                        )},
                    }),
                })
                .collect();
            json!({"role": m.role.as_str(), "content": parts})
        })
        .collect();
    json!({
        "model": model,
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "logprobs": true,
        "return_tokens_as_token_ids": true,
    })
}

async fn post(url: &str, body: &Value) -> Result<reqwest::Response, reqwest::Error> {
    reqwest::Client::new().post(url).json(body).send().await
}

async fn complete(url: &str, body: &Value) -> Result<ChatCompletion, Box<dyn std::error::Error>> {
    let response = post(url, body).await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        return Err(format!("{url} answered {status}: {text}").into());
    }
    Ok(serde_json::from_str(&text)?)
}

/// What the server answered: the first choice's text, token ids, log-probs, finish reason.
struct Answer {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    finish: String,
}

/// The answer's text, token ids (from `token_id:<id>`), log-probs and finish reason.
fn answer_of(completion: &ChatCompletion) -> Result<Answer, Box<dyn std::error::Error>> {
    let choice = completion.choices.first().ok_or("no choice")?;
    let entries = &choice.logprobs.as_ref().ok_or("no logprobs")?.content;
    let ids = entries
        .iter()
        .map(|e| {
            parse_token_id(&e.token).ok_or_else(|| format!("token {:?} is not an id", e.token))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    let logprobs = entries.iter().map(|e| e.logprob).collect();
    Ok(Answer {
        text: choice.message.content.clone().unwrap_or_default(),
        ids,
        logprobs,
        finish: choice.finish_reason.clone().unwrap_or_default(),
    })
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4,
            "{what}: logprob {i} is {g} over HTTP, {w} in process"
        );
    }
}

fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The completion equals the in-process response: text, ids, log-probs, finish reason, usage.
fn assert_same(
    completion: &ChatCompletion,
    want: &Response,
    what: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let Answer {
        text,
        ids,
        logprobs,
        finish,
    } = answer_of(completion)?;
    assert!(!want.token_ids.is_empty(), "{what}: something is generated");
    assert_eq!(ids, want.token_ids, "{what}: token ids");
    assert_eq!(text, want.text, "{what}: text");
    assert_close(&logprobs, &want.logprobs, what);
    assert_eq!(
        finish,
        finish_name(want.finish_reason),
        "{what}: finish reason"
    );
    assert_eq!(
        completion.usage.completion_tokens,
        want.token_ids.len() as u64,
        "{what}: usage.completion_tokens"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_with_0_1_3_images_equal_in_process_generation() -> TestResult {
    let local = load_uitars()?;
    let server = start(16).await?;
    let url = format!("{}/chat/completions", server.base_url());
    let greedy = SamplingParams::greedy(MAX_TOKENS);
    let mut wants = Vec::new();
    let mut bodies = Vec::new();
    for images in [0, 1, 3] {
        let messages = conversation(images)?;
        let (mut responses, _) = local.respond(std::slice::from_ref(&messages), &greedy)?;
        let want = responses.pop().ok_or("one response")?;
        let prompt = local.prepare(&messages)?;
        let body = body(&messages, "ui-tars", MAX_TOKENS);
        // One at a time.
        let completion = complete(&url, &body).await?;
        assert_same(&completion, &want, &format!("{images} image(s), alone"))?;
        assert_eq!(
            completion.usage.prompt_tokens,
            prompt.input_ids.len() as u64,
            "the server's prompt is the in-process prompt"
        );
        wants.push(want);
        bodies.push(body);
    }
    // The three at once (generated in one batch when they arrive together): the same answers.
    let calls = bodies.iter().map(|b| complete(&url, b));
    let together = futures::future::join_all(calls).await;
    for ((completion, want), images) in together.into_iter().zip(&wants).zip([0, 1, 3]) {
        assert_same(
            &completion?,
            want,
            &format!("{images} image(s), concurrent"),
        )?;
    }
    server.shutdown().await?;
    Ok(())
}

/// Agent contexts with real screenshots of the embedded desktop: two fresh episodes and one
/// after a step (two screenshots and one earlier response).
async fn sim_contexts() -> Result<Vec<AgentContext>, Box<dyn std::error::Error>> {
    let catalogue = Catalogue::default();
    let tasks = catalogue.train();
    let mut contexts = Vec::new();
    for (k, task) in tasks.iter().take(3).enumerate() {
        let mut env = SimEnv::new();
        let first = env.reset(task).await?;
        let mut context = AgentContext {
            instruction: task.instruction.clone(),
            screenshots: vec![first.screenshot],
            responses: vec![],
        };
        if k == 1 {
            let oracle = catalogue.oracle(task)?;
            let action = oracle.first().ok_or("an oracle step")?;
            let step = env.step(action).await?;
            context.screenshots.push(step.observation.screenshot);
            context.responses.push(
                "Thought: I start with the first control.\nAction: click(start_box='(120,80)')"
                    .into(),
            );
        }
        contexts.push(context);
    }
    Ok(contexts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_policy_answers_as_the_local_policy() -> TestResult {
    let contexts = sim_contexts().await?;
    assert!(contexts.iter().all(|c| {
        c.screenshots
            .iter()
            .all(|s| (s.width, s.height) == (336, 224))
    }));
    let greedy = SamplingParams::greedy(MAX_TOKENS);
    let local = LocalPolicy::new(load_uitars()?, PromptConfig::default());
    let want = local.act(&contexts, &greedy).await?;

    let server = start(16).await?;
    let remote = RemotePolicy::new(RemotePolicyConfig::new(server.base_url(), "ui-tars"), None)?;
    let got = remote.act(&contexts, &greedy).await?;
    assert_eq!(got.len(), contexts.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(!w.token_ids.is_empty());
        assert_eq!(g.token_ids, w.token_ids, "context {i}: token ids");
        assert_eq!(g.text, w.text, "context {i}: text");
        assert_eq!(
            g.finish_reason, w.finish_reason,
            "context {i}: finish reason"
        );
        assert_close(&g.logprobs, &w.logprobs, &format!("context {i}"));
    }
    // Different screens, different answers (the contexts really reach the model).
    assert!(
        want.windows(2).any(|p| p[0].token_ids != p[1].token_ids),
        "{want:?}"
    );
    // As against a server that names tokens by text and bytes only (SGLang): the model's
    // tokenizer maps them back to the same ids; no model name given.
    let mut config = RemotePolicyConfig::new(server.base_url(), "");
    config.token_ids_in_logprobs = false;
    let mapper = arpo_serve::TokenMapper::from_file(&model_dir().join("tokenizer.json"))?;
    let by_bytes = RemotePolicy::new(config, Some(mapper))?;
    let got = by_bytes.act(&contexts, &greedy).await?;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.token_ids, w.token_ids,
            "context {i}: token ids from bytes"
        );
    }
    let unmapped = RemotePolicy::new(
        RemotePolicyConfig {
            token_ids_in_logprobs: false,
            ..RemotePolicyConfig::new(server.base_url(), "ui-tars")
        },
        None,
    )?;
    let err = unmapped.act(&contexts[..1], &greedy).await;
    assert!(
        matches!(err, Err(arpo_core::PolicyError::Server(ref m)) if m.contains("tokenizer.json")),
        "{err:?}"
    );
    server.shutdown().await?;
    Ok(())
}

/// A PEFT adapter from the trainer's LoRA, with non-zero B matrices so that it changes the
/// model; returns the merged model's greedy answer to `messages` and the adapter directory.
fn make_adapter(
    base: &UiTars,
    dest: &Path,
    messages: &[ChatMessage],
    greedy: &SamplingParams,
) -> Result<(Response, PathBuf), Box<dyn std::error::Error>> {
    let (merged, _, dir) = make_adapter_with(base, dest, messages, greedy, None)?;
    Ok((merged, dir))
}

/// [`make_adapter`], and the answer of the trainer's rollout copy in `weights` (the adapters
/// unmerged over a quantized base, `Qwen2Vl::to_rollout`).
fn make_adapter_with(
    base: &UiTars,
    dest: &Path,
    messages: &[ChatMessage],
    greedy: &SamplingParams,
    weights: Option<arpo_model::RolloutWeights>,
) -> Result<(Response, Option<arpo_model::Generation>, PathBuf), Box<dyn std::error::Error>> {
    let trainable = Trainable::lora(
        base.model.clone(),
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 7,
            ..LoraConfig::default()
        },
    )?;
    let set = trainable.lora_set().ok_or("a lora set")?;
    assert!(!set.is_empty());
    for (k, adapter) in set.adapters().values().enumerate() {
        let (out_dim, r) = adapter.b.as_tensor().dims2()?;
        let values: Vec<f32> = (0..out_dim * r)
            .map(|i| (((i * 37 + k * 11) % 23) as f32 / 23.0 - 0.5) * 0.8)
            .collect();
        adapter
            .b
            .set(&Tensor::from_vec(values, (out_dim, r), &Device::Cpu)?)?;
    }
    let dir = trainable.save_adapter(dest, &model_dir().display().to_string(), None)?;
    let merged = trainable.merged_model()?;
    let prompt = base.prepare(messages)?;
    let rollout = match weights {
        Some(w) => Some(
            trainable
                .model
                .to_rollout(w)?
                .generate(std::slice::from_ref(&prompt), greedy, &base.stop_ids)?
                .0
                .pop()
                .ok_or("one generation")?,
        ),
        None => None,
    };
    let (mut generations, _) = merged.generate(&[prompt], greedy, &base.stop_ids)?;
    let g = generations.pop().ok_or("one generation")?;
    Ok((
        Response {
            text: base.tokenizer.decode(&g.token_ids)?,
            token_ids: g.token_ids,
            logprobs: g.logprobs,
            finish_reason: g.finish_reason,
        },
        rollout,
        dir,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapter_load_changes_the_answer_to_the_merged_models_and_unload_removes_it()
-> TestResult {
    let local = load_uitars()?;
    let messages = conversation(1)?;
    let greedy = SamplingParams::greedy(MAX_TOKENS);
    let tmp = tempfile::tempdir()?;
    let (adapted, adapter_dir) =
        make_adapter(&local, &tmp.path().join("step1"), &messages, &greedy)?;
    assert!(adapter_dir.join("adapter_model.safetensors").is_file());
    assert!(adapter_dir.join("adapter_config.json").is_file());
    let (mut base_answers, _) = local.respond(std::slice::from_ref(&messages), &greedy)?;
    let base = base_answers.pop().ok_or("one response")?;
    assert_ne!(
        adapted.token_ids, base.token_ids,
        "the adapter changes the greedy answer in process"
    );

    let server = start(16).await?;
    let v1 = server.base_url();
    let url = format!("{v1}/chat/completions");
    let before = complete(&url, &body(&messages, "ui-tars", MAX_TOKENS)).await?;
    assert_same(&before, &base, "base before loading")?;

    let r = post(
        &format!("{v1}/load_lora_adapter"),
        &json!({"lora_name": "step1", "lora_path": adapter_dir}),
    )
    .await?;
    assert_eq!(r.status(), 200, "{}", r.text().await?);
    let models: Value = reqwest::get(format!("{v1}/models")).await?.json().await?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec!["ui-tars", "step1"]);

    let with = complete(&url, &body(&messages, "step1", MAX_TOKENS)).await?;
    assert_eq!(with.model, "step1");
    assert_same(&with, &adapted, "with the adapter")?;
    // The base model is untouched by the adapter.
    let base_again = complete(&url, &body(&messages, "ui-tars", MAX_TOKENS)).await?;
    assert_same(&base_again, &base, "base while the adapter is loaded")?;

    let r = post(
        &format!("{v1}/unload_lora_adapter"),
        &json!({"lora_name": "step1"}),
    )
    .await?;
    assert_eq!(r.status(), 200, "{}", r.text().await?);
    let r = post(&url, &body(&messages, "step1", MAX_TOKENS)).await?;
    assert_eq!(r.status(), 404);
    let err: ErrorBody = r.json().await?;
    assert_eq!(err.error.code.as_deref(), Some("model_not_found"));
    let after = complete(&url, &body(&messages, "ui-tars", MAX_TOKENS)).await?;
    assert_same(&after, &base, "base after unloading")?;
    server.shutdown().await?;
    Ok(())
}

/// `top_logprobs` are the top-k of the model's whole next-token distribution, vision
/// placeholders left out as the sampler leaves them out. Reference: the logits transformers
/// computed for the golden prompts (`fixtures/models/tiny-qwen2vl-golden`, made by
/// `fixtures/scripts/make_tiny_qwen2vl.py`), log-softmaxed here; the second token's best
/// alternative is transformers' second greedy token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_logprobs_equal_the_transformers_distribution() -> TestResult {
    let golden_dir = model_dir().join("../tiny-qwen2vl-golden");
    let golden: Value = serde_json::from_slice(&std::fs::read(golden_dir.join("golden.json"))?)?;
    let placeholders = [412u32, 413, 409]; // <|image_pad|>, <|video_pad|>, <|vision_start|>
    let server = start(4).await?;
    let url = format!("{}/chat/completions", server.base_url());
    for case in ["text_only", "one_image"] {
        let c = &golden["cases"][case];
        let mut images = c["images"]
            .as_array()
            .ok_or("images")?
            .iter()
            .map(|n| n.as_str().ok_or("image name"));
        let mut messages = Vec::new();
        for m in c["messages"].as_array().ok_or("messages")? {
            let mut parts = Vec::new();
            for p in m["content"].as_array().ok_or("content")? {
                if p["type"] == "image" {
                    let shot = golden_image(images.next().ok_or("an image per part")??)?;
                    let data = base64::engine::general_purpose::STANDARD.encode(&shot.bytes);
                    parts.push(json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}}));
                } else {
                    parts.push(p.clone());
                }
            }
            messages.push(json!({"role": m["role"], "content": parts}));
        }
        let body = json!({
            "model": "ui-tars",
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": 2,
            "logprobs": true,
            "top_logprobs": 5,
            "return_tokens_as_token_ids": true,
        });
        let answer = complete(&url, &body).await?;
        let input_len = c["input_ids"].as_array().ok_or("input_ids")?.len();
        assert_eq!(
            answer.usage.prompt_tokens as usize, input_len,
            "{case}: the golden prompt"
        );
        let tensors = candle_core::safetensors::load(
            golden_dir.join(format!("{case}.safetensors")),
            &Device::Cpu,
        )?;
        let logits = tensors.get("logits").ok_or("logits")?;
        let last: Vec<f32> = logits.get(logits.dim(0)? - 1)?.to_vec1()?;
        let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_z = max
            + last
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let mut want: Vec<(u32, f64)> = last
            .iter()
            .enumerate()
            .filter(|(id, _)| !placeholders.contains(&(*id as u32)))
            .map(|(id, &l)| (id as u32, l as f64 - log_z))
            .collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        want.truncate(5);

        let entries = &answer.choices[0]
            .logprobs
            .as_ref()
            .ok_or("logprobs")?
            .content;
        assert_eq!(entries.len(), 2, "{case}");
        let first = &entries[0];
        assert_eq!(first.top_logprobs.len(), 5, "{case}");
        for (k, (got, (id, lp))) in first.top_logprobs.iter().zip(&want).enumerate() {
            assert_eq!(
                parse_token_id(&got.token),
                Some(*id),
                "{case}: alternative {k}"
            );
            assert!(
                (f64::from(got.logprob) - lp).abs() < 1e-4,
                "{case}: alternative {k}: {} here, {lp} from transformers",
                got.logprob
            );
        }
        // Greedy: the sampled token is the best alternative, with the same log-prob.
        assert_eq!(parse_token_id(&first.token), Some(want[0].0), "{case}");
        assert!(
            (f64::from(first.logprob) - want[0].1).abs() < 1e-4,
            "{case}"
        );
        let greedy = c["greedy_tokens"].as_array().ok_or("greedy_tokens")?;
        let second = &entries[1];
        assert_eq!(
            parse_token_id(&second.top_logprobs[0].token).map(u64::from),
            greedy[1].as_u64(),
            "{case}: the second step's best alternative is transformers' second greedy token"
        );
    }
    server.shutdown().await?;
    Ok(())
}

/// Our server answers as vLLM does on the same model and request: the same greedy token ids
/// and log-probs, the same top-3 alternatives (`fixtures/serve/vllm_uitars_tiny_base.json`,
/// recorded from vLLM's CPU build by `fixtures/scripts/make_vllm_golden.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_equal_vllms_on_uitars_tiny_base() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let golden: Value = serde_json::from_slice(&std::fs::read(
        root.join("fixtures/serve/vllm_uitars_tiny_base.json"),
    )?)?;
    let model = root.join("fixtures/models/uitars-tiny-base");
    let engine = Arc::new(ModelEngine::new(
        UiTars::load(
            model.to_str().ok_or("utf-8 path")?,
            DType::F32,
            &Device::Cpu,
        )?,
        model.display().to_string(),
    ));
    let server = Server::start(engine, ServeConfig::default(), "127.0.0.1:0".parse()?).await?;
    let url = format!("{}/chat/completions", server.base_url());
    for case in golden["cases"].as_array().ok_or("cases")? {
        let name = case["name"].as_str().ok_or("name")?;
        let image = std::fs::read(root.join(case["image"].as_str().ok_or("image")?))?;
        let body = json!({
            "model": "ui-tars",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(&image)
                )}},
                {"type": "text", "text": case["instruction"]},
            ]}],
            "temperature": 0.0,
            "max_tokens": case["max_tokens"],
            "logprobs": true,
            "top_logprobs": 3,
            "return_tokens_as_token_ids": true,
        });
        let answer = complete(&url, &body).await?;
        assert_eq!(
            Some(answer.usage.prompt_tokens),
            case["prompt_tokens"].as_u64(),
            "{name}: prompt tokens"
        );
        let choice = &answer.choices[0];
        assert_eq!(
            choice.message.content.as_deref(),
            case["answer"].as_str(),
            "{name}"
        );
        let got = &choice.logprobs.as_ref().ok_or("logprobs")?.content;
        let want = case["tokens"].as_array().ok_or("tokens")?;
        assert_eq!(got.len(), want.len(), "{name}: generated tokens");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                parse_token_id(&g.token).map(u64::from),
                w["id"].as_u64(),
                "{name}: token {i}"
            );
            let lp = w["logprob"].as_f64().ok_or("logprob")?;
            assert!(
                (f64::from(g.logprob) - lp).abs() < 1e-4,
                "{name}: token {i}: {} vs vLLM's {lp}",
                g.logprob
            );
            let tops = w["top"].as_array().ok_or("top")?;
            assert_eq!(g.top_logprobs.len(), tops.len(), "{name}: token {i}");
            for (k, (gt, wt)) in g.top_logprobs.iter().zip(tops).enumerate() {
                assert_eq!(
                    parse_token_id(&gt.token).map(u64::from),
                    wt[0].as_u64(),
                    "{name}: token {i} alternative {k}"
                );
                let lp = wt[1].as_f64().ok_or("top logprob")?;
                assert!(
                    (f64::from(gt.logprob) - lp).abs() < 1e-4,
                    "{name}: token {i} alternative {k}: {} vs vLLM's {lp}",
                    gt.logprob
                );
            }
        }
    }
    server.shutdown().await?;
    Ok(())
}

/// The adapter memory bound counts one merged copy of the weights per adapter: the tensor
/// bytes the checkpoint's safetensors header lists (f32 here).
#[test]
fn an_adapter_costs_one_copy_of_the_checkpoints_weights() -> TestResult {
    use arpo_serve::Engine as _;
    let file = std::fs::read(model_dir().join("model.safetensors"))?;
    let header_len = u64::from_le_bytes(file[..8].try_into()?) as usize;
    let header: Value = serde_json::from_slice(&file[8..8 + header_len])?;
    let tensor_bytes: u64 = header
        .as_object()
        .ok_or("a header object")?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| {
            let o = &t["data_offsets"];
            o[1].as_u64().unwrap_or(0) - o[0].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(tensor_bytes as usize, file.len() - 8 - header_len);
    let engine = ModelEngine::new(load_uitars()?, model_dir().display().to_string());
    assert_eq!(engine.adapter_bytes(), tensor_bytes);
    Ok(())
}

/// Automatic prefix caching through the server: a second turn that resends the first turn's
/// conversation reports the reused prompt tokens in `usage.prompt_tokens_details
/// .cached_tokens` (OpenAI's and vLLM's field), and answers exactly as a server without the
/// cache does, in a plain and a streamed answer.
#[tokio::test]
async fn prefix_cache_reports_cached_tokens_and_changes_no_answer() -> TestResult {
    let cached = Arc::new(
        ModelEngine::new(load_uitars()?, model_dir().display().to_string())
            .with_prefix_cache(64 << 20),
    );
    let plain = Arc::new(ModelEngine::new(
        load_uitars()?,
        model_dir().display().to_string(),
    ));
    let with = Server::start(
        cached.clone(),
        ServeConfig::default(),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let without = Server::start(plain, ServeConfig::default(), "127.0.0.1:0".parse()?).await?;
    let url = |s: &Server| format!("{}/chat/completions", s.base_url());
    let model = "ui-tars";

    let first = conversation(2)?;
    let mut second = first.clone();
    second.push(ChatMessage::text(
        Role::Assistant,
        "Thought: open it\nAction: click(start_box='(10,20)')",
    ));
    second.push(ChatMessage {
        role: Role::User,
        content: vec![ContentPart::Image {
            image: golden_image("c_101x75.png")?,
        }],
    });
    let mut answers = Vec::new();
    for server in [&with, &without] {
        let mut turns = Vec::new();
        for messages in [&first, &second] {
            let r: ChatCompletion = post(&url(server), &body(messages, model, MAX_TOKENS))
                .await?
                .json()
                .await?;
            turns.push(r);
        }
        answers.push(turns);
    }
    let cached_of = |r: &ChatCompletion| r.usage.prompt_tokens_details.map(|d| d.cached_tokens);
    assert_eq!(cached_of(&answers[0][0]), Some(0), "nothing cached yet");
    let reused = cached_of(&answers[0][1]).ok_or("no prompt_tokens_details")?;
    // The whole first prompt but its last partial block.
    let first_prompt = answers[0][0].usage.prompt_tokens;
    assert!(
        reused >= first_prompt / 16 * 16 && reused < answers[0][1].usage.prompt_tokens,
        "{reused} cached of a {first_prompt}-token first prompt"
    );
    assert_eq!(
        cached_of(&answers[1][1]),
        Some(0),
        "the cache-less server reuses nothing"
    );
    for (a, b) in answers[0].iter().zip(&answers[1]) {
        assert_eq!(a.choices[0].message.content, b.choices[0].message.content);
        let ids = |r: &ChatCompletion| -> Vec<String> {
            r.choices[0]
                .logprobs
                .as_ref()
                .map(|l| l.content.iter().map(|t| t.token.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(ids(a), ids(b));
    }
    // Streamed, with usage: the same count in the final chunk.
    let mut streamed = body(&second, model, MAX_TOKENS);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = post(&url(&with), &streamed).await?.text().await?;
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .ok_or("no usage chunk")?;
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"].as_u64() >= Some(reused),
        "{usage}"
    );
    assert!(cached.prefix_cache_stats().cached_tokens > 0);
    Ok(())
}

/// `serve --weights q8_0`: the base answers as the in-process 8-bit copy does, and a LoRA
/// adapter loaded into it answers as the trainer's rollout copy (the same adapter unmerged over
/// the 8-bit base) does: token for token, log-prob for log-prob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_serving_answers_as_the_in_process_rollout_copy() -> TestResult {
    let local = load_uitars()?;
    let messages = conversation(1)?;
    let greedy = SamplingParams::greedy(MAX_TOKENS);
    let tmp = tempfile::tempdir()?;
    let q8 = arpo_model::RolloutWeights::Q8_0;
    let (_, adapted, adapter_dir) =
        make_adapter_with(&local, &tmp.path().join("a"), &messages, &greedy, Some(q8))?;
    let adapted = adapted.ok_or("the rollout copy's answer")?;
    let prompt = local.prepare(&messages)?;
    let (mut base_q8, _) = local.model.to_rollout(q8)?.generate(
        std::slice::from_ref(&prompt),
        &greedy,
        &local.stop_ids,
    )?;
    let base_q8 = base_q8.pop().ok_or("one generation")?;

    // As `serve --weights q8_0` loads it: straight from the checkpoint into q8_0.
    let dir = model_dir().display().to_string();
    let refused = ModelEngine::load_named_as(&dir, "bf16", "cpu", q8).err();
    assert!(
        matches!(&refused, Some(EngineError::InvalidInput(m)) if m.contains("--dtype")),
        "{refused:?}"
    );
    let engine = ModelEngine::load_named_as(&dir, "f32", "cpu", q8)?;
    let server = Server::start(
        Arc::new(engine),
        ServeConfig::default(),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let url = format!("{}/chat/completions", server.base_url());
    let ids = |r: &ChatCompletion| -> Vec<u32> {
        r.choices[0]
            .logprobs
            .as_ref()
            .map(|l| {
                l.content
                    .iter()
                    .filter_map(|t| parse_token_id(&t.token))
                    .collect()
            })
            .unwrap_or_default()
    };
    let lps = |r: &ChatCompletion| -> Vec<f32> {
        r.choices[0]
            .logprobs
            .as_ref()
            .map(|l| l.content.iter().map(|t| t.logprob).collect())
            .unwrap_or_default()
    };
    let base = complete(&url, &body(&messages, "ui-tars", MAX_TOKENS)).await?;
    assert_eq!(ids(&base), base_q8.token_ids);
    assert_eq!(lps(&base), base_q8.logprobs);
    let load = post(
        &format!("{}/load_lora_adapter", server.base_url()),
        &json!({"lora_name": "a", "lora_path": adapter_dir}),
    )
    .await?;
    assert!(load.status().is_success(), "{}", load.text().await?);
    let with = complete(&url, &body(&messages, "a", MAX_TOKENS)).await?;
    assert_eq!(ids(&with), adapted.token_ids);
    assert_eq!(lps(&with), adapted.logprobs);
    assert_ne!(ids(&with), ids(&base), "the adapter changes the answer");
    server.shutdown().await?;
    Ok(())
}

//! `cargo xtask bench-serve`: throughput of the OpenAI-compatible server over HTTP.
//!
//! Starts the server in-process on a loopback port (`ModelEngine` over `--model`), then for
//! every server `--max-batch` (16: dynamic batching; 1: none) and every client count of
//! `--concurrency` sends `--requests` chat completions, each one 336x224 screenshot of the
//! embedded desktop (a few different tasks, in turn) and that task's instruction, greedy,
//! `max_tokens` fixed. The server has no `ignore_eos`: generated tokens are counted from each
//! answer's `usage.completion_tokens` (an answer may stop at end of turn before `max_tokens`).
//! `--seeded` samples instead, with one seed per request, as training rollouts do.
//! Prints one JSON line per configuration and a Markdown table at the end.
//!
//! `--url` measures an already running OpenAI-compatible server instead (vLLM, SGLang, another
//! `cargo xtask serve`) with the same requests and clients: the side-by-side comparison.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arpo_core::Environment;
use arpo_env_sim::{Catalogue, SimEnv};
use arpo_serve::{Engine, ModelEngine, ServeConfig, Server};
use base64::Engine as _;
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory (HF layout) or a Hugging Face repo id already in the local cache.
    #[arg(long, default_value = "fixtures/models/tiny-qwen2vl")]
    model: String,
    /// Requests per configuration.
    #[arg(long, default_value_t = 128)]
    requests: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Client counts (requests in flight at once), comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    concurrency: Vec<usize>,
    /// Server `max_batch` values, comma separated (1 turns dynamic batching off).
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 1])]
    max_batch: Vec<usize>,
    /// Different screenshots (embedded-desktop training tasks) the requests cycle through.
    #[arg(long, default_value_t = 8)]
    screens: usize,
    /// Sample at temperature 1 with a different `seed` per request (what `RemotePolicy` sends
    /// during training rollouts) instead of greedy decoding.
    #[arg(long)]
    seeded: bool,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N (cuda needs a build with candle's cuda feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Measure this running server (its OpenAI base URL, e.g. http://127.0.0.1:8000/v1)
    /// instead of starting one; its model is the first `GET /v1/models` lists.
    #[arg(long)]
    url: Option<String>,
    /// Sent to --url as `Authorization: Bearer <key>`.
    #[arg(long, env = "ARPO_SERVER_API_KEY")]
    api_key: Option<String>,
}

/// The result of one configuration.
#[derive(Debug, Clone)]
struct Row {
    concurrency: usize,
    max_batch: usize,
    requests: usize,
    seconds: f64,
    generated_tokens: u64,
    mean_latency_s: f64,
    seeded: bool,
    /// The measured server when it is not the in-process one.
    external: Option<String>,
}

impl Row {
    fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.seconds
    }

    fn json(&self) -> Value {
        json!({
            "concurrency": self.concurrency,
            "max_batch": self.max_batch,
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "requests_per_s": round(self.requests_per_s(), 3),
            "generated_tokens_per_s": round(self.tokens_per_s(), 2),
            "generated_tokens": self.generated_tokens,
            "mean_latency_s": round(self.mean_latency_s, 4),
            "sampling": if self.seeded { "seeded" } else { "greedy" },
            "server": self.external.as_deref().unwrap_or("arpo-serve (in process)"),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

const SERVED_NAME: &str = "bench";

/// Request bodies: one screenshot of an embedded-desktop task and its instruction each.
async fn request_bodies(screens: usize, max_tokens: usize, model: &str) -> Result<Vec<String>> {
    let catalogue = Catalogue::default();
    let mut bodies = Vec::new();
    for task in catalogue.train().iter().take(screens.max(1)) {
        let mut env = SimEnv::new();
        let observation = env
            .reset(task)
            .await
            .with_context(|| format!("resetting the simulated desktop on task {}", task.id))?;
        let png = base64::engine::general_purpose::STANDARD.encode(&observation.screenshot.bytes);
        let body = json!({
            "model": model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
                    {"type": "text", "text": task.instruction},
                ],
            }],
            "temperature": 0.0,
            "max_tokens": max_tokens,
        });
        bodies.push(serde_json::to_string(&body)?);
    }
    ensure!(!bodies.is_empty(), "the task catalogue is empty");
    Ok(bodies)
}

/// One answer: (completion tokens, prompt tokens). With `seed`, the body's `temperature` and
/// `seed` are set to 1 and `seed`.
async fn send(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    seed: Option<u64>,
    api_key: Option<&str>,
) -> Result<(u64, u64)> {
    let body = match seed {
        None => body.to_string(),
        Some(seed) => {
            let mut v: Value = serde_json::from_str(body)?;
            v["temperature"] = json!(1.0);
            v["seed"] = json!(seed);
            serde_json::to_string(&v)?
        }
    };
    let mut request = client.post(url).header("content-type", "application/json");
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("POST {url} answered {status}: {text}");
    }
    let answer: Value = serde_json::from_str(&text)?;
    let usage = |k: &str| answer["usage"][k].as_u64().unwrap_or(0);
    Ok((usage("completion_tokens"), usage("prompt_tokens")))
}

/// `requests` requests from `concurrency` clients, each sending its next one when the last
/// is answered.
async fn run_config(
    client: &reqwest::Client,
    url: &str,
    bodies: &Arc<Vec<String>>,
    concurrency: usize,
    requests: usize,
    seeded: bool,
    api_key: Option<&str>,
) -> Result<(f64, u64, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, bodies, next, key) = (
            client.clone(),
            url.to_string(),
            bodies.clone(),
            next.clone(),
            api_key.map(str::to_string),
        );
        clients.push(tokio::spawn(async move {
            let mut tokens = 0u64;
            let mut latency = Duration::ZERO;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let sent = Instant::now();
                let seed = seeded.then_some(i as u64);
                let (generated, _) = send(
                    &client,
                    &url,
                    &bodies[i % bodies.len()],
                    seed,
                    key.as_deref(),
                )
                .await?;
                latency += sent.elapsed();
                tokens += generated;
            }
            anyhow::Ok((tokens, latency))
        }));
    }
    let mut tokens = 0;
    let mut latency = Duration::ZERO;
    for c in clients {
        let (t, l) = c.await??;
        tokens += t;
        latency += l;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        seconds,
        tokens,
        latency.as_secs_f64() / requests.max(1) as f64,
    ))
}

fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| concurrency | max_batch | requests | seconds | requests/s | generated tokens/s | mean latency (s) |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let max_batch = match &r.external {
            Some(_) => "server's".to_string(),
            None => r.max_batch.to_string(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.3} |\n",
            r.concurrency,
            max_batch,
            r.requests,
            r.seconds,
            r.requests_per_s(),
            r.tokens_per_s(),
            r.mean_latency_s
        ));
    }
    out
}

/// The model a running server lists first.
async fn listed_model(
    client: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
) -> Result<String> {
    let url = format!("{base}/models");
    let mut request = client.get(&url);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("GET {url}: is the server running?"))?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status.is_success(), "GET {url} answered {status}: {text}");
    let list: Value = serde_json::from_str(&text)?;
    list["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("GET {url} lists no model: {text}"))
}

/// The same rows against a running server.
fn run_external(args: &Args, base: &str) -> Result<()> {
    let base = base.trim_end_matches('/');
    let key = args.api_key.as_deref();
    let runtime = tokio::runtime::Runtime::new()?;
    let rows = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .build()?;
        let model = listed_model(&client, base, key).await?;
        let bodies = Arc::new(request_bodies(args.screens, args.max_tokens, &model).await?);
        let url = format!("{base}/chat/completions");
        let mut prompt_tokens = Vec::new();
        for body in bodies.iter() {
            prompt_tokens.push(send(&client, &url, body, None, key).await?.1);
        }
        eprintln!("{base} (model {model}; prompt tokens per request: {prompt_tokens:?})");
        let mut rows = Vec::new();
        for &concurrency in &args.concurrency {
            let (seconds, generated_tokens, mean_latency_s) = run_config(
                &client,
                &url,
                &bodies,
                concurrency,
                args.requests,
                args.seeded,
                key,
            )
            .await?;
            let row = Row {
                concurrency,
                max_batch: 0,
                requests: args.requests,
                seconds,
                generated_tokens,
                mean_latency_s,
                seeded: args.seeded,
                external: Some(base.to_string()),
            };
            println!("{}", row.json());
            rows.push(row);
        }
        anyhow::Ok(rows)
    })?;
    println!();
    println!(
        "{base}, {} requests per row, max_tokens {}, {}:",
        args.requests,
        args.max_tokens,
        if args.seeded {
            "temperature 1, one seed per request"
        } else {
            "greedy"
        }
    );
    println!();
    print!("{}", markdown(&rows));
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    if let Some(url) = &args.url {
        return run_external(&args, url);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!(
        "Loading {} ({}, {}; {profile} build) ...",
        args.model, args.dtype, args.device
    );
    let engine = Arc::new(ModelEngine::load_named(
        &args.model,
        &args.dtype,
        &args.device,
    )?);
    eprintln!("Model on {}", engine.info().device);
    let runtime = tokio::runtime::Runtime::new()?;
    let rows = runtime.block_on(async {
        let bodies = Arc::new(request_bodies(args.screens, args.max_tokens, SERVED_NAME).await?);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .build()?;
        let mut rows = Vec::new();
        for &max_batch in &args.max_batch {
            let config = ServeConfig {
                served_model_name: SERVED_NAME.into(),
                max_batch: max_batch.max(1),
                max_queue: args.concurrency.iter().copied().max().unwrap_or(1).max(256),
                ..ServeConfig::default()
            };
            let server =
                Server::start(engine.clone(), config, "127.0.0.1:0".parse()?).await?;
            let url = format!("{}/chat/completions", server.base_url());
            // Warm-up (not timed): one request per screen.
            let mut prompt_tokens = Vec::new();
            for body in bodies.iter() {
                prompt_tokens.push(send(&client, &url, body, None, None).await?.1);
            }
            eprintln!(
                "max_batch {max_batch}: serving on {} (prompt tokens per request: {prompt_tokens:?})",
                server.base_url()
            );
            for &concurrency in &args.concurrency {
                let (seconds, generated_tokens, mean_latency_s) =
                    run_config(
                        &client,
                        &url,
                        &bodies,
                        concurrency,
                        args.requests,
                        args.seeded,
                        None,
                    )
                    .await?;
                let row = Row {
                    concurrency,
                    max_batch,
                    requests: args.requests,
                    seconds,
                    generated_tokens,
                    mean_latency_s,
                    seeded: args.seeded,
                    external: None,
                };
                println!("{}", row.json());
                rows.push(row);
            }
            server.shutdown().await?;
        }
        anyhow::Ok(rows)
    })?;
    println!();
    println!(
        "{} ({profile} build), {} requests per row, max_tokens {}, {}:",
        args.model,
        args.requests,
        args.max_tokens,
        if args.seeded {
            "temperature 1, one seed per request"
        } else {
            "greedy"
        }
    );
    println!();
    print!("{}", markdown(&rows));
    Ok(())
}

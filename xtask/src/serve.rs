//! `cargo xtask serve`: the OpenAI-compatible UI-TARS server (the seed's `uitars_2b_server.py`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use arpo_serve::{Engine, ImageLimits, ModelEngine, ServeConfig, Server};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory (HF layout) or a Hugging Face repo id already in the local cache.
    #[arg(long)]
    model: String,
    /// The address to listen on (loopback by default; 0.0.0.0 to accept other machines, which
    /// needs --api-key or --allow-unauthenticated).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Require `Authorization: Bearer <KEY>` on every request.
    #[arg(long, env = "ARPO_SERVE_API_KEY")]
    api_key: Option<String>,
    /// Serve a non-loopback --host without --api-key (only on a network you trust).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Largest request body in bytes (a request carries its screenshots as base64).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_request_bytes: usize,
    /// Most LoRA adapters loaded at once (each is a merged copy of the model).
    #[arg(long, default_value_t = 4)]
    max_loras: usize,
    /// Most memory the loaded LoRA adapters may take together, in MiB.
    #[arg(long, default_value_t = 16 * 1024)]
    max_lora_memory_mb: u64,
    /// The name clients put in `model` (default: the --model argument).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences generated together (1 turns dynamic batching off).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests waiting; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest encoded image.
    #[arg(long, default_value_t = 20 * 1024 * 1024)]
    max_image_bytes: usize,
    /// Largest image, width × height.
    #[arg(long, default_value_t = 16384 * 28 * 28)]
    max_image_pixels: u64,
    /// Most images in one request.
    #[arg(long, default_value_t = 16)]
    max_images: usize,
    /// Accept `file://` image urls for files under this directory.
    #[arg(long)]
    allowed_local_media_path: Option<PathBuf>,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N (cuda needs a build with candle's cuda feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Automatic prefix caching: MiB of prompt keys/values and screenshot features kept for
    /// later requests that start the same (a multi-turn episode resends its history each
    /// turn), per loaded set of weights (the base and each merged adapter); 0 turns it off.
    #[arg(long, default_value_t = 2048)]
    prefix_cache_mib: usize,
    /// How the linear layers are stored: f32, bf16, q8_0 (8-bit) or q4k (4-bit). Decoding reads
    /// every weight once a token, so fewer bits decode faster. Read from the checkpoint a
    /// tensor at a time and stored at once (the f32 model is never in memory); the embedding
    /// table is stored compact too. LoRA adapters then run unmerged over the shared base.
    #[arg(long, default_value = "f32")]
    weights: arpo_model::RolloutWeights,
}

pub fn run(args: Args) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| {
            format!(
                "--host {} --port {} is not an address",
                args.host, args.port
            )
        })?;
    // Refused before the (slow) model load.
    let bind_check = ServeConfig {
        api_key: args.api_key.clone(),
        allow_unauthenticated: args.allow_unauthenticated,
        ..ServeConfig::default()
    };
    bind_check.check_bind(addr)?;
    println!(
        "Loading {} ({}, {}) ...",
        args.model, args.dtype, args.device
    );
    let started = std::time::Instant::now();
    if let Ok(dir) = arpo_model::weights::resolve_model_dir(&args.model) {
        crate::tune_allocator_for(&dir);
    }
    let engine = ModelEngine::load_named_as(&args.model, &args.dtype, &args.device, args.weights)?
        .with_prefix_cache(args.prefix_cache_mib.saturating_mul(1 << 20));
    let info = engine.info();
    println!(
        "✓ Model loaded on {} in {:.1} s (context {} tokens)",
        info.device,
        started.elapsed().as_secs_f64(),
        info.max_context
    );
    let config = ServeConfig {
        served_model_name: args.served_model_name.unwrap_or_else(|| args.model.clone()),
        api_key: args.api_key,
        max_batch: args.max_batch.max(1),
        max_queue: args.max_queue.max(1),
        image_limits: ImageLimits {
            max_bytes: args.max_image_bytes,
            max_pixels: args.max_image_pixels,
            allowed_local_media_path: args.allowed_local_media_path,
        },
        max_images: args.max_images,
        max_request_bytes: args.max_request_bytes,
        max_loras: args.max_loras,
        max_lora_bytes: args.max_lora_memory_mb.saturating_mul(1 << 20),
        allow_unauthenticated: args.allow_unauthenticated,
        ..ServeConfig::default()
    };
    let name = config.served_model_name.clone();
    let auth = config.api_key.is_some();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let server = Server::start(Arc::new(engine), config, addr).await?;
        println!("Model name: {name}");
        println!("Server: http://{}", server.local_addr());
        println!("OpenAI base URL: {}", server.base_url());
        if auth {
            println!("API key required (Authorization: Bearer ...)");
        }
        println!("Ready to accept requests!");
        server.run_until_ctrl_c().await?;
        println!("Stopped.");
        anyhow::Ok(())
    })
}

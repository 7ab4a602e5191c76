//! `cargo xtask test-server`: the seed's `test_server.sh`. Checks a running OpenAI-compatible
//! server end to end: health, the model list, one UI-TARS step on a real screenshot; prints the
//! answer, the parsed action and the latency; exits non-zero with the reason when anything fails.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use arpo_core::Screenshot;
use arpo_core::protocol::{CoordinateSystem, ParseConfig, parse_response};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The server's OpenAI base URL.
    #[arg(long, default_value = "http://localhost:9000/v1")]
    url: String,
    /// Sent as `Authorization: Bearer <key>` (the server's --api-key).
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// The model to ask (default: the first one the server lists).
    #[arg(long)]
    model: Option<String>,
    /// The screenshot (PNG or JPEG).
    #[arg(long, default_value = "fixtures/screenshots/desktop.png")]
    image: PathBuf,
    /// The task.
    #[arg(long, default_value = "Open the Documents folder")]
    instruction: String,
    /// How the model writes coordinates: relative (0..1000, UI-TARS-2B/7B) or absolute
    /// (smart-resized pixels, UI-TARS-1.5).
    #[arg(long, default_value = "relative", value_parser = ["relative", "absolute"])]
    coords: String,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
}

pub fn run(args: Args) -> Result<()> {
    let bytes = std::fs::read(&args.image)
        .with_context(|| format!("cannot read the screenshot {}", args.image.display()))?;
    let screenshot = arpo_serve::check_image(bytes, &arpo_serve::ImageLimits::default())
        .map_err(|e| anyhow::anyhow!("{}: {}", args.image.display(), e.message))?;
    let (width, height) = (screenshot.width, screenshot.height);
    println!("Server:      {}", args.url);
    println!("Screenshot:  {} ({width}x{height})", args.image.display());
    println!("Instruction: {}", args.instruction);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let check = runtime.block_on(arpo_serve::check_server(
        &args.url,
        args.api_key.as_deref(),
        args.model.as_deref(),
        Screenshot::new(screenshot.bytes, width, height),
        &args.instruction,
        args.max_tokens,
    ))?;
    println!("Health:      {}", check.health);
    println!("Model:       {}", check.model);
    println!(
        "Latency:     {:.2} s ({} prompt tokens, {} generated, finish {})",
        check.latency.as_secs_f64(),
        check.usage.prompt_tokens,
        check.usage.completion_tokens,
        check.finish_reason.as_deref().unwrap_or("?")
    );
    println!("Response:\n{}\n", check.response);
    let coordinates = if args.coords == "absolute" {
        CoordinateSystem::uitars_absolute(width, height)?
    } else {
        CoordinateSystem::Relative1000
    };
    match parse_response(
        &check.response,
        &ParseConfig::new(coordinates, width, height),
    ) {
        Ok(parsed) => {
            println!("Parsed actions (screen pixels):");
            for action in &parsed.actions {
                println!("  {}", serde_json::to_string(action)?);
            }
            println!("OK");
            Ok(())
        }
        Err(e) => bail!(
            "the server answered, but the response is not a valid UI-TARS action: {e} (a tiny random-weight model answers noise; use a real UI-TARS checkpoint)"
        ),
    }
}

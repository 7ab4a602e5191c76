//! `cargo xtask parse-response`: one UI-TARS response on stdin, its actions as JSON on stdout.

use std::io::Read as _;

use anyhow::{Context as _, Result, bail};
use arpo_core::ScreenSize;
use arpo_core::protocol::{
    CoordinateSystem, ParseConfig, UI_TARS_MAX_PIXELS, UI_TARS_MIN_PIXELS, parse_response,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Coords {
    /// 0..1000 across the screen (Qwen2-VL models: UI-TARS-2B/7B).
    Relative,
    /// Pixels of the smart-resized image (Qwen2.5-VL models: UI-TARS-1.5).
    Absolute,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Screen size of the environment, WIDTHxHEIGHT.
    #[arg(long, default_value = "1920x1080")]
    screen: ScreenSize,
    /// The coordinate convention of the model that wrote the response.
    #[arg(long, value_enum, default_value = "relative")]
    coords: Coords,
    /// With --coords absolute: the size of the screenshot given to the model, before its
    /// processor's smart_resize (default: the screen size).
    #[arg(long)]
    image_size: Option<ScreenSize>,
    /// With --coords absolute: smart_resize's max_pixels.
    #[arg(long, default_value_t = UI_TARS_MAX_PIXELS)]
    max_pixels: u64,
    /// With --coords absolute: smart_resize's min_pixels.
    #[arg(long, default_value_t = UI_TARS_MIN_PIXELS)]
    min_pixels: u64,
}

pub fn run(args: Args) -> Result<()> {
    let (width, height) = args.screen.pair();
    let coordinates = match args.coords {
        Coords::Relative => {
            if args.image_size.is_some() {
                bail!("--image-size only applies to --coords absolute");
            }
            CoordinateSystem::Relative1000
        }
        Coords::Absolute => {
            let (iw, ih) = args.image_size.unwrap_or(args.screen).pair();
            CoordinateSystem::absolute_for_image(iw, ih, args.min_pixels, args.max_pixels)
                .context("cannot derive the model's coordinate space from --image-size")?
        }
    };
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the response from stdin (it must be UTF-8)")?;
    let config = ParseConfig::new(coordinates, width, height);
    match parse_response(&text, &config) {
        Ok(parsed) => {
            let out = serde_json::json!({
                "thought": parsed.thought,
                "reflection": parsed.reflection,
                "action_summary": parsed.action_summary,
                "coordinates": coordinates,
                "actions": parsed.actions,
                "raw_actions": parsed.raw_actions,
                // What OSWorld's environment would run: every string an escaped literal.
                "pyautogui": arpo_env_vmware::pyautogui::pyautogui_program(&parsed.actions),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Err(e) => {
            eprintln!("parse error: {e}");
            std::process::exit(2);
        }
    }
}

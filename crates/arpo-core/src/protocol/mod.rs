//! The UI-TARS text protocol: prompts, response parsing, and actions written back as text.
//!
//! It lives in `arpo-core` because it needs nothing heavy (no tensors, no tokenizer): the model
//! crate, the HTTP policy client, the environments' tools and the trainer all speak it, and
//! none of them should have to depend on candle to do so.
//!
//! - [`build_messages`]: the computer-use prompt ([`PromptTemplate`]: ARPO's, OSWorld's, or the
//!   `ui-tars` package's `COMPUTER_USE_DOUBAO`), then the history, at most
//!   [`PromptConfig::limit_images`] screenshots (oldest dropped, their responses kept).
//! - [`parse_response`]: model text to [`crate::Action`]s in screen pixels, through the
//!   [`CoordinateSystem`] of the model (relative 0..1000 for Qwen2-VL UI-TARS, absolute
//!   smart-resized pixels for Qwen2.5-VL UI-TARS-1.5). A hand-written parser: model text is
//!   never evaluated. Failures are a typed [`ParseError`] with the byte offset.
//! - [`format_action`] / [`format_response`]: the inverse, for demonstrations.
//!
//! # Choosing a template and a coordinate system
//!
//! | model | [`CoordinateSystem`] | [`PromptTemplate`] |
//! |---|---|---|
//! | UI-TARS-2B/7B-SFT/DPO (Qwen2-VL) | `Relative1000` | `OsworldCallUser` (OSWorld's agent) |
//! | UI-TARS-1.5-7B (Qwen2.5-VL), ARPO | [`CoordinateSystem::uitars_absolute`] | `Arpo` (what ARPO trained with) or `ComputerUseDoubao` |
//!
//! The published prompts write points the same way whichever convention the model uses (the
//! ARPO prompt lists `(x1,y1)` box tokens while its model answers in absolute pixels); what the
//! convention changes is how the parser maps numbers to the screen.
//!
//! # Where we differ from ByteDance's reference parser
//!
//! `fixtures/ui_tars/golden.json` holds the reference's output on a 63-response corpus, and the
//! tests hold us to it except where the reference is wrong or unsafe (each case is in
//! `fixtures/ui_tars/responses.json` with its reason). In short, we also accept
//! `<|box_start|>`-wrapped points, `Action:` without a space, `Thought:` followed by a newline,
//! actions separated by single newlines, raw newlines in strings, and `point=` inside content is
//! left alone; we reject unknown action names, actions without their required arguments,
//! 3-number boxes and coordinates outside the model's space, all of which the reference passes
//! on to its executor. Nothing is ever `eval`ed.
//!
//! # Example
//!
//! ```
//! use arpo_core::{Action, AgentContext, Point, Screenshot};
//! use arpo_core::protocol::{
//!     build_messages, format_response, parse_response, CoordinateSystem, ParseConfig,
//!     PointSyntax, PromptConfig,
//! };
//!
//! // The prompt for the first step of a task.
//! let context = AgentContext {
//!     instruction: "Open the file manager".into(),
//!     screenshots: vec![Screenshot::new(vec![0x89, b'P', b'N', b'G'], 1920, 1080)],
//!     responses: vec![],
//! };
//! let messages = build_messages(&context, &PromptConfig::default());
//! assert_eq!(messages.len(), 3); // system, instructions, screenshot
//!
//! // A UI-TARS-1.5 answer, absolute coordinates on the smart-resized 1932x1092 image.
//! let coordinates = CoordinateSystem::uitars_absolute(1920, 1080).unwrap();
//! let config = ParseConfig::new(coordinates, 1920, 1080);
//! let response = "Thought: The icon is in the dock.\nAction: click(start_box='(966,546)')";
//! let parsed = parse_response(response, &config).unwrap();
//! assert_eq!(parsed.actions, [Action::Click { point: Point::new(960.0, 540.0) }]);
//!
//! // And back to text.
//! let text = format_response("The icon is in the dock.", &parsed.actions, &coordinates,
//!                            (1920, 1080), PointSyntax::Plain);
//! assert_eq!(text, response);
//! ```

mod coords;
mod format;
mod parse;
mod prompt;
mod resize;

pub use coords::{CoordinateSystem, IMAGE_FACTOR, UI_TARS_MAX_PIXELS, UI_TARS_MIN_PIXELS};
pub use format::{PointSyntax, escape_string, format_action, format_response, model_coordinates};
pub use parse::{ParseConfig, ParseError, ParsedResponse, parse_response};
pub use prompt::{
    DEFAULT_SYSTEM_PROMPT, PromptConfig, PromptTemplate, add_box_tokens, build_messages,
};
pub use resize::{ResizeError, smart_resize};

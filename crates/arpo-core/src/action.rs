//! The UI-TARS action space as data.
//!
//! Coordinates are always **screen pixels of the environment** (origin top left, x to the right,
//! y down). Converting to and from the coordinates a model writes (relative 0..1000, or absolute
//! pixels of the smart-resized image) is the job of [`crate::protocol`].

use serde::{Deserialize, Serialize};

/// A point on the environment's screen, in pixels.
///
/// Kept as `f64` so that converting from model coordinates loses nothing; environments round
/// when they need integer pixels ([`Point::rounded`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

impl Point {
    pub const fn new(x: f64, y: f64) -> Self {
        Self { x, y }
    }

    /// The nearest integer pixel.
    pub fn rounded(self) -> (i64, i64) {
        (self.x.round() as i64, self.y.round() as i64)
    }

    /// Whether the point lies on a `width` x `height` screen.
    pub fn is_inside(self, width: u32, height: u32) -> bool {
        self.x >= 0.0 && self.y >= 0.0 && self.x <= f64::from(width) && self.y <= f64::from(height)
    }
}

/// Direction of a scroll action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScrollDirection {
    Up,
    Down,
    Left,
    Right,
}

impl ScrollDirection {
    pub const ALL: [ScrollDirection; 4] = [Self::Up, Self::Down, Self::Left, Self::Right];

    /// The word UI-TARS writes for this direction.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Left => "left",
            Self::Right => "right",
        }
    }

    /// Parses the word UI-TARS writes (case-insensitive, surrounding whitespace ignored).
    pub fn parse(word: &str) -> Option<Self> {
        match word.trim().to_ascii_lowercase().as_str() {
            "up" => Some(Self::Up),
            "down" => Some(Self::Down),
            "left" => Some(Self::Left),
            "right" => Some(Self::Right),
            _ => None,
        }
    }
}

/// One UI-TARS action, in screen pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// `click(start_box=...)`: a left click.
    Click { point: Point },
    /// `left_double(start_box=...)`: a left double click.
    LeftDouble { point: Point },
    /// `right_single(start_box=...)`: a right click.
    RightSingle { point: Point },
    /// `hover(start_box=...)`: move the pointer without clicking.
    Hover { point: Point },
    /// `drag(start_box=..., end_box=...)` (also written `select`): press at `from`, release at `to`.
    Drag { from: Point, to: Point },
    /// `hotkey(key='ctrl c')`: keys pressed together, in order, released in reverse.
    Hotkey { keys: Vec<String> },
    /// `press(key='enter')`: one key pressed and released.
    Press { key: String },
    /// `keydown(key='shift')`.
    KeyDown { key: String },
    /// `keyup(key='shift')`.
    KeyUp { key: String },
    /// `type(content='...')`; a trailing `\n` submits (presses enter).
    Type { content: String },
    /// `scroll(start_box=..., direction='down')`; without a point, at the pointer.
    Scroll {
        point: Option<Point>,
        direction: ScrollDirection,
    },
    /// `wait()`: let the screen settle.
    Wait,
    /// `finished()` or `finished(content='...')`: the task is done (ends the episode).
    Finished { content: Option<String> },
    /// `call_user()`: the agent asks for help; the right answer to an infeasible task (ends the episode).
    CallUser,
}

impl Action {
    /// The UI-TARS name of the action, as the model writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Click { .. } => "click",
            Self::LeftDouble { .. } => "left_double",
            Self::RightSingle { .. } => "right_single",
            Self::Hover { .. } => "hover",
            Self::Drag { .. } => "drag",
            Self::Hotkey { .. } => "hotkey",
            Self::Press { .. } => "press",
            Self::KeyDown { .. } => "keydown",
            Self::KeyUp { .. } => "keyup",
            Self::Type { .. } => "type",
            Self::Scroll { .. } => "scroll",
            Self::Wait => "wait",
            Self::Finished { .. } => "finished",
            Self::CallUser => "call_user",
        }
    }

    /// Whether this action ends the episode (`finished`, `call_user`).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Finished { .. } | Self::CallUser)
    }

    /// Every point the action refers to, in order.
    pub fn points(&self) -> Vec<Point> {
        match self {
            Self::Click { point }
            | Self::LeftDouble { point }
            | Self::RightSingle { point }
            | Self::Hover { point } => vec![*point],
            Self::Drag { from, to } => vec![*from, *to],
            Self::Scroll { point, .. } => point.iter().copied().collect(),
            _ => Vec::new(),
        }
    }
}

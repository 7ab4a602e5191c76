//! The UI-TARS response parser: text in, [`Action`]s in screen pixels out. Never evaluates text.
//!
//! Grammar (a superset of what ByteDance's `ui-tars` parser accepts):
//!
//! ```text
//! response := [prefix] "Action:" call (ws* call)*
//! prefix   := "Thought:" text | "Reflection:" text "Action_Summary:" text | "Action_Summary:" text
//! call     := name ws* "(" [arg ("," arg)* [","]] ")"      (a final ")" may be missing at the very end)
//! arg      := name ws* "=" ws* string
//! string   := '...' | "..."   with Python escapes (\\ \' \" \n \t \r \xhh \uXXXX ...)
//! point    := [<|box_start|>] "(" x "," y ["," x2 "," y2] ")" [<|box_end|>]
//!           | "<point>" x y "</point>"
//! ```
//!
//! The action text starts after the last `Action:` that opens a line (or the last one anywhere
//! when none does). `point=`/`start_point=` mean `start_box=`, `end_point=` means `end_box=`.
//! A 4-number box stands for its centre.
//!
//! A string that a model forgot to escape (`type(content='it's')`) is read up to the last
//! quote before the closing `)` of its action (actions are separated by blank lines), as the
//! reference does for `type`.
//!
//! **Coordinates out of range are rejected**, not clamped: a model coordinate below 0 or above
//! the coordinate space ([`CoordinateSystem::extent`]: 1000, or the resized image size) is a
//! [`ParseError::PointOutOfRange`]; such a response gets the format penalty in training rather
//! than a click somewhere the model did not mean. In-range coordinates are converted and then
//! clamped to the last pixel (`x <= width - 1`), so `1000` lands on the screen's edge pixel.

use serde::{Deserialize, Serialize};

use super::CoordinateSystem;
use crate::{Action, Point, ScrollDirection};

/// What the parser needs to know to turn model coordinates into screen pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParseConfig {
    pub coordinates: CoordinateSystem,
    pub screen_width: u32,
    pub screen_height: u32,
}

impl ParseConfig {
    pub fn new(coordinates: CoordinateSystem, screen_width: u32, screen_height: u32) -> Self {
        Self {
            coordinates,
            screen_width,
            screen_height,
        }
    }
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParsedResponse {
    /// The text after `Thought:`; for the `Reflection:`/`Action_Summary:` forms, the action
    /// summary (as the reference parser reports it).
    pub thought: Option<String>,
    /// The text after `Reflection:` (up to `Action_Summary:`).
    pub reflection: Option<String>,
    /// The text after `Action_Summary:`.
    pub action_summary: Option<String>,
    /// The actions, in screen pixels, in the order written.
    pub actions: Vec<Action>,
    /// Each action call as written (trimmed), in the same order as `actions`.
    pub raw_actions: Vec<String>,
}

/// Why a response is not a valid UI-TARS response. Byte offsets are into the whole response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "the response has no `Action:` marker: a UI-TARS response is `Thought: ...` followed by `Action: <call>`"
    )]
    MissingAction,
    #[error("nothing follows `Action:` at byte {offset}: write at least one call such as `wait()`")]
    NoActions { offset: usize },
    #[error("expected {expected} at byte {offset}, found {found:?}")]
    Syntax {
        offset: usize,
        expected: &'static str,
        found: String,
    },
    #[error(
        "the string opened at byte {offset} is never closed: end it with the quote it opened with"
    )]
    UnterminatedString { offset: usize },
    #[error(
        "unknown action `{name}` at byte {offset}: use one of click, left_double, right_single, hover, drag, select, hotkey, press, keydown, keyup, type, scroll, wait, finished, call_user"
    )]
    UnknownAction { name: String, offset: usize },
    #[error("`{action}` at byte {offset} needs the argument `{argument}`")]
    MissingArgument {
        action: String,
        argument: &'static str,
        offset: usize,
    },
    #[error("`{action}` at byte {offset} has the argument `{argument}` twice")]
    DuplicateArgument {
        action: String,
        argument: String,
        offset: usize,
    },
    #[error(
        "`{action}` at byte {offset}: `{argument}={value:?}` is not a point: write '(x,y)', '(x1,y1,x2,y2)' or '<point>x y</point>'"
    )]
    BadPoint {
        action: String,
        argument: String,
        value: String,
        offset: usize,
    },
    #[error(
        "`{action}` at byte {offset}: point ({x}, {y}) is outside the model's coordinate space 0..={max_x} x 0..={max_y}"
    )]
    PointOutOfRange {
        action: String,
        x: f64,
        y: f64,
        max_x: f64,
        max_y: f64,
        offset: usize,
    },
    #[error("scroll at byte {offset}: direction {value:?} is not one of up, down, left, right")]
    BadDirection { value: String, offset: usize },
    #[error("`{action}` at byte {offset} names no key: write e.g. key='ctrl c' or key='enter'")]
    EmptyKey { action: String, offset: usize },
}

impl ParseError {
    /// The byte offset in the response the error points at, when there is one.
    pub fn offset(&self) -> Option<usize> {
        match self {
            Self::MissingAction => None,
            Self::NoActions { offset }
            | Self::Syntax { offset, .. }
            | Self::UnterminatedString { offset }
            | Self::UnknownAction { offset, .. }
            | Self::MissingArgument { offset, .. }
            | Self::DuplicateArgument { offset, .. }
            | Self::BadPoint { offset, .. }
            | Self::PointOutOfRange { offset, .. }
            | Self::BadDirection { offset, .. }
            | Self::EmptyKey { offset, .. } => Some(*offset),
        }
    }
}

/// Parses one UI-TARS response.
///
/// ```
/// use arpo_core::{Action, Point};
/// use arpo_core::protocol::{parse_response, CoordinateSystem, ParseConfig};
///
/// let config = ParseConfig::new(CoordinateSystem::Relative1000, 1920, 1080);
/// let parsed = parse_response(
///     "Thought: Open the menu.\nAction: click(start_box='<|box_start|>(500,300)<|box_end|>')",
///     &config,
/// ).unwrap();
/// assert_eq!(parsed.thought.as_deref(), Some("Open the menu."));
/// assert_eq!(parsed.actions, [Action::Click { point: Point::new(960.0, 324.0) }]);
/// ```
pub fn parse_response(text: &str, config: &ParseConfig) -> Result<ParsedResponse, ParseError> {
    let marker = find_action_marker(text).ok_or(ParseError::MissingAction)?;
    let (thought, reflection, action_summary) = parse_prefix(&text[..marker]);
    let body_start = marker + "Action:".len();
    let calls = parse_calls(text, body_start)?;
    if calls.is_empty() {
        return Err(ParseError::NoActions { offset: marker });
    }
    let mut actions = Vec::with_capacity(calls.len());
    let mut raw_actions = Vec::with_capacity(calls.len());
    for call in calls {
        raw_actions.push(text[call.start..call.end].trim().to_owned());
        actions.push(to_action(call, config)?);
    }
    Ok(ParsedResponse {
        thought,
        reflection,
        action_summary,
        actions,
        raw_actions,
    })
}

/// The byte index of the `Action:` marker: the last one that opens a line, else the last one.
fn find_action_marker(text: &str) -> Option<usize> {
    const MARKER: &str = "Action:";
    let all: Vec<usize> = text.match_indices(MARKER).map(|(i, _)| i).collect();
    let opens_line = |&i: &usize| {
        let before = &text[..i];
        let line_start = before.rfind('\n').map_or(0, |n| n + 1);
        before[line_start..].chars().all(|c| c == ' ' || c == '\t')
    };
    all.iter()
        .rev()
        .find(|i| opens_line(i))
        .or_else(|| all.last())
        .copied()
}

type Prefix = (Option<String>, Option<String>, Option<String>);

fn parse_prefix(head: &str) -> Prefix {
    let trimmed = head.trim_start();
    let clean = |s: &str| Some(s.trim().to_owned());
    if let Some(rest) = trimmed.strip_prefix("Reflection:") {
        return match rest.split_once("Action_Summary:") {
            Some((reflection, summary)) => (clean(summary), clean(reflection), clean(summary)),
            None => (None, clean(rest), None),
        };
    }
    if let Some(rest) = trimmed.strip_prefix("Action_Summary:") {
        return (clean(rest), None, clean(rest));
    }
    match head.split_once("Thought:") {
        Some((_, thought)) => (clean(thought), None, None),
        None => (None, None, None),
    }
}

/// One call as read from the text, before it is given meaning.
#[derive(Debug)]
struct RawCall {
    name: String,
    /// Byte offset of the name.
    start: usize,
    /// Byte offset just after the call (after `)`, or the end of text when it was missing).
    end: usize,
    args: Vec<RawArg>,
}

#[derive(Debug)]
struct RawArg {
    name: String,
    value: String,
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn found(&self) -> String {
        let rest = self.rest();
        if rest.is_empty() {
            return "end of text".to_owned();
        }
        rest.chars().take(20).collect()
    }

    fn syntax(&self, expected: &'static str) -> ParseError {
        ParseError::Syntax {
            offset: self.pos,
            expected,
            found: self.found(),
        }
    }

    fn ident(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let mut len = 0;
        for (i, c) in rest.char_indices() {
            let ok = c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit());
            if !ok {
                break;
            }
            len = i + c.len_utf8();
        }
        if len == 0 {
            return None;
        }
        self.pos += len;
        Some(&rest[..len])
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }
}

fn parse_calls(text: &str, body_start: usize) -> Result<Vec<RawCall>, ParseError> {
    let mut cur = Cursor {
        text,
        pos: body_start,
    };
    let mut calls = Vec::new();
    loop {
        cur.skip_ws();
        if cur.at_end() {
            return Ok(calls);
        }
        calls.push(parse_call(&mut cur)?);
    }
}

fn parse_call(cur: &mut Cursor<'_>) -> Result<RawCall, ParseError> {
    let start = cur.pos;
    let name = cur
        .ident()
        .ok_or_else(|| cur.syntax("an action call such as click(...)"))?
        .to_owned();
    cur.skip_ws();
    if !cur.eat('(') {
        return Err(cur.syntax("`(` after the action name"));
    }
    let mut args = Vec::new();
    loop {
        cur.skip_ws();
        if cur.eat(')') || cur.at_end() {
            // A missing final `)` at the very end of the text is tolerated, as the reference
            // parser appends one (generation cut at the token limit).
            return Ok(RawCall {
                name,
                start,
                end: cur.pos,
                args,
            });
        }
        let arg_name = cur
            .ident()
            .ok_or_else(|| cur.syntax("an argument name or `)`"))?
            .to_owned();
        cur.skip_ws();
        if !cur.eat('=') {
            return Err(cur.syntax("`=` after the argument name"));
        }
        cur.skip_ws();
        let value = parse_string_value(cur)?;
        args.push(RawArg {
            name: arg_name,
            value,
        });
        cur.skip_ws();
        if cur.eat(',') {
            continue;
        }
        if cur.peek() == Some(')') || cur.at_end() {
            continue;
        }
        return Err(cur.syntax("`,` or `)` after the argument"));
    }
}

/// A quoted string at the cursor; on a string that ends too early (an unescaped quote inside),
/// falls back to the last quote before the action's closing `)`.
fn parse_string_value(cur: &mut Cursor<'_>) -> Result<String, ParseError> {
    let open_at = cur.pos;
    let quote = match cur.peek() {
        Some(q @ ('\'' | '"')) => q,
        _ => return Err(cur.syntax("a quoted string")),
    };
    let content_start = open_at + 1;
    let strict = strict_string_end(cur.text, content_start, quote);
    if let Some(close) = strict {
        let mut after = Cursor {
            text: cur.text,
            pos: close + 1,
        };
        after.skip_ws();
        if matches!(after.peek(), Some(',') | Some(')') | None) {
            cur.pos = close + 1;
            return Ok(unescape(&cur.text[content_start..close]));
        }
    }
    match lenient_string_end(cur.text, content_start, quote) {
        Some(close) => {
            cur.pos = close + 1;
            Ok(unescape(&cur.text[content_start..close]))
        }
        None if strict.is_none() => Err(ParseError::UnterminatedString { offset: open_at }),
        None => {
            cur.pos = strict.map_or(cur.pos, |c| c + 1);
            Err(cur.syntax("`,` or `)` after the argument"))
        }
    }
}

/// The byte index of the first unescaped `quote` at or after `from`.
fn strict_string_end(text: &str, from: usize, quote: char) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text[from..].char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == quote {
            return Some(from + i);
        }
    }
    None
}

/// The byte index of the last `quote` before the `)` that ends the current action (the end of
/// the segment: the next blank line or the end of text); the `)` may be missing at the very end.
fn lenient_string_end(text: &str, from: usize, quote: char) -> Option<usize> {
    let segment_end = blank_line_after(text, from).unwrap_or(text.len());
    let segment = &text[from..segment_end];
    let tail = segment.trim_end();
    let (tail, closed) = match tail.strip_suffix(')') {
        Some(t) => (t.trim_end(), true),
        None => (tail, false),
    };
    if !closed && segment_end != text.len() {
        return None;
    }
    let before_quote = tail.strip_suffix(quote)?;
    Some(from + before_quote.len())
}

/// The byte index of the first blank line (`\n`, spaces, `\n`) at or after `from`.
fn blank_line_after(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = from;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            let mut j = i + 1;
            while j < bytes.len() && matches!(bytes[j], b' ' | b'\t' | b'\r') {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'\n' {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

/// Python string-literal escapes. Unknown or malformed escapes are kept as written (as Python
/// keeps `\d`); an escaped quote or backslash loses its backslash.
pub(crate) fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(&(j, e)) = chars.peek() else {
            out.push('\\');
            break;
        };
        let simple = match e {
            '\\' => Some('\\'),
            '\'' => Some('\''),
            '"' => Some('"'),
            'n' => Some('\n'),
            't' => Some('\t'),
            'r' => Some('\r'),
            'a' => Some('\u{07}'),
            'b' => Some('\u{08}'),
            'f' => Some('\u{0c}'),
            'v' => Some('\u{0b}'),
            _ => None,
        };
        if let Some(s) = simple {
            out.push(s);
            chars.next();
            continue;
        }
        let after = &raw[j + e.len_utf8()..];
        let hex = |n: usize| -> Option<(char, usize)> {
            let digits = after.get(..n)?;
            if !digits.chars().all(|d| d.is_ascii_hexdigit()) {
                return None;
            }
            let v = u32::from_str_radix(digits, 16).ok()?;
            char::from_u32(v).map(|ch| (ch, n))
        };
        let decoded = match e {
            'x' => hex(2),
            'u' => hex(4),
            'U' => hex(8),
            '0'..='7' => {
                let n = 1 + after
                    .chars()
                    .take(2)
                    .take_while(|d| ('0'..='7').contains(d))
                    .count();
                let digits = &raw[j..j + n];
                u32::from_str_radix(digits, 8)
                    .ok()
                    .and_then(char::from_u32)
                    .map(|ch| (ch, n - 1))
            }
            _ => None,
        };
        match decoded {
            Some((ch, extra)) => {
                out.push(ch);
                chars.next();
                for _ in 0..extra {
                    chars.next();
                }
            }
            None => out.push('\\'),
        }
    }
    out
}

fn to_action(call: RawCall, config: &ParseConfig) -> Result<Action, ParseError> {
    let offset = call.start;
    let action = call.name.clone();
    let mut args: Vec<(String, String)> = Vec::with_capacity(call.args.len());
    for arg in call.args {
        let canonical = match arg.name.as_str() {
            "point" | "start_point" => "start_box",
            "end_point" => "end_box",
            other => other,
        }
        .to_owned();
        if args.iter().any(|(n, _)| *n == canonical) {
            return Err(ParseError::DuplicateArgument {
                action,
                argument: arg.name,
                offset,
            });
        }
        args.push((canonical, arg.value));
    }
    let get = |name: &str| {
        args.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let require = |name: &'static str| {
        get(name).ok_or_else(|| ParseError::MissingArgument {
            action: action.clone(),
            argument: name,
            offset,
        })
    };
    let point_of = |name: &'static str| -> Result<Point, ParseError> {
        let value = require(name)?;
        to_point(&action, name, value, offset, config)
    };
    let key_of = |primary: &'static str, alias: &'static str| -> Result<String, ParseError> {
        let value =
            get(primary)
                .or_else(|| get(alias))
                .ok_or_else(|| ParseError::MissingArgument {
                    action: action.clone(),
                    argument: primary,
                    offset,
                })?;
        let key = value.trim();
        if key.is_empty() {
            return Err(ParseError::EmptyKey {
                action: action.clone(),
                offset,
            });
        }
        Ok(key.to_owned())
    };
    Ok(match call.name.as_str() {
        "click" | "left_single" => Action::Click {
            point: point_of("start_box")?,
        },
        "left_double" => Action::LeftDouble {
            point: point_of("start_box")?,
        },
        "right_single" => Action::RightSingle {
            point: point_of("start_box")?,
        },
        "hover" => Action::Hover {
            point: point_of("start_box")?,
        },
        "drag" | "select" => Action::Drag {
            from: point_of("start_box")?,
            to: point_of("end_box")?,
        },
        "hotkey" => {
            let keys = key_of("key", "hotkey")?;
            Action::Hotkey {
                keys: keys.split_whitespace().map(str::to_owned).collect(),
            }
        }
        "press" => Action::Press {
            key: key_of("key", "press")?,
        },
        "keydown" => Action::KeyDown {
            key: key_of("key", "press")?,
        },
        "keyup" | "release" => Action::KeyUp {
            key: key_of("key", "press")?,
        },
        "type" => Action::Type {
            content: require("content")?.to_owned(),
        },
        "scroll" => {
            let value = require("direction")?;
            let direction =
                ScrollDirection::parse(value).ok_or_else(|| ParseError::BadDirection {
                    value: value.to_owned(),
                    offset,
                })?;
            let point = match get("start_box") {
                Some(v) => Some(to_point(&action, "start_box", v, offset, config)?),
                None => None,
            };
            Action::Scroll { point, direction }
        }
        "wait" => Action::Wait,
        "finished" => Action::Finished {
            content: get("content").map(str::to_owned),
        },
        "call_user" => Action::CallUser,
        _ => {
            return Err(ParseError::UnknownAction {
                name: call.name,
                offset,
            });
        }
    })
}

fn to_point(
    action: &str,
    argument: &str,
    value: &str,
    offset: usize,
    config: &ParseConfig,
) -> Result<Point, ParseError> {
    let bad = || ParseError::BadPoint {
        action: action.to_owned(),
        argument: argument.to_owned(),
        value: value.to_owned(),
        offset,
    };
    let numbers = point_numbers(value).ok_or_else(bad)?;
    let (x, y) = match numbers.as_slice() {
        [x, y] => (*x, *y),
        [x1, y1, x2, y2] => ((x1 + x2) / 2.0, (y1 + y2) / 2.0),
        _ => return Err(bad()),
    };
    let (max_x, max_y) = config.coordinates.extent();
    let in_range = |v: f64, max: f64| (0.0..=max).contains(&v);
    if !numbers
        .chunks(2)
        .all(|c| in_range(c[0], max_x) && c.get(1).is_some_and(|&v| in_range(v, max_y)))
    {
        return Err(ParseError::PointOutOfRange {
            action: action.to_owned(),
            x,
            y,
            max_x,
            max_y,
            offset,
        });
    }
    let p = config
        .coordinates
        .to_screen(x, y, config.screen_width, config.screen_height);
    if !(p.x.is_finite() && p.y.is_finite()) {
        // Only a hand-made `Absolute` system with a zero side gets here.
        return Err(bad());
    }
    let last = |side: u32| f64::from(side.max(1) - 1);
    Ok(Point::new(
        p.x.clamp(0.0, last(config.screen_width)),
        p.y.clamp(0.0, last(config.screen_height)),
    ))
}

/// The numbers of a point or box value, in any of the accepted spellings.
fn point_numbers(value: &str) -> Option<Vec<f64>> {
    let mut s = value.trim();
    if let Some(inner) = s.strip_prefix("<|box_start|>") {
        s = inner.trim();
        s = s.strip_suffix("<|box_end|>")?.trim();
    }
    let inner = if let Some(inner) = s.strip_prefix("<point>") {
        inner.strip_suffix("</point>")?
    } else if let Some(inner) = s.strip_prefix("<bbox>") {
        inner.strip_suffix("</bbox>")?
    } else if let Some(inner) = s.strip_prefix('(') {
        inner.strip_suffix(')')?
    } else if let Some(inner) = s.strip_prefix('[') {
        inner.strip_suffix(']')?
    } else {
        s
    };
    let parts: Vec<&str> = inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .collect();
    parts.iter().map(|p| parse_number(p)).collect()
}

/// A plain decimal number (`12`, `12.5`, `-3`); no exponents, no `inf`/`nan`.
fn parse_number(s: &str) -> Option<f64> {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().filter(|&c| c == '.').count() <= 1
        && digits.chars().any(|c| c.is_ascii_digit());
    if !ok {
        return None;
    }
    s.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> ParseConfig {
        ParseConfig::new(CoordinateSystem::Relative1000, 1920, 1080)
    }

    fn actions(text: &str) -> Vec<Action> {
        parse_response(text, &rel()).expect("parses").actions
    }

    #[test]
    fn python_escapes() {
        assert_eq!(unescape(r#"a\nb\tc\\d\'e\"f"#), "a\nb\tc\\d'e\"f");
        assert_eq!(unescape(r"\x41\u00e9\U0001F600\101\0"), "Aé😀A\0");
        // Unknown and malformed escapes are kept, like Python.
        assert_eq!(unescape(r"\d\xZZ\"), "\\d\\xZZ\\");
    }

    #[test]
    fn all_point_spellings_give_the_same_click() {
        let expected = [Action::Click {
            point: Point::new(960.0, 324.0),
        }];
        for text in [
            "Action: click(start_box='(500,300)')",
            "Action: click(start_box='<|box_start|>(500,300)<|box_end|>')",
            "Action: click(start_box='(450,250,550,350)')",
            "Action: click(point='<point>500 300</point>')",
            "Action: click(start_point='<point>500 300</point>')",
            "Action: click( start_box = \"(500, 300)\" , )",
            "Action: left_single(start_box='[500,300]')",
        ] {
            assert_eq!(actions(text), expected, "{text}");
        }
    }

    #[test]
    fn unescaped_quote_in_type_content() {
        assert_eq!(
            actions("Thought: t\nAction: type(content='it's fine')"),
            [Action::Type {
                content: "it's fine".into()
            }]
        );
    }

    #[test]
    fn several_actions_and_truncated_close() {
        let got = actions(
            "Thought: x\nAction: hotkey(key='ctrl  a')\n\ntype(content='hi\\n')\n\nscroll(direction='down'",
        );
        assert_eq!(
            got,
            [
                Action::Hotkey {
                    keys: vec!["ctrl".into(), "a".into()]
                },
                Action::Type {
                    content: "hi\n".into()
                },
                Action::Scroll {
                    point: None,
                    direction: ScrollDirection::Down
                },
            ]
        );
    }

    #[test]
    fn errors_are_typed() {
        let cfg = rel();
        assert_eq!(
            parse_response("Thought: nothing", &cfg),
            Err(ParseError::MissingAction)
        );
        assert!(matches!(
            parse_response("Action: ", &cfg),
            Err(ParseError::NoActions { offset: 0 })
        ));
        assert!(matches!(
            parse_response("Action: jump()", &cfg),
            Err(ParseError::UnknownAction { offset: 8, .. })
        ));
        assert!(matches!(
            parse_response("Action: click(start_box='(1001,5)')", &cfg),
            Err(ParseError::PointOutOfRange { .. })
        ));
        assert!(matches!(
            parse_response("Action: click(start_box='(-1,5)')", &cfg),
            Err(ParseError::PointOutOfRange { .. })
        ));
        assert!(matches!(
            parse_response("Action: click(start_box='(nan,5)')", &cfg),
            Err(ParseError::BadPoint { .. })
        ));
        assert!(matches!(
            parse_response("Action: scroll(direction='sideways')", &cfg),
            Err(ParseError::BadDirection { .. })
        ));
        assert!(matches!(
            parse_response("Action: hotkey(key='')", &cfg),
            Err(ParseError::EmptyKey { .. })
        ));
        assert!(matches!(
            parse_response("Action: click()", &cfg),
            Err(ParseError::MissingArgument { .. })
        ));
        assert!(matches!(
            parse_response("Action: click(point='(1,2)', start_box='(1,2)')", &cfg),
            Err(ParseError::DuplicateArgument { .. })
        ));
        assert!(matches!(
            parse_response("Action: click(start_box=(1,2))", &cfg),
            Err(ParseError::Syntax { offset: 24, .. })
        ));
    }

    #[test]
    fn edge_of_the_space_lands_on_the_last_pixel() {
        assert_eq!(
            actions("Action: click(start_box='(1000,1000)')"),
            [Action::Click {
                point: Point::new(1919.0, 1079.0)
            }]
        );
    }

    #[test]
    fn reflection_form() {
        let p = parse_response(
            "Reflection: it failed\nAction_Summary: retry the button\nAction: wait()",
            &rel(),
        )
        .expect("parses");
        assert_eq!(p.reflection.as_deref(), Some("it failed"));
        assert_eq!(p.action_summary.as_deref(), Some("retry the button"));
        assert_eq!(p.thought.as_deref(), Some("retry the button"));
        assert_eq!(p.raw_actions, ["wait()"]);
    }

    #[test]
    fn action_inside_content_does_not_move_the_marker() {
        assert_eq!(
            actions("Thought: t\nAction: type(content='Action: go')"),
            [Action::Type {
                content: "Action: go".into()
            }]
        );
    }
}

//! Actions written back as UI-TARS text: the canonical form [`super::parse_response`] reads,
//! used to write demonstrations for supervised fine-tuning.

use serde::{Deserialize, Serialize};

use super::CoordinateSystem;
use crate::{Action, Point};

/// How points are spelled in written actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PointSyntax {
    /// `start_box='<|box_start|>(x,y)<|box_end|>'`: what a Qwen2-VL UI-TARS model generates
    /// (as tokens) under the ARPO and OSWorld prompts.
    #[default]
    BoxTokens,
    /// `start_box='(x,y)'`: the same text as decoded with special tokens skipped.
    Plain,
    /// `point='<point>x y</point>'` (`start_point`/`end_point` for drags): the
    /// `COMPUTER_USE_DOUBAO` prompt's form.
    PointTag,
}

/// A screen point as the integer model coordinates a model writes (rounded, kept in range).
pub fn model_coordinates(
    point: Point,
    coordinates: &CoordinateSystem,
    screen: (u32, u32),
) -> (i64, i64) {
    let (x, y) = coordinates.from_screen(point, screen.0, screen.1);
    let (max_x, max_y) = coordinates.extent();
    let fit = |v: f64, max: f64| {
        if v.is_nan() {
            0
        } else {
            v.round().clamp(0.0, max) as i64
        }
    };
    (fit(x, max_x), fit(y, max_y))
}

/// A Python single-quoted string literal body: `\\`, `\'`, `\n`, `\r`, `\t`, other control
/// characters as `\xhh`; everything else (unicode included) as is.
pub fn escape_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// One action as canonical UI-TARS text, e.g. `click(start_box='<|box_start|>(500,300)<|box_end|>')`.
///
/// `screen` is `(width, height)` of the environment. Parsing the result with the same
/// coordinate system and screen gives back the action, points within rounding of the model's
/// integer coordinates (under 1 px for screens up to 2000 px wide in relative coordinates, and
/// for absolute coordinates). A hotkey key that contains whitespace cannot round-trip (keys are
/// separated by spaces), nor can an empty key list.
///
/// ```
/// use arpo_core::{Action, Point};
/// use arpo_core::protocol::{format_action, CoordinateSystem, PointSyntax};
///
/// let click = Action::Click { point: Point::new(960.0, 324.0) };
/// let text = format_action(&click, &CoordinateSystem::Relative1000, (1920, 1080), PointSyntax::Plain);
/// assert_eq!(text, "click(start_box='(500,300)')");
/// ```
pub fn format_action(
    action: &Action,
    coordinates: &CoordinateSystem,
    screen: (u32, u32),
    syntax: PointSyntax,
) -> String {
    let point = |p: Point| {
        let (x, y) = model_coordinates(p, coordinates, screen);
        match syntax {
            PointSyntax::BoxTokens => format!("'<|box_start|>({x},{y})<|box_end|>'"),
            PointSyntax::Plain => format!("'({x},{y})'"),
            PointSyntax::PointTag => format!("'<point>{x} {y}</point>'"),
        }
    };
    let (start_key, end_key) = match syntax {
        PointSyntax::BoxTokens | PointSyntax::Plain => ("start_box", "end_box"),
        PointSyntax::PointTag => ("point", "end_point"),
    };
    let drag_start_key = match syntax {
        PointSyntax::PointTag => "start_point",
        _ => "start_box",
    };
    let one_point = |name: &str, p: Point| format!("{name}({start_key}={})", point(p));
    match action {
        Action::Click { point: p } => one_point("click", *p),
        Action::LeftDouble { point: p } => one_point("left_double", *p),
        Action::RightSingle { point: p } => one_point("right_single", *p),
        Action::Hover { point: p } => one_point("hover", *p),
        Action::Drag { from, to } => format!(
            "drag({drag_start_key}={}, {end_key}={})",
            point(*from),
            point(*to)
        ),
        Action::Hotkey { keys } => format!("hotkey(key='{}')", escape_string(&keys.join(" "))),
        Action::Press { key } => format!("press(key='{}')", escape_string(key)),
        Action::KeyDown { key } => format!("keydown(key='{}')", escape_string(key)),
        Action::KeyUp { key } => format!("keyup(key='{}')", escape_string(key)),
        Action::Type { content } => format!("type(content='{}')", escape_string(content)),
        Action::Scroll {
            point: Some(p),
            direction,
        } => format!(
            "scroll({start_key}={}, direction='{}')",
            point(*p),
            direction.as_str()
        ),
        Action::Scroll {
            point: None,
            direction,
        } => format!("scroll(direction='{}')", direction.as_str()),
        Action::Wait => "wait()".to_owned(),
        Action::Finished { content: None } => "finished()".to_owned(),
        Action::Finished {
            content: Some(content),
        } => format!("finished(content='{}')", escape_string(content)),
        Action::CallUser => "call_user()".to_owned(),
    }
}

/// A whole response: `Thought: {thought}\nAction: {a1}\n\n{a2}...`.
///
/// The thought is written as given; it must not contain a line that starts with `Action:`
/// (the parser would take the actions to start there).
pub fn format_response(
    thought: &str,
    actions: &[Action],
    coordinates: &CoordinateSystem,
    screen: (u32, u32),
    syntax: PointSyntax,
) -> String {
    let calls: Vec<String> = actions
        .iter()
        .map(|a| format_action(a, coordinates, screen, syntax))
        .collect();
    format!("Thought: {thought}\nAction: {}", calls.join("\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScrollDirection;

    #[test]
    fn canonical_forms() {
        let rel = CoordinateSystem::Relative1000;
        let s = (1000, 1000);
        let f = |a: &Action, syn| format_action(a, &rel, s, syn);
        let drag = Action::Drag {
            from: Point::new(1.0, 2.0),
            to: Point::new(3.0, 4.0),
        };
        assert_eq!(
            f(&drag, PointSyntax::BoxTokens),
            "drag(start_box='<|box_start|>(1,2)<|box_end|>', end_box='<|box_start|>(3,4)<|box_end|>')"
        );
        assert_eq!(
            f(&drag, PointSyntax::PointTag),
            "drag(start_point='<point>1 2</point>', end_point='<point>3 4</point>')"
        );
        let scroll = Action::Scroll {
            point: Some(Point::new(10.4, 20.6)),
            direction: ScrollDirection::Left,
        };
        assert_eq!(
            f(&scroll, PointSyntax::PointTag),
            "scroll(point='<point>10 21</point>', direction='left')"
        );
        let typed = Action::Type {
            content: "it's a \\ \"test\"\n\u{1}é".into(),
        };
        assert_eq!(
            f(&typed, PointSyntax::Plain),
            r#"type(content='it\'s a \\ "test"\n\x01é')"#
        );
        assert_eq!(
            format_response(
                "go",
                &[Action::Wait, Action::CallUser],
                &rel,
                s,
                PointSyntax::Plain
            ),
            "Thought: go\nAction: wait()\n\ncall_user()"
        );
    }
}

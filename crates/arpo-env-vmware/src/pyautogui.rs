//! `Action` → the pyautogui program OSWorld runs in the guest.
//!
//! The mapping is the one OSWorld's UI-TARS agents use (`parsing_response_to_pyautogui_code` of
//! the `ui-tars` package): `click` → `pyautogui.click(x, y, button='left')`, `left_double` →
//! `doubleClick`, `right_single` → `click(..., button='right')`, `hover` → `moveTo`, `drag` →
//! `moveTo` + `dragTo(x, y, duration=1.0)`, `scroll` → `scroll(±5, x=, y=)` (up positive; left and
//! right through `hscroll`, right positive), `hotkey` → `hotkey('ctrl', 'c')` (arrow keys renamed,
//! `space` → `' '`), `press`/`keydown`/`keyup` → `press`/`keyDown`/`keyUp`, `type` →
//! `write(text, interval=0.1)` then `press('enter')` when the text ends with a newline.
//!
//! Differences from the reference, on purpose:
//! - nothing is evaluated and no model text is pasted as code: every string is an escaped Python
//!   literal ([`python_str`]), pure ASCII, so no text can end the literal or add a statement;
//! - `<` is typed as `hotkey('shift', ',')` here rather than by OSWorld's regex rewrite of the
//!   finished program (pyautogui types `>` for `<` on the VM, and the rewrite breaks literals
//!   with escapes);
//! - coordinates are rounded to integer pixels;
//! - the trailing newline of `type` is not typed, only submitted with one `press('enter')`.

use arpo_core::{Action, Point, ScrollDirection};

/// What the guest is asked to do for one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestCommand {
    /// Python statements (one per line) run after OSWorld's prefix
    /// `import pyautogui; import time; pyautogui.FAILSAFE = False; `.
    Code(String),
    /// OSWorld's `WAIT`: nothing runs, the environment sleeps.
    Wait,
    /// OSWorld's `DONE` (`finished`).
    Done,
    /// OSWorld's `FAIL` (`call_user`).
    Fail,
}

/// The prefix OSWorld's `PythonController` puts in front of every action program.
pub const PYAUTOGUI_PREFIX: &str = "import pyautogui; import time; pyautogui.FAILSAFE = False; ";

/// The command line `/execute` runs for a program: `["python", "-c", prefix + program]`.
pub fn python_command(program: &str) -> Vec<String> {
    vec![
        "python".to_owned(),
        "-c".to_owned(),
        format!("{PYAUTOGUI_PREFIX}{program}"),
    ]
}

/// The guest command for one action.
pub fn guest_command(action: &Action) -> GuestCommand {
    let mut lines = Vec::new();
    match action {
        Action::Wait => return GuestCommand::Wait,
        Action::Finished { .. } => return GuestCommand::Done,
        Action::CallUser => return GuestCommand::Fail,
        Action::Click { point } => {
            lines.push(format!("pyautogui.click({}, button='left')", xy(*point)));
        }
        Action::LeftDouble { point } => {
            lines.push(format!(
                "pyautogui.doubleClick({}, button='left')",
                xy(*point)
            ));
        }
        Action::RightSingle { point } => {
            lines.push(format!("pyautogui.click({}, button='right')", xy(*point)));
        }
        Action::Hover { point } => lines.push(format!("pyautogui.moveTo({})", xy(*point))),
        Action::Drag { from, to } => {
            lines.push(format!("pyautogui.moveTo({})", xy(*from)));
            lines.push(format!("pyautogui.dragTo({}, duration=1.0)", xy(*to)));
        }
        Action::Scroll { point, direction } => {
            let (function, amount) = match direction {
                ScrollDirection::Up => ("scroll", 5),
                ScrollDirection::Down => ("scroll", -5),
                ScrollDirection::Left => ("hscroll", -5),
                ScrollDirection::Right => ("hscroll", 5),
            };
            lines.push(match point {
                Some(p) => {
                    let (x, y) = p.rounded();
                    format!("pyautogui.{function}({amount}, x={x}, y={y})")
                }
                None => format!("pyautogui.{function}({amount})"),
            });
        }
        Action::Hotkey { keys } => {
            let keys: Vec<String> = keys.iter().map(|k| python_str(&key_name(k))).collect();
            if keys.is_empty() {
                return GuestCommand::Wait;
            }
            lines.push(format!("pyautogui.hotkey({})", keys.join(", ")));
        }
        Action::Press { key } => lines.push(press_line("press", key)),
        Action::KeyDown { key } => lines.push(press_line("keyDown", key)),
        Action::KeyUp { key } => lines.push(press_line("keyUp", key)),
        Action::Type { content } => {
            let submit = content.ends_with('\n');
            let text = content.strip_suffix('\n').unwrap_or(content);
            for (i, part) in text.split('<').enumerate() {
                if i > 0 {
                    lines.push(LESS_THAN.to_owned());
                }
                if !part.is_empty() {
                    lines.push(format!(
                        "pyautogui.write({}, interval=0.1)",
                        python_str(part)
                    ));
                }
            }
            if submit {
                lines.push("pyautogui.press('enter')".to_owned());
            }
            if lines.is_empty() {
                return GuestCommand::Wait;
            }
        }
    }
    GuestCommand::Code(lines.join("\n"))
}

/// The program for a list of actions, as OSWorld's UI-TARS agent hands it to `DesktopEnv.step`:
/// the code of the executable actions, one statement per line; when there is none, OSWorld's
/// special word of the first action (`WAIT`, `DONE`, `FAIL`), or `WAIT` for no action at all.
pub fn pyautogui_program(actions: &[Action]) -> String {
    let mut code = Vec::new();
    let mut special = None;
    for action in actions {
        match guest_command(action) {
            GuestCommand::Code(c) => code.push(c),
            GuestCommand::Wait => {
                special.get_or_insert("WAIT");
            }
            GuestCommand::Done => {
                special.get_or_insert("DONE");
            }
            GuestCommand::Fail => {
                special.get_or_insert("FAIL");
            }
        }
    }
    if code.is_empty() {
        special.unwrap_or("WAIT").to_owned()
    } else {
        code.join("\n")
    }
}

/// pyautogui types `>` for `<` on OSWorld's VM; OSWorld rewrites `<` to this.
const LESS_THAN: &str = "pyautogui.hotkey('shift', ',')";

fn press_line(function: &str, key: &str) -> String {
    let key = key_name(key);
    if function == "press" && key == "<" {
        return LESS_THAN.to_owned();
    }
    format!("pyautogui.{function}({})", python_str(&key))
}

/// UI-TARS key names → pyautogui's (`arrowleft` → `left`, `space` → `' '`, lowercase).
pub fn key_name(key: &str) -> String {
    let trimmed = key.trim();
    let lower = trimmed.to_lowercase();
    match lower.as_str() {
        "arrowleft" => "left".to_owned(),
        "arrowright" => "right".to_owned(),
        "arrowup" => "up".to_owned(),
        "arrowdown" => "down".to_owned(),
        "space" => " ".to_owned(),
        // A single character keeps its case ("A" is shift+a for pyautogui); names are lowercase.
        _ if trimmed.chars().count() == 1 => trimmed.to_owned(),
        _ if trimmed.is_empty() => key.to_owned(),
        _ => lower,
    }
}

fn xy(point: Point) -> String {
    let (x, y) = point.rounded();
    format!("{x}, {y}")
}

/// `text` as a single-quoted Python string literal, pure ASCII: `\\`, `\'`, `\n`, `\r`, `\t`,
/// other control characters as `\xNN`, everything beyond ASCII as `\uNNNN` / `\UNNNNNNNN`.
pub fn python_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(action: Action) -> String {
        match guest_command(&action) {
            GuestCommand::Code(c) => c,
            other => panic!("expected code, got {other:?}"),
        }
    }

    #[test]
    fn mouse_actions_follow_the_ui_tars_mapping() {
        let p = Point::new(960.4, 539.6);
        assert_eq!(
            code(Action::Click { point: p }),
            "pyautogui.click(960, 540, button='left')"
        );
        assert_eq!(
            code(Action::LeftDouble { point: p }),
            "pyautogui.doubleClick(960, 540, button='left')"
        );
        assert_eq!(
            code(Action::RightSingle { point: p }),
            "pyautogui.click(960, 540, button='right')"
        );
        assert_eq!(
            code(Action::Hover { point: p }),
            "pyautogui.moveTo(960, 540)"
        );
        assert_eq!(
            code(Action::Drag {
                from: Point::new(10.0, 20.0),
                to: Point::new(30.0, 40.0)
            }),
            "pyautogui.moveTo(10, 20)\npyautogui.dragTo(30, 40, duration=1.0)"
        );
        assert_eq!(
            code(Action::Scroll {
                point: Some(Point::new(5.0, 6.0)),
                direction: ScrollDirection::Up
            }),
            "pyautogui.scroll(5, x=5, y=6)"
        );
        assert_eq!(
            code(Action::Scroll {
                point: None,
                direction: ScrollDirection::Down
            }),
            "pyautogui.scroll(-5)"
        );
        assert_eq!(
            code(Action::Scroll {
                point: None,
                direction: ScrollDirection::Left
            }),
            "pyautogui.hscroll(-5)"
        );
    }

    #[test]
    fn keys_are_renamed_and_quoted() {
        assert_eq!(
            code(Action::Hotkey {
                keys: vec!["ctrl".into(), "c".into()]
            }),
            "pyautogui.hotkey('ctrl', 'c')"
        );
        assert_eq!(
            code(Action::Hotkey {
                keys: vec!["Ctrl".into(), "ArrowLeft".into(), "space".into()]
            }),
            "pyautogui.hotkey('ctrl', 'left', ' ')"
        );
        assert_eq!(
            code(Action::Press {
                key: "enter".into()
            }),
            "pyautogui.press('enter')"
        );
        assert_eq!(
            code(Action::KeyDown {
                key: "shift".into()
            }),
            "pyautogui.keyDown('shift')"
        );
        assert_eq!(
            code(Action::KeyUp { key: "'".into() }),
            "pyautogui.keyUp('\\'')"
        );
        assert_eq!(
            code(Action::Press { key: "<".into() }),
            "pyautogui.hotkey('shift', ',')"
        );
    }

    #[test]
    fn type_escapes_submits_and_rewrites_less_than() {
        assert_eq!(
            code(Action::Type {
                content: "hello\n".into()
            }),
            "pyautogui.write('hello', interval=0.1)\npyautogui.press('enter')"
        );
        assert_eq!(
            code(Action::Type {
                content: "a<b".into()
            }),
            "pyautogui.write('a', interval=0.1)\npyautogui.hotkey('shift', ',')\npyautogui.write('b', interval=0.1)"
        );
        // An attempt to end the literal and add a statement stays inside the literal.
        assert_eq!(
            code(Action::Type {
                content: "x'); import os; os.system('rm -rf ~') #".into()
            }),
            "pyautogui.write('x\\'); import os; os.system(\\'rm -rf ~\\') #', interval=0.1)"
        );
        assert_eq!(
            code(Action::Type {
                content: "é\\\u{1F600}\t\u{7}".into()
            }),
            "pyautogui.write('\\xe9\\\\\\U0001f600\\t\\x07', interval=0.1)"
        );
    }

    #[test]
    fn special_actions_and_programs() {
        assert_eq!(guest_command(&Action::Wait), GuestCommand::Wait);
        assert_eq!(
            guest_command(&Action::Finished { content: None }),
            GuestCommand::Done
        );
        assert_eq!(guest_command(&Action::CallUser), GuestCommand::Fail);
        assert_eq!(pyautogui_program(&[Action::CallUser]), "FAIL");
        assert_eq!(pyautogui_program(&[]), "WAIT");
        assert_eq!(
            pyautogui_program(&[
                Action::Click {
                    point: Point::new(1.0, 2.0)
                },
                Action::Press { key: "tab".into() },
                Action::Finished { content: None },
            ]),
            "pyautogui.click(1, 2, button='left')\npyautogui.press('tab')"
        );
        assert_eq!(
            python_command("pyautogui.press('a')")[2],
            "import pyautogui; import time; pyautogui.FAILSAFE = False; pyautogui.press('a')"
        );
    }
}

//! One episode on the simulated desktop: actions and pyautogui calls in screen pixels.

use arpo_core::{Action, Point, Screenshot, ScrollDirection};

use crate::SimError;
use crate::desktop::{Button, Desktop};
use crate::pyautogui::{MouseButton, PyAutoGuiCall};
use crate::render::{self, scale_for};
use crate::task::{TaskSpec, resolve_oracle};
use arpo_core::Task;

/// Wheel notches of one UI-TARS scroll action (UI-TARS' pyautogui mapping scrolls by 5).
pub const SCROLL_CLICKS: i64 = 5;

/// Default screen size: a multiple of 28 on both sides (Qwen2-VL patches), 12x8 = 96 image tokens.
pub const DEFAULT_SIZE: (u32, u32) = (336, 224);

const KNOWN_KEYS: &[&str] = &[
    "enter",
    "return",
    "tab",
    "escape",
    "esc",
    "backspace",
    "delete",
    "del",
    "left",
    "right",
    "up",
    "down",
    "arrowleft",
    "arrowright",
    "arrowup",
    "arrowdown",
    "home",
    "end",
    "pageup",
    "pagedown",
    "space",
    "ctrl",
    "control",
    "ctrlleft",
    "ctrlright",
    "shift",
    "shiftleft",
    "shiftright",
    "alt",
    "altleft",
    "altright",
    "option",
    "cmd",
    "command",
    "win",
    "super",
    "meta",
    "insert",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "f6",
    "f7",
    "f8",
    "f9",
    "f10",
    "f11",
    "f12",
];

fn check_key(key: &str) -> Result<(), String> {
    let printable = key.chars().count() == 1 && key.chars().all(|c| (' '..='~').contains(&c));
    if printable || KNOWN_KEYS.contains(&key.trim().to_ascii_lowercase().as_str()) {
        Ok(())
    } else {
        Err(format!("unknown key {key:?}"))
    }
}

/// A running episode.
#[derive(Debug, Clone)]
pub struct Session {
    pub spec: TaskSpec,
    pub desktop: Desktop,
    pub width: u32,
    pub height: u32,
    pub scale: u32,
    /// Actions that were rejected (off screen, unknown key), with the reason.
    pub rejected: Vec<String>,
    frame: Vec<u8>,
}

impl Session {
    pub fn new(spec: TaskSpec, width: u32, height: u32) -> Result<Self, SimError> {
        let scale = scale_for(width, height)?;
        let desktop = Desktop::new(&spec.scene);
        Ok(Self {
            spec,
            desktop,
            width,
            height,
            scale,
            rejected: Vec::new(),
            frame: Vec::new(),
        })
    }

    pub fn from_task(task: &Task, width: u32, height: u32) -> Result<Self, SimError> {
        Self::new(TaskSpec::from_task(task)?, width, height)
    }

    fn logical(&self, p: Point) -> Result<(i32, i32), String> {
        logical_of(p, self.width, self.height, self.scale)
    }

    fn optional_point(&self, x: Option<f64>, y: Option<f64>) -> Result<(i32, i32), String> {
        let cur = self.desktop.pointer;
        let s = f64::from(self.scale);
        let px = x.unwrap_or(f64::from(cur.0) * s);
        let py = y.unwrap_or(f64::from(cur.1) * s);
        self.logical(Point::new(px, py))
    }

    /// Carries out one UI-TARS action; a rejected action changes nothing.
    pub fn apply_action(&mut self, action: &Action) -> Result<(), String> {
        let r = apply_action_to(
            &mut self.desktop,
            self.width,
            self.height,
            self.scale,
            action,
        );
        if let Err(reason) = &r {
            self.rejected.push(format!("{}: {reason}", action.name()));
        }
        r
    }

    /// Carries out one pyautogui call; a rejected call changes nothing.
    pub fn apply_call(&mut self, call: &PyAutoGuiCall) -> Result<(), String> {
        match call {
            PyAutoGuiCall::Click {
                x,
                y,
                clicks,
                button,
            } => {
                let p = self.optional_point(*x, *y)?;
                self.desktop.click(p, button_of(*button), *clicks);
            }
            PyAutoGuiCall::DoubleClick { x, y, button } => {
                let p = self.optional_point(*x, *y)?;
                self.desktop.click(p, button_of(*button), 2);
            }
            PyAutoGuiCall::RightClick { x, y } => {
                let p = self.optional_point(*x, *y)?;
                self.desktop.click(p, Button::Right, 1);
            }
            PyAutoGuiCall::MoveTo { x, y } => {
                let p = self.optional_point(*x, *y)?;
                self.desktop.move_to(p);
            }
            PyAutoGuiCall::DragTo { x, y, button } => {
                let p = self.optional_point(*x, *y)?;
                if *button == MouseButton::Left {
                    let from = self.desktop.pointer;
                    self.desktop.drag(from, p);
                } else {
                    self.desktop.move_to(p);
                }
            }
            PyAutoGuiCall::Scroll { clicks, x, y } => {
                let p = self.optional_point(*x, *y)?;
                self.desktop.scroll(p, *clicks);
            }
            PyAutoGuiCall::Hotkey { keys } => {
                keys.iter().try_for_each(|k| check_key(k))?;
                self.desktop.hotkey(keys);
            }
            PyAutoGuiCall::Press { keys, presses } => {
                keys.iter().try_for_each(|k| check_key(k))?;
                for _ in 0..*presses {
                    for k in keys {
                        self.desktop.press(k);
                    }
                }
            }
            PyAutoGuiCall::KeyDown { key } => {
                check_key(key)?;
                self.desktop.key_down(key);
            }
            PyAutoGuiCall::KeyUp { key } => {
                check_key(key)?;
                self.desktop.key_up(key);
            }
            PyAutoGuiCall::Write { text } => self.desktop.type_text(text),
            PyAutoGuiCall::Sleep { .. } => {}
        }
        Ok(())
    }

    /// Renders the current screen to RGB.
    pub fn render_rgb(&mut self) -> Result<&[u8], SimError> {
        render::render_into(&self.desktop, self.width, self.height, &mut self.frame)?;
        Ok(&self.frame)
    }

    /// Renders the current screen as a PNG screenshot.
    pub fn screenshot(&mut self) -> Result<Screenshot, SimError> {
        let (w, h) = (self.width, self.height);
        let rgb = self.render_rgb()?;
        let png = render::encode_png(rgb, w, h)?;
        Ok(Screenshot::new(png, w, h))
    }

    /// Whether every check holds now (ignores feasibility: see [`Session::reward`]).
    pub fn checks_hold(&self) -> bool {
        self.spec.checks.iter().all(|c| c.holds(&self.desktop))
    }

    /// OSWorld's scoring: an infeasible task scores 1 only when the last action was `call_user`;
    /// a feasible one scores 0 after `call_user`, else 1 when every check holds.
    pub fn reward(&self, last_action: Option<&Action>) -> f64 {
        let called_user = matches!(last_action, Some(Action::CallUser));
        let ok = if self.spec.infeasible {
            called_user
        } else {
            !called_user && self.checks_hold()
        };
        if ok { 1.0 } else { 0.0 }
    }

    /// The oracle's actions for this session's task, from its initial state.
    pub fn oracle(&self) -> Result<Vec<Action>, SimError> {
        let mut d = Desktop::new(&self.spec.scene);
        let (w, h, s) = (self.width, self.height, self.scale);
        resolve_oracle(&self.spec, &mut d, s, |d, a| {
            let _ = apply_action_to(d, w, h, s, a);
        })
    }
}

fn button_of(b: MouseButton) -> Button {
    match b {
        MouseButton::Left => Button::Left,
        MouseButton::Right => Button::Right,
        MouseButton::Middle => Button::Middle,
    }
}

fn logical_of(p: Point, width: u32, height: u32, scale: u32) -> Result<(i32, i32), String> {
    if !p.x.is_finite() || !p.y.is_finite() || !p.is_inside(width, height) {
        return Err(format!(
            "point ({}, {}) is outside the {width}x{height} screen",
            p.x, p.y
        ));
    }
    let s = f64::from(scale);
    let x = (p.x.min(f64::from(width) - 1.0) / s).floor() as i32;
    let y = (p.y.min(f64::from(height) - 1.0) / s).floor() as i32;
    Ok((x, y))
}

fn apply_action_to(
    d: &mut Desktop,
    width: u32,
    height: u32,
    scale: u32,
    action: &Action,
) -> Result<(), String> {
    let at = |p: Point| logical_of(p, width, height, scale);
    match action {
        Action::Click { point } => d.click(at(*point)?, Button::Left, 1),
        Action::LeftDouble { point } => d.click(at(*point)?, Button::Left, 2),
        Action::RightSingle { point } => d.click(at(*point)?, Button::Right, 1),
        Action::Hover { point } => d.move_to(at(*point)?),
        Action::Drag { from, to } => {
            let (a, b) = (at(*from)?, at(*to)?);
            d.drag(a, b);
        }
        Action::Hotkey { keys } => {
            if keys.is_empty() {
                return Err("hotkey without keys".into());
            }
            keys.iter().try_for_each(|k| check_key(k))?;
            d.hotkey(keys);
        }
        Action::Press { key } => {
            check_key(key)?;
            d.press(key);
        }
        Action::KeyDown { key } => {
            check_key(key)?;
            d.key_down(key);
        }
        Action::KeyUp { key } => {
            check_key(key)?;
            d.key_up(key);
        }
        Action::Type { content } => d.type_text(content),
        Action::Scroll { point, direction } => {
            let p = match point {
                Some(p) => at(*p)?,
                None => d.pointer,
            };
            match direction {
                ScrollDirection::Up => d.scroll(p, SCROLL_CLICKS),
                ScrollDirection::Down => d.scroll(p, -SCROLL_CLICKS),
                // Nothing on this desktop scrolls sideways; the pointer still moves there.
                ScrollDirection::Left | ScrollDirection::Right => d.move_to(p),
            }
        }
        Action::Wait | Action::Finished { .. } | Action::CallUser => {}
    }
    Ok(())
}

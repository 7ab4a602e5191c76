//! Task specs: the initial scene, the evaluator's checks and the oracle's plan.

use arpo_core::{Action, Point, ScrollDirection};
use serde::{Deserialize, Serialize};

use crate::SimError;
use crate::desktop::{Desktop, IconKind, ROW_H, Rect, Scene, WidgetKind, slider_x_of};

/// Which split a task belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Heldout,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Heldout => "heldout",
        }
    }
}

/// A simulated-desktop task, carried in `arpo_core::Task::config` under the key `"sim"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: String,
    pub family: String,
    pub split: Split,
    pub instruction: String,
    pub scene: Scene,
    /// All must hold on the final desktop for reward 1.
    pub checks: Vec<Check>,
    /// The right answer is `call_user` (the task cannot be done on this desktop).
    #[serde(default)]
    pub infeasible: bool,
    /// The oracle's plan, resolved against the live desktop into actions.
    pub oracle: Vec<OracleStep>,
}

impl TaskSpec {
    /// The `arpo_core::Task` for this spec.
    pub fn to_task(&self) -> arpo_core::Task {
        arpo_core::Task {
            id: self.id.clone(),
            instruction: self.instruction.clone(),
            domain: Some(self.family.clone()),
            config: serde_json::json!({ "sim": self }),
        }
    }

    /// Reads the spec back from a task.
    pub fn from_task(task: &arpo_core::Task) -> Result<TaskSpec, SimError> {
        let bad = |reason: String| SimError::BadTask {
            task_id: task.id.clone(),
            reason,
        };
        let v = task
            .config
            .get("sim")
            .ok_or_else(|| bad("config has no \"sim\" key".into()))?;
        serde_json::from_value(v.clone()).map_err(|e| bad(format!("bad sim spec: {e}")))
    }
}

/// One condition on the final desktop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case")]
pub enum Check {
    /// The button was pressed at least once.
    Pressed {
        widget: String,
    },
    /// The button was never pressed.
    NotPressed {
        widget: String,
    },
    /// The field holds exactly this text.
    Text {
        widget: String,
        text: String,
    },
    /// The field was submitted (enter) with exactly this text.
    Submitted {
        widget: String,
        text: String,
    },
    Checked {
        widget: String,
        checked: bool,
    },
    Radio {
        widget: String,
        option: String,
    },
    Dropdown {
        widget: String,
        option: String,
    },
    /// The list item was opened (double click or enter).
    ListOpened {
        widget: String,
        item: String,
    },
    Slider {
        widget: String,
        value: i32,
    },
    /// The folder icon holds a file with this label.
    InFolder {
        folder: String,
        file: String,
    },
    IconPresent {
        icon: String,
    },
    IconDeleted {
        icon: String,
    },
    WindowOpen {
        window: String,
    },
    /// The window was closed with its OK (confirm) control.
    Confirmed {
        window: String,
    },
    /// The events starting with `prefix` are exactly `expected`, in order.
    Events {
        prefix: String,
        expected: Vec<String>,
    },
}

impl Check {
    /// Whether the check holds on `d`.
    pub fn holds(&self, d: &Desktop) -> bool {
        let kind = |id: &str| d.widget(id).map(|w| &w.kind);
        match self {
            Check::Pressed { widget } => {
                matches!(kind(widget), Some(WidgetKind::Button { presses, .. }) if *presses > 0)
            }
            Check::NotPressed { widget } => {
                matches!(kind(widget), Some(WidgetKind::Button { presses: 0, .. }))
            }
            Check::Text { widget, text } => {
                matches!(kind(widget), Some(WidgetKind::TextField { text: t, .. }) if t == text)
            }
            Check::Submitted { widget, text } => matches!(
                kind(widget),
                Some(WidgetKind::TextField { submitted: Some(t), .. }) if t == text
            ),
            Check::Checked { widget, checked } => {
                matches!(kind(widget), Some(WidgetKind::Checkbox { checked: c, .. }) if c == checked)
            }
            Check::Radio { widget, option } => matches!(
                kind(widget),
                Some(WidgetKind::Radio { options, selected: Some(s) }) if options.get(*s) == Some(option)
            ),
            Check::Dropdown { widget, option } => matches!(
                kind(widget),
                Some(WidgetKind::Dropdown { options, selected: Some(s), .. }) if options.get(*s) == Some(option)
            ),
            Check::ListOpened { widget, item } => matches!(
                kind(widget),
                Some(WidgetKind::List { items, opened: Some(s), .. }) if items.get(*s) == Some(item)
            ),
            Check::Slider { widget, value } => {
                matches!(kind(widget), Some(WidgetKind::Slider { value: v, .. }) if v == value)
            }
            Check::InFolder { folder, file } => matches!(
                d.icon(folder).map(|i| &i.kind),
                Some(IconKind::Folder { contents }) if contents.contains(file)
            ),
            Check::IconPresent { icon } => d.icon(icon).is_some(),
            Check::IconDeleted { icon } => d.icon(icon).is_none(),
            Check::WindowOpen { window } => d.is_open(window),
            Check::Confirmed { window } => {
                !d.is_open(window)
                    && d.closed
                        .iter()
                        .rev()
                        .find(|w| w.id == *window)
                        .is_some_and(|w| w.confirmed)
            }
            Check::Events { prefix, expected } => {
                let got: Vec<&String> = d
                    .events
                    .iter()
                    .filter(|e| e.starts_with(prefix.as_str()))
                    .collect();
                got.len() == expected.len() && got.iter().zip(expected).all(|(a, b)| *a == b)
            }
        }
    }
}

/// Something on screen the oracle points at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "target", rename_all = "snake_case")]
pub enum Target {
    Widget {
        id: String,
    },
    /// A visible row of a list.
    ListItem {
        id: String,
        item: String,
    },
    RadioOption {
        id: String,
        option: String,
    },
    /// A row of an open dropdown.
    DropdownOption {
        id: String,
        option: String,
    },
    MenuTitle {
        window: String,
        menu: String,
    },
    /// An item of the open menu.
    MenuItem {
        window: String,
        menu: String,
        item: String,
    },
    Icon {
        id: String,
    },
    /// An item of the open context menu.
    ContextItem {
        item: String,
    },
    /// The spot on a slider's track for a value.
    SliderValue {
        id: String,
        value: i32,
    },
    /// A slider's knob.
    SliderKnob {
        id: String,
    },
}

/// One step of an oracle plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum OracleStep {
    Click {
        at: Target,
    },
    DoubleClick {
        at: Target,
    },
    RightClick {
        at: Target,
    },
    Drag {
        from: Target,
        to: Target,
    },
    Type {
        text: String,
    },
    Hotkey {
        keys: Vec<String>,
    },
    /// Scroll the list until the item is visible.
    ScrollTo {
        id: String,
        item: String,
    },
    Finished,
    CallUser,
}

/// Where `t` is on the desktop, in logical pixels (None when it is not visible).
pub fn locate(d: &Desktop, t: &Target) -> Option<(i32, i32)> {
    let widget = |id: &str| {
        let (wi, xi) = d.find_widget(id)?;
        let w = &d.windows[wi];
        Some((w.widget_rect(&w.widgets[xi]), &w.widgets[xi]))
    };
    match t {
        Target::Widget { id } => widget(id).map(|(r, _)| r.center()),
        Target::ListItem { id, item } => {
            let (r, w) = widget(id)?;
            let WidgetKind::List { items, top, .. } = &w.kind else {
                return None;
            };
            let i = items.iter().position(|x| x == item)?;
            if i < *top || i >= *top + w.visible_rows() {
                return None;
            }
            Some((
                r.x + (r.w - 5) / 2,
                r.y + (i - *top) as i32 * ROW_H + ROW_H / 2,
            ))
        }
        Target::RadioOption { id, option } => {
            let (r, w) = widget(id)?;
            let WidgetKind::Radio { options, .. } = &w.kind else {
                return None;
            };
            let i = options.iter().position(|x| x == option)?;
            Some((r.x + 4, r.y + i as i32 * ROW_H + ROW_H / 2))
        }
        Target::DropdownOption { id, option } => {
            let (r, w) = widget(id)?;
            let WidgetKind::Dropdown {
                options,
                open: true,
                ..
            } = &w.kind
            else {
                return None;
            };
            let i = options.iter().position(|x| x == option)?;
            Some((r.x + r.w / 2, r.y + r.h + i as i32 * ROW_H + ROW_H / 2))
        }
        Target::MenuTitle { window, menu } => {
            let w = d.windows.iter().find(|w| w.id == *window)?;
            let mi = w.menus.iter().position(|m| m.title == *menu)?;
            Some(w.menu_title_rect(mi).center())
        }
        Target::MenuItem { window, menu, item } => {
            let w = d.windows.iter().find(|w| w.id == *window)?;
            let mi = w.menus.iter().position(|m| m.title == *menu)?;
            if w.open_menu != Some(mi) {
                return None;
            }
            let j = w.menus[mi].items.iter().position(|x| x.label == *item)?;
            Some(w.menu_item_rect(mi, j).center())
        }
        Target::Icon { id } => {
            let i = d.icon(id)?;
            let r = i.rect();
            Some((r.x + r.w / 2, r.y + 8))
        }
        Target::ContextItem { item } => {
            let cm = d.context_menu.as_ref()?;
            let j = cm.items.iter().position(|x| x == item)?;
            Some(cm.item_rect(j).center())
        }
        Target::SliderValue { id, value } => {
            let (r, w) = widget(id)?;
            let WidgetKind::Slider { min, max, .. } = &w.kind else {
                return None;
            };
            Some((slider_x_of(r, *min, *max, *value), r.y + r.h / 2))
        }
        Target::SliderKnob { id } => {
            let (r, w) = widget(id)?;
            let WidgetKind::Slider { min, max, value } = &w.kind else {
                return None;
            };
            Some((slider_x_of(r, *min, *max, *value), r.y + r.h / 2))
        }
    }
}

/// Whether a list row is visible (used by the scroll planner).
fn list_item_visible(d: &Desktop, id: &str, item: &str) -> Option<(bool, Rect, bool)> {
    let (wi, xi) = d.find_widget(id)?;
    let w = &d.windows[wi];
    let x = &w.widgets[xi];
    let WidgetKind::List { items, top, .. } = &x.kind else {
        return None;
    };
    let i = items.iter().position(|s| s == item)?;
    let visible = i >= *top && i < *top + x.visible_rows();
    Some((visible, w.widget_rect(x), i >= *top))
}

/// The screen point at the centre of logical pixel `p`.
pub fn to_screen(p: (i32, i32), scale: u32) -> Point {
    let s = f64::from(scale);
    Point::new(
        f64::from(p.0) * s + (s / 2.0).floor(),
        f64::from(p.1) * s + (s / 2.0).floor(),
    )
}

/// Resolves an oracle plan into actions by running it on `desktop` (which ends in the solved
/// state). `apply` carries out one action, exactly as the environment does.
pub fn resolve_oracle(
    spec: &TaskSpec,
    desktop: &mut Desktop,
    scale: u32,
    mut apply: impl FnMut(&mut Desktop, &Action),
) -> Result<Vec<Action>, SimError> {
    let fail = |reason: String| SimError::Oracle {
        task_id: spec.id.clone(),
        reason,
    };
    let mut out = Vec::new();
    let at = |d: &Desktop, t: &Target| {
        locate(d, t)
            .map(|p| to_screen(p, scale))
            .ok_or_else(|| fail(format!("{t:?} is not on screen")))
    };
    for step in &spec.oracle {
        let actions = match step {
            OracleStep::Click { at: t } => vec![Action::Click {
                point: at(desktop, t)?,
            }],
            OracleStep::DoubleClick { at: t } => vec![Action::LeftDouble {
                point: at(desktop, t)?,
            }],
            OracleStep::RightClick { at: t } => vec![Action::RightSingle {
                point: at(desktop, t)?,
            }],
            OracleStep::Drag { from, to } => {
                let a = at(desktop, from)?;
                // The drop point is measured before the drag starts (a knob moves away).
                let b = at(desktop, to)?;
                vec![Action::Drag { from: a, to: b }]
            }
            OracleStep::Type { text } => vec![Action::Type {
                content: text.clone(),
            }],
            OracleStep::Hotkey { keys } => vec![Action::Hotkey { keys: keys.clone() }],
            OracleStep::ScrollTo { id, item } => {
                let mut acts = Vec::new();
                for _ in 0..100 {
                    let (visible, r, below) = list_item_visible(desktop, id, item)
                        .ok_or_else(|| fail(format!("no list {id} with {item}")))?;
                    if visible {
                        break;
                    }
                    let a = Action::Scroll {
                        point: Some(to_screen(r.center(), scale)),
                        direction: if below {
                            ScrollDirection::Down
                        } else {
                            ScrollDirection::Up
                        },
                    };
                    apply(desktop, &a);
                    acts.push(a);
                }
                out.extend(acts);
                continue;
            }
            OracleStep::Finished => vec![Action::Finished { content: None }],
            OracleStep::CallUser => vec![Action::CallUser],
        };
        for a in actions {
            apply(desktop, &a);
            out.push(a);
        }
    }
    Ok(out)
}

//! The desktop model: icons, windows, widgets, menus, and how input changes them.
//!
//! Everything is laid out in *logical* pixels on a 336x224 design canvas; the screen shows it
//! scaled by an integer factor (1 at 336x224, 4 at 1920x1080), so a task looks the same at every
//! size. Input arrives in screen pixels and is mapped back to logical pixels by the session.

use serde::{Deserialize, Serialize};

use crate::font;

/// Width of the logical design canvas.
pub const LOGICAL_W: i32 = 336;
/// Height of the logical design canvas.
pub const LOGICAL_H: i32 = 224;
/// Height of a window's title bar.
pub const TITLE_H: i32 = 11;
/// Height of a window's menu bar (when it has menus).
pub const MENU_H: i32 = 10;
/// Height of one row in lists, radio groups, menus and popups.
pub const ROW_H: i32 = 10;
/// Size of a desktop icon's cell.
pub const ICON_W: i32 = 44;
pub const ICON_H: i32 = 28;
/// Width of a popup (menu, context menu).
pub const POPUP_W: i32 = 64;
/// Longest text a field accepts.
pub const MAX_FIELD_LEN: usize = 48;

/// An RGB colour with the name tasks use for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Orange,
    Purple,
    Pink,
    Cyan,
    Brown,
    Gray,
    Black,
    White,
}

impl Colour {
    pub const ALL: [Colour; 12] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Orange,
        Colour::Purple,
        Colour::Pink,
        Colour::Cyan,
        Colour::Brown,
        Colour::Gray,
        Colour::Black,
        Colour::White,
    ];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 210, 40],
            Colour::Orange => [245, 140, 30],
            Colour::Purple => [140, 60, 190],
            Colour::Pink => [240, 130, 190],
            Colour::Cyan => [40, 200, 220],
            Colour::Brown => [130, 85, 40],
            Colour::Gray => [128, 128, 128],
            Colour::Black => [20, 20, 20],
            Colour::White => [250, 250, 250],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Orange => "orange",
            Colour::Purple => "purple",
            Colour::Pink => "pink",
            Colour::Cyan => "cyan",
            Colour::Brown => "brown",
            Colour::Gray => "gray",
            Colour::Black => "black",
            Colour::White => "white",
        }
    }

    /// Whether dark text reads well on this colour.
    pub fn is_light(self) -> bool {
        let [r, g, b] = self.rgb();
        u32::from(r) * 3 + u32::from(g) * 6 + u32::from(b) > 1400
    }
}

/// A rectangle in logical pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rect {
    pub x: i32,
    pub y: i32,
    pub w: i32,
    pub h: i32,
}

impl Rect {
    pub const fn new(x: i32, y: i32, w: i32, h: i32) -> Self {
        Self { x, y, w, h }
    }

    pub fn contains(&self, (px, py): (i32, i32)) -> bool {
        px >= self.x && py >= self.y && px < self.x + self.w && py < self.y + self.h
    }

    pub fn center(&self) -> (i32, i32) {
        (self.x + self.w / 2, self.y + self.h / 2)
    }

    pub fn offset(&self, dx: i32, dy: i32) -> Rect {
        Rect::new(self.x + dx, self.y + dy, self.w, self.h)
    }
}

/// What activating a button or a menu item does, beyond being recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum UiAction {
    #[default]
    Nothing,
    /// Opens (or raises) the window built from the template with this id.
    OpenWindow { template: String },
    /// Closes the window holding the control and marks it confirmed (a dialog's OK).
    Confirm,
    /// Closes the window holding the control without confirming (a dialog's Cancel).
    Cancel,
}

/// A menu item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MenuItem {
    pub label: String,
    /// A hotkey such as `ctrl+s` that activates the item while its window is on top.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortcut: Option<String>,
    #[serde(default)]
    pub action: UiAction,
}

/// A menu of a window's menu bar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Menu {
    pub title: String,
    pub items: Vec<MenuItem>,
}

/// The kinds of controls, with their state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WidgetKind {
    Label {
        text: String,
    },
    Button {
        label: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        colour: Option<Colour>,
        #[serde(default)]
        presses: u32,
        #[serde(default)]
        action: UiAction,
    },
    TextField {
        #[serde(default)]
        text: String,
        #[serde(default)]
        caret: usize,
        #[serde(default)]
        all_selected: bool,
        #[serde(default)]
        submitted: Option<String>,
    },
    Checkbox {
        label: String,
        #[serde(default)]
        checked: bool,
    },
    Radio {
        options: Vec<String>,
        #[serde(default)]
        selected: Option<usize>,
    },
    Dropdown {
        options: Vec<String>,
        #[serde(default)]
        selected: Option<usize>,
        #[serde(default)]
        open: bool,
    },
    List {
        items: Vec<String>,
        #[serde(default)]
        top: usize,
        #[serde(default)]
        selected: Option<usize>,
        #[serde(default)]
        opened: Option<usize>,
    },
    Slider {
        min: i32,
        max: i32,
        value: i32,
    },
}

/// A control in a window; `rect` is relative to the window's content area.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Widget {
    /// Unique on the desktop; tasks and evaluators refer to controls by it.
    pub id: String,
    pub rect: Rect,
    #[serde(flatten)]
    pub kind: WidgetKind,
}

impl Widget {
    fn focusable(&self) -> bool {
        !matches!(self.kind, WidgetKind::Label { .. })
    }

    /// Number of list rows visible.
    pub fn visible_rows(&self) -> usize {
        (self.rect.h / ROW_H).max(1) as usize
    }
}

/// A window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub id: String,
    pub title: String,
    pub rect: Rect,
    #[serde(default)]
    pub menus: Vec<Menu>,
    #[serde(default)]
    pub widgets: Vec<Widget>,
    /// A modal dialog: while it is on top, clicks elsewhere do nothing.
    #[serde(default)]
    pub modal: bool,
    #[serde(default)]
    pub open_menu: Option<usize>,
    /// Set when the window was closed through a [`UiAction::Confirm`] control.
    #[serde(default)]
    pub confirmed: bool,
}

impl Window {
    pub fn title_rect(&self) -> Rect {
        Rect::new(self.rect.x, self.rect.y, self.rect.w, TITLE_H)
    }

    pub fn close_rect(&self) -> Rect {
        Rect::new(
            self.rect.x + self.rect.w - TITLE_H,
            self.rect.y + 1,
            TITLE_H - 2,
            TITLE_H - 2,
        )
    }

    pub fn menu_bar_h(&self) -> i32 {
        if self.menus.is_empty() { 0 } else { MENU_H }
    }

    /// The top-left corner of the content area, in logical screen pixels.
    pub fn content_origin(&self) -> (i32, i32) {
        (
            self.rect.x + 2,
            self.rect.y + TITLE_H + self.menu_bar_h() + 2,
        )
    }

    /// A widget's rectangle in logical screen pixels.
    pub fn widget_rect(&self, w: &Widget) -> Rect {
        let (ox, oy) = self.content_origin();
        w.rect.offset(ox, oy)
    }

    /// The rectangle of menu title `i` in the menu bar.
    pub fn menu_title_rect(&self, i: usize) -> Rect {
        let mut x = self.rect.x + 2;
        for m in &self.menus[..i.min(self.menus.len())] {
            x += font::text_width(&m.title) + 8;
        }
        let w = self
            .menus
            .get(i)
            .map_or(0, |m| font::text_width(&m.title) + 8);
        Rect::new(x, self.rect.y + TITLE_H, w, MENU_H)
    }

    /// The rectangle of item `j` of the open menu `i`.
    pub fn menu_item_rect(&self, i: usize, j: usize) -> Rect {
        let t = self.menu_title_rect(i);
        Rect::new(t.x, t.y + MENU_H + j as i32 * ROW_H, POPUP_W + 24, ROW_H)
    }
}

/// What a desktop icon is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IconKind {
    /// An application: double click opens the window template `opens`.
    App { opens: String },
    /// A file: can be dragged into a folder.
    File,
    /// A folder: files dropped on it move into it.
    Folder {
        #[serde(default)]
        contents: Vec<String>,
    },
}

/// A desktop icon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icon {
    pub id: String,
    pub label: String,
    pub colour: Colour,
    /// Top-left corner of the icon's cell.
    pub x: i32,
    pub y: i32,
    #[serde(flatten)]
    pub kind: IconKind,
    /// Items of the icon's right-click menu.
    #[serde(default)]
    pub context_menu: Vec<String>,
}

impl Icon {
    pub fn rect(&self) -> Rect {
        Rect::new(self.x, self.y, ICON_W, ICON_H)
    }
}

/// An open context menu.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextMenu {
    pub icon: String,
    pub x: i32,
    pub y: i32,
    pub items: Vec<String>,
}

impl ContextMenu {
    pub fn item_rect(&self, j: usize) -> Rect {
        Rect::new(self.x, self.y + j as i32 * ROW_H, POPUP_W, ROW_H)
    }
}

/// The initial desktop of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    #[serde(default)]
    pub icons: Vec<Icon>,
    /// Open windows, bottom to top.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// Windows that icons, buttons and menu items can open.
    #[serde(default)]
    pub templates: Vec<Window>,
}

/// The whole desktop state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desktop {
    pub icons: Vec<Icon>,
    /// Open windows, bottom to top.
    pub windows: Vec<Window>,
    pub templates: Vec<Window>,
    /// Windows that were closed, in closing order (dialogs keep their final values here).
    pub closed: Vec<Window>,
    pub context_menu: Option<ContextMenu>,
    /// The focused widget's id.
    pub focus: Option<String>,
    pub selected_icon: Option<String>,
    /// Pointer position in logical pixels.
    pub pointer: (i32, i32),
    /// Modifier keys held down through `keyDown`.
    pub held: Vec<String>,
    /// What happened, for evaluators: `menu:File/Save`, `open:notes`, `context:Delete:a.txt`, ...
    pub events: Vec<String>,
}

/// A mouse button as the desktop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Button {
    Left,
    Right,
    Middle,
}

/// Where a logical point lands.
#[derive(Debug, Clone, PartialEq)]
enum Hit {
    ContextItem(usize),
    MenuItem(usize, usize, usize),
    DropdownOption(usize, usize, usize),
    Close(usize),
    MenuTitle(usize, usize),
    Title(usize),
    Widget(usize, usize),
    WindowBody(usize),
    Icon(usize),
    Desktop,
}

fn normalize_key(key: &str) -> String {
    let k = key.trim().to_ascii_lowercase();
    match k.as_str() {
        "return" => "enter".into(),
        "esc" => "escape".into(),
        "control" | "ctrlleft" | "ctrlright" => "ctrl".into(),
        "shiftleft" | "shiftright" => "shift".into(),
        "altleft" | "altright" | "option" => "alt".into(),
        "arrowleft" => "left".into(),
        "arrowright" => "right".into(),
        "arrowup" => "up".into(),
        "arrowdown" => "down".into(),
        "space" => " ".into(),
        "del" => "delete".into(),
        "cmd" | "command" | "win" | "super" | "meta" => "meta".into(),
        _ => {
            // A single printable character keeps its case (`press('A')` types "A").
            if key.chars().count() == 1 {
                key.to_string()
            } else {
                k
            }
        }
    }
}

fn is_modifier(k: &str) -> bool {
    matches!(k, "ctrl" | "shift" | "alt" | "meta")
}

impl Desktop {
    pub fn new(scene: &Scene) -> Self {
        Self {
            icons: scene.icons.clone(),
            windows: scene.windows.clone(),
            templates: scene.templates.clone(),
            closed: Vec::new(),
            context_menu: None,
            focus: None,
            selected_icon: None,
            pointer: (LOGICAL_W / 2, LOGICAL_H / 2),
            held: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Finds an open widget by id: (window index, widget index).
    pub fn find_widget(&self, id: &str) -> Option<(usize, usize)> {
        self.windows
            .iter()
            .enumerate()
            .rev()
            .find_map(|(wi, w)| w.widgets.iter().position(|x| x.id == id).map(|xi| (wi, xi)))
    }

    /// A widget by id, in an open window or else in the latest closed window holding it.
    pub fn widget(&self, id: &str) -> Option<&Widget> {
        self.windows
            .iter()
            .rev()
            .chain(self.closed.iter().rev())
            .find_map(|w| w.widgets.iter().find(|x| x.id == id))
    }

    /// A window by id, open or closed (open first).
    pub fn window(&self, id: &str) -> Option<&Window> {
        self.windows
            .iter()
            .rev()
            .chain(self.closed.iter().rev())
            .find(|w| w.id == id)
    }

    pub fn is_open(&self, id: &str) -> bool {
        self.windows.iter().any(|w| w.id == id)
    }

    pub fn icon(&self, id: &str) -> Option<&Icon> {
        self.icons.iter().find(|i| i.id == id)
    }

    fn top_modal(&self) -> Option<usize> {
        let last = self.windows.len().checked_sub(1)?;
        self.windows[last].modal.then_some(last)
    }

    fn hit(&self, p: (i32, i32)) -> Hit {
        if let Some(cm) = &self.context_menu {
            for j in 0..cm.items.len() {
                if cm.item_rect(j).contains(p) {
                    return Hit::ContextItem(j);
                }
            }
        }
        for (wi, w) in self.windows.iter().enumerate().rev() {
            if let Some(mi) = w.open_menu
                && let Some(menu) = w.menus.get(mi)
            {
                for j in 0..menu.items.len() {
                    if w.menu_item_rect(mi, j).contains(p) {
                        return Hit::MenuItem(wi, mi, j);
                    }
                }
            }
            for (xi, x) in w.widgets.iter().enumerate() {
                if let WidgetKind::Dropdown {
                    options,
                    open: true,
                    ..
                } = &x.kind
                {
                    let r = w.widget_rect(x);
                    for j in 0..options.len() {
                        let row = Rect::new(r.x, r.y + r.h + j as i32 * ROW_H, r.w, ROW_H);
                        if row.contains(p) {
                            return Hit::DropdownOption(wi, xi, j);
                        }
                    }
                }
            }
        }
        for (wi, w) in self.windows.iter().enumerate().rev() {
            if !w.rect.contains(p) {
                continue;
            }
            if w.close_rect().contains(p) {
                return Hit::Close(wi);
            }
            if w.title_rect().contains(p) {
                return Hit::Title(wi);
            }
            for mi in 0..w.menus.len() {
                if w.menu_title_rect(mi).contains(p) {
                    return Hit::MenuTitle(wi, mi);
                }
            }
            for (xi, x) in w.widgets.iter().enumerate().rev() {
                if w.widget_rect(x).contains(p) {
                    return Hit::Widget(wi, xi);
                }
            }
            return Hit::WindowBody(wi);
        }
        for (ii, icon) in self.icons.iter().enumerate().rev() {
            if icon.rect().contains(p) {
                return Hit::Icon(ii);
            }
        }
        Hit::Desktop
    }

    /// Closes every popup (menus, dropdown lists, the context menu).
    fn close_popups(&mut self) -> bool {
        let mut any = self.context_menu.take().is_some();
        for w in &mut self.windows {
            any |= w.open_menu.take().is_some();
            for x in &mut w.widgets {
                if let WidgetKind::Dropdown { open, .. } = &mut x.kind {
                    any |= *open;
                    *open = false;
                }
            }
        }
        any
    }

    fn raise(&mut self, wi: usize) -> usize {
        if wi + 1 < self.windows.len() {
            let w = self.windows.remove(wi);
            self.windows.push(w);
        }
        self.windows.len() - 1
    }

    fn close_window(&mut self, wi: usize, confirmed: bool) {
        if wi >= self.windows.len() {
            return;
        }
        let mut w = self.windows.remove(wi);
        w.confirmed = confirmed;
        w.open_menu = None;
        if let Some(f) = &self.focus
            && w.widgets.iter().any(|x| &x.id == f)
        {
            self.focus = None;
        }
        self.events.push(format!(
            "{}:{}",
            if confirmed { "confirm" } else { "close" },
            w.id
        ));
        self.closed.push(w);
    }

    fn open_template(&mut self, template: &str) {
        if let Some(wi) = self.windows.iter().position(|w| w.id == template) {
            self.raise(wi);
            return;
        }
        if let Some(t) = self.templates.iter().find(|t| t.id == template) {
            let w = t.clone();
            self.events.push(format!("open:{}", w.id));
            self.windows.push(w);
        }
    }

    fn run_action(&mut self, wi: usize, action: &UiAction) {
        match action {
            UiAction::Nothing => {}
            UiAction::OpenWindow { template } => self.open_template(template),
            UiAction::Confirm => self.close_window(wi, true),
            UiAction::Cancel => self.close_window(wi, false),
        }
    }

    /// Moves the pointer (logical pixels).
    pub fn move_to(&mut self, p: (i32, i32)) {
        self.pointer = p;
    }

    /// Clicks `count` times at `p` (a double click is `count == 2`).
    pub fn click(&mut self, p: (i32, i32), button: Button, count: u32) {
        self.pointer = p;
        for i in 0..count {
            match button {
                Button::Left => self.left_click(p, i > 0),
                Button::Right => self.right_click(p),
                Button::Middle => {}
            }
        }
    }

    fn left_click(&mut self, p: (i32, i32), repeat: bool) {
        let hit = self.hit(p);
        // A click on a popup acts on it; a click anywhere else only closes the popups.
        match hit {
            Hit::ContextItem(j) => {
                if let Some(cm) = self.context_menu.take() {
                    self.context_action(&cm, j);
                }
                self.close_popups();
                return;
            }
            Hit::MenuItem(wi, mi, j) => {
                self.close_popups();
                self.activate_menu_item(wi, mi, j);
                return;
            }
            Hit::DropdownOption(wi, xi, j) => {
                self.close_popups();
                if let WidgetKind::Dropdown { selected, .. } =
                    &mut self.windows[wi].widgets[xi].kind
                {
                    *selected = Some(j);
                }
                return;
            }
            Hit::MenuTitle(wi, _) if self.windows[wi].open_menu.is_some() => {
                self.close_popups();
                return;
            }
            _ => {
                if self.close_popups() {
                    return;
                }
            }
        }
        if let Some(top) = self.top_modal() {
            let inside = match hit {
                Hit::Close(wi)
                | Hit::Title(wi)
                | Hit::MenuTitle(wi, _)
                | Hit::Widget(wi, _)
                | Hit::WindowBody(wi) => wi == top,
                _ => false,
            };
            if !inside {
                return;
            }
        }
        match hit {
            Hit::Close(wi) => self.close_window(wi, false),
            Hit::Title(wi) | Hit::WindowBody(wi) => {
                self.raise(wi);
                self.selected_icon = None;
            }
            Hit::MenuTitle(wi, mi) => {
                let wi = self.raise(wi);
                self.windows[wi].open_menu = Some(mi);
            }
            Hit::Widget(wi, xi) => {
                let wi = self.raise(wi);
                self.selected_icon = None;
                self.widget_click(wi, xi, p, repeat);
            }
            Hit::Icon(ii) => {
                self.focus = None;
                self.selected_icon = Some(self.icons[ii].id.clone());
                if repeat {
                    self.open_icon(ii);
                }
            }
            Hit::Desktop => {
                self.focus = None;
                self.selected_icon = None;
            }
            Hit::ContextItem(_) | Hit::MenuItem(..) | Hit::DropdownOption(..) => {}
        }
    }

    fn open_icon(&mut self, ii: usize) {
        let icon = &self.icons[ii];
        match &icon.kind {
            IconKind::App { opens } => {
                let t = opens.clone();
                self.open_template(&t);
            }
            IconKind::File | IconKind::Folder { .. } => {
                self.events.push(format!("open:{}", icon.id));
            }
        }
    }

    fn context_action(&mut self, cm: &ContextMenu, j: usize) {
        let Some(item) = cm.items.get(j) else { return };
        self.events.push(format!("context:{item}:{}", cm.icon));
        let Some(ii) = self.icons.iter().position(|i| i.id == cm.icon) else {
            return;
        };
        match item.as_str() {
            "Delete" => {
                self.icons.remove(ii);
                if self.selected_icon.as_deref() == Some(cm.icon.as_str()) {
                    self.selected_icon = None;
                }
            }
            "Open" => self.open_icon(ii),
            _ => {}
        }
    }

    fn activate_menu_item(&mut self, wi: usize, mi: usize, j: usize) {
        let Some(item) = self.windows[wi].menus.get(mi).and_then(|m| m.items.get(j)) else {
            return;
        };
        let title = &self.windows[wi].menus[mi].title;
        let event = format!("menu:{title}/{}", item.label);
        let action = item.action.clone();
        self.events.push(event);
        self.run_action(wi, &action);
    }

    fn widget_click(&mut self, wi: usize, xi: usize, p: (i32, i32), repeat: bool) {
        let r = self.windows[wi].widget_rect(&self.windows[wi].widgets[xi]);
        let id = self.windows[wi].widgets[xi].id.clone();
        if self.windows[wi].widgets[xi].focusable() {
            self.focus = Some(id);
        }
        let mut action = None;
        match &mut self.windows[wi].widgets[xi].kind {
            WidgetKind::Label { .. } => {}
            WidgetKind::Button {
                presses, action: a, ..
            } => {
                *presses += 1;
                action = Some(a.clone());
            }
            WidgetKind::TextField {
                text,
                caret,
                all_selected,
                ..
            } => {
                *all_selected = false;
                let n = text.chars().count();
                let col = ((p.0 - r.x - 2 + font::ADVANCE / 2) / font::ADVANCE).max(0) as usize;
                *caret = col.min(n);
            }
            WidgetKind::Checkbox { checked, .. } => *checked = !*checked,
            WidgetKind::Radio { options, selected } => {
                let row = ((p.1 - r.y) / ROW_H) as usize;
                if row < options.len() {
                    *selected = Some(row);
                }
            }
            WidgetKind::Dropdown { open, .. } => *open = true,
            WidgetKind::List {
                items,
                top,
                selected,
                opened,
            } => {
                if p.0 < r.x + r.w - 5 {
                    let row = *top + ((p.1 - r.y) / ROW_H) as usize;
                    if row < items.len() {
                        *selected = Some(row);
                        if repeat {
                            *opened = Some(row);
                        }
                    }
                }
            }
            WidgetKind::Slider { min, max, value } => {
                *value = slider_value_at(r, *min, *max, p.0);
            }
        }
        if let Some(a) = action {
            self.run_action(wi, &a);
        }
    }

    fn right_click(&mut self, p: (i32, i32)) {
        self.close_popups();
        if self.top_modal().is_some() {
            return;
        }
        if let Hit::Icon(ii) = self.hit(p) {
            let icon = &self.icons[ii];
            self.selected_icon = Some(icon.id.clone());
            if !icon.context_menu.is_empty() {
                let n = icon.context_menu.len() as i32;
                let x = p.0.clamp(0, LOGICAL_W - POPUP_W);
                let y = p.1.min(LOGICAL_H - n * ROW_H).max(0);
                self.context_menu = Some(ContextMenu {
                    icon: icon.id.clone(),
                    x,
                    y,
                    items: icon.context_menu.clone(),
                });
            }
        }
    }

    /// Presses at `from`, moves to `to`, releases.
    pub fn drag(&mut self, from: (i32, i32), to: (i32, i32)) {
        self.pointer = to;
        let hit = self.hit(from);
        if self.close_popups() {
            return;
        }
        if let Some(top) = self.top_modal() {
            let ok = matches!(hit, Hit::Title(wi) | Hit::Widget(wi, _) if wi == top);
            if !ok {
                return;
            }
        }
        match hit {
            Hit::Title(wi) => {
                let wi = self.raise(wi);
                let w = &mut self.windows[wi];
                let nx = w.rect.x + to.0 - from.0;
                let ny = w.rect.y + to.1 - from.1;
                w.rect.x = nx.clamp(-w.rect.w + 20, LOGICAL_W - 20);
                w.rect.y = ny.clamp(0, LOGICAL_H - TITLE_H);
            }
            Hit::Widget(wi, xi) => {
                let wi = self.raise(wi);
                let r = self.windows[wi].widget_rect(&self.windows[wi].widgets[xi]);
                let id = self.windows[wi].widgets[xi].id.clone();
                if let WidgetKind::Slider { min, max, value } =
                    &mut self.windows[wi].widgets[xi].kind
                {
                    *value = slider_value_at(r, *min, *max, to.0);
                    self.focus = Some(id);
                }
            }
            Hit::Icon(ii) => {
                let target = self
                    .icons
                    .iter()
                    .enumerate()
                    .rev()
                    .find_map(|(ti, t)| (ti != ii && t.rect().contains(to)).then_some(ti));
                let over_window = self.windows.iter().any(|w| w.rect.contains(to));
                match target {
                    Some(ti)
                        if matches!(self.icons[ii].kind, IconKind::File)
                            && matches!(self.icons[ti].kind, IconKind::Folder { .. })
                            && !over_window =>
                    {
                        let file = self.icons.remove(ii);
                        let ti = if ti > ii { ti - 1 } else { ti };
                        if let IconKind::Folder { contents } = &mut self.icons[ti].kind {
                            contents.push(file.label.clone());
                        }
                        self.events
                            .push(format!("move:{}:{}", file.id, self.icons[ti].id));
                        if self.selected_icon.as_deref() == Some(file.id.as_str()) {
                            self.selected_icon = None;
                        }
                    }
                    _ if !over_window => {
                        let icon = &mut self.icons[ii];
                        icon.x = (to.0 - ICON_W / 2).clamp(0, LOGICAL_W - ICON_W);
                        icon.y = (to.1 - ICON_H / 2).clamp(0, LOGICAL_H - ICON_H);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Scrolls by `clicks` wheel notches at `p` (positive is up, as in pyautogui).
    pub fn scroll(&mut self, p: (i32, i32), clicks: i64) {
        self.pointer = p;
        if let Hit::Widget(wi, xi) = self.hit(p) {
            if self.top_modal().is_some_and(|t| t != wi) {
                return;
            }
            let rows = self.windows[wi].widgets[xi].visible_rows();
            if let WidgetKind::List { items, top, .. } = &mut self.windows[wi].widgets[xi].kind {
                let max_top = items.len().saturating_sub(rows) as i64;
                let next = (*top as i64 - clicks.clamp(-1000, 1000)).clamp(0, max_top);
                *top = next as usize;
            }
        }
    }

    pub fn key_down(&mut self, key: &str) {
        let k = normalize_key(key);
        if is_modifier(&k) {
            if !self.held.contains(&k) {
                self.held.push(k);
            }
        } else {
            let mods = self.held.clone();
            self.key_combo(&mods, &k);
        }
    }

    pub fn key_up(&mut self, key: &str) {
        let k = normalize_key(key);
        self.held.retain(|h| *h != k);
    }

    /// Presses one key with the modifiers held through `key_down`.
    pub fn press(&mut self, key: &str) {
        let k = normalize_key(key);
        if is_modifier(&k) {
            return;
        }
        let mods = self.held.clone();
        self.key_combo(&mods, &k);
    }

    /// Presses keys together (`ctrl`, `a`).
    pub fn hotkey(&mut self, keys: &[String]) {
        let keys: Vec<String> = keys.iter().map(|k| normalize_key(k)).collect();
        let mut mods: Vec<String> = self.held.clone();
        let mut main = None;
        for k in keys {
            if is_modifier(&k) {
                if !mods.contains(&k) {
                    mods.push(k);
                }
            } else {
                main = Some(k);
            }
        }
        if let Some(m) = main {
            self.key_combo(&mods, &m);
        }
    }

    /// Types text; `\n` presses enter, `\t` tab.
    pub fn type_text(&mut self, text: &str) {
        for c in text.chars() {
            match c {
                '\n' | '\r' => self.key_combo(&[], "enter"),
                '\t' => self.key_combo(&[], "tab"),
                c => self.key_combo(&[], &c.to_string()),
            }
        }
    }

    fn focused(&self) -> Option<(usize, usize)> {
        let id = self.focus.as_deref()?;
        self.find_widget(id)
    }

    fn key_combo(&mut self, mods: &[String], key: &str) {
        let ctrl = mods.iter().any(|m| m == "ctrl" || m == "meta");
        let alt = mods.iter().any(|m| m == "alt");
        let shift = mods.iter().any(|m| m == "shift");
        if ctrl || alt {
            let mut combo: Vec<&str> = Vec::new();
            if ctrl {
                combo.push("ctrl");
            }
            if alt {
                combo.push("alt");
            }
            if shift {
                combo.push("shift");
            }
            let lower = key.to_ascii_lowercase();
            combo.push(&lower);
            let combo = combo.join("+");
            if combo == "ctrl+a"
                && let Some((wi, xi)) = self.focused()
                && let WidgetKind::TextField {
                    all_selected,
                    caret,
                    text,
                    ..
                } = &mut self.windows[wi].widgets[xi].kind
            {
                *all_selected = true;
                *caret = text.chars().count();
                return;
            }
            // A menu shortcut of the top window.
            if let Some(wi) = self.windows.len().checked_sub(1) {
                let found = self.windows[wi]
                    .menus
                    .iter()
                    .enumerate()
                    .find_map(|(mi, m)| {
                        m.items
                            .iter()
                            .position(|it| {
                                it.shortcut
                                    .as_deref()
                                    .is_some_and(|s| s.eq_ignore_ascii_case(&combo))
                            })
                            .map(|j| (mi, j))
                    });
                if let Some((mi, j)) = found {
                    self.close_popups();
                    self.activate_menu_item(wi, mi, j);
                }
            }
            return;
        }
        if key == "escape" {
            if self.close_popups() {
                return;
            }
            if let Some(top) = self.top_modal() {
                self.close_window(top, false);
            }
            return;
        }
        if key == "tab" {
            self.close_popups();
            self.cycle_focus(shift);
            return;
        }
        let Some((wi, xi)) = self.focused() else {
            return;
        };
        if self.top_modal().is_some_and(|t| t != wi) {
            return;
        }
        let mut action = None;
        let rows = self.windows[wi].widgets[xi].visible_rows();
        match &mut self.windows[wi].widgets[xi].kind {
            WidgetKind::TextField {
                text,
                caret,
                all_selected,
                submitted,
            } => {
                let mut chars: Vec<char> = text.chars().collect();
                let c = (*caret).min(chars.len());
                let printable =
                    key.chars().count() == 1 && key.chars().all(|c| (' '..='~').contains(&c));
                if printable {
                    if *all_selected {
                        chars.clear();
                        *all_selected = false;
                        *caret = 0;
                    }
                    if chars.len() < MAX_FIELD_LEN {
                        let c = (*caret).min(chars.len());
                        let ch = key.chars().next().unwrap_or(' ');
                        let ch = if shift { ch.to_ascii_uppercase() } else { ch };
                        chars.insert(c, ch);
                        *caret = c + 1;
                    }
                } else {
                    match key {
                        "backspace" | "delete" if *all_selected => {
                            chars.clear();
                            *caret = 0;
                            *all_selected = false;
                        }
                        "backspace" if c > 0 => {
                            chars.remove(c - 1);
                            *caret = c - 1;
                        }
                        "delete" if c < chars.len() => {
                            chars.remove(c);
                        }
                        "left" => {
                            *caret = c.saturating_sub(1);
                            *all_selected = false;
                        }
                        "right" => {
                            *caret = (c + 1).min(chars.len());
                            *all_selected = false;
                        }
                        "home" => {
                            *caret = 0;
                            *all_selected = false;
                        }
                        "end" => {
                            *caret = chars.len();
                            *all_selected = false;
                        }
                        "enter" => {
                            *submitted = Some(chars.iter().collect());
                        }
                        _ => {}
                    }
                }
                *text = chars.into_iter().collect();
            }
            WidgetKind::Button {
                presses, action: a, ..
            } => {
                if key == "enter" || key == " " {
                    *presses += 1;
                    action = Some(a.clone());
                }
            }
            WidgetKind::Checkbox { checked, .. } => {
                if key == " " {
                    *checked = !*checked;
                }
            }
            WidgetKind::Radio { options, selected } => {
                let n = options.len();
                match key {
                    "down" | "right" if n > 0 => {
                        *selected = Some(selected.map_or(0, |s| (s + 1).min(n - 1)));
                    }
                    "up" | "left" if n > 0 => {
                        *selected = Some(selected.map_or(0, |s| s.saturating_sub(1)));
                    }
                    _ => {}
                }
            }
            WidgetKind::Dropdown {
                options,
                selected,
                open,
            } => {
                let n = options.len();
                match key {
                    "down" if n > 0 => *selected = Some(selected.map_or(0, |s| (s + 1).min(n - 1))),
                    "up" if n > 0 => *selected = Some(selected.map_or(0, |s| s.saturating_sub(1))),
                    "enter" | " " => *open = !*open,
                    _ => {}
                }
            }
            WidgetKind::List {
                items,
                top,
                selected,
                opened,
            } => {
                let n = items.len();
                match key {
                    "down" if n > 0 => *selected = Some(selected.map_or(0, |s| (s + 1).min(n - 1))),
                    "up" if n > 0 => *selected = Some(selected.map_or(0, |s| s.saturating_sub(1))),
                    "enter" => *opened = *selected,
                    _ => {}
                }
                if let Some(s) = *selected {
                    if s < *top {
                        *top = s;
                    } else if s >= *top + rows {
                        *top = s + 1 - rows;
                    }
                }
            }
            WidgetKind::Slider { min, max, value } => match key {
                "right" | "up" => *value = (*value + 1).min(*max),
                "left" | "down" => *value = (*value - 1).max(*min),
                "home" => *value = *min,
                "end" => *value = *max,
                _ => {}
            },
            WidgetKind::Label { .. } => {}
        }
        if let Some(a) = action {
            self.run_action(wi, &a);
        }
    }

    fn cycle_focus(&mut self, backwards: bool) {
        let Some(wi) = self.windows.len().checked_sub(1) else {
            return;
        };
        let ids: Vec<String> = self.windows[wi]
            .widgets
            .iter()
            .filter(|x| x.focusable())
            .map(|x| x.id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let cur = self
            .focus
            .as_ref()
            .and_then(|f| ids.iter().position(|i| i == f));
        let next = match (cur, backwards) {
            (None, false) => 0,
            (None, true) => ids.len() - 1,
            (Some(c), false) => (c + 1) % ids.len(),
            (Some(c), true) => (c + ids.len() - 1) % ids.len(),
        };
        self.focus = Some(ids[next].clone());
    }

    /// Checks the invariants every reachable state keeps; returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(f) = &self.focus
            && self.find_widget(f).is_none()
        {
            return Err(format!("focus on {f:?}, which is not in an open window"));
        }
        for w in &self.windows {
            if let Some(m) = w.open_menu
                && m >= w.menus.len()
            {
                return Err(format!(
                    "window {} has open menu {m} of {}",
                    w.id,
                    w.menus.len()
                ));
            }
            for x in &w.widgets {
                let rows = x.visible_rows();
                let ok = match &x.kind {
                    WidgetKind::TextField { text, caret, .. } => {
                        *caret <= text.chars().count() && text.chars().count() <= MAX_FIELD_LEN
                    }
                    WidgetKind::Radio { options, selected } => {
                        selected.is_none_or(|s| s < options.len())
                    }
                    WidgetKind::Dropdown {
                        options, selected, ..
                    } => selected.is_none_or(|s| s < options.len()),
                    WidgetKind::List {
                        items,
                        top,
                        selected,
                        opened,
                    } => {
                        *top <= items.len().saturating_sub(rows)
                            && selected.is_none_or(|s| s < items.len())
                            && opened.is_none_or(|s| s < items.len())
                    }
                    WidgetKind::Slider { min, max, value } => min <= value && value <= max,
                    _ => true,
                };
                if !ok {
                    return Err(format!(
                        "widget {} has an invalid state: {:?}",
                        x.id, x.kind
                    ));
                }
            }
        }
        let mut ids: Vec<&str> = self
            .windows
            .iter()
            .flat_map(|w| w.widgets.iter().map(|x| x.id.as_str()))
            .collect();
        ids.sort_unstable();
        if ids.windows(2).any(|p| p[0] == p[1]) {
            return Err("two open widgets share an id".into());
        }
        Ok(())
    }
}

/// The slider value under logical x.
pub fn slider_value_at(track: Rect, min: i32, max: i32, x: i32) -> i32 {
    let span = (track.w - 6).max(1);
    let t = (x - track.x - 3).clamp(0, span);
    min + ((t as i64 * i64::from(max - min) + i64::from(span) / 2) / i64::from(span)) as i32
}

/// The logical x of a slider value's knob centre.
pub fn slider_x_of(track: Rect, min: i32, max: i32, value: i32) -> i32 {
    let span = (track.w - 6).max(1);
    let range = (max - min).max(1);
    track.x
        + 3
        + ((i64::from(value - min) * i64::from(span) + i64::from(range) / 2) / i64::from(range))
            as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slider_positions_round_trip() {
        let track = Rect::new(10, 0, 106, 10); // span 100 px
        assert_eq!(slider_value_at(track, 0, 100, 13), 0);
        assert_eq!(slider_value_at(track, 0, 100, 113), 100);
        assert_eq!(slider_value_at(track, 0, 100, 63), 50);
        for v in 0..=100 {
            assert_eq!(
                slider_value_at(track, 0, 100, slider_x_of(track, 0, 100, v)),
                v
            );
        }
        let small = Rect::new(0, 0, 66, 10); // span 60 px, range 0..=10: 6 px per step
        assert_eq!(slider_x_of(small, 0, 10, 4), 27);
        for v in 0..=10 {
            assert_eq!(
                slider_value_at(small, 0, 10, slider_x_of(small, 0, 10, v)),
                v
            );
        }
    }

    fn field_scene() -> Desktop {
        Desktop::new(&Scene {
            icons: vec![],
            windows: vec![Window {
                id: "w".into(),
                title: "W".into(),
                rect: Rect::new(10, 10, 200, 100),
                menus: vec![],
                widgets: vec![Widget {
                    id: "f".into(),
                    rect: Rect::new(0, 0, 100, 11),
                    kind: WidgetKind::TextField {
                        text: "abc".into(),
                        caret: 0,
                        all_selected: false,
                        submitted: None,
                    },
                }],
                modal: false,
                open_menu: None,
                confirmed: false,
            }],
            templates: vec![],
        })
    }

    fn field_text(d: &Desktop) -> (String, Option<String>) {
        match &d.widget("f").expect("field").kind {
            WidgetKind::TextField {
                text, submitted, ..
            } => (text.clone(), submitted.clone()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn typing_editing_and_submitting_a_field() {
        let mut d = field_scene();
        // Content origin is (12, 23); a click right of the text puts the caret at its end.
        d.click((12 + 60, 23 + 5), Button::Left, 1);
        assert_eq!(d.focus.as_deref(), Some("f"));
        d.type_text("de");
        d.press("backspace");
        assert_eq!(field_text(&d).0, "abcd");
        d.hotkey(&["ctrl".into(), "a".into()]);
        d.type_text("Hi\n");
        assert_eq!(field_text(&d), ("Hi".into(), Some("Hi".into())));
        d.key_down("shift");
        d.press("x");
        d.key_up("shift");
        assert_eq!(field_text(&d).0, "HiX");
        d.check_invariants().expect("valid");
    }

    #[test]
    fn keys_are_normalized_like_pyautogui_names() {
        assert_eq!(normalize_key("Return"), "enter");
        assert_eq!(normalize_key("arrowleft"), "left");
        assert_eq!(normalize_key("space"), " ");
        assert_eq!(normalize_key("A"), "A");
    }
}

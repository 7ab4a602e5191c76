//! The task catalogue: families with seeded parameters, a training and a held-out split.
//!
//! Held-out tasks differ from training tasks in their labels (disjoint word pools) and their
//! layouts (windows anchored on the other side of the screen, controls stacked the other way),
//! not only in their seeds.

use std::collections::BTreeMap;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::SimError;
use crate::desktop::{
    Colour, ICON_H, ICON_W, Icon, IconKind, LOGICAL_H, LOGICAL_W, MENU_H, Menu, MenuItem, POPUP_W,
    ROW_H, Rect, Scene, TITLE_H, UiAction, Widget, WidgetKind, Window,
};
use crate::font;
use crate::task::{Check, OracleStep, Split, Target, TaskSpec};

/// Instances per family in each split.
pub const TRAIN_PER_FAMILY: usize = 16;
pub const HELDOUT_PER_FAMILY: usize = 8;
/// Instances per family and split that ids can name: an instance's seed holds its index in
/// 20 bits.
pub const MAX_INSTANCES: usize = 1 << 20;

type Generator = fn(&mut Gen) -> Built;

/// The task families: name and generator.
const FAMILIES: &[(&str, Generator)] = &[
    ("colour_button", colour_button),
    ("label_button", label_button),
    ("type_submit", type_submit),
    ("fill_form", fill_form),
    ("checkboxes", checkboxes),
    ("radio", radio),
    ("dropdown", dropdown),
    ("menu", menu),
    ("hotkey", hotkey),
    ("scroll_list", scroll_list),
    ("slider", slider),
    ("drag_file", drag_file),
    ("dialog", dialog),
    ("open_icon", open_icon),
    ("context_delete", context_delete),
    ("clear_and_type", clear_and_type),
    ("infeasible", infeasible),
];

/// Every task of the simulated desktop, generated deterministically.
#[derive(Debug, Clone)]
pub struct Catalogue {
    train: Vec<TaskSpec>,
    heldout: Vec<TaskSpec>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Self::generate(TRAIN_PER_FAMILY, HELDOUT_PER_FAMILY)
    }
}

impl Catalogue {
    /// Generates `train_n` training and `heldout_n` held-out instances of every family.
    pub fn generate(train_n: usize, heldout_n: usize) -> Self {
        let mut train = Vec::new();
        let mut heldout = Vec::new();
        for (fi, (family, gen_fn)) in FAMILIES.iter().enumerate() {
            for (split, n, out) in [
                (Split::Train, train_n, &mut train),
                (Split::Heldout, heldout_n, &mut heldout),
            ] {
                for index in 0..n {
                    out.push(build(fi, family, *gen_fn, split, index));
                }
            }
        }
        Self { train, heldout }
    }

    /// The family names.
    pub fn families() -> Vec<&'static str> {
        FAMILIES.iter().map(|f| f.0).collect()
    }

    pub fn train_specs(&self) -> &[TaskSpec] {
        &self.train
    }

    pub fn heldout_specs(&self) -> &[TaskSpec] {
        &self.heldout
    }

    /// The training split as trainer tasks.
    pub fn train(&self) -> Vec<arpo_core::Task> {
        self.train.iter().map(TaskSpec::to_task).collect()
    }

    /// The held-out split as trainer tasks.
    pub fn heldout(&self) -> Vec<arpo_core::Task> {
        self.heldout.iter().map(TaskSpec::to_task).collect()
    }

    /// Every task, training first.
    pub fn all(&self) -> Vec<arpo_core::Task> {
        self.train
            .iter()
            .chain(&self.heldout)
            .map(TaskSpec::to_task)
            .collect()
    }

    /// A task spec by id.
    pub fn spec(&self, id: &str) -> Result<&TaskSpec, SimError> {
        self.train
            .iter()
            .chain(&self.heldout)
            .find(|s| s.id == id)
            .ok_or_else(|| SimError::UnknownTask {
                task_id: id.to_string(),
            })
    }

    /// A task by id: one of this catalogue's, or any other instance of a family and split,
    /// built on demand (`sim-colour_button-train-050` is the 51st training-distribution
    /// instance, the same task whatever size of catalogue generated it).
    pub fn task(&self, id: &str) -> Result<arpo_core::Task, SimError> {
        match self.spec(id) {
            Ok(spec) => Ok(spec.to_task()),
            Err(e) => Self::instance(id).map(|s| s.to_task()).ok_or(e),
        }
    }

    /// The instance an id names (`sim-<family>-<train|heldout>-<index>`), built on demand;
    /// `None` for an id of no family or split, or an index past [`MAX_INSTANCES`].
    pub fn instance(id: &str) -> Option<TaskSpec> {
        let rest = id.strip_prefix("sim-")?;
        let (rest, index) = rest.rsplit_once('-')?;
        let (family, split) = rest.rsplit_once('-')?;
        let split = match split {
            "train" => Split::Train,
            "heldout" => Split::Heldout,
            _ => return None,
        };
        if index.len() < 3 || !index.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let index: usize = index.parse().ok()?;
        if index >= MAX_INSTANCES {
            return None;
        }
        let (fi, (name, gen_fn)) = FAMILIES.iter().enumerate().find(|(_, f)| f.0 == family)?;
        let spec = build(fi, name, *gen_fn, split, index);
        (spec.id == id).then_some(spec)
    }

    /// OSWorld-style task JSON for one spec.
    pub fn osworld_json(spec: &TaskSpec) -> serde_json::Value {
        let evaluator = if spec.infeasible {
            serde_json::json!({ "func": "infeasible" })
        } else {
            // The guest serves the live score as a file. A `vm_file` getter gives the local copy's
            // path (OSWorld's `exact_match` would compare that path), so the file's lines are
            // checked with OSWorld's `check_list` (regular expressions searched in each line).
            serde_json::json!({
                "func": "check_list",
                "result": { "type": "vm_file", "path": crate::SCORE_FILE, "dest": "sim_score.txt" },
                "expected": { "type": "rule", "rules": { "expect": ["^1\\s*$"], "unexpect": [] } }
            })
        };
        serde_json::json!({
            "id": spec.id,
            "snapshot": "sim",
            "instruction": spec.instruction,
            "source": "arpo-env-sim",
            "config": [ { "type": "sim", "parameters": { "task_id": spec.id, "spec": spec } } ],
            "trajectory": "trajectories/",
            "related_apps": ["sim"],
            "evaluator": evaluator,
            "proxy": false,
            "fixed_ip": false,
            "possibility_of_env_change": "low"
        })
    }

    /// OSWorld's index of one split: `{family: [ids]}`.
    pub fn index(specs: &[TaskSpec]) -> BTreeMap<String, Vec<String>> {
        let mut idx: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in specs {
            idx.entry(s.family.clone()).or_default().push(s.id.clone());
        }
        idx
    }
}

fn build(fi: usize, family: &str, gen_fn: Generator, split: Split, index: usize) -> TaskSpec {
    let split_bit = match split {
        Split::Train => 0u64,
        Split::Heldout => 1u64,
    };
    let seed = 0x5EED_0000_0000u64 ^ ((fi as u64) << 24) ^ (split_bit << 20) ^ index as u64;
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
        split,
        index,
    };
    let b = gen_fn(&mut g);
    let mut oracle = b.oracle;
    oracle.push(if b.infeasible {
        OracleStep::CallUser
    } else {
        OracleStep::Finished
    });
    TaskSpec {
        id: format!("sim-{family}-{}-{index:03}", split.as_str()),
        family: family.to_string(),
        split,
        instruction: b.instruction,
        scene: b.scene,
        checks: b.checks,
        infeasible: b.infeasible,
        oracle,
    }
}

/// What a family generator returns.
struct Built {
    instruction: String,
    scene: Scene,
    checks: Vec<Check>,
    oracle: Vec<OracleStep>,
    infeasible: bool,
}

struct Gen {
    rng: ChaCha8Rng,
    split: Split,
    index: usize,
}

impl Gen {
    fn held(&self) -> bool {
        self.split == Split::Heldout
    }

    /// The train or held-out pool.
    fn pool<'a, T>(&self, train: &'a [T], heldout: &'a [T]) -> &'a [T] {
        if self.held() { heldout } else { train }
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items
            .choose(&mut self.rng)
            .cloned()
            .unwrap_or_else(|| items[0].clone())
    }

    fn sample<T: Clone>(&mut self, items: &[T], n: usize) -> Vec<T> {
        let mut v: Vec<T> = items.choose_multiple(&mut self.rng, n).cloned().collect();
        v.shuffle(&mut self.rng);
        v
    }

    fn range(&mut self, lo: i32, hi: i32) -> i32 {
        if hi <= lo {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        }
    }

    /// A window rectangle for `content_w` x `content_h` of content: training windows sit in the
    /// top-left area, held-out ones are anchored bottom-right.
    fn window_rect(&mut self, content_w: i32, content_h: i32, menus: bool) -> Rect {
        let w = content_w + 4;
        let h = content_h + TITLE_H + if menus { MENU_H } else { 0 } + 4;
        let max_x = LOGICAL_W - 2 - w;
        let max_y = LOGICAL_H - 2 - h;
        let (x, y) = if self.held() {
            (
                self.range((max_x - 50).max(2), max_x),
                self.range((max_y - 30).max(2), max_y),
            )
        } else {
            (self.range(2, 50.min(max_x)), self.range(2, 30.min(max_y)))
        };
        Rect::new(x, y, w, h)
    }
}

// ------------------------------------------------------------------ pools

const COLOURS_TRAIN: &[Colour] = &[
    Colour::Red,
    Colour::Green,
    Colour::Blue,
    Colour::Yellow,
    Colour::Orange,
    Colour::Purple,
];
const COLOURS_ALL: &[Colour] = &[
    Colour::Red,
    Colour::Green,
    Colour::Blue,
    Colour::Yellow,
    Colour::Orange,
    Colour::Purple,
    Colour::Pink,
    Colour::Cyan,
    Colour::Brown,
    Colour::Black,
];
const COLOURS_HELDOUT: &[Colour] = &[Colour::Pink, Colour::Cyan, Colour::Brown, Colour::Black];

const BUTTONS_T: &[&str] = &[
    "Save", "Open", "Print", "Share", "Export", "Reload", "Upload", "Sync", "Copy", "Paste",
    "Undo", "Apply", "Search", "Send",
];
const BUTTONS_H: &[&str] = &[
    "Close", "Merge", "Rename", "Archive", "Import", "Filter", "Sort", "Zoom", "Lock", "Pin",
    "Clear", "Reset",
];
const NAMES_T: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
];
const NAMES_H: &[&str] = &[
    "mallory", "oscar", "peggy", "trent", "victor", "wendy", "zoe", "yuri",
];
const CITIES_T: &[&str] = &[
    "Paris", "Lima", "Oslo", "Rome", "Cairo", "Tokyo", "Quito", "Dakar",
];
const CITIES_H: &[&str] = &[
    "Hanoi", "Minsk", "Sofia", "Bern", "Delhi", "Accra", "Riga", "Seoul",
];
const WORDS_T: &[&str] = &[
    "apple", "river", "stone", "cloud", "piano", "tiger", "maple", "ocean", "lemon", "amber",
];
const WORDS_H: &[&str] = &[
    "cedar", "falcon", "glass", "harbor", "ivory", "jungle", "koala", "meadow",
];
const FIELDS_T: &[&str] = &["Name", "Title", "Tag", "Note", "Code"];
const FIELDS_H: &[&str] = &["Alias", "Label", "Topic", "Memo", "Key"];
const CHECKS_T: &[&str] = &[
    "Wi-Fi",
    "Bluetooth",
    "Sound",
    "Updates",
    "Backups",
    "Alerts",
];
const CHECKS_H: &[&str] = &[
    "Camera",
    "Location",
    "Cookies",
    "Autoplay",
    "Telemetry",
    "Hotspot",
];
const RADIO_T: &[(&str, &[&str])] = &[
    ("Size", &["Small", "Medium", "Large", "Huge"]),
    ("Speed", &["Slow", "Normal", "Fast"]),
    ("Mode", &["Light", "Dark", "Auto"]),
];
const RADIO_H: &[(&str, &[&str])] = &[
    ("Quality", &["Low", "Mid", "High", "Ultra"]),
    ("Align", &["Left", "Center", "Right"]),
    ("Units", &["Metric", "Imperial", "Nautical"]),
];
const DROPDOWN_T: &[(&str, &[&str])] = &[
    ("Fruit", &["Apple", "Banana", "Cherry", "Grape", "Mango"]),
    ("Drink", &["Tea", "Coffee", "Juice", "Water"]),
    ("Sport", &["Tennis", "Golf", "Rugby", "Chess", "Polo"]),
];
const DROPDOWN_H: &[(&str, &[&str])] = &[
    ("Animal", &["Cat", "Dog", "Horse", "Otter", "Panda"]),
    ("Language", &["Rust", "Python", "Go", "Java", "Ruby"]),
    ("Planet", &["Mars", "Venus", "Saturn", "Pluto"]),
];
const MENUS_T: &[(&str, &[(&str, &str)])] = &[
    (
        "File",
        &[
            ("New", "ctrl+n"),
            ("Open", "ctrl+o"),
            ("Save", "ctrl+s"),
            ("Print", "ctrl+p"),
        ],
    ),
    (
        "Edit",
        &[
            ("Undo", "ctrl+z"),
            ("Cut", "ctrl+x"),
            ("Copy", "ctrl+c"),
            ("Paste", "ctrl+v"),
        ],
    ),
    (
        "View",
        &[
            ("Zoom In", "ctrl+e"),
            ("Zoom Out", "ctrl+r"),
            ("Reset", "ctrl+0"),
        ],
    ),
];
const MENUS_H: &[(&str, &[(&str, &str)])] = &[
    (
        "Tools",
        &[
            ("Options", "ctrl+t"),
            ("Macros", "ctrl+m"),
            ("Spell", "ctrl+l"),
        ],
    ),
    (
        "Insert",
        &[
            ("Image", "ctrl+g"),
            ("Table", "ctrl+j"),
            ("Link", "ctrl+k"),
            ("Chart", "ctrl+h"),
        ],
    ),
    (
        "Format",
        &[
            ("Bold", "ctrl+b"),
            ("Italic", "ctrl+i"),
            ("Underline", "ctrl+u"),
        ],
    ),
];
const LIST_T: &[&str] = &["photo", "report", "invoice", "letter", "sketch", "budget"];
const LIST_H: &[&str] = &["track", "album", "podcast", "demo", "mix", "remix"];
const SLIDERS_T: &[&str] = &["Volume", "Brightness", "Speed"];
const SLIDERS_H: &[&str] = &["Contrast", "Balance", "Zoom"];
const FILES_T: &[&str] = &["notes", "todo", "budget", "draft", "plan", "memo"];
const FILES_H: &[&str] = &["essay", "invoice", "recipe", "poem", "lyrics", "ledger"];
const FOLDERS_T: &[&str] = &["Work", "Home", "Misc"];
const FOLDERS_H: &[&str] = &["Archive", "Music", "Photos"];
const APPS_T: &[(&str, Colour)] = &[
    ("Notes", Colour::Yellow),
    ("Mail", Colour::Blue),
    ("Paint", Colour::Red),
    ("Chat", Colour::Green),
];
const APPS_H: &[(&str, Colour)] = &[
    ("Clock", Colour::Orange),
    ("Maps", Colour::Cyan),
    ("Music", Colour::Purple),
    ("Games", Colour::Pink),
];

// ------------------------------------------------------------------ builders

fn widget(id: impl Into<String>, rect: Rect, kind: WidgetKind) -> Widget {
    Widget {
        id: id.into(),
        rect,
        kind,
    }
}

fn label(id: impl Into<String>, x: i32, y: i32, text: &str) -> Widget {
    widget(
        id,
        Rect::new(x, y, font::text_width(text) + 1, 11),
        WidgetKind::Label { text: text.into() },
    )
}

fn button(
    id: impl Into<String>,
    rect: Rect,
    text: &str,
    colour: Option<Colour>,
    action: UiAction,
) -> Widget {
    widget(
        id,
        rect,
        WidgetKind::Button {
            label: text.into(),
            colour,
            presses: 0,
            action,
        },
    )
}

fn field(id: impl Into<String>, rect: Rect, text: &str) -> Widget {
    let n = text.chars().count();
    widget(
        id,
        rect,
        WidgetKind::TextField {
            text: text.into(),
            caret: n,
            all_selected: false,
            submitted: None,
        },
    )
}

fn window(id: &str, title: &str, rect: Rect, widgets: Vec<Widget>) -> Window {
    Window {
        id: id.into(),
        title: title.into(),
        rect,
        menus: vec![],
        widgets,
        modal: false,
        open_menu: None,
        confirmed: false,
    }
}

fn scene(windows: Vec<Window>) -> Scene {
    Scene {
        icons: vec![],
        windows,
        templates: vec![],
    }
}

fn click(t: Target) -> OracleStep {
    OracleStep::Click { at: t }
}

fn wid(id: &str) -> Target {
    Target::Widget { id: id.into() }
}

/// Lays out boxes of the given sizes: a row (wrapping) for training tasks, a column for
/// held-out ones. Returns positions and the content size.
fn arrange(g: &Gen, sizes: &[(i32, i32)], gap: i32) -> (Vec<(i32, i32)>, i32, i32) {
    let mut pos = Vec::new();
    let (mut x, mut y, mut row_h, mut max_w) = (4, 4, 0, 0);
    for &(w, h) in sizes {
        if g.held() {
            pos.push((6, y));
            y += h + gap;
            max_w = max_w.max(6 + w);
        } else {
            if x + w > 200 && x > 4 {
                x = 4;
                y += row_h + gap;
                row_h = 0;
            }
            pos.push((x, y));
            x += w + gap;
            row_h = row_h.max(h);
            max_w = max_w.max(x);
        }
    }
    let content_h = if g.held() { y + 2 } else { y + row_h + 6 };
    (pos, max_w + 6, content_h)
}

// ------------------------------------------------------------------ families

fn buttons_task(g: &mut Gen, coloured: bool) -> Built {
    let n = g.range(3, 5) as usize;
    let (labels, colours, target): (Vec<String>, Vec<Option<Colour>>, usize) = if coloured {
        let pool = g.pool(COLOURS_TRAIN, COLOURS_HELDOUT);
        let wanted = g.pick(pool);
        let mut others: Vec<Colour> = COLOURS_ALL
            .iter()
            .copied()
            .filter(|c| *c != wanted)
            .collect();
        others.shuffle(&mut g.rng);
        let mut cs = vec![wanted];
        cs.extend(others.into_iter().take(n - 1));
        cs.shuffle(&mut g.rng);
        let t = cs.iter().position(|c| *c == wanted).unwrap_or(0);
        (
            vec![String::new(); n],
            cs.into_iter().map(Some).collect(),
            t,
        )
    } else {
        let words = g.sample(g.pool(BUTTONS_T, BUTTONS_H), n);
        let t = g.range(0, n as i32 - 1) as usize;
        (
            words.iter().map(|s| s.to_string()).collect(),
            vec![None; n],
            t,
        )
    };
    let sizes: Vec<(i32, i32)> = labels
        .iter()
        .map(|l| {
            if coloured {
                if g.held() { (34, 14) } else { (26, 18) }
            } else {
                (font::text_width(l) + 12, 15)
            }
        })
        .collect();
    let (pos, cw, ch) = arrange(g, &sizes, 8);
    let ids: Vec<String> = (0..n).map(|i| format!("button{i}")).collect();
    let widgets: Vec<Widget> = (0..n)
        .map(|i| {
            button(
                ids[i].clone(),
                Rect::new(pos[i].0, pos[i].1, sizes[i].0, sizes[i].1),
                &labels[i],
                colours[i],
                UiAction::Nothing,
            )
        })
        .collect();
    let instruction = match colours[target] {
        Some(c) => format!("Click the {} button.", c.name()),
        None => format!("Click the \"{}\" button.", labels[target]),
    };
    let title = if g.held() { "Panel" } else { "Buttons" };
    let rect = g.window_rect(cw, ch, false);
    let mut checks = vec![Check::Pressed {
        widget: ids[target].clone(),
    }];
    checks.extend(
        ids.iter()
            .enumerate()
            .filter(|(i, _)| *i != target)
            .map(|(_, id)| Check::NotPressed { widget: id.clone() }),
    );
    Built {
        instruction,
        scene: scene(vec![window("app", title, rect, widgets)]),
        checks,
        oracle: vec![click(wid(&ids[target]))],
        infeasible: false,
    }
}

fn colour_button(g: &mut Gen) -> Built {
    buttons_task(g, true)
}

fn label_button(g: &mut Gen) -> Built {
    buttons_task(g, false)
}

/// A labelled field: label left of the field (training) or above it (held-out).
fn labelled_field(g: &Gen, id: &str, text: &str, y: i32, initial: &str) -> (Vec<Widget>, i32) {
    if g.held() {
        (
            vec![
                label(format!("{id}_label"), 4, y, &format!("{text}:")),
                field(id, Rect::new(4, y + 10, 110, 11), initial),
            ],
            y + 25,
        )
    } else {
        (
            vec![
                label(format!("{id}_label"), 4, y + 2, &format!("{text}:")),
                field(id, Rect::new(44, y, 110, 11), initial),
            ],
            y + 16,
        )
    }
}

fn type_submit(g: &mut Gen) -> Built {
    let name = g.pick(g.pool(FIELDS_T, FIELDS_H));
    let word = g.pick(g.pool(WORDS_T, WORDS_H));
    let (widgets, h) = labelled_field(g, "field", name, 4, "");
    let rect = g.window_rect(164, h + 4, false);
    Built {
        instruction: format!("Type \"{word}\" into the {name} field and press Enter."),
        scene: scene(vec![window("app", "Input", rect, widgets)]),
        checks: vec![Check::Submitted {
            widget: "field".into(),
            text: word.into(),
        }],
        oracle: vec![
            click(wid("field")),
            OracleStep::Type {
                text: format!("{word}\n"),
            },
        ],
        infeasible: false,
    }
}

fn fill_form(g: &mut Gen) -> Built {
    let name = g.pick(g.pool(NAMES_T, NAMES_H));
    let city = g.pick(g.pool(CITIES_T, CITIES_H));
    let (labels, values): ([&str; 3], [String; 3]) = if g.held() {
        let phone = format!("555-{:04}", g.range(0, 9999));
        (
            ["User", "Phone", "Town"],
            [name.to_string(), phone, city.to_string()],
        )
    } else {
        let email = format!("{name}@mail.org");
        (
            ["Name", "Email", "City"],
            [name.to_string(), email, city.to_string()],
        )
    };
    let mut widgets = Vec::new();
    let mut y = 4;
    let ids = ["f0", "f1", "f2"];
    for i in 0..3 {
        let (ws, ny) = labelled_field(g, ids[i], labels[i], y, "");
        widgets.extend(ws);
        y = ny;
    }
    let submit_x = if g.held() { 4 } else { 108 };
    widgets.push(button(
        "submit",
        Rect::new(submit_x, y + 2, 46, 14),
        "Submit",
        None,
        UiAction::Nothing,
    ));
    let rect = g.window_rect(164, y + 20, false);
    let mut checks: Vec<Check> = (0..3)
        .map(|i| Check::Text {
            widget: ids[i].into(),
            text: values[i].clone(),
        })
        .collect();
    checks.push(Check::Pressed {
        widget: "submit".into(),
    });
    let mut oracle = Vec::new();
    for i in 0..3 {
        oracle.push(click(wid(ids[i])));
        oracle.push(OracleStep::Type {
            text: values[i].clone(),
        });
    }
    oracle.push(click(wid("submit")));
    Built {
        instruction: format!(
            "Fill in the form: {} \"{}\", {} \"{}\", {} \"{}\", then click Submit.",
            labels[0], values[0], labels[1], values[1], labels[2], values[2]
        ),
        scene: scene(vec![window("app", "Form", rect, widgets)]),
        checks,
        oracle,
        infeasible: false,
    }
}

fn checkboxes(g: &mut Gen) -> Built {
    let n = g.range(4, 5) as usize;
    let names = g.sample(g.pool(CHECKS_T, CHECKS_H), n);
    let initial: Vec<bool> = (0..n).map(|_| g.rng.random_bool(0.5)).collect();
    let mut wanted: Vec<bool> = (0..n).map(|_| g.rng.random_bool(0.5)).collect();
    if !wanted.iter().any(|w| *w) {
        let k = g.range(0, n as i32 - 1) as usize;
        wanted[k] = true;
    }
    if wanted == initial {
        let k = g.range(0, n as i32 - 1) as usize;
        wanted[k] = !wanted[k];
        if !wanted.iter().any(|w| *w) {
            wanted[(k + 1) % n] = true;
        }
    }
    let mut widgets = Vec::new();
    for i in 0..n {
        let (x, y) = if g.held() {
            (4 + (i % 2) as i32 * 80, 4 + (i / 2) as i32 * 14)
        } else {
            (4, 4 + i as i32 * 13)
        };
        widgets.push(widget(
            format!("cb{i}"),
            Rect::new(x, y, 74, 10),
            WidgetKind::Checkbox {
                label: names[i].to_string(),
                checked: initial[i],
            },
        ));
    }
    let ch = if g.held() {
        4 + n.div_ceil(2) as i32 * 14 + 4
    } else {
        4 + n as i32 * 13 + 4
    };
    let rect = g.window_rect(if g.held() { 164 } else { 90 }, ch, false);
    let on: Vec<&str> = (0..n).filter(|i| wanted[*i]).map(|i| names[i]).collect();
    let checks = (0..n)
        .map(|i| Check::Checked {
            widget: format!("cb{i}"),
            checked: wanted[i],
        })
        .collect();
    let oracle = (0..n)
        .filter(|i| wanted[*i] != initial[*i])
        .map(|i| click(wid(&format!("cb{i}"))))
        .collect();
    let list = join_words(&on);
    Built {
        instruction: format!(
            "Make sure that only {list} {} checked.",
            if on.len() == 1 { "is" } else { "are" }
        ),
        scene: scene(vec![window("app", "Settings", rect, widgets)]),
        checks,
        oracle,
        infeasible: false,
    }
}

fn join_words(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [a] => format!("\"{a}\""),
        _ => {
            let head: Vec<String> = words[..words.len() - 1]
                .iter()
                .map(|w| format!("\"{w}\""))
                .collect();
            format!("{} and \"{}\"", head.join(", "), words[words.len() - 1])
        }
    }
}

fn radio(g: &mut Gen) -> Built {
    let (group, options) = g.pick(g.pool(RADIO_T, RADIO_H));
    let n = options.len();
    let target = g.range(0, n as i32 - 1) as usize;
    let initial = if g.rng.random_bool(0.5) {
        None
    } else {
        Some((target + g.range(1, n as i32 - 1) as usize) % n)
    };
    let (lx, ly, rx, ry) = if g.held() {
        (4, 4, 4, 16)
    } else {
        (4, 4, 50, 4)
    };
    let widgets = vec![
        label("group_label", lx, ly, &format!("{group}:")),
        widget(
            "group",
            Rect::new(rx, ry, 70, n as i32 * ROW_H),
            WidgetKind::Radio {
                options: options.iter().map(|s| s.to_string()).collect(),
                selected: initial,
            },
        ),
    ];
    let rect = g.window_rect(rx + 76, ry + n as i32 * ROW_H + 6, false);
    Built {
        instruction: format!("Select \"{}\" for {group}.", options[target]),
        scene: scene(vec![window("app", "Options", rect, widgets)]),
        checks: vec![Check::Radio {
            widget: "group".into(),
            option: options[target].into(),
        }],
        oracle: vec![click(Target::RadioOption {
            id: "group".into(),
            option: options[target].into(),
        })],
        infeasible: false,
    }
}

fn dropdown_widget(id: &str, rect: Rect, options: &[&str], selected: Option<usize>) -> Widget {
    widget(
        id,
        rect,
        WidgetKind::Dropdown {
            options: options.iter().map(|s| s.to_string()).collect(),
            selected,
            open: false,
        },
    )
}

fn dropdown(g: &mut Gen) -> Built {
    let (name, options) = g.pick(g.pool(DROPDOWN_T, DROPDOWN_H));
    let n = options.len();
    let target = g.range(0, n as i32 - 1) as usize;
    let initial = if g.rng.random_bool(0.5) {
        None
    } else {
        Some((target + g.range(1, n as i32 - 1) as usize) % n)
    };
    let (lx, ly, dx, dy) = if g.held() {
        (4, 4, 4, 15)
    } else {
        (4, 6, 60, 4)
    };
    let widgets = vec![
        label("dd_label", lx, ly, &format!("{name}:")),
        dropdown_widget("dd", Rect::new(dx, dy, 70, 11), options, initial),
    ];
    // Leave room below for the open list.
    let rect = g.window_rect(dx + 76, dy + 11 + n as i32 * ROW_H + 4, false);
    Built {
        instruction: format!("Choose \"{}\" in the {name} drop-down.", options[target]),
        scene: scene(vec![window("app", "Choice", rect, widgets)]),
        checks: vec![Check::Dropdown {
            widget: "dd".into(),
            option: options[target].into(),
        }],
        oracle: vec![
            click(wid("dd")),
            click(Target::DropdownOption {
                id: "dd".into(),
                option: options[target].into(),
            }),
        ],
        infeasible: false,
    }
}

fn menus_of(g: &Gen) -> Vec<Menu> {
    g.pool(MENUS_T, MENUS_H)
        .iter()
        .map(|(title, items)| Menu {
            title: title.to_string(),
            items: items
                .iter()
                .map(|(l, s)| MenuItem {
                    label: l.to_string(),
                    shortcut: Some(s.to_string()),
                    action: UiAction::Nothing,
                })
                .collect(),
        })
        .collect()
}

fn menu_window(g: &mut Gen, title: &str) -> (Window, Vec<Menu>) {
    let menus = menus_of(g);
    // Room for the widest open menu below the bar.
    let content_w = 170;
    let content_h = 4 * ROW_H + 20;
    let mut rect = g.window_rect(content_w, content_h, true);
    rect.x = rect.x.clamp(2, LOGICAL_W - 2 - 3 * 50 - POPUP_W - 24);
    let mut w = window(
        "app",
        title,
        rect,
        vec![label("doc", 4, 4, "Untitled document")],
    );
    w.menus = menus.clone();
    (w, menus)
}

fn menu(g: &mut Gen) -> Built {
    let (w, menus) = menu_window(g, "Editor");
    let m = g.pick(&menus);
    let item = g.pick(&m.items);
    Built {
        instruction: format!("Use the menu bar to choose {} > {}.", m.title, item.label),
        scene: scene(vec![w]),
        checks: vec![Check::Events {
            prefix: "menu:".into(),
            expected: vec![format!("menu:{}/{}", m.title, item.label)],
        }],
        oracle: vec![
            click(Target::MenuTitle {
                window: "app".into(),
                menu: m.title.clone(),
            }),
            click(Target::MenuItem {
                window: "app".into(),
                menu: m.title.clone(),
                item: item.label.clone(),
            }),
        ],
        infeasible: false,
    }
}

fn hotkey(g: &mut Gen) -> Built {
    let (w, menus) = menu_window(g, "Writer");
    let m = g.pick(&menus);
    let item = g.pick(&m.items);
    let shortcut = item.shortcut.clone().unwrap_or_default();
    Built {
        instruction: format!(
            "Press the keyboard shortcut {} to run {} > {}.",
            shortcut.replace("ctrl", "Ctrl"),
            m.title,
            item.label
        ),
        scene: scene(vec![w]),
        checks: vec![Check::Events {
            prefix: "menu:".into(),
            expected: vec![format!("menu:{}/{}", m.title, item.label)],
        }],
        oracle: vec![OracleStep::Hotkey {
            keys: shortcut.split('+').map(str::to_string).collect(),
        }],
        infeasible: false,
    }
}

fn scroll_list(g: &mut Gen) -> Built {
    let stem = g.pick(g.pool(LIST_T, LIST_H));
    let (n, rows) = if g.held() { (30, 5) } else { (24, 6) };
    let ext = if g.held() { "mp3" } else { "png" };
    let items: Vec<String> = (1..=n).map(|i| format!("{stem}_{i:02}.{ext}")).collect();
    let target = g.range(rows + 2, n - 1) as usize;
    let widgets = vec![widget(
        "list",
        Rect::new(4, 4, 110, rows * ROW_H),
        WidgetKind::List {
            items: items.clone(),
            top: 0,
            selected: None,
            opened: None,
        },
    )];
    let rect = g.window_rect(120, rows * ROW_H + 8, false);
    Built {
        instruction: format!(
            "Open \"{}\" from the list (scroll to it and double-click it).",
            items[target]
        ),
        scene: scene(vec![window("app", "Files", rect, widgets)]),
        checks: vec![Check::ListOpened {
            widget: "list".into(),
            item: items[target].clone(),
        }],
        oracle: vec![
            OracleStep::ScrollTo {
                id: "list".into(),
                item: items[target].clone(),
            },
            OracleStep::DoubleClick {
                at: Target::ListItem {
                    id: "list".into(),
                    item: items[target].clone(),
                },
            },
        ],
        infeasible: false,
    }
}

fn slider(g: &mut Gen) -> Built {
    let name = g.pick(g.pool(SLIDERS_T, SLIDERS_H));
    let (max, track_w) = if g.held() { (20, 126) } else { (10, 106) };
    let target = g.range(0, max);
    let initial = (target + g.range(1, max)) % (max + 1);
    let (lx, ly, sx, sy) = if g.held() {
        (4, 4, 4, 15)
    } else {
        (4, 6, 64, 4)
    };
    let widgets = vec![
        label("slider_label", lx, ly, &format!("{name}:")),
        widget(
            "slider",
            Rect::new(sx, sy, track_w, 11),
            WidgetKind::Slider {
                min: 0,
                max,
                value: initial,
            },
        ),
    ];
    let rect = g.window_rect(sx + track_w + 22, sy + 16, false);
    Built {
        instruction: format!("Set the {name} slider to {target}."),
        scene: scene(vec![window("app", "Levels", rect, widgets)]),
        checks: vec![Check::Slider {
            widget: "slider".into(),
            value: target,
        }],
        oracle: vec![OracleStep::Drag {
            from: Target::SliderKnob {
                id: "slider".into(),
            },
            to: Target::SliderValue {
                id: "slider".into(),
                value: target,
            },
        }],
        infeasible: false,
    }
}

/// Desktop icon positions: a column on the left (training) or a row along the bottom (held-out).
fn icon_slots(g: &Gen, n: usize) -> Vec<(i32, i32)> {
    (0..n as i32)
        .map(|i| {
            if g.held() {
                (8 + i * (ICON_W + 8), LOGICAL_H - ICON_H - 8)
            } else {
                (4, 4 + i * (ICON_H + 6))
            }
        })
        .collect()
}

fn drag_file(g: &mut Gen) -> Built {
    let nf = g.range(2, 3) as usize;
    let files = g.sample(g.pool(FILES_T, FILES_H), nf);
    let folders = g.sample(g.pool(FOLDERS_T, FOLDERS_H), 2);
    let mut slots = icon_slots(g, nf + 2);
    slots.shuffle(&mut g.rng);
    let mut icons = Vec::new();
    for (i, f) in files.iter().enumerate() {
        icons.push(Icon {
            id: format!("file{i}"),
            label: f.to_string(),
            colour: Colour::ALL[i % 6],
            x: slots[i].0,
            y: slots[i].1,
            kind: IconKind::File,
            context_menu: vec![],
        });
    }
    for (j, f) in folders.iter().enumerate() {
        icons.push(Icon {
            id: format!("folder{j}"),
            label: f.to_string(),
            colour: Colour::Yellow,
            x: slots[nf + j].0,
            y: slots[nf + j].1,
            kind: IconKind::Folder { contents: vec![] },
            context_menu: vec![],
        });
    }
    let fi = g.range(0, nf as i32 - 1) as usize;
    let dj = g.range(0, 1) as usize;
    let mut checks = vec![Check::InFolder {
        folder: format!("folder{dj}"),
        file: files[fi].to_string(),
    }];
    checks.extend((0..nf).filter(|i| *i != fi).map(|i| Check::IconPresent {
        icon: format!("file{i}"),
    }));
    Built {
        instruction: format!(
            "Drag the file \"{}\" into the folder \"{}\".",
            files[fi], folders[dj]
        ),
        scene: Scene {
            icons,
            windows: vec![],
            templates: vec![],
        },
        checks,
        oracle: vec![OracleStep::Drag {
            from: Target::Icon {
                id: format!("file{fi}"),
            },
            to: Target::Icon {
                id: format!("folder{dj}"),
            },
        }],
        infeasible: false,
    }
}

fn dialog(g: &mut Gen) -> Built {
    let opener = if g.held() {
        "Options..."
    } else {
        "Preferences..."
    };
    let dialog_title = opener.trim_end_matches('.');
    let cb = g.pick(g.pool(CHECKS_T, CHECKS_H));
    let (dd_name, options) = g.pick(g.pool(DROPDOWN_T, DROPDOWN_H));
    let n = options.len();
    let target = g.range(0, n as i32 - 1) as usize;
    let main_rect = g.window_rect(150, 40, false);
    let main = window(
        "app",
        "Settings",
        main_rect,
        vec![
            label("hint", 4, 4, "Application settings"),
            button(
                "open_dialog",
                Rect::new(4, 18, font::text_width(opener) + 12, 14),
                opener,
                None,
                UiAction::OpenWindow {
                    template: "dialog".into(),
                },
            ),
        ],
    );
    let dlg_content_h = 4 + 12 + 14 + 11 + n as i32 * ROW_H + 4 + 16;
    let dlg_rect = Rect::new(
        if g.held() { 40 } else { 150 },
        (LOGICAL_H - dlg_content_h - TITLE_H - 4) / 2,
        160,
        dlg_content_h + TITLE_H + 4,
    );
    let ok_y = dlg_content_h - 18;
    let mut dlg = window(
        "dialog",
        dialog_title,
        dlg_rect,
        vec![
            widget(
                "dlg_cb",
                Rect::new(4, 4, 100, 10),
                WidgetKind::Checkbox {
                    label: cb.to_string(),
                    checked: false,
                },
            ),
            label("dlg_dd_label", 4, 18, &format!("{dd_name}:")),
            dropdown_widget("dlg_dd", Rect::new(60, 16, 80, 11), options, None),
            button(
                "dlg_ok",
                Rect::new(60, ok_y, 36, 14),
                "OK",
                None,
                UiAction::Confirm,
            ),
            button(
                "dlg_cancel",
                Rect::new(102, ok_y, 48, 14),
                "Cancel",
                None,
                UiAction::Cancel,
            ),
        ],
    );
    dlg.modal = true;
    Built {
        instruction: format!(
            "Open {dialog_title}, check \"{cb}\", set {dd_name} to \"{}\", and confirm with OK.",
            options[target]
        ),
        scene: Scene {
            icons: vec![],
            windows: vec![main],
            templates: vec![dlg],
        },
        checks: vec![
            Check::Checked {
                widget: "dlg_cb".into(),
                checked: true,
            },
            Check::Dropdown {
                widget: "dlg_dd".into(),
                option: options[target].into(),
            },
            Check::Confirmed {
                window: "dialog".into(),
            },
        ],
        oracle: vec![
            click(wid("open_dialog")),
            click(wid("dlg_cb")),
            click(wid("dlg_dd")),
            click(Target::DropdownOption {
                id: "dlg_dd".into(),
                option: options[target].into(),
            }),
            click(wid("dlg_ok")),
        ],
        infeasible: false,
    }
}

fn app_icons(g: &mut Gen, apps: &[(&str, Colour)]) -> (Vec<Icon>, Vec<Window>) {
    let slots = icon_slots(g, apps.len());
    let mut icons = Vec::new();
    let mut templates = Vec::new();
    for (i, (name, colour)) in apps.iter().enumerate() {
        let tid = format!("win_{}", name.to_ascii_lowercase());
        icons.push(Icon {
            id: format!("app_{}", name.to_ascii_lowercase()),
            label: name.to_string(),
            colour: *colour,
            x: slots[i].0,
            y: slots[i].1,
            kind: IconKind::App { opens: tid.clone() },
            context_menu: vec!["Open".into()],
        });
        let rect = Rect::new(70 + i as i32 * 8, 20 + i as i32 * 8, 180, 90);
        templates.push(window(
            &tid,
            name,
            rect,
            vec![label(
                format!("{tid}_text"),
                4,
                4,
                &format!("Welcome to {name}"),
            )],
        ));
    }
    (icons, templates)
}

fn open_icon(g: &mut Gen) -> Built {
    let n = g.range(3, 4) as usize;
    let apps = g.sample(g.pool(APPS_T, APPS_H), n);
    let (icons, templates) = app_icons(g, &apps);
    let t = g.range(0, n as i32 - 1) as usize;
    let name = apps[t].0;
    let tid = format!("win_{}", name.to_ascii_lowercase());
    Built {
        instruction: format!("Open the {name} application from the desktop."),
        scene: Scene {
            icons,
            windows: vec![],
            templates,
        },
        checks: vec![
            Check::WindowOpen {
                window: tid.clone(),
            },
            Check::Events {
                prefix: "open:".into(),
                expected: vec![format!("open:{tid}")],
            },
        ],
        oracle: vec![OracleStep::DoubleClick {
            at: Target::Icon {
                id: format!("app_{}", name.to_ascii_lowercase()),
            },
        }],
        infeasible: false,
    }
}

fn context_delete(g: &mut Gen) -> Built {
    let n = g.range(3, 4) as usize;
    let files = g.sample(g.pool(FILES_T, FILES_H), n);
    let slots = icon_slots(g, n);
    let icons: Vec<Icon> = files
        .iter()
        .enumerate()
        .map(|(i, f)| Icon {
            id: format!("file{i}"),
            label: f.to_string(),
            colour: Colour::ALL[(i + 2) % 6],
            x: slots[i].0,
            y: slots[i].1,
            kind: IconKind::File,
            context_menu: vec!["Open".into(), "Rename".into(), "Delete".into()],
        })
        .collect();
    let t = g.range(0, n as i32 - 1) as usize;
    let mut checks = vec![Check::IconDeleted {
        icon: format!("file{t}"),
    }];
    checks.extend((0..n).filter(|i| *i != t).map(|i| Check::IconPresent {
        icon: format!("file{i}"),
    }));
    Built {
        instruction: format!(
            "Delete the file \"{}\" using its right-click menu.",
            files[t]
        ),
        scene: Scene {
            icons,
            windows: vec![],
            templates: vec![],
        },
        checks,
        oracle: vec![
            OracleStep::RightClick {
                at: Target::Icon {
                    id: format!("file{t}"),
                },
            },
            click(Target::ContextItem {
                item: "Delete".into(),
            }),
        ],
        infeasible: false,
    }
}

fn clear_and_type(g: &mut Gen) -> Built {
    let name = g.pick(g.pool(FIELDS_T, FIELDS_H));
    let words = g.sample(g.pool(WORDS_T, WORDS_H), 2);
    let (widgets, h) = labelled_field(g, "field", name, 4, words[0]);
    let rect = g.window_rect(164, h + 4, false);
    Built {
        instruction: format!(
            "Replace the text in the {name} field with \"{}\".",
            words[1]
        ),
        scene: scene(vec![window("app", "Editor", rect, widgets)]),
        checks: vec![Check::Text {
            widget: "field".into(),
            text: words[1].into(),
        }],
        oracle: vec![
            click(wid("field")),
            OracleStep::Hotkey {
                keys: vec!["ctrl".into(), "a".into()],
            },
            OracleStep::Type {
                text: words[1].into(),
            },
        ],
        infeasible: false,
    }
}

/// Tasks that ask for something the desktop does not have; the right answer is `call_user`.
fn infeasible(g: &mut Gen) -> Built {
    let mut b = match g.index % 4 {
        0 => {
            // A colour that no button has.
            let mut b = colour_button(g);
            let present: Vec<Colour> = b.scene.windows[0]
                .widgets
                .iter()
                .filter_map(|w| match &w.kind {
                    WidgetKind::Button { colour, .. } => *colour,
                    _ => None,
                })
                .collect();
            // Absent colours from this split's pool, so instructions stay split-specific.
            let pool = g.pool(COLOURS_TRAIN, COLOURS_HELDOUT);
            let mut absent: Vec<Colour> = pool
                .iter()
                .copied()
                .filter(|c| !present.contains(c))
                .collect();
            if absent.is_empty() {
                absent = COLOURS_ALL
                    .iter()
                    .copied()
                    .filter(|c| !present.contains(c))
                    .collect();
            }
            let c = g.pick(&absent);
            let verb = if g.held() { "Press" } else { "Click" };
            b.instruction = format!("{verb} the {} button.", c.name());
            b
        }
        1 => {
            // An application that is not on the desktop.
            let apps = g.pool(APPS_T, APPS_H).to_vec();
            let n = apps.len();
            let missing = g.range(0, n as i32 - 1) as usize;
            let shown: Vec<(&str, Colour)> = apps
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != missing)
                .map(|(_, a)| *a)
                .collect();
            let (icons, templates) = app_icons(g, &shown);
            Built {
                instruction: format!("Open the {} application from the desktop.", apps[missing].0),
                scene: Scene {
                    icons,
                    windows: vec![],
                    templates,
                },
                checks: vec![],
                oracle: vec![],
                infeasible: true,
            }
        }
        2 => {
            // A slider value beyond its range.
            let mut b = slider(g);
            let (name, max) = match (
                &b.scene.windows[0].widgets[0].kind,
                &b.scene.windows[0].widgets[1].kind,
            ) {
                (WidgetKind::Label { text }, WidgetKind::Slider { max, .. }) => {
                    (text.trim_end_matches(':').to_string(), *max)
                }
                _ => ("Volume".to_string(), 10),
            };
            let v = max + g.range(5, 50);
            b.instruction = format!("Set the {name} slider to {v}.");
            b
        }
        _ => {
            // A drop-down choice that does not exist.
            let mut b = dropdown(g);
            let (name, options) = match (
                &b.scene.windows[0].widgets[0].kind,
                &b.scene.windows[0].widgets[1].kind,
            ) {
                (WidgetKind::Label { text }, WidgetKind::Dropdown { options, .. }) => {
                    (text.trim_end_matches(':').to_string(), options.clone())
                }
                _ => (String::from("Fruit"), vec![]),
            };
            let others: Vec<&str> = DROPDOWN_T
                .iter()
                .chain(DROPDOWN_H)
                .flat_map(|(_, o)| o.iter().copied())
                .filter(|o| !options.iter().any(|x| x == o))
                .collect();
            let o = g.pick(&others);
            b.instruction = format!("Choose \"{o}\" in the {name} drop-down.");
            b
        }
    };
    b.checks.clear();
    b.oracle.clear();
    b.infeasible = true;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_past_the_catalogue_name_the_instances_a_bigger_catalogue_generates() {
        let small = Catalogue::default();
        let big = Catalogue::generate(TRAIN_PER_FAMILY + 40, HELDOUT_PER_FAMILY + 3);
        for spec in big.train_specs().iter().chain(big.heldout_specs()) {
            let built = Catalogue::instance(&spec.id).expect(&spec.id);
            assert_eq!(&built, spec);
            let task = small.task(&spec.id).expect(&spec.id);
            assert_eq!(task.id, spec.id);
            assert_eq!(task.instruction, spec.instruction);
        }
        // Instances past the default catalogue are new tasks, not repeats of its own.
        let own: std::collections::HashSet<&str> = small
            .train_specs()
            .iter()
            .map(|s| s.instruction.as_str())
            .collect();
        let extra = &big.train_specs()[TRAIN_PER_FAMILY..TRAIN_PER_FAMILY + 40];
        assert!(extra.iter().any(|s| !own.contains(s.instruction.as_str())));
    }

    #[test]
    fn ids_of_no_family_split_or_index_are_refused() {
        let small = Catalogue::default();
        for id in [
            "sim-colour_button-train-12",
            "sim-colour_button-test-001",
            "sim-no_such_family-train-001",
            "sim-colour_button-train-0x1",
            "sim-colour_button-train-+01",
            "colour_button-train-001",
            "sim-colour_button-train-1048576",
            "sim-colour_button-train-99999999999999999999999",
            "",
        ] {
            assert!(Catalogue::instance(id).is_none(), "{id}");
            assert!(
                matches!(small.task(id), Err(SimError::UnknownTask { .. })),
                "{id}"
            );
        }
        assert!(Catalogue::instance("sim-colour_button-train-1048575").is_some());
    }
}

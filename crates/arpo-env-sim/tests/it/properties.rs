//! Property tests of the simulated desktop under arbitrary UI-TARS actions.
//!
//! - [`random_actions_never_panic_and_keep_the_desktop_valid`]: any action sequence on any
//!   catalogue task (train and held-out, three screen sizes) steps without a panic, `step` answers
//!   `Ok` or a continuable `InvalidAction` (and refuses everything once the episode has ended), and
//!   after every step the desktop keeps its invariants ([`Desktop::check_invariants`] plus the ones
//!   in [`check_desktop`]).
//! - [`rendering_and_evaluation_are_deterministic`]: two independent environments (one of them
//!   reused from another episode) and a bare [`Session`] fed the same actions give byte-identical
//!   screenshots, the same errors, the same desktop and the same reward.
//! - [`rejected_actions_change_nothing`]: an off-screen / non-finite point, an unknown key or an
//!   empty hotkey is rejected whole, from any reachable state: the desktop and the screenshot stay
//!   as they were and the episode goes on.
//!
//! Random points are a mix of raw screen coordinates (on the screen, on its edges, negative, huge,
//! infinite, NaN) and points aimed at what is on the desktop at that moment (widgets, list rows,
//! menu items, icons, title bars, ...), so that random sequences open menus, drag files and
//! windows, type into fields and so on instead of clicking the background.

use std::sync::OnceLock;

use arpo_core::{Action, EnvError, Environment, Point, ScrollDirection, Task};
use arpo_env_sim::desktop::{
    Desktop, ICON_H, ICON_W, IconKind, LOGICAL_H, LOGICAL_W, MAX_FIELD_LEN, ROW_H, TITLE_H,
    WidgetKind,
};
use arpo_env_sim::task::to_screen;
use arpo_env_sim::{Catalogue, Session, SimEnv};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Screen sizes: the default (scale 1), twice it (scale 2), and one that is not a multiple of the
/// design canvas (scale 2 with a margin nothing is laid out in).
const SIZES: [(u32, u32); 3] = [(336, 224), (672, 448), (701, 463)];

/// `cases` cases, or `PROPTEST_CASES` of them for a longer hunt.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        // Do not write `*.proptest-regressions` files into the shared checkout; a failure prints
        // the minimal input to paste into a regular test.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every catalogue task, training split first.
fn tasks() -> &'static [Task] {
    static TASKS: OnceLock<Vec<Task>> = OnceLock::new();
    TASKS.get_or_init(|| Catalogue::default().all())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn scale_of(size: (u32, u32)) -> u32 {
    (size.0 / LOGICAL_W as u32).min(size.1 / LOGICAL_H as u32)
}

// ------------------------------------------------------------------------------ strategies

/// One screen coordinate in `0..=max` most of the time, else just off the screen, far off it,
/// or not finite.
fn coord(max: u32) -> BoxedStrategy<f64> {
    let m = f64::from(max);
    prop_oneof![
        16 => 0.0..=m,
        4 => (0..=max).prop_map(f64::from),
        1 => prop::sample::select(vec![0.0, -0.0, m, m - 0.5, 0.5]),
        1 => off_coord(max),
    ]
    .boxed()
}

/// A coordinate that is not on a `0..=max` axis.
fn off_coord(max: u32) -> BoxedStrategy<f64> {
    let m = f64::from(max);
    prop_oneof![
        -1.0e9..-1.0e-9,
        prop::sample::select(vec![-1.0e-300, -0.5, -1.0, m + 1.0e-9, m + 0.5, m + 1.0]),
        (m + 1.0e-6)..1.0e12,
        prop::sample::select(vec![
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN,
            1.0e300,
            -1.0e300,
        ]),
    ]
    .boxed()
}

fn point((w, h): (u32, u32)) -> BoxedStrategy<Point> {
    (coord(w), coord(h))
        .prop_map(|(x, y)| Point::new(x, y))
        .boxed()
}

/// A point with at least one coordinate off the screen (or not finite).
fn off_point((w, h): (u32, u32)) -> BoxedStrategy<Point> {
    prop_oneof![
        (off_coord(w), coord(h)),
        (coord(w), off_coord(h)),
        (off_coord(w), off_coord(h)),
    ]
    .prop_map(|(x, y)| Point::new(x, y))
    .boxed()
}

const KEY_NAMES: &[&str] = &[
    "enter",
    "Return",
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
    "ArrowDown",
    "home",
    "end",
    "pageup",
    "space",
    "ctrl",
    "Control",
    "shift",
    "alt",
    "cmd",
    "win",
    "insert",
    "f5",
    "F12",
    "ENTER",
    " ",
    "a",
    "A",
    "s",
    "z",
    "1",
    ",",
    "<",
    "@",
];

/// A key as a model might write it: a name, a printable character, or any string at all.
fn key() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(KEY_NAMES).prop_map(String::from),
        3 => proptest::char::range(' ', '~').prop_map(|c| c.to_string()),
        1 => any::<String>(),
        1 => "[a-zA-Z+ ]{2,8}",
    ]
    .boxed()
}

fn hotkey_keys() -> BoxedStrategy<Vec<String>> {
    let letter = proptest::char::range('a', 'z').prop_map(|c| c.to_string());
    prop_oneof![
        2 => prop::collection::vec(key(), 0..4),
        // Menu shortcuts and select-all.
        3 => (prop::sample::select(vec!["ctrl", "Control", "cmd", "alt"]), letter.clone())
            .prop_map(|(m, l)| vec![m.to_string(), l]),
        1 => (prop::sample::select(vec!["ctrl", "alt"]), letter)
            .prop_map(|(m, l)| vec![m.to_string(), "shift".into(), l]),
    ]
    .boxed()
}

/// Text to type: short words (with or without a submitting new line), anything at all, text
/// longer than a field holds, control characters.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-zA-Z0-9@. ]{0,12}\n?",
        1 => any::<String>(),
        1 => "(?s).{0,40}",
        1 => proptest::string::string_regex(&format!("[a-z]{{{},{}}}", MAX_FIELD_LEN - 4, MAX_FIELD_LEN + 12))
            .expect("regex"),
        1 => prop::sample::select(vec!["\t", "\n", "\r\n", "\t\t\n", "\u{0}", "é€😀"]).prop_map(String::from),
    ]
    .boxed()
}

/// Every direction; up and down (what lists do) more often than sideways (only moves the pointer).
fn direction() -> BoxedStrategy<ScrollDirection> {
    prop_oneof![
        2 => Just(ScrollDirection::Up),
        3 => Just(ScrollDirection::Down),
        1 => Just(ScrollDirection::Left),
        1 => Just(ScrollDirection::Right),
    ]
    .boxed()
}

/// Any UI-TARS action; the terminal ones are rare so that most sequences run long.
fn action(size: (u32, u32)) -> BoxedStrategy<Action> {
    let p = move || point(size);
    prop_oneof![
        24 => p().prop_map(|point| Action::Click { point }),
        10 => p().prop_map(|point| Action::LeftDouble { point }),
        8 => p().prop_map(|point| Action::RightSingle { point }),
        6 => p().prop_map(|point| Action::Hover { point }),
        10 => (p(), p()).prop_map(|(from, to)| Action::Drag { from, to }),
        8 => hotkey_keys().prop_map(|keys| Action::Hotkey { keys }),
        10 => key().prop_map(|key| Action::Press { key }),
        4 => key().prop_map(|key| Action::KeyDown { key }),
        4 => key().prop_map(|key| Action::KeyUp { key }),
        12 => text().prop_map(|content| Action::Type { content }),
        10 => (proptest::option::of(p()), direction())
            .prop_map(|(point, direction)| Action::Scroll { point, direction }),
        2 => Just(Action::Wait),
        1 => proptest::option::of(any::<String>()).prop_map(|content| Action::Finished { content }),
        1 => Just(Action::CallUser),
    ]
    .boxed()
}

/// An action the environment must reject whole.
fn rejected_action(size: (u32, u32)) -> BoxedStrategy<Action> {
    let bad = move || off_point(size);
    let good = move || point(size);
    let bad_key = || {
        prop_oneof![
            "zq[a-z]{0,5}",
            "[^\\x00-\\x7f]",
            "[a-z]{1,3}\\+[a-z]{1,3}",
            prop::sample::select(vec![
                "",
                "\t",
                "\n",
                "  ",
                "\u{0}",
                "enter key",
                "f13",
                "ctrl+c",
                "é",
                "€",
                "😀",
                "ab",
            ])
            .prop_map(String::from),
        ]
    };
    let good_keys = || {
        prop::collection::vec(
            prop::sample::select(vec![
                "ctrl", "shift", "alt", "a", "s", "enter", "tab", "escape",
            ])
            .prop_map(String::from),
            0..3,
        )
    };
    prop_oneof![
        bad().prop_map(|point| Action::Click { point }),
        bad().prop_map(|point| Action::LeftDouble { point }),
        bad().prop_map(|point| Action::RightSingle { point }),
        bad().prop_map(|point| Action::Hover { point }),
        (bad(), good()).prop_map(|(from, to)| Action::Drag { from, to }),
        (good(), bad()).prop_map(|(from, to)| Action::Drag { from, to }),
        (bad(), direction()).prop_map(|(p, direction)| Action::Scroll {
            point: Some(p),
            direction
        }),
        bad_key().prop_map(|key| Action::Press { key }),
        bad_key().prop_map(|key| Action::KeyDown { key }),
        bad_key().prop_map(|key| Action::KeyUp { key }),
        (good_keys(), bad_key(), good_keys()).prop_map(|(mut a, k, b)| {
            a.push(k);
            a.extend(b);
            Action::Hotkey { keys: a }
        }),
        Just(Action::Hotkey { keys: vec![] }),
    ]
    .boxed()
}

/// Where to aim an action's points: at the `first`/`second` thing on the desktop (modulo their
/// number) at the time the action is taken, moved by `jitter` logical pixels. A drag with
/// `drag_by` goes that far from its start instead of to the second thing (sliders pushed past
/// their ends, windows and icons dragged to the screen's edges).
#[derive(Debug, Clone, Copy)]
struct Aim {
    first: usize,
    second: usize,
    jitter: (i32, i32),
    drag_by: Option<(i32, i32)>,
}

/// A step of a random episode: an action, maybe aimed at what is on the desktop, taken `repeat`
/// times in a row (agents scroll, press `down` or `backspace` several times).
#[derive(Debug, Clone)]
struct Step {
    action: Action,
    aim: Option<Aim>,
    repeat: usize,
}

fn jitter() -> BoxedStrategy<i32> {
    prop_oneof![2 => Just(0), 1 => -4..=4i32].boxed()
}

fn step(size: (u32, u32)) -> BoxedStrategy<Step> {
    let drag_by = proptest::option::of((-LOGICAL_W..=LOGICAL_W, -LOGICAL_H..=LOGICAL_H));
    let aim = (any::<usize>(), any::<usize>(), jitter(), jitter(), drag_by).prop_map(
        |(first, second, dx, dy, drag_by)| Aim {
            first,
            second,
            jitter: (dx, dy),
            drag_by,
        },
    );
    let repeat = prop_oneof![6 => Just(1usize), 1 => 2..=6usize];
    (action(size), proptest::option::weighted(0.7, aim), repeat)
        .prop_map(|(action, aim, repeat)| Step {
            action,
            aim,
            repeat,
        })
        .boxed()
}

type Points = Vec<(i32, i32)>;

/// Logical points of what one can click on the desktop now: the items of open popups, and
/// everything else (controls, list rows, menu titles and icons several times over, a window's
/// title bar and close box once, so that random episodes do not mostly close windows).
fn hot_points(d: &Desktop) -> (Points, Points) {
    let mut popup = Vec::new();
    let mut pts = Vec::new();
    if let Some(cm) = &d.context_menu {
        popup.extend((0..cm.items.len()).map(|j| cm.item_rect(j).center()));
    }
    for w in &d.windows {
        pts.push(w.title_rect().center());
        pts.push(w.close_rect().center());
        for _ in 0..3 {
            pts.extend((0..w.menus.len()).map(|mi| w.menu_title_rect(mi).center()));
        }
        if let Some(mi) = w.open_menu {
            let n = w.menus.get(mi).map_or(0, |m| m.items.len());
            popup.extend((0..n).map(|j| w.menu_item_rect(mi, j).center()));
        }
        for x in &w.widgets {
            let r = w.widget_rect(x);
            pts.extend([r.center(); 3]);
            let row = |i: usize| r.y + i as i32 * ROW_H + ROW_H / 2;
            match &x.kind {
                WidgetKind::List { items, .. } => {
                    let n = x.visible_rows().min(items.len());
                    pts.extend((0..n).map(|i| (r.x + 6, row(i))));
                }
                WidgetKind::Radio { options, .. } => {
                    pts.extend((0..options.len()).map(|i| (r.x + 4, row(i))));
                }
                WidgetKind::Dropdown {
                    options,
                    open: true,
                    ..
                } => {
                    popup.extend((0..options.len()).map(|i| (r.x + r.w / 2, row(i) + r.h)));
                }
                WidgetKind::Slider { .. } => {
                    pts.extend((0..=4).map(|k| (r.x + 3 + (r.w - 6) * k / 4, r.y + r.h / 2)));
                }
                _ => {}
            }
        }
    }
    for _ in 0..3 {
        pts.extend(d.icons.iter().map(|i| (i.x + ICON_W / 2, i.y + 8)));
    }
    (popup, pts)
}

/// The first `k` actions of the task's oracle (never its final `finished` / `call_user`) followed
/// by `steps`, each repeated as often as it says: random episodes start from states deep inside a task (a dialog up, a menu or a
/// drop-down open, a context menu shown, a list scrolled) as often as from its first screen.
fn with_oracle_prefix(
    task: &Task,
    size: (u32, u32),
    k: prop::sample::Index,
    steps: &[Step],
) -> Vec<Step> {
    let oracle = arpo_env_sim::oracle_at(task, size.0, size.1).expect("oracle");
    let k = k.index(oracle.len());
    oracle[..k]
        .iter()
        .map(|a| Step {
            action: a.clone(),
            aim: None,
            repeat: 1,
        })
        .chain(
            steps
                .iter()
                .flat_map(|s| std::iter::repeat_n(s.clone(), s.repeat.max(1))),
        )
        .collect()
}

/// The concrete action of `step` on desktop `d` on a screen of `size`.
fn concretize(step: &Step, d: &Desktop, size: (u32, u32)) -> Action {
    let scale = scale_of(size);
    let Some(aim) = step.aim else {
        return step.action.clone();
    };
    let (popup, pts) = hot_points(d);
    if pts.is_empty() && popup.is_empty() {
        return step.action.clone();
    }
    // With a popup open, half of the aimed points go to its items.
    let at = |k: usize| {
        let (x, y) = if !popup.is_empty() && (k.is_multiple_of(2) || pts.is_empty()) {
            popup[(k / 2) % popup.len()]
        } else {
            pts[k % pts.len()]
        };
        to_screen((x + aim.jitter.0, y + aim.jitter.1), scale)
    };
    match &step.action {
        Action::Click { .. } => Action::Click {
            point: at(aim.first),
        },
        Action::LeftDouble { .. } => Action::LeftDouble {
            point: at(aim.first),
        },
        Action::RightSingle { .. } => Action::RightSingle {
            point: at(aim.first),
        },
        Action::Hover { .. } => Action::Hover {
            point: at(aim.first),
        },
        Action::Drag { .. } => {
            let from = at(aim.first);
            let to = match aim.drag_by {
                // Dragged as far as the screen goes.
                Some((dx, dy)) => {
                    let s = f64::from(scale);
                    Point::new(
                        (from.x + f64::from(dx) * s).clamp(0.0, f64::from(size.0 - 1)),
                        (from.y + f64::from(dy) * s).clamp(0.0, f64::from(size.1 - 1)),
                    )
                }
                None => at(aim.second),
            };
            Action::Drag { from, to }
        }
        Action::Scroll { direction, .. } => {
            // Only lists scroll: aim three scrolls in four at one when there is one.
            let lists: Vec<(i32, i32)> = d
                .windows
                .iter()
                .flat_map(|w| w.widgets.iter().map(move |x| (w, x)))
                .filter(|(_, x)| matches!(x.kind, WidgetKind::List { .. }))
                .map(|(w, x)| w.widget_rect(x).center())
                .collect();
            let point = if !lists.is_empty() && aim.second % 4 != 0 {
                let (x, y) = lists[aim.first % lists.len()];
                to_screen((x + aim.jitter.0, y + aim.jitter.1), scale)
            } else {
                at(aim.first)
            };
            Action::Scroll {
                point: Some(point),
                direction: *direction,
            }
        }
        other => other.clone(),
    }
}

// ------------------------------------------------------------------------------ invariants

fn count_events(d: &Desktop, prefix: &str) -> usize {
    d.events.iter().filter(|e| e.starts_with(prefix)).count()
}

fn folder_items(d: &Desktop) -> usize {
    d.icons
        .iter()
        .map(|i| match &i.kind {
            IconKind::Folder { contents } => contents.len(),
            _ => 0,
        })
        .sum()
}

/// What every reachable desktop keeps, beyond [`Desktop::check_invariants`] (focus on an open
/// widget, open menu index in range, caret and field length, radio/dropdown/list selections,
/// list scroll offset, slider value in range, unique open widget ids).
///
/// - the focused widget is focusable (not a label);
/// - at most one popup is open (a menu, a drop-down list or the context menu);
/// - the context menu belongs to an existing icon, the selected icon exists;
/// - open window ids are unique and each is a scene window or a template;
/// - every window keeps its title bar reachable (what dragging a window allows), every widget
///   stays inside its window, every icon inside the design canvas;
/// - icons are conserved: present + moved into folders + deleted = initial; folder contents grow
///   exactly by the files moved in;
/// - held keys are distinct modifiers;
/// - the pointer is on the screen;
/// - the event log and the list of closed windows only grow.
fn check_desktop(
    d: &Desktop,
    prev: &Desktop,
    initial: &Desktop,
    size: (u32, u32),
    scale: u32,
) -> Result<(), String> {
    d.check_invariants()?;
    if let Some(f) = &d.focus {
        match d.widget(f).map(|w| &w.kind) {
            Some(WidgetKind::Label { .. }) => return Err(format!("focus on label {f}")),
            Some(_) => {}
            None => return Err(format!("focus on missing widget {f}")),
        }
    }
    let menus = d.windows.iter().filter(|w| w.open_menu.is_some()).count();
    let dropdowns = d
        .windows
        .iter()
        .flat_map(|w| &w.widgets)
        .filter(|x| matches!(x.kind, WidgetKind::Dropdown { open: true, .. }))
        .count();
    let popups = menus + dropdowns + usize::from(d.context_menu.is_some());
    if popups > 1 {
        return Err(format!(
            "{popups} popups open: {menus} menus, {dropdowns} drop-downs, context menu {:?}",
            d.context_menu
        ));
    }
    if let Some(cm) = &d.context_menu
        && d.icon(&cm.icon).is_none()
    {
        return Err(format!("context menu of missing icon {}", cm.icon));
    }
    if let Some(s) = &d.selected_icon
        && d.icon(s).is_none()
    {
        return Err(format!("selected icon {s} does not exist"));
    }
    for (i, w) in d.windows.iter().enumerate() {
        if d.windows[..i].iter().any(|o| o.id == w.id) {
            return Err(format!("window {} open twice", w.id));
        }
        let known = initial.windows.iter().chain(&initial.templates);
        if !known.clone().any(|t| t.id == w.id) {
            return Err(format!(
                "window {} is neither in the scene nor a template",
                w.id
            ));
        }
        let r = w.rect;
        if r.x + r.w < 20 || r.x > LOGICAL_W - 20 || r.y < 0 || r.y > LOGICAL_H - TITLE_H {
            return Err(format!("window {} at {r:?}: title bar out of reach", w.id));
        }
        for x in &w.widgets {
            let wr = w.widget_rect(x);
            if wr.x < r.x || wr.y < r.y || wr.x + wr.w > r.x + r.w || wr.y + wr.h > r.y + r.h {
                return Err(format!("widget {} at {wr:?} outside window {r:?}", x.id));
            }
        }
    }
    for (i, icon) in d.icons.iter().enumerate() {
        if d.icons[..i].iter().any(|o| o.id == icon.id) {
            return Err(format!("icon {} twice", icon.id));
        }
        if icon.x < 0 || icon.y < 0 || icon.x > LOGICAL_W - ICON_W || icon.y > LOGICAL_H - ICON_H {
            return Err(format!(
                "icon {} at ({}, {}) off the canvas",
                icon.id, icon.x, icon.y
            ));
        }
    }
    let moved = count_events(d, "move:");
    let deleted = count_events(d, "context:Delete:");
    if d.icons.len() + moved + deleted != initial.icons.len() {
        return Err(format!(
            "{} icons + {moved} moved + {deleted} deleted != {} at start",
            d.icons.len(),
            initial.icons.len()
        ));
    }
    if folder_items(d) != folder_items(initial) + moved {
        return Err(format!(
            "folders hold {} items, expected {} + {moved}",
            folder_items(d),
            folder_items(initial)
        ));
    }
    for (i, k) in d.held.iter().enumerate() {
        if !matches!(k.as_str(), "ctrl" | "shift" | "alt" | "meta") || d.held[..i].contains(k) {
            return Err(format!("held keys {:?}", d.held));
        }
    }
    let (px, py) = d.pointer;
    let s = scale as i32;
    if px < 0 || py < 0 || px * s >= size.0 as i32 || py * s >= size.1 as i32 {
        return Err(format!("pointer {:?} off the {size:?} screen", d.pointer));
    }
    if !d.events.starts_with(&prev.events) {
        return Err(format!(
            "event log rewritten: {:?} -> {:?}",
            prev.events, d.events
        ));
    }
    if !d.closed.starts_with(&prev.closed) {
        return Err("closed windows rewritten".into());
    }
    Ok(())
}

/// The PNG screenshot of the environment's current screen (rendered on a copy of its session).
fn current_png(env: &SimEnv) -> Vec<u8> {
    env.session()
        .expect("running")
        .clone()
        .screenshot()
        .expect("screenshot")
        .bytes
}

fn decode_rgb(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory(png).expect("png decodes").to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

fn is_off_screen(p: &Point, (w, h): (u32, u32)) -> bool {
    !(p.x.is_finite() && p.y.is_finite() && p.is_inside(w, h))
}

// ------------------------------------------------------------------------------ properties

fn run_invariants(
    size_i: usize,
    task_i: usize,
    max_steps: usize,
    k: prop::sample::Index,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let size = SIZES[size_i];
    let scale = scale_of(size);
    let task = &tasks()[task_i];
    let steps = with_oracle_prefix(task, size, k, steps);
    let mut env = SimEnv::with_size(size.0, size.1)
        .expect("size")
        .with_max_steps(max_steps);
    block_on(async {
        let first = env.reset(task).await.expect("reset");
        prop_assert_eq!(
            (first.screenshot.width, first.screenshot.height),
            size,
            "first screenshot size"
        );
        let initial = env.session().expect("session").desktop.clone();
        check_desktop(&initial, &initial, &initial, size, scale)
            .map_err(|e| TestCaseError::fail(format!("{}: initial: {e}", task.id)))?;
        let mut png = first.screenshot.bytes.clone();
        let mut ended = false;
        let mut last = None;
        for (i, st) in steps.iter().enumerate() {
            let before = env.session().expect("session").desktop.clone();
            let a = concretize(st, &before, size);
            let steps_before = env.steps();
            let rejected_before = env.rejected().len();
            let r = env.step(&a).await;
            let d = env.session().expect("session").desktop.clone();
            let ctx = || format!("{} step {i} {a:?}", task.id);
            match r {
                Ok(step) => {
                    prop_assert!(!ended, "{}: a step after the end was carried out", ctx());
                    prop_assert!(
                        !a.points().iter().any(|p| is_off_screen(p, size)),
                        "{}: an off-screen point was accepted",
                        ctx()
                    );
                    prop_assert_eq!(env.steps(), steps_before + 1, "{}", ctx());
                    prop_assert_eq!(
                        step.done,
                        a.is_terminal() || env.steps() >= max_steps,
                        "{}: done",
                        ctx()
                    );
                    prop_assert_eq!(
                        (
                            step.observation.screenshot.width,
                            step.observation.screenshot.height
                        ),
                        size
                    );
                    png = step.observation.screenshot.bytes;
                    ended = step.done;
                    last = Some(a.clone());
                }
                Err(e) => {
                    let EnvError::InvalidAction { action, reason } = &e else {
                        return Err(TestCaseError::fail(format!(
                            "{}: unexpected error kind {e:?}",
                            ctx()
                        )));
                    };
                    prop_assert_eq!(action.as_str(), a.name(), "{}", ctx());
                    prop_assert!(e.episode_can_continue(), "{}", ctx());
                    if ended {
                        prop_assert!(reason.contains("ended"), "{}: {reason}", ctx());
                        prop_assert_eq!(env.steps(), steps_before, "{}", ctx());
                        prop_assert_eq!(env.rejected().len(), rejected_before, "{}", ctx());
                    } else {
                        // Only actions with an off-screen point, an unknown key or no keys fail.
                        prop_assert!(
                            !matches!(
                                a,
                                Action::Type { .. }
                                    | Action::Wait
                                    | Action::Finished { .. }
                                    | Action::CallUser
                                    | Action::Scroll { point: None, .. }
                            ),
                            "{}: rejected: {reason}",
                            ctx()
                        );
                        prop_assert_eq!(env.steps(), steps_before + 1, "{}", ctx());
                        prop_assert_eq!(env.rejected().len(), rejected_before + 1, "{}", ctx());
                        // A rejected action at the step limit ends the episode.
                        ended = env.steps() >= max_steps;
                    }
                    prop_assert!(
                        d == before,
                        "{}: a refused action changed the desktop",
                        ctx()
                    );
                    prop_assert!(
                        current_png(&env) == png,
                        "{}: a refused action changed the screen",
                        ctx()
                    );
                }
            }
            check_desktop(&d, &before, &initial, size, scale)
                .map_err(|e| TestCaseError::fail(format!("{}: {e}", ctx())))?;
        }
        let reward = env.evaluate(last.as_ref()).await.expect("evaluate");
        prop_assert!(reward == 0.0 || reward == 1.0, "reward {reward}");
        let (w, h, rgb) = decode_rgb(&png);
        prop_assert_eq!((w, h), size);
        prop_assert_eq!(rgb.len(), size.0 as usize * size.1 as usize * 3);
        Ok(())
    })
}

fn run_determinism(
    size_i: usize,
    task_i: usize,
    other_i: usize,
    k: prop::sample::Index,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let size = SIZES[size_i];
    let task = &tasks()[task_i];
    let steps = with_oracle_prefix(task, size, k, steps);
    let other = &tasks()[other_i];
    let new_env = || {
        SimEnv::with_size(size.0, size.1)
            .expect("size")
            .with_max_steps(1000)
    };
    let mut a_env = new_env();
    let mut b_env = new_env();
    let mut session = Session::from_task(task, size.0, size.1).expect("session");
    block_on(async {
        // B first plays a part of another episode, to show that reset leaves nothing behind.
        b_env.reset(other).await.expect("reset other");
        for st in steps.iter().take(5) {
            let d = b_env.session().expect("session").desktop.clone();
            let _ = b_env.step(&concretize(st, &d, size)).await;
        }
        let a0 = a_env.reset(task).await.expect("reset a");
        let b0 = b_env.reset(task).await.expect("reset b");
        prop_assert!(
            a0.screenshot.bytes == b0.screenshot.bytes,
            "{}: first screens differ",
            task.id
        );
        prop_assert_eq!(b_env.steps(), 0);
        prop_assert!(b_env.rejected().is_empty(), "reset keeps old rejections");
        let mut ended = false;
        let mut last = None;
        for (i, st) in steps.iter().enumerate() {
            let act = concretize(st, &a_env.session().expect("session").desktop, size);
            let ra = a_env.step(&act).await;
            let rb = b_env.step(&act).await;
            let ctx = || format!("{} step {i} {act:?}", task.id);
            if !ended {
                let rs = session.apply_action(&act);
                prop_assert_eq!(
                    rs.is_ok(),
                    ra.is_ok(),
                    "{}: session and env disagree",
                    ctx()
                );
            }
            match (ra, rb) {
                (Ok(sa), Ok(sb)) => {
                    prop_assert!(
                        sa.observation.screenshot.bytes == sb.observation.screenshot.bytes,
                        "{}: screenshots differ",
                        ctx()
                    );
                    prop_assert_eq!(sa.done, sb.done, "{}", ctx());
                    ended = sa.done;
                    last = Some(act.clone());
                }
                (Err(ea), Err(eb)) => {
                    prop_assert_eq!(ea.to_string(), eb.to_string(), "{}", ctx());
                }
                (ra, rb) => {
                    return Err(TestCaseError::fail(format!(
                        "{}: {:?} vs {:?}",
                        ctx(),
                        ra.map(|s| s.done),
                        rb.map(|s| s.done)
                    )));
                }
            }
        }
        let da = &a_env.session().expect("session").desktop;
        let db = &b_env.session().expect("session").desktop;
        prop_assert!(da == db, "{}: desktops differ", task.id);
        prop_assert!(
            da == &session.desktop,
            "{}: session desktop differs",
            task.id
        );
        prop_assert_eq!(a_env.rejected(), b_env.rejected());
        let png_a = current_png(&a_env);
        prop_assert!(
            png_a == current_png(&b_env),
            "{}: final screens differ",
            task.id
        );
        let (_, _, rgb_a) = decode_rgb(&png_a);
        let rgb_s = session.render_rgb().expect("render").to_vec();
        prop_assert!(
            rgb_a == rgb_s,
            "{}: the session renders other pixels than the env",
            task.id
        );
        // Rendering the same state twice gives the same frame.
        prop_assert!(session.render_rgb().expect("render") == rgb_s.as_slice());
        let reward_a = a_env.evaluate(last.as_ref()).await.expect("evaluate");
        let reward_b = b_env.evaluate(last.as_ref()).await.expect("evaluate");
        prop_assert_eq!(reward_a, reward_b, "{}: rewards differ", task.id);
        prop_assert_eq!(reward_a, session.reward(last.as_ref()), "{}", task.id);
        Ok(())
    })
}

fn run_rejected(
    size_i: usize,
    task_i: usize,
    k: prop::sample::Index,
    prefix: &[Step],
    bad: &Action,
) -> Result<(), TestCaseError> {
    let size = SIZES[size_i];
    let task = &tasks()[task_i];
    let prefix = with_oracle_prefix(task, size, k, prefix);
    let mut env = SimEnv::with_size(size.0, size.1)
        .expect("size")
        .with_max_steps(1000);
    block_on(async {
        env.reset(task).await.expect("reset");
        for st in prefix.iter().filter(|s| !s.action.is_terminal()) {
            let d = env.session().expect("session").desktop.clone();
            let _ = env.step(&concretize(st, &d, size)).await;
        }
        let before = env.session().expect("session").desktop.clone();
        let png = current_png(&env);
        let rejected = env.rejected().len();
        let r = env.step(bad).await;
        let Err(e @ EnvError::InvalidAction { .. }) = &r else {
            return Err(TestCaseError::fail(format!(
                "{}: {bad:?} was not rejected: {:?}",
                task.id,
                r.map(|s| s.done)
            )));
        };
        prop_assert!(e.episode_can_continue());
        prop_assert!(
            env.session().expect("session").desktop == before,
            "{}: {bad:?} changed the desktop",
            task.id
        );
        prop_assert!(
            current_png(&env) == png,
            "{}: {bad:?} changed the screen",
            task.id
        );
        prop_assert_eq!(env.rejected().len(), rejected + 1);
        let note = env.rejected().last().expect("a rejection");
        prop_assert!(note.starts_with(bad.name()), "{note}");
        // The episode goes on, on the same screen.
        let next = env.step(&Action::Wait).await.expect("the episode goes on");
        prop_assert!(!next.done);
        prop_assert!(
            next.observation.screenshot.bytes == png,
            "{}: the screen after a refused action and a wait differs",
            task.id
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn random_actions_never_panic_and_keep_the_desktop_valid(
        (size_i, task_i, max_steps, k, steps) in (
            0..SIZES.len(),
            0..tasks().len(),
            prop_oneof![3 => Just(1000usize), 1 => 1usize..=40],
            any::<prop::sample::Index>(),
        )
            .prop_flat_map(|(s, t, m, k)| {
                (Just(s), Just(t), Just(m), Just(k), prop::collection::vec(step(SIZES[s]), 1..40))
            })
    ) {
        run_invariants(size_i, task_i, max_steps, k, &steps)?;
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn rendering_and_evaluation_are_deterministic(
        (size_i, task_i, other_i, k, steps) in (
            0..SIZES.len(),
            0..tasks().len(),
            0..tasks().len(),
            any::<prop::sample::Index>(),
        )
            .prop_flat_map(|(s, t, o, k)| {
                (Just(s), Just(t), Just(o), Just(k), prop::collection::vec(step(SIZES[s]), 1..25))
            })
    ) {
        run_determinism(size_i, task_i, other_i, k, &steps)?;
    }

    #[test]
    fn rejected_actions_change_nothing(
        (size_i, task_i, k, prefix, bad) in (0..SIZES.len(), 0..tasks().len(), any::<prop::sample::Index>())
            .prop_flat_map(|(s, t, k)| {
                (
                    Just(s),
                    Just(t),
                    Just(k),
                    prop::collection::vec(step(SIZES[s]), 0..15),
                    rejected_action(SIZES[s]),
                )
            })
    ) {
        run_rejected(size_i, task_i, k, &prefix, &bad)?;
    }
}

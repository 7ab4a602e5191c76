//! Property: for arbitrary actions (any text: unicode, quotes, backslashes, newlines, control
//! characters), the program sent to `/execute` parses, with the simulated guest's independent
//! pyautogui parser, into exactly the intended calls, and nothing else.

use arpo_core::{Action, Point, ScrollDirection};
use arpo_env_sim::pyautogui::{MouseButton, PyAutoGuiCall, parse_program};
use arpo_env_vmware::pyautogui::{GuestCommand, guest_command, key_name, python_command};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    let tricky = prop_oneof![
        Just('\''),
        Just('"'),
        Just('\\'),
        Just('\n'),
        Just('\r'),
        Just('\t'),
        Just('<'),
        Just('\0'),
        Just('\u{2028}'),
        Just('é'),
        Just('😀'),
        any::<char>(),
        proptest::char::range('a', 'z'),
    ];
    proptest::collection::vec(tricky, 0..24).prop_map(|cs| cs.into_iter().collect())
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("enter".to_string()),
        Just("ArrowLeft".to_string()),
        Just("space".to_string()),
        Just("'".to_string()),
        Just("\\".to_string()),
        text().prop_filter("a key is not blank", |k| !k.trim().is_empty()),
    ]
}

fn point() -> impl Strategy<Value = Point> {
    (0.0..1920.0f64, 0.0..1080.0f64).prop_map(|(x, y)| Point::new(x, y))
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        point().prop_map(|point| Action::Click { point }),
        point().prop_map(|point| Action::LeftDouble { point }),
        point().prop_map(|point| Action::RightSingle { point }),
        point().prop_map(|point| Action::Hover { point }),
        (point(), point()).prop_map(|(from, to)| Action::Drag { from, to }),
        (
            proptest::option::of(point()),
            prop_oneof![Just(ScrollDirection::Up), Just(ScrollDirection::Down)]
        )
            .prop_map(|(point, direction)| Action::Scroll { point, direction }),
        proptest::collection::vec(key(), 1..4).prop_map(|keys| Action::Hotkey { keys }),
        key().prop_map(|key| Action::Press { key }),
        key().prop_map(|key| Action::KeyDown { key }),
        key().prop_map(|key| Action::KeyUp { key }),
        text().prop_map(|content| Action::Type { content }),
    ]
}

fn xy(p: Point) -> (Option<f64>, Option<f64>) {
    let (x, y) = p.rounded();
    (Some(x as f64), Some(y as f64))
}

fn less_than() -> PyAutoGuiCall {
    PyAutoGuiCall::Hotkey {
        keys: vec!["shift".into(), ",".into()],
    }
}

/// The calls the action means, written from the mapping in UI-TARS.md.
fn intended(action: &Action) -> Vec<PyAutoGuiCall> {
    use PyAutoGuiCall as C;
    match action {
        Action::Click { point } => {
            let (x, y) = xy(*point);
            vec![C::Click {
                x,
                y,
                clicks: 1,
                button: MouseButton::Left,
            }]
        }
        Action::LeftDouble { point } => {
            let (x, y) = xy(*point);
            vec![C::DoubleClick {
                x,
                y,
                button: MouseButton::Left,
            }]
        }
        Action::RightSingle { point } => {
            let (x, y) = xy(*point);
            vec![C::Click {
                x,
                y,
                clicks: 1,
                button: MouseButton::Right,
            }]
        }
        Action::Hover { point } => {
            let (x, y) = xy(*point);
            vec![C::MoveTo { x, y }]
        }
        Action::Drag { from, to } => {
            let (x0, y0) = xy(*from);
            let (x1, y1) = xy(*to);
            vec![
                C::MoveTo { x: x0, y: y0 },
                C::DragTo {
                    x: x1,
                    y: y1,
                    button: MouseButton::Left,
                },
            ]
        }
        Action::Scroll { point, direction } => {
            let clicks = if *direction == ScrollDirection::Up {
                5
            } else {
                -5
            };
            let (x, y) = point.map_or((None, None), xy);
            vec![C::Scroll { clicks, x, y }]
        }
        Action::Hotkey { keys } => vec![C::Hotkey {
            keys: keys.iter().map(|k| key_name(k)).collect(),
        }],
        Action::Press { key } if key_name(key) == "<" => vec![less_than()],
        Action::Press { key } => vec![C::Press {
            keys: vec![key_name(key)],
            presses: 1,
        }],
        Action::KeyDown { key } => vec![C::KeyDown { key: key_name(key) }],
        Action::KeyUp { key } => vec![C::KeyUp { key: key_name(key) }],
        Action::Type { content } => {
            let body = content.strip_suffix('\n').unwrap_or(content);
            let mut calls = Vec::new();
            for (i, part) in body.split('<').enumerate() {
                if i > 0 {
                    calls.push(less_than());
                }
                if !part.is_empty() {
                    calls.push(C::Write {
                        text: part.to_owned(),
                    });
                }
            }
            if content.ends_with('\n') {
                calls.push(C::Press {
                    keys: vec!["enter".into()],
                    presses: 1,
                });
            }
            calls
        }
        Action::Wait | Action::Finished { .. } | Action::CallUser => Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn generated_program_parses_into_exactly_the_intended_calls(actions in proptest::collection::vec(action(), 1..4)) {
        let mut want = Vec::new();
        let mut programs = Vec::new();
        for a in &actions {
            match guest_command(a) {
                GuestCommand::Code(code) => {
                    programs.push(code);
                    want.extend(intended(a));
                }
                // Only a `type` of "" or "\n"-less nothing produces no code.
                other => prop_assert!(intended(a).is_empty(), "{a:?} gave {other:?}"),
            }
        }
        let program = programs.join("\n");
        prop_assert!(program.is_ascii());
        let command = python_command(&program);
        let calls = parse_program(&command[2]);
        prop_assert!(calls.is_ok(), "{program:?}: {calls:?}");
        prop_assert_eq!(calls.unwrap_or_default(), want);
    }
}

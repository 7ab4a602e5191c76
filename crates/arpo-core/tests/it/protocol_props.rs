//! Property tests of the UI-TARS protocol: the parser never panics, actions round-trip through
//! text, and in-range coordinates land on the screen.

use arpo_core::protocol::{
    CoordinateSystem, ParseConfig, PointSyntax, format_action, format_response, parse_response,
};
use arpo_core::{Action, Point, ScrollDirection};
use proptest::prelude::*;

/// Screens up to 2000 px wide: relative coordinates (1/1000 of the side) then round to < 1 px.
const SCREENS: [(u32, u32); 4] = [(1920, 1080), (1280, 800), (1024, 768), (800, 600)];

fn screen() -> impl Strategy<Value = (u32, u32)> {
    prop::sample::select(SCREENS.to_vec())
}

fn coordinates(screen: (u32, u32), absolute: bool) -> CoordinateSystem {
    if absolute {
        CoordinateSystem::uitars_absolute(screen.0, screen.1).expect("valid screen")
    } else {
        CoordinateSystem::Relative1000
    }
}

fn syntax() -> impl Strategy<Value = PointSyntax> {
    prop_oneof![
        Just(PointSyntax::BoxTokens),
        Just(PointSyntax::Plain),
        Just(PointSyntax::PointTag)
    ]
}

/// A point anywhere on the screen (pixel centres and fractions alike).
fn point(screen: (u32, u32)) -> impl Strategy<Value = Point> {
    let (w, h) = (f64::from(screen.0 - 1), f64::from(screen.1 - 1));
    (0.0..=w, 0.0..=h).prop_map(|(x, y)| Point::new(x, y))
}

/// Strings with the characters that break naive quoting, plus anything at all.
fn content() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z '\"\\\\\n\t\r)(,=é😀]{0,24}",
        Just("Action: click(start_box='(1,2)')\n\n".to_owned()),
    ]
}

/// Keys: no whitespace (hotkey keys are separated by spaces), quotes and backslashes allowed.
fn key() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_+\\-'\"\\\\é]{1,8}"
}

fn direction() -> impl Strategy<Value = ScrollDirection> {
    prop::sample::select(ScrollDirection::ALL.to_vec())
}

fn action(screen: (u32, u32)) -> impl Strategy<Value = Action> {
    prop_oneof![
        point(screen).prop_map(|point| Action::Click { point }),
        point(screen).prop_map(|point| Action::LeftDouble { point }),
        point(screen).prop_map(|point| Action::RightSingle { point }),
        point(screen).prop_map(|point| Action::Hover { point }),
        (point(screen), point(screen)).prop_map(|(from, to)| Action::Drag { from, to }),
        prop::collection::vec(key(), 1..4).prop_map(|keys| Action::Hotkey { keys }),
        key().prop_map(|key| Action::Press { key }),
        key().prop_map(|key| Action::KeyDown { key }),
        key().prop_map(|key| Action::KeyUp { key }),
        content().prop_map(|content| Action::Type { content }),
        (prop::option::of(point(screen)), direction())
            .prop_map(|(point, direction)| Action::Scroll { point, direction }),
        Just(Action::Wait),
        prop::option::of(content()).prop_map(|content| Action::Finished { content }),
        Just(Action::CallUser),
    ]
}

fn assert_same(original: &Action, parsed: &Action) -> Result<(), TestCaseError> {
    prop_assert_eq!(original.name(), parsed.name());
    let (a, b) = (original.points(), parsed.points());
    prop_assert_eq!(a.len(), b.len());
    for (p, q) in a.iter().zip(&b) {
        prop_assert!(
            (p.x - q.x).abs() < 1.0 && (p.y - q.y).abs() < 1.0,
            "{:?} came back as {:?}",
            p,
            q
        );
    }
    let strip = |a: &Action| match a {
        Action::Click { .. }
        | Action::LeftDouble { .. }
        | Action::RightSingle { .. }
        | Action::Hover { .. }
        | Action::Drag { .. } => Action::Wait,
        Action::Scroll { point, direction } => Action::Scroll {
            point: point.map(|_| Point::new(0.0, 0.0)),
            direction: *direction,
        },
        other => other.clone(),
    };
    prop_assert_eq!(strip(original), strip(parsed));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse_response(&text, &ParseConfig::new(CoordinateSystem::Relative1000, 1920, 1080));
    }

    #[test]
    fn parser_never_panics_on_protocol_shaped_noise(
        pieces in prop::collection::vec(prop_oneof![
            Just("Action:"), Just("Action: "), Just("Thought: "), Just("Reflection:"),
            Just("Action_Summary:"), Just("click("), Just("type(content="), Just("scroll("),
            Just("start_box="), Just("point="), Just("end_point="), Just("direction='up'"),
            Just("'"), Just("\""), Just("\\"), Just("("), Just(")"), Just(","), Just("="),
            Just("<point>"), Just("</point>"), Just("<|box_start|>"), Just("<|box_end|>"),
            Just("\n"), Just("\n\n"), Just(" "), Just("1000"), Just("-3"), Just("7.5"),
            Just("é"), Just("😀"), Just("\\x4"), Just("\\u12"), Just("\\U0011FFFF"), Just("\\777"),
        ], 0..40),
        absolute in any::<bool>(),
    ) {
        let text: String = pieces.concat();
        let config = ParseConfig::new(coordinates((1920, 1080), absolute), 1920, 1080);
        let _ = parse_response(&text, &config);
    }

    #[test]
    fn parser_never_panics_on_mutated_valid_responses(
        actions in prop::collection::vec(action((1920, 1080)), 1..4),
        syntax in syntax(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<char>()), 1..8),
    ) {
        let coords = CoordinateSystem::Relative1000;
        let mut chars: Vec<char> =
            format_response("plan", &actions, &coords, (1920, 1080), syntax).chars().collect();
        for (at, op, c) in edits {
            let i = at.index(chars.len() + 1);
            match op {
                0 => chars.insert(i, c),
                1 if i < chars.len() => { chars.remove(i); }
                _ if i < chars.len() => chars[i] = c,
                _ => chars.push(c),
            }
        }
        let text: String = chars.into_iter().collect();
        let _ = parse_response(&text, &ParseConfig::new(coords, 1920, 1080));
    }

    #[test]
    fn actions_round_trip_through_text(
        (screen, actions) in screen().prop_flat_map(|s| (Just(s), prop::collection::vec(action(s), 1..5))),
        absolute in any::<bool>(),
        syntax in syntax(),
        thought in "[A-Za-z0-9 ,.'()]{0,40}",
    ) {
        let coords = coordinates(screen, absolute);
        let text = format_response(&thought, &actions, &coords, screen, syntax);
        let parsed = parse_response(&text, &ParseConfig::new(coords, screen.0, screen.1))
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(parsed.thought.as_deref(), Some(thought.trim()));
        prop_assert_eq!(parsed.actions.len(), actions.len());
        for (a, b) in actions.iter().zip(&parsed.actions) {
            assert_same(a, b)?;
        }
        // Each action alone reads back the same way.
        for a in &actions {
            let one = format!("Action: {}", format_action(a, &coords, screen, syntax));
            let p = parse_response(&one, &ParseConfig::new(coords, screen.0, screen.1))
                .map_err(|e| TestCaseError::fail(format!("{e}\n{one}")))?;
            prop_assert_eq!(p.actions.len(), 1);
            assert_same(a, &p.actions[0])?;
        }
    }

    #[test]
    fn in_range_coordinates_land_on_the_screen(
        screen in screen(),
        absolute in any::<bool>(),
        fx in 0.0f64..=1.0,
        fy in 0.0f64..=1.0,
        decimals in any::<bool>(),
    ) {
        let coords = coordinates(screen, absolute);
        let (ex, ey) = coords.extent();
        let (x, y) = (fx * ex, fy * ey);
        let written = if decimals { format!("({x:.3},{y:.3})") } else { format!("({},{})", x.round(), y.round()) };
        let text = format!("Action: click(start_box='{written}')");
        let parsed = parse_response(&text, &ParseConfig::new(coords, screen.0, screen.1))
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let p = parsed.actions[0].points()[0];
        prop_assert!(p.x >= 0.0 && p.x <= f64::from(screen.0 - 1), "{:?} off a {:?} screen", p, screen);
        prop_assert!(p.y >= 0.0 && p.y <= f64::from(screen.1 - 1), "{:?} off a {:?} screen", p, screen);
        prop_assert!(p.is_inside(screen.0, screen.1));
    }
}

//! Golden tests against ByteDance's reference UI-TARS parser (`ui-tars` on PyPI).
//!
//! `fixtures/ui_tars/golden.json` is written by `fixtures/ui_tars/make_golden.py` from the corpus
//! `fixtures/ui_tars/responses.json`. Entries the corpus marks `"reference": "wrong"` or
//! `"unsafe"` are checked against the corpus's hand-written `expect` instead (the reason is in
//! the entry's `why`).

use arpo_core::protocol::{
    CoordinateSystem, ParseConfig, ParseError, ParsedResponse, PromptConfig, PromptTemplate,
    add_box_tokens, build_messages, parse_response,
};
use arpo_core::{Action, AgentContext, ContentPart, Point, Screenshot};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../../fixtures/ui_tars/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn config_of(entry: &Value) -> ParseConfig {
    let screen = entry["screen"].as_array().expect("screen");
    let (w, h) = (
        screen[0].as_u64().expect("width") as u32,
        screen[1].as_u64().expect("height") as u32,
    );
    let coords = match entry["coords"].as_str() {
        Some("relative") => CoordinateSystem::Relative1000,
        Some("absolute") => CoordinateSystem::uitars_absolute(w, h).expect("smart_resize"),
        other => panic!("unknown coords {other:?}"),
    };
    ParseConfig::new(coords, w, h)
}

fn error_kind(e: &ParseError) -> &'static str {
    match e {
        ParseError::MissingAction => "missing_action",
        ParseError::NoActions { .. } => "no_actions",
        ParseError::Syntax { .. } => "syntax",
        ParseError::UnterminatedString { .. } => "unterminated_string",
        ParseError::UnknownAction { .. } => "unknown_action",
        ParseError::MissingArgument { .. } => "missing_argument",
        ParseError::DuplicateArgument { .. } => "duplicate_argument",
        ParseError::BadPoint { .. } => "bad_point",
        ParseError::PointOutOfRange { .. } => "point_out_of_range",
        ParseError::BadDirection { .. } => "bad_direction",
        ParseError::EmptyKey { .. } => "empty_key",
    }
}

fn close(a: Point, b: Point) -> bool {
    (a.x - b.x).abs() <= 1.0 && (a.y - b.y).abs() <= 1.0
}

fn ref_point(v: &Value) -> Option<Point> {
    let a = v.as_array()?;
    Some(Point::new(a[0].as_f64()?, a[1].as_f64()?))
}

/// Compares one of our actions with one reference action; returns what differs.
fn compare_with_reference(ours: &Action, reference: &Value) -> Result<(), String> {
    let ref_type = reference["action_type"].as_str().unwrap_or_default();
    let expected_name = match ref_type {
        "left_single" => "click",
        "select" => "drag",
        "release" => "keyup",
        other => other,
    };
    if ours.name() != expected_name {
        return Err(format!("action {} vs reference {ref_type}", ours.name()));
    }
    let inputs = &reference["action_inputs"];
    let ref_points: Vec<Point> = ["start_box_screen", "end_box_screen"]
        .iter()
        .filter_map(|k| ref_point(&reference[*k]))
        .collect();
    let our_points = ours.points();
    if our_points.len() != ref_points.len()
        || !our_points
            .iter()
            .zip(&ref_points)
            .all(|(a, b)| close(*a, *b))
    {
        return Err(format!("points {our_points:?} vs reference {ref_points:?}"));
    }
    let text = |k: &str| inputs[k].as_str().map(str::to_owned);
    let ok = match ours {
        Action::Hotkey { keys } => {
            let want: Vec<String> = text("key")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            *keys == want
        }
        Action::Press { key } | Action::KeyDown { key } | Action::KeyUp { key } => {
            Some(key.clone()) == text("key")
        }
        Action::Type { content } => Some(content.clone()) == text("content"),
        Action::Scroll { direction, .. } => {
            text("direction").map(|d| d.to_lowercase()) == Some(direction.as_str().to_owned())
        }
        Action::Finished { content } => *content == text("content"),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{ours:?} vs reference inputs {inputs}"))
    }
}

fn check_against_reference(parsed: &ParsedResponse, golden: &Value) -> Result<(), String> {
    if parsed.thought.as_deref() != golden["thought"].as_str() {
        return Err(format!(
            "thought {:?} vs reference {}",
            parsed.thought, golden["thought"]
        ));
    }
    if parsed.reflection.as_deref() != golden["reflection"].as_str() {
        return Err(format!(
            "reflection {:?} vs reference {}",
            parsed.reflection, golden["reflection"]
        ));
    }
    let refs = golden["actions"].as_array().cloned().unwrap_or_default();
    if refs.len() != parsed.actions.len() {
        return Err(format!(
            "{} actions vs {} in the reference",
            parsed.actions.len(),
            refs.len()
        ));
    }
    for (ours, r) in parsed.actions.iter().zip(&refs) {
        compare_with_reference(ours, r)?;
    }
    Ok(())
}

fn check_against_expectation(
    result: &Result<ParsedResponse, ParseError>,
    expect: &Value,
) -> Result<(), String> {
    if let Some(kind) = expect["error"].as_str() {
        return match result {
            Err(e) if error_kind(e) == kind => Ok(()),
            other => Err(format!("expected a {kind} error, got {other:?}")),
        };
    }
    let parsed = result
        .as_ref()
        .map_err(|e| format!("expected a parse, got {e}"))?;
    if let Some(thought) = expect.get("thought")
        && parsed.thought.as_deref() != thought.as_str()
    {
        return Err(format!(
            "thought {:?} vs expected {thought}",
            parsed.thought
        ));
    }
    let want: Vec<Action> =
        serde_json::from_value(expect["actions"].clone()).map_err(|e| e.to_string())?;
    if want.len() != parsed.actions.len() {
        return Err(format!("{:?} vs expected {want:?}", parsed.actions));
    }
    for (ours, w) in parsed.actions.iter().zip(&want) {
        let same_shape = ours.name() == w.name()
            && ours.points().len() == w.points().len()
            && ours
                .points()
                .iter()
                .zip(w.points())
                .all(|(a, b)| close(*a, b));
        let same_data = match (ours, w) {
            (Action::Type { content: a }, Action::Type { content: b }) => a == b,
            (Action::Hotkey { keys: a }, Action::Hotkey { keys: b }) => a == b,
            _ => true,
        };
        if !(same_shape && same_data) {
            return Err(format!("{ours:?} vs expected {w:?}"));
        }
    }
    Ok(())
}

#[test]
fn parser_matches_the_reference_on_the_corpus() {
    let corpus = fixture("responses.json");
    let golden = fixture("golden.json");
    let corpus = corpus.as_array().expect("corpus is a list");
    let goldens = golden["responses"].as_array().expect("responses");
    assert!(corpus.len() >= 40, "the corpus should stay varied");
    assert_eq!(corpus.len(), goldens.len(), "re-run make_golden.py");
    let mut failures = Vec::new();
    let (mut vs_reference, mut vs_expectation) = (0, 0);
    for (entry, g) in corpus.iter().zip(goldens) {
        let id = entry["id"].as_str().expect("id");
        assert_eq!(
            g["id"].as_str(),
            Some(id),
            "golden.json is stale: re-run make_golden.py"
        );
        let text = entry["text"].as_str().expect("text");
        let result = parse_response(text, &config_of(entry));
        let outcome = match entry["reference"].as_str() {
            Some("wrong") | Some("unsafe") => {
                vs_expectation += 1;
                check_against_expectation(&result, &entry["expect"])
            }
            None => {
                vs_reference += 1;
                match (&result, g["ok"].as_bool()) {
                    (Err(_), Some(false)) => Ok(()),
                    (Ok(parsed), Some(true)) => check_against_reference(parsed, g),
                    (Ok(p), _) => Err(format!(
                        "we parse {p:?}, the reference fails: {}",
                        g["error"]
                    )),
                    (Err(e), _) => Err(format!("we fail ({e}), the reference parses")),
                }
            }
            Some(other) => Err(format!("unknown reference flag {other}")),
        };
        if let Err(why) = outcome {
            failures.push(format!("{id}: {why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(vs_reference >= 40 && vs_expectation >= 10);
}

#[test]
fn box_tokens_match_the_reference_add_box_token() {
    let golden = fixture("golden.json");
    for case in golden["add_box_token"].as_array().expect("cases") {
        let input = case["input"].as_str().expect("input");
        assert_eq!(
            add_box_tokens(input),
            case["output"].as_str().expect("output"),
            "{input}"
        );
    }
}

#[test]
fn prompts_match_the_reference_texts() {
    let golden = fixture("golden.json");
    let prompts = &golden["prompts"];
    let instruction = prompts["instruction"].as_str().expect("instruction");
    let context = AgentContext {
        instruction: instruction.to_owned(),
        screenshots: vec![Screenshot::new(vec![1, 2, 3], 8, 8)],
        responses: vec![],
    };
    for (template, key) in [
        (PromptTemplate::Arpo, "arpo"),
        (PromptTemplate::OsworldCallUser, "osworld_call_user"),
        (PromptTemplate::ComputerUseDoubao, "computer_use_doubao"),
    ] {
        let config = PromptConfig {
            template,
            ..PromptConfig::default()
        };
        let messages = build_messages(&context, &config);
        let ContentPart::Text { text } = &messages[1].content[0] else {
            panic!("the instructions are text");
        };
        assert_eq!(text, prompts[key].as_str().expect(key), "{key}");
    }
}

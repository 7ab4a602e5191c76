//! Each supported metric on fixture files, against values worked out by hand (and checked with
//! OSWorld's Python functions where stated).

use std::path::{Path, PathBuf};

use arpo_env_vmware::evaluate::{Got, indel_ratio, metric, sequence_ratio};
use serde_json::{Map, Value, json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/osworld/metrics")
        .join(name)
}

fn file(name: &str) -> Got {
    Got::File(fixture(name))
}

fn rule(rules: Value) -> Option<Got> {
    Some(Got::Json(rules))
}

fn opts(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn run(func: &str, result: &Got, expected: Option<Got>, options: Value) -> f64 {
    metric(func, result, expected.as_ref(), &opts(options)).expect("metric")
}

#[test]
fn exact_match_compares_the_whole_output() {
    let rules = rule(json!({"expected": "uint32 0\n"}));
    assert_eq!(
        run(
            "exact_match",
            &Got::Text("uint32 0\n".into()),
            rules.clone(),
            json!({})
        ),
        1.0
    );
    assert_eq!(
        run(
            "exact_match",
            &Got::Text("uint32 0".into()),
            rules.clone(),
            json!({})
        ),
        0.0
    );
    assert_eq!(run("exact_match", &Got::None, rules, json!({})), 0.0);
}

#[test]
fn check_include_exclude_needs_all_includes_and_no_exclude() {
    let rules = rule(json!({"include": ["spotify"], "exclude": ["not found"]}));
    let f = |t: &str| {
        run(
            "check_include_exclude",
            &Got::Text(t.into()),
            rules.clone(),
            json!({}),
        )
    };
    assert_eq!(f("/snap/bin/spotify\n"), 1.0);
    assert_eq!(f("spotify not found"), 0.0);
    assert_eq!(f(""), 0.0);
    assert_eq!(
        run("check_include_exclude", &Got::None, rules, json!({})),
        0.0
    );
}

#[test]
fn is_in_list_is_a_substring_test_on_text() {
    let rules = rule(json!({"expected": "Ubuntu"}));
    assert_eq!(
        run(
            "is_in_list",
            &Got::Text("Ubuntu 22.04".into()),
            rules.clone(),
            json!({})
        ),
        1.0
    );
    assert_eq!(
        run("is_in_list", &Got::Text("Debian".into()), rules, json!({})),
        0.0
    );
}

#[test]
fn literal_match_str_and_list() {
    let exp = Some(Got::Json(json!("Hello")));
    assert_eq!(
        run(
            "literal_match",
            &Got::Text("hello".into()),
            exp.clone(),
            json!({})
        ),
        0.0
    );
    assert_eq!(
        run(
            "literal_match",
            &Got::Text("hello".into()),
            exp,
            json!({"ignore_case": true})
        ),
        1.0
    );
    let list = Some(Got::Json(json!(["a", 1])));
    assert_eq!(
        run(
            "literal_match",
            &Got::Json(json!(["a", "1"])),
            list,
            json!({"type": "list"})
        ),
        1.0
    );
}

#[test]
fn fuzzy_match_is_rapidfuzz_ratio() {
    // fuzz.ratio("kitten", "sitting") = 61.538...: Indel distance 5 over 13 characters.
    assert!((indel_ratio("kitten", "sitting") - 8.0 / 13.0).abs() < 1e-12);
    assert_eq!(indel_ratio("", ""), 1.0);
    let rules = rule(json!({"expected": "sitting"}));
    let score = run("fuzzy_match", &Got::Text("kitten".into()), rules, json!({}));
    assert!((score - 8.0 / 13.0).abs() < 1e-12);
}

#[test]
fn compare_text_file_exact_and_with_options() {
    let actual = file("text_actual.txt");
    assert_eq!(
        run(
            "compare_text_file",
            &actual,
            Some(file("text_gold_exact.txt")),
            json!({})
        ),
        1.0
    );
    assert_eq!(
        run(
            "compare_text_file",
            &actual,
            Some(file("text_gold_blanks.txt")),
            json!({})
        ),
        0.0
    );
    // Python: "Hello World foo bar" vs "hello world foo bar" after ignore_blanks.
    assert_eq!(
        run(
            "compare_text_file",
            &actual,
            Some(file("text_gold_blanks.txt")),
            json!({"ignore_blanks": true})
        ),
        0.0
    );
    assert_eq!(
        run(
            "compare_text_file",
            &actual,
            Some(file("text_gold_blanks.txt")),
            json!({"ignore_blanks": true, "ignore_case": true})
        ),
        1.0
    );
    assert_eq!(
        run(
            "compare_text_file",
            &Got::None,
            Some(file("text_gold_exact.txt")),
            json!({})
        ),
        0.0
    );
}

#[test]
fn diff_text_file_is_difflib_ratio_over_lines() {
    // difflib.SequenceMatcher(a=lines_a, b=lines_b).ratio() = 2*3/9 = 0.666... (Python 3.11).
    let score = run(
        "diff_text_file",
        &file("lines_a.txt"),
        Some(file("lines_b.txt")),
        json!({}),
    );
    assert!((score - 2.0 / 3.0).abs() < 1e-12, "{score}");
    // difflib with autojunk (b of 250 items, all "popular"): 0.01818181818181818 in Python 3.11.
    let a: Vec<String> = (0..300).map(|i| format!("line {}", i % 7)).collect();
    let b: Vec<String> = (0..250).map(|i| format!("line {}", i % 5)).collect();
    assert!((sequence_ratio(&a, &b) - 0.01818181818181818).abs() < 1e-15);
    assert_eq!(sequence_ratio::<u8>(&[], &[]), 1.0);
}

#[test]
fn check_list_regexes_expect_and_unexpect() {
    let list = file("list.txt");
    let ok = rule(
        json!({"expect": ["org\\.openoffice\\.languagetool\\.oxt", "openjdk-\\d+-(jre|jdk)"]}),
    );
    assert_eq!(run("check_list", &list, ok, json!({})), 1.0);
    let missing = rule(json!({"expect": ["openjdk-8-jre"]}));
    assert_eq!(run("check_list", &list, missing, json!({})), 0.0);
    let unexpected = rule(json!({"expect": [], "unexpect": ["^error:"]}));
    assert_eq!(run("check_list", &list, unexpected, json!({})), 0.0);
    assert_eq!(
        run(
            "check_list",
            &Got::None,
            rule(json!({"expect": []})),
            json!({})
        ),
        0.0
    );
    let bad = metric(
        "check_list",
        &list,
        rule(json!({"expect": ["("]})).as_ref(),
        &Map::new(),
    );
    assert!(bad.is_err());
}

#[test]
fn check_direct_json_object_both_modes() {
    let rules = rule(json!({"expected": {"a": 1, "b": "x"}}));
    // Single quotes are turned into double quotes first, as OSWorld does; 1.0 == 1 in Python.
    assert_eq!(
        run(
            "check_direct_json_object",
            &Got::Text(" {'a': 1.0, 'b': 'x', 'c': 2} ".into()),
            rules.clone(),
            json!({})
        ),
        1.0
    );
    assert_eq!(
        run(
            "check_direct_json_object",
            &Got::Text("{'a': 2, 'b': 'x'}".into()),
            rules.clone(),
            json!({})
        ),
        0.0
    );
    assert_eq!(
        run(
            "check_direct_json_object",
            &Got::Text("not json".into()),
            rules,
            json!({})
        ),
        0.0
    );
    // expect_in_result: a list of acceptable values, one of which must be in the result's list.
    let rules = rule(
        json!({"expected": {"k": ["Himalayas", "Everest"], "s": "Hua"}, "expect_in_result": true}),
    );
    assert_eq!(
        run(
            "check_direct_json_object",
            &Got::Text("{\"k\": [\"Everest\"], \"s\": \"Mount Hua\"}".into()),
            rules.clone(),
            json!({})
        ),
        1.0
    );
    assert_eq!(
        run(
            "check_direct_json_object",
            &Got::Text("{\"k\": [\"K2\"], \"s\": \"Mount Hua\"}".into()),
            rules,
            json!({})
        ),
        0.0
    );
}

#[test]
fn unknown_metric_is_an_error_not_a_zero() {
    assert!(metric("compare_pdfs", &Got::None, None, &Map::new()).is_err());
}

/// Every native metric against what OSWorld's own function returned on the same inputs
/// (`python/make_fixtures.py` calls desktop-env 1.0.2 and writes the record).
#[test]
fn native_metrics_equal_osworlds_recorded_outputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/native_metrics");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("record.json")).expect("record"))
            .expect("json");
    let cases = record["cases"].as_array().expect("cases");
    let mut funcs = std::collections::BTreeSet::new();
    for case in cases {
        let func = case["func"].as_str().expect("func");
        let input = |value: &Value, file: &Value| -> Got {
            match (file.as_str(), value) {
                (Some(f), _) => Got::File(dir.join(f)),
                (None, Value::String(s)) => Got::Text(s.clone()),
                (None, Value::Null) => Got::None,
                (None, other) => Got::Json(other.clone()),
            }
        };
        let result = input(&case["result"], &case["result_file"]);
        // An expected value is the rules (`rule` getter), or a file, or a literal for literal_match.
        let expected = match (case["expected_file"].as_str(), &case["expected"]) {
            (Some(f), _) => Some(Got::File(dir.join(f))),
            (None, Value::Null) => None,
            (None, Value::String(s)) => Some(Got::Text(s.clone())),
            (None, v) if func == "literal_match" => Some(Got::Json(v.clone())),
            (None, v) => Some(Got::Json(v.clone())),
        };
        let got = run(func, &result, expected, case["options"].clone());
        let want = case["osworld"].as_f64().expect("score");
        assert!(
            (got - want).abs() < 1e-9,
            "{func} on {case}: native {got}, OSWorld {want}"
        );
        funcs.insert(func.to_owned());
    }
    // Every native metric but `infeasible` (scored by DesktopEnv.evaluate, not a function) is covered.
    let native: std::collections::BTreeSet<String> = arpo_env_vmware::evaluate::SUPPORTED_METRICS
        .iter()
        .filter(|m| **m != "infeasible")
        .map(|m| (*m).to_owned())
        .collect();
    assert_eq!(funcs, native);
}

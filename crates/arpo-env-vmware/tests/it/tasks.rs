//! OSWorld task and index files, read unchanged from the OSWorld repository.

use std::path::{Path, PathBuf};

use arpo_env_vmware::task::find_task_files;
use arpo_env_vmware::{OsworldTask, load_index};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/osworld")
}

#[test]
fn the_full_index_lists_369_tasks_over_10_domains() {
    // OSWORLD.md: 369 tasks, chrome 46, gimp 26, libreoffice_calc 47, ..., vs_code 23.
    let entries = load_index(
        &fixtures().join("test_all.json"),
        &fixtures().join("examples"),
    )
    .expect("index");
    assert_eq!(entries.len(), 369);
    let count = |d: &str| entries.iter().filter(|e| e.domain == d).count();
    assert_eq!(count("chrome"), 46);
    assert_eq!(count("multi_apps"), 101);
    assert_eq!(count("os"), 24);
    assert_eq!(count("vs_code"), 23);
    let first_os = entries.iter().find(|e| e.domain == "os").expect("os");
    assert!(first_os.path.ends_with(format!("os/{}.json", first_os.id)));
}

#[test]
fn fixture_tasks_load_and_report_what_they_need() {
    let entries = load_index(
        &fixtures().join("test_fixtures.json"),
        &fixtures().join("examples"),
    )
    .expect("index");
    assert_eq!(entries.len(), 8);
    let mut supported = 0;
    for e in &entries {
        let task = OsworldTask::load(&e.path).expect("task");
        assert_eq!(task.id, e.id);
        let missing = task.unsupported();
        if missing.is_empty() {
            supported += 1;
        } else {
            assert_eq!(e.domain, "chrome");
            assert_eq!(
                missing,
                [
                    "getter pdf_from_url",
                    "metric compare_pdfs",
                    "setup step chrome_open_tabs"
                ]
            );
        }
    }
    assert_eq!(supported, 7);
    assert_eq!(
        find_task_files(&fixtures().join("examples"))
            .expect("files")
            .len(),
        8
    );
}

#[test]
fn the_trainer_task_carries_the_whole_json() {
    let path = fixtures().join("examples/os/bedcedc4-4d72-425e-ad62-21960b11fe0d.json");
    let task = OsworldTask::load(&path).expect("task");
    let core = task.to_task(Some("os"));
    assert_eq!(
        core.instruction,
        "Could you set the 'Dim screen when inactive' to off in setting?"
    );
    assert_eq!(core.domain.as_deref(), Some("os"));
    let back = OsworldTask::from_task(&core).expect("round trip");
    assert_eq!(back, task);
    // Fields we do not model (`trajectory`) survive.
    assert_eq!(
        back.extra.get("trajectory").and_then(|v| v.as_str()),
        Some("trajectories/")
    );
}

#[test]
fn a_non_osworld_task_is_refused_with_the_reason() {
    let err = OsworldTask::from_task(&arpo_core::Task::new("x", "y")).expect_err("null config");
    assert!(
        err.to_string().contains("not an OSWorld task JSON") && err.to_string().contains("x"),
        "{err}"
    );
    let err = OsworldTask::load(Path::new("/nonexistent.json")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent.json"), "{err}");
}

/// OSWorld's published task set, shared on this machine (not copied into the repository).
fn shared_examples() -> Option<PathBuf> {
    let dir = crate::support::osworld_examples();
    if dir.is_none() {
        println!(
            "skipped: OSWorld's evaluation_examples is absent (set ARPO_OSWORLD_EXAMPLES, or share it next to the checkout)"
        );
    }
    dir
}

#[test]
fn every_published_task_file_loads() {
    let Some(dir) = shared_examples() else {
        return;
    };
    let files = find_task_files(&dir).expect("files");
    assert!(files.len() >= 369, "{} files", files.len());
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| OsworldTask::load(f).err().map(|e| e.to_string()))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The one whose `source` is a list (we do not use `source`).
    let vs = find_task_files(&dir.join("vs_code"))
        .expect("vs_code")
        .into_iter()
        .find(|f| f.to_string_lossy().contains("ea98c5d7"))
        .expect("vs_code/ea98c5d7-...");
    let task = OsworldTask::load(&vs).expect("loads");
    assert!(task.extra.get("source").is_some_and(|s| s.is_array()));
}

#[test]
fn a_field_we_use_that_is_malformed_is_named_with_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    for (body, field) in [
        (
            r#"{"id": 3, "instruction": "x", "evaluator": {}}"#,
            "field id",
        ),
        (r#"{"id": "a", "evaluator": {}}"#, "field instruction"),
        (
            r#"{"id": "a", "instruction": "x", "config": {}, "evaluator": {}}"#,
            "field config",
        ),
        (
            r#"{"id": "a", "instruction": "x", "config": [{"parameters": {}}], "evaluator": {}}"#,
            "field config[0].type",
        ),
    ] {
        let path = dir.path().join("t.json");
        std::fs::write(&path, body).expect("write");
        let err = OsworldTask::load(&path).expect_err(body).to_string();
        assert!(err.contains(field) && err.contains("t.json"), "{err}");
    }
    // Unused fields of any shape are kept, not validated.
    let ok = OsworldTask::from_json(
        r#"{"id": "a", "instruction": "x", "evaluator": {"func": "infeasible"},
            "source": ["a", "b"], "snapshot": 3, "related_apps": "chrome"}"#,
    )
    .expect("loads");
    assert_eq!(ok.extra.len(), 3);
    assert!(ok.evaluator_problem().is_none());
    // A malformed evaluator loads (OSWorld ships two) but is named where it is used.
    let bad =
        OsworldTask::from_json(r#"{"id": "v", "instruction": "x", "evaluator": "evaluation_dir"}"#)
            .expect("loads");
    let err = bad.evaluator_problem().expect("a problem").to_string();
    assert!(
        err.contains("field evaluator") && err.contains("evaluation_dir"),
        "{err}"
    );
}

#[test]
fn the_published_set_runs_natively_or_through_osworlds_evaluator_but_the_credential_tasks() {
    use arpo_env_vmware::OsworldNames;
    use arpo_env_vmware::coverage::{Runs, coverage, render};
    let Some(dir) = shared_examples() else {
        return;
    };
    let tasks = dir.parent().expect("evaluation_examples");
    let names = OsworldNames::bundled();
    let report = coverage(tasks, Some(Path::new("test_all.json")), Some(&names)).expect("coverage");
    println!("{}", render(&report, false));
    assert!(report.invalid.is_empty(), "{:?}", report.invalid);
    assert_eq!(
        report.total,
        report.native + report.osworld_tasks + report.not_runnable
    );
    assert!(
        report.runnable() * 100 >= report.total * 97,
        "{} of {} runnable",
        report.runnable(),
        report.total
    );
    // What is not runnable says why; here only the user's own account settings are missing.
    for t in report.tasks.iter().filter(|t| t.runs == Runs::NotRunnable) {
        assert!(
            t.reasons.iter().all(|r| r.contains("settings/google")),
            "{}: {:?}",
            t.id,
            t.reasons
        );
    }
    // Native only, the count the crate had before the worker: natively runnable tasks only.
    let native = coverage(tasks, Some(Path::new("test_all.json")), None).expect("native");
    assert_eq!(native.runnable(), report.native);
    assert_eq!(native.osworld_tasks, 0);
}

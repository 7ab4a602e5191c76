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
        err.to_string().contains("not an OSWorld task JSON"),
        "{err}"
    );
    let err = OsworldTask::load(Path::new("/nonexistent.json")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent.json"), "{err}");
}

//! The environment end to end over real HTTP against a scripted guest server: reset (setup
//! steps), steps, evaluate on OSWorld's own task files; faults (500s, a hang, the server going
//! down mid-episode) end the episode with a reason and leave the env reusable.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{FakeGuest, Script};
use arpo_core::{Action, EnvError, Environment, Point, Task};
use arpo_env_vmware::{
    EnvConfig, EvaluatorBackend, GuestClient, GuestConfig, OsworldEnv, OsworldEvaluatorConfig,
    OsworldTask, VmwareError, remote_pool,
};
use serde_json::{Value, json};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/osworld/examples")
        .join(rel)
}

fn task(rel: &str) -> Task {
    let domain = rel.split('/').next();
    OsworldTask::load(&fixture(rel))
        .expect("task")
        .to_task(domain)
}

fn config(cache: &Path) -> EnvConfig {
    EnvConfig {
        guest: GuestConfig {
            request_timeout: Duration::from_secs(1),
            execute_timeout: Duration::from_secs(1),
            open_timeout: Duration::from_secs(1),
            attempts: 3,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        },
        cache_dir: cache.to_path_buf(),
        client_password: "password".into(),
        step_pause: Duration::ZERO,
        wait_pause: Duration::ZERO,
        reset_attempts: 2,
        ready_timeout: Duration::from_secs(2),
        ready_poll: Duration::from_millis(20),
        settle: Duration::ZERO,
        pause_between_steps: false,
        download_timeout: Duration::from_secs(1),
        // These tests check the native evaluators; the worker's tests are in osworld_worker.rs.
        osworld: OsworldEvaluatorConfig {
            evaluator: EvaluatorBackend::Native,
            ..OsworldEvaluatorConfig::default()
        },
        ..EnvConfig::default()
    }
}

fn guest() -> FakeGuest {
    FakeGuest::start(Arc::new(Mutex::new(Script::default())))
}

fn set_output(g: &FakeGuest, command: Value, output: &str) {
    g.state
        .lock()
        .expect("lock")
        .outputs
        .insert(command.to_string(), output.to_owned());
}

const IDLE_DELAY: &str = "os/bedcedc4-4d72-425e-ad62-21960b11fe0d.json";

#[tokio::test]
async fn exact_match_task_reset_step_evaluate() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    let t = task(IDLE_DELAY);

    let first = env.reset(&t).await.expect("reset");
    assert_eq!((first.screenshot.width, first.screenshot.height), (64, 48));
    assert_eq!(env.screen_size(), (64, 48));

    let step = env
        .step(&Action::Click {
            point: Point::new(10.0, 20.0),
        })
        .await
        .expect("click");
    assert!(!step.done);
    let step = env
        .step(&Action::Finished { content: None })
        .await
        .expect("finished");
    assert!(step.done);

    {
        let s = g.state.lock().expect("lock");
        // The task's setup step went to /setup/execute, the click to /execute with OSWorld's prefix.
        assert_eq!(s.executed[0].0, "/setup/execute");
        assert_eq!(
            s.executed[0].1,
            json!([
                "python",
                "-c",
                "import pyautogui; import time; pyautogui.click(960, 540); time.sleep(0.5);"
            ])
        );
        assert_eq!(
            s.executed[1],
            (
                "/execute".to_string(),
                json!([
                    "python",
                    "-c",
                    "import pyautogui; import time; pyautogui.FAILSAFE = False; pyautogui.click(10, 20, button='left')"
                ])
            )
        );
        assert_eq!(s.executed.len(), 2, "finished runs nothing");
    }

    let gsettings = json!([
        "gsettings",
        "get",
        "org.gnome.desktop.session",
        "idle-delay"
    ]);
    set_output(&g, gsettings.clone(), "uint32 0\n");
    let last = Action::Finished { content: None };
    assert_eq!(env.evaluate(Some(&last)).await.expect("eval"), 1.0);
    set_output(&g, gsettings, "uint32 300\n");
    assert_eq!(env.evaluate(Some(&last)).await.expect("eval"), 0.0);
    // A last FAIL scores 0 on a feasible task.
    assert_eq!(
        env.evaluate(Some(&Action::CallUser)).await.expect("eval"),
        0.0
    );
}

#[tokio::test]
async fn infeasible_scores_one_only_for_call_user() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    env.reset(&task("os/b3d4a89c-53f2-4d6b-8b6a-541fb5d205fa.json"))
        .await
        .expect("reset");
    assert_eq!(
        env.evaluate(Some(&Action::CallUser)).await.expect("eval"),
        1.0
    );
    assert_eq!(
        env.evaluate(Some(&Action::Finished { content: None }))
            .await
            .expect("eval"),
        0.0
    );
    assert_eq!(env.evaluate(None).await.expect("eval"), 0.0);
}

#[tokio::test]
async fn postconfig_stdout_feeds_cache_file_and_check_list_with_and() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    env.reset(&task(
        "multi_apps/e1fc0df3-c8b9-4ee7-864c-d0b590d3aa56.json",
    ))
    .await
    .expect("reset");
    let grep = json!([
        "grep",
        "-nHr",
        "languagetool",
        "/home/user/.config/libreoffice/4/user/uno_packages/cache/uno_packages/"
    ]);
    let apt = json!(["apt", "list", "--installed"]);
    set_output(
        &g,
        grep.clone(),
        "x/description.xml:3:<identifier value=\"org.openoffice.languagetool.oxt\"/>\n",
    );
    set_output(
        &g,
        apt.clone(),
        "zip/jammy 3.0\nopenjdk-11-jre/jammy-updates 11.0.20\n",
    );
    let done = Action::Finished { content: None };
    assert_eq!(env.evaluate(Some(&done)).await.expect("eval"), 1.0);
    // `and`: one failing metric fails the task.
    set_output(&g, apt, "zip/jammy 3.0\n");
    assert_eq!(env.evaluate(Some(&done)).await.expect("eval"), 0.0);
    let s = g.state.lock().expect("lock");
    let launched = &s.setup_calls[0];
    assert_eq!(launched.0, "/setup/launch");
    assert_eq!(
        launched.1,
        json!({"command": ["libreoffice", "--writer"], "shell": false})
    );
}

#[tokio::test]
async fn download_upload_activate_and_compare_text_file() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let rel = "vs_code/0ed39f63-6049-43d4-ba4d-5fa2fe04a951.json";
    let raw = OsworldTask::load(&fixture(rel)).expect("task");
    // Pre-fill the host download cache so no network is needed.
    let url = raw.config[0].parameters["files"][0]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let cached = arpo_env_vmware::setup::download_cache_path(
        &cache.path().join("downloads"),
        &url,
        "/home/user/Desktop/vscode_replace_text.txt",
    );
    std::fs::create_dir_all(cached.parent().expect("parent")).expect("mkdir");
    std::fs::write(&cached, "a text line\n").expect("cache");

    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    env.reset(&raw.to_task(Some("vs_code")))
        .await
        .expect("reset");
    {
        let s = g.state.lock().expect("lock");
        assert_eq!(
            s.uploads
                .get("/home/user/Desktop/vscode_replace_text.txt")
                .map(Vec::as_slice),
            Some(&b"a text line\n"[..])
        );
        let endpoints: Vec<&str> = s.setup_calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(endpoints, ["/setup/launch", "/setup/activate_window"]);
        assert_eq!(
            s.setup_calls[1].1,
            json!({"window_name": "Visual Studio Code", "strict": false, "by_class": false})
        );
    }
    // The agent's edit, and the gold file the cloud_file getter keeps in the task cache.
    g.state.lock().expect("lock").files.insert(
        "/home/user/Desktop/vscode_replace_text.txt".into(),
        b"a test line\n".to_vec(),
    );
    let task_cache = cache.path().join("tasks").join(&raw.id);
    std::fs::write(
        task_cache.join("vscode_replace_text_gold.txt"),
        "a test line\n",
    )
    .expect("gold");
    let done = Action::Finished { content: None };
    assert_eq!(env.evaluate(Some(&done)).await.expect("eval"), 1.0);
    // The postconfig saved with ctrl+s through /setup/execute.
    assert!(
        g.state
            .lock()
            .expect("lock")
            .executed
            .iter()
            .any(|(ep, c)| ep == "/setup/execute"
                && c[2]
                    .as_str()
                    .is_some_and(|s| s.contains("hotkey('ctrl', 's')")))
    );
    // A file missing in the guest scores 0.
    g.state.lock().expect("lock").files.clear();
    assert_eq!(env.evaluate(Some(&done)).await.expect("eval"), 0.0);
}

#[tokio::test]
async fn unsupported_task_is_refused_before_touching_the_guest() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    let err = env
        .reset(&task("chrome/e1e75309-3ddb-4d09-92ec-de869c928143.json"))
        .await
        .expect_err("unsupported");
    match &err {
        EnvError::Unsupported { reason, .. } => {
            assert!(reason.contains("setup step chrome_open_tabs"), "{reason}");
            assert!(reason.contains("metric compare_pdfs"), "{reason}");
            assert!(reason.contains("getter pdf_from_url"), "{reason}");
        }
        other => panic!("wrong error {other:?}"),
    }
    assert_eq!(g.state.lock().expect("lock").requests, 0);
}

#[tokio::test]
async fn server_errors_are_retried_then_end_the_episode_and_the_env_recovers() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    let t = task(IDLE_DELAY);
    env.reset(&t).await.expect("reset");
    let click = Action::Click {
        point: Point::new(1.0, 1.0),
    };
    // Two 500s, then success: the retries hide them.
    g.state.lock().expect("lock").fail_next = 2;
    env.step(&click).await.expect("retried");
    // Persistent 500s: the screenshot cannot be had, the episode ends with the reason.
    g.state.lock().expect("lock").fail_next = 100;
    let err = env.step(&click).await.expect_err("500s");
    assert!(!err.episode_can_continue());
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert!(matches!(env.step(&click).await, Err(EnvError::NotReset)));
    // Healthy again: the same env resets and runs.
    g.state.lock().expect("lock").fail_next = 0;
    env.reset(&t).await.expect("reset again");
    env.step(&click).await.expect("step");
}

#[tokio::test]
async fn a_hanging_guest_times_out_and_the_env_recovers() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    let t = task(IDLE_DELAY);
    env.reset(&t).await.expect("reset");
    g.state.lock().expect("lock").hang = true;
    let started = Instant::now();
    let err = env
        .step(&Action::Press { key: "a".into() })
        .await
        .expect_err("hang");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, EnvError::Timeout { .. }), "{err:?}");
    g.state.lock().expect("lock").hang = false;
    env.reset(&t).await.expect("reset again");
}

#[tokio::test]
async fn server_down_mid_episode_ends_it_and_a_restarted_server_is_used_again() {
    let state = Arc::new(Mutex::new(Script::default()));
    let mut g = FakeGuest::start(state.clone());
    let addr = g.addr;
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    let t = task(IDLE_DELAY);
    env.reset(&t).await.expect("reset");
    g.stop();
    let err = env
        .step(&Action::Hotkey {
            keys: vec!["ctrl".into(), "s".into()],
        })
        .await
        .expect_err("down");
    assert!(matches!(err, EnvError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    // Down during reset: the reset fails with the reason, after its retries.
    assert!(env.reset(&t).await.is_err());
    let _g2 = FakeGuest::start_on(state, addr);
    env.reset(&t).await.expect("reset on the restarted server");
    env.step(&Action::Wait).await.expect("step");
}

#[tokio::test]
async fn a_screenshot_that_is_not_an_image_is_rejected() {
    let g = guest();
    g.state.lock().expect("lock").bad_screenshot = Some(b"<html>oops</html>".to_vec());
    let client = GuestClient::new(&g.url(), GuestConfig::default()).expect("client");
    let err = client.screenshot().await.expect_err("not an image");
    assert!(matches!(err, VmwareError::BadScreenshot { .. }), "{err:?}");
    assert!(err.to_string().contains("neither PNG nor JPEG"), "{err}");
}

#[tokio::test]
async fn file_paths_with_form_reserved_characters_reach_the_guest_intact() {
    let g = guest();
    // Space, '+', '&', '=', '%', '*', a quote and non-ASCII: each means something in a form body.
    // `near` is what a wrong encoding would make of `path` ('+' and "%20" decoded as spaces).
    let path = "/home/user/My Files/a+b&c=d%20e*f'g\u{e9}\u{4e2d}.txt";
    let near = "/home/user/My Files/a b&c=d e*f'g\u{e9}\u{4e2d}.txt";
    {
        let mut s = g.state.lock().expect("lock");
        s.files.insert(path.into(), b"exact".to_vec());
        s.files.insert(near.into(), b"near".to_vec());
    }
    let client = GuestClient::new(&g.url(), GuestConfig::default()).expect("client");
    for (asked, served) in [(path, &b"exact"[..]), (near, &b"near"[..])] {
        assert_eq!(
            client.file(asked).await.expect("file").as_deref(),
            Some(served),
            "{asked}"
        );
    }
    assert_eq!(
        client.file("/home/user/none.txt").await.expect("file"),
        None
    );
}

#[tokio::test]
async fn off_screen_points_are_rejected_and_the_episode_goes_on() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    env.reset(&task(IDLE_DELAY)).await.expect("reset");
    let err = env
        .step(&Action::Click {
            point: Point::new(500.0, 10.0),
        })
        .await
        .expect_err("off screen");
    assert!(err.episode_can_continue());
    env.step(&Action::Wait).await.expect("still running");
}

/// A task whose score depends only on the guest's `/home/user/answer.txt`.
fn answer_task() -> Task {
    OsworldTask::from_json(
        r#"{"id": "answer", "instruction": "Write right into answer.txt",
            "config": [{"type": "execute", "parameters": {"command": ["cat", "/home/user/answer.txt"], "stdout": "seen.txt"}}],
            "evaluator": {"func": "check_list",
                          "result": {"type": "vm_file", "path": "/home/user/answer.txt", "dest": "answer.txt"},
                          "expected": {"type": "rule", "rules": {"expect": ["^right$"], "unexpect": []}}}}"#,
    )
    .expect("task")
    .to_task(Some("os"))
}

#[tokio::test]
async fn four_envs_resetting_one_task_at_once_each_score_their_own_file() {
    let contents = ["right\n", "wrong 1\n", "right\n", "wrong 3\n"];
    let guests: Vec<FakeGuest> = contents
        .iter()
        .map(|c| {
            let g = guest();
            g.state
                .lock()
                .expect("lock")
                .files
                .insert("/home/user/answer.txt".into(), c.as_bytes().to_vec());
            g
        })
        .collect();
    let urls: Vec<String> = guests.iter().map(FakeGuest::url).collect();
    let cache = tempfile::tempdir().expect("tmp");
    // The same builder the trainer's setup uses for remote guests.
    let envs = remote_pool(&urls, &config(cache.path()));
    let Ok([mut a, mut b, mut c, mut d]) = <[OsworldEnv; 4]>::try_from(envs) else {
        panic!("four envs");
    };
    let t = answer_task();
    let (ra, rb, rc, rd) = tokio::join!(a.reset(&t), b.reset(&t), c.reset(&t), d.reset(&t));
    for r in [ra, rb, rc, rd] {
        r.expect("reset");
    }
    let done = Action::Finished { content: None };
    let (sa, sb, sc, sd) = tokio::join!(
        a.evaluate(Some(&done)),
        b.evaluate(Some(&done)),
        c.evaluate(Some(&done)),
        d.evaluate(Some(&done))
    );
    let scores: Vec<f64> = [sa, sb, sc, sd]
        .into_iter()
        .map(|s| s.expect("evaluate"))
        .collect();
    assert_eq!(scores, [1.0, 0.0, 1.0, 0.0]);
    // Each env fetched its own guest's file into its own cache folder.
    let mut folders = std::collections::BTreeSet::new();
    for (i, content) in contents.iter().enumerate() {
        let task_cache = cache
            .path()
            .join(format!("env{i}"))
            .join("tasks")
            .join("answer");
        let got = std::fs::read_to_string(task_cache.join("answer.txt")).expect("answer file");
        assert_eq!(&got, content, "env {i}");
        folders.insert(task_cache);
    }
    assert_eq!(folders.len(), 4);
}

#[tokio::test]
async fn an_upload_path_out_of_the_examples_folder_is_refused_before_anything_is_read() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), config(cache.path()));
    for local in ["../secret.txt", "/etc/passwd"] {
        let t = OsworldTask::from_json(&format!(
            r#"{{"id": "up", "instruction": "x",
                "config": [{{"type": "launch", "parameters": {{"command": ["true"]}}}},
                           {{"type": "upload_file", "parameters": {{"files": [{{"local_path": "{local}", "path": "/tmp/x"}}]}}}}],
                "evaluator": {{"func": "infeasible"}}}}"#
        ))
        .expect("task")
        .to_task(None);
        let err = env.reset(&t).await.expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("upload_file local_path") && text.contains(local),
            "{text}"
        );
    }
    // Refused before the guest saw anything (not even the launch before it).
    assert_eq!(g.state.lock().expect("lock").requests, 0);
}

#[tokio::test]
async fn downloads_past_the_size_cap_stop_with_a_named_error_and_leave_nothing() {
    let g = guest();
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("blob.bin");
    let url = format!("{}/blob", g.url());
    let err = arpo_env_vmware::setup::fetch_cached(&url, &dest, Duration::from_secs(5), 1000)
        .await
        .expect_err("too large");
    match &err {
        VmwareError::DownloadTooLarge { limit, seen, .. } => {
            assert_eq!(*limit, 1000);
            assert!(*seen > 1000);
        }
        other => panic!("wrong error {other:?}"),
    }
    assert!(err.to_string().contains("max_download_bytes"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    arpo_env_vmware::setup::fetch_cached(&url, &dest, Duration::from_secs(5), 2 << 20)
        .await
        .expect("under the cap");
    assert_eq!(std::fs::metadata(&dest).expect("file").len(), 1 << 20);
}

// OSWorld's own evaluator through the worker (`python/osworld_worker.py`).

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The worker's interpreter: `ARPO_OSWORLD_PYTHON`, else `.venv-osworld/bin/python` (made by
/// `.ci/run`). `None` (the test skips, saying why) only when it is missing and
/// `ARPO_REQUIRE_OSWORLD` is not set.
fn osworld_python() -> Option<String> {
    let python = std::env::var("ARPO_OSWORLD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".venv-osworld/bin/python"));
    if python.exists() {
        return Some(python.display().to_string());
    }
    if std::env::var_os("ARPO_REQUIRE_OSWORLD").is_some() {
        panic!(
            "ARPO_REQUIRE_OSWORLD is set but {} is missing: run .ci/run (it makes the virtualenv) or the README's install",
            python.display()
        );
    }
    println!(
        "skipped: no OSWorld evaluator at {} (make it as .ci/run does, or set ARPO_REQUIRE_OSWORLD to make this a failure)",
        python.display()
    );
    None
}

fn osworld_config(cache: &Path, python: &str) -> EnvConfig {
    EnvConfig {
        osworld: OsworldEvaluatorConfig {
            evaluator: EvaluatorBackend::Osworld,
            python: python.to_owned(),
            // easyocr (torch) stands in: only compare_image_text uses it, and no test does.
            pythonpath: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/pystub")],
            timeout: Duration::from_secs(120),
            ..OsworldEvaluatorConfig::default()
        },
        ..config(cache)
    }
}

fn shared_task(rel: &str) -> Option<OsworldTask> {
    let path = crate::support::osworld_examples()
        .unwrap_or_else(|| repo_root().join("../shared/osworld/evaluation_examples/examples"))
        .join(rel);
    if path.is_file() {
        return Some(OsworldTask::load(&path).expect("task"));
    }
    if std::env::var_os("ARPO_REQUIRE_OSWORLD").is_some() {
        panic!(
            "ARPO_REQUIRE_OSWORLD is set but OSWorld's task file {} is missing",
            path.display()
        );
    }
    println!("skipped: OSWorld's task file {} is absent", path.display());
    None
}

/// Points every cloud_file getter at the fake guest's `/cloud/<dest>`.
fn local_cloud(getter: &mut Value, base: &str) {
    match getter {
        Value::Array(items) => items.iter_mut().for_each(|g| local_cloud(g, base)),
        Value::Object(g) if g.get("type") == Some(&json!("cloud_file")) => {
            let url = |dest: &Value| json!(format!("{base}/cloud/{}", dest.as_str().unwrap_or("")));
            let new_path = match g.get("dest") {
                Some(Value::Array(dests)) => Value::Array(dests.iter().map(url).collect()),
                Some(dest) => url(dest),
                None => return,
            };
            g.insert("path".into(), new_path);
        }
        _ => {}
    }
}

#[tokio::test]
async fn every_domain_is_scored_by_osworlds_own_evaluator_as_osworld_scores_it() {
    let Some(python) = osworld_python() else {
        return;
    };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/osworld_eval");
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("record.json")).expect("record"),
    )
    .expect("record json");
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(&g.url(), osworld_config(cache.path(), &python));
    // Tasks we also have natively are scored both ways.
    let mut native = OsworldEnv::remote(&g.url(), config(&cache.path().join("native")));
    let done = Action::Finished { content: None };
    let mut domains = Vec::new();
    let mut both_ways = 0;
    for entry in record["tasks"].as_array().expect("tasks") {
        let domain = entry["domain"].as_str().expect("domain");
        let Some(mut task) = shared_task(entry["task"].as_str().expect("task")) else {
            return;
        };
        // Setup downloads from the internet; the fake guest serves the files instead.
        task.config.clear();
        for key in ["result", "expected"] {
            if let Some(getter) = task.evaluator.get_mut(key) {
                local_cloud(getter, &g.url());
            }
        }
        for (which, case) in entry["cases"].as_object().expect("cases") {
            {
                let mut s = g.state.lock().expect("lock");
                s.files.clear();
                s.cloud.clear();
                s.outputs.clear();
                let read = |v: &Value| {
                    std::fs::read(fixtures.join(v.as_str().expect("file"))).expect("fixture")
                };
                for (guest_path, file) in case["files"].as_object().expect("files") {
                    s.files.insert(guest_path.clone(), read(file));
                }
                for (dest, file) in case["cloud"].as_object().expect("cloud") {
                    s.cloud.insert(dest.clone(), read(file));
                }
                for (command, output) in case["outputs"].as_object().expect("outputs") {
                    let command: Value = serde_json::from_str(command).expect("command json");
                    s.outputs.insert(
                        command.to_string(),
                        output.as_str().expect("output").to_owned(),
                    );
                }
            }
            env.reset(&task.to_task(Some(domain))).await.expect("reset");
            let started = Instant::now();
            let score = env.evaluate(Some(&done)).await.expect("evaluate");
            let osworld = case["osworld_direct"]["score"].as_f64().expect("score");
            println!(
                "{domain} {which}: {score} through the worker in {:.4} s; OSWorld's {} called directly: {osworld}",
                started.elapsed().as_secs_f64(),
                case["osworld_direct"]["func"]
            );
            assert!(
                (score - osworld).abs() < 1e-9,
                "{domain} {which}: {score} vs OSWorld's {osworld}"
            );
            if task.unsupported().is_empty() {
                native
                    .reset(&task.to_task(Some(domain)))
                    .await
                    .expect("native reset");
                let started = Instant::now();
                let native_score = native.evaluate(Some(&done)).await.expect("native");
                println!(
                    "{domain} {which}: {native_score} natively in {:.4} s",
                    started.elapsed().as_secs_f64()
                );
                assert_eq!(native_score, score, "{domain} {which}: native vs OSWorld");
                both_ways += 1;
            }
            if which == "correct" {
                assert_eq!(score, 1.0, "{domain}");
            } else {
                assert!(score < 1.0, "{domain}");
            }
        }
        domains.push(domain.to_owned());
    }
    domains.sort();
    assert_eq!(
        domains,
        [
            "chrome",
            "gimp",
            "libreoffice_calc",
            "libreoffice_impress",
            "libreoffice_writer",
            "multi_apps",
            "os",
            "thunderbird",
            "vlc",
            "vs_code"
        ]
    );
    assert_eq!(
        env.worker().starts(),
        1,
        "one worker served every evaluation"
    );
    assert!(both_ways >= 2, "the os task runs natively too");
}

#[tokio::test]
async fn the_worker_knows_the_bundled_names_and_is_restarted_after_dying() {
    let Some(python) = osworld_python() else {
        return;
    };
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let env = OsworldEnv::remote(&g.url(), osworld_config(cache.path(), &python));
    let started = Instant::now();
    let names = env.check_evaluator().await.expect("hello").expect("names");
    println!(
        "worker started and imported desktop_env in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(names, arpo_env_vmware::OsworldNames::bundled());
    assert!(names.has_metric("compare_table") && names.has_getter("vm_file"));
    let pid = env.worker().pid().await.expect("running");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next request finds it dead and starts a new worker.
    let names = env.worker().hello().await.expect("restarted");
    assert_eq!(names.desktop_env, "1.0.2");
    assert_eq!(env.worker().starts(), 2);
    assert_ne!(env.worker().pid().await, Some(pid));
}

#[tokio::test]
async fn a_worker_that_does_not_answer_is_killed_at_the_timeout_and_restarted() {
    let dir = tempfile::tempdir().expect("tmp");
    let silent = dir.path().join("silent-python");
    std::fs::write(&silent, "#!/bin/sh\nexec sleep 30\n").expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&silent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let worker = arpo_env_vmware::OsworldWorker::new(
        arpo_env_vmware::WorkerConfig {
            python: silent.display().to_string(),
            pythonpath: Vec::new(),
            timeout: Duration::from_millis(300),
            start_timeout: Duration::from_millis(200),
            workdir: None,
        },
        dir.path(),
    );
    let started = Instant::now();
    let err = worker.hello().await.expect_err("timeout");
    assert!(matches!(err, VmwareError::WorkerTimeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(worker.pid().await, None, "killed");
    let _ = worker.hello().await;
    assert_eq!(worker.starts(), 2);
}

#[tokio::test]
async fn a_missing_evaluator_is_reported_with_the_install_command_before_the_guest_is_touched() {
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut env = OsworldEnv::remote(
        &g.url(),
        osworld_config(cache.path(), "/nonexistent/python3"),
    );
    let err = env
        .reset(&task("chrome/e1e75309-3ddb-4d09-92ec-de869c928143.json"))
        .await
        .expect_err("no worker");
    let text = err.to_string();
    assert!(
        text.contains("pip install --no-deps desktop-env==1.0.2"),
        "{text}"
    );
    assert_eq!(g.state.lock().expect("lock").requests, 0);
}

#[tokio::test]
async fn a_step_we_lack_runs_through_osworlds_setup_controller_in_order_with_native_ones() {
    let Some(python) = osworld_python() else {
        return;
    };
    let g = guest();
    let cache = tempfile::tempdir().expect("tmp");
    let mut config = osworld_config(cache.path(), &python);
    config.osworld.evaluator = EvaluatorBackend::Auto;
    let mut env = OsworldEnv::remote(&g.url(), config);
    let t = OsworldTask::from_json(
        r#"{"id": "wallpaper", "instruction": "x",
            "config": [{"type": "launch", "parameters": {"command": ["first"]}},
                       {"type": "change_wallpaper", "parameters": {"path": "/home/user/w.png"}},
                       {"type": "launch", "parameters": {"command": ["last"]}}],
            "evaluator": {"func": "exact_match",
                          "result": {"type": "vm_command_line", "command": ["cat", "/tmp/x"]},
                          "expected": {"type": "rule", "rules": {"expected": "done"}}}}"#,
    )
    .expect("task");
    assert_eq!(t.unsupported(), ["setup step change_wallpaper"]);
    set_output(&g, json!(["cat", "/tmp/x"]), "done");
    env.reset(&t.to_task(None)).await.expect("reset");
    {
        let s = g.state.lock().expect("lock");
        let calls: Vec<(&str, &Value)> =
            s.setup_calls.iter().map(|(e, b)| (e.as_str(), b)).collect();
        assert_eq!(
            calls,
            [
                (
                    "/setup/launch",
                    &json!({"command": ["first"], "shell": false})
                ),
                (
                    "/setup/change_wallpaper",
                    &json!({"path": "/home/user/w.png"})
                ),
                (
                    "/setup/launch",
                    &json!({"command": ["last"], "shell": false})
                ),
            ]
        );
    }
    // auto: a step we lack sends the whole task to OSWorld's evaluator.
    let done = Action::Finished { content: None };
    assert_eq!(env.evaluate(Some(&done)).await.expect("eval"), 1.0);
    set_output(&g, json!(["cat", "/tmp/x"]), "not yet");
    assert_eq!(env.evaluate(Some(&done)).await.expect("eval"), 0.0);
    assert_eq!(
        env.evaluate(Some(&Action::CallUser)).await.expect("eval"),
        0.0
    );
}

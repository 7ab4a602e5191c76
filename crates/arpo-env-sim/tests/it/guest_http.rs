//! The OSWorld guest protocol over real HTTP (a loopback port, as `cargo xtask sim-guest` serves
//! it) against in-process stepping.
//!
//! Each oracle action is sent the way an OSWorld host sends it: `POST /execute` with
//! `["python", "-c", "import pyautogui; import time; pyautogui.FAILSAFE = False; <program>"]`.
//! The programs are written here by hand after `arpo_env_vmware::pyautogui::guest_command`
//! (the UI-TARS mapping); this crate cannot depend on `arpo-env-vmware`, which dev-depends on it.
//! One difference: `<` is written as it is, where `guest_command` sends `hotkey('shift', ',')`
//! (which the simulated keyboard types as `,`); no oracle types a `<`.

use arpo_core::{Action, Environment, Point, ScrollDirection};
use arpo_env_sim::guest::{GuestState, SCORE_FILE, STATE_FILE, TASK_FILE, serve};
use arpo_env_sim::{Catalogue, SimEnv, TaskSpec};
use serde_json::{Value, json};

/// What OSWorld's `PythonController` puts in front of every action program.
const PREFIX: &str = "import pyautogui; import time; pyautogui.FAILSAFE = False; ";

// ------------------------------------------------------------------------------ the server

/// A guest server on a loopback port, and a client for it.
struct Guest {
    base: String,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Guest {
    async fn start(width: u32, height: u32) -> Guest {
        let state = GuestState::new(width, height).expect("screen size");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let server = tokio::spawn(serve(listener, state));
        Guest {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /setup/sim` (OSWorld's setup step of type `sim`): status and body.
    async fn setup_sim(&self, parameters: &Value) -> (u16, String) {
        let r = self
            .http
            .post(self.url("/setup/sim"))
            .json(parameters)
            .send()
            .await
            .expect("POST /setup/sim");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    /// `POST /execute` with a command (a list of words or a shell string): the JSON answer.
    async fn execute(&self, command: Value) -> Value {
        let r = self
            .http
            .post(self.url("/execute"))
            .json(&json!({ "command": command, "shell": false }))
            .send()
            .await
            .expect("POST /execute");
        assert!(r.status().is_success(), "/execute answered {}", r.status());
        r.json().await.expect("/execute answers JSON")
    }

    /// Runs a pyautogui program the way OSWorld does.
    async fn run_program(&self, program: &str) -> Value {
        self.execute(json!(["python", "-c", format!("{PREFIX}{program}")]))
            .await
    }

    /// `GET /screenshot`, decoded: (width, height, RGB).
    async fn screenshot(&self) -> (u32, u32, Vec<u8>) {
        let r = self
            .http
            .get(self.url("/screenshot"))
            .send()
            .await
            .expect("GET /screenshot");
        assert!(
            r.status().is_success(),
            "/screenshot answered {}",
            r.status()
        );
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(content_type.as_deref(), Some("image/png"));
        decode(&r.bytes().await.expect("body"))
    }

    /// `POST /file` (form-encoded, as OSWorld's getters send it): status and body.
    async fn file(&self, path: &str) -> (u16, Vec<u8>) {
        let r = self
            .http
            .post(self.url("/file"))
            .form(&[("file_path", path)])
            .send()
            .await
            .expect("POST /file");
        let status = r.status().as_u16();
        (status, r.bytes().await.expect("body").to_vec())
    }

    async fn json_file(&self, path: &str) -> Value {
        let (status, body) = self.file(path).await;
        assert_eq!(status, 200, "{path}");
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
    }

    async fn score_file(&self) -> String {
        let (status, body) = self.file(SCORE_FILE).await;
        assert_eq!(status, 200, "{SCORE_FILE}");
        String::from_utf8(body).expect("utf-8").trim().to_string()
    }

    async fn cursor(&self) -> Value {
        self.http
            .get(self.url("/cursor_position"))
            .send()
            .await
            .expect("GET /cursor_position")
            .json()
            .await
            .expect("JSON")
    }
}

fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory(png).expect("png decodes").to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

// ------------------------------------------------------------------------------ actions as pyautogui

/// `text` as a single-quoted, pure-ASCII Python string literal.
fn py_str(text: &str) -> String {
    let mut out = String::from("'");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('\'');
    out
}

/// UI-TARS key names as pyautogui's.
fn key_name(key: &str) -> String {
    let trimmed = key.trim();
    let lower = trimmed.to_lowercase();
    match lower.as_str() {
        "arrowleft" => "left".into(),
        "arrowright" => "right".into(),
        "arrowup" => "up".into(),
        "arrowdown" => "down".into(),
        "space" => " ".into(),
        _ if trimmed.chars().count() == 1 => trimmed.into(),
        _ => lower,
    }
}

fn xy(p: Point) -> String {
    let (x, y) = p.rounded();
    format!("{x}, {y}")
}

/// The program OSWorld runs for one action; `None` for `wait`, `finished` and `call_user`
/// (OSWorld's WAIT, DONE and FAIL run nothing in the guest).
fn program(action: &Action) -> Option<String> {
    let lines: Vec<String> = match action {
        Action::Wait | Action::Finished { .. } | Action::CallUser => return None,
        Action::Click { point } => vec![format!("pyautogui.click({}, button='left')", xy(*point))],
        Action::LeftDouble { point } => vec![format!(
            "pyautogui.doubleClick({}, button='left')",
            xy(*point)
        )],
        Action::RightSingle { point } => {
            vec![format!("pyautogui.click({}, button='right')", xy(*point))]
        }
        Action::Hover { point } => vec![format!("pyautogui.moveTo({})", xy(*point))],
        Action::Drag { from, to } => vec![
            format!("pyautogui.moveTo({})", xy(*from)),
            format!("pyautogui.dragTo({}, duration=1.0)", xy(*to)),
        ],
        Action::Scroll { point, direction } => {
            let amount = match direction {
                ScrollDirection::Up => 5,
                ScrollDirection::Down => -5,
                ScrollDirection::Left | ScrollDirection::Right => {
                    panic!("oracles never scroll sideways (the sim guest has no hscroll)")
                }
            };
            vec![match point {
                Some(p) => {
                    let (x, y) = p.rounded();
                    format!("pyautogui.scroll({amount}, x={x}, y={y})")
                }
                None => format!("pyautogui.scroll({amount})"),
            }]
        }
        Action::Hotkey { keys } if keys.is_empty() => vec![],
        Action::Hotkey { keys } => {
            let keys: Vec<String> = keys.iter().map(|k| py_str(&key_name(k))).collect();
            vec![format!("pyautogui.hotkey({})", keys.join(", "))]
        }
        Action::Press { key } => vec![format!("pyautogui.press({})", py_str(&key_name(key)))],
        Action::KeyDown { key } => vec![format!("pyautogui.keyDown({})", py_str(&key_name(key)))],
        Action::KeyUp { key } => vec![format!("pyautogui.keyUp({})", py_str(&key_name(key)))],
        Action::Type { content } => {
            let submit = content.ends_with('\n');
            let text = content.strip_suffix('\n').unwrap_or(content);
            let mut lines = Vec::new();
            if !text.is_empty() {
                lines.push(format!("pyautogui.write({}, interval=0.1)", py_str(text)));
            }
            if submit {
                lines.push("pyautogui.press('enter')".into());
            }
            lines
        }
    };
    // An empty hotkey or an empty text is OSWorld's WAIT too.
    (!lines.is_empty()).then(|| lines.join("\n"))
}

// ------------------------------------------------------------------------------ the comparison

/// The OSWorld score of the guest's episode: infeasible tasks are scored by the host from the
/// last action (`FAIL` = `call_user`), the others from the score file.
async fn http_score(guest: &Guest, last: Option<&Action>) -> f64 {
    let task = guest.json_file(TASK_FILE).await;
    let score = guest.score_file().await;
    if task["infeasible"].as_bool().unwrap_or(false) {
        assert_eq!(score, "0", "an infeasible task's score file reads 0");
        if matches!(last, Some(Action::CallUser)) {
            1.0
        } else {
            0.0
        }
    } else {
        match score.as_str() {
            "1" if !matches!(last, Some(Action::CallUser)) => 1.0,
            "1" | "0" => 0.0,
            other => panic!("score file reads {other:?}"),
        }
    }
}

/// Loads `spec` over HTTP and in process, plays its oracle on both, and compares the screens
/// (after every step when `every_step`, else at the end), the desktop state, the pointer and the
/// score. `by_id` loads the task by id only, else with OSWorld's setup step (id and spec).
async fn compare_oracle(
    guest: &Guest,
    spec: &TaskSpec,
    size: (u32, u32),
    by_id: bool,
    every_step: bool,
) {
    let id = spec.id.as_str();
    let parameters = if by_id {
        json!({ "task_id": id })
    } else {
        let osworld = Catalogue::osworld_json(spec);
        let step = &osworld["config"][0];
        assert_eq!(step["type"], "sim", "{id}");
        step["parameters"].clone()
    };
    let (status, body) = guest.setup_sim(&parameters).await;
    assert_eq!(
        (status, body.as_str()),
        (200, format!("loaded {id}").as_str())
    );
    assert_eq!(
        guest.json_file(TASK_FILE).await,
        serde_json::to_value(spec).expect("spec to JSON"),
        "{id}: task file"
    );
    if !spec.infeasible {
        assert_eq!(
            guest.score_file().await,
            "0",
            "{id}: solved before any action"
        );
    }

    let task = spec.to_task();
    let mut env = SimEnv::with_size(size.0, size.1)
        .expect("size")
        .with_max_steps(100);
    let first = env.reset(&task).await.expect("reset");
    let oracle = arpo_env_sim::oracle_at(&task, size.0, size.1).expect("oracle");
    let mut png = first.screenshot.bytes;
    if every_step {
        assert!(
            guest.screenshot().await == decode(&png),
            "{id}: first screen"
        );
    }
    for (i, a) in oracle.iter().enumerate() {
        let step = env
            .step(a)
            .await
            .unwrap_or_else(|e| panic!("{id} step {i} {a:?}: {e}"));
        png = step.observation.screenshot.bytes;
        if let Some(code) = program(a) {
            let out = guest.run_program(&code).await;
            assert_eq!(
                (
                    out["status"].as_str(),
                    out["returncode"].as_i64(),
                    out["error"].as_str()
                ),
                (Some("success"), Some(0), Some("")),
                "{id} step {i}: {code}"
            );
        }
        if every_step {
            let (w, h, rgb) = guest.screenshot().await;
            let (ew, eh, expected) = decode(&png);
            assert_eq!((w, h), (ew, eh), "{id} step {i}: size");
            let differing = rgb
                .chunks_exact(3)
                .zip(expected.chunks_exact(3))
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 0, "{id} step {i} {a:?}: pixels differ");
        }
    }
    let (w, h, rgb) = guest.screenshot().await;
    assert_eq!((w, h), size, "{id}");
    assert!(rgb == decode(&png).2, "{id}: final screens differ");

    let session = env.session().expect("session");
    assert_eq!(
        guest.json_file(STATE_FILE).await,
        serde_json::to_value(&session.desktop).expect("desktop to JSON"),
        "{id}: final desktop state"
    );
    let (px, py) = session.desktop.pointer;
    let k = session.scale as i32;
    assert_eq!(
        guest.cursor().await,
        json!([px * k, py * k]),
        "{id}: pointer"
    );

    let last = oracle.last();
    let local = env.evaluate(last).await.expect("evaluate");
    assert_eq!(local, 1.0, "{id}: the oracle scores in process");
    assert_eq!(
        http_score(guest, last).await,
        local,
        "{id}: the score over HTTP"
    );
}

/// One training task of every family (instance 0) and one held-out task of every family.
fn sample_specs(c: &Catalogue) -> Vec<(TaskSpec, bool)> {
    let mut out = Vec::new();
    for (fi, family) in Catalogue::families().into_iter().enumerate() {
        let train = c
            .spec(&format!("sim-{family}-train-000"))
            .expect("train task");
        out.push((train.clone(), false));
        let heldout = c
            .spec(&format!(
                "sim-{family}-heldout-{:03}",
                fi % arpo_env_sim::HELDOUT_PER_FAMILY
            ))
            .expect("held-out task");
        out.push((heldout.clone(), true));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracles_over_http_reach_the_in_process_final_state_and_score() {
    let c = Catalogue::default();
    let specs = sample_specs(&c);
    assert_eq!(specs.len(), 2 * Catalogue::families().len());
    let guest = Guest::start(336, 224).await;
    // The oracles use every kind of action an agent has but hover, keydown and keyup.
    let kinds: std::collections::BTreeSet<&str> = specs
        .iter()
        .flat_map(|(s, _)| c.oracle(&s.to_task()).expect("oracle"))
        .map(|a| a.name())
        .collect();
    for kind in [
        "click",
        "left_double",
        "right_single",
        "drag",
        "type",
        "hotkey",
        "scroll",
        "finished",
        "call_user",
    ] {
        assert!(kinds.contains(kind), "no oracle uses {kind}: {kinds:?}");
    }
    for (spec, by_id) in &specs {
        // Held-out tasks are loaded by id, training ones with OSWorld's full setup step.
        compare_oracle(&guest, spec, (336, 224), *by_id, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracles_over_http_match_at_osworld_screen_size() {
    let c = Catalogue::default();
    let guest = Guest::start(1920, 1080).await;
    for id in [
        "sim-drag_file-train-001",
        "sim-slider-heldout-002",
        "sim-scroll_list-train-003",
        "sim-dialog-train-004",
    ] {
        let spec = c.spec(id).expect("known task");
        compare_oracle(&guest, spec, (1920, 1080), false, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_rejects_anything_but_pyautogui_with_a_reason() {
    let c = Catalogue::default();
    let guest = Guest::start(336, 224).await;
    let spec = c.spec("sim-colour_button-train-000").expect("task");
    let (status, _) = guest.setup_sim(&json!({ "task_id": spec.id })).await;
    assert_eq!(status, 200);
    // A click that does something here: the oracle's first one (on the right button).
    let oracle = c.oracle(&spec.to_task()).expect("oracle");
    let Some(Action::Click { point }) = oracle.first() else {
        panic!("the oracle starts with a click: {oracle:?}")
    };
    let click = format!("pyautogui.click({}, button='left')", xy(*point));

    let py = |code: &str| json!(["python", "-c", format!("{PREFIX}{code}")]);
    let cases: Vec<(Value, &str)> = vec![
        (py("import os"), "only pyautogui and time may be imported"),
        (
            py("import pyautogui, subprocess"),
            "only pyautogui and time",
        ),
        (py("os.system('touch /tmp/pwned')"), "not allowed"),
        (py("__import__('os').system('id')"), "not allowed"),
        (py("exec('import os')"), "not allowed"),
        (py("eval('1 + 1')"), "not allowed"),
        (py("open('/etc/passwd').read()"), "not allowed"),
        (py("x = 1"), "not allowed"),
        (py("pyautogui.screenshot('/tmp/shot.png')"), "not supported"),
        (py("pyautogui.hscroll(5)"), "not supported"),
        (py("time.time()"), "not supported"),
        (py("pyautogui.click(x, 10)"), "only literals"),
        (py("pyautogui.write(f'{1 + 1}')"), "f-strings"),
        (py("pyautogui.click(10, 10, foo=1)"), "unexpected keyword"),
        (
            py("pyautogui.press('a') if True else None"),
            "end of the statement",
        ),
        (py("pyautogui.write('unterminated)"), "unterminated"),
        // Nothing of a rejected program runs, not even the statements before the bad one.
        (
            py(&format!("{click}\nimport shutil")),
            "only pyautogui and time",
        ),
        (py(&format!("{click}; os.remove('/x')")), "not allowed"),
        // A call that parses but is refused: an off-screen point.
        (py("pyautogui.click(-5, 10)"), "outside"),
        (py("pyautogui.click(10, 100000)"), "outside"),
        (py("pyautogui.press('definitely-not-a-key')"), "unknown key"),
        // Not `python -c <program>`.
        (json!(["bash", "-c", "ls"]), "only `python -c"),
        (json!(["python", "script.py"]), "only `python -c"),
        (
            json!(["python", "-c", "import pyautogui", "extra"]),
            "only `python -c",
        ),
        (
            json!(format!("python -c \"{click}\"; rm -rf /")),
            "only `python -c",
        ),
        (json!(["python", "-c", 5]), "is not a string"),
        (
            json!({ "program": "pyautogui.click(1, 1)" }),
            "must be a list or a string",
        ),
        (
            json!("python -c 'pyautogui.click(1, 1)"),
            "unterminated quote",
        ),
    ];
    let state_before = guest.json_file(STATE_FILE).await;
    for (command, needle) in &cases {
        let out = guest.execute(command.clone()).await;
        assert_eq!(out["returncode"], 1, "{command}: {out}");
        let error = out["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{command}: the reason {error:?} should mention {needle:?}"
        );
        assert_eq!(
            guest.json_file(STATE_FILE).await,
            state_before,
            "{command} changed the desktop"
        );
    }
    // The same click alone runs (so the programs above were refused for what they added).
    let out = guest.run_program(&click).await;
    assert_eq!(
        (out["returncode"].as_i64(), out["error"].as_str()),
        (Some(0), Some(""))
    );
    assert_ne!(guest.json_file(STATE_FILE).await, state_before);
    // And the quoting of a shell string command is understood.
    let out = guest
        .execute(json!(format!(
            "python3 -c \"{PREFIX}pyautogui.write('a b')\""
        )))
        .await;
    assert_eq!(out["returncode"], 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_and_file_endpoints_answer_errors_with_reasons() {
    let guest = Guest::start(336, 224).await;
    let (status, body) = guest
        .setup_sim(&json!({ "task_id": "sim-nope-train-000" }))
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown task id"), "{body}");
    let (status, body) = guest.setup_sim(&json!({})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("task_id"), "{body}");
    let (status, body) = guest.file("/etc/passwd").await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains(SCORE_FILE));
    // Before any task, an empty desktop of the configured size.
    let (w, h, _) = guest.screenshot().await;
    assert_eq!((w, h), (336, 224));
}

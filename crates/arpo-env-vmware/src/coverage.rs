//! How much of an OSWorld task set can run, and how: natively, through OSWorld's own evaluator
//! (the worker), or not at all and why (`cargo xtask osworld-coverage` prints this).
//!
//! Reads the task files as OSWorld lays them out (`<tasks>/examples/<domain>/<id>.json`, or
//! `<tasks>/<domain>/<id>.json`), all of them or those an index (`test_all.json`) names. A file
//! that cannot be read or parsed is counted and listed with its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::VmwareError;
use crate::evaluate::EvaluatorNames;
use crate::setup::SetupStep;
use crate::task::{OsworldTask, find_task_files, load_index};
use crate::worker::OsworldNames;

/// How a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runs {
    /// Every setup step, getter and metric is native.
    Native,
    /// Through OSWorld's own evaluator (setup steps we have still run natively).
    Osworld,
    /// Neither: see the task's `reasons`.
    NotRunnable,
}

/// Tasks of one domain by how they run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DomainCount {
    pub tasks: usize,
    pub native: usize,
    pub osworld: usize,
    pub not_runnable: usize,
}

impl DomainCount {
    pub fn runnable(&self) -> usize {
        self.native + self.osworld
    }
}

/// One thing the native evaluators lack (`setup step X`, `getter Y`, `metric Z`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Need {
    pub name: String,
    /// Tasks that need it.
    pub tasks: usize,
    /// Tasks for which it is the only thing missing natively.
    pub only_missing: usize,
}

/// A task file that was read and parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskCoverage {
    pub domain: String,
    pub id: String,
    pub path: PathBuf,
    pub runs: Runs,
    /// What the native evaluators lack for it (empty when native).
    pub missing: Vec<String>,
    /// Why it cannot run at all (empty unless `not_runnable`).
    pub reasons: Vec<String>,
}

/// A task file that could not be read or parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub domain: String,
    pub path: PathBuf,
    pub error: String,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    pub examples: PathBuf,
    pub index: Option<PathBuf>,
    /// The OSWorld evaluator counted on (`None`: native only).
    pub osworld: Option<String>,
    /// Task files read and parsed.
    pub total: usize,
    pub native: usize,
    pub osworld_tasks: usize,
    pub not_runnable: usize,
    pub domains: BTreeMap<String, DomainCount>,
    /// What the native evaluators lack, by tasks that need it, most first.
    pub needs: Vec<Need>,
    /// Why tasks cannot run, by tasks, most first.
    pub blockers: Vec<Need>,
    pub tasks: Vec<TaskCoverage>,
    pub invalid: Vec<Failure>,
    pub not_found: Vec<Failure>,
}

impl Coverage {
    pub fn runnable(&self) -> usize {
        self.native + self.osworld_tasks
    }
}

/// Where the task files are: `<tasks>/examples` when it exists, else `<tasks>`.
pub fn examples_dir(tasks: &Path) -> PathBuf {
    let nested = tasks.join("examples");
    if nested.is_dir() {
        nested
    } else {
        tasks.to_path_buf()
    }
}

fn domain_of(examples: &Path, file: &Path) -> String {
    file.parent()
        .and_then(|p| p.strip_prefix(examples).ok())
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default()
}

/// Account settings a task reads (`evaluation_examples/settings/...`, Google and Google Drive
/// credentials that OSWorld's published set leaves out), with whether each is present.
pub fn settings_files(task: &OsworldTask, tasks_dir: &Path) -> Vec<(String, bool)> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => {
                if let Some(i) = s.find("settings/") {
                    let before = &s[..i];
                    if before.is_empty() || before.ends_with("evaluation_examples/") {
                        out.push(s[i..].to_owned());
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Object(map) => map.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for step in &task.config {
        walk(&step.parameters, &mut found);
    }
    walk(&task.evaluator, &mut found);
    found.sort();
    found.dedup();
    found
        .into_iter()
        .map(|rel| {
            let present = tasks_dir.join(&rel).is_file();
            (rel, present)
        })
        .collect()
}

/// How one task runs, what natively lacks, and why it cannot run.
pub fn classify(
    task: &OsworldTask,
    tasks_dir: &Path,
    osworld: Option<&OsworldNames>,
) -> (Runs, Vec<String>, Vec<String>) {
    let missing = task.unsupported();
    if let Some(VmwareError::TaskField { field, reason, .. }) = task.evaluator_problem() {
        return (
            Runs::NotRunnable,
            missing,
            vec![format!("field {field} {reason}")],
        );
    }
    let mut reasons: Vec<String> = settings_files(task, tasks_dir)
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(rel, _)| {
            format!("needs evaluation_examples/{rel} (the user's own account settings, not published with OSWorld): add it to run this task")
        })
        .collect();
    if missing.is_empty() && reasons.is_empty() {
        return (Runs::Native, missing, reasons);
    }
    let Some(names) = osworld else {
        reasons.extend(
            missing
                .iter()
                .map(|m| format!("{m} is not native (evaluator: native)")),
        );
        return (Runs::NotRunnable, missing, reasons);
    };
    for raw in &task.config {
        if SetupStep::parse(raw).is_err() && !names.has_setup_step(&raw.kind) {
            reasons.push(format!("setup step {} is in neither evaluator", raw.kind));
        }
    }
    let needs = EvaluatorNames::of(&task.evaluator);
    for m in needs.metrics.iter().filter(|m| !names.has_metric(m)) {
        reasons.push(format!(
            "metric {m} is not in desktop_env {}",
            names.desktop_env
        ));
    }
    for g in needs.getters.iter().filter(|g| !names.has_getter(g)) {
        reasons.push(format!(
            "getter {g} is not in desktop_env {}",
            names.desktop_env
        ));
    }
    for s in needs.postconfig.iter().filter(|s| !names.has_setup_step(s)) {
        reasons.push(format!(
            "postconfig step {s} is not in desktop_env {}",
            names.desktop_env
        ));
    }
    if reasons.is_empty() {
        (Runs::Osworld, missing, reasons)
    } else {
        (Runs::NotRunnable, missing, reasons)
    }
}

/// Reads every task of `tasks` (or of `index`) and says how each runs. `osworld`: the names
/// OSWorld's evaluator knows (`OsworldNames::bundled()`), or `None` to count native only.
pub fn coverage(
    tasks: &Path,
    index: Option<&Path>,
    osworld: Option<&OsworldNames>,
) -> Result<Coverage, VmwareError> {
    if !tasks.is_dir() {
        return Err(VmwareError::Read {
            path: tasks.to_path_buf(),
            reason: "not a folder: pass OSWorld's evaluation_examples folder (with examples/<domain>/<id>.json)".into(),
        });
    }
    let examples = examples_dir(tasks);
    let index = index.map(|i| {
        if !i.exists() && i.is_relative() && tasks.join(i).exists() {
            tasks.join(i)
        } else {
            i.to_path_buf()
        }
    });
    let entries: Vec<(String, PathBuf)> = match &index {
        Some(i) => load_index(i, &examples)?
            .into_iter()
            .map(|e| (e.domain, e.path))
            .collect(),
        None => find_task_files(&examples)?
            .into_iter()
            .map(|p| (domain_of(&examples, &p), p))
            .collect(),
    };
    if entries.is_empty() {
        return Err(VmwareError::Read {
            path: examples,
            reason: "no task files there (expected <domain>/<id>.json files)".into(),
        });
    }
    let mut report = Coverage {
        examples: examples.clone(),
        index,
        osworld: osworld.map(|n| format!("desktop_env {}", n.desktop_env)),
        total: 0,
        native: 0,
        osworld_tasks: 0,
        not_runnable: 0,
        domains: BTreeMap::new(),
        needs: Vec::new(),
        blockers: Vec::new(),
        tasks: Vec::new(),
        invalid: Vec::new(),
        not_found: Vec::new(),
    };
    let mut needs: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut blockers: BTreeMap<String, usize> = BTreeMap::new();
    for (domain, path) in entries {
        if !path.exists() {
            report.not_found.push(Failure {
                domain,
                error: "no such file".into(),
                path,
            });
            continue;
        }
        let task = match OsworldTask::load(&path) {
            Ok(t) => t,
            Err(e) => {
                report.invalid.push(Failure {
                    domain,
                    path,
                    error: e.to_string(),
                });
                continue;
            }
        };
        let (runs, missing, reasons) = classify(&task, tasks, osworld);
        let count = report.domains.entry(domain.clone()).or_default();
        count.tasks += 1;
        report.total += 1;
        match runs {
            Runs::Native => {
                count.native += 1;
                report.native += 1;
            }
            Runs::Osworld => {
                count.osworld += 1;
                report.osworld_tasks += 1;
            }
            Runs::NotRunnable => {
                count.not_runnable += 1;
                report.not_runnable += 1;
            }
        }
        for name in &missing {
            let n = needs.entry(name.clone()).or_default();
            n.0 += 1;
            if missing.len() == 1 {
                n.1 += 1;
            }
        }
        for r in &reasons {
            *blockers.entry(r.clone()).or_default() += 1;
        }
        report.tasks.push(TaskCoverage {
            domain,
            id: task.id,
            path,
            runs,
            missing,
            reasons,
        });
    }
    report.needs = needs
        .into_iter()
        .map(|(name, (tasks, only_missing))| Need {
            name,
            tasks,
            only_missing,
        })
        .collect();
    report.needs.sort_by_key(|n| std::cmp::Reverse(n.tasks));
    report.blockers = blockers
        .into_iter()
        .map(|(name, tasks)| Need {
            name,
            tasks,
            only_missing: tasks,
        })
        .collect();
    report.blockers.sort_by_key(|n| std::cmp::Reverse(n.tasks));
    Ok(report)
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn shown_domain(d: &str) -> &str {
    if d.is_empty() { "(top level)" } else { d }
}

/// The report as text: totals, a table by domain, what natively lacks, and with `verbose`
/// every task with how it runs.
pub fn render(report: &Coverage, verbose: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let source = match &report.index {
        Some(i) => format!("{} (index {})", report.examples.display(), i.display()),
        None => report.examples.display().to_string(),
    };
    let _ = writeln!(out, "OSWorld task coverage of {source}");
    let _ = writeln!(
        out,
        "runnable: {} of {} tasks ({:.1}%): {} native, {} via OSWorld's evaluator ({}); {} not runnable",
        report.runnable(),
        report.total,
        percent(report.runnable(), report.total),
        report.native,
        report.osworld_tasks,
        report
            .osworld
            .as_deref()
            .unwrap_or("not counted: evaluator native"),
        report.not_runnable,
    );
    if !report.invalid.is_empty() || !report.not_found.is_empty() {
        let _ = writeln!(
            out,
            "not counted: {} invalid task files, {} index entries without a file",
            report.invalid.len(),
            report.not_found.len()
        );
    }
    let width = report
        .domains
        .keys()
        .map(|d| shown_domain(d).len())
        .chain(["domain".len(), "total".len()])
        .max()
        .unwrap_or(6);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<width$}  {:>5}  {:>6}  {:>7}  {:>12}",
        "domain", "tasks", "native", "osworld", "not runnable"
    );
    let mut rows: Vec<(&str, &DomainCount)> = report
        .domains
        .iter()
        .map(|(d, c)| (shown_domain(d), c))
        .collect();
    let total = DomainCount {
        tasks: report.total,
        native: report.native,
        osworld: report.osworld_tasks,
        not_runnable: report.not_runnable,
    };
    rows.push(("total", &total));
    for (d, c) in rows {
        let _ = writeln!(
            out,
            "{:<width$}  {:>5}  {:>6}  {:>7}  {:>12}",
            d, c.tasks, c.native, c.osworld, c.not_runnable
        );
    }
    if !report.blockers.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "not runnable, by tasks:");
        for n in &report.blockers {
            let _ = writeln!(out, "{:>5}  {}", n.tasks, n.name);
        }
    }
    if !report.needs.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "not native, by tasks that need it (alone: tasks it is the only thing missing for):"
        );
        let _ = writeln!(out, "{:>5}  {:>5}  what", "tasks", "alone");
        for n in &report.needs {
            let _ = writeln!(out, "{:>5}  {:>5}  {}", n.tasks, n.only_missing, n.name);
        }
    }
    if verbose {
        let _ = writeln!(out);
        let _ = writeln!(out, "tasks:");
        for t in &report.tasks {
            let how = match t.runs {
                Runs::Native => "native".to_owned(),
                Runs::Osworld => format!("osworld (not native: {})", t.missing.join(", ")),
                Runs::NotRunnable => format!("not runnable: {}", t.reasons.join("; ")),
            };
            let _ = writeln!(out, "  {}/{}: {how}", shown_domain(&t.domain), t.id);
        }
    }
    if !report.invalid.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "invalid task files ({}):", report.invalid.len());
        for f in &report.invalid {
            let _ = writeln!(out, "  {}: {}", f.path.display(), f.error);
        }
    }
    if !report.not_found.is_empty() {
        const SHOWN: usize = 10;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "index entries without a task file ({}):",
            report.not_found.len()
        );
        for f in report.not_found.iter().take(SHOWN) {
            let _ = writeln!(out, "  {}", f.path.display());
        }
        if report.not_found.len() > SHOWN {
            let _ = writeln!(
                out,
                "  ... and {} more (--json lists them all)",
                report.not_found.len() - SHOWN
            );
        }
    }
    out
}

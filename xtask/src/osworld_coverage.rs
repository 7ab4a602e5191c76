//! `cargo xtask osworld-coverage`: how much of an OSWorld task set `arpo-env-vmware` can run.
//!
//! Reads the task files as OSWorld lays them out (`<tasks>/examples/<domain>/<id>.json`, or
//! `<tasks>/<domain>/<id>.json`), all of them or those an index (`test_all.json`:
//! `{domain: [ids]}`) names, and reports the tasks that are fully supported (per domain) and,
//! for the others, which setup steps, getters and metrics they miss, by how many tasks. A file
//! that cannot be read or parsed is counted and listed with its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use arpo_env_vmware::task::find_task_files;
use arpo_env_vmware::{OsworldTask, load_index};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// OSWorld's `evaluation_examples` folder (holding `examples/<domain>/<id>.json`), or a folder
    /// of `<domain>/<id>.json` files.
    #[arg(long)]
    tasks: PathBuf,
    /// An index file (`{"domain": ["task id", ...]}`, e.g. test_all.json) to count only its tasks;
    /// a relative path not found as given is looked up in --tasks. Default: every task file.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Print the report as JSON (every task, every failure) instead of text.
    #[arg(long)]
    json: bool,
    /// With text output, list each unsupported task with what it misses.
    #[arg(long)]
    verbose: bool,
}

/// Tasks and supported tasks of one domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DomainCount {
    pub tasks: usize,
    pub supported: usize,
}

/// One missing feature (`setup step X`, `getter Y`, `metric Z`) and the tasks that need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Need {
    pub name: String,
    /// Tasks that need it.
    pub tasks: usize,
    /// Tasks for which it is the only thing missing (implementing it alone makes them run).
    pub only_missing: usize,
}

/// A task file that was read and parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskCoverage {
    pub domain: String,
    pub id: String,
    pub path: PathBuf,
    /// Empty when the task can run.
    pub missing: Vec<String>,
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
    /// The folder the task files were read from.
    pub examples: PathBuf,
    pub index: Option<PathBuf>,
    /// Task files read and parsed.
    pub total: usize,
    pub supported: usize,
    pub domains: BTreeMap<String, DomainCount>,
    /// Sorted by the number of tasks that need each, most first.
    pub needs: Vec<Need>,
    pub tasks: Vec<TaskCoverage>,
    /// Files that exist but could not be read or parsed.
    pub invalid: Vec<Failure>,
    /// Index entries whose file does not exist.
    pub not_found: Vec<Failure>,
}

impl Coverage {
    pub fn supported_ids(&self) -> impl Iterator<Item = &TaskCoverage> {
        self.tasks.iter().filter(|t| t.missing.is_empty())
    }
}

/// Where the task files are: `<tasks>/examples` when it exists (OSWorld's
/// `evaluation_examples`), else `<tasks>`.
pub fn examples_dir(tasks: &Path) -> PathBuf {
    let nested = tasks.join("examples");
    if nested.is_dir() {
        nested
    } else {
        tasks.to_path_buf()
    }
}

/// The domain of a task file found by scanning: its folder relative to `examples`
/// (`""` for a file at the top).
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

/// Reads every task of `tasks` (or of `index`) and measures what is supported.
pub fn coverage(tasks: &Path, index: Option<&Path>) -> Result<Coverage> {
    if !tasks.is_dir() {
        bail!(
            "--tasks {} is not a folder: pass OSWorld's evaluation_examples folder (with examples/<domain>/<id>.json)",
            tasks.display()
        );
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
        Some(i) => load_index(i, &examples)
            .with_context(|| format!("reading the index {}", i.display()))?
            .into_iter()
            .map(|e| (e.domain, e.path))
            .collect(),
        None => find_task_files(&examples)
            .with_context(|| format!("listing the task files under {}", examples.display()))?
            .into_iter()
            .map(|p| (domain_of(&examples, &p), p))
            .collect(),
    };
    if entries.is_empty() {
        bail!(
            "no task files under {} (expected <domain>/<id>.json files{})",
            examples.display(),
            if index.is_some() {
                ", named by the index"
            } else {
                ""
            }
        );
    }

    let mut report = Coverage {
        examples: examples.clone(),
        index,
        total: 0,
        supported: 0,
        domains: BTreeMap::new(),
        needs: Vec::new(),
        tasks: Vec::new(),
        invalid: Vec::new(),
        not_found: Vec::new(),
    };
    let mut needs: BTreeMap<String, (usize, usize)> = BTreeMap::new();
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
        let missing = task.unsupported();
        let count = report.domains.entry(domain.clone()).or_default();
        count.tasks += 1;
        report.total += 1;
        if missing.is_empty() {
            count.supported += 1;
            report.supported += 1;
        }
        for name in &missing {
            let n = needs.entry(name.clone()).or_default();
            n.0 += 1;
            if missing.len() == 1 {
                n.1 += 1;
            }
        }
        report.tasks.push(TaskCoverage {
            domain,
            id: task.id,
            path,
            missing,
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
    // Most needed first; ties by name (the map's order, kept by a stable sort).
    report.needs.sort_by_key(|n| std::cmp::Reverse(n.tasks));
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

/// The report as text.
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
        "supported: {} of {} tasks ({:.1}%)",
        report.supported,
        report.total,
        percent(report.supported, report.total)
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
        "{:<width$}  {:>5}  {:>9}",
        "domain", "tasks", "supported"
    );
    for (domain, c) in &report.domains {
        let _ = writeln!(
            out,
            "{:<width$}  {:>5}  {:>9}",
            shown_domain(domain),
            c.tasks,
            c.supported
        );
    }
    let _ = writeln!(
        out,
        "{:<width$}  {:>5}  {:>9}",
        "total", report.total, report.supported
    );
    if !report.needs.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "missing, by tasks that need it (alone: tasks it is the only thing missing for):"
        );
        let _ = writeln!(out, "{:>5}  {:>5}  what", "tasks", "alone");
        for n in &report.needs {
            let _ = writeln!(out, "{:>5}  {:>5}  {}", n.tasks, n.only_missing, n.name);
        }
    }
    if verbose {
        let unsupported: Vec<_> = report
            .tasks
            .iter()
            .filter(|t| !t.missing.is_empty())
            .collect();
        if !unsupported.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "unsupported tasks ({}):", unsupported.len());
            for t in unsupported {
                let _ = writeln!(
                    out,
                    "  {}/{}: {}",
                    shown_domain(&t.domain),
                    t.id,
                    t.missing.join(", ")
                );
            }
        }
        let supported: Vec<_> = report.supported_ids().collect();
        if !supported.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "supported tasks ({}):", supported.len());
            for t in supported {
                let _ = writeln!(out, "  {}/{}", shown_domain(&t.domain), t.id);
            }
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

pub fn run(args: Args) -> Result<()> {
    let report = coverage(&args.tasks, args.index.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, args.verbose));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/osworld")
    }

    #[test]
    fn fixture_folder_is_measured() -> Result<()> {
        let report = coverage(&fixtures(), None)?;
        assert_eq!(report.examples, fixtures().join("examples"));
        assert_eq!(report.total, 8);
        assert!(report.invalid.is_empty() && report.not_found.is_empty());
        assert_eq!(report.domains.len(), 4);
        assert_eq!(report.domains["os"].tasks, 3);
        // Each task is supported exactly when the crate says so.
        for t in &report.tasks {
            let task = OsworldTask::load(&t.path)?;
            assert_eq!(t.missing, task.unsupported(), "{}", t.id);
        }
        let supported = report.tasks.iter().filter(|t| t.missing.is_empty()).count();
        assert_eq!(report.supported, supported);
        assert!(report.supported >= 2, "the os fixtures are simple tasks");
        // Needs are sorted by count, and every count matches the tasks.
        for pair in report.needs.windows(2) {
            assert!(pair[0].tasks >= pair[1].tasks);
        }
        for n in &report.needs {
            let count = report
                .tasks
                .iter()
                .filter(|t| t.missing.contains(&n.name))
                .count();
            assert_eq!(n.tasks, count, "{}", n.name);
        }
        let text = render(&report, true);
        assert!(text.contains(&format!("supported: {} of 8 tasks", report.supported)));
        Ok(())
    }

    #[test]
    fn an_index_counts_its_tasks_and_missing_files() -> Result<()> {
        let small = coverage(&fixtures(), Some(Path::new("test_fixtures.json")))?;
        assert_eq!(small.total, 8);
        assert!(small.not_found.is_empty());

        let all = coverage(&fixtures(), Some(&fixtures().join("test_all.json")))?;
        assert_eq!(all.total, 8);
        assert_eq!(all.not_found.len(), 369 - 8);
        assert_eq!(all.supported, small.supported);
        let text = render(&all, false);
        assert!(text.contains("index entries without a task file (361)"));
        assert!(text.contains("... and 351 more"));
        Ok(())
    }

    #[test]
    fn broken_files_are_listed_not_fatal() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let os = dir.path().join("os");
        std::fs::create_dir_all(&os)?;
        std::fs::write(os.join("bad.json"), "{ not json")?;
        std::fs::write(
            os.join("noid.json"),
            r#"{"instruction": "x", "evaluator": {}}"#,
        )?;
        std::fs::write(
            os.join("ok.json"),
            r#"{"id": "ok", "instruction": "x", "config": [], "evaluator": {"func": "infeasible"}}"#,
        )?;
        std::fs::write(
            os.join("web.json"),
            r#"{"id": "web", "instruction": "x", "config": [{"type": "chrome_open_tabs", "parameters": {}}],
                "evaluator": {"func": "infeasible"}}"#,
        )?;
        let report = coverage(dir.path(), None)?;
        assert_eq!((report.total, report.supported), (2, 1));
        assert_eq!(report.invalid.len(), 2);
        assert_eq!(
            report.needs,
            [Need {
                name: "setup step chrome_open_tabs".into(),
                tasks: 1,
                only_missing: 1
            }]
        );
        let text = render(&report, false);
        assert!(text.contains("invalid task files (2)"), "{text}");
        assert!(text.contains("bad.json"), "{text}");
        Ok(())
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(coverage(Path::new("/no/such/folder"), None).is_err());
        let err = coverage(&fixtures(), Some(Path::new("/no/such/index.json")))
            .expect_err("a missing index is an error");
        assert!(format!("{err:#}").contains("index"), "{err:#}");
    }
}

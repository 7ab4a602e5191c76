//! `cargo xtask sweep`: ARPO against GRPO over training seeds, end to end. One training run per
//! algorithm and seed, one at a time, each a `cargo xtask train` child process of this
//! executable; each final checkpoint (and with `--base` the base model, once per seed) evaluated
//! on every task set, in this process, writing the reports `cargo xtask eval --out` writes; then
//! `sweep.json` and `sweep.md` (`arpo_trainer::sweep`: the `compare` statistics per task set and
//! a paired t-test by seed). A rerun of the same command skips what is done and continues a
//! stopped training run from its last checkpoint.
//!
//! Training runs as a child process rather than in-process: a run sets process-wide state once
//! (the log subscriber writing its `training.log`, `RAYON_NUM_THREADS` before any thread
//! starts), a child's memory is all returned when it ends, and a run that fails or is killed
//! takes only itself down. Evaluation stays in-process: it loads a model and rolls out, nothing
//! process-wide.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arpo_core::Policy;
use arpo_trainer::Config;
use arpo_trainer::eval::EvalReport;
use arpo_trainer::setup::load_tasks;
use arpo_trainer::sweep::{
    Algorithm, BASE_LABEL, RunEval, SWEEP_KEYS, SeededReport, SweepLayout, SweepReport, SweepRun,
    TaskSetSummary, TrainingRecord, final_checkpoint, final_training_success,
    late_training_success,
};
use arpo_trainer::train::latest_checkpoint;

use crate::eval::{Common, run_eval};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run config every training run starts from (see configs/).
    #[arg(long, default_value = "configs/embedded_default.yaml")]
    pub config: PathBuf,
    /// The algorithms, comma-separated: arpo (GRPO plus the replay buffer), grpo.
    #[arg(long, value_delimiter = ',', default_value = "arpo,grpo")]
    pub algorithms: Vec<String>,
    /// The training seeds (data.seed), comma-separated; each is also the sampling seed of its
    /// runs' evaluations (and of the base's, with --base).
    #[arg(long, value_delimiter = ',', required = true)]
    pub seeds: Vec<String>,
    /// The task sets to evaluate on, comma-separated: sim:train, sim:heldout, sim:all, or task
    /// index files (e.g. configs/colour_label_unseen.json).
    #[arg(
        long = "eval",
        value_delimiter = ',',
        required = true,
        value_name = "TASKS"
    )]
    pub eval: Vec<String>,
    /// Also evaluate the untrained base model (the config's model_path), once per seed: sampling
    /// at the validation temperature makes its rate vary with the evaluation seed too.
    #[arg(long)]
    pub base: bool,
    /// Where everything goes (default: `results/sweep-<config file name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a config key of every run (repeatable), e.g. `--set trainer.total_episodes=11`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Attempts per task in each evaluation.
    #[arg(long, default_value_t = 4)]
    pub attempts: usize,
    /// Evaluate at most this many tasks of each set (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_tasks: usize,
    /// Evaluation temperature (default: the config's validation temperature).
    #[arg(long)]
    pub temperature: Option<f64>,
}

/// This executable, to start each training run with. On Linux `/proc/self/exe`, which names
/// the running image even after a rebuild has replaced the file the sweep started from (the
/// path itself then names the new build, or nothing while it is being written); elsewhere that
/// path.
fn running_executable() -> Result<PathBuf> {
    let own = Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && own.exists() {
        return Ok(own.to_path_buf());
    }
    std::env::current_exe().context("finding this executable")
}

/// The validated command: everything checked before the first run starts.
struct Plan {
    args: Args,
    algorithms: Vec<Algorithm>,
    seeds: Vec<u64>,
    /// Each task set with its number of tasks (at most `--max-tasks`).
    task_sets: Vec<(String, usize)>,
    layout: SweepLayout,
    /// The config with the user's overrides only: the base model and the evaluations.
    config: Config,
}

impl Plan {
    fn new(args: Args) -> Result<Self> {
        let mut algorithms = Vec::new();
        for name in args.algorithms.iter().filter(|s| !s.trim().is_empty()) {
            let Some(a) = Algorithm::parse(name) else {
                bail!(
                    "unknown algorithm {name:?} in --algorithms: use arpo (GRPO plus the replay \
                     buffer) and/or grpo, e.g. --algorithms arpo,grpo"
                );
            };
            if algorithms.contains(&a) {
                bail!("--algorithms names {} twice", a.name());
            }
            algorithms.push(a);
        }
        if algorithms.is_empty() {
            bail!("--algorithms is empty: give arpo, grpo or both, e.g. --algorithms arpo,grpo");
        }
        let mut seeds = Vec::new();
        for s in args.seeds.iter().filter(|s| !s.trim().is_empty()) {
            let seed: u64 = s.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "--seeds: {s:?} is not a seed (a whole number 0 or more); e.g. --seeds 1,2,3"
                )
            })?;
            if seeds.contains(&seed) {
                bail!("--seeds names {seed} twice");
            }
            seeds.push(seed);
        }
        if seeds.is_empty() {
            bail!(
                "--seeds is empty: give the training seeds, e.g. --seeds 1,2,3 (two or more for \
                 statistics across seeds)"
            );
        }
        if args.attempts == 0 {
            bail!("--attempts must be at least 1");
        }
        for s in &args.set {
            let key = s.split_once('=').map_or(s.as_str(), |(k, _)| k).trim();
            if SWEEP_KEYS.contains(&key) {
                bail!(
                    "--set {s}: the sweep sets {key} itself for each run (seeds come from \
                     --seeds, the algorithm from --algorithms, the paths from --out); remove it"
                );
            }
        }
        let config = Config::load(&args.config, &args.set)
            .with_context(|| format!("loading {}", args.config.display()))?;
        for &a in &algorithms {
            for &seed in &seeds {
                let mut sets = args.set.clone();
                sets.extend(SweepLayout::new("out").run_overrides(a, seed));
                Config::load(&args.config, &sets)
                    .with_context(|| format!("the config of {} seed {seed}", a.name()))?;
            }
        }
        let mut task_sets: Vec<(String, usize)> = Vec::new();
        let mut slugs: BTreeMap<String, String> = BTreeMap::new();
        for spec in args.eval.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let tasks = load_tasks(spec, &config, args.max_tasks).map_err(|e| {
                let hint = if spec.starts_with("sim:") && spec.contains("unseen") {
                    " (unseen instances of the trained families: configs/colour_label_unseen.json)"
                } else {
                    ""
                };
                anyhow::anyhow!("--eval: {e}{hint}")
            })?;
            if tasks.is_empty() {
                bail!("--eval {spec}: the task set is empty");
            }
            let slug = arpo_trainer::sweep::task_set_slug(spec);
            if let Some(other) = slugs.insert(slug.clone(), spec.to_string()) {
                bail!(
                    "--eval {other} and {spec} would share the report folder evals/{slug}: \
                     give each task set once, or rename one of the files"
                );
            }
            task_sets.push((spec.to_string(), tasks.len()));
        }
        if task_sets.is_empty() {
            bail!("--eval is empty: give task sets, e.g. --eval sim:heldout");
        }
        let out = args.out.clone().unwrap_or_else(|| {
            let name = args
                .config
                .file_stem()
                .map_or_else(|| "config".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from("results").join(format!("sweep-{name}"))
        });
        if out.is_file() {
            bail!(
                "--out {} is a file: give a directory for the sweep",
                out.display()
            );
        }
        Ok(Self {
            args,
            algorithms,
            seeds,
            task_sets,
            layout: SweepLayout::new(out),
            config,
        })
    }

    fn run_config(&self, algorithm: Algorithm, seed: u64) -> Result<(Vec<String>, Config)> {
        let mut sets = self.args.set.clone();
        sets.extend(self.layout.run_overrides(algorithm, seed));
        let config = Config::load(&self.args.config, &sets)?;
        Ok((sets, config))
    }
}

pub fn run(args: Args) -> Result<()> {
    let plan = Plan::new(args)?;
    let out = &plan.layout.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "sweep: {} × seeds {} ({} training run{}, one at a time), evaluated on {} with {} \
         attempt(s) per task{}; writing under {}",
        plan.algorithms
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", "),
        join(&plan.seeds),
        plan.algorithms.len() * plan.seeds.len(),
        if plan.algorithms.len() * plan.seeds.len() == 1 {
            ""
        } else {
            "s"
        },
        plan.task_sets
            .iter()
            .map(|(s, n)| format!("{s} ({n} tasks)"))
            .collect::<Vec<_>>()
            .join(", "),
        plan.args.attempts,
        if plan.args.base {
            ", and the base model once per seed"
        } else {
            ""
        },
        out.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    let mut runs: Vec<(SweepRun, Vec<SeededReport>)> = Vec::new();
    // Seed by seed, so that a stopped sweep has its algorithms' runs in pairs.
    for &seed in &plan.seeds {
        if plan.args.base {
            let model = plan.config.worker.actor.model.model_path.clone();
            let (evals, reports) = evaluate(&plan, &rt, BASE_LABEL, seed, &model)?;
            runs.push((
                SweepRun {
                    algorithm: BASE_LABEL.into(),
                    seed,
                    model,
                    wall_seconds: None,
                    resumed: false,
                    final_training_success_rate: None,
                    late_training_success_rate: None,
                    evals,
                },
                reports,
            ));
            write_report(&plan, &runs)?;
        }
        for &algorithm in &plan.algorithms {
            let (checkpoint, record, config) = train(&plan, algorithm, seed)?;
            let (evals, reports) = evaluate(&plan, &rt, algorithm.name(), seed, &checkpoint)?;
            runs.push((
                SweepRun {
                    algorithm: algorithm.name().into(),
                    seed,
                    model: checkpoint,
                    wall_seconds: record.as_ref().map(|r| r.wall_seconds),
                    resumed: record.as_ref().is_some_and(|r| r.resumed),
                    final_training_success_rate: final_training_success(&config.results_dir()),
                    late_training_success_rate: late_training_success(&config.results_dir()),
                    evals,
                },
                reports,
            ));
            write_report(&plan, &runs)?;
        }
    }
    let markdown = write_report(&plan, &runs)?;
    print!("{markdown}");
    eprintln!(
        "report: {} and {}",
        plan.layout.markdown().display(),
        plan.layout.json().display()
    );
    Ok(())
}

/// Trains `algorithm` with `seed` unless its final checkpoint exists: the checkpoint, the
/// training record (when this sweep wrote one) and the run's config.
fn train(
    plan: &Plan,
    algorithm: Algorithm,
    seed: u64,
) -> Result<(PathBuf, Option<TrainingRecord>, Config)> {
    let name = SweepLayout::experiment(algorithm.name(), seed);
    let (sets, config) = plan.run_config(algorithm, seed)?;
    let checkpoint = final_checkpoint(&config);
    let run_dir = plan.layout.run_dir(&name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let record_file = run_dir.join("run.json");
    let config_file = run_dir.join("config.yaml");
    let yaml = config.to_yaml();
    let before = std::fs::read_to_string(&config_file).ok();
    if let Some(before) = before.filter(|b| *b != yaml) {
        let (was, now) = before
            .lines()
            .zip(yaml.lines())
            .find(|(a, b)| a != b)
            .unwrap_or(("(end of file)", "(more lines)"));
        bail!(
            "{name} in {} was started with another config ({}: `{}`, now `{}`): give the sweep \
             a new --out, or delete {} and {} to train it again",
            plan.layout.out.display(),
            config_file.display(),
            was.trim(),
            now.trim(),
            run_dir.display(),
            config.checkpoint_dir().display()
        );
    }
    if checkpoint.join("trainer_state.json").is_file() {
        eprintln!(
            "[seed {seed}] {}: skipping training, {} exists",
            algorithm.name(),
            checkpoint.display()
        );
        let record = std::fs::read_to_string(&record_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        return Ok((checkpoint, record, config));
    }
    write_atomic(&config_file, yaml.as_bytes())?;
    let resumed = latest_checkpoint(&config.checkpoint_dir());
    let log_path = run_dir.join("output.log");
    eprintln!(
        "[seed {seed}] {}: training{} (log: {})",
        algorithm.name(),
        match &resumed {
            Some((epoch, _)) => format!(" from its checkpoint of epoch {epoch}"),
            None => String::new(),
        },
        log_path.display()
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = running_executable()?;
    let started = Instant::now();
    let status = Command::new(exe)
        .args(["train", "--quiet", "--resume", "--config"])
        .arg(&plan.args.config)
        .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("sharing the log file")?)
        .stderr(log)
        .status()
        .context("starting the training process")?;
    let wall_seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!(
            "training {name} failed ({status}); the end of {}:\n{}\nFix the cause and run the same \
             command again: finished runs are skipped and this one continues from its last \
             checkpoint",
            log_path.display(),
            tail(&log_path, 20)
        );
    }
    if !checkpoint.join("trainer_state.json").is_file() {
        bail!(
            "training {name} ended without its final checkpoint {} (see {})",
            checkpoint.display(),
            log_path.display()
        );
    }
    let record = TrainingRecord {
        wall_seconds,
        resumed: resumed.is_some(),
    };
    write_atomic(
        &record_file,
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    let success = final_training_success(&config.results_dir());
    eprintln!(
        "[seed {seed}] {}: trained in {wall_seconds:.0} s{}",
        algorithm.name(),
        success.map_or_else(String::new, |s| format!(
            ", last epoch's training success {:.1}%",
            100.0 * s
        ))
    );
    Ok((checkpoint, Some(record), config))
}

/// Evaluates `model` as `label` with the evaluation seed `seed` on every task set; a report
/// already there for the same settings is read instead.
fn evaluate(
    plan: &Plan,
    rt: &tokio::runtime::Runtime,
    label: &str,
    seed: u64,
    model: &Path,
) -> Result<(Vec<RunEval>, Vec<SeededReport>)> {
    let common = Common {
        config: plan.args.config.clone(),
        set: plan.args.set.clone(),
        model: Some(model.display().to_string()),
        server: None,
        server_model: None,
        attempts: plan.args.attempts,
        temperature: plan.args.temperature,
        seed,
        max_tasks: plan.args.max_tasks,
    };
    let mut config = crate::eval::config(&common)?;
    // The checkpoint is on disk: a rollout server would answer with its own weights.
    config.worker.rollout.use_external_server = false;
    let temperature = plan
        .args
        .temperature
        .unwrap_or(config.val_sampling().temperature);
    let mut policy: Option<Box<dyn Policy>> = None;
    let (mut evals, mut reports) = (Vec::new(), Vec::new());
    for (tasks, n_tasks) in &plan.task_sets {
        let path = plan.layout.eval_report(tasks, label, seed);
        let existing = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<EvalReport>(&t).ok());
        let report = match existing {
            Some(r)
                if r.label == label
                    && r.tasks_spec == *tasks
                    && r.attempts_per_task == plan.args.attempts
                    && r.seed == seed
                    && r.temperature == temperature
                    && r.per_task.len() == *n_tasks =>
            {
                eprintln!(
                    "[seed {seed}] {label}: skipping {tasks}, {} exists",
                    path.display()
                );
                r
            }
            stale => {
                if stale.is_some() {
                    eprintln!(
                        "[seed {seed}] {label}: {} was made with other settings: evaluating again",
                        path.display()
                    );
                }
                if policy.is_none() {
                    policy = Some(
                        rt.block_on(crate::eval::policy(&config))
                            .with_context(|| format!("loading {}", model.display()))?,
                    );
                }
                let Some(p) = policy.as_deref() else {
                    unreachable!("loaded above")
                };
                let r = rt.block_on(run_eval(&common, &config, p, tasks, label, true))?;
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                write_atomic(&path, serde_json::to_string_pretty(&r)?.as_bytes())?;
                eprintln!(
                    "[seed {seed}] {label}: {tasks} {:.1}% ({}/{})",
                    100.0 * r.success_rate,
                    r.successes,
                    r.episodes
                );
                r
            }
        };
        evals.push(RunEval {
            tasks: tasks.clone(),
            report: path,
            episodes: report.episodes,
            successes: report.successes,
            success_rate: report.success_rate,
        });
        reports.push(SeededReport { seed, report });
    }
    Ok((evals, reports))
}

/// Writes `sweep.json` and `sweep.md` from the runs so far; returns the Markdown.
fn write_report(plan: &Plan, runs: &[(SweepRun, Vec<SeededReport>)]) -> Result<String> {
    // Baselines first: base, then GRPO, then ARPO, so that differences read "ARPO − GRPO".
    let rank = |label: &str| {
        Algorithm::ALL
            .iter()
            .position(|a| a.name() == label)
            .map_or(0, |i| i + 1)
    };
    let mut runs: Vec<&(SweepRun, Vec<SeededReport>)> = runs.iter().collect();
    runs.sort_by_key(|(r, _)| (rank(&r.algorithm), r.seed));
    let summaries: Vec<TaskSetSummary> = plan
        .task_sets
        .iter()
        .map(|(tasks, _)| {
            let reports: Vec<SeededReport> = runs
                .iter()
                .flat_map(|(_, reports)| reports.iter())
                .filter(|r| r.report.tasks_spec == *tasks)
                .cloned()
                .collect();
            TaskSetSummary::new(tasks, &reports)
        })
        .collect();
    let mut algorithms = plan.algorithms.clone();
    algorithms.sort();
    let report = SweepReport {
        config: plan.args.config.clone(),
        overrides: plan.args.set.clone(),
        algorithms,
        seeds: plan.seeds.clone(),
        task_sets: plan.task_sets.iter().map(|(t, _)| t.clone()).collect(),
        attempts: plan.args.attempts,
        runs: runs.iter().map(|(r, _)| r.clone()).collect(),
        stats: summaries.iter().map(TaskSetSummary::stats).collect(),
    };
    let markdown = report.markdown(&summaries);
    write_atomic(
        &plan.layout.json(),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(&plan.layout.markdown(), markdown.as_bytes())?;
    Ok(markdown)
}

/// Written under a temporary name and renamed: a sweep stopped mid-write leaves no half report
/// that a rerun would take for a finished one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let tmp = path.with_file_name(name);
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = std::fs::File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn join(xs: &[u64]) -> String {
    xs.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

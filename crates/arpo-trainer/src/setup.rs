//! From a config to the pieces of a run: task sets, environments, and the pre-flight check
//! that fails fast, before any rollout, with the fix for each problem found.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arpo_core::Task;
use arpo_env_sim::{Catalogue, SimEnv};
use arpo_env_vmware::coverage::{Runs, classify, examples_dir};
use arpo_env_vmware::{
    EnvConfig as OsworldConfig, EvaluatorBackend, GuestClient, GuestConfig, HostType, OsworldEnv,
    OsworldNames, OsworldTask, Vmrun, VmrunConfig, VmwareProvider, load_index, remote_pool,
};

use crate::TrainerError;
use crate::config::{Config, EnvProvider};

/// A task set named by a config: `sim:train`, `sim:heldout`, `sim:all` (the embedded desktop's
/// catalogue), or the path of an index `{domain: [task ids]}` (OSWorld's `test_all.json`
/// form, or one written by `cargo xtask select-tasks`). For the sim provider an index names
/// catalogue ids; for VMware and remote providers it names OSWorld task files under
/// `env.vmware.examples_dir`. At most `max_tasks` tasks (0: all), in the set's order.
pub fn load_tasks(
    spec: &str,
    config: &Config,
    max_tasks: usize,
) -> Result<Vec<Task>, TrainerError> {
    let err = |reason: String| TrainerError::Tasks {
        spec: spec.to_string(),
        reason,
    };
    let mut tasks = if let Some(split) = spec.strip_prefix("sim:") {
        let catalogue = Catalogue::default();
        match split {
            "train" => catalogue.train(),
            "heldout" => catalogue.heldout(),
            "all" => catalogue.all(),
            other => {
                return Err(err(format!(
                    "unknown split {other:?}: use sim:train, sim:heldout or sim:all"
                )));
            }
        }
    } else if spec.is_empty() {
        Vec::new()
    } else {
        let index = Path::new(spec);
        if !index.is_file() {
            return Err(err(
                "no such file: give sim:train, sim:heldout or the path of a task index {domain: [ids]}"
                    .into(),
            ));
        }
        match config.env.provider {
            EnvProvider::Sim => {
                let text = std::fs::read_to_string(index).map_err(|e| err(e.to_string()))?;
                let map: std::collections::BTreeMap<String, Vec<String>> =
                    serde_json::from_str(&text).map_err(|e| {
                        err(format!(
                            "an index must be {{\"domain\": [\"task id\", ...]}}: {e}"
                        ))
                    })?;
                let catalogue = Catalogue::default();
                map.values()
                    .flatten()
                    .map(|id| {
                        catalogue.task(id).map_err(|e| {
                            err(format!("{e} (the sim provider reads ids of its catalogue)"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            EnvProvider::Vmware | EnvProvider::Remote => {
                // OSWorld's `evaluation_examples` holds the task files under `examples/`.
                let examples = &examples_dir(&config.env.vmware.examples_dir);
                let entries = load_index(index, examples).map_err(|e| err(e.to_string()))?;
                let mut tasks = Vec::with_capacity(entries.len());
                let names = (config.env.osworld.evaluator != EvaluatorBackend::Native)
                    .then(OsworldNames::bundled);
                let mut unsupported = Vec::new();
                for entry in entries {
                    let task = OsworldTask::load(&entry.path).map_err(|e| {
                        err(format!(
                            "{e} (env.vmware.examples_dir is {}: it must hold <domain>/<id>.json)",
                            examples.display()
                        ))
                    })?;
                    let (runs, _, reasons) = classify(&task, examples, names.as_ref());
                    if runs == Runs::NotRunnable {
                        unsupported.push(format!("{}: {}", entry.id, reasons.join(", ")));
                    } else {
                        tasks.push(task.to_task(Some(&entry.domain)));
                    }
                }
                if !unsupported.is_empty() {
                    return Err(err(format!(
                        "{} task(s) cannot be scored with env.osworld.evaluator {} (see `cargo xtask osworld-coverage`): {}",
                        unsupported.len(),
                        config.env.osworld.evaluator,
                        unsupported.join("; ")
                    )));
                }
                tasks
            }
        }
    };
    if max_tasks > 0 {
        tasks.truncate(max_tasks);
    }
    Ok(tasks)
}

/// The environments of a run.
#[derive(Debug)]
pub enum Envs {
    Sim(Vec<SimEnv>),
    Osworld(Vec<OsworldEnv>),
}

impl Envs {
    pub fn len(&self) -> usize {
        match self {
            Envs::Sim(v) => v.len(),
            Envs::Osworld(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The vmrun driver of `env.vmware`.
pub fn vmrun(config: &Config) -> Result<Vmrun, TrainerError> {
    let v = &config.env.vmware;
    let host_type = match v.host_type.as_str() {
        "fusion" => HostType::Fusion,
        "ws" | "workstation" => HostType::Workstation,
        "player" => HostType::Player,
        "" => HostType::for_this_os(),
        other => {
            return Err(TrainerError::ConfigInvalid {
                problems: vec![format!(
                    "env.vmware.host_type {other:?}: use fusion (macOS), ws (Workstation) or player"
                )],
            });
        }
    };
    let mut vc = VmrunConfig {
        host_type,
        headless: v.headless,
        ..VmrunConfig::default()
    };
    if v.vmrun != "vmrun" && !v.vmrun.is_empty() {
        vc.binary = PathBuf::from(&v.vmrun);
    }
    Ok(Vmrun::new(vc))
}

/// arpo-env-vmware's settings for every environment of the run (one cache folder each is
/// added by the pools).
pub fn osworld_config(config: &Config) -> OsworldConfig {
    let defaults = OsworldConfig::default();
    let o = &config.env.osworld;
    OsworldConfig {
        pause_between_steps: config.env.vmware.pause_during_inference
            && config.env.provider == EnvProvider::Vmware,
        reset_attempts: 1, // the rollout engine retries resets (env.reset_retries)
        max_download_bytes: o.max_download_bytes,
        examples_dir: Some(config.env.vmware.examples_dir.clone()),
        osworld: arpo_env_vmware::OsworldEvaluatorConfig {
            evaluator: o.evaluator,
            python: o.python.clone(),
            ..defaults.osworld.clone()
        },
        ..defaults
    }
}

/// `env.num_envs` environments of `env.provider`.
pub fn build_envs(config: &Config) -> Result<Envs, TrainerError> {
    let n = config.env.num_envs.max(1);
    match config.env.provider {
        EnvProvider::Sim => {
            let one = match config.env.screen_size {
                None => SimEnv::new(),
                Some(size) => SimEnv::with_size(size.width, size.height).map_err(|e| {
                    TrainerError::ConfigInvalid {
                        problems: vec![format!("env.screen_size: {e}")],
                    }
                })?,
            }
            .with_max_steps(config.env.max_steps);
            Ok(Envs::Sim(vec![one; n]))
        }
        EnvProvider::Remote => {
            let urls = &config.env.remote.guest_urls;
            if urls.is_empty() {
                return Err(TrainerError::Preflight {
                    problems: vec![
                        "env.remote.guest_urls is empty: list the guest servers (http://host:5000), e.g. one started with `cargo xtask sim-guest`".into(),
                    ],
                });
            }
            // One cache folder per environment: parallel resets of one task must not share files.
            let urls: Vec<String> = urls.iter().take(n).cloned().collect();
            Ok(Envs::Osworld(remote_pool(&urls, &osworld_config(config))))
        }
        EnvProvider::Vmware => {
            let paths = &config.env.vmware.vm_paths;
            if paths.is_empty() {
                return Err(TrainerError::Preflight {
                    problems: vec![
                        "env.vmware.vm_paths is empty: list the .vmx of each VM (one per parallel environment)".into(),
                    ],
                });
            }
            let vmrun = vmrun(config)?;
            Ok(Envs::Osworld(
                paths
                    .iter()
                    .take(n)
                    .enumerate()
                    .map(|(i, vmx)| {
                        let mut p = VmwareProvider::new(vmrun.clone(), vmx.clone());
                        p.snapshot = config.env.vmware.snapshot_name.clone();
                        // One cache folder per environment, as in `vmware_pool`.
                        OsworldEnv::new(Box::new(p), osworld_config(config).for_env(i))
                    })
                    .collect(),
            ))
        }
    }
}

/// Checks, before any rollout, everything a run needs: the model files, the tasks, the
/// environment (VMs and vmrun, or guest servers answering), the model server when rollouts use
/// one. Every problem comes with what to do.
pub async fn preflight(config: &Config) -> Result<(), TrainerError> {
    let mut problems = Vec::new();
    let model = config
        .worker
        .actor
        .model
        .model_path
        .to_string_lossy()
        .to_string();
    match arpo_model::weights::resolve_model_dir(&model) {
        Ok(dir) => {
            for file in ["config.json", "tokenizer.json"] {
                if !dir.join(file).is_file() {
                    problems.push(format!(
                        "the model directory {} has no {file}: is it a complete HF-layout checkpoint?",
                        dir.display()
                    ));
                }
            }
        }
        Err(e) => problems.push(format!("worker.actor.model.model_path: {e}")),
    }
    for (what, spec) in [
        ("data.train_files", &config.data.train_files),
        ("data.val_files", &config.data.val_files),
    ] {
        if let Err(e) = load_tasks(spec, config, 0) {
            problems.push(format!("{what}: {e}"));
        }
    }
    match config.env.provider {
        EnvProvider::Sim => {}
        EnvProvider::Remote => {
            for url in &config.env.remote.guest_urls {
                if let Err(e) = guest_answers(url).await {
                    problems.push(format!(
                        "guest server {url} does not answer ({e}): start it (OSWorld's server in the VM, or `cargo xtask sim-guest`) and check the URL"
                    ));
                }
            }
        }
        EnvProvider::Vmware => {
            for vmx in &config.env.vmware.vm_paths {
                if !vmx.is_file() {
                    problems.push(format!(
                        "env.vmware.vm_paths: {} does not exist (the .vmx inside the VM's folder)",
                        vmx.display()
                    ));
                }
            }
            match vmrun(config) {
                Ok(v) => {
                    if let Err(e) = v.list().await {
                        problems.push(format!(
                            "vmrun does not work ({e}): install VMware Fusion Pro / Workstation Pro and put vmrun on PATH, or set env.vmware.vmrun"
                        ));
                    } else {
                        let name = &config.env.vmware.snapshot_name;
                        for vmx in config.env.vmware.vm_paths.iter().filter(|p| p.is_file()) {
                            match v.list_snapshots(vmx).await {
                                Ok(snaps) if !snaps.iter().any(|s| s == name) => problems.push(format!(
                                    "{} has no snapshot {name:?} (it has {snaps:?}): take it at the VM's clean state with `vmrun snapshot {} {name}` (VMware Player cannot)",
                                    vmx.display(),
                                    vmx.display()
                                )),
                                Ok(_) => {}
                                Err(e) => problems.push(format!(
                                    "listing the snapshots of {}: {e}",
                                    vmx.display()
                                )),
                            }
                        }
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    if config.env.provider != EnvProvider::Sim
        && config.env.osworld.evaluator != EvaluatorBackend::Native
    {
        let env = OsworldEnv::remote("http://127.0.0.1:1", osworld_config(config));
        if let Err(e) = env.check_evaluator().await {
            problems.push(format!(
                "env.osworld.evaluator {}: {e}",
                config.env.osworld.evaluator
            ));
        }
    }
    if let Err(e) = crate::model::pixel_bounds(config) {
        problems.push(e.to_string());
    }
    let resume = config.trainer.load_checkpoint_path.as_str();
    if !resume.is_empty() && resume != "latest" {
        let dir = Path::new(resume);
        if !dir.join("trainer_state.json").is_file() {
            problems.push(format!(
                "trainer.load_checkpoint_path {resume}: no trainer_state.json there: give an epoch_<N> directory written by `cargo xtask train`, `latest`, or leave it empty"
            ));
        }
    }
    if config.worker.rollout.use_external_server {
        let ro = &config.worker.rollout;
        let key = ro
            .server_api_key
            .clone()
            .or_else(|| std::env::var("ARPO_SERVER_API_KEY").ok())
            .filter(|k| !k.is_empty());
        let urls = std::iter::once(&ro.server_url)
            .chain(&ro.server_urls)
            .flat_map(|u| u.split(','))
            .map(|u| u.trim().trim_end_matches('/'))
            .filter(|u| !u.is_empty());
        for url in urls {
            if let Err(e) = http_get_ok(&format!("{url}/models"), key.as_deref()).await {
                problems.push(format!(
                    "the model server at {url} does not answer ({e}): start it with `cargo xtask serve --model <dir>` and check it with `cargo xtask test-server --url {url}`; a server started with --api-key needs worker.rollout.server_api_key or ARPO_SERVER_API_KEY"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TrainerError::Preflight { problems })
    }
}

async fn guest_answers(url: &str) -> Result<(), String> {
    let client = GuestClient::new(
        url,
        GuestConfig {
            attempts: 1,
            request_timeout: Duration::from_secs(10),
            ..GuestConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    client
        .screenshot()
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn http_get_ok(url: &str, api_key: Option<&str>) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = client.get(url);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.map_err(|e| e.to_string())?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", r.status()))
    }
}

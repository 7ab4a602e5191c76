//! The training loop: epochs of steps, each step rollouts → replay → advantages → update, with
//! metrics, task results, curves, checkpoints and resume.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arpo_core::{Environment, Policy, Task, Trajectory};
use arpo_grpo::{AdvantageConfig, PolicyLossConfig};
use arpo_replay::ReplayBuffer;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Config, CoordinateMode, Logger};
use crate::learner::{Learner, Sample, UpdateStats};
use crate::metrics::{
    Attempt, EpochMetrics, MetricsHistory, StepMetrics, TaskResults, TaskResultsMap,
    task_file_name, write_json,
};
use crate::progress::Progress;
use crate::rollout::{
    Coordinates, Group, RolloutEvent, RolloutReport, RolloutSettings, mix_seed, run_rollouts,
};
use crate::rollout_gap::RolloutGap;
use crate::{TrainerError, curves};

/// The (group, position) of each replayed episode in a step's groups.
type Injections = BTreeSet<(usize, usize)>;

/// The state `--resume` restores, saved as `trainer_state.json` in every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// The next epoch to run.
    pub epoch: usize,
    /// The next global step.
    pub step: u64,
    /// Optimizer steps taken so far.
    pub optimizer_steps: u64,
    pub replay: ReplayBuffer<Trajectory>,
    pub metrics: MetricsHistory,
    pub task_results: TaskResultsMap,
}

/// Where a run writes.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPaths {
    /// `checkpoints/<exp>`.
    pub checkpoints: PathBuf,
    /// `results/<exp>`.
    pub results: PathBuf,
}

impl OutputPaths {
    pub fn from_config(config: &Config) -> Self {
        Self {
            checkpoints: config.checkpoint_dir(),
            results: config.results_dir(),
        }
    }

    pub fn metrics_file(&self) -> PathBuf {
        self.results.join("training_metrics.json")
    }

    /// `metrics.jsonl`: one line per step (`trainer.logger: [jsonl]`).
    pub fn metrics_jsonl(&self) -> PathBuf {
        self.results.join("metrics.jsonl")
    }

    pub fn replay_stats_file(&self) -> PathBuf {
        self.results.join("replay_buffer_stats.json")
    }

    pub fn task_results_dir(&self) -> PathBuf {
        self.results.join("task_results")
    }

    pub fn epoch_dir(&self, epoch: usize) -> PathBuf {
        self.checkpoints.join(format!("epoch_{epoch}"))
    }
}

/// What a finished run returns.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub metrics: MetricsHistory,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// The run stopped early at `stop_after_steps` (a simulated kill in tests).
    pub stopped_early: bool,
}

/// The training run.
pub struct Trainer<'a, P: Policy + ?Sized, E: Environment, L: Learner> {
    pub config: Config,
    pub policy: &'a P,
    pub envs: Vec<E>,
    pub learner: L,
    pub train_tasks: Vec<Task>,
    pub val_tasks: Vec<Task>,
    pub paths: OutputPaths,
    pub progress: Progress,
    /// Stop (without saving anything more) once this many steps have run in this process:
    /// lets tests kill a run at a chosen point.
    pub stop_after_steps: Option<u64>,
    state: TrainerState,
    /// The rollout settings of training and of validation, made once from the config (the
    /// absolute-coordinate bounds read the model's preprocessor config).
    rollouts: (RolloutSettings, RolloutSettings),
    tensorboard: Option<arpo_dashboard::TensorBoardWriter>,
}

impl<P: Policy + ?Sized, E: Environment, L: Learner> std::fmt::Debug for Trainer<'_, P, E, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("experiment", &self.config.trainer.experiment_name)
            .field("policy", &self.policy.describe())
            .field("learner", &self.learner.describe())
            .field("envs", &self.envs.len())
            .field("epoch", &self.state.epoch)
            .field("step", &self.state.step)
            .finish()
    }
}

/// The replay settings of arpo-replay from the config (its switch is `algorithm.enable_replay`).
pub fn replay_config(config: &Config) -> arpo_replay::ReplayConfig {
    arpo_replay::ReplayConfig {
        enabled: config.algorithm.enable_replay,
        ..config.algorithm.replay.clone()
    }
}

/// The policy-loss settings of arpo-grpo from the config.
pub fn loss_config(config: &Config) -> PolicyLossConfig {
    let a = &config.worker.actor;
    PolicyLossConfig {
        clip_ratio_low: a.clip_ratio_low,
        clip_ratio_high: a.clip_ratio_high,
        clip_ratio_dual: a.clip_ratio_dual,
        loss_agg_mode: a.loss_agg_mode,
        kl: (!config.algorithm.disable_kl).then_some(arpo_grpo::KlPenalty {
            estimator: config.algorithm.kl_penalty,
            coef: config.algorithm.kl_coef,
        }),
        rollout_is_cap: config.algorithm.rollout_is_cap,
    }
}

fn advantage_config(config: &Config) -> AdvantageConfig {
    AdvantageConfig {
        estimator: config.algorithm.adv_estimator,
        ..Default::default()
    }
}

/// The rollout settings from the config (training or validation sampling).
pub fn rollout_settings(
    config: &Config,
    validation: bool,
) -> Result<RolloutSettings, TrainerError> {
    Ok(RolloutSettings {
        group_size: if validation {
            config.worker.rollout.val_override_config.n
        } else {
            config.worker.rollout.n
        },
        max_steps: config.env.max_steps,
        reset_retries: config.env.reset_retries,
        sampling: if validation {
            config.val_sampling()
        } else {
            config.train_sampling()
        },
        coordinates: match config.env.coordinates {
            CoordinateMode::Absolute => {
                let (min_pixels, max_pixels) = crate::model::pixel_bounds(config)?;
                Coordinates::Absolute {
                    min_pixels,
                    max_pixels,
                }
            }
            CoordinateMode::Relative => Coordinates::Relative,
        },
        expected_screen: config.env.screen_size,
    })
}

/// The latest `epoch_<N>` checkpoint under `dir` that has a `trainer_state.json`.
pub fn latest_checkpoint(dir: &Path) -> Option<(usize, PathBuf)> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: usize = name.strip_prefix("epoch_")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then(|| (n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
}

impl<'a, P: Policy + ?Sized, E: Environment, L: Learner> Trainer<'a, P, E, L> {
    /// A fresh run (call [`Trainer::resume`] after to continue from a checkpoint).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        policy: &'a P,
        envs: Vec<E>,
        learner: L,
        train_tasks: Vec<Task>,
        val_tasks: Vec<Task>,
        progress: Progress,
    ) -> Result<Self, TrainerError> {
        if train_tasks.is_empty() {
            return Err(TrainerError::Tasks {
                spec: config.data.train_files.clone(),
                reason: "no training tasks: check data.train_files and data.max_tasks".into(),
            });
        }
        let replay = ReplayBuffer::new(replay_config(&config), mix_seed(config.data.seed, 7))
            .map_err(|e| TrainerError::ConfigInvalid {
                problems: vec![format!("algorithm.replay: {e}")],
            })?;
        let paths = OutputPaths::from_config(&config);
        let rollouts = (
            rollout_settings(&config, false)?,
            rollout_settings(&config, true)?,
        );
        let state = TrainerState {
            epoch: 0,
            step: 0,
            optimizer_steps: 0,
            replay,
            metrics: MetricsHistory {
                experiment: config.trainer.experiment_name.clone(),
                ..Default::default()
            },
            task_results: TaskResultsMap::new(),
        };
        Ok(Self {
            config,
            policy,
            envs,
            learner,
            train_tasks,
            val_tasks,
            paths,
            progress,
            stop_after_steps: None,
            state,
            rollouts,
            tensorboard: None,
        })
    }

    /// The run's state (epoch, step, replay buffer, metrics so far).
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// Continues from a checkpoint directory (`epoch_<N>`), or from the latest one under
    /// `checkpoints/<exp>` when `dir` is `None`. Returns the directory used, or `None` when
    /// there is nothing to resume from.
    pub fn resume(&mut self, dir: Option<&Path>) -> Result<Option<PathBuf>, TrainerError> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => match latest_checkpoint(&self.paths.checkpoints) {
                Some((_, d)) => d,
                None => return Ok(None),
            },
        };
        let state_file = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_file).map_err(|e| TrainerError::Resume {
            path: state_file.clone(),
            reason: format!("{e} (is this an epoch_<N> directory written by cargo xtask train?)"),
        })?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| TrainerError::Resume {
                path: state_file.clone(),
                reason: e.to_string(),
            })?;
        self.learner.load(&dir)?;
        // The buffer's switch follows the config of this run, the rest comes from the state.
        self.state = state;
        self.state
            .replay
            .set_enabled(self.config.algorithm.enable_replay);
        tracing::info!(checkpoint = %dir.display(), epoch = self.state.epoch, step = self.state.step, "resumed");
        Ok(Some(dir))
    }

    fn steps_per_epoch(&self) -> usize {
        self.train_tasks
            .len()
            .div_ceil(self.config.data.rollout_batch_size)
    }

    /// Runs the remaining epochs.
    pub async fn run(&mut self) -> Result<RunSummary, TrainerError> {
        let total_epochs = self.config.trainer.total_episodes;
        let steps_per_epoch = self.steps_per_epoch();
        self.progress
            .start((total_epochs * steps_per_epoch) as u64, self.state.step);
        tracing::info!(
            experiment = %self.config.trainer.experiment_name,
            policy = %self.policy.describe(),
            learner = %self.learner.describe(),
            tasks = self.train_tasks.len(),
            epochs = total_epochs,
            "training starts"
        );
        let mut steps_this_process = 0u64;
        if self.config.trainer.logger.contains(&Logger::Tensorboard) && self.tensorboard.is_none() {
            let dir = self.paths.results.join("tensorboard");
            let mut tb = arpo_dashboard::TensorBoardWriter::create(&dir)?;
            if self.state.step > 0 {
                tb.write_session_start(self.state.step)?; // drop a killed run's later points
            }
            self.tensorboard = Some(tb);
        }
        let mut last_checkpoint = None;
        if self.config.trainer.val_before_train && self.state.epoch == 0 && self.state.step == 0 {
            self.validate(0).await?;
        }
        while self.state.epoch < total_epochs {
            let epoch = self.state.epoch;
            let order = self.epoch_order(epoch);
            let first_step_of_epoch = (epoch * steps_per_epoch) as u64;
            for (i, chunk) in order
                .chunks(self.config.data.rollout_batch_size)
                .enumerate()
            {
                let step = first_step_of_epoch + i as u64;
                if step < self.state.step {
                    continue; // done before a resume inside this epoch (not used: checkpoints are per epoch)
                }
                if self
                    .stop_after_steps
                    .is_some_and(|n| steps_this_process >= n)
                {
                    self.progress.finish("stopped");
                    return Ok(RunSummary {
                        metrics: self.state.metrics.clone(),
                        last_checkpoint,
                        stopped_early: true,
                    });
                }
                let tasks: Vec<Task> = chunk.iter().map(|&k| self.train_tasks[k].clone()).collect();
                self.train_step(epoch, step, &tasks).await?;
                self.state.step = step + 1;
                steps_this_process += 1;
            }
            self.finish_epoch(epoch).await?;
            self.state.epoch = epoch + 1;
            if self.should_save(epoch) {
                last_checkpoint = Some(self.save_checkpoint(epoch)?);
            }
        }
        self.progress.finish("done");
        Ok(RunSummary {
            metrics: self.state.metrics.clone(),
            last_checkpoint,
            stopped_early: false,
        })
    }

    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.train_tasks.len()).collect();
        if self.config.data.shuffle {
            let mut rng =
                ChaCha8Rng::seed_from_u64(mix_seed(self.config.data.seed, 1 + epoch as u64));
            order.shuffle(&mut rng);
        }
        order
    }

    fn should_save(&self, epoch: usize) -> bool {
        let last = epoch + 1 == self.config.trainer.total_episodes;
        let f = self.config.trainer.save_freq;
        last || (f > 0 && (epoch as i64 + 1) % f == 0)
    }

    /// One step: collect the groups, record them, replay, build the update's batches, update,
    /// write the metrics.
    async fn train_step(
        &mut self,
        epoch: usize,
        step: u64,
        tasks: &[Task],
    ) -> Result<(), TrainerError> {
        self.progress.set_context(epoch, step);
        let report = self.collect(step, tasks).await?;
        let mut m = StepMetrics::from_rollouts(
            step,
            epoch,
            &report,
            self.config.algorithm.replay.success_threshold,
        );
        self.progress.set_success_rate(m.success_rate);
        self.record_rollouts(tasks, &report, step, epoch);
        let (groups, injected) = self.replay(report.groups, &mut m)?;
        let update_started = Instant::now();
        let batches = self.batches(groups, &injected, &mut m)?;
        self.record_episodes(step, &batches)?;
        let (stats, gap) = self.update(&batches)?;
        m.absorb_updates(&stats);
        m.absorb_rollout_gap(&gap, self.config.algorithm.rollout_is_cap.is_some());
        m.update_seconds = update_started.elapsed().as_secs_f64();
        tracing::info!(
            step,
            epoch,
            avg_reward = m.avg_reward,
            success_rate = m.success_rate,
            replay_size = m.replay_size,
            injected_groups = m.injected_groups,
            invalid_groups = m.invalid_groups,
            dropped_rollouts = m.dropped_rollouts,
            loss = m.loss,
            grad_norm = m.grad_norm,
            rollout_kl = m.rollout_kl,
            rollout_ratio_max = m.rollout_ratio_max,
            "step done"
        );
        if let Some(tb) = &mut self.tensorboard {
            let v =
                serde_json::to_value(&m).map_err(|e| TrainerError::io(&self.paths.results, e))?;
            tb.write_scalars(step, &arpo_dashboard::scalars_from_json("train", &v))?;
        }
        self.state.metrics.steps.push(m);
        self.write_outputs()?;
        self.progress.step_done();
        Ok(())
    }

    /// Rolls the step's tasks out; fails only when every rollout was dropped.
    async fn collect(&mut self, step: u64, tasks: &[Task]) -> Result<RolloutReport, TrainerError> {
        let settings = &self.rollouts.0;
        let seed = mix_seed(self.config.data.seed, 1_000_003 + step);
        let progress = &self.progress;
        let report = run_rollouts(
            self.policy,
            &mut self.envs,
            tasks,
            settings,
            seed,
            &mut |ev: RolloutEvent<'_>| {
                if let RolloutEvent::Stepped { .. } = ev {
                    // Named points where the crash tests stop a real run (`FAILPOINTS`).
                    fail::fail_point!("train::rollout");
                }
                progress.rollout_event(&ev);
            },
        )
        .await?;
        if report.groups.iter().all(|g| g.trajectories.is_empty()) {
            return Err(TrainerError::AllRolloutsDropped {
                step,
                dropped: report.dropped.len(),
                last_error: report
                    .dropped
                    .last()
                    .map(|d| d.error.clone())
                    .unwrap_or_default(),
            });
        }
        Ok(report)
    }

    /// Per-task results: the step's own rollouts and the dropped ones.
    fn record_rollouts(&mut self, tasks: &[Task], report: &RolloutReport, step: u64, epoch: usize) {
        let threshold = self.config.algorithm.replay.success_threshold;
        for g in &report.groups {
            for (r, t) in g.trajectories.iter().enumerate() {
                self.record(
                    tasks,
                    &g.task_id,
                    Attempt::from_trajectory(t, step, epoch, r, "training", threshold),
                );
            }
        }
        for d in &report.dropped {
            self.record(
                tasks,
                &d.task_id,
                Attempt::dropped(d, step, epoch, "training"),
            );
        }
    }

    /// Replay: rescue all-failed groups with stored successes, then store this step's
    /// successes. Returns the non-empty groups and the (group, position) of each injection.
    fn replay(
        &mut self,
        groups: Vec<Group>,
        m: &mut StepMetrics,
    ) -> Result<(Vec<Vec<Trajectory>>, Injections), TrainerError> {
        let mut groups: Vec<Vec<Trajectory>> = groups
            .into_iter()
            .map(|g| g.trajectories)
            .filter(|g| !g.is_empty())
            .collect();
        let replay_report = self.state.replay.apply(&mut groups)?;
        m.all_failed_groups = replay_report.all_failed_groups;
        let injected: BTreeSet<(usize, usize)> = replay_report
            .injections
            .iter()
            .map(|i| (i.group, i.position))
            .collect();
        m.injected_groups = injected
            .iter()
            .map(|(g, _)| *g)
            .collect::<BTreeSet<_>>()
            .len();
        let stats = self.state.replay.stats();
        m.replay_size = stats.stored_episodes;
        m.replay_tasks = stats.tasks_with_success;
        Ok((groups, injected))
    }

    /// Advantages per group, and old log-probs with the current weights unless the step is
    /// on-policy (one optimizer step over the whole batch, one PPO epoch, no dropout: the
    /// weights that score the update are the ones before it, so the learner's own detached
    /// log-probs are the old ones and need no separate pass).
    fn batches(
        &mut self,
        groups: Vec<Vec<Trajectory>>,
        injected: &BTreeSet<(usize, usize)>,
        m: &mut StepMetrics,
    ) -> Result<Vec<Vec<Sample>>, TrainerError> {
        let actor = &self.config.worker.actor;
        let adv_config = advantage_config(&self.config);
        let on_policy = actor.ppo_epochs == 1
            && groups.len() <= actor.global_batch_size
            && (actor.model.lora.rank == 0 || actor.model.lora.dropout == 0.0);
        let mut batches = Vec::with_capacity(groups.len());
        for (gi, group) in groups.into_iter().enumerate() {
            let rewards: Vec<f64> = group.iter().map(Trajectory::reward).collect();
            if arpo_grpo::is_invalid_group(&rewards) {
                m.invalid_groups += 1;
            }
            let advantages = arpo_grpo::group_advantages(&rewards, &adv_config)?;
            let olds: Vec<Option<Vec<Vec<f32>>>> = if on_policy {
                vec![None; group.len()]
            } else {
                let refs: Vec<&Trajectory> = group.iter().collect();
                self.learner
                    .old_logprobs_many(&refs)?
                    .into_iter()
                    .map(Some)
                    .collect()
            };
            let samples = group
                .into_iter()
                .zip(advantages)
                .zip(olds)
                .enumerate()
                .map(|(pos, ((trajectory, advantage), old_logprobs))| Sample {
                    trajectory,
                    advantage,
                    old_logprobs,
                    injected: injected.contains(&(gi, pos)),
                })
                .collect();
            batches.push(samples);
        }
        Ok(batches)
    }

    /// The step's groups, with their advantages, for the dashboard (`results/<exp>/episodes/`)
    /// and a few screenshots for TensorBoard.
    fn record_episodes(&mut self, step: u64, batches: &[Vec<Sample>]) -> Result<(), TrainerError> {
        let groups: Vec<arpo_dashboard::RecordedGroup<'_>> = batches
            .iter()
            .map(|b| arpo_dashboard::RecordedGroup {
                episodes: b
                    .iter()
                    .map(|s| arpo_dashboard::RecordedEpisode {
                        trajectory: &s.trajectory,
                        advantage: s.advantage,
                        injected: s.injected,
                    })
                    .collect(),
            })
            .collect();
        let dir = self.paths.results.join("episodes");
        arpo_dashboard::record_episodes(&dir, step, &groups, self.config.trainer.episodes)?;
        if let Some(tb) = &mut self.tensorboard {
            tb.write_episode_images(step, &groups, 2)?;
        }
        Ok(())
    }

    /// Mini-batches of `global_batch_size` groups, one optimizer step each, `ppo_epochs` times.
    /// Returns each optimizer step's statistics and the sampler/learner gap of the batch's
    /// tokens (from the first pass: later passes see the same tokens and old log-probs).
    fn update(
        &mut self,
        batches: &[Vec<Sample>],
    ) -> Result<(Vec<UpdateStats>, RolloutGap), TrainerError> {
        let loss = loss_config(&self.config);
        let mut stats = Vec::new();
        let mut gap = RolloutGap::default();
        for pass in 0..self.config.worker.actor.ppo_epochs {
            for mb in batches.chunks(self.config.worker.actor.global_batch_size) {
                let minibatch: Vec<Sample> = mb.iter().flatten().cloned().collect();
                if minibatch.is_empty() {
                    continue;
                }
                fail::fail_point!("train::update");
                let s = self
                    .learner
                    .update(&minibatch, &loss, self.state.optimizer_steps)?;
                if pass == 0 {
                    gap.merge(&s.rollout_gap);
                }
                stats.push(s);
                self.state.optimizer_steps += 1;
            }
        }
        Ok((stats, gap))
    }

    fn record(&mut self, tasks: &[Task], task_id: &str, attempt: Attempt) {
        let entry = self
            .state
            .task_results
            .entry(task_id.to_string())
            .or_insert_with(|| TaskResults {
                task_id: task_id.to_string(),
                instruction: tasks
                    .iter()
                    .find(|t| t.id == task_id)
                    .map(|t| t.instruction.clone())
                    .unwrap_or_default(),
                ..Default::default()
            });
        entry.push(attempt);
    }

    async fn finish_epoch(&mut self, epoch: usize) -> Result<(), TrainerError> {
        let steps: Vec<StepMetrics> = self
            .state
            .metrics
            .steps
            .iter()
            .filter(|s| s.epoch == epoch)
            .cloned()
            .collect();
        let mut e = EpochMetrics::from_steps(epoch, &steps);
        let vf = self.config.trainer.val_freq;
        if vf > 0 && (epoch as i64 + 1) % vf == 0 && !self.val_tasks.is_empty() {
            e.val_success_rate = Some(self.validate(epoch).await?);
        }
        tracing::info!(
            epoch,
            avg_reward = e.avg_reward,
            success_rate = e.success_rate,
            replay_size = e.replay_size,
            loss = e.loss,
            val_success_rate = e.val_success_rate,
            "epoch done"
        );
        if let Some(tb) = &mut self.tensorboard {
            let last_step = steps.last().map_or(0, |s| s.step);
            let v = serde_json::to_value(&e)
                .map_err(|err| TrainerError::io(&self.paths.results, err))?;
            tb.write_scalars(last_step, &arpo_dashboard::scalars_from_json("epoch", &v))?;
        }
        self.state.metrics.epochs.push(e);
        self.write_outputs()?;
        if let Err(err) = curves::draw(&self.state.metrics, &self.paths.results) {
            tracing::warn!("training curves not drawn: {err}");
        }
        Ok(())
    }

    /// Rolls out the held-out tasks at validation settings; returns the success rate.
    async fn validate(&mut self, epoch: usize) -> Result<f64, TrainerError> {
        let settings = &self.rollouts.1;
        let threshold = self.config.algorithm.replay.success_threshold;
        let seed = mix_seed(self.config.data.seed, 2_000_003 + epoch as u64);
        let tasks = self.val_tasks.clone();
        let progress = &self.progress;
        let report = run_rollouts(
            self.policy,
            &mut self.envs,
            &tasks,
            settings,
            seed,
            &mut |ev: RolloutEvent<'_>| progress.rollout_event(&ev),
        )
        .await?;
        let step = self.state.step;
        let mut n = 0usize;
        let mut ok = 0usize;
        for g in &report.groups {
            for (r, t) in g.trajectories.iter().enumerate() {
                n += 1;
                ok += usize::from(t.eval_result > threshold);
                self.record(
                    &tasks,
                    &g.task_id,
                    Attempt::from_trajectory(t, step, epoch, r, "validation", threshold),
                );
            }
        }
        let rate = if n == 0 { 0.0 } else { ok as f64 / n as f64 };
        tracing::info!(
            epoch,
            val_success_rate = rate,
            episodes = n,
            "validation done"
        );
        Ok(rate)
    }

    fn write_outputs(&self) -> Result<(), TrainerError> {
        write_json(&self.paths.metrics_file(), &self.state.metrics)?;
        if self.config.trainer.logger.contains(&Logger::Jsonl) {
            // Rewritten whole from the state: after a resume it holds exactly the steps the
            // restored run has, never the ones redone twice.
            let mut lines = String::new();
            for step in &self.state.metrics.steps {
                let line = serde_json::to_string(step)
                    .map_err(|e| TrainerError::io(self.paths.metrics_jsonl(), e))?;
                lines.push_str(&line);
                lines.push('\n');
            }
            crate::metrics::write_atomic(&self.paths.metrics_jsonl(), lines.as_bytes())?;
        }
        write_json(&self.paths.replay_stats_file(), &self.state.replay.stats())?;
        let dir = self.paths.task_results_dir();
        for (id, results) in &self.state.task_results {
            write_json(&dir.join(task_file_name(id)), results)?;
        }
        Ok(())
    }

    fn save_checkpoint(&mut self, epoch: usize) -> Result<PathBuf, TrainerError> {
        let dir = self.paths.epoch_dir(epoch);
        // Written under a temporary name and renamed: a crash mid-save leaves no epoch_<N>
        // that looks complete.
        let tmp = self
            .paths
            .checkpoints
            .join(format!(".epoch_{epoch}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainerError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainerError::io(&tmp, e))?;
        self.learner.save(&tmp)?;
        fail::fail_point!("train::checkpoint");
        write_json(&tmp.join("trainer_state.json"), &self.state)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| TrainerError::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| TrainerError::io(&dir, e))?;
        tracing::info!(checkpoint = %dir.display(), "checkpoint saved");
        self.enforce_save_limit()?;
        Ok(dir)
    }

    fn enforce_save_limit(&self) -> Result<(), TrainerError> {
        let limit = self.config.trainer.save_limit;
        if limit <= 0 {
            return Ok(());
        }
        let mut epochs: Vec<(usize, PathBuf)> = std::fs::read_dir(&self.paths.checkpoints)
            .map_err(|e| TrainerError::io(&self.paths.checkpoints, e))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let n: usize = name.strip_prefix("epoch_")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        epochs.sort();
        let excess = epochs.len().saturating_sub(limit as usize);
        for (_, path) in epochs.into_iter().take(excess) {
            std::fs::remove_dir_all(&path).map_err(|e| TrainerError::io(&path, e))?;
            tracing::info!(checkpoint = %path.display(), "old checkpoint removed (save_limit)");
        }
        Ok(())
    }
}

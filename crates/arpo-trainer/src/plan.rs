//! What a run will do before it starts: its task sets, steps per epoch, optimizer steps (which
//! size the learning-rate warmup), and where it resumes from.

use std::path::{Path, PathBuf};

use arpo_core::Task;

use crate::TrainerError;
use crate::config::Config;
use crate::setup::load_tasks;

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The training tasks: `data.train_files`, the first `data.max_tasks` of them.
    pub train_tasks: Vec<Task>,
    /// The validation tasks: all of `data.val_files` (`max_tasks` cuts the training set only).
    pub val_tasks: Vec<Task>,
    pub steps_per_epoch: usize,
    /// Optimizer steps over the whole run.
    pub total_optimizer_steps: u64,
}

impl RunPlan {
    /// Loads the task sets of `config` and counts its steps.
    pub fn new(config: &Config) -> Result<Self, TrainerError> {
        let train_tasks = load_tasks(&config.data.train_files, config, config.data.max_tasks)?;
        let val_tasks = load_tasks(&config.data.val_files, config, 0)?;
        Ok(Self {
            steps_per_epoch: steps_per_epoch(config, train_tasks.len()),
            total_optimizer_steps: total_optimizer_steps(config, train_tasks.len()),
            train_tasks,
            val_tasks,
        })
    }
}

/// Steps in one epoch over `tasks` training tasks (the last one may hold fewer tasks).
pub fn steps_per_epoch(config: &Config, tasks: usize) -> usize {
    tasks.div_ceil(config.data.rollout_batch_size.max(1))
}

/// Optimizer steps of the whole run: every step's tasks (a group each) are cut into
/// mini-batches of `global_batch_size` groups, each mini-batch one optimizer step per PPO epoch.
/// An epoch's last, shorter step makes fewer mini-batches. (Steps where every rollout of a group
/// was dropped make fewer still; those are not known in advance, so the warmup is sized on this.)
pub fn total_optimizer_steps(config: &Config, tasks: usize) -> u64 {
    let batch = config.data.rollout_batch_size.max(1);
    let gbs = config.worker.actor.global_batch_size.max(1);
    let full = tasks / batch;
    let rest = tasks % batch;
    let per_epoch = full * batch.div_ceil(gbs) + rest.div_ceil(gbs);
    (per_epoch as u64)
        .saturating_mul(config.worker.actor.ppo_epochs as u64)
        .saturating_mul(config.trainer.total_episodes as u64)
}

/// Where a run starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// From the base model, step 0.
    Fresh,
    /// The newest complete `epoch_<N>` of the experiment, or fresh when there is none.
    Latest,
    /// This `epoch_<N>` directory.
    Dir(PathBuf),
}

impl ResumeFrom {
    /// The command line's `--resume [DIR]` (`Some("")`: latest) over `trainer.load_checkpoint_path`
    /// (`latest`, a directory, or empty).
    pub fn choose(config: &Config, cli: Option<&str>) -> Self {
        let spec = match cli {
            Some(s) => s,
            None if config.trainer.load_checkpoint_path.is_empty() => return Self::Fresh,
            None => config.trainer.load_checkpoint_path.as_str(),
        };
        match spec {
            "" | "latest" => Self::Latest,
            dir => Self::Dir(Path::new(dir).to_path_buf()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_yaml_str("", &sets).unwrap()
    }

    #[test]
    fn optimizer_steps_count_the_short_last_step() {
        // 10 tasks, 4 per step: steps of 4, 4, 2 tasks; mini-batches of 2 groups: 2 + 2 + 1 = 5
        // per epoch; 2 PPO epochs, 3 epochs: 30.
        let c = config(&[
            "data.rollout_batch_size=4",
            "worker.actor.global_batch_size=2",
            "worker.actor.ppo_epochs=2",
            "trainer.total_episodes=3",
        ]);
        assert_eq!(steps_per_epoch(&c, 10), 3);
        assert_eq!(total_optimizer_steps(&c, 10), 30);
        // 8 tasks, 8 per step, 4 per mini-batch, 1 PPO epoch, 80 epochs: 2 × 80 = 160.
        let c = config(&[
            "data.rollout_batch_size=8",
            "worker.actor.global_batch_size=4",
            "trainer.total_episodes=80",
        ]);
        assert_eq!(total_optimizer_steps(&c, 8), 160);
    }

    #[test]
    fn resume_follows_the_command_line_then_the_config() {
        let fresh = config(&[]);
        assert_eq!(ResumeFrom::choose(&fresh, None), ResumeFrom::Fresh);
        assert_eq!(ResumeFrom::choose(&fresh, Some("")), ResumeFrom::Latest);
        let keyed = config(&["trainer.load_checkpoint_path=ck/exp/epoch_3"]);
        assert_eq!(
            ResumeFrom::choose(&keyed, None),
            ResumeFrom::Dir(PathBuf::from("ck/exp/epoch_3"))
        );
        assert_eq!(ResumeFrom::choose(&keyed, Some("")), ResumeFrom::Latest);
        let latest = config(&["trainer.load_checkpoint_path=latest"]);
        assert_eq!(ResumeFrom::choose(&latest, None), ResumeFrom::Latest);
    }
}

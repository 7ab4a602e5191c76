//! The buffer itself: storage per task, injection into all-failed groups, persistence.

use std::collections::{BTreeMap, VecDeque};

use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ReplacePositions, ReplayConfig, ReplayError, ReplayStats};

/// What the buffer needs to know about an episode: its task and its evaluation.
///
/// The format reward plays no part in replay (only the environment's evaluation decides what
/// is a success), so it is not asked for. An injected episode keeps whatever rewards it carries.
pub trait Episode {
    /// The task id; groups and the buffer are keyed by it.
    fn task_id(&self) -> &str;
    /// The environment's evaluation of the episode (OSWorld: usually 0 or 1).
    fn eval_result(&self) -> f64;
}

impl Episode for arpo_core::Trajectory {
    fn task_id(&self) -> &str {
        &self.task_id
    }

    fn eval_result(&self) -> f64 {
        self.eval_result
    }
}

/// A stored success and the step that stored it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored<T> {
    /// The episode, as it was rolled out.
    pub episode: T,
    /// The value of [`ReplayBuffer::steps_applied`] when it was stored.
    pub stored_at_step: u64,
}

/// One injected episode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injection {
    /// Index of the group in the slice given to [`ReplayBuffer::apply`].
    pub group: usize,
    /// Position of the replaced rollout in that group.
    pub position: usize,
    pub task_id: String,
    /// The step that stored the injected episode.
    pub stored_at_step: u64,
    /// `step - stored_at_step`: how many steps old the injected episode is (at least 1 for
    /// episodes stored by `apply`).
    pub age: u64,
}

/// What one call of [`ReplayBuffer::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step index (`steps_applied()` before the call; the first call is step 0).
    pub step: u64,
    /// Number of groups given.
    pub groups: usize,
    /// Number of all-failed groups (counted even when replay is disabled).
    pub all_failed_groups: usize,
    /// The injections, in group order.
    pub injections: Vec<Injection>,
    /// Successes of this step that were stored.
    pub stored: usize,
    /// Older episodes dropped to keep within capacity.
    pub evicted: usize,
}

/// ARPO's replay buffer: per task, a FIFO of up to `capacity` successful episodes, used to put
/// one success into each group whose rollouts all failed, so that the group still has a reward
/// spread (and a non-zero GRPO advantage).
///
/// Generic over the episode type: anything that says its task id and evaluation ([`Episode`]).
/// `T: Clone` for `apply`, since a stored episode is copied into the group it is injected into.
#[derive(Debug, Clone)]
pub struct ReplayBuffer<T> {
    config: ReplayConfig,
    step: u64,
    tasks: BTreeMap<String, VecDeque<Stored<T>>>,
    rng: ChaCha8Rng,
    history: Vec<StepReport>,
}

impl<T> ReplayBuffer<T> {
    /// An empty buffer whose draws are determined by `seed`.
    pub fn new(config: ReplayConfig, seed: u64) -> Result<Self, ReplayError> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            tasks: BTreeMap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            history: Vec::new(),
        })
    }

    pub fn config(&self) -> &ReplayConfig {
        &self.config
    }

    /// Turns replay on or off from the next [`apply`](Self::apply) on; the stored episodes stay.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.config.enabled = enabled;
    }

    /// How many times [`apply`](Self::apply) ran: the index of the next step.
    pub fn steps_applied(&self) -> u64 {
        self.step
    }

    /// Total number of stored episodes.
    pub fn len(&self) -> usize {
        self.tasks.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The stored successes of one task, oldest first (empty if none).
    pub fn stored(&self, task_id: &str) -> impl Iterator<Item = &Stored<T>> + '_ {
        self.tasks.get(task_id).into_iter().flatten()
    }

    /// The ids of the tasks with at least one stored success, sorted.
    pub fn tasks(&self) -> impl Iterator<Item = &str> + '_ {
        self.tasks.keys().map(String::as_str)
    }

    /// One report per call of [`apply`](Self::apply), oldest first.
    pub fn history(&self) -> &[StepReport] {
        &self.history
    }

    /// The statistics written to `replay_buffer_stats.json`.
    pub fn stats(&self) -> ReplayStats {
        ReplayStats::new(
            &self.config,
            self.step,
            self.tasks.iter().map(|(id, q)| (id.as_str(), q.len())),
            &self.history,
        )
    }
}

impl<T: Episode> ReplayBuffer<T> {
    /// Stores `episode` if it is a success (`eval_result > success_threshold`), dropping the
    /// task's oldest episode when full. Returns whether it was stored.
    ///
    /// [`apply`](Self::apply) calls this for the step's own rollouts; call it directly only to
    /// seed the buffer with earlier successes (they count as stored at the current step).
    pub fn insert(&mut self, episode: T) -> bool {
        self.insert_counting(episode).0
    }

    fn insert_counting(&mut self, episode: T) -> (bool, usize) {
        if !self.config.is_success(episode.eval_result()) {
            return (false, 0);
        }
        let queue = self.tasks.entry(episode.task_id().to_owned()).or_default();
        queue.push_back(Stored {
            episode,
            stored_at_step: self.step,
        });
        let mut evicted = 0;
        while queue.len() > self.config.capacity {
            queue.pop_front();
            evicted += 1;
        }
        (true, evicted)
    }
}

impl<T: Episode + Clone> ReplayBuffer<T> {
    /// Applies replay to one training step's groups (one group per task, all its rollouts).
    ///
    /// In order, as the reference does:
    /// 1. each all-failed group ([`ReplayConfig::is_all_failed`] on the eval results) whose task
    ///    has stored successes gets `injections_per_group` of its rollouts replaced by stored
    ///    successes drawn uniformly (with replacement) with the buffer's seeded RNG; the group
    ///    keeps its size; groups are visited in order, so the draws are reproducible;
    /// 2. then the step's own successes (the rollouts as given, including any that were just
    ///    replaced) are stored, in group order: they can be injected from the next step on.
    ///
    /// When replay is disabled the groups are left untouched, nothing is stored and no random
    /// number is drawn; the all-failed groups are still counted in the report.
    ///
    /// Fails, changing nothing, when a group mixes task ids.
    pub fn apply(&mut self, groups: &mut [Vec<T>]) -> Result<StepReport, ReplayError> {
        for (g, group) in groups.iter().enumerate() {
            if let Some(first) = group.first()
                && let Some(other) = group.iter().find(|e| e.task_id() != first.task_id())
            {
                return Err(ReplayError::MixedGroup {
                    group: g,
                    first: first.task_id().to_owned(),
                    other: other.task_id().to_owned(),
                });
            }
        }
        let all_failed: Vec<bool> = groups
            .iter()
            .map(|group| {
                let evals: Vec<f64> = group.iter().map(Episode::eval_result).collect();
                self.config.is_all_failed(&evals)
            })
            .collect();
        let mut report = StepReport {
            step: self.step,
            groups: groups.len(),
            all_failed_groups: all_failed.iter().filter(|&&f| f).count(),
            injections: Vec::new(),
            stored: 0,
            evicted: 0,
        };
        if self.config.enabled {
            // The step's successes as rolled out, before any of them is replaced.
            let successes: Vec<T> = groups
                .iter()
                .flatten()
                .filter(|e| self.config.is_success(e.eval_result()))
                .cloned()
                .collect();
            for (g, group) in groups.iter_mut().enumerate() {
                if all_failed[g] {
                    self.inject(g, group, &mut report.injections);
                }
            }
            for episode in successes {
                let (stored, evicted) = self.insert_counting(episode);
                report.stored += usize::from(stored);
                report.evicted += evicted;
            }
        }
        self.step += 1;
        self.history.push(report.clone());
        Ok(report)
    }

    fn inject(&mut self, g: usize, group: &mut [T], injections: &mut Vec<Injection>) {
        let Some(first) = group.first() else {
            return;
        };
        let Some(stored) = self.tasks.get(first.task_id()) else {
            return;
        };
        if stored.is_empty() {
            return;
        }
        let n = self.config.injections_per_group.min(group.len());
        let positions: Vec<usize> = match self.config.replace {
            ReplacePositions::First => (0..n).collect(),
            ReplacePositions::Last => (group.len() - n..group.len()).collect(),
            ReplacePositions::Random => index::sample(&mut self.rng, group.len(), n).into_vec(),
        };
        for position in positions {
            let drawn = &stored[self.rng.random_range(0..stored.len())];
            group[position] = drawn.episode.clone();
            injections.push(Injection {
                group: g,
                position,
                task_id: drawn.episode.task_id().to_owned(),
                stored_at_step: drawn.stored_at_step,
                age: self.step.saturating_sub(drawn.stored_at_step),
            });
        }
    }
}

// Persistence: the whole state (config, stored episodes, step, RNG position, history), so that a
// resumed run draws exactly what an uninterrupted one would have drawn.

const STATE_VERSION: u32 = 1;

/// The position of a ChaCha8 stream, in a form every serde format can hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RngState {
    seed: [u8; 32],
    stream: u64,
    /// `u128`, as a decimal string.
    word_pos: String,
}

impl RngState {
    fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    fn restore(&self) -> Result<ChaCha8Rng, ReplayError> {
        let word_pos: u128 = self
            .word_pos
            .parse()
            .map_err(|_| ReplayError::CorruptState {
                reason: format!("rng word_pos {:?} is not an integer", self.word_pos),
            })?;
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

#[derive(Serialize)]
struct StateRef<'a, T> {
    version: u32,
    config: &'a ReplayConfig,
    step: u64,
    tasks: &'a BTreeMap<String, VecDeque<Stored<T>>>,
    rng: RngState,
    history: &'a [StepReport],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct State<T> {
    version: u32,
    config: ReplayConfig,
    step: u64,
    tasks: BTreeMap<String, VecDeque<Stored<T>>>,
    rng: RngState,
    history: Vec<StepReport>,
}

impl<T: Serialize> Serialize for ReplayBuffer<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StateRef {
            version: STATE_VERSION,
            config: &self.config,
            step: self.step,
            tasks: &self.tasks,
            rng: RngState::of(&self.rng),
            history: &self.history,
        }
        .serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de> + Episode> Deserialize<'de> for ReplayBuffer<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let state = State::<T>::deserialize(deserializer)?;
        Self::from_state(state).map_err(serde::de::Error::custom)
    }
}

impl<T: Episode> ReplayBuffer<T> {
    fn from_state(state: State<T>) -> Result<Self, ReplayError> {
        let corrupt = |reason: String| ReplayError::CorruptState { reason };
        if state.version != STATE_VERSION {
            return Err(corrupt(format!(
                "version {} is not the supported version {STATE_VERSION}",
                state.version
            )));
        }
        state.config.validate()?;
        for (task_id, queue) in &state.tasks {
            if queue.is_empty() {
                return Err(corrupt(format!("task {task_id:?} has an empty list")));
            }
            if queue.len() > state.config.capacity {
                return Err(corrupt(format!(
                    "task {task_id:?} holds {} episodes, more than the capacity {}",
                    queue.len(),
                    state.config.capacity
                )));
            }
            for stored in queue {
                if stored.episode.task_id() != task_id {
                    return Err(corrupt(format!(
                        "an episode of task {:?} is stored under task {task_id:?}",
                        stored.episode.task_id()
                    )));
                }
                if !state.config.is_success(stored.episode.eval_result()) {
                    return Err(corrupt(format!(
                        "a stored episode of task {task_id:?} has eval_result {}, not above the success threshold {}",
                        stored.episode.eval_result(),
                        state.config.success_threshold
                    )));
                }
                if stored.stored_at_step > state.step {
                    return Err(corrupt(format!(
                        "an episode of task {task_id:?} was stored at step {}, after the current step {}",
                        stored.stored_at_step, state.step
                    )));
                }
            }
        }
        Ok(Self {
            rng: state.rng.restore()?,
            config: state.config,
            step: state.step,
            tasks: state.tasks,
            history: state.history,
        })
    }
}

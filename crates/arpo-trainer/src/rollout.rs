//! The rollout engine: groups of episodes over a pool of environments, lock-step batched
//! generation.
//!
//! Every task is rolled out `group_size` times. The environments of the pool run one episode each
//! at a time; at every tick the engine gathers the agent contexts of all live episodes, asks the
//! policy for the whole batch at once, parses each response (arpo-core's UI-TARS protocol), and
//! carries the actions out on all environments concurrently. An episode ends on `finished` /
//! `call_user`, on a response that does not parse (format reward −1), on the environment ending
//! it, or after `max_steps` turns; then it is evaluated.
//!
//! This is the one episode engine: training, validation, `cargo xtask eval` and
//! `cargo xtask test-env` all advance episodes through [`run_rollouts`]; what differs is the
//! observer (a progress bar, a counter, a transcript printer) that [`RolloutEvent`]s go to.
//!
//! Environment failures are never the agent's: a failed `reset`, an environment that breaks
//! mid-episode and an evaluation that raises all restart the rollout from `reset` (up to
//! `reset_retries` environment failures per rollout), and a rollout that still fails is dropped
//! and recorded in [`RolloutReport::dropped`] with the stage that failed, never scored 0. A
//! rejected action ([`arpo_core::EnvError::episode_can_continue`]) is recorded on its turn and the episode
//! goes on.

use std::collections::VecDeque;
use std::time::Instant;

use arpo_core::protocol::{CoordinateSystem, ParseConfig, parse_response};
use arpo_core::{
    Action, AgentContext, Environment, EpisodeEnd, Observation, Policy, Response, SamplingParams,
    ScreenSize, Task, Trajectory, Turn,
};
use serde::{Deserialize, Serialize};

use crate::TrainerError;

/// How model coordinates map to the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Coordinates {
    /// 0..1000 across the screen (UI-TARS on Qwen2-VL).
    Relative,
    /// Pixels of the smart-resized screenshot (UI-TARS-1.5 on Qwen2.5-VL).
    Absolute { min_pixels: u64, max_pixels: u64 },
}

/// What the engine needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSettings {
    /// Rollouts per task.
    pub group_size: usize,
    /// Turns per episode.
    pub max_steps: usize,
    /// Attempts at setting an episode up before the rollout is dropped.
    pub reset_retries: usize,
    /// Sampling; `seed` is replaced per batch by one derived from the engine's seed.
    pub sampling: SamplingParams,
    pub coordinates: Coordinates,
    /// The screen every environment must show (`env.screen_size`); a different screenshot at
    /// reset stops the run with [`TrainerError::ScreenMismatch`]. `None`: any size.
    pub expected_screen: Option<ScreenSize>,
}

/// All rollouts of one task in one step (fewer than `group_size` when some were dropped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub task_id: String,
    pub trajectories: Vec<Trajectory>,
}

/// Where an environment failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EnvStage {
    /// Setting the task up (`reset`).
    #[default]
    Reset,
    /// Carrying an action out (`step`).
    Step,
    /// Scoring the episode (`evaluate`).
    Evaluate,
}

impl std::fmt::Display for EnvStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reset => "reset",
            Self::Step => "step",
            Self::Evaluate => "evaluate",
        })
    }
}

/// A rollout given up on because its environment kept failing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DroppedRollout {
    pub task_id: String,
    /// Which rollout of the group (0-based).
    pub rollout: usize,
    /// Environment failures this rollout met (resets, broken episodes, failed evaluations).
    pub failures: usize,
    /// Where the last failure happened.
    #[serde(default)]
    pub stage: EnvStage,
    /// The last error.
    pub error: String,
}

/// What [`run_rollouts`] produced.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RolloutReport {
    /// One group per task, in task order; trajectories in rollout order.
    pub groups: Vec<Group>,
    pub dropped: Vec<DroppedRollout>,
    /// Actions carried out on environments.
    pub env_steps: usize,
    /// Batched policy calls.
    pub policy_calls: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// Which episode an event is about.
#[derive(Debug, Clone, Copy)]
pub struct EpisodeRef<'a> {
    pub task: &'a Task,
    /// Which rollout of the task's group (0-based).
    pub rollout: usize,
    /// Environment failures this rollout met before this attempt.
    pub failures: usize,
    /// The environment (index into the pool) running it.
    pub env: usize,
}

/// What the engine reports as it goes, to a progress bar, a transcript printer or a recorder.
#[derive(Debug, Clone, Copy)]
pub enum RolloutEvent<'a> {
    /// An episode was set up; `observation` is its first screen.
    EpisodeStarted {
        episode: EpisodeRef<'a>,
        observation: &'a Observation,
        seconds: f64,
    },
    /// A batch is about to be generated for this many live episodes.
    Generating { live: usize },
    /// The batch came back after `seconds`.
    Generated { live: usize, seconds: f64 },
    /// One turn of an episode was carried out: `turn` holds the screen the model saw, its
    /// response and the parsed actions; `observation` is the screen after them.
    TurnDone {
        episode: EpisodeRef<'a>,
        turn: &'a Turn,
        observation: &'a Observation,
        execution_seconds: f64,
    },
    /// The environment failed; the rollout is retried from `reset` when `retrying`, else dropped.
    EnvFailed {
        episode: EpisodeRef<'a>,
        stage: EnvStage,
        error: &'a str,
        retrying: bool,
    },
    /// This many environment steps were carried out in the last tick.
    Stepped { env_steps: usize },
    /// An episode ended and was evaluated.
    EpisodeDone {
        episode: EpisodeRef<'a>,
        trajectory: &'a Trajectory,
        evaluate_seconds: f64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Job {
    task: usize,
    rollout: usize,
    failures: usize,
}

struct Live {
    job: Job,
    observation: Observation,
    turns: Vec<Turn>,
    parse: ParseConfig,
}

enum Tick {
    Continue,
    Done {
        trajectory: Trajectory,
        evaluate_seconds: f64,
    },
    Broken {
        stage: EnvStage,
        error: String,
    },
}

fn episode_ref(tasks: &[Task], job: Job, env: usize) -> EpisodeRef<'_> {
    EpisodeRef {
        task: &tasks[job.task],
        rollout: job.rollout,
        failures: job.failures,
        env,
    }
}

/// A 64-bit mix (splitmix64's finaliser) for deriving independent seeds.
pub fn mix_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Rolls every task out `settings.group_size` times over `envs`.
///
/// Deterministic for a deterministic policy and deterministic environments: batches are formed
/// in slot order and the sampling seed of batch `k` is `mix_seed(seed, k)`.
pub async fn run_rollouts<P, E>(
    policy: &P,
    envs: &mut [E],
    tasks: &[Task],
    settings: &RolloutSettings,
    seed: u64,
    observer: &mut dyn FnMut(RolloutEvent<'_>),
) -> Result<RolloutReport, TrainerError>
where
    P: Policy + ?Sized,
    E: Environment,
{
    let started = Instant::now();
    let mut report = RolloutReport::default();
    if envs.is_empty() {
        return Err(TrainerError::Missing {
            what: "an environment".into(),
            reason: "the rollout engine got an empty pool: set env.num_envs to at least 1".into(),
        });
    }
    let mut queue: VecDeque<Job> = tasks
        .iter()
        .enumerate()
        .flat_map(|(task, _)| {
            (0..settings.group_size).map(move |rollout| Job {
                task,
                rollout,
                failures: 0,
            })
        })
        .collect();
    let mut finished: Vec<Vec<Option<Trajectory>>> =
        vec![vec![None; settings.group_size]; tasks.len()];
    let mut slots: Vec<Option<Live>> = envs.iter().map(|_| None).collect();

    loop {
        // Start episodes on free environments, concurrently; a failed reset goes back to the
        // queue until the job's failure budget is spent.
        while !queue.is_empty() && slots.iter().any(Option::is_none) {
            let mut starts = Vec::new();
            for (i, slot) in slots.iter().enumerate() {
                if slot.is_none() {
                    match queue.pop_front() {
                        Some(job) => starts.push((i, job)),
                        None => break,
                    }
                }
            }
            let futures = envs
                .iter_mut()
                .enumerate()
                .filter_map(|(i, env)| {
                    starts
                        .iter()
                        .find(|(s, _)| *s == i)
                        .map(|&(_, job)| (env, job))
                })
                .map(|(env, job)| async move {
                    let task = &tasks[job.task];
                    let started = Instant::now();
                    let result = env.reset(task).await;
                    let screen = env.screen_size();
                    (job, result, screen, started.elapsed().as_secs_f64())
                });
            let results = futures::future::join_all(futures).await;
            for ((slot_index, _), (job, result, screen, seconds)) in starts.iter().zip(results) {
                let observation = match result {
                    Ok(observation) => observation,
                    Err(e) => {
                        let error = e.to_string();
                        fail_or_drop(
                            &mut queue,
                            &mut report,
                            tasks,
                            settings,
                            job,
                            *slot_index,
                            EnvStage::Reset,
                            error,
                            observer,
                        );
                        continue;
                    }
                };
                let shot = &observation.screenshot;
                if let Some(want) = settings.expected_screen
                    && (shot.width, shot.height) != want.pair()
                {
                    return Err(TrainerError::ScreenMismatch {
                        expected: want,
                        actual: (shot.width, shot.height),
                        task_id: tasks[job.task].id.clone(),
                    });
                }
                match parse_config(settings.coordinates, screen, &observation) {
                    Ok(parse) => {
                        observer(RolloutEvent::EpisodeStarted {
                            episode: episode_ref(tasks, job, *slot_index),
                            observation: &observation,
                            seconds,
                        });
                        slots[*slot_index] = Some(Live {
                            job,
                            observation,
                            turns: Vec::new(),
                            parse,
                        });
                    }
                    Err(reason) => fail_or_drop(
                        &mut queue,
                        &mut report,
                        tasks,
                        settings,
                        job,
                        *slot_index,
                        EnvStage::Reset,
                        reason,
                        observer,
                    ),
                }
            }
        }

        let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
        if live.is_empty() {
            break;
        }

        // One batched generation for every live episode.
        let contexts: Vec<AgentContext> = live
            .iter()
            .filter_map(|&i| slots[i].as_ref())
            .map(|l| context_of(&tasks[l.job.task], l))
            .collect();
        observer(RolloutEvent::Generating { live: live.len() });
        let mut sampling = settings.sampling.clone();
        sampling.seed = Some(mix_seed(seed, report.policy_calls as u64));
        let generation_started = Instant::now();
        let responses =
            policy
                .act(&contexts, &sampling)
                .await
                .map_err(|source| TrainerError::Policy {
                    policy: policy.describe(),
                    source,
                })?;
        report.policy_calls += 1;
        observer(RolloutEvent::Generated {
            live: live.len(),
            seconds: generation_started.elapsed().as_secs_f64(),
        });
        if responses.len() != contexts.len() {
            return Err(TrainerError::Policy {
                policy: policy.describe(),
                source: arpo_core::PolicyError::Generation(format!(
                    "asked for {} responses, got {}",
                    contexts.len(),
                    responses.len()
                )),
            });
        }
        report.generated_tokens += responses.iter().map(|r| r.token_ids.len()).sum::<usize>();

        // Carry the actions out on every live environment concurrently.
        let mut responses = responses.into_iter();
        let mut work = Vec::new();
        for (i, (env, slot)) in envs.iter_mut().zip(slots.iter_mut()).enumerate() {
            if let Some(live_episode) = slot.as_mut() {
                let response = responses.next().unwrap_or_default();
                work.push((i, env, live_episode, response));
            }
        }
        let ticks = futures::future::join_all(work.into_iter().map(|(i, env, l, response)| {
            let task = &tasks[l.job.task];
            async move {
                let started = Instant::now();
                let (tick, steps) = advance(env, task, l, response, settings.max_steps).await;
                (i, tick, steps, started.elapsed().as_secs_f64())
            }
        }))
        .await;
        let mut steps_now = 0;
        for (i, tick, steps, seconds) in ticks {
            steps_now += steps;
            match tick {
                Tick::Continue => {
                    if let Some(l) = slots[i].as_ref()
                        && let Some(turn) = l.turns.last()
                    {
                        observer(RolloutEvent::TurnDone {
                            episode: episode_ref(tasks, l.job, i),
                            turn,
                            observation: &l.observation,
                            execution_seconds: seconds,
                        });
                    }
                }
                Tick::Done {
                    trajectory,
                    evaluate_seconds,
                } => {
                    if let Some(l) = slots[i].take() {
                        let episode = episode_ref(tasks, l.job, i);
                        if let Some(turn) = trajectory.turns.last() {
                            observer(RolloutEvent::TurnDone {
                                episode,
                                turn,
                                observation: &l.observation,
                                execution_seconds: seconds - evaluate_seconds,
                            });
                        }
                        observer(RolloutEvent::EpisodeDone {
                            episode,
                            trajectory: &trajectory,
                            evaluate_seconds,
                        });
                        finished[l.job.task][l.job.rollout] = Some(trajectory);
                    }
                }
                Tick::Broken { stage, error } => {
                    if let Some(l) = slots[i].take() {
                        fail_or_drop(
                            &mut queue,
                            &mut report,
                            tasks,
                            settings,
                            l.job,
                            i,
                            stage,
                            error,
                            observer,
                        );
                    }
                }
            }
        }
        report.env_steps += steps_now;
        observer(RolloutEvent::Stepped {
            env_steps: steps_now,
        });
    }

    report.groups = tasks
        .iter()
        .zip(finished)
        .map(|(task, rollouts)| Group {
            task_id: task.id.clone(),
            trajectories: rollouts.into_iter().flatten().collect(),
        })
        .collect();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Counts an environment failure against the rollout: back to the queue while its budget
/// (`reset_retries` failures) lasts, else dropped and recorded.
#[allow(clippy::too_many_arguments)]
fn fail_or_drop(
    queue: &mut VecDeque<Job>,
    report: &mut RolloutReport,
    tasks: &[Task],
    settings: &RolloutSettings,
    mut job: Job,
    env: usize,
    stage: EnvStage,
    error: String,
    observer: &mut dyn FnMut(RolloutEvent<'_>),
) {
    let retrying = job.failures + 1 < settings.reset_retries;
    observer(RolloutEvent::EnvFailed {
        episode: episode_ref(tasks, job, env),
        stage,
        error: &error,
        retrying,
    });
    job.failures += 1;
    let task = &tasks[job.task].id;
    if retrying {
        tracing::warn!(%task, rollout = job.rollout, failures = job.failures, %stage, "environment failed, rollout restarts: {error}");
        queue.push_back(job);
    } else {
        tracing::error!(%task, rollout = job.rollout, %stage, "rollout dropped after {} environment failures: {error}", job.failures);
        report.dropped.push(DroppedRollout {
            task_id: task.clone(),
            rollout: job.rollout,
            failures: job.failures,
            stage,
            error,
        });
    }
}

fn parse_config(
    coordinates: Coordinates,
    screen: (u32, u32),
    observation: &Observation,
) -> Result<ParseConfig, String> {
    let system = match coordinates {
        Coordinates::Relative => CoordinateSystem::Relative1000,
        Coordinates::Absolute {
            min_pixels,
            max_pixels,
        } => {
            let shot = &observation.screenshot;
            CoordinateSystem::absolute_for_image(shot.width, shot.height, min_pixels, max_pixels)
                .map_err(|e| format!("screenshot {}x{}: {e}", shot.width, shot.height))?
        }
    };
    Ok(ParseConfig::new(system, screen.0, screen.1))
}

fn context_of(task: &Task, live: &Live) -> AgentContext {
    let mut screenshots: Vec<_> = live.turns.iter().map(|t| t.screenshot.clone()).collect();
    screenshots.push(live.observation.screenshot.clone());
    AgentContext {
        instruction: task.instruction.clone(),
        screenshots,
        responses: live.turns.iter().map(|t| t.response.text.clone()).collect(),
    }
}

/// One turn of one episode: parse, act, maybe end and evaluate. Returns the env steps taken.
async fn advance<E: Environment>(
    env: &mut E,
    task: &Task,
    live: &mut Live,
    response: Response,
    max_steps: usize,
) -> (Tick, usize) {
    let parsed = parse_response(&response.text, &live.parse);
    let mut turn = Turn {
        screenshot: live.observation.screenshot.clone(),
        response,
        actions: Vec::new(),
        format_error: None,
        env_error: None,
    };
    let actions = match parsed {
        Ok(p) => p.actions,
        Err(e) => {
            // A response that does not parse ends the episode (format reward −1).
            turn.format_error = Some(e.to_string());
            live.turns.push(turn);
            return (
                finish(env, task, live, EpisodeEnd::FormatError, None).await,
                0,
            );
        }
    };
    turn.actions = actions.clone();
    let mut steps = 0;
    let mut end = None;
    let mut last_action = None;
    for action in actions {
        if action.is_terminal() {
            end = Some(match action {
                Action::CallUser => EpisodeEnd::CallUser,
                _ => EpisodeEnd::Finished,
            });
            last_action = Some(action);
            break;
        }
        match env.step(&action).await {
            Ok(step) => {
                steps += 1;
                live.observation = step.observation;
                last_action = Some(action);
                if step.done {
                    end = Some(EpisodeEnd::MaxSteps);
                    break;
                }
            }
            Err(e) if e.episode_can_continue() => {
                steps += 1;
                turn.env_error = Some(e.to_string());
                last_action = Some(action);
            }
            Err(e) => {
                return (
                    Tick::Broken {
                        stage: EnvStage::Step,
                        error: format!("{} failed: {e}", action.name()),
                    },
                    steps,
                );
            }
        }
    }
    live.turns.push(turn);
    if end.is_none() && live.turns.len() >= max_steps {
        end = Some(EpisodeEnd::MaxSteps);
    }
    match end {
        Some(end) => (
            finish(env, task, live, end, last_action.as_ref()).await,
            steps,
        ),
        None => (Tick::Continue, steps),
    }
}

async fn finish<E: Environment>(
    env: &mut E,
    task: &Task,
    live: &mut Live,
    end: EpisodeEnd,
    last_action: Option<&Action>,
) -> Tick {
    let started = Instant::now();
    let eval_result = match env.evaluate(last_action).await {
        Ok(r) if r.is_finite() => r.clamp(0.0, 1.0),
        // An evaluator that answers NaN or infinity is broken, not the agent.
        Ok(r) => {
            return Tick::Broken {
                stage: EnvStage::Evaluate,
                error: format!("the evaluator returned {r}, not a score in [0, 1]"),
            };
        }
        // OSWorld scores an evaluation that raises 0 (and so did we); that teaches the policy
        // that an environment fault was its mistake. The rollout restarts or is dropped instead.
        Err(e) => {
            return Tick::Broken {
                stage: EnvStage::Evaluate,
                error: e.to_string(),
            };
        }
    };
    let evaluate_seconds = started.elapsed().as_secs_f64();
    let format_reward = if end == EpisodeEnd::FormatError {
        -1.0
    } else {
        0.0
    };
    Tick::Done {
        trajectory: Trajectory {
            task_id: task.id.clone(),
            instruction: task.instruction.clone(),
            turns: std::mem::take(&mut live.turns),
            end,
            eval_result,
            format_reward,
        },
        evaluate_seconds,
    }
}

//! The episodes a run keeps for the dashboard: `results/<exp>/episodes/`.
//!
//! ```text
//! episodes/
//!   step_00000012/
//!     step.json              StepEpisodes: groups → episodes → turns (response, actions, marks)
//!     g0_e1_t3.png           the screenshot of group 0, episode 1, turn 3
//!     THINNED                present once retention cut the step down
//! ```
//!
//! A step is written into `step_<N>.partial/` and renamed into place, so a reader (or a run
//! killed mid-write) never sees half a step; recording a step again (after `--resume`) replaces
//! it. [`Retention`] records `groups_per_step` groups of each step, keeps the last `full_steps`
//! recorded steps so and thins older ones to `groups_after` group(s). Groups are chosen by the
//! spread of their rewards (the groups the update learnt most from), earlier first on ties.

use std::path::{Path, PathBuf};

use arpo_core::{Action, EpisodeEnd, ImageFormat, Trajectory};
use serde::{Deserialize, Serialize};

use crate::DashboardError;

/// One episode of a step, as the training loop has it after advantages.
#[derive(Debug, Clone, Copy)]
pub struct RecordedEpisode<'a> {
    pub trajectory: &'a Trajectory,
    pub advantage: f64,
    /// Whether the replay buffer put this episode into its group.
    pub injected: bool,
}

/// One rollout group (one task's `worker.rollout.n` episodes).
#[derive(Debug, Clone)]
pub struct RecordedGroup<'a> {
    pub episodes: Vec<RecordedEpisode<'a>>,
}

/// How much the episodes directory keeps. Embeddable in a config as it is (every field has a
/// default; unknown keys are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Groups recorded of each step (0: all): full-size OSWorld screenshots are large, and a
    /// step of 8 groups × 8 episodes × 15 turns would be hundreds of MB.
    pub groups_per_step: usize,
    /// The most recent recorded steps kept as recorded.
    pub full_steps: usize,
    /// Groups kept of each older step.
    pub groups_after: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            groups_per_step: 4,
            full_steps: 20,
            groups_after: 1,
        }
    }
}

/// `step.json`: what the page shows of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEpisodes {
    pub step: u64,
    /// Groups the step had in training (more than `groups` when `groups_per_step` or
    /// retention left some out).
    pub groups_in_step: usize,
    /// Whether retention removed groups since.
    pub thinned: bool,
    pub groups: Vec<GroupRecord>,
}

/// One group of `step.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Its position in the step.
    pub group: usize,
    pub task_id: String,
    pub instruction: String,
    pub episodes: Vec<EpisodeRecord>,
}

/// One episode of `step.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeRecord {
    pub reward: f64,
    pub eval_result: f64,
    pub format_reward: f64,
    pub advantage: f64,
    pub injected: bool,
    pub end: EpisodeEnd,
    pub turns: Vec<TurnRecord>,
}

/// One turn: the screenshot file, the response, its actions and where they act.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// File name in the step's directory.
    pub screenshot: String,
    pub width: u32,
    pub height: u32,
    pub response: String,
    pub actions: Vec<Action>,
    /// The points the actions act on, in screenshot pixels, to draw on it.
    pub marks: Vec<Mark>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_error: Option<String>,
}

/// A point (or a drag's two points) an action acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// The action's UI-TARS name (`click`, `drag`, `scroll`, ...).
    pub kind: String,
    pub x: f64,
    pub y: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<(f64, f64)>,
}

fn marks_of(actions: &[Action]) -> Vec<Mark> {
    let mut out = Vec::new();
    for a in actions {
        let (p, to) = match a {
            Action::Click { point }
            | Action::LeftDouble { point }
            | Action::RightSingle { point }
            | Action::Hover { point } => (*point, None),
            Action::Drag { from, to } => (*from, Some((to.x, to.y))),
            Action::Scroll {
                point: Some(point), ..
            } => (*point, None),
            _ => continue,
        };
        out.push(Mark {
            kind: a.name().to_string(),
            x: p.x,
            y: p.y,
            to,
        });
    }
    out
}

/// The directory of `step` under `dir`.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step:08}"))
}

/// Writes `groups` as step `step` under `dir` (e.g. `results/<exp>/episodes`), then applies
/// `retention` to the older steps there. Returns the step's directory.
pub fn record_episodes(
    dir: &Path,
    step: u64,
    groups: &[RecordedGroup<'_>],
    retention: Retention,
) -> Result<PathBuf, DashboardError> {
    std::fs::create_dir_all(dir).map_err(|e| DashboardError::io(dir, e))?;
    let target = step_dir(dir, step);
    let partial = target.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| DashboardError::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| DashboardError::io(&partial, e))?;
    let mut record = StepEpisodes {
        step,
        groups_in_step: groups.len(),
        thinned: false,
        groups: Vec::with_capacity(groups.len()),
    };
    let spreads: Vec<f64> = groups
        .iter()
        .map(|g| reward_spread(g.episodes.iter().map(|e| e.trajectory.reward())))
        .collect();
    let chosen = most_informative(&spreads, retention.groups_per_step);
    for (gi, g) in groups.iter().enumerate() {
        if !chosen.contains(&gi) {
            continue;
        }
        let first = g.episodes.first().map(|e| e.trajectory);
        let mut group = GroupRecord {
            group: gi,
            task_id: first.map(|t| t.task_id.clone()).unwrap_or_default(),
            instruction: first.map(|t| t.instruction.clone()).unwrap_or_default(),
            episodes: Vec::with_capacity(g.episodes.len()),
        };
        for (ei, e) in g.episodes.iter().enumerate() {
            let t = e.trajectory;
            let mut turns = Vec::with_capacity(t.turns.len());
            for (ti, turn) in t.turns.iter().enumerate() {
                let ext = match turn.screenshot.format() {
                    Some(ImageFormat::Jpeg) => "jpg",
                    _ => "png",
                };
                let name = format!("g{gi}_e{ei}_t{ti}.{ext}");
                let path = partial.join(&name);
                std::fs::write(&path, &turn.screenshot.bytes)
                    .map_err(|e| DashboardError::io(&path, e))?;
                turns.push(TurnRecord {
                    screenshot: name,
                    width: turn.screenshot.width,
                    height: turn.screenshot.height,
                    response: turn.response.text.clone(),
                    actions: turn.actions.clone(),
                    marks: marks_of(&turn.actions),
                    format_error: turn.format_error.clone(),
                    env_error: turn.env_error.clone(),
                });
            }
            group.episodes.push(EpisodeRecord {
                reward: t.reward(),
                eval_result: t.eval_result,
                format_reward: t.format_reward,
                advantage: e.advantage,
                injected: e.injected,
                end: t.end,
                turns,
            });
        }
        record.groups.push(group);
    }
    write_json(&partial.join("step.json"), &record)?;
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|e| DashboardError::io(&target, e))?;
    }
    std::fs::rename(&partial, &target).map_err(|e| DashboardError::io(&target, e))?;
    apply_retention(dir, retention)?;
    Ok(target)
}

/// The recorded steps under `dir`, ascending (complete ones only).
pub fn recorded_steps(dir: &Path) -> Result<Vec<u64>, DashboardError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DashboardError::io(dir, e)),
    };
    let mut steps: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("step_"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    steps.sort_unstable();
    Ok(steps)
}

/// Reads one step's `step.json`.
pub fn read_step(dir: &Path, step: u64) -> Result<StepEpisodes, DashboardError> {
    let path = step_dir(dir, step).join("step.json");
    let text = std::fs::read_to_string(&path).map_err(|e| DashboardError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|source| DashboardError::Json { path, source })
}

/// Thins every step but the `full_steps` most recent to `groups_after` groups.
pub fn apply_retention(dir: &Path, retention: Retention) -> Result<(), DashboardError> {
    let steps = recorded_steps(dir)?;
    let old = steps.len().saturating_sub(retention.full_steps);
    for &step in &steps[..old] {
        let sdir = step_dir(dir, step);
        let marker = sdir.join("THINNED");
        if marker.exists() {
            continue;
        }
        let mut record = read_step(dir, step)?;
        let keep = groups_to_keep(&record, retention.groups_after);
        for g in &record.groups {
            if keep.contains(&g.group) {
                continue;
            }
            for e in &g.episodes {
                for t in &e.turns {
                    let p = sdir.join(&t.screenshot);
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(DashboardError::io(&p, e)),
                    }
                }
            }
        }
        record.groups.retain(|g| keep.contains(&g.group));
        record.thinned = true;
        write_json(&sdir.join("step.json"), &record)?;
        std::fs::write(&marker, b"").map_err(|e| DashboardError::io(&marker, e))?;
    }
    Ok(())
}

/// The `n` groups of a recorded step with the largest spread of rewards (first on ties), by
/// their index in the step.
fn groups_to_keep(record: &StepEpisodes, n: usize) -> Vec<usize> {
    let spreads: Vec<f64> = record
        .groups
        .iter()
        .map(|g| reward_spread(g.episodes.iter().map(|e| e.reward)))
        .collect();
    most_informative(&spreads, n)
        .into_iter()
        .map(|i| record.groups[i].group)
        .collect()
}

/// Max − min of a group's rewards (0 for an empty group): a group whose rewards differ is
/// one the update learnt from.
fn reward_spread(rewards: impl Iterator<Item = f64>) -> f64 {
    let (lo, hi) = rewards.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
        (lo.min(r), hi.max(r))
    });
    if hi >= lo { hi - lo } else { 0.0 }
}

/// The positions of the `n` largest spreads (all when `n` is 0), largest first, earlier
/// first on ties.
fn most_informative(spreads: &[f64], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..spreads.len()).collect();
    order.sort_by(|&a, &b| spreads[b].total_cmp(&spreads[a]).then(a.cmp(&b)));
    if n > 0 {
        order.truncate(n);
    }
    order
}

/// Writes JSON through a temporary file and a rename (a reader never sees half a file).
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), DashboardError> {
    let text = serde_json::to_vec(value).map_err(|source| DashboardError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| DashboardError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DashboardError::io(path, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arpo_core::Point;

    #[test]
    fn marks_are_the_points_actions_act_on() {
        let m = marks_of(&[
            Action::Click {
                point: Point::new(10.0, 20.0),
            },
            Action::Press {
                key: "enter".into(),
            },
            Action::Drag {
                from: Point::new(1.0, 2.0),
                to: Point::new(3.0, 4.0),
            },
            Action::Scroll {
                point: None,
                direction: arpo_core::ScrollDirection::Down,
            },
        ]);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].kind.as_str(), m[0].x, m[0].y), ("click", 10.0, 20.0));
        assert_eq!(m[1].to, Some((3.0, 4.0)));
    }
}

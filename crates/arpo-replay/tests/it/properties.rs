//! Property tests of the replay buffer, one invariant per test, over random sequences of
//! training steps (random tasks, group sizes, evaluations and settings).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};

use crate::common::{Ep, ids};
use arpo_replay::{ReplacePositions, ReplayBuffer, ReplayConfig, StepReport};
use proptest::prelude::*;

/// Evaluations that exercise every rule: failures, near-threshold values, partial and full
/// successes (0.05 and 0.15 are both all-failed-compatible; 0.15 is also a success).
fn eval() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => Just(0.0),
        1 => Just(0.05),
        1 => Just(0.15),
        1 => Just(0.5),
        2 => Just(1.0),
    ]
}

/// One step: up to four groups, each of a task among five, with 1 to 8 rollouts.
fn step() -> impl Strategy<Value = Vec<(u8, Vec<f64>)>> {
    prop::collection::vec((0u8..5, prop::collection::vec(eval(), 1..9)), 0..5)
}

fn config() -> impl Strategy<Value = ReplayConfig> {
    (
        1usize..5,
        1usize..4,
        prop_oneof![
            Just(ReplacePositions::First),
            Just(ReplacePositions::Last),
            Just(ReplacePositions::Random)
        ],
    )
        .prop_map(|(capacity, injections_per_group, replace)| ReplayConfig {
            capacity,
            injections_per_group,
            replace,
            ..ReplayConfig::default()
        })
}

/// One step's groups: (task number, eval results).
type StepSpec = Vec<(u8, Vec<f64>)>;

/// A run: settings, a seed and a few steps.
fn run() -> impl Strategy<Value = (ReplayConfig, u64, Vec<StepSpec>)> {
    (config(), any::<u64>(), prop::collection::vec(step(), 1..7))
}

/// Turns a step's spec into groups of uniquely numbered episodes.
fn build(spec: &[(u8, Vec<f64>)], next_id: &mut u64) -> Vec<Vec<Ep>> {
    spec.iter()
        .map(|(task, evals)| {
            evals
                .iter()
                .map(|&eval| {
                    *next_id += 1;
                    Ep {
                        task: format!("task{task}"),
                        eval,
                        id: *next_id,
                    }
                })
                .collect()
        })
        .collect()
}

/// Everything one step shows: the groups before and after, the stored ids before, the report.
struct Observed {
    before: Vec<Vec<Ep>>,
    after: Vec<Vec<Ep>>,
    stored_before: BTreeMap<String, BTreeSet<u64>>,
    report: StepReport,
}

fn stored_ids(buffer: &ReplayBuffer<Ep>) -> BTreeMap<String, BTreeSet<u64>> {
    buffer
        .tasks()
        .map(|t| {
            (
                t.to_owned(),
                buffer.stored(t).map(|s| s.episode.id).collect(),
            )
        })
        .collect()
}

/// Runs all steps, checking `each` after every one; returns the buffer.
fn drive(
    config: ReplayConfig,
    seed: u64,
    steps: &[Vec<(u8, Vec<f64>)>],
    mut each: impl FnMut(&ReplayBuffer<Ep>, &Observed) -> Result<(), TestCaseError>,
) -> Result<ReplayBuffer<Ep>, TestCaseError> {
    let mut buffer = ReplayBuffer::new(config, seed).expect("valid config");
    let mut next_id = 0;
    for spec in steps {
        let before = build(spec, &mut next_id);
        let mut after = before.clone();
        let stored_before = stored_ids(&buffer);
        let report = buffer.apply(&mut after).expect("groups are single-task");
        each(
            &buffer,
            &Observed {
                before,
                after,
                stored_before,
                report,
            },
        )?;
    }
    Ok(buffer)
}

proptest! {
    #[test]
    fn capacity_is_never_exceeded((config, seed, steps) in run()) {
        let capacity = config.capacity;
        drive(config, seed, &steps, |buffer, _| {
            for task in buffer.tasks() {
                let n = buffer.stored(task).count();
                prop_assert!(n >= 1 && n <= capacity, "task {task} holds {n}");
            }
            Ok(())
        })?;
    }

    #[test]
    fn only_successes_are_stored((config, seed, steps) in run()) {
        let mut seen = BTreeMap::new();
        drive(config, seed, &steps, |buffer, obs| {
            for e in obs.before.iter().flatten() {
                seen.insert(e.id, e.clone());
            }
            for task in buffer.tasks() {
                for s in buffer.stored(task) {
                    prop_assert!(s.episode.eval > 0.1);
                    prop_assert_eq!(&s.episode.task, task);
                    // It is one of the rolled-out episodes, unchanged.
                    prop_assert_eq!(seen.get(&s.episode.id), Some(&s.episode));
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn only_all_failed_groups_are_touched((config, seed, steps) in run()) {
        let rule = config.clone();
        drive(config, seed, &steps, |_, obs| {
            for (before, after) in obs.before.iter().zip(&obs.after) {
                let evals: Vec<f64> = before.iter().map(|e| e.eval).collect();
                if !rule.is_all_failed(&evals) {
                    prop_assert_eq!(before, after);
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn group_size_is_preserved((config, seed, steps) in run()) {
        drive(config, seed, &steps, |_, obs| {
            prop_assert_eq!(obs.before.len(), obs.after.len());
            for (before, after) in obs.before.iter().zip(&obs.after) {
                prop_assert_eq!(before.len(), after.len());
            }
            Ok(())
        })?;
    }

    #[test]
    fn an_injected_episode_is_a_stored_success_of_the_same_task((config, seed, steps) in run()) {
        let k = config.injections_per_group;
        let rule = config.clone();
        drive(config, seed, &steps, |buffer, obs| {
            let reported: BTreeSet<(usize, usize)> =
                obs.report.injections.iter().map(|i| (i.group, i.position)).collect();
            prop_assert_eq!(reported.len(), obs.report.injections.len(), "a position replaced twice");
            for (g, (before, after)) in obs.before.iter().zip(&obs.after).enumerate() {
                let task = before.first().map(|e| e.task.clone()).unwrap_or_default();
                let had_success = obs.stored_before.get(&task).is_some_and(|s| !s.is_empty());
                let evals: Vec<f64> = before.iter().map(|e| e.eval).collect();
                let replaced: Vec<usize> =
                    reported.iter().filter(|(rg, _)| *rg == g).map(|&(_, p)| p).collect();
                // Exactly min(k, size) replacements in each all-failed group with stored
                // successes, none elsewhere.
                let expected = if rule.is_all_failed(&evals) && had_success { k.min(before.len()) } else { 0 };
                prop_assert_eq!(replaced.len(), expected);
                for p in 0..before.len() {
                    if replaced.contains(&p) {
                        let injected = &after[p];
                        prop_assert_eq!(&injected.task, &task);
                        prop_assert!(injected.eval > 0.1);
                        prop_assert!(obs.stored_before[&task].contains(&injected.id),
                            "episode {} was not stored before the step", injected.id);
                    } else {
                        prop_assert_eq!(&before[p], &after[p]);
                    }
                }
            }
            // Insertion after injection: nothing of this step is injected in this step.
            for inj in &obs.report.injections {
                prop_assert!(inj.age >= 1 && inj.stored_at_step < obs.report.step);
                prop_assert_eq!(inj.age, obs.report.step - inj.stored_at_step);
            }
            prop_assert_eq!(buffer.steps_applied(), obs.report.step + 1);
            Ok(())
        })?;
    }

    #[test]
    fn same_seed_gives_the_same_result((config, seed, steps) in run()) {
        let mut first = Vec::new();
        let a = drive(config.clone(), seed, &steps, |_, obs| {
            first.push((ids_of(&obs.after), obs.report.clone()));
            Ok(())
        })?;
        let mut i = 0;
        let b = drive(config, seed, &steps, |_, obs| {
            prop_assert_eq!(&first[i], &(ids_of(&obs.after), obs.report.clone()));
            i += 1;
            Ok(())
        })?;
        prop_assert_eq!(
            serde_json::to_string(&a).expect("serializes"),
            serde_json::to_string(&b).expect("serializes")
        );
    }

    #[test]
    fn disabled_replay_is_the_identity((config, seed, steps) in run()) {
        let config = ReplayConfig { enabled: false, ..config };
        let rule = config.clone();
        let buffer = drive(config, seed, &steps, |buffer, obs| {
            prop_assert_eq!(&obs.before, &obs.after);
            prop_assert!(buffer.is_empty());
            prop_assert!(obs.report.injections.is_empty());
            prop_assert_eq!(obs.report.stored, 0);
            // The all-failed groups are still counted, for comparison with replay runs.
            let all_failed = obs.before.iter()
                .filter(|g| rule.is_all_failed(&g.iter().map(|e| e.eval).collect::<Vec<_>>()))
                .count();
            prop_assert_eq!(obs.report.all_failed_groups, all_failed);
            Ok(())
        })?;
        prop_assert_eq!(buffer.stats().total_injections, 0);
    }

    #[test]
    fn serialize_then_deserialize_is_the_identity((config, seed, steps) in run(), next in step()) {
        let mut buffer = drive(config, seed, &steps, |_, _| Ok(()))?;
        let json = serde_json::to_string(&buffer).expect("serializes");
        let mut restored: ReplayBuffer<Ep> = serde_json::from_str(&json).expect("deserializes");
        prop_assert_eq!(&serde_json::to_string(&restored).expect("serializes"), &json);
        prop_assert_eq!(restored.stats(), buffer.stats());
        // The RNG position is part of the state: the next step draws the same.
        let mut next_id = 1_000_000;
        let mut groups_a = build(&next, &mut next_id);
        let mut groups_b = groups_a.clone();
        let ra = buffer.apply(&mut groups_a).expect("applies");
        let rb = restored.apply(&mut groups_b).expect("applies");
        prop_assert_eq!(ra, rb);
        prop_assert_eq!(ids_of(&groups_a), ids_of(&groups_b));
    }

    #[test]
    fn stats_agree_with_the_buffer_and_the_reports((config, seed, steps) in run()) {
        let mut reports = Vec::new();
        let buffer = drive(config, seed, &steps, |_, obs| {
            reports.push(obs.report.clone());
            Ok(())
        })?;
        let stats = buffer.stats();
        let injections: usize = reports.iter().map(|r| r.injections.len()).sum();
        prop_assert_eq!(stats.total_injections, injections as u64);
        prop_assert_eq!(stats.injected_age.count, injections as u64);
        prop_assert_eq!(stats.per_step.len(), steps.len());
        prop_assert_eq!(stats.stored_episodes, buffer.len());
        prop_assert_eq!(stats.tasks_with_success, buffer.tasks().count());
        for (summary, report) in stats.per_step.iter().zip(&reports) {
            prop_assert_eq!(summary.injections, report.injections.len());
            prop_assert_eq!(summary.all_failed_groups, report.all_failed_groups);
        }
    }
}

fn ids_of(groups: &[Vec<Ep>]) -> Vec<Vec<u64>> {
    groups.iter().map(|g| ids(g)).collect()
}

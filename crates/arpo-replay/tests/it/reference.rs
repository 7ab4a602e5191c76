//! Scenarios traced by hand through the reference's `apply_replay` and `ReplayBuffer`
//! (dvlab-research/ARPO, `verl/trainer/ray_trainer.py`, `verl/trainer/replay_buffer.py`).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use crate::common::{Ep, groups, ids};
use arpo_core::{EpisodeEnd, Trajectory};
use arpo_replay::{ReplacePositions, ReplayBuffer, ReplayConfig, ReplayError};

fn buffer(config: ReplayConfig) -> ReplayBuffer<Ep> {
    ReplayBuffer::new(config, 7).expect("valid config")
}

#[test]
fn fifo_per_task_drops_the_oldest() {
    // Capacity 2; step 0 stores ids 1 and 3 of task a (evals 1.0, 0.5; id 2 fails);
    // step 1 stores id 4: the list [1, 3, 4] exceeds 2, so id 1 (the oldest) goes.
    let mut b = buffer(ReplayConfig {
        capacity: 2,
        ..ReplayConfig::default()
    });
    let mut next = 0;
    let mut g = groups(&[("a", &[1.0, 0.0, 0.5])], &mut next);
    let r = b.apply(&mut g).unwrap();
    assert_eq!((r.stored, r.evicted), (1 + 1, 0));
    let mut g = groups(&[("a", &[1.0, 0.0])], &mut next);
    let r = b.apply(&mut g).unwrap();
    assert_eq!((r.stored, r.evicted), (1, 1));
    let kept: Vec<u64> = b.stored("a").map(|s| s.episode.id).collect();
    assert_eq!(kept, [3, 4]);
    let steps: Vec<u64> = b.stored("a").map(|s| s.stored_at_step).collect();
    assert_eq!(steps, [0, 1]);
}

#[test]
fn a_step_successes_help_only_from_the_next_step() {
    // Step 0: task a's group [0, 0, 0] is all-failed but the buffer is empty: nothing injected.
    // Task b succeeds once (id 4) and is stored after injection.
    // Step 1: task b's group [0, 0] is all-failed: id 4 replaces the first rollout; age 1.
    let mut b = buffer(ReplayConfig::default());
    let mut next = 0;
    let mut g = groups(&[("a", &[0.0, 0.0, 0.0]), ("b", &[1.0, 0.0])], &mut next);
    let r = b.apply(&mut g).unwrap();
    assert_eq!(r.all_failed_groups, 1);
    assert!(r.injections.is_empty());
    assert_eq!(ids(&g[0]), [1, 2, 3]);
    let mut g = groups(&[("b", &[0.0, 0.0])], &mut next);
    let r = b.apply(&mut g).unwrap();
    assert_eq!(ids(&g[0]), [4, 7]);
    assert_eq!(r.injections.len(), 1);
    let i = &r.injections[0];
    assert_eq!((i.group, i.position, i.task_id.as_str()), (0, 0, "b"));
    assert_eq!((i.stored_at_step, i.age), (0, 1));
    // The injected episode keeps its stored evaluation (and any reward it carries).
    assert_eq!(g[0][0].eval, 1.0);
}

#[test]
fn a_group_of_near_successes_is_all_failed_and_still_stored() {
    // evals [0.15, 0.15]: std 0 < 0.05 and mean 0.15 < 0.2: all-failed, so a stored success
    // replaces the first; yet both rollouts are successes (0.15 > 0.1) and both are stored,
    // including the replaced one (the reference stores from the batch before replacement).
    let mut b = buffer(ReplayConfig::default());
    let mut next = 0;
    let mut g = groups(&[("a", &[1.0])], &mut next);
    b.apply(&mut g).unwrap();
    // Step 0's [1.0] alone: a group of one with mean 1: not all failed; id 1 stored.
    let mut g = groups(&[("a", &[0.15, 0.15])], &mut next);
    let r = b.apply(&mut g).unwrap();
    assert_eq!(ids(&g[0]), [1, 3]);
    assert_eq!(r.stored, 2);
    let kept: Vec<u64> = b.stored("a").map(|s| s.episode.id).collect();
    assert_eq!(kept, [1, 2, 3]);
}

#[test]
fn the_format_reward_plays_no_part() {
    // A trajectory that succeeded (eval 1) but whose last response did not parse (format −1):
    // reward 0.5, eval_result 1: it is a success. Trajectory implements Episode directly.
    let t = |eval_result: f64, format_reward: f64| Trajectory {
        task_id: "t".into(),
        instruction: "do it".into(),
        turns: vec![],
        end: EpisodeEnd::FormatError,
        eval_result,
        format_reward,
    };
    let mut b = ReplayBuffer::new(ReplayConfig::default(), 1).unwrap();
    let mut g = vec![vec![t(1.0, -1.0), t(0.0, 0.0)]];
    assert_eq!(b.apply(&mut g).unwrap().stored, 1);
    // A group [eval 0, format −1] x2: rewards −0.5, eval results 0: all failed by eval.
    let mut g = vec![vec![t(0.0, -1.0), t(0.0, -1.0)]];
    let r = b.apply(&mut g).unwrap();
    assert_eq!(r.injections.len(), 1);
    assert_eq!(g[0][0].eval_result, 1.0);
    assert_eq!(g[0][0].reward(), 0.5);
}

#[test]
fn which_and_how_many_rollouts_are_replaced() {
    let seeded = |replace, injections_per_group| {
        let mut b = buffer(ReplayConfig {
            replace,
            injections_per_group,
            ..ReplayConfig::default()
        });
        let mut next = 100;
        let mut g = groups(&[("a", &[1.0])], &mut next);
        b.apply(&mut g).unwrap();
        b
    };
    let failed = |next: &mut u64| groups(&[("a", &[0.0, 0.0, 0.0, 0.0])], next);

    let mut b = seeded(ReplacePositions::Last, 1);
    let mut next = 0;
    let mut g = failed(&mut next);
    b.apply(&mut g).unwrap();
    assert_eq!(ids(&g[0]), [1, 2, 3, 101]);

    let mut b = seeded(ReplacePositions::First, 2);
    let mut next = 0;
    let mut g = failed(&mut next);
    b.apply(&mut g).unwrap();
    assert_eq!(ids(&g[0]), [101, 101, 3, 4]);

    // More injections than rollouts: every rollout is replaced, the group keeps its size.
    let mut b = seeded(ReplacePositions::First, 9);
    let mut next = 0;
    let mut g = failed(&mut next);
    let r = b.apply(&mut g).unwrap();
    assert_eq!(ids(&g[0]), [101; 4]);
    assert_eq!(r.injections.len(), 4);

    let mut b = seeded(ReplacePositions::Random, 2);
    let mut next = 0;
    let mut g = failed(&mut next);
    let r = b.apply(&mut g).unwrap();
    let positions: Vec<usize> = r.injections.iter().map(|i| i.position).collect();
    assert_eq!(positions.len(), 2);
    assert_ne!(positions[0], positions[1]);
    for (p, e) in g[0].iter().enumerate() {
        let want = if positions.contains(&p) {
            101
        } else {
            p as u64 + 1
        };
        assert_eq!(e.id, want);
    }
}

#[test]
fn draws_are_uniform_over_the_stored_successes() {
    // Four stored successes of task a; 4,000 all-failed groups of one. Each stored episode
    // should be drawn about 1,000 times: with a fair draw the count is Binomial(4000, 1/4),
    // std 27.4, so ±150 is more than 5 std (seed fixed: the test is deterministic).
    let mut b = buffer(ReplayConfig {
        capacity: 4,
        ..ReplayConfig::default()
    });
    let mut next = 0;
    let mut g = groups(&[("a", &[1.0, 1.0, 1.0, 1.0])], &mut next);
    b.apply(&mut g).unwrap();
    let specs: Vec<(&str, &[f64])> = vec![("a", &[0.0]); 4000];
    let mut g = groups(&specs, &mut next);
    b.apply(&mut g).unwrap();
    let mut counts = [0u32; 4];
    for group in &g {
        counts[(group[0].id - 1) as usize] += 1;
    }
    for c in counts {
        assert!((850..=1150).contains(&c), "{counts:?}");
    }
}

#[test]
fn a_mixed_group_is_rejected_and_nothing_changes() {
    let mut b = buffer(ReplayConfig::default());
    let mut next = 0;
    let mut g = groups(&[("a", &[1.0]), ("b", &[1.0])], &mut next);
    let stray = g[0][0].clone();
    g[1].push(stray);
    let before = g.clone();
    let err = b.apply(&mut g).unwrap_err();
    assert_eq!(
        err,
        ReplayError::MixedGroup {
            group: 1,
            first: "b".into(),
            other: "a".into()
        }
    );
    assert_eq!(g, before);
    assert!(b.is_empty());
    assert_eq!(b.steps_applied(), 0);
}

#[test]
fn empty_groups_are_left_alone() {
    let mut b = buffer(ReplayConfig::default());
    let mut g: Vec<Vec<Ep>> = vec![vec![]];
    let r = b.apply(&mut g).unwrap();
    assert_eq!((r.groups, r.all_failed_groups), (1, 0));
    assert!(g[0].is_empty());
}

#[test]
fn stats_of_a_traced_run() {
    // Step 0: a [1, 0] stores id 1; b [0, 0] all-failed, empty buffer.
    // Step 1: a [0, 0] all-failed -> injects id 1 (age 1); b [1, 1] stores ids 7, 8.
    // Step 2: a [0] -> injects id 1 (age 2); b [0, 0] -> injects 7 or 8 (age 1).
    let mut b = buffer(ReplayConfig::default());
    let mut next = 0;
    for spec in [
        vec![("a", &[1.0, 0.0][..]), ("b", &[0.0, 0.0][..])],
        vec![("a", &[0.0, 0.0][..]), ("b", &[1.0, 1.0][..])],
        vec![("a", &[0.0][..]), ("b", &[0.0, 0.0][..])],
    ] {
        let mut g = groups(&spec, &mut next);
        b.apply(&mut g).unwrap();
    }
    let s = b.stats();
    assert_eq!(s.steps, 3);
    assert_eq!(s.tasks_with_success, 2);
    assert_eq!(s.stored_episodes, 3);
    assert_eq!(s.size_per_task["a"], 1);
    assert_eq!(s.size_per_task["b"], 2);
    assert_eq!(s.total_injections, 3);
    let per_step: Vec<(usize, usize, usize)> = s
        .per_step
        .iter()
        .map(|p| (p.all_failed_groups, p.injections, p.stored))
        .collect();
    assert_eq!(per_step, [(1, 0, 1), (1, 1, 2), (2, 2, 0)]);
    assert_eq!(s.per_step[2].mean_injected_age, Some(1.5));
    assert_eq!(s.injected_age.max, Some(2));
    assert_eq!(s.injected_age.mean, Some(4.0 / 3.0));
    assert_eq!(s.injected_age.histogram[&1], 2);
    assert_eq!(s.injected_age.histogram[&2], 1);
    // The JSON written to replay_buffer_stats.json.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["size_per_task"]["b"], 2);
    assert_eq!(json["injected_age"]["histogram"]["1"], 2);
    assert_eq!(json["per_step"][1]["injections"], 1);
}

#[test]
fn a_corrupt_saved_buffer_is_rejected() {
    let mut b = buffer(ReplayConfig {
        capacity: 2,
        ..ReplayConfig::default()
    });
    let mut next = 0;
    let mut g = groups(&[("a", &[1.0, 1.0])], &mut next);
    b.apply(&mut g).unwrap();
    let mut json = serde_json::to_value(&b).unwrap();
    json["config"]["capacity"] = 1.into();
    let err = serde_json::from_value::<ReplayBuffer<Ep>>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the capacity"), "{err}");

    let mut json = serde_json::to_value(&b).unwrap();
    json["tasks"]["a"][0]["episode"]["eval"] = 0.0.into();
    let err = serde_json::from_value::<ReplayBuffer<Ep>>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("success threshold"), "{err}");

    let mut json = serde_json::to_value(&b).unwrap();
    json["tasks"]["a"][0]["episode"]["task"] = "z".into();
    assert!(serde_json::from_value::<ReplayBuffer<Ep>>(json).is_err());
}

#[test]
fn switching_replay_off_keeps_the_stored_episodes() {
    let mut b = buffer(ReplayConfig::default());
    let mut next = 0;
    let mut g = groups(&[("a", &[1.0])], &mut next);
    b.apply(&mut g).unwrap();
    b.set_enabled(false);
    let mut g = groups(&[("a", &[0.0, 0.0])], &mut next);
    let r = b.apply(&mut g).unwrap();
    assert!(r.injections.is_empty());
    assert_eq!(ids(&g[0]), [2, 3]);
    assert_eq!(b.len(), 1);
    b.set_enabled(true);
    let mut g = groups(&[("a", &[0.0, 0.0])], &mut next);
    let r = b.apply(&mut g).unwrap();
    assert_eq!(ids(&g[0]), [1, 5]);
    assert_eq!(r.injections[0].age, 2);
}

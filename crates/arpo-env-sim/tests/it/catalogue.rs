//! The catalogue's promises: sizes, stable unique ids, oracles that solve every task, and
//! evaluators that do not reward doing nothing.

use std::collections::{BTreeMap, BTreeSet};

use arpo_core::{Action, Environment, Task};
use arpo_env_sim::desktop::{Desktop, LOGICAL_H, LOGICAL_W};
use arpo_env_sim::{Catalogue, Session, SimEnv, Split};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Runs `actions` on a fresh desktop without rendering and returns the reward.
fn quick_score(task: &Task, actions: &[Action]) -> f64 {
    let mut s = Session::from_task(task, 336, 224).expect("session");
    for a in actions {
        s.apply_action(a).expect("valid action");
    }
    s.reward(actions.last())
}

/// Runs `actions` on a fresh environment and returns the reward.
async fn score(env: &mut SimEnv, task: &Task, actions: &[Action]) -> f64 {
    env.reset(task).await.expect("reset");
    for a in actions {
        env.step(a).await.expect("oracle actions are valid");
    }
    env.evaluate(actions.last()).await.expect("evaluate")
}

#[test]
fn catalogue_has_enough_families_and_instances() {
    let c = Catalogue::default();
    let families: BTreeSet<_> = c.train_specs().iter().map(|s| s.family.clone()).collect();
    assert!(families.len() >= 12, "{} families", families.len());
    assert!(c.train().len() >= 200, "{} training tasks", c.train().len());
    assert!(
        c.heldout().len() >= 100,
        "{} held-out tasks",
        c.heldout().len()
    );
    let infeasible = c.all().len() - c.all().iter().filter(|t| !is_infeasible(&c, t)).count();
    assert!(infeasible >= 20, "{infeasible} infeasible tasks");
    assert!(c.train_specs().iter().all(|s| s.split == Split::Train));
    assert!(c.heldout_specs().iter().all(|s| s.split == Split::Heldout));
}

fn is_infeasible(c: &Catalogue, t: &Task) -> bool {
    c.spec(&t.id).expect("known id").infeasible
}

#[test]
fn ids_are_unique_and_stable() {
    let c = Catalogue::default();
    let ids: Vec<String> = c.all().into_iter().map(|t| t.id).collect();
    let unique: BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    // Generation is deterministic: a second catalogue is identical.
    assert_eq!(Catalogue::default().all(), c.all());
    assert_eq!(ids[0], "sim-colour_button-train-000");
    assert!(ids.contains(&"sim-infeasible-heldout-007".to_string()));
}

#[test]
fn every_oracle_solves_its_task_and_doing_nothing_does_not() {
    let c = Catalogue::default();
    let mut env = SimEnv::new().with_max_steps(100);
    block_on(async {
        for task in c.all() {
            let spec = c.spec(&task.id).expect("spec");
            let oracle = c.oracle(&task).expect("oracle resolves");
            assert_eq!(
                score(&mut env, &task, &oracle).await,
                1.0,
                "oracle fails {}",
                task.id
            );
            assert!(
                env.rejected().is_empty(),
                "{}: {:?}",
                task.id,
                env.rejected()
            );
            let last = oracle.last().expect("non-empty");
            if spec.infeasible {
                assert_eq!(last, &Action::CallUser, "{}", task.id);
                let fin = [Action::Finished { content: None }];
                assert_eq!(quick_score(&task, &fin), 0.0, "{} finished", task.id);
                // Doing what the oracle of the feasible twin would do still is not call_user.
                assert_eq!(quick_score(&task, &[]), 0.0, "{} nothing", task.id);
            } else {
                assert!(matches!(last, Action::Finished { .. }), "{}", task.id);
                assert_eq!(quick_score(&task, &[]), 0.0, "{} nothing", task.id);
                let fin = [Action::Finished { content: None }];
                assert_eq!(
                    quick_score(&task, &fin),
                    0.0,
                    "{} finished at once",
                    task.id
                );
                // Solving it and then calling the user scores 0 (OSWorld: a last FAIL scores 0).
                let mut solved_then_fail = oracle[..oracle.len() - 1].to_vec();
                solved_then_fail.push(Action::CallUser);
                assert_eq!(
                    quick_score(&task, &solved_then_fail),
                    0.0,
                    "{} call_user",
                    task.id
                );
            }
        }
    });
}

#[test]
fn oracles_also_solve_tasks_at_1920x1080() {
    let c = Catalogue::generate(1, 1);
    let mut env = SimEnv::with_size(1920, 1080)
        .expect("size")
        .with_max_steps(100);
    block_on(async {
        for task in c.all() {
            let oracle = arpo_env_sim::oracle_at(&task, 1920, 1080).expect("oracle");
            assert_eq!(score(&mut env, &task, &oracle).await, 1.0, "{}", task.id);
        }
    });
}

#[test]
fn initial_scenes_are_valid_and_on_screen() {
    let c = Catalogue::default();
    for s in c.train_specs().iter().chain(c.heldout_specs()) {
        let d = Desktop::new(&s.scene);
        d.check_invariants()
            .unwrap_or_else(|e| panic!("{}: {e}", s.id));
        for w in s.scene.windows.iter().chain(&s.scene.templates) {
            let r = w.rect;
            assert!(
                r.x >= 0 && r.y >= 0 && r.x + r.w <= LOGICAL_W && r.y + r.h <= LOGICAL_H,
                "{}: window {} at {r:?} leaves the screen",
                s.id,
                w.id
            );
            for x in &w.widgets {
                let wr = w.widget_rect(x);
                assert!(
                    wr.x >= r.x
                        && wr.y >= r.y
                        && wr.x + wr.w <= r.x + r.w
                        && wr.y + wr.h <= r.y + r.h,
                    "{}: widget {} at {wr:?} leaves window {r:?}",
                    s.id,
                    x.id
                );
            }
        }
        for i in &s.scene.icons {
            let r = i.rect();
            assert!(
                r.x >= 0 && r.y >= 0 && r.x + r.w <= LOGICAL_W && r.y + r.h <= LOGICAL_H,
                "{}",
                s.id
            );
        }
    }
}

#[test]
fn heldout_differs_in_labels_and_layouts() {
    let c = Catalogue::default();
    let train_instr: BTreeSet<&str> = c
        .train_specs()
        .iter()
        .map(|s| s.instruction.as_str())
        .collect();
    let mut same_layout: BTreeMap<String, usize> = BTreeMap::new();
    for h in c.heldout_specs() {
        assert!(
            !train_instr.contains(h.instruction.as_str()),
            "{} repeats a training instruction",
            h.id
        );
        // The main window (or the icon arrangement) of a held-out task never matches a
        // training task of its family.
        let clash = c
            .train_specs()
            .iter()
            .filter(|t| t.family == h.family)
            .any(
                |t| match (t.scene.windows.first(), h.scene.windows.first()) {
                    (Some(a), Some(b)) => a.rect == b.rect,
                    (None, None) => {
                        let pa: Vec<_> = t.scene.icons.iter().map(|i| (i.x, i.y)).collect();
                        let pb: Vec<_> = h.scene.icons.iter().map(|i| (i.x, i.y)).collect();
                        pa == pb
                    }
                    _ => false,
                },
            );
        if clash {
            *same_layout.entry(h.id.clone()).or_default() += 1;
        }
    }
    assert!(
        same_layout.is_empty(),
        "held-out layouts equal to training ones: {same_layout:?}"
    );
}

#[test]
fn osworld_export_and_index() {
    let c = Catalogue::default();
    let spec = &c.train_specs()[0];
    let j = Catalogue::osworld_json(spec);
    assert_eq!(j["id"], spec.id.as_str());
    assert_eq!(j["config"][0]["type"], "sim");
    assert_eq!(j["evaluator"]["func"], "check_list");
    let inf = c
        .heldout_specs()
        .iter()
        .find(|s| s.infeasible)
        .expect("an infeasible task");
    assert_eq!(
        Catalogue::osworld_json(inf)["evaluator"]["func"],
        "infeasible"
    );
    let idx = Catalogue::index(c.train_specs());
    assert_eq!(idx.len(), Catalogue::families().len());
    assert_eq!(
        idx.values().map(Vec::len).sum::<usize>(),
        c.train_specs().len()
    );
}

//! The rollout engine against scripted policies and the row-of-buttons environment.

#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use arpo_core::{AgentContext, EpisodeEnd, Policy, PolicyError, Response, SamplingParams, Task};
use arpo_trainer::rollout::{Coordinates, EnvStage, RolloutEvent, RolloutSettings, run_rollouts};
use arpo_trainer::testing::{ButtonRow, button_task};
use async_trait::async_trait;

/// Answers from a script: the response for turn `i` of a task is `script(instruction, i)`.
struct Scripted {
    script: fn(&str, usize) -> &'static str,
    batches: Mutex<Vec<usize>>,
}

impl Scripted {
    fn new(script: fn(&str, usize) -> &'static str) -> Self {
        Self {
            script,
            batches: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl Policy for Scripted {
    async fn act(
        &self,
        contexts: &[AgentContext],
        _sampling: &SamplingParams,
    ) -> Result<Vec<Response>, PolicyError> {
        self.batches.lock().unwrap().push(contexts.len());
        Ok(contexts
            .iter()
            .map(|c| {
                let text = (self.script)(&c.instruction, c.responses.len());
                // Token ids that no tokenizer would give back for this text: the engine must
                // keep them as sampled.
                Response {
                    text: text.to_string(),
                    token_ids: vec![7, 7, c.responses.len() as u32, 151_645],
                    logprobs: vec![-0.5, -0.25, -0.125, 0.0],
                    finish_reason: arpo_core::FinishReason::Stop,
                }
            })
            .collect())
    }

    fn describe(&self) -> String {
        "scripted".into()
    }
}

fn settings(n: usize) -> RolloutSettings {
    RolloutSettings {
        group_size: n,
        max_steps: 4,
        reset_retries: 3,
        sampling: SamplingParams::default(),
        coordinates: Coordinates::Relative,
        expected_screen: None,
    }
}

fn solve(instruction: &str, turn: usize) -> &'static str {
    // "Press button 1 of 3": click (150, 50) then finished.
    match (instruction.contains("button 1"), turn) {
        (true, 0) => "Thought: the second button\nAction: click(start_box='(150,500)')",
        (false, 0) => "Thought: the first button\nAction: click(start_box='(50,500)')",
        _ => "Thought: done\nAction: finished()",
    }
}

fn envs(n: usize) -> Vec<ButtonRow> {
    (0..n).map(|_| ButtonRow::new()).collect()
}

#[tokio::test]
async fn groups_have_n_rollouts_per_task_in_order_and_are_scored() {
    let policy = Scripted::new(solve);
    let tasks = vec![button_task("a", 1, 3), button_task("b", 0, 2)];
    let mut pool = envs(3);
    let mut done_events = 0;
    let report = run_rollouts(&policy, &mut pool, &tasks, &settings(4), 1, &mut |e| {
        if matches!(e, RolloutEvent::EpisodeDone { .. }) {
            done_events += 1;
        }
    })
    .await
    .unwrap();
    assert_eq!(report.groups.len(), 2);
    assert_eq!(report.groups[0].task_id, "a");
    assert_eq!(report.groups[1].task_id, "b");
    for g in &report.groups {
        assert_eq!(g.trajectories.len(), 4);
        for t in &g.trajectories {
            assert_eq!(t.end, EpisodeEnd::Finished);
            assert_eq!(t.eval_result, 1.0);
            assert_eq!(t.reward(), 1.0);
            assert_eq!(t.turns.len(), 2);
        }
    }
    // 8 episodes of one click each.
    assert_eq!(report.env_steps, 8);
    assert!(report.dropped.is_empty());
    // Lock-step batching never asks for more than the pool.
    let batches = policy.batches.lock().unwrap().clone();
    assert!(batches.iter().all(|&b| (1..=3).contains(&b)), "{batches:?}");
    assert_eq!(batches.iter().sum::<usize>(), 16, "2 turns × 8 episodes");
    assert_eq!(report.policy_calls, batches.len());
    assert_eq!(done_events, 8);
}

#[tokio::test]
async fn sampled_token_ids_and_logprobs_are_kept_exactly() {
    let policy = Scripted::new(solve);
    let tasks = vec![button_task("a", 1, 3)];
    let report = run_rollouts(&policy, &mut envs(1), &tasks, &settings(1), 1, &mut |_| {})
        .await
        .unwrap();
    let t = &report.groups[0].trajectories[0];
    assert_eq!(t.turns[1].response.token_ids, vec![7, 7, 1, 151_645]);
    assert_eq!(t.turns[0].response.logprobs, vec![-0.5, -0.25, -0.125, 0.0]);
    assert_eq!(report.generated_tokens, 8);
    // The agent saw its own history: screenshot 0 had nothing pressed, screenshot 1 button 1.
    assert_eq!(*t.turns[0].screenshot.bytes.last().unwrap(), 255);
    assert_eq!(*t.turns[1].screenshot.bytes.last().unwrap(), 1);
}

#[tokio::test]
async fn an_unparsable_response_ends_the_episode_with_format_reward_minus_one() {
    fn script(_: &str, turn: usize) -> &'static str {
        if turn == 0 {
            "Thought: first\nAction: click(start_box='(150,500)')"
        } else {
            "I would like to click somewhere"
        }
    }
    let policy = Scripted::new(script);
    let tasks = vec![button_task("a", 1, 3)];
    let report = run_rollouts(&policy, &mut envs(2), &tasks, &settings(2), 1, &mut |_| {})
        .await
        .unwrap();
    for t in &report.groups[0].trajectories {
        assert_eq!(t.end, EpisodeEnd::FormatError);
        assert_eq!(t.turns.len(), 2, "ends at the bad turn");
        assert!(t.turns[1].format_error.is_some());
        assert!(t.turns[1].actions.is_empty());
        assert_eq!(t.format_reward, -1.0);
        // Button 1 is pressed but the agent never said finished: eval 0, reward 0 + 0.5·(−1).
        assert_eq!(t.eval_result, 0.0);
        assert_eq!(t.reward(), -0.5);
    }
}

#[tokio::test]
async fn episodes_stop_at_max_steps_and_rejected_actions_are_recorded() {
    fn script(_: &str, _: usize) -> &'static str {
        // Off the buttons: the environment rejects it, the episode goes on.
        "Thought: try\nAction: click(start_box='(950,500)')"
    }
    let policy = Scripted::new(script);
    let tasks = vec![button_task("a", 0, 2)];
    let report = run_rollouts(&policy, &mut envs(1), &tasks, &settings(1), 1, &mut |_| {})
        .await
        .unwrap();
    let t = &report.groups[0].trajectories[0];
    assert_eq!(t.end, EpisodeEnd::MaxSteps);
    assert_eq!(t.turns.len(), 4);
    assert!(t.turns.iter().all(|turn| turn.env_error.is_some()));
    assert_eq!(t.reward(), 0.0);
}

#[tokio::test]
async fn failed_resets_are_retried_then_the_rollout_is_dropped_and_recorded() {
    let policy = Scripted::new(solve);
    // Task "flaky" fails its first 2 resets on each env (retries = 3: it gets through);
    // task "dead" fails 100 times: dropped after 3 failures, never the step.
    let mut flaky = button_task("flaky", 0, 2);
    flaky.config["fail_resets"] = 2.into();
    let mut dead = button_task("dead", 0, 2);
    dead.config["fail_resets"] = 100.into();
    let tasks = vec![flaky, dead, button_task("ok", 1, 2)];
    let report = run_rollouts(&policy, &mut envs(1), &tasks, &settings(2), 1, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.groups[0].trajectories.len(), 2);
    assert_eq!(report.groups[1].trajectories.len(), 0);
    assert_eq!(report.groups[2].trajectories.len(), 2);
    assert_eq!(report.dropped.len(), 2);
    for d in &report.dropped {
        assert_eq!(d.task_id, "dead");
        assert_eq!(d.failures, 3);
        assert!(d.error.contains("injected failure"), "{}", d.error);
    }
}

#[tokio::test]
async fn an_environment_breaking_mid_episode_restarts_the_rollout() {
    let policy = Scripted::new(solve);
    let mut t = button_task("a", 1, 3);
    t.config["break_at_step"] = 1.into();
    let report = run_rollouts(&policy, &mut envs(1), &[t], &settings(1), 1, &mut |_| {})
        .await
        .unwrap();
    assert!(report.dropped.is_empty());
    let traj = &report.groups[0].trajectories[0];
    assert_eq!(traj.eval_result, 1.0, "the restarted episode succeeds");
    assert_eq!(traj.turns.len(), 2, "no turn of the broken attempt is kept");
}

#[tokio::test]
async fn a_policy_answering_the_wrong_number_of_responses_is_an_error() {
    struct Short;
    #[async_trait]
    impl Policy for Short {
        async fn act(
            &self,
            _: &[AgentContext],
            _: &SamplingParams,
        ) -> Result<Vec<Response>, PolicyError> {
            Ok(Vec::new())
        }
        fn describe(&self) -> String {
            "short".into()
        }
    }
    let err = run_rollouts(
        &Short,
        &mut envs(1),
        &[button_task("a", 0, 2)],
        &settings(1),
        1,
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("asked for 1 responses, got 0"),
        "{err}"
    );
}

#[tokio::test]
async fn no_tasks_means_no_rollouts() {
    let policy = Scripted::new(solve);
    let tasks: Vec<Task> = Vec::new();
    let report = run_rollouts(&policy, &mut envs(2), &tasks, &settings(2), 1, &mut |_| {})
        .await
        .unwrap();
    assert!(report.groups.is_empty());
    assert_eq!(report.policy_calls, 0);
}

#[tokio::test]
async fn an_evaluation_that_raises_restarts_the_rollout_and_is_never_scored_zero() {
    let policy = Scripted::new(solve);
    // Fails its first evaluation: the episode is run again and scored by the second one.
    let mut once = button_task("once", 1, 3);
    once.config["fail_evaluations"] = 1.into();
    // Always fails: dropped after reset_retries (3) environment failures, at the evaluate stage.
    let mut always = button_task("always", 1, 3);
    always.config["fail_evaluations"] = 100.into();
    let mut failures = Vec::new();
    let report = run_rollouts(
        &policy,
        &mut envs(1),
        &[once, always],
        &settings(1),
        1,
        &mut |e| {
            if let RolloutEvent::EnvFailed {
                stage, retrying, ..
            } = e
            {
                failures.push((stage, retrying));
            }
        },
    )
    .await
    .unwrap();
    let once = &report.groups[0].trajectories;
    assert_eq!(once.len(), 1);
    assert_eq!(
        once[0].eval_result, 1.0,
        "scored by the evaluation that worked"
    );
    assert!(
        report.groups[1].trajectories.is_empty(),
        "no 0 was recorded"
    );
    assert_eq!(report.dropped.len(), 1);
    let d = &report.dropped[0];
    assert_eq!(d.task_id, "always");
    assert_eq!(d.stage, EnvStage::Evaluate);
    assert_eq!(d.failures, 3);
    assert!(
        d.error.contains("injected evaluator failure"),
        "{}",
        d.error
    );
    // 1 (once) + 3 (always), the last one not retried.
    assert_eq!(
        failures,
        vec![
            (EnvStage::Evaluate, true),
            (EnvStage::Evaluate, true),
            (EnvStage::Evaluate, true),
            (EnvStage::Evaluate, false)
        ]
    );
}

#[tokio::test]
async fn a_screen_of_the_wrong_size_stops_the_run_with_the_key_to_change() {
    let policy = Scripted::new(solve);
    let mut s = settings(1);
    s.expected_screen = Some(arpo_core::ScreenSize::new(1920, 1080).unwrap());
    let err = run_rollouts(
        &policy,
        &mut envs(1),
        &[button_task("a", 0, 2)],
        &s,
        1,
        &mut |_| {},
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("1000x100") && msg.contains("env.screen_size is 1920x1080"),
        "{msg}"
    );
    // The right size passes.
    s.expected_screen = Some(arpo_core::ScreenSize::new(1000, 100).unwrap());
    let report = run_rollouts(
        &policy,
        &mut envs(1),
        &[button_task("a", 0, 2)],
        &s,
        1,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.groups[0].trajectories.len(), 1);
}

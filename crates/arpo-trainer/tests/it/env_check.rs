//! `cargo xtask test-env`'s episode (`arpo_trainer::env_check`) over the guest protocol, and its
//! agreement with the training engine.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use arpo_core::protocol::{CoordinateSystem, PointSyntax, format_response};
use arpo_core::{AgentContext, EpisodeEnd, Policy, PolicyError, Response, SamplingParams};
use arpo_env_sim::Catalogue;
use arpo_env_sim::guest::{GuestState, serve};
use arpo_env_vmware::{
    EnvConfig, HostType, OsworldEnv, OsworldTask, Vmrun, VmrunConfig, VmwareProvider,
};
use arpo_trainer::TrainerError;
use arpo_trainer::env_check::{
    ChosenTask, DEFAULT_TASK, DEFAULT_TASK_DOMAIN, EpisodeSettings, check_guest, check_vmware,
    is_sim_guest, load_sim_task, run_episode, split_sim_steps,
};
use arpo_trainer::rollout::{Coordinates, EnvStage, RolloutSettings, run_rollouts};
use arpo_trainer::testing::{ButtonRow, TabularPolicy, button_task};

/// A policy that answers scripted texts in order (then `finished()`).
#[derive(Debug)]
struct Scripted(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Policy for Scripted {
    async fn act(
        &self,
        contexts: &[AgentContext],
        _: &SamplingParams,
    ) -> Result<Vec<Response>, PolicyError> {
        let mut queue = self
            .0
            .lock()
            .map_err(|e| PolicyError::Generation(e.to_string()))?;
        Ok(contexts
            .iter()
            .map(|_| Response {
                text: if queue.is_empty() {
                    "Action: finished()".into()
                } else {
                    queue.remove(0)
                },
                ..Response::default()
            })
            .collect())
    }

    fn describe(&self) -> String {
        "scripted".into()
    }
}

/// The simulated guest on a loopback port; returns its URL.
async fn sim_guest(size: (u32, u32)) -> Result<String> {
    let state = GuestState::new(size.0, size.1)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, state));
    Ok(format!("http://{addr}"))
}

fn settings() -> EpisodeSettings {
    EpisodeSettings {
        max_steps: 10,
        coordinates: Coordinates::Relative,
        sampling: SamplingParams::greedy(64),
        screen: None,
        attempts: 1,
        env_hint: "is the test guest up?".into(),
    }
}

fn env_config(cache: &Path) -> EnvConfig {
    EnvConfig {
        cache_dir: cache.to_path_buf(),
        step_pause: Duration::ZERO,
        wait_pause: Duration::ZERO,
        reset_attempts: 1,
        ready_timeout: Duration::from_secs(10),
        ready_poll: Duration::from_millis(20),
        ..EnvConfig::default()
    }
}

/// The sim task `id` ready for the env: its `sim` step run, the rest as an `arpo_core::Task`.
async fn prepared(url: &str, id: &str) -> Result<(arpo_core::Task, arpo_core::Task)> {
    let mut chosen = ChosenTask::sim(Some(id))?;
    let steps = split_sim_steps(&mut chosen.task);
    assert_eq!(steps.len(), 1);
    assert!(
        chosen.task.unsupported().is_empty(),
        "{:?}",
        chosen.task.unsupported()
    );
    for p in &steps {
        load_sim_task(url, p).await?;
    }
    let sim_task = Catalogue::default().task(id)?;
    Ok((chosen.task.to_task(chosen.domain.as_deref()), sim_task))
}

/// Every family's first task, solved by its oracle written as UI-TARS text, passes through
/// the whole chain: response parsing, `OsworldEnv` over HTTP, the simulated guest, the
/// evaluator (`check_list` on the score file, or `infeasible`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_answers_pass_through_the_guest_protocol() -> Result<()> {
    let size = arpo_env_sim::DEFAULT_SIZE;
    let url = sim_guest(size).await?;
    let (guest, _) = check_guest(&url).await?;
    assert!(is_sim_guest(&guest).await);
    let catalogue = Catalogue::default();
    let mut ids: Vec<String> = Vec::new();
    for family in Catalogue::families() {
        if let Some(s) = catalogue.train_specs().iter().find(|s| s.family == family) {
            ids.push(s.id.clone());
        }
    }
    assert!(ids.len() > 1);
    let cache = tempfile::tempdir()?;
    let mut env = OsworldEnv::remote(&url, env_config(cache.path()));
    let mut failed = Vec::new();
    for id in &ids {
        let (task, sim_task) = prepared(&url, id).await?;
        let oracle = arpo_env_sim::oracle_at(&sim_task, size.0, size.1)?;
        let texts = oracle
            .iter()
            .map(|a| {
                format_response(
                    "oracle",
                    std::slice::from_ref(a),
                    &CoordinateSystem::Relative1000,
                    size,
                    PointSyntax::Plain,
                )
            })
            .collect();
        let settings = EpisodeSettings {
            max_steps: oracle.len() + 2,
            ..settings()
        };
        let mut turns_seen = 0;
        let outcome = run_episode(
            &mut env,
            &Scripted(Mutex::new(texts)),
            &task,
            &settings,
            &mut |e| {
                if matches!(e, arpo_trainer::rollout::RolloutEvent::TurnDone { .. }) {
                    turns_seen += 1;
                }
            },
        )
        .await?;
        if !outcome.passed() {
            failed.push(outcome.verdict(settings.max_steps));
        }
        assert_eq!(outcome.turns.len(), oracle.len(), "{id}");
        assert_eq!(
            turns_seen,
            oracle.len(),
            "{id}: the observer saw every turn"
        );
    }
    assert!(failed.is_empty(), "{failed:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_is_a_fail_verdict_not_a_broken_chain() -> Result<()> {
    let url = sim_guest(arpo_env_sim::DEFAULT_SIZE).await?;
    let id = Catalogue::default().train_specs()[0].id.clone();
    let (task, _) = prepared(&url, &id).await?;
    let cache = tempfile::tempdir()?;
    let mut env = OsworldEnv::remote(&url, env_config(cache.path()));
    let policy = Scripted(Mutex::new(vec!["ghjk lorem (((".into()]));
    let outcome = run_episode(&mut env, &policy, &task, &settings(), &mut |_| {}).await?;
    assert_eq!(outcome.end, EpisodeEnd::FormatError);
    assert!(!outcome.passed());
    let verdict = outcome.verdict(10);
    assert!(verdict.starts_with("FAIL: task"), "{verdict}");
    assert!(verdict.contains("not a valid UI-TARS action"), "{verdict}");

    // The screen size is checked against the guest's screen.
    let wrong = EpisodeSettings {
        screen: Some(arpo_core::ScreenSize::new(1920, 1080)?),
        ..settings()
    };
    let err = run_episode(&mut env, &policy, &task, &wrong, &mut |_| {})
        .await
        .expect_err("wrong screen size");
    assert!(matches!(err, TrainerError::ScreenMismatch { .. }), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_guest_says_what_to_check() -> Result<()> {
    // A port that was free a moment ago: nothing listens there.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    drop(listener);
    let err = check_guest(&url).await.expect_err("nothing listens");
    assert!(err.to_string().contains("cargo xtask sim-guest"), "{err}");
    Ok(())
}

/// `fixtures/fake-vmrun/vmrun` (a python stand-in for VMware's vmrun) with its state in `dir`,
/// its VMs' IP the loopback.
#[cfg(unix)]
fn fake_vmrun(dir: &Path) -> Result<Vmrun> {
    use std::os::unix::fs::PermissionsExt;
    let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fake-vmrun/vmrun");
    std::fs::write(dir.join("state.json"), r#"{"ip": "127.0.0.1"}"#)?;
    let wrapper = dir.join("vmrun");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nFAKE_VMRUN_DIR='{}' exec python3 '{}' \"$@\"\n",
            dir.display(),
            fake.display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(Vmrun::new(VmrunConfig {
        binary: wrapper,
        host_type: HostType::Workstation,
        headless: true,
        timeout: Duration::from_secs(20),
        ip_timeout: Duration::from_secs(20),
    }))
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmware_path_with_a_fake_vmrun() -> Result<()> {
    let url = sim_guest(arpo_env_sim::DEFAULT_SIZE).await?;
    let port: u16 = url.rsplit(':').next().unwrap_or_default().parse()?;
    let dir = tempfile::tempdir()?;
    let vmrun = fake_vmrun(dir.path())?;
    let vmx = dir.path().join("Ubuntu.vmx");
    std::fs::write(&vmx, "")?;

    let err = check_vmware(&vmrun, &dir.path().join("missing.vmx"), "init_state")
        .await
        .expect_err("no vmx");
    assert!(err.to_string().contains("no such file"), "{err}");
    let err = check_vmware(&vmrun, &vmx, "clean")
        .await
        .expect_err("no such snapshot");
    assert!(err.to_string().contains("snapshot clean present"), "{err}");
    check_vmware(&vmrun, &vmx, "init_state").await?;

    let mut provider = VmwareProvider::new(vmrun, vmx);
    provider.guest_port = port;
    let mut env = OsworldEnv::new(Box::new(provider), env_config(dir.path()));
    let task = OsworldTask::from_json(DEFAULT_TASK)?.to_task(Some(DEFAULT_TASK_DOMAIN));
    let policy = Scripted(Mutex::new(vec![
        "Thought: look\nAction: click(start_box='(500,500)')".into(),
    ]));
    let outcome = run_episode(&mut env, &policy, &task, &settings(), &mut |_| {}).await?;
    assert_eq!(outcome.end, EpisodeEnd::Finished);
    assert_eq!(outcome.turns.len(), 2);
    assert_eq!(outcome.turns[0].actions.len(), 1);
    assert!(!outcome.passed(), "the simulated guest has no gsettings");
    Ok(())
}

#[test]
fn tasks_are_chosen_and_split() -> Result<()> {
    let mut sim = ChosenTask::sim(None)?;
    assert_eq!(split_sim_steps(&mut sim.task).len(), 1);
    assert!(sim.task.config.is_empty());
    let builtin = ChosenTask::builtin()?;
    assert!(
        builtin.task.unsupported().is_empty(),
        "{:?}",
        builtin.task.unsupported()
    );
    assert!(ChosenTask::sim(Some("no-such-task")).is_err());
    Ok(())
}

/// `test-env`'s episode and a training step's rollout of the same task with the same seed are
/// the same episode: same responses (a sampling policy, so the seed path must match), same
/// actions, same score.
#[tokio::test]
async fn test_env_and_training_run_the_same_episode() -> Result<()> {
    let task = button_task("b", 2, 4);
    let sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(11),
        ..SamplingParams::greedy(16)
    };
    for seed in [11u64, 12, 13] {
        let policy = TabularPolicy::new(0.1);
        let settings = RolloutSettings {
            group_size: 1,
            max_steps: 4,
            reset_retries: 1,
            sampling: sampling.clone(),
            coordinates: Coordinates::Relative,
            expected_screen: None,
        };
        let report = run_rollouts(
            &policy,
            &mut [ButtonRow::new()],
            std::slice::from_ref(&task),
            &settings,
            seed,
            &mut |_| {},
        )
        .await?;
        let trained = &report.groups[0].trajectories[0];
        let checked = run_episode(
            &mut ButtonRow::new(),
            &policy,
            &task,
            &EpisodeSettings {
                max_steps: 4,
                coordinates: Coordinates::Relative,
                sampling: SamplingParams {
                    seed: Some(seed),
                    ..sampling.clone()
                },
                screen: None,
                attempts: 1,
                env_hint: String::new(),
            },
            &mut |_| {},
        )
        .await?;
        let texts: Vec<&str> = trained
            .turns
            .iter()
            .map(|t| t.response.text.as_str())
            .collect();
        let checked_texts: Vec<&str> = checked.turns.iter().map(|t| t.response.as_str()).collect();
        assert_eq!(texts, checked_texts, "seed {seed}");
        assert_eq!(trained.end, checked.end, "seed {seed}");
        assert_eq!(trained.eval_result, checked.score, "seed {seed}");
        for (a, b) in trained.turns.iter().zip(&checked.turns) {
            assert_eq!(a.actions, b.actions);
        }
    }
    Ok(())
}

/// A diagnostic whose evaluation raises is a broken chain at the evaluate stage, not a FAIL.
#[tokio::test]
async fn an_evaluation_that_raises_breaks_the_chain_with_its_stage() -> Result<()> {
    let mut task = button_task("e", 0, 2);
    task.config["fail_evaluations"] = 1.into();
    let policy = Scripted(Mutex::new(vec![
        "Action: click(start_box='(50,500)')".into(),
    ]));
    let err = run_episode(
        &mut ButtonRow::new(),
        &policy,
        &task,
        &settings(),
        &mut |_| {},
    )
    .await
    .expect_err("evaluation raised");
    match &err {
        TrainerError::EpisodeBroken { stage, error, .. } => {
            assert_eq!(*stage, EnvStage::Evaluate);
            assert!(error.contains("injected evaluator failure"), "{error}");
        }
        other => panic!("expected EpisodeBroken, got {other}"),
    }
    Ok(())
}

/// `cargo xtask eval` scores through the same engine: with the training step's seed it gets the
/// training rollout's score; a rollout its environment drops is reported as dropped and counts
/// neither as a success nor as a failure.
#[tokio::test]
async fn eval_agrees_with_training_and_does_not_score_dropped_rollouts() -> Result<()> {
    let ok = button_task("b", 2, 4);
    let mut dead = button_task("dead", 0, 2);
    dead.config["fail_evaluations"] = 100.into();
    let settings = RolloutSettings {
        group_size: 1,
        max_steps: 4,
        reset_retries: 2,
        sampling: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy(16)
        },
        coordinates: Coordinates::Relative,
        expected_screen: None,
    };
    for seed in [11u64, 12, 13, 14] {
        let policy = TabularPolicy::new(0.1);
        let tasks = [ok.clone(), dead.clone()];
        let trained = run_rollouts(
            &policy,
            &mut [ButtonRow::new()],
            &tasks,
            &settings,
            seed,
            &mut |_| {},
        )
        .await?;
        let report = arpo_trainer::eval::evaluate(
            &policy,
            &mut [ButtonRow::new()],
            &tasks,
            &settings,
            seed,
            0.1,
            "check",
            "test",
            &mut |_| {},
        )
        .await?;
        let solved = usize::from(trained.groups[0].trajectories[0].eval_result > 0.1);
        assert_eq!(report.successes, solved, "seed {seed}");
        assert_eq!(
            report.episodes, 1,
            "seed {seed}: the dropped rollout is no episode"
        );
        assert_eq!(report.dropped, 1, "seed {seed}");
        assert_eq!(report.success_rate, solved as f64, "seed {seed}");
    }
    Ok(())
}

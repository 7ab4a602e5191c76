//! The candle learner with the tiny fixture model on the embedded desktop: sampled token ids in
//! their slots, old log-probs equal to the policy's own sampling log-probs, updates that move the
//! shared weights in the advantage's direction, and save/load.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use arpo_core::{
    AgentContext, Environment, EpisodeEnd, FinishReason, Policy, SamplingParams, Trajectory, Turn,
};
use arpo_env_sim::{Catalogue, SimEnv};
use arpo_trainer::Config;
use arpo_trainer::learner::{Learner, Sample};
use arpo_trainer::model::{CandleLearner, load_local};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-qwen2vl")
}

fn config(extra: &[&str]) -> Config {
    let mut sets = vec![
        format!(
            "worker.actor.model.model_path={}",
            fixture_model().display()
        ),
        "worker.actor.optim.lr=1e-2".to_string(),
        "worker.rollout.limit_images=4".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::from_yaml_str("", &sets).unwrap()
}

/// A one- or two-turn trajectory sampled by `policy` on a sim task.
async fn rollout(policy: &dyn Policy, turns: usize, seed: u64, max_tokens: usize) -> Trajectory {
    let catalogue = Catalogue::default();
    let task = catalogue.train().into_iter().nth(20).unwrap();
    let mut env = SimEnv::new();
    let obs = env.reset(&task).await.unwrap();
    let mut shots = vec![obs.screenshot];
    let mut out = Vec::new();
    for k in 0..turns {
        let context = AgentContext {
            instruction: task.instruction.clone(),
            screenshots: shots.clone(),
            responses: out.iter().map(|t: &Turn| t.response.text.clone()).collect(),
        };
        let sampling = SamplingParams {
            temperature: 1.0,
            max_tokens,
            seed: Some(seed + k as u64),
            ..SamplingParams::default()
        };
        let r = policy.act(&[context], &sampling).await.unwrap().remove(0);
        out.push(Turn {
            screenshot: shots.last().unwrap().clone(),
            response: r,
            actions: Vec::new(),
            format_error: None,
            env_error: None,
        });
        // The screen does not change (no action is carried out): a second screenshot all the same.
        shots.push(shots.last().unwrap().clone());
    }
    Trajectory {
        task_id: task.id,
        instruction: task.instruction,
        turns: out,
        end: EpisodeEnd::MaxSteps,
        eval_result: 0.0,
        format_reward: 0.0,
    }
}

#[tokio::test]
async fn sampled_ids_sit_in_their_slots_and_nothing_else_is_trained() {
    let (policy, learner) = load_local(&config(&[]), 10).unwrap();
    let t = rollout(&policy, 2, 3, 12).await;
    let built = learner.episodes.build(&t).unwrap();
    let ep = &built.episode;
    assert_eq!(built.turn_positions.len(), 2);
    for (turn, positions) in t.turns.iter().zip(&built.turn_positions) {
        let ids: Vec<u32> = positions.iter().map(|&p| ep.input_ids[p]).collect();
        assert_eq!(ids, turn.response.token_ids);
        if turn.response.finish_reason == FinishReason::Length {
            // `<|im_end|>` closes the turn but was not sampled: context only.
            let after = positions.last().unwrap() + 1;
            assert_eq!(ep.input_ids[after], learner.episodes.im_end_id);
            assert!(!ep.assistant_mask[after]);
        }
    }
    let trained: usize = ep.assistant_mask.iter().filter(|m| **m).count();
    let sampled: usize = t.turns.iter().map(|t| t.response.token_ids.len()).sum();
    assert_eq!(trained, sampled);
    // Both screenshots are in the sequence (limit_images 4).
    assert_eq!(ep.grid_thw.len(), 2);
}

#[tokio::test]
async fn old_logprobs_equal_the_sampling_logprobs_of_a_first_turn() {
    let (policy, mut learner) = load_local(&config(&[]), 10).unwrap();
    for seed in [1, 2, 3] {
        let t = rollout(&policy, 1, seed, 16).await;
        let old = learner.old_logprobs(&t).unwrap();
        let sampled = &t.turns[0].response.logprobs;
        assert_eq!(old[0].len(), sampled.len());
        for (a, b) in old[0].iter().zip(sampled) {
            assert!((a - b).abs() < 1e-4, "scored {a} vs sampled {b}");
        }
    }
}

#[tokio::test]
async fn an_update_moves_the_shared_weights_in_the_advantages_direction() {
    let (policy, mut learner) = load_local(&config(&[]), 10).unwrap();
    let t = rollout(&policy, 1, 5, 8).await;
    let before = learner.old_logprobs(&t).unwrap();
    let sum = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|x| f64::from(*x)).sum::<f64>();
    let loss = arpo_grpo::PolicyLossConfig::default();
    let sample = Sample {
        trajectory: t.clone(),
        advantage: 1.0,
        old_logprobs: Some(before.clone()),
        injected: false,
    };
    let stats = learner.update(&[sample], &loss, 0).unwrap();
    assert!(!stats.skipped && stats.grad_norm > 0.0);
    assert_eq!(stats.tokens, t.turns[0].response.token_ids.len());
    // Ratio 1 at the start: the loss is -A.
    assert!((stats.loss + 1.0).abs() < 1e-5, "{}", stats.loss);
    let after = learner.old_logprobs(&t).unwrap();
    assert!(
        sum(&after) > sum(&before),
        "{} -> {}",
        sum(&before),
        sum(&after)
    );
    // The policy shares the weights: its greedy answer is scored with the new weights too.
    let context = t.context_at(0);
    let r = policy
        .act(&[context], &SamplingParams::greedy(4))
        .await
        .unwrap()
        .remove(0);
    let mut again = t.clone();
    again.turns[0].response = r.clone();
    let scored = learner.old_logprobs(&again).unwrap();
    for (a, b) in scored[0].iter().zip(&r.logprobs) {
        assert!((a - b).abs() < 1e-4);
    }

    // A negative advantage pushes the other way.
    let before = learner.old_logprobs(&t).unwrap();
    let sample = Sample {
        trajectory: t.clone(),
        advantage: -1.0,
        old_logprobs: Some(before.clone()),
        injected: false,
    };
    learner.update(&[sample], &loss, 1).unwrap();
    let after = learner.old_logprobs(&t).unwrap();
    assert!(sum(&after) < sum(&before));
}

#[tokio::test]
async fn an_on_policy_update_equals_one_with_recomputed_old_logprobs() {
    // Two learners from the same checkpoint: one is given the old log-probs a separate scoring
    // pass computes, the other `None` (on-policy: its own log-probs, detached). Same update.
    let (policy, mut a) = load_local(&config(&[]), 10).unwrap();
    let (_, mut b) = load_local(&config(&[]), 10).unwrap();
    let t = rollout(&policy, 1, 5, 8).await;
    let loss = arpo_grpo::PolicyLossConfig::default();
    let sample = |old: Option<Vec<Vec<f32>>>| Sample {
        trajectory: t.clone(),
        advantage: -0.75,
        old_logprobs: old,
        injected: false,
    };
    let old = a.old_logprobs(&t).unwrap();
    let sa = a.update(&[sample(Some(old))], &loss, 0).unwrap();
    let sb = b.update(&[sample(None)], &loss, 0).unwrap();
    assert!(
        (sa.loss - sb.loss).abs() < 1e-6,
        "{} vs {}",
        sa.loss,
        sb.loss
    );
    assert!((sa.grad_norm - sb.grad_norm).abs() < 1e-6 * sa.grad_norm.max(1.0));
    assert_eq!(sb.ppo_kl, 0.0);
    let (la, lb) = (a.old_logprobs(&t).unwrap(), b.old_logprobs(&t).unwrap());
    for (x, y) in la.iter().flatten().zip(lb.iter().flatten()) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

#[test]
fn parameter_estimates_match_hand_computed_counts() {
    use arpo_trainer::model::{SAMPLE_PARALLEL_MAX_PARAMETERS, estimated_parameters};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // uitars-tiny-base: hidden 128, MLP 384, 4 layers, 4 heads / 2 KV heads (KV width 64),
    // vocab 972: 4 * (2*128*128 + 2*128*64 + 3*128*384) + 972*128 = 786,432 + 124,416.
    let tiny = estimated_parameters(&root.join("fixtures/models/uitars-tiny-base")).unwrap();
    assert_eq!(tiny, 910_848);
    assert!(tiny <= SAMPLE_PARALLEL_MAX_PARAMETERS);
    // Qwen2-VL-2B's language model (hidden 1536, MLP 8960, 28 layers, 12 heads / 2 KV heads,
    // vocab 151936): 1,543,569,408 by the same formula (HF: 1.54 B without the vision tower).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936}"#,
    )
    .unwrap();
    let big = estimated_parameters(dir.path()).unwrap();
    assert_eq!(big, 1_543_569_408);
    assert!(big > SAMPLE_PARALLEL_MAX_PARAMETERS);
    assert_eq!(estimated_parameters(&dir.path().join("missing")), None);
}

#[tokio::test]
async fn save_then_load_restores_weights_and_optimizer_exactly() {
    for extra in [&[][..], &["worker.actor.model.lora.rank=4"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let (policy, mut learner) = load_local(&config(extra), 10).unwrap();
        let t = rollout(&policy, 1, 9, 8).await;
        let loss = arpo_grpo::PolicyLossConfig::default();
        let sample = |old: Vec<Vec<f32>>| Sample {
            trajectory: t.clone(),
            advantage: 1.0,
            old_logprobs: Some(old),
            injected: false,
        };
        let old = learner.old_logprobs(&t).unwrap();
        learner.update(&[sample(old)], &loss, 0).unwrap();
        learner.save(dir.path()).unwrap();
        let saved = learner.old_logprobs(&t).unwrap();
        // The next step from the saved state...
        learner.update(&[sample(saved.clone())], &loss, 1).unwrap();
        let next = learner.old_logprobs(&t).unwrap();
        assert_ne!(next, saved, "{extra:?}: the second update changed nothing");
        // ...is reproduced bit for bit after loading the checkpoint.
        learner.load(dir.path()).unwrap();
        assert_eq!(learner.old_logprobs(&t).unwrap(), saved, "{extra:?}");
        learner.update(&[sample(saved.clone())], &loss, 1).unwrap();
        assert_eq!(learner.old_logprobs(&t).unwrap(), next, "{extra:?}");
    }
}

#[test]
fn a_kl_penalty_is_refused_with_the_fix() {
    let (_, mut learner) = load_local(&config(&[]), 10).unwrap();
    let loss = arpo_grpo::PolicyLossConfig {
        kl: Some(arpo_grpo::KlPenalty {
            estimator: arpo_grpo::KlEstimator::LowVarKl,
            coef: 0.1,
        }),
        ..Default::default()
    };
    let e = learner.update(&[], &loss, 0).unwrap_err().to_string();
    assert!(e.contains("disable_kl"), "{e}");
}

#[test]
fn a_missing_model_fails_the_preflight_with_the_path() {
    let c = config(&["worker.actor.model.model_path=/nonexistent/model"]);
    let e = load_local(&c, 1).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/model"), "{e}");
}

/// A resumed run with a remote policy: loading a checkpoint hands the restored weights to the
/// push hook (what sends them to the server) before anything else runs, so the first rollout
/// after `--resume` samples from them, not from the base weights the server got at start.
#[tokio::test]
async fn loading_a_checkpoint_pushes_the_restored_weights() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let (policy, mut learner) = load_local(&config(&[]), 10).unwrap();
    let t = rollout(&policy, 1, 9, 8).await;
    let loss = arpo_grpo::PolicyLossConfig::default();
    let first_weight = |tr: &arpo_model::train::trainable::Trainable| -> Vec<f32> {
        let (_, var) = &tr.vars()[0];
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let pushed: Arc<Mutex<Vec<Vec<f32>>>> = Arc::default();
    let sink = pushed.clone();
    learner.after_update = Some(Box::new(move |tr| {
        sink.lock().unwrap().push(first_weight(tr));
        Ok(())
    }));
    let step = |learner: &mut CandleLearner, k: u64| {
        let old = learner.old_logprobs(&t).unwrap();
        let s = Sample {
            trajectory: t.clone(),
            advantage: 1.0,
            old_logprobs: Some(old),
            injected: false,
        };
        learner.update(&[s], &loss, k).unwrap();
    };
    step(&mut learner, 0);
    learner.save(dir.path()).unwrap();
    let saved = first_weight(&learner.trainable);
    step(&mut learner, 1);
    let moved = first_weight(&learner.trainable);
    assert_ne!(moved, saved, "the second update changed nothing");
    let before = pushed.lock().unwrap().len();
    learner.load(dir.path()).unwrap();
    let pushes = pushed.lock().unwrap();
    assert_eq!(pushes.len(), before + 1, "loading pushed once");
    assert_eq!(
        pushes.last().unwrap(),
        &saved,
        "the pushed weights are the restored ones"
    );
}

/// The rollout model's prefix cache (when on) holds keys and values computed with the
/// weights of their time: an update clears it, so the next rollout samples from the new
/// weights only (its log-probs are the learner's scores of the new weights), and the cache
/// serves the same prompt again once it is refilled.
#[tokio::test]
async fn an_update_clears_the_rollout_prefix_cache() {
    let (policy, mut learner) =
        load_local(&config(&["worker.rollout.prefix_cache_mib=64"]), 10).unwrap();
    let cache = policy.model.model.prefix_cache.clone();
    assert!(cache.enabled(), "worker.rollout.prefix_cache_mib");
    let t = rollout(&policy, 1, 5, 8).await;
    // The same prompt again: served from the cache.
    let again = rollout(&policy, 1, 6, 8).await;
    assert!(cache.stats().cached_tokens > 0, "{:?}", cache.stats());
    let old = learner.old_logprobs(&again).unwrap();
    let sample = Sample {
        trajectory: t,
        advantage: 1.0,
        old_logprobs: None,
        injected: false,
    };
    learner
        .update(&[sample], &arpo_grpo::PolicyLossConfig::default(), 0)
        .unwrap();
    assert_eq!(cache.stats().blocks, 0, "cleared by the update");
    let after = rollout(&policy, 1, 6, 8).await;
    let scored = learner.old_logprobs(&after).unwrap();
    for (a, b) in scored[0].iter().zip(&after.turns[0].response.logprobs) {
        assert!((a - b).abs() < 1e-4, "new weights {a} vs sampled {b}");
    }
    assert!(
        scored[0]
            .iter()
            .zip(&old[0])
            .any(|(a, b)| (a - b).abs() > 1e-4),
        "the update changed the weights"
    );
}

/// Loads a run with `worker.rollout.weights=q8_0` and `sets`, updates the learner once, and
/// checks that the rollout policy then samples exactly what a q8_0 copy made afresh from the
/// updated learner samples, and that the update changed what it samples. Returns the learner.
async fn q8_0_rollouts_follow_an_update(sets: &[&str]) -> CandleLearner {
    let mut all = vec!["worker.rollout.weights=q8_0"];
    all.extend_from_slice(sets);
    let (policy, mut learner) = load_local(&config(&all), 10).unwrap();
    assert!(policy.model.model.rollout_summary().quantized > 0);
    let t = rollout(&policy, 1, 5, 8).await;
    let before = rollout(&policy, 1, 7, 8).await;
    let sample = Sample {
        trajectory: t,
        advantage: 1.0,
        old_logprobs: None,
        injected: false,
    };
    learner
        .update(&[sample], &arpo_grpo::PolicyLossConfig::default(), 0)
        .unwrap();
    let fresh = learner
        .trainable
        .model
        .to_rollout(arpo_model::RolloutWeights::Q8_0)
        .unwrap();
    let context = before.context_at(0);
    let chat = arpo_core::protocol::build_messages(&context, &policy.prompt);
    let request = policy.model.prepare(&chat).unwrap();
    let greedy = SamplingParams::greedy(8);
    let (ours, _) = policy
        .model
        .model
        .generate(std::slice::from_ref(&request), &greedy, &[])
        .unwrap();
    let (theirs, _) = fresh
        .generate(std::slice::from_ref(&request), &greedy, &[])
        .unwrap();
    assert_eq!(ours[0].token_ids, theirs[0].token_ids);
    assert_eq!(ours[0].logprobs, theirs[0].logprobs);
    let after = rollout(&policy, 1, 7, 8).await;
    assert_ne!(
        before.turns[0].response.logprobs, after.turns[0].response.logprobs,
        "the update changed what the rollout copy samples"
    );
    learner
}

/// `worker.rollout.weights: q8_0` with LoRA: the rollout copy has a quantized base under the
/// learner's (shared) adapters, so it follows an update with no copy; refused for a server
/// (it reads its own).
#[tokio::test]
async fn quantized_rollout_weights_follow_lora_updates() {
    let learner = q8_0_rollouts_follow_an_update(&["worker.actor.model.lora.rank=4"]).await;
    assert!(learner.trainable.lora_set().is_some());
    let sets: Vec<String> = [
        "worker.rollout.weights=q4k",
        "worker.actor.model.lora.rank=4",
        "worker.rollout.use_external_server=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let err = Config::from_yaml_str("", &sets).unwrap_err().to_string();
    assert!(err.contains("serve --weights"), "{err}");
}

/// `worker.rollout.weights: q8_0` under full fine-tuning: the quantized copy is stored again
/// from the learner after the update.
#[tokio::test]
async fn quantized_rollout_weights_follow_full_fine_tuning_updates() {
    let learner = q8_0_rollouts_follow_an_update(&["worker.actor.model.lora.rank=0"]).await;
    assert!(learner.trainable.lora_set().is_none());
}

//! SFT trains a whole demonstration as one sequence when its screenshots all fit in the prompt.
//! That is exact only if every turn's log-probability in the whole sequence equals the one it
//! has in the prompt of its own step (the trajectory cut after that turn): checked here with the
//! shipped tiny base model on multi-step oracle demonstrations.

use std::path::PathBuf;

use arpo_core::protocol::CoordinateSystem;
use arpo_model::train::score::score_episode;
use arpo_model::{ChatTokenizer, Qwen2Vl};
use arpo_trainer::Config;
use arpo_trainer::model::{EpisodeBuilder, prompt_config};
use arpo_trainer::sft::{demonstrations, samples, sft_tasks};
use candle_core::{DType, Device};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
async fn a_whole_demonstration_scores_each_turn_as_its_own_step_prompt_does() {
    let root = root();
    let dir = root.join("fixtures/models/uitars-tiny-base");
    let config = Config::load(&root.join("configs/embedded_default.yaml"), &[]).expect("config");
    let prompt = prompt_config(&config);
    // Multi-step families: form filling, typing then submitting, a dialog.
    let tasks: Vec<_> = sft_tasks(1)
        .into_iter()
        .filter(|t| {
            ["fill_form", "type_submit", "dialog"]
                .iter()
                .any(|f| t.id.contains(f))
        })
        .collect();
    assert_eq!(tasks.len(), 3);
    let prompt_limit = prompt.limit_images;
    let mut demos = demonstrations(&tasks, &CoordinateSystem::Relative1000)
        .await
        .expect("demonstrations");
    // Longer demonstrations are cut per step anyway (their prompts drop old screenshots).
    demos.retain(|d| d.turns.len() <= prompt.limit_images);
    assert!(demos.len() >= 2);
    let tokenizer = ChatTokenizer::from_dir(&dir).expect("tokenizer");
    let whole = samples(&demos, &tokenizer, prompt_limit).expect("whole");
    let cut = samples(&demos, &tokenizer, 1).expect("cut");
    assert_eq!(whole.len(), demos.len(), "one sample per demonstration");
    let turns: usize = demos.iter().map(|d| d.turns.len()).sum();
    assert!(turns > demos.len(), "the demonstrations have several steps");
    assert_eq!(cut.len(), turns, "one sample per step");

    let model = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).expect("model");
    let builder = EpisodeBuilder::from_dir(&dir, prompt, Device::Cpu).expect("builder");
    let mut cut = cut.iter();
    let mut compared = 0;
    for w in &whole {
        assert_eq!(w.trained, 0..w.trajectory.turns.len());
        let built = builder.build(&w.trajectory).expect("build whole");
        let score = score_episode(&model, &built.episode).expect("score whole");
        let lp: Vec<f32> = score.log_probs.to_vec1().expect("lp");
        for (k, positions) in built.turn_positions.iter().enumerate() {
            let c = cut.next().expect("a cut sample per turn");
            assert_eq!(c.trained, k..k + 1);
            let cb = builder.build(&c.trajectory).expect("build cut");
            let cs = score_episode(&model, &cb.episode).expect("score cut");
            let clp: Vec<f32> = cs.log_probs.to_vec1().expect("lp");
            let last = cb.turn_positions.last().expect("turns");
            assert_eq!(last.len(), positions.len());
            // The cut sequence is a prefix of the whole one.
            assert_eq!(
                cb.episode.input_ids[..],
                built.episode.input_ids[..cb.episode.input_ids.len()]
            );
            for (&p_cut, &p_whole) in last.iter().zip(positions) {
                let a = clp[cs
                    .positions
                    .iter()
                    .position(|&q| q == p_cut)
                    .expect("scored")];
                let b = lp[score
                    .positions
                    .iter()
                    .position(|&q| q == p_whole)
                    .expect("scored")];
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "turn {k} of {}: log-prob {a} in its step prompt, {b} in the whole sequence",
                    w.trajectory.task_id
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 50, "compared {compared} tokens");
}

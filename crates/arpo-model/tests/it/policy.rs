//! The local Policy on the tiny fixture model.

use crate::common::*;
use arpo_core::protocol::PromptConfig;
use arpo_core::{AgentContext, FinishReason, Policy, SamplingParams, Screenshot};
use arpo_model::{LocalPolicy, UiTars};
use candle_core::{DType, Device};

fn screenshot(name: &str) -> Screenshot {
    let bytes = std::fs::read(golden_dir().join("images").join(name)).unwrap();
    let img = arpo_model::processor::decode_image(&bytes).unwrap();
    Screenshot::new(bytes, img.width(), img.height())
}

#[tokio::test]
async fn local_policy_answers_a_batch_in_order_with_token_level_data() {
    let model = UiTars::load(model_dir().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.stop_ids, vec![402]);
    let policy = LocalPolicy::new(model, PromptConfig::default());
    let one = AgentContext {
        instruction: "Open the file menu".into(),
        screenshots: vec![screenshot("a_56x84.png")],
        responses: vec![],
    };
    let two = AgentContext {
        instruction: "Save the document".into(),
        screenshots: vec![screenshot("b_112x56.png"), screenshot("c_101x75.png")],
        responses: vec!["Thought: menu\nAction: click(start_box='(10,20)')".into()],
    };
    let greedy = SamplingParams::greedy(6);
    let batch = policy
        .act(&[one.clone(), two.clone()], &greedy)
        .await
        .unwrap();
    assert_eq!(batch.len(), 2);
    // Each answer equals the one it gets alone.
    for (ctx, got) in [one, two].iter().zip(&batch) {
        let alone = policy
            .act(std::slice::from_ref(ctx), &greedy)
            .await
            .unwrap();
        assert_eq!(alone[0].token_ids, got.token_ids);
        assert_eq!(alone[0].text, got.text);
        assert_eq!(alone[0].finish_reason, got.finish_reason);
        for (a, b) in alone[0].logprobs.iter().zip(&got.logprobs) {
            assert!((a - b).abs() < 1e-4, "logprob {a} alone vs {b} batched");
        }
        assert_eq!(got.token_ids.len(), got.logprobs.len());
        assert!(got.token_ids.len() <= 6);
        if got.finish_reason == FinishReason::Length {
            assert_eq!(got.token_ids.len(), 6);
        }
        let text = policy.model.tokenizer.decode(&got.token_ids).unwrap();
        assert_eq!(text, got.text);
    }
    let bad = AgentContext {
        instruction: "x".into(),
        screenshots: vec![Screenshot::new(b"not an image".to_vec(), 10, 10)],
        responses: vec![],
    };
    let err = policy.act(&[bad], &greedy).await.unwrap_err();
    assert!(
        matches!(err, arpo_core::PolicyError::InvalidInput(_)),
        "{err}"
    );
    assert!(policy.describe().contains("tiny-qwen2vl"));
}

/// bf16 generation used to fail with "dtype mismatch in add, lhs: BF16, rhs: F32" (the
/// attention mask is built in f32). A batch with images and different prompt lengths answers,
/// with finite log-probs.
#[tokio::test]
async fn bf16_generation_answers_a_padded_batch() {
    let model = UiTars::load(model_dir().to_str().unwrap(), DType::BF16, &Device::Cpu).unwrap();
    let policy = LocalPolicy::new(model, PromptConfig::default());
    let ctx = |shots: Vec<Screenshot>| AgentContext {
        instruction: "Open the file menu".into(),
        responses: vec!["Thought: a\nAction: wait()".into(); shots.len() - 1],
        screenshots: shots,
    };
    let batch = policy
        .act(
            &[
                ctx(vec![screenshot("a_56x84.png")]),
                ctx(vec![screenshot("b_112x56.png"), screenshot("c_101x75.png")]),
            ],
            &SamplingParams::greedy(4),
        )
        .await
        .unwrap();
    assert_eq!(batch.len(), 2);
    for r in &batch {
        assert!(!r.token_ids.is_empty());
        assert!(r.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
}

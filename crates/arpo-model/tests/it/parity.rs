//! Golden parity with HF transformers on the tiny random-weight Qwen2-VL: position ids,
//! vision features and logits at every position, for prompts with 0, 1 and 2 images.

use crate::common::*;
use arpo_core::SamplingParams;
use arpo_model::{GenerationRequest, Qwen2Vl};
use candle_core::{DType, Device, Tensor};

fn model() -> Qwen2Vl {
    Qwen2Vl::load(&model_dir(), DType::F32, &Device::Cpu).expect("tiny model loads")
}

#[test]
fn forward_matches_transformers_for_0_1_2_images() {
    let model = model();
    let golden = golden();
    for case in ["text_only", "one_image", "two_images"] {
        let g = &golden["cases"][case];
        let input_ids = ids(&g["input_ids"]);
        let grid = grids(&g["grid_thw"]);
        let t = case_tensors(case);

        let rope = model.rope_index(&input_ids, &grid).unwrap();
        let want_pos = t["position_ids"].to_vec2::<i64>().unwrap();
        for (axis, want) in want_pos.iter().enumerate() {
            assert_eq!(&rope.positions[axis], want, "{case}: positions axis {axis}");
        }
        let want_delta = t["rope_delta"].to_vec1::<i64>().unwrap()[0];
        assert_eq!(rope.delta, want_delta, "{case}: rope delta");

        let pv = t.get("pixel_values");
        if let Some(pv) = pv {
            let feats = model.image_features(pv, &grid).unwrap();
            assert_close(
                &format!("{case}: vision features"),
                &feats,
                &t["vision_features"],
                1e-4,
                1e-5,
            );
        }
        let logits = model.forward(&input_ids, pv, &grid).unwrap();
        let worst = assert_close(
            &format!("{case}: logits"),
            &logits,
            &t["logits"],
            1e-4,
            1e-5,
        );
        eprintln!("{case}: worst relative logit error {worst:e}");
    }
}

#[test]
fn mismatched_image_tokens_are_an_error_not_a_panic() {
    let model = model();
    let golden = golden();
    let g = &golden["cases"]["one_image"];
    let input_ids = ids(&g["input_ids"]);
    let t = case_tensors("one_image");
    // No pixel values for a prompt with image tokens.
    assert!(model.forward(&input_ids, None, &[]).is_err());
    // Pixel values of the wrong shape.
    let bad = Tensor::zeros((3, 1176), DType::F32, &Device::Cpu).unwrap();
    assert!(
        model
            .forward(&input_ids, Some(&bad), &grids(&g["grid_thw"]))
            .is_err()
    );
    assert!(
        model
            .image_features(&t["pixel_values"], &[[1, 2, 2]])
            .is_err()
    );
}

fn request(model: &Qwen2Vl, case: &str) -> (GenerationRequest, Vec<u32>) {
    let golden = golden();
    let g = &golden["cases"][case];
    let t = case_tensors(case);
    let _ = model;
    (
        GenerationRequest {
            input_ids: ids(&g["input_ids"]),
            pixel_values: t.get("pixel_values").cloned(),
            grid_thw: grids(&g["grid_thw"]),
        },
        ids(&g["greedy_tokens"]),
    )
}

#[test]
fn greedy_generation_matches_transformers_alone_and_batched() {
    let model = model();
    let cases = ["text_only", "one_image", "two_images"];
    let im_end = model.config.eos_token_ids.clone();
    let mut requests = Vec::new();
    let mut wants = Vec::new();
    for case in cases {
        let (req, want) = request(&model, case);
        let (out, _) = model
            .generate(
                std::slice::from_ref(&req),
                &SamplingParams::greedy(want.len()),
                &im_end,
            )
            .unwrap();
        assert_eq!(out[0].token_ids, want, "{case}: greedy tokens alone");
        assert_eq!(out[0].logprobs.len(), want.len());
        assert!(out[0].logprobs.iter().all(|l| *l <= 0.0 && l.is_finite()));
        requests.push(req);
        wants.push(want);
    }
    // Different lengths and image counts (0, 1, 2) in one batch, in two orders.
    let (out, _) = model
        .generate(&requests, &SamplingParams::greedy(12), &im_end)
        .unwrap();
    for (o, w) in out.iter().zip(&wants) {
        assert_eq!(&o.token_ids, w, "batched greedy tokens");
    }
    let rev: Vec<GenerationRequest> = requests.iter().rev().cloned().collect();
    let (out, _) = model
        .generate(&rev, &SamplingParams::greedy(12), &im_end)
        .unwrap();
    for (o, w) in out.iter().zip(wants.iter().rev()) {
        assert_eq!(&o.token_ids, w, "batched greedy tokens, reversed");
    }
}

#[test]
fn generation_stops_at_stop_ids_and_max_tokens() {
    let model = model();
    let (req, want) = request(&model, "one_image");
    // Declare the 3rd greedy token a stop token: generation ends on it, including it.
    let (out, _) = model
        .generate(
            std::slice::from_ref(&req),
            &SamplingParams::greedy(12),
            &[want[2]],
        )
        .unwrap();
    assert_eq!(out[0].token_ids, want[..3].to_vec());
    assert_eq!(out[0].finish_reason, arpo_core::FinishReason::Stop);
    let (out, _) = model
        .generate(std::slice::from_ref(&req), &SamplingParams::greedy(5), &[])
        .unwrap();
    assert_eq!(out[0].token_ids, want[..5].to_vec());
    assert_eq!(out[0].finish_reason, arpo_core::FinishReason::Length);
}

#[test]
fn greedy_logprobs_match_transformers_logits() {
    // The first generated token's log-prob equals log_softmax of the golden last-position logits.
    let model = model();
    let (req, want) = request(&model, "text_only");
    let (out, _) = model
        .generate(std::slice::from_ref(&req), &SamplingParams::greedy(1), &[])
        .unwrap();
    let logits = case_tensors("text_only")["logits"]
        .to_vec2::<f32>()
        .unwrap();
    let last = logits.last().unwrap();
    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + last.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let expect = last[want[0] as usize] - lse;
    assert!(
        (out[0].logprobs[0] - expect).abs() < 1e-4,
        "{} vs {expect}",
        out[0].logprobs[0]
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_batch_sampled_tokens_are_in_vocab() {
    let model = model();
    let (req, _) = request(&model, "two_images");
    let p = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 50,
        max_tokens: 6,
        seed: Some(42),
    };
    let (a, _) = model.generate(std::slice::from_ref(&req), &p, &[]).unwrap();
    let (b, _) = model.generate(std::slice::from_ref(&req), &p, &[]).unwrap();
    assert_eq!(a, b);
    let vocab = model.config.text.vocab_size as u32;
    assert!(a[0].token_ids.iter().all(|t| *t < vocab));
}

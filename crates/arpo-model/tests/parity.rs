//! Golden parity with HF transformers on the tiny random-weight Qwen2-VL: position ids,
//! vision features and logits at every position, for prompts with 0, 1 and 2 images.

mod common;

use arpo_model::Qwen2Vl;
use candle_core::{DType, Device, Tensor};
use common::*;

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
        for axis in 0..3 {
            assert_eq!(
                rope.positions[axis], want_pos[axis],
                "{case}: positions axis {axis}"
            );
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

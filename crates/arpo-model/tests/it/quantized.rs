//! Rollout copies with quantized linears (`Qwen2Vl::to_rollout`) against the f32 model they
//! were made from, on the tiny fixtures.
//!
//! The tolerance comes from the formats' rounding, not from these runs:
//!
//! - q8_0 stores a block of 32 weights as `d * q`, `q` an integer in [-127, 127] and
//!   `d = max|w| / 127`, so the rounding error is uniform in `±d/2`: RMS `d / sqrt 12`. We take
//!   the block maximum at 3 standard deviations of its values (the expected maximum of 32
//!   Gaussian draws is 2.1, of 256 it is 2.9), which gives a relative RMS error of
//!   `3 / (127 sqrt 12) = 0.0068` per operand. candle's q8_0 product also rounds the
//!   activation to 8 bits (blocks of 32, or 256 in our 4-bit kernels), an independent
//!   error of the same size: per linear output, `e1 = sqrt 2 * 0.0068 = 0.0096` of its RMS.
//! - The roundings of different linears are independent and the residual stream adds their
//!   outputs, so their variances add: after `n` quantized linears the relative RMS error of
//!   the final hidden state, and so of the logits (`lm_head` is one of the `n`), is
//!   `e = e1 sqrt n`. That count takes every quantized linear of the copy, the vision tower's
//!   too, as an upper count for prompts that do not use all of them, plus one for the
//!   embedding table when the copy stores it compact (one rounding of the input, counted as a
//!   whole linear's two), and under bf16 two per vision block (its attention products `q K^T`
//!   and `p V` round both operands to bf16 too).
//! - Over the vocabulary and the positions compared (about 10^5 logits) a Gaussian error stays
//!   within 5 of its standard deviations: `max |dz| <= 5 e rms(z)`, `rms(z)` the f32 logits'
//!   root mean square at that position.
//! - `log_softmax` moves by at most `|dz_i| + max_j |dz_j|`: `|d logp| <= 2 max |dz|`.
//! - Greedy tokens must agree wherever f32's top-2 margin exceeds `2 max |dz|` (both logits
//!   can move toward each other): from the first position where it does not, the sequences
//!   may part, so the comparison stops there.
//!
//! bf16 keeps 8 significant bits: the rounding step is at most `2^-7` of the value, relative
//! RMS at most `2^-7 / sqrt 12` per operand (weights and, in candle's bf16 product,
//! activations), the same chain after that. q4k puts 16 levels between a sub-block's (32
//! weights) minimum and maximum, about 6 standard deviations apart: a step of `6/15` and a
//! relative RMS of `0.4 / sqrt 12 = 0.115` per weight, activations at 8 bits as for q8_0.

use arpo_core::SamplingParams;
use arpo_model::{GenerationRequest, Qwen2Vl, Qwen2VlConfig, RolloutWeights};
use candle_core::{DType, Device, IndexOp};

use crate::common::*;

/// Relative RMS error of one quantized linear's output (weight and activation rounding).
fn per_linear_error(weights: RolloutWeights) -> f64 {
    let per_operand = match weights {
        RolloutWeights::F32 => 0.0,
        RolloutWeights::Bf16 => 2f64.powi(-7) / 12f64.sqrt(),
        RolloutWeights::Q8_0 => 3.0 / (127.0 * 12f64.sqrt()),
        RolloutWeights::Q4K => {
            let w = 6.0 / 15.0 / 12f64.sqrt();
            let a = 3.0 / (127.0 * 12f64.sqrt());
            return (w * w + a * a).sqrt();
        }
    };
    2f64.sqrt() * per_operand
}

fn log_softmax(z: &[f32]) -> Vec<f64> {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 - lse).collect()
}

fn top2(z: &[f32]) -> (usize, f64) {
    let mut idx: Vec<usize> = (0..z.len()).collect();
    idx.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    (idx[0], (z[idx[0]] - z[idx[1]]) as f64)
}

/// What one prompt showed, and the worst errors as fractions of their bounds.
#[derive(Debug, Default)]
struct Seen {
    /// Greedy tokens equal to f32's before the first that differs.
    tokens_matched: usize,
    /// Positions (teacher-forced) where f32's top-2 margin exceeds the bound: argmax checked.
    clear_positions: usize,
    worst_logit_ratio: f64,
    worst_logprob_ratio: f64,
    /// KL(sampler || learner) per position, mean and max (reported, not bounded).
    mean_kl: f64,
    max_kl: f64,
}

/// Greedy generation of `n` tokens with the f32 model and the copy, then both models scored on
/// the prompt + f32's tokens (teacher forcing: the positions line up even where greedy parts).
fn compare(
    model: &Qwen2Vl,
    rollout: &Qwen2Vl,
    weights: RolloutWeights,
    req: &GenerationRequest,
    n: usize,
    what: &str,
) -> Seen {
    let summary = rollout.rollout_summary();
    let quantized = summary.quantized;
    assert!(quantized > 0, "{what}: nothing was quantized");
    // A bf16 copy also takes each vision block's two attention products in bf16: two more
    // products with both operands rounded per block.
    let attention = if weights == RolloutWeights::Bf16 {
        2 * rollout.config.vision.depth
    } else {
        0
    };
    let roundings = quantized + usize::from(summary.compact_embedding) + attention;
    let e = per_linear_error(weights) * (roundings as f64).sqrt();
    let greedy = SamplingParams::greedy(n);
    let (f, _) = model
        .generate(std::slice::from_ref(req), &greedy, &[])
        .unwrap();
    let (q, _) = rollout
        .generate(std::slice::from_ref(req), &greedy, &[])
        .unwrap();
    let (f, q) = (&f[0], &q[0]);
    assert_eq!(f.token_ids.len(), n);
    let mut ids = req.input_ids.clone();
    ids.extend_from_slice(&f.token_ids[..n - 1]);
    let pv = req.pixel_values.as_ref();
    let lf = model.forward(&ids, pv, &req.grid_thw).unwrap();
    let lq = rollout.forward(&ids, pv, &req.grid_thw).unwrap();
    let p0 = req.input_ids.len() - 1;
    // Greedy parts from f32 at its first differing token, and only where f32 was unsure.
    let parted = (0..n)
        .find(|&t| q.token_ids[t] != f.token_ids[t])
        .unwrap_or(n);
    let mut seen = Seen {
        tokens_matched: parted,
        ..Seen::default()
    };
    for t in 0..n {
        let zf = lf.i(p0 + t).unwrap().to_vec1::<f32>().unwrap();
        let zq = lq.i(p0 + t).unwrap().to_vec1::<f32>().unwrap();
        let rms = (zf.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / zf.len() as f64).sqrt();
        let max_dz = 5.0 * e * rms;
        let worst_dz = zf
            .iter()
            .zip(&zq)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        assert!(
            worst_dz <= max_dz,
            "{what} step {t}: logits moved by {worst_dz:.4}, bound {max_dz:.4} (rms {rms:.3})"
        );
        let tok = f.token_ids[t] as usize;
        let dlp = (log_softmax(&zf)[tok] - log_softmax(&zq)[tok]).abs();
        assert!(
            dlp <= 2.0 * max_dz,
            "{what} step {t}: log-prob of token {tok} moved by {dlp:.4}, bound {:.4}",
            2.0 * max_dz
        );
        let (lpf, lpq) = (log_softmax(&zf), log_softmax(&zq));
        let kl: f64 = lpq.iter().zip(&lpf).map(|(q, f)| q.exp() * (q - f)).sum();
        seen.mean_kl += kl / n as f64;
        seen.max_kl = seen.max_kl.max(kl);
        seen.worst_logit_ratio = seen.worst_logit_ratio.max(worst_dz / max_dz);
        seen.worst_logprob_ratio = seen.worst_logprob_ratio.max(dlp / (2.0 * max_dz));
        let (arg, margin) = top2(&zf);
        assert_eq!(
            arg, tok,
            "{what} step {t}: f32 greedy is the argmax of its logits"
        );
        let clear = margin > 2.0 * max_dz;
        if clear {
            seen.clear_positions += 1;
            assert_eq!(
                top2(&zq).0,
                tok,
                "{what} step {t}: the copy's argmax differs with f32's margin {margin:.4} > {:.4}",
                2.0 * max_dz
            );
        }
        if t == parted {
            assert!(
                !clear,
                "{what}: greedy parted from f32 at step {t}, where f32's margin {margin:.4} exceeds {:.4}",
                2.0 * max_dz
            );
        }
        if t < parted {
            // The sampler's own reported log-prob, on the same prefix.
            assert!(
                (q.logprobs[t] as f64 - f.logprobs[t] as f64).abs() <= 2.0 * max_dz,
                "{what} step {t}: reported log-probs {} vs {}",
                q.logprobs[t],
                f.logprobs[t]
            );
        }
    }
    seen
}

fn tiny_qwen2vl_requests() -> Vec<(String, GenerationRequest)> {
    let golden = golden();
    ["text_only", "one_image", "two_images"]
        .into_iter()
        .map(|case| {
            let g = &golden["cases"][case];
            let t = case_tensors(case);
            let req = GenerationRequest {
                input_ids: ids(&g["input_ids"]),
                pixel_values: t.get("pixel_values").cloned(),
                grid_thw: grids(&g["grid_thw"]),
            };
            (format!("tiny-qwen2vl {case}"), req)
        })
        .collect()
}

/// The trained tiny base on UI-TARS prompts (its own chat template, one screenshot each).
fn tiny_base_requests() -> (Qwen2Vl, Vec<(String, GenerationRequest)>) {
    use arpo_core::protocol::{PromptConfig, build_messages};
    use arpo_core::{AgentContext, Screenshot};
    let dir = fixtures().join("uitars-tiny-base");
    let model = arpo_model::UiTars::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let shot = |name: &str| {
        let bytes = std::fs::read(golden_dir().join("images").join(name)).unwrap();
        let img = arpo_model::processor::decode_image(&bytes).unwrap();
        Screenshot::new(bytes, img.width(), img.height())
    };
    let reqs = [
        ("Open the file menu", "a_56x84.png"),
        ("Close the window", "d_300x200.png"),
    ]
    .into_iter()
    .map(|(instruction, image)| {
        let ctx = AgentContext {
            instruction: instruction.into(),
            screenshots: vec![shot(image)],
            responses: vec![],
        };
        let messages = build_messages(&ctx, &PromptConfig::default());
        (
            format!("uitars-tiny-base {instruction:?}"),
            model.prepare(&messages).unwrap(),
        )
    })
    .collect();
    (model.model, reqs)
}

fn check_all(
    model: &Qwen2Vl,
    reqs: &[(String, GenerationRequest)],
    weights: RolloutWeights,
    n: usize,
) {
    let rollout = model.to_rollout(weights).unwrap();
    for (what, req) in reqs {
        let seen = compare(
            model,
            &rollout,
            weights,
            req,
            n,
            &format!("{what} {weights}"),
        );
        eprintln!(
            "{what} {weights}: greedy equal for {} of {n} tokens, {} clear-margin positions, worst logit error {:.2} of its bound, worst log-prob error {:.2} of its bound, KL(sampler||learner) mean {:.2e} max {:.2e}",
            seen.tokens_matched,
            seen.clear_positions,
            seen.worst_logit_ratio,
            seen.worst_logprob_ratio,
            seen.mean_kl,
            seen.max_kl
        );
        // Not vacuous: every prompt has positions where the argmax is checked.
        assert!(
            seen.clear_positions > 0,
            "{what} {weights}: no position had a clear margin"
        );
    }
}

#[test]
fn q8_0_rollouts_match_f32_within_the_rounding_bound_on_the_tiny_base() {
    let (model, reqs) = tiny_base_requests();
    check_all(&model, &reqs, RolloutWeights::Q8_0, 12);
}

#[test]
fn q8_0_and_bf16_rollouts_match_f32_within_the_rounding_bound_on_tiny_qwen2vl() {
    let model = Qwen2Vl::load(&model_dir(), DType::F32, &Device::Cpu).unwrap();
    let reqs = tiny_qwen2vl_requests();
    for weights in [RolloutWeights::Q8_0, RolloutWeights::Bf16] {
        check_all(&model, &reqs, weights, 12);
    }
}

#[test]
fn the_rollout_copy_leaves_the_learner_exact_and_refuses_to_be_quantized_twice() {
    let model = Qwen2Vl::load(&model_dir(), DType::F32, &Device::Cpu).unwrap();
    let before = model.forward(&[1, 2, 3, 4], None, &[]).unwrap();
    let rollout = model.to_rollout(RolloutWeights::Q8_0).unwrap();
    let after = model.forward(&[1, 2, 3, 4], None, &[]).unwrap();
    assert_close("learner after to_rollout", &after, &before, 0.0, 0.0);
    let s = rollout.rollout_summary();
    // tiny-qwen2vl: 112-wide down_proj (2 layers) and the 1176-wide patch embedding stay f32.
    assert_eq!(s.kept, 3, "{s:?}");
    assert!(model.rollout_summary().quantized == 0);
    assert!(
        s.linear_bytes * 2 < model.rollout_summary().linear_bytes,
        "{s:?}"
    );
    assert!(matches!(
        rollout.to_rollout(RolloutWeights::Q4K),
        Err(arpo_model::ModelError::Quantize { .. })
    ));
    // F32 is the learner itself (shared tensors, same numbers).
    let same = model.to_rollout(RolloutWeights::F32).unwrap();
    let y = same.forward(&[1, 2, 3, 4], None, &[]).unwrap();
    assert_close("f32 rollout copy", &y, &before, 0.0, 0.0);
}

/// q4k needs 256-wide inputs: a random model of that width (seeded), text only.
#[test]
fn q4k_rollouts_match_f32_within_the_rounding_bound_on_a_256_wide_model() {
    let mut config = Qwen2VlConfig::from_file(&model_dir().join("config.json")).unwrap();
    config.text.hidden_size = 256;
    config.text.intermediate_size = 512;
    // head_dim 16 as in the fixture (its mrope_section), the merger feeding 256 wide.
    config.text.num_attention_heads = 16;
    config.text.num_key_value_heads = 2;
    config.vision.hidden_size = 256;
    let model = Qwen2Vl::random_seeded(config, DType::F32, &Device::Cpu, 3).unwrap();
    let rollout = model.to_rollout(RolloutWeights::Q4K).unwrap();
    let s = rollout.rollout_summary();
    assert!(s.quantized >= 14, "{s:?}");
    let req = GenerationRequest {
        input_ids: (1..40).collect(),
        pixel_values: None,
        grid_thw: vec![],
    };
    let seen = compare(
        &model,
        &rollout,
        RolloutWeights::Q4K,
        &req,
        8,
        "random 256-wide q4k",
    );
    eprintln!("random 256-wide q4k: {seen:?}");
}

/// LoRA on a quantized base: the copy shares the learner's adapter variables, so an update of
/// them reaches the copy without rebuilding it (the frozen base never changes).
#[test]
fn a_lora_update_reaches_the_q8_0_copy_without_rebuilding_it() {
    use arpo_model::train::lora::LoraConfig;
    use arpo_model::train::trainable::Trainable;
    let (model, reqs) = tiny_base_requests();
    let trainable = Trainable::lora(
        model,
        LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        },
    )
    .unwrap();
    let rollout = trainable.model.to_rollout(RolloutWeights::Q8_0).unwrap();
    let (_, req) = &reqs[0];
    let pv = req.pixel_values.as_ref();
    let logits = |m: &Qwen2Vl| m.forward(&req.input_ids, pv, &req.grid_thw).unwrap();
    let before = logits(&rollout);
    // An "update": B starts at zero (no change); give every B values.
    let mut updated = 0;
    for (name, var) in trainable.vars() {
        if name.contains("lora_B") {
            // Deterministic values (0.05 sin(0.37 i)): an unseeded draw made the update's size,
            // and so this test, vary from run to run.
            let n = var.elem_count() as u32;
            let b = candle_core::Tensor::arange(0u32, n, var.device())
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.affine(0.37, 0.0))
                .and_then(|t| t.sin())
                .and_then(|t| t.affine(0.05, 0.0))
                .and_then(|t| t.reshape(var.shape()))
                .unwrap();
            var.set(&b).unwrap();
            updated += 1;
        }
    }
    assert!(
        updated > 0,
        "no LoRA B found in {:?}",
        trainable.vars().len()
    );
    let (want, got) = (logits(&trainable.model), logits(&rollout));
    let e = per_linear_error(RolloutWeights::Q8_0)
        * ({
            let s = rollout.rollout_summary();
            (s.quantized + usize::from(s.compact_embedding)) as f64
        })
        .sqrt();
    let last = want.dim(0).unwrap() - 1;
    let zf = want.i(last).unwrap().to_vec1::<f32>().unwrap();
    let rms = (zf.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / zf.len() as f64).sqrt();
    let bound = 5.0 * e * rms;
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a.i(last).unwrap() - b.i(last).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    assert!(
        diff(&got, &want) <= bound,
        "copy vs learner after the update"
    );
    assert!(
        diff(&got, &before) > bound,
        "the copy did not follow the update beyond the rounding"
    );
}

/// `load_rollout` reads the checkpoint a tensor at a time and quantizes as it goes: the copy
/// is the one `load` + `to_rollout` makes (the same roundings of the same f32 weights), for a
/// tied (tiny-qwen2vl) and an untied (tiny-qwen25vl) model.
#[test]
fn loading_straight_into_a_rollout_copy_equals_converting_a_loaded_model() {
    for (dir, weights) in [
        (model_dir(), RolloutWeights::Q8_0),
        (model_dir(), RolloutWeights::Bf16),
        (fixtures().join("tiny-qwen25vl"), RolloutWeights::Q8_0),
    ] {
        let what = format!("{} {weights}", dir.display());
        let learner = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let converted = learner.to_rollout(weights).unwrap();
        let loaded = Qwen2Vl::load_rollout(&dir, weights, &Device::Cpu).unwrap();
        assert_eq!(
            loaded.rollout_summary(),
            converted.rollout_summary(),
            "{what}"
        );
        assert!(loaded.rollout_summary().compact_embedding, "{what}");
        let ids = [1, 2, 3, 4, 5];
        let want = converted.forward(&ids, None, &[]).unwrap();
        let got = loaded.forward(&ids, None, &[]).unwrap();
        assert_close(&what, &got, &want, 0.0, 0.0);
    }
}

/// The compact embedding: a tied model under q8_0 reads its rows from `lm_head`'s own q8_0
/// tensor (held once), each within the q8_0 rounding of the f32 row: half a step
/// `d = max|block| / 127` (the scale `d` itself rounded to f16 adds `2^-11` of the value).
#[test]
fn compact_embedding_rows_are_the_f32_rows_within_one_rounding() {
    let learner = Qwen2Vl::load(&model_dir(), DType::F32, &Device::Cpu).unwrap();
    assert!(learner.text.tied);
    let rollout = learner.to_rollout(RolloutWeights::Q8_0).unwrap();
    match (&rollout.text.embed_compact, &rollout.text.lm_head.quantized) {
        (Some(arpo_model::text::CompactEmbedding::Quantized(e)), Some(head)) => {
            assert!(e.same_storage(head), "held once");
        }
        other => panic!("expected q8_0 rows shared with lm_head, got {other:?}"),
    }
    let ids: Vec<u32> = (0..learner.config.text.vocab_size as u32)
        .step_by(7)
        .collect();
    let want = learner.text.embed(&ids).unwrap().to_vec2::<f32>().unwrap();
    let got = rollout.text.embed(&ids).unwrap().to_vec2::<f32>().unwrap();
    for (w, g) in want.iter().zip(&got) {
        for (wb, gb) in w.chunks(32).zip(g.chunks(32)) {
            let d = wb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in wb.iter().zip(gb) {
                let bound = d / 2.0 + a.abs() * 2f32.powi(-11) + 1e-7;
                assert!((a - b).abs() <= bound, "{a} vs {b} (bound {bound})");
            }
        }
    }
    // bf16 rows: the nearest bf16 of each value (relative error at most 2^-8).
    let bf = learner.to_rollout(RolloutWeights::Bf16).unwrap();
    let got = bf.text.embed(&ids).unwrap().to_vec2::<f32>().unwrap();
    for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
        assert_eq!(*g, half::bf16::from_f32(*w).to_f32());
    }
}

/// A truncated checkpoint is refused at load with the file and the tensor named, not read as
/// garbage.
#[test]
fn a_truncated_checkpoint_is_refused_by_the_streaming_load() {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(model_dir()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let err = Qwen2Vl::load_rollout(tmp.path(), RolloutWeights::Q8_0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("inside the file"),
        "{err}"
    );
}

/// Full fine-tuning changes every weight: `refresh_from` stores the learner's new weights in
/// the rollout copy and in every clone of it (the policy's), which then computes exactly what a
/// copy made afresh from the updated learner computes; before the refresh it does not. For a
/// tied (tiny-qwen2vl: q8_0 rows shared with lm_head) and an untied model (tiny-qwen25vl: its
/// own q8_0 table), and for bf16.
#[test]
fn a_refreshed_copy_follows_a_full_fine_tuning_update_exactly() {
    use arpo_model::train::trainable::Trainable;
    for (dir, weights) in [
        (model_dir(), RolloutWeights::Q8_0),
        (model_dir(), RolloutWeights::Bf16),
        (fixtures().join("tiny-qwen25vl"), RolloutWeights::Q8_0),
    ] {
        let what = format!("{} {weights}", dir.display());
        let model = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let learner = Trainable::full(model, false).unwrap();
        let copy = learner.model.to_rollout(weights).unwrap();
        let policy_side = copy.clone();
        let ids = [3, 1, 4, 1, 5, 9, 2, 6];
        let before = policy_side.forward(&ids, None, &[]).unwrap();
        // An "update": every trained tensor moves.
        for (_, v) in learner.vars() {
            let moved = ((v.as_tensor() * 1.05).unwrap() + 0.01).unwrap();
            v.set(&moved).unwrap();
        }
        let stale = policy_side.forward(&ids, None, &[]).unwrap();
        let fresh = learner.model.to_rollout(weights).unwrap();
        let want = fresh.forward(&ids, None, &[]).unwrap();
        assert!(
            max_abs_diff(&stale, &want) > 1e-3,
            "{what}: the update matters"
        );
        assert!(
            max_abs_diff(&stale, &before) > 0.0,
            "{what}: norms and biases are shared"
        );
        copy.refresh_from(&learner.model).unwrap();
        let got = policy_side.forward(&ids, None, &[]).unwrap();
        assert_close(&what, &got, &want, 0.0, 0.0);
    }
}

//! Full fine-tuning of the tiny Qwen2-VL against PyTorch: gradient parity (golden values made by
//! `fixtures/scripts/make_train_golden.py` with HF transformers), frozen parts, learning, and
//! checkpoint round trips.

use std::collections::HashMap;
use std::path::PathBuf;

use arpo_model::Qwen2Vl;
use arpo_model::train::optim::{AdamW, AdamWConfig};
use arpo_model::train::score::Episode;
use arpo_model::train::trainable::Trainable;
use candle_core::{DType, Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model_dir() -> PathBuf {
    root().join("models/tiny-qwen2vl")
}

fn golden() -> (serde_json::Value, HashMap<String, Tensor>) {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("train/episode.json")).expect("episode.json"),
    )
    .expect("json");
    let tensors =
        candle_core::safetensors::load(root().join("train/episode.safetensors"), &Device::Cpu)
            .expect("episode.safetensors");
    (meta, tensors)
}

fn golden_episode(meta: &serde_json::Value, tensors: &HashMap<String, Tensor>) -> Episode {
    let ids: Vec<u32> = serde_json::from_value(meta["input_ids"].clone()).expect("ids");
    let mask: Vec<u8> = serde_json::from_value(meta["assistant_mask"].clone()).expect("mask");
    let grids: Vec<[usize; 3]> = serde_json::from_value(meta["grid_thw"].clone()).expect("grid");
    Episode {
        input_ids: ids,
        assistant_mask: mask.iter().map(|&m| m == 1).collect(),
        pixel_values: Some(tensors["pixel_values"].clone()),
        grid_thw: grids,
    }
}

fn load_model() -> Qwen2Vl {
    Qwen2Vl::load(&model_dir(), DType::F32, &Device::Cpu).expect("tiny model")
}

/// ||a - b|| / ||b||
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).expect("f64");
    let b = b.to_dtype(DType::F64).expect("f64");
    let num = (&a - &b)
        .and_then(|d| d.sqr())
        .and_then(|d| d.sum_all())
        .and_then(|d| d.to_scalar::<f64>())
        .expect("num");
    let den = b
        .sqr()
        .and_then(|d| d.sum_all())
        .and_then(|d| d.to_scalar::<f64>())
        .expect("den");
    (num / den).sqrt()
}

fn abs_sum(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.abs())
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_scalar::<f64>())
        .expect("abs sum")
}

#[test]
fn summed_logprob_and_gradients_match_pytorch() {
    full_gradients_match_pytorch(false, None);
}

/// Gradient checkpointing (decoder layers and vision blocks recomputed in the backward pass)
/// gives PyTorch's gradients too, for every parameter, vision tower included.
#[test]
fn gradients_with_gradient_checkpointing_match_pytorch() {
    full_gradients_match_pytorch(true, None);
}

/// Every position-wise part of a recomputed layer (the q/k/v projections with the rotary, the
/// output projection and the MLP) in checkpointed chunks of rows (here 7, so the golden episode
/// is split into several, the last one short): still PyTorch's gradients for every parameter.
#[test]
fn gradients_with_chunked_recompute_match_pytorch() {
    full_gradients_match_pytorch(true, Some(7));
}

fn full_gradients_match_pytorch(checkpointing: bool, chunk: Option<usize>) {
    let (meta, tensors) = golden();
    let episode = golden_episode(&meta, &tensors);
    let mut trainable = Trainable::full(load_model(), false).expect("trainable");
    trainable.set_gradient_checkpointing(checkpointing);
    if let Some(rows) = chunk {
        assert!(
            episode.input_ids.len() > 2 * rows,
            "the episode spans several chunks"
        );
        trainable.model.text.recompute_chunk = rows;
    }
    let score = trainable.score(&episode).expect("score");
    let total = score
        .sum()
        .expect("sum")
        .to_scalar::<f32>()
        .expect("scalar") as f64;
    let want = meta["full"]["sum_logprob"].as_f64().expect("golden sum");
    assert!(
        (total - want).abs() <= 1e-4 * want.abs(),
        "sum logp {total} vs {want}"
    );

    // Per-token log-probs and entropies at the scored positions (golden is over positions 1..L).
    let lp: Vec<f32> = score.log_probs.to_vec1().expect("lp");
    let golden_lp: Vec<f64> =
        serde_json::from_value(meta["full"]["token_logprobs"].clone()).expect("lp");
    let golden_h: Vec<f64> =
        serde_json::from_value(meta["full"]["token_entropy"].clone()).expect("h");
    assert_eq!(score.positions.len(), 19);
    for (k, &t) in score.positions.iter().enumerate() {
        assert!(
            (lp[k] as f64 - golden_lp[t - 1]).abs() < 1e-4,
            "logp at {t}"
        );
        assert!(
            (score.entropy[k] as f64 - golden_h[t - 1]).abs() < 1e-4,
            "entropy at {t}"
        );
    }

    let grads =
        arpo_model::train::recompute::backward(&score.sum().expect("sum")).expect("backward");
    let vars: HashMap<&str, _> = trainable
        .vars()
        .iter()
        .map(|(n, v)| (n.as_str(), v))
        .collect();
    let recorded: Vec<String> = serde_json::from_value(meta["recorded"].clone()).expect("recorded");
    for name in &recorded {
        let g = grads
            .get(vars[name.as_str()].as_tensor())
            .expect("gradient present");
        let want = &tensors[&format!("full.grad.{name}")];
        assert_eq!(g.dims(), want.dims(), "{name}");
        let e = rel_err(g, want);
        assert!(e < 1e-4, "gradient of {name}: relative error {e}");
    }
    // Every trainable parameter gets a non-zero gradient.
    for (name, var) in trainable.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(abs_sum(g) > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn frozen_vision_tower_gets_no_gradient_and_no_gradstore_entry() {
    let (meta, tensors) = golden();
    let episode = golden_episode(&meta, &tensors);
    let trainable = Trainable::full(load_model(), true).expect("trainable");
    assert!(
        trainable
            .vars()
            .iter()
            .all(|(n, _)| !n.starts_with("visual.") || n.starts_with("visual.merger."))
    );
    let frozen: Vec<(String, Tensor)> = trainable
        .model
        .parameters()
        .into_iter()
        .filter(|(n, _)| n.starts_with("visual.") && !n.starts_with("visual.merger."))
        .collect();
    assert!(!frozen.is_empty());
    let grads = trainable
        .score(&episode)
        .and_then(|s| s.sum())
        .expect("score")
        .backward()
        .expect("backward");
    for (name, t) in &frozen {
        assert!(
            grads.get(t).is_none(),
            "frozen {name} has a GradStore entry"
        );
    }
    let recorded = [
        "visual.merger.mlp.0.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ];
    let vars: HashMap<&str, _> = trainable
        .vars()
        .iter()
        .map(|(n, v)| (n.as_str(), v))
        .collect();
    for name in recorded {
        // Freezing the tower does not change the gradients of what is downstream of it.
        let g = grads.get(vars[name].as_tensor()).expect("grad");
        let e = rel_err(g, &tensors[&format!("full.grad.{name}")]);
        assert!(e < 1e-4, "{name}: {e}");
    }
}

/// Four fixed short episodes over the tiny vocabulary, text only (the learning tests).
fn sft_episodes() -> Vec<Episode> {
    let mut out = Vec::new();
    for k in 0..4u32 {
        let mut ids = vec![401, 10 + k, 20, 402, 401];
        let mut mask = vec![false; ids.len()];
        let answer = [100 + 7 * k, 101 + 3 * k, 250 - k, 402];
        ids.extend(answer);
        mask.extend([true; 4]);
        out.push(Episode {
            input_ids: ids,
            assistant_mask: mask,
            pixel_values: None,
            grid_thw: Vec::new(),
        });
    }
    out
}

fn mean_nll(t: &Trainable, eps: &[Episode]) -> f64 {
    eps.iter()
        .map(|e| {
            t.score(e)
                .and_then(|s| s.mean_nll())
                .expect("score")
                .to_scalar::<f32>()
                .expect("f") as f64
        })
        .sum::<f64>()
        / eps.len() as f64
}

#[test]
fn one_step_lowers_the_loss_and_fifty_sft_steps_fit_four_episodes() {
    let eps = sft_episodes();
    let trainable = Trainable::full(load_model(), true).expect("trainable");
    let cfg = AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(trainable.vars().to_vec(), cfg).expect("opt");
    let start = mean_nll(&trainable, &eps);
    // ln(414) ~ 6.03 for a near-uniform random model.
    assert!(start > 4.0, "start {start}");
    let mut after_first = None;
    for step in 0..50 {
        for e in &eps {
            let loss = (trainable
                .score(e)
                .and_then(|s| s.mean_nll())
                .expect("score")
                / eps.len() as f64)
                .expect("scale");
            opt.accumulate(&loss.backward().expect("backward"))
                .expect("acc");
        }
        let report = opt.step().expect("step");
        assert!(!report.skipped);
        if step == 0 {
            after_first = Some(mean_nll(&trainable, &eps));
        }
    }
    let first = after_first.expect("first");
    assert!(first < start, "one step: {start} -> {first}");
    let end = mean_nll(&trainable, &eps);
    assert!(end < 0.05, "after 50 steps the NLL is {end} (from {start})");
}

#[test]
fn saved_checkpoint_loads_with_identical_logits_and_optimizer_state() {
    let (meta, tensors) = golden();
    let episode = golden_episode(&meta, &tensors);
    let trainable = Trainable::full(load_model(), false).expect("trainable");
    // Move the weights away from the fixture so the round trip is not trivially the source.
    let mut opt = AdamW::new(
        trainable.vars().to_vec(),
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .expect("opt");
    let loss = trainable
        .score(&episode)
        .and_then(|s| s.mean_nll())
        .expect("loss");
    opt.accumulate(&loss.backward().expect("bwd")).expect("acc");
    opt.step().expect("step");

    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("epoch_1");
    trainable
        .save(&dest, &model_dir(), Some(&opt))
        .expect("save");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.safetensors",
    ] {
        assert!(dest.join(f).is_file(), "{f} missing");
    }
    let reloaded = Qwen2Vl::load(&dest, DType::F32, &Device::Cpu).expect("reload");
    // Trainable again, so that both run the same (training) path: a frozen vision tower would
    // run as inference, equal to 1e-6 but not bit for bit.
    let fresh = Trainable::full(reloaded, false).expect("t");
    let ids = &episode.input_ids;
    let a = trainable
        .model
        .forward(ids, episode.pixel_values.as_ref(), &episode.grid_thw)
        .expect("a");
    let b = fresh
        .model
        .forward(ids, episode.pixel_values.as_ref(), &episode.grid_thw)
        .expect("b");
    let diff = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert_eq!(diff, 0.0, "logits differ after save/load");

    let mut opt2 = AdamW::new(
        fresh.vars().to_vec(),
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .expect("opt");
    Trainable::load_optimizer(&dest, &mut opt2).expect("load opt");
    assert_eq!(opt2.step_count(), 1);
}

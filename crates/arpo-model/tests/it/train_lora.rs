//! LoRA on the tiny Qwen2-VL against peft: the summed assistant-token log-prob and the gradients
//! of every adapter (golden values made by `fixtures/scripts/make_train_golden.py` with
//! transformers + peft, fixed non-zero init), a frozen base with no gradient, and the adapter's
//! save → load and merge round trips.

use std::collections::HashMap;
use std::path::PathBuf;

use arpo_model::Qwen2Vl;
use arpo_model::train::lora::LoraConfig;
use arpo_model::train::score::Episode;
use arpo_model::train::trainable::Trainable;
use candle_core::{DType, Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
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

fn model() -> Qwen2Vl {
    Qwen2Vl::load(
        &root().join("models/tiny-qwen2vl"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("tiny model")
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).expect("f64") - b.to_dtype(DType::F64).expect("f64"))
        .expect("diff");
    let num = d
        .sqr()
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_scalar::<f64>());
    let den = b
        .to_dtype(DType::F64)
        .and_then(|t| t.sqr())
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_scalar::<f64>());
    (num.expect("num") / den.expect("den")).sqrt()
}

/// A LoRA trainable with peft's r 4 / alpha 8 on the decoder projections and the golden init.
fn golden_lora(meta: &serde_json::Value, tensors: &HashMap<String, Tensor>) -> Trainable {
    let r = meta["lora"]["r"].as_u64().expect("r") as usize;
    let alpha = meta["lora"]["alpha"].as_f64().expect("alpha");
    let trainable = Trainable::lora(
        model(),
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            ..LoraConfig::default()
        },
    )
    .expect("lora");
    let set = trainable.lora_set().expect("a lora set");
    let modules: Vec<String> =
        serde_json::from_value(meta["lora"]["modules"].clone()).expect("modules");
    let mut ours: Vec<String> = set.adapters().keys().cloned().collect();
    ours.sort();
    assert_eq!(ours, modules, "the adapted modules are peft's");
    for (module, adapter) in set.adapters() {
        adapter
            .a
            .set(&tensors[&format!("lora.init.{module}.lora_A.weight")])
            .expect("set A");
        adapter
            .b
            .set(&tensors[&format!("lora.init.{module}.lora_B.weight")])
            .expect("set B");
    }
    trainable
}

#[test]
fn lora_logprob_and_adapter_gradients_match_peft() {
    lora_gradients_match_peft(false, None);
}

/// Gradient checkpointing recomputes every layer in the backward pass: the same gradients.
#[test]
fn lora_gradients_with_gradient_checkpointing_match_peft() {
    lora_gradients_match_peft(true, None);
}

/// Checkpointed chunks of 7 rows (q/k/v with the rotary, the output projection and the MLP)
/// nested in the recomputed layers: PEFT's gradients too.
#[test]
fn lora_gradients_with_chunked_recompute_match_peft() {
    lora_gradients_match_peft(true, Some(7));
}

fn lora_gradients_match_peft(checkpointing: bool, chunk: Option<usize>) {
    let (meta, tensors) = golden();
    let episode = golden_episode(&meta, &tensors);
    let mut trainable = golden_lora(&meta, &tensors);
    trainable.set_gradient_checkpointing(checkpointing);
    if let Some(rows) = chunk {
        assert!(
            episode.input_ids.len() > 2 * rows,
            "the episode spans several chunks"
        );
        trainable.model.text.recompute_chunk = rows;
    }
    let score = trainable.score(&episode).expect("score");
    let total = f64::from(
        score
            .sum()
            .and_then(|s| Ok(s.to_scalar::<f32>()?))
            .expect("sum"),
    );
    let want = meta["lora"]["sum_logprob"].as_f64().expect("golden");
    assert!(
        (total - want).abs() <= 1e-4 * want.abs(),
        "sum logp {total} vs peft {want}"
    );
    let lp: Vec<f32> = score.log_probs.to_vec1().expect("lp");
    let golden_lp: Vec<f64> =
        serde_json::from_value(meta["lora"]["token_logprobs"].clone()).expect("lp");
    for (k, &t) in score.positions.iter().enumerate() {
        assert!(
            (f64::from(lp[k]) - golden_lp[t - 1]).abs() < 1e-4,
            "logp at {t}"
        );
    }

    let grads =
        arpo_model::train::recompute::backward(&score.sum().expect("sum")).expect("backward");
    let mut checked = 0;
    for (name, var) in trainable.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let want = &tensors[&format!("lora.grad.{name}")];
        let e = rel_err(g, want);
        assert!(e < 1e-4, "gradient of {name}: relative error {e}");
        checked += 1;
    }
    assert_eq!(
        checked,
        2 * meta["lora"]["modules"].as_array().expect("modules").len()
    );
    // The base is frozen: no weight of the model has a GradStore entry.
    for (name, t) in trainable.model.parameters() {
        assert!(grads.get(&t).is_none(), "frozen {name} got a gradient");
    }
}

#[test]
fn saved_adapter_loads_back_and_merges_to_the_same_logits() {
    let (meta, tensors) = golden();
    let episode = golden_episode(&meta, &tensors);
    let trainable = golden_lora(&meta, &tensors);
    let logits = |m: &Qwen2Vl| {
        m.forward(
            &episode.input_ids,
            episode.pixel_values.as_ref(),
            &episode.grid_thw,
        )
        .expect("forward")
    };
    let unmerged = logits(&trainable.model);
    let base = logits(&model());
    assert!(
        rel_err(&unmerged, &base) > 1e-3,
        "the adapters change the logits"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let adapter = dir.path().join("adapter");
    trainable
        .save_adapter(&adapter, "tiny-qwen2vl", None)
        .expect("save");
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(adapter.join(f).is_file(), "{f}");
    }
    let loaded = Trainable::lora_from_peft(model(), &adapter, 0).expect("load");
    let e = rel_err(&logits(&loaded.model), &unmerged);
    assert!(e < 1e-6, "loaded adapter: relative error {e}");
    let merged = trainable.merged_model().expect("merge");
    let e = rel_err(&logits(&merged), &unmerged);
    assert!(e < 1e-5, "merged weights: relative error {e}");

    // The full (merged) checkpoint loads as a plain model with the same logits.
    let full = dir.path().join("full");
    trainable
        .save(&full, &root().join("models/tiny-qwen2vl"), None)
        .expect("save merged");
    let reloaded = Qwen2Vl::load(&full, DType::F32, &Device::Cpu).expect("reload");
    let e = rel_err(&logits(&reloaded), &unmerged);
    assert!(e < 1e-5, "merged checkpoint: relative error {e}");
}

/// The other half of the round trip through Python (`fixtures/scripts/check_roundtrip.py`):
/// with `ARPO_ROUNDTRIP_DIR` set, writes our adapter, our merged full checkpoint and their
/// logits there for the script to load in peft and transformers; always, loads the adapter that
/// peft saved (`fixtures/train/peft_resaved/`, written by the script from ours) and checks it
/// gives our logits.
#[test]
fn adapters_saved_by_peft_load_with_our_logits() {
    let (meta, tensors) = golden();
    let episode = golden_episode(&meta, &tensors);
    let trainable = golden_lora(&meta, &tensors);
    let logits = |m: &Qwen2Vl| {
        m.forward(
            &episode.input_ids,
            episode.pixel_values.as_ref(),
            &episode.grid_thw,
        )
        .expect("forward")
    };
    let ours = logits(&trainable.model);
    if let Some(dir) = std::env::var_os("ARPO_ROUNDTRIP_DIR") {
        let dir = PathBuf::from(dir);
        trainable
            .save_adapter(&dir.join("adapter"), "tiny-qwen2vl", None)
            .expect("save adapter");
        trainable
            .save(&dir.join("full"), &root().join("models/tiny-qwen2vl"), None)
            .expect("save full");
        candle_core::safetensors::save(
            &HashMap::from([("logits".to_string(), ours.clone())]),
            dir.join("logits.safetensors"),
        )
        .expect("save logits");
    }
    let resaved = root().join("train/peft_resaved");
    let loaded = Trainable::lora_from_peft(model(), &resaved, 0).expect("peft's adapter loads");
    let e = rel_err(&logits(&loaded.model), &ours);
    assert!(e < 1e-5, "adapter saved by peft: relative error {e}");
}

/// With LoRA dropout on, a recomputed layer must draw the masks of its first run: gradient
/// checkpointing then gives the gradients of the ordinary graph under the same seed.
#[test]
fn gradient_checkpointing_replays_lora_dropout_masks() {
    let (meta, tensors) = golden();
    let episode = golden_episode(&meta, &tensors);
    let run = |checkpointing: bool, dropout_on: bool| {
        let mut trainable = Trainable::lora(
            model(),
            LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.3,
                seed: 7,
                ..LoraConfig::default()
            },
        )
        .expect("lora");
        for adapter in trainable.lora_set().expect("set").adapters().values() {
            // Non-zero B (as after some steps), the same in both runs.
            let n = adapter.b.elem_count();
            let b = Tensor::arange(0f32, n as f32, &candle_core::Device::Cpu)
                .and_then(|t| (t * 0.37)?.sin()? * 0.05)
                .and_then(|t| t.reshape(adapter.b.dims()))
                .expect("b");
            adapter.b.set(&b).expect("set B");
        }
        trainable.set_training(dropout_on);
        trainable.set_gradient_checkpointing(checkpointing);
        let score = trainable.score(&episode).expect("score");
        let grads =
            arpo_model::train::recompute::backward(&score.sum().expect("sum")).expect("backward");
        trainable
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).expect("grad").clone()))
            .collect::<Vec<_>>()
    };
    let plain = run(false, true);
    let ckpt = run(true, true);
    for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
        let e = rel_err(b, a);
        assert!(
            e < 1e-5,
            "gradient of {name} differs by {e} under checkpointing"
        );
    }
    // The masks matter: without dropout the gradients are different.
    let no_dropout = run(false, false);
    let moved = plain
        .iter()
        .zip(&no_dropout)
        .map(|((_, a), (_, b))| rel_err(a, b))
        .fold(0.0, f64::max);
    assert!(moved > 1e-2, "dropout changed no gradient ({moved})");
}

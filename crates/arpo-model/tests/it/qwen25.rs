//! Qwen2.5-VL (UI-TARS-1.5's architecture) against HF transformers and peft, on the tiny
//! random-weight model made by `fixtures/scripts/make_tiny_qwen25vl.py`: windowed vision
//! attention (windows that split the images, partial ones at the edges, full-attention blocks),
//! RMSNorm/SwiGLU vision blocks, an untied `lm_head`; position ids, vision features and logits
//! for 0, 1 and 3 images over several turns; greedy tokens alone and batched; the chat template
//! and image processor end to end through `UiTars`; full-model and LoRA gradients.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use arpo_core::{ChatMessage, ContentPart, Role, SamplingParams, Screenshot};
use arpo_model::processor::decode_image;
use arpo_model::train::lora::LoraConfig;
use arpo_model::train::score::Episode;
use arpo_model::train::trainable::Trainable;
use arpo_model::vision::window_layout;
use arpo_model::{GenerationRequest, Qwen2Vl, UiTars};
use candle_core::{DType, Device, Tensor};

const CASES: [&str; 3] = ["text_only", "one_image", "multi_turn"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models")
}

fn model_dir() -> PathBuf {
    fixtures().join("tiny-qwen25vl")
}

fn golden_dir() -> PathBuf {
    fixtures().join("tiny-qwen25vl-golden")
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(golden_dir().join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        golden_dir().join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .expect("golden tensors")
}

fn json<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> T {
    serde_json::from_value(v.clone()).expect("golden field")
}

fn model() -> Qwen2Vl {
    Qwen2Vl::load(&model_dir(), DType::F32, &Device::Cpu).expect("tiny Qwen2.5-VL loads")
}

/// Elementwise `|a - b| <= rtol * |b| + atol`; returns the worst absolute error.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f32, atol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let err = (a - b).abs();
        assert!(
            err <= rtol * b.abs() + atol,
            "{what}: element {i}: got {a}, want {b} (|diff| {err})"
        );
        worst = worst.max(err);
    }
    worst
}

/// ||a - b|| / ||b||
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (num / den).sqrt()
}

#[test]
fn config_is_qwen25_with_windows_and_full_attention_blocks() {
    let m = model();
    assert!(m.config.is_qwen25());
    assert_eq!(m.config.vision.window_merged(), Some(2));
    let windowed: Vec<bool> = (0..3).map(|i| m.config.vision.windowed_block(i)).collect();
    assert_eq!(windowed, [true, false, true]);
    assert!(!m.text.tied, "the fixture's lm_head is untied");
}

#[test]
fn window_layout_matches_transformers_windows() {
    let golden = golden();
    for case in CASES {
        let g = &golden["cases"][case];
        let grids: Vec<[usize; 3]> = json(&g["grid_thw"]);
        let want: Vec<Vec<usize>> = json(&g["window_tokens"]);
        let (order, lengths) = window_layout(&grids, 2, 2);
        assert_eq!(lengths, want.concat(), "{case}: window lengths");
        // A permutation of the merged tokens.
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..order.len() as u32).collect::<Vec<_>>(),
            "{case}"
        );
    }
    // 3x5 merged tokens in 2x2 windows, by hand: rows 0-1 then row 2; columns 0-1, 2-3, 4.
    let (order, lengths) = window_layout(&[[1, 6, 10]], 2, 2);
    assert_eq!(lengths, [4, 4, 2, 2, 2, 1]);
    assert_eq!(order, [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
}

#[test]
fn forward_matches_transformers_for_0_1_3_images() {
    let model = model();
    let golden = golden();
    for case in CASES {
        let g = &golden["cases"][case];
        let input_ids: Vec<u32> = json(&g["input_ids"]);
        let grid: Vec<[usize; 3]> = json(&g["grid_thw"]);
        let t = tensors(case);

        let rope = model.rope_index(&input_ids, &grid).unwrap();
        let want_pos = t["position_ids"].to_vec2::<i64>().unwrap();
        for (axis, want) in want_pos.iter().enumerate() {
            assert_eq!(&rope.positions[axis], want, "{case}: positions axis {axis}");
        }
        assert_eq!(
            rope.delta,
            t["rope_delta"].to_vec1::<i64>().unwrap()[0],
            "{case}: delta"
        );

        let pv = t.get("pixel_values");
        if let Some(pv) = pv {
            let feats = model.image_features(pv, &grid).unwrap();
            let worst = assert_close(
                &format!("{case}: vision features"),
                &feats,
                &t["vision_features"],
                1e-4,
                1e-5,
            );
            eprintln!("{case}: worst vision feature error {worst:e}");
        }
        let logits = model.forward(&input_ids, pv, &grid).unwrap();
        let worst = assert_close(
            &format!("{case}: logits"),
            &logits,
            &t["logits"],
            1e-4,
            1e-5,
        );
        eprintln!("{case}: worst logit error {worst:e}");
    }
}

fn request(case: &str) -> (GenerationRequest, Vec<u32>) {
    let golden = golden();
    let g = &golden["cases"][case];
    (
        GenerationRequest {
            input_ids: json(&g["input_ids"]),
            pixel_values: tensors(case).get("pixel_values").cloned(),
            grid_thw: json(&g["grid_thw"]),
        },
        json(&g["greedy_tokens"]),
    )
}

#[test]
fn greedy_generation_matches_transformers_alone_and_batched() {
    let model = model();
    let mut requests = Vec::new();
    let mut wants = Vec::new();
    for case in CASES {
        let (req, want) = request(case);
        let (out, _) = model
            .generate(
                std::slice::from_ref(&req),
                &SamplingParams::greedy(want.len()),
                &[],
            )
            .unwrap();
        assert_eq!(out[0].token_ids, want, "{case}: greedy tokens alone");
        requests.push(req);
        wants.push(want);
    }
    let (out, _) = model
        .generate(&requests, &SamplingParams::greedy(12), &[])
        .unwrap();
    for (o, w) in out.iter().zip(&wants) {
        assert_eq!(&o.token_ids, w, "batched greedy tokens");
    }
}

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(golden_dir().join("images").join(name)).expect("fixture image")
}

fn messages(case: &serde_json::Value) -> Vec<ChatMessage> {
    let mut images = case["images"].as_array().unwrap().iter();
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            let content = m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "text" => ContentPart::Text {
                        text: p["text"].as_str().unwrap().to_string(),
                    },
                    _ => {
                        let name = images.next().unwrap().as_str().unwrap();
                        let img = decode_image(&image_bytes(name)).unwrap();
                        ContentPart::Image {
                            image: Screenshot::new(image_bytes(name), img.width(), img.height()),
                        }
                    }
                })
                .collect();
            ChatMessage { role, content }
        })
        .collect()
}

/// The whole path a server or trainer takes: `UiTars` loads the directory, renders the chat
/// template, preprocesses the PNGs and tokenizes; the request is transformers' and so are
/// the greedy tokens.
#[test]
fn ui_tars_prepares_transformers_inputs_from_chats_and_images() {
    let golden = golden();
    let ui = UiTars::load(model_dir().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    for case in CASES {
        let g = &golden["cases"][case];
        let req = ui.prepare(&messages(g)).unwrap();
        assert_eq!(
            req.input_ids,
            json::<Vec<u32>>(&g["input_ids"]),
            "{case}: input ids"
        );
        assert_eq!(
            req.grid_thw,
            json::<Vec<[usize; 3]>>(&g["grid_thw"]),
            "{case}: grids"
        );
        if let Some(want) = tensors(case).get("pixel_values") {
            let got = req.pixel_values.as_ref().expect("pixel values");
            assert_close(&format!("{case}: pixel values"), got, want, 0.0, 1e-5);
        }
        let want: Vec<u32> = json(&g["greedy_tokens"]);
        let (out, _) = ui
            .model
            .generate(
                std::slice::from_ref(&req),
                &SamplingParams::greedy(want.len()),
                &[],
            )
            .unwrap();
        assert_eq!(out[0].token_ids, want, "{case}: greedy tokens");
    }
}

fn train_episode(meta: &serde_json::Value, t: &HashMap<String, Tensor>) -> Episode {
    let mask: Vec<u8> = json(&meta["assistant_mask"]);
    Episode {
        input_ids: json(&meta["input_ids"]),
        assistant_mask: mask.iter().map(|&m| m == 1).collect(),
        pixel_values: Some(t["pixel_values"].clone()),
        grid_thw: json(&meta["grid_thw"]),
    }
}

fn check_logprobs(
    what: &str,
    score: &arpo_model::train::score::EpisodeScore,
    golden: &serde_json::Value,
) {
    let total = f64::from(score.sum().unwrap().to_scalar::<f32>().unwrap());
    let want = golden["sum_logprob"].as_f64().unwrap();
    assert!(
        (total - want).abs() <= 1e-4 * want.abs(),
        "{what}: sum logp {total} vs {want}"
    );
    let lp: Vec<f32> = score.log_probs.to_vec1().unwrap();
    let golden_lp: Vec<f64> = json(&golden["token_logprobs"]);
    for (k, &t) in score.positions.iter().enumerate() {
        assert!(
            (f64::from(lp[k]) - golden_lp[t - 1]).abs() < 1e-4,
            "{what}: logp at {t}"
        );
    }
}

#[test]
fn full_gradients_match_pytorch_with_and_without_checkpointing() {
    let golden = golden();
    let meta = &golden["train"];
    let t = tensors("train");
    let episode = train_episode(meta, &t);
    for checkpointing in [false, true] {
        let mut trainable = Trainable::full(model(), false).unwrap();
        trainable.set_gradient_checkpointing(checkpointing);
        let score = trainable.score(&episode).unwrap();
        check_logprobs("full", &score, &meta["full"]);
        let grads = arpo_model::train::recompute::backward(&score.sum().unwrap()).unwrap();
        let vars: HashMap<&str, _> = trainable
            .vars()
            .iter()
            .map(|(n, v)| (n.as_str(), v))
            .collect();
        let recorded: Vec<String> = json(&meta["recorded"]);
        for name in &recorded {
            let g = grads
                .get(vars[name.as_str()].as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let e = rel_err(g, &t[&format!("full.grad.{name}")]);
            eprintln!("checkpointing {checkpointing}: {name}: relative error {e:e}");
            assert!(e < 1e-4, "gradient of {name}: relative error {e}");
        }
        // Every trainable parameter gets a gradient (nothing silently detached).
        for (name, var) in trainable.vars() {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "no gradient for {name}"
            );
        }
    }
}

#[test]
fn lora_gradients_match_peft() {
    let golden = golden();
    let meta = &golden["train"];
    let t = tensors("train");
    let episode = train_episode(meta, &t);
    let trainable = Trainable::lora(
        model(),
        LoraConfig {
            r: meta["lora"]["r"].as_u64().unwrap() as usize,
            alpha: meta["lora"]["alpha"].as_f64().unwrap(),
            dropout: 0.0,
            ..LoraConfig::default()
        },
    )
    .unwrap();
    let set = trainable.lora_set().unwrap();
    let modules: Vec<String> = json(&meta["lora"]["modules"]);
    let mut ours: Vec<String> = set.adapters().keys().cloned().collect();
    ours.sort();
    assert_eq!(
        ours, modules,
        "the adapted modules are peft's (no vision gate/up/down_proj)"
    );
    for (module, adapter) in set.adapters() {
        adapter
            .a
            .set(&t[&format!("lora.init.{module}.lora_A.weight")])
            .unwrap();
        adapter
            .b
            .set(&t[&format!("lora.init.{module}.lora_B.weight")])
            .unwrap();
    }
    let score = trainable.score(&episode).unwrap();
    check_logprobs("lora", &score, &meta["lora"]);
    let grads = arpo_model::train::recompute::backward(&score.sum().unwrap()).unwrap();
    let mut worst = 0f64;
    for (name, var) in trainable.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = rel_err(g, &t[&format!("lora.grad.{name}")]);
        assert!(e < 1e-4, "gradient of {name}: relative error {e}");
        worst = worst.max(e);
    }
    eprintln!("lora: worst adapter gradient relative error {worst:e}");
    for (name, p) in trainable.model.parameters() {
        assert!(grads.get(&p).is_none(), "frozen {name} got a gradient");
    }
}

/// A full checkpoint of the Qwen2.5-VL saves its own names (RMSNorm without bias, SwiGLU
/// projections, `lm_head`) and loads back to the same logits.
#[test]
fn saved_checkpoint_loads_back_with_the_same_logits() {
    let trainable = Trainable::full(model(), false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("ck");
    trainable.save(&dest, &model_dir(), None).unwrap();
    let loaded = Qwen2Vl::load(&dest, DType::F32, &Device::Cpu).unwrap();
    let (req, _) = request("one_image");
    let a = model()
        .forward(&req.input_ids, req.pixel_values.as_ref(), &req.grid_thw)
        .unwrap();
    let b = loaded
        .forward(&req.input_ids, req.pixel_values.as_ref(), &req.grid_thw)
        .unwrap();
    assert_close("reloaded logits", &b, &a, 0.0, 1e-6);
}

/// LoRA on every projection, vision tower included (Qwen2.5-VL's `mlp.gate_proj` etc. in the
/// ViT), with deterministic non-zero B so that every adapter changes the logits.
fn roundtrip_lora() -> Trainable {
    let trainable = Trainable::lora(
        model(),
        LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: [
                "qkv",
                "proj",
                "q_proj",
                "v_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            include_vision: true,
            seed: 5,
        },
    )
    .unwrap();
    for (k, adapter) in trainable
        .lora_set()
        .unwrap()
        .adapters()
        .values()
        .enumerate()
    {
        let n: usize = adapter.b.dims().iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| 0.05 * ((i * 7 + k * 13) as f32 * 0.61).sin())
            .collect();
        let b = Tensor::from_vec(values, adapter.b.dims(), &Device::Cpu).unwrap();
        adapter.b.set(&b).unwrap();
    }
    trainable
}

/// The round trip through Python (`fixtures/scripts/check_roundtrip_qwen25.py`): with
/// `ARPO_ROUNDTRIP_DIR` set, writes our PEFT adapter (decoder and vision modules), our merged
/// full checkpoint and our logits there, for the script to load in peft and transformers
/// (`Qwen2_5_VLForConditionalGeneration`); always, loads the adapter peft saved from ours
/// (`tiny-qwen25vl-golden/peft_resaved/`) and checks it gives our logits.
#[test]
fn lora_checkpoints_round_trip_through_peft() {
    let golden = golden();
    let meta = &golden["train"];
    let t = tensors("train");
    let episode = train_episode(meta, &t);
    let trainable = roundtrip_lora();
    let set = trainable.lora_set().unwrap();
    assert!(set.adapters().contains_key("visual.blocks.2.mlp.gate_proj"));
    assert!(set.adapters().contains_key("visual.blocks.0.attn.qkv"));
    let logits = |m: &Qwen2Vl| {
        m.forward(
            &episode.input_ids,
            episode.pixel_values.as_ref(),
            &episode.grid_thw,
        )
        .unwrap()
    };
    let ours = logits(&trainable.model);
    assert!(
        rel_err(&ours, &logits(&model())) > 1e-3,
        "the adapters change the logits"
    );
    let merged = logits(&trainable.merged_model().unwrap());
    assert!(rel_err(&merged, &ours) < 1e-5);
    if let Some(dir) = std::env::var_os("ARPO_ROUNDTRIP_DIR") {
        let dir = PathBuf::from(dir);
        trainable
            .save_adapter(&dir.join("adapter"), "tiny-qwen25vl", None)
            .unwrap();
        trainable
            .save(&dir.join("full"), &model_dir(), None)
            .unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("logits".to_string(), ours.clone())]),
            dir.join("logits.safetensors"),
        )
        .unwrap();
    }
    let resaved = golden_dir().join("peft_resaved");
    let loaded = Trainable::lora_from_peft(model(), &resaved, 0).expect("peft's adapter loads");
    let e = rel_err(&logits(&loaded.model), &ours);
    eprintln!("adapter saved by peft: relative logit error {e:e}");
    assert!(e < 1e-5, "adapter saved by peft: relative error {e}");
}

/// bf16 weights (the GPU setting): the windowed tower and the decoder run, and the logits stay
/// near transformers' f32 ones (bf16 keeps 8 bits of mantissa); batched generation answers.
#[test]
fn bf16_forward_stays_near_transformers_and_generates() {
    let model = Qwen2Vl::load(&model_dir(), DType::BF16, &Device::Cpu).unwrap();
    let mut requests = Vec::new();
    for case in CASES {
        let (req, _) = request(case);
        let logits = model
            .forward(&req.input_ids, req.pixel_values.as_ref(), &req.grid_thw)
            .unwrap();
        let e = rel_err(
            &logits.to_dtype(DType::F32).unwrap(),
            &tensors(case)["logits"],
        );
        eprintln!("{case}: bf16 relative logit error {e:e}");
        assert!(e < 5e-2, "{case}: bf16 logits relative error {e}");
        requests.push(req);
    }
    let (out, _) = model
        .generate(&requests, &SamplingParams::greedy(4), &[])
        .unwrap();
    for o in &out {
        assert_eq!(o.token_ids.len(), 4);
        assert!(o.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
}

/// The other spellings of the same checkpoint load to the same logits: the flat `config.json`
/// UI-TARS-1.5-7B ships (text fields at the top level, `rope_scaling: {type: mrope}`) with the
/// weights named the way transformers 5 names its modules (`model.language_model.*`,
/// `model.visual.*`).
#[test]
fn flat_config_and_nested_weight_names_load_the_same_model() {
    let nested: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap())
            .unwrap();
    let mut flat = nested["text_config"].clone();
    let obj = flat.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("model_type".into(), "qwen2_5_vl".into());
    obj.insert("rope_theta".into(), 1_000_000.0.into());
    obj.insert(
        "rope_scaling".into(),
        serde_json::json!({"type": "mrope", "mrope_section": [2, 3, 3]}),
    );
    for key in [
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    ] {
        obj.insert(key.into(), nested[key].clone());
    }
    let mut vision = nested["vision_config"].clone();
    let v = vision.as_object_mut().unwrap();
    v.remove("rope_parameters");
    v.remove("in_channels");
    v.insert("in_chans".into(), 3.into());
    obj.insert("vision_config".into(), vision);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), flat.to_string()).unwrap();
    let weights =
        candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let renamed: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, t)| {
            let k = if let Some(rest) = k.strip_prefix("visual.") {
                format!("model.visual.{rest}")
            } else if let Some(rest) = k.strip_prefix("model.") {
                format!("model.language_model.{rest}")
            } else {
                k
            };
            (k, t)
        })
        .collect();
    assert!(renamed.contains_key("model.language_model.layers.0.mlp.up_proj.weight"));
    candle_core::safetensors::save(&renamed, dir.path().join("model.safetensors")).unwrap();

    let other = Qwen2Vl::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(other.config, model().config);
    let (req, _) = request("multi_turn");
    let a = other
        .forward(&req.input_ids, req.pixel_values.as_ref(), &req.grid_thw)
        .unwrap();
    assert_close(
        "flat config logits",
        &a,
        &tensors("multi_turn")["logits"],
        1e-4,
        1e-5,
    );
}

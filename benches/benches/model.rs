//! Prefill and decode of the tiny fixture model (`fixtures/models/tiny-qwen2vl`, f32, CPU) on
//! the desktop screenshot fixture: the cost of the model code around the matmuls (vision
//! tower, rope index, KV cache, sampling), not of a real model's weights. The 2B-shape
//! numbers are `cargo xtask bench-model` (see BENCHMARKS.md).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use arpo_core::{ChatMessage, ContentPart, Role, SamplingParams, Screenshot};
use arpo_model::{GenerationRequest, UiTars};
use candle_core::{DType, Device};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Tokens decoded after the first one in the decode benchmark.
const DECODE: usize = 16;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn load() -> (UiTars, Vec<ChatMessage>) {
    let dir = fixtures().join("models/tiny-qwen2vl");
    let model = UiTars::load_dir(&dir, DType::F32, &Device::Cpu).expect("tiny model");
    let png = std::fs::read(fixtures().join("screenshots/desktop.png")).expect("desktop.png");
    let img = arpo_model::processor::decode_image(&png).expect("decode desktop.png");
    let shot = Screenshot::new(png, img.width(), img.height());
    let messages = vec![
        ChatMessage::text(Role::System, "You are a GUI agent."),
        ChatMessage {
            role: Role::User,
            content: vec![
                ContentPart::Text {
                    text: "Open the Documents folder on the desktop.".into(),
                },
                ContentPart::Image { image: shot },
            ],
        },
    ];
    (model, messages)
}

fn bench_model(c: &mut Criterion) {
    let (model, messages) = load();
    let request: GenerationRequest = model.prepare(&messages).expect("prepare");
    let requests = std::slice::from_ref(&request);
    let prompt_tokens = request.input_ids.len();

    let mut g = c.benchmark_group("model_tiny");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    // Image decode + preprocess + chat template + tokenize.
    g.bench_function("prepare", |b| {
        b.iter(|| model.prepare(black_box(&messages)).expect("prepare"));
    });

    // Vision tower + prompt forward + first token.
    g.throughput(Throughput::Elements(prompt_tokens as u64));
    g.bench_function(format!("prefill_{prompt_tokens}_tokens"), |b| {
        b.iter(|| {
            model
                .model
                .generate(requests, &SamplingParams::greedy(1), &[])
                .expect("prefill")
        });
    });

    // Decode steps only (the generation's own decode timer), DECODE tokens per iteration.
    g.throughput(Throughput::Elements(DECODE as u64));
    g.bench_function(format!("decode_{DECODE}_tokens"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (out, t) = model
                    .model
                    .generate(requests, &SamplingParams::greedy(DECODE + 1), &[])
                    .expect("generate");
                assert_eq!(t.decode_steps, DECODE, "decode stopped early");
                black_box(out);
                total += Duration::from_secs_f64(t.decode_s);
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, bench_model);
criterion_main!(benches);

//! One linear layer of the 2B decoder (`mlp.down_proj`, 8960 inputs to 1536 outputs, random
//! N(0, 0.02) weights) in each rollout format, side by side: candle's f32 matmul, candle's
//! `q8_0` and `q4k` `QMatMul`, our bf16 ([`arpo_model::bf16_gemm`]), our q4k tiles
//! ([`arpo_model::q4_gemm`]) and our q8_0 tiles ([`arpo_model::q8_gemm`]), on one row of `x`
//! (a decoded token: the weights are read once, so bytes of weights decide) and on 256 rows (a
//! prefill chunk). Then the embedded default's tiny linears (128 inputs to 384 outputs and
//! back) on 32 rows (a step of 32 rollouts decoded together): f32 against candle's q8_0 and
//! ours, where per-call costs decide.

use std::hint::black_box;
use std::time::Duration;

use arpo_model::bf16_gemm::Bf16Weight;
use arpo_model::q4_gemm::Q4Weight;
use arpo_model::q8_gemm::Q8Weight;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const OUT: usize = 1536;
const IN: usize = 8960;
/// `mlp.gate_proj` / `up_proj`: 1536 inputs to 8960 outputs.
const WIDE: (usize, usize) = (8960, 1536);

fn bench_linear(c: &mut Criterion) {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (OUT, IN), &dev).expect("weight");
    let q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).expect("q8_0"))
        .expect("q8_0 matmul");
    let q4k = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).expect("q4k"))
        .expect("q4k matmul");
    let bf16 = Bf16Weight::from_tensor(&w).expect("bf16");
    let ours = Q4Weight::from_tensor(&w).expect("q4");
    let ours_q8 = Q8Weight::from_tensor(&w).expect("q8");
    for rows in [1usize, 256] {
        let x = Tensor::randn(0f32, 1.0, (1, rows, IN), &dev).expect("x");
        let mut g = c.benchmark_group(format!("linear_{IN}x{OUT}_rows_{rows}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements((rows * OUT * IN) as u64));
        g.bench_function("candle_f32", |b| {
            b.iter(|| {
                black_box(&x)
                    .broadcast_matmul(&w.t().expect("t"))
                    .expect("f32")
            })
        });
        g.bench_function("candle_q8_0", |b| {
            b.iter(|| q8.forward(black_box(&x)).expect("q8_0"))
        });
        g.bench_function("candle_q4k", |b| {
            b.iter(|| q4k.forward(black_box(&x)).expect("q4k"))
        });
        g.bench_function("ours_bf16", |b| {
            b.iter(|| bf16.forward(black_box(&x)).expect("bf16"))
        });
        g.bench_function("ours_q4k_tiles", |b| {
            b.iter(|| ours.forward(black_box(&x)).expect("q4"))
        });
        g.bench_function("ours_q8_0_tiles", |b| {
            b.iter(|| ours_q8.forward(black_box(&x)).expect("q8"))
        });
        g.finish();
    }
    for (out, inp) in [(384, 128), (128, 384)] {
        tiny(c, out, inp);
    }
    // A decoded token streams every weight from memory: 8 weights of each format, more than the
    // L3 cache holds, run one after the other.
    streamed(c, (OUT, IN));
    streamed(c, WIDE);
}

/// One of the tiny base's linears on 32 rows: f32, candle's q8_0, ours.
fn tiny(c: &mut Criterion, out: usize, inp: usize) {
    const ROWS: usize = 32;
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).expect("weight");
    let q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).expect("q8_0"))
        .expect("q8_0 matmul");
    let ours = Q8Weight::from_tensor(&w).expect("q8");
    let x = Tensor::randn(0f32, 1.0, (1, ROWS, inp), &dev).expect("x");
    let mut g = c.benchmark_group(format!("linear_{inp}x{out}_rows_{ROWS}"));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements((ROWS * out * inp) as u64));
    g.bench_function("candle_f32", |b| {
        b.iter(|| {
            black_box(&x)
                .broadcast_matmul(&w.t().expect("t"))
                .expect("f32")
        })
    });
    g.bench_function("candle_q8_0", |b| {
        b.iter(|| q8.forward(black_box(&x)).expect("q8_0"))
    });
    g.bench_function("ours_q8_0_tiles", |b| {
        b.iter(|| ours.forward(black_box(&x)).expect("q8"))
    });
    g.finish();
}

/// Weights streamed from memory: one row against each of `STREAMED` `[out, in]` weights in
/// turn, candle's q4k and ours, candle's q8_0 and ours.
fn streamed(c: &mut Criterion, (out, inp): (usize, usize)) {
    const STREAMED: usize = 8;
    let dev = Device::Cpu;
    let mut candle = Vec::new();
    let mut ours = Vec::new();
    let (mut candle_q8, mut ours_q8) = (Vec::new(), Vec::new());
    for _ in 0..STREAMED {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).expect("weight");
        let q = QTensor::quantize(&w, GgmlDType::Q4K).expect("q4k");
        candle.push(QMatMul::from_qtensor(q).expect("q4k matmul"));
        ours.push(Q4Weight::from_tensor(&w).expect("q4"));
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q8_0");
        candle_q8.push(QMatMul::from_qtensor(q).expect("q8_0 matmul"));
        ours_q8.push(Q8Weight::from_tensor(&w).expect("q8"));
    }
    let x = Tensor::randn(0f32, 1.0, (1, 1, inp), &dev).expect("x");
    let mut g = c.benchmark_group(format!("linear_{inp}x{out}_rows_1_streamed_x{STREAMED}"));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements((STREAMED * out * inp) as u64));
    g.bench_function("candle_q4k", |b| {
        b.iter(|| {
            for q in &candle {
                black_box(q.forward(&x).expect("q4k"));
            }
        })
    });
    g.bench_function("ours_q4k_tiles", |b| {
        b.iter(|| {
            for q in &ours {
                black_box(q.forward(&x).expect("q4"));
            }
        })
    });
    g.bench_function("candle_q8_0", |b| {
        b.iter(|| {
            for q in &candle_q8 {
                black_box(q.forward(&x).expect("q8_0"));
            }
        })
    });
    g.bench_function("ours_q8_0_tiles", |b| {
        b.iter(|| {
            for q in &ours_q8 {
                black_box(q.forward(&x).expect("q8"));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);

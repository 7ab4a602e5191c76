//! One linear layer of the 2B decoder (`mlp.down_proj`, 8960 inputs to 1536 outputs, random
//! N(0, 0.02) weights) in each rollout format, side by side: candle's f32 matmul, candle's
//! `q8_0` and `q4k` `QMatMul`, our bf16 ([`arpo_model::bf16_gemm`]), our q4k tiles
//! ([`arpo_model::q4_gemm`]) and our q8_0 tiles ([`arpo_model::q8_gemm`]), on one row of `x`
//! (a decoded token: the weights are read once, so bytes of weights decide) and on 256 rows (a
//! prefill chunk). Then the embedded default's tiny linears (128 inputs to 384 outputs and
//! back) on 32 rows (a step of 32 rollouts decoded together), where per-call costs decide
//! (q4k needs 256-wide rows: not there).

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

/// One format's product `x W^T`, by the name the benches report it under.
type Product = (&'static str, Box<dyn Fn(&Tensor) -> Tensor>);

/// `w` `[out, in]` in each format (q4k only where `in` is a multiple of its 256-wide block).
fn products(w: &Tensor) -> Vec<Product> {
    let inp = w.dim(1).expect("[out, in]");
    let t = w.t().expect("t");
    let candle = |format: GgmlDType| {
        QMatMul::from_qtensor(QTensor::quantize(w, format).expect("quantize")).expect("matmul")
    };
    let mut out: Vec<Product> = vec![
        (
            "candle_f32",
            Box::new(move |x| x.broadcast_matmul(&t).expect("f32")),
        ),
        ("candle_q8_0", {
            let q = candle(GgmlDType::Q8_0);
            Box::new(move |x| q.forward(x).expect("q8_0"))
        }),
        ("ours_bf16", {
            let q = Bf16Weight::from_tensor(w).expect("bf16");
            Box::new(move |x| q.forward(x).expect("bf16"))
        }),
        ("ours_q8_0_tiles", {
            let q = Q8Weight::from_tensor(w).expect("q8");
            Box::new(move |x| q.forward(x).expect("q8"))
        }),
    ];
    if inp.is_multiple_of(256) {
        let q = candle(GgmlDType::Q4K);
        out.push(("candle_q4k", Box::new(move |x| q.forward(x).expect("q4k"))));
        let q = Q4Weight::from_tensor(w).expect("q4");
        out.push((
            "ours_q4k_tiles",
            Box::new(move |x| q.forward(x).expect("q4")),
        ));
    }
    out
}

/// Every product of `w` `[out, in]` on `rows` rows of `x`, in one group.
fn group(c: &mut Criterion, w: &Tensor, rows: usize, samples: usize, seconds: u64) {
    let (out, inp) = w.dims2().expect("[out, in]");
    let x = Tensor::randn(0f32, 1.0, (1, rows, inp), w.device()).expect("x");
    let mut g = c.benchmark_group(format!("linear_{inp}x{out}_rows_{rows}"));
    g.sample_size(samples)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(seconds))
        .throughput(Throughput::Elements((rows * out * inp) as u64));
    for (name, product) in products(w) {
        g.bench_function(name, |b| b.iter(|| product(black_box(&x))));
    }
    g.finish();
}

fn bench_linear(c: &mut Criterion) {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (OUT, IN), &dev).expect("weight");
    for rows in [1usize, 256] {
        group(c, &w, rows, 10, 3);
    }
    for (out, inp) in [(384, 128), (128, 384)] {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).expect("weight");
        group(c, &w, 32, 20, 2);
    }
    // A decoded token streams every weight from memory: 8 weights of each format, more than the
    // L3 cache holds, run one after the other.
    streamed(c, (OUT, IN));
    streamed(c, WIDE);
}

/// Weights streamed from memory: one row against each of `STREAMED` `[out, in]` weights in
/// turn, candle's and our q4k and q8_0.
fn streamed(c: &mut Criterion, (out, inp): (usize, usize)) {
    const STREAMED: usize = 8;
    const FORMATS: [&str; 4] = [
        "candle_q4k",
        "ours_q4k_tiles",
        "candle_q8_0",
        "ours_q8_0_tiles",
    ];
    let dev = Device::Cpu;
    let weights: Vec<Vec<Product>> = (0..STREAMED)
        .map(|_| {
            let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).expect("weight");
            products(&w)
                .into_iter()
                .filter(|(name, _)| FORMATS.contains(name))
                .collect()
        })
        .collect();
    let x = Tensor::randn(0f32, 1.0, (1, 1, inp), &dev).expect("x");
    let mut g = c.benchmark_group(format!("linear_{inp}x{out}_rows_1_streamed_x{STREAMED}"));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements((STREAMED * out * inp) as u64));
    for (i, (name, _)) in weights[0].iter().enumerate() {
        g.bench_function(*name, |b| {
            b.iter(|| {
                for products in &weights {
                    black_box((products[i].1)(&x));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);

//! Memory-linear attention (`arpo_model::attention`) against the dense definition: the output
//! and all three gradients equal scores + additive mask + softmax + matmul (and candle's
//! autograd through them) computed here in f64; and its memory stays linear in the length.

use arpo_model::attention::{causal_attention, chunked_attention, last_scratch_bytes};
use candle_core::{D, DType, Device, IndexOp, Tensor, Var};

use crate::common::max_abs_diff;

/// Deterministic values in [-2, 2) (a fixed LCG: the test needs no random seed to reproduce).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(dims.iter().product(), seed), dims, &Device::Cpu).unwrap()
}

/// `|a - b|` at most `1e-5` of `b`'s largest magnitude; `b` must not be all zeros.
fn assert_rel_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(scale > 1e-3, "{what}: the reference is ~0 (scale {scale})");
    assert!(
        diff <= 1e-5 * scale,
        "{what}: differs by {diff} (relative {:.2e})",
        diff / scale
    );
}

/// The additive mask `[b, 1, l, t]` of the causal rule with left padding, from its definition.
fn causal_mask(b: usize, l: usize, t: usize, pads: &[usize]) -> Tensor {
    let mut m = Vec::with_capacity(b * l * t);
    for r in 0..b {
        let pad = pads.get(r).copied().unwrap_or(0);
        for i in 0..l {
            let p = t - l + i;
            for j in 0..t {
                let visible = (pad <= j && j <= p) || j == p;
                m.push(if visible { 0.0 } else { f64::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(m, (b, 1, l, t), &Device::Cpu).unwrap()
}

/// Dense attention in f64: `q` `[b, nh, l, hd]`, `k`/`v` `[b, nkv, t, hd]`, `mask` broadcast
/// to `[b, nh, l, t]`.
fn dense(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let (nh, nkv) = (q.dim(1).unwrap(), k.dim(1).unwrap());
    let heads: Vec<u32> = (0..nh).map(|h| (h / (nh / nkv)) as u32).collect();
    let heads = Tensor::new(heads.as_slice(), &Device::Cpu).unwrap();
    let k = k.index_select(&heads, 1).unwrap();
    let v = v.index_select(&heads, 1).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(mask)
        .unwrap();
    candle_nn::ops::softmax(&scores, D::Minus1)
        .unwrap()
        .matmul(&v)
        .unwrap()
}

/// Output and gradients of q, k, v of `f(q, k, v)` under the loss `sum(out * w)`.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    [q, k, v]: [&Tensor; 3],
    w: &Tensor,
    dtype: DType,
) -> [Tensor; 4] {
    let vars = [q, k, v].map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap());
    let out = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    );
    let loss = (out.to_dtype(DType::F64).unwrap() * w.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = |i: usize| grads.get(vars[i].as_tensor()).expect("gradient").clone();
    [out, g(0), g(1), g(2)]
}

fn check_causal(
    (b, nh, nkv, l, t, hd): (usize, usize, usize, usize, usize, usize),
    pads: &[usize],
    seed: u64,
) {
    let q = tensor(&[b, nh, l, hd], seed);
    let k = tensor(&[b, nkv, t, hd], seed + 1);
    let v = tensor(&[b, nkv, t, hd], seed + 2);
    let w = tensor(&[b, nh, l, hd], seed + 3);
    let scale = 1.0 / (hd as f64).sqrt();
    let mask = causal_mask(b, l, t, pads);
    let want = run(
        |q, k, v| dense(q, k, v, &mask, scale),
        [&q, &k, &v],
        &w,
        DType::F64,
    );
    let got = run(
        |q, k, v| causal_attention(q, k, v, pads, scale).unwrap(),
        [&q, &k, &v],
        &w,
        DType::F32,
    );
    assert_eq!(got[0].dtype(), DType::F32);
    let case = format!("b={b} nh={nh} nkv={nkv} l={l} t={t} hd={hd} pads={pads:?}");
    for (name, (g, w)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        assert_rel_close(&format!("{case}: {name}"), g, w);
    }
}

#[test]
fn causal_attention_equals_the_dense_formula_and_its_gradients() {
    // Single block, no GQA.
    check_causal((1, 2, 2, 5, 5, 4), &[], 1);
    // Several query blocks, lengths not multiples of the block, GQA 4 over 2, left padding.
    check_causal((2, 4, 2, 300, 300, 16), &[0, 37], 10);
    // One KV head for 3 query heads: its gradient is summed from several work items.
    check_causal((1, 3, 1, 400, 400, 8), &[], 15);
}

#[test]
fn causal_attention_after_a_cached_prefix_equals_the_dense_formula() {
    // 70 new queries after 130 cached positions; row 1's padding (150) reaches past the first
    // new queries, which then see only themselves.
    check_causal((2, 4, 2, 70, 200, 8), &[0, 150], 20);
    // One query (a decoding step), 4 query heads on one KV head.
    check_causal((1, 4, 1, 1, 9, 8), &[3], 30);
    check_causal((2, 2, 1, 1, 129, 8), &[], 40);
}

#[test]
fn chunked_attention_equals_the_dense_block_diagonal_formula() {
    let (h, hd) = (3, 16);
    let chunks = [5, 130, 1, 0, 100, 64];
    let n: usize = chunks.iter().sum();
    let q = tensor(&[h, n, hd], 50);
    let k = tensor(&[h, n, hd], 51);
    let v = tensor(&[h, n, hd], 52);
    let w = tensor(&[h, n, hd], 53);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut chunk_of = Vec::with_capacity(n);
    for (c, &len) in chunks.iter().enumerate() {
        chunk_of.extend(std::iter::repeat_n(c, len));
    }
    let mask: Vec<f64> = (0..n * n)
        .map(|ij| {
            if chunk_of[ij / n] == chunk_of[ij % n] {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, n, n), &Device::Cpu).unwrap();
    let want = run(
        |q, k, v| {
            let four = |x: &Tensor| x.unsqueeze(0).unwrap();
            dense(&four(q), &four(k), &four(v), &mask, scale)
                .squeeze(0)
                .unwrap()
        },
        [&q, &k, &v],
        &w,
        DType::F64,
    );
    let got = run(
        |q, k, v| chunked_attention(q, k, v, &chunks, scale).unwrap(),
        [&q, &k, &v],
        &w,
        DType::F32,
    );
    for (name, (g, w)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        assert_rel_close(&format!("chunks {chunks:?}: {name}"), g, w);
    }
}

#[test]
fn half_precision_inputs_are_computed_in_f32_and_returned_in_their_dtype() {
    let q = tensor(&[1, 2, 40, 8], 60);
    let k = tensor(&[1, 1, 40, 8], 61);
    let v = tensor(&[1, 1, 40, 8], 62);
    let f32_out = causal_attention(&q, &k, &v, &[], 0.3).unwrap();
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let out = causal_attention(&bf(&q), &bf(&k), &bf(&v), &[], 0.3).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let diff = max_abs_diff(&out, &f32_out);
    // bf16 keeps 8 bits: the inputs' rounding (~0.4%) moves outputs of magnitude < 2 by ~1e-2.
    assert!(diff < 5e-2, "bf16 result differs from f32 by {diff}");
}

#[test]
fn shapes_that_do_not_fit_are_errors() {
    let q = tensor(&[2, 3, 4, 8], 70);
    let kv = tensor(&[2, 2, 4, 8], 71);
    assert!(
        causal_attention(&q, &kv, &kv, &[], 1.0).is_err(),
        "3 heads on 2"
    );
    let q = tensor(&[2, 2, 5, 8], 72);
    assert!(causal_attention(&q, &kv, &kv, &[], 1.0).is_err(), "l > t");
    let q = tensor(&[2, 2, 4, 8], 73);
    assert!(
        causal_attention(&q, &kv, &kv, &[1], 1.0).is_err(),
        "one pad for two rows"
    );
    let x = tensor(&[2, 6, 8], 74);
    assert!(
        chunked_attention(&x, &x, &x, &[2, 3], 1.0).is_err(),
        "5 != 6"
    );
}

/// Peak resident memory of this process (kB), from `/proc/self/status`.
fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

const PROBE: &str = "attention::causal_attention_8192_probe";

/// The work of [`causal_attention_at_8192_tokens_stays_linear_in_memory`], run alone in a
/// child process so that its peak memory is its own.
#[test]
#[ignore = "run in a child process by causal_attention_at_8192_tokens_stays_linear_in_memory"]
fn causal_attention_8192_probe() {
    let (l, nh, hd) = (8192, 2, 64);
    let before = peak_rss_kb();
    let q = Var::from_tensor(&tensor(&[1, nh, l, hd], 80)).unwrap();
    let k = Var::from_tensor(&tensor(&[1, nh, l, hd], 81)).unwrap();
    let v = Var::from_tensor(&tensor(&[1, nh, l, hd], 82)).unwrap();
    let w = tensor(&[1, nh, l, hd], 83);
    let out = causal_attention(&q, &k, &v, &[], 1.0 / (hd as f64).sqrt()).unwrap();
    let fwd_scratch = last_scratch_bytes();
    let grads = (out.clone() * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let bwd_scratch = last_scratch_bytes();
    for x in [&q, &k, &v] {
        let g = grads.get(x.as_tensor()).expect("gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
    }
    // Spot check: the first query sees only key 0, so its output is v's first row.
    let first = max_abs_diff(
        &out.i((0, 0, 0)).unwrap(),
        &v.as_tensor().i((0, 0, 0)).unwrap(),
    );
    assert!(first < 1e-6);
    println!(
        "PROBE before_kb={before} peak_kb={} fwd_scratch={fwd_scratch} bwd_scratch={bwd_scratch}",
        peak_rss_kb()
    );
}

#[test]
fn causal_attention_at_8192_tokens_stays_linear_in_memory() {
    let exe = std::env::current_exe().expect("test binary");
    let child = std::process::Command::new(exe)
        .args([
            PROBE,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        // The scratch is per thread: the bound below is for two.
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run the probe");
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success(),
        "probe failed: {stdout}\n{}",
        String::from_utf8_lossy(&child.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, report)| report))
        .unwrap_or_else(|| panic!("no probe report in {stdout}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    // One dense f32 score tensor [1, 2, 8192, 8192] alone would be 512 MB (the dense backward
    // keeps probabilities and their gradient too).
    let dense_scores = 8192u64 * 8192 * 2 * 4;
    let growth = (field("peak_kb") - field("before_kb")) * 1024;
    println!("{line}; growth {} MB", growth >> 20);
    assert!(
        growth < dense_scores / 4,
        "peak memory grew by {growth} bytes ({line})"
    );
    for scratch in [field("fwd_scratch"), field("bwd_scratch")] {
        // At least one block's scores were held (else the report measures nothing), and far
        // less than the score matrix.
        assert!(
            scratch >= 128 * 8192 * 4 && scratch < dense_scores / 16,
            "scratch {scratch} bytes ({line})"
        );
    }
}

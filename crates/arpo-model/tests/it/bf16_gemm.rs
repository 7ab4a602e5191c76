//! The packed bf16 product (`arpo_model::bf16_gemm`) against an f64 reference on the
//! bf16-rounded operands, for every kernel this CPU runs (the AVX-512 BF16 one and the
//! portable one on a Zen 4/5 or Sapphire Rapids).
//!
//! The bound: a product of two bf16 values (8 significant bits each) is exact in f32 (16 bits
//! of 24), so the only errors are the f32 additions that accumulate the `k` products of an
//! output. Each term passes through at most `k + 2` rounded additions (the `vdpbf16ps` chain
//! adds both products of a pair one after the other; the 4 interleaved sums of the GEMV are
//! added at the end; each `k` block of 256 pairs is added to the output once), each with a
//! relative error of at most `u = 2^-24`. Recursive summation then gives
//! `|err| <= gamma_(k+2) sum_i |x_i w_i|` with `gamma_n = n u / (1 - n u)` (Higham, "Accuracy
//! and Stability of Numerical Algorithms", 4.2), which for these `k` is below
//! `1.001 (k + 2) 2^-24 sum_i |x_i w_i|`: the constant `c` is 1.001. (`vdpbf16ps` flushes
//! subnormal products to zero; the operands here are at least 2^-20, their products normal.)
//! The reference is the exact sum in f64 (53 bits: its own error is below 2^-40 of the
//! bound's sum). Operands not rounded to bf16 would be off by up to 2^-9 of each term, far
//! above the bound.

use arpo_model::bf16_gemm::{Bf16Kernel, Bf16Weight, round_to_bf16};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn kernels() -> Vec<Bf16Kernel> {
    let all = [Bf16Kernel::Avx512Bf16, Bf16Kernel::Portable];
    let kernels: Vec<_> = all.into_iter().filter(|k| k.is_available()).collect();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512bf16") {
        assert_eq!(
            kernels.len(),
            2,
            "the AVX-512 BF16 kernel is not offered on a CPU that has it"
        );
        assert_eq!(Bf16Kernel::best(), Bf16Kernel::Avx512Bf16);
    }
    kernels
}

/// Uniform in ±[2^-10, 2]: magnitudes over 11 binades, no subnormal products.
fn values(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let mag = 2f32.powf(rng.random_range(-10.0..1.0));
            if rng.random_bool(0.5) { mag } else { -mag }
        })
        .collect()
}

fn bf16(v: f32) -> f64 {
    half::bf16::from_f32(v).to_f64()
}

/// Checks `got` (`m x n`) against the f64 product of the bf16-rounded `x` (`m x k`) and `w`
/// (`n x k`) within `1.001 (k + 2) 2^-24 sum |x w|` per output.
fn check(what: &str, x: &[f32], w: &[f32], m: usize, k: usize, n: usize, got: &[f32]) {
    assert_eq!(got.len(), m * n, "{what}: output size");
    let (xb, wb): (Vec<f64>, Vec<f64>) = (
        x.iter().map(|&v| bf16(v)).collect(),
        w.iter().map(|&v| bf16(v)).collect(),
    );
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut abs) = (0f64, 0f64);
            for t in 0..k {
                let p = xb[i * k + t] * wb[j * k + t];
                exact += p;
                abs += p.abs();
            }
            let bound = 1.001 * (k + 2) as f64 * 2f64.powi(-24) * abs;
            let err = (got[i * n + j] as f64 - exact).abs();
            assert!(
                err <= bound,
                "{what}: y[{i}][{j}] = {} vs {exact} (error {err:e}, bound {bound:e})",
                got[i * n + j]
            );
        }
    }
}

#[test]
fn bf16_products_match_the_f64_reference_within_the_f32_accumulation_bound_on_awkward_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let kernels = kernels();
    for k in [1, 2, 3, 33, 1176, 1536] {
        for n in [1, 17, 63, 64, 65, 200] {
            let w = values(&mut rng, n * k);
            let packed = Bf16Weight::from_rows(&w, n, k);
            assert_eq!(packed.dims(), (n, k));
            for m in [0, 1, 5, 7, 33, 130] {
                let x = values(&mut rng, m * k);
                check_every_kernel(&packed, &kernels, &x, &w, (m, k, n));
            }
        }
    }
}

/// More rows than one cache block (256) and than the threads' share, over three `k` blocks.
#[test]
fn bf16_products_over_several_row_and_k_blocks_match_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (m, k, n) = (523, 1537, 97);
    let w = values(&mut rng, n * k);
    let x = values(&mut rng, m * k);
    let packed = Bf16Weight::from_rows(&w, n, k);
    check_every_kernel(&packed, &kernels(), &x, &w, (m, k, n));
}

/// `packed`'s product with `x` by each kernel against the reference ([`check`]).
fn check_every_kernel(
    packed: &Bf16Weight,
    kernels: &[Bf16Kernel],
    x: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
) {
    for &kernel in kernels {
        let got = packed.matmul(x, m, kernel).unwrap();
        check(
            &format!("{kernel:?} m {m} k {k} n {n}"),
            x,
            w,
            m,
            k,
            n,
            &got,
        );
    }
}

/// `[b, l, in]`, a transposed (non-contiguous) `x`, a bf16 `x` and a bf16 weight through the
/// tensor interface, against the slice product.
#[test]
fn bf16_linear_takes_batch_dims_non_contiguous_and_bf16_inputs() {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (k, n) = (33, 65);
    let w = values(&mut rng, n * k);
    let x = values(&mut rng, 2 * 3 * k);
    let packed =
        Bf16Weight::from_tensor(&Tensor::from_vec(w.clone(), (n, k), &dev).unwrap()).unwrap();
    for kernel in kernels() {
        let xt = Tensor::from_vec(x.clone(), (2, 3, k), &dev).unwrap();
        let y = packed.forward_with(&xt, kernel).unwrap();
        assert_eq!(y.dims(), &[2, 3, n]);
        assert_eq!(y.dtype(), DType::F32);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        check(&format!("{kernel:?} [2, 3, {k}]"), &x, &w, 6, k, n, &y);

        // The same rows as the transpose of a [k, 6] tensor.
        let xt_t = Tensor::from_vec(x.clone(), (6, k), &dev)
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
            .t()
            .unwrap();
        assert!(!xt_t.is_contiguous());
        let y2 = packed.forward_with(&xt_t, kernel).unwrap();
        let y2 = y2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        check(&format!("{kernel:?} transposed"), &x, &w, 6, k, n, &y2);

        // bf16 in, bf16 out: the f32 product rounded once more.
        let xb = Tensor::from_vec(x.clone(), (6, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let yb = packed.forward_with(&xb, kernel).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        let yb = yb.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let rounded: Vec<f32> = y.iter().map(|&v| bf16(v) as f32).collect();
        assert_eq!(yb.to_vec1::<f32>().unwrap(), rounded, "{kernel:?} bf16 x");
    }
    // A bf16 weight packs to the same values.
    let wb = Tensor::from_vec(w.clone(), (n, k), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        Bf16Weight::from_tensor(&wb).unwrap().to_rows(),
        packed.to_rows()
    );
    // Wrong widths are errors, not panics.
    let bad = Tensor::zeros((2, k + 1), DType::F32, &dev).unwrap();
    assert!(packed.forward(&bad).is_err());
    assert!(packed.matmul(&x[1..], 6, Bf16Kernel::Portable).is_err());
    // Zero rows, a zero-width x.
    let empty = Tensor::zeros((0, k), DType::F32, &dev).unwrap();
    assert_eq!(packed.forward(&empty).unwrap().dims(), &[0, n]);
    let none = Bf16Weight::from_rows(&[], 3, 0);
    let y = none
        .forward(&Tensor::zeros((2, 0), DType::F32, &dev).unwrap())
        .unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0; 6]
    );
}

/// Halfway cases between two bf16 values (the 16 dropped bits exactly 0x8000), either side
/// of them, an odd and an even kept half, signs, a subnormal, overflow and NaN, all rounded as
/// `half::bf16::from_f32` (to nearest, ties to even): in the packed weights (read back), in
/// `x` (through an identity weight: `y = bf16(x)` exactly) and by `round_to_bf16`.
#[test]
fn weights_and_inputs_round_to_nearest_even_like_half() {
    let cases: Vec<f32> = [
        0x3f80_8000u32, // 1 + 2^-8: halfway, even below: down to 1
        0x3f81_8000,    // odd below: up
        0x3f80_8001,    // above halfway: up
        0x3f80_7fff,    // below halfway: down
        0xbf81_8000,    // negative, odd below: away from zero
        0x4049_0fdb,    // pi
        0x7f7f_ffff,    // f32::MAX: to infinity
        0x0000_8000,    // a subnormal, halfway
        0x0001_8000,    // a subnormal, halfway, odd below
    ]
    .into_iter()
    .map(f32::from_bits)
    .collect();
    let n = cases.len();
    for &v in &cases {
        assert_eq!(round_to_bf16(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
    }
    assert!(f32::from_bits((round_to_bf16(f32::NAN) as u32) << 16).is_nan());

    // Weights: the cases as one row, read back.
    let packed = Bf16Weight::from_rows(&cases, 1, n);
    let want: Vec<f32> = cases
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    let got = packed.to_rows();
    for ((g, w), v) in got.iter().zip(&want).zip(&cases) {
        assert_eq!(g.to_bits(), w.to_bits(), "weight {v:e}");
    }

    // Inputs: through an identity weight every output is one rounded input times one (without
    // the overflow: 0 x infinity in the other outputs' sums would be NaN).
    let cases: Vec<f32> = cases.into_iter().filter(|v| *v != f32::MAX).collect();
    let want: Vec<f32> = cases
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    let n = cases.len();
    let mut identity = vec![0f32; n * n];
    for i in 0..n {
        identity[i * n + i] = 1.0;
    }
    let eye = Bf16Weight::from_rows(&identity, n, n);
    for kernel in kernels() {
        let y = eye.matmul(&cases, 1, kernel).unwrap();
        // vdpbf16ps treats subnormal inputs as zero: compare those to zero there.
        let daz = kernel == Bf16Kernel::Avx512Bf16;
        for ((g, w), v) in y.iter().zip(&want).zip(&cases) {
            let w = if daz && w.is_subnormal() { 0.0 } else { *w };
            assert_eq!(*g, w, "{kernel:?} x = {v:e} ({:#x})", v.to_bits());
        }
        // The same through the 8-row tile (2 rows) and the row-split path (64 rows).
        for m in [2, 64] {
            let x: Vec<f32> = cases.iter().copied().cycle().take(m * n).collect();
            let y = eye.matmul(&x, m, kernel).unwrap();
            for (i, (g, v)) in y.iter().zip(&x).enumerate() {
                let w = half::bf16::from_f32(*v).to_f32();
                let w = if daz && w.is_subnormal() { 0.0 } else { w };
                assert_eq!(*g, w, "{kernel:?} m {m} element {i}");
            }
        }
    }
}

/// A linear quantized to bf16 (what `RolloutWeights::Bf16` does on the CPU) computes exactly
/// the packed product plus its bias: candle's bf16 `QTensor` would round differently.
#[test]
fn a_bf16_rollout_linear_is_the_packed_product() {
    use arpo_model::nn::Linear;
    use candle_core::Module;
    use candle_core::quantized::GgmlDType;
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (k, n) = (1176, 40);
    let w = Tensor::from_vec(values(&mut rng, n * k), (n, k), &dev).unwrap();
    let b = Tensor::from_vec(values(&mut rng, n), n, &dev).unwrap();
    let x = Tensor::from_vec(values(&mut rng, 3 * k), (1, 3, k), &dev).unwrap();
    let mut lin = Linear::new(w.clone(), Some(b.clone()));
    lin.quantize(GgmlDType::BF16).unwrap();
    assert!(lin.is_quantized());
    let q = lin.quantized.as_ref().unwrap();
    assert_eq!(q.format(), GgmlDType::BF16);
    // 40 columns padded to 64, 588 pairs of 4 bytes.
    assert_eq!(q.storage_bytes(), 64 * 588 * 4);
    let got = lin.forward(&x).unwrap().flatten_all().unwrap();
    let want = Bf16Weight::from_tensor(&w)
        .unwrap()
        .forward(&x)
        .unwrap()
        .broadcast_add(&b)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(
        got.to_vec1::<f32>().unwrap(),
        want.to_vec1::<f32>().unwrap()
    );
}

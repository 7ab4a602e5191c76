//! One-pass element-wise kernels for inference on the CPU: LayerNorm, RMSNorm, QuickGELU, the
//! gated SiLU product and a linear's bias. Written with basic candle ops each would take 3-8
//! passes over the activations and as many fresh tensors (the vision tower at 448x448 spent
//! about a fifth of its time there); here each is one pass, rows shared among candle's threads.
//!
//! They have no backward: [`usable`] takes them only where nothing tracks a gradient (no
//! variable and no op behind any operand), on contiguous f32 CPU tensors. The callers in
//! [`crate::nn`] fall back to the differentiable composition otherwise; a test compares the two.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor, bail};

use crate::attention::with_values;

/// Values per unit of work handed to a thread: below two units the work stays on the caller.
const UNIT: usize = 1 << 14;

/// Whether the fused kernels may stand in for the composition on these operands: all on the
/// CPU, f32, contiguous, and none tracking a gradient.
pub(crate) fn usable(operands: &[&Tensor]) -> bool {
    operands.iter().all(|t| {
        t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && !t.track_op()
    })
}

/// Rows of `cols` values of `dst` (and of each source, the same length), in runs of whole
/// rows, each run given to `f` with the same rows of the sources; the runs are shared among
/// candle's threads when there are several.
fn par_rows<const N: usize>(
    srcs: [&[f32]; N],
    dst: &mut [f32],
    cols: usize,
    f: impl Fn([&[f32]; N], &mut [f32]) + Sync,
) {
    debug_assert!(srcs.iter().all(|s| s.len() == dst.len()));
    if cols == 0 || dst.is_empty() {
        return;
    }
    let per_run = UNIT.div_ceil(cols).max(1) * cols;
    if dst.len() < 2 * per_run {
        return f(srcs, dst);
    }
    let runs: Vec<Mutex<&mut [f32]>> = dst.chunks_mut(per_run).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(runs.len(), |range| {
        for i in range {
            let mut run = runs[i]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let start = i * per_run;
            let rows = srcs.map(|s| &s[start..start + run.len()]);
            f(rows, &mut run);
        }
    });
}

/// A new tensor of `x`'s shape whose rows (last dimension) are `f(row of x, row out)`.
fn map_rows(x: &Tensor, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Result<Tensor> {
    let cols = x.dims().last().copied().unwrap_or(1);
    let mut out = vec![0f32; x.elem_count()];
    with_values([x], |[xs]| {
        par_rows([xs], &mut out, cols, |[src], dst| {
            for (s, d) in src.chunks_exact(cols).zip(dst.chunks_exact_mut(cols)) {
                f(s, d);
            }
        });
        Ok(())
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// Lanes of the row sums: independent accumulators the compiler keeps in one vector.
const LANES: usize = 16;

/// `sum(f(v))` over `row`, in [`LANES`] partial sums.
#[inline(always)]
fn row_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// LayerNorm over the last dimension, as [`crate::nn::LayerNorm`] computes it: the mean (summed
/// relative to the row's first value), the variance of the centred values (two passes over the
/// row, not `E[x^2] - mean^2`), then
/// `(x - mean) / sqrt(var + eps) * weight + bias`.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let cols = x.dims().last().copied().unwrap_or(1);
    check_params("LayerNorm", cols, &[weight, bias])?;
    let (w, b) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
    let eps = eps as f32;
    map_rows(x, |row, out| {
        let n = row.len() as f32;
        // Summed relative to the first value: rows far from 0 keep their low bits.
        let shift = row.first().copied().unwrap_or(0.0);
        let mean = shift + row_sum(row, |v| v - shift) / n;
        let var = row_sum(row, |v| (v - mean) * (v - mean)) / n;
        let std = (var + eps).sqrt();
        for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(&w).zip(&b) {
            *o = (v - mean) / std * w + b;
        }
    })
}

/// RMSNorm over the last dimension, as [`crate::nn::RmsNorm`]: `x / sqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let cols = x.dims().last().copied().unwrap_or(1);
    check_params("RMSNorm", cols, &[weight])?;
    let w = weight.to_vec1::<f32>()?;
    let eps = eps as f32;
    map_rows(x, |row, out| {
        let var = row_sum(row, |v| v * v) / row.len() as f32;
        let rms = (var + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(&w) {
            *o = v / rms * w;
        }
    })
}

fn check_params(what: &str, cols: usize, params: &[&Tensor]) -> Result<()> {
    for p in params {
        if p.dims() != [cols] {
            bail!(
                "{what}: a parameter of shape {:?} for rows of {cols}",
                p.dims()
            )
        }
    }
    Ok(())
}

/// `1 / (1 + e^-z)`.
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + crate::attention::exp(-z))
}

/// QuickGELU, `x * sigmoid(1.702 x)`.
pub(crate) fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    map_rows(x, |row, out| {
        for (o, &v) in out.iter_mut().zip(row) {
            *o = v * sigmoid(v * 1.702);
        }
    })
}

/// `silu(gate) * up` (`gate * sigmoid(gate) * up`), the gated MLP's product, for two tensors
/// of one shape.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!(
            "silu(gate) * up: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )
    }
    let cols = gate.dims().last().copied().unwrap_or(1);
    let mut out = vec![0f32; gate.elem_count()];
    with_values([gate, up], |[g, u]| {
        par_rows([g, u], &mut out, cols, |[g, u], o| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
        Ok(())
    })?;
    Tensor::from_vec(out, gate.shape(), gate.device())
}

/// The rotary embedding of the queries (`part` 0) or keys (1) of a vision block's fused
/// projection `qkv` `[n, 3, heads, d]`, by `cos`/`sin` `[n, 1, d]`: `x cos + rotate_half(x) sin`
/// as [`crate::nn::apply_rotary`] computes it (the same roundings: the same values), returned
/// head-major `[heads, n, d]`, the layout the attention reads. One pass instead of the six of
/// the composition and its transpose.
pub(crate) fn rotary_heads(
    qkv: &Tensor,
    part: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (n, three, heads, d) = qkv.dims4()?;
    if three != 3 || part > 1 || d % 2 != 0 || cos.dims() != [n, 1, d] || sin.dims() != [n, 1, d] {
        bail!(
            "rotary: qkv {:?} (part {part}) with cos {:?} and sin {:?}: expected [n, 3, heads, d] \
             with d even and [n, 1, d] twice",
            qkv.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    let half = d / 2;
    let mut out = vec![0f32; heads * n * d];
    with_values([qkv, cos, sin], |[x, c, s]| {
        let per_head: Vec<Mutex<&mut [f32]>> =
            out.chunks_mut((n * d).max(1)).map(Mutex::new).collect();
        let head = |j: usize| {
            let mut dst = per_head[j]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for i in 0..n {
                let src = &x[((i * 3 + part) * heads + j) * d..][..d];
                let (c, s) = (&c[i * d..][..d], &s[i * d..][..d]);
                let o = &mut dst[i * d..][..d];
                for t in 0..half {
                    let (a, b) = (src[t], src[t + half]);
                    o[t] = a * c[t] - b * s[t];
                    o[t + half] = b * c[t + half] + a * s[t + half];
                }
            }
        };
        if n * d * heads < 2 * UNIT {
            (0..heads).for_each(head);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(heads, |range| range.for_each(head));
        }
        Ok(())
    })?;
    Tensor::from_vec(out, (heads, n, d), qkv.device())
}

/// Adds `bias` (one value per column) to every row of `y` in place.
pub(crate) fn add_bias(y: &mut [f32], bias: &[f32]) {
    par_rows([], y, bias.len(), |[], run| {
        for row in run.chunks_exact_mut(bias.len()) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{LayerNorm, RmsNorm};
    use candle_core::Device;

    /// Largest `|a - b| / (1 + |b|)`.
    fn worst(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_eq!(a.len(), b.len());
        Ok(a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max))
    }

    /// `n` values spread around `mean` (`+- 3 spread`), the same on every run: sums of three
    /// uniforms from a xorshift generator.
    fn values_near(n: usize, mean: f32, spread: f32, seed: u64) -> Vec<f32> {
        let mut state = seed.max(1);
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        (0..n)
            .map(|_| mean + 2.0 * spread * (uniform() + uniform() + uniform()))
            .collect()
    }

    /// Rows long enough to be shared among threads, around a large mean (where
    /// `E[x^2] - mean^2` would lose the variance); weights around 1, biases around 0.
    fn inputs(rows: usize, cols: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values_near(rows * cols, 100.0, 1.0, 7), (rows, cols), &dev)?;
        let w = Tensor::from_vec(values_near(cols, 1.0, 0.5, 11), cols, &dev)?;
        let b = Tensor::from_vec(values_near(cols, 0.0, 0.5, 13), cols, &dev)?;
        Ok((x, w, b))
    }

    /// The norms in f64 from the rows of `x`: `(layer norm, rms norm)`.
    fn norms_f64(x: &Tensor, w: &[f32], b: &[f32], eps: f64) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut ln, mut rms) = (Vec::new(), Vec::new());
        for row in x.to_vec2::<f32>()? {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n;
            for ((&v, &w), &b) in row.iter().zip(w).zip(b) {
                let v = f64::from(v);
                ln.push(((v - mean) / (var + eps).sqrt() * f64::from(w) + f64::from(b)) as f32);
                rms.push((v / (ms + eps).sqrt() * f64::from(w)) as f32);
            }
        }
        Ok((ln, rms))
    }

    /// Against the norms in f64. LayerNorm: `x - mean` of values near 100 is off by up to
    /// half an ulp of 100 (3.8e-6), over a standard deviation near 1 and times a weight below
    /// 2.5: 1e-5 with the other roundings. RMSNorm: a few ulps of each output.
    #[test]
    fn norms_match_f64() -> Result<()> {
        for (rows, cols) in [(1, 7), (3, 1280), (70, 1536)] {
            let (x, w, b) = inputs(rows, cols)?;
            assert!(usable(&[&x, &w, &b]));
            let (wv, bv) = (w.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
            let (ln64, rms64) = norms_f64(&x, &wv, &bv, 1e-6)?;
            let ln64 = Tensor::from_vec(ln64, (rows, cols), &Device::Cpu)?;
            let rms64 = Tensor::from_vec(rms64, (rows, cols), &Device::Cpu)?;
            let err = worst(&layer_norm(&x, &w, &b, 1e-6)?, &ln64)?;
            assert!(err < 1e-5, "LayerNorm {rows}x{cols}: {err}");
            let err = worst(&rms_norm(&x, &w, 1e-6)?, &rms64)?;
            assert!(err < 1e-6, "RMSNorm {rows}x{cols}: {err}");
            // The composition the kernels stand in for agrees with both.
            let ln = LayerNorm::new(w.clone(), b.clone(), 1e-6).forward_composite(&x)?;
            assert!(worst(&ln, &ln64)? < 1e-4);
            let rms = RmsNorm::new(w.clone(), 1e-6).forward_composite(&x)?;
            assert!(worst(&rms, &rms64)? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn activations_match_their_composition() -> Result<()> {
        let dev = Device::Cpu;
        // -100..100 in steps covering the saturated ends and 0, 40 rows of 1000.
        let xs: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 200.0).collect();
        let x = Tensor::from_vec(xs, (40, 1000), &dev)?;
        let want = (&x * candle_nn::ops::sigmoid(&(&x * 1.702)?)?)?;
        assert!(worst(&quick_gelu(&x)?, &want)? < 1e-6);
        let up = Tensor::randn(0f32, 1.0, (40, 1000), &dev)?;
        let want = (candle_nn::ops::silu(&x)? * &up)?;
        assert!(worst(&silu_mul(&x, &up)?, &want)? < 1e-6);
        assert!(silu_mul(&x, &up.narrow(1, 0, 10)?).is_err());
        Ok(())
    }

    /// The same values as the composition, bit for bit.
    #[test]
    fn rotary_heads_equal_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        for (n, heads, d) in [(3, 2, 4), (256, 16, 80)] {
            let qkv = Tensor::from_vec(
                values_near(n * 3 * heads * d, 0.0, 1.0, 5),
                (n, 3, heads, d),
                &dev,
            )?;
            let angles = Tensor::from_vec(values_near(n * d, 0.0, 3.0, 9), (n, 1, d), &dev)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            for part in 0..2 {
                let x = qkv.narrow(1, part, 1)?.squeeze(1)?;
                let want = crate::nn::apply_rotary(&x, &cos, &sin)?.transpose(0, 1)?;
                let got = rotary_heads(&qkv, part, &cos, &sin)?;
                assert_eq!(got.dims(), &[heads, n, d]);
                let (got, want) = (
                    got.flatten_all()?.to_vec1::<f32>()?,
                    want.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
                );
                assert_eq!(got, want, "{n}x{heads}x{d} part {part}");
            }
        }
        assert!(
            rotary_heads(
                &Tensor::zeros((2, 3, 1, 3), DType::F32, &dev)?,
                0,
                &Tensor::zeros((2, 1, 3), DType::F32, &dev)?,
                &Tensor::zeros((2, 1, 3), DType::F32, &dev)?
            )
            .is_err()
        );
        Ok(())
    }

    #[test]
    fn bias_is_added_to_every_row() {
        let mut y: Vec<f32> = (0..40_000).map(|i| i as f32).collect();
        let bias: Vec<f32> = (0..100).map(|j| -(j as f32)).collect();
        add_bias(&mut y, &bias);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i - i % 100) as f32);
        }
    }

    #[test]
    fn tracked_operands_take_the_composition() -> Result<()> {
        let (x, w, _) = inputs(2, 8)?;
        let v = candle_core::Var::from_tensor(&w)?;
        assert!(!usable(&[&x, v.as_tensor()]));
        assert!(!usable(&[&x.t()?]));
        assert!(!usable(&[&x.to_dtype(DType::BF16)?]));
        Ok(())
    }
}

//! Differentiable building blocks for training on candle.
//!
//! candle's fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rope` have no backward: a
//! graph through them trains nothing upstream (see `CANDLE-TRAPS.md`). Each function here runs
//! the fused forward and carries an analytic backward (a `CustomOp`). Each op's forward is written
//! once over plain tensors and runs on every device candle has (CPU, CUDA, Metal: candle's own
//! fused kernels there, through `OpStorage`); the backward passes are compositions of candle
//! ops, device-generic too. Nothing is copied to the CPU.
//!
//! [`linear`] is the other half of the story: when the weight is frozen (not a `Var` and not the
//! output of a tracked op) the product goes through a custom op whose backward returns only the
//! input gradient, so a frozen base costs no weight-gradient memory or compute and never appears
//! in the `GradStore`.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, MetalStorage,
    Result, Shape, Storage, Tensor, bail,
};

/// Number of elements held by a CPU storage.
fn cpu_len(s: &CpuStorage) -> Result<usize> {
    Ok(match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::U32(v) => v.len(),
        CpuStorage::I64(v) => v.len(),
        CpuStorage::U8(v) => v.len(),
        _ => bail!("train op: unsupported storage dtype"),
    })
}

/// A plain (untracked) tensor over a copy of `storage` viewed through `layout`.
pub(crate) fn untracked(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let len = cpu_len(storage)?;
    let full = Tensor::from_storage(
        Storage::Cpu(storage.clone()),
        len,
        BackpropOp::none(),
        false,
    );
    match layout.contiguous_offsets() {
        Some((start, end)) => full.narrow(0, start, end - start)?.reshape(layout.shape()),
        None => bail!("train op: expected a contiguous input, got {:?}", layout),
    }
}

/// The CPU storage of `t` (made contiguous and exactly sized) and its shape.
pub(crate) fn into_storage(t: &Tensor) -> Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let shape = t.shape().clone();
    let exact = {
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => match l.contiguous_offsets() {
                Some((0, end)) if end == cpu_len(c)? => Some(c.clone()),
                _ => None,
            },
            _ => bail!("train op: expected a cpu tensor"),
        }
    };
    match exact {
        Some(c) => Ok((c, shape)),
        None => {
            // A view into a larger buffer: copy it into a buffer of its own.
            let copy = t.flatten_all()?.copy()?.affine(1.0, 0.0)?;
            let (s, _) = copy.storage_and_layout();
            match &*s {
                Storage::Cpu(c) => Ok((c.clone(), shape)),
                _ => bail!("train op: expected a cpu tensor"),
            }
        }
    }
}

/// The storage of one device kind (CPU, CUDA, Metal): the seam through which a custom op's
/// forward, written over plain tensors, runs on any device. Without the `cuda`/`metal` features
/// candle's stand-in storages take these places (and are never reached).
pub(crate) trait OpStorage: BackendStorage {
    fn wrap(self) -> Storage;
    fn of(s: &Storage) -> Option<&Self>;
}

impl OpStorage for CpuStorage {
    fn wrap(self) -> Storage {
        Storage::Cpu(self)
    }
    fn of(s: &Storage) -> Option<&Self> {
        match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        }
    }
}

impl OpStorage for CudaStorage {
    fn wrap(self) -> Storage {
        Storage::Cuda(self)
    }
    fn of(s: &Storage) -> Option<&Self> {
        match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }
}

impl OpStorage for MetalStorage {
    fn wrap(self) -> Storage {
        Storage::Metal(self)
    }
    fn of(s: &Storage) -> Option<&Self> {
        match s {
            Storage::Metal(c) => Some(c),
            _ => None,
        }
    }
}

/// A plain (untracked) tensor over a device storage viewed through `layout` (CUDA: a device
/// copy of the buffer; Metal: the same buffer).
pub(crate) fn tensor_on<S: OpStorage>(storage: &S, layout: &Layout) -> Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("train op: expected a contiguous input, got {:?}", layout)
    };
    let full = Tensor::from_storage(
        storage.try_clone(layout)?.wrap(),
        end,
        BackpropOp::none(),
        false,
    );
    full.narrow(0, start, end - start)?.reshape(layout.shape())
}

/// The device storage of `t` (contiguous, starting at the buffer's first element) and its shape.
pub(crate) fn storage_on<S: OpStorage>(t: &Tensor) -> Result<(S, Shape)> {
    let mut t = t.contiguous()?;
    if t.layout().start_offset() != 0 {
        // A view into a larger buffer: copy it into a buffer of its own.
        t = t
            .flatten_all()?
            .copy()?
            .affine(1.0, 0.0)?
            .reshape(t.shape())?;
    }
    let shape = t.shape().clone();
    let (s, l) = t.storage_and_layout();
    match S::of(&s) {
        Some(s) => Ok((s.try_clone(l)?, shape)),
        None => bail!("train op: the result is on another device than the input"),
    }
}

/// `cpu_fwd`, `cuda_fwd` and `metal_fwd` of a custom op from its forward over plain tensors,
/// `fn run(&self, inputs: &[&Tensor; N]) -> Result<Tensor>`.
macro_rules! device_forwards {
    (1) => {
        fn cpu_fwd(
            &self,
            s: &::candle_core::CpuStorage,
            l: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::CpuStorage, ::candle_core::Shape)> {
            $crate::train::ops::into_storage(&self.run([&$crate::train::ops::untracked(s, l)?])?)
        }
        fn cuda_fwd(
            &self,
            s: &::candle_core::CudaStorage,
            l: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::CudaStorage, ::candle_core::Shape)> {
            $crate::train::ops::storage_on(&self.run([&$crate::train::ops::tensor_on(s, l)?])?)
        }
        fn metal_fwd(
            &self,
            s: &::candle_core::MetalStorage,
            l: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::MetalStorage, ::candle_core::Shape)> {
            $crate::train::ops::storage_on(&self.run([&$crate::train::ops::tensor_on(s, l)?])?)
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            s1: &::candle_core::CpuStorage,
            l1: &::candle_core::Layout,
            s2: &::candle_core::CpuStorage,
            l2: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::CpuStorage, ::candle_core::Shape)> {
            {
                use $crate::train::ops::{into_storage, untracked};
                into_storage(&self.run([&untracked(s1, l1)?, &untracked(s2, l2)?])?)
            }
        }
        fn cuda_fwd(
            &self,
            s1: &::candle_core::CudaStorage,
            l1: &::candle_core::Layout,
            s2: &::candle_core::CudaStorage,
            l2: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::CudaStorage, ::candle_core::Shape)> {
            use $crate::train::ops::{storage_on, tensor_on};
            storage_on(&self.run([&tensor_on(s1, l1)?, &tensor_on(s2, l2)?])?)
        }
        fn metal_fwd(
            &self,
            s1: &::candle_core::MetalStorage,
            l1: &::candle_core::Layout,
            s2: &::candle_core::MetalStorage,
            l2: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::MetalStorage, ::candle_core::Shape)> {
            use $crate::train::ops::{storage_on, tensor_on};
            storage_on(&self.run([&tensor_on(s1, l1)?, &tensor_on(s2, l2)?])?)
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            s1: &::candle_core::CpuStorage,
            l1: &::candle_core::Layout,
            s2: &::candle_core::CpuStorage,
            l2: &::candle_core::Layout,
            s3: &::candle_core::CpuStorage,
            l3: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::CpuStorage, ::candle_core::Shape)> {
            use $crate::train::ops::{into_storage, untracked};
            into_storage(&self.run([
                &untracked(s1, l1)?,
                &untracked(s2, l2)?,
                &untracked(s3, l3)?,
            ])?)
        }
        fn cuda_fwd(
            &self,
            s1: &::candle_core::CudaStorage,
            l1: &::candle_core::Layout,
            s2: &::candle_core::CudaStorage,
            l2: &::candle_core::Layout,
            s3: &::candle_core::CudaStorage,
            l3: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::CudaStorage, ::candle_core::Shape)> {
            use $crate::train::ops::{storage_on, tensor_on};
            storage_on(&self.run([
                &tensor_on(s1, l1)?,
                &tensor_on(s2, l2)?,
                &tensor_on(s3, l3)?,
            ])?)
        }
        fn metal_fwd(
            &self,
            s1: &::candle_core::MetalStorage,
            l1: &::candle_core::Layout,
            s2: &::candle_core::MetalStorage,
            l2: &::candle_core::Layout,
            s3: &::candle_core::MetalStorage,
            l3: &::candle_core::Layout,
        ) -> ::candle_core::Result<(::candle_core::MetalStorage, ::candle_core::Shape)> {
            use $crate::train::ops::{storage_on, tensor_on};
            storage_on(&self.run([
                &tensor_on(s1, l1)?,
                &tensor_on(s2, l2)?,
                &tensor_on(s3, l3)?,
            ])?)
        }
    };
}
pub(crate) use device_forwards;

/// Contiguous copy of a tensor on the same device, for feeding custom ops.
fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Whether a gradient must be computed for `t`: it is a `Var` or depends on one.
fn wants_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// Computes in f32 for half-precision inputs, as the fused kernels do.
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

// ---------------------------------------------------------------------------------------------
// softmax over the last dimension

struct SoftmaxLastDim;

impl SoftmaxLastDim {
    fn run(&self, [x]: [&Tensor; 1]) -> Result<Tensor> {
        candle_nn::ops::softmax_last_dim(x)
    }
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "arpo-softmax-last-dim"
    }

    device_forwards!(1);

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = y * (g - sum(g * y))
        let dt = compute_dtype(res.dtype());
        let y = res.to_dtype(dt)?;
        let g = grad.to_dtype(dt)?;
        let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let dx = (g.broadcast_sub(&dot)? * y)?;
        Ok(Some(dx.to_dtype(res.dtype())?))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    contiguous(x)?.apply_op1(SoftmaxLastDim)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn run(&self, [x, w]: [&Tensor; 2]) -> Result<Tensor> {
        if x.dtype() == DType::F64 {
            // The fused kernel has no f64 path.
            candle_nn::ops::rms_norm_slow(x, w, self.eps)
        } else {
            candle_nn::ops::rms_norm(x, w, self.eps)
        }
    }
}

/// 1 / sqrt(mean(x^2) + eps) over the last dimension, keepdim.
fn inv_rms(x: &Tensor, eps: f32) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    ((x.sqr()?.sum_keepdim(D::Minus1)? / n)? + eps as f64)?
        .sqrt()?
        .recip()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "arpo-rms-norm"
    }

    device_forwards!(2);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dt = compute_dtype(x.dtype());
        let xf = x.to_dtype(dt)?;
        let wf = w.to_dtype(dt)?;
        let g = grad.to_dtype(dt)?;
        let r = inv_rms(&xf, self.eps)?;
        let n = x.dim(D::Minus1)? as f64;
        let dx = if wants_grad(x) {
            // u = g * w; dx = r * u - x * r^3 * mean(u * x)
            let u = g.broadcast_mul(&wf)?;
            let m = ((&u * &xf)?.sum_keepdim(D::Minus1)? / n)?;
            let dx = (u.broadcast_mul(&r)? - xf.broadcast_mul(&(r.powf(3.0)? * m)?)?)?;
            Some(dx.to_dtype(x.dtype())?)
        } else {
            None
        };
        let dw = if wants_grad(w) {
            let xhat = xf.broadcast_mul(&r)?;
            let last = x.rank() - 1;
            let dw = (g * xhat)?
                .reshape(((), x.dim(last)?))?
                .sum(0)?
                .to_dtype(w.dtype())?;
            Some(dw)
        } else {
            None
        };
        let _ = res;
        Ok((dx, dw))
    }
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x^2) + eps) * w`, differentiable in `x` and
/// (when it is trainable) `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    contiguous(x)?.apply_op2(&contiguous(w)?, RmsNorm { eps })
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNorm {
    eps: f32,
}

impl LayerNorm {
    fn run(&self, [x, w, b]: [&Tensor; 3]) -> Result<Tensor> {
        if x.dtype() == DType::F64 {
            candle_nn::ops::layer_norm_slow(x, w, b, self.eps)
        } else {
            candle_nn::ops::layer_norm(x, w, b, self.eps)
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "arpo-layer-norm"
    }

    device_forwards!(3);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dt = compute_dtype(x.dtype());
        let n = x.dim(D::Minus1)?;
        let xf = x.to_dtype(dt)?;
        let g = grad.to_dtype(dt)?;
        let mean = (xf.sum_keepdim(D::Minus1)? / n as f64)?;
        let xc = xf.broadcast_sub(&mean)?;
        let r = inv_rms(&xc, self.eps)?;
        let xhat = xc.broadcast_mul(&r)?;
        let dx = if wants_grad(x) {
            // u = g * w; dx = r * (u - mean(u) - xhat * mean(u * xhat))
            let u = g.broadcast_mul(&w.to_dtype(dt)?)?;
            let mu = (u.sum_keepdim(D::Minus1)? / n as f64)?;
            let muh = ((&u * &xhat)?.sum_keepdim(D::Minus1)? / n as f64)?;
            let dx = (u.broadcast_sub(&mu)? - xhat.broadcast_mul(&muh)?)?.broadcast_mul(&r)?;
            Some(dx.to_dtype(x.dtype())?)
        } else {
            None
        };
        let dw = if wants_grad(w) {
            let dw = (&g * &xhat)?.reshape(((), n))?.sum(0)?;
            Some(dw.to_dtype(w.dtype())?)
        } else {
            None
        };
        let db = if wants_grad(b) {
            Some(g.reshape(((), n))?.sum(0)?.to_dtype(b.dtype())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// LayerNorm over the last dimension, differentiable in `x` and (when trainable) `w` and `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    contiguous(x)?.apply_op3(&contiguous(w)?, &contiguous(b)?, LayerNorm { eps })
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (non-interleaved halves, as Qwen2 / Qwen2-VL use)

struct Rope;

impl Rope {
    fn run(&self, [x, cos, sin]: [&Tensor; 3]) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(x, cos, sin)
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "arpo-rope"
    }

    device_forwards!(3);

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if wants_grad(cos) || wants_grad(sin) {
            bail!("rope: gradients with respect to cos/sin are not supported, detach them")
        }
        // The rotation by +theta has the rotation by -theta as its transpose.
        let g = grad.contiguous()?;
        let neg_sin = sin.neg()?.contiguous()?;
        let dx = candle_nn::rotary_emb::rope(&g, &cos.contiguous()?, &neg_sin)?;
        Ok((Some(dx.to_dtype(x.dtype())?), None, None))
    }
}

/// Rotary embedding over halves (`rotate_half`), `x: (b, h, t, d)`, `cos`/`sin`: `(t, d/2)` or
/// `(b, t, d/2)`; the same contract as `candle_nn::rotary_emb::rope`, differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = contiguous(&cos.detach())?;
    let sin = contiguous(&sin.detach())?;
    contiguous(x)?.apply_op3(&cos, &sin, Rope)
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// `x @ w^T + b` for a frozen `w`/`b`: only the input gradient flows back.
struct FrozenLinear {
    w: Tensor,
    b: Option<Tensor>,
}

impl FrozenLinear {
    fn run(&self, [x]: [&Tensor; 1]) -> Result<Tensor> {
        let (w, b) = (&self.w, self.b.as_ref());
        linear_untracked(x, w, b)
    }
}

/// Plain forward of `x @ w^T + b` over any leading dimensions.
fn linear_untracked(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let in_dim = x.dim(D::Minus1)?;
    let mut out_shape = x.dims().to_vec();
    let last = out_shape.len() - 1;
    out_shape[last] = w.dim(0)?;
    let y = x.reshape(((), in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_shape)
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "arpo-frozen-linear"
    }

    device_forwards!(1);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = self.w.dim(0)?;
        let dx = grad
            .reshape(((), out))?
            .matmul(&self.w)?
            .reshape(x.shape())?;
        Ok(Some(dx))
    }
}

/// `x @ w^T + b` with `w: (out, in)`, over any leading dimensions of `x`.
///
/// Trainable weights (a `Var`, or anything depending on one) take candle's ordinary
/// differentiable path. Frozen ones take a custom op whose backward computes only the input
/// gradient: no weight gradient is computed or stored.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let params_trainable = wants_grad(w) || b.is_some_and(wants_grad);
    if params_trainable {
        let in_dim = x.dim(D::Minus1)?;
        let mut out_shape = x.dims().to_vec();
        let last = out_shape.len() - 1;
        out_shape[last] = w.dim(0)?;
        let y = x.reshape(((), in_dim))?.matmul(&w.t()?)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        return y.reshape(out_shape);
    }
    if !wants_grad(x) {
        // Nothing to differentiate through.
        return linear_untracked(x, &w.detach(), b.map(|b| b.detach()).as_ref());
    }
    let op = FrozenLinear {
        w: w.detach(),
        b: b.map(|b| b.detach()),
    };
    contiguous(x)?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values in [-1, 1) without touching candle's global RNG.
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("test tensor")
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .expect("same shapes")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flatten")
            .max(0)
            .expect("max")
            .to_scalar::<f64>()
            .expect("scalar")
    }

    /// Sum of `y * proj` as the scalar loss: its gradient is `proj`, a non-trivial upstream grad.
    fn loss(y: &Tensor, proj: &Tensor) -> Tensor {
        (y * proj).expect("mul").sum_all().expect("sum")
    }

    /// Checks value and gradients of `fast` against `slow` (candle's differentiable reference)
    /// for all variables, in f64.
    fn check_against_slow(
        vars: &[Var],
        fast: impl Fn(&[Tensor]) -> Result<Tensor>,
        slow: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f64,
    ) {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fast(&ts).expect("fast forward");
        let ys = slow(&ts).expect("slow forward");
        assert!(max_abs_diff(&yf, &ys) < tol, "forward differs");
        let proj = randn(yf.dims(), 99);
        let gf = loss(&yf, &proj).backward().expect("fast backward");
        let gs = loss(&ys, &proj).backward().expect("slow backward");
        for (i, v) in vars.iter().enumerate() {
            let a = gf.get(v).expect("fast grad present");
            let b = gs.get(v).expect("slow grad present");
            let d = max_abs_diff(a, b);
            assert!(d < tol, "grad of var {i} differs by {d}");
            let norm = a
                .sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f64>());
            assert!(norm.expect("norm") > 0.0, "grad of var {i} is zero");
        }
    }

    /// The device path (`cuda_fwd`/`metal_fwd`) goes through `tensor_on`/`storage_on`; the same
    /// generic code runs here over CPU storage, views with offsets included.
    #[test]
    fn device_storage_round_trip_keeps_views_and_values() -> Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::arange(0f32, 24., &dev)?.reshape((4, 6))?;
        let view = base.narrow(0, 1, 2)?; // rows 1..3: a contiguous view at offset 6
        let (s, l) = view.storage_and_layout();
        let Storage::Cpu(c) = &*s else {
            panic!("cpu storage")
        };
        let t = tensor_on(c, l)?;
        assert_eq!(t.to_vec2::<f32>()?, view.to_vec2::<f32>()?);
        let (out, shape) = storage_on::<CpuStorage>(&view)?;
        assert_eq!(shape.dims(), &[2, 6]);
        let back = Tensor::from_storage(Storage::Cpu(out), shape, BackpropOp::none(), false);
        assert_eq!(back.to_vec2::<f32>()?, view.to_vec2::<f32>()?);
        // An op's forward through the device path equals its CPU forward.
        let x = randn(&[3, 5], 7);
        let w = randn(&[5], 8);
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (Storage::Cpu(cx), Storage::Cpu(cw)) = (&*sx, &*sw) else {
            panic!("cpu storage")
        };
        let op = RmsNorm { eps: 1e-6 };
        let (dev_out, shape) =
            storage_on::<CpuStorage>(&op.run([&tensor_on(cx, lx)?, &tensor_on(cw, lw)?])?)?;
        let (cpu_out, _) = op.cpu_fwd(cx, lx, cw, lw)?;
        let a = Tensor::from_storage(
            Storage::Cpu(dev_out),
            shape.clone(),
            BackpropOp::none(),
            false,
        );
        let b = Tensor::from_storage(Storage::Cpu(cpu_out), shape, BackpropOp::none(), false);
        assert_eq!(
            a.flatten_all()?.to_vec1::<f64>()?,
            b.flatten_all()?.to_vec1::<f64>()?
        );
        Ok(())
    }

    #[test]
    fn softmax_matches_candle_slow_softmax_and_its_gradient() {
        let x = Var::from_tensor(&(randn(&[3, 4, 7], 1) * 3.0).expect("scale")).expect("var");
        check_against_slow(
            &[x],
            |t| softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
            1e-12,
        );
    }

    #[test]
    fn rms_norm_matches_rms_norm_slow_in_input_and_weight() {
        let x = Var::from_tensor(&randn(&[2, 5, 8], 2)).expect("var");
        let w = Var::from_tensor(&(randn(&[8], 3) + 1.5).expect("shift")).expect("var");
        check_against_slow(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], 1e-6),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-6),
            1e-12,
        );
    }

    #[test]
    fn layer_norm_matches_layer_norm_slow_in_input_weight_and_bias() {
        let x = Var::from_tensor(&(randn(&[3, 6, 10], 4) * 2.0).expect("scale")).expect("var");
        let w = Var::from_tensor(&(randn(&[10], 5) + 1.0).expect("shift")).expect("var");
        let b = Var::from_tensor(&randn(&[10], 6)).expect("var");
        check_against_slow(
            &[x, w, b],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-6),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-6),
            1e-12,
        );
    }

    #[test]
    fn rope_matches_rope_slow_and_its_gradient() {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 8], 7)).expect("var");
        let angles = randn(&[5, 4], 8);
        let cos = angles.cos().expect("cos");
        let sin = angles.sin().expect("sin");
        check_against_slow(
            &[x],
            |t| rope(&t[0], &cos, &sin),
            |t| candle_nn::rotary_emb::rope_slow(&t[0], &cos, &sin),
            1e-12,
        );
    }

    #[test]
    fn rope_with_per_batch_tables_matches_rope_slow_per_batch() {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 8], 9)).expect("var");
        let angles = randn(&[2, 5, 4], 10);
        let cos = angles.cos().expect("cos");
        let sin = angles.sin().expect("sin");
        let slow = |t: &[Tensor]| -> Result<Tensor> {
            let parts = (0..2)
                .map(|i| {
                    candle_nn::rotary_emb::rope_slow(
                        &t[0].narrow(0, i, 1)?,
                        &cos.get(i)?,
                        &sin.get(i)?,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        check_against_slow(&[x], |t| rope(&t[0], &cos, &sin), slow, 1e-12);
    }

    #[test]
    fn rms_norm_input_gradient_matches_finite_differences() {
        // Independent of candle's reference: central differences of the scalar loss.
        let x0 = randn(&[2, 6], 11);
        let w = (randn(&[6], 12) + 1.0).expect("w");
        let proj = randn(&[2, 6], 13);
        let x = Var::from_tensor(&x0).expect("var");
        let g = loss(&rms_norm(x.as_tensor(), &w, 1e-6).expect("fwd"), &proj)
            .backward()
            .expect("bwd");
        let analytic: Vec<f64> = g
            .get(&x)
            .expect("grad")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        let base: Vec<f64> = x0.flatten_all().expect("flat").to_vec1().expect("vec");
        let h = 1e-6;
        for i in 0..base.len() {
            let f = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let xt = Tensor::from_vec(v, (2, 6), &Device::Cpu).expect("t");
                loss(&rms_norm(&xt, &w, 1e-6).expect("fwd"), &proj)
                    .to_scalar::<f64>()
                    .expect("scalar")
            };
            let numeric = (f(h) - f(-h)) / (2.0 * h);
            assert!((numeric - analytic[i]).abs() < 1e-6, "element {i}");
        }
    }

    #[test]
    fn frozen_linear_gives_input_gradient_and_no_weight_entry() {
        let x = Var::from_tensor(&randn(&[2, 3, 4], 20)).expect("var");
        let w = randn(&[5, 4], 21);
        let b = randn(&[5], 22);
        let proj = randn(&[2, 3, 5], 23);
        let y = linear(x.as_tensor(), &w, Some(&b)).expect("fwd");
        // Reference: the plain product with the weights as trainable Vars.
        let wv = Var::from_tensor(&w).expect("var");
        let bv = Var::from_tensor(&b).expect("var");
        let y_ref = x
            .as_tensor()
            .broadcast_matmul(&wv.as_tensor().t().expect("t"))
            .and_then(|t| t.broadcast_add(bv.as_tensor()))
            .expect("ref");
        assert!(max_abs_diff(&y, &y_ref) < 1e-12);
        let g = loss(&y, &proj).backward().expect("bwd");
        let g_ref = loss(&y_ref, &proj).backward().expect("bwd");
        let dx = g.get(&x).expect("input grad");
        assert!(max_abs_diff(dx, g_ref.get(&x).expect("ref grad")) < 1e-12);
        assert!(
            g.get(&w).is_none(),
            "frozen weight must have no GradStore entry"
        );
        assert!(
            g.get(&b).is_none(),
            "frozen bias must have no GradStore entry"
        );
        // The GradStore holds x, the output, and nothing else.
        assert_eq!(g.get_ids().count(), 2);
    }

    #[test]
    fn linear_with_trainable_weight_gets_weight_gradient() {
        let x = randn(&[3, 4], 30);
        let w = Var::from_tensor(&randn(&[2, 4], 31)).expect("var");
        let y = linear(&x, w.as_tensor(), None).expect("fwd");
        let g = y.sum_all().expect("sum").backward().expect("bwd");
        // d(sum(x w^T))/dw[o, i] = sum over rows of x[:, i], for every output o.
        let col_sums: Vec<f64> = x.sum(0).expect("sum").to_vec1().expect("vec");
        let dw: Vec<Vec<f64>> = g.get(&w).expect("grad").to_vec2().expect("vec");
        for row in dw {
            for (a, b) in row.iter().zip(&col_sums) {
                assert!((a - b).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn custom_ops_work_in_f32() {
        let x =
            Var::from_tensor(&randn(&[4, 8], 40).to_dtype(DType::F32).expect("f32")).expect("var");
        let w = (randn(&[8], 41) + 1.0)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("w");
        let y = rms_norm(x.as_tensor(), &w, 1e-6).expect("fwd");
        let y_ref = candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-6).expect("ref");
        let d = (y - y_ref)
            .and_then(|t| t.abs())
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("diff");
        assert!(d < 1e-5);
    }
}

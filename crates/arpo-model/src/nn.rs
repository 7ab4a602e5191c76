//! The building blocks every projection and norm of the model goes through.
//!
//! All forwards here use ops that have a backward in candle 0.11 (see CANDLE-TRAPS.md), so the
//! whole-sequence forward is differentiable. The training code extends these types (LoRA,
//! frozen-weight ops); keep every linear projection of the model a [`Linear`].

use candle_core::quantized::GgmlDType;
use candle_core::{D, DType, Module, Result, Tensor};

use crate::quantized::QuantizedWeight;

use crate::train::lora::LoraAdapter;

/// `y = x W^T + b`, weight `[out, in]` as stored by PyTorch.
///
/// With a LoRA adapter attached (by `train::trainable::Trainable::lora`), the output is
/// `x W^T + b + scale * dropout(x) A^T B^T`. A frozen weight (a plain tensor, not a `Var`) goes
/// through [`crate::train::ops::linear`], which computes no weight gradient in backward.
///
/// In a rollout copy ([`crate::Qwen2Vl::to_rollout`]) the weight lives in `quantized` and
/// `weight` is a shape-only placeholder: that product is for inference (no backward).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    pub quantized: Option<QuantizedWeight>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            quantized: None,
        }
    }

    /// Whether the weight is held quantized (and `weight` is only a placeholder of its shape).
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    /// Stores the weight as `format` and drops the dense one (for inference copies only).
    pub fn quantize(&mut self, format: GgmlDType) -> Result<()> {
        let q = QuantizedWeight::quantize(&self.weight, format)?;
        // One element broadcast to the shape: `dims()` and the dtype stay, the bytes go.
        let w = &self.weight;
        self.weight = Tensor::zeros((), w.dtype(), w.device())?.broadcast_as(w.shape())?;
        self.quantized = Some(q);
        Ok(())
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d.get(1).copied().unwrap_or(1))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.quantized {
            Some(q) => q.forward_biased(x, self.bias.as_ref())?,
            None => crate::train::ops::linear(x, &self.weight, self.bias.as_ref())?,
        };
        match &self.lora {
            Some(adapter) => y + adapter.forward_delta(x)?,
            None => Ok(y),
        }
    }
}

/// The trained tensors of a linear layer: its weight and bias when they are `Var`s, and its
/// LoRA adapter's A and B.
pub fn trainable_of_linear(l: &Linear) -> Vec<Tensor> {
    let mut out = Vec::new();
    if l.weight.is_variable() {
        out.push(l.weight.clone());
    }
    if let Some(b) = l.bias.as_ref().filter(|b| b.is_variable()) {
        out.push(b.clone());
    }
    if let Some(a) = &l.lora {
        out.push(a.a.as_tensor().clone());
        out.push(a.b.as_tensor().clone());
    }
    out
}

/// RMSNorm in f32, written with basic ops (differentiable): `x / sqrt(mean(x^2) + eps) * w`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The differentiable composition (any device and dtype); [`Module::forward`] takes the
    /// one-pass kernel ([`crate::fused`]) where nothing tracks a gradient.
    pub(crate) fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::usable(&[x, &self.weight]) {
            return crate::fused::rms_norm(x, &self.weight, self.eps);
        }
        self.forward_composite(x)
    }
}

/// LayerNorm with weight and bias, written with basic ops (differentiable).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// The differentiable composition (any device and dtype); [`Module::forward`] takes the
    /// one-pass kernel ([`crate::fused`]) where nothing tracks a gradient.
    pub(crate) fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::usable(&[x, &self.weight, &self.bias]) {
            return crate::fused::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        self.forward_composite(x)
    }
}

/// QuickGELU, `x * sigmoid(1.702 x)` (the ViT MLP's activation).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if crate::fused::usable(&[x]) {
        return crate::fused::quick_gelu(x);
    }
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// `silu(gate) * up`, the gated MLP's product.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::fused::usable(&[gate, up]) {
        return crate::fused::silu_mul(gate, up);
    }
    candle_nn::ops::silu(gate)? * up
}

/// `rotate_half`: `[x1, x2] -> [-x2, x1]` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding with basic ops: `x * cos + rotate_half(x) * sin` (cos/sin broadcast to x).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn linear_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        // W = [[1,2],[3,4],[5,6]], b = [0.5, 0, -1], x = [1, -1] -> [-0.5, -1, -2]
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
        let b = Tensor::new(&[0.5f32, 0., -1.], &dev)?;
        let lin = Linear::new(w, Some(b));
        let y = lin.forward(&Tensor::new(&[[[1f32, -1.]]], &dev)?)?;
        assert_eq!(y.dims(), &[1, 1, 3]);
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![-0.5, -1.0, -2.0]);
        Ok(())
    }

    #[test]
    fn norms_match_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 4.]], &dev)?;
        // rms = sqrt((9+16)/2) = sqrt(12.5); eps 0.
        let rms = RmsNorm::new(Tensor::new(&[1f32, 2.], &dev)?, 0.0).forward(&x)?;
        let r = 12.5f32.sqrt();
        let got = rms.flatten_all()?.to_vec1::<f32>()?;
        assert!((got[0] - 3.0 / r).abs() < 1e-6 && (got[1] - 8.0 / r).abs() < 1e-6);
        // mean 3.5, var 0.25 -> [-1, 1] * w + b
        let ln = LayerNorm::new(
            Tensor::new(&[2f32, 3.], &dev)?,
            Tensor::new(&[1f32, 0.], &dev)?,
            0.0,
        )
        .forward(&x)?;
        assert_eq!(ln.flatten_all()?.to_vec1::<f32>()?, vec![-1.0, 3.0]);
        Ok(())
    }

    #[test]
    fn forwards_are_differentiable() -> Result<()> {
        let dev = Device::Cpu;
        let w = candle_core::Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev)?;
        let g = candle_core::Var::new(&[1.5f32, 0.5], &dev)?;
        let lin = Linear::new(w.as_tensor().clone(), None);
        let norm = RmsNorm::new(g.as_tensor().clone(), 1e-6);
        let x = Tensor::new(&[[1f32, 2.0]], &dev)?;
        let y = quick_gelu(&norm.forward(&lin.forward(&x)?)?)?;
        let grads = y.sum_all()?.backward()?;
        for v in [&w, &g] {
            let gr = grads.get(v.as_tensor()).expect("gradient present");
            let total = gr.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(total > 0.0, "zero gradient");
        }
        Ok(())
    }
}

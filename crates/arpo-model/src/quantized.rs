//! Rollout weights: the precision a generation copy of the model reads its linear layers in.
//!
//! Decoding reads every weight once per token, so on a CPU its speed is the memory bandwidth
//! divided by the bytes of the weights. [`Qwen2Vl::to_rollout`] builds an inference copy of a
//! (learner's) model whose linear layers hold their weights as candle `QTensor`s: `q8_0` (8-bit,
//! blocks of 32 with an f16 scale: 8.5 bits a weight; on an x86-64 CPU with AVX-512 VNNI or
//! AVX2 tiled once for our own product, [`crate::q8_gemm`], in as many bits), `q4k` (4-bit k-quants: 4.5 bits;
//! on such a CPU tiled once for our own product, [`crate::q4_gemm`], 4.625 bits) or
//! `bf16` (16 bits: on the CPU packed for AVX-512 BF16 dot products, [`crate::bf16_gemm`],
//! every linear including the 1176-wide patch embedding). Embeddings and norms stay as they
//! are (f32); under `q8_0`/`q4k` a linear whose input width is not a multiple of the format's
//! block (the 1176-wide patch embedding) stays f32. The source model is not changed: training keeps its exact f32 path, and a LoRA adapter
//! on a source linear is carried over as an f32 low-rank path on top of the quantized base.
//!
//! ```
//! use arpo_model::{Qwen2Vl, RolloutWeights};
//! use candle_core::{DType, Device};
//!
//! # fn main() -> Result<(), arpo_model::ModelError> {
//! let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
//! let learner = Qwen2Vl::load(&fixtures.join("tiny-qwen2vl"), DType::F32, &Device::Cpu)?;
//! let weights = RolloutWeights::Q8_0;
//! assert_eq!("q8_0".parse::<RolloutWeights>(), Ok(weights));
//! let rollout = learner.to_rollout(weights)?;
//! let logits = rollout.forward(&[1, 2, 3], None, &[])?;
//! assert_eq!(logits.dims(), &[3, rollout.config.text.vocab_size]);
//! assert!(rollout.rollout_summary().quantized > 0);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::bf16_gemm::Bf16Weight;
use crate::device::SpecError;
use crate::error::{ModelError, Result};
use crate::model::Qwen2Vl;
use crate::nn::Linear;
use crate::q4_gemm::{Q4Kernel, Q4Weight};
use crate::q8_gemm::Q8Weight;

/// The storage of the rollout copy's linear weights (`worker.rollout.weights`, `--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RolloutWeights {
    /// The learner's own f32 tensors, shared (no copy).
    #[default]
    F32,
    /// bf16 weights and activations, f32 accumulation. On the CPU a [`Bf16Weight`] (AVX-512
    /// BF16 `vdpbf16ps` where the CPU has it, a portable kernel elsewhere); on a GPU candle's
    /// bf16 `QTensor`. Every width fits (an odd one is padded).
    Bf16,
    /// 8-bit: blocks of 32 weights with one f16 scale. On an x86-64 CPU with AVX-512 VNNI or
    /// AVX2 the product is our own ([`crate::q8_gemm`]), elsewhere candle's.
    Q8_0,
    /// 4-bit k-quants (super-blocks of 256); the output projection (`lm_head`) and linears
    /// whose width is not a multiple of 256 take `q8_0`. On an x86-64 CPU with AVX-512 VNNI
    /// or AVX2 the product is our own ([`crate::q4_gemm`]), elsewhere candle's.
    Q4K,
}

impl RolloutWeights {
    pub const ALL: [Self; 4] = [Self::F32, Self::Bf16, Self::Q8_0, Self::Q4K];

    /// The format a linear of `in_features` inputs is stored in, or `None` to keep it as is.
    /// `bf16` takes every linear (the 1176-wide patch embedding too).
    ///
    /// `lm_head` is kept at 8 bits under `q4k`: its logits are the log-probabilities the
    /// learner compares the sampler with, and it is one matrix of the 7 x layers.
    pub fn format_for(self, in_features: usize, is_lm_head: bool) -> Option<GgmlDType> {
        let fits = |d: GgmlDType| in_features > 0 && in_features.is_multiple_of(d.block_size());
        match self {
            Self::F32 => None,
            Self::Bf16 => Some(GgmlDType::BF16),
            Self::Q8_0 => fits(GgmlDType::Q8_0).then_some(GgmlDType::Q8_0),
            Self::Q4K if !is_lm_head && fits(GgmlDType::Q4K) => Some(GgmlDType::Q4K),
            Self::Q4K => Self::Q8_0.format_for(in_features, is_lm_head),
        }
    }
}

impl fmt::Display for RolloutWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4k",
        })
    }
}

impl FromStr for RolloutWeights {
    type Err = SpecError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|w| w.to_string() == s)
            .ok_or_else(|| SpecError {
                what: "rollout weights",
                input: s.to_owned(),
                allowed: "f32, bf16, q8_0 or q4k",
            })
    }
}

impl TryFrom<String> for RolloutWeights {
    type Error = SpecError;
    fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RolloutWeights> for String {
    fn from(w: RolloutWeights) -> Self {
        w.to_string()
    }
}

/// A linear weight `[out, in]` stored as a candle `QTensor`, or for bf16 on the CPU as a
/// [`Bf16Weight`]; its product has no backward.
///
/// Clones share the stored weight: [`QuantizedWeight::requantize`] on one (the trainer's handle
/// on a rollout copy) changes what every clone (the rollout policy's) computes.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    matmul: Arc<RwLock<Product>>,
    format: GgmlDType,
    bytes: usize,
}

#[derive(Debug, Clone)]
enum Product {
    Candle(QMatMul),
    Bf16(Bf16Weight),
    Q4(Q4Weight),
    Q8(Q8Weight),
}

impl QuantizedWeight {
    /// Quantizes `weight` `[out, in]` (any float dtype) to `format` (`BF16` on the CPU: packed
    /// for [`Bf16Weight`]; `Q4K` and `Q8_0` on a CPU with AVX-512 VNNI or AVX2: tiled for
    /// [`Q4Weight`], [`Q8Weight`]).
    pub fn quantize(weight: &Tensor, format: GgmlDType) -> candle_core::Result<Self> {
        let (product, bytes) = Product::new(weight, format)?;
        Ok(Self {
            matmul: Arc::new(RwLock::new(product)),
            format,
            bytes,
        })
    }

    /// Stores `weight` (the same shape) in place of the current one, in the same format, for
    /// this weight and every clone of it.
    pub fn requantize(&self, weight: &Tensor) -> candle_core::Result<()> {
        let (product, _) = Product::new(weight, self.format)?;
        *self.matmul.write().unwrap_or_else(PoisonError::into_inner) = product;
        Ok(())
    }

    /// Whether `other` is a clone of this weight (one stored weight).
    pub fn same_storage(&self, other: &QuantizedWeight) -> bool {
        Arc::ptr_eq(&self.matmul, &other.matmul)
    }

    fn product(&self) -> std::sync::RwLockReadGuard<'_, Product> {
        self.matmul.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn format(&self) -> GgmlDType {
        self.format
    }

    /// Bytes of the quantized storage (candle may add a repacked copy on first use; a
    /// [`Bf16Weight`]'s and a [`Q4Weight`]'s include their padding to whole panels or tiles).
    pub fn storage_bytes(&self) -> usize {
        self.bytes
    }

    /// Makes candle repack a CPU weight for its kernels now (a one-row product of zeros)
    /// rather than in the first product a request makes: 5 s of a `q8_0` 2B model's first
    /// token, 0.3 s of `lm_head`'s under `q4k`. Our own products need nothing.
    fn prepare(&self) -> candle_core::Result<()> {
        if let Product::Candle(QMatMul::QTensor(q)) = &*self.product()
            && q.device().is_cpu()
            && let &[_, in_features] = q.shape().dims()
        {
            let zeros = Tensor::zeros((1, in_features), DType::F32, &q.device())?;
            QMatMul::QTensor(q.clone()).forward(&zeros)?;
        }
        Ok(())
    }

    /// Rows `ids` of a `q8_0` weight in f32, `[len, in]` (candle's dequantized values): a tied
    /// model's token embeddings, held once in its output projection.
    pub fn embedding(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        match &*self.product() {
            Product::Q8(w) => w.embedding(ids),
            Product::Candle(QMatMul::QTensor(q)) if self.format == GgmlDType::Q8_0 => {
                q.embedding(&Tensor::from_slice(ids, ids.len(), &q.device())?)
            }
            _ => candle_core::bail!(
                "a compact embedding table must be a q8_0 weight, not {:?}",
                self.format
            ),
        }
    }

    /// `x W^T` for `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_biased(x, None)
    }

    /// `x W^T + bias` (`bias` `[out]`): our CPU products add it in place to their output, a
    /// candle product through a broadcast add.
    pub fn forward_biased(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match &*self.product() {
            Product::Candle(q) => {
                let y = q.forward(&x.contiguous()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Product::Bf16(w) => w.forward_biased(x, bias),
            Product::Q4(w) => w.forward_biased(x, bias),
            Product::Q8(w) => w.forward_biased(x, bias),
        }
    }
}

impl Product {
    /// `weight` stored as `format`, and its bytes.
    fn new(weight: &Tensor, format: GgmlDType) -> candle_core::Result<(Self, usize)> {
        if format == GgmlDType::BF16 && weight.device().is_cpu() {
            let w = Bf16Weight::from_tensor(weight)?;
            let bytes = w.storage_bytes();
            return Ok((Self::Bf16(w), bytes));
        }
        if weight.device().is_cpu() && Q4Kernel::best() != Q4Kernel::Portable {
            match format {
                GgmlDType::Q4K => {
                    let w = Q4Weight::from_tensor(weight)?;
                    let bytes = w.storage_bytes();
                    return Ok((Self::Q4(w), bytes));
                }
                GgmlDType::Q8_0 => {
                    let w = Q8Weight::from_tensor(weight)?;
                    let bytes = w.storage_bytes();
                    return Ok((Self::Q8(w), bytes));
                }
                _ => {}
            }
        }
        let q = QTensor::quantize(weight, format)?;
        let bytes = q.storage_size_in_bytes();
        // Not `QMatMul::from_qtensor`: it would widen bf16 back to an f32 tensor.
        let product = QMatMul::QTensor(Arc::new(q));
        Ok((Self::Candle(product), bytes))
    }
}

/// Runs `f` on every job, the jobs dealt to the cores in turn: quantizing is one thread per
/// tensor in candle (a weight sync of the 2B model took 43 s on one core).
fn on_cores<T: Send>(jobs: Vec<T>, f: impl Fn(T) -> Result<()> + Sync) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut shares: Vec<Vec<T>> = (0..cores).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        shares[i % cores].push(job);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| scope.spawn(move || share.into_iter().try_for_each(f)))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

/// A tied model's `lm_head` when its stored weight can serve the embedding table's rows too
/// (a candle `q8_0` tensor: [`Qwen2Vl::compact_embedding`] then holds the table once).
fn embedding_rows_in_lm_head(text: &crate::text::TextModel) -> Option<&QuantizedWeight> {
    text.lm_head
        .quantized
        .as_ref()
        .filter(|q| text.tied && q.format() == GgmlDType::Q8_0)
}

/// What [`Qwen2Vl::to_rollout`] made of the model's linear layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolloutSummary {
    /// Linears whose weight is quantized (a `QTensor`, or packed bf16).
    pub quantized: usize,
    /// Linears kept in the source dtype (width not a multiple of the block).
    pub kept: usize,
    /// Bytes of all linear weights as the copy holds them.
    pub linear_bytes: usize,
    /// Whether the token-embedding table is stored compact (`q8_0` or bf16 rows), one more
    /// rounding of the model's input.
    pub compact_embedding: bool,
}

impl Qwen2Vl {
    /// Every linear layer of the model with its HF name (`lm_head` included, also when tied).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> = Vec::new();
        let v = &mut self.vision;
        out.push(("visual.patch_embed.proj".into(), &mut v.patch_embed));
        for (i, b) in v.blocks.iter_mut().enumerate() {
            for (n, l) in b.linears_mut() {
                out.push((format!("visual.blocks.{i}.{n}"), l));
            }
        }
        out.push(("visual.merger.mlp.0".into(), &mut v.merger_fc1));
        out.push(("visual.merger.mlp.2".into(), &mut v.merger_fc2));
        for (i, l) in self.text.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, lin) in [
                ("self_attn.q_proj", &mut l.q_proj),
                ("self_attn.k_proj", &mut l.k_proj),
                ("self_attn.v_proj", &mut l.v_proj),
                ("self_attn.o_proj", &mut l.o_proj),
                ("mlp.gate_proj", &mut l.gate_proj),
                ("mlp.up_proj", &mut l.up_proj),
                ("mlp.down_proj", &mut l.down_proj),
            ] {
                out.push((format!("{p}.{n}"), lin));
            }
        }
        out.push(("lm_head".into(), &mut self.text.lm_head));
        out
    }

    /// [`QuantizedWeight::prepare`] for every stored linear, once the copy is complete (so
    /// the repacked copies never meet the f32 tensors they came from in memory).
    fn prepare_products(&mut self) -> Result<()> {
        let jobs: Vec<(String, QuantizedWeight)> = self
            .linears_mut()
            .into_iter()
            .filter_map(|(name, l)| l.quantized.clone().map(|q| (name, q)))
            .collect();
        on_cores(jobs, |(name, q)| {
            q.prepare().map_err(|e| {
                ModelError::Tensor(candle_core::Error::msg(format!(
                    "preparing the stored weight of {name} for candle's kernels: {e}"
                )))
            })
        })
    }

    /// An inference copy whose linear weights are stored as `weights` says.
    ///
    /// `F32` is a plain clone (the tensors are shared, nothing is copied). Otherwise every
    /// linear of the vision tower and the decoder (and `lm_head`) whose width fits the
    /// format's block is quantized, and its `weight` field becomes a shape-only placeholder
    /// ([`Linear::is_quantized`]): the copy generates and scores, it does not train and is
    /// not saved. LoRA adapters come along unmerged (f32 low-rank path over the quantized base).
    /// After the learner's weights change, build the copy again from the learner.
    pub fn to_rollout(&self, weights: RolloutWeights) -> Result<Qwen2Vl> {
        let mut copy = self.clone();
        if weights == RolloutWeights::F32 {
            return Ok(copy);
        }
        // Other weights compute other keys and values: the copy caches its own.
        copy.prefix_cache =
            std::sync::Arc::new(crate::PrefixCache::new(self.prefix_cache.stats().budget));
        let mut todo = Vec::new();
        for (name, lin) in copy.linears_mut() {
            if lin.is_quantized() {
                return Err(ModelError::Quantize {
                    name,
                    weights,
                    reason: "the model is already a rollout copy: build it from the learner".into(),
                });
            }
            let (_, in_features) = lin.dims();
            if let Some(format) = weights.format_for(in_features, name == "lm_head") {
                todo.push((name, lin, format));
            }
        }
        on_cores(todo, |(name, lin, format)| {
            lin.quantize(format).map_err(|e| ModelError::Quantize {
                name,
                weights,
                reason: e.to_string(),
            })
        })?;
        copy.compact_embedding(weights)?;
        copy.prepare_products()?;
        Ok(copy)
    }

    /// Stores the token-embedding table of a rollout copy in `weights`' spirit: `q8_0` rows
    /// under `q8_0` and `q4k` (a tied model reads them from `lm_head`'s own `q8_0` weight, so
    /// the table is held once), bf16 rows under `bf16`. The f32 table is dropped.
    fn compact_embedding(&mut self, weights: RolloutWeights) -> Result<()> {
        use crate::text::CompactEmbedding;
        let t = &mut self.text;
        if weights == RolloutWeights::F32 || t.embed_compact.is_some() {
            return Ok(());
        }
        let compact = match (weights, embedding_rows_in_lm_head(t)) {
            (RolloutWeights::Bf16, _) => CompactEmbedding::Bf16(Arc::new(RwLock::new(
                t.embed_tokens.to_dtype(candle_core::DType::BF16)?,
            ))),
            (_, Some(q)) => CompactEmbedding::Quantized(q.clone()),
            _ if t
                .config
                .hidden_size
                .is_multiple_of(GgmlDType::Q8_0.block_size()) =>
            {
                let q =
                    QuantizedWeight::quantize(&t.embed_tokens, GgmlDType::Q8_0).map_err(|e| {
                        ModelError::Quantize {
                            name: "model.embed_tokens".into(),
                            weights,
                            reason: e.to_string(),
                        }
                    })?;
                CompactEmbedding::Quantized(q)
            }
            _ => return Ok(()),
        };
        let e = &t.embed_tokens;
        t.embed_tokens = Tensor::zeros((), e.dtype(), e.device())?.broadcast_as(e.shape())?;
        t.embed_compact = Some(compact);
        Ok(())
    }

    /// Makes this rollout copy (and every clone of it: the rollout policy's) compute with the
    /// current weights of `learner`, the model it was made from ([`Self::to_rollout`]), after
    /// full fine-tuning changed them: each stored linear and the compact embedding table are
    /// stored again from the learner's f32 tensors. Biases, norms and linears kept in f32 are
    /// the learner's own tensors already. The prefix cache is cleared. (Under LoRA nothing needs
    /// this: the base does not change and the adapters are shared.)
    pub fn refresh_from(&self, learner: &Qwen2Vl) -> Result<()> {
        use crate::text::CompactEmbedding;
        let (mut mine, mut theirs) = (self.clone(), learner.clone());
        let sources: std::collections::HashMap<String, Tensor> = theirs
            .linears_mut()
            .into_iter()
            .map(|(name, l)| (name, l.weight.clone()))
            .collect();
        let mut jobs = Vec::new();
        for (name, lin) in mine.linears_mut() {
            if let Some(q) = lin.quantized.clone() {
                let w = sources
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| ModelError::Quantize {
                        name: name.clone(),
                        weights: RolloutWeights::F32,
                        reason: "the learner has no such linear: refresh a copy made from it"
                            .into(),
                    })?;
                jobs.push((name, q, w));
            }
        }
        on_cores(jobs, |(name, q, w)| {
            q.requantize(&w).map_err(|e| ModelError::Quantize {
                name,
                weights: RolloutWeights::F32,
                reason: e.to_string(),
            })
        })?;
        mine.prepare_products()?;
        let shares_lm_head = |q: &QuantizedWeight| {
            self.text
                .lm_head
                .quantized
                .as_ref()
                .is_some_and(|h| h.same_storage(q))
        };
        match &self.text.embed_compact {
            Some(CompactEmbedding::Quantized(q)) if !shares_lm_head(q) => q
                .requantize(&learner.text.embed_tokens)
                .map_err(|e| ModelError::Quantize {
                    name: "model.embed_tokens".into(),
                    weights: RolloutWeights::F32,
                    reason: e.to_string(),
                })?,
            Some(CompactEmbedding::Bf16(t)) => {
                let rows = learner
                    .text
                    .embed_tokens
                    .to_dtype(candle_core::DType::BF16)?;
                *t.write().unwrap_or_else(PoisonError::into_inner) = rows;
            }
            _ => {}
        }
        self.prefix_cache.clear();
        Ok(())
    }

    /// A model of shape `config` with N(0, 0.02) weights, like [`Qwen2Vl::random`], whose
    /// linears are drawn one at a time and stored as `weights` at once: the whole model never
    /// exists in f32, so the memory is what serving in that format takes (for benchmarks).
    pub fn random_rollout(
        config: crate::Qwen2VlConfig,
        weights: RolloutWeights,
        device: &candle_core::Device,
    ) -> Result<Self> {
        use candle_core::DType;
        let shapes = crate::model::param_shapes(&config);
        Self::assemble_rollout(config, weights, device, shapes, |name, shape| {
            let t = if name.contains("norm") || name.contains("ln_q") {
                if name.ends_with(".bias") {
                    Tensor::zeros(shape, DType::F32, device)?
                } else {
                    Tensor::ones(shape, DType::F32, device)?
                }
            } else {
                Tensor::randn(0f32, 0.02, shape, device)?
            };
            Ok(t)
        })
    }

    /// Loads a model directory straight into a rollout copy in `weights` (`serve --weights`):
    /// tensors are read from disk one at a time and each linear is quantized as it arrives, so
    /// the peak memory is the copy's plus one f32 tensor, never the f32 model's (`f32` is
    /// [`Qwen2Vl::load`]). Activations, norms and biases are f32.
    pub fn load_rollout(
        dir: &std::path::Path,
        weights: RolloutWeights,
        device: &candle_core::Device,
    ) -> Result<Self> {
        use candle_core::DType;
        if weights == RolloutWeights::F32 {
            return Self::load(dir, DType::F32, device);
        }
        let config = crate::Qwen2VlConfig::from_file(&dir.join(crate::weights::CONFIG_FILE))?;
        let lazy = crate::weights::LazyWeights::open_dir(dir)?;
        Self::assemble_rollout(config, weights, device, lazy.shapes(), |name, _| {
            lazy.load(name, DType::F32, device)
        })
    }

    /// Builds a rollout copy from `(name, shape)` of every tensor and `fetch`, which makes one
    /// tensor in f32: matrices (rank 2 and up) stand in as shape-only placeholders while the
    /// model is assembled, then each linear is fetched and stored as `weights` in turn, and the
    /// embedding table last ([`Self::compact_embedding`]).
    fn assemble_rollout(
        config: crate::Qwen2VlConfig,
        weights: RolloutWeights,
        device: &candle_core::Device,
        shapes: Vec<(String, Vec<usize>)>,
        mut fetch: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        let placeholder = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::zeros((), candle_core::DType::F32, device)?.broadcast_as(shape)?)
        };
        let mut map = std::collections::HashMap::new();
        let mut later = std::collections::HashMap::new();
        for (name, shape) in shapes {
            let name = crate::weights::canonical_name(&name);
            let t = if shape.len() >= 2 {
                placeholder(&shape)?
            } else {
                fetch(&name, &shape)?
            };
            if shape.len() >= 2 {
                later.insert(name.clone(), shape);
            }
            map.insert(name, t);
        }
        let mut model = Self::from_weights(config, crate::weights::Weights::from_map(map))?;
        const EMBED: &str = "model.embed_tokens.weight";
        let tied = model.text.tied;
        for (name, lin) in model.linears_mut() {
            let key = if name == "lm_head" && tied {
                EMBED.to_string()
            } else {
                format!("{name}.weight")
            };
            let (out, inp) = lin.dims();
            if let Some(shape) = later.get(&key) {
                lin.weight = fetch(&key, shape)?.reshape((out, inp))?;
            }
            if let Some(format) = weights.format_for(inp, name == "lm_head") {
                lin.quantize(format).map_err(|e| ModelError::Quantize {
                    name: name.clone(),
                    weights,
                    reason: e.to_string(),
                })?;
            }
        }
        let shares_lm_head = embedding_rows_in_lm_head(&model.text).is_some();
        if tied && !model.text.lm_head.is_quantized() {
            // Still one f32 table, as in a loaded model.
            model.text.embed_tokens = model.text.lm_head.weight.clone();
        } else if !shares_lm_head && let Some(shape) = later.get(EMBED) {
            model.text.embed_tokens = fetch(EMBED, shape)?;
        }
        model.compact_embedding(weights)?;
        model.prepare_products()?;
        Ok(model)
    }

    /// How many linears are quantized and the bytes their weights take.
    pub fn rollout_summary(&self) -> RolloutSummary {
        let mut s = RolloutSummary {
            compact_embedding: self.text.embed_compact.is_some(),
            ..RolloutSummary::default()
        };
        // A clone shares every tensor: it only lends `linears_mut` a model to walk.
        let mut model = self.clone();
        for (_, l) in model.linears_mut() {
            match &l.quantized {
                Some(q) => {
                    s.quantized += 1;
                    s.linear_bytes += q.storage_bytes();
                }
                None => {
                    s.kept += 1;
                    s.linear_bytes += l.weight.elem_count() * l.weight.dtype().size_in_bytes();
                }
            }
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for w in RolloutWeights::ALL {
            assert_eq!(w.to_string().parse::<RolloutWeights>().unwrap(), w);
            let json = serde_json::to_string(&w).unwrap();
            assert_eq!(serde_json::from_str::<RolloutWeights>(&json).unwrap(), w);
        }
        let err = "int8".parse::<RolloutWeights>().unwrap_err();
        assert_eq!(err.input, "int8");
        assert!(serde_json::from_str::<RolloutWeights>("\"q4_0\"").is_err());
    }

    #[test]
    fn formats_follow_the_block_sizes() {
        use RolloutWeights as W;
        assert_eq!(W::F32.format_for(1536, false), None);
        assert_eq!(W::Q8_0.format_for(1176, false), None);
        assert_eq!(W::Q8_0.format_for(8960, false), Some(GgmlDType::Q8_0));
        assert_eq!(W::Q4K.format_for(1536, false), Some(GgmlDType::Q4K));
        assert_eq!(W::Q4K.format_for(1536, true), Some(GgmlDType::Q8_0));
        assert_eq!(W::Q4K.format_for(96, false), Some(GgmlDType::Q8_0));
        // bf16 takes every width: the patch embedding (1176) and an odd one (padded).
        assert_eq!(W::Bf16.format_for(1176, false), Some(GgmlDType::BF16));
        assert_eq!(W::Bf16.format_for(97, true), Some(GgmlDType::BF16));
    }

    /// q8_0 rounds each weight to the nearest of 255 levels spaced d = max|w|/127 within its
    /// block of 32 (|w - q(w)| <= d/2) and stores d in f16 (relative error <= 2^-11). A row of
    /// 0.5 and -0.25 (-63.5 d, a half-level case) against ones (exact at 8 bits): the product
    /// is within 64 d/2 + 2^-11 * sum|w x| of the exact 8.
    #[test]
    fn quantized_linear_matches_the_f32_product_within_the_rounding() {
        let dev = Device::Cpu;
        let row: Vec<f32> = (0..64)
            .map(|i| if i % 2 == 0 { 0.5 } else { -0.25 })
            .collect();
        let w = Tensor::from_vec([row.clone(), row].concat(), (2, 64), &dev).unwrap();
        let b = Tensor::new(&[1f32, -1.0], &dev).unwrap();
        let x = Tensor::ones((1, 3, 64), candle_core::DType::F32, &dev).unwrap();
        let exact = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
        let mut q = Linear::new(w, Some(b));
        q.quantize(GgmlDType::Q8_0).unwrap();
        assert!(q.is_quantized());
        assert_eq!(q.dims(), (2, 64));
        let got = q.forward(&x).unwrap();
        assert_eq!(got.dims(), &[1, 3, 2]);
        let (e, g) = (
            exact.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let d = 0.5 / 127.0;
        let bound = 64.0 * d / 2.0 + 2f32.powi(-11) * 24.0;
        for (a, b) in e.iter().zip(&g) {
            assert!((a - b).abs() <= bound, "{a} vs {b}");
        }
        assert_eq!(e[0], 9.0);
    }
}

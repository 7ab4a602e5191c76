//! LoRA adapters with PEFT's initialisation, PEFT's file format, and merging.
//!
//! A LoRA adapter on a linear layer `y = x W^T + b` (W: `[out, in]`) adds
//! `scale * dropout(x) A^T B^T` with `A: [r, in]`, `B: [out, r]`, `scale = alpha / r`.
//! PEFT initialises A with `kaiming_uniform_(a = sqrt(5))`, i.e. uniform in
//! `[-1/sqrt(in), 1/sqrt(in)]`, and B with zeros, so a fresh adapter changes nothing.
//!
//! On disk ([`LoraSet::save_peft`]): `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, and `adapter_config.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{CheckpointDir, load_safetensors};
use super::{Result, TrainError};

/// The module name peft sees for one of ours under transformers 5 (which nests the decoder as
/// `model.language_model.*` and the vision tower as `model.visual.*`; peft 0.21 does not map
/// the classic spelling, so an adapter saved with classic names would load as zeros).
pub fn peft_module_name(module: &str) -> String {
    if let Some(rest) = module.strip_prefix("model.layers.") {
        format!("model.language_model.layers.{rest}")
    } else if let Some(rest) = module.strip_prefix("visual.") {
        format!("model.visual.{rest}")
    } else {
        module.to_string()
    }
}

/// Our (classic) module name for a peft module name of either spelling.
pub fn module_from_peft_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else {
        name.to_string()
    }
}

/// PEFT's prefix of every adapter key.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r`.
    pub alpha: f64,
    /// Dropout probability on the adapter input during training.
    pub dropout: f64,
    /// Last components of the module names to adapt (PEFT's `target_modules` list form).
    pub target_modules: Vec<String>,
    /// Whether modules of the vision tower (`visual.` in their name) are adapted too.
    pub include_vision: bool,
    /// Seed of the A initialisation and of the dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// r 16, alpha 32, dropout 0.05, the decoder's attention and MLP projections.
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            include_vision: false,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(TrainError::Config("lora r must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(TrainError::Config(format!(
                "lora alpha must be a positive number, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainError::Config(format!(
                "lora dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether the linear layer named `module` (full dotted path) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        let is_vision = module.starts_with("visual.") || module.contains(".visual.");
        if is_vision && !self.include_vision {
            return false;
        }
        let last = module.rsplit('.').next().unwrap_or(module);
        self.target_modules.iter().any(|t| t == last || t == module)
    }
}

/// One adapter: `A: [r, in]`, `B: [out, r]`, trainable f32 `Var`s.
///
/// Clones share the variables, the training switch and the dropout generator.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Down projection `[r, in]`.
    pub a: Var,
    /// Up projection `[out, r]`.
    pub b: Var,
    scale: f64,
    dropout: f64,
    training: Arc<AtomicBool>,
    rng: Arc<Mutex<ChaCha8Rng>>,
}

impl LoraAdapter {
    /// PEFT initialisation: A uniform in `±1/sqrt(in)` from `rng`, B zero.
    pub fn init(
        in_dim: usize,
        out_dim: usize,
        config: &LoraConfig,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..config.r * in_dim)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (config.r, in_dim), device)?;
        let b = Tensor::zeros((out_dim, config.r), DType::F32, device)?;
        Self::from_weights(&a, &b, config.alpha, config.dropout)
    }

    /// An adapter with the given weights (copied into fresh f32 `Var`s).
    pub fn from_weights(a: &Tensor, b: &Tensor, alpha: f64, dropout: f64) -> Result<Self> {
        let (r, _in) = a.dims2()?;
        let (_out, rb) = b.dims2()?;
        if r != rb || r == 0 {
            return Err(TrainError::Mismatch {
                name: "lora".into(),
                reason: format!("A is {:?} and B is {:?}: ranks differ", a.dims(), b.dims()),
            });
        }
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale: alpha / r as f64,
            dropout,
            training: Arc::new(AtomicBool::new(false)),
            rng: Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(0))),
        })
    }

    /// The adapter's contribution in the model's forward: with dropout when its set is in
    /// training mode ([`LoraSet::set_training`]), without otherwise.
    pub fn forward_delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("lora dropout generator poisoned".into()))?;
            self.delta_impl(x, Some(&mut rng))
        } else {
            self.delta_impl(x, None)
        }
    }

    /// The dropout generator's state when this adapter draws dropout masks (training mode,
    /// dropout > 0): what a recomputed forward restores to draw the same masks again.
    pub fn dropout_state(&self) -> Option<ChaCha8Rng> {
        if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            self.rng.lock().ok().map(|r| r.clone())
        } else {
            None
        }
    }

    /// Sets the dropout generator (shared by every adapter of the set) to `state`.
    pub fn set_dropout_state(&self, state: ChaCha8Rng) {
        if let Ok(mut r) = self.rng.lock() {
            *r = state;
        }
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The adapter's contribution `scale * x A^T B^T` for `x: [..., in]`. With `dropout_rng`,
    /// the input is dropped out (inverted dropout, PEFT's `nn.Dropout` semantics); without it
    /// (evaluation), it is not.
    pub fn delta(&self, x: &Tensor, dropout_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        Ok(self.delta_impl(x, dropout_rng)?)
    }

    fn delta_impl(
        &self,
        x: &Tensor,
        dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        let x = match dropout_rng {
            Some(rng) if self.dropout > 0.0 => {
                let keep = 1.0 - self.dropout;
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| {
                        if rng.random::<f64>() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                (x * mask)?
            }
            _ => x.clone(),
        };
        let in_dim = self.a.dims()[1];
        let mut out_shape = x.dims().to_vec();
        let last = out_shape.len().saturating_sub(1);
        out_shape[last] = self.b.dims()[0];
        let x2 = x.reshape(((), in_dim))?.to_dtype(DType::F32)?;
        let h = x2.matmul(&self.a.as_tensor().t()?)?;
        let y = (h.matmul(&self.b.as_tensor().t()?)? * self.scale)?;
        y.reshape(out_shape)?.to_dtype(x.dtype())
    }

    /// `w + scale * B A`, the base weight with this adapter merged in (in `w`'s dtype).
    pub fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        let ba = (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?;
        if ba.dims() != w.dims() {
            return Err(TrainError::Mismatch {
                name: "lora merge".into(),
                reason: format!("B A is {:?}, the base weight {:?}", ba.dims(), w.dims()),
            });
        }
        Ok((w.to_dtype(DType::F32)? + ba)?.to_dtype(w.dtype())?)
    }
}

/// The adapters of a model, by module path.
#[derive(Debug)]
pub struct LoraSet {
    config: LoraConfig,
    adapters: BTreeMap<String, LoraAdapter>,
    dropout_rng: ChaCha8Rng,
    training: Arc<AtomicBool>,
    shared_rng: Arc<Mutex<ChaCha8Rng>>,
    /// Modules that are convolutions in PyTorch (the patch embedding, a Conv3d whose kernel is its
    /// stride, a Linear here): their base kernel shape `[out, in_channels, kernel...]`. PEFT
    /// stores their A as a convolution `[r, in_channels, kernel...]` and B as a 1x..x1 one.
    conv_kernels: BTreeMap<String, Vec<usize>>,
}

/// Per-module seed: the same module gets the same init whatever order modules are added in.
fn module_seed(seed: u64, module: &str) -> u64 {
    // FNV-1a over the name, mixed with the run seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in module.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl LoraSet {
    /// An empty set.
    pub fn new(config: LoraConfig) -> Result<Self> {
        config.validate()?;
        let dropout_rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_d20f);
        let shared_rng = Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(
            config.seed ^ 0x0d20_f5e7,
        )));
        Ok(Self {
            config,
            adapters: BTreeMap::new(),
            dropout_rng,
            training: Arc::new(AtomicBool::new(false)),
            shared_rng,
            conv_kernels: BTreeMap::new(),
        })
    }

    /// Declares `module` a convolution in PyTorch with kernel shape `[out, in_channels,
    /// kernel...]` (kernel == stride, so a Linear over flattened patches here): its adapter is
    /// saved in PEFT's convolution shapes.
    pub fn set_conv_kernel(&mut self, module: &str, kernel: Vec<usize>) {
        self.conv_kernels.insert(module.to_string(), kernel);
    }

    /// Turns dropout on (training) or off (scoring old log-probs, evaluation) for every
    /// adapter of the set, including the clones held by the model's layers.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Adds a freshly initialised adapter on `module` when the config targets it; returns
    /// whether it did.
    pub fn add_if_targeted(
        &mut self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<bool> {
        if !self.config.targets(module) {
            return Ok(false);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(module_seed(self.config.seed, module));
        let adapter = LoraAdapter::init(in_dim, out_dim, &self.config, &mut rng, device)?;
        self.insert(module, adapter);
        Ok(true)
    }

    /// Inserts (or replaces) an adapter; it joins the set's training switch and dropout
    /// generator.
    pub fn insert(&mut self, module: &str, mut adapter: LoraAdapter) {
        adapter.training = self.training.clone();
        adapter.rng = self.shared_rng.clone();
        self.adapters.insert(module.to_string(), adapter);
    }

    /// The adapter on `module`, if any.
    pub fn get(&self, module: &str) -> Option<&LoraAdapter> {
        self.adapters.get(module)
    }

    /// All adapters by module path.
    pub fn adapters(&self) -> &BTreeMap<String, LoraAdapter> {
        &self.adapters
    }

    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// `y + delta` for `module` (`y` the frozen base output), with dropout when `train`.
    pub fn apply(&mut self, module: &str, x: &Tensor, y: Tensor, train: bool) -> Result<Tensor> {
        match self.adapters.get(module) {
            Some(a) => {
                let rng = if train {
                    Some(&mut self.dropout_rng)
                } else {
                    None
                };
                Ok((y + a.delta(x, rng)?)?)
            }
            None => Ok(y),
        }
    }

    /// The trainable variables with their PEFT names (without the `base_model.model.` prefix):
    /// `<module>.lora_A.weight`, `<module>.lora_B.weight`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .flat_map(|(m, a)| {
                [
                    (format!("{m}.lora_A.weight"), a.a.clone()),
                    (format!("{m}.lora_B.weight"), a.b.clone()),
                ]
            })
            .collect()
    }

    /// The PEFT `adapter_config.json` for this set.
    pub fn peft_config(&self, base_model_name_or_path: &str) -> serde_json::Value {
        // The exact module names: unambiguous for peft (it matches a full name or a suffix),
        // whatever other layers of the model share a last component.
        let modules: Vec<String> = self.adapters.keys().map(|m| peft_module_name(m)).collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_rslora": false,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// Saves `adapter_model.safetensors` and `adapter_config.json` into `dir` (atomically: the
    /// directory appears complete or not at all).
    pub fn save_peft(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        let ck = CheckpointDir::begin(dir)?;
        self.write_peft(&ck, base_model_name_or_path)?;
        ck.commit()?;
        Ok(())
    }

    /// Writes the two PEFT files into a checkpoint being assembled.
    pub fn write_peft(&self, ck: &CheckpointDir, base_model_name_or_path: &str) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (m, a) in &self.adapters {
            let name = peft_module_name(m);
            let (mut lora_a, mut lora_b) = (a.a.as_tensor().clone(), a.b.as_tensor().clone());
            if let Some(kernel) = self.conv_kernels.get(m) {
                let r = lora_a.dim(0)?;
                let mut a_shape = vec![r];
                a_shape.extend_from_slice(&kernel[1..]);
                let mut b_shape = vec![lora_b.dim(0)?, r];
                b_shape.extend(std::iter::repeat_n(1, kernel.len() - 2));
                lora_a = lora_a.reshape(a_shape)?;
                lora_b = lora_b.reshape(b_shape)?;
            }
            tensors.insert(format!("{PEFT_PREFIX}{name}.lora_A.weight"), lora_a);
            tensors.insert(format!("{PEFT_PREFIX}{name}.lora_B.weight"), lora_b);
        }
        ck.write_safetensors(ADAPTER_WEIGHTS, &tensors, &BTreeMap::new())?;
        ck.write_json(ADAPTER_CONFIG, &self.peft_config(base_model_name_or_path))
    }

    /// Loads a PEFT LoRA adapter directory (ours or peft's).
    pub fn load_peft(dir: &Path, seed: u64, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read(&cfg_path).map_err(|source| TrainError::Io {
            action: "reading",
            path: cfg_path.clone(),
            source,
        })?;
        let cfg: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| TrainError::Corrupt {
                path: cfg_path.clone(),
                reason: format!("not valid json: {e}"),
            })?;
        let field = |k: &str| {
            cfg.get(k).ok_or_else(|| TrainError::Corrupt {
                path: cfg_path.clone(),
                reason: format!("missing field {k}"),
            })
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            return Err(TrainError::Config(format!(
                "{} is not a LoRA adapter (peft_type {})",
                cfg_path.display(),
                field("peft_type")?
            )));
        }
        for (flag, what) in [("use_dora", "DoRA"), ("use_rslora", "rsLoRA")] {
            if cfg.get(flag).and_then(|v| v.as_bool()) == Some(true) {
                return Err(TrainError::Config(format!(
                    "{} uses {what}, which this loader does not implement",
                    cfg_path.display()
                )));
            }
        }
        let bad = |k: &str| TrainError::Corrupt {
            path: cfg_path.clone(),
            reason: format!("field {k} has the wrong type"),
        };
        let r = field("r")?.as_u64().ok_or_else(|| bad("r"))? as usize;
        let alpha = field("lora_alpha")?
            .as_f64()
            .ok_or_else(|| bad("lora_alpha"))?;
        let dropout = cfg
            .get("lora_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        let targets: Vec<String> = match cfg.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let include_vision = targets.iter().any(|t| t.contains("visual."));
        let targets: Vec<String> = targets.iter().map(|t| module_from_peft_name(t)).collect();
        let config = LoraConfig {
            r,
            alpha,
            dropout,
            target_modules: targets,
            include_vision,
            seed,
        };
        let mut set = Self::new(config)?;
        let weights = load_safetensors(&dir.join(ADAPTER_WEIGHTS), device)?;
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in weights {
            let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(&key);
            // peft saves without the adapter name ("default"); accept both spellings.
            let rest = rest
                .replace(".lora_A.default.", ".lora_A.")
                .replace(".lora_B.default.", ".lora_B.");
            if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                pairs.entry(module_from_peft_name(m)).or_default().0 = Some(t);
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                pairs.entry(module_from_peft_name(m)).or_default().1 = Some(t);
            } else {
                return Err(TrainError::Config(format!(
                    "adapter key {key} is neither lora_A nor lora_B: this loader supports plain LoRA"
                )));
            }
        }
        for (module, pair) in pairs {
            match pair {
                (Some(a), Some(b)) => {
                    // A convolution's adapter (the patch embedding): A `[r, c, k...]`, B
                    // `[out, r, 1...]`; here the Linear over flattened patches.
                    let (a, b) = if a.rank() > 2 {
                        let mut kernel = vec![b.dim(0)?];
                        kernel.extend_from_slice(&a.dims()[1..]);
                        set.set_conv_kernel(&module, kernel);
                        (a.flatten_from(1)?, b.flatten_from(1)?)
                    } else {
                        (a, b)
                    };
                    if a.dims()[0] != r {
                        return Err(TrainError::Mismatch {
                            name: module,
                            reason: format!("lora_A has rank {} but r is {r}", a.dims()[0]),
                        });
                    }
                    let adapter = LoraAdapter::from_weights(&a, &b, alpha, dropout)?;
                    set.insert(&module, adapter);
                }
                _ => {
                    return Err(TrainError::Mismatch {
                        name: module,
                        reason: "only one of lora_A / lora_B is present".into(),
                    });
                }
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_targets_are_decoder_projections_only() {
        let c = LoraConfig::default();
        assert!(c.targets("model.layers.3.self_attn.q_proj"));
        assert!(c.targets("model.language_model.layers.0.mlp.down_proj"));
        assert!(!c.targets("model.layers.3.input_layernorm"));
        assert!(!c.targets("visual.blocks.0.attn.qkv"));
        let v = LoraConfig {
            include_vision: true,
            target_modules: vec!["qkv".into(), "q_proj".into()],
            ..LoraConfig::default()
        };
        assert!(v.targets("visual.blocks.0.attn.qkv"));
        assert!(v.targets("model.visual.blocks.0.attn.qkv"));
        assert!(!v.targets("visual.blocks.0.attn.proj"));
    }

    #[test]
    fn peft_init_has_zero_b_and_bounded_a() {
        let mut set = LoraSet::new(LoraConfig {
            r: 4,
            ..LoraConfig::default()
        })
        .expect("set");
        assert!(
            set.add_if_targeted("m.q_proj", 64, 8, &Device::Cpu)
                .expect("add")
        );
        let a = set.get("m.q_proj").expect("adapter");
        let av: Vec<f32> =
            a.a.as_tensor()
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
        // 1 / sqrt(64) = 0.125
        assert!(av.iter().all(|x| x.abs() <= 0.125));
        assert!(av.iter().any(|x| x.abs() > 0.06), "spread over the range");
        let bv: Vec<f32> =
            a.b.as_tensor()
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
        assert!(bv.iter().all(|x| *x == 0.0));
        assert_eq!(a.scale(), 8.0);
        // Same seed and name: same init, whatever else was added before.
        let mut other = LoraSet::new(LoraConfig {
            r: 4,
            ..LoraConfig::default()
        })
        .expect("set");
        other
            .add_if_targeted("m.k_proj", 64, 8, &Device::Cpu)
            .expect("add");
        other
            .add_if_targeted("m.q_proj", 64, 8, &Device::Cpu)
            .expect("add");
        let av2: Vec<f32> = other
            .get("m.q_proj")
            .expect("a")
            .a
            .as_tensor()
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        assert_eq!(av, av2);
    }

    #[test]
    fn delta_and_merge_match_hand_computed_values() {
        // A = [[1, 2]], B = [[3], [-1]], alpha 2, r 1 -> scale 2.
        // x = [1, 1]: A x = 3; B (A x) = [9, -3]; times 2 = [18, -6].
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.]], &dev).expect("a");
        let b = Tensor::new(&[[3f32], [-1.]], &dev).expect("b");
        let ad = LoraAdapter::from_weights(&a, &b, 2.0, 0.0).expect("adapter");
        let x = Tensor::new(&[[1f32, 1.]], &dev).expect("x");
        let d: Vec<Vec<f32>> = ad.delta(&x, None).expect("delta").to_vec2().expect("v");
        assert_eq!(d, vec![vec![18.0, -6.0]]);
        // W + 2 B A = [[0, 0], [0, 0]] + 2 [[3, 6], [-1, -2]]
        let w = Tensor::zeros((2, 2), DType::F32, &dev).expect("w");
        let m: Vec<Vec<f32>> = ad.merged_weight(&w).expect("merge").to_vec2().expect("v");
        assert_eq!(m, vec![vec![6.0, 12.0], vec![-2.0, -4.0]]);
    }

    #[test]
    fn dropout_keeps_expectation_and_is_off_in_eval() {
        let dev = Device::Cpu;
        let a = Tensor::ones((1, 1000), DType::F32, &dev).expect("a");
        let b = Tensor::ones((1, 1), DType::F32, &dev).expect("b");
        let ad = LoraAdapter::from_weights(&a, &b, 1.0, 0.5).expect("adapter");
        let x = Tensor::ones((1, 1000), DType::F32, &dev).expect("x");
        let eval: f32 = ad
            .delta(&x, None)
            .expect("d")
            .flatten_all()
            .expect("f")
            .to_vec1::<f32>()
            .expect("v")[0];
        assert_eq!(eval, 1000.0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let train: f32 = ad
            .delta(&x, Some(&mut rng))
            .expect("d")
            .flatten_all()
            .expect("f")
            .to_vec1::<f32>()
            .expect("v")[0];
        // Each of 1000 inputs kept with p 0.5 and scaled by 2: mean 1000, std ~31.6.
        assert!((train - 1000.0).abs() < 200.0, "{train}");
        assert!(train != 1000.0);
    }

    #[test]
    fn peft_save_load_round_trip_keeps_weights_and_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut set = LoraSet::new(LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            ..LoraConfig::default()
        })
        .expect("set");
        set.add_if_targeted("model.layers.0.self_attn.q_proj", 6, 4, &Device::Cpu)
            .expect("add");
        let b = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.], [7., 8.]], &Device::Cpu).expect("b");
        set.adapters["model.layers.0.self_attn.q_proj"]
            .b
            .set(&b)
            .expect("set b");
        let out = dir.path().join("adapter");
        set.save_peft(&out, "tiny").expect("save");

        let raw = load_safetensors(&out.join(ADAPTER_WEIGHTS), &Device::Cpu).expect("raw");
        let mut keys: Vec<_> = raw.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight",
            ]
        );
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(ADAPTER_CONFIG)).expect("cfg"))
                .expect("json");
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 2);
        assert_eq!(cfg["lora_alpha"], 4.0);

        let back = LoraSet::load_peft(&out, 0, &Device::Cpu).expect("load");
        let orig = set.get("model.layers.0.self_attn.q_proj").expect("orig");
        let got = back.get("model.layers.0.self_attn.q_proj").expect("got");
        assert_eq!(got.scale(), 2.0);
        for (x, y) in [(&orig.a, &got.a), (&orig.b, &got.b)] {
            let x: Vec<f32> = x
                .as_tensor()
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            let y: Vec<f32> = y
                .as_tensor()
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            assert_eq!(x, y);
        }
    }
}

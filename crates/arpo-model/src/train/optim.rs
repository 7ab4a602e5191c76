//! AdamW with decoupled weight decay, global grad-norm clipping, linear warmup and gradient
//! accumulation, following `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_`.
//!
//! The optimizer owns the named trainable [`Var`]s. Each micro-batch's `GradStore` is added
//! into per-parameter accumulators with [`AdamW::accumulate`]; [`AdamW::step`] clips the global
//! norm of the accumulated gradients, updates the parameters and clears the accumulators. A
//! non-finite norm skips the update (the parameters and moments stay as they were) and says so
//! in the returned [`StepReport`].
//!
//! [`AdamW::state_tensors`] / [`AdamW::load_state_tensors`] carry everything a resumed run needs
//! (moments, step counter, accumulators) so it continues bit-for-bit.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{Result, TrainError};

/// Optimizer hyper-parameters. Defaults are ARPO's (lr 1e-6, betas (0.9, 0.999), eps 1e-8,
/// weight decay 1e-2, clip 1.0, no warmup).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (`p -= lr * wd * p`).
    pub weight_decay: f64,
    /// Global grad-norm clipping threshold; `None` disables clipping (the norm is still reported).
    pub max_grad_norm: Option<f64>,
    /// Optimizer steps of linear warmup from `lr / warmup_steps` to `lr`; 0 for none.
    pub warmup_steps: u64,
    /// What the rate does after the warmup.
    #[serde(default)]
    pub schedule: LrSchedule,
}

/// The learning rate after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` from the end of the warmup on.
    #[default]
    Constant,
    /// Half a cosine from `lr` down to `min_lr_ratio * lr` at optimizer step `total_steps`
    /// (transformers' `get_cosine_schedule_with_warmup` with verl's floor): step `s` (1-based)
    /// after `w` warmup steps takes `lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)` with
    /// `p = (s - 1 - w) / (total_steps - w)`, at the floor from step `total_steps + 1` on.
    Cosine { total_steps: u64, min_lr_ratio: f64 },
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
            schedule: LrSchedule::Constant,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges torch checks.
    // `!(x >= 0.0)` on purpose: a NaN fails these checks, which `x < 0.0` would let through.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TrainError::Config(what));
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be a finite number >= 0, got {}", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps >= 0.0) {
            return bad(format!("eps must be >= 0, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if let Some(c) = self.max_grad_norm
            && !(c > 0.0)
        {
            return bad(format!("max_grad_norm must be > 0 when set, got {c}"));
        }
        if let LrSchedule::Cosine {
            total_steps,
            min_lr_ratio,
        } = self.schedule
        {
            if !(0.0..=1.0).contains(&min_lr_ratio) {
                return bad(format!(
                    "the cosine schedule's min_lr_ratio must be in [0, 1], got {min_lr_ratio}"
                ));
            }
            if total_steps <= self.warmup_steps {
                return bad(format!(
                    "the cosine schedule needs more optimizer steps ({total_steps}) than warmup steps ({})",
                    self.warmup_steps
                ));
            }
        }
        Ok(())
    }

    /// Learning rate of optimizer step `step` (1-based): linear warmup, then the schedule.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine {
                total_steps,
                min_lr_ratio,
            } => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let done = step.saturating_sub(1).saturating_sub(self.warmup_steps) as f64;
                let progress = (done / span).min(1.0);
                let factor = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                self.lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
            }
        }
    }
}

/// What one call of [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the accumulated gradients, before clipping.
    pub grad_norm: f64,
    /// Whether the update was skipped because the norm was not finite.
    pub skipped: bool,
    /// Learning rate used (0 when skipped).
    pub lr: f64,
    /// Number of micro-batches that were accumulated into this step.
    pub micro_batches: u64,
    /// Optimizer steps taken so far (skipped ones not counted).
    pub step: u64,
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    acc: Option<Tensor>,
}

/// AdamW over a set of named parameters.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
    micro_batches: u64,
}

impl AdamW {
    /// An optimizer for `params` (name, variable). Names must be unique: they key the saved state.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(TrainError::Config(format!(
                    "parameter name {name} appears twice"
                )));
            }
            if !var.dtype().is_float() {
                return Err(TrainError::Config(format!(
                    "parameter {name} has dtype {:?}; trainable parameters must be floats",
                    var.dtype()
                )));
            }
            let m = var.zeros_like()?;
            let v = var.zeros_like()?;
            slots.push(Slot {
                name,
                var,
                m,
                v,
                acc: None,
            });
        }
        Ok(Self {
            config,
            slots,
            step: 0,
            micro_batches: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The parameters, by name, in the order given to [`AdamW::new`].
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Adds one micro-batch's gradients to the accumulators. Parameters without a gradient in
    /// `grads` contribute zero. Scale the loss by `1 / accumulation_steps` before backward to
    /// average, as ARPO does.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        for slot in &mut self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                let g = g.to_dtype(slot.var.dtype())?.detach();
                slot.acc = Some(match slot.acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Global L2 norm of the accumulated gradients (0 when nothing was accumulated).
    pub fn grad_norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for slot in &self.slots {
            if let Some(a) = &slot.acc {
                sq += a
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// Clips, updates every parameter and clears the accumulators.
    pub fn step(&mut self) -> Result<StepReport> {
        let grad_norm = self.grad_norm()?;
        let micro_batches = self.micro_batches;
        if !grad_norm.is_finite() {
            tracing_skip(grad_norm, self.step);
            self.zero_grad();
            return Ok(StepReport {
                grad_norm,
                skipped: true,
                lr: 0.0,
                micro_batches,
                step: self.step,
            });
        }
        // torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6) when that is below 1.
        let clip = match self.config.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let lr = self.config.lr_at(self.step);
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for slot in &mut self.slots {
            let Some(g) = slot.acc.take() else {
                // torch skips parameters whose .grad is None: no decay, no moment update.
                continue;
            };
            let g = if clip < 1.0 { (g * clip)? } else { g };
            let p = slot.var.as_tensor().detach();
            let p = (&p * (1.0 - lr * self.config.weight_decay))?;
            let m = ((&slot.m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            // torch: denom = sqrt(v) / sqrt(bc2) + eps; p -= (lr / bc1) * m / denom
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.config.eps)?;
            let p = (p - (m.div(&denom)? * (lr / bc1))?)?;
            slot.var.set(&p)?;
            slot.m = m;
            slot.v = v;
        }
        self.micro_batches = 0;
        Ok(StepReport {
            grad_norm,
            skipped: false,
            lr,
            micro_batches,
            step: self.step,
        })
    }

    /// Drops the accumulated gradients without updating.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.acc = None;
        }
        self.micro_batches = 0;
    }

    /// Everything needed to resume: `<name>.exp_avg`, `<name>.exp_avg_sq`, pending
    /// `<name>.grad_acc`, and the counters `__step` and `__micro_batches` (u32 pairs, lo/hi).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for slot in &self.slots {
            out.insert(format!("{}.exp_avg", slot.name), slot.m.clone());
            out.insert(format!("{}.exp_avg_sq", slot.name), slot.v.clone());
            if let Some(a) = &slot.acc {
                out.insert(format!("{}.grad_acc", slot.name), a.clone());
            }
        }
        let dev = candle_core::Device::Cpu;
        out.insert("__step".into(), u64_tensor(self.step, &dev)?);
        out.insert(
            "__micro_batches".into(),
            u64_tensor(self.micro_batches, &dev)?,
        );
        Ok(out)
    }

    /// Restores a state made by [`AdamW::state_tensors`] for the same parameter names and shapes.
    pub fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            state.get(key).ok_or_else(|| TrainError::Mismatch {
                name: key.to_string(),
                reason: "missing from the optimizer state: was it saved for other parameters?"
                    .into(),
            })
        };
        let mut loaded = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let dev = slot.var.device();
            let fit = |key: String| -> Result<Tensor> {
                let t = get(&key)?;
                if t.dims() != slot.var.dims() || t.dtype() != slot.var.dtype() {
                    return Err(TrainError::Mismatch {
                        name: key,
                        reason: format!(
                            "saved {:?} {:?}, parameter is {:?} {:?}",
                            t.dims(),
                            t.dtype(),
                            slot.var.dims(),
                            slot.var.dtype()
                        ),
                    });
                }
                Ok(t.to_device(dev)?)
            };
            let m = fit(format!("{}.exp_avg", slot.name))?;
            let v = fit(format!("{}.exp_avg_sq", slot.name))?;
            let key = format!("{}.grad_acc", slot.name);
            let acc = if state.contains_key(&key) {
                Some(fit(key)?)
            } else {
                None
            };
            loaded.push((m, v, acc));
        }
        let step = tensor_u64(get("__step")?)?;
        let micro = tensor_u64(get("__micro_batches")?)?;
        for (slot, (m, v, acc)) in self.slots.iter_mut().zip(loaded) {
            slot.m = m;
            slot.v = v;
            slot.acc = acc;
        }
        self.step = step;
        self.micro_batches = micro;
        Ok(())
    }
}

fn tracing_skip(norm: f64, step: u64) {
    tracing::warn!(
        grad_norm = norm,
        step,
        "gradient norm is not finite: optimizer step skipped"
    );
}

fn u64_tensor(x: u64, dev: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::new(&[x as u32, (x >> 32) as u32], dev)?)
}

fn tensor_u64(t: &Tensor) -> Result<u64> {
    let v: Vec<u32> = t.to_vec1().map_err(|_| TrainError::Mismatch {
        name: "counter".into(),
        reason: format!(
            "expected two u32 values, got {:?} {:?}",
            t.dims(),
            t.dtype()
        ),
    })?;
    match v.as_slice() {
        [lo, hi] => Ok(u64::from(*lo) | (u64::from(*hi) << 32)),
        _ => Err(TrainError::Mismatch {
            name: "counter".into(),
            reason: format!("expected two u32 values, got {}", v.len()),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // hand-computed expectations, written out in full
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_slice(v, v.len(), &Device::Cpu).expect("var")
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1().expect("vec")
    }

    fn grads_for(v: &Var, g: &[f32]) -> GradStore {
        // loss = sum(p * g) has gradient g.
        let gt = Tensor::from_slice(g, g.len(), &Device::Cpu).expect("g");
        (v.as_tensor() * gt)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward")
    }

    #[test]
    fn adamw_two_steps_match_hand_computed_values() {
        // p0 = 1.0, lr 0.1, betas (0.9, 0.999), eps 1e-8, wd 0.1, no clipping.
        // step 1, g = 0.5:  p = 1 * (1 - 0.01) = 0.99; m = 0.05; v = 0.00025;
        //   mhat = 0.5, vhat = 0.25, update = 0.1 * 0.5 / (0.5 + 1e-8) = 0.1 - 2e-9
        //   p1 = 0.89 + 2e-9 = 0.890000002
        // step 2, g = -1.0: p = 0.890000002 * 0.99 = 0.88110000198;
        //   m = 0.045 - 0.1 = -0.055; v = 0.00024975 + 0.001 = 0.00124975;
        //   mhat = -0.055 / 0.19 = -0.289473684; vhat = 0.00124975 / 0.001999 = 0.625187594;
        //   sqrt(vhat) = 0.790688051; update = 0.1 * -0.289473684 / 0.790688061 = -0.036610352
        //   p2 = 0.88110000198 + 0.036610352 = 0.917710354 (torch.optim.AdamW in f64 agrees)
        let p = var(&[1.0]);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.1,
            max_grad_norm: None,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).expect("opt");
        opt.accumulate(&grads_for(&p, &[0.5])).expect("acc");
        let r = opt.step().expect("step");
        assert!(!r.skipped);
        assert!((values(&p)[0] - 0.890_000_002).abs() < 1e-6);
        opt.accumulate(&grads_for(&p, &[-1.0])).expect("acc");
        opt.step().expect("step");
        assert!(
            (values(&p)[0] - 0.917_710_354).abs() < 1e-6,
            "{}",
            values(&p)[0]
        );
    }

    #[test]
    fn clipping_scales_gradients_to_the_max_norm() {
        // g = (3, 4): norm 5, clipped to norm 1 -> (0.6, 0.8) (times 1 / (1 + 2e-7)).
        // With beta1 = beta2 = 0 and eps = 0 the update is lr * sign(g): clipping is invisible
        // in the parameters, so check the reported norm and the stored first moment instead.
        let p = var(&[0.0, 0.0]);
        let cfg = AdamWConfig {
            lr: 1.0,
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
            schedule: LrSchedule::Constant,
        };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).expect("opt");
        opt.accumulate(&grads_for(&p, &[3.0, 4.0])).expect("acc");
        let r = opt.step().expect("step");
        assert!((r.grad_norm - 5.0).abs() < 1e-6);
        let m: Vec<f32> = opt.slots[0].m.to_vec1().expect("m");
        assert!(
            (m[0] - 0.6).abs() < 1e-6 && (m[1] - 0.8).abs() < 1e-6,
            "{m:?}"
        );
        assert_eq!(values(&p), vec![-1.0, -1.0]);
    }

    #[test]
    fn non_finite_norm_skips_the_step_and_keeps_parameters() {
        let p = var(&[1.0, 2.0]);
        let mut opt =
            AdamW::new(vec![("p".into(), p.clone())], AdamWConfig::default()).expect("opt");
        opt.accumulate(&grads_for(&p, &[f32::NAN, 1.0]))
            .expect("acc");
        let r = opt.step().expect("step");
        assert!(r.skipped);
        assert!(r.grad_norm.is_nan());
        assert_eq!(r.step, 0);
        assert_eq!(values(&p), vec![1.0, 2.0]);
        // The bad gradient is gone: the next good step proceeds as step 1.
        opt.accumulate(&grads_for(&p, &[1.0, 1.0])).expect("acc");
        let r = opt.step().expect("step");
        assert!(!r.skipped);
        assert_eq!(r.step, 1);
    }

    #[test]
    fn accumulation_sums_micro_batches() {
        // Two micro-batches of g = 1 and g = 3 give one step with g = 4: with lr 1, no decay,
        // beta1 = 0.5 and beta2 = 0.5, eps 0: m = 2, v = 8, mhat = 4, vhat = 16, update = 1.
        let p = var(&[10.0]);
        let cfg = AdamWConfig {
            lr: 1.0,
            beta1: 0.5,
            beta2: 0.5,
            eps: 0.0,
            weight_decay: 0.0,
            max_grad_norm: None,
            warmup_steps: 0,
            schedule: LrSchedule::Constant,
        };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).expect("opt");
        opt.accumulate(&grads_for(&p, &[1.0])).expect("acc");
        opt.accumulate(&grads_for(&p, &[3.0])).expect("acc");
        let r = opt.step().expect("step");
        assert_eq!(r.micro_batches, 2);
        assert!((r.grad_norm - 4.0).abs() < 1e-9);
        assert!((values(&p)[0] - 9.0).abs() < 1e-6);
    }

    #[test]
    fn warmup_is_linear_then_constant() {
        let cfg = AdamWConfig {
            lr: 1e-3,
            warmup_steps: 4,
            ..AdamWConfig::default()
        };
        let lrs: Vec<f64> = (1..=6).map(|s| cfg.lr_at(s)).collect();
        let want = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3];
        for (a, b) in lrs.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{lrs:?}");
        }
    }

    #[test]
    fn cosine_follows_the_formula_after_the_warmup() {
        // lr 1e-3, 2 warmup steps (5e-4, 1e-3), cosine over 4 steps to 10%: p = (s - 3) / 4.
        let cfg = AdamWConfig {
            lr: 1e-3,
            warmup_steps: 2,
            schedule: LrSchedule::Cosine {
                total_steps: 6,
                min_lr_ratio: 0.1,
            },
            ..AdamWConfig::default()
        };
        cfg.validate().expect("valid");
        // By hand: 0.1 + 0.9 * (1 + cos(pi p)) / 2 at p = 0, 1/4, 1/2, 3/4, then the floor.
        let c = std::f64::consts::FRAC_1_SQRT_2;
        let want = [
            5e-4,
            1e-3,
            1e-3,
            1e-3 * (0.1 + 0.9 * (1.0 + c) / 2.0),
            1e-3 * (0.1 + 0.9 * 0.5),
            1e-3 * (0.1 + 0.9 * (1.0 - c) / 2.0),
            1e-4,
            1e-4,
        ];
        for (s, w) in (1..=8).zip(want) {
            let got = cfg.lr_at(s);
            assert!((got - w).abs() < 1e-15, "step {s}: {got} vs {w}");
        }
        for bad in [
            LrSchedule::Cosine {
                total_steps: 2,
                min_lr_ratio: 0.0,
            },
            LrSchedule::Cosine {
                total_steps: 6,
                min_lr_ratio: 1.5,
            },
        ] {
            let cfg = AdamWConfig {
                schedule: bad,
                ..cfg.clone()
            };
            assert!(matches!(cfg.validate(), Err(TrainError::Config(_))));
        }
    }

    #[test]
    fn invalid_config_is_refused() {
        let cfg = AdamWConfig {
            beta2: 1.0,
            ..AdamWConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(TrainError::Config(_))));
    }

    #[test]
    fn resumed_state_continues_bit_for_bit() {
        let cfg = AdamWConfig {
            lr: 0.01,
            ..AdamWConfig::default()
        };
        let grads = [[0.3f32, -0.2], [0.1, 0.7], [-0.5, 0.4], [0.2, 0.2]];
        // Straight run of 4 steps.
        let p = var(&[1.0, -1.0]);
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg.clone()).expect("opt");
        for g in &grads {
            opt.accumulate(&grads_for(&p, g)).expect("acc");
            opt.step().expect("step");
        }
        // Run of 2 steps plus a pending micro-batch, saved, then resumed in a fresh optimizer.
        let q = var(&[1.0, -1.0]);
        let mut opt2 = AdamW::new(vec![("p".into(), q.clone())], cfg.clone()).expect("opt");
        for g in &grads[..2] {
            opt2.accumulate(&grads_for(&q, g)).expect("acc");
            opt2.step().expect("step");
        }
        let state = opt2.state_tensors().expect("state");
        let q2 = Var::from_tensor(q.as_tensor()).expect("copy");
        let mut opt3 = AdamW::new(vec![("p".into(), q2.clone())], cfg).expect("opt");
        opt3.load_state_tensors(&state).expect("load");
        assert_eq!(opt3.step_count(), 2);
        for g in &grads[2..] {
            opt3.accumulate(&grads_for(&q2, g)).expect("acc");
            opt3.step().expect("step");
        }
        let a: Vec<u32> = values(&p).iter().map(|x| x.to_bits()).collect();
        let b: Vec<u32> = values(&q2).iter().map(|x| x.to_bits()).collect();
        assert_eq!(a, b);
    }
}

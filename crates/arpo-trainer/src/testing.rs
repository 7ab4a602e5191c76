//! Small, exact stand-ins for the trainer's own tests and for users testing a loop change
//! without a model: a row-of-buttons environment and a tabular softmax policy that is also its
//! own [`Learner`]. They speak the real protocol (UI-TARS text parsed by arpo-core) and the real
//! loss (arpo-grpo), so the loop around them is exercised exactly as with the real model.
//!
//! - [`ButtonRow`]: the screen is 1000×100 px with `buttons` buttons 100 px wide at the top
//!   left; the task "Press button k of B" is solved by clicking button `k` and answering
//!   `finished()`. Failures can be injected per task (`fail_resets`, `break_at_step`,
//!   `fail_evaluations`).
//! - [`TabularPolicy`]: for each (task, turn) a softmax over the answers "click button i",
//!   `finished()` and an unparsable answer; sampling is seeded; the update is the gradient of
//!   arpo-grpo's clipped loss through the softmax, with plain SGD at `lr`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arpo_core::{
    Action, AgentContext, EnvError, Environment, Observation, Policy, PolicyError, Response,
    SamplingParams, Screenshot, Step, Task, Trajectory,
};
use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::learner::{Learner, Sample, UpdateStats};

/// The `<|im_end|>` id the tabular policy ends its answers with.
pub const IM_END: u32 = 151_645;

/// A task for [`ButtonRow`]: press button `target` of `buttons`.
pub fn button_task(id: &str, target: usize, buttons: usize) -> Task {
    let mut t = Task::new(id, format!("Press button {target} of {buttons}"));
    t.config = serde_json::json!({ "buttons": buttons, "target": target });
    t
}

/// The row-of-buttons environment.
#[derive(Debug, Default)]
pub struct ButtonRow {
    task: Option<Task>,
    pressed: Option<usize>,
    steps: usize,
    resets_by_task: BTreeMap<String, usize>,
    broken_once: BTreeMap<String, bool>,
    evaluations_by_task: BTreeMap<String, usize>,
}

impl ButtonRow {
    pub fn new() -> Self {
        Self::default()
    }

    fn screenshot(&self) -> Screenshot {
        // PNG magic followed by the state: deterministic bytes, enough for a tabular policy.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.push(self.pressed.map_or(255, |p| p as u8));
        Screenshot::new(bytes, 1000, 100)
    }

    fn cfg(&self, key: &str) -> usize {
        self.task
            .as_ref()
            .and_then(|t| t.config.get(key))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as usize
    }
}

#[async_trait]
impl Environment for ButtonRow {
    async fn reset(&mut self, task: &Task) -> Result<Observation, EnvError> {
        let n = self.resets_by_task.entry(task.id.clone()).or_insert(0);
        *n += 1;
        let fail = task
            .config
            .get("fail_resets")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as usize;
        if *n <= fail {
            return Err(EnvError::Unavailable {
                operation: "reset".into(),
                reason: format!("injected failure {n} of {fail}"),
            });
        }
        self.task = Some(task.clone());
        self.pressed = None;
        self.steps = 0;
        Ok(Observation::from_screenshot(self.screenshot()))
    }

    async fn step(&mut self, action: &Action) -> Result<Step, EnvError> {
        let Some(task) = self.task.clone() else {
            return Err(EnvError::NotReset);
        };
        self.steps += 1;
        let break_at = self.cfg("break_at_step");
        if break_at > 0 && self.steps == break_at && !self.broken_once.contains_key(&task.id) {
            self.broken_once.insert(task.id.clone(), true);
            return Err(EnvError::Unavailable {
                operation: "step".into(),
                reason: "injected failure".into(),
            });
        }
        match action {
            Action::Click { point } => {
                let i = (point.x / 100.0).floor();
                if point.y <= 100.0 && i >= 0.0 && (i as usize) < self.cfg("buttons") {
                    self.pressed = Some(i as usize);
                } else {
                    return Err(EnvError::InvalidAction {
                        action: "click".into(),
                        reason: "not on a button".into(),
                    });
                }
            }
            _ => {
                return Err(EnvError::InvalidAction {
                    action: action.name().into(),
                    reason: "only clicks do anything here".into(),
                });
            }
        }
        Ok(Step {
            observation: Observation::from_screenshot(self.screenshot()),
            done: false,
        })
    }

    async fn evaluate(&mut self, last_action: Option<&Action>) -> Result<f64, EnvError> {
        let id = self.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
        let fail = self.cfg("fail_evaluations");
        let n = self.evaluations_by_task.entry(id).or_insert(0);
        *n += 1;
        let n = *n;
        if n <= fail {
            return Err(EnvError::Evaluation(format!(
                "injected evaluator failure {n} of {fail}"
            )));
        }
        let finished = matches!(last_action, Some(Action::Finished { .. }));
        let target = self.cfg("target");
        Ok(if finished && self.pressed == Some(target) {
            1.0
        } else {
            0.0
        })
    }

    fn screen_size(&self) -> (u32, u32) {
        (1000, 100)
    }
}

/// The answers of the tabular policy for a task with `buttons` buttons: clicks, then
/// `finished()`, then an unparsable answer.
pub fn answers(buttons: usize) -> Vec<String> {
    let mut out: Vec<String> = (0..buttons)
        .map(|i| {
            // Relative coordinates: x in 0..1000 is pixels here (screen 1000 wide), y 500 → 50 px.
            format!(
                "Thought: press button {i}\nAction: click(start_box='({},500)')",
                i * 100 + 50
            )
        })
        .collect();
    out.push("Thought: done\nAction: finished()".into());
    out.push("I am not sure what to do".into());
    out
}

fn buttons_of(instruction: &str) -> usize {
    instruction
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2)
}

/// Logits per (instruction, turn) key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub logits: BTreeMap<String, Vec<f64>>,
}

impl Table {
    fn key(instruction: &str, turn: usize) -> String {
        format!("{instruction}#{}", turn.min(3))
    }

    fn probs(&mut self, instruction: &str, turn: usize) -> Vec<f64> {
        let n = buttons_of(instruction) + 2;
        let logits = self
            .logits
            .entry(Self::key(instruction, turn))
            .or_insert_with(|| {
                let mut l = vec![0.0; n];
                l[n - 1] = -1.0; // the unparsable answer starts less likely
                l
            });
        softmax(logits, 1.0)
    }
}

fn softmax(logits: &[f64], temperature: f64) -> Vec<f64> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| ((l - m) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// A tabular softmax policy; clones share the same table (the policy and the learner).
#[derive(Debug, Clone)]
pub struct TabularPolicy {
    pub table: Arc<Mutex<Table>>,
    pub lr: f64,
    pub max_grad_norm: f64,
    /// Batch sizes seen by `act`, in call order.
    pub batches: Arc<Mutex<Vec<usize>>>,
}

impl TabularPolicy {
    pub fn new(lr: f64) -> Self {
        Self {
            table: Arc::new(Mutex::new(Table::default())),
            lr,
            max_grad_norm: 1.0,
            batches: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Table>, TrainerError> {
        self.table
            .lock()
            .map_err(|_| TrainerError::learner_msg("tabular policy lock poisoned"))
    }

    /// Index of an answer of `buttons` from the first sampled token.
    fn answer_of(token_ids: &[u32]) -> Option<usize> {
        token_ids.first().map(|&t| t as usize)
    }
}

#[async_trait]
impl Policy for TabularPolicy {
    async fn act(
        &self,
        contexts: &[AgentContext],
        sampling: &SamplingParams,
    ) -> Result<Vec<Response>, PolicyError> {
        if let Ok(mut b) = self.batches.lock() {
            b.push(contexts.len());
        }
        let mut table = self
            .table
            .lock()
            .map_err(|_| PolicyError::Generation("lock poisoned".into()))?;
        let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed.unwrap_or(0));
        let mut out = Vec::with_capacity(contexts.len());
        for c in contexts {
            let turn = c.responses.len();
            let p = table.probs(&c.instruction, turn);
            let logits: Vec<f64> = p.iter().map(|x| x.ln()).collect();
            let q = softmax(&logits, sampling.temperature);
            let choice = if sampling.temperature <= 0.0 {
                q.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i)
            } else {
                let u: f64 = rng.random();
                let mut acc = 0.0;
                let mut pick = q.len() - 1;
                for (i, x) in q.iter().enumerate() {
                    acc += x;
                    if u < acc {
                        pick = i;
                        break;
                    }
                }
                pick
            };
            let text = answers(buttons_of(&c.instruction))[choice].clone();
            out.push(Response {
                text,
                token_ids: vec![choice as u32, IM_END],
                logprobs: vec![q[choice].ln() as f32, 0.0],
                finish_reason: arpo_core::FinishReason::Stop,
            });
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        "tabular test policy".into()
    }
}

impl Learner for TabularPolicy {
    fn old_logprobs(&mut self, trajectory: &Trajectory) -> Result<Vec<Vec<f32>>, TrainerError> {
        let mut table = self.lock()?;
        Ok(trajectory
            .turns
            .iter()
            .enumerate()
            .map(|(i, turn)| {
                let p = table.probs(&trajectory.instruction, i);
                let a = Self::answer_of(&turn.response.token_ids).unwrap_or(0);
                vec![p.get(a).copied().unwrap_or(1e-12).ln() as f32, 0.0]
            })
            .collect())
    }

    fn update(
        &mut self,
        minibatch: &[Sample],
        loss: &arpo_grpo::PolicyLossConfig,
        _optimizer_step: u64,
    ) -> Result<UpdateStats, TrainerError> {
        let mut table = self.lock()?;
        // Flatten each trajectory's tokens: per turn [answer, im_end]; im_end has log-prob 0.
        let mut logp = Vec::new();
        let mut old = Vec::new();
        let mut adv = Vec::new();
        let mut mask = Vec::new();
        let mut rollout = Vec::new();
        let mut rollout_gap = crate::rollout_gap::RolloutGap::default();
        for s in minibatch {
            let (mut l, mut o, mut a, mut m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (i, turn) in s.trajectory.turns.iter().enumerate() {
                let p = table.probs(&s.trajectory.instruction, i);
                let c = Self::answer_of(&turn.response.token_ids).unwrap_or(0);
                l.extend([p.get(c).copied().unwrap_or(1e-12).ln(), 0.0]);
                match &s.old_logprobs {
                    Some(old_turns) => {
                        let ol = old_turns.get(i).cloned().unwrap_or_default();
                        o.extend([
                            f64::from(ol.first().copied().unwrap_or(0.0)),
                            f64::from(ol.get(1).copied().unwrap_or(0.0)),
                        ]);
                    }
                    // On-policy: the old log-probs are the current ones.
                    None => o.extend([p.get(c).copied().unwrap_or(1e-12).ln(), 0.0]),
                }
                a.extend([s.advantage; 2]);
                m.extend([true, true]);
            }
            // The sampler's log-probs where it reported them (the learner's elsewhere).
            let learner_old: Vec<f32> = o.iter().map(|&x| x as f32).collect();
            let (r, gap) =
                crate::rollout_gap::sampler_logprobs(s, &learner_old, loss.rollout_is_cap)?;
            rollout_gap.merge(&gap);
            rollout.push(r.into_iter().map(f64::from).collect::<Vec<f64>>());
            logp.push(l);
            old.push(o);
            adv.push(a);
            mask.push(m);
        }
        let seqs: Vec<arpo_grpo::SequenceInput<'_>> = (0..minibatch.len())
            .map(|k| arpo_grpo::SequenceInput {
                logp: &logp[k],
                old_logp: &old[k],
                advantages: &adv[k],
                mask: &mask[k],
                ref_logp: None,
                entropy: None,
                rollout_logp: Some(&rollout[k]),
            })
            .collect();
        let out = arpo_grpo::policy_loss_slices(&seqs, loss)
            .map_err(|e| TrainerError::learner_msg(e.to_string()))?;
        // Chain rule through the softmax: d logp(c) / d logit_j = [j = c] − p_j.
        let mut grads: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (k, s) in minibatch.iter().enumerate() {
            for (i, turn) in s.trajectory.turns.iter().enumerate() {
                let g = out.grad_logp[k][2 * i];
                if g == 0.0 {
                    continue;
                }
                let p = table.probs(&s.trajectory.instruction, i);
                let c = Self::answer_of(&turn.response.token_ids).unwrap_or(0);
                let entry = grads
                    .entry(Table::key(&s.trajectory.instruction, i))
                    .or_insert_with(|| vec![0.0; p.len()]);
                for (j, pj) in p.iter().enumerate() {
                    entry[j] += g * (f64::from(u8::from(j == c)) - pj);
                }
            }
        }
        let norm = grads
            .values()
            .flat_map(|g| g.iter())
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let skipped = !norm.is_finite();
        if !skipped {
            let scale = if norm > self.max_grad_norm {
                self.max_grad_norm / norm
            } else {
                1.0
            };
            for (key, g) in grads {
                if let Some(l) = table.logits.get_mut(&key) {
                    for (x, gx) in l.iter_mut().zip(g) {
                        *x -= self.lr * scale * gx;
                    }
                }
            }
        }
        Ok(UpdateStats {
            loss: out.loss,
            pg_clipfrac_higher: out.metrics.pg_clipfrac_higher,
            pg_clipfrac_lower: out.metrics.pg_clipfrac_lower,
            ppo_kl: out.metrics.ppo_kl,
            entropy: out.metrics.entropy_estimate,
            grad_norm: norm,
            lr: self.lr,
            tokens: out.metrics.tokens,
            skipped,
            rollout_gap,
        })
    }

    fn save(&self, dir: &Path) -> Result<(), TrainerError> {
        let table = self.lock()?.clone();
        crate::metrics::write_json(&dir.join("tabular_policy.json"), &table)
    }

    fn load(&mut self, dir: &Path) -> Result<(), TrainerError> {
        let path = dir.join("tabular_policy.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
        let table: Table = serde_json::from_str(&text).map_err(|e| TrainerError::io(&path, e))?;
        *self.lock()? = table;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("tabular test learner (sgd lr {})", self.lr)
    }
}

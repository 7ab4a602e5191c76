//! Scoring an episode: token log-probs of the assistant tokens, differentiable, and their
//! entropies as a by-product.
//!
//! The episode is one sequence (system, user turns with screenshots, assistant turns). The
//! log-prob of token `t` (t >= 1) is `log_softmax(logits[t - 1])[ids[t]]`; only tokens with
//! `assistant_mask[t]` are scored, and logits are computed only at the rows that predict them
//! (the `[len, vocab]` matrix of a long episode is never built). No KV cache is involved.

use candle_core::{CustomOp2, D, DType, Result as CandleResult, Tensor};

use super::ops::device_forwards;

use super::{Result, TrainError};
use crate::Qwen2Vl;

/// A tokenized episode as the trainer scores it.
#[derive(Debug, Clone)]
pub struct Episode {
    /// The whole multi-turn sequence.
    pub input_ids: Vec<u32>,
    /// `true` for the tokens that are trained (assistant turns); same length as `input_ids`.
    pub assistant_mask: Vec<bool>,
    /// Patch rows of all images, `[patches, 3*2*14*14]`, as the image processor gives them.
    pub pixel_values: Option<Tensor>,
    /// `(t, h, w)` patch grid of each image, in order.
    pub grid_thw: Vec<[usize; 3]>,
}

impl Episode {
    /// Token positions `t >= 1` that are scored.
    pub fn scored_positions(&self) -> Vec<usize> {
        (1..self.input_ids.len())
            .filter(|&t| self.assistant_mask.get(t).copied().unwrap_or(false))
            .collect()
    }

    fn check(&self) -> Result<()> {
        if self.input_ids.len() != self.assistant_mask.len() {
            return Err(TrainError::Config(format!(
                "episode has {} tokens but an assistant mask of {}",
                self.input_ids.len(),
                self.assistant_mask.len()
            )));
        }
        if self.input_ids.len() < 2 {
            return Err(TrainError::Config(
                "episode needs at least two tokens to score".into(),
            ));
        }
        Ok(())
    }
}

/// Log-probs of an episode's assistant tokens.
#[derive(Debug, Clone)]
pub struct EpisodeScore {
    /// The scored token positions (indices into `input_ids`).
    pub positions: Vec<usize>,
    /// `[positions.len()]` log-probs, tracked: gradients flow to the trainable parameters.
    pub log_probs: Tensor,
    /// Entropy (nats) of the predictive distribution at each scored position (not tracked).
    pub entropy: Vec<f32>,
}

impl EpisodeScore {
    /// Sum of the log-probs (a tracked scalar).
    pub fn sum(&self) -> Result<Tensor> {
        Ok(self.log_probs.sum_all()?)
    }

    /// Mean negative log-likelihood per scored token (a tracked scalar): the SFT loss.
    pub fn mean_nll(&self) -> Result<Tensor> {
        let n = self.positions.len().max(1) as f64;
        Ok((self.log_probs.sum_all()?.neg()? / n)?)
    }
}

/// Scores `episode` under `model`.
pub fn score_episode(model: &Qwen2Vl, episode: &Episode) -> Result<EpisodeScore> {
    episode.check()?;
    let positions = episode.scored_positions();
    let device = model.device().clone();
    let hidden = model.forward_hidden(
        &episode.input_ids,
        episode.pixel_values.as_ref(),
        &episode.grid_thw,
        false,
    )?;
    if positions.is_empty() {
        let zero = Tensor::zeros(0, DType::F32, &device)?;
        return Ok(EpisodeScore {
            positions,
            log_probs: zero,
            entropy: Vec::new(),
        });
    }
    let rows: Vec<u32> = positions.iter().map(|&t| (t - 1) as u32).collect();
    let rows = Tensor::from_vec(rows, positions.len(), &device)?;
    let h = hidden.index_select(&rows, 1)?;
    let logits = model.text.logits(&h)?.squeeze(0)?.to_dtype(DType::F32)?;
    let targets: Vec<u32> = positions.iter().map(|&t| episode.input_ids[t]).collect();
    let targets = Tensor::from_vec(targets, positions.len(), &device)?;
    let log_probs = token_log_probs(&logits, &targets)?;
    let entropy = entropy(&logits.detach())?.to_vec1::<f32>()?;
    Ok(EpisodeScore {
        positions,
        log_probs,
        entropy,
    })
}

/// `log_softmax(logits)[i, targets[i]]` for `logits: [n, vocab]`, `targets: [n]` (u32),
/// differentiable in `logits` without keeping a `[n, vocab]` log-softmax in the graph.
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TokenLogProbs)
}

/// Per-row entropy of `softmax(logits)`, `[n, vocab] -> [n]`.
pub fn entropy(logits: &Tensor) -> candle_core::Result<Tensor> {
    let lse = logsumexp(logits)?;
    let p = logits.broadcast_sub(&lse)?.exp()?;
    // H = lse - sum(p * logits)
    lse.squeeze(1)? - (p * logits)?.sum(D::Minus1)?
}

fn logsumexp(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max
}

struct TokenLogProbs;

impl TokenLogProbs {
    fn run(&self, [logits, targets]: [&Tensor; 2]) -> CandleResult<Tensor> {
        let picked = logits.gather(&targets.unsqueeze(1)?, 1)?;
        (picked - logsumexp(logits)?)?.squeeze(1)
    }
}

impl CustomOp2 for TokenLogProbs {
    fn name(&self) -> &'static str {
        "arpo-token-log-probs"
    }

    device_forwards!(2);

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d lp_i / d logits_ij = [j == t_i] - softmax(logits_i)_j
        let (_n, v) = logits.dims2()?;
        let p = logits.broadcast_sub(&logsumexp(logits)?)?.exp()?;
        let cols = Tensor::arange(0u32, v as u32, logits.device())?.unsqueeze(0)?;
        let onehot = cols
            .broadcast_eq(&targets.unsqueeze(1)?)?
            .to_dtype(logits.dtype())?;
        let d = (onehot - p)?.broadcast_mul(&grad.unsqueeze(1)?)?;
        Ok((Some(d), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn token_log_probs_match_hand_values_and_log_softmax_gradient() {
        // Row [0, ln 3]: softmax (1/4, 3/4); target 1 -> ln(3/4).
        // Row [0, 0]: target 0 -> ln(1/2).
        let dev = Device::Cpu;
        let l = Var::new(&[[0f64, 3f64.ln()], [0., 0.]], &dev).expect("var");
        let t = Tensor::new(&[1u32, 0], &dev).expect("t");
        let lp = token_log_probs(l.as_tensor(), &t).expect("lp");
        let v: Vec<f64> = lp.to_vec1().expect("v");
        assert!((v[0] - 0.75f64.ln()).abs() < 1e-12 && (v[1] - 0.5f64.ln()).abs() < 1e-12);
        let w = Tensor::new(&[2f64, -1.], &dev).expect("w");
        let g = (lp * &w)
            .and_then(|x| x.sum_all())
            .and_then(|x| x.backward())
            .expect("bwd");
        // Row 0: 2 * ([0, 1] - [1/4, 3/4]) = [-0.5, 0.5]; row 1: -1 * ([1, 0] - [1/2, 1/2]).
        let d: Vec<Vec<f64>> = g.get(&l).expect("grad").to_vec2().expect("v");
        let want = [[-0.5, 0.5], [-0.5, 0.5]];
        for (r, w) in d.iter().zip(want) {
            for (a, b) in r.iter().zip(w) {
                assert!((a - b).abs() < 1e-12, "{d:?}");
            }
        }
        // Entropy of (1/4, 3/4) and (1/2, 1/2).
        let h: Vec<f64> = entropy(l.as_tensor()).expect("h").to_vec1().expect("v");
        let h0 = -(0.25f64 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert!((h[0] - h0).abs() < 1e-12 && (h[1] - 2f64.ln()).abs() < 1e-12);
    }
}

//! KV-cache generation, batched over sequences of different lengths and image counts.
//!
//! Sequences are left-padded to a common length; padding keys are masked out, so each
//! sequence sees exactly what it would see alone. Greedy batched generation gives the same
//! tokens as one-at-a-time generation.

use arpo_core::{FinishReason, SamplingParams};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};
use crate::model::Qwen2Vl;
use crate::rope::mrope_cos_sin;
use crate::text::KvCache;

/// One prompt to continue.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub input_ids: Vec<u32>,
    /// `[patches, c*t*p*p]` of this prompt's images (in order), if any.
    pub pixel_values: Option<Tensor>,
    pub grid_thw: Vec<[usize; 3]>,
}

/// What one sequence generated.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Sampled ids, including the stop token when generation stopped on one.
    pub token_ids: Vec<u32>,
    /// Log-probability of each sampled token: `log_softmax(logits / temperature)` (plain
    /// `log_softmax(logits)` when greedy), before any top-k/top-p cut.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Timings of one `generate` call, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationTimings {
    pub vision_s: f64,
    /// Vision + prompt forward, up to the first token's logits.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Decode steps run after the first token.
    pub decode_steps: usize,
}

/// `log softmax(logits / temperature)[token]` (temperature 0 is read as 1, as in greedy).
pub fn logprob_of(logits: &[f32], token: u32, temperature: f64) -> f32 {
    let t = if temperature <= 0.0 {
        1.0
    } else {
        temperature as f32
    };
    let max = logits
        .iter()
        .map(|l| l / t)
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from((l / t - max).exp())).sum();
    logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |l| l / t - max - sum.ln() as f32)
}

/// Picks the next token from `logits` (f32, one row); returns `(token, logprob)`.
pub fn sample_token(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let greedy = params.temperature <= 0.0;
    let t = if greedy {
        1.0
    } else {
        params.temperature as f32
    };
    let scaled: Vec<f32> = logits.iter().map(|l| l / t).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = scaled.iter().map(|l| f64::from((l - max).exp())).sum();
    let log_z = max + sum.ln() as f32;
    let logprob = |i: usize| scaled[i] - log_z;
    if greedy {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, &v) in scaled.iter().enumerate() {
            if v > scaled[best] {
                best = i;
            }
        }
        return (best as u32, logprob(best));
    }
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    if params.top_k > 0 {
        order.truncate(params.top_k as usize);
    }
    let probs: Vec<f64> = order
        .iter()
        .map(|&i| f64::from((scaled[i] - max).exp()))
        .collect();
    let total: f64 = probs.iter().sum();
    // top-p: the smallest prefix whose mass reaches top_p (at least one token).
    let mut keep = probs.len();
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        for (n, p) in probs.iter().enumerate() {
            acc += p / total;
            if acc >= params.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = probs[..keep].iter().sum();
    let mut u = rng.random::<f64>() * kept_total;
    for (n, p) in probs[..keep].iter().enumerate() {
        if u < *p {
            return (order[n] as u32, logprob(order[n]));
        }
        u -= p;
    }
    let last = order[keep - 1];
    (last as u32, logprob(last))
}

impl Qwen2Vl {
    /// Continues every request (batched); stops each at a token of `stop_ids` or after
    /// `params.max_tokens`.
    pub fn generate(
        &self,
        requests: &[GenerationRequest],
        params: &SamplingParams,
        stop_ids: &[u32],
    ) -> Result<(Vec<Generation>, GenerationTimings)> {
        let mut timings = GenerationTimings::default();
        if requests.is_empty() {
            return Ok((Vec::new(), timings));
        }
        if requests.iter().any(|r| r.input_ids.is_empty()) {
            return Err(ModelError::Input("a request has an empty prompt".into()));
        }
        let device = self.device().clone();
        let dtype = self.dtype();
        let start = std::time::Instant::now();
        // All images of all requests go through the vision tower at once (attention never
        // crosses images), then are split back per request.
        let mut all_pv = Vec::new();
        let mut all_grid = Vec::new();
        for r in requests {
            if let Some(pv) = &r.pixel_values {
                if !r.grid_thw.is_empty() {
                    all_pv.push(pv.clone());
                    all_grid.extend_from_slice(&r.grid_thw);
                }
            }
        }
        let features = if all_grid.is_empty() {
            None
        } else {
            let pv = Tensor::cat(&all_pv, 0)?;
            Some(self.vision.forward(&pv, &all_grid, true)?)
        };
        timings.vision_s = start.elapsed().as_secs_f64();
        let merge = self.config.vision.spatial_merge_size.pow(2);
        let b = requests.len();
        let lens: Vec<usize> = requests.iter().map(|r| r.input_ids.len()).collect();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let mut embeds = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        let mut deltas = Vec::with_capacity(b);
        let mut offset = 0;
        for r in requests {
            let n: usize = r.grid_thw.iter().map(|g| g[0] * g[1] * g[2] / merge).sum();
            let f = match (&features, n) {
                (Some(f), n) if n > 0 && r.pixel_values.is_some() => Some(f.narrow(0, offset, n)?),
                _ => None,
            };
            if r.pixel_values.is_some() {
                offset += n;
            }
            let e = self.merge_embeddings(&r.input_ids, f.as_ref())?;
            let rope = self.rope_index(&r.input_ids, &r.grid_thw)?;
            let pad = max_len - r.input_ids.len();
            let e = if pad > 0 {
                let h = e.dim(1)?;
                Tensor::cat(&[&Tensor::zeros((pad, h), dtype, &device)?, &e], 0)?
            } else {
                e
            };
            embeds.push(e);
            let mut p = rope.positions;
            for axis in &mut p {
                let mut v = vec![0i64; pad];
                v.extend_from_slice(axis);
                *axis = v;
            }
            positions.push(p);
            deltas.push(rope.delta);
        }
        let x = Tensor::stack(&embeds, 0)?;
        let (cos, sin) = mrope_cos_sin(
            &positions,
            &self.inv_freq,
            &self.config.text.mrope_section,
            &device,
        )?;
        let pads: Vec<usize> = lens.iter().map(|l| max_len - l).collect();
        let mut mask = Vec::with_capacity(b * max_len * max_len);
        for &pad in &pads {
            for i in 0..max_len {
                for j in 0..max_len {
                    let ok = (j >= pad && j <= i) || j == i;
                    mask.push(if ok { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let mask =
            Tensor::from_vec(mask, (b, 1, max_len, max_len), &device)?.to_dtype(DType::F32)?;
        let mut cache = KvCache::new(self.text.layers.len());
        let hidden =
            self.text
                .forward_hidden(&x, &cos, &sin, Some(&mask), Some(&mut cache), true)?;
        let mut logits = self
            .text
            .logits(&hidden.narrow(1, max_len - 1, 1)?)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        timings.prefill_s = start.elapsed().as_secs_f64();

        let mut rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        let mut out: Vec<Generation> = (0..b)
            .map(|_| Generation {
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: FinishReason::Length,
            })
            .collect();
        let mut done = vec![params.max_tokens == 0; b];
        // Vision placeholders are never sampled: a generated `<|image_pad|>` would be read as an
        // image slot when the episode is scored for training (and no image stands behind it).
        let placeholders: Vec<usize> = [
            Some(self.config.image_token_id),
            self.config.video_token_id,
            Some(self.config.vision_start_token_id),
        ]
        .into_iter()
        .flatten()
        .map(|t| t as usize)
        .collect();
        let decode_start = std::time::Instant::now();
        loop {
            let mut next = Vec::with_capacity(b);
            for i in 0..b {
                if done[i] {
                    next.push(out[i].token_ids.last().copied().unwrap_or(0));
                    continue;
                }
                let (mut tok, mut lp) = sample_token(&logits[i], params, &mut rng);
                if placeholders.contains(&(tok as usize)) {
                    let mut row = logits[i].clone();
                    for &p in &placeholders {
                        if let Some(l) = row.get_mut(p) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                    tok = sample_token(&row, params, &mut rng).0;
                    // Reported under the whole distribution, as training scores it.
                    lp = logprob_of(&logits[i], tok, params.temperature);
                }
                out[i].token_ids.push(tok);
                out[i].logprobs.push(lp);
                if stop_ids.contains(&tok) {
                    out[i].finish_reason = FinishReason::Stop;
                    done[i] = true;
                } else if out[i].token_ids.len() >= params.max_tokens {
                    done[i] = true;
                }
                next.push(tok);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            // One decode step for the whole batch (finished rows ride along, ignored).
            let step = out.iter().map(|g| g.token_ids.len()).max().unwrap_or(1) - 1;
            let idx = Tensor::from_vec(next, b, &device)?;
            let x = self.text.embed_tokens.index_select(&idx, 0)?.unsqueeze(1)?;
            let pos: Vec<[Vec<i64>; 3]> = (0..b)
                .map(|i| {
                    let p = (lens[i] + step) as i64 + deltas[i];
                    [vec![p], vec![p], vec![p]]
                })
                .collect();
            let (cos, sin) = mrope_cos_sin(
                &pos,
                &self.inv_freq,
                &self.config.text.mrope_section,
                &device,
            )?;
            let t = cache.len() + 1;
            let mask = if pads.iter().any(|&p| p > 0) {
                let m: Vec<f32> = pads
                    .iter()
                    .flat_map(|&pad| {
                        (0..t).map(move |j| if j >= pad { 0.0 } else { f32::NEG_INFINITY })
                    })
                    .collect();
                Some(Tensor::from_vec(m, (b, 1, 1, t), &device)?)
            } else {
                None
            };
            let hidden =
                self.text
                    .forward_hidden(&x, &cos, &sin, mask.as_ref(), Some(&mut cache), true)?;
            logits = self
                .text
                .logits(&hidden)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            timings.decode_steps += 1;
        }
        timings.decode_s = decode_start.elapsed().as_secs_f64();
        Ok((out, timings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn greedy_takes_the_first_maximum_with_its_logprob() {
        let (tok, lp) = sample_token(
            &[0.0, 2.0, 2.0, -1.0],
            &SamplingParams::greedy(4),
            &mut rng(),
        );
        assert_eq!(tok, 1);
        // log(e^2 / (1 + 2e^2 + e^-1))
        let want = 2.0 - (1.0f64 + 2.0 * 2f64.exp() + (-1f64).exp()).ln();
        assert!((f64::from(lp) - want).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::default()
        };
        for _ in 0..5 {
            assert_eq!(sample_token(&[0.1, 3.0, 0.2], &p, &mut rng()).0, 1);
        }
        // probs ~ [0.665, 0.245, 0.090]: top_p 0.6 keeps only the first.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.6,
            ..SamplingParams::default()
        };
        let mut r = rng();
        for _ in 0..50 {
            assert_eq!(sample_token(&[2.0, 1.0, 0.0], &p, &mut r).0, 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..SamplingParams::default()
        };
        // probs [0.25, 0.75]
        let logits = [0.0f32, 3f32.ln()];
        let mut r = rng();
        let ones = (0..4000)
            .filter(|_| sample_token(&logits, &p, &mut r).0 == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
        let a: Vec<u32> = {
            let mut r = rng();
            (0..20)
                .map(|_| sample_token(&logits, &p, &mut r).0)
                .collect()
        };
        let b: Vec<u32> = {
            let mut r = rng();
            (0..20)
                .map(|_| sample_token(&logits, &p, &mut r).0)
                .collect()
        };
        assert_eq!(a, b);
    }
}

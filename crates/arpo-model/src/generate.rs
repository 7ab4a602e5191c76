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
use crate::prefix_cache::{BLOCK_TOKENS, Key, block_keys, image_key};
use crate::rope::mrope_cos_sin;
use crate::text::{KeyMask, KvCache};

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
    /// Prompt tokens whose keys and values came from the prefix cache (not computed again).
    pub cached_tokens: usize,
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

/// What one request brings to a batch: its images, what the prefix cache already holds of it.
struct Prepared {
    /// Image tokens of each image.
    tokens_per_image: Vec<usize>,
    /// Pixel rows `(first, count)` of each image in the request's `pixel_values`.
    pixel_rows: Vec<(usize, usize)>,
    /// The image (index) of each prompt token, `None` for text.
    image_of_token: Vec<Option<usize>>,
    /// Content keys of the images (empty when caching is off).
    image_keys: Vec<Key>,
    /// Cached blocks of the prompt's prefix, `[layers, 2, kv_heads, BLOCK_TOKENS, head_dim]`.
    past_blocks: Vec<Tensor>,
}

impl Prepared {
    fn past(&self) -> usize {
        self.past_blocks.len() * BLOCK_TOKENS
    }
}

impl Qwen2Vl {
    fn prepare_request(&self, r: &GenerationRequest, caching: bool) -> Result<Prepared> {
        let merge = self.config.vision.spatial_merge_size.pow(2);
        let grids: &[[usize; 3]] = if r.pixel_values.is_some() {
            &r.grid_thw
        } else {
            &[]
        };
        let mut pixel_rows = Vec::with_capacity(grids.len());
        let mut tokens_per_image = Vec::with_capacity(grids.len());
        let mut row = 0usize;
        for g in grids {
            let patches = g[0]
                .checked_mul(g[1])
                .and_then(|p| p.checked_mul(g[2]))
                .ok_or_else(|| ModelError::Input(format!("image grid {g:?} is too large")))?;
            pixel_rows.push((row, patches));
            tokens_per_image.push(patches / merge);
            row = row.saturating_add(patches);
        }
        if let Some(pv) = &r.pixel_values
            && !grids.is_empty()
            && pv.dim(0)? != row
        {
            return Err(ModelError::Input(format!(
                "the image grids {grids:?} give {row} patches but pixel_values has {}",
                pv.dim(0)?
            )));
        }
        let image_token = self.config.image_token_id;
        let n_image = r.input_ids.iter().filter(|&&t| t == image_token).count();
        let n_feat: usize = tokens_per_image.iter().sum();
        if n_image != n_feat {
            return Err(ModelError::Input(format!(
                "the prompt has {n_image} image tokens but the images give {n_feat} features"
            )));
        }
        let mut image_of_token = Vec::with_capacity(r.input_ids.len());
        let (mut image, mut seen) = (0, 0);
        for &t in &r.input_ids {
            if t == image_token {
                while seen == tokens_per_image[image] {
                    image += 1;
                    seen = 0;
                }
                image_of_token.push(Some(image));
                seen += 1;
            } else {
                image_of_token.push(None);
            }
        }
        let mut prepared = Prepared {
            tokens_per_image,
            pixel_rows,
            image_of_token,
            image_keys: Vec::new(),
            past_blocks: Vec::new(),
        };
        if caching {
            if let Some(pv) = &r.pixel_values {
                for (&(first, count), g) in prepared.pixel_rows.iter().zip(grids) {
                    prepared
                        .image_keys
                        .push(image_key(&pv.narrow(0, first, count)?, *g)?);
                }
            }
            // At least the last prompt token is computed: its logits start the answer.
            let max_blocks = (r.input_ids.len() - 1) / BLOCK_TOKENS;
            let keys = block_keys(
                &r.input_ids,
                &prepared.image_of_token,
                &prepared.image_keys,
                max_blocks,
            );
            prepared.past_blocks = self.prefix_cache.lookup_blocks(&keys, r.input_ids.len());
        }
        Ok(prepared)
    }

    /// Continues every request (batched); stops each at a token of `stop_ids` or after
    /// `params.max_tokens`.
    ///
    /// With the model's prefix cache on ([`Qwen2Vl::set_prefix_cache_budget`]), the keys and
    /// values of a cached prompt prefix and the features of cached images are reused, and the
    /// prompt and answer blocks of every request are cached for the next call
    /// ([`Generation::cached_tokens`] says how many prompt tokens were reused).
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
        let caching = self.prefix_cache.enabled();
        let prepared = requests
            .iter()
            .map(|r| self.prepare_request(r, caching))
            .collect::<Result<Vec<_>>>()?;

        // The images whose tokens are past the cached prefix need features: from the cache,
        // or all at once through the vision tower (attention never crosses images; one image
        // sent twice in the batch is encoded once).
        let mut features: Vec<Vec<Option<Tensor>>> = prepared
            .iter()
            .map(|p| vec![None; p.tokens_per_image.len()])
            .collect();
        let mut todo: Vec<(usize, usize)> = Vec::new();
        let mut todo_by_key: std::collections::HashMap<Key, usize> =
            std::collections::HashMap::new();
        let mut same_as: Vec<(usize, usize, usize)> = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            let first_needed = p.image_of_token[p.past()..].iter().flatten().next();
            let Some(&first_needed) = first_needed else {
                continue;
            };
            for (m, slot) in features[i].iter_mut().enumerate().skip(first_needed) {
                match p.image_keys.get(m) {
                    Some(key) => {
                        if let Some(f) = self.prefix_cache.image(key) {
                            *slot = Some(f);
                        } else if let Some(&t) = todo_by_key.get(key) {
                            same_as.push((i, m, t));
                        } else {
                            todo_by_key.insert(*key, todo.len());
                            todo.push((i, m));
                        }
                    }
                    None => todo.push((i, m)),
                }
            }
        }
        if !todo.is_empty() {
            let mut pixels = Vec::with_capacity(todo.len());
            let mut grids = Vec::with_capacity(todo.len());
            for &(i, m) in &todo {
                let (first, count) = prepared[i].pixel_rows[m];
                let pv = requests[i]
                    .pixel_values
                    .as_ref()
                    .ok_or_else(|| ModelError::Input("an image has no pixel values".into()))?;
                pixels.push(pv.narrow(0, first, count)?);
                grids.push(requests[i].grid_thw[m]);
            }
            let pv = if pixels.len() == 1 {
                pixels.remove(0)
            } else {
                Tensor::cat(&pixels, 0)?
            };
            let all = self.vision.forward(&pv, &grids, true)?;
            let mut row = 0;
            let mut computed = Vec::with_capacity(todo.len());
            for &(i, m) in &todo {
                let n = prepared[i].tokens_per_image[m];
                let f = all.narrow(0, row, n)?;
                row += n;
                let f = match prepared[i].image_keys.get(m) {
                    Some(key) => {
                        // Its own storage (a view would keep the whole batch's features
                        // alive), without the graph a model with `Var` weights records (it
                        // would keep the vision tower's activations alive).
                        let f = f.contiguous()?.copy()?.detach();
                        self.prefix_cache.insert_image(*key, f.clone());
                        f
                    }
                    None => f,
                };
                features[i][m] = Some(f.clone());
                computed.push(f);
            }
            for (i, m, t) in same_as {
                features[i][m] = Some(computed[t].clone());
            }
        }
        timings.vision_s = start.elapsed().as_secs_f64();

        // Embeddings and M-RoPE positions of the tokens past each cached prefix, left-padded
        // to a common length.
        let b = requests.len();
        let lens: Vec<usize> = requests.iter().map(|r| r.input_ids.len()).collect();
        let pasts: Vec<usize> = prepared.iter().map(Prepared::past).collect();
        let news: Vec<usize> = lens.iter().zip(&pasts).map(|(l, p)| l - p).collect();
        let new_len = news.iter().copied().max().unwrap_or(0);
        let past_len = pasts.iter().copied().max().unwrap_or(0);
        let mut embeds = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        let mut deltas = Vec::with_capacity(b);
        for (i, (r, p)) in requests.iter().zip(&prepared).enumerate() {
            let (past, new) = (pasts[i], news[i]);
            let f = match p.image_of_token[past..].iter().flatten().next() {
                Some(&m0) => {
                    let parts = features[i][m0..]
                        .iter()
                        .map(|f| {
                            f.clone().ok_or_else(|| {
                                ModelError::Input("an image's features are missing".into())
                            })
                        })
                        .collect::<Result<Vec<Tensor>>>()?;
                    let all = Tensor::cat(&parts, 0)?;
                    // Image m0's tokens before the cut are cached already.
                    let before: usize = p.image_of_token[..past]
                        .iter()
                        .filter(|t| **t == Some(m0))
                        .count();
                    let count = p.image_of_token[past..].iter().flatten().count();
                    Some(all.narrow(0, before, count)?)
                }
                None => None,
            };
            let e = self.merge_embeddings(&r.input_ids[past..], f.as_ref())?;
            let rope = self.rope_index(&r.input_ids, &r.grid_thw)?;
            let pad = new_len - new;
            let e = if pad > 0 {
                let h = e.dim(1)?;
                Tensor::cat(&[&Tensor::zeros((pad, h), dtype, &device)?, &e], 0)?
            } else {
                e
            };
            embeds.push(e);
            let mut pos = rope.positions;
            for axis in &mut pos {
                let mut v = vec![0i64; pad];
                v.extend_from_slice(&axis[past..]);
                *axis = v;
            }
            positions.push(pos);
            deltas.push(rope.delta);
        }
        drop(features);
        let x = Tensor::stack(&embeds, 0)?;
        drop(embeds);
        let (cos, sin) = mrope_cos_sin(
            &positions,
            &self.inv_freq,
            &self.config.text.mrope_section,
            &device,
        )?;
        // Keys are [cached prefix, left-padded to past_len][new tokens, left-padded to new_len].
        let mut cache = KvCache::new(self.text.layers.len());
        let mask = if past_len > 0 {
            self.fill_past(&mut cache, &prepared, past_len)?;
            KeyMask {
                hidden: pasts
                    .iter()
                    .zip(&news)
                    .map(|(&past, &new)| {
                        vec![0..past_len - past, past_len..past_len + new_len - new]
                    })
                    .collect(),
            }
        } else {
            KeyMask::left_padded(&news.iter().map(|n| new_len - n).collect::<Vec<_>>())
        };
        let hidden = self
            .text
            .forward_hidden(&x, &cos, &sin, &mask, Some(&mut cache), true)?;
        let mut logits = self
            .text
            .logits(&hidden.narrow(1, new_len - 1, 1)?)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        drop(hidden);
        // Decoding wants each row's keys contiguous: [left padding][prompt].
        let total = lens.iter().copied().max().unwrap_or(0);
        if past_len > 0 {
            for layer in &mut cache.layers {
                for t in [&mut layer.k, &mut layer.v].into_iter().flatten() {
                    let mut rows = Vec::with_capacity(b);
                    for i in 0..b {
                        let row = t.narrow(0, i, 1)?;
                        let mut parts = Vec::with_capacity(3);
                        if total > lens[i] {
                            let (_, kvh, _, hd) = row.dims4()?;
                            parts.push(Tensor::zeros(
                                (1, kvh, total - lens[i], hd),
                                dtype,
                                &device,
                            )?);
                        }
                        parts.push(row.narrow(2, past_len - pasts[i], pasts[i])?);
                        parts.push(row.narrow(2, past_len + new_len - news[i], news[i])?);
                        rows.push(Tensor::cat(&parts, 2)?);
                    }
                    *t = Tensor::cat(&rows, 0)?;
                }
            }
        }
        let pads: Vec<usize> = lens.iter().map(|l| total - l).collect();
        timings.prefill_s = start.elapsed().as_secs_f64();

        let mut rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        let mut out: Vec<Generation> = (0..b)
            .map(|i| Generation {
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: FinishReason::Length,
                cached_tokens: pasts[i],
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
        let decode_mask = KeyMask::left_padded(&pads);
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
            let x = self.text.embed(&next)?.unsqueeze(1)?;
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
            let hidden =
                self.text
                    .forward_hidden(&x, &cos, &sin, &decode_mask, Some(&mut cache), true)?;
            logits = self
                .text
                .logits(&hidden)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            timings.decode_steps += 1;
        }
        timings.decode_s = decode_start.elapsed().as_secs_f64();
        if caching {
            self.cache_blocks(requests, &prepared, &out, &cache, &pads)?;
        }
        Ok((out, timings))
    }

    /// Puts each row's cached prefix into `cache` as keys `[rows, kv_heads, past_len, hd]`,
    /// left-padded with zeros.
    fn fill_past(&self, cache: &mut KvCache, prepared: &[Prepared], past_len: usize) -> Result<()> {
        let device = self.device();
        let dtype = self.dtype();
        let tc = &self.config.text;
        let (kvh, hd) = (tc.num_key_value_heads, tc.head_dim());
        let joined: Vec<Option<Tensor>> = prepared
            .iter()
            .map(|p| match p.past_blocks.len() {
                0 => Ok(None),
                1 => Ok(Some(p.past_blocks[0].clone())),
                _ => Tensor::cat(&p.past_blocks, 3).map(Some),
            })
            .collect::<candle_core::Result<_>>()?;
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            for (kv, slot) in [&mut layer.k, &mut layer.v].into_iter().enumerate() {
                let mut rows = Vec::with_capacity(prepared.len());
                for (p, j) in prepared.iter().zip(&joined) {
                    let past = p.past();
                    let mut parts = Vec::with_capacity(2);
                    if past < past_len {
                        parts.push(Tensor::zeros((kvh, past_len - past, hd), dtype, device)?);
                    }
                    if let Some(j) = j {
                        parts.push(j.get(l)?.get(kv)?);
                    }
                    rows.push(Tensor::cat(&parts, 1)?.unsqueeze(0)?);
                }
                *slot = Some(Tensor::cat(&rows, 0)?.contiguous()?);
            }
        }
        Ok(())
    }

    /// Caches the full blocks of each row's prompt and answer (the answer's last token has no
    /// keys yet) that the cache does not hold.
    fn cache_blocks(
        &self,
        requests: &[GenerationRequest],
        prepared: &[Prepared],
        out: &[Generation],
        cache: &KvCache,
        pads: &[usize],
    ) -> Result<()> {
        for (i, (r, p)) in requests.iter().zip(prepared).enumerate() {
            let mut ids = r.input_ids.clone();
            let answered = out[i].token_ids.len().saturating_sub(1);
            ids.extend_from_slice(&out[i].token_ids[..answered]);
            let mut image_of_token = p.image_of_token.clone();
            image_of_token.resize(ids.len(), None);
            let keys = block_keys(&ids, &image_of_token, &p.image_keys, usize::MAX);
            let first_new = keys
                .iter()
                .position(|k| !self.prefix_cache.has_block(k))
                .unwrap_or(keys.len());
            if first_new == keys.len() {
                continue;
            }
            let from = first_new * BLOCK_TOKENS;
            let len = (keys.len() - first_new) * BLOCK_TOKENS;
            // [layers, 2, kv_heads, len, hd] of this row, then one block at a time.
            let mut layers = Vec::with_capacity(cache.layers.len());
            for layer in &cache.layers {
                let (Some(k), Some(v)) = (&layer.k, &layer.v) else {
                    return Ok(());
                };
                let at = |t: &Tensor| -> candle_core::Result<Tensor> {
                    t.get(i)?.narrow(1, pads[i] + from, len)
                };
                layers.push(Tensor::stack(&[at(k)?, at(v)?], 0)?);
            }
            let all = Tensor::stack(&layers, 0)?;
            drop(layers);
            for (n, key) in keys[first_new..].iter().enumerate() {
                // Detached: a block must not keep the forward graph of its batch alive.
                let block = all
                    .narrow(3, n * BLOCK_TOKENS, BLOCK_TOKENS)?
                    .contiguous()?
                    .detach();
                self.prefix_cache.insert_block(*key, block);
            }
        }
        Ok(())
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

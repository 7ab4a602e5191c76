//! M-RoPE: Qwen2-VL's three position streams (t, h, w) and their rotary tables.

use candle_core::{Device, Result as CandleResult, Tensor};

use crate::error::{ModelError, Result};

/// Position ids of one sequence: `positions[axis][i]` for axis t, h, w.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndex {
    pub positions: [Vec<i64>; 3],
    /// `max position + 1 - length`: decoding position = cache length + delta.
    pub delta: i64,
}

/// `get_rope_index` for one unpadded sequence: text tokens advance the three streams together;
/// the `t*h*w/merge^2` image tokens of each image (in `grid_thw` order) get
/// `(p + t, p + row, p + col)` over the merged grid, and the text after it starts at
/// `p + max(h, w) / merge`.
pub fn get_rope_index(
    input_ids: &[u32],
    image_token_id: u32,
    grid_thw: &[[usize; 3]],
    spatial_merge_size: usize,
) -> Result<RopeIndex> {
    let n = input_ids.len();
    let mut pos: [Vec<i64>; 3] = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    let mut grids = grid_thw.iter();
    let mut current: i64 = 0;
    let mut i = 0;
    let merge = spatial_merge_size.max(1);
    while i < n {
        if input_ids[i] != image_token_id {
            for axis in &mut pos {
                axis.push(current);
            }
            current += 1;
            i += 1;
            continue;
        }
        let &[t, h, w] = grids.next().ok_or_else(|| {
            ModelError::Input(format!(
                "the prompt has more image blocks than the {} images given",
                grid_thw.len()
            ))
        })?;
        let (gh, gw) = (h / merge, w / merge);
        let count = t * gh * gw;
        if i + count > n || input_ids[i..i + count].iter().any(|&x| x != image_token_id) {
            return Err(ModelError::Input(format!(
                "an image with grid {t}x{h}x{w} needs {count} consecutive image tokens at position {i}"
            )));
        }
        for ti in 0..t {
            for hi in 0..gh {
                for wi in 0..gw {
                    pos[0].push(current + ti as i64);
                    pos[1].push(current + hi as i64);
                    pos[2].push(current + wi as i64);
                }
            }
        }
        current += gh.max(gw) as i64;
        i += count;
    }
    if grids.next().is_some() {
        return Err(ModelError::Input(format!(
            "{} images were given but the prompt has fewer image blocks",
            grid_thw.len()
        )));
    }
    let max = pos
        .iter()
        .flat_map(|a| a.iter().copied())
        .max()
        .unwrap_or(-1);
    Ok(RopeIndex {
        positions: pos,
        delta: max + 1 - n as i64,
    })
}

/// Inverse frequencies of the text rotary embedding, as transformers computes them in f32.
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32))
        .collect()
}

/// cos/sin tables `[batch, 1, len, head_dim]` for position ids `positions[b][axis][i]`, the half
/// dimension split over the streams by `mrope_section`.
#[allow(clippy::needless_range_loop)] // `i` indexes the stream chosen per frequency, `p[s][i]`
pub fn mrope_cos_sin(
    positions: &[[Vec<i64>; 3]],
    inv_freq: &[f32],
    mrope_section: &[usize],
    device: &Device,
) -> CandleResult<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let stream_of: Vec<usize> = mrope_section
        .iter()
        .enumerate()
        .flat_map(|(s, &len)| std::iter::repeat_n(s.min(2), len))
        .collect();
    let b = positions.len();
    let len = positions.first().map_or(0, |p| p[0].len());
    let hd = half * 2;
    let mut cos = Vec::with_capacity(b * len * hd);
    let mut sin = Vec::with_capacity(b * len * hd);
    let mut row = vec![0f32; half];
    for p in positions {
        for i in 0..len {
            for (j, r) in row.iter_mut().enumerate() {
                let s = stream_of.get(j).copied().unwrap_or(0);
                *r = p[s][i] as f32 * inv_freq[j];
            }
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (b, 1, len, hd), device)?,
        Tensor::from_vec(sin, (b, 1, len, hd), device)?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn image_block_positions_by_hand() {
        // text(2) + image 1x4x6 (merged 2x3 = 6 tokens) + text(2), image id 9.
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3, 4];
        let r = get_rope_index(&ids, 9, &[[1, 4, 6]], 2).unwrap();
        assert_eq!(r.positions[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(r.positions[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(r.positions[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        // max 6 + 1 - 10 tokens
        assert_eq!(r.delta, -3);
    }

    #[test]
    fn mismatched_images_are_errors() {
        assert!(get_rope_index(&[1, 9, 9], 9, &[[1, 4, 4]], 2).is_err());
        assert!(get_rope_index(&[1, 2], 9, &[[1, 2, 2]], 2).is_err());
        assert!(get_rope_index(&[9, 9, 9, 9], 9, &[], 2).is_err());
    }
}

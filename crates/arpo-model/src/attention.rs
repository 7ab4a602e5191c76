//! Memory-linear softmax attention for the differentiable (training) path.
//!
//! The learner scores whole trajectories: ten 1920x1080 screenshots make ~27k tokens, and one
//! dense `[heads, len, len]` f32 score tensor of UI-TARS-2B is then 35 GB. [`causal_attention`]
//! (the decoder) and [`chunked_attention`] (the vision tower's block-diagonal attention within
//! images or windows) never hold a score matrix: their forward takes the queries in blocks of
//! [`QUERY_BLOCK`] rows, scores each block against the keys it can see, and keeps only the
//! output and each row's log-sum-exp; their backward is FlashAttention-2's, recomputing each
//! block's probabilities from the log-sum-exp. Memory is `O((len + keys) * head_dim)` plus
//! `O(QUERY_BLOCK * keys)` scratch per thread.
//!
//! Both are candle custom ops on the CPU (block products through `gemm`, blocks spread over
//! `candle_core::utils::get_num_threads()` threads); on other devices they run the dense
//! formula with candle's tensor ops (differentiable, not memory-linear). Inputs of any float
//! dtype are computed in f32 and the result is cast back.
//!
//! ```
//! use arpo_model::attention::causal_attention;
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // 4 query heads sharing 2 KV heads; 3 new queries after 2 cached positions.
//! let q = Tensor::randn(0f32, 1.0, (1, 4, 3, 8), &dev)?;
//! let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
//! let out = causal_attention(&q, &k, &v, &[], 1.0 / 8f64.sqrt())?;
//! assert_eq!(out.dims(), &[1, 4, 3, 8]);
//! # Ok(())
//! # }
//! ```

use std::cell::Cell;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, bail,
};

/// Query rows scored at once. The scratch of a block is `QUERY_BLOCK x keys` f32 (two such
/// buffers per thread in the backward pass: 28 MB each at 27k keys).
pub const QUERY_BLOCK: usize = 128;

thread_local! {
    /// Scratch bytes of the last attention forward or backward run from this thread.
    static LAST_SCRATCH: Cell<usize> = const { Cell::new(0) };
}

/// The working memory (bytes) the last [`causal_attention`] / [`chunked_attention`] forward or
/// backward pass run on this thread allocated besides its inputs, outputs and gradients: the
/// per-thread block buffers, the log-sum-exp rows and any partial key/value gradients. Reported
/// so that a test can hold the memory bound without measuring the process.
pub fn last_scratch_bytes() -> usize {
    LAST_SCRATCH.with(Cell::get)
}

/// Softmax attention of the last `l` of `t` positions, causal with per-row left padding.
///
/// `q` is `[b, nh, l, hd]`, `k` and `v` `[b, nkv, t, hd]` with `nh` a multiple of `nkv` (query
/// head `h` reads KV head `h / (nh / nkv)`) and `l <= t`: query `i` sits at position
/// `p = t - l + i`. Key `j` is visible to query `i` of batch row `r` when
/// `pads[r] <= j <= p`, or `j == p` (a padding position sees itself only); `pads` empty means
/// no padding. Returns `[b, nh, l, hd]` in `q`'s dtype, softmax of `scale * q.k` over the
/// visible keys times `v`, computed in f32.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, l, hd) = q.dims4()?;
    let (kb, nkv, t, khd) = k.dims4()?;
    if v.dims() != k.dims() || kb != b || khd != hd || nkv == 0 || nh % nkv != 0 || l > t {
        bail!(
            "causal_attention: q {:?}, k {:?}, v {:?} do not fit ([b, nh, l, hd], [b, nkv, t, hd] \
             twice, nh a multiple of nkv, l <= t)",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if !pads.is_empty() && pads.len() != b {
        bail!(
            "causal_attention: {} pads for a batch of {b} (one per row, or none)",
            pads.len()
        )
    }
    let spans = (0..b)
        .flat_map(|r| {
            let pad = pads.get(r).copied().unwrap_or(0);
            (0..l).map(move |i| {
                let p = t - l + i;
                (if pad <= p { pad } else { p }, p + 1)
            })
        })
        .collect();
    let blocks = (0..b)
        .flat_map(|r| {
            (0..l)
                .step_by(QUERY_BLOCK)
                .map(move |i0| (r, i0, (i0 + QUERY_BLOCK).min(l)))
        })
        .collect();
    attend(
        q,
        k,
        v,
        Plan::new([b, nh, nkv, l, t, hd], scale, spans, blocks),
    )
}

/// Block-diagonal softmax attention: `q`, `k`, `v` are `[heads, n, hd]` and a query in chunk
/// `c` (consecutive `chunks` summing to `n`: the images or windows of the vision tower) sees
/// exactly the keys of chunk `c`. Returns `[heads, n, hd]` in `q`'s dtype, computed in f32.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunks: &[usize],
    scale: f64,
) -> Result<Tensor> {
    let (h, n, hd) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        bail!(
            "chunked_attention: q {:?}, k {:?}, v {:?} differ in shape",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if chunks.iter().sum::<usize>() != n {
        bail!("chunked_attention: chunks {chunks:?} do not sum to the {n} positions")
    }
    let mut spans = Vec::with_capacity(n);
    let mut blocks = Vec::new();
    let mut start = 0;
    for &len in chunks {
        spans.extend(std::iter::repeat_n((start, start + len), len));
        let end = start + len;
        blocks.extend(
            (start..end)
                .step_by(QUERY_BLOCK)
                .map(|i0| (0, i0, (i0 + QUERY_BLOCK).min(end))),
        );
        start = end;
    }
    let four = |x: &Tensor| x.reshape((1, h, n, hd));
    let out = attend(
        &four(q)?,
        &four(k)?,
        &four(v)?,
        Plan::new([1, h, h, n, n, hd], scale, spans, blocks),
    )?;
    out.reshape((h, n, hd))
}

/// Which keys each query sees, and how the queries are cut into blocks.
#[derive(Debug, Clone)]
struct Plan {
    b: usize,
    nh: usize,
    nkv: usize,
    l: usize,
    t: usize,
    hd: usize,
    scale: f32,
    /// Visible keys `[lo, hi)` of query `i` of batch row `r`, at `r * l + i`.
    spans: Vec<(usize, usize)>,
    /// Query blocks `(r, i0, i1)`; those of one batch row cover `0..l` in order.
    blocks: Vec<(usize, usize, usize)>,
}

impl Plan {
    fn new(
        [b, nh, nkv, l, t, hd]: [usize; 6],
        scale: f64,
        spans: Vec<(usize, usize)>,
        blocks: Vec<(usize, usize, usize)>,
    ) -> Self {
        Self {
            b,
            nh,
            nkv,
            l,
            t,
            hd,
            scale: scale as f32,
            spans,
            blocks,
        }
    }

    /// The keys block `blk` reads: the union of its rows' spans.
    fn keys(&self, blk: usize) -> (usize, usize) {
        let (r, i0, i1) = self.blocks[blk];
        let rows = &self.spans[r * self.l + i0..r * self.l + i1];
        let lo = rows.iter().map(|s| s.0).min().unwrap_or(0);
        let hi = rows.iter().map(|s| s.1).max().unwrap_or(0);
        (lo, hi)
    }

    /// Largest `rows x keys` scratch of one block.
    fn block_scratch(&self) -> usize {
        (0..self.blocks.len())
            .map(|blk| {
                let (_, i0, i1) = self.blocks[blk];
                let (k0, k1) = self.keys(blk);
                (i1 - i0) * (k1 - k0)
            })
            .max()
            .unwrap_or(0)
    }
}

/// Runs the plan: the custom op on the CPU, the dense formula elsewhere.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, plan: Plan) -> Result<Tensor> {
    let dtype = q.dtype();
    if plan.l == 0 || plan.hd == 0 {
        return q.zeros_like();
    }
    let f32c = |x: &Tensor| x.to_dtype(DType::F32)?.contiguous();
    let (q32, k32, v32) = (f32c(q)?, f32c(k)?, f32c(v)?);
    let out = match q.device() {
        Device::Cpu => q32.apply_op3(
            &k32,
            &v32,
            BlockAttention {
                plan,
                lse: OnceLock::new(),
            },
        )?,
        _ => dense(&q32, &k32, &v32, &plan)?,
    };
    out.to_dtype(dtype)
}

/// The definition, with candle's differentiable tensor ops (non-CPU devices): the scores of a
/// whole `[b, nh, l, t]` are materialised.
fn dense(q: &Tensor, k: &Tensor, v: &Tensor, plan: &Plan) -> Result<Tensor> {
    let Plan {
        b,
        nh,
        nkv,
        l,
        t,
        hd,
        ..
    } = *plan;
    let rep = nh / nkv;
    let mask: Vec<f32> = plan
        .spans
        .iter()
        .flat_map(|&(lo, hi)| {
            (0..t).map(move |j| {
                if lo <= j && j < hi {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (b, 1, l, t), q.device())?;
    let scores = (q.reshape((b, nkv, rep * l, hd))?.matmul(&k.t()?)? * plan.scale as f64)?
        .reshape((b, nh, l, t))?
        .broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
    probs
        .reshape((b, nkv, rep * l, t))?
        .matmul(v)?
        .reshape((b, nh, l, hd))
}

/// The CPU op: `q`, `k`, `v` f32 and contiguous; output `[b, nh, l, hd]` f32.
struct BlockAttention {
    plan: Plan,
    /// Log-sum-exp of each query row's scaled scores, `[b, nh, l]`, set by the forward pass.
    lse: OnceLock<Vec<f32>>,
}

/// The f32 slice a contiguous layout views.
fn slice_of<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("attention: {what} is {:?}, expected f32", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, e)) => Ok(&v[a..e]),
        None => bail!("attention: {what} is not contiguous ({l:?})"),
    }
}

/// Runs `f` over the f32 values of `tensors` (on the CPU), read in place where they are
/// already contiguous f32 (no copy of a large input); others are converted first. Shared by
/// this op's backward, the packed products ([`crate::bf16_gemm`], [`crate::q4_gemm`],
/// [`crate::q8_gemm`]) and the fused kernels ([`crate::fused`]).
pub(crate) fn with_values<R, const N: usize>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let mut owned = Vec::with_capacity(N);
    for t in tensors {
        owned.push(t.to_dtype(DType::F32)?.contiguous()?);
    }
    let guards: Vec<_> = owned.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = [&[][..]; N];
    for ((slot, (storage, layout)), t) in slices.iter_mut().zip(&guards).zip(&owned) {
        *slot = match &**storage {
            Storage::Cpu(c) => slice_of(c, layout, "an input")?,
            _ => bail!(
                "a CPU kernel got a tensor on {:?}: move it to the CPU (or run the model there)",
                t.device()
            ),
        };
    }
    f(slices)
}

impl CustomOp3 for BlockAttention {
    fn name(&self) -> &'static str {
        "arpo-block-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            slice_of(s1, l1, "q")?,
            slice_of(s2, l2, "k")?,
            slice_of(s3, l3, "v")?,
        );
        let (out, lse, scratch) = forward(&self.plan, q, k, v)?;
        LAST_SCRATCH.with(|c| c.set(scratch + lse.len() * 4));
        // A second forward of the same op (never done by candle) would find the same values.
        let _ = self.lse.set(lse);
        let p = &self.plan;
        Ok((CpuStorage::F32(out), Shape::from((p.b, p.nh, p.l, p.hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            bail!("attention: backward before the forward pass ran on the cpu")
        };
        let (dq, dk, dv, scratch) = with_values([q, k, v, res, grad], |[qv, kv, vv, ov, gv]| {
            backward(&self.plan, qv, kv, vv, ov, gv, lse)
        })?;
        LAST_SCRATCH.with(|c| c.set(scratch));
        let dev = Device::Cpu;
        let wrap = |x: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            if like.track_op() {
                Ok(Some(Tensor::from_vec(x, like.shape(), &dev)?))
            } else {
                Ok(None)
            }
        };
        Ok((wrap(dq, q)?, wrap(dk, k)?, wrap(dv, v)?))
    }
}

// ---------------------------------------------------------------------------------------------
// The blocked kernels

/// One forward work item: query block `blk` of head `h`, with its output rows and
/// log-sum-exps.
struct FwdUnit<'a> {
    blk: usize,
    h: usize,
    out: &'a mut [f32],
    lse: &'a mut [f32],
}

/// Splits `buf` (`[b, nh, l, width]`) into the rows of every (block, head), in the order
/// `(r, h, block)`, returned indexed by `h * blocks.len() + blk`.
fn split_rows<'a>(plan: &Plan, buf: &'a mut [f32], width: usize) -> Vec<&'a mut [f32]> {
    let nb = plan.blocks.len();
    let mut parts: Vec<Option<&'a mut [f32]>> = (0..nb * plan.nh).map(|_| None).collect();
    let mut rest = buf;
    for r in 0..plan.b {
        let row_blocks: Vec<usize> = (0..nb).filter(|&blk| plan.blocks[blk].0 == r).collect();
        for h in 0..plan.nh {
            for &blk in &row_blocks {
                let (_, i0, i1) = plan.blocks[blk];
                let (head, tail) = std::mem::take(&mut rest).split_at_mut((i1 - i0) * width);
                parts[h * nb + blk] = Some(head);
                rest = tail;
            }
        }
    }
    parts.into_iter().map(Option::unwrap_or_default).collect()
}

/// The threads the CPU kernels share their work among: candle's `get_num_threads()` (the
/// `RAYON_NUM_THREADS` variable, else the physical cores), read once. candle reads it from the
/// environment and `/proc/cpuinfo` on every call: over the ~250 products and attentions of a
/// decoded 2B token that cost milliseconds per token.
pub(crate) fn num_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Runs `work` on every item of `items` on candle's persistent threads (its barrier pool, the
/// one its own kernels and [`crate::q4_gemm`], [`crate::q8_gemm`] use), each run of items with a scratch from
/// `scratch()` (kept for the next run: at most one per thread is made); items are taken
/// largest `cost` first. Spawning threads per call instead cost about a millisecond per
/// decoded 2B token (an attention per layer, and every bf16 product). `work` must not use the
/// pool itself: on the calling thread, which takes part holding the pool's lock, a nested call
/// would wait on that lock forever (candle runs nested calls inline only on its workers).
pub(crate) fn run_parallel<T: Send, S: Send>(
    mut items: Vec<T>,
    cost: impl Fn(&T) -> usize,
    scratch: impl Fn() -> S + Sync,
    work: impl Fn(T, &mut S) + Sync,
) -> Result<()> {
    items.sort_by_key(|t| std::cmp::Reverse(cost(t)));
    if items.len() <= 1 || num_threads() <= 1 {
        let mut s = scratch();
        items.into_iter().for_each(|item| work(item, &mut s));
        return Ok(());
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let spare: Mutex<Vec<S>> = Mutex::new(Vec::new());
    let take = |m: &Mutex<Vec<S>>| m.lock().ok().and_then(|mut v| v.pop());
    candle_core::utils::barrier_pool().execute_chunked(slots.len(), |range| {
        let mut s = take(&spare).unwrap_or_else(&scratch);
        for slot in &slots[range] {
            if let Some(item) = slot.lock().ok().and_then(|mut t| t.take()) {
                work(item, &mut s);
            }
        }
        if let Ok(mut v) = spare.lock() {
            v.push(s);
        }
    });
    // A slot still full: its work was never run (a lock poisoned by a panicking worker).
    if slots.iter().any(|s| s.lock().map_or(true, |t| t.is_some())) {
        bail!("attention: a worker thread panicked")
    }
    Ok(())
}

/// Output, log-sum-exps and the scratch bytes used.
fn forward(plan: &Plan, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let Plan {
        b,
        nh,
        nkv,
        l,
        t,
        hd,
        scale,
        ..
    } = *plan;
    let rep = nh / nkv;
    let mut out = vec![0f32; b * nh * l * hd];
    let mut lse = vec![0f32; b * nh * l];
    let nb = plan.blocks.len();
    let keys: Vec<(usize, usize)> = (0..nb).map(|blk| plan.keys(blk)).collect();
    let block = plan.block_scratch();
    let items: Vec<FwdUnit<'_>> = split_rows(plan, &mut out, hd)
        .into_iter()
        .zip(split_rows(plan, &mut lse, 1))
        .enumerate()
        .map(|(u, (out, lse))| FwdUnit {
            blk: u % nb,
            h: u / nb,
            out,
            lse,
        })
        .collect();
    let threads = num_threads().clamp(1, items.len().max(1));
    let cost = |u: &FwdUnit<'_>| {
        let (_, i0, i1) = plan.blocks[u.blk];
        (i1 - i0) * (keys[u.blk].1 - keys[u.blk].0)
    };
    run_parallel(
        items,
        cost,
        || (vec![0f32; block], vec![0f32; QUERY_BLOCK]),
        |FwdUnit { blk, h, out, lse }, (s, inv)| {
            let (r, i0, i1) = plan.blocks[blk];
            let (k0, k1) = keys[blk];
            let (m, n) = (i1 - i0, k1 - k0);
            let g = h / rep;
            let qb = &q[((r * nh + h) * l + i0) * hd..][..m * hd];
            let kb = &k[((r * nkv + g) * t + k0) * hd..][..n * hd];
            let vb = &v[((r * nkv + g) * t + k0) * hd..][..n * hd];
            let s = &mut s[..m * n];
            // S = scale Q K^T
            matmul(s, n, qb, hd, false, kb, hd, true, [m, n, hd], scale, false);
            for (i, row) in s.chunks_exact_mut(n).enumerate() {
                let (lo, hi) = plan.spans[r * l + i0 + i];
                let (a, e) = (lo - k0, hi - k0);
                let max = row_max(&row[a..e]);
                let sum = exp_shifted_sum(&mut row[a..e], max);
                row[..a].fill(0.0);
                row[e..].fill(0.0);
                inv[i] = 1.0 / sum;
                lse[i] = max + sum.ln();
            }
            // O = P V, P's rows normalised after the product (m x hd values, not m x n).
            matmul(out, hd, s, n, false, vb, hd, false, [m, hd, n], 1.0, false);
            for (row, inv) in out.chunks_exact_mut(hd).zip(inv.iter()) {
                for x in row {
                    *x *= inv;
                }
            }
        },
    )?;
    Ok((out, lse, threads * block * 4))
}

/// One backward work item: the query blocks `blks` of every query head of KV head `g` in batch
/// row `r`, accumulating into `dk`/`dv` (that KV head's `[t, hd]`, or a partial copy of it) and
/// writing the queries' gradient rows `dq` (indexed `h_in_group * blks.len() + i`).
struct BwdUnit<'a> {
    r: usize,
    g: usize,
    blks: Vec<usize>,
    dq: Vec<&'a mut [f32]>,
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>, usize);

#[allow(clippy::too_many_arguments)]
fn backward(
    plan: &Plan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    d_o: &[f32],
    lse: &[f32],
) -> Result<Grads> {
    let Plan {
        b,
        nh,
        nkv,
        l,
        t,
        hd,
        scale,
        ..
    } = *plan;
    let rep = nh / nkv;
    let nb = plan.blocks.len();
    let keys: Vec<(usize, usize)> = (0..nb).map(|blk| plan.keys(blk)).collect();
    let block = plan.block_scratch();
    let threads = num_threads();
    // Work items own one KV head's gradients. With fewer KV heads than threads to share out
    // evenly, each KV head's query blocks are dealt round-robin to `parts` items, each with
    // its own partial dK/dV (summed at the end).
    let heads = b * nkv;
    let parts = if heads % threads == 0 || heads >= 4 * threads {
        1
    } else {
        (4 * threads).div_ceil(heads)
    };
    let per_row = nb / b.max(1);
    let parts = parts.clamp(1, per_row.max(1));
    let mut dq = vec![0f32; b * nh * l * hd];
    let mut dk = vec![0f32; parts * b * nkv * t * hd];
    let mut dv = vec![0f32; parts * b * nkv * t * hd];
    let mut dq_rows: Vec<Option<&mut [f32]>> = split_rows(plan, &mut dq, hd)
        .into_iter()
        .map(Some)
        .collect();
    let mut items = Vec::with_capacity(parts * heads);
    for ((part, dk), dv) in dk
        .chunks_exact_mut(t * hd)
        .enumerate()
        .zip(dv.chunks_exact_mut(t * hd))
    {
        let (s, rg) = (part / heads, part % heads);
        let (r, g) = (rg / nkv, rg % nkv);
        let blks: Vec<usize> = (0..nb)
            .filter(|&blk| plan.blocks[blk].0 == r)
            .skip(s)
            .step_by(parts)
            .collect();
        let mut rows = Vec::with_capacity(rep * blks.len());
        for h in g * rep..(g + 1) * rep {
            for &blk in &blks {
                match dq_rows[h * nb + blk].take() {
                    Some(x) => rows.push(x),
                    None => bail!("attention: query block {blk} of head {h} dealt twice"),
                }
            }
        }
        items.push(BwdUnit {
            r,
            g,
            blks,
            dq: rows,
            dk,
            dv,
        });
    }
    let cost = |u: &BwdUnit<'_>| -> usize {
        u.blks
            .iter()
            .map(|&blk| (plan.blocks[blk].2 - plan.blocks[blk].1) * (keys[blk].1 - keys[blk].0))
            .sum()
    };
    run_parallel(
        items,
        cost,
        || {
            (
                vec![0f32; block],
                vec![0f32; block],
                vec![0f32; QUERY_BLOCK],
            )
        },
        |u, (p_buf, ds_buf, dsum)| {
            let BwdUnit {
                r,
                g,
                blks,
                mut dq,
                dk,
                dv,
            } = u;
            for (hh, h) in (g * rep..(g + 1) * rep).enumerate() {
                for (bi, &blk) in blks.iter().enumerate() {
                    let (_, i0, i1) = plan.blocks[blk];
                    let (k0, k1) = keys[blk];
                    let (m, n) = (i1 - i0, k1 - k0);
                    let rows = ((r * nh + h) * l + i0) * hd;
                    let qb = &q[rows..][..m * hd];
                    let ob = &o[rows..][..m * hd];
                    let gb = &d_o[rows..][..m * hd];
                    let kb = &k[((r * nkv + g) * t + k0) * hd..][..n * hd];
                    let vb = &v[((r * nkv + g) * t + k0) * hd..][..n * hd];
                    let lse_b = &lse[(r * nh + h) * l + i0..][..m];
                    let p = &mut p_buf[..m * n];
                    let ds = &mut ds_buf[..m * n];
                    // P = exp(scale Q K^T - lse) on the visible keys, 0 elsewhere.
                    matmul(p, n, qb, hd, false, kb, hd, true, [m, n, hd], scale, false);
                    for (i, row) in p.chunks_exact_mut(n).enumerate() {
                        let (lo, hi) = plan.spans[r * l + i0 + i];
                        let (a, e) = (lo - k0, hi - k0);
                        exp_shifted_sum(&mut row[a..e], lse_b[i]);
                        row[..a].fill(0.0);
                        row[e..].fill(0.0);
                    }
                    // D = rowsum(dO * O)
                    for (i, d) in dsum[..m].iter_mut().enumerate() {
                        *d = gb[i * hd..][..hd]
                            .iter()
                            .zip(&ob[i * hd..][..hd])
                            .map(|(a, b)| a * b)
                            .sum();
                    }
                    let dkb = &mut dk[k0 * hd..k1 * hd];
                    let dvb = &mut dv[k0 * hd..k1 * hd];
                    // dV += P^T dO
                    matmul(dvb, hd, p, n, true, gb, hd, false, [n, hd, m], 1.0, true);
                    // dP = dO V^T; dS = P * (dP - D)
                    matmul(ds, n, gb, hd, false, vb, hd, true, [m, n, hd], 1.0, false);
                    for ((drow, prow), d) in ds
                        .chunks_exact_mut(n)
                        .zip(p.chunks_exact(n))
                        .zip(dsum.iter())
                    {
                        for (x, pv) in drow.iter_mut().zip(prow) {
                            *x = pv * (*x - d);
                        }
                    }
                    // dQ = scale dS K; dK += scale dS^T Q
                    let dqb = &mut *dq[hh * blks.len() + bi];
                    matmul(
                        dqb,
                        hd,
                        ds,
                        n,
                        false,
                        kb,
                        hd,
                        false,
                        [m, hd, n],
                        scale,
                        false,
                    );
                    matmul(dkb, hd, ds, n, true, qb, hd, false, [n, hd, m], scale, true);
                }
            }
        },
    )?;
    let kv_len = b * nkv * t * hd;
    if parts > 1 {
        for x in [&mut dk, &mut dv] {
            let (first, rest) = x.split_at_mut(kv_len);
            for part in rest.chunks_exact(kv_len) {
                for (a, b) in first.iter_mut().zip(part) {
                    *a += b;
                }
            }
            x.truncate(kv_len);
        }
    }
    let threads_used = threads.min(parts * heads).max(1);
    let scratch = threads_used * (2 * block + QUERY_BLOCK) * 4 + 2 * (parts - 1) * kv_len * 4;
    Ok((dq, dk, dv, scratch))
}

/// `dst = alpha * lhs rhs` (`accumulate`: `dst += alpha * lhs rhs`) for `[m, n, k]` row-major
/// f32 matrices: `dst` `m x n` with row stride `ld_dst`; `lhs` `m x k` read from rows of
/// stride `ld_lhs` (`lhs_t`: the transpose of a `k x m` matrix so stored); `rhs` `k x n`
/// likewise. Bounds are checked before `gemm` reads or writes.
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    ld_dst: usize,
    lhs: &[f32],
    ld_lhs: usize,
    lhs_t: bool,
    rhs: &[f32],
    ld_rhs: usize,
    rhs_t: bool,
    [m, n, k]: [usize; 3],
    alpha: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(ld_dst).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // (rows, cols) as stored, and the strides of the logical matrix.
    let strides = |t: bool, rows: usize, cols: usize, ld: usize| {
        if t {
            ((cols, rows), (1isize, ld as isize))
        } else {
            ((rows, cols), (ld as isize, 1isize))
        }
    };
    let ((lr, lc), (l_rs, l_cs)) = strides(lhs_t, m, k, ld_lhs);
    let ((rr, rc), (r_rs, r_cs)) = strides(rhs_t, k, n, ld_rhs);
    let fits = |len: usize, rows: usize, cols: usize, ld: usize| {
        cols <= ld && (rows - 1) * ld + cols <= len
    };
    assert!(
        fits(dst.len(), m, n, ld_dst)
            && fits(lhs.len(), lr, lc, ld_lhs)
            && fits(rhs.len(), rr, rc, ld_rhs),
        "attention: matmul operands out of bounds"
    );
    // SAFETY: the three matrices lie within their slices (checked above), `dst` is a unique
    // borrow (no aliasing with `lhs`/`rhs`), and the strides are those of row-major storage.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld_dst as isize,
            accumulate,
            lhs.as_ptr(),
            l_cs,
            l_rs,
            rhs.as_ptr(),
            r_cs,
            r_rs,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Lanes of the reductions over a score row: independent accumulators let them vectorise
/// (a single running sum or maximum is one long dependency chain).
const LANES: usize = 8;

/// The largest of `x` (`-inf` when empty).
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `x = e^(x - shift)` in place; returns the sum of the results.
fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        sum += *v;
    }
    sum
}

/// `e^x` to about 2 ulp, branch-free so that the loops over a score row vectorise (the libm
/// call does not, and exponentials are a third of the block work). Arguments below -87 give
/// `e^-87` (a softmax over rows whose largest term is 1 does not see the difference).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let e = (shifted.to_bits() as i32).wrapping_sub(0x4B40_0000);
    er * f32::from_bits(((e + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.001_3;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn matmul_transposes_and_accumulates() {
        // [[1, 2], [3, 4]] x [[5, 6], [7, 8]]
        let a = [1f32, 2., 3., 4.];
        let b = [5f32, 6., 7., 8.];
        let mut c = [0f32; 4];
        matmul(&mut c, 2, &a, 2, false, &b, 2, false, [2, 2, 2], 1.0, false);
        assert_eq!(c, [19., 22., 43., 50.]);
        // a^T b^T = (b a)^T, accumulated twice with alpha 0.5
        let mut d = [0f32; 4];
        for _ in 0..2 {
            matmul(&mut d, 2, &a, 2, true, &b, 2, true, [2, 2, 2], 0.5, true);
        }
        // b a = [[23, 34], [31, 46]]
        assert_eq!(d, [23., 31., 34., 46.]);
    }
}

//! 8-bit linear weights on the CPU: `x W^T` with integer dot products (AVX-512 VNNI's
//! `vpdpbusd`, or AVX2's `vpmaddubsw` on CPUs without it) over candle's `q8_0` weights, tiled
//! for the product.
//!
//! candle 0.11's own `q8_0` product takes one output at a time: for each row of `x` and each
//! output it calls a 256-bit dot product over the row's blocks, with a horizontal sum at the
//! end. At the embedded default's widths (96 to 384 inputs) those calls are most of the time:
//! 8-bit rollouts made `cargo xtask train` 1.5x slower than f32 ones. A [`Q8Weight`] holds the
//! same quantization (quantized by candle's `q8_0` rule, the values its quantizer makes;
//! [`Q8Weight::to_rows`] gives back candle's dequantized values, bit for bit) in tiles the
//! product reads 16 outputs at a time:
//!
//! - the output rows are cut into tiles of [`TILE_ROWS`] (16, one zmm of lanes); the last tile
//!   is padded with zero rows;
//! - per tile and block of 32 inputs, 512 bytes of quants: for each group of 4 inputs
//!   `4g..4g + 4` and row, the row's 4 quants plus 128 as bytes (one 64-byte load feeds one
//!   `vpdpbusd` for 16 rows), and beside them, in an array of their own, the 16 rows' f16
//!   scales `d`. 8.5 bits a weight, as candle's own blocks.
//!
//! A weight is `w = d * q` (`q` in -127..=127). The product rounds each row of `x` per block of
//! 32 to 8 bits (`x ≈ dx * qx`, `dx = max|x| / 127`, `qx` rounded to nearest, ties to even,
//! as [`crate::q4_gemm`] does per super-block). Per block and output it sums exactly in
//! integers `D = Σ_i (q_i + 128) qx_i - 128 Σ_i qx_i` (`|D| < 2^20`, exact in f32 too), then
//! `y += (d dx) D` with one fused multiply-add. All three kernels (AVX-512 VNNI, AVX2, whose
//! `D` is summed as `Σ q qx` directly, and the portable one) do exactly these operations in
//! this order, so they agree to the bit. The
//! rounding of `x` is the only approximation beyond the weights' own and two f32 roundings a
//! block (candle's `q8_0` product rounds `x` to its own `q8_0`, with an f16 scale).
//!
//! ```
//! use arpo_model::q8_gemm::{Q8Kernel, Q8Weight};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 0.02, (40, 96), &dev)?; // [out 40, in 96]
//! let q = Q8Weight::from_tensor(&w)?;
//! let x = Tensor::randn(0f32, 1.0, (1, 3, 96), &dev)?;
//! let best = q.forward(&x)?;
//! let portable = q.forward_with(&x, Q8Kernel::Portable)?;
//! assert_eq!(best.dims(), &[1, 3, 40]);
//! // The kernels agree to the bit.
//! assert_eq!(
//!     best.flatten_all()?.to_vec1::<f32>()?,
//!     portable.flatten_all()?.to_vec1::<f32>()?
//! );
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use candle_core::{Device, Result, Tensor, bail};

use crate::bf16_gemm::packed_forward;
use crate::q4_gemm::{TILE_ROWS, by_tile_columns, quantize_rows_by};

/// Inputs per block (`q8_0`'s block).
pub const BLOCK: usize = 32;
/// Groups of 4 inputs per block.
const GROUPS: usize = BLOCK / 4;
/// Bytes of one candle `q8_0` block: f16 `d`, then 32 signed quants.
const Q8_0_BLOCK_BYTES: usize = 2 + BLOCK;
/// Rows of `x` that pass over a tile together (each load of weights serves all of them).
const ROW_GROUP: usize = 4;
/// What the stored quants are offset by (`vpdpbusd` multiplies unsigned bytes by signed ones).
const OFFSET: i32 = 128;

/// The quants of 16 output rows by one block of 32 inputs (see the module doc), 8 cache
/// lines: `[group 8][row 16][4 bytes]`, byte `j` is `q[4 g + j] + 128`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tile([u8; GROUPS * TILE_ROWS * 4]);

const _: () = assert!(std::mem::size_of::<Tile>() == 8 * 64);

/// The f16 scales `d` of a tile's 16 rows.
type Scales = [u16; TILE_ROWS];

/// A padding row's quants are 0 (stored as 128), with a scale of 0.
const ZERO_TILE: Tile = Tile([OFFSET as u8; GROUPS * TILE_ROWS * 4]);

/// Which kernel computes the product: the same choice as the 4-bit product's (both run
/// `vpdpbusd`, or the portable sums).
pub type Q8Kernel = crate::q4_gemm::Q4Kernel;

/// A linear weight `[out, in]` in candle's `q8_0` quantization, tiled for
/// [`Q8Weight::forward`] (see the module doc). `in` must be a multiple of 32. Cloning shares
/// the tiles.
#[derive(Clone)]
pub struct Q8Weight {
    out_features: usize,
    in_features: usize,
    /// `in_features / 32`.
    blocks: usize,
    /// Tile `(t, b)` (output rows `16t..16t + 16`, inputs `32b..32b + 32`) at `t * blocks + b`.
    tiles: Arc<[Tile]>,
    /// The scales of tile `(t, b)`, at the same index.
    scales: Arc<[Scales]>,
}

impl std::fmt::Debug for Q8Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Weight")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("storage_bytes", &self.storage_bytes())
            .finish()
    }
}

impl Q8Weight {
    /// Quantizes `weight` `[out, in]` (any float dtype) as candle's `q8_0` quantizer does,
    /// straight into tiles: per block of 32, `d = max|w| / 127`, `q = round(w / d)` (half away
    /// from zero, computed as `w * (1 / d)`), `d` stored as f16. No copy of candle's blocks is
    /// made on the way (a 2B model's tied output projection is 0.25 GB of them). `in` must be
    /// a multiple of 32.
    pub fn from_tensor(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        if inp == 0 || !inp.is_multiple_of(BLOCK) {
            bail!("q8 linear: {inp} inputs is not a multiple of the {BLOCK}-wide block")
        }
        let w = weight.to_device(&Device::Cpu)?;
        crate::attention::with_values([&w], |[values]| Ok(Self::from_rows(values, out, inp)))
    }

    /// [`Self::from_tensor`] over row-major values.
    fn from_rows(values: &[f32], out_features: usize, in_features: usize) -> Self {
        let blocks = in_features / BLOCK;
        let count = out_features.div_ceil(TILE_ROWS) * blocks;
        let mut tiles = vec![ZERO_TILE; count];
        let mut scales = vec![[0u16; TILE_ROWS]; count];
        for (row, xs) in values.chunks_exact(in_features).enumerate() {
            let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
            for (b, block) in xs.chunks_exact(BLOCK).enumerate() {
                let at = t * blocks + b;
                let amax = block.iter().fold(0f32, |a, &x| a.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                scales[at][r] = half::f16::from_f32(d).to_bits();
                for (j, &x) in block.iter().enumerate() {
                    // `as` saturates (and takes NaN to 0), as candle's cast does.
                    let q = (x * id).round() as i8;
                    tiles[at].0[(j / 4 * TILE_ROWS + r) * 4 + j % 4] = (q as i32 + OFFSET) as u8;
                }
            }
        }
        Self {
            out_features,
            in_features,
            blocks,
            tiles: tiles.into(),
            scales: scales.into(),
        }
    }

    /// Tiles the bytes of a `[out, in]` candle `q8_0` tensor (`QTensor::data`: row-major
    /// blocks of 34 bytes, `in / 32` per row).
    pub fn from_q8_0_blocks(bytes: &[u8], out_features: usize, in_features: usize) -> Result<Self> {
        if in_features == 0 || !in_features.is_multiple_of(BLOCK) {
            bail!("q8 linear: {in_features} inputs is not a multiple of {BLOCK}")
        }
        let blocks = in_features / BLOCK;
        let expected = out_features
            .checked_mul(blocks)
            .and_then(|b| b.checked_mul(Q8_0_BLOCK_BYTES));
        if expected != Some(bytes.len()) {
            bail!(
                "q8 linear: {} bytes of q8_0 blocks for a [{out_features}, {in_features}] weight \
                 (expected {out_features} x {blocks} blocks of {Q8_0_BLOCK_BYTES} bytes)",
                bytes.len()
            )
        }
        let count = out_features.div_ceil(TILE_ROWS) * blocks;
        let mut tiles = vec![ZERO_TILE; count];
        let mut scales = vec![[0u16; TILE_ROWS]; count];
        for (i, block) in bytes.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
            let (row, b) = (i / blocks, i % blocks);
            let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
            let at = t * blocks + b;
            scales[at][r] = u16::from_le_bytes([block[0], block[1]]);
            for (j, &q) in block[2..].iter().enumerate() {
                let (g, j) = (j / 4, j % 4);
                // -127..=127 from candle's quantizer; any byte maps into 0..=255.
                tiles[at].0[(g * TILE_ROWS + r) * 4 + j] = (q as i8 as i32 + OFFSET) as u8;
            }
        }
        Ok(Self {
            out_features,
            in_features,
            blocks,
            tiles: tiles.into(),
            scales: scales.into(),
        })
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Bytes of the tiles and their scales (padding rows included).
    pub fn storage_bytes(&self) -> usize {
        self.tiles.len() * (std::mem::size_of::<Tile>() + std::mem::size_of::<Scales>())
    }

    /// Row `row`'s values, computed as candle dequantizes a `q8_0` block (`q * d`).
    fn row_into(&self, row: usize, values: &mut [f32]) {
        let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
        for (b, chunk) in values.chunks_exact_mut(BLOCK).enumerate() {
            let at = t * self.blocks + b;
            let d = half::f16::from_bits(self.scales[at][r]).to_f32();
            for (i, v) in chunk.iter_mut().enumerate() {
                let q = self.tiles[at].0[(i / 4 * TILE_ROWS + r) * 4 + i % 4] as i32 - OFFSET;
                *v = q as f32 * d;
            }
        }
    }

    /// The weight's values as a row-major `[out, in]` f32 matrix.
    pub fn to_rows(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.out_features * self.in_features];
        for (row, values) in out.chunks_exact_mut(self.in_features).enumerate() {
            self.row_into(row, values);
        }
        out
    }

    /// Rows `ids` of the weight, `[ids.len(), in]` in f32 (a tied model's token embeddings read
    /// from its output projection); an id past the rows is an error.
    pub fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        let k = self.in_features;
        let mut out = vec![0f32; ids.len() * k];
        for (&id, values) in ids.iter().zip(out.chunks_exact_mut(k)) {
            let row = id as usize;
            if row >= self.out_features {
                bail!(
                    "q8 rows: id {id} past the {} rows of the table",
                    self.out_features
                )
            }
            self.row_into(row, values);
        }
        Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)
    }

    /// `x W^T` for `x` `[.., in]` with the best kernel of this CPU (output in `x`'s dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Q8Kernel::best())
    }

    /// `x W^T + bias` (`bias` `[out]`, added in place to the product's output).
    pub fn forward_biased(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = (self.out_features, self.in_features);
        let kernel = Q8Kernel::best();
        packed_forward("q8", x, dims, bias, |xs, m| self.matmul(xs, m, kernel))
    }

    /// `x W^T` with `kernel` (an error if this CPU lacks it).
    pub fn forward_with(&self, x: &Tensor, kernel: Q8Kernel) -> Result<Tensor> {
        let dims = (self.out_features, self.in_features);
        packed_forward("q8", x, dims, None, |xs, m| self.matmul(xs, m, kernel))
    }

    /// `x W^T` for a row-major `[m, in]` f32 matrix: a row-major `[m, out]` matrix.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Q8Kernel) -> Result<Vec<f32>> {
        if Some(x.len()) != m.checked_mul(self.in_features) {
            bail!(
                "q8 linear: {} values of x for {m} rows of {}",
                x.len(),
                self.in_features
            )
        }
        match kernel {
            Q8Kernel::Portable => Ok(matmul_with(&Portable, self, x, m)),
            #[cfg(target_arch = "x86_64")]
            Q8Kernel::Avx512Vnni => match crate::q4_gemm::vnni::Vnni::detect() {
                Some(k) => Ok(matmul_with(&k, self, x, m)),
                None => bail!("q8 linear: this CPU has no AVX-512 VNNI: use the portable kernel"),
            },
            #[cfg(target_arch = "x86_64")]
            Q8Kernel::Avx2 => match crate::q4_gemm::avx2::Avx2::detect() {
                Some(k) => Ok(matmul_with(&k, self, x, m)),
                None => {
                    bail!("q8 linear: this CPU lacks AVX2, FMA or F16C: use the portable kernel")
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            Q8Kernel::Avx512Vnni | Q8Kernel::Avx2 => {
                bail!("q8 linear: {kernel:?} needs an x86-64 CPU: use the portable kernel")
            }
        }
    }
}

/// One kernel call: `rows` (1..=4) rows of `x` against one tile column (all blocks of 16
/// output rows); row `r`'s first `cols` outputs go to `out[r * ldc..]`.
struct Job<'a> {
    /// One tile per block of 32 inputs.
    tiles: &'a [Tile],
    scales: &'a [Scales],
    blocks: usize,
    /// The rows' 8-bit values, `32 * blocks` apart.
    q: &'a [i8],
    /// Their scales, `blocks` apart.
    d: &'a [f32],
    /// Their block sums, `blocks` apart.
    sums: &'a [i32],
    rows: usize,
    out: &'a mut [f32],
    ldc: usize,
    cols: usize,
}

impl Job<'_> {
    /// The bounds every kernel relies on.
    fn check(&self) {
        let k = self.blocks * BLOCK;
        assert!((1..=ROW_GROUP).contains(&self.rows) && (1..=TILE_ROWS).contains(&self.cols));
        assert!(self.tiles.len() == self.blocks && self.scales.len() == self.blocks);
        assert!(self.q.len() >= self.rows * k);
        assert!(self.d.len() >= self.rows * self.blocks);
        assert!(self.sums.len() >= self.rows * self.blocks);
        assert!(self.out.len() >= (self.rows - 1) * self.ldc + self.cols);
    }
}

trait Microkernel: Sync {
    fn run(&self, job: Job<'_>);
}

/// [`by_tile_columns`] with `kernel` over `w`'s tiles.
fn matmul_with<K: Microkernel>(kernel: &K, w: &Q8Weight, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k, blocks) = (w.out_features, w.in_features, w.blocks);
    let xq = quantize_rows_by::<BLOCK>(x);
    by_tile_columns(m, n, k, |p, out| {
        for t in p.tiles.clone() {
            let column = t * blocks..(t + 1) * blocks;
            let (tiles, scales) = (&w.tiles[column.clone()], &w.scales[column]);
            let at = t * TILE_ROWS - p.col0;
            for g0 in (0..p.rows.len()).step_by(ROW_GROUP) {
                let r = p.rows.start + g0;
                kernel.run(Job {
                    tiles,
                    scales,
                    blocks,
                    q: &xq.q[r * k..],
                    d: &xq.d[r * blocks..],
                    sums: &xq.sums[r * blocks..],
                    rows: ROW_GROUP.min(p.rows.len() - g0),
                    out: &mut out[g0 * p.width + at..],
                    ldc: p.width,
                    cols: TILE_ROWS.min(p.width - at),
                });
            }
        }
    })
}

/// The sums in scalar code, in the order and roundings of the module doc.
#[derive(Debug)]
struct Portable;

impl Microkernel for Portable {
    fn run(&self, job: Job<'_>) {
        job.check();
        let k = job.blocks * BLOCK;
        for r in 0..job.rows {
            let mut acc = [0f32; TILE_ROWS];
            for b in 0..job.blocks {
                let tile = &job.tiles[b];
                let qx = &job.q[r * k + b * BLOCK..][..BLOCK];
                let dx = job.d[r * job.blocks + b];
                let correction = OFFSET * job.sums[r * job.blocks + b];
                for (row, acc) in acc.iter_mut().enumerate() {
                    let mut dot = 0i32;
                    for (i, &x) in qx.iter().enumerate() {
                        let w = tile.0[(i / 4 * TILE_ROWS + row) * 4 + i % 4];
                        dot += w as i32 * x as i32;
                    }
                    let scale = half::f16::from_bits(job.scales[b][row]).to_f32() * dx;
                    *acc = scale.mul_add((dot - correction) as f32, *acc);
                }
            }
            job.out[r * job.ldc..r * job.ldc + job.cols].copy_from_slice(&acc[..job.cols]);
        }
    }
}

// The AVX-512 intrinsics are stable from Rust 1.89, the workspace's rust-version.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vnni {
    //! The `vpdpbusd` kernel, reached only through a [`Vnni`] value, which exists only where
    //! the CPU reports AVX-512 F, BW and VNNI.

    use std::arch::x86_64::*;

    use super::{BLOCK, GROUPS, Job, Microkernel, OFFSET, ROW_GROUP};
    use crate::q4_gemm::vnni::Vnni;
    use crate::q4_gemm::{PREFETCH_TILES, prefetch_ahead};

    crate::q4_gemm::microkernel_by_rows!(Vnni, rows_x16);

    /// `R` rows of `x` against one tile column: per group of 4 inputs, one 64-byte load of 16
    /// rows' quants, multiplied against a broadcast quad of each row's 8-bit `x` by
    /// `vpdpbusd` (u8 x i8, 4 products a lane).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn rows_x16<const R: usize>(job: Job<'_>) {
        let k = job.blocks * BLOCK;
        let mut acc = [_mm512_setzero_ps(); R];
        // Pointer steps set up outside the loops keep the inner loop free of index
        // arithmetic (and of its overflow checks in debug builds).
        let mut x: [*const i8; R] = std::array::from_fn(|r| job.q.as_ptr().wrapping_add(r * k));
        for (b, tile) in job.tiles.iter().enumerate() {
            prefetch_ahead(tile, PREFETCH_TILES);
            let mut qs = tile.0.as_ptr().cast::<__m512i>();
            // Two chains of `vpdpbusd` per row (groups 0-3 and 4-7), summed after: one chain of
            // 8 waits on each instruction's latency (a decoded token runs one row). Integer sums
            // are exact in any order.
            let mut dot = [[_mm512_setzero_si512(); R]; 2];
            for g in 0..GROUPS {
                // SAFETY: `qs` walks the block's 8 aligned zmm-sized lines (the tile is 64-byte
                // aligned, each block's quants 512 bytes), one per group.
                let w = unsafe { _mm512_load_si512(qs) };
                qs = qs.wrapping_add(1);
                for (dot, p) in dot[g / 4].iter_mut().zip(x.iter_mut()) {
                    // SAFETY: `job.check()`: each row's pointer walks its `k` values of `q`,
                    // 4 per group. (`_mm_loadu_si32`, not `read_unaligned`: no precondition
                    // check runs in debug builds, where the tests and `cargo xtask` run this.)
                    let xa = unsafe { _mm_cvtsi128_si32(_mm_loadu_si32(p.cast())) };
                    *p = p.wrapping_add(4);
                    *dot = _mm512_dpbusd_epi32(*dot, w, _mm512_set1_epi32(xa));
                }
            }
            // SAFETY: 16 f16 values.
            let dw = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(job.scales[b].as_ptr().cast())) };
            for r in 0..R {
                let i = r * job.blocks + b;
                let dot = _mm512_add_epi32(dot[0][r], dot[1][r]);
                let exact = _mm512_sub_epi32(dot, _mm512_set1_epi32(OFFSET * job.sums[i]));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(job.d[i]));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(exact), acc[r]);
            }
        }
        let mask: __mmask16 = if job.cols >= 16 {
            0xffff
        } else {
            (1u16 << job.cols) - 1
        };
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: `job.check()`: row `r < rows` has `cols` values at `r * ldc`; the mask
            // covers only those lanes.
            unsafe {
                _mm512_mask_storeu_ps(job.out.as_mut_ptr().wrapping_add(r * job.ldc), mask, *acc);
            }
        }
    }
}

// The AVX2, FMA and F16C intrinsics are stable, and safe inside functions with those features.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    //! The `vpmaddubsw` kernel, reached only through an [`Avx2`] value, which exists only where
    //! the CPU reports AVX2, FMA and F16C.
    //!
    //! `vpmaddubsw` multiplies unsigned by signed bytes and adds neighbouring products into
    //! saturating 16-bit lanes, so the tiles' `q + 128` (up to 255) cannot go in as they are:
    //! the kernel takes `|q|` as the unsigned side and `x` with the sign of `q` (`vpsignb`) as
    //! the signed one. A pair is then at most 2 x 128 x 127 = 32,512, below 2^15, and `vpmaddwd`
    //! by ones adds each lane pair into 32 bits: the sum is `Σ q qx` itself, the exact `D` of
    //! the module doc with no correction to subtract. A tile's 64-byte line of 16 rows is taken
    //! as two halves of 8 rows, one ymm each; the float step is the other kernels'.

    use std::arch::x86_64::*;

    use super::{BLOCK, GROUPS, Job, Microkernel, ROW_GROUP};
    use crate::q4_gemm::avx2::{Avx2, store_row};
    use crate::q4_gemm::{PREFETCH_TILES, prefetch_ahead};

    crate::q4_gemm::microkernel_by_rows!(Avx2, rows_x16);

    /// `R` rows of `x` against one tile column: per group of 4 inputs, two 32-byte loads of 8
    /// rows' quants each, multiplied against a broadcast quad of each row's 8-bit `x`.
    // `h` indexes the halves.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_x16<const R: usize>(job: Job<'_>) {
        let k = job.blocks * BLOCK;
        let flip = _mm256_set1_epi8(i8::MIN);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut x: [*const i8; R] = std::array::from_fn(|r| job.q.as_ptr().wrapping_add(r * k));
        for (b, tile) in job.tiles.iter().enumerate() {
            prefetch_ahead(tile, PREFETCH_TILES);
            let mut qs = tile.0.as_ptr().cast::<__m256i>();
            let mut dot = [[_mm256_setzero_si256(); 2]; R];
            for _ in 0..GROUPS {
                // SAFETY: `qs` walks the block's 16 aligned ymm-sized halves of lines (the tile
                // is 64-byte aligned, each block's quants 512 bytes), two per group.
                let w = unsafe { [_mm256_load_si256(qs), _mm256_load_si256(qs.wrapping_add(1))] };
                qs = qs.wrapping_add(2);
                // The signed quants, and their magnitudes as unsigned bytes (128 for -128).
                let q = [_mm256_xor_si256(w[0], flip), _mm256_xor_si256(w[1], flip)];
                let a = [_mm256_abs_epi8(q[0]), _mm256_abs_epi8(q[1])];
                for (dot, p) in dot.iter_mut().zip(x.iter_mut()) {
                    // SAFETY: `job.check()`: each row's pointer walks its `k` values of `q`,
                    // 4 per group.
                    let xa = unsafe { _mm_cvtsi128_si32(_mm_loadu_si32(p.cast())) };
                    *p = p.wrapping_add(4);
                    let xa = _mm256_set1_epi32(xa);
                    for h in 0..2 {
                        let pairs = _mm256_maddubs_epi16(a[h], _mm256_sign_epi8(xa, q[h]));
                        dot[h] = _mm256_add_epi32(dot[h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            // SAFETY: 8 f16 values at `8 h` of 16.
            let f16s = |h: usize| unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(
                    job.scales[b].as_ptr().wrapping_add(8 * h).cast(),
                ))
            };
            let dw = [f16s(0), f16s(1)];
            for r in 0..R {
                let dx = _mm256_set1_ps(job.d[r * job.blocks + b]);
                for h in 0..2 {
                    let scale = _mm256_mul_ps(dw[h], dx);
                    acc[r][h] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot[r][h]), acc[r][h]);
                }
            }
        }
        for (r, acc) in acc.into_iter().enumerate() {
            store_row(job.out, r * job.ldc, job.cols, acc);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::q4_gemm::tests::{assert_kernels_agree, values, weight};
    use candle_core::quantized::{GgmlDType, QTensor};

    #[test]
    fn tiles_hold_candles_q8_0_values_bit_for_bit() {
        // 40 rows: two whole tiles and one padded; 3 blocks. Row 0's first block has
        // d = 1 and halves (2.5 rounds away from zero to 3, not to even 2); row 1's second
        // block is zeros (d = 0).
        let mut v = weight(40, 96, 1)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v[..4].copy_from_slice(&[127.0, 2.5, -2.5, 0.5]);
        v[96 + 32..96 + 64].fill(0.0);
        let w = Tensor::from_vec(v, (40, 96), &Device::Cpu).unwrap();
        let q = Q8Weight::from_tensor(&w).unwrap();
        let candle = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ours = q.to_rows();
        // Our quantizer makes candle's blocks: the same tiles as tiling candle's own bytes.
        let blocks = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .to_vec();
        let tiled = Q8Weight::from_q8_0_blocks(&blocks, 40, 96).unwrap();
        assert!(
            q.tiles
                .iter()
                .zip(tiled.tiles.iter())
                .all(|(a, b)| a.0 == b.0)
        );
        assert_eq!(q.scales, tiled.scales);
        assert_eq!(ours.len(), candle.len());
        for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "value {i}: {a} vs candle's {b}");
        }
        assert_eq!(q.storage_bytes(), 3 * 3 * (512 + 32));
        // The rows a tied embedding reads are the same values.
        let rows = q.embedding(&[39, 0]).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows[0], &candle[39 * 96..40 * 96]);
        assert_eq!(rows[1], &candle[..96]);
        let err = q.embedding(&[40]).unwrap_err().to_string();
        assert!(err.contains("id 40") && err.contains("40 rows"), "{err}");
    }

    /// Against exact products (f64). With `x` rounded per block as the module doc says
    /// (`qx = round(x * 127 / max|x|)`, `dx = max|x| / 127` in f32), the exact value is
    /// `Σ_b dx d_b D_b`; the kernel's f32 arithmetic (a product `d dx` and a fused
    /// multiply-add per block; `D_b` is exact) is off by at most
    /// `2^-23 (blocks + 1) Σ_b |dx d_b D_b|`. Against the exact product with `x` itself, the
    /// rounding of `x` adds at most `Σ_b dx / 2 Σ_(i in b) |w_i|`.
    #[test]
    fn the_product_is_exact_but_for_the_rounding_of_x() {
        let (m, n, k) = (5, 40, 160);
        let w = weight(n, k, 2);
        let q = Q8Weight::from_tensor(&w).unwrap();
        let wq = q.to_rows();
        let mut x = values(m * k, 3);
        x[7] = 3.0; // one large input: its block's dx is coarse
        let y = q.matmul(&x, m, Q8Kernel::Portable).unwrap();
        let blocks = k / BLOCK;
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for o in 0..n {
                let wr = &wq[o * k..(o + 1) * k];
                let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let (mut rounded, mut magnitude, mut x_rounding) = (0f64, 0f64, 0f64);
                for b in 0..blocks {
                    let xs = &xr[b * BLOCK..(b + 1) * BLOCK];
                    let ws = &wr[b * BLOCK..(b + 1) * BLOCK];
                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let (dx, inv) = ((amax / 127.0) as f64, 127.0 / amax);
                    // w_i = d q_i exactly (d an f16, q an integer): the dot of the rounded x.
                    let dot: f64 = xs
                        .iter()
                        .zip(ws)
                        .map(|(&xi, &wi)| (xi * inv).round_ties_even() as f64 * wi as f64)
                        .sum();
                    rounded += dx * dot;
                    magnitude += (dx * dot).abs();
                    x_rounding += ws
                        .iter()
                        .map(|&wi| 0.5001 * dx * wi.abs() as f64)
                        .sum::<f64>();
                }
                let arithmetic = 2f64.powi(-23) * (blocks + 1) as f64 * magnitude + 1e-30;
                let got = y[r * n + o] as f64;
                assert!(
                    (got - rounded).abs() <= arithmetic,
                    "row {r} output {o}: {got} vs {rounded} with x rounded (bound {arithmetic:e})"
                );
                assert!(
                    (got - exact).abs() <= x_rounding + arithmetic,
                    "row {r} output {o}: {got} vs exact {exact} (bound {:e})",
                    x_rounding + arithmetic
                );
            }
        }
    }

    #[test]
    fn the_vector_kernels_equal_the_portable_one_to_the_bit() {
        // Rows 1-4 (each group size), 5 and 9 (a partial group), 300 (past one block of 256
        // rows, and large enough to share among threads); a padded tile (40 rows); odd block
        // counts (96, 160 inputs).
        let cases = [
            (1, 16, 32),
            (2, 40, 96),
            (3, 40, 64),
            (4, 16, 384),
            (5, 40, 160),
            (9, 16, 128),
            (300, 40, 384),
        ];
        assert_kernels_agree(&cases, |m, n, k, kernel| {
            let q = Q8Weight::from_tensor(&weight(n, k, m as u64)).unwrap();
            let mut x = values(m * k, 100 + m as u64);
            x[..BLOCK].fill(0.0); // a block of zeros: dx = 0
            q.matmul(&x, m, kernel).unwrap()
        });
    }

    #[test]
    fn the_vector_kernels_do_not_saturate_at_the_largest_products() {
        // Quants at -128 (a stored block may hold it), 127 and -127, against `x` at +-127:
        // AVX2's pairs of products reach 2 x 128 x 127 = 32,512.
        let (n, k) = (16, 64);
        let mut bytes = Vec::new();
        for row in 0..n * k / BLOCK {
            bytes.extend_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
            bytes.extend((0..BLOCK).map(|i| [0x80u8, 0x7f, 0x81][(row + i) % 3]));
        }
        let q = Q8Weight::from_q8_0_blocks(&bytes, n, k).unwrap();
        let x: Vec<f32> = (0..3 * k)
            .map(|i| match i / k {
                0 => 1.0,
                1 => -1.0,
                _ => [1.0, -1.0][i % 2],
            })
            .collect();
        assert_kernels_agree(&[(3, n, k)], |m, _, _, kernel| {
            q.matmul(&x, m, kernel).unwrap()
        });
        // And they are the true ones: output 0 of row 0 (`x` all ones) is 0.5 Σ q over its
        // blocks 0 and 1.
        let y = q.matmul(&x, 3, Q8Kernel::best()).unwrap();
        let sum: i32 = (0..2)
            .flat_map(|b| (0..BLOCK).map(move |i| [-128, 127, -127][(b + i) % 3]))
            .sum();
        let want = 0.5 * sum as f32;
        assert!(
            (y[0] - want).abs() <= 1e-5 * want.abs(),
            "{} against {want}",
            y[0]
        );
    }

    #[test]
    fn bad_shapes_are_refused_with_what_was_wrong() {
        let err = Q8Weight::from_tensor(&weight(4, 100, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("100 inputs") && err.contains("32"), "{err}");
        let err = Q8Weight::from_q8_0_blocks(&[0u8; 33], 1, 32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("33 bytes"), "{err}");
        let q = Q8Weight::from_tensor(&weight(16, 64, 1)).unwrap();
        let x = Tensor::zeros((2, 63), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(q.forward(&x).unwrap_err().to_string().contains("63"));
        assert!(q.matmul(&[0.0; 10], 1, Q8Kernel::Portable).is_err());
        assert_eq!(
            q.matmul(&[], 0, Q8Kernel::Portable).unwrap(),
            Vec::<f32>::new()
        );
    }
}

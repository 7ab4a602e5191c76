//! 4-bit linear weights on the CPU: `x W^T` with integer dot products (AVX-512 VNNI's
//! `vpdpbusd`, or AVX2's `vpmaddubsw` on CPUs without it) over candle's `q4k` weights, held in
//! one layout made for the product.
//!
//! candle 0.11 stores a `q4k` weight as k-quant blocks (4.5 bits a weight) and, on its first
//! product on an AVX-512 VNNI CPU, adds a second copy tiled for `vpdpbusd` with every sub-block
//! scale and minimum unpacked to f32 (6 bits a weight). It keeps both: the 2B model's 4-bit
//! linears took 1.09 GB + 1.45 GB, and a decoded token read the 6-bit copy. A [`Q4Weight`] is
//! the same quantization (candle's own `q4k` quantizer makes the blocks; the values
//! [`Q4Weight::to_rows`] gives back are candle's dequantized ones, bit for bit) in a single
//! layout of 4.625 bits a weight, which the product reads as it is:
//!
//! - the output rows are cut into tiles of [`TILE_ROWS`] (16, one zmm of i32 or f32 lanes); the
//!   last tile is padded with zero rows;
//! - per tile and super-block of 256 inputs, one 2,368-byte tile: for each group of 8
//!   inputs `8g..8g + 8` and each row, 4 bytes whose low nibbles are the row's quants of inputs
//!   `8g..8g + 4` and high nibbles those of `8g + 4..8g + 8` (one 64-byte load feeds two
//!   `vpdpbusd` for 16 rows); then the 6-bit scale and minimum of each sub-block of 32 inputs
//!   and row as bytes, and each row's f16 super-block scales `d` and `dmin`.
//!
//! A weight is `w = d * sc * q - dmin * m` (`q` in 0..16). The product rounds each row of `x`
//! per super-block to 8 bits (`x ≈ dx * qx`, `dx = max|x| / 127`, `qx` rounded to nearest,
//! ties to even). Per super-block and output it sums exactly in integers over each sub-block
//! `s` the products `D_s = Σ_i q_i qx_i` (|D_s| < 2^16, so exact in f32 too), then in f32 with
//! fused multiply-adds, sub-block by sub-block, `S = Σ_s sc_s D_s` and `M = Σ_s m_s Σ_i qx_i`
//! (`M` exact: below 2^24), and `y += (d dx) S`, `y -= (dmin dx) M`. All three kernels (AVX-512
//! VNNI, AVX2 and the portable one) do exactly these operations in this order, so they agree
//! to the bit. The rounding of `x` is the only approximation beyond the weights' own and a few
//! f32 roundings (candle's `q4k` product rounds `x` the same way, to its `q8k`).
//!
//! The threads share the tiles (each reads only its own weights, once per block of 256 rows of
//! `x`); a decoded token (one row) reads each weight once, 4.625 bits of it. The work runs on
//! candle's persistent thread pool, as candle's own quantized products do.
//!
//! ```
//! use arpo_model::q4_gemm::{Q4Kernel, Q4Weight};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 0.02, (40, 512), &dev)?; // [out 40, in 512]
//! let q = Q4Weight::from_tensor(&w)?;
//! assert_eq!(q.dims(), (40, 512));
//! let x = Tensor::randn(0f32, 1.0, (1, 3, 512), &dev)?;
//! let best = q.forward(&x)?;
//! let portable = q.forward_with(&x, Q4Kernel::Portable)?;
//! assert_eq!(best.dims(), &[1, 3, 40]);
//! // The kernels agree to the bit.
//! assert_eq!(
//!     best.flatten_all()?.to_vec1::<f32>()?,
//!     portable.flatten_all()?.to_vec1::<f32>()?
//! );
//! # Ok(())
//! # }
//! ```

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor, bail};

use crate::bf16_gemm::packed_forward;

/// Output rows per tile (one zmm register of 16 lanes).
pub const TILE_ROWS: usize = 16;
/// Inputs per super-block (`q4k`'s block).
pub const SUPER_BLOCK: usize = 256;
/// Sub-blocks of 32 inputs per super-block, each with its own scale and minimum.
const SUBS: usize = 8;
/// Groups of 8 inputs per super-block.
const GROUPS: usize = SUPER_BLOCK / 8;
/// Bytes of one candle `q4k` block: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and minimums,
/// 128 bytes of quants.
const Q4K_BLOCK_BYTES: usize = 144;
/// Rows of `x` that pass over a tile together (each nibble unpacked once for all of them).
const ROW_GROUP: usize = 4;
/// Rows of `x` per cache block: their 8-bit values stay in L2 while a thread's tiles pass.
const MC: usize = 256;
/// Products smaller than this many multiply-adds run on the calling thread alone.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// 16 output rows by one super-block of 256 inputs (see the module doc). 37 cache lines.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tile {
    /// `[group 32][row 16][4 bytes]`: byte `j` is `q[8g + j] | q[8g + 4 + j] << 4`.
    qs: [u8; GROUPS * TILE_ROWS * 4],
    /// `[sub-block 8][row 16]`, 0..64.
    scales: [u8; SUBS * TILE_ROWS],
    /// `[sub-block 8][row 16]`, 0..64.
    mins: [u8; SUBS * TILE_ROWS],
    /// f16 bits per row.
    d: [u16; TILE_ROWS],
    /// f16 bits per row.
    dmin: [u16; TILE_ROWS],
}

const _: () = assert!(std::mem::size_of::<Tile>() == 37 * 64);

const ZERO_TILE: Tile = Tile {
    qs: [0; GROUPS * TILE_ROWS * 4],
    scales: [0; SUBS * TILE_ROWS],
    mins: [0; SUBS * TILE_ROWS],
    d: [0; TILE_ROWS],
    dmin: [0; TILE_ROWS],
};

/// Which kernel computes the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Q4Kernel {
    /// `vpdpbusd` on x86-64 CPUs with AVX-512 VNNI (Ice Lake, Zen 4 and later).
    Avx512Vnni,
    /// `vpmaddubsw` on x86-64 CPUs with AVX2, FMA and F16C (Haswell and later, Zen 1-3: most
    /// laptops without AVX-512), 8 output rows a register.
    Avx2,
    /// Any CPU: the same integer sums in scalar code (slow; for other CPUs and for tests).
    Portable,
}

impl Q4Kernel {
    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> Self {
        static BEST: OnceLock<Q4Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Self::Avx512Vnni, Self::Avx2]
                .into_iter()
                .find(|k| k.is_available())
                .unwrap_or(Self::Portable)
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => vnni::Vnni::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::Avx2::detect().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512Vnni | Self::Avx2 => false,
        }
    }
}

/// A linear weight `[out, in]` in candle's `q4k` quantization, tiled for [`Q4Weight::forward`]
/// (see the module doc). `in` must be a multiple of 256. Cloning shares the tiles.
#[derive(Clone)]
pub struct Q4Weight {
    out_features: usize,
    in_features: usize,
    /// `in_features / 256`.
    supers: usize,
    /// Tile `(t, b)` (output rows `16t..16t + 16`, inputs `256b..256b + 256`) at `t * supers + b`.
    tiles: Arc<[Tile]>,
}

impl std::fmt::Debug for Q4Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4Weight")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("storage_bytes", &self.storage_bytes())
            .finish()
    }
}

/// Sub-block `j`'s 6-bit scale and minimum from a `q4k` block's 12 packed bytes: sub-blocks
/// 0-3 keep theirs in the low 6 bits of bytes `j` and `j + 4`; sub-blocks 4-7 have their low 4
/// bits in the nibbles of byte `j + 4` and their top 2 bits in the spare top bits of bytes
/// `j - 4` (scale) and `j` (minimum).
fn scale_and_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 0x3f, packed[j + 4] & 0x3f)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

impl Q4Weight {
    /// Quantizes `weight` `[out, in]` (any float dtype, CPU) with candle's `q4k` quantizer and
    /// tiles the blocks; `in` must be a multiple of 256.
    pub fn from_tensor(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        if inp == 0 || !inp.is_multiple_of(SUPER_BLOCK) {
            bail!("q4 linear: {inp} inputs is not a multiple of the {SUPER_BLOCK}-wide super-block")
        }
        let w = weight
            .to_device(&Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?;
        let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
        Self::from_q4k_blocks(&q.data()?, out, inp)
    }

    /// Tiles the bytes of a `[out, in]` candle `q4k` tensor (`QTensor::data`: row-major blocks
    /// of 144 bytes, `in / 256` per row).
    pub fn from_q4k_blocks(bytes: &[u8], out_features: usize, in_features: usize) -> Result<Self> {
        if in_features == 0 || !in_features.is_multiple_of(SUPER_BLOCK) {
            bail!("q4 linear: {in_features} inputs is not a multiple of {SUPER_BLOCK}")
        }
        let supers = in_features / SUPER_BLOCK;
        let expected = out_features
            .checked_mul(supers)
            .and_then(|b| b.checked_mul(Q4K_BLOCK_BYTES));
        if expected != Some(bytes.len()) {
            bail!(
                "q4 linear: {} bytes of q4k blocks for a [{out_features}, {in_features}] weight \
                 (expected {out_features} x {supers} blocks of {Q4K_BLOCK_BYTES} bytes)",
                bytes.len()
            )
        }
        let tile_rows = out_features.div_ceil(TILE_ROWS);
        let mut tiles = vec![ZERO_TILE; tile_rows * supers];
        let mut q = [0u8; SUPER_BLOCK];
        for (i, block) in bytes.chunks_exact(Q4K_BLOCK_BYTES).enumerate() {
            let (row, b) = (i / supers, i % supers);
            let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
            let tile = &mut tiles[t * supers + b];
            tile.d[r] = u16::from_le_bytes([block[0], block[1]]);
            tile.dmin[r] = u16::from_le_bytes([block[2], block[3]]);
            let (packed, quants) = (&block[4..16], &block[16..]);
            for s in 0..SUBS {
                let (sc, m) = scale_and_min(s, packed);
                tile.scales[s * TILE_ROWS + r] = sc;
                tile.mins[s * TILE_ROWS + r] = m;
            }
            // Each 32 bytes hold 64 inputs: the first 32 in the low nibbles, the next 32 in
            // the high ones.
            for (c, chunk) in quants.chunks_exact(32).enumerate() {
                for (j, &byte) in chunk.iter().enumerate() {
                    q[c * 64 + j] = byte & 0x0f;
                    q[c * 64 + 32 + j] = byte >> 4;
                }
            }
            for g in 0..GROUPS {
                for j in 0..4 {
                    tile.qs[(g * TILE_ROWS + r) * 4 + j] = q[8 * g + j] | (q[8 * g + 4 + j] << 4);
                }
            }
        }
        Ok(Self {
            out_features,
            in_features,
            supers,
            tiles: tiles.into(),
        })
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Bytes of the tiles (padding rows included).
    pub fn storage_bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    /// The weight's values as a row-major `[out, in]` f32 matrix, computed as candle
    /// dequantizes a `q4k` block (`(d * sc) * q - dmin * m`).
    pub fn to_rows(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.out_features * self.in_features];
        for (row, values) in out.chunks_exact_mut(self.in_features).enumerate() {
            let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
            for (b, chunk) in values.chunks_exact_mut(SUPER_BLOCK).enumerate() {
                let tile = &self.tiles[t * self.supers + b];
                let (d, dmin) = (f16_to_f32(tile.d[r]), f16_to_f32(tile.dmin[r]));
                for (i, v) in chunk.iter_mut().enumerate() {
                    let (g, j) = (i / 8, i % 8);
                    let byte = tile.qs[(g * TILE_ROWS + r) * 4 + j % 4];
                    let q = if j < 4 { byte & 0x0f } else { byte >> 4 };
                    let s = i / 32;
                    let scale = d * tile.scales[s * TILE_ROWS + r] as f32;
                    let min = dmin * tile.mins[s * TILE_ROWS + r] as f32;
                    *v = scale * q as f32 - min;
                }
            }
        }
        out
    }

    /// `x W^T` for `x` `[.., in]` with the best kernel of this CPU (output in `x`'s dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Q4Kernel::best())
    }

    /// `x W^T + bias` (`bias` `[out]`, added in place to the product's output).
    pub fn forward_biased(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = (self.out_features, self.in_features);
        let kernel = Q4Kernel::best();
        packed_forward("q4", x, dims, bias, |xs, m| self.matmul(xs, m, kernel))
    }

    /// `x W^T` with `kernel` (an error if this CPU lacks it).
    pub fn forward_with(&self, x: &Tensor, kernel: Q4Kernel) -> Result<Tensor> {
        let dims = (self.out_features, self.in_features);
        packed_forward("q4", x, dims, None, |xs, m| self.matmul(xs, m, kernel))
    }

    /// `x W^T` for a row-major `[m, in]` f32 matrix: a row-major `[m, out]` matrix.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Q4Kernel) -> Result<Vec<f32>> {
        if Some(x.len()) != m.checked_mul(self.in_features) {
            bail!(
                "q4 linear: {} values of x for {m} rows of {}",
                x.len(),
                self.in_features
            )
        }
        match kernel {
            Q4Kernel::Portable => Ok(matmul_with(&Portable, self, x, m)),
            #[cfg(target_arch = "x86_64")]
            Q4Kernel::Avx512Vnni => match vnni::Vnni::detect() {
                Some(k) => Ok(matmul_with(&k, self, x, m)),
                None => bail!("q4 linear: this CPU has no AVX-512 VNNI: use the portable kernel"),
            },
            #[cfg(target_arch = "x86_64")]
            Q4Kernel::Avx2 => match avx2::Avx2::detect() {
                Some(k) => Ok(matmul_with(&k, self, x, m)),
                None => {
                    bail!("q4 linear: this CPU lacks AVX2, FMA or F16C: use the portable kernel")
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            Q4Kernel::Avx512Vnni | Q4Kernel::Avx2 => {
                bail!("q4 linear: {kernel:?} needs an x86-64 CPU: use the portable kernel")
            }
        }
    }
}

/// Rows of `x` rounded to 8 bits per block (a [`Q4Weight`]'s super-block of 256, a
/// [`crate::q8_gemm::Q8Weight`]'s block of 32): `x[i] ≈ d[row, b] * q[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Rows {
    /// `[m, k]`, in -127..=127.
    pub q: Vec<i8>,
    /// `[m, k / block]`: `max|x| / 127` of the block (0 for an all-zero one).
    pub d: Vec<f32>,
    /// `[m, k / 32]`: the sum of `q` over each run of 32 (`x` holds `m` rows of `k`).
    pub sums: Vec<i32>,
}

/// Rounds `x` (rows whose width is a multiple of 256, so no super-block spans two rows) to 8
/// bits per super-block of 256 values: `qx =
/// round(x * (127 / max|x|))`, ties to even, and `dx = max|x| / 127`. A super-block of zeros
/// gets `dx = 0`; a non-finite value gives zeros (its output is meaningless either way).
pub fn quantize_rows(x: &[f32]) -> Q8Rows {
    quantize_rows_by::<SUPER_BLOCK>(x)
}

/// [`quantize_rows`] with blocks of `BLOCK` values (a multiple of 32 that divides the rows'
/// width).
pub(crate) fn quantize_rows_by<const BLOCK: usize>(x: &[f32]) -> Q8Rows {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = vnni::Vnni::detect() {
        return v.quantize_rows::<BLOCK>(x);
    } else if let Some(v) = avx2::Avx2::detect() {
        return v.quantize_rows::<BLOCK>(x);
    }
    quantize_rows_inline::<BLOCK>(x)
}

/// [`quantize_rows_by`]' body, inlined into each instruction set's copy.
#[inline(always)]
fn quantize_rows_inline<const BLOCK: usize>(x: &[f32]) -> Q8Rows {
    const { assert!(BLOCK > 0 && BLOCK.is_multiple_of(32)) };
    let blocks = x.len() / BLOCK;
    let mut out = Q8Rows {
        q: vec![0; blocks * BLOCK],
        d: vec![0.0; blocks],
        sums: vec![0; blocks * (BLOCK / 32)],
    };
    for (i, (xs, qs)) in x
        .chunks_exact(BLOCK)
        .zip(out.q.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        if !(amax > 0.0 && amax.is_finite()) {
            continue;
        }
        let inv = 127.0 / amax;
        out.d[i] = amax / 127.0;
        for (q, &v) in qs.iter_mut().zip(xs) {
            // |v * inv| <= 127 up to one rounding, which `round_ties_even` absorbs.
            *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        for (s, sub) in qs.chunks_exact(32).enumerate() {
            out.sums[i * (BLOCK / 32) + s] = sub.iter().map(|&q| q as i32).sum();
        }
    }
    out
}

/// One kernel call: `rows` (1..=4) rows of `x` against one tile column (all super-blocks of
/// 16 output rows); row `r`'s first `cols` outputs go to `out[r * ldc..]`.
struct Job<'a> {
    tiles: &'a [Tile],
    /// The rows' 8-bit values, `k` apart.
    q: &'a [i8],
    /// Their scales, `supers` apart.
    d: &'a [f32],
    /// Their sub-block sums, `8 * supers` apart.
    sums: &'a [i32],
    rows: usize,
    out: &'a mut [f32],
    ldc: usize,
    cols: usize,
}

impl Job<'_> {
    /// The bounds every kernel relies on.
    fn check(&self) {
        let supers = self.tiles.len();
        let k = supers * SUPER_BLOCK;
        assert!((1..=ROW_GROUP).contains(&self.rows) && (1..=TILE_ROWS).contains(&self.cols));
        assert!(self.q.len() >= self.rows * k);
        assert!(self.d.len() >= self.rows * supers);
        assert!(self.sums.len() >= self.rows * supers * SUBS);
        assert!(self.out.len() >= (self.rows - 1) * self.ldc + self.cols);
    }
}

trait Microkernel: Sync {
    fn run(&self, job: Job<'_>);
}

/// What one unit of a tiled product computes: tile columns `tiles` (output columns
/// `col0..col0 + width`, 16 to a tile) for rows `rows` of `x`, into a row-major block
/// `[rows.len(), width]`.
pub(crate) struct Unit {
    pub tiles: std::ops::Range<usize>,
    pub rows: std::ops::Range<usize>,
    pub col0: usize,
    pub width: usize,
}

/// The `[m, n]` output of a product over tiles of [`TILE_ROWS`] output columns (a
/// [`Q4Weight`]'s or a [`crate::q8_gemm::Q8Weight`]'s), `k` inputs deep, cut into units of a
/// run of tile columns by one block of up to `MC` rows of `x` (about 8 units per thread),
/// dealt to candle's persistent thread pool (the one its own quantized products use: no
/// thread is started per call). Each unit writes its own block of outputs, copied into place
/// after; a product of one unit writes straight into the output.
pub(crate) fn by_tile_columns(
    m: usize,
    n: usize,
    k: usize,
    unit: impl Fn(&Unit, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return c;
    }
    let threads = crate::attention::num_threads();
    let parallel = threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_MACS;
    let tile_cols = n.div_ceil(TILE_ROWS);
    let row_blocks = m.div_ceil(MC);
    let runs = if parallel {
        (8 * threads).div_ceil(row_blocks).min(tile_cols)
    } else {
        1
    };
    let per_run = tile_cols.div_ceil(runs);
    let runs = tile_cols.div_ceil(per_run);
    let place = |u: usize| {
        let t0 = u % runs * per_run;
        let t1 = (t0 + per_run).min(tile_cols);
        let r0 = u / runs * MC;
        let col0 = t0 * TILE_ROWS;
        Unit {
            tiles: t0..t1,
            rows: r0..MC.min(m - r0) + r0,
            col0,
            width: (t1 * TILE_ROWS).min(n) - col0,
        }
    };
    let units = runs * row_blocks;
    if units == 1 {
        unit(&place(0), &mut c);
        return c;
    }
    let slots: Vec<Mutex<Vec<f32>>> = (0..units).map(|_| Mutex::new(Vec::new())).collect();
    let one = |u: usize| {
        let p = place(u);
        let mut out = vec![0f32; p.rows.len() * p.width];
        unit(&p, &mut out);
        *slots[u].lock().unwrap_or_else(PoisonError::into_inner) = out;
    };
    if parallel {
        candle_core::utils::barrier_pool().execute_chunked(units, |range| range.for_each(one));
    } else {
        (0..units).for_each(one);
    }
    for (u, slot) in slots.into_iter().enumerate() {
        let p = place(u);
        let out = slot.into_inner().unwrap_or_else(PoisonError::into_inner);
        for (i, src) in out.chunks_exact(p.width).enumerate() {
            let at = (p.rows.start + i) * n + p.col0;
            c[at..at + p.width].copy_from_slice(src);
        }
    }
    c
}

/// [`by_tile_columns`] with `kernel` over a [`Q4Weight`]'s tiles.
fn matmul_with<K: Microkernel>(kernel: &K, w: &Q4Weight, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k, supers) = (w.out_features, w.in_features, w.supers);
    let xq = quantize_rows(x);
    by_tile_columns(m, n, k, |p, out| {
        for t in p.tiles.clone() {
            let tiles = &w.tiles[t * supers..(t + 1) * supers];
            let at = t * TILE_ROWS - p.col0;
            for g0 in (0..p.rows.len()).step_by(ROW_GROUP) {
                let r = p.rows.start + g0;
                kernel.run(Job {
                    tiles,
                    q: &xq.q[r * k..],
                    d: &xq.d[r * supers..],
                    sums: &xq.sums[r * supers * SUBS..],
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
        let supers = job.tiles.len();
        let k = supers * SUPER_BLOCK;
        for r in 0..job.rows {
            let mut acc = [0f32; TILE_ROWS];
            for (b, tile) in job.tiles.iter().enumerate() {
                let qx = &job.q[r * k + b * SUPER_BLOCK..][..SUPER_BLOCK];
                let dx = job.d[r * supers + b];
                let sums = &job.sums[(r * supers + b) * SUBS..][..SUBS];
                for (row, acc) in acc.iter_mut().enumerate() {
                    let (mut total, mut mins) = (0f32, 0f32);
                    for (s, &sum) in sums.iter().enumerate() {
                        let mut dot = 0i32;
                        for g in 4 * s..4 * s + 4 {
                            let bytes = &tile.qs[(g * TILE_ROWS + row) * 4..][..4];
                            for (j, &byte) in bytes.iter().enumerate() {
                                dot += (byte & 0x0f) as i32 * qx[8 * g + j] as i32;
                                dot += (byte >> 4) as i32 * qx[8 * g + 4 + j] as i32;
                            }
                        }
                        let (sc, mn) = (
                            tile.scales[s * TILE_ROWS + row],
                            tile.mins[s * TILE_ROWS + row],
                        );
                        total = (dot as f32).mul_add(sc as f32, total);
                        mins = (mn as f32).mul_add(sum as f32, mins);
                    }
                    let scale = f16_to_f32(tile.d[row]) * dx;
                    let min = f16_to_f32(tile.dmin[row]) * dx;
                    *acc = scale.mul_add(total, *acc);
                    *acc = (-min).mul_add(mins, *acc);
                }
            }
            job.out[r * job.ldc..r * job.ldc + job.cols].copy_from_slice(&acc[..job.cols]);
        }
    }
}

/// Implements the enclosing module's `Microkernel` for the CPU proof `$proof` (a value that
/// exists only where the CPU has the kernel's target features) with `$kernel::<R>`, `R` the
/// job's row count (`1..=ROW_GROUP`, a constant per count). Used by every vector kernel of
/// this module and of [`crate::q8_gemm`], each with its own `Job`, `Microkernel` and
/// `ROW_GROUP` in scope.
#[cfg(target_arch = "x86_64")]
macro_rules! microkernel_by_rows {
    ($proof:ty, $kernel:ident) => {
        impl Microkernel for $proof {
            fn run(&self, job: Job<'_>) {
                job.check();
                // SAFETY: `self` exists only on a CPU with the kernel's target features, and
                // `job.check()` holds.
                unsafe {
                    match job.rows {
                        1 => $kernel::<1>(job),
                        2 => $kernel::<2>(job),
                        3 => $kernel::<3>(job),
                        _ => $kernel::<ROW_GROUP>(job),
                    }
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use microkernel_by_rows;

/// How many tiles ahead of the one being multiplied the x86-64 kernels prefetch.
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_TILES: usize = 4;

/// Asks for the item `ahead` places after `item` to be brought into L1 (the tiles of a run of
/// columns lie one after the other in memory, and the weights stream from memory once per
/// token). A prefetch past the end of the tiles is dropped, never a fault.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(item: &T, ahead: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let at = (item as *const T).wrapping_add(ahead).cast::<i8>();
    for line in 0..std::mem::size_of::<T>().div_ceil(64) {
        // SAFETY: SSE is part of x86-64, and a prefetch of any address is a hint that never
        // faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line)) };
    }
}

// The AVX-512 intrinsics are stable from Rust 1.89, the workspace's rust-version.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod vnni {
    //! The `vpdpbusd` kernel. Every function with `#[target_feature]` is reached only through
    //! a [`Vnni`] value, which exists only where the CPU reports the features.

    use std::arch::x86_64::*;

    use super::{
        Job, Microkernel, PREFETCH_TILES, ROW_GROUP, SUBS, SUPER_BLOCK, TILE_ROWS, prefetch_ahead,
    };

    cpu_proof! {
        /// Proof that this CPU has AVX-512 F, BW and VNNI.
        pub(crate) struct Vnni: "avx512f", "avx512bw", "avx512vnni"
    }

    impl Vnni {
        /// [`super::quantize_rows`] compiled for AVX-512: the rounding to nearest even is one
        /// vector instruction instead of a libm call per value (it took 4% of a decoded
        /// token's time on the main thread).
        pub(super) fn quantize_rows<const BLOCK: usize>(self, x: &[f32]) -> super::Q8Rows {
            // SAFETY: `self` exists only on a CPU with these features.
            unsafe { quantize_rows_512::<BLOCK>(x) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    fn quantize_rows_512<const BLOCK: usize>(x: &[f32]) -> super::Q8Rows {
        super::quantize_rows_inline::<BLOCK>(x)
    }

    microkernel_by_rows!(Vnni, rows_x16);

    /// `R` rows of `x` against one tile column: per group of 8 inputs, one 64-byte load of
    /// 16 rows' nibbles, unpacked to two registers of quants, each multiplied against a
    /// broadcast quad of each row's 8-bit `x` by `vpdpbusd` (u8 x i8, 4 products a lane).
    // `s` indexes the tile's scale rows and each row's sums alike.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn rows_x16<const R: usize>(job: Job<'_>) {
        let supers = job.tiles.len();
        let k = supers * SUPER_BLOCK;
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        // Pointer steps and slices set up outside the loops keep the inner loop free of index
        // arithmetic (and of its overflow checks in debug builds).
        let rows: [*const i8; R] = std::array::from_fn(|r| job.q.as_ptr().wrapping_add(r * k));
        for (b, tile) in job.tiles.iter().enumerate() {
            prefetch_ahead(tile, PREFETCH_TILES);
            let sums: [&[i32]; R] =
                std::array::from_fn(|r| &job.sums[(r * supers + b) * SUBS..][..SUBS]);
            let mut x: [*const i8; R] =
                std::array::from_fn(|r| rows[r].wrapping_add(b * SUPER_BLOCK));
            let mut qs = tile.qs.as_ptr().cast::<__m512i>();
            let mut total = [_mm512_setzero_ps(); R];
            let mut mins = [_mm512_setzero_ps(); R];
            for s in 0..SUBS {
                let mut dot = [_mm512_setzero_si512(); R];
                for _ in 0..4 {
                    // SAFETY: `qs` walks the tile's 32 aligned zmm-sized lines (the tile is 64-byte
                    // aligned), one per group.
                    let w = unsafe { _mm512_load_si512(qs) };
                    qs = qs.wrapping_add(1);
                    let lo = _mm512_and_si512(w, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                    for (dot, p) in dot.iter_mut().zip(x.iter_mut()) {
                        // SAFETY: `job.check()`: each row's pointer walks its super-block's 256
                        // values of `q`, 8 per group.
                        // (`_mm_loadu_si32`, not `read_unaligned`: no precondition check runs
                        // in debug builds, where the tests and `cargo xtask` run this.)
                        let (xa, xb) = unsafe {
                            (
                                _mm_cvtsi128_si32(_mm_loadu_si32(p.cast())),
                                _mm_cvtsi128_si32(_mm_loadu_si32(p.wrapping_add(4).cast())),
                            )
                        };
                        *p = p.wrapping_add(8);
                        *dot = _mm512_dpbusd_epi32(*dot, lo, _mm512_set1_epi32(xa));
                        *dot = _mm512_dpbusd_epi32(*dot, hi, _mm512_set1_epi32(xb));
                    }
                }
                // SAFETY: 16 bytes at `16 s` of the 128-byte arrays, `s < 8`.
                let (sc, mn) = unsafe {
                    (
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                            tile.scales.as_ptr().wrapping_add(TILE_ROWS * s).cast(),
                        ))),
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                            tile.mins.as_ptr().wrapping_add(TILE_ROWS * s).cast(),
                        ))),
                    )
                };
                for r in 0..R {
                    total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), sc, total[r]);
                    mins[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sums[r][s] as f32), mins[r]);
                }
            }
            // SAFETY: 16 f16 values each.
            let (dv, dminv) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr().cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(tile.dmin.as_ptr().cast())),
                )
            };
            for r in 0..R {
                let dx = _mm512_set1_ps(job.d[r * supers + b]);
                let scale = _mm512_mul_ps(dv, dx);
                let min = _mm512_mul_ps(dminv, dx);
                acc[r] = _mm512_fmadd_ps(scale, total[r], acc[r]);
                acc[r] = _mm512_fnmadd_ps(min, mins[r], acc[r]);
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
pub(crate) mod avx2 {
    //! The `vpmaddubsw` kernel, for x86-64 CPUs without AVX-512 VNNI. Every function with
    //! `#[target_feature]` is reached only through an [`Avx2`] value, which exists only where
    //! the CPU reports AVX2, FMA and F16C.
    //!
    //! A tile's 64-byte line of 16 rows is taken as two halves of 8 rows, one ymm each.
    //! `vpmaddubsw` multiplies unsigned by signed bytes and adds neighbouring products into
    //! 16-bit lanes that saturate: with the quants (0..16) against `x` (-127..=127) a pair is at
    //! most 2 x 15 x 127 = 3,810, and the 8 pairs a lane collects over a sub-block at most
    //! 30,480, below 2^15. Nothing saturates: after `vpmaddwd` by ones adds each lane pair into
    //! 32 bits, the sums are the exact `D_s` of the module doc. The float steps are the other
    //! kernels', 8 lanes at a time, so all three agree to the bit.

    use std::arch::x86_64::*;

    use super::{
        Job, Microkernel, PREFETCH_TILES, ROW_GROUP, SUBS, SUPER_BLOCK, TILE_ROWS, prefetch_ahead,
    };

    cpu_proof! {
        /// Proof that this CPU has AVX2, FMA and F16C.
        pub(crate) struct Avx2: "avx2", "fma", "f16c"
    }

    impl Avx2 {
        /// [`super::quantize_rows`] compiled for AVX2 (the rounding is one instruction).
        pub(super) fn quantize_rows<const BLOCK: usize>(self, x: &[f32]) -> super::Q8Rows {
            // SAFETY: `self` exists only on a CPU with these features.
            unsafe { quantize_rows_256::<BLOCK>(x) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn quantize_rows_256<const BLOCK: usize>(x: &[f32]) -> super::Q8Rows {
        super::quantize_rows_inline::<BLOCK>(x)
    }

    microkernel_by_rows!(Avx2, rows_x16);

    /// Stores row `r`'s 16 lanes (two halves) of a tile column: `cols` of them, at `r * ldc`.
    /// Shared with [`crate::q8_gemm`]'s AVX2 kernel.
    #[target_feature(enable = "avx2")]
    pub(crate) fn store_row(out: &mut [f32], at: usize, cols: usize, acc: [__m256; 2]) {
        let mut lanes = [0f32; TILE_ROWS];
        // SAFETY: 8 f32 each, into a 16-value array.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().wrapping_add(8), acc[1]);
        }
        out[at..at + cols].copy_from_slice(&lanes[..cols]);
    }

    /// `R` rows of `x` against one tile column: per group of 8 inputs, two 32-byte loads of 8
    /// rows' nibbles each, unpacked to quants, multiplied against a broadcast quad of each
    /// row's 8-bit `x` by `vpmaddubsw` and summed in 16-bit lanes for the sub-block.
    // `s` indexes the tile's scale rows and each row's sums alike; `h` the halves.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_x16<const R: usize>(job: Job<'_>) {
        let supers = job.tiles.len();
        let k = supers * SUPER_BLOCK;
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let rows: [*const i8; R] = std::array::from_fn(|r| job.q.as_ptr().wrapping_add(r * k));
        for (b, tile) in job.tiles.iter().enumerate() {
            prefetch_ahead(tile, PREFETCH_TILES);
            let sums: [&[i32]; R] =
                std::array::from_fn(|r| &job.sums[(r * supers + b) * SUBS..][..SUBS]);
            let mut x: [*const i8; R] =
                std::array::from_fn(|r| rows[r].wrapping_add(b * SUPER_BLOCK));
            let mut qs = tile.qs.as_ptr().cast::<__m256i>();
            let mut total = [[_mm256_setzero_ps(); 2]; R];
            let mut mins = [[_mm256_setzero_ps(); 2]; R];
            for s in 0..SUBS {
                let mut dot = [[_mm256_setzero_si256(); 2]; R];
                for _ in 0..4 {
                    // SAFETY: `qs` walks the tile's 64 aligned ymm-sized halves of lines (the
                    // tile is 64-byte aligned), two per group.
                    let w =
                        unsafe { [_mm256_load_si256(qs), _mm256_load_si256(qs.wrapping_add(1))] };
                    qs = qs.wrapping_add(2);
                    let lo = [_mm256_and_si256(w[0], low), _mm256_and_si256(w[1], low)];
                    let hi = [
                        _mm256_and_si256(_mm256_srli_epi16::<4>(w[0]), low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(w[1]), low),
                    ];
                    for (dot, p) in dot.iter_mut().zip(x.iter_mut()) {
                        // SAFETY: `job.check()`: each row's pointer walks its super-block's 256
                        // values of `q`, 8 per group.
                        let (xa, xb) = unsafe {
                            (
                                _mm_cvtsi128_si32(_mm_loadu_si32(p.cast())),
                                _mm_cvtsi128_si32(_mm_loadu_si32(p.wrapping_add(4).cast())),
                            )
                        };
                        *p = p.wrapping_add(8);
                        let (xa, xb) = (_mm256_set1_epi32(xa), _mm256_set1_epi32(xb));
                        for h in 0..2 {
                            dot[h] = _mm256_add_epi16(dot[h], _mm256_maddubs_epi16(lo[h], xa));
                            dot[h] = _mm256_add_epi16(dot[h], _mm256_maddubs_epi16(hi[h], xb));
                        }
                    }
                }
                let bytes = |of: &[u8; SUBS * TILE_ROWS], h: usize| {
                    // SAFETY: 8 bytes at `16 s + 8 h` of a 128-byte array, `s < 8`, `h < 2`.
                    let v = unsafe {
                        _mm_loadl_epi64(of.as_ptr().wrapping_add(TILE_ROWS * s + 8 * h).cast())
                    };
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
                };
                let sc = [bytes(&tile.scales, 0), bytes(&tile.scales, 1)];
                let mn = [bytes(&tile.mins, 0), bytes(&tile.mins, 1)];
                for r in 0..R {
                    let sum = _mm256_set1_ps(sums[r][s] as f32);
                    for h in 0..2 {
                        let d = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[r][h], ones));
                        total[r][h] = _mm256_fmadd_ps(d, sc[h], total[r][h]);
                        mins[r][h] = _mm256_fmadd_ps(mn[h], sum, mins[r][h]);
                    }
                }
            }
            // SAFETY: 8 f16 values at `8 h` of 16.
            let f16s = |of: &[u16; TILE_ROWS], h: usize| unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(of.as_ptr().wrapping_add(8 * h).cast()))
            };
            let dv = [f16s(&tile.d, 0), f16s(&tile.d, 1)];
            let dminv = [f16s(&tile.dmin, 0), f16s(&tile.dmin, 1)];
            for r in 0..R {
                let dx = _mm256_set1_ps(job.d[r * supers + b]);
                for h in 0..2 {
                    let scale = _mm256_mul_ps(dv[h], dx);
                    let min = _mm256_mul_ps(dminv[h], dx);
                    acc[r][h] = _mm256_fmadd_ps(scale, total[r][h], acc[r][h]);
                    acc[r][h] = _mm256_fnmadd_ps(min, mins[r][h], acc[r][h]);
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
pub(crate) mod tests {
    use super::*;

    #[test]
    fn rows_round_to_eight_bits_per_super_block() {
        // max|x| = 7.9375 = 127/16: qx = 16 x exactly, dx = 1/16. 1.03125 -> 16.5 and
        // 0.03125 -> 0.5 are ties (to even: 16 and 0), 1.09375 -> 17.5 (to 18).
        let mut x = vec![0f32; 512];
        x[0] = 1.03125;
        x[1] = -7.9375;
        x[2] = 0.03125;
        x[3] = 1.09375;
        x[40] = 0.5;
        let q = quantize_rows(&x);
        assert_eq!(q.d, vec![0.0625, 0.0]);
        assert_eq!(&q.q[..4], &[16, -127, 0, 18]);
        assert_eq!(q.q[40], 8);
        assert!(q.q[256..].iter().all(|&v| v == 0));
        assert_eq!(&q.sums[..2], &[16 - 127 + 18, 8]);
        assert!(q.sums[2..].iter().all(|&s| s == 0));
    }

    #[test]
    fn packed_scales_unpack_as_the_format_says() {
        // Sub-block 5: low 4 bits of its scale in byte 9's low nibble, top 2 bits in byte 1's
        // top bits; its minimum's low 4 in byte 9's high nibble, top 2 in byte 5's top bits.
        let mut packed = [0u8; 12];
        packed[9] = 0xa3;
        packed[1] = 0b10 << 6 | 7;
        packed[5] = 0b01 << 6 | 9;
        assert_eq!(scale_and_min(5, &packed), (0x23, 0x1a));
        assert_eq!(scale_and_min(1, &packed), (7, 9));
    }
    /// Deterministic values in [-1, 1) (a 64-bit LCG; the tests need no RNG crate state).
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    pub(crate) fn weight(n: usize, k: usize, seed: u64) -> Tensor {
        let w: Vec<f32> = values(n * k, seed).iter().map(|v| v * 0.05).collect();
        Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn tiles_hold_candles_q4k_values_bit_for_bit() {
        // 40 rows: two whole tiles and one padded; 2 super-blocks.
        let w = weight(40, 512, 1);
        let q = Q4Weight::from_tensor(&w).unwrap();
        let candle = QTensor::quantize(&w, GgmlDType::Q4K)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ours = q.to_rows();
        assert_eq!(ours.len(), candle.len());
        for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "value {i}: {a} vs candle's {b}");
        }
        assert_eq!(q.storage_bytes(), 3 * 2 * 2368);
    }

    /// Against exact products (f64). With `x` rounded as the format says (`qx = round(x * 127 /
    /// max|x|)` per super-block, `dx = max|x| / 127` in f32), the exact value is
    /// `Σ_b dx (d S - dmin M)` with the sums of the module doc; the kernel's f32 arithmetic (up
    /// to 8 roundings of the partial sums of `S`, then a product and a fused multiply-add, twice
    /// per super-block) is off by at most `2^-20 Σ_b dx (d Σ_s |sc_s D_s| + dmin |M|)`. Against
    /// the exact product with `x` itself, the rounding of `x` adds at most
    /// `Σ_b dx / 2 Σ_(i in b) |w_i|`.
    #[test]
    fn the_product_is_exact_but_for_the_rounding_of_x() {
        let (m, n, k) = (5, 40, 768);
        let w = weight(n, k, 2);
        let q = Q4Weight::from_tensor(&w).unwrap();
        let wq = q.to_rows();
        let mut x = values(m * k, 3);
        x[7] = 3.0; // one large input: its super-block's dx is coarse
        let y = q.matmul(&x, m, Q4Kernel::Portable).unwrap();
        let supers = k / SUPER_BLOCK;
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for o in 0..n {
                let wr = &wq[o * k..(o + 1) * k];
                let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let (t, row) = (o / TILE_ROWS, o % TILE_ROWS);
                let (mut rounded, mut magnitude, mut x_rounding) = (0f64, 0f64, 0f64);
                for b in 0..supers {
                    let xs = &xr[b * SUPER_BLOCK..(b + 1) * SUPER_BLOCK];
                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let (dx, inv) = ((amax / 127.0) as f64, 127.0 / amax);
                    let tile = &q.tiles[t * supers + b];
                    // Per sub-block: sc_s D_s and m_s Σ qx.
                    let (mut sd, mut mq) = ([0i64; SUBS], [0i64; SUBS]);
                    for (i, &xi) in xs.iter().enumerate() {
                        let qx = (xi * inv).round_ties_even() as i64;
                        let (g, j, s) = (i / 8, i % 8, i / 32);
                        let byte = tile.qs[(g * TILE_ROWS + row) * 4 + j % 4];
                        let qw = if j < 4 { byte & 0x0f } else { byte >> 4 } as i64;
                        sd[s] += tile.scales[s * TILE_ROWS + row] as i64 * qw * qx;
                        mq[s] += tile.mins[s * TILE_ROWS + row] as i64 * qx;
                        x_rounding += 0.5001 * dx * (wr[b * SUPER_BLOCK + i] as f64).abs();
                    }
                    let (d, dmin) = (
                        f16_to_f32(tile.d[row]) as f64,
                        f16_to_f32(tile.dmin[row]) as f64,
                    );
                    let (big_s, big_m): (i64, i64) = (sd.iter().sum(), mq.iter().sum());
                    rounded += dx * (d * big_s as f64 - dmin * big_m as f64);
                    let terms: i64 = sd.iter().map(|v| v.abs()).sum();
                    magnitude += dx * (d * terms as f64 + dmin * big_m.abs() as f64);
                }
                let arithmetic = 2f64.powi(-20) * magnitude;
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
        // rows, and large enough to share among threads); a padded tile (40 rows).
        let cases = [
            (1, 16, 256),
            (2, 40, 512),
            (3, 40, 256),
            (4, 16, 768),
            (5, 40, 512),
            (9, 16, 256),
            (300, 40, 768),
        ];
        assert_kernels_agree(&cases, |m, n, k, kernel| {
            let q = Q4Weight::from_tensor(&weight(n, k, m as u64)).unwrap();
            let x = values(m * k, 100 + m as u64);
            q.matmul(&x, m, kernel).unwrap()
        });
    }

    #[test]
    fn the_vector_kernels_do_not_saturate_at_the_largest_sums() {
        // Every quant 15 and every `x` at +127 (then alternating, at -127): AVX2's 16-bit
        // lanes collect their largest sums (8 pairs of 15 x 127 x 2 = 30,480).
        let (n, k) = (16, 512);
        let mut block = [0u8; Q4K_BLOCK_BYTES];
        block[..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        block[2..4].copy_from_slice(&half::f16::from_f32(0.25).to_bits().to_le_bytes());
        block[4..16].fill(0xff); // every 6-bit scale and minimum 63
        block[16..].fill(0xff);
        let bytes = block.repeat(n * k / SUPER_BLOCK);
        let q = Q4Weight::from_q4k_blocks(&bytes, n, k).unwrap();
        let x: Vec<f32> = (0..2 * k)
            .map(|i| if i < k || i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        assert_kernels_agree(&[(2, n, k)], |m, _, _, kernel| {
            q.matmul(&x, m, kernel).unwrap()
        });
        // And they are the true ones: every weight is d sc 15 - dmin m = 456.75, and row 0 of
        // `x` is all ones (rounded exactly: 127 x 1/127).
        let y = q.matmul(&x, 2, Q4Kernel::best()).unwrap();
        let want = 456.75 * k as f32;
        assert!(
            (y[0] - want).abs() <= 1e-5 * want,
            "{} against {want}",
            y[0]
        );
    }

    /// Asserts, for each `(m, n, k)` (`x` `[m, k]` against a weight `[n, k]`), that `run` gives
    /// the same bits with each vector kernel this CPU runs (AVX-512 VNNI, AVX2) as with the
    /// portable one; a kernel the CPU lacks is skipped, and said so.
    pub(crate) fn assert_kernels_agree(
        cases: &[(usize, usize, usize)],
        run: impl Fn(usize, usize, usize, Q4Kernel) -> Vec<f32>,
    ) {
        for kernel in [Q4Kernel::Avx512Vnni, Q4Kernel::Avx2] {
            if !kernel.is_available() {
                eprintln!("{kernel:?} skipped: this CPU lacks it");
                continue;
            }
            for &(m, n, k) in cases {
                let fast = run(m, n, k, kernel);
                let slow = run(m, n, k, Q4Kernel::Portable);
                let differ = fast
                    .iter()
                    .zip(&slow)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{kernel:?}, [{m}, {k}] x [{n}, {k}]^T: {differ} outputs differ"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused_with_what_was_wrong() {
        let err = Q4Weight::from_tensor(&weight(4, 100, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("100 inputs") && err.contains("256"), "{err}");
        let err = Q4Weight::from_q4k_blocks(&[0u8; 143], 1, 256)
            .unwrap_err()
            .to_string();
        assert!(err.contains("143 bytes"), "{err}");
        let q = Q4Weight::from_tensor(&weight(16, 256, 1)).unwrap();
        let x = Tensor::zeros((2, 255), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(q.forward(&x).unwrap_err().to_string().contains("255"));
        assert!(q.matmul(&[0.0; 10], 1, Q4Kernel::Portable).is_err());
        assert_eq!(
            q.matmul(&[], 0, Q4Kernel::Portable).unwrap(),
            Vec::<f32>::new()
        );
    }
}

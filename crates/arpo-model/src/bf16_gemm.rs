//! bf16 linear weights on the CPU: `x W^T` with AVX-512 BF16 dot products (`vdpbf16ps`).
//!
//! candle 0.11 has no bf16 CPU kernel: its bf16 products widen to f32 (slower than f32, see
//! CANDLE-TRAPS.md), and its `QTensor` bf16 dot product is generic code (a 2-layer cut of the
//! 2B model took 37 times as long to its first token as f32). A [`Bf16Weight`] holds a linear
//! weight `[out, in]` rounded to bf16 (round to nearest, ties to even) and packed once for
//! `vdpbf16ps`, which multiplies pairs of bf16 and adds both products to an f32 lane:
//!
//! - the output columns are cut into panels of [`PANEL_COLUMNS`] (32, two zmm registers of
//!   16 lanes); the last panel is padded with zero columns;
//! - within a panel, `k` goes in pairs: for each pair `kk`, the 32 columns' weights
//!   `(w[j][2kk], w[j][2kk + 1])` as 32-bit words, one 64-byte line per 16 columns (`[k/2][32][2]`
//!   bf16, `k` padded to even with a zero).
//!
//! [`Bf16Weight::forward`] rounds `x` to bf16 the same way (once per call, each row to a row of
//! bf16 pairs) and accumulates in f32: an 8 x 32 register tile (16 zmm accumulators, a
//! broadcast pair of `x` against two zmm of weights), blocked over `k` so a panel's block
//! (256 pairs, 32 KiB) stays in L1 while the 8-row tiles of up to 256 rows pass over it. Rows
//! are shared among `candle_core::utils::get_num_threads()` threads (each reads all of `W`);
//! few rows (decode: one) share the panels instead, and one row is a GEMV that reads each
//! weight once, half the bytes of f32.
//!
//! The kernel is chosen at run time ([`Bf16Kernel::best`]): CPUs without AVX-512 BF16, and
//! other architectures, run a portable kernel on the same packing (bf16 storage, each panel
//! widened to f32 and multiplied in f32) with the same rounding of `x`; on x86-64 it is
//! compiled for AVX-512F and AVX2 too and runs the widest copy the CPU has.
//! `vdpbf16ps` treats subnormal bf16 inputs as zero; the portable kernel keeps them.
//!
//! ```
//! use arpo_model::bf16_gemm::{Bf16Kernel, Bf16Weight};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let w = Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 0.25]], &Device::Cpu)?; // [out 2, in 3]
//! let packed = Bf16Weight::from_tensor(&w)?;
//! let x = Tensor::new(&[[[1f32, 1., 2.]]], &Device::Cpu)?; // [1, 1, in 3]
//! for kernel in [Bf16Kernel::best(), Bf16Kernel::Portable] {
//!     let y = packed.forward_with(&x, kernel)?;
//!     assert_eq!(y.dims(), &[1, 1, 2]);
//!     assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9.0, 0.0]);
//! }
//! # Ok(())
//! # }
//! ```

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use crate::attention::{run_parallel, with_values};
use candle_core::{DType, Device, Result, Tensor, bail};

/// Output columns per packed panel (two zmm registers of 16 f32 accumulators).
pub const PANEL_COLUMNS: usize = 32;
const NR: usize = PANEL_COLUMNS;
/// Rows of `x` per register tile: 8 x 2 accumulators, 2 weight registers, broadcasts.
const MR: usize = 8;
/// `k` pairs per cache block: a panel's block is `KC * 128` bytes (32 KiB, in L1).
const KC: usize = 256;
/// Rows per cache block: their bf16 pairs over one `k` block (`MC * KC * 4` bytes, 256 KiB)
/// stay in L2 while all panels pass.
const MC: usize = 256;
/// From this many rows, the threads share the rows (each reads all of `W`); below it they
/// share the panels.
const ROW_SPLIT_MIN_ROWS: usize = 64;
/// Products smaller than this many multiply-adds run on the calling thread alone.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Which kernel computes the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` on x86-64 CPUs with AVX-512 BF16 (Zen 4/5, Sapphire Rapids and later).
    Avx512Bf16,
    /// Any CPU: bf16 weights widened to f32, f32 multiply-adds.
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> Self {
        static BEST: OnceLock<Bf16Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            if Self::Avx512Bf16.is_available() {
                Self::Avx512Bf16
            } else {
                Self::Portable
            }
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => avx512::Avx512::detect().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512Bf16 => false,
        }
    }
}

/// bf16 bits of `v`, rounded to nearest with ties to even (as `half::bf16::from_f32`); a NaN
/// stays a NaN (quieted), overflow rounds to infinity.
#[inline(always)]
pub fn round_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    if v.is_nan() {
        ((bits >> 16) | 0x40) as u16
    } else {
        rounded as u16
    }
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// 16 bf16 pairs (16 output columns, one `k` pair), the low half the even `k`. One cache line
/// and one zmm register, aligned as one.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct PairLine([u32; 16]);

/// Two bf16 values as one 32-bit word: `lo` in the low half (the even `k`).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    round_to_bf16(lo) as u32 | (round_to_bf16(hi) as u32) << 16
}

/// Rounds a row of `x` (`k` values) to `k.div_ceil(2)` bf16 pairs, an odd `k` padded with 0.
#[inline(always)]
fn row_to_pairs(x: &[f32], out: &mut [u32]) {
    let mut chunks = x.chunks_exact(2);
    for (o, c) in out.iter_mut().zip(&mut chunks) {
        *o = pair(c[0], c[1]);
    }
    if let [last] = chunks.remainder() {
        out[x.len() / 2] = pair(*last, 0.0);
    }
}

/// A linear weight `[out, in]` in bf16, packed for [`Bf16Weight::forward`] (see the module
/// doc for the layout). Cloning shares the packed weights.
#[derive(Clone)]
pub struct Bf16Weight {
    out_features: usize,
    in_features: usize,
    /// `in_features.div_ceil(2)`.
    pairs: usize,
    /// Panel `p`'s pair `kk` is lines `(p * pairs + kk) * 2` and `+ 1`.
    lines: Arc<[PairLine]>,
}

impl std::fmt::Debug for Bf16Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Weight")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("storage_bytes", &self.storage_bytes())
            .finish()
    }
}

impl Bf16Weight {
    /// Packs `weight` `[out, in]` (any float dtype, CPU), rounded to bf16.
    pub fn from_tensor(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        with_values([weight], |[w]| Ok(Self::from_rows(w, out, inp)))
    }

    /// Packs a row-major `[out, in]` f32 matrix, rounded to bf16.
    ///
    /// # Panics
    /// If `weight.len() != out_features * in_features`.
    pub fn from_rows(weight: &[f32], out_features: usize, in_features: usize) -> Self {
        assert_eq!(weight.len(), out_features * in_features, "weight size");
        let pairs = in_features.div_ceil(2);
        let panels = out_features.div_ceil(NR);
        let mut lines = vec![PairLine::default(); panels * pairs * 2];
        let mut row_pairs = vec![0u32; pairs];
        for (col, row) in weight.chunks_exact(in_features.max(1)).enumerate() {
            if in_features == 0 {
                break;
            }
            row_to_pairs(row, &mut row_pairs);
            let (p, j) = (col / NR, col % NR);
            let panel = &mut lines[p * pairs * 2..(p + 1) * pairs * 2];
            for (kk, &v) in row_pairs.iter().enumerate() {
                panel[kk * 2 + j / 16].0[j % 16] = v;
            }
        }
        Self {
            out_features,
            in_features,
            pairs,
            lines: lines.into(),
        }
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Bytes of the packed weights (padding included).
    pub fn storage_bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<PairLine>()
    }

    /// The packed weight back as a row-major `[out, in]` f32 matrix (the bf16 values).
    pub fn to_rows(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.out_features * self.in_features];
        for (col, row) in out.chunks_exact_mut(self.in_features.max(1)).enumerate() {
            let panel = self.panel(col / NR);
            let j = col % NR;
            for (i, v) in row.iter_mut().enumerate().take(self.in_features) {
                let word = panel[(i / 2) * 2 + j / 16].0[j % 16];
                *v = bf16_to_f32((word >> (16 * (i % 2))) as u16);
            }
        }
        out
    }

    /// The `2 * pairs` lines of panel `p`.
    fn panel(&self, p: usize) -> &[PairLine] {
        &self.lines[p * self.pairs * 2..(p + 1) * self.pairs * 2]
    }

    /// `x W^T` for `x` `[.., in]` with the best kernel of this CPU (output in `x`'s dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Bf16Kernel::best())
    }

    /// `x W^T + bias` (`bias` `[out]`, added in place to the product's output).
    pub fn forward_biased(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = (self.out_features, self.in_features);
        let kernel = Bf16Kernel::best();
        packed_forward("bf16", x, dims, bias, |xs, m| self.matmul(xs, m, kernel))
    }

    /// `x W^T` with `kernel` (an error if this CPU lacks it): `x` rounded to bf16, products
    /// accumulated in f32.
    pub fn forward_with(&self, x: &Tensor, kernel: Bf16Kernel) -> Result<Tensor> {
        let dims = (self.out_features, self.in_features);
        packed_forward("bf16", x, dims, None, |xs, m| self.matmul(xs, m, kernel))
    }

    /// `x W^T` for a row-major `[m, in]` f32 matrix: a row-major `[m, out]` matrix.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Bf16Kernel) -> Result<Vec<f32>> {
        if x.len() != m * self.in_features {
            bail!(
                "bf16 linear: {} values of x for {m} rows of {}",
                x.len(),
                self.in_features
            )
        }
        match kernel {
            Bf16Kernel::Portable => matmul_with(&Portable, self, x, m),
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx512Bf16 => match avx512::Avx512::detect() {
                Some(k) => matmul_with(&k, self, x, m),
                None => bail!("bf16 linear: this CPU has no AVX-512 BF16: use the portable kernel"),
            },
            #[cfg(not(target_arch = "x86_64"))]
            Bf16Kernel::Avx512Bf16 => {
                bail!("bf16 linear: AVX-512 BF16 needs an x86-64 CPU: use the portable kernel")
            }
        }
    }
}

/// `x W^T (+ bias)` for `x` `[.., in]` through `matmul` (row-major `[m, in]` f32 in, `[m, out]`
/// out), for a packed CPU weight of `(out, in)` features named `what`: the shapes checked, `x`
/// read as f32 without a copy where it is one, the bias added in place, the output in `x`'s
/// dtype. Shared by [`Bf16Weight`], [`crate::q4_gemm::Q4Weight`] and
/// [`crate::q8_gemm::Q8Weight`].
pub(crate) fn packed_forward(
    what: &str,
    x: &Tensor,
    (out_features, in_features): (usize, usize),
    bias: Option<&Tensor>,
    matmul: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let bias = match bias {
        Some(b) if b.dims() != [out_features] => {
            bail!(
                "{what} linear: a bias {:?} for {out_features} outputs",
                b.dims()
            )
        }
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        bail!("{what} linear: x is a scalar, expected [.., {in_features}]")
    };
    if k != in_features {
        bail!("{what} linear: x {dims:?} against a weight [{out_features}, {in_features}]")
    }
    let m: usize = lead.iter().product();
    let mut y = with_values([x], |[xs]| matmul(xs, m))?;
    if let Some(b) = &bias {
        crate::fused::add_bias(&mut y, b);
    }
    let mut out_dims = lead.to_vec();
    out_dims.push(out_features);
    Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(x.dtype())
}

/// One register tile: rows `0..rows` of `c` (row `r` at `r * ldc`, columns `0..cols`) get
/// `sum_kk a[r * lda + kk] . b[kk]` over `kk < kc`, added to what is there if `accumulate`.
struct Tile<'a> {
    a: &'a [u32],
    lda: usize,
    rows: usize,
    /// `2 * kc` lines: the panel's pairs `kk0..kk0 + kc`.
    b: &'a [PairLine],
    kc: usize,
    c: &'a mut [f32],
    ldc: usize,
    cols: usize,
    accumulate: bool,
}

impl Tile<'_> {
    /// The bounds every kernel relies on.
    fn check(&self) {
        assert!((1..=MR).contains(&self.rows) && (1..=NR).contains(&self.cols));
        assert!(self.b.len() >= 2 * self.kc);
        assert!(self.a.len() >= (self.rows - 1) * self.lda + self.kc);
        assert!(self.c.len() >= (self.rows - 1) * self.ldc + self.cols);
    }
}

/// The inner loops of one kernel; the blocking around them is [`matmul_with`].
trait Microkernel: Sync {
    fn tile(&self, t: Tile<'_>);
    /// `c[j] = sum_kk a[kk] . b[kk][j]` for `j < c.len() <= 32`, `a.len()` pairs.
    fn gemv(&self, a: &[u32], b: &[PairLine], c: &mut [f32]);
    /// [`row_to_pairs`] for each row of `x` (`k` wide) into `out` (`k.div_ceil(2)` wide).
    fn rows_to_pairs(&self, x: &[f32], k: usize, out: &mut [u32]) {
        rows_to_pairs(x, k, out)
    }
}

#[inline(always)]
fn rows_to_pairs(x: &[f32], k: usize, out: &mut [u32]) {
    let pairs = k.div_ceil(2);
    for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(pairs)) {
        row_to_pairs(row, o);
    }
}

/// Shares rows (many) or panels (few rows) among the threads as `crate::attention` shares heads.
fn matmul_with<K: Microkernel>(
    kernel: &K,
    w: &Bf16Weight,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>> {
    let (n, k, pairs) = (w.out_features, w.in_features, w.pairs);
    let mut c = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return Ok(c);
    }
    let threads = crate::attention::num_threads();
    let parallel = threads > 1 && m * n * k >= PARALLEL_MIN_MACS;
    if m >= ROW_SPLIT_MIN_ROWS {
        // Items of at most `MC` rows (each block of `MC` rows reads all of `W` anyway), at least
        // one per thread; each rounds its own rows and passes all panels over them.
        let items = m.div_ceil(MC).max(if parallel { threads } else { 1 });
        let rows_per = m.div_ceil(items).next_multiple_of(MR);
        let chunks: Vec<(usize, &mut [f32])> = c
            .chunks_mut(rows_per * n)
            .enumerate()
            .map(|(i, chunk)| (i * rows_per, chunk))
            .collect();
        run_parallel(
            chunks,
            |_| 0,
            Vec::new,
            |(row0, chunk), a: &mut Vec<u32>| {
                let rows = chunk.len() / n;
                a.resize(rows * pairs, 0);
                kernel.rows_to_pairs(&x[row0 * k..(row0 + rows) * k], k, a);
                row_block(kernel, w, a, rows, chunk);
            },
        )?;
    } else {
        // Few rows: rounded once, the threads share the panels (each writes its own columns).
        let mut a = vec![0u32; m * pairs];
        kernel.rows_to_pairs(x, k, &mut a);
        let panels = n.div_ceil(NR);
        let items = if parallel {
            (8 * threads).min(panels)
        } else {
            1
        };
        let per = panels.div_ceil(items);
        let mut parts: Vec<(Range<usize>, Vec<f32>)> = (0..panels)
            .step_by(per)
            .map(|p0| (p0..(p0 + per).min(panels), Vec::new()))
            .collect();
        run_parallel(
            parts.iter_mut().collect(),
            |_| 0,
            || (),
            |(range, out), _| {
                *out = column_block(kernel, w, &a, m, range.clone());
            },
        )?;
        for (range, out) in &parts {
            let col0 = range.start * NR;
            let width = out.len() / m;
            for (dst, src) in c.chunks_exact_mut(n).zip(out.chunks_exact(width)) {
                dst[col0..col0 + width].copy_from_slice(src);
            }
        }
    }
    Ok(c)
}

/// All of `c` (`rows x n`) from `a` (`rows x pairs`), blocked over rows and `k`.
fn row_block<K: Microkernel>(kernel: &K, w: &Bf16Weight, a: &[u32], rows: usize, c: &mut [f32]) {
    let (n, pairs) = (w.out_features, w.pairs);
    for mc0 in (0..rows).step_by(MC) {
        let mc_end = (mc0 + MC).min(rows);
        for kk0 in (0..pairs).step_by(KC) {
            let kc = KC.min(pairs - kk0);
            for p in 0..n.div_ceil(NR) {
                let b = &w.panel(p)[2 * kk0..2 * (kk0 + kc)];
                let col0 = p * NR;
                let cols = NR.min(n - col0);
                for r0 in (mc0..mc_end).step_by(MR) {
                    kernel.tile(Tile {
                        a: &a[r0 * pairs + kk0..],
                        lda: pairs,
                        rows: MR.min(mc_end - r0),
                        b,
                        kc,
                        c: &mut c[r0 * n + col0..],
                        ldc: n,
                        cols,
                        accumulate: kk0 > 0,
                    });
                }
            }
        }
    }
}

/// Columns `panels` of the product (`m x` their width, row-major) from all of `a`.
fn column_block<K: Microkernel>(
    kernel: &K,
    w: &Bf16Weight,
    a: &[u32],
    m: usize,
    panels: Range<usize>,
) -> Vec<f32> {
    let (n, pairs) = (w.out_features, w.pairs);
    let col_start = panels.start * NR;
    let width = (panels.end * NR).min(n) - col_start;
    let mut out = vec![0f32; m * width];
    for p in panels {
        let col0 = p * NR - col_start;
        let cols = NR.min(width - col0);
        if m == 1 {
            kernel.gemv(a, w.panel(p), &mut out[col0..col0 + cols]);
            continue;
        }
        for r0 in (0..m).step_by(MR) {
            kernel.tile(Tile {
                a: &a[r0 * pairs..],
                lda: pairs,
                rows: MR.min(m - r0),
                b: w.panel(p),
                kc: pairs,
                c: &mut out[r0 * width + col0..],
                ldc: width,
                cols,
                accumulate: false,
            });
        }
    }
    out
}

/// The portable tile: per `k` pair, the panel's 32 pairs widened to f32 (a shift each), then
/// two f32 multiply-adds per row and column. Inlined into each instruction set's copy.
#[inline(always)]
fn portable_tile(t: Tile<'_>) {
    let mut acc = [[0f32; NR]; MR];
    let (mut lo, mut hi) = ([0f32; NR], [0f32; NR]);
    for kk in 0..t.kc {
        for (h, line) in t.b[2 * kk..2 * kk + 2].iter().enumerate() {
            for (j, &v) in line.0.iter().enumerate() {
                lo[16 * h + j] = f32::from_bits(v << 16);
                hi[16 * h + j] = f32::from_bits(v & 0xffff_0000);
            }
        }
        for (r, acc) in acc.iter_mut().enumerate().take(t.rows) {
            let v = t.a[r * t.lda + kk];
            let (al, ah) = (f32::from_bits(v << 16), f32::from_bits(v & 0xffff_0000));
            for j in 0..NR {
                acc[j] += al * lo[j] + ah * hi[j];
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(t.rows) {
        let dst = &mut t.c[r * t.ldc..r * t.ldc + t.cols];
        for (d, &v) in dst.iter_mut().zip(acc) {
            *d = if t.accumulate { *d + v } else { v };
        }
    }
}

/// bf16 storage, f32 arithmetic: each pair widened (a shift) and multiplied in f32.
#[derive(Debug)]
struct Portable;

impl Microkernel for Portable {
    fn tile(&self, t: Tile<'_>) {
        t.check();
        #[cfg(target_arch = "x86_64")]
        avx512::portable_tile(t);
        #[cfg(not(target_arch = "x86_64"))]
        portable_tile(t);
    }

    fn gemv(&self, a: &[u32], b: &[PairLine], c: &mut [f32]) {
        let cols = c.len();
        self.tile(Tile {
            a,
            lda: a.len(),
            rows: 1,
            b,
            kc: a.len(),
            c,
            ldc: cols,
            cols,
            accumulate: false,
        });
    }
}

// The AVX-512 intrinsics are stable from Rust 1.89, the workspace's rust-version.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    //! The `vdpbf16ps` kernels. Every function with `#[target_feature]` is reached only through
    //! an [`Avx512`] value, which exists only where the CPU reports the features.

    use std::arch::x86_64::*;

    use super::{MR, Microkernel, NR, PairLine, Tile};

    cpu_proof! {
        /// Proof that this CPU has AVX-512 F, BW and BF16.
        pub(super) struct Avx512: "avx512f", "avx512bw", "avx512bf16"
    }

    impl Microkernel for Avx512 {
        fn tile(&self, t: Tile<'_>) {
            t.check();
            // SAFETY: `self` exists only on a CPU with the kernel's target features.
            unsafe { tile_8x32(t) }
        }

        fn gemv(&self, a: &[u32], b: &[PairLine], c: &mut [f32]) {
            assert!(b.len() >= 2 * a.len() && c.len() <= NR);
            // SAFETY: as in `tile`.
            unsafe { gemv_32(a, b, c) }
        }

        fn rows_to_pairs(&self, x: &[f32], k: usize, out: &mut [u32]) {
            // SAFETY: as in `tile`.
            unsafe { rows_to_pairs_512(x, k, out) }
        }
    }

    /// The portable tile compiled for the widest vectors this CPU has (without BF16).
    pub(super) fn portable_tile(t: Tile<'_>) {
        static WIDTH: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let width = *WIDTH.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                512
            } else if is_x86_feature_detected!("avx2") {
                256
            } else {
                128
            }
        });
        match width {
            // SAFETY: the CPU reported the features of each copy.
            512 => unsafe { portable_tile_512(t) },
            256 => unsafe { portable_tile_256(t) },
            _ => super::portable_tile(t),
        }
    }

    #[target_feature(enable = "avx512f")]
    fn portable_tile_512(t: Tile<'_>) {
        super::portable_tile(t)
    }

    #[target_feature(enable = "avx2")]
    fn portable_tile_256(t: Tile<'_>) {
        super::portable_tile(t)
    }

    /// The portable rounding compiled for 512-bit vectors.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn rows_to_pairs_512(x: &[f32], k: usize, out: &mut [u32]) {
        super::rows_to_pairs(x, k, out)
    }

    #[inline(always)]
    fn as_bf16(v: __m512i) -> __m512bh {
        // SAFETY: both are 512 bits of plain data; every bit pattern is a valid value of each.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// Lanes `0..n` of 16 (`n` may exceed 16).
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { (1u16 << n) - 1 }
    }

    /// 8 rows x 32 columns: per `k` pair, two zmm of weights and 8 broadcast pairs of `x` into
    /// 16 accumulators. Rows past `t.rows` repeat the last row and are not stored.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn tile_8x32(t: Tile<'_>) {
        let last = t.rows - 1;
        let rows: [*const u32; MR] =
            std::array::from_fn(|r| t.a.as_ptr().wrapping_add(r.min(last) * t.lda));
        let b = t.b.as_ptr().cast::<__m512i>();
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for kk in 0..t.kc {
            // SAFETY: `t.check()`: `b` has `2 * kc` lines, each a 64-byte aligned zmm.
            let (b0, b1) = unsafe {
                (
                    as_bf16(_mm512_load_si512(b.add(2 * kk))),
                    as_bf16(_mm512_load_si512(b.add(2 * kk + 1))),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `t.check()`: `(rows - 1) * lda + kc <= a.len()` and `kk < kc`.
                let v = unsafe { rows[r].add(kk).read() };
                let v = as_bf16(_mm512_set1_epi32(v as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], v, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], v, b1);
            }
        }
        let (m0, m1) = (lanes(t.cols), lanes(t.cols.saturating_sub(16)));
        for (r, acc) in acc.iter().enumerate() {
            if r > last {
                break;
            }
            let dst = t.c[r * t.ldc..].as_mut_ptr();
            // SAFETY: `t.check()`: row `r < rows` has `cols` values at `r * ldc`; the masks
            // cover only those lanes, and masked-off lanes are not accessed.
            unsafe {
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if t.accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, dst));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, dst.wrapping_add(16)));
                }
                _mm512_mask_storeu_ps(dst, m0, v0);
                _mm512_mask_storeu_ps(dst.wrapping_add(16), m1, v1);
            }
        }
    }

    /// One row against one panel: four interleaved sums of `k` pairs hide `vdpbf16ps`'s latency.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn gemv_32(a: &[u32], b: &[PairLine], c: &mut [f32]) {
        let bp = b.as_ptr().cast::<__m512i>();
        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
        let body = a.len() / 4 * 4;
        let step = |acc: &mut [__m512; 2], kk: usize| {
            let v = as_bf16(_mm512_set1_epi32(a[kk] as i32));
            // SAFETY: the caller checked `b.len() >= 2 * a.len()`, and `kk < a.len()`.
            let (b0, b1) = unsafe {
                (
                    as_bf16(_mm512_load_si512(bp.add(2 * kk))),
                    as_bf16(_mm512_load_si512(bp.add(2 * kk + 1))),
                )
            };
            acc[0] = _mm512_dpbf16_ps(acc[0], v, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], v, b1);
        };
        for kk in (0..body).step_by(4) {
            for (u, acc) in acc.iter_mut().enumerate() {
                step(acc, kk + u);
            }
        }
        for kk in body..a.len() {
            step(&mut acc[0], kk);
        }
        let sum = |h: usize| {
            _mm512_add_ps(
                _mm512_add_ps(acc[0][h], acc[1][h]),
                _mm512_add_ps(acc[2][h], acc[3][h]),
            )
        };
        let n = c.len();
        let dst = c.as_mut_ptr();
        // SAFETY: `c` has `n` values; the masks cover lanes `0..n` only.
        unsafe {
            _mm512_mask_storeu_ps(dst, lanes(n), sum(0));
            _mm512_mask_storeu_ps(dst.wrapping_add(16), lanes(n.saturating_sub(16)), sum(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_half_s_round_to_nearest_even() {
        for v in [
            1.0f32,
            f32::from_bits(0x3f80_8000), // halfway, even below: stays 0x3f80
            f32::from_bits(0x3f81_8000), // halfway, odd below: up to 0x3f82
            f32::from_bits(0x3f80_8001), // just above halfway: up
            f32::from_bits(0x3f80_7fff), // just below: down
            -f32::from_bits(0x3f81_8000),
            f32::MAX, // rounds to infinity
            f32::INFINITY,
            f32::from_bits(0x0001_8000), // subnormal halfway
            f32::NAN,
            0.0,
            -0.0,
        ] {
            assert_eq!(
                round_to_bf16(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
    }
}

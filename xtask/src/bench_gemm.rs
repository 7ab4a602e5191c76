//! `cargo xtask bench-gemm`: the packed bf16 product (`arpo_model::bf16_gemm`) against
//! candle's f32 `x.matmul(&w.t())` at the 2B model's decoder and vision shapes; prints a
//! markdown table (GFLOP/s and the ratio) and one JSON line per shape.
//!
//! Threads: both products use `candle_core::utils::get_num_threads()` (`RAYON_NUM_THREADS`,
//! by default the cores); `CANDLE_NUM_THREADS` only sizes candle's element-wise pool.

use std::time::Instant;

use anyhow::Result;
use arpo_model::bf16_gemm::{Bf16Kernel, Bf16Weight};
use candle_core::{Device, Tensor};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Shapes as `m,k,n` separated by `;` (default: decode GEMVs incl. `lm_head`, prefill and
    /// vision products of the 2B shape).
    #[arg(long)]
    shapes: Option<String>,
    /// Seconds of timed repetitions per product (after one untimed run).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Also time the portable kernel (the one CPUs without AVX-512 BF16 run).
    #[arg(long)]
    portable: bool,
}

const SHAPES_2B: [(usize, usize, usize); 7] = [
    (1, 1536, 8960),
    (1, 8960, 1536),
    (1, 1536, 151936),
    (346, 1536, 8960),
    (346, 8960, 1536),
    (1024, 1280, 3840),
    (1024, 5120, 1280),
];

/// Mean seconds of `f` over at least `seconds` and 3 runs, after one warm-up run.
fn time<T>(seconds: f64, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 3 || start.elapsed().as_secs_f64() < seconds {
        f()?;
        runs += 1;
    }
    Ok(start.elapsed().as_secs_f64() / runs as f64)
}

fn parse_shapes(s: &str) -> Result<Vec<(usize, usize, usize)>> {
    s.split(';')
        .map(|t| {
            let v: Vec<usize> = t
                .split(',')
                .map(|x| x.trim().parse())
                .collect::<std::result::Result<_, _>>()?;
            match v[..] {
                [m, k, n] => Ok((m, k, n)),
                _ => anyhow::bail!("shape {t:?}: expected m,k,n"),
            }
        })
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    let shapes = match &args.shapes {
        Some(s) => parse_shapes(s)?,
        None => SHAPES_2B.to_vec(),
    };
    let dev = Device::Cpu;
    let kernel = Bf16Kernel::best();
    println!(
        "kernel {kernel:?}, {} threads (CANDLE_NUM_THREADS={})",
        candle_core::utils::get_num_threads(),
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    println!("| m | k | n | candle f32 GFLOP/s | bf16 GFLOP/s | ratio | portable GFLOP/s |");
    println!("|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for (m, k, n) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let packed = Bf16Weight::from_tensor(&w)?;
        let wt = w.t()?;
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        let f32_s = time(args.seconds, || Ok(x.matmul(&wt)?))?;
        let bf16_s = time(args.seconds, || Ok(packed.forward(&x)?))?;
        let portable_s = if args.portable {
            Some(time(args.seconds, || {
                Ok(packed.forward_with(&x, Bf16Kernel::Portable)?)
            })?)
        } else {
            None
        };
        let portable = portable_s.map_or("-".into(), |s| format!("{:.1}", gflop / s));
        println!(
            "| {m} | {k} | {n} | {:.1} | {:.1} | {:.2} | {portable} |",
            gflop / f32_s,
            gflop / bf16_s,
            f32_s / bf16_s
        );
        json.push(serde_json::json!({
            "m": m, "k": k, "n": n,
            "f32_gflops": gflop / f32_s,
            "bf16_gflops": gflop / bf16_s,
            "ratio": f32_s / bf16_s,
            "portable_gflops": portable_s.map(|s| gflop / s),
        }));
    }
    for j in json {
        println!("{j}");
    }
    Ok(())
}

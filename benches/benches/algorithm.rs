//! The training step's pure algorithm: ARPO replay (`ReplayBuffer::apply`) and GRPO advantages
//! for 1,024 groups of 8 rollouts (one group per task), with a cheap episode type.

use std::hint::black_box;
use std::time::Duration;

use arpo_grpo::{AdvantageConfig, batch_advantages, group_advantages, group_advantages_into};
use arpo_replay::{Episode, ReplayBuffer, ReplayConfig};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const GROUPS: usize = 1024;
const GROUP_SIZE: usize = 8;

/// A rollout as the buffer sees it: a task id and an evaluation (plus a small payload to copy).
#[derive(Debug, Clone)]
struct Rollout {
    task: String,
    eval: f64,
    #[allow(dead_code)]
    id: u64,
}

impl Episode for Rollout {
    fn task_id(&self) -> &str {
        &self.task
    }
    fn eval_result(&self) -> f64 {
        self.eval
    }
}

/// A cheap deterministic pseudo-random stream (splitmix64), so the bench needs no RNG crate.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One step's groups: each rollout succeeds with probability 1/4, so most groups (1 − 0.75^8 ≈
/// 90%) have a success and about 10% are all-failed.
fn groups(step: u64) -> Vec<Vec<Rollout>> {
    (0..GROUPS)
        .map(|g| {
            (0..GROUP_SIZE)
                .map(|i| {
                    let id = (step << 32) | ((g * GROUP_SIZE + i) as u64);
                    Rollout {
                        task: format!("task-{g:04}"),
                        eval: if mix(id).is_multiple_of(4) { 1.0 } else { 0.0 },
                        id,
                    }
                })
                .collect()
        })
        .collect()
}

fn bench_replay(c: &mut Criterion) {
    // A buffer that has seen 8 steps: most tasks hold stored successes, so the all-failed
    // groups of the measured step get injections.
    let mut warm = ReplayBuffer::new(ReplayConfig::default(), 42).expect("buffer");
    for step in 0..8 {
        warm.apply(&mut groups(step)).expect("apply");
    }
    let step_groups = groups(8);
    let mut g = c.benchmark_group("replay");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements((GROUPS * GROUP_SIZE) as u64));
    g.bench_function("apply_1024x8", |b| {
        b.iter_batched(
            || (warm.clone(), step_groups.clone()),
            |(mut buffer, mut groups)| {
                let report = buffer.apply(&mut groups).expect("apply");
                black_box((report, groups, buffer))
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

fn bench_advantages(c: &mut Criterion) {
    let config = AdvantageConfig::default();
    let rewards: Vec<f64> = (0..(GROUPS * GROUP_SIZE) as u64)
        .map(|i| {
            if mix(i).is_multiple_of(4) {
                1.0
            } else {
                -0.5 * (mix(i) % 2) as f64
            }
        })
        .collect();
    let ids: Vec<u32> = (0..GROUPS * GROUP_SIZE)
        .map(|i| (i / GROUP_SIZE) as u32)
        .collect();
    let mut g = c.benchmark_group("grpo_advantages");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements((GROUPS * GROUP_SIZE) as u64));
    g.bench_function("group_advantages_1024x8", |b| {
        b.iter(|| {
            let out: Vec<Vec<f64>> = rewards
                .chunks_exact(GROUP_SIZE)
                .map(|r| group_advantages(black_box(r), &config).expect("advantages"))
                .collect();
            out
        });
    });
    let mut out = vec![0.0; rewards.len()];
    g.bench_function("group_advantages_into_1024x8", |b| {
        b.iter(|| {
            for (r, o) in rewards
                .chunks_exact(GROUP_SIZE)
                .zip(out.chunks_exact_mut(GROUP_SIZE))
            {
                group_advantages_into(black_box(r), &config, o).expect("advantages");
            }
            black_box(&out);
        });
    });
    g.bench_function("batch_advantages_1024x8", |b| {
        b.iter(|| {
            batch_advantages(black_box(&ids), black_box(&rewards), &config).expect("advantages")
        });
    });
    g.finish();
}

criterion_group!(benches, bench_replay, bench_advantages);
criterion_main!(benches);

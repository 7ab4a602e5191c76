//! The simulated desktop at its default size (336x224): rendered steps per second.
//!
//! - `env_step`: `SimEnv::reset` + `SimEnv::step` over the oracle actions of every training
//!   task of `Catalogue::default()` (each step applies the action, renders and PNG-encodes the
//!   screenshot, as the trainer sees it); throughput counts rendered frames (resets + steps);
//! - `render_rgb` / `encode_png`: the two halves of one frame.
//!
//! The target is at least 2,000 rendered steps per second on one core: criterion runs on the
//! calling thread, and nothing here spawns threads (a current-thread tokio runtime drives the
//! async `Environment` calls, which never wait).

use std::hint::black_box;
use std::time::Duration;

use arpo_core::{Action, Environment, Task};
use arpo_env_sim::{Catalogue, DEFAULT_SIZE, Session, SimEnv, render};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn episodes() -> Vec<(Task, Vec<Action>)> {
    let catalogue = Catalogue::default();
    catalogue
        .train()
        .into_iter()
        .map(|t| {
            let actions = catalogue.oracle(&t).expect("oracle");
            (t, actions)
        })
        .collect()
}

fn bench_sim(c: &mut Criterion) {
    let episodes = episodes();
    let frames: usize = episodes.iter().map(|(_, a)| a.len() + 1).sum();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut env = SimEnv::new();

    let mut g = c.benchmark_group("sim_336x224");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(frames as u64));
    g.bench_function(
        format!("env_step_{}_episodes_{frames}_frames", episodes.len()),
        |b| {
            b.iter(|| {
                rt.block_on(async {
                    for (task, actions) in &episodes {
                        black_box(env.reset(task).await.expect("reset"));
                        for a in actions {
                            // A rejected action still counts as a step (the screen is unchanged).
                            black_box(env.step(a).await.ok());
                        }
                    }
                });
            });
        },
    );

    // One frame of a mid-episode desktop: render to RGB, then encode.
    let (task, actions) = &episodes[0];
    let (w, h) = DEFAULT_SIZE;
    let mut session = Session::from_task(task, w, h).expect("session");
    for a in &actions[..actions.len().saturating_sub(1)] {
        let _ = session.apply_action(a);
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("render_rgb", |b| {
        b.iter(|| {
            black_box(session.render_rgb().expect("render"));
        });
    });
    let rgb = session.render_rgb().expect("render").to_vec();
    g.bench_function("encode_png", |b| {
        b.iter(|| render::encode_png(black_box(&rgb), w, h).expect("encode"));
    });
    g.finish();
}

criterion_group!(benches, bench_sim);
criterion_main!(benches);

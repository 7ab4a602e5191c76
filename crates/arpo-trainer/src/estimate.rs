//! How long a run will take on this machine, measured before it starts
//! (`cargo xtask train --check`).
//!
//! The seed's author learned only after the first step that a step took an hour on his CPU.
//! [`measure`] runs the rollout model twice at the run's screenshot size: a first turn (one
//! screenshot, the prompt) and a second turn that resends the first with its answer and a new
//! screenshot, as every turn of an episode does (the prefix cache serves the history). From the
//! measured parts (vision seconds per screenshot, prefill seconds per token, decode seconds per
//! token) [`Estimate::new`] builds the time per rollout, per training step and per epoch, and
//! what the settings that shorten a run would make of it.
//!
//! The figures are estimates, and say what they assume: every episode runs all `env.max_steps`
//! turns (an upper bound: solved tasks end early); each later turn costs what the measured
//! second turn did (with `limit_images` smaller than the episode, turns after the window slides
//! prefill the kept screenshots again, so those cost more: counted below); rollouts of a step
//! run one after another (batching saves decode time on top of this); an update costs a forward
//! and a backward of every trajectory (3 forwards) plus the old-log-prob scoring pass (1).

use arpo_core::{AgentContext, Environment, SamplingParams, Screenshot};
use arpo_env_sim::{Catalogue, SimEnv};
use arpo_model::LocalPolicy;
use serde::Serialize;

use crate::config::{Config, EnvProvider};
use crate::error::TrainerError;

/// The screen OSWorld's VMs show (`env.screen_size` unset on VMware and remote guests).
const OSWORLD_SCREEN: (u32, u32) = (1920, 1080);

/// One measured model call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MeasuredTurn {
    pub seconds: f64,
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub answer_tokens: usize,
}

/// What [`measure`] saw.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    /// The screenshot size measured at.
    pub screen: (u32, u32),
    /// Image tokens of one screenshot.
    pub image_tokens: usize,
    pub first: MeasuredTurn,
    pub second: MeasuredTurn,
    /// Rollouts generated together (a batch of first turns was timed when one call was quick:
    /// small models gain a lot from batching, large ones on a CPU little), and what the batch
    /// made of one rollout's time (batch seconds / batch size / one call's seconds; 1 when not
    /// timed).
    pub batch: usize,
    pub batch_factor: f64,
}

/// The run's shape: what the estimate multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunShape {
    pub max_steps: usize,
    pub limit_images: usize,
    pub rollouts_per_step: usize,
    pub steps_per_epoch: usize,
    pub epochs: usize,
}

impl RunShape {
    pub fn of(config: &Config, steps_per_epoch: usize) -> Self {
        Self {
            max_steps: config.env.max_steps.max(1),
            limit_images: config.worker.rollout.limit_images.max(1),
            rollouts_per_step: config.data.rollout_batch_size * config.worker.rollout.n,
            steps_per_epoch,
            epochs: config.trainer.total_episodes,
        }
    }
}

/// Seconds per rollout, step and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub vision_s_per_image: f64,
    pub prefill_s_per_token: f64,
    pub decode_s_per_token: f64,
    pub rollout_s: f64,
    pub update_s: f64,
    pub step_s: f64,
    pub epoch_s: f64,
    pub run_s: f64,
}

impl Estimate {
    /// The estimate for `shape` from the measured parts (see the module docs for what it
    /// assumes).
    pub fn new(m: &Measured, shape: &RunShape) -> Self {
        let per = |s: f64, n: usize| if n > 0 { s / n as f64 } else { 0.0 };
        let vision = m.first.vision_s;
        let prefill = per(
            m.first.prefill_s,
            m.first.prompt_tokens - m.first.cached_tokens,
        );
        let decode = per(m.first.decode_s, m.first.answer_tokens.saturating_sub(1));
        let answer = m.first.answer_tokens.max(m.second.answer_tokens) as f64;
        // A turn adds a screenshot and an answer (and a few template tokens) to the history.
        let turn_tokens = (m.second.prompt_tokens - m.first.prompt_tokens) as f64;
        // Without a prefix cache (the second turn reused nothing) every turn prefills its whole
        // prompt and encodes every screenshot in it.
        let cached = m.second.cached_tokens > 0;
        let mut rollout = 0.0;
        let mut trajectory_tokens = m.first.prompt_tokens as f64;
        for turn in 0..shape.max_steps {
            let images = (turn + 1).min(shape.limit_images) as f64;
            if !cached {
                let prompt = m.first.prompt_tokens as f64 + turn_tokens * (images - 1.0);
                rollout += (vision * images + prefill * prompt + decode * answer) * m.batch_factor;
                if turn > 0 {
                    trajectory_tokens += turn_tokens;
                }
                continue;
            }
            let new_tokens = if turn == 0 {
                m.first.prompt_tokens as f64
            } else if turn < shape.limit_images {
                // The history is a cached prefix: the new screenshot and the last answer.
                turn_tokens
            } else {
                // The oldest screenshot left the prompt: everything after it is prefilled again
                // (the kept screenshots' features come from the cache).
                turn_tokens * shape.limit_images as f64
            };
            rollout += (vision + prefill * new_tokens + decode * answer) * m.batch_factor;
            if turn > 0 {
                trajectory_tokens += turn_tokens;
            }
        }
        let images = shape.max_steps as f64;
        let update = 4.0 * prefill * trajectory_tokens + 2.0 * vision * images;
        let step = shape.rollouts_per_step as f64 * (rollout + update);
        let epoch = step * shape.steps_per_epoch as f64;
        Self {
            vision_s_per_image: vision,
            prefill_s_per_token: prefill,
            decode_s_per_token: decode,
            rollout_s: rollout,
            update_s: update * shape.rollouts_per_step as f64,
            step_s: step,
            epoch_s: epoch,
            run_s: epoch * shape.epochs as f64,
        }
    }
}

/// The screenshot size a run's environments show.
pub fn run_screen(config: &Config) -> (u32, u32) {
    match (config.env.screen_size, config.env.provider) {
        (Some(s), _) => (s.width, s.height),
        (None, EnvProvider::Sim) => SimEnv::new().screen_size(),
        (None, _) => OSWORLD_SCREEN,
    }
}

/// Two real screenshots of the simulated desktop at `screen` (any size the simulator draws;
/// the model's cost depends on the size, not on what is shown).
async fn screenshots(screen: (u32, u32)) -> Result<[Screenshot; 2], TrainerError> {
    let err = |e: String| TrainerError::Preflight {
        problems: vec![format!(
            "drawing a {}x{} screenshot: {e}",
            screen.0, screen.1
        )],
    };
    let tasks = Catalogue::default().train();
    let mut shots = Vec::with_capacity(2);
    for task in tasks.iter().take(2) {
        let mut env = SimEnv::with_size(screen.0.max(336), screen.1.max(224))
            .map_err(|e| err(e.to_string()))?;
        let obs = env.reset(task).await.map_err(|e| err(e.to_string()))?;
        shots.push(obs.screenshot);
    }
    shots
        .try_into()
        .map_err(|_| err("the catalogue has fewer than 2 tasks".into()))
}

/// Times a first and a second turn of the rollout policy at the run's screenshot size.
pub async fn measure(config: &Config, policy: &LocalPolicy) -> Result<Measured, TrainerError> {
    let screen = run_screen(config);
    let [a, b] = screenshots(screen).await?;
    let sampling = SamplingParams {
        seed: Some(config.data.seed),
        ..config.train_sampling()
    };
    let mut context = AgentContext {
        instruction: "Open the settings and turn on dark mode.".into(),
        screenshots: vec![a],
        responses: Vec::new(),
    };
    let model = &policy.model;
    let failed = |e: arpo_model::ModelError| TrainerError::Preflight {
        problems: vec![format!("measuring a generation: {e}")],
    };
    let turn = |context: &AgentContext| {
        let chat = arpo_core::protocol::build_messages(context, &policy.prompt);
        let start = std::time::Instant::now();
        let request = model.prepare(&chat).map_err(failed)?;
        let (mut out, t) = model
            .model
            .generate(std::slice::from_ref(&request), &sampling, &model.stop_ids)
            .map_err(failed)?;
        let g = out.remove(0);
        let text = model.tokenizer.decode(&g.token_ids).unwrap_or_default();
        Ok::<_, TrainerError>((
            MeasuredTurn {
                seconds: start.elapsed().as_secs_f64(),
                vision_s: t.vision_s,
                prefill_s: t.prefill_s - t.vision_s,
                decode_s: t.decode_s,
                prompt_tokens: request.input_ids.len(),
                cached_tokens: g.cached_tokens,
                answer_tokens: g.token_ids.len(),
            },
            text,
            request,
        ))
    };
    let (first, answer, first_request) = turn(&context)?;
    context.responses.push(answer);
    context.screenshots.push(b);
    let (second, _, _) = turn(&context)?;
    // A quick model: time a batch of first turns as the rollouts of a step run them.
    let batch = config
        .env
        .num_envs
        .clamp(1, config.data.rollout_batch_size * config.worker.rollout.n);
    let mut batch_factor = 1.0;
    if batch > 1 && first.seconds < 2.0 {
        model.model.prefix_cache.clear();
        let start = std::time::Instant::now();
        model
            .model
            .generate(&vec![first_request; batch], &sampling, &model.stop_ids)
            .map_err(failed)?;
        batch_factor =
            (start.elapsed().as_secs_f64() / batch as f64 / first.seconds.max(1e-9)).min(1.0);
    }
    let image_tokens = {
        let p = &model.processor;
        let (h, w) = arpo_core::protocol::smart_resize(
            screen.1,
            screen.0,
            (p.config.patch_size * p.config.merge_size) as u32,
            p.config.min_pixels,
            p.config.max_pixels,
        )
        .unwrap_or((0, 0));
        (h * w) as usize / (p.config.patch_size * p.config.merge_size).pow(2)
    };
    Ok(Measured {
        screen,
        image_tokens,
        first,
        second,
        batch,
        batch_factor,
    })
}

/// "3 h 05 min", "41 min", "12.0 s".
pub fn human(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "?".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let minutes = (seconds / 60.0).round() as u64;
    if minutes < 60 {
        return format!("{minutes} min");
    }
    let days = minutes / (24 * 60);
    let (h, m) = ((minutes / 60) % 24, minutes % 60);
    if days > 0 {
        format!("{days} d {h} h")
    } else {
        format!("{h} h {m:02} min")
    }
}

/// The report `train --check` prints: the measurement, the estimate, and what shorter settings
/// would make of it (each alone, from the same measurement).
pub fn report(m: &Measured, shape: &RunShape) -> String {
    let e = Estimate::new(m, shape);
    let mut out = String::new();
    let line = |out: &mut String, s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(
        &mut out,
        format!(
            "Measured at {}x{} ({} image tokens a screenshot): first turn {} ({} prompt tokens: vision {}, prefill {}, {} answer tokens in {}); a second turn {} ({} of {} prompt tokens from the prefix cache)",
            m.screen.0,
            m.screen.1,
            m.image_tokens,
            human(m.first.seconds),
            m.first.prompt_tokens,
            human(m.first.vision_s),
            human(m.first.prefill_s),
            m.first.answer_tokens,
            human(m.first.decode_s),
            human(m.second.seconds),
            m.second.cached_tokens,
            m.second.prompt_tokens,
        ),
    );
    line(
        &mut out,
        format!(
            "Estimate (every episode runs its {} turns; rollouts {}): about {} a rollout, {} a step ({} rollouts, update {}), {} an epoch ({} steps), {} for {} epochs",
            shape.max_steps,
            if m.batch > 1 && m.batch_factor < 1.0 {
                format!(
                    "in batches of {} at {:.2}x the time of one",
                    m.batch, m.batch_factor
                )
            } else {
                "one after another".to_string()
            },
            human(e.rollout_s),
            human(e.step_s),
            shape.rollouts_per_step,
            human(e.update_s),
            human(e.epoch_s),
            shape.steps_per_epoch,
            human(e.run_s),
            shape.epochs,
        ),
    );
    if m.first.seconds < 1.0 {
        line(
            &mut out,
            "  (a small model: fixed costs per call dominate, so this is an upper bound; the estimate is meant for models whose calls take seconds)".into(),
        );
    }
    let mut options: Vec<(String, f64)> = Vec::new();
    // Half the screenshot area: half the vision patches and image tokens.
    let mut half = m.clone();
    let image_share = |t: &MeasuredTurn| {
        let images = t
            .prompt_tokens
            .saturating_sub(t.cached_tokens)
            .min(m.image_tokens);
        images as f64 / t.prompt_tokens.max(1) as f64
    };
    for t in [&mut half.first, &mut half.second] {
        t.vision_s /= 2.0;
        t.prefill_s *= 1.0 - image_share(t) / 2.0;
    }
    half.second.prompt_tokens = half
        .first
        .prompt_tokens
        .saturating_add(m.second.prompt_tokens - m.first.prompt_tokens)
        .saturating_sub(m.image_tokens / 2);
    options.push((
        "data.max_pixels at half the screenshot's area".into(),
        Estimate::new(&half, shape).epoch_s,
    ));
    let shorter = [
        (shape.limit_images > 2).then_some(RunShape {
            limit_images: shape.limit_images / 2,
            ..*shape
        }),
        (shape.max_steps > 5).then_some(RunShape {
            max_steps: shape.max_steps / 2,
            ..*shape
        }),
    ];
    for s in shorter.into_iter().flatten() {
        let what = if s.limit_images != shape.limit_images {
            format!("worker.rollout.limit_images: {}", s.limit_images)
        } else {
            format!("env.max_steps: {}", s.max_steps)
        };
        options.push((what, Estimate::new(m, &s).epoch_s));
    }
    options.retain(|(_, epoch)| *epoch < e.epoch_s);
    line(&mut out, "Shorter runs (each alone):".into());
    for (what, epoch) in options {
        line(
            &mut out,
            format!("  {what}: about {} an epoch", human(epoch)),
        );
    }
    line(
        &mut out,
        "  8-bit rollout weights decode about 2.9x faster than f32 on the 2B model (BENCHMARKS.md); the learner stays f32".into(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(seconds: f64, prompt: usize, cached: usize) -> MeasuredTurn {
        MeasuredTurn {
            seconds,
            vision_s: 2.0,
            prefill_s: 1.0,
            decode_s: 3.0,
            prompt_tokens: prompt,
            cached_tokens: cached,
            answer_tokens: 31,
        }
    }

    /// A first turn of 100 prompt tokens and a second of 250, `cached` of them reused.
    fn measured(second_seconds: f64, cached: usize) -> Measured {
        Measured {
            screen: (800, 450),
            image_tokens: 100,
            first: turn(6.0, 100, 0),
            second: turn(second_seconds, 250, cached),
            batch: 1,
            batch_factor: 1.0,
        }
    }

    /// By hand: vision 2 s a screenshot, prefill 1 s / 100 tokens = 0.01 s a token, decode
    /// 3 s / 30 steps = 0.1 s a token, answers of 31 tokens, 150 tokens a turn.
    #[test]
    fn estimate_follows_the_measured_parts() {
        let m = measured(4.0, 96);
        let shape = RunShape {
            max_steps: 3,
            limit_images: 2,
            rollouts_per_step: 4,
            steps_per_epoch: 10,
            epochs: 2,
        };
        let e = Estimate::new(&m, &shape);
        assert!((e.prefill_s_per_token - 0.01).abs() < 1e-12);
        assert!((e.decode_s_per_token - 0.1).abs() < 1e-12);
        // turn 0: 2 + 0.01*100 + 3.1 = 6.1; turn 1: 2 + 0.01*150 + 3.1 = 6.6;
        // turn 2 (the window slid, 2 turns prefilled): 2 + 0.01*300 + 3.1 = 8.1.
        assert!((e.rollout_s - 20.8).abs() < 1e-9, "{e:?}");
        // update: 4 * 0.01 * (100 + 150 + 150) + 2 * 2 * 3 = 16 + 12 = 28 a rollout.
        assert!((e.update_s - 4.0 * 28.0).abs() < 1e-9, "{e:?}");
        assert!((e.step_s - 4.0 * (20.8 + 28.0)).abs() < 1e-9);
        assert!((e.epoch_s - 10.0 * e.step_s).abs() < 1e-9);
        assert!((e.run_s - 2.0 * e.epoch_s).abs() < 1e-9);
        let r = report(&m, &shape);
        assert!(r.contains("an epoch (10 steps)"), "{r}");
        assert!(r.contains("data.max_pixels"), "{r}");
    }

    /// Without a cache (nothing reused at the second turn): turn k encodes min(k+1, limit)
    /// screenshots and prefills 100 + 150 (images - 1) tokens. By hand, limit 2: turn 0:
    /// 2 + 1 + 3.1 = 6.1; turns 1, 2: 4 + 0.01*250 + 3.1 = 9.6; rollout 25.3 s.
    #[test]
    fn estimate_without_a_cache_prefills_every_turn_whole() {
        let m = measured(8.0, 0);
        let shape = RunShape {
            max_steps: 3,
            limit_images: 2,
            rollouts_per_step: 1,
            steps_per_epoch: 1,
            epochs: 1,
        };
        let e = Estimate::new(&m, &shape);
        assert!((e.rollout_s - 25.3).abs() < 1e-9, "{e:?}");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(12.04), "12.0 s");
        assert_eq!(human(41.0 * 60.0), "41 min");
        assert_eq!(human(3.0 * 3600.0 + 5.0 * 60.0), "3 h 05 min");
        assert_eq!(human(17.0 * 86400.0 + 2.0 * 3600.0), "17 d 2 h");
    }
}

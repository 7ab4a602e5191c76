//! Terminal progress (indicatif): epoch, step, rollouts in flight, env steps per second, last
//! success rate. [`Progress::quiet`] shows nothing (CI, logs).

use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::rollout::RolloutEvent;

/// The progress display of a run.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    epoch: usize,
    step: u64,
    in_flight: usize,
    env_steps: usize,
    started: Instant,
    success_rate: Option<f64>,
}

impl Progress {
    /// A bar on stderr.
    pub fn terminal() -> Self {
        Self::with_bar(ProgressBar::with_draw_target(
            Some(0),
            ProgressDrawTarget::stderr(),
        ))
    }

    /// Nothing on the terminal.
    pub fn quiet() -> Self {
        Self::with_bar(ProgressBar::hidden())
    }

    fn with_bar(bar: ProgressBar) -> Self {
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg}",
        ) {
            bar.set_style(style);
        }
        Self {
            bar,
            state: Mutex::new(State {
                epoch: 0,
                step: 0,
                in_flight: 0,
                env_steps: 0,
                started: Instant::now(),
                success_rate: None,
            }),
        }
    }

    pub(crate) fn start(&self, total_steps: u64, done: u64) {
        self.bar.set_length(total_steps);
        self.bar.set_position(done);
    }

    pub(crate) fn set_context(&self, epoch: usize, step: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.epoch = epoch;
            s.step = step;
        }
        self.redraw();
    }

    pub(crate) fn set_success_rate(&self, rate: f64) {
        if let Ok(mut s) = self.state.lock() {
            s.success_rate = Some(rate);
        }
    }

    /// Takes an event of the rollout engine in (rollouts in flight, env steps per second).
    pub fn rollout_event(&self, event: &RolloutEvent<'_>) {
        if let Ok(mut s) = self.state.lock() {
            match *event {
                RolloutEvent::Generating { live } => s.in_flight = live,
                RolloutEvent::Stepped { env_steps } => s.env_steps += env_steps,
                RolloutEvent::EpisodeDone { .. } => s.in_flight = s.in_flight.saturating_sub(1),
                _ => return,
            }
        }
        self.redraw();
    }

    pub(crate) fn step_done(&self) {
        self.bar.inc(1);
        self.redraw();
    }

    pub(crate) fn finish(&self, message: &str) {
        self.bar.finish_with_message(message.to_string());
    }

    fn redraw(&self) {
        if self.bar.is_hidden() {
            return;
        }
        if let Ok(s) = self.state.lock() {
            let secs = s.started.elapsed().as_secs_f64().max(1e-9);
            let rate = s
                .success_rate
                .map_or_else(|| "-".to_string(), |r| format!("{:.0}%", 100.0 * r));
            self.bar.set_message(format!(
                "epoch {} | in flight {} | {:.1} env steps/s | last success {}",
                s.epoch + 1,
                s.in_flight,
                s.env_steps as f64 / secs,
                rate
            ));
        }
    }
}

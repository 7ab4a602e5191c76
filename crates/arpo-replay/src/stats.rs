//! `replay_buffer_stats.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ReplayConfig, StepReport};

/// What `replay_buffer_stats.json` holds: the buffer's contents and what replay did, per step
/// and in total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayStats {
    pub enabled: bool,
    pub capacity: usize,
    /// Steps applied so far.
    pub steps: u64,
    /// Tasks with at least one stored success.
    pub tasks_with_success: usize,
    /// Stored episodes over all tasks.
    pub stored_episodes: usize,
    /// Stored episodes per task id.
    pub size_per_task: BTreeMap<String, usize>,
    /// Injections over all steps.
    pub total_injections: u64,
    /// Ages (in steps) of all injected episodes.
    pub injected_age: AgeSummary,
    /// One entry per step, oldest first.
    pub per_step: Vec<StepSummary>,
}

/// One step of [`ReplayStats::per_step`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSummary {
    pub step: u64,
    pub groups: usize,
    pub all_failed_groups: usize,
    pub injections: usize,
    pub stored: usize,
    pub evicted: usize,
    /// Mean age of this step's injected episodes (`None` without injections).
    pub mean_injected_age: Option<f64>,
}

/// The distribution of the ages of injected episodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AgeSummary {
    pub count: u64,
    pub mean: Option<f64>,
    pub max: Option<u64>,
    /// Number of injections per age.
    pub histogram: BTreeMap<u64, u64>,
}

fn mean_age(ages: impl Iterator<Item = u64>) -> Option<f64> {
    let (count, sum) = ages.fold((0u64, 0u128), |(c, s), a| (c + 1, s + u128::from(a)));
    (count > 0).then(|| sum as f64 / count as f64)
}

impl ReplayStats {
    pub(crate) fn new<'a>(
        config: &ReplayConfig,
        steps: u64,
        sizes: impl Iterator<Item = (&'a str, usize)>,
        history: &[StepReport],
    ) -> Self {
        let size_per_task: BTreeMap<String, usize> =
            sizes.map(|(id, n)| (id.to_owned(), n)).collect();
        let ages = || {
            history
                .iter()
                .flat_map(|r| r.injections.iter().map(|i| i.age))
        };
        let mut histogram = BTreeMap::new();
        for age in ages() {
            *histogram.entry(age).or_insert(0u64) += 1;
        }
        Self {
            enabled: config.enabled,
            capacity: config.capacity,
            steps,
            tasks_with_success: size_per_task.values().filter(|&&n| n > 0).count(),
            stored_episodes: size_per_task.values().sum(),
            size_per_task,
            total_injections: ages().count() as u64,
            injected_age: AgeSummary {
                count: ages().count() as u64,
                mean: mean_age(ages()),
                max: ages().max(),
                histogram,
            },
            per_step: history
                .iter()
                .map(|r| StepSummary {
                    step: r.step,
                    groups: r.groups,
                    all_failed_groups: r.all_failed_groups,
                    injections: r.injections.len(),
                    stored: r.stored,
                    evicted: r.evicted,
                    mean_injected_age: mean_age(r.injections.iter().map(|i| i.age)),
                })
                .collect(),
        }
    }
}

//! What the buffer stores and when it injects.

use serde::{Deserialize, Serialize};

use crate::ReplayError;

/// Which rollouts of an all-failed group the injected episodes replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplacePositions {
    /// The first `injections_per_group` rollouts (the reference).
    #[default]
    First,
    /// The last `injections_per_group` rollouts.
    Last,
    /// `injections_per_group` distinct positions drawn uniformly with the buffer's RNG.
    Random,
}

/// The replay buffer's settings. [`Default`] is the reference (ARPO, May 2025).
///
/// Deserializes from a config section where every field is optional:
///
/// ```
/// let config: arpo_replay::ReplayConfig =
///     serde_json::from_str(r#"{"enabled": false, "capacity": 4}"#).unwrap();
/// assert!(!config.enabled);
/// assert_eq!(config.capacity, 4);
/// assert_eq!(config.success_threshold, 0.1);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    /// `algorithm.enable_replay`. When false, [`apply`](crate::ReplayBuffer::apply) leaves the
    /// groups untouched, stores nothing and draws nothing from its RNG (plain GRPO).
    pub enabled: bool,
    /// Episodes kept per task; the oldest is dropped first (8).
    pub capacity: usize,
    /// An episode is a success, and is stored, when `eval_result > success_threshold` (0.1).
    pub success_threshold: f64,
    /// A group is all-failed when the population std of its eval results is below this (0.05)...
    #[serde(alias = "fail_std")]
    pub failed_std_below: f64,
    /// ...and their mean is below this (0.2).
    #[serde(alias = "fail_mean")]
    pub failed_mean_below: f64,
    /// How many stored successes replace rollouts of an all-failed group (1). Each is drawn
    /// uniformly from the task's stored successes, with replacement (Python's `random.choices`).
    #[serde(alias = "inject_per_group")]
    pub injections_per_group: usize,
    /// Which rollouts they replace (the first ones).
    pub replace: ReplacePositions,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capacity: 8,
            success_threshold: 0.1,
            failed_std_below: 0.05,
            failed_mean_below: 0.2,
            injections_per_group: 1,
            replace: ReplacePositions::First,
        }
    }
}

impl ReplayConfig {
    /// Checks that the settings make sense.
    pub fn validate(&self) -> Result<(), ReplayError> {
        if self.capacity == 0 {
            return Err(ReplayError::InvalidConfig {
                field: "capacity",
                reason: "must be at least 1 (set enabled: false to turn replay off)".into(),
            });
        }
        if self.injections_per_group == 0 {
            return Err(ReplayError::InvalidConfig {
                field: "injections_per_group",
                reason: "must be at least 1 (set enabled: false to turn replay off)".into(),
            });
        }
        for (field, value) in [
            ("success_threshold", self.success_threshold),
            ("failed_std_below", self.failed_std_below),
            ("failed_mean_below", self.failed_mean_below),
        ] {
            if !value.is_finite() {
                return Err(ReplayError::InvalidConfig {
                    field,
                    reason: format!("must be a finite number, got {value}"),
                });
            }
        }
        Ok(())
    }

    /// Whether an episode with this evaluation is stored (`eval_result > success_threshold`).
    pub fn is_success(&self, eval_result: f64) -> bool {
        eval_result > self.success_threshold
    }

    /// Whether a group with these eval results is "all failed":
    /// `std(evals) < failed_std_below && mean(evals) < failed_mean_below`, with the population
    /// standard deviation (divide by N, as NumPy's `np.std` in the reference). An empty group is
    /// not all-failed (there is nothing to replace); a NaN makes the group not all-failed.
    ///
    /// ```
    /// let config = arpo_replay::ReplayConfig::default();
    /// assert!(config.is_all_failed(&[0.0, 0.0, 0.0]));
    /// assert!(!config.is_all_failed(&[0.0, 1.0, 0.0]));
    /// assert!(!config.is_all_failed(&[]));
    /// ```
    pub fn is_all_failed(&self, eval_results: &[f64]) -> bool {
        match population_mean_std(eval_results) {
            Some((mean, std)) => std < self.failed_std_below && mean < self.failed_mean_below,
            None => false,
        }
    }
}

/// Mean and population standard deviation (divide by N); `None` for an empty slice.
///
/// The deviations are taken from the first value before averaging, so that a group of equal
/// values has exactly zero spread.
pub fn population_mean_std(values: &[f64]) -> Option<(f64, f64)> {
    let first = *values.first()?;
    let n = values.len() as f64;
    let shifted_mean = values.iter().map(|v| v - first).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|v| {
            let d = (v - first) - shifted_mean;
            d * d
        })
        .sum::<f64>()
        / n;
    Some((first + shifted_mean, var.sqrt()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_reference() {
        let c = ReplayConfig::default();
        assert!(c.enabled);
        assert_eq!(c.capacity, 8);
        assert_eq!(c.success_threshold, 0.1);
        assert_eq!(c.failed_std_below, 0.05);
        assert_eq!(c.failed_mean_below, 0.2);
        assert_eq!(c.injections_per_group, 1);
        assert_eq!(c.replace, ReplacePositions::First);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn all_failed_uses_population_std_like_numpy() {
        // evals [0, 0.09]: mean 0.045; population std = sqrt((0.045² + 0.045²) / 2) = 0.045 < 0.05
        // (all failed, as np.std decides); the unbiased std would be 0.0636 >= 0.05.
        let c = ReplayConfig::default();
        let (mean, std) = population_mean_std(&[0.0, 0.09]).unwrap();
        assert!((mean - 0.045).abs() < 1e-15);
        assert!((std - 0.045).abs() < 1e-15);
        assert!(c.is_all_failed(&[0.0, 0.09]));
        // [0, 0.11]: population std 0.055 >= 0.05: not all failed.
        assert!(!c.is_all_failed(&[0.0, 0.11]));
    }

    #[test]
    fn all_failed_needs_a_low_mean() {
        // Eight rollouts all scoring 0.15: std 0 and mean 0.15 < 0.2: all failed, though each
        // of them is a success (> 0.1) and will be stored.
        let c = ReplayConfig::default();
        assert!(c.is_all_failed(&[0.15; 8]));
        assert!(c.is_success(0.15));
        // Eight rollouts scoring 0.2: mean 0.2 is not below 0.2.
        assert!(!c.is_all_failed(&[0.2; 8]));
        // A lone failure is an all-failed group of one.
        assert!(c.is_all_failed(&[0.0]));
        assert!(!c.is_all_failed(&[f64::NAN, 0.0]));
    }

    #[test]
    fn success_threshold_is_strict() {
        let c = ReplayConfig::default();
        assert!(!c.is_success(0.1));
        assert!(c.is_success(0.1000001));
        assert!(!c.is_success(f64::NAN));
    }

    #[test]
    fn invalid_configs_say_what_to_do() {
        let c = ReplayConfig {
            capacity: 0,
            ..ReplayConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("capacity") && err.contains("enabled: false"),
            "{err}"
        );
        let c = ReplayConfig {
            failed_mean_below: f64::NAN,
            ..ReplayConfig::default()
        };
        assert!(c.validate().is_err());
        let c = ReplayConfig {
            injections_per_group: 0,
            ..ReplayConfig::default()
        };
        assert!(c.validate().is_err());
    }
}

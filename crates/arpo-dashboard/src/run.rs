//! Reading a run's files (`results/<exp>/`) for the page: curves, tasks, replay statistics.
//!
//! The trainer's JSON is read as JSON values, not through the trainer's types: this crate sits
//! below `arpo-trainer` (the loop calls [`crate::record_episodes`]), and a metric added to the
//! trainer shows up on the page without a change here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::DashboardError;

/// A run's results directory.
#[derive(Debug)]
pub struct RunDir {
    pub root: PathBuf,
    /// The last parse of `training_metrics.json`, by the file's modification time and length:
    /// the page polls every two seconds and the trainer rewrites the file once per step.
    metrics_cache: Mutex<Option<(FileStamp, Arc<MetricsFile>)>>,
}

type FileStamp = (Option<SystemTime>, u64);

/// Curves of one kind (per step or per epoch): x values and one series per metric.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Curves {
    /// Points before downsampling.
    pub total: usize,
    /// The x value of each point (the step, or the epoch; the bucket's last one when
    /// downsampled).
    pub x: Vec<f64>,
    /// Metric name → one value per x (bucket means when downsampled).
    pub series: BTreeMap<String, Vec<f64>>,
}

/// What `/api/curves` answers.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RunCurves {
    pub experiment: String,
    /// Rollout plus update seconds of every step, and of the last one (before downsampling).
    pub step_seconds_total: f64,
    pub last_step_seconds: Option<f64>,
    pub steps: Curves,
    pub epochs: Curves,
}

/// How far a run is (`/api/summary`).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RunProgress {
    pub experiment: String,
    pub steps_done: usize,
    pub epochs_done: usize,
    pub last_step: Option<f64>,
    /// Rollout plus update seconds of every step, and of the last one.
    pub step_seconds_total: f64,
    pub last_step_seconds: Option<f64>,
}

/// `training_metrics.json`, its rows kept as JSON objects.
#[derive(Debug, serde::Deserialize)]
struct MetricsFile {
    #[serde(default)]
    experiment: String,
    #[serde(default)]
    steps: Vec<Map<String, Value>>,
    #[serde(default)]
    epochs: Vec<Map<String, Value>>,
}

fn step_seconds(r: &Map<String, Value>) -> f64 {
    ["rollout_seconds", "update_seconds"]
        .iter()
        .filter_map(|k| r.get(*k).and_then(Value::as_f64))
        .sum()
}

/// One task's line of the page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub instruction: String,
    pub attempts: u64,
    pub successes: u64,
    /// The last attempts' outcomes, oldest first: `true` success, `false` failure, `null`
    /// dropped by an environment failure.
    pub recent: Vec<Option<bool>>,
    pub dropped: u64,
}

impl RunDir {
    /// A run's results directory that must already hold `training_metrics.json` or
    /// `episodes/` (a finished or running run).
    pub fn open(root: &Path) -> Result<Self, DashboardError> {
        if !root.join("training_metrics.json").exists() && !root.join("episodes").exists() {
            return Err(DashboardError::NotARun {
                path: root.to_path_buf(),
            });
        }
        Ok(Self::new(root))
    }

    /// A run's results directory, possibly still empty (a run that is starting).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            metrics_cache: Mutex::new(None),
        }
    }

    /// `episodes/`.
    pub fn episodes_dir(&self) -> PathBuf {
        self.root.join("episodes")
    }

    /// The step and epoch curves of `training_metrics.json`, each downsampled to at most
    /// `max_points` points. A missing file is a run that has not finished a step yet.
    pub fn curves(&self, max_points: usize) -> Result<RunCurves, DashboardError> {
        let Some(m) = self.metrics()? else {
            return Ok(RunCurves::default());
        };
        Ok(RunCurves {
            step_seconds_total: m.steps.iter().map(step_seconds).sum(),
            last_step_seconds: m.steps.last().map(step_seconds),
            steps: downsample(&curves_of(&m.steps, "step"), max_points),
            epochs: downsample(&curves_of(&m.epochs, "epoch"), max_points),
            experiment: m.experiment.clone(),
        })
    }

    /// What the page polls: counts and times, without building curves.
    pub fn progress(&self) -> Result<RunProgress, DashboardError> {
        let Some(m) = self.metrics()? else {
            return Ok(RunProgress::default());
        };
        Ok(RunProgress {
            steps_done: m.steps.len(),
            epochs_done: m.epochs.len(),
            last_step: m
                .steps
                .last()
                .and_then(|r| r.get("step"))
                .and_then(Value::as_f64),
            step_seconds_total: m.steps.iter().map(step_seconds).sum(),
            last_step_seconds: m.steps.last().map(step_seconds),
            experiment: m.experiment.clone(),
        })
    }

    fn metrics(&self) -> Result<Option<Arc<MetricsFile>>, DashboardError> {
        let path = self.root.join("training_metrics.json");
        let stamp = |m: &std::fs::Metadata| (m.modified().ok(), m.len());
        let before = match std::fs::metadata(&path) {
            Ok(m) => stamp(&m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DashboardError::io(&path, e)),
        };
        let mut cache = self
            .metrics_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, m)) = cache.as_ref().filter(|(s, _)| *s == before) {
            return Ok(Some(Arc::clone(m)));
        }
        let text = std::fs::read(&path).map_err(|e| DashboardError::io(&path, e))?;
        let parsed: MetricsFile =
            serde_json::from_slice(&text).map_err(|source| DashboardError::Json {
                path: path.clone(),
                source,
            })?;
        let parsed = Arc::new(parsed);
        // Cached under the stamp read before the read: a write in between only costs a parse.
        *cache = Some((before, Arc::clone(&parsed)));
        Ok(Some(parsed))
    }

    /// Each task's attempts and recent outcomes from `task_results/task_<id>_results.json`.
    pub fn tasks(&self, recent: usize) -> Result<Vec<TaskSummary>, DashboardError> {
        let dir = self.root.join("task_results");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DashboardError::io(&dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| DashboardError::io(&path, e))?;
            let v: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                // Being rewritten right now: skip it this time.
                Err(_) => continue,
            };
            let history = v
                .get("history")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let outcome = |a: &Value| {
                if a.get("end").and_then(Value::as_str) == Some("dropped") {
                    None
                } else {
                    Some(a.get("success").and_then(Value::as_bool).unwrap_or(false))
                }
            };
            out.push(TaskSummary {
                task_id: str_field(&v, "task_id"),
                instruction: str_field(&v, "instruction"),
                attempts: v.get("attempts").and_then(Value::as_u64).unwrap_or(0),
                successes: v.get("successes").and_then(Value::as_u64).unwrap_or(0),
                dropped: history.iter().filter(|a| outcome(a).is_none()).count() as u64,
                recent: history
                    .iter()
                    .skip(history.len().saturating_sub(recent))
                    .map(outcome)
                    .collect(),
            });
        }
        out.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        Ok(out)
    }

    /// `replay_buffer_stats.json` as written (null when absent).
    pub fn replay(&self) -> Result<Value, DashboardError> {
        Ok(self
            .read_json("replay_buffer_stats.json")?
            .unwrap_or(Value::Null))
    }

    fn read_json(&self, name: &str) -> Result<Option<Value>, DashboardError> {
        let path = self.root.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DashboardError::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| DashboardError::Json { path, source })
    }
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Rows of numbers → one series per numeric field (a field missing from a row is NaN there,
/// shown as a gap).
fn curves_of(rows: &[Map<String, Value>], x_key: &str) -> Curves {
    let names: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.iter())
        .filter(|(k, v)| *k != x_key && v.is_number())
        .map(|(k, _)| k.as_str())
        .collect();
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut columns: Vec<Vec<f64>> = vec![vec![f64::NAN; rows.len()]; names.len()];
    let mut x = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        x.push(r.get(x_key).and_then(Value::as_f64).unwrap_or(i as f64));
        for (k, v) in r {
            if let (Some(&j), Some(v)) = (index.get(k.as_str()), v.as_f64()) {
                columns[j][i] = v;
            }
        }
    }
    Curves {
        total: rows.len(),
        x,
        series: names.iter().map(|n| n.to_string()).zip(columns).collect(),
    }
}

/// At most `max_points` points: consecutive buckets of equal size, each the mean of its values
/// (NaNs left out) at its last x. Curves of `max_points` or fewer are returned whole.
pub fn downsample(c: &Curves, max_points: usize) -> Curves {
    let n = c.x.len();
    if max_points == 0 || n <= max_points {
        return c.clone();
    }
    let bucket = n.div_ceil(max_points);
    let mut out = Curves {
        total: c.total,
        ..Default::default()
    };
    for chunk in (0..n).collect::<Vec<_>>().chunks(bucket) {
        let last = chunk[chunk.len() - 1];
        out.x.push(c.x[last]);
        for (name, s) in &c.series {
            let vals: Vec<f64> = chunk
                .iter()
                .map(|&i| s[i])
                .filter(|v| !v.is_nan())
                .collect();
            let mean = if vals.is_empty() {
                f64::NAN
            } else {
                vals.iter().sum::<f64>() / vals.len() as f64
            };
            out.series.entry(name.clone()).or_default().push(mean);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_takes_bucket_means_at_the_bucket_end() {
        let rows: Vec<Map<String, Value>> = (0..10)
            .map(|i| {
                let mut m = Map::new();
                m.insert("step".into(), i.into());
                m.insert("loss".into(), (i as f64).into());
                m
            })
            .collect();
        let c = curves_of(&rows, "step");
        assert_eq!(c.x.len(), 10);
        // 10 points into at most 4: buckets of 3 -> [0,1,2] [3,4,5] [6,7,8] [9].
        let d = downsample(&c, 4);
        assert_eq!(d.x, vec![2.0, 5.0, 8.0, 9.0]);
        assert_eq!(d.series["loss"], vec![1.0, 4.0, 7.0, 9.0]);
        assert_eq!(d.total, 10);
        assert_eq!(downsample(&c, 10), c);
    }
}

//! OSWorld task JSON (`evaluation_examples/examples/<domain>/<id>.json`) and index files
//! (`test_all.json`: `{domain: [task ids]}`), read unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::VmwareError;
use crate::evaluate::Evaluator;
use crate::setup::SetupStep;

/// A setup step as written in the JSON: `{type, parameters}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawStep {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub parameters: Value,
}

/// One OSWorld task, as its JSON file has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OsworldTask {
    pub id: String,
    #[serde(default)]
    pub snapshot: Option<String>,
    pub instruction: String,
    #[serde(default)]
    pub source: Option<String>,
    /// Setup steps, run by `reset`.
    #[serde(default)]
    pub config: Vec<RawStep>,
    #[serde(default)]
    pub related_apps: Vec<String>,
    /// `{func, result, expected?, options?, conj?, postconfig?}`, kept raw; see [`Evaluator`].
    pub evaluator: Value,
    /// Every other field (`trajectory`, `proxy`, `fixed_ip`, ...), kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl OsworldTask {
    /// Reads a task file.
    pub fn load(path: &Path) -> Result<Self, VmwareError> {
        let text = std::fs::read_to_string(path).map_err(|e| VmwareError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text).map_err(|e| match e {
            VmwareError::InvalidTask { reason, .. } => VmwareError::InvalidTask {
                what: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, VmwareError> {
        serde_json::from_str(text).map_err(|e| VmwareError::InvalidTask {
            what: "json".into(),
            reason: e.to_string(),
        })
    }

    /// The task as the trainer carries it: the whole JSON goes into `config`.
    pub fn to_task(&self, domain: Option<&str>) -> arpo_core::Task {
        arpo_core::Task {
            id: self.id.clone(),
            instruction: self.instruction.clone(),
            domain: domain.map(str::to_owned),
            config: serde_json::to_value(self).unwrap_or(Value::Null),
        }
    }

    /// Reads back a task carried by [`OsworldTask::to_task`].
    pub fn from_task(task: &arpo_core::Task) -> Result<Self, VmwareError> {
        serde_json::from_value(task.config.clone()).map_err(|e| VmwareError::InvalidTask {
            what: task.id.clone(),
            reason: format!("its config is not an OSWorld task JSON: {e}"),
        })
    }

    /// The parsed setup steps, or every step type we do not implement.
    pub fn setup_steps(&self) -> Result<Vec<SetupStep>, Vec<String>> {
        parse_steps(&self.config)
    }

    /// The parsed evaluator (with its postconfig), or what it needs that we do not implement.
    pub fn parsed_evaluator(&self) -> Result<Evaluator, Vec<String>> {
        Evaluator::parse(&self.evaluator)
    }

    /// Everything this task needs that is not supported (setup steps, getters, metrics), by name,
    /// e.g. `setup step chrome_open_tabs`, `metric compare_pdfs`. Empty when it can run.
    pub fn unsupported(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if let Err(m) = self.setup_steps() {
            missing.extend(m);
        }
        if let Err(m) = self.parsed_evaluator() {
            missing.extend(m);
        }
        missing.sort();
        missing.dedup();
        missing
    }

    /// `Err(VmwareError::Unsupported)` listing what is missing.
    pub fn check_supported(&self) -> Result<(), VmwareError> {
        let missing = self.unsupported();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(VmwareError::Unsupported {
                task_id: self.id.clone(),
                missing,
            })
        }
    }
}

pub(crate) fn parse_steps(raw: &[RawStep]) -> Result<Vec<SetupStep>, Vec<String>> {
    let mut steps = Vec::new();
    let mut missing = Vec::new();
    for step in raw {
        match SetupStep::parse(step) {
            Ok(s) => steps.push(s),
            Err(m) => missing.push(m),
        }
    }
    if missing.is_empty() {
        Ok(steps)
    } else {
        Err(missing)
    }
}

/// One entry of an index: the domain, the task id and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub domain: String,
    pub id: String,
    pub path: PathBuf,
}

/// Reads an index file (`{domain: [ids]}`) and resolves each task to
/// `<examples>/<domain>/<id>.json`. The order is the file's.
pub fn load_index(index: &Path, examples: &Path) -> Result<Vec<IndexEntry>, VmwareError> {
    let text = std::fs::read_to_string(index).map_err(|e| VmwareError::Read {
        path: index.to_path_buf(),
        reason: e.to_string(),
    })?;
    // serde_json's map is ordered by key; OSWorld's order is by key too in its index files.
    let map: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&text).map_err(|e| VmwareError::InvalidTask {
            what: index.display().to_string(),
            reason: format!("an index must be {{\"domain\": [\"task id\", ...]}}: {e}"),
        })?;
    Ok(map
        .into_iter()
        .flat_map(|(domain, ids)| {
            ids.into_iter().map(move |id| IndexEntry {
                path: examples.join(&domain).join(format!("{id}.json")),
                domain: domain.clone(),
                id,
            })
        })
        .collect())
}

/// Every task file under a folder: `<dir>/<domain>/<id>.json`, or `<dir>/<id>.json`, sorted.
pub fn find_task_files(dir: &Path) -> Result<Vec<PathBuf>, VmwareError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| VmwareError::io("read folder", &d, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| VmwareError::io("read folder", &d, e))?;
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

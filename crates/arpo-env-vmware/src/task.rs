//! OSWorld task JSON (`evaluation_examples/examples/<domain>/<id>.json`) and index files
//! (`test_all.json`: `{domain: [task ids]}`), read unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::VmwareError;
use crate::evaluate::Evaluator;
pub use crate::raw::RawStep;
use crate::setup::{SetupStep, parse_steps};

/// One OSWorld task, as its JSON file has it. Only the fields we use are typed and validated
/// (`id`, `instruction`, `config`, `evaluator`); every other one (`snapshot`, `source`,
/// `related_apps`, `trajectory`, `proxy`, ...) is kept as is, whatever its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OsworldTask {
    pub id: String,
    pub instruction: String,
    /// Setup steps, run by `reset`.
    #[serde(default)]
    pub config: Vec<RawStep>,
    /// `{func, result, expected?, options?, conj?, postconfig?}`, kept raw; see [`Evaluator`].
    pub evaluator: Value,
    /// Every other field, kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl OsworldTask {
    /// Reads a task file; an error names the file and the field.
    pub fn load(path: &Path) -> Result<Self, VmwareError> {
        let text = std::fs::read_to_string(path).map_err(|e| VmwareError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn from_json(text: &str) -> Result<Self, VmwareError> {
        Self::parse(text, "json")
    }

    /// Parses a task JSON; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, VmwareError> {
        let value: Value = serde_json::from_str(text).map_err(|e| VmwareError::InvalidTask {
            what: file.to_owned(),
            reason: format!("not JSON: {e}"),
        })?;
        Self::from_value(value, file)
    }

    /// Validates the fields we use, keeps the others untouched.
    pub fn from_value(value: Value, file: &str) -> Result<Self, VmwareError> {
        let field = |field: &str, reason: &str| VmwareError::TaskField {
            file: file.to_owned(),
            field: field.to_owned(),
            reason: reason.to_owned(),
        };
        let Value::Object(mut map) = value else {
            return Err(field(
                "(top level)",
                "not an OSWorld task JSON: it must be an object {id, instruction, config, evaluator}",
            ));
        };
        let mut text = |name: &str| match map.remove(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(field(name, "must be a string")),
            None => Err(field(name, "is missing")),
        };
        let id = text("id")?;
        let instruction = text("instruction")?;
        let config = match map.remove("config") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let at = format!("config[{i}]");
                    let Value::Object(mut step) = item else {
                        return Err(field(
                            &at,
                            "a setup step must be {\"type\", \"parameters\"}",
                        ));
                    };
                    let kind = match step.remove("type") {
                        Some(Value::String(k)) => k,
                        _ => {
                            return Err(field(
                                &format!("{at}.type"),
                                "must be a step name (a string)",
                            ));
                        }
                    };
                    let parameters = match step.remove("parameters") {
                        None => Value::Null,
                        Some(p @ (Value::Object(_) | Value::Null)) => p,
                        Some(_) => {
                            return Err(field(&format!("{at}.parameters"), "must be an object"));
                        }
                    };
                    Ok(RawStep { kind, parameters })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(field("config", "must be a list of setup steps")),
        };
        // Checked where it is used (`evaluator_problem`): a file whose evaluator is malformed
        // (two of OSWorld's vlc files have a string there) still loads and is reported as not
        // runnable.
        let evaluator = map.remove("evaluator").unwrap_or(Value::Null);
        Ok(Self {
            id,
            instruction,
            config,
            evaluator,
            extra: map.into_iter().collect(),
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
        Self::from_value(
            task.config.clone(),
            &format!("{} (the task's config)", task.id),
        )
    }

    /// What is wrong with the `evaluator` field, if anything: it must be an object whose `func`
    /// is a metric name or a list of them.
    pub fn evaluator_problem(&self) -> Option<VmwareError> {
        let ok = match self.evaluator.get("func") {
            Some(Value::String(f)) => !f.is_empty(),
            Some(Value::Array(fs)) => {
                !fs.is_empty() && fs.iter().all(|f| f.as_str().is_some_and(|f| !f.is_empty()))
            }
            _ => false,
        };
        (!ok).then(|| VmwareError::TaskField {
            file: self.id.clone(),
            field: "evaluator".into(),
            reason: format!(
                "must be an object {{func, result, expected?, options?}} with func a metric name or a list of them, not {}",
                crate::evaluate::short_json(&self.evaluator)
            ),
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

    /// Everything this task needs that is not native (setup steps, getters, metrics), by name,
    /// e.g. `setup step chrome_open_tabs`, `metric compare_pdfs`. Empty when it runs natively;
    /// otherwise it runs through OSWorld's evaluator (see [`crate::coverage::classify`]).
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

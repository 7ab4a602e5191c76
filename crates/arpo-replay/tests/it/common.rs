#![allow(dead_code)] // each test binary uses part of these helpers
//! A minimal episode type for the tests: a task, an evaluation, and a unique id to follow
//! each episode through injection.

use arpo_replay::Episode;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ep {
    pub task: String,
    pub eval: f64,
    pub id: u64,
}

impl Episode for Ep {
    fn task_id(&self) -> &str {
        &self.task
    }

    fn eval_result(&self) -> f64 {
        self.eval
    }
}

/// Builds groups from `(task, evals)` pairs, numbering episodes from `*next_id` on.
pub fn groups(spec: &[(&str, &[f64])], next_id: &mut u64) -> Vec<Vec<Ep>> {
    spec.iter()
        .map(|(task, evals)| {
            evals
                .iter()
                .map(|&eval| {
                    *next_id += 1;
                    Ep {
                        task: (*task).to_owned(),
                        eval,
                        id: *next_id,
                    }
                })
                .collect()
        })
        .collect()
}

pub fn ids(group: &[Ep]) -> Vec<u64> {
    group.iter().map(|e| e.id).collect()
}

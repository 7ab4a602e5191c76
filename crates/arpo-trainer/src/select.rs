//! ARPO's task selection: keep the tasks the base model solves at least once in K attempts
//! (optionally not every time), as an index `{domain: [task ids]}` that `data.train_files`
//! reads (`cargo xtask select-tasks`).

use std::collections::BTreeMap;

use arpo_core::Task;

use crate::eval::EvalReport;

/// The selected index: the solved tasks of `tasks` (in their order) according to `report`,
/// without those solved in every attempt when `not_always`, at most `per_domain` of each domain
/// taken in rounds across domains, at most `first` in all.
pub fn select(
    tasks: &[Task],
    report: &EvalReport,
    not_always: bool,
    per_domain: Option<usize>,
    first: Option<usize>,
) -> BTreeMap<String, Vec<String>> {
    let mut solved: Vec<(String, String)> = Vec::new();
    for task in tasks {
        let Some(t) = report.per_task.iter().find(|t| t.task_id == task.id) else {
            continue;
        };
        if t.successes == 0 || (not_always && t.successes == t.attempts) {
            continue;
        }
        let domain = task.domain.clone().unwrap_or_else(|| "tasks".into());
        solved.push((domain, task.id.clone()));
    }
    let mut index: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (domain, id) in pick(&solved, per_domain, first) {
        index.entry(domain).or_default().push(id);
    }
    index
}

/// The tasks to keep from the solved ones (in the set's order): without `per_domain`, the first
/// ones; with it, at most that many of each domain, taken in rounds (the first task of every
/// domain in order of appearance, then the second, ...). `first` caps the total either way.
pub fn pick(
    solved: &[(String, String)],
    per_domain: Option<usize>,
    first: Option<usize>,
) -> Vec<(String, String)> {
    let cap = first.unwrap_or(usize::MAX);
    let Some(k) = per_domain else {
        return solved.iter().take(cap).cloned().collect();
    };
    let mut domains: Vec<(&str, Vec<&(String, String)>)> = Vec::new();
    for entry in solved {
        match domains.iter_mut().find(|(d, _)| *d == entry.0) {
            Some((_, v)) => v.push(entry),
            None => domains.push((&entry.0, vec![entry])),
        }
    }
    let mut out = Vec::new();
    for round in 0..k {
        for (_, entries) in &domains {
            if let Some(e) = entries.get(round)
                && out.len() < cap
            {
                out.push((*e).clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pick;

    fn set() -> Vec<(String, String)> {
        [
            ("a", "a1"),
            ("b", "b1"),
            ("a", "a2"),
            ("c", "c1"),
            ("a", "a3"),
            ("c", "c2"),
        ]
        .iter()
        .map(|(d, id)| ((*d).to_string(), (*id).to_string()))
        .collect()
    }

    fn ids(v: Vec<(String, String)>) -> Vec<String> {
        v.into_iter().map(|(_, id)| id).collect()
    }

    #[test]
    fn without_per_domain_the_first_tasks_in_order() {
        assert_eq!(ids(pick(&set(), None, Some(4))), ["a1", "b1", "a2", "c1"]);
        assert_eq!(pick(&set(), None, None).len(), 6);
    }

    #[test]
    fn per_domain_takes_rounds_across_domains() {
        assert_eq!(ids(pick(&set(), Some(1), None)), ["a1", "b1", "c1"]);
        assert_eq!(
            ids(pick(&set(), Some(2), Some(4))),
            ["a1", "b1", "c1", "a2"]
        );
        assert_eq!(
            ids(pick(&set(), Some(5), None)),
            ["a1", "b1", "c1", "a2", "c2", "a3"]
        );
    }
}

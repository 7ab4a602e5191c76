//! OSWorld evaluators: getters (`vm_command_line`, `vm_file`, `cloud_file`, `cache_file`, `rule`),
//! the simple metrics, `conj` and/or, `postconfig`, `infeasible` (`DesktopEnv.evaluate`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::VmwareError;
use crate::guest::GuestClient;
use crate::raw::RawStep;
use crate::setup::{SetupContext, SetupStep, fetch_cached, parse_steps, run_steps, safe_file_name};

/// The metrics implemented here.
pub const SUPPORTED_METRICS: &[&str] = &[
    "exact_match",
    "check_include_exclude",
    "is_in_list",
    "literal_match",
    "fuzzy_match",
    "diff_text_file",
    "compare_text_file",
    "check_list",
    "check_direct_json_object",
    "check_json_settings",
    "infeasible",
];

/// The getters implemented here.
pub const SUPPORTED_GETTERS: &[&str] = &[
    "vm_command_line",
    "vm_file",
    "cloud_file",
    "cache_file",
    "rule",
];

/// How a list of metrics combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conj {
    /// 0 at the first 0, else the mean.
    And,
    /// 1 at the first 1, else the max.
    Or,
}

/// A getter: where a metric's input comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Getter {
    /// Runs a command through `/execute` and takes its `output`.
    VmCommandLine { command: Value, shell: bool },
    /// Fetches guest files through `/file` into the task cache.
    VmFile {
        files: Vec<(String, String)>,
        multi: bool,
        gives: Vec<usize>,
    },
    /// Downloads URLs into the task cache (kept when already there).
    CloudFile {
        files: Vec<(String, String)>,
        multi: bool,
        gives: Vec<usize>,
    },
    /// A file already in the task cache (a `stdout` of a postconfig command).
    CacheFile { path: String },
    /// The rules themselves.
    Rule { rules: Value },
}

/// What a getter produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    /// Nothing (a failed command, a missing file).
    None,
    Text(String),
    File(PathBuf),
    /// Several files (`multi` with several `gives`); a missing one is `None`.
    Files(Vec<Option<PathBuf>>),
    Json(Value),
}

/// One metric with its getters and options.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub func: String,
    pub result: Option<Getter>,
    pub expected: Option<Getter>,
    pub options: Map<String, Value>,
}

/// A parsed `evaluator`.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluator {
    pub metrics: Vec<MetricSpec>,
    pub conj: Conj,
    pub postconfig: Vec<SetupStep>,
    /// `func` is `infeasible`: 1 only when the last action was `call_user` (FAIL).
    pub infeasible: bool,
}

fn list_or_one(value: Option<&Value>, n: usize, is_list: bool) -> Vec<Option<Value>> {
    match value {
        Some(Value::Array(items)) if is_list => items
            .iter()
            .map(|v| if v.is_null() { None } else { Some(v.clone()) })
            .chain(std::iter::repeat(None))
            .take(n)
            .collect(),
        Some(v) if !is_list && !v.is_null() => vec![Some(v.clone())],
        _ => vec![None; n],
    }
}

/// A file getter's (source, dest) pairs, its `multi` flag and the indices it `gives`.
type FilePairs = (Vec<(String, String)>, bool, Vec<usize>);

fn pairs(config: &Value) -> Option<FilePairs> {
    let multi = crate::setup::truthy(config.get("multi"));
    let as_list = |key: &str| -> Option<Vec<String>> {
        match config.get(key)? {
            Value::String(s) if !multi => Some(vec![s.clone()]),
            Value::Array(items) if multi => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect(),
            _ => None,
        }
    };
    let paths = as_list("path")?;
    let dests = as_list("dest")?;
    let gives = match config.get("gives") {
        Some(Value::Array(g)) => g
            .iter()
            .map(|i| i.as_u64().map(|i| i as usize))
            .collect::<Option<Vec<_>>>()?,
        _ => vec![0],
    };
    Some((paths.into_iter().zip(dests).collect(), multi, gives))
}

impl Getter {
    /// Parses a getter config; `Err("getter <type>")` for what we do not support.
    pub fn parse(config: &Value) -> Result<Self, String> {
        let kind = config.get("type").and_then(Value::as_str).unwrap_or("");
        let bad = |what: &str| format!("getter {kind} ({what})");
        Ok(match kind {
            "vm_command_line" => Self::VmCommandLine {
                command: match config.get("command") {
                    Some(c @ (Value::String(_) | Value::Array(_))) => c.clone(),
                    _ => return Err(bad("no command")),
                },
                shell: crate::setup::truthy(config.get("shell")),
            },
            "vm_file" | "cloud_file" => {
                if config
                    .get("time_suffix")
                    .is_some_and(|v| crate::setup::truthy(Some(v)))
                {
                    return Err(format!("getter {kind} with time_suffix"));
                }
                let (files, multi, gives) = pairs(config).ok_or_else(|| bad("path/dest"))?;
                if kind == "vm_file" {
                    Self::VmFile {
                        files,
                        multi,
                        gives,
                    }
                } else {
                    Self::CloudFile {
                        files,
                        multi,
                        gives,
                    }
                }
            }
            "cache_file" => Self::CacheFile {
                path: config
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("no path"))?
                    .to_owned(),
            },
            "rule" => Self::Rule {
                rules: config.get("rules").cloned().unwrap_or(Value::Null),
            },
            other => return Err(format!("getter {other}")),
        })
    }
}

impl Evaluator {
    /// Parses an `evaluator` object; `Err` lists every unsupported metric, getter and step.
    pub fn parse(evaluator: &Value) -> Result<Self, Vec<String>> {
        let mut missing = Vec::new();
        let postconfig: Vec<RawStep> = evaluator
            .get("postconfig")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .unwrap_or_else(|e| {
                missing.push(format!("evaluator postconfig ({e})"));
                None
            })
            .unwrap_or_default();
        let postconfig = match parse_steps(&postconfig) {
            Ok(s) => s,
            Err(m) => {
                missing.extend(m);
                Vec::new()
            }
        };
        let (funcs, is_list): (Vec<String>, bool) = match evaluator.get("func") {
            Some(Value::String(f)) => (vec![f.clone()], false),
            Some(Value::Array(fs)) => (
                fs.iter()
                    .map(|f| f.as_str().unwrap_or("").to_owned())
                    .collect(),
                true,
            ),
            _ => {
                missing.push("evaluator without func".to_owned());
                (Vec::new(), false)
            }
        };
        let conj = match evaluator.get("conj").and_then(Value::as_str) {
            Some("or") => Conj::Or,
            _ => Conj::And,
        };
        let infeasible = !is_list && funcs.first().is_some_and(|f| f == "infeasible");
        let n = funcs.len();
        let results = list_or_one(evaluator.get("result"), n, is_list);
        let expecteds = list_or_one(evaluator.get("expected"), n, is_list);
        let options = list_or_one(evaluator.get("options"), n, is_list);
        let mut metrics = Vec::new();
        for (i, func) in funcs.into_iter().enumerate() {
            if !SUPPORTED_METRICS.contains(&func.as_str()) {
                missing.push(format!("metric {func}"));
            }
            let mut getter = |v: &Option<Value>| match v {
                Some(v) if v.as_object().is_some_and(|o| !o.is_empty()) => match Getter::parse(v) {
                    Ok(g) => Some(g),
                    Err(m) => {
                        missing.push(m);
                        None
                    }
                },
                _ => None,
            };
            let result = getter(&results[i]);
            let expected = getter(&expecteds[i]);
            let options = options[i]
                .as_ref()
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            metrics.push(MetricSpec {
                func,
                result,
                expected,
                options,
            });
        }
        if missing.is_empty() {
            Ok(Self {
                metrics,
                conj,
                postconfig,
                infeasible,
            })
        } else {
            Err(missing)
        }
    }
}

/// A JSON value for a message, cut to 80 characters.
pub(crate) fn short_json(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

/// The metric, getter and postconfig step names an `evaluator` object uses, supported or not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvaluatorNames {
    pub metrics: Vec<String>,
    pub getters: Vec<String>,
    pub postconfig: Vec<String>,
}

impl EvaluatorNames {
    pub fn of(evaluator: &Value) -> Self {
        let strings = |v: Option<&Value>| -> Vec<String> {
            match v {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let getter_types = |v: Option<&Value>| -> Vec<String> {
            let one = |g: &Value| g.get("type").and_then(Value::as_str).map(str::to_owned);
            match v {
                Some(Value::Array(items)) => items.iter().filter_map(one).collect(),
                Some(g @ Value::Object(_)) => one(g).into_iter().collect(),
                _ => Vec::new(),
            }
        };
        let mut getters = getter_types(evaluator.get("result"));
        getters.extend(getter_types(evaluator.get("expected")));
        getters.sort();
        getters.dedup();
        let mut metrics = strings(evaluator.get("func"));
        metrics.sort();
        metrics.dedup();
        let postconfig = match evaluator.get("postconfig") {
            Some(Value::Array(steps)) => steps
                .iter()
                .filter_map(|s| s.get("type").and_then(Value::as_str).map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Self {
            metrics,
            getters,
            postconfig,
        }
    }
}

/// Runs getters against a guest.
#[derive(Debug)]
pub struct GetterContext<'a> {
    pub guest: &'a GuestClient,
    pub setup: &'a SetupContext,
}

impl GetterContext<'_> {
    async fn files(
        &self,
        files: &[(String, String)],
        multi: bool,
        gives: &[usize],
        from_vm: bool,
    ) -> Result<Got, VmwareError> {
        let cache = &self.setup.task_cache;
        std::fs::create_dir_all(cache).map_err(|e| VmwareError::io("create folder", cache, e))?;
        let mut given = Vec::new();
        for (i, (source, dest)) in files.iter().enumerate() {
            let local = cache.join(safe_file_name(dest));
            let present = if from_vm {
                match self.guest.file(source).await {
                    Ok(Some(bytes)) => {
                        std::fs::write(&local, bytes)
                            .map_err(|e| VmwareError::io("write", &local, e))?;
                        true
                    }
                    Ok(None) | Err(VmwareError::GuestStatus { .. }) => false,
                    Err(e) => return Err(e),
                }
            } else {
                fetch_cached(
                    source,
                    &local,
                    self.setup.download_timeout,
                    self.setup.max_download_bytes,
                )
                .await?;
                true
            };
            if gives.contains(&i) {
                given.push(present.then_some(local));
            }
        }
        Ok(match (multi, given.len()) {
            (_, 1) => given.pop().flatten().map_or(Got::None, Got::File),
            _ => Got::Files(given),
        })
    }

    /// Runs one getter.
    pub async fn get(&self, getter: &Getter) -> Result<Got, VmwareError> {
        match getter {
            Getter::Rule { rules } => Ok(Got::Json(rules.clone())),
            Getter::CacheFile { path } => {
                let local = self.setup.task_cache.join(safe_file_name(path));
                Ok(if local.is_file() {
                    Got::File(local)
                } else {
                    Got::None
                })
            }
            Getter::VmCommandLine { command, shell } => {
                match self.guest.execute(command, *shell, false).await {
                    Ok(out) => Ok(Got::Text(out.output)),
                    Err(VmwareError::GuestStatus { .. }) => Ok(Got::None),
                    Err(e) => Err(e),
                }
            }
            Getter::VmFile {
                files,
                multi,
                gives,
            } => self.files(files, *multi, gives, true).await,
            Getter::CloudFile {
                files,
                multi,
                gives,
            } => self.files(files, *multi, gives, false).await,
        }
    }
}

/// Runs the evaluator: postconfig, then `infeasible` or the metrics combined by `conj`.
/// `last_was_fail`: the episode's last action was `call_user` (OSWorld's FAIL).
pub async fn evaluate(
    evaluator: &Evaluator,
    ctx: &GetterContext<'_>,
    last_was_fail: bool,
) -> Result<f64, VmwareError> {
    run_steps(&evaluator.postconfig, ctx.guest, ctx.setup).await?;
    if evaluator.infeasible {
        return Ok(if last_was_fail { 1.0 } else { 0.0 });
    }
    if last_was_fail {
        return Ok(0.0);
    }
    let mut scores = Vec::new();
    for spec in &evaluator.metrics {
        let result = match &spec.result {
            Some(g) => ctx.get(g).await?,
            None => Got::None,
        };
        let expected = match &spec.expected {
            Some(g) => Some(ctx.get(g).await?),
            None => None,
        };
        let score = metric(&spec.func, &result, expected.as_ref(), &spec.options)?;
        match evaluator.conj {
            Conj::And if score == 0.0 => return Ok(0.0),
            Conj::Or if score == 1.0 => return Ok(1.0),
            _ => scores.push(score),
        }
    }
    Ok(match evaluator.conj {
        _ if scores.is_empty() => 0.0,
        Conj::And => scores.iter().sum::<f64>() / scores.len() as f64,
        Conj::Or => scores.iter().copied().fold(0.0, f64::max),
    })
}

fn rules_of(expected: Option<&Got>) -> Value {
    match expected {
        Some(Got::Json(v)) => v.clone(),
        _ => Value::Null,
    }
}

fn read_text(metric: &str, path: &Path) -> Result<String, VmwareError> {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| VmwareError::Evaluation {
            metric: metric.to_owned(),
            reason: format!("cannot read {}: {e}", path.display()),
        })
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn as_json(result: &Got) -> Value {
    match result {
        Got::None => Value::Null,
        Got::Text(t) => Value::String(t.clone()),
        Got::File(p) => Value::String(p.display().to_string()),
        Got::Files(ps) => Value::Array(
            ps.iter()
                .map(|p| {
                    p.as_ref()
                        .map_or(Value::Null, |p| Value::String(p.display().to_string()))
                })
                .collect(),
        ),
        Got::Json(v) => v.clone(),
    }
}

/// One metric on a getter's result and the expected getter's value, in [0, 1].
pub fn metric(
    func: &str,
    result: &Got,
    expected: Option<&Got>,
    options: &Map<String, Value>,
) -> Result<f64, VmwareError> {
    let score = |b: bool| if b { 1.0 } else { 0.0 };
    let eval_err = |reason: String| VmwareError::Evaluation {
        metric: func.to_owned(),
        reason,
    };
    Ok(match func {
        "exact_match" => {
            let rules = rules_of(expected);
            score(json_eq(
                &as_json(result),
                rules.get("expected").unwrap_or(&Value::Null),
            ))
        }
        "check_include_exclude" => match result {
            Got::Text(text) => {
                let rules = rules_of(expected);
                let include = strings(rules.get("include"));
                let exclude = strings(rules.get("exclude"));
                score(
                    include.iter().all(|s| text.contains(s.as_str()))
                        && exclude.iter().all(|s| !text.contains(s.as_str())),
                )
            }
            _ => 0.0,
        },
        "is_in_list" => {
            let rules = rules_of(expected);
            let want = rules.get("expected").unwrap_or(&Value::Null);
            match (result, want) {
                (Got::Text(text), Value::String(w)) => score(text.contains(w.as_str())),
                (Got::Json(Value::Array(items)), w) => score(items.iter().any(|i| json_eq(i, w))),
                _ => 0.0,
            }
        }
        "literal_match" => {
            let want = expected.map(as_json).unwrap_or(Value::Null);
            let ignore_case = options
                .get("ignore_case")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let norm = |s: String| if ignore_case { s.to_lowercase() } else { s };
            match options.get("type").and_then(Value::as_str).unwrap_or("str") {
                "str" => match (as_json(result), want) {
                    (Value::String(a), Value::String(b)) => score(norm(a) == norm(b)),
                    (a, b) => score(json_eq(&a, &b)),
                },
                "list" => match (as_json(result), want) {
                    (Value::Array(a), Value::Array(b)) if a.len() == b.len() => score(
                        a.iter()
                            .zip(&b)
                            .all(|(x, y)| norm(py_str(x)) == norm(py_str(y))),
                    ),
                    _ => 0.0,
                },
                other => {
                    return Err(eval_err(format!(
                        "literal_match type {other} is not supported"
                    )));
                }
            }
        }
        "fuzzy_match" => match result {
            Got::Text(text) => {
                let rules = rules_of(expected);
                match rules.get("expected").and_then(Value::as_str) {
                    Some(want) => indel_ratio(text, want),
                    None => return Err(eval_err("rules.expected must be a string".into())),
                }
            }
            _ => 0.0,
        },
        "compare_text_file" | "diff_text_file" => {
            let Got::File(actual) = result else {
                return Ok(0.0);
            };
            let Some(Got::File(gold)) = expected else {
                return Err(eval_err("the expected getter gave no file".into()));
            };
            let actual = read_text(func, actual)?;
            let gold = read_text(func, gold)?;
            if func == "diff_text_file" {
                let a: Vec<&str> = actual.lines().collect();
                let b: Vec<&str> = gold.lines().collect();
                sequence_ratio(&a, &b)
            } else {
                compare_text(&actual, &gold, options)
            }
        }
        "check_list" => {
            let Got::File(path) = result else {
                return Ok(0.0);
            };
            let rules = rules_of(expected);
            let compile = |key: &str| -> Result<Vec<regex::Regex>, VmwareError> {
                strings(rules.get(key))
                    .iter()
                    .map(|p| {
                        regex::Regex::new(p).map_err(|e| eval_err(format!("pattern {p:?}: {e}")))
                    })
                    .collect()
            };
            let expect = compile("expect")?;
            let unexpect = compile("unexpect")?;
            let text = read_text(func, path)?;
            let mut found = vec![false; expect.len()];
            let mut clean = true;
            // Python's `re.search` on a line: its `$` also matches before the final newline.
            let search = |r: &regex::Regex, line: &str| {
                r.is_match(line) || line.strip_suffix('\n').is_some_and(|l| r.is_match(l))
            };
            for line in text.split_inclusive('\n') {
                for (f, r) in found.iter_mut().zip(&expect) {
                    *f = *f || search(r, line);
                }
                clean = clean && unexpect.iter().all(|r| !search(r, line));
            }
            score(found.iter().all(|f| *f) && clean)
        }
        "check_direct_json_object" => {
            let parsed = match result {
                Got::Text(t) => serde_json::from_str::<Value>(&t.trim().replace('\'', "\"")).ok(),
                Got::Json(v) => Some(v.clone()),
                _ => None,
            };
            let Some(Value::Object(got)) = parsed else {
                return Ok(0.0);
            };
            let rules = rules_of(expected);
            let Some(Value::Object(want)) = rules.get("expected") else {
                return Err(eval_err("rules.expected must be an object".into()));
            };
            let in_result = rules
                .get("expect_in_result")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let null = Value::Null;
            score(want.iter().all(|(key, w)| {
                let g = got.get(key).unwrap_or(&null);
                if !in_result {
                    return json_eq(w, g);
                }
                match (w, g) {
                    (Value::Array(options), Value::Array(items)) => {
                        options.iter().any(|o| items.iter().any(|i| json_eq(i, o)))
                    }
                    (Value::String(s), Value::String(g)) => g.contains(s.as_str()),
                    (Value::String(s), Value::Array(items)) => {
                        items.iter().any(|i| i.as_str() == Some(s.as_str()))
                    }
                    _ => false,
                }
            }))
        }
        "check_json_settings" => {
            // OSWorld: the file as JSON (unreadable or not JSON: 0), each expected key equal.
            let Got::File(path) = result else {
                return Ok(0.0);
            };
            let Ok(Value::Object(data)) = std::fs::read(path)
                .map_err(|_| ())
                .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|_| ()))
            else {
                return Ok(0.0);
            };
            let rules = rules_of(expected);
            let Some(Value::Object(want)) = rules.get("expected") else {
                return Err(eval_err("rules.expected must be an object".into()));
            };
            score(
                want.iter()
                    .all(|(key, w)| data.get(key).is_some_and(|g| json_eq(g, w))),
            )
        }
        "infeasible" => 0.0,
        other => return Err(eval_err(format!("metric {other} is not supported"))),
    })
}

/// Python's `str()` of a JSON scalar, for `literal_match` lists.
fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// JSON equality with Python's number semantics (`1 == 1.0`).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Bool(x), Value::Number(n)) | (Value::Number(n), Value::Bool(x)) => {
            n.as_f64() == Some(if *x { 1.0 } else { 0.0 })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// `compare_text_file`: exact equality after the optional `ignore_blanks` / `ignore_case`.
fn compare_text(actual: &str, gold: &str, options: &Map<String, Value>) -> f64 {
    let flag = |k: &str| options.get(k).and_then(Value::as_bool).unwrap_or(false);
    let blanks = |s: &str| -> String {
        let tabs_newlines = s.replace(['\t', '\n'], " ");
        let trimmed = tabs_newlines.trim();
        trimmed.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let (mut a, mut b) = (actual.to_owned(), gold.to_owned());
    if flag("ignore_blanks") {
        a = blanks(&a);
        b = blanks(&b);
    }
    if flag("ignore_case") {
        a = a.to_lowercase();
        b = b.to_lowercase();
    }
    if a == b { 1.0 } else { 0.0 }
}

/// rapidfuzz's `fuzz.ratio / 100`: `2·LCS / (len a + len b)` over characters (1 for two empty strings).
pub fn indel_ratio(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let mut prev = vec![0usize; b.len() + 1];
    for x in &a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        prev = cur;
    }
    2.0 * prev[b.len()] as f64 / (a.len() + b.len()) as f64
}

/// Python's `difflib.SequenceMatcher(a=a, b=b).ratio()` (with its default autojunk heuristic).
pub fn sequence_ratio<T: Eq + std::hash::Hash>(a: &[T], b: &[T]) -> f64 {
    use std::collections::HashMap;
    let total = a.len() + b.len();
    if total == 0 {
        return 1.0;
    }
    let mut b2j: HashMap<&T, Vec<usize>> = HashMap::new();
    for (j, item) in b.iter().enumerate() {
        b2j.entry(item).or_default().push(j);
    }
    if b.len() >= 200 {
        let ntest = b.len() / 100 + 1;
        b2j.retain(|_, js| js.len() <= ntest);
    }
    let longest = |alo: usize, ahi: usize, blo: usize, bhi: usize| -> (usize, usize, usize) {
        let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
        let mut j2len: HashMap<usize, usize> = HashMap::new();
        for (i, item) in a.iter().enumerate().take(ahi).skip(alo) {
            let mut next: HashMap<usize, usize> = HashMap::new();
            if let Some(js) = b2j.get(item) {
                for &j in js {
                    if j < blo {
                        continue;
                    }
                    if j >= bhi {
                        break;
                    }
                    let k = j
                        .checked_sub(1)
                        .and_then(|p| j2len.get(&p))
                        .copied()
                        .unwrap_or(0)
                        + 1;
                    next.insert(j, k);
                    if k > bestsize {
                        besti = i + 1 - k;
                        bestj = j + 1 - k;
                        bestsize = k;
                    }
                }
            }
            j2len = next;
        }
        while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
            besti -= 1;
            bestj -= 1;
            bestsize += 1;
        }
        while besti + bestsize < ahi
            && bestj + bestsize < bhi
            && a[besti + bestsize] == b[bestj + bestsize]
        {
            bestsize += 1;
        }
        (besti, bestj, bestsize)
    };
    let mut matches = 0usize;
    let mut queue = vec![(0, a.len(), 0, b.len())];
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let (i, j, k) = longest(alo, ahi, blo, bhi);
        if k > 0 {
            matches += k;
            if alo < i && blo < j {
                queue.push((alo, i, blo, j));
            }
            if i + k < ahi && j + k < bhi {
                queue.push((i + k, ahi, j + k, bhi));
            }
        }
    }
    2.0 * matches as f64 / total as f64
}

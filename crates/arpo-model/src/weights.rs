//! Finding a checkpoint (local directory or Hugging Face cache) and reading its tensors.
//!
//! Weight names are normalised to the classic Qwen2-VL spelling (`model.layers.*`, `visual.*`,
//! `lm_head.weight`): transformers 5.x checkpoints (`model.language_model.*`, `model.visual.*`)
//! are renamed on load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result, read_json};

/// Files a model directory is made of.
pub const CONFIG_FILE: &str = "config.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Turns `--model` into a local directory: an existing path is used as is; anything else is a
/// Hugging Face repo id looked up in the local cache only (no network).
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    resolve_model_dir_in(model, &hf_hub::Cache::from_env())
}

/// [`resolve_model_dir`] with an explicit Hugging Face cache.
pub fn resolve_model_dir_in(model: &str, cache: &hf_hub::Cache) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    // A repo id is `owner/name`; anything else that does not exist is a mistyped path.
    let looks_like_path = model.starts_with(['/', '.', '~'])
        || model.contains('\\')
        || model.matches('/').count() != 1;
    if looks_like_path {
        return Err(ModelError::Config(format!(
            "no model directory at {model}: check the path (a Hugging Face repo id is owner/name)"
        )));
    }
    let repo = cache.model(model.to_string());
    let config = repo.get(CONFIG_FILE).ok_or_else(|| ModelError::NotCached {
        repo_id: model.to_string(),
        cache: cache.path().clone(),
    })?;
    // Every weight file of the repo must be cached too, or loading would fail half way.
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ModelError::Config(format!("odd cache path {}", config.display())))?;
    for file in weight_files(&dir)? {
        if !file.exists() {
            return Err(ModelError::NotCached {
                repo_id: model.to_string(),
                cache: cache.path().clone(),
            });
        }
    }
    Ok(dir)
}

/// The safetensors files of a model directory: the shards named by the index, or the single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX);
    if index.exists() {
        let v: serde_json::Value = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| ModelError::Config(format!("{} has no weight_map", index.display())))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(SINGLE_WEIGHTS);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Config(format!(
        "no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX} in {}: is this a Hugging Face model directory?",
        dir.display()
    )))
}

/// The classic Qwen2-VL name of a weight, whichever spelling the checkpoint used.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.lm_head.") {
        format!("lm_head.{rest}")
    } else {
        name.to_string()
    }
}

/// Tensors by canonical name, converted to `dtype` on `device`.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn from_map(map: HashMap<String, Tensor>) -> Self {
        Self {
            tensors: map
                .into_iter()
                .map(|(k, v)| (canonical_name(&k), v))
                .collect(),
        }
    }

    /// Reads every safetensors file of `dir`.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in weight_files(dir)? {
            let loaded = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
                ModelError::Config(format!("cannot read weights {}: {e}", file.display()))
            })?;
            for (name, t) in loaded {
                let t = t.to_dtype(dtype)?.to_device(device)?;
                tensors.insert(canonical_name(&name), t);
            }
        }
        Ok(Self { tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes a tensor out, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingWeight {
                name: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// Names left over after the model took what it needs.
    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
}

/// The tensors of a model directory's safetensors files, indexed by their headers and read
/// from disk one at a time: a load that converts each tensor as it comes (a quantized rollout
/// copy, [`crate::Qwen2Vl::load_rollout`]) never holds the whole checkpoint, in the file's
/// dtype or in f32.
#[derive(Debug, Default)]
pub struct LazyWeights {
    entries: HashMap<String, LazyEntry>,
}

#[derive(Debug, Clone)]
struct LazyEntry {
    file: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset of the tensor's data in the file, and its length.
    start: u64,
    len: usize,
}

/// One tensor's line of a safetensors header.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl LazyWeights {
    /// Reads the headers of every safetensors file of `dir` (no tensor data).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut entries = HashMap::new();
        for file in weight_files(dir)? {
            for (name, entry) in read_header(&file)? {
                entries.insert(canonical_name(&name), entry);
            }
        }
        Ok(Self { entries })
    }

    /// `(canonical name, shape)` of every tensor, sorted by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone()))
            .collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Reads one tensor from disk and converts it to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        use std::io::{Read, Seek, SeekFrom};
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingWeight { name: name.into() })?;
        let bad = |what: String| {
            ModelError::Config(format!(
                "cannot read {name} from {}: {what}",
                e.file.display()
            ))
        };
        let mut f = std::fs::File::open(&e.file).map_err(|x| bad(x.to_string()))?;
        f.seek(SeekFrom::Start(e.start))
            .map_err(|x| bad(x.to_string()))?;
        let mut bytes = vec![0u8; e.len];
        f.read_exact(&mut bytes)
            .map_err(|x| bad(format!("{x} (is the file truncated?)")))?;
        let t = Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &Device::Cpu)?;
        drop(bytes);
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The tensors a safetensors file's header lists, checked against the file's length.
fn read_header(file: &Path) -> Result<Vec<(String, LazyEntry)>> {
    use std::io::Read;
    let bad = |what: String| {
        ModelError::Config(format!(
            "{} is not a readable safetensors file: {what}",
            file.display()
        ))
    };
    let mut f = std::fs::File::open(file).map_err(|e| bad(e.to_string()))?;
    let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| bad(e.to_string()))?;
    let n = u64::from_le_bytes(n);
    // safetensors caps headers at 100 MB.
    if n > 100_000_000 || n.saturating_add(8) > file_len {
        return Err(bad(format!("header length {n} does not fit the file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let h: HeaderEntry =
            serde_json::from_value(v).map_err(|e| bad(format!("entry {name}: {e}")))?;
        let dtype = match h.dtype.as_str() {
            "F32" => DType::F32,
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            "F64" => DType::F64,
            other => return Err(bad(format!("{name} has dtype {other}, not a float type"))),
        };
        let (begin, end) = h.data_offsets;
        let expected = h
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
        let len = end.checked_sub(begin).and_then(|l| usize::try_from(l).ok());
        let fits = data_start
            .checked_add(end)
            .is_some_and(|stop| stop <= file_len);
        if expected.is_none() || len != expected || !fits {
            return Err(bad(format!(
                "{name}: offsets {begin}..{end} do not hold a {dtype:?} tensor of shape {:?} \
                 inside the file's {file_len} bytes",
                h.shape
            )));
        }
        out.push((
            name,
            LazyEntry {
                file: file.to_path_buf(),
                dtype,
                shape: h.shape,
                start: data_start + begin,
                len: len.unwrap_or(0),
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_map_to_the_classic_names() {
        assert_eq!(
            canonical_name("model.language_model.layers.3.mlp.up_proj.weight"),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(
            canonical_name("model.visual.blocks.0.attn.qkv.bias"),
            "visual.blocks.0.attn.qkv.bias"
        );
        assert_eq!(canonical_name("model.norm.weight"), "model.norm.weight");
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
        assert_eq!(
            canonical_name("model.language_model.embed_tokens.weight"),
            "model.embed_tokens.weight"
        );
    }

    #[test]
    fn cached_repo_resolves_offline_and_missing_one_says_how_to_download() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = hf_hub::Cache::new(cache_dir.path().to_path_buf());
        let err = resolve_model_dir_in("nobody/nothing", &cache).unwrap_err();
        assert!(
            err.to_string()
                .contains("huggingface-cli download nobody/nothing"),
            "{err}"
        );
        // The hub cache layout: refs/main names the snapshot holding the files.
        let repo = cache_dir.path().join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(snap.join(CONFIG_FILE), "{}").unwrap();
        // config without weights is not a usable cached model
        assert!(resolve_model_dir_in("org/tiny", &cache).is_err());
        std::fs::write(snap.join(SINGLE_WEIGHTS), b"").unwrap();
        assert_eq!(resolve_model_dir_in("org/tiny", &cache).unwrap(), snap);
    }

    #[test]
    fn sharded_index_lists_each_shard_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(WEIGHTS_INDEX),
            r#"{"weight_map": {"a": "model-00002-of-00002.safetensors",
                "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let files = weight_files(dir.path()).unwrap();
        assert_eq!(
            files,
            vec![
                dir.path().join("model-00001-of-00002.safetensors"),
                dir.path().join("model-00002-of-00002.safetensors")
            ]
        );
    }
}

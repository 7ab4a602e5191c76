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

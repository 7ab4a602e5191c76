//! `config.json`, `preprocessor_config.json` and `generation_config.json` of a Qwen2-VL
//! (`qwen2_vl`, UI-TARS-2B/7B) or Qwen2.5-VL (`qwen2_5_vl`, UI-TARS-1.5) checkpoint.
//!
//! Two spellings of `config.json` exist: the older flat one (text fields at the top level,
//! `rope_scaling: {type: mrope, mrope_section}`, as UI-TARS-2B-SFT and UI-TARS-1.5-7B ship) and
//! the transformers 5.x one (`text_config` / `vision_config`, `rope_parameters`). Both parse into
//! [`Qwen2VlConfig`]; [`VisionArch`] tells the two vision towers apart.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result, read_json};

/// The text decoder's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Split of the rotary half-dimension over the (t, h, w) position streams.
    pub mrope_section: Vec<usize>,
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// `(query heads, key/value heads, head_dim)`.
    pub fn heads(&self) -> (usize, usize, usize) {
        (
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim(),
        )
    }
}

/// Which vision tower: the blocks' norm and MLP, and where attention is windowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VisionArch {
    /// Qwen2-VL: LayerNorm, QuickGELU MLP (`fc1`/`fc2`, `embed_dim * mlp_ratio` wide), full
    /// attention within each image in every block; LayerNorm `ln_q` in the merger.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm, gated SiLU MLP with biases (`gate_proj`/`up_proj`/`down_proj`),
    /// attention within windows of `window_size` pixels except in `fullatt_block_indexes`;
    /// RMSNorm `ln_q` in the merger.
    Qwen25Vl {
        intermediate_size: usize,
        window_size: usize,
        fullatt_block_indexes: Vec<usize>,
    },
}

/// The vision tower's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub arch: VisionArch,
    pub depth: usize,
    pub embed_dim: usize,
    /// Output width of the merger (the text hidden size).
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Qwen2-VL's MLP width as a multiple of `embed_dim` (unused by Qwen2.5-VL).
    pub mlp_ratio: f64,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub rope_theta: f64,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    pub fn mlp_dim(&self) -> usize {
        match &self.arch {
            VisionArch::Qwen2Vl => (self.embed_dim as f64 * self.mlp_ratio) as usize,
            VisionArch::Qwen25Vl {
                intermediate_size, ..
            } => *intermediate_size,
        }
    }
    /// Side of an attention window in merged tokens (Qwen2.5-VL), `None` for full attention.
    pub fn window_merged(&self) -> Option<usize> {
        match &self.arch {
            VisionArch::Qwen2Vl => None,
            VisionArch::Qwen25Vl { window_size, .. } => {
                Some(window_size / self.spatial_merge_size / self.patch_size)
            }
        }
    }
    /// Whether block `i` attends within windows (false: within whole images).
    pub fn windowed_block(&self, i: usize) -> bool {
        match &self.arch {
            VisionArch::Qwen2Vl => false,
            VisionArch::Qwen25Vl {
                fullatt_block_indexes,
                ..
            } => !fullatt_block_indexes.contains(&i),
        }
    }
    /// Length of one flattened patch row: channels x temporal x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// A whole Qwen2-VL config, with the special-token ids it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: Option<u32>,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: Option<u32>,
    /// End-of-sequence ids from config.json (one or several).
    pub eos_token_ids: Vec<u32>,
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Qwen2VlConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = read_json(path)?;
        Self::from_value(&v, path)
    }

    /// Parses a `config.json` value (`path` is only used in error messages).
    pub fn from_value(v: &Value, path: &Path) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("<missing>");
        let qwen25 = match model_type {
            "qwen2_vl" => false,
            "qwen2_5_vl" => true,
            _ => {
                return Err(ModelError::UnsupportedModel {
                    model_type: model_type.to_string(),
                    path: path.to_path_buf(),
                });
            }
        };
        // transformers 5.x nests the text fields; the flat form keeps them at the top.
        let text_v = v.get("text_config").unwrap_or(v);
        let need = |obj: &Value, key: &str| {
            get_usize(obj, key).ok_or_else(|| {
                ModelError::Config(format!("{key} is missing in {}", path.display()))
            })
        };
        let rope = text_v
            .get("rope_parameters")
            .or_else(|| text_v.get("rope_scaling"))
            .or_else(|| v.get("rope_scaling"))
            .or_else(|| v.get("rope_parameters"));
        let mrope_section: Vec<usize> = rope
            .and_then(|r| r.get("mrope_section"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect()
            })
            .ok_or_else(|| {
                ModelError::Config(format!(
                    "mrope_section is missing in {} (expected in rope_scaling or rope_parameters)",
                    path.display()
                ))
            })?;
        let rope_theta = rope
            .and_then(|r| get_f64(r, "rope_theta"))
            .or_else(|| get_f64(text_v, "rope_theta"))
            .or_else(|| get_f64(v, "rope_theta"))
            .unwrap_or(1_000_000.0);
        let tie = text_v
            .get("tie_word_embeddings")
            .or_else(|| v.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let text = TextConfig {
            vocab_size: need(text_v, "vocab_size")?,
            hidden_size: need(text_v, "hidden_size")?,
            intermediate_size: need(text_v, "intermediate_size")?,
            num_hidden_layers: need(text_v, "num_hidden_layers")?,
            num_attention_heads: need(text_v, "num_attention_heads")?,
            num_key_value_heads: get_usize(text_v, "num_key_value_heads")
                .unwrap_or(need(text_v, "num_attention_heads")?),
            rms_norm_eps: get_f64(text_v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            mrope_section,
            tie_word_embeddings: tie,
        };
        let vis_v = v.get("vision_config").ok_or_else(|| {
            ModelError::Config(format!("vision_config is missing in {}", path.display()))
        })?;
        let act = vis_v.get("hidden_act").and_then(Value::as_str);
        let (want_act, family) = if qwen25 {
            ("silu", "Qwen2.5-VL")
        } else {
            ("quick_gelu", "Qwen2-VL")
        };
        if let Some(act) = act.filter(|a| *a != want_act) {
            return Err(ModelError::Config(format!(
                "vision hidden_act {act:?} in {} is not supported ({family} uses {want_act})",
                path.display()
            )));
        }
        // Qwen2.5-VL names the ViT width `hidden_size` and the merger's output `out_hidden_size`;
        // Qwen2-VL calls them `embed_dim` and `hidden_size`.
        let (embed_dim, out_dim, arch) = if qwen25 {
            let arch = VisionArch::Qwen25Vl {
                intermediate_size: need(vis_v, "intermediate_size")?,
                window_size: get_usize(vis_v, "window_size").unwrap_or(112),
                fullatt_block_indexes: vis_v
                    .get("fullatt_block_indexes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_u64)
                            .map(|x| x as usize)
                            .collect()
                    })
                    .unwrap_or_else(|| vec![7, 15, 23, 31]),
            };
            (
                need(vis_v, "hidden_size")?,
                get_usize(vis_v, "out_hidden_size").unwrap_or(text.hidden_size),
                arch,
            )
        } else {
            (
                need(vis_v, "embed_dim")?,
                get_usize(vis_v, "hidden_size").unwrap_or(text.hidden_size),
                VisionArch::Qwen2Vl,
            )
        };
        let vision = VisionConfig {
            arch,
            depth: need(vis_v, "depth")?,
            embed_dim,
            hidden_size: out_dim,
            num_heads: need(vis_v, "num_heads")?,
            mlp_ratio: get_f64(vis_v, "mlp_ratio").unwrap_or(4.0),
            in_channels: get_usize(vis_v, "in_channels")
                .or_else(|| get_usize(vis_v, "in_chans"))
                .unwrap_or(3),
            patch_size: get_usize(vis_v, "patch_size").unwrap_or(14),
            spatial_merge_size: get_usize(vis_v, "spatial_merge_size").unwrap_or(2),
            temporal_patch_size: get_usize(vis_v, "temporal_patch_size").unwrap_or(2),
            rope_theta: vis_v
                .get("rope_parameters")
                .and_then(|r| get_f64(r, "rope_theta"))
                .unwrap_or(10_000.0),
            layer_norm_eps: 1e-6,
        };
        let id = |key: &str| {
            v.get(key)
                .or_else(|| text_v.get(key))
                .and_then(Value::as_u64)
                .map(|x| x as u32)
        };
        let image_token_id = id("image_token_id").ok_or_else(|| {
            ModelError::Config(format!("image_token_id is missing in {}", path.display()))
        })?;
        let vision_start_token_id = id("vision_start_token_id").ok_or_else(|| {
            ModelError::Config(format!(
                "vision_start_token_id is missing in {}",
                path.display()
            ))
        })?;
        let mut eos_token_ids = ids_of(v.get("eos_token_id"));
        if eos_token_ids.is_empty() {
            eos_token_ids = ids_of(text_v.get("eos_token_id"));
        }
        let cfg = Self {
            text,
            vision,
            image_token_id,
            video_token_id: id("video_token_id"),
            vision_start_token_id,
            vision_end_token_id: id("vision_end_token_id"),
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let t = &self.text;
        let bad = |m: String| Err(ModelError::Config(m));
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if t.mrope_section.iter().sum::<usize>() * 2 != t.head_dim() {
            return bad(format!(
                "mrope_section {:?} does not add up to head_dim/2 = {}",
                t.mrope_section,
                t.head_dim() / 2
            ));
        }
        let v = &self.vision;
        if v.num_heads == 0
            || !v.embed_dim.is_multiple_of(v.num_heads)
            || !v.head_dim().is_multiple_of(4)
        {
            return bad(format!(
                "vision embed_dim {} / num_heads {} must give a head_dim divisible by 4",
                v.embed_dim, v.num_heads
            ));
        }
        if v.hidden_size != t.hidden_size {
            return bad(format!(
                "vision hidden_size {} differs from the text hidden_size {}",
                v.hidden_size, t.hidden_size
            ));
        }
        if v.spatial_merge_size == 0 || v.patch_size == 0 || v.temporal_patch_size == 0 {
            return bad("vision patch/merge sizes must be positive".into());
        }
        if let VisionArch::Qwen25Vl {
            window_size,
            fullatt_block_indexes,
            ..
        } = &v.arch
        {
            if v.window_merged() == Some(0) {
                return bad(format!(
                    "vision window_size {window_size} is smaller than one merged patch ({} px)",
                    v.patch_size * v.spatial_merge_size
                ));
            }
            if let Some(i) = fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
                return bad(format!(
                    "fullatt_block_indexes names block {i} of a {}-block vision tower",
                    v.depth
                ));
            }
        }
        Ok(())
    }

    /// The real UI-TARS-2B-SFT (Qwen2-VL-2B) shape with the Qwen special-token ids; used by
    /// the benchmark with random weights.
    pub fn ui_tars_2b() -> Self {
        Self {
            text: TextConfig {
                vocab_size: 151_936,
                hidden_size: 1536,
                intermediate_size: 8960,
                num_hidden_layers: 28,
                num_attention_heads: 12,
                num_key_value_heads: 2,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: vec![16, 24, 24],
                tie_word_embeddings: true,
            },
            vision: VisionConfig {
                arch: VisionArch::Qwen2Vl,
                depth: 32,
                embed_dim: 1280,
                hidden_size: 1536,
                num_heads: 16,
                mlp_ratio: 4.0,
                in_channels: 3,
                patch_size: 14,
                spatial_merge_size: 2,
                temporal_patch_size: 2,
                rope_theta: 10_000.0,
                layer_norm_eps: 1e-6,
            },
            image_token_id: 151_655,
            video_token_id: Some(151_656),
            vision_start_token_id: 151_652,
            vision_end_token_id: Some(151_653),
            eos_token_ids: vec![151_645],
        }
    }
}

impl Qwen2VlConfig {
    /// The UI-TARS-1.5-7B (Qwen2.5-VL-7B) shape with the Qwen special-token ids; used by the
    /// benchmark and memory estimates with random weights.
    pub fn ui_tars_15_7b() -> Self {
        Self {
            text: TextConfig {
                vocab_size: 152_064,
                hidden_size: 3584,
                intermediate_size: 18_944,
                num_hidden_layers: 28,
                num_attention_heads: 28,
                num_key_value_heads: 4,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: vec![16, 24, 24],
                tie_word_embeddings: false,
            },
            vision: VisionConfig {
                arch: VisionArch::Qwen25Vl {
                    intermediate_size: 3420,
                    window_size: 112,
                    fullatt_block_indexes: vec![7, 15, 23, 31],
                },
                depth: 32,
                embed_dim: 1280,
                hidden_size: 3584,
                num_heads: 16,
                mlp_ratio: 4.0,
                in_channels: 3,
                patch_size: 14,
                spatial_merge_size: 2,
                temporal_patch_size: 2,
                rope_theta: 10_000.0,
                layer_norm_eps: 1e-6,
            },
            image_token_id: 151_655,
            video_token_id: Some(151_656),
            vision_start_token_id: 151_652,
            vision_end_token_id: Some(151_653),
            eos_token_ids: vec![151_645],
        }
    }

    /// A published shape by name, for benchmarks and estimates with random weights: `2b`
    /// (UI-TARS-2B, Qwen2-VL-2B) or `1.5-7b` (UI-TARS-1.5-7B, Qwen2.5-VL-7B).
    pub fn named_shape(name: &str) -> Option<Self> {
        match name {
            "2b" => Some(Self::ui_tars_2b()),
            "1.5-7b" => Some(Self::ui_tars_15_7b()),
            _ => None,
        }
    }

    /// Whether this is a Qwen2.5-VL (UI-TARS-1.5) model.
    pub fn is_qwen25(&self) -> bool {
        matches!(self.vision.arch, VisionArch::Qwen25Vl { .. })
    }
}

/// `preprocessor_config.json` (the fields `Qwen2VLImageProcessor` uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessorConfig {
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f32,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }
}

impl PreprocessorConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = read_json(path)?;
        Ok(Self::from_value(&v))
    }

    /// Reads `min_pixels`/`max_pixels` at the top level (older files) or from
    /// `size.{shortest_edge,longest_edge}` (transformers 5.x); missing fields take the defaults.
    pub fn from_value(v: &Value) -> Self {
        let d = Self::default();
        let size = v.get("size");
        let u = |key: &str| v.get(key).and_then(Value::as_u64);
        let arr3 = |key: &str, def: [f32; 3]| {
            v.get(key)
                .and_then(Value::as_array)
                .filter(|a| a.len() == 3)
                .map(|a| {
                    let f = |i: usize| a[i].as_f64().unwrap_or(f64::from(def[i])) as f32;
                    [f(0), f(1), f(2)]
                })
                .unwrap_or(def)
        };
        let b = |key: &str, def: bool| v.get(key).and_then(Value::as_bool).unwrap_or(def);
        Self {
            min_pixels: u("min_pixels")
                .or_else(|| {
                    size.and_then(|s| s.get("shortest_edge"))
                        .and_then(Value::as_u64)
                })
                .unwrap_or(d.min_pixels),
            max_pixels: u("max_pixels")
                .or_else(|| {
                    size.and_then(|s| s.get("longest_edge"))
                        .and_then(Value::as_u64)
                })
                .unwrap_or(d.max_pixels),
            patch_size: u("patch_size").map_or(d.patch_size, |x| x as usize),
            merge_size: u("merge_size").map_or(d.merge_size, |x| x as usize),
            temporal_patch_size: u("temporal_patch_size")
                .map_or(d.temporal_patch_size, |x| x as usize),
            image_mean: arr3("image_mean", d.image_mean),
            image_std: arr3("image_std", d.image_std),
            rescale_factor: v
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .map_or(d.rescale_factor, |x| x as f32),
            do_resize: b("do_resize", true),
            do_rescale: b("do_rescale", true),
            do_normalize: b("do_normalize", true),
        }
    }
}

/// `generation_config.json`: the stop ids and default sampling settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = read_json(path)?;
        Ok(Self {
            eos_token_ids: ids_of(v.get("eos_token_id")),
            pad_token_id: v
                .get("pad_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            temperature: v.get("temperature").and_then(Value::as_f64),
            top_p: v.get("top_p").and_then(Value::as_f64),
            top_k: v.get("top_k").and_then(Value::as_i64),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// UI-TARS-2B-SFT's config.json (the older flat spelling), abridged to the fields read.
    const FLAT: &str = r#"{
      "architectures": ["Qwen2VLForConditionalGeneration"],
      "bos_token_id": 151643, "eos_token_id": 151645,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653,
      "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
      "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960,
      "max_position_embeddings": 32768, "model_type": "qwen2_vl",
      "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": true,
      "torch_dtype": "bfloat16",
      "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
        "in_chans": 3, "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vocab_size": 151936
    }"#;

    #[test]
    fn flat_ui_tars_config_gives_the_2b_shape() {
        let v: Value = serde_json::from_str(FLAT).unwrap();
        let cfg = Qwen2VlConfig::from_value(&v, Path::new("config.json")).unwrap();
        assert_eq!(cfg, Qwen2VlConfig::ui_tars_2b());
        assert_eq!(cfg.text.head_dim(), 128);
        assert_eq!(cfg.vision.patch_dim(), 1176);
        assert_eq!(cfg.vision.mlp_dim(), 5120);
    }

    #[test]
    fn nested_transformers5_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models/tiny-qwen2vl/config.json");
        let cfg = Qwen2VlConfig::from_file(&path).unwrap();
        assert_eq!(cfg.text.hidden_size, 64);
        assert_eq!(cfg.text.mrope_section, vec![2, 3, 3]);
        assert_eq!(cfg.vision.embed_dim, 32);
        assert_eq!(cfg.image_token_id, 412);
        assert_eq!(cfg.vision_start_token_id, 409);
        assert_eq!(cfg.eos_token_ids, vec![402]);
    }

    #[test]
    fn other_model_types_are_rejected_by_name() {
        let v: Value = serde_json::from_str(&FLAT.replace("\"qwen2_vl\"", "\"qwen3_vl\"")).unwrap();
        let err = Qwen2VlConfig::from_value(&v, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("qwen3_vl"), "{err}");
    }

    /// UI-TARS-1.5-7B's config.json (the flat spelling Qwen2.5-VL-7B-Instruct ships), abridged.
    const FLAT_15: &str = r#"{
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "bos_token_id": 151643, "eos_token_id": 151645,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653,
      "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
      "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
      "max_position_embeddings": 128000, "max_window_layers": 28, "model_type": "qwen2_5_vl",
      "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_sliding_window": false,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
        "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vocab_size": 152064
    }"#;

    #[test]
    fn flat_ui_tars_15_config_gives_the_7b_shape() {
        let v: Value = serde_json::from_str(FLAT_15).unwrap();
        let cfg = Qwen2VlConfig::from_value(&v, Path::new("config.json")).unwrap();
        assert_eq!(cfg, Qwen2VlConfig::ui_tars_15_7b());
        assert_eq!(Qwen2VlConfig::named_shape("1.5-7b"), Some(cfg.clone()));
        assert_eq!(
            Qwen2VlConfig::named_shape("2b"),
            Some(Qwen2VlConfig::ui_tars_2b())
        );
        assert!(cfg.is_qwen25());
        assert_eq!(cfg.vision.mlp_dim(), 3420);
        assert_eq!(cfg.vision.window_merged(), Some(4));
        assert!(cfg.vision.windowed_block(0) && !cfg.vision.windowed_block(7));
        // A Qwen2-VL activation in a Qwen2.5-VL config is refused by name.
        let bad: Value = serde_json::from_str(&FLAT_15.replace(
            "\"hidden_act\": \"silu\", \"hidden_size\": 1280",
            "\"hidden_act\": \"quick_gelu\", \"hidden_size\": 1280",
        ))
        .unwrap();
        let err = Qwen2VlConfig::from_value(&bad, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("quick_gelu"), "{err}");
    }

    #[test]
    fn nested_transformers5_qwen25_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models/tiny-qwen25vl/config.json");
        let cfg = Qwen2VlConfig::from_file(&path).unwrap();
        assert_eq!(cfg.vision.embed_dim, 32);
        assert_eq!(cfg.vision.hidden_size, 64);
        assert_eq!(
            cfg.vision.arch,
            VisionArch::Qwen25Vl {
                intermediate_size: 48,
                window_size: 56,
                fullatt_block_indexes: vec![1],
            }
        );
        assert!(!cfg.text.tie_word_embeddings);
    }

    #[test]
    fn preprocessor_sizes_in_both_spellings() {
        let old: Value =
            serde_json::from_str(r#"{"min_pixels": 3136, "max_pixels": 2116800}"#).unwrap();
        let p = PreprocessorConfig::from_value(&old);
        assert_eq!((p.min_pixels, p.max_pixels), (3136, 2_116_800));
        let new: Value =
            serde_json::from_str(r#"{"size": {"shortest_edge": 100, "longest_edge": 200}}"#)
                .unwrap();
        let p = PreprocessorConfig::from_value(&new);
        assert_eq!((p.min_pixels, p.max_pixels), (100, 200));
    }
}

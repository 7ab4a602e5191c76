//! Shared helpers of the integration tests: the tiny fixture model and its golden outputs
//! (made by `fixtures/scripts/make_tiny_qwen2vl.py` with HF transformers).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models")
}

pub fn model_dir() -> PathBuf {
    fixtures().join("tiny-qwen2vl")
}

pub fn golden_dir() -> PathBuf {
    fixtures().join("tiny-qwen2vl-golden")
}

pub fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(golden_dir().join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

pub fn case_tensors(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        golden_dir().join(format!("{case}.safetensors")),
        &Device::Cpu,
    )
    .expect("golden tensors")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn grids(v: &serde_json::Value) -> Vec<[usize; 3]> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|g| {
            let g = g.as_array().expect("grid");
            [0, 1, 2].map(|i| g[i].as_u64().expect("dim") as usize)
        })
        .collect()
}

/// `max |a - b|` over all elements, in f32 (any float dtypes, same shape).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    (f(a) - f(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Elementwise `|a - b| <= rtol * |b| + atol`; returns the worst relative error seen.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f32, atol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let err = (a - b).abs();
        assert!(
            err <= rtol * b.abs() + atol,
            "{what}: element {i}: got {a}, want {b} (|diff| {err})"
        );
        worst = worst.max(err / b.abs().max(1e-6));
    }
    worst
}

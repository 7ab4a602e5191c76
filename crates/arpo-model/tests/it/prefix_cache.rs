//! Automatic prefix caching against generation without it: a multi-turn episode whose every
//! turn resends the whole history (as a stateless client does) gives the same tokens and
//! log-probs with the cache as without, while the cache serves the shared prefix and the
//! screenshots already seen. Both tiny models (Qwen2-VL, and Qwen2.5-VL's windowed vision).

use crate::common::*;
use arpo_core::protocol::{PromptConfig, build_messages};
use arpo_core::{AgentContext, SamplingParams, Screenshot};
use arpo_model::prefix_cache::BLOCK_TOKENS;
use arpo_model::{Generation, UiTars};
use candle_core::{DType, Device};

const IMAGES: [&str; 4] = [
    "a_56x84.png",
    "b_112x56.png",
    "c_101x75.png",
    "d_300x200.png",
];

fn screenshot(name: &str) -> Screenshot {
    let bytes = std::fs::read(golden_dir().join("images").join(name)).unwrap();
    let img = arpo_model::processor::decode_image(&bytes).unwrap();
    Screenshot::new(bytes, img.width(), img.height())
}

fn load(dir: &str, cache_bytes: usize) -> UiTars {
    let m = UiTars::load(
        fixtures().join(dir).to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    m.model.set_prefix_cache_budget(cache_bytes);
    m
}

fn generate(m: &UiTars, contexts: &[AgentContext], prompt: &PromptConfig) -> Vec<Generation> {
    let requests: Vec<_> = contexts
        .iter()
        .map(|c| m.prepare(&build_messages(c, prompt)).unwrap())
        .collect();
    let sampling = SamplingParams {
        temperature: 1.0,
        max_tokens: 20,
        seed: Some(11),
        ..SamplingParams::default()
    };
    m.model
        .generate(&requests, &sampling, &m.stop_ids)
        .unwrap()
        .0
}

fn assert_same(what: &str, got: &Generation, want: &Generation) {
    assert_eq!(got.token_ids, want.token_ids, "{what}: tokens");
    for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
        assert!((a - b).abs() <= 1e-5, "{what}: logprob {a} cached vs {b}");
    }
}

/// Turns of one episode (screenshots 0..=turn, the answers fed back as history), with
/// `limit_images` 2: from the third turn on the oldest screenshot leaves the prompt, so the
/// prefix changes right after the instruction and only the system prompt and instruction
/// blocks, and the kept screenshot's features, can be reused.
fn episode(dir: &str) {
    let cached = load(dir, 64 << 20);
    let plain = load(dir, 0);
    let prompt = PromptConfig {
        limit_images: 2,
        ..PromptConfig::default()
    };
    let mut context = AgentContext {
        instruction: "Open the file menu and save the document".into(),
        screenshots: Vec::new(),
        responses: Vec::new(),
    };
    let mut previous_prompt = 0;
    for (turn, name) in IMAGES.iter().enumerate() {
        context.screenshots.push(screenshot(name));
        let before = cached.model.prefix_cache.stats();
        let got = generate(&cached, std::slice::from_ref(&context), &prompt);
        let want = generate(&plain, std::slice::from_ref(&context), &prompt);
        let after = cached.model.prefix_cache.stats();
        let what = format!("{dir} turn {turn}");
        assert_same(&what, &got[0], &want[0]);
        assert_eq!(
            want[0].cached_tokens, 0,
            "{what}: the uncached model reuses nothing"
        );
        let prompt_len = cached
            .prepare(&build_messages(&context, &prompt))
            .unwrap()
            .input_ids
            .len();
        match turn {
            0 => assert_eq!(got[0].cached_tokens, 0, "{what}"),
            // The previous prompt is a prefix of this one: all its full blocks are reused.
            1 => {
                assert!(
                    got[0].cached_tokens >= previous_prompt / BLOCK_TOKENS * BLOCK_TOKENS,
                    "{what}: {} cached of a {previous_prompt}-token previous prompt",
                    got[0].cached_tokens
                );
            }
            // The window slid: the prompt differs from the first screenshot on, the kept
            // screenshot is past the reused prefix and its features come from the cache.
            _ => {
                assert!(got[0].cached_tokens > 0, "{what}: system prompt reused");
                assert!(got[0].cached_tokens < previous_prompt, "{what}");
                assert_eq!(after.image_queries - before.image_queries, 2, "{what}");
            }
        }
        // Every screenshot goes through the vision tower once, on the turn it arrives.
        let encoded =
            (after.image_queries - before.image_queries) - (after.image_hits - before.image_hits);
        assert_eq!(encoded, 1, "{what}: images encoded");
        assert!(
            got[0].cached_tokens < prompt_len,
            "{what}: the last token is computed"
        );
        previous_prompt = prompt_len;
        let answer = cached.tokenizer.decode(&got[0].token_ids).unwrap();
        context.responses.push(answer);
    }
    // A batch mixing turns of this episode and a new one (rows with different cached prefixes
    // and paddings): as the same batch uncached (the batch shares one sampler).
    let other = AgentContext {
        instruction: "Close the window".into(),
        screenshots: vec![screenshot(IMAGES[3]), screenshot(IMAGES[0])],
        responses: vec!["Thought: x\nAction: wait()".into()],
    };
    let mut early = context.clone();
    early.screenshots.truncate(2);
    early.responses.truncate(1);
    let batch = [early, context.clone(), other];
    let got = generate(&cached, &batch, &prompt);
    assert!(got[0].cached_tokens > 0 && got[1].cached_tokens > 0);
    let want = generate(&plain, &batch, &prompt);
    for i in 0..batch.len() {
        assert_same(&format!("{dir} batch row {i}"), &got[i], &want[i]);
    }
    // The same batch again: everything but each prompt's last block comes from the cache.
    let again = generate(&cached, &batch, &prompt);
    for (i, (a, b)) in again.iter().zip(&got).enumerate() {
        assert_same(&format!("{dir} repeated row {i}"), a, b);
        assert!(a.cached_tokens >= b.cached_tokens);
    }
    // Cleared (the weights changed): nothing is reused.
    cached.model.prefix_cache.clear();
    let fresh = generate(&cached, &batch[..1], &prompt);
    assert_eq!(fresh[0].cached_tokens, 0);
}

#[test]
fn cached_multi_turn_episode_equals_uncached_qwen2vl() {
    episode("tiny-qwen2vl");
}

#[test]
fn cached_multi_turn_episode_equals_uncached_qwen25vl() {
    episode("tiny-qwen25vl");
}

/// A budget too small for the episode evicts, and what remains is still exact.
#[test]
fn a_small_budget_evicts_and_stays_exact() {
    let cached = load("tiny-qwen2vl", 200_000);
    let plain = load("tiny-qwen2vl", 0);
    let prompt = PromptConfig::default();
    let mut context = AgentContext {
        instruction: "Type hello".into(),
        screenshots: Vec::new(),
        responses: Vec::new(),
    };
    for name in IMAGES {
        context.screenshots.push(screenshot(name));
        let got = generate(&cached, std::slice::from_ref(&context), &prompt);
        let want = generate(&plain, std::slice::from_ref(&context), &prompt);
        assert_same("small budget", &got[0], &want[0]);
        context
            .responses
            .push(cached.tokenizer.decode(&got[0].token_ids).unwrap());
    }
    let s = cached.model.prefix_cache.stats();
    assert!(s.evictions > 0, "{s:?}");
    assert!(s.bytes <= 200_000, "{s:?}");
}

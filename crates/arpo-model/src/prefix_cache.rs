//! Automatic prefix caching: the keys and values of prompt blocks and the vision features of
//! images, kept between `generate` calls and reused by any later prompt that starts the same.
//!
//! A multi-turn episode sends its whole history every turn (the seed's server and every
//! OpenAI-style client are stateless), so without a cache every turn encodes every screenshot of
//! the history again and prefills the whole context again. Here, as in vLLM's automatic prefix
//! caching, a prompt is cut into blocks of [`BLOCK_TOKENS`] tokens; each full block is keyed by
//! a hash chain over the token ids of the block and of everything before it, and over the
//! contents of every image whose placeholder tokens the block holds. A block's keys and values
//! depend only on what comes before it (causal attention; M-RoPE positions follow the tokens and
//! image grids before them), so a block found under its key is exactly the block the prompt
//! would compute: only a true prefix is ever reused. Vision features are cached per image
//! content (the hash of its preprocessed pixels and grid), so a screenshot that stays in the
//! history is encoded once even when the prefix before it changes (a dropped older screenshot).
//!
//! Entries are evicted least-recently-used within a byte budget
//! (`worker.rollout.prefix_cache_mib`, `serve --prefix-cache-mib`); a budget of 0 turns caching
//! off. The cache belongs to one set of weights: [`PrefixCache::clear`] must follow any change
//! of them (the trainer clears it after every optimizer step).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

/// Tokens per cached block (vLLM's default block size).
pub const BLOCK_TOKENS: usize = 16;

/// A content hash.
pub type Key = [u8; 32];

/// What a cache holds and how often it answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompts looked up.
    pub queries: u64,
    /// Tokens of those prompts.
    pub prompt_tokens: u64,
    /// Of those, tokens whose keys and values came from the cache.
    pub cached_tokens: u64,
    /// Images whose features were needed.
    pub image_queries: u64,
    /// Of those, images whose features came from the cache.
    pub image_hits: u64,
    /// Entries evicted to stay within the budget.
    pub evictions: u64,
    /// Bytes held now, and the budget.
    pub bytes: usize,
    pub budget: usize,
    /// Blocks and images held now.
    pub blocks: usize,
    pub images: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Block,
    Image,
}

#[derive(Debug)]
struct Entry {
    value: Tensor,
    bytes: usize,
    tick: u64,
}

#[derive(Debug, Default)]
struct Inner {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<(Kind, Key), Entry>,
    /// Entries by last use (oldest first).
    lru: BTreeMap<u64, (Kind, Key)>,
    stats: PrefixCacheStats,
}

impl Inner {
    fn touch(&mut self, id: (Kind, Key)) -> Option<Tensor> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(&id)?;
        self.lru.remove(&entry.tick);
        entry.tick = tick;
        self.lru.insert(tick, id);
        Some(entry.value.clone())
    }

    fn insert(&mut self, id: (Kind, Key), value: Tensor) {
        if self.touch(id).is_some() {
            return;
        }
        let bytes = value.elem_count() * value.dtype().size_in_bytes();
        if bytes > self.budget {
            return;
        }
        self.evict_to(self.budget - bytes);
        self.tick += 1;
        self.lru.insert(self.tick, id);
        self.entries.insert(
            id,
            Entry {
                value,
                bytes,
                tick: self.tick,
            },
        );
        self.used += bytes;
    }

    /// Evicts least recently used entries until at most `limit` bytes are held.
    fn evict_to(&mut self, limit: usize) {
        while self.used > limit {
            let Some((_, oldest)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.used -= e.bytes;
                self.stats.evictions += 1;
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.lru.clear();
        self.used = 0;
    }
}

/// The block and image cache of one model (see the module docs). Shared by clones of the
/// model (they share its weights); thread-safe.
#[derive(Debug, Default)]
pub struct PrefixCache {
    inner: Mutex<Inner>,
}

impl PrefixCache {
    /// A cache holding at most `budget_bytes` (0: caching off).
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                budget: budget_bytes,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the budget allows caching at all.
    pub fn enabled(&self) -> bool {
        self.lock().budget > 0
    }

    /// Sets the budget, evicting the least recently used entries beyond it.
    pub fn set_budget(&self, budget_bytes: usize) {
        let mut inner = self.lock();
        inner.budget = budget_bytes;
        inner.evict_to(budget_bytes);
    }

    /// Drops every entry (the weights changed). Statistics are kept.
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn stats(&self) -> PrefixCacheStats {
        let inner = self.lock();
        let mut s = inner.stats;
        s.bytes = inner.used;
        s.budget = inner.budget;
        s.blocks = inner.entries.keys().filter(|k| k.0 == Kind::Block).count();
        s.images = inner.entries.len() - s.blocks;
        s
    }

    /// The cached blocks of the longest run of `keys` from the first one, in order.
    pub(crate) fn lookup_blocks(&self, keys: &[Key], prompt_tokens: usize) -> Vec<Tensor> {
        let mut inner = self.lock();
        let found = keys
            .iter()
            .take_while(|k| inner.entries.contains_key(&(Kind::Block, **k)))
            .count();
        // Touched last-first: a prefix's later blocks become older than its earlier ones, so
        // eviction takes a chain from its end and never strands a block behind a missing one.
        let mut blocks: Vec<Tensor> = keys[..found]
            .iter()
            .rev()
            .filter_map(|k| inner.touch((Kind::Block, *k)))
            .collect();
        blocks.reverse();
        inner.stats.queries += 1;
        inner.stats.prompt_tokens += prompt_tokens as u64;
        inner.stats.cached_tokens += (blocks.len() * BLOCK_TOKENS) as u64;
        blocks
    }

    /// Whether the block under `key` is held.
    pub(crate) fn has_block(&self, key: &Key) -> bool {
        self.lock().entries.contains_key(&(Kind::Block, *key))
    }

    pub(crate) fn insert_block(&self, key: Key, kv: Tensor) {
        self.lock().insert((Kind::Block, key), kv);
    }

    /// The cached features of the image under `key`.
    pub(crate) fn image(&self, key: &Key) -> Option<Tensor> {
        let mut inner = self.lock();
        inner.stats.image_queries += 1;
        let hit = inner.touch((Kind::Image, *key));
        if hit.is_some() {
            inner.stats.image_hits += 1;
        }
        hit
    }

    pub(crate) fn insert_image(&self, key: Key, features: Tensor) {
        self.lock().insert((Kind::Image, key), features);
    }
}

/// The content key of one preprocessed image: its grid and its pixel values.
pub fn image_key(pixels: &Tensor, grid: [usize; 3]) -> candle_core::Result<Key> {
    let mut h = Sha256::new();
    h.update(b"image");
    for g in grid {
        h.update((g as u64).to_le_bytes());
    }
    let values = pixels
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    h.update(&bytes);
    Ok(h.finalize().into())
}

/// The chain keys of the full blocks of `ids` (at most `max_blocks`): block `b`'s key hashes
/// block `b - 1`'s key, the block's token ids, and the key of every image with a placeholder
/// in the block. `image_of_token[i]` is the image (an index into `image_keys`) of placeholder
/// token `i`, `None` for text.
pub fn block_keys(
    ids: &[u32],
    image_of_token: &[Option<usize>],
    image_keys: &[Key],
    max_blocks: usize,
) -> Vec<Key> {
    let mut keys = Vec::with_capacity(max_blocks.min(ids.len() / BLOCK_TOKENS));
    let mut parent: Key = [0; 32];
    for (b, block) in ids.chunks_exact(BLOCK_TOKENS).enumerate().take(max_blocks) {
        let mut h = Sha256::new();
        h.update(parent);
        for &t in block {
            h.update(t.to_le_bytes());
        }
        let mut last = None;
        for i in b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS {
            if let Some(Some(img)) = image_of_token.get(i)
                && last != Some(*img)
            {
                if let Some(k) = image_keys.get(*img) {
                    h.update(k);
                }
                last = Some(*img);
            }
        }
        parent = h.finalize().into();
        keys.push(parent);
    }
    keys
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(n: usize) -> Tensor {
        Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn evicts_least_recently_used_within_the_budget() {
        let c = PrefixCache::new(3 * 40);
        for i in 0..3u8 {
            c.insert_block([i; 32], t(10));
        }
        // Using block 0 makes block 1 the oldest.
        assert_eq!(c.lookup_blocks(&[[0; 32]], 16).len(), 1);
        c.insert_block([3; 32], t(10));
        assert!(c.has_block(&[0; 32]) && !c.has_block(&[1; 32]));
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.stats().bytes, 120);
        // An entry larger than the budget is not kept, and evicts nothing.
        c.insert_block([9; 32], t(31));
        assert!(!c.has_block(&[9; 32]));
        assert_eq!(c.stats().blocks, 3);
        c.set_budget(40);
        assert_eq!(c.stats().blocks, 1);
        c.clear();
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn lookup_stops_at_the_first_missing_block() {
        let c = PrefixCache::new(1 << 20);
        c.insert_block([0; 32], t(4));
        c.insert_block([2; 32], t(4));
        assert_eq!(c.lookup_blocks(&[[0; 32], [1; 32], [2; 32]], 48).len(), 1);
        let s = c.stats();
        assert_eq!((s.queries, s.prompt_tokens, s.cached_tokens), (1, 48, 16));
    }

    #[test]
    fn block_keys_chain_over_tokens_and_images() {
        let ids: Vec<u32> = (0..40).collect();
        let none = vec![None; 40];
        let a = block_keys(&ids, &none, &[], usize::MAX);
        assert_eq!(a.len(), 2);
        // A change in block 0 changes block 1's key too; a change in block 1 only its own.
        let mut ids2 = ids.clone();
        ids2[3] = 99;
        let b = block_keys(&ids2, &none, &[], usize::MAX);
        assert!(a[0] != b[0] && a[1] != b[1]);
        let mut ids3 = ids.clone();
        ids3[20] = 99;
        let c = block_keys(&ids3, &none, &[], usize::MAX);
        assert!(a[0] == c[0] && a[1] != c[1]);
        // Same tokens, different image contents behind the placeholders: different keys.
        let mut imgs = none.clone();
        imgs[18] = Some(0);
        let x = block_keys(&ids, &imgs, &[[1; 32]], usize::MAX);
        let y = block_keys(&ids, &imgs, &[[2; 32]], usize::MAX);
        assert!(x[0] == y[0] && x[1] != y[1]);
        assert_eq!(block_keys(&ids, &none, &[], 1).len(), 1);
    }
}

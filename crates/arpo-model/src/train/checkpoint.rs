//! Checkpoint files: atomic, self-checking safetensors and HF-layout directories.
//!
//! - Every file is written to a temporary name in the same directory, synced, then renamed:
//!   a crash mid-save leaves the previous file (or none), never a half-written one.
//! - [`save_safetensors`] writes with the `safetensors` crate's serializer (so `transformers`,
//!   `peft` and vLLM read it), adding `{"format": "pt"}` and a CRC-32 of the data section to the
//!   header metadata (`arpo_crc32`). [`load_safetensors`] checks the structure and that
//!   checksum and refuses a damaged file with [`TrainError::Corrupt`]. Files without a checksum
//!   (from other tools) are structure-checked only.
//! - [`CheckpointDir`] assembles a whole directory under a temporary name and renames it into
//!   place at [`CheckpointDir::commit`].

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{Result, TrainError};

/// Header metadata key holding the CRC-32 (8 lowercase hex digits) of the data section.
pub const CRC_KEY: &str = "arpo_crc32";

/// Tokenizer and processor files copied into an HF-layout checkpoint when the source has them.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
];

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.to_path_buf();
    move |source| TrainError::Io {
        action,
        path,
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A temporary path next to `path`, unique to this process and call.
fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

fn sync_parent(path: &Path) {
    // Best effort: makes the rename durable on filesystems that need it.
    if let Some(parent) = path.parent()
        && let Ok(dir) = File::open(parent)
    {
        let _ = dir.sync_all();
    }
}

/// Writes `path` through a temporary file and a rename.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("writing", path)(e));
    }
    sync_parent(path);
    Ok(())
}

fn safetensors_dtype(dtype: DType) -> Result<safetensors::Dtype> {
    Ok(match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::U32 => safetensors::Dtype::U32,
        DType::I64 => safetensors::Dtype::I64,
        DType::U8 => safetensors::Dtype::U8,
        other => {
            return Err(TrainError::Config(format!(
                "cannot save dtype {other:?} to safetensors; convert to f32 first"
            )));
        }
    })
}

/// Little-endian bytes of a tensor, row-major.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    macro_rules! bytes {
        ($ty:ty) => {
            t.to_vec1::<$ty>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
    }
    Ok(match t.dtype() {
        DType::F32 => bytes!(f32),
        DType::F64 => bytes!(f64),
        DType::BF16 => bytes!(half::bf16),
        DType::F16 => bytes!(half::f16),
        DType::U32 => bytes!(u32),
        DType::I64 => bytes!(i64),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(TrainError::Config(format!(
                "cannot save dtype {other:?} to safetensors; convert to f32 first"
            )));
        }
    })
}

/// A tensor as the `safetensors` serializer sees it: its bytes are made (copied to the host) when
/// the serializer writes them, one tensor at a time, and hashed on the way.
struct Streamed<'a> {
    name: &'a str,
    tensor: &'a Tensor,
    dtype: safetensors::Dtype,
    written: &'a RefCell<Written>,
}

/// What the serializer has taken from the [`Streamed`] tensors so far.
#[derive(Default)]
struct Written {
    crc: crc32fast::Hasher,
    order: Vec<String>,
    failure: Option<TrainError>,
}

impl safetensors::View for Streamed<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut written = self.written.borrow_mut();
        written.order.push(self.name.to_owned());
        match tensor_bytes(self.tensor) {
            Ok(bytes) => {
                written.crc.update(&bytes);
                Cow::Owned(bytes)
            }
            // `View::data` cannot fail: keep the error; the file is dropped.
            Err(e) => {
                written.failure.get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()
    }
}

/// Saves `tensors` atomically with the `safetensors` serializer, with `metadata` plus
/// `format: pt` and the checksum in the header.
///
/// The serializer streams one tensor at a time to a temporary file; the CRC-32 of the data
/// section is taken as it goes and patched over a fixed-width placeholder in the header, then the
/// file is synced and renamed into place.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    const PLACEHOLDER: &str = "00000000";
    let mut meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    meta.insert("format".into(), "pt".into());
    meta.insert(CRC_KEY.into(), PLACEHOLDER.into());
    let written = RefCell::new(Written::default());
    let views = tensors
        .iter()
        .map(|(name, tensor)| {
            Ok((
                name.as_str(),
                Streamed {
                    name,
                    tensor,
                    dtype: safetensors_dtype(tensor.dtype())?,
                    written: &written,
                },
            ))
        })
        .collect::<Result<Vec<_>>>()?;

    let tmp = temp_sibling(path);
    let result = (|| {
        safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => io_err("writing", path)(source),
            other => TrainError::Config(format!(
                "safetensors cannot write {}: {other}",
                path.display()
            )),
        })?;
        let Written {
            crc,
            order,
            failure,
        } = written.take();
        if let Some(e) = failure {
            return Err(e);
        }
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp)
            .map_err(io_err("reopening", &tmp))?;
        // Checks the order the tensors were hashed in against the header's offsets.
        placeholder_position(&mut f, &tmp, &order, PLACEHOLDER)?;
        let metadata = sorted_metadata(&mut f, &tmp, &format!("{:08x}", crc.finalize()))?;
        (|| {
            f.seek(SeekFrom::Start(metadata.0))?;
            f.write_all(&metadata.1)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, path)
        })()
        .map_err(io_err("writing", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path);
    Ok(())
}

/// The header's `__metadata__` object rewritten with its keys sorted and the checksum filled in,
/// with its file offset. The serializer writes the metadata in hash-map order, so two saves of
/// the same weights would differ in their header bytes; sorted, a checkpoint's bytes depend on
/// its contents only (the crash tests compare final weights byte for byte). Same entries, same
/// JSON writer: the object keeps its length, and the rest of the file stays where it is.
fn sorted_metadata(f: &mut File, path: &Path, crc: &str) -> Result<(u64, Vec<u8>)> {
    f.seek(SeekFrom::Start(0))
        .map_err(io_err("reading", path))?;
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(io_err("reading", path))?;
    let header_len = usize::try_from(u64::from_le_bytes(len8))
        .map_err(|_| unexpected(path, "a header length that does not fit in memory"))?;
    let mut header = vec![0u8; header_len];
    f.read_exact(&mut header).map_err(io_err("reading", path))?;
    const KEY: &[u8] = b"\"__metadata__\":";
    let start = header
        .windows(KEY.len())
        .position(|w| w == KEY)
        .map(|i| i + KEY.len())
        .ok_or_else(|| unexpected(path, "a header without __metadata__"))?;
    let mut objects = serde_json::Deserializer::from_slice(&header[start..])
        .into_iter::<BTreeMap<String, String>>();
    let mut metadata = match objects.next() {
        Some(Ok(m)) => m,
        _ => {
            return Err(unexpected(
                path,
                "a __metadata__ that is not an object of strings",
            ));
        }
    };
    let end = start + objects.byte_offset();
    metadata.insert(CRC_KEY.into(), crc.into());
    let sorted = serde_json::to_vec(&metadata)
        .map_err(|e| unexpected(path, format!("metadata that does not serialize: {e}")))?;
    if sorted.len() != end - start {
        return Err(unexpected(
            path,
            format!(
                "a __metadata__ of {} bytes, rewritten as {} (the serializer's JSON changed)",
                end - start,
                sorted.len()
            ),
        ));
    }
    Ok((8 + start as u64, sorted))
}

/// The file offset of the checksum placeholder in the header the serializer wrote, after checking
/// that it wrote the tensors in the order they were hashed (the checksum covers the data section
/// in file order).
fn placeholder_position(
    f: &mut File,
    path: &Path,
    hashed_order: &[String],
    placeholder: &str,
) -> Result<u64> {
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(io_err("reading", path))?;
    let header_len = usize::try_from(u64::from_le_bytes(len8))
        .map_err(|_| unexpected(path, "a header length that does not fit in memory"))?;
    let mut header = vec![0u8; header_len];
    f.read_exact(&mut header).map_err(io_err("reading", path))?;
    let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| unexpected(path, format!("a header that is not valid json: {e}")))?;
    let offsets: HashMap<&str, (u64, u64)> = parsed
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(name, entry)| {
            let at = |i: usize| entry["data_offsets"][i].as_u64().unwrap_or(u64::MAX);
            (name.as_str(), (at(0), at(1)))
        })
        .collect();
    // A tensor of no bytes shares its offset with the next one and adds nothing to the checksum.
    let has_bytes = |name: &&str| offsets.get(name).is_none_or(|(start, end)| start != end);
    let mut in_file: Vec<(u64, &str)> = offsets
        .iter()
        .filter(|(name, _)| has_bytes(name))
        .map(|(name, (start, _))| (*start, *name))
        .collect();
    in_file.sort_unstable();
    let hashed = hashed_order.iter().map(String::as_str).filter(has_bytes);
    if !in_file.iter().map(|(_, name)| *name).eq(hashed) {
        return Err(unexpected(
            path,
            "the tensors in another order than it read them",
        ));
    }
    let needle = format!("\"{CRC_KEY}\":\"{placeholder}\"");
    let pos = find(&header, needle.as_bytes())
        .ok_or_else(|| unexpected(path, "a header without the checksum placeholder"))?;
    Ok((8 + pos + needle.len() - 1 - placeholder.len()) as u64)
}

/// The serializer did something [`save_safetensors`] does not expect (a crate update changed it).
fn unexpected(path: &Path, what: impl std::fmt::Display) -> TrainError {
    TrainError::Config(format!(
        "the safetensors serializer wrote {what} to {}: checkpoint saving needs fixing for this safetensors version",
        path.display()
    ))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a safetensors file after checking its structure and, when present, its checksum.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err("reading", path))?;
    verify_safetensors(path, &bytes)?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| corrupt(path, format!("safetensors refused it: {e}")))
}

/// Structure and checksum check of a whole safetensors file in memory.
fn verify_safetensors(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(corrupt(path, "shorter than the 8-byte header length"));
    };
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(len_bytes);
    let header_len = usize::try_from(u64::from_le_bytes(len8)).unwrap_or(usize::MAX);
    let data_start = 8usize.saturating_add(header_len);
    let Some(header) = bytes.get(8..data_start) else {
        return Err(corrupt(
            path,
            format!("header length {header_len} runs past the end"),
        ));
    };
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| corrupt(path, format!("header is not valid json: {e}")))?;
    let data = &bytes[data_start..];
    let mut end_max = 0u64;
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| corrupt(path, format!("tensor {name} has no data_offsets")))?;
        end_max = end_max.max(end);
    }
    if end_max != data.len() as u64 {
        return Err(corrupt(
            path,
            format!(
                "data section is {} bytes, the header describes {end_max}: truncated or padded",
                data.len()
            ),
        ));
    }
    let want = header
        .get("__metadata__")
        .and_then(|m| m.get(CRC_KEY))
        .and_then(|c| c.as_str());
    if let Some(want) = want {
        let got = format!("{:08x}", crc32fast::hash(data));
        if got != want {
            return Err(corrupt(
                path,
                format!("data checksum {got} differs from the recorded {want}"),
            ));
        }
    }
    Ok(())
}

/// A checkpoint directory assembled under a temporary name and renamed into place on commit.
#[derive(Debug)]
pub struct CheckpointDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl CheckpointDir {
    /// Starts a checkpoint that will become `dest`.
    pub fn begin(dest: &Path) -> Result<Self> {
        if let Some(parent) = dest.parent()
            && !parent.as_os_str().is_empty()
        {
            fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        let tmp = temp_sibling(dest);
        fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Path of `name` inside the directory being written.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Writes a checksummed safetensors file.
    pub fn write_safetensors(
        &self,
        name: &str,
        tensors: &BTreeMap<String, Tensor>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        save_safetensors(&self.path(name), tensors, metadata)
    }

    /// Writes a pretty-printed JSON file.
    pub fn write_json(&self, name: &str, value: &serde_json::Value) -> Result<()> {
        let text =
            serde_json::to_vec_pretty(value).map_err(|e| TrainError::Config(e.to_string()))?;
        self.write_bytes(name, &text)
    }

    /// Writes raw bytes.
    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.path(name), |f| f.write_all(bytes))
    }

    /// Copies the files of `names` that exist in `src_dir`; returns the names copied.
    pub fn copy_existing(&self, src_dir: &Path, names: &[&str]) -> Result<Vec<String>> {
        let mut copied = Vec::new();
        for name in names {
            let src = src_dir.join(name);
            if src.is_file() {
                fs::copy(&src, self.path(name)).map_err(io_err("copying", &src))?;
                copied.push((*name).to_string());
            }
        }
        Ok(copied)
    }

    /// Moves the finished directory into place, replacing an older one at the same path.
    pub fn commit(mut self) -> Result<PathBuf> {
        if let Ok(dir) = File::open(&self.tmp) {
            let _ = dir.sync_all();
        }
        let old = if self.dest.exists() {
            let old = temp_sibling(&self.dest);
            fs::rename(&self.dest, &old).map_err(io_err("moving aside", &self.dest))?;
            Some(old)
        } else {
            None
        };
        fs::rename(&self.tmp, &self.dest).map_err(io_err("renaming into", &self.dest))?;
        sync_parent(&self.dest);
        if let Some(old) = old {
            let _ = fs::remove_dir_all(old);
        }
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for CheckpointDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut m = BTreeMap::new();
        m.insert(
            "a.weight".to_string(),
            Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &dev).expect("t"),
        );
        m.insert(
            "b.bias".to_string(),
            Tensor::new(&[7u32, 8, 9], &dev).expect("t"),
        );
        m
    }

    #[test]
    fn round_trip_keeps_values_and_writes_standard_header() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("m.safetensors");
        save_safetensors(&p, &sample(), &BTreeMap::new()).expect("save");
        let back = load_safetensors(&p, &Device::Cpu).expect("load");
        let a: Vec<Vec<f32>> = back["a.weight"].to_vec2().expect("a");
        assert_eq!(a, vec![vec![1.5, -2.0], vec![0.25, 3.0]]);
        let b: Vec<u32> = back["b.bias"].to_vec1().expect("b");
        assert_eq!(b, vec![7, 8, 9]);
        // Byte layout by hand: header length, then JSON, then 16 bytes of f32 and 12 of u32.
        let bytes = fs::read(&p).expect("read");
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(bytes.len(), 8 + n + 16 + 12);
        assert_eq!(&bytes[8 + n..8 + n + 4], &1.5f32.to_le_bytes());
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
        assert_eq!(header["__metadata__"]["format"], "pt");
        assert_eq!(
            header["b.bias"]["data_offsets"],
            serde_json::json!([16, 28])
        );
        // CRC-32 (IEEE) of the data section, as zlib computes it.
        let crc = format!("{:08x}", crc32fast::hash(&bytes[8 + n..]));
        assert_eq!(header["__metadata__"][CRC_KEY], crc.as_str());
    }

    /// The same weights and metadata give the same file, byte for byte, however the serializer's
    /// hash map orders the metadata (several keys, many saves, each in a fresh map).
    #[test]
    fn the_same_weights_save_to_the_same_bytes() {
        let dev = Device::Cpu;
        let tensors = BTreeMap::from([
            (
                "a.weight".to_string(),
                Tensor::new(&[1.0f32, 2.0], &dev).expect("t"),
            ),
            ("b.bias".to_string(), Tensor::new(&[3u32], &dev).expect("t")),
        ]);
        let meta: BTreeMap<String, String> = (0..6)
            .map(|i| (format!("key{i}"), format!("value {i}")))
            .collect();
        let dir = tempfile::tempdir().expect("tmp");
        let mut files = Vec::new();
        for i in 0..8 {
            let p = dir.path().join(format!("m{i}.safetensors"));
            save_safetensors(&p, &tensors, &meta).expect("save");
            files.push(fs::read(&p).expect("read"));
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]), "saves differ");
        let (_, header) = safetensors::SafeTensors::read_metadata(&files[0]).expect("header");
        let m = header.metadata().as_ref().expect("metadata");
        assert_eq!(m.get("key3").map(String::as_str), Some("value 3"));
        assert_eq!(m.get(CRC_KEY).map(String::len), Some(8));
        load_safetensors(&dir.path().join("m0.safetensors"), &dev).expect("the CRC checks");
    }

    #[test]
    fn every_dtype_is_valid_safetensors_that_the_loader_reads_back() {
        let dev = Device::Cpu;
        let base = Tensor::new(&[[1.5f32, -2.0, 0.0], [0.25, 3.0, -7.5]], &dev).expect("t");
        let mut tensors = BTreeMap::new();
        for dtype in [
            DType::F32,
            DType::F64,
            DType::BF16,
            DType::F16,
            DType::U32,
            DType::I64,
            DType::U8,
        ] {
            let t = base.abs().expect("abs").to_dtype(dtype).expect("cast");
            tensors.insert(format!("{dtype:?}.weight"), t);
        }
        tensors.insert("scalar".into(), Tensor::new(2.5f32, &dev).expect("t"));
        tensors.insert(
            "empty".into(),
            Tensor::zeros((0, 4), DType::BF16, &dev).expect("t"),
        );
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("m.safetensors");
        save_safetensors(&p, &tensors, &meta).expect("save");

        // The crate's own reader accepts the layout and sees our metadata.
        let bytes = fs::read(&p).expect("read");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let (n, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
        let meta = header.metadata().as_ref().expect("metadata");
        assert_eq!(meta["format"], "pt");
        assert_eq!(meta["step"], "7");
        let crc = format!("{:08x}", crc32fast::hash(&bytes[8 + n..]));
        assert_eq!(meta[CRC_KEY], crc);
        assert_eq!(st.len(), tensors.len());

        let back = load_safetensors(&p, &Device::Cpu).expect("load");
        for (name, t) in &tensors {
            let got = &back[name];
            assert_eq!(got.dtype(), t.dtype(), "{name}");
            assert_eq!(got.dims(), t.dims(), "{name}");
            let view = st.tensor(name).expect("in file");
            assert_eq!(view.data(), tensor_bytes(t).expect("bytes"), "{name}");
        }
        // No temporary file is left next to it.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn unsupported_dtype_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("m.safetensors");
        let mut tensors = sample();
        let odd = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::I16))
            .expect("i16");
        tensors.insert("odd".into(), odd);
        let err = save_safetensors(&p, &tensors, &BTreeMap::new()).expect_err("refused");
        assert!(err.to_string().contains("convert to f32"), "{err}");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn flipped_data_byte_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("m.safetensors");
        save_safetensors(&p, &sample(), &BTreeMap::new()).expect("save");
        let mut bytes = fs::read(&p).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&p, &bytes).expect("write");
        let err = load_safetensors(&p, &Device::Cpu).expect_err("must refuse");
        assert!(matches!(err, TrainError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn truncated_file_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("m.safetensors");
        save_safetensors(&p, &sample(), &BTreeMap::new()).expect("save");
        let bytes = fs::read(&p).expect("read");
        for cut in [4, 20, bytes.len() - 3] {
            fs::write(&p, &bytes[..cut]).expect("write");
            let err = load_safetensors(&p, &Device::Cpu).expect_err("must refuse");
            assert!(
                matches!(err, TrainError::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn failed_write_leaves_previous_file_and_no_temp() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("f.json");
        write_atomic(&p, |f| f.write_all(b"old")).expect("first");
        let r = write_atomic(&p, |f| {
            f.write_all(b"partial")?;
            Err(std::io::Error::other("simulated crash"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p).expect("read"), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn checkpoint_dir_appears_only_on_commit_and_replaces_old() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("src");
        fs::create_dir_all(&src).expect("src");
        fs::write(src.join("tokenizer.json"), b"{}").expect("tok");
        let dest = dir.path().join("epoch_1");
        fs::create_dir_all(&dest).expect("old");
        fs::write(dest.join("stale.txt"), b"x").expect("stale");

        let ck = CheckpointDir::begin(&dest).expect("begin");
        ck.write_json("config.json", &serde_json::json!({"a": 1}))
            .expect("json");
        let copied = ck.copy_existing(&src, TOKENIZER_FILES).expect("copy");
        assert_eq!(copied, vec!["tokenizer.json".to_string()]);
        assert!(
            dest.join("stale.txt").exists(),
            "old checkpoint intact before commit"
        );
        ck.commit().expect("commit");
        assert!(dest.join("config.json").exists());
        assert!(dest.join("tokenizer.json").exists());
        assert!(!dest.join("stale.txt").exists());

        // An abandoned checkpoint leaves nothing behind.
        let ck = CheckpointDir::begin(&dir.path().join("epoch_2")).expect("begin");
        ck.write_bytes("x", b"1").expect("x");
        drop(ck);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}

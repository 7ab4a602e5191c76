//! TensorBoard event files: scalars and images, readable by TensorBoard and by `wandb sync
//! --sync-tensorboard`.
//!
//! An event file is a sequence of TFRecords, each `length: u64 LE, masked_crc32c(length): u32 LE,
//! data, masked_crc32c(data): u32 LE`, whose data is a serialized `tensorflow.Event` protobuf.
//! The first event holds `file_version = "brain.Event:2"`; each later one a `Summary` of
//! `Value`s (`tag` and `simple_value`, or `tag` and an encoded `Image`). The few protobuf fields
//! needed are encoded here by hand (field order and proto3 defaults as protobuf's own
//! serializer writes them: `tests/dashboard.rs` checks the bytes against TensorBoard's writer).
//!
//! The crates.io crates for this (`tensorboard-rs`, `tboard`) are unmaintained or pull in a
//! protobuf toolchain for three messages; this file is the whole format we need.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::DashboardError;

/// Appends events to one TensorBoard event file.
#[derive(Debug)]
pub struct TensorBoardWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TensorBoardWriter {
    /// A new event file in `dir` (created if missing), named as TensorBoard expects
    /// (`events.out.tfevents.<seconds>.<host>`), starting with the file-version event. Every
    /// call makes a new file: a resumed run adds one beside the old ones, and TensorBoard reads
    /// them all in order.
    pub fn create(dir: &Path) -> Result<Self, DashboardError> {
        let now = wall_time_now();
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            })
            .unwrap_or_else(|| "localhost".to_string());
        let mut name = format!("events.out.tfevents.{}.{host}", now as u64);
        // Two writers started within one second would share a name.
        let mut k = 1;
        while dir.join(&name).exists() {
            name = format!("events.out.tfevents.{}.{host}.{k}", now as u64);
            k += 1;
        }
        Self::create_file(&dir.join(name), now)
    }

    /// A new event file at exactly `path`, its file-version event stamped `wall_time` (seconds
    /// since the Unix epoch). For reproducible files; [`Self::create`] is the usual way.
    pub fn create_file(path: &Path, wall_time: f64) -> Result<Self, DashboardError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DashboardError::io(dir, e))?;
        }
        let file = File::create(path).map_err(|e| DashboardError::io(path, e))?;
        let mut w = Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        };
        let mut event = event_header(wall_time, 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One step's scalars (tag, value), stamped now, flushed so that a live TensorBoard sees
    /// them. Values are stored as f32, as TensorBoard's `simple_value` is.
    pub fn write_scalars<S: AsRef<str>>(
        &mut self,
        step: u64,
        scalars: &[(S, f64)],
    ) -> Result<(), DashboardError> {
        self.write_scalars_at(step, wall_time_now(), scalars)
    }

    /// [`Self::write_scalars`] with a given wall time.
    pub fn write_scalars_at<S: AsRef<str>>(
        &mut self,
        step: u64,
        wall_time: f64,
        scalars: &[(S, f64)],
    ) -> Result<(), DashboardError> {
        if scalars.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_ref().as_bytes());
            put_key(&mut v, 2, WIRE_FIXED32);
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &v);
        }
        self.write_summary(step, wall_time, &summary)
    }

    /// An image (PNG or JPEG bytes) under `tag`, e.g. a screenshot of an episode of the step.
    pub fn write_image(
        &mut self,
        step: u64,
        tag: &str,
        encoded: &[u8],
        width: u32,
        height: u32,
    ) -> Result<(), DashboardError> {
        self.write_image_at(step, wall_time_now(), tag, encoded, width, height)
    }

    /// [`Self::write_image`] with a given wall time.
    pub fn write_image_at(
        &mut self,
        step: u64,
        wall_time: f64,
        tag: &str,
        encoded: &[u8],
        width: u32,
        height: u32,
    ) -> Result<(), DashboardError> {
        let mut image = Vec::new();
        put_varint_field(&mut image, 1, u64::from(height));
        put_varint_field(&mut image, 2, u64::from(width));
        put_varint_field(&mut image, 3, 3); // colorspace: RGB
        put_bytes(&mut image, 4, encoded);
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_bytes(&mut v, 4, &image);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        self.write_summary(step, wall_time, &summary)
    }

    /// Marks a restart at `step` (a `SessionLog` START event): TensorBoard then drops the
    /// points of earlier files at `step` and after, so that a run resumed from a checkpoint
    /// shows each step once, as the resumed run computed it. Call it right after
    /// [`Self::create`] when resuming, with the first step the resumed run will write.
    pub fn write_session_start(&mut self, step: u64) -> Result<(), DashboardError> {
        self.write_session_start_at(step, wall_time_now())
    }

    /// [`Self::write_session_start`] with a given wall time.
    pub fn write_session_start_at(
        &mut self,
        step: u64,
        wall_time: f64,
    ) -> Result<(), DashboardError> {
        let mut event = event_header(wall_time, step);
        put_bytes(&mut event, 7, &[0x08, 0x01]); // session_log (7): SessionLog { status: START (1) }
        self.write_record(&event)?;
        self.flush()
    }

    /// The last screenshot of the best episode (highest reward, first on ties) of each of the
    /// first `max_groups` groups, as an image tagged `episodes/<task id>`.
    pub fn write_episode_images(
        &mut self,
        step: u64,
        groups: &[crate::RecordedGroup<'_>],
        max_groups: usize,
    ) -> Result<(), DashboardError> {
        for g in groups.iter().take(max_groups) {
            let best = g
                .episodes
                .iter()
                .fold(None::<&crate::RecordedEpisode<'_>>, |best, e| match best {
                    Some(b) if b.trajectory.reward() >= e.trajectory.reward() => Some(b),
                    _ => Some(e),
                });
            let Some(e) = best else { continue };
            let Some(turn) = e.trajectory.turns.last() else {
                continue;
            };
            let shot = &turn.screenshot;
            self.write_image(
                step,
                &format!("episodes/{}", e.trajectory.task_id),
                &shot.bytes,
                shot.width,
                shot.height,
            )?;
        }
        Ok(())
    }

    /// Pushes buffered events to the file.
    pub fn flush(&mut self) -> Result<(), DashboardError> {
        self.out
            .flush()
            .map_err(|e| DashboardError::io(&self.path, e))
    }

    fn write_summary(
        &mut self,
        step: u64,
        wall_time: f64,
        summary: &[u8],
    ) -> Result<(), DashboardError> {
        let mut event = event_header(wall_time, step);
        put_bytes(&mut event, 5, summary);
        self.write_record(&event)?;
        self.flush()
    }

    fn write_record(&mut self, data: &[u8]) -> Result<(), DashboardError> {
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out
            .write_all(&record)
            .map_err(|e| DashboardError::io(&self.path, e))
    }
}

/// Every number of a JSON object (e.g. a serialized `StepMetrics`) as `prefix/key` scalars,
/// nested objects as `prefix/key/inner`; booleans as 0/1; the `step` and `epoch` counters,
/// strings, arrays and nulls left out.
pub fn scalars_from_json(prefix: &str, value: &serde_json::Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    collect_scalars(prefix, value, &mut out, true);
    out
}

fn collect_scalars(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut Vec<(String, f64)>,
    top: bool,
) {
    use serde_json::Value;
    match value {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((prefix.to_string(), x));
            }
        }
        Value::Bool(b) => out.push((prefix.to_string(), f64::from(u8::from(*b)))),
        Value::Object(map) => {
            for (k, v) in map {
                if top && (k == "step" || k == "epoch") {
                    continue;
                }
                let tag = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}/{k}")
                };
                collect_scalars(&tag, v, out, false);
            }
        }
        _ => {}
    }
}

fn wall_time_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// `wall_time` (field 1, double) and `step` (field 2, int64), each left out at its proto3
/// default of zero, as protobuf's serializer does.
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    if wall_time != 0.0 {
        put_key(&mut event, 1, WIRE_FIXED64);
        event.extend_from_slice(&wall_time.to_le_bytes());
    }
    if step != 0 {
        put_varint_field(&mut event, 2, step);
    }
    event
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, WIRE_VARINT);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotate right by 15 and add a constant, so that a CRC of data that
/// itself holds CRCs stays well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // The CRC-32C check value (RFC 3720, B.4) and the iSCSI test vector of 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn varints_match_the_protobuf_encoding() {
        // 300 = 0b1_0010_1100 -> 0xAC 0x02 (protobuf's encoding guide).
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }

    #[test]
    fn scalars_skip_counters_and_text() {
        let v = serde_json::json!({"step": 4, "epoch": 1, "loss": 0.5, "end": "x",
            "val": {"success_rate": 0.25}, "ok": true, "none": null});
        let mut s = scalars_from_json("train", &v);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            s,
            vec![
                ("train/loss".to_string(), 0.5),
                ("train/ok".to_string(), 1.0),
                ("train/val/success_rate".to_string(), 0.25),
            ]
        );
    }
}

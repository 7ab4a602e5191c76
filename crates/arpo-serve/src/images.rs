//! Images of a request: `data:` URLs (and `file://` under an allowed directory), checked.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use arpo_core::{ImageFormat, Screenshot};
use base64::Engine as _;

use crate::error::ApiError;

/// What an image may be.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageLimits {
    /// Largest encoded size in bytes.
    pub max_bytes: usize,
    /// Largest width × height.
    pub max_pixels: u64,
    /// `file://` URLs are accepted only for files under this directory (off when `None`).
    pub allowed_local_media_path: Option<PathBuf>,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            // Qwen2-VL's max_pixels (16384 × 28 × 28).
            max_pixels: 16384 * 28 * 28,
            allowed_local_media_path: None,
        }
    }
}

fn image_error(message: String) -> ApiError {
    ApiError::invalid(message)
        .param("messages")
        .code("invalid_image")
}

/// Reads and checks the image an `image_url` names.
pub fn load_image_url(url: &str, limits: &ImageLimits) -> Result<Screenshot, ApiError> {
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err(image_error(
                "a data: url needs a comma before its payload: data:image/png;base64,<base64>"
                    .into(),
            ));
        };
        if !meta.ends_with(";base64") {
            return Err(image_error(format!(
                "only base64 data: urls are accepted, got data:{meta},...: use data:image/png;base64,<base64>"
            )));
        }
        // Base64 is 4 characters per 3 bytes: refuse before decoding what cannot fit.
        if payload.len() / 4 * 3 > limits.max_bytes + 3 {
            return Err(too_large(payload.len() / 4 * 3, limits));
        }
        base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| image_error(format!("the image's base64 payload does not decode: {e}")))?
    } else if let Some(path) = url.strip_prefix("file://") {
        read_local_file(Path::new(path), limits)?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(image_error(
            "remote image urls are not fetched by this server: send the image inline as data:image/png;base64,<base64>"
                .into(),
        ));
    } else {
        return Err(image_error(format!(
            "unsupported image url {:?}: send data:image/png;base64,<base64>",
            url.chars().take(40).collect::<String>()
        )));
    };
    check_image(bytes, limits)
}

fn too_large(bytes: usize, limits: &ImageLimits) -> ApiError {
    ApiError::invalid(format!(
        "the image is {bytes} bytes, more than the server's limit of {} (--max-image-bytes)",
        limits.max_bytes
    ))
    .param("messages")
    .code("image_too_large")
}

fn read_local_file(path: &Path, limits: &ImageLimits) -> Result<Vec<u8>, ApiError> {
    let Some(root) = &limits.allowed_local_media_path else {
        return Err(image_error(
            "file:// image urls are off: start the server with --allowed-local-media-path <dir>, or send data: urls".into(),
        ));
    };
    let denied = || {
        image_error(format!(
            "{} is not a readable file under the allowed media directory {}",
            path.display(),
            root.display()
        ))
    };
    let root = root.canonicalize().map_err(|_| denied())?;
    let file = path.canonicalize().map_err(|_| denied())?;
    if !file.starts_with(&root) || !file.is_file() {
        return Err(denied());
    }
    let len = std::fs::metadata(&file).map_err(|_| denied())?.len();
    if len > limits.max_bytes as u64 {
        return Err(too_large(len as usize, limits));
    }
    std::fs::read(&file).map_err(|_| denied())
}

/// Checks that `bytes` are a whole PNG or JPEG image within the limits.
pub fn check_image(bytes: Vec<u8>, limits: &ImageLimits) -> Result<Screenshot, ApiError> {
    if bytes.len() > limits.max_bytes {
        return Err(too_large(bytes.len(), limits));
    }
    let format = ImageFormat::sniff(&bytes).ok_or_else(|| {
        image_error("the image is neither a png nor a jpeg (by its first bytes)".into())
    })?;
    let image_format = match format {
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::Jpeg => image::ImageFormat::Jpeg,
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(&bytes), image_format);
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(image_limits);
    let (width, height) = image::ImageReader::with_format(Cursor::new(&bytes), image_format)
        .into_dimensions()
        .map_err(|e| image_error(format!("the {} image cannot be read: {e}", format.mime())))?;
    if width == 0 || height == 0 {
        return Err(image_error(format!(
            "the image is {width}x{height}: zero-sized images cannot be processed"
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(ApiError::invalid(format!(
            "the image is {width}x{height} = {pixels} pixels, more than the server's limit of {} (--max-image-pixels)",
            limits.max_pixels
        ))
        .param("messages")
        .code("image_too_large"));
    }
    // Decode it whole: a truncated or corrupt body must fail here, not in the model.
    reader
        .decode()
        .map_err(|e| image_error(format!("the {} image does not decode: {e}", format.mime())))?;
    Ok(Screenshot::new(bytes, width, height))
}

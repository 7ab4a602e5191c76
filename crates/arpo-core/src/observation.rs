//! What an agent sees: a screenshot, and whatever else an environment offers.

use serde::{Deserialize, Serialize};

/// An encoded screenshot (PNG or JPEG bytes) and its size in pixels.
///
/// The bytes are kept encoded: that is what environments produce and what a model server
/// receives; the model decodes them once, in its image processor. Serialized as base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Screenshot {
    #[serde(with = "crate::serde_base64")]
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Debug for Screenshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screenshot")
            .field("bytes", &format_args!("[{} bytes]", self.bytes.len()))
            .field("width", &self.width)
            .field("height", &self.height)
            .finish()
    }
}

impl Screenshot {
    pub fn new(bytes: Vec<u8>, width: u32, height: u32) -> Self {
        Self {
            bytes,
            width,
            height,
        }
    }

    /// The image format told by the leading magic bytes, if it is one we accept.
    pub fn format(&self) -> Option<ImageFormat> {
        ImageFormat::sniff(&self.bytes)
    }
}

/// Encodings a screenshot may arrive in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Png,
    Jpeg,
}

impl ImageFormat {
    /// Recognises PNG (`\x89PNG\r\n\x1a\n`) and JPEG (`\xff\xd8\xff`) by their magic bytes.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(Self::Jpeg)
        } else {
            None
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
        }
    }
}

/// One observation of the environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub screenshot: Screenshot,
    /// An accessibility tree, when the environment offers one (OSWorld's `/accessibility`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accessibility_tree: Option<String>,
}

impl Observation {
    pub fn from_screenshot(screenshot: Screenshot) -> Self {
        Self {
            screenshot,
            accessibility_tree: None,
        }
    }
}

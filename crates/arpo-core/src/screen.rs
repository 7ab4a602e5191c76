//! [`ScreenSize`]: the one way a screen size is written, parsed and checked.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A screen size in pixels, both sides at least 1.
///
/// Written `WIDTHxHEIGHT` on command lines (`1920x1080`, `X` accepted too) and as
/// `[width, height]` in configs.
///
/// ```
/// use arpo_core::ScreenSize;
///
/// let s: ScreenSize = "1920x1080".parse().unwrap();
/// assert_eq!((s.width, s.height), (1920, 1080));
/// assert_eq!(s.to_string(), "1920x1080");
/// assert!("0x1080".parse::<ScreenSize>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "[u32; 2]", into = "[u32; 2]")]
pub struct ScreenSize {
    pub width: u32,
    pub height: u32,
}

/// Why a screen size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (got {input:?}): write WIDTHxHEIGHT with both sides at least 1, like 1920x1080")]
pub struct ScreenSizeError {
    pub input: String,
    pub reason: String,
}

impl ScreenSize {
    /// A size with both sides at least 1.
    pub fn new(width: u32, height: u32) -> Result<Self, ScreenSizeError> {
        if width == 0 || height == 0 {
            return Err(ScreenSizeError {
                input: format!("{width}x{height}"),
                reason: "a screen side is zero".into(),
            });
        }
        Ok(Self { width, height })
    }

    /// `(width, height)`.
    pub fn pair(self) -> (u32, u32) {
        (self.width, self.height)
    }
}

impl fmt::Display for ScreenSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for ScreenSize {
    type Err = ScreenSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ScreenSizeError {
            input: s.to_owned(),
            reason,
        };
        let (w, h) = s
            .split_once(['x', 'X'])
            .ok_or_else(|| bad("no `x` between width and height".into()))?;
        let side = |name: &str, v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|e| bad(format!("the {name} {v:?} is not a whole number: {e}")))
        };
        let (w, h) = (side("width", w)?, side("height", h)?);
        Self::new(w, h).map_err(|e| bad(e.reason))
    }
}

impl TryFrom<[u32; 2]> for ScreenSize {
    type Error = ScreenSizeError;

    fn try_from([w, h]: [u32; 2]) -> Result<Self, Self::Error> {
        Self::new(w, h)
    }
}

impl From<ScreenSize> for [u32; 2] {
    fn from(s: ScreenSize) -> Self {
        [s.width, s.height]
    }
}

impl From<ScreenSize> for (u32, u32) {
    fn from(s: ScreenSize) -> Self {
        s.pair()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            "800X450".parse::<ScreenSize>().ok(),
            ScreenSize::new(800, 450).ok()
        );
        assert_eq!(
            " 8 x 4 ".parse::<ScreenSize>().map(ScreenSize::pair),
            Ok((8, 4))
        );
        for bad in [
            "", "big", "1920", "1920x", "x1080", "0x10", "10x0", "-1x5", "1.5x2",
        ] {
            assert!(bad.parse::<ScreenSize>().is_err(), "{bad:?} was accepted");
        }
        let err = "0x10".parse::<ScreenSize>().unwrap_err().to_string();
        assert!(err.contains("zero") && err.contains("\"0x10\""), "{err}");
    }

    #[test]
    fn serde_is_a_pair_and_refuses_zero() {
        let s: ScreenSize = serde_json::from_str("[1920, 1080]").unwrap();
        assert_eq!(s.pair(), (1920, 1080));
        assert_eq!(serde_json::to_string(&s).unwrap(), "[1920,1080]");
        assert!(serde_json::from_str::<ScreenSize>("[0, 1080]").is_err());
    }
}

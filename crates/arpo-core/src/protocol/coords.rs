//! The two coordinate conventions UI-TARS models write, and conversions to screen pixels.

use serde::{Deserialize, Serialize};

use super::resize::{ResizeError, smart_resize};
use crate::Point;

/// `min_pixels` the UI-TARS agents (OSWorld, ARPO, the `ui-tars` package) pass to `smart_resize`
/// when they turn absolute model coordinates back into screen pixels: 100·28·28.
pub const UI_TARS_MIN_PIXELS: u64 = 100 * 28 * 28;
/// `max_pixels` of the same: 16384·28·28.
pub const UI_TARS_MAX_PIXELS: u64 = 16384 * 28 * 28;
/// Qwen2-VL's resize factor (patch 14 × spatial merge 2).
pub const IMAGE_FACTOR: u32 = 28;

/// How the numbers a model writes in `start_box='(x,y)'` map to the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CoordinateSystem {
    /// Qwen2-VL models (UI-TARS-2B/7B-SFT/DPO): `x` and `y` run from 0 to 1000 across the screen.
    #[serde(rename = "relative")]
    Relative1000,
    /// Qwen2.5-VL models (UI-TARS-1.5): pixels of the smart-resized image the model saw.
    Absolute {
        resized_width: u32,
        resized_height: u32,
    },
}

impl CoordinateSystem {
    /// The absolute system of a model that saw an image of `width` x `height`, resized by
    /// `smart_resize` (factor 28) within `[min_pixels, max_pixels]`.
    ///
    /// ```
    /// use arpo_core::protocol::{CoordinateSystem, UI_TARS_MAX_PIXELS, UI_TARS_MIN_PIXELS};
    /// let c = CoordinateSystem::absolute_for_image(1920, 1080, UI_TARS_MIN_PIXELS, UI_TARS_MAX_PIXELS).unwrap();
    /// assert_eq!(c, CoordinateSystem::Absolute { resized_width: 1932, resized_height: 1092 });
    /// ```
    pub fn absolute_for_image(
        width: u32,
        height: u32,
        min_pixels: u64,
        max_pixels: u64,
    ) -> Result<Self, ResizeError> {
        let (resized_height, resized_width) =
            smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)?;
        Ok(Self::Absolute {
            resized_width,
            resized_height,
        })
    }

    /// [`Self::absolute_for_image`] with the bounds the UI-TARS agents use
    /// ([`UI_TARS_MIN_PIXELS`], [`UI_TARS_MAX_PIXELS`]).
    pub fn uitars_absolute(width: u32, height: u32) -> Result<Self, ResizeError> {
        Self::absolute_for_image(width, height, UI_TARS_MIN_PIXELS, UI_TARS_MAX_PIXELS)
    }

    /// The largest `x` and `y` a model may write (1000, or the resized image size).
    pub fn extent(&self) -> (f64, f64) {
        match *self {
            Self::Relative1000 => (1000.0, 1000.0),
            Self::Absolute {
                resized_width,
                resized_height,
            } => (f64::from(resized_width), f64::from(resized_height)),
        }
    }

    /// Model coordinates to screen pixels: `x / extent_x * screen_width` (no clamping; see
    /// [`crate::protocol::parse_response`] for what the parser does with values off the screen).
    pub fn to_screen(&self, x: f64, y: f64, screen_width: u32, screen_height: u32) -> Point {
        let (ex, ey) = self.extent();
        Point::new(
            x / ex * f64::from(screen_width),
            y / ey * f64::from(screen_height),
        )
    }

    /// Screen pixels to model coordinates (the inverse of [`Self::to_screen`]), unrounded.
    pub fn from_screen(&self, point: Point, screen_width: u32, screen_height: u32) -> (f64, f64) {
        let (ex, ey) = self.extent();
        (
            point.x / f64::from(screen_width.max(1)) * ex,
            point.y / f64::from(screen_height.max(1)) * ey,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_maps_thousandths_of_the_screen() {
        // 500/1000 * 1920 = 960, 300/1000 * 1080 = 324 (what the ui-tars package prints).
        let p = CoordinateSystem::Relative1000.to_screen(500.0, 300.0, 1920, 1080);
        assert_eq!((p.x, p.y), (960.0, 324.0));
        let back = CoordinateSystem::Relative1000.from_screen(p, 1920, 1080);
        assert_eq!(back, (500.0, 300.0));
    }

    #[test]
    fn absolute_uses_the_smart_resized_size() {
        let c = CoordinateSystem::uitars_absolute(1920, 1080).expect("1920x1080 resizes");
        // 966/1932 * 1920 = 960, 546/1092 * 1080 = 540.
        let p = c.to_screen(966.0, 546.0, 1920, 1080);
        assert_eq!((p.x, p.y), (960.0, 540.0));
    }
}

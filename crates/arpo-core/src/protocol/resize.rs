//! `smart_resize`: the image size Qwen2-VL-family processors resize a screenshot to.

/// Why a size cannot be smart-resized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    #[error("image size {width}x{height} is empty: both sides must be at least 1 pixel")]
    Empty { width: u32, height: u32 },
    #[error("image aspect ratio of {width}x{height} is 200 or more: Qwen2-VL refuses such images")]
    AspectRatio { width: u32, height: u32 },
    #[error("min_pixels ({min_pixels}) is greater than max_pixels ({max_pixels})")]
    Bounds { min_pixels: u64, max_pixels: u64 },
}

/// Qwen2-VL's `smart_resize`: returns `(height, width)`, both multiples of `factor`, with the
/// aspect ratio kept as closely as possible and the area within `[min_pixels, max_pixels]`.
///
/// Each side is first rounded to the nearest multiple of `factor` (Python's `round`, half to
/// even); if the area is above `max_pixels` both sides are scaled down by `sqrt(area / max)` and
/// floored to multiples of `factor`; if below `min_pixels`, scaled up and ceiled.
///
/// ```
/// use arpo_core::protocol::smart_resize;
/// // A 1920x1080 screenshot under ARPO's max_pixels (2116800) stays 1932x1092.
/// assert_eq!(smart_resize(1080, 1920, 28, 3136, 2_116_800).unwrap(), (1092, 1932));
/// ```
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), ResizeError> {
    if height == 0 || width == 0 {
        return Err(ResizeError::Empty { width, height });
    }
    if min_pixels > max_pixels {
        return Err(ResizeError::Bounds {
            min_pixels,
            max_pixels,
        });
    }
    let (h, w) = (f64::from(height), f64::from(width));
    if h.max(w) / h.min(w) >= 200.0 {
        return Err(ResizeError::AspectRatio { width, height });
    }
    let f = f64::from(factor);
    let round_even = |v: f64| {
        // Python's round(): ties go to the even neighbour.
        let r = v.round();
        if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
            r - v.signum()
        } else {
            r
        }
    };
    let mut h_bar = (round_even(h / f) * f).max(f);
    let mut w_bar = (round_even(w / f) * f).max(f);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = ((h / beta / f).floor() * f).max(f);
        w_bar = ((w / beta / f).floor() * f).max(f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as u32, w_bar as u32))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn values_from_the_python_reference() {
        // Computed with transformers' Qwen2VL smart_resize (factor 28, min 3136).
        assert_eq!(
            smart_resize(1080, 1920, 28, 3136, 12_845_056).unwrap(),
            (1092, 1932)
        );
        // 448x448 needs no resize.
        assert_eq!(
            smart_resize(448, 448, 28, 3136, 12_845_056).unwrap(),
            (448, 448)
        );
        // Too small: scaled up to reach min_pixels. sqrt(3136/100)=5.6 -> ceil(10*5.6/28)*28 = 56.
        assert_eq!(
            smart_resize(10, 10, 28, 3136, 12_845_056).unwrap(),
            (56, 56)
        );
        // Too large: 4000x3000 with max 1,003,520 -> beta = sqrt(12e6/1003520) = 3.458;
        // floor(3000/3.458/28)*28 = 840, floor(4000/3.458/28)*28 = 1148.
        assert_eq!(
            smart_resize(3000, 4000, 28, 3136, 1_003_520).unwrap(),
            (840, 1148)
        );
        // Ties round half to even like Python: 42/28 = 1.5 -> 2 -> 56; 70/28 = 2.5 -> 2 -> 56.
        assert_eq!(smart_resize(42, 70, 28, 0, u64::MAX).unwrap(), (56, 56));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            smart_resize(0, 10, 28, 3136, 100_000),
            Err(ResizeError::Empty { .. })
        ));
        assert!(matches!(
            smart_resize(10, 2000, 28, 3136, 100_000_000),
            Err(ResizeError::AspectRatio { .. })
        ));
    }
}

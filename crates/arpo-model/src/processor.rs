//! The Qwen2-VL image processor: smart resize, bicubic resampling, rescale, normalise, temporal
//! duplication and merge-block patch order, as `Qwen2VLImageProcessor` does it.

use arpo_core::Screenshot;
use arpo_core::protocol::smart_resize;
use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::config::PreprocessorConfig;
use crate::error::{ModelError, Result};

/// Images turned into model input.
#[derive(Debug, Clone)]
pub struct ProcessedImages {
    /// `[sum(t*h*w), 3*temporal*patch*patch]`, f32.
    pub pixel_values: Tensor,
    /// `(t, h, w)` in patches, per image.
    pub grid_thw: Vec<[usize; 3]>,
}

impl ProcessedImages {
    /// Image tokens (`<|image_pad|>`) each image takes in the prompt.
    pub fn tokens_per_image(&self, merge_size: usize) -> Vec<usize> {
        self.grid_thw
            .iter()
            .map(|g| g[0] * g[1] * g[2] / (merge_size * merge_size))
            .collect()
    }
}

/// `Qwen2VLImageProcessor` in Rust.
#[derive(Debug, Clone, Default)]
pub struct ImageProcessor {
    pub config: PreprocessorConfig,
}

/// Decodes a PNG/JPEG screenshot into RGB.
pub fn decode_screenshot(s: &Screenshot) -> Result<RgbImage> {
    decode_image(&s.bytes)
}

/// Decodes PNG/JPEG bytes into RGB.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| {
            ModelError::Image(format!(
                "cannot decode the image ({} bytes): {e}",
                bytes.len()
            ))
        })
}

impl ImageProcessor {
    pub fn new(config: PreprocessorConfig) -> Self {
        Self { config }
    }

    /// The `(height, width)` an image is resized to.
    pub fn target_size(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        let c = &self.config;
        let factor = (c.patch_size * c.merge_size) as u32;
        smart_resize(height, width, factor, c.min_pixels, c.max_pixels)
            .map_err(|e| ModelError::Image(e.to_string()))
    }

    /// Image tokens of an image of this size.
    pub fn num_image_tokens(&self, height: u32, width: u32) -> Result<usize> {
        let (h, w) = self.target_size(height, width)?;
        let p = self.config.patch_size * self.config.merge_size;
        Ok((h as usize / p) * (w as usize / p))
    }

    /// Preprocesses images into pixel values and grids, on `device`.
    pub fn preprocess(&self, images: &[RgbImage], device: &Device) -> Result<ProcessedImages> {
        let c = &self.config;
        let (p, m, tp) = (c.patch_size, c.merge_size, c.temporal_patch_size);
        let row = 3 * tp * p * p;
        let mut data: Vec<f32> = Vec::new();
        let mut grid_thw = Vec::with_capacity(images.len());
        for img in images {
            let (h, w) = if c.do_resize {
                self.target_size(img.height(), img.width())?
            } else {
                (img.height(), img.width())
            };
            let resized;
            let img = if (h, w) != (img.height(), img.width()) {
                resized = resize_bicubic(img, w, h);
                &resized
            } else {
                img
            };
            let (h, w) = (h as usize, w as usize);
            if h % (p * m) != 0 || w % (p * m) != 0 {
                return Err(ModelError::Image(format!(
                    "image size {w}x{h} is not a multiple of {}: enable do_resize",
                    p * m
                )));
            }
            // Channel planes of the normalised image.
            let raw = img.as_raw();
            let mut planes = vec![0f32; 3 * h * w];
            for ch in 0..3 {
                let (mean, std) = (c.image_mean[ch], c.image_std[ch]);
                for i in 0..h * w {
                    let mut v = f32::from(raw[i * 3 + ch]);
                    if c.do_rescale {
                        v *= c.rescale_factor;
                    }
                    if c.do_normalize {
                        v = (v - mean) / std;
                    }
                    planes[ch * h * w + i] = v;
                }
            }
            let (gh, gw) = (h / p, w / p);
            data.reserve(gh * gw * row);
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (py, px) = ((bh * m + mh) * p, (bw * m + mw) * p);
                            for ch in 0..3 {
                                // A still image is repeated along time.
                                for _t in 0..tp {
                                    for y in 0..p {
                                        let start = ch * h * w + (py + y) * w + px;
                                        data.extend_from_slice(&planes[start..start + p]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            grid_thw.push([1, gh, gw]);
        }
        let n = data.len() / row;
        Ok(ProcessedImages {
            pixel_values: Tensor::from_vec(data, (n, row), device)?,
            grid_thw,
        })
    }
}

/// PIL's bicubic filter (a = -0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `precompute_coeffs`: for each output pixel, the first input pixel and the fixed-point
/// weights (antialiased: the filter widens by the downscale factor).
fn coefficients(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i32>)> {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut out = Vec::with_capacity(out_size as usize);
    for xx in 0..out_size {
        let center = (f64::from(xx) + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) - xmin;
        let mut k: Vec<f64> = (0..xmax.max(0))
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            for v in &mut k {
                *v /= ww;
            }
        }
        let fixed = k
            .iter()
            .map(|&v| {
                let s = v * f64::from(1u32 << PRECISION_BITS);
                if s < 0.0 {
                    (s - 0.5) as i32
                } else {
                    (s + 0.5) as i32
                }
            })
            .collect();
        out.push((xmin as usize, fixed));
    }
    out
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Bicubic resize of an RGB image to `width` x `height`, the way PIL's `Image.resize(...,
/// BICUBIC)` does it on 8-bit images (separable, horizontal pass first, fixed-point weights,
/// rounding to 8 bits after each pass).
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = (img.width(), img.height());
    let src = img.as_raw();
    let horizontal = if width != iw {
        let coeffs = coefficients(iw, width);
        let mut out = vec![0u8; (width * ih * 3) as usize];
        for y in 0..ih as usize {
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        let v = src[(y * iw as usize + xmin + i) * 3 + ch];
                        ss += i64::from(v) * i64::from(w);
                    }
                    out[(y * width as usize + x) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    let vertical = if height != ih {
        let coeffs = coefficients(ih, height);
        let mut out = vec![0u8; (width * height * 3) as usize];
        let w = width as usize;
        for (y, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..w {
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kw) in k.iter().enumerate() {
                        let v = horizontal[((ymin + i) * w + x) * 3 + ch];
                        ss += i64::from(v) * i64::from(kw);
                    }
                    out[(y * w + x) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        horizontal
    };
    RgbImage::from_raw(width, height, vertical).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_filter_values() {
        // a = -0.5: f(0) = 1, f(1) = 0, f(0.5) = 0.5625, f(1.5) = -0.0625.
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert!((bicubic(0.5) - 0.5625).abs() < 1e-12);
        assert!((bicubic(1.5) + 0.0625).abs() < 1e-12);
        assert_eq!(bicubic(2.5), 0.0);
    }

    #[test]
    fn constant_image_stays_constant_through_resize() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 200, 77]));
        let out = resize_bicubic(&img, 56, 28);
        assert!(out.pixels().all(|p| p.0 == [10, 200, 77]));
    }

    #[test]
    fn patch_rows_follow_merge_block_order() {
        // 56x56 image whose red channel is the row-major patch index (4x4 patches of 14 px).
        let mut img = RgbImage::new(56, 56);
        for (x, y, p) in img.enumerate_pixels_mut() {
            p.0 = [((y / 14) * 4 + x / 14) as u8, 0, 0];
        }
        let proc = ImageProcessor::new(PreprocessorConfig {
            do_normalize: false,
            do_rescale: false,
            ..PreprocessorConfig::default()
        });
        let out = proc.preprocess(&[img], &Device::Cpu).unwrap();
        assert_eq!(out.grid_thw, vec![[1, 4, 4]]);
        let pv = out.pixel_values.to_vec2::<f32>().unwrap();
        let firsts: Vec<f32> = pv.iter().map(|r| r[0]).collect();
        // Merge blocks of 2x2 neighbours are contiguous.
        assert_eq!(
            firsts,
            vec![
                0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.
            ]
        );
        assert_eq!(out.tokens_per_image(2), vec![4]);
    }
}

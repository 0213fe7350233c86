//! Image bytes to an upright RGB8 raster, as transformers' `load_image` /
//! `convert_to_rgb` produce it: EXIF orientation applied, transparency
//! composited onto white with Pillow's `alpha_composite` arithmetic, grey
//! replicated to three channels. PNG, JPEG, WebP, GIF (first frame) and BMP.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::PixelBudget;
use crate::error::{EngineError, Result};

/// An interleaved RGB8 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Pillow refuses images over twice its `MAX_IMAGE_PIXELS` (89,478,485) as
/// decompression bombs; so do we.
const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// Decodes `bytes`, first charging the size its header declares to `budget`.
pub(crate) fn decode_rgb8(bytes: &[u8], budget: &mut PixelBudget) -> Result<Rgb8> {
    let bad = |e: &dyn std::fmt::Display| {
        EngineError::validation(format!("could not decode the image: {e}"))
    };
    if bytes.is_empty() {
        return Err(EngineError::validation(
            "could not decode the image: no data",
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(&e))?;
    if reader.format().is_none() {
        return Err(EngineError::validation(
            "could not decode the image: unknown or unsupported format (PNG, JPEG, WebP, GIF and BMP are supported)",
        ));
    }
    let is_jpeg = reader.format() == Some(image::ImageFormat::Jpeg);
    let mut limits = Limits::default();
    limits.max_alloc = Some(2 << 30);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| bad(&e))?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(EngineError::validation(format!(
            "image of {w}x{h} pixels is too large (at most {MAX_IMAGE_PIXELS} pixels)"
        )));
    }
    budget.charge("image", w as usize, h as usize, 1)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let libjpeg = match is_jpeg {
        true => super::jpeg::decode_rgb(bytes)?,
        false => None,
    };
    let mut img = match libjpeg {
        Some((w, h, data)) => image::RgbImage::from_raw(w as u32, h as u32, data)
            .map(DynamicImage::ImageRgb8)
            .ok_or_else(|| bad(&"JPEG size mismatch"))?,
        None => DynamicImage::from_decoder(decoder).map_err(|e| bad(&e))?,
    };
    img.apply_orientation(orientation);
    Ok(to_rgb8(img))
}

fn to_rgb8(img: DynamicImage) -> Rgb8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.into_rgba8();
        let mut out = Vec::with_capacity(width * height * 3);
        for px in rgba.as_raw().chunks_exact(4) {
            let a = px[3];
            out.push(over_white(px[0], a));
            out.push(over_white(px[1], a));
            out.push(over_white(px[2], a));
        }
        out
    } else {
        img.into_rgb8().into_raw()
    };
    Rgb8 {
        width,
        height,
        data,
    }
}

/// One channel of Pillow's `alpha_composite(white, src)` (AlphaComposite.c,
/// 7 extra bits of precision, rounded divisions by 255); checked against
/// Pillow for all 65,536 (value, alpha) pairs by scripts/make_media_fixtures.py.
#[inline]
pub(crate) fn over_white(c: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    let (c, a) = (u32::from(c), u32::from(a));
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend; // 255 * 255: the background is opaque
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_white_endpoints() {
        for c in [0u8, 1, 77, 254, 255] {
            assert_eq!(over_white(c, 255), c);
            assert_eq!(over_white(c, 0), 255);
        }
        // Pillow: (0, 0, 0, 128) over white is (127, 127, 127).
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn undecodable_bytes_are_validation_errors() {
        for bytes in [
            &b""[..],
            b"not an image at all",
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
        ] {
            let e = decode_rgb8(bytes, &mut PixelBudget::unlimited()).unwrap_err();
            assert!(matches!(e, EngineError::Validation { .. }), "{e}");
            assert!(e.to_string().contains("could not decode the image"), "{e}");
        }
    }
}

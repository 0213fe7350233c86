//! JPEG decoding with libjpeg-turbo's decoder (MozJPEG's copy, built from
//! source without assembly): the same integer IDCT and "fancy" chroma
//! upsampling as Pillow's, so decoded pixels equal what transformers sees.
//! Pure-Rust decoders differ by up to a few levels on subsampled images.

use crate::error::{EngineError, Result};

/// RGB8 pixels of a baseline/progressive JPEG, or `None` when libjpeg cannot
/// produce RGB for it (e.g. CMYK), leaving it to the general decoder.
pub(crate) fn decode_rgb(bytes: &[u8]) -> Result<Option<(usize, usize, Vec<u8>)>> {
    // libjpeg reports fatal errors through the crate as panics; keep them in here.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<_>> {
        let decompress = mozjpeg::Decompress::new_mem(bytes)?;
        if matches!(
            decompress.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        ) {
            return Ok(None);
        }
        let mut image = decompress.rgb()?;
        let (width, height) = (image.width(), image.height());
        let pixels: Vec<[u8; 3]> = image.read_scanlines()?;
        image.finish()?;
        let data: Vec<u8> = pixels.into_iter().flatten().collect();
        Ok(Some((width, height, data)))
    });
    match decoded {
        Ok(Ok(Some((w, h, data)))) if data.len() == w * h * 3 => Ok(Some((w, h, data))),
        Ok(Ok(Some(_))) => Err(EngineError::validation(
            "could not decode the image: truncated JPEG data",
        )),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(EngineError::validation(format!(
            "could not decode the image: {e}"
        ))),
        Err(_) => Err(EngineError::validation(
            "could not decode the image: corrupt JPEG data",
        )),
    }
}

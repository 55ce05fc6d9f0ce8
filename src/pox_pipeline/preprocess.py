"""The one preprocessing path shared by prepare, training, evaluation and serving.

Decoding is strict (any failure becomes an :class:`ImageError` with a readable reason) and
normalises every colour mode and EXIF orientation to upright 8-bit RGB. A JPEG is shrunk as it
is decoded (DCT scaling, ``Image.draft``) to the smallest size at least the model's input, so
a 12-megapixel phone photo never exists at full size; prepare and serving both decode this way
(``decode_image(..., draft=image_size)``), so training and serving see the same pixels. Scaling to
[0, 1] lives inside the models (a Rescaling layer), so the tensor handed to a model is always
the resized RGB image, uint8 between processes and float32 in [0, 255] in the model.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Truncated files must fail loudly, never decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageError(ValueError):
    """An input that is not a usable photo; ``str(err)`` is a reason fit for a user."""


class ImageTooLarge(ImageError):
    """An input over the byte or pixel limits (the service answers HTTP 413, not 400)."""


def decode_image(
    data: bytes,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    allow_animated: bool = False,
    draft: int | None = None,
) -> Image.Image:
    """Decode image bytes into an upright RGB image, or raise :class:`ImageError`.

    ``draft``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose sides are
    both at least this many pixels; other formats decode at full size."""
    if not data:
        raise ImageError("the file is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"the file is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,}"
                )
            if getattr(image, "is_animated", False) and not allow_animated:
                raise ImageError(
                    f"animated {image.format} images are not supported; send a single photo"
                )
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the file is not an image in a format this service can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"the image is too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"the image could not be decoded: {err}") from None
    return to_rgb(image)


def load_image(path: str | Path, **limits: int | bool | None) -> Image.Image:
    """Read and decode an image file (see :func:`decode_image`)."""
    return decode_image(Path(path).read_bytes(), **limits)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation (in place) and convert any mode (palette, RGBA, CMYK, 16-bit...)
    to RGB; an RGB image is returned as it is, not copied."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a broken EXIF block must not cost the photo
        pass
    if image.mode in HIGH_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / peak * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def resize(image: Image.Image, image_size: int, resample: str = "bilinear") -> Image.Image:
    """Resize to the square model input (a stretch, as Keras' flow_from_directory did)."""
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; choose one of {sorted(RESAMPLE)}")
    size = (image_size, image_size)
    return image if image.size == size else image.resize(size, RESAMPLE[resample])


def model_pixels(image: Image.Image, image_size: int, resample: str = "bilinear") -> np.ndarray:
    """RGB image -> uint8 array (image_size, image_size, 3): the model input as the API process
    hands it to the model process (a quarter of float32's bytes, exactly the same values)."""
    return np.asarray(resize(image, image_size, resample))


def to_model_input(image: Image.Image, image_size: int, resample: str = "bilinear") -> np.ndarray:
    """RGB image -> float32 array (image_size, image_size, 3) in [0, 255]: what models take."""
    return model_pixels(image, image_size, resample).astype(np.float32)


def preprocess_file(path: str | Path, image_size: int, resample: str = "bilinear") -> np.ndarray:
    """File -> model input; the path used by training and evaluation (a prepared photo is
    already at the model's size; an original JPEG is shrunk as it is decoded, as served)."""
    return to_model_input(load_image(path, draft=image_size), image_size, resample)


def preprocess_bytes(
    data: bytes,
    image_size: int,
    resample: str = "bilinear",
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Upload bytes -> float32 model input (:func:`decode_image` shrinking JPEGs to the input)."""
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft=image_size)
    return to_model_input(image, image_size, resample)

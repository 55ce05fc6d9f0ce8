"""The one preprocessing path shared by prepare, training, evaluation and serving.

Decoding is strict (any failure becomes an :class:`ImageError` with a readable reason) and
normalises every colour mode and EXIF orientation to upright 8-bit RGB. A JPEG is shrunk as it
is decoded (DCT scaling, ``Image.draft``) to the smallest size at least the model's input, so
a 12-megapixel phone photo never exists at full size; other formats decode whole and are then
reduced by an integer factor (``Image.reduce``) toward the same size before any colour mode is
converted, so conversions run on the small image. prepare and serving both decode this way
(``decode_image(..., draft=image_size)``), so training and serving see the same pixels. Serving
also passes its memory limits: the formats it accepts and the largest decoded size. Scaling to
[0, 1] lives inside the models (a Rescaling layer), so the tensor handed to a model is always
the resized RGB image, uint8 between processes and float32 in [0, 255] in the model.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

# Truncated files must fail loudly, never decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Modes whose pixels Image.reduce may average as they are; the others are widened first (palette
# indices, 1-bit and 16-bit samples cannot be averaged, or Pillow cannot reduce them).
REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}
# The files a folder of photos is listed by (any case): conf/data's image_extensions, the default.
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An input that is not a usable photo; ``str(err)`` is a reason fit for a user."""


class ImageTooLarge(ImageError):
    """An input over the byte or pixel limits (the service answers HTTP 413, not 400)."""


class UnsupportedFormat(ImageError):
    """An input that is not an image in one of the accepted formats (HTTP 415)."""


def decode_image(
    data: bytes,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    max_decode_pixels: int | None = None,
    formats: Sequence[str] | None = None,
    allow_animated: bool = False,
    draft: int | None = None,
) -> Image.Image:
    """Decode image bytes into an upright RGB image, or raise :class:`ImageError`.

    ``max_pixels`` bounds the size the file declares; ``max_decode_pixels`` the size it would
    be decoded at (a JPEG's after DCT scaling): both are checked from the header, before any
    pixel is decoded. ``formats``: Pillow format names tried (None: every format Pillow reads;
    the service lists a few, so no other decoder ever sees an upload). ``draft``: a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose sides are both at least this many
    pixels; another format is decoded whole, then reduced by the largest integer factor that
    keeps both sides at least this many pixels (see :func:`shrink`)."""
    if not data:
        raise ImageError("the file is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"the file is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,}"
                )
            # An MPO (a phone's JPEG with extra views: depth, stereo) is its first image.
            if getattr(image, "is_animated", False) and not (
                allow_animated or image.format == "MPO"
            ):
                raise ImageError(
                    f"animated {image.format} images are not supported; send a single photo"
                )
            drafted = draft is not None and isinstance(image, JpegImagePlugin.JpegImageFile)
            if drafted:
                image.draft("RGB", (draft, draft))
            decoded = image.size[0] * image.size[1]
            if max_decode_pixels is not None and decoded > max_decode_pixels:
                raise ImageTooLarge(
                    f"the {image.format} image is {width}x{height}: decoding it takes "
                    f"{decoded:,} pixels; the limit is {max_decode_pixels:,} (a JPEG is "
                    "shrunk as it is decoded; other formats are decoded at full size)"
                )
            image.load()
            if draft is not None and not drafted:
                image = shrink(image, draft)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if formats is not None:
            raise UnsupportedFormat(
                "the file is not an image in an accepted format; accepted: " + ", ".join(formats)
            ) from None
        raise ImageError("the file is not an image in a format this service can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"the image is too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"the image could not be decoded: {err}") from None
    return to_rgb(image)


def shrink(image: Image.Image, size: int) -> Image.Image:
    """Reduce a decoded image by the largest integer factor that keeps both sides at least
    ``size`` (a box average, as DCT scaling is for a JPEG), before any mode conversion, so that
    :func:`to_rgb` converts the small image; returned as it is when no factor of 2 or more
    fits. A mode that cannot be averaged is widened first (palette -> RGB(A), 1-bit -> L,
    16-bit -> 32-bit integers and back); the EXIF orientation travels with the image's info."""
    factor = min(image.size[0] // size, image.size[1] // size)
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):  # back to 16 bits: to_rgb scales those by 65535
        return image.convert("I").reduce(factor).convert("I;16")
    if image.mode not in REDUCIBLE_MODES:
        image = image.convert(wider_mode(image))
    return image.reduce(factor)


def wider_mode(image: Image.Image) -> str:
    """The mode :func:`shrink` widens a mode that Image.reduce cannot average into."""
    if image.mode in ("P", "PA"):
        transparent = image.mode == "PA" or "transparency" in image.info
        return "RGBA" if transparent else "RGB"
    return "RGBA" if "A" in image.mode else "L" if image.mode == "1" else "RGB"


def load_image(path: str | Path, **limits: int | bool | None) -> Image.Image:
    """Read and decode an image file (see :func:`decode_image`)."""
    return decode_image(Path(path).read_bytes(), **limits)


def photo_files(folder: str | Path, suffixes: Iterable[str] = PHOTO_SUFFIXES) -> list[Path]:
    """The files under ``folder`` (any depth) whose suffix, in any case, is one of ``suffixes``,
    in path order: one listing, so every tool that takes a folder sees the same photos."""
    wanted = {suffix.lower() for suffix in suffixes}
    return sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in wanted)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation (in place) and convert any mode (palette, RGBA, CMYK, 16-bit...)
    to RGB; an RGB image is returned as it is, not copied."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a broken EXIF block must not cost the photo
        pass
    if image.mode in HIGH_BIT_MODES:
        image = to_8_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_8_bit(image: Image.Image) -> Image.Image:
    """A high-bit grey image (16-bit, 32-bit integer, float) -> 8-bit L, without a float copy
    of the image (Pillow's point transform works pixel by pixel): 16-bit samples scale as
    round(v / 65535 * 255) exactly; others by their peak."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
        peak = 65535.0
    else:
        peak = max(float(image.getextrema()[1]), 1.0)
    scale = 255.0 / peak
    # v * scale + 0.5, truncated: rounding half up (16-bit values never fall on a half)
    return image.point(lambda value: value * scale + 0.5).convert("L")


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

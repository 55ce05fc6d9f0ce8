"""Clearly non-skin images, generated or shipped by installed packages, for measuring the
out-of-distribution guard (benchmarks/ood_rates.py, tests/unit/guard/test_ood.py): flat
colours, noise, text screenshots, matplotlib charts and photos of objects and animals
(scikit-image's ``skimage.data``, the test extra; scikit-learn's sample photos). Nothing is
downloaded.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

SIDE = 256
FLAT_COLOURS = {
    "white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "red": (220, 30, 30),
    "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "cyan": (40, 200, 220), "magenta": (200, 40, 180), "orange": (250, 140, 20),
}  # fmt: skip
# skimage.data images that ship inside the wheel (no download), objects, animals, scenes.
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
    "immunohistochemistry", "colorwheel", "logo", "camera", "coins", "moon", "brick", "grass",
    "gravel", "page", "text", "horse", "cell", "clock",
)  # fmt: skip
TEXT_LINES = (
    "Quarterly report - revenue by region",
    "def main():  return 0  # TODO",
    "Meeting notes: ship the release on Friday",
    "Error 404: the page you asked for is not here",
)


def flat_colours() -> Iterator[tuple[str, Image.Image]]:
    for name, colour in FLAT_COLOURS.items():
        yield f"flat-{name}", Image.new("RGB", (SIDE, SIDE), colour)


def noise(seed: int = 0) -> Iterator[tuple[str, Image.Image]]:
    rng = np.random.default_rng(seed)
    for index in range(3):
        yield (
            f"noise-uniform-{index}",
            Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)),
        )
        grey = np.clip(rng.normal(128, 50, (SIDE, SIDE, 1)), 0, 255).astype(np.uint8)
        yield f"noise-gaussian-grey-{index}", Image.fromarray(np.repeat(grey, 3, axis=2))


def text_screenshots() -> Iterator[tuple[str, Image.Image]]:
    for index, (background, ink) in enumerate([("white", "black"), ("#1e1e1e", "#d4d4d4")]):
        for size in (1, 2):
            image = Image.new("RGB", (SIDE, SIDE), background)
            draw = ImageDraw.Draw(image)
            for line, text in enumerate(TEXT_LINES * 3):
                draw.text((8, 8 + line * 20 * size), text, fill=ink, font_size=11 * size)
            yield f"text-{index}-{size}", image


def charts() -> Iterator[tuple[str, Image.Image]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.linspace(0, 10, 50)
    drawers = {
        "line": lambda ax: ax.plot(x, np.sin(x), x, np.cos(x)),
        "bar": lambda ax: ax.bar(["a", "b", "c", "d"], [3, 7, 2, 5]),
        "scatter": lambda ax: ax.scatter(np.sin(3 * x), np.cos(5 * x), c=x),
        "pie": lambda ax: ax.pie([30, 50, 20], labels=["x", "y", "z"]),
    }
    for name, draw in drawers.items():
        figure, ax = plt.subplots(figsize=(3, 3), dpi=SIDE // 3)
        draw(ax)
        ax.set_title(f"{name} chart")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        yield f"chart-{name}", Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def photos() -> Iterator[tuple[str, Image.Image]]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    for name in SKIMAGE_PHOTOS:
        pixels = np.asarray(getattr(data, name)())
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        if pixels.dtype != np.uint8:
            pixels = (255 * (pixels - pixels.min()) / max(np.ptp(pixels), 1e-9)).astype(np.uint8)
        yield f"photo-{name}", Image.fromarray(pixels).convert("RGB")
    for name, pixels in zip(("china", "flower"), load_sample_images().images, strict=True):
        yield f"photo-{name}", Image.fromarray(pixels)


KINDS = {
    "flat colours": flat_colours,
    "noise": noise,
    "text screenshots": text_screenshots,
    "charts": charts,
    "photos of objects and animals": photos,
}


def images() -> Iterator[tuple[str, str, Image.Image]]:
    """(kind, name, RGB image) for every non-skin image."""
    for kind, make in KINDS.items():
        for name, image in make():
            yield kind, name, image

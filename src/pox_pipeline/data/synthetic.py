"""The `synthesize` stage: a small, deterministic, clearly synthetic two-class image set.

It lets the whole pipeline run (and its tests pass) with no real data. Each class has its own
lesion style drawn on skin-tone backgrounds: mpox-like round pustules with a pale centre and a
dark rim versus small irregular red macules. Every "patient" has its own skin tone, lighting
and lesion layout, and its photos differ only by jitter, so a split that lets one patient's
images into two splits looks visibly better than a leak-free one, as on real data.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pox_pipeline.common.config import stage_entry

log = logging.getLogger(__name__)

README_NAME = "README.txt"
README_TEXT = """\
Synthetic images written by pox_pipeline.data.synthetic (the `synthesize` stage).

These are NOT photos of people and NOT medical data: they are procedurally drawn lesion-like
blobs on skin-tone backgrounds, deterministic for a given seed, so the pipeline can run end to
end without a real data set. File names are <patient>_<image>.png; all images of one synthetic
patient share skin tone, lighting and lesion layout. Do not train anything meant for use on them.
This folder is rewritten on every run.
"""


def synthesize(cfg: DictConfig) -> Path:
    """Write ``synthetic.out_dir/<class>/<prefix><NN>_<MM>.png`` (clean rewrite) and a README."""
    syn = cfg.synthetic
    classes = list(syn.classes)
    if len(syn.class_styles) != len(classes) or len(syn.id_prefixes) != len(classes):
        raise ValueError(
            f"synthetic.class_styles ({list(syn.class_styles)}) and synthetic.id_prefixes "
            f"({list(syn.id_prefixes)}) need one entry per class of {classes}"
        )
    out_dir = Path(syn.out_dir)
    _clear_owned_dir(out_dir)
    (out_dir / README_NAME).write_text(README_TEXT)

    styles = OmegaConf.to_container(syn.styles)
    digits = max(2, len(str(syn.patients_per_class)))
    low, high = syn.images_per_patient
    written = 0
    for class_index, class_name in enumerate(classes):
        own_style = styles[syn.class_styles[class_index]]
        other_style = styles[syn.class_styles[(class_index + 1) % len(classes)]]
        class_dir = out_dir / class_name
        class_dir.mkdir(parents=True)
        for patient in range(1, syn.patients_per_class + 1):
            rng = np.random.default_rng([syn.seed, class_index, patient])
            style = _blend_styles(own_style, other_style, _uniform(rng, [0, syn.style_overlap]))
            layout = _patient_layout(rng, syn, style)
            for image_number in range(1, int(rng.integers(low, high + 1)) + 1):
                pixels = _render(rng, syn, style, layout)
                name = f"{syn.id_prefixes[class_index]}{patient:0{digits}d}_{image_number:02d}.png"
                image = Image.fromarray(pixels)
                image.save(class_dir / name, compress_level=syn.png_compress_level)
                written += 1
    log.info("wrote %d synthetic images of %d classes to %s", written, len(classes), out_dir)
    return out_dir


def _clear_owned_dir(out_dir: Path) -> None:
    """Empty ``out_dir`` if it is ours (holds our README) or empty; refuse anything else."""
    if out_dir.exists():
        readme = out_dir / README_NAME
        owned = readme.is_file() and readme.read_text().startswith(README_TEXT.splitlines()[0])
        if not owned and any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} is not empty and was not written by pox_pipeline.data.synthetic "
                f"(no {README_NAME} of ours); refusing to delete it - choose another "
                "synthetic.out_dir"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def _uniform(rng: np.random.Generator, bounds: list[float]) -> float:
    low, high = bounds
    return float(rng.uniform(low, high))


def _blend_styles(own: dict, other: dict, weight: float) -> dict[str, np.ndarray]:
    """A patient's lesion style: its class's style moved ``weight`` of the way to another's.

    Near 0.5 the classes look alike, so some patients are genuinely hard, and a model can only
    get them right by memorising the patient - what a leaky split rewards.
    """
    return {
        key: (1 - weight) * np.asarray(own[key], dtype=np.float64)
        + weight * np.asarray(other[key], dtype=np.float64)
        for key in own
    }


def _patient_layout(rng: np.random.Generator, syn: DictConfig, style: dict) -> dict:
    """What stays the same across one patient's photos: skin, light and lesion layout."""
    tones = np.asarray(OmegaConf.to_container(syn.skin_tones), dtype=np.float64)
    position = rng.uniform(0, len(tones) - 1)
    lower = int(np.floor(position))
    upper = min(lower + 1, len(tones) - 1)
    tone = tones[lower] + (tones[upper] - tones[lower]) * (position - lower)
    count = int(rng.integers(round(style["count"][0]), round(style["count"][1]) + 1))
    return {
        "tone": tone,
        "light_angle": rng.uniform(0, 2 * np.pi),
        "light_strength": _uniform(rng, syn.lighting),
        "centres": rng.uniform(syn.margin, 1 - syn.margin, size=(count, 2)),
        "radii": rng.uniform(*style["radius"], size=count),
        "aspects": rng.uniform(*style["aspect"], size=count),
        "angles": rng.uniform(0, np.pi, size=count),
    }


def _render(
    rng: np.random.Generator, syn: DictConfig, style: dict, layout: dict
) -> np.ndarray:
    """One photo of a patient: its layout plus per-image shift, scale, light and noise."""
    size = syn.image_size
    jitter = syn.jitter
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size
    ys, xs = np.meshgrid(grid, grid, indexing="ij", sparse=True)

    angle = layout["light_angle"] + rng.normal(0, jitter.lighting * np.pi)
    strength = layout["light_strength"] + rng.normal(0, jitter.lighting)
    light = 1 + strength * ((xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle))
    image = layout["tone"] * light[..., None]
    image = image + rng.normal(0, syn.texture_sigma, size=image.shape)

    shift = rng.uniform(-jitter.shift, jitter.shift, size=2)
    wobble = rng.normal(0, jitter.position, size=layout["centres"].shape)
    centres = layout["centres"] + shift + wobble
    radii = layout["radii"] * np.exp(rng.normal(0, jitter.radius, size=layout["radii"].shape))
    for centre, radius, aspect, theta in zip(
        centres, radii, layout["aspects"], layout["angles"], strict=True
    ):
        _draw_lesion(image, grid, centre, radius, aspect, theta, style)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _draw_lesion(
    image: np.ndarray,
    grid: np.ndarray,
    centre: np.ndarray,
    radius: float,
    aspect: float,
    theta: float,
    style: dict[str, np.ndarray],
) -> None:
    """Blend one elliptical lesion (core -> rim -> fading halo) into ``image`` in place."""
    extent, fraction = style["halo_extent"], style["core_fraction"]
    reach = extent * radius
    cols = slice(*np.searchsorted(grid, [centre[0] - reach, centre[0] + reach]))
    rows = slice(*np.searchsorted(grid, [centre[1] - reach, centre[1] + reach]))
    patch = image[rows, cols]
    if patch.size == 0:
        return
    dx = grid[cols][None, :] - centre[0]
    dy = grid[rows][:, None] - centre[1]
    along = dx * np.cos(theta) + dy * np.sin(theta)
    across = -dx * np.sin(theta) + dy * np.cos(theta)
    distance = (np.sqrt(along**2 + (across / aspect) ** 2) / radius)[..., None]
    shade = np.clip((distance - fraction) / (1 - fraction), 0, 1)
    halo_alpha = style["halo_opacity"] * np.clip((extent - distance) / (extent - 1), 0, 1)
    inside = distance <= 1
    alpha = np.where(inside, 1.0, halo_alpha)
    colour = np.where(inside, style["core"] + (style["rim"] - style["core"]) * shade, style["halo"])
    patch *= 1 - alpha
    patch += alpha * colour


def run(cfg: DictConfig) -> None:
    synthesize(cfg)


main = stage_entry(run)

if __name__ == "__main__":
    main()

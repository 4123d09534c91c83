"""Labelled real images for encoder (ViT) benchmarks, offline.

The 2,000 simulated textile images of the PyPI package ``conformal-clip-data``
(``pip install --no-deps conformal-clip-data==0.1.4``): 250x250 RGB JPEGs under
``data/textile_images/simulated/{global,local,nominal}/`` (500 / 500 / 1,000 images; nominal
fabric versus two kinds of defect). The package is located with ``find_spec``, never imported.

Pixels follow the usual DINOv2 / ImageNet evaluation transform: bicubic resize of the shorter side
to ``size``, centre crop ``size`` x ``size``, scale to [0, 1], normalise with the ImageNet mean and
std. The images are square, so for them this is a plain bicubic resize 250 -> 224 (the "resize to
256, crop 224" recipe would instead discard a 12% border of these already-small images).
Needs Pillow (installed with matplotlib, a dependency of compress).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from compress.errors import DataSourceError

PACKAGE = "conformal_clip_data"
PACKAGE_PIN = "conformal-clip-data==0.1.4"
TEXTILE_SUBPATH = Path("data") / "textile_images" / "simulated"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def textile_root() -> Path:
    """``data/textile_images/simulated`` inside the installed ``conformal_clip_data`` package."""
    from compress.models.loading import package_path

    return package_path(PACKAGE, PACKAGE_PIN, TEXTILE_SUBPATH, "the textile images", error=DataSourceError)


def textile_classes() -> list[str]:
    """The class names, sorted: ``["global", "local", "nominal"]``; a label is an index into it."""
    return sorted(p.name for p in textile_root().iterdir() if p.is_dir())


def textile_images() -> list[tuple[Path, int]]:
    """Every textile image as (path, class index), sorted by class then file name (deterministic)."""
    root = textile_root()
    items = [
        (path, label)
        for label, name in enumerate(textile_classes())
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DataSourceError(f"no images under {root}; reinstall `pip install --no-deps {PACKAGE_PIN}`")
    return items


def load_pixels(paths: Sequence[Path | str], size: int = 224) -> torch.Tensor:
    """Read, resize (bicubic, shorter side to ``size``, centre crop) and ImageNet-normalise images.

    Returns float32 [n, 3, size, size].
    """
    if not paths:
        return torch.empty(0, 3, size, size)
    return torch.stack([_load_one(Path(p), size) for p in paths])


def _load_one(path: Path, size: int) -> torch.Tensor:
    """One image as float32 [3, size, size], normalised."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = _resize_centre_crop(image.convert("RGB"), size)
    except OSError as error:
        raise DataSourceError(f"cannot read image {path}: {error}") from error
    array = np.asarray(image, dtype=np.float32) / 255.0  # [size, size, 3]
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def _resize_centre_crop(image, size: int):
    """Bicubic resize so the shorter side is ``size``, then the central ``size`` x ``size`` crop."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def split_indices(
    n: int, test_fraction: float = 0.3, seed: int = 0, labels: Sequence[int] | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/test split of ``range(n)``: (train_idx, test_idx), sorted int64 tensors.

    With ``labels`` (length n) the split is stratified: each class contributes
    ``round(test_fraction * class size)`` test items.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    label_tensor = torch.zeros(n, dtype=torch.int64) if labels is None else torch.as_tensor(labels).long()
    if label_tensor.shape != (n,):
        raise ValueError(f"labels must have length n={n}, got shape {tuple(label_tensor.shape)}")
    generator = torch.Generator().manual_seed(seed)
    test_parts = []
    for value in torch.unique(label_tensor):  # sorted, so the generator is consumed in a fixed order
        members = torch.nonzero(label_tensor == value).flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        test_parts.append(shuffled[: round(test_fraction * len(members))])
    test_mask = torch.zeros(n, dtype=torch.bool)
    test_mask[torch.cat(test_parts)] = True
    return torch.nonzero(~test_mask).flatten(), torch.nonzero(test_mask).flatten()


def random_images(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Data-free stand-ins: standard-normal float32 pixels [n, 3, size, size] (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator)

"""Calibration and evaluation inputs for encoders: batches of model-input dicts.

Text encoders read sentences (``compress.calibration.sources``): calibration draws ``samples``
random sentences of the source (``random.Random(seed)``), evaluation takes the first ``items``
sentences of each held-out text; each batch is tokenised with padding to its longest sentence and
truncation at ``seqlen`` tokens. Vision encoders read the labelled textile images
(``compress.calibration.images``), split once into a seeded, stratified 70 / 30 train / test split: calibration
draws from the train part, evaluation uses the test part (and the train part to fit a linear probe).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from compress.errors import DataSourceError

TEXTILE = "textile"
IMAGE_SIZE = 224
TEST_FRACTION, SPLIT_SEED = 0.3, 0


def text_batches(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Tokenised batches: input_ids / attention_mask (/ token_type_ids) [b, longest ≤ max_length]."""
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        batches.append({k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def image_batches(pixels: torch.Tensor, batch_size: int) -> list[dict]:
    """[{pixel_values: [b, 3, H, W]}, ...] from ``pixels`` [n, 3, H, W]."""
    return [{"pixel_values": chunk} for chunk in pixels.split(batch_size)]


class ImageBatches:
    """Batches ``{pixel_values: [b, 3, size, size]}`` of image files, decoded when indexed (2,000
    images at 224² would hold 1.2 GB as float32)."""

    def __init__(self, items: list[tuple], size: int, batch_size: int):
        self.paths = [path for path, _ in items]
        self.size, self.batch_size = size, batch_size

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: int) -> dict:
        from compress.calibration.images import load_pixels

        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.batch_size
        return {"pixel_values": load_pixels(self.paths[start:start + self.batch_size], size=self.size)}


@dataclass
class ImageSplit:
    """The textile images split once: (path, label) of each part, each part in a seeded shuffled order."""

    train: list[tuple]
    test: list[tuple]


def textile_split() -> ImageSplit:
    from compress.calibration.images import split_indices, textile_images

    items = textile_images()
    train, test = split_indices(len(items), test_fraction=TEST_FRACTION, seed=SPLIT_SEED,
                                labels=[label for _, label in items])
    train, test = train.tolist(), test.tolist()
    random.Random(SPLIT_SEED).shuffle(train)  # so that the first k of a part mix the classes
    random.Random(SPLIT_SEED).shuffle(test)
    return ImageSplit(train=[items[i] for i in train], test=[items[i] for i in test])


def image_size(adapter) -> int:
    """Pixels per side fed to a vision encoder: the config's image size, except DINOv2 (trained at
    518 with interpolated position embeddings), which we feed at 224 (256 patches + CLS)."""
    size = getattr(adapter.config, "image_size", IMAGE_SIZE)
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    return IMAGE_SIZE if adapter.family == "dinov2" else size


def pixels_of(items: list[tuple], size: int) -> torch.Tensor:
    from compress.calibration.images import load_pixels

    return load_pixels([path for path, _ in items], size=size)


def calibration_batches(adapter, tokenizer, source: str, samples: int, seqlen: int, seed: int, batch_size: int) -> list[dict]:
    """The calibration batches of a text or vision encoder (see the module docstring)."""
    if adapter.modality == "image":
        if source != TEXTILE:
            raise DataSourceError(f"calibration.source: a vision encoder calibrates on images ('{TEXTILE}'), got '{source}'")
        train = textile_split().train
        if samples > len(train):
            raise DataSourceError(f"calibration.samples: the textile train split has {len(train)} images, {samples} asked for")
        chosen = random.Random(seed).sample(train, samples)
        return image_batches(pixels_of(chosen, image_size(adapter)), batch_size)
    if source == TEXTILE:
        raise DataSourceError(f"calibration.source: '{TEXTILE}' holds images; a text encoder needs a text source (e.g. austen)")
    from compress.calibration.sources import random_sentences

    return text_batches(tokenizer, random_sentences(source, samples, seed), batch_size, seqlen)


@dataclass
class EvaluationSet:
    """Held-out inputs of one evaluation dataset; for images also the probe's training part."""

    name: str
    batches: list[dict] | ImageBatches
    labels: torch.Tensor | None = None
    train_batches: ImageBatches | None = None
    train_labels: torch.Tensor | None = None


def evaluation_sets(adapter, tokenizer, datasets: list[str], items: int | None, seqlen: int, batch_size: int) -> list[EvaluationSet]:
    """Per dataset the held-out batches (text: the first ``items`` sentences, default 1000;
    images: the textile test split and, for the probe, the train split; with ``items``, the first
    ``items`` images of each)."""
    if adapter.modality == "image":
        split = textile_split()
        test, train = (split.test[:items], split.train[:items]) if items else (split.test, split.train)
        size = image_size(adapter)
        return [EvaluationSet(name=TEXTILE, batches=ImageBatches(test, size, batch_size),
                              labels=torch.tensor([label for _, label in test]),
                              train_batches=ImageBatches(train, size, batch_size),
                              train_labels=torch.tensor([label for _, label in train]))]
    from compress.calibration.sources import first_sentences

    sets = []
    for source in datasets:
        if source == TEXTILE:
            raise DataSourceError(f"evaluate.datasets: '{TEXTILE}' holds images; a text encoder is evaluated on text")
        name = source.split(":", 1)[1] if source.startswith("austen:") else source
        sentences = first_sentences(source, items or 1000)
        sets.append(EvaluationSet(name=name, batches=text_batches(tokenizer, sentences, batch_size, seqlen)))
    return sets

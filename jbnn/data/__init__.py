"""Datasets by name: embedded ones that need no download, and TFDS ones read offline.

``load(name, split)`` returns a :class:`Source`; ``source.batches(batch_size, seed=,
epoch=)`` yields ``{"image": (B, H, W, C) float32, "label": (B,) int32}`` (plus ``"mask":
(B, H, W) float32`` for ``shapes``), deterministic in ``(seed, epoch)``, resumable with
``skip_batches``, with optional random crop / flip (``augment={"crop_padding": 4,
"flip": True}``).

Datasets (``NAMES``):

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, resized to ``image_size``
  (default 32), fixed stratified 80/20 split. No download.
* ``shapes``: procedural circle / square / triangle / cross / ring images with object
  masks; ``seed`` and the split decide the images. No download.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``: TFDS, read into
  memory. ``imagenette``, ``imagenet2012``: TFDS, streamed through tf.data;
  ``imagenet2012`` is built from the archives in ``manual_dir`` when ``data_dir`` lacks
  it. TensorFlow is imported only for these, and nothing is ever downloaded: a missing
  dataset raises :class:`DatasetNotAvailableError` saying how to get it.
"""

from __future__ import annotations

import os

from jbnn.data.core import (
    AUGMENT_KEYS,
    PADDING_MODES,
    ArraySource,
    Augment,
    Source,
    apply_augment,
    augment_batch,
    parse_augment,
    permutation,
    rng_for,
    sample_augment_params,
)
from jbnn.data.embedded import SHAPE_CLASSES, load_digits, load_shapes
from jbnn.data.tfds_source import (
    TFDS_DATASETS,
    DatasetNotAvailableError,
    StreamSource,
    load_tfds,
)

EMBEDDED_NAMES = ("digits", "shapes")
TFDS_NAMES = tuple(TFDS_DATASETS)
NAMES = EMBEDDED_NAMES + TFDS_NAMES


def load(
    name: str,
    split: str = "train",
    *,
    image_size: int | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    seed: int = 0,
    normalize: bool = True,
    **kwargs,
) -> Source:
    """Loads a dataset split by name.

    Args:
      name: one of ``NAMES``; TFDS names may carry a config, e.g.
        ``"imagenette/160px-v2"``.
      split: ``"train"`` or ``"test"`` for every dataset (``"test"`` reads
        ``"validation"`` for imagenette/imagenet2012); TFDS datasets also take their other
        splits and TFDS slicing (``"train[:90%]"``).
      image_size: height and width of the images: default 32 for digits/shapes, native
        for the small TFDS datasets, 224 for imagenette/imagenet2012.
      data_dir: TFDS data folder (a leading ``~`` is expanded; ignored by the embedded
        datasets).
      manual_dir: folder with the ImageNet tar files, used to build imagenet2012 when
        ``data_dir`` does not hold it (ignored by the others).
      seed: decides the images of ``shapes`` (the order of batches is decided by the
        ``seed`` of :meth:`Source.batches`); the others ignore it.
      normalize: standardise images with per-channel mean/std (stored as ``.mean`` /
        ``.std``); False leaves pixels in [0, 1].
      **kwargs: dataset options: ``shapes`` takes ``num_examples`` and ``noise_level``;
        TFDS datasets take ``in_memory`` and ``shuffle_buffer``.

    Returns:
      A :class:`Source` (an :class:`ArraySource` for in-memory datasets).

    Raises:
      ValueError: for an unknown name, split or option.
      DatasetNotAvailableError: for a TFDS dataset missing from ``data_dir``.
    """
    base = name.split("/")[0] if isinstance(name, str) else None
    if base not in NAMES or (base in EMBEDDED_NAMES and name != base):
        raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(NAMES)}")
    if name == "digits":
        return load_digits(split, image_size=image_size, normalize=normalize, **kwargs)
    if name == "shapes":
        return load_shapes(split, image_size=image_size, seed=seed, normalize=normalize, **kwargs)
    # "~" is the user's home here as in a shell (a --config.data_dir=~/... flag reaches
    # us unexpanded: shells expand "~" only at the start of a word).
    return load_tfds(
        name,
        split,
        image_size=image_size,
        data_dir=None if data_dir is None else os.path.expanduser(data_dir),
        manual_dir=None if manual_dir is None else os.path.expanduser(manual_dir),
        normalize=normalize,
        **kwargs,
    )


__all__ = [
    "AUGMENT_KEYS",
    "EMBEDDED_NAMES",
    "NAMES",
    "PADDING_MODES",
    "SHAPE_CLASSES",
    "TFDS_DATASETS",
    "TFDS_NAMES",
    "ArraySource",
    "Augment",
    "DatasetNotAvailableError",
    "Source",
    "StreamSource",
    "apply_augment",
    "augment_batch",
    "load",
    "load_digits",
    "load_shapes",
    "load_tfds",
    "parse_augment",
    "permutation",
    "rng_for",
    "sample_augment_params",
]

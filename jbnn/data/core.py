"""Sources of batches: the interface every dataset implements, in-memory arrays, augmentation.

A :class:`Source` yields batches ``{"image": (B, H, W, C) float32, "label": (B,) int32}``
(plus ``"mask": (B, H, W) float32`` when the dataset has ground-truth object masks). The
order and the augmentation of an epoch are a pure function of ``(seed, epoch)``: the
permutation comes from a generator seeded with ``(seed, epoch, 0)`` and the augmentation
of batch ``i`` from a generator seeded with ``(seed, epoch, 1, i)``, so resuming at batch
``k`` (``skip_batches=k``) reproduces exactly what an uninterrupted pass yields from there.

Augmentation works on raw pixels (before normalisation), so zero padding pads with black,
as in the usual CIFAR recipe, and is vectorised over the batch: one gather per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

PADDING_MODES = ("zeros", "reflect")
AUGMENT_KEYS = ("crop_padding", "flip", "padding_mode")

# Tags that keep the generators of the different random streams apart.
_SHUFFLE_TAG = 0
_AUGMENT_TAG = 1


def check_int(name: str, value: Any, minimum: int) -> int:
    """Returns ``value`` as an int, or raises ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def rng_for(seed: int, epoch: int, *tags: int) -> np.random.Generator:
    """A numpy generator that depends only on ``(seed, epoch, *tags)``.

    Args:
      seed: the run's data seed (int in [0, 2**32)).
      epoch: the epoch (int in [0, 2**32)).
      *tags: further ints in [0, 2**32) that name the stream (shuffle, augment, batch).

    Returns:
      A fresh ``np.random.Generator`` (PCG64) seeded from a ``SeedSequence``.

    Raises:
      ValueError: for a value out of range. A ``SeedSequence`` splits a larger int into
        several 32-bit words, so (2**32, 0) would draw the stream of (0, 1).
    """
    entropy = [check_int("seed", seed, 0), check_int("epoch", epoch, 0)]
    entropy += [check_int("tag", t, 0) for t in tags]
    for name, value in zip(("seed", "epoch", *["tag"] * len(tags)), entropy, strict=True):
        if value >= 2**32:
            raise ValueError(f"{name} must be < 2**32 (a 32-bit word), got {value}")
    return np.random.default_rng(np.random.SeedSequence(entropy))


class Augment(NamedTuple):
    """Parsed augmentation settings.

    Attributes:
      crop_padding: pad each side by this many pixels, then crop back to (H, W) at a
        uniformly random offset; 0 turns cropping off.
      flip: flip horizontally with probability 1/2.
      padding_mode: ``"zeros"`` (black, in raw pixels) or ``"reflect"`` (numpy's
        ``reflect``: mirrored without repeating the edge pixel).
    """

    crop_padding: int = 0
    flip: bool = False
    padding_mode: str = "zeros"

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip


def parse_augment(augment: Mapping[str, Any] | None) -> Augment:
    """Validates an augmentation dict (``crop_padding``, ``flip``, ``padding_mode``).

    Args:
      augment: None or a mapping (a ConfigDict works too) with a subset of the keys
        ``crop_padding`` (int >= 0), ``flip`` (bool), ``padding_mode`` ("zeros" or
        "reflect").

    Returns:
      An :class:`Augment`.

    Raises:
      ValueError: for an unknown key or a bad value.
    """
    if augment is None:
        return Augment()
    if hasattr(augment, "to_dict"):  # ml_collections.ConfigDict
        augment = augment.to_dict()
    if not isinstance(augment, Mapping):
        raise ValueError(f"augment must be a dict or None, got {augment!r}")
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"Unknown augment key(s) {unknown}; known keys: {list(AUGMENT_KEYS)}")
    crop_padding = check_int("augment['crop_padding']", augment.get("crop_padding", 0), 0)
    flip = augment.get("flip", False)
    if not isinstance(flip, bool | np.bool_):
        raise ValueError(f"augment['flip'] must be a bool, got {flip!r}")
    padding_mode = augment.get("padding_mode", "zeros")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"augment['padding_mode'] must be one of {PADDING_MODES}, got {padding_mode!r}"
        )
    return Augment(crop_padding, bool(flip), padding_mode)


def sample_augment_params(
    rng: np.random.Generator, batch_size: int, augment: Augment
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws the random crop offsets and flips of one batch.

    Args:
      rng: the batch's generator.
      batch_size: B.
      augment: the settings.

    Returns:
      ``(dy, dx, flips)``: offsets in ``[0, 2 * crop_padding]`` into the padded image,
      int64 (B,) each, and bool (B,) flips. Offsets are all ``crop_padding`` (the
      identity crop) when cropping is off; flips all False when flipping is off.
    """
    p = augment.crop_padding
    if p > 0:
        dy = rng.integers(0, 2 * p + 1, size=batch_size)
        dx = rng.integers(0, 2 * p + 1, size=batch_size)
    else:
        dy = dx = np.zeros(batch_size, dtype=np.int64)
    flips = rng.random(batch_size) < 0.5 if augment.flip else np.zeros(batch_size, dtype=bool)
    return dy, dx, flips


def _source_index(index: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Maps indices into the padded axis back into ``[0, size)``; returns (index, valid)."""
    valid = (index >= 0) & (index < size)
    if mode == "reflect":
        index = np.abs(index)  # -k -> k
        index = np.where(index >= size, 2 * (size - 1) - index, index)
        return index, np.ones_like(valid)
    return np.clip(index, 0, size - 1), valid


def apply_augment(
    images: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    flips: np.ndarray,
    *,
    crop_padding: int,
    padding_mode: str = "zeros",
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pads, crops and flips a batch in one vectorised gather.

    Equivalent, image by image, to ``np.pad`` by ``crop_padding`` on both spatial axes
    (``constant`` 0 or ``reflect``), the crop ``[dy:dy+H, dx:dx+W]``, then ``[:, ::-1]``
    where ``flips``.

    Args:
      images: (B, H, W, C) raw pixels, any dtype.
      dy: (B,) int row offsets into the padded image, in ``[0, 2 * crop_padding]``.
      dx: (B,) int column offsets.
      flips: (B,) bool horizontal flips.
      crop_padding: the padding the offsets refer to.
      padding_mode: ``"zeros"`` or ``"reflect"``.
      masks: optional (B, H, W) masks that get the same transform.

    Returns:
      ``(images, masks)`` with the input shapes and dtypes (masks None if not given).
    """
    b, h, w = images.shape[:3]
    if padding_mode == "reflect" and crop_padding >= min(h, w):
        raise ValueError(
            f"reflect padding needs crop_padding < image size, got {crop_padding} for {h}x{w}"
        )
    rows = dy[:, None] + np.arange(h)[None, :] - crop_padding  # (B, H)
    cols = dx[:, None] + np.arange(w)[None, :] - crop_padding  # (B, W)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    rows, valid_rows = _source_index(rows, h, padding_mode)
    cols, valid_cols = _source_index(cols, w, padding_mode)
    batch = np.arange(b)[:, None, None]
    valid = valid_rows[:, :, None] & valid_cols[:, None, :]  # (B, H, W)
    out = images[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    out = np.where(valid[..., None], out, np.zeros((), images.dtype))
    if masks is not None:
        masks = masks[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W)
        masks = np.where(valid, masks, np.zeros((), masks.dtype))
    return out, masks


def augment_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    augment: Augment,
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Randomly crops and flips a batch of raw images (and their masks alike).

    Args:
      images: (B, H, W, C) raw pixels.
      rng: the batch's generator (draws ``dy``, ``dx``, then the flips).
      augment: the settings.
      masks: optional (B, H, W).

    Returns:
      ``(images, masks)``, unchanged when augmentation is off.
    """
    if not augment.active:
        return images, masks
    dy, dx, flips = sample_augment_params(rng, images.shape[0], augment)
    return apply_augment(
        images,
        dy,
        dx,
        flips,
        crop_padding=augment.crop_padding,
        padding_mode=augment.padding_mode,
        masks=masks,
    )


class Source:
    """A dataset split that yields batches of numpy arrays.

    Attributes:
      name: the dataset name (one of ``jbnn.data.NAMES``).
      split: the split, as asked for.
      num_examples: examples in the split.
      num_classes: number of labels.
      image_shape: (H, W, C) of every image.
      class_names: one name per label.
      has_masks: whether batches carry ``"mask"`` (B, H, W) ground-truth object masks.
      mean: (C,) float32 per-channel mean subtracted from the [0, 1] pixels (0 if not
        normalised).
      std: (C,) float32 per-channel std they were divided by (1 if not normalised).
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        num_examples: int,
        num_classes: int,
        image_shape: tuple[int, int, int],
        class_names: tuple[str, ...],
        has_masks: bool,
        mean: np.ndarray,
        std: np.ndarray,
        pixel_scale: float,
    ):
        self.name = name
        self.split = split
        self.num_examples = int(num_examples)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.class_names = tuple(class_names)
        self.has_masks = bool(has_masks)
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.asarray(std, np.float32).reshape(-1)
        self.pixel_scale = float(pixel_scale)  # raw pixel -> [0, 1]
        channels = self.image_shape[-1]
        if self.mean.shape != (channels,) or self.std.shape != (channels,):
            raise ValueError(f"mean/std must have {channels} channels for {name!r}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"num_examples={self.num_examples}, num_classes={self.num_classes}, "
            f"image_shape={self.image_shape}, has_masks={self.has_masks})"
        )

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw stored pixels (uint8 or [0, 1] float) -> float32 model inputs."""
        x = raw.astype(np.float32) * np.float32(self.pixel_scale)
        return (x - self.mean) / self.std

    def unnormalize(self, images: np.ndarray) -> np.ndarray:
        """Model inputs (..., C) -> float32 pixels in [0, 1] for display."""
        return np.asarray(images, np.float32) * self.std + self.mean

    def steps_per_epoch(self, batch_size: int, drop_remainder: bool = True) -> int:
        """Number of batches :meth:`batches` yields in one epoch.

        Args:
          batch_size: examples per batch.
          drop_remainder: drop the last, smaller batch.

        Returns:
          ``num_examples // batch_size``, or the ceiling when not dropping.

        Raises:
          ValueError: for a bad batch size or an epoch with no batch.
        """
        batch_size = check_int("batch_size", batch_size, 1)
        if drop_remainder:
            steps = self.num_examples // batch_size
        else:
            steps = -(-self.num_examples // batch_size)
        if steps == 0:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self.num_examples} examples of "
                f"{self.name!r}/{self.split!r} with drop_remainder=True: an epoch has no batch"
            )
        return steps

    def _check_batch_args(
        self, batch_size: int, seed: int, epoch: int, drop_remainder: bool, skip_batches: int
    ) -> int:
        """Validates the arguments of :meth:`batches`; returns the steps per epoch."""
        check_int("seed", seed, 0)
        check_int("epoch", epoch, 0)
        steps = self.steps_per_epoch(batch_size, drop_remainder)
        skip_batches = check_int("skip_batches", skip_batches, 0)
        if skip_batches > steps:
            raise ValueError(
                f"skip_batches={skip_batches} exceeds the {steps} batches of an epoch "
                f"of {self.name!r}/{self.split!r} at batch_size={batch_size}"
            )
        return steps

    def _finish(
        self,
        raw: np.ndarray,
        labels: np.ndarray,
        masks: np.ndarray | None,
        augment: Augment,
        seed: int,
        epoch: int,
        batch_index: int,
    ) -> dict[str, np.ndarray]:
        """Augments (with the batch's own generator) and normalises one raw batch."""
        if augment.active:
            rng = rng_for(seed, epoch, _AUGMENT_TAG, batch_index)
            raw, masks = augment_batch(raw, rng, augment, masks)
        batch = {"image": self.normalize(raw), "label": labels.astype(np.int32)}
        if masks is not None:
            batch["mask"] = masks.astype(np.float32)
        return batch

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        augment: Mapping[str, Any] | None = None,
        drop_remainder: bool = True,
        skip_batches: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields the batches of one epoch.

        Args:
          batch_size: examples per batch.
          seed: the data seed (int >= 0); with ``epoch`` it fixes the order and the
            augmentation.
          epoch: the epoch (int >= 0).
          shuffle: shuffle the examples (else the stored order).
          augment: None or ``{"crop_padding": int, "flip": bool, "padding_mode": str}``.
          drop_remainder: drop the last, smaller batch.
          skip_batches: start after this many batches, yielding exactly what an
            uninterrupted pass yields from there.

        Returns:
          An iterator of ``{"image": (B, H, W, C) float32, "label": (B,) int32}`` plus
          ``"mask": (B, H, W) float32`` when ``has_masks``.
        """
        raise NotImplementedError


def permutation(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of an epoch: a permutation seeded by ``(seed, epoch)``, or the identity."""
    if not shuffle:
        return np.arange(num_examples)
    return rng_for(seed, epoch, _SHUFFLE_TAG).permutation(num_examples)


class ArraySource(Source):
    """A split held in memory.

    ``raw_images`` keeps the stored pixels (uint8, or float32 in [0, 1]); ``images`` is the
    normalised float32 array, computed on first access. ``labels`` is int32 (N,), ``masks``
    float32 (N, H, W) or None.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        raw_images: np.ndarray,
        labels: np.ndarray,
        class_names: tuple[str, ...],
        mean: np.ndarray,
        std: np.ndarray,
        pixel_scale: float = 1.0,
        masks: np.ndarray | None = None,
    ):
        if raw_images.ndim != 4:
            raise ValueError(f"raw_images must be (N, H, W, C), got shape {raw_images.shape}")
        n = raw_images.shape[0]
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        if masks is not None and masks.shape != raw_images.shape[:3]:
            raise ValueError(f"masks must have shape {raw_images.shape[:3]}, got {masks.shape}")
        super().__init__(
            name=name,
            split=split,
            num_examples=n,
            num_classes=len(class_names),
            image_shape=raw_images.shape[1:],
            class_names=class_names,
            has_masks=masks is not None,
            mean=mean,
            std=std,
            pixel_scale=pixel_scale,
        )
        self.raw_images = raw_images
        self.labels = labels.astype(np.int32)
        self.masks = None if masks is None else masks.astype(np.float32)

    @functools.cached_property
    def images(self) -> np.ndarray:
        """All images, normalised float32 (N, H, W, C)."""
        return self.normalize(self.raw_images)

    def take(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """The examples at ``indices`` as a batch dict, normalised, not augmented."""
        indices = np.asarray(indices)
        masks = None if self.masks is None else self.masks[indices]
        return self._finish(
            self.raw_images[indices], self.labels[indices], masks, Augment(), 0, 0, 0
        )

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        augment: Mapping[str, Any] | None = None,
        drop_remainder: bool = True,
        skip_batches: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        steps = self._check_batch_args(batch_size, seed, epoch, drop_remainder, skip_batches)
        settings = parse_augment(augment)
        order = permutation(self.num_examples, seed, epoch, shuffle)
        return self._iterate(order, batch_size, steps, skip_batches, settings, seed, epoch)

    batches.__doc__ = Source.batches.__doc__

    def _iterate(self, order, batch_size, steps, skip_batches, augment, seed, epoch):
        for i in range(skip_batches, steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            masks = None if self.masks is None else self.masks[idx]
            yield self._finish(
                self.raw_images[idx], self.labels[idx], masks, augment, seed, epoch, i
            )

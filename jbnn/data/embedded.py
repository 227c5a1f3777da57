"""Datasets that need no download: scikit-learn's handwritten digits, procedural shapes.

``digits``: the 1,797 real 8x8 handwritten digits scikit-learn ships (UCI optdigits test
set), grey levels 0..16 scaled to [0, 1], bilinearly resized to ``image_size``, split 80/20
stratified by class with a seed fixed in this module (the split never depends on the
training seed).

``shapes``: procedurally generated RGB images of one shape each (circle, square, triangle,
cross, ring) at a random position, size, rotation and colour on a textured, noisy
background, with the ground-truth mask of the shape. Size, colour and rotation are drawn
independently of the class, so only the shape decides it. ``(seed, split)`` decide the
images; train and test draw from disjoint seed sequences.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jbnn.data.core import ArraySource, check_int

DIGITS_SPLIT_SEED = 1797
DIGITS_TEST_FRACTION = 0.2
DIGITS_CLASS_NAMES = tuple(str(d) for d in range(10))

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring")
SHAPES_DEFAULT_NUM_EXAMPLES = {"train": 5000, "test": 1000}
SHAPES_DEFAULT_NOISE_LEVEL = 0.05
SHAPES_MIN_IMAGE_SIZE = 12
_SHAPES_SPLIT_IDS = {"train": 0, "test": 1}
_SHAPES_TAG = 0x5_4A_9E  # names the shapes generator's seed sequences
_SHAPES_STATS_SEED = 2**31 - 1  # the fixed sample that normalisation stats come from
_SHAPES_STATS_EXAMPLES = 1000

EMBEDDED_SPLITS = ("train", "test")


def _check_split(name: str, split: str) -> None:
    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"Unknown split {split!r} for dataset {name!r}; known: {EMBEDDED_SPLITS}")


def _check_kwargs(name: str, kwargs: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for dataset {name!r}; it takes {known}")


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (half-pixel centres, antialiased when shrinking) resize of (N, h, w, C).

    Args:
      images: (N, h, w, C) float array.
      size: the output height and width.

    Returns:
      (N, size, size, C) float32, exactly ``images`` when the size is unchanged.
    """
    import jax

    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float32)
    out = jax.image.resize(
        np.asarray(images, np.float32), (n, size, size, c), method="linear", antialias=True
    )
    return np.asarray(out, np.float32)


def digits_split_indices() -> dict[str, np.ndarray]:
    """The fixed stratified 80/20 split of the 1,797 digits, each index list sorted."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(
        np.arange(len(target)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=target,
        random_state=DIGITS_SPLIT_SEED,
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def load_digits(
    split: str, *, image_size: int | None = None, normalize: bool = True, **kwargs
) -> ArraySource:
    """scikit-learn's 8x8 digits as an in-memory source.

    Args:
      split: ``"train"`` (1,437 images) or ``"test"`` (360).
      image_size: output height and width (default 32); 8 keeps the originals.
      normalize: standardise with the per-channel mean/std of the train split at this size.
      **kwargs: none are accepted (the split's seed is fixed, ``DIGITS_SPLIT_SEED``).

    Returns:
      An :class:`ArraySource` of (image_size, image_size, 1) images, 10 classes.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_split("digits", split)
    _check_kwargs("digits", kwargs, ())
    size = check_int("image_size", 32 if image_size is None else image_size, 1)
    data = sklearn_digits()
    indices = digits_split_indices()
    pixels = data.images.astype(np.float32)[..., None] / 16.0  # (N, 8, 8, 1) in [0, 1]
    images = np.clip(resize_bilinear(pixels, size), 0.0, 1.0)  # (N, S, S, 1)
    if normalize:
        train = images[indices["train"]]
        mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    else:
        mean, std = np.zeros(1), np.ones(1)
    idx = indices[split]
    return ArraySource(
        name="digits",
        split=split,
        raw_images=images[idx],
        labels=data.target[idx],
        class_names=DIGITS_CLASS_NAMES,
        mean=mean,
        std=std,
    )


# The farthest point of any shape from its centre, in radii: the square's corner (the
# cross reaches sqrt(1 + 0.3^2) = 1.044, the others 1).
_SHAPE_EXTENT = 0.8 * np.sqrt(2.0)


def _inside(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether local coordinates (in units of the shape's radius) lie inside the shape."""
    name = SHAPE_CLASSES[label]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":  # half side 0.8: area 2.56 r^2
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":  # equilateral, circumradius 1, apex at v = -1
        return (v <= 0.5) & (v >= np.sqrt(3.0) * np.abs(u) - 1.0)
    if name == "cross":  # arms of half width 0.3, half length 1
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if name == "ring":  # annulus, inner radius 0.55
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    raise AssertionError(name)


def generate_shapes(
    num_examples: int,
    image_size: int,
    rng: np.random.Generator,
    noise_level: float = SHAPES_DEFAULT_NOISE_LEVEL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws shape images, their labels and masks.

    Every image: a background of a random colour plus a random oriented sinusoidal
    texture (amplitude 0.08), one shape (class balanced) of radius 18-34 % of the image,
    random centre with the shape at least 0.5 px inside the image whatever its class and
    rotation, random rotation, a colour that
    differs from the background by 0.3-0.7 in every channel (uniform marginally),
    drawn antialiased (2x2 supersampling), then Gaussian pixel noise of std
    ``noise_level`` and a clip to [0, 1].

    Args:
      num_examples: N.
      image_size: S.
      rng: the generator (all randomness comes from it).
      noise_level: std of the pixel noise.

    Returns:
      ``(images, labels, masks)``: float32 (N, S, S, 3) in [0, 1], int32 (N,), float32
      (N, S, S) in {0, 1} (pixels at least half covered by the shape).
    """
    n, s = num_examples, image_size
    k = len(SHAPE_CLASSES)
    labels = rng.permutation(np.arange(n) % k).astype(np.int32)
    radius = rng.uniform(0.18, 0.34, n) * s  # (N,)
    # Every class keeps the margin of the farthest-reaching shape (a rotated square's
    # corner, 0.8 sqrt(2) radii), so that a shape's position does not reveal its class.
    margin = _SHAPE_EXTENT * radius + 0.5
    cy = rng.uniform(margin, s - margin)  # (N,) in pixel units
    cx = rng.uniform(margin, s - margin)
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    bg_colour = rng.uniform(0.0, 1.0, (n, 3))
    offset = 0.5 + rng.uniform(-0.2, 0.2, (n, 3))
    fg_colour = np.mod(bg_colour + offset, 1.0)  # |fg - bg| in [0.3, 0.7] per channel
    tex_freq = rng.uniform(1.0, 4.0, n) / s  # cycles per pixel
    tex_dir = rng.uniform(0.0, 2.0 * np.pi, n)
    tex_phase = rng.uniform(0.0, 2.0 * np.pi, n)

    f32 = np.float32
    radius, cy, cx, angle = (a.astype(f32) for a in (radius, cy, cx, angle))
    bg_colour, fg_colour = bg_colour.astype(f32), fg_colour.astype(f32)
    tex_freq, tex_dir, tex_phase = (a.astype(f32) for a in (tex_freq, tex_dir, tex_phase))
    grid = np.arange(s, dtype=f32) + f32(0.5)  # pixel centres
    yy, xx = grid[None, :, None], grid[None, None, :]  # (1, S, 1), (1, 1, S)
    texture = np.sin(
        f32(2.0 * np.pi)
        * tex_freq[:, None, None]
        * (np.cos(tex_dir)[:, None, None] * xx + np.sin(tex_dir)[:, None, None] * yy)
        + tex_phase[:, None, None]
    )  # (N, S, S)
    background = bg_colour[:, None, None, :] + f32(0.08) * texture[..., None]  # (N, S, S, 3)

    coverage = np.zeros((n, s, s), np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    for label in range(k):  # a loop over classes, vectorised over their images
        sel = np.flatnonzero(labels == label)
        r = radius[sel, None, None]
        for oy in (f32(-0.25), f32(0.25)):
            for ox in (f32(-0.25), f32(0.25)):
                dy = (yy + oy - cy[sel, None, None]) / r  # (n_k, S, 1)
                dx = (xx + ox - cx[sel, None, None]) / r  # (n_k, 1, S)
                c, si = cos[sel, None, None], sin[sel, None, None]
                u = c * dx + si * dy  # rotate by -angle into the shape's frame
                v = -si * dx + c * dy
                coverage[sel] += f32(0.25) * _inside(label, u, v)
    alpha = coverage[..., None]  # (N, S, S, 1)
    images = background * (1 - alpha) + fg_colour[:, None, None, :] * alpha
    images += f32(noise_level) * rng.standard_normal(images.shape, dtype=f32)
    images = np.clip(images, 0, 1, out=images)
    masks = (coverage >= 0.5).astype(np.float32)
    return images, labels, masks


def _shapes_rng(seed: int, split_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SHAPES_TAG, split_id, seed]))


def load_shapes(
    split: str,
    *,
    image_size: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    num_examples: int | None = None,
    noise_level: float = SHAPES_DEFAULT_NOISE_LEVEL,
    **kwargs,
) -> ArraySource:
    """The procedural shapes dataset as an in-memory source.

    Args:
      split: ``"train"`` (default 5,000 images) or ``"test"`` (default 1,000).
      image_size: height and width (default 32, at least 12).
      seed: with the split, decides every image (int >= 0).
      normalize: standardise with per-channel mean/std of the generator, estimated once
        from a fixed sample of 1,000 images at this size and noise level, so train and
        test share them whatever the seed.
      num_examples: images to generate.
      noise_level: std of the Gaussian pixel noise (>= 0).
      **kwargs: none others are accepted.

    Returns:
      An :class:`ArraySource` of (S, S, 3) images with masks, classes ``SHAPE_CLASSES``.
    """
    _check_split("shapes", split)
    _check_kwargs("shapes", kwargs, ("num_examples", "noise_level"))
    size = check_int("image_size", 32 if image_size is None else image_size, 1)
    if size < SHAPES_MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {SHAPES_MIN_IMAGE_SIZE} for shapes, got {size}")
    seed = check_int("seed", seed, 0)
    if num_examples is None:
        num_examples = SHAPES_DEFAULT_NUM_EXAMPLES[split]
    num_examples = check_int("num_examples", num_examples, 1)
    if not isinstance(noise_level, int | float) or not 0.0 <= noise_level < np.inf:
        raise ValueError(f"noise_level must be a finite float >= 0, got {noise_level!r}")
    images, labels, masks = generate_shapes(
        num_examples, size, _shapes_rng(seed, _SHAPES_SPLIT_IDS[split]), noise_level
    )
    if normalize:
        sample, _, _ = generate_shapes(
            _SHAPES_STATS_EXAMPLES,
            size,
            np.random.default_rng(np.random.SeedSequence([_SHAPES_TAG, _SHAPES_STATS_SEED])),
            noise_level,
        )
        mean, std = sample.mean(axis=(0, 1, 2)), sample.std(axis=(0, 1, 2))
    else:
        mean, std = np.zeros(3), np.ones(3)
    return ArraySource(
        name="shapes",
        split=split,
        raw_images=images,
        labels=labels,
        class_names=SHAPE_CLASSES,
        mean=mean,
        std=std,
        masks=masks,
    )

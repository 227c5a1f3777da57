"""TFDS datasets, read offline: small ones into memory, large ones streamed through tf.data.

TensorFlow and TFDS are imported only when one of these functions runs. jbnn never
downloads: a dataset missing from ``data_dir`` raises :class:`DatasetNotAvailableError`
saying how to get it. The only preparation done here is building ``imagenet2012`` from
the archives the user put in ``manual_dir``, which TFDS does offline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jbnn.data.core import (
    ArraySource,
    Augment,
    Source,
    check_int,
    parse_augment,
    rng_for,
)


class DatasetNotAvailableError(RuntimeError):
    """A TFDS dataset is not available offline; the message says how to get it."""


# name -> (splits, the split "test" stands for, in memory by default, native size,
#          mean, std); mean/std: per-channel statistics of the training split in [0, 1].
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TFDS_DATASETS: dict[str, dict[str, Any]] = {
    "mnist": dict(splits=("train", "test"), in_memory=True, mean=(0.1307,), std=(0.3081,)),
    "fashion_mnist": dict(splits=("train", "test"), in_memory=True, mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(
        splits=("train", "test"),
        in_memory=True,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        splits=("train", "test"),
        in_memory=True,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "svhn_cropped": dict(
        splits=("train", "test", "extra"),
        in_memory=True,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
    ),
    "imagenette": dict(
        splits=("train", "validation"),
        in_memory=False,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
    ),
    "imagenet2012": dict(
        splits=("train", "validation"),
        in_memory=False,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
    ),
}
LARGE_DEFAULT_IMAGE_SIZE = 224
CENTER_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, then centre crop
IMAGENET_ARCHIVES = {
    "train": "ILSVRC2012_img_train.tar",
    "validation": "ILSVRC2012_img_val.tar",
}
_SPLIT_RE = re.compile(r"^([a-z_]+)(\[[^\]]*\])?$")
_READ_BATCH = 1024
_FILE_SHUFFLE_TAG = 2
_BUFFER_SHUFFLE_TAG = 3


def _import_tfds():
    """Imports TFDS and TensorFlow (hiding GPUs from TF, which must not grab them)."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"TFDS datasets need TensorFlow and tensorflow-datasets ({e}); install them "
            "with `pip install 'jbnn[tfds]'`, or use the embedded datasets digits/shapes"
        ) from None
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices: leave them as they are
        pass
    return tf, tfds


def resolve_split(name: str, split: str) -> str:
    """Checks a split against the dataset's and maps ``"test"`` to ``"validation"``.

    Args:
      name: base dataset name (without a TFDS ``/config``).
      split: a split name, optionally with TFDS slicing (``"train[:90%]"``).

    Returns:
      The TFDS split string.

    Raises:
      ValueError: for an unknown split.
    """
    splits = TFDS_DATASETS[name]["splits"]
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    base = match.group(1) if match else None
    if base == "test" and "test" not in splits:
        base = "validation"  # imagenet-style datasets evaluate on validation
    if base not in splits:
        raise ValueError(
            f"Unknown split {split!r} for dataset {name!r}; known: {splits}"
            + (" ('test' means 'validation' here)" if "validation" in splits else "")
            + ", optionally sliced TFDS-style, e.g. 'train[:90%]'"
        )
    return base + (match.group(2) or "")


def _data_dir_text(data_dir: str | None) -> str:
    if data_dir is not None:
        return repr(str(data_dir))
    env = os.environ.get("TFDS_DATA_DIR")
    return f"the default {env or '~/tensorflow_datasets'!r} (no data_dir given)"


def _not_available(name: str, split: str, data_dir: str | None, detail: str) -> str:
    """The message of DatasetNotAvailableError for a dataset TFDS cannot read."""
    shown = "DIR" if data_dir is None else str(data_dir)
    return (
        f"Dataset {name!r} (split {split!r}) is not available offline in "
        f"{_data_dir_text(data_dir)}; jbnn never downloads. To get it, on a machine "
        f"with internet run `tfds build {name} --data_dir {shown}` (or "
        f"`python -c \"import tensorflow_datasets as tfds; tfds.load('{name}', "
        f"data_dir='{shown}')\"`), copy that folder here and pass data_dir=<that folder> "
        f"(config field data_dir). TFDS said: {detail}"
    )


def _check_manual_dir(manual_dir: str | None, split: str, data_dir: str | None) -> str:
    """Validates ``manual_dir`` for building imagenet2012; returns it as a str."""
    base = split.split("[")[0]
    archive = IMAGENET_ARCHIVES[base]
    how = (
        f"ImageNet cannot be downloaded automatically: get {archive} (and "
        f"{', '.join(a for a in IMAGENET_ARCHIVES.values() if a != archive)}) from "
        "https://image-net.org, put the tar files in one folder and pass "
        "manual_dir=<that folder>; TFDS then builds imagenet2012 from them offline into "
        f"data_dir (hours, ~300 GB), or pass data_dir=<a folder where it is already built>"
    )
    if manual_dir is None:
        raise DatasetNotAvailableError(
            f"Dataset 'imagenet2012' is not built in {_data_dir_text(data_dir)} and no "
            f"manual_dir was given. {how}"
        )
    if not os.path.isdir(manual_dir):
        raise DatasetNotAvailableError(
            f"manual_dir {str(manual_dir)!r} does not exist or is not a folder. {how}"
        )
    if not os.path.isfile(os.path.join(manual_dir, archive)):
        raise DatasetNotAvailableError(
            f"manual_dir {str(manual_dir)!r} does not hold {archive}, needed for the "
            f"{base!r} split of imagenet2012. {how}"
        )
    return str(manual_dir)


def _check_config(tfds, name: str) -> None:
    """A ValueError for a config that the dataset does not have ("mnist/x", "cifar10/"):
    it is no missing data, and building it is no remedy."""
    if "/" not in name:
        return
    base, config = name.split("/", 1)
    config = config.split(":")[0]  # "imagenette/160px-v2:1.0.0": a version
    known = list(getattr(tfds.builder_cls(base), "builder_configs", None) or {})
    if config not in known:
        has = f"its configs: {', '.join(known)}" if known else "it has no configs"
        raise ValueError(f"Unknown config {config!r} of TFDS dataset {base!r}; {has}.")


def _builder(tfds, name: str, split: str, data_dir: str | None):
    _check_config(tfds, name)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown config, unreadable data_dir...
        raise DatasetNotAvailableError(
            _not_available(name, split, data_dir, f"{type(e).__name__}: {e}")
        ) from None


def _as_dataset(tfds, builder, name, split, data_dir, manual_dir, **kwargs):
    """``builder.as_dataset`` with TFDS's 'not prepared' errors turned into ours.

    imagenet2012 missing from ``data_dir`` is built from ``manual_dir`` (offline).
    """
    base = name.split("/")[0]
    for attempt in range(2):
        try:
            return builder.as_dataset(split=split, **kwargs)
        except (AssertionError, FileNotFoundError, tfds.core.DatasetNotFoundError) as e:
            # TFDS's own advice (download=True) does not apply offline: keep the finding.
            detail = f"{type(e).__name__}: {str(e).split('. Please')[0]}"
        except ValueError as e:  # e.g. a split TFDS does not know for this version
            raise ValueError(f"TFDS cannot read split {split!r} of {name!r}: {e}") from None
        if base != "imagenet2012" or attempt == 1:
            raise DatasetNotAvailableError(_not_available(name, split, data_dir, detail))
        manual_dir = _check_manual_dir(manual_dir, split, data_dir)
        config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
        try:
            builder.download_and_prepare(download_config=config)
        except Exception as e:
            raise DatasetNotAvailableError(
                f"Building imagenet2012 from manual_dir {manual_dir!r} into "
                f"{_data_dir_text(data_dir)} failed: {type(e).__name__}: {e}"
            ) from None
    raise AssertionError("unreachable")


def _preprocess_fn(tf, image_size: int | None, channels: int, crop: bool, encoded: bool):
    """A tf function: (encoded or decoded) image -> uint8 (S, S, C)."""

    def preprocess(image):
        if encoded:
            image = tf.io.decode_image(image, channels=channels, expand_animations=False)
        if image_size is None:
            return image
        if crop:  # shorter side to size / 0.875, then the central size x size
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            scale = (image_size / CENTER_CROP_FRACTION) / tf.reduce_min(shape)
            new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
            image = tf.image.resize(image, new, method="bilinear", antialias=True)
            top = (new[0] - image_size) // 2
            left = (new[1] - image_size) // 2
            image = image[top : top + image_size, left : left + image_size]
        else:
            image = tf.image.resize(
                image, (image_size, image_size), method="bilinear", antialias=True
            )
        image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
        return tf.ensure_shape(tf.cast(image, tf.uint8), (image_size, image_size, channels))

    return preprocess


def load_tfds(
    name: str,
    split: str,
    *,
    image_size: int | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    normalize: bool = True,
    in_memory: bool | None = None,
    shuffle_buffer: int = 10_000,
    **kwargs,
) -> Source:
    """Reads a TFDS dataset offline.

    Args:
      name: a TFDS name from ``TFDS_DATASETS``, optionally with a config
        (``"imagenette/160px-v2"``).
      split: ``"train"``, ``"test"`` (``"validation"`` for imagenette/imagenet2012),
        other splits the dataset has, optionally sliced (``"train[:90%]"``).
      image_size: resize to this height and width; default: the native size for the
        small datasets, 224 for imagenette/imagenet2012 (resize the shorter side to
        size / 0.875, then centre crop).
      data_dir: the TFDS data folder (default: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      manual_dir: for imagenet2012 not yet built in ``data_dir``: the folder holding
        ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar.
      normalize: standardise with the dataset's usual per-channel mean/std.
      in_memory: read the split into an :class:`ArraySource` (default for the small
        datasets) or stream it through tf.data (default for the large ones).
      shuffle_buffer: shuffle buffer of a streamed split (examples, >= 1).
      **kwargs: none others are accepted.

    Returns:
      An :class:`ArraySource` or a :class:`StreamSource`.

    Raises:
      DatasetNotAvailableError: the dataset is not in ``data_dir`` (or ``manual_dir`` is
        missing for imagenet2012).
      ValueError: an unknown split or option.
    """
    base = name.split("/")[0]
    if kwargs:
        raise ValueError(
            f"Unknown option(s) {sorted(kwargs)} for dataset {name!r}; "
            "it takes in_memory, shuffle_buffer"
        )
    tfds_split = resolve_split(base, split)
    spec = TFDS_DATASETS[base]
    large = not spec["in_memory"]
    if image_size is None and large:
        image_size = LARGE_DEFAULT_IMAGE_SIZE
    if image_size is not None:
        image_size = check_int("image_size", image_size, 1)
    in_memory = spec["in_memory"] if in_memory is None else bool(in_memory)
    shuffle_buffer = check_int("shuffle_buffer", shuffle_buffer, 1)
    # manual_dir is checked only if imagenet2012 must be built (_as_dataset): a stale
    # path must not refuse data that data_dir already holds.
    tf, tfds = _import_tfds()
    builder = _builder(tfds, name, split, data_dir)
    features = builder.info.features
    channels = features["image"].shape[-1]
    class_names = tuple(features["label"].names)
    if normalize:
        mean, std = spec["mean"], spec["std"]
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    preprocess = _preprocess_fn(tf, image_size, channels, crop=large, encoded=large)
    decoders = {"image": tfds.decode.SkipDecoding()} if large else None
    read = dict(
        tfds=tfds,
        builder=builder,
        name=name,
        split=tfds_split,
        data_dir=data_dir,
        manual_dir=manual_dir,
        decoders=decoders,
    )
    if not in_memory:
        dataset = _as_dataset(**read, shuffle_files=False)
        num_examples = int(dataset.cardinality())
        if num_examples < 0:  # unknown cardinality: trust the metadata
            num_examples = builder.info.splits[tfds_split].num_examples
        size = image_size or features["image"].shape[0]
        return StreamSource(
            name=name,
            split=split,
            num_examples=num_examples,
            image_shape=(size, size, channels),
            class_names=class_names,
            mean=mean,
            std=std,
            read=read,
            preprocess=preprocess,
            shuffle_buffer=shuffle_buffer,
        )

    dataset = _as_dataset(**read, shuffle_files=False)
    dataset = dataset.map(
        lambda ex: (preprocess(ex["image"]), ex["label"]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    images, labels = [], []
    for image, label in dataset.batch(_READ_BATCH).prefetch(2).as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        raise DatasetNotAvailableError(f"Split {split!r} of {name!r} is empty in {data_dir!r}")
    return ArraySource(
        name=name,
        split=split,
        raw_images=np.concatenate(images),
        labels=np.concatenate(labels),
        class_names=class_names,
        mean=mean,
        std=std,
        pixel_scale=1.0 / 255.0,
    )


class StreamSource(Source):
    """A TFDS split streamed through tf.data, with the :class:`Source` batch contract.

    The epoch's order: TFDS file order shuffled with a seed from ``(seed, epoch)``, then a
    ``shuffle_buffer`` shuffle with another such seed; examples are decoded and resized
    after the skipped ones are dropped, so resuming is cheap. Augmentation and
    normalisation are the same numpy code as for in-memory sources.
    """

    def __init__(self, *, read, preprocess, shuffle_buffer, **fields):
        super().__init__(
            num_classes=len(fields["class_names"]), has_masks=False, pixel_scale=1 / 255, **fields
        )
        self._read = read
        self._preprocess = preprocess
        self.shuffle_buffer = shuffle_buffer

    def _tf_seed(self, seed: int, epoch: int, tag: int) -> int:
        return int(rng_for(seed, epoch, tag).integers(0, 2**31 - 1))

    def dataset(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        skip_batches: int = 0,
    ):
        """The tf.data pipeline of raw batches ``(uint8 (B, S, S, C), int64 (B,))``."""
        tf, tfds = _import_tfds()
        read_config = tfds.ReadConfig(
            shuffle_seed=self._tf_seed(seed, epoch, _FILE_SHUFFLE_TAG) if shuffle else None
        )
        ds = _as_dataset(**self._read, shuffle_files=shuffle, read_config=read_config)
        ds = ds.map(lambda ex: (ex["image"], ex["label"]))
        if shuffle:
            ds = ds.shuffle(
                self.shuffle_buffer,
                seed=self._tf_seed(seed, epoch, _BUFFER_SHUFFLE_TAG),
                reshuffle_each_iteration=False,
            )
        ds = ds.skip(skip_batches * batch_size)
        ds = ds.map(
            lambda image, label: (self._preprocess(image), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    def take(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """The examples at ``indices`` as a batch dict, normalised, not augmented.

        An index is a position in the split's stored order (what ``batches(...,
        shuffle=False)`` yields, and an in-memory load of the same split holds at that
        index). The split is read in that order up to the largest index; only the
        examples asked for are decoded and resized.

        Raises:
          ValueError: for indices that are not ints in ``[0, num_examples)``.
        """
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a 1-D array of ints, got {indices!r}")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise ValueError(
                f"indices must lie in [0, {self.num_examples}) for {self.name!r}/"
                f"{self.split!r}, got {indices.min()}..{indices.max()}"
            )
        size = self.image_shape
        if not indices.size:
            empty = np.zeros((0, *size), np.uint8)
            return self._finish(empty, np.zeros(0, np.int64), None, Augment(), 0, 0, 0)
        tf, tfds = _import_tfds()
        wanted = np.zeros(int(indices.max()) + 1, bool)
        wanted[indices] = True
        wanted_tf = tf.constant(wanted)
        # no auto-cache: a cache that is read only up to the last index is discarded
        read_config = tfds.ReadConfig(try_autocache=False)
        ds = _as_dataset(**self._read, shuffle_files=False, read_config=read_config)
        ds = ds.take(len(wanted)).enumerate()
        ds = ds.filter(lambda i, ex: tf.gather(wanted_tf, i))
        ds = ds.map(
            lambda i, ex: (i, self._preprocess(ex["image"]), ex["label"]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        found, images, labels = [], [], []
        for i, image, label in ds.batch(256).prefetch(2).as_numpy_iterator():
            found.append(i)
            images.append(image)
            labels.append(label)
        found = np.concatenate(found) if found else np.zeros(0, np.int64)
        row = {int(i): r for r, i in enumerate(found)}
        missing = sorted(set(indices.tolist()) - set(row))
        if missing:
            raise ValueError(
                f"{self.name!r}/{self.split!r} holds fewer examples than its recorded "
                f"{self.num_examples}: no example at index {missing[0]}"
            )
        rows = np.array([row[int(i)] for i in indices])
        raw = np.concatenate(images)[rows]
        return self._finish(raw, np.concatenate(labels)[rows], None, Augment(), 0, 0, 0)

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
        ds = self.dataset(
            batch_size,
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            drop_remainder=drop_remainder,
            skip_batches=skip_batches,
        )
        return self._iterate(ds, steps, skip_batches, settings, seed, epoch)

    batches.__doc__ = Source.batches.__doc__

    def _iterate(self, ds, steps, skip_batches, augment: Augment, seed, epoch):
        for i, (images, labels) in enumerate(ds.as_numpy_iterator(), start=skip_batches):
            if i >= steps:
                return
            yield self._finish(images, labels, None, augment, seed, epoch, i)

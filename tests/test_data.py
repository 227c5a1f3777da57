"""Tests for jbnn.data: embedded datasets, batching, augmentation, TFDS (mocked) and errors."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import scipy.ndimage
from sklearn.datasets import load_digits as sklearn_digits

from jbnn import data

# ---------------------------------------------------------------------------- helpers


def toy_source(n: int = 103, size: int = 6, dtype=np.float32, masks: bool = True):
    """An ArraySource whose pixel (0, 0, 0) identifies the example: n / 1000 + small."""
    rng = np.random.default_rng(123)
    if dtype == np.uint8:
        raw = rng.integers(0, 256, (n, size, size, 2), dtype=np.uint8)
    else:
        raw = rng.uniform(0.0, 1.0, (n, size, size, 2)).astype(np.float32)
    return data.ArraySource(
        name="toy",
        split="train",
        raw_images=raw,
        labels=np.arange(n) % 7,
        class_names=tuple("abcdefg"),
        mean=np.array([0.5, 0.25]),
        std=np.array([2.0, 4.0]),
        pixel_scale=1 / 255 if dtype == np.uint8 else 1.0,
        masks=rng.uniform(size=(n, size, size)).astype(np.float32) if masks else None,
    )


def example_ids(source: data.ArraySource, images: np.ndarray) -> np.ndarray:
    """Which stored examples a batch of (unaugmented, normalised) images are."""
    flat = source.images.reshape(source.num_examples, -1)
    ids = []
    for image in images.reshape(images.shape[0], -1):
        (match,) = np.flatnonzero((flat == image).all(axis=1))
        ids.append(match)
    return np.array(ids)


def reference_augment(image, dy, dx, flip, padding, mode):
    """Slow per-image reference: np.pad, slice, flip."""
    pad = [(padding, padding), (padding, padding)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode="constant" if mode == "zeros" else "reflect")
    h, w = image.shape[:2]
    out = padded[dy : dy + h, dx : dx + w]
    return out[:, ::-1] if flip else out


def collect(iterator) -> list[dict[str, np.ndarray]]:
    return [dict(b) for b in iterator]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ---------------------------------------------------------------------------- names/errors


def test_names_and_unknown_dataset():
    assert data.NAMES[:2] == ("digits", "shapes")
    for name in ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped"):
        assert name in data.NAMES
    assert "imagenette" in data.NAMES and "imagenet2012" in data.NAMES
    with pytest.raises(ValueError, match="Unknown dataset 'cifar11'.*digits, shapes, mnist"):
        data.load("cifar11")
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.load("digits/extra")


@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_embedded_bad_split_and_options(name):
    with pytest.raises(ValueError, match=f"Unknown split 'validation' for dataset '{name}'"):
        data.load(name, "validation")
    with pytest.raises(ValueError, match="Unknown option"):
        data.load(name, "train", colour="red")
    with pytest.raises(ValueError, match="image_size"):
        data.load(name, "train", image_size=0)


# ---------------------------------------------------------------------------- digits


def test_digits_split_sizes_stratified_disjoint():
    target = sklearn_digits().target
    train = data.load("digits", "train")
    test = data.load("digits", "test")
    assert train.num_examples + test.num_examples == 1797 == len(target)
    assert test.num_examples == 360
    assert train.num_classes == test.num_classes == 10
    assert train.image_shape == (32, 32, 1)
    # The split is the same whatever the seed.
    other = data.load("digits", "test", seed=99)
    np.testing.assert_array_equal(other.raw_images, test.raw_images)
    # Stratified: each class's test share is 20% up to rounding.
    class_counts = np.bincount(target, minlength=10)
    test_counts = np.bincount(test.labels, minlength=10)
    np.testing.assert_array_less(np.abs(test_counts - 0.2 * class_counts), 1.0 + 1e-9)
    np.testing.assert_array_equal(
        np.bincount(train.labels, minlength=10) + test_counts, class_counts
    )


def test_digits_are_sklearns_digits_and_disjoint():
    sk = sklearn_digits()
    flat = (sk.images / 16.0).reshape(1797, 64)
    seen = []
    for split in ("train", "test"):
        source = data.load("digits", split, image_size=8, normalize=False)
        assert source.raw_images.dtype == np.float32
        for image, label in zip(source.raw_images, source.labels, strict=True):
            matches = np.flatnonzero((flat == image.reshape(64)).all(axis=1))
            assert len(matches) >= 1  # the exact sklearn image (duplicates exist)
            assert label in sk.target[matches]
            seen.append(image.tobytes())
    # Every sklearn image is used exactly as often as it occurs: disjoint and complete.
    expected = sorted(x.astype(np.float32).tobytes() for x in flat)
    assert sorted(seen) == expected


def test_digits_upsampling_is_bilinear():
    small = data.load("digits", "test", image_size=8, normalize=False).raw_images[..., 0]
    big = data.load("digits", "test", image_size=32, normalize=False).raw_images[..., 0]
    reference = np.stack(
        [scipy.ndimage.zoom(x, 4, order=1, grid_mode=True, mode="nearest") for x in small]
    )
    np.testing.assert_allclose(big, reference, atol=1e-5)


def test_digits_normalisation():
    train = data.load("digits", "train")
    raw = data.load("digits", "train", normalize=False)
    np.testing.assert_array_equal(raw.mean, [0.0])
    np.testing.assert_array_equal(raw.std, [1.0])
    np.testing.assert_allclose(train.images.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.images.std(), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        train.images, (raw.raw_images - train.mean) / train.std, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(train.unnormalize(train.images), raw.raw_images, atol=1e-6)
    # The test split uses the train split's statistics.
    test = data.load("digits", "test")
    np.testing.assert_array_equal(test.mean, train.mean)
    assert train.images.dtype == np.float32


# ---------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def shapes_small():
    return data.load("shapes", "train", num_examples=500, seed=3, normalize=False)


def test_shapes_layout_and_determinism(shapes_small):
    s = shapes_small
    assert s.image_shape == (32, 32, 3) and s.has_masks and s.num_examples == 500
    assert s.class_names == data.SHAPE_CLASSES and s.num_classes == len(data.SHAPE_CLASSES) >= 4
    assert s.raw_images.dtype == np.float32 and s.masks.dtype == np.float32
    assert s.masks.shape == (500, 32, 32) and set(np.unique(s.masks)) <= {0.0, 1.0}
    assert s.raw_images.min() >= 0.0 and s.raw_images.max() <= 1.0
    again = data.load("shapes", "train", num_examples=500, seed=3, normalize=False)
    np.testing.assert_array_equal(again.raw_images, s.raw_images)
    np.testing.assert_array_equal(again.masks, s.masks)
    np.testing.assert_array_equal(again.labels, s.labels)
    other = data.load("shapes", "train", num_examples=500, seed=4, normalize=False)
    assert not np.allclose(other.raw_images, s.raw_images)
    test = data.load("shapes", "test", num_examples=500, seed=3, normalize=False)
    assert not np.allclose(test.raw_images, s.raw_images)
    # Balanced classes.
    counts = np.bincount(s.labels, minlength=s.num_classes)
    assert counts.max() - counts.min() <= 1
    small = data.load("shapes", "test", image_size=16, num_examples=10)
    assert small.image_shape == (16, 16, 3)
    assert data.load("shapes", "test").num_examples == 1000


def test_shapes_masks_lie_on_the_object(shapes_small):
    s = shapes_small
    m = s.masks.astype(bool)
    area = m.mean(axis=(1, 2))
    assert area.min() > 0.02 and area.max() < 0.5
    for image, mask in zip(s.raw_images, m, strict=True):
        inside = image[mask].mean(axis=0)
        outside = image[~mask].mean(axis=0)
        # The object's colour differs from the background's by >= 0.3 per channel
        # (minus the texture and noise); away from its antialiased edge the object is
        # one colour plus pixel noise (std 0.05).
        assert np.abs(inside - outside).min() > 0.15
        interior = scipy.ndimage.binary_erosion(mask)
        assert image[interior].std(axis=0).max() < 0.08
    # The shape decides the class: a ring's centroid lies in its hole, a disc's on it.
    for label, expected in [("circle", 1.0), ("square", 1.0), ("ring", 0.0), ("cross", 1.0)]:
        k = s.class_names.index(label)
        for mask in s.masks[s.labels == k][:20]:
            ys, xs = np.nonzero(mask)
            assert mask[int(round(ys.mean() - 0.5)), int(round(xs.mean() - 0.5))] == expected


def test_shapes_class_is_not_in_colour_or_a_single_pixel(shapes_small):
    from sklearn.tree import DecisionTreeClassifier

    s = shapes_small
    y = s.labels
    half = s.num_examples // 2
    colour = s.raw_images.mean(axis=(1, 2))  # (N, 3)
    pixels = s.raw_images.reshape(s.num_examples, -1)
    for features, depth in [(colour, 4), (pixels, 1)]:
        tree = DecisionTreeClassifier(max_depth=depth, random_state=0)
        tree.fit(features[:half], y[:half])
        accuracy = tree.score(features[half:], y[half:])
        assert accuracy < 0.4, accuracy  # chance is 0.2
    # Size is drawn independently of the class: the mask bounding box overlaps.
    extent = np.array([np.ptp(np.nonzero(m)[1]) for m in s.masks])
    ranges = [(extent[y == k].min(), extent[y == k].max()) for k in range(s.num_classes)]
    assert max(lo for lo, _ in ranges) < min(hi for _, hi in ranges)


def test_shapes_centre_margin_covers_the_farthest_point_of_every_shape():
    """The centres keep every class's shape inside the image: the margin, in radii, is
    the farthest inside point of any shape, found here on a fine grid (a margin of one
    radius let rotated squares stick out by up to 0.9 px at 32 px, 5 px at 128)."""
    from jbnn.data import embedded

    step = 1e-3
    u, v = np.meshgrid(np.arange(-1.5, 1.5, step), np.arange(-1.5, 1.5, step))
    farthest = [
        np.sqrt(u * u + v * v)[embedded._inside(k, u, v)].max()
        for k in range(len(data.SHAPE_CLASSES))
    ]
    assert max(farthest) <= embedded._SHAPE_EXTENT + 2 * step
    assert max(farthest) >= embedded._SHAPE_EXTENT - 2 * step  # and no wider than needed


def test_shapes_normalisation_is_shared_by_splits():
    train = data.load("shapes", "train", num_examples=200, seed=0)
    test = data.load("shapes", "test", num_examples=200, seed=7)
    np.testing.assert_array_equal(train.mean, test.mean)
    np.testing.assert_array_equal(train.std, test.std)
    assert train.mean.shape == (3,)
    assert np.all(np.abs(train.images.mean(axis=(0, 1, 2))) < 0.2)
    assert np.all(np.abs(train.images.std(axis=(0, 1, 2)) - 1.0) < 0.2)


# ---------------------------------------------------------------------------- batches


def test_batches_layout_and_epoch_coverage():
    s = toy_source()
    assert s.steps_per_epoch(10) == 10 and s.steps_per_epoch(10, drop_remainder=False) == 11
    batches = collect(s.batches(10, seed=0, epoch=0, drop_remainder=False))
    assert len(batches) == 11 and batches[-1]["label"].shape == (3,)
    b = batches[0]
    assert set(b) == {"image", "label", "mask"}
    assert b["image"].shape == (10, 6, 6, 2) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].shape == (10, 6, 6)
    ids = np.concatenate([example_ids(s, x["image"]) for x in batches])
    assert sorted(ids) == list(range(103))  # every example once
    for x in batches:
        i = example_ids(s, x["image"])
        np.testing.assert_array_equal(x["label"], s.labels[i])
        np.testing.assert_array_equal(x["mask"], s.masks[i])
    ordered = collect(s.batches(10, seed=0, epoch=0, shuffle=False))
    np.testing.assert_array_equal(example_ids(s, ordered[1]["image"]), np.arange(10, 20))
    assert len(ordered) == 10  # drop_remainder


def test_batches_deterministic_and_epoch_changes_order():
    s = toy_source()
    first = collect(s.batches(16, seed=5, epoch=2))
    assert_same_batches(first, collect(s.batches(16, seed=5, epoch=2)))
    order = lambda seed, epoch: np.concatenate(
        [example_ids(s, b["image"]) for b in s.batches(16, seed=seed, epoch=epoch)]
    )
    assert not np.array_equal(order(5, 2), order(5, 3))
    assert not np.array_equal(order(5, 2), order(6, 2))
    np.testing.assert_array_equal(order(5, 2), order(5, 2))


@pytest.mark.parametrize("augment", [None, {"crop_padding": 2, "flip": True}])
def test_skip_batches_is_the_continuation(augment):
    s = toy_source()
    full = collect(s.batches(8, seed=1, epoch=4, augment=augment))
    for k in (0, 1, 5, len(full)):
        rest = collect(s.batches(8, seed=1, epoch=4, augment=augment, skip_batches=k))
        assert_same_batches(rest, full[k:])
    # Interrupting an iterator and resuming with skip_batches gives the same stream.
    it = s.batches(8, seed=1, epoch=4, augment=augment)
    head = list(itertools.islice(it, 3))
    tail = collect(s.batches(8, seed=1, epoch=4, augment=augment, skip_batches=3))
    assert_same_batches(head + tail, full)


def test_batch_argument_errors():
    s = toy_source(n=20)
    with pytest.raises(ValueError, match="batch_size=50 exceeds the 20 examples"):
        s.batches(50, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        s.batches(0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="skip_batches=3 exceeds the 2 batches"):
        s.batches(10, seed=0, epoch=0, skip_batches=3)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        s.batches(10, seed=-1, epoch=0)
    # numpy's SeedSequence splits an int >= 2**32 into words: (2**32, 0) would draw the
    # stream of (0, 1), so such seeds are refused.
    assert np.array_equal(
        np.random.default_rng(np.random.SeedSequence([2**32, 0, 0])).permutation(20),
        np.random.default_rng(np.random.SeedSequence([0, 1, 0])).permutation(20),
    )
    with pytest.raises(ValueError, match=r"seed must be < 2\*\*32"):
        collect(s.batches(10, seed=2**32, epoch=0))
    with pytest.raises(ValueError, match="Unknown augment key"):
        s.batches(10, seed=0, epoch=0, augment={"rotate": 3})
    with pytest.raises(ValueError, match="padding_mode"):
        s.batches(10, seed=0, epoch=0, augment={"crop_padding": 1, "padding_mode": "wrap"})
    with pytest.raises(ValueError, match="flip"):
        s.batches(10, seed=0, epoch=0, augment={"flip": "yes"})
    assert len(collect(s.batches(20, seed=0, epoch=0))) == 1


# ---------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_apply_augment_matches_per_image_reference(mode, dtype):
    rng = np.random.default_rng(0)
    images = (rng.uniform(size=(40, 7, 5, 3)) * 255).astype(dtype)
    masks = rng.uniform(size=(40, 7, 5)).astype(np.float32)
    p = 3
    dy, dx = rng.integers(0, 2 * p + 1, 40), rng.integers(0, 2 * p + 1, 40)
    flips = rng.random(40) < 0.5
    out, out_masks = data.apply_augment(
        images, dy, dx, flips, crop_padding=p, padding_mode=mode, masks=masks
    )
    assert out.dtype == images.dtype and out.shape == images.shape
    for i in range(40):
        ref = reference_augment(images[i], dy[i], dx[i], flips[i], p, mode)
        np.testing.assert_array_equal(out[i], ref)
        ref_mask = reference_augment(masks[i], dy[i], dx[i], flips[i], p, mode)
        np.testing.assert_array_equal(out_masks[i], ref_mask)


@pytest.mark.parametrize(
    "augment",
    [
        {"flip": True},
        {"crop_padding": 2},
        {"crop_padding": 2, "flip": True, "padding_mode": "reflect"},
    ],
)
def test_batches_augmentation_does_what_it_says(augment):
    s = toy_source(n=64, dtype=np.uint8)
    plain = collect(s.batches(16, seed=3, epoch=1))
    augmented = collect(s.batches(16, seed=3, epoch=1, augment=augment))
    assert_same_batches(augmented, collect(s.batches(16, seed=3, epoch=1, augment=augment)))
    other_epoch = collect(s.batches(16, seed=3, epoch=2, augment=augment))
    p = augment.get("crop_padding", 0)
    mode = augment.get("padding_mode", "zeros")
    flips = (False, True) if augment.get("flip") else (False,)
    candidates = list(itertools.product(range(2 * p + 1), range(2 * p + 1), flips))
    used = set()
    for a, b in zip(plain, augmented, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])  # same examples, same order
        raw = np.round(s.unnormalize(a["image"]) * 255).astype(np.uint8)
        for i in range(16):
            found = [
                c
                for c in candidates
                if np.allclose(
                    s.normalize(reference_augment(raw[i], *c, p, mode)), b["image"][i], atol=1e-5
                )
                and np.array_equal(reference_augment(a["mask"][i], *c, p, mode), b["mask"][i])
            ]
            assert found, f"augmented image {i} is no crop/flip of its original"
            used.update(found)
    # The random parameters really vary (both flips, several offsets).
    assert len(used) > 3 if p else len(used) == 2
    assert not all(
        np.array_equal(x["image"], y["image"]) for x, y in zip(augmented, other_epoch, strict=True)
    )


def test_no_augmentation_is_identity():
    s = toy_source()
    for augment in (None, {}, {"crop_padding": 0, "flip": False}):
        assert_same_batches(
            collect(s.batches(8, seed=0, epoch=0, augment=augment)),
            collect(s.batches(8, seed=0, epoch=0)),
        )


# ---------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    return tfds


@pytest.fixture
def no_download(tfds, monkeypatch):
    """Makes any TFDS download/prepare attempt fail loudly and records it."""
    calls = []

    def forbidden(self, *args, **kwargs):
        calls.append(self.name)
        config = kwargs.get("download_config")
        raise AssertionError(
            f"download_and_prepare({self.name}) called, manual_dir="
            f"{getattr(config, 'manual_dir', None)}, "
            f"try_download_gcs={getattr(config, 'try_download_gcs', None)}"
        )

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", forbidden)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, shape, mean",
    [("mnist", (28, 28, 1), (0.1307,)), ("cifar10", (32, 32, 3), (0.4914, 0.4822, 0.4465))],
)
def test_tfds_in_memory_under_mock(tfds, name, shape, mean):
    with tfds.testing.mock_data(num_examples=70):
        source = data.load(name, "train")
        raw = data.load(name, "train", normalize=False)
        test = data.load(name, "test")
    assert isinstance(source, data.ArraySource)
    assert source.num_examples == 70 and test.num_examples == 70
    assert source.image_shape == shape and source.num_classes == 10
    assert source.raw_images.dtype == np.uint8
    np.testing.assert_allclose(source.mean, mean, rtol=1e-6)
    expected = (raw.raw_images.astype(np.float32) / 255.0 - source.mean) / source.std
    np.testing.assert_allclose(source.images, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw.images, raw.raw_images / 255.0, rtol=1e-6)
    batches = collect(source.batches(16, seed=0, epoch=0, augment={"crop_padding": 4}))
    assert len(batches) == 4 == source.steps_per_epoch(16)
    for b in batches:
        assert b["image"].shape == (16, *shape) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and set(b) == {"image", "label"}
        assert b["label"].min() >= 0 and b["label"].max() < 10
    resized = None
    with tfds.testing.mock_data(num_examples=5):
        resized = data.load(name, "test", image_size=20)
    assert resized.image_shape == (20, 20, shape[2])


@pytest.mark.slow
def test_tfds_streaming_matches_in_memory_and_resumes(tfds):
    with tfds.testing.mock_data(num_examples=45):
        memory = data.load("mnist", "train")
        stream = data.load("mnist", "train", in_memory=False, shuffle_buffer=64)
        assert isinstance(stream, data.StreamSource) and stream.num_examples == 45
        assert stream.image_shape == (28, 28, 1)
        ordered = collect(stream.batches(9, seed=0, epoch=0, shuffle=False))
        epoch0 = collect(stream.batches(9, seed=0, epoch=0))
        again = collect(stream.batches(9, seed=0, epoch=0))
        epoch1 = collect(stream.batches(9, seed=0, epoch=1))
        resumed = collect(stream.batches(9, seed=0, epoch=0, skip_batches=2))
        augmented = collect(stream.batches(9, seed=0, epoch=0, augment={"flip": True}))
    assert len(ordered) == 5 == stream.steps_per_epoch(9)
    images = np.concatenate([b["image"] for b in ordered])
    np.testing.assert_allclose(images, memory.images, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in ordered]), memory.labels)
    assert_same_batches(epoch0, again)
    assert_same_batches(resumed, epoch0[2:])
    shuffled = np.concatenate([b["image"] for b in epoch0])
    order0 = example_ids(memory, shuffled)
    assert sorted(order0) == list(range(45))
    assert not np.array_equal(order0, np.arange(45))
    order1 = example_ids(memory, np.concatenate([b["image"] for b in epoch1]))
    assert not np.array_equal(order0, order1)
    for a, b in zip(epoch0, augmented, strict=True):
        for x, y in zip(a["image"], b["image"], strict=True):
            assert np.array_equal(x, y) or np.array_equal(x[:, ::-1], y)


@pytest.mark.slow
def test_tfds_large_dataset_streams_resized(tfds):
    with tfds.testing.mock_data(num_examples=12):
        source = data.load("imagenette", "test", image_size=24)
        batches = collect(source.batches(4, seed=0, epoch=0, augment={"crop_padding": 2}))
        ordered = collect(source.batches(4, seed=0, epoch=0, shuffle=False))
        taken = source.take([5, 2, 11])  # encoded images: decoded after the selection
        net = data.load("imagenet2012", "train", image_size=16)
        first = next(net.batches(6, seed=0, epoch=0))
        # manual_dir only builds a missing imagenet2012: a stale path does not refuse it.
        stale = data.load("imagenet2012", "train", image_size=16, manual_dir="/no/such/dir")
        assert stale.num_examples == net.num_examples
    assert isinstance(source, data.StreamSource) and source.num_classes == 10
    assert source.image_shape == (24, 24, 3) and len(batches) == 3
    assert batches[0]["image"].shape == (4, 24, 24, 3)
    ordered = np.concatenate([b["image"] for b in ordered])
    np.testing.assert_array_equal(taken["image"], ordered[[5, 2, 11]])
    np.testing.assert_allclose(source.mean, (0.485, 0.456, 0.406))
    assert first["image"].shape == (6, 16, 16, 3) and net.num_classes == 1000


@pytest.fixture(scope="module")
def prepared_mnist(tfds, tmp_path_factory):
    """A real, offline-built TFDS folder named mnist (4 shards), image i = pixel value i."""

    class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "mnist"
        VERSION = tfds.core.Version("3.0.1")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(0, 60),
                "test": self._generate_examples(100, 10),
            }

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                yield i, {"image": np.full((28, 28, 1), i, np.uint8), "label": i % 10}

    data_dir = tmp_path_factory.mktemp("tfds")
    config = tfds.download.DownloadConfig(num_shards=4)
    FakeMnist(data_dir=str(data_dir)).download_and_prepare(download_config=config)
    return str(data_dir)


@pytest.mark.slow
def test_tfds_reads_prepared_files_offline(prepared_mnist, no_download):
    ids = lambda batch: np.round(batch["image"][:, 3, 3, 0] * 255).astype(int)
    memory = data.load("mnist", "train", data_dir=prepared_mnist, normalize=False)
    test = data.load("mnist", "test", data_dir=prepared_mnist, normalize=False)
    assert memory.num_examples == 60 and test.num_examples == 10
    assert sorted(ids(memory.take(np.arange(60)))) == list(range(60))
    assert sorted(ids(test.take(np.arange(10)))) == list(range(100, 110))
    np.testing.assert_array_equal(memory.labels, ids(memory.take(np.arange(60))) % 10)
    stream = data.load(
        "mnist",
        "train",
        data_dir=prepared_mnist,
        normalize=False,
        in_memory=False,
        shuffle_buffer=8,
    )
    assert stream.num_examples == 60
    order = lambda epoch, skip=0: [
        ids(b) for b in stream.batches(10, seed=2, epoch=epoch, skip_batches=skip)
    ]
    epoch0, again, epoch1 = order(0), order(0), order(1)
    assert sorted(np.concatenate(epoch0)) == list(range(60))  # files shuffled, all read once
    np.testing.assert_array_equal(epoch0, again)
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(order(0, skip=4), epoch0[4:])
    assert no_download == []


@pytest.mark.slow
def test_streamed_split_takes_the_examples_asked_for(prepared_mnist, no_download):
    ids = lambda batch: np.round(batch["image"][:, 3, 3, 0] * 255).astype(int)
    kw = dict(data_dir=prepared_mnist, normalize=False)
    stream = data.load("mnist", "train", in_memory=False, **kw)
    memory = data.load("mnist", "train", **kw)
    want = np.array([41, 3, 57, 3, 0, 20])  # any order, repeats kept
    got = stream.take(want)
    expected = memory.take(want)
    assert set(got) == {"image", "label"} and got["image"].dtype == np.float32
    # the stored order: memory.take's index i is the example a stream reads i-th
    np.testing.assert_array_equal(ids(got), ids(expected))
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
    assert stream.take([])["image"].shape == (0, 28, 28, 1)
    for bad in ([60], [-1], [1.5]):
        with pytest.raises(ValueError, match="indices must"):
            stream.take(bad)
    assert no_download == []


@pytest.mark.slow
def test_study_samples_a_streamed_split_as_an_in_memory_one(prepared_mnist, no_download):
    # The study took the first num_images images of a streamed (TFDS) split, where the
    # README says every random draw, the image sample included, derives from config.seed.
    import jax
    import ml_collections

    from jbnn import study

    config = ml_collections.ConfigDict(
        dict(dataset="mnist", eval_split="train", data_dir=prepared_mnist, seed=0)
    )
    settings = study.Settings(num_images=7)

    def load(in_memory, seed):
        config.data_kwargs = {"in_memory": in_memory}
        source, images, labels, _, display, indices = study._load_test_data(
            config, settings, jax.random.key(seed)
        )
        assert isinstance(source, data.StreamSource) != in_memory
        pixel = np.round(display[:, 3, 3, 0] * 255).astype(int)  # image i has value i
        return indices, pixel, labels

    # the split's stored order (TFDS shuffles the examples when it writes them)
    stored = next(
        data.load("mnist", "train", data_dir=prepared_mnist, normalize=False).batches(
            60, seed=0, epoch=0, shuffle=False
        )
    )
    stored = np.round(stored["image"][:, 3, 3, 0] * 255).astype(int)
    assert sorted(stored) == list(range(60))
    for seed in (0, 1):
        memory = load(True, seed)
        streamed = load(False, seed)
        indices, pixel, labels = streamed
        for a, b in zip(memory, streamed, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(pixel, stored[indices])  # the images at those indices
        np.testing.assert_array_equal(labels, pixel % 10)  # image i has label i % 10
        assert len(set(indices)) == 7 and not np.array_equal(indices, np.arange(7))
    assert not np.array_equal(load(False, 0)[0], load(False, 1)[0])
    assert no_download == []


@pytest.mark.slow
def test_tfds_data_dir_expands_the_home_tilde(prepared_mnist, no_download, monkeypatch):
    # --config.data_dir=~/tensorflow_datasets reaches jbnn unexpanded (shells expand "~"
    # only at the start of a word): jbnn expands it, as a shell would.
    home, name = os.path.split(prepared_mnist)
    monkeypatch.setenv("HOME", home)
    source = data.load("mnist", "test", data_dir=f"~/{name}", normalize=False)
    assert source.num_examples == 10 and no_download == []


def test_tfds_unknown_split_and_option():
    with pytest.raises(ValueError, match="Unknown split 'validation' for dataset 'mnist'"):
        data.load("mnist", "validation")
    with pytest.raises(ValueError, match="Unknown option"):
        data.load("cifar10", "train", colour=True)
    assert data.tfds_source.resolve_split("imagenette", "test") == "validation"
    assert data.tfds_source.resolve_split("cifar10", "train[:90%]") == "train[:90%]"
    assert data.tfds_source.resolve_split("svhn_cropped", "extra") == "extra"
    # A config the dataset lacks is a bad name, not missing data (it said "tfds build").
    with pytest.raises(ValueError, match="Unknown config 'x' of TFDS dataset 'mnist'; it has no"):
        data.load("mnist/x", "train")
    with pytest.raises(ValueError, match="Unknown config '' of TFDS dataset 'cifar10'"):
        data.load("cifar10/", "train")
    with pytest.raises(ValueError, match="Unknown config 'nope'.*its configs: full-size-v2"):
        data.load("imagenette/nope", "train")


@pytest.mark.slow
def test_missing_tfds_dataset_gives_clear_error_without_download(tfds, tmp_path, no_download):
    # TFDS's own default would try to download into the empty folder ...
    with pytest.raises(AssertionError, match="download_and_prepare"):
        tfds.load("mnist", split="train", data_dir=str(tmp_path))
    assert no_download == ["mnist"]
    # ... jbnn does not, and says how to get the data.
    for name in ("mnist", "cifar10"):
        with pytest.raises(data.DatasetNotAvailableError) as info:
            data.load(name, "train", data_dir=str(tmp_path))
        message = str(info.value)
        assert f"tfds build {name}" in message and str(tmp_path) in message
        assert "data_dir" in message
        # Raised from jbnn, not chained onto a TensorFlow traceback.
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__
        assert len(info.traceback) <= 6
    assert no_download == ["mnist"]
    assert isinstance(info.value, RuntimeError)
    assert os.listdir(tmp_path) == [] or all(
        not any(files for _, _, files in os.walk(tmp_path / d)) for d in os.listdir(tmp_path)
    )


@pytest.mark.slow
def test_imagenet_manual_dir_errors(tfds, tmp_path, no_download):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(data.DatasetNotAvailableError, match="no manual_dir was given") as info:
        data.load("imagenet2012", "train", data_dir=str(empty))
    assert "ILSVRC2012_img_train.tar" in str(info.value)
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(data.DatasetNotAvailableError, match=f"manual_dir '{missing}' does not"):
        data.load("imagenet2012", "train", data_dir=str(empty), manual_dir=str(missing))
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "ILSVRC2012_img_train.tar").touch()
    with pytest.raises(data.DatasetNotAvailableError, match="does not hold ILSVRC2012_img_val"):
        data.load("imagenet2012", "test", data_dir=str(empty), manual_dir=str(manual))
    assert no_download == []
    # With the archive there, TFDS is asked to build from manual_dir only (no GCS);
    # its failure comes back as our error.
    (manual / "ILSVRC2012_img_val.tar").touch()
    with pytest.raises(data.DatasetNotAvailableError) as info:
        data.load("imagenet2012", "test", data_dir=str(empty), manual_dir=str(manual))
    assert no_download == ["imagenet2012"]
    assert f"Building imagenet2012 from manual_dir '{manual}'" in str(info.value)
    assert f"manual_dir={manual}, try_download_gcs=False" in str(info.value)

"""jbnn.metrics against independent references: scipy, scikit-image, Quantus, hand cases."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage as ndi
import scipy.stats as st

from jbnn import metrics
from jbnn.metrics import _checks
from jbnn.metrics import faithfulness as faith_mod
from jbnn.metrics import similarity as sim_mod

pytestmark = pytest.mark.usefixtures("fast_compiles")

RNG = np.random.default_rng(0)


def random_maps(shape=(4, 24, 24), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape).astype(np.float32)
    b = (a + rng.normal(size=shape)).astype(np.float32)
    a[1] = np.round(a[1])  # many ties
    b[1] = np.round(2 * b[1])
    return a, b


def minmax(m):
    m = np.asarray(m, np.float64)
    return (m - m.min()) / (m.max() - m.min())


@pytest.fixture(scope="module")
def quantus():
    return pytest.importorskip("quantus")


# ---------------------------------------------------------------------------------------
# Similarity


@pytest.mark.parametrize("absolute", [False, True])
def test_spearman_matches_scipy(absolute):
    a, b = random_maps()
    f = np.abs if absolute else (lambda v: v)
    want = [st.spearmanr(f(a[i]).ravel(), f(b[i]).ravel())[0] for i in range(len(a))]
    got = metrics.spearman(a, b, absolute=absolute)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(metrics.spearman, static_argnames="absolute")(a, b, absolute=absolute),
        want,
        atol=1e-5,
    )


def test_spearman_ranks_equal_scipy_rankdata_on_ties_signed_zeros_and_infinities():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(6, 32 * 32)).astype(np.float32)
    v[0] = np.round(2 * v[0])  # a few values, many ties each
    v[1] = np.where(v[1] > 0, -0.0, 0.0)  # -0.0 and 0.0 are one tie, as in scipy
    v[2, :4] = [np.inf, -np.inf, np.inf, -0.0]
    v[3] = 7.0  # one tie of all N
    v[4] = np.float32(1e-45) * rng.integers(-3, 4, size=v.shape[1])  # denormals
    v[5, 512:] = v[5, :512][::-1]  # every value twice, far apart
    got = jax.jit(jax.vmap(sim_mod._average_ranks))(v)
    np.testing.assert_array_equal(got, np.stack([st.rankdata(r) for r in v]))
    w = rng.permutation(v, axis=1)
    # Rows 1 and 3 are constant (as is their permutation): 1.0 by convention, NaN in scipy.
    want = [1.0 if i in (1, 3) else st.spearmanr(v[i], w[i])[0] for i in range(len(v))]
    got = jax.jit(metrics.spearman)(v[:, None, :], w[:, None, :])  # 1 x N maps; inf: traced
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_spearman_of_many_large_maps_matches_scipy_and_does_not_retrace():
    a, b = random_maps((40, 32, 32), seed=5)
    a[::3] = np.round(a[::3])
    want = [st.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(len(a))]
    np.testing.assert_allclose(metrics.spearman(a, b), want, atol=1e-6)
    before = sim_mod._spearman._cache_size()
    np.testing.assert_allclose(
        metrics.spearman(a[::-1].copy(), b[::-1].copy()), want[::-1], atol=1e-6
    )
    assert sim_mod._spearman._cache_size() == before


def test_spearman_under_jit_gives_nan_for_a_nan_input_only():
    a, b = random_maps((3, 8, 8), seed=4)
    a[0, 2, 2] = np.nan  # concrete NaN is refused at the boundary; a traced one propagates
    b[1, 0, 0] = np.inf  # inf is ranked (last), as scipy does
    got = np.asarray(jax.jit(metrics.spearman)(a, b))
    assert np.isnan(got[0]) and np.isfinite(got[1:]).all()
    np.testing.assert_allclose(got[1], st.spearmanr(a[1].ravel(), b[1].ravel())[0], atol=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.spearman(a, b)


def test_pearson_matches_scipy_and_scale_is_harmless():
    a, b = random_maps()
    want = [st.pearsonr(a[i].ravel(), b[i].ravel())[0] for i in range(len(a))]
    np.testing.assert_allclose(metrics.pearson(a, b), want, atol=1e-5)
    np.testing.assert_allclose(metrics.pearson(1e30 * a, 1e-30 * b), want, atol=1e-5)


def test_spearman_in_chunks_matches_scipy_with_bounded_scratch_memory():
    # 13 pairs: chunks of 8 pairs, the last one overlapping the first
    a, b = random_maps((13, 12, 12), seed=9)
    a[::4] = np.round(a[::4])
    for absolute, f in ((False, lambda v: v), (True, np.abs)):
        want = [st.spearmanr(f(a[i]).ravel(), f(b[i]).ravel())[0] for i in range(len(a))]
        np.testing.assert_allclose(metrics.spearman(a, b, absolute=absolute), want, atol=1e-6)
    # A vmap over all pairs needed 6.8e9 bytes of scratch for 500 pairs of 224 x 224 maps
    # (13.6 MB a pair); compiled only, not run.
    maps = jax.ShapeDtypeStruct((500, 224, 224), jnp.float32)
    compiled = sim_mod._spearman.lower(maps, maps, absolute=False).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 128 * 2**20, temp


def test_pearson_of_infinite_maps_is_nan_under_jit_and_refused_outside():
    a, b = random_maps((4, 8, 8), seed=11)
    bad = a.copy()
    bad[1] = np.inf  # all-inf maps passed the constant test: 0.0 against b, 1.0 with itself
    bad[2] = -np.inf
    bad[3, :4] = np.inf
    jitted = jax.jit(metrics.pearson)
    r0 = st.pearsonr(a[0].ravel(), b[0].ravel())[0]
    calls = ((jitted(bad, b), r0), (jitted(b, bad), r0), (jitted(bad, bad), 1.0))
    for got, want0 in (*calls, (sim_mod._pearson(bad, bad), 1.0)):  # the jitted core too
        got = np.asarray(got)
        assert np.isnan(got[1:]).all(), got
        assert got[0] == pytest.approx(want0, abs=1e-5)  # the finite pair unchanged
    with pytest.raises(ValueError, match="non-finite"):
        metrics.pearson(bad, b)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    a, b = random_maps((3, 20, 17))
    a[2] = ndi.gaussian_filter(a[2], 2)  # smooth maps give SSIM far from 0
    b[2] = a[2] + 0.05 * b[2]
    want = [
        structural_similarity(
            minmax(a[i]),
            minmax(b[i]),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(metrics.ssim(a, b), want, atol=1e-5)
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "cell,block,orient", [(8, 2, 9), (16, 2, 9), (5, 3, 9), (7, 1, 6), (4, 2, 4)]
)
def test_hog_matches_skimage(cell, block, orient):
    from skimage.feature import hog

    a, _ = random_maps((3, 34, 33))
    a[2] = np.round(a[2] * 2) / 2  # repeated values: gradients on the axes and diagonals
    want = np.stack(
        [
            hog(
                a[i].astype(np.float64),
                orientations=orient,
                pixels_per_cell=(cell, cell),
                cells_per_block=(block, block),
                block_norm="L2-Hys",
            )
            for i in range(3)
        ]
    )
    got = metrics.hog(a, cell_size=cell, block_size=block, orientations=orient)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_hog_similarity_is_spearman_of_skimage_hog_on_scaled_maps():
    from skimage.feature import hog

    a, b = random_maps((3, 32, 32))
    feats = lambda m: hog(minmax(m), pixels_per_cell=(8, 8), cells_per_block=(2, 2))
    want = [st.spearmanr(feats(a[i]), feats(b[i]))[0] for i in range(3)]
    got = np.asarray(metrics.hog_similarity(a, b, cell_size=8))
    np.testing.assert_allclose(got[[0, 2]], [want[0], want[2]], atol=1e-5)
    # Map 1 has repeated values, so tied features, some of which float32 splits.
    np.testing.assert_allclose(got[1], want[1], atol=2e-4)
    # Default 16 px cells on 32 px maps: one 2x2 block.
    assert metrics.hog(a).shape == (3, 36)


def test_topk_intersection_by_hand():
    a = np.array([[[5.0, -4.0, 0.0], [1.0, 0.5, 3.0]]], np.float32)  # |a| top-3: 0, 1, 5
    b = np.array([[[0.0, 9.0, -8.0], [0.1, 0.2, 7.0]]], np.float32)  # |b| top-3: 1, 2, 5
    np.testing.assert_allclose(metrics.topk_intersection(a, b, k=3), [2 / 3])
    np.testing.assert_allclose(metrics.topk_intersection(a, b, k=1), [0.0])
    np.testing.assert_allclose(metrics.topk_intersection(a, b, k=6), [1.0])
    np.testing.assert_allclose(metrics.topk_intersection(a, -a, k=2), [1.0])


def test_constant_maps_give_documented_finite_values():
    rng = np.random.default_rng(1)
    c = np.full((2, 16, 16), 3.0, np.float32)
    c[1] = 0.0
    r = rng.normal(size=(2, 16, 16)).astype(np.float32)
    hog8 = functools.partial(metrics.hog_similarity, cell_size=8)
    for f in (metrics.spearman, metrics.pearson, hog8):
        np.testing.assert_array_equal(f(c, c), [1.0, 1.0])
        np.testing.assert_array_equal(f(c, r), [0.0, 0.0])
        np.testing.assert_array_equal(f(r, c), [0.0, 0.0])
    np.testing.assert_array_equal(metrics.spearman(c, c, absolute=True), [1.0, 1.0])
    np.testing.assert_allclose(metrics.ssim(c, c), [1.0, 1.0], atol=1e-6)
    assert np.isfinite(np.asarray(metrics.ssim(c, r))).all()
    assert np.isfinite(np.asarray(metrics.topk_intersection(c, r, k=5))).all()


def test_similarities_jit_vmap_and_do_not_retrace():
    a, b = random_maps((2, 3, 16, 16))
    for f in (metrics.spearman, metrics.ssim, metrics.total_variation):
        two = f in (metrics.spearman, metrics.ssim)
        args = (a, b) if two else (a,)
        stacked = jax.vmap(f)(*args)
        loop = np.stack([f(*(v[s] for v in args)) for s in range(2)])
        np.testing.assert_allclose(stacked, loop, atol=1e-6)
        np.testing.assert_allclose(jax.jit(f)(*(v[0] for v in args)), loop[0], atol=1e-6)
    before = sim_mod._ssim._cache_size()
    metrics.ssim(b[0], a[0])
    assert sim_mod._ssim._cache_size() == before


# ---------------------------------------------------------------------------------------
# Noise and complexity


def test_total_variation_by_hand():
    m = np.array([[[0.0, 2.0, -4.0], [1.0, 1.0, 0.0]]], np.float32)
    s = m / 4.0  # normalised by max |m|
    want = np.abs(np.diff(s, axis=1)).sum() + np.abs(np.diff(s, axis=2)).sum()
    # by hand: rows |.25-0|+|.25-.5|+|0+1| = 1.5; columns .5+1.5 + 0+.25 = 2.25
    assert want == pytest.approx(3.75)
    np.testing.assert_allclose(metrics.total_variation(m), [3.75], rtol=1e-6)
    np.testing.assert_allclose(metrics.total_variation(7 * m), [3.75], rtol=1e-6)
    np.testing.assert_array_equal(metrics.total_variation(np.zeros((1, 4, 4))), [0.0])
    # Constant maps give exactly 0: dividing each pixel by max |m| first rounded equal
    # pixels apart (7.0 on 32 x 32 gave 4.7e-5).
    for value, shape in ((7.0, (2, 32, 32)), (0.1, (1, 20, 24)), (-3e38, (1, 5, 7))):
        constant = np.full(shape, value, np.float32)
        np.testing.assert_array_equal(metrics.total_variation(constant), np.zeros(shape[0]))


@pytest.mark.slow
def test_sparseness_and_complexity_match_quantus_per_map(quantus):
    rng = np.random.default_rng(2)
    m = rng.normal(size=(4, 12, 12)).astype(np.float32)
    m[1] = np.abs(m[1]) ** 4  # peaked
    m[2] *= 1e3  # another scale
    x = np.zeros((1, 1, 12, 12), np.float32)
    y = np.zeros(1, int)
    want_s, want_c = [], []
    for i in range(len(m)):  # one map per call: Quantus normalises by the batch max
        a = m[i][None, None].copy()
        want_s.append(
            quantus.Sparseness(disable_warnings=True)(
                model=None, x_batch=x, y_batch=y, a_batch=a.copy()
            )[0]
        )
        want_c.append(
            quantus.Complexity(disable_warnings=True)(
                model=None, x_batch=x, y_batch=y, a_batch=a.copy()
            )[0]
        )
    np.testing.assert_allclose(metrics.sparseness(m), want_s, atol=1e-5)
    np.testing.assert_allclose(metrics.complexity(m), want_c, atol=1e-4)


def test_sparseness_and_complexity_extremes():
    n = 8 * 8
    one_hot = np.zeros((1, 8, 8), np.float32)
    one_hot[0, 3, 4] = -2.0
    flat = np.ones((1, 8, 8), np.float32)
    zero = np.zeros((1, 8, 8), np.float32)
    # Gini of a single spike is (n - 1) / n up to the 1e-7 offset; of a flat map, 0.
    np.testing.assert_allclose(metrics.sparseness(one_hot), [(n - 1) / n], atol=1e-5)
    np.testing.assert_allclose(metrics.sparseness(flat), [0.0], atol=1e-6)
    np.testing.assert_allclose(metrics.sparseness(zero), [0.0], atol=1e-6)
    np.testing.assert_allclose(metrics.complexity(one_hot), [0.0], atol=1e-6)
    np.testing.assert_allclose(metrics.complexity(flat), [np.log(n)], rtol=1e-5)
    np.testing.assert_allclose(metrics.complexity(zero), [np.log(n)], rtol=1e-5)


def numpy_gini(m):
    """Quantus's Sparseness of one map, in float64: sorted |m| / max|m| + 1e-7."""
    a = np.abs(np.asarray(m, np.float64)).ravel()
    a = np.sort(a / a.max() if a.max() > 0 else a) + 1e-7
    n = a.size
    i = np.arange(1, n + 1)
    return np.sum((2 * i - n - 1) * a) / (n * np.sum(a))


def test_sparseness_sorts_int32_keys_and_matches_a_numpy_gini():
    rng = np.random.default_rng(12)
    m = rng.normal(size=(4, 16, 16)).astype(np.float32)
    m[1] = np.round(m[1])  # ties
    m[2] = np.abs(m[2]) ** 4
    m[3] *= np.float32(2.0**-135)  # subnormal values
    np.testing.assert_allclose(metrics.sparseness(m), [numpy_gini(v) for v in m], atol=1e-6)
    # XLA:CPU sorts float32 ~5x slower than int32 (the bits of positive floats, in the
    # same order); the program must sort int32 only.
    hlo = jax.jit(metrics.sparseness).lower(m).as_text(dialect="hlo")
    sorts = [line.split(" sort(")[0] for line in hlo.splitlines() if " sort(" in line]
    assert sorts and all("s32[" in line and "f32[" not in line for line in sorts), sorts


# ---------------------------------------------------------------------------------------
# Localisation


def test_pointing_game_and_relevance_mass_by_hand():
    maps = np.array(
        [
            [[0.0, 1.0, 0.0], [0.0, 0.2, 0.0]],  # max at (0, 1): inside
            [[3.0, 0.0, 0.0], [0.0, 0.0, -1.0]],  # max at (0, 0): outside
            [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],  # all tie: hit if the mask is non-empty
            [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]],  # empty mask
        ],
        np.float32,
    )
    masks = np.array(
        [
            [[0, 1, 1], [0, 1, 0]],
            [[0, 1, 0], [0, 0, 1]],
            [[0, 0, 0], [0, 0, 1]],
            [[0, 0, 0], [0, 0, 0]],
        ],
        bool,
    )
    np.testing.assert_array_equal(metrics.pointing_game(maps, masks), [1, 0, 1, 0])
    np.testing.assert_allclose(
        metrics.relevance_mass_accuracy(maps, masks), [1.2 / 1.2, 1 / 4, 1 / 6, 0.0], rtol=1e-6
    )
    np.testing.assert_allclose(  # signed, as Quantus's default abs=False: (-1) / (3 - 1)
        metrics.relevance_mass_accuracy(maps, masks, absolute=False)[1], -0.5, rtol=1e-6
    )
    np.testing.assert_array_equal(
        metrics.pointing_game(masks.astype(np.float32), masks), [1, 1, 1, 0]
    )
    np.testing.assert_allclose(
        metrics.relevance_mass_accuracy(masks.astype(np.float32), masks), [1, 1, 1, 0]
    )
    np.testing.assert_array_equal(
        metrics.relevance_mass_accuracy(np.zeros((1, 2, 3)), masks[:1]), [0.0]
    )


# ---------------------------------------------------------------------------------------
# Faithfulness

W_2X2 = np.array([[1.0, -1.0], [2.0, 0.5]], np.float32)
X_2X2 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32).reshape(1, 2, 2, 1)
MAP_2X2 = np.array([[[0.1, 0.9], [0.5, 0.3]]], np.float32)  # order: (0,1) (1,0) (1,1) (0,0)


def linear_logits(w, x):
    """Two classes: logit 0 = sum(w * x) (w broadcast over channels), logit 1 = 0."""
    z = jnp.sum(x * w[None, :, :, None], axis=(1, 2, 3))
    return jnp.stack([z, jnp.zeros_like(z)], axis=-1)


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def test_deletion_on_a_linear_2x2_model_by_hand():
    fn = jax.tree_util.Partial(linear_logits, jnp.asarray(W_2X2))
    # L = 1*1 - 1*2 + 2*3 + .5*4 = 7; zeroing (0,1): +2 -> 9; (1,0): -6 -> 3; (1,1): -2 -> 1;
    # (0,0): -1 -> 0.
    curve, auc = metrics.deletion_curve(fn, X_2X2, MAP_2X2, 0, num_steps=4, output="logit")
    np.testing.assert_allclose(curve, [[7, 9, 3, 1, 0]], rtol=1e-6)
    np.testing.assert_allclose(auc, [0.25 * (7 / 2 + 9 + 3 + 1 + 0 / 2)], rtol=1e-6)
    curve, auc = metrics.deletion_curve(fn, X_2X2, MAP_2X2, 0, num_steps=4)
    np.testing.assert_allclose(curve, sigmoid([[7, 9, 3, 1, 0]]), rtol=1e-5)
    np.testing.assert_allclose(auc, [np.trapezoid(sigmoid([7, 9, 3, 1, 0]), dx=0.25)], rtol=1e-5)
    # Two steps remove two pixels each: round(linspace(0, 4, 3)) = 0, 2, 4.
    curve, auc = metrics.deletion_curve(fn, X_2X2, MAP_2X2, 0, num_steps=2, output="logit")
    np.testing.assert_allclose(curve, [[7, 3, 0]], rtol=1e-6)
    np.testing.assert_allclose(auc, [0.5 * (3.5 + 3 + 0)], rtol=1e-6)


def test_insertion_on_a_linear_2x2_model_by_hand():
    fn = jax.tree_util.Partial(linear_logits, jnp.asarray(W_2X2))
    # Mean substrate 2.5 everywhere: L = 2.5 * 2.5 = 6.25; revealing (0,1): -1*(2-2.5) ->
    # 6.75; (1,0): 2*(3-2.5) -> 7.75; (1,1): .5*(4-2.5) -> 8.5; (0,0): 1*(1-2.5) -> 7.
    curve, auc = metrics.insertion_curve(
        fn, X_2X2, MAP_2X2, 0, num_steps=4, substrate="mean", output="logit"
    )
    np.testing.assert_allclose(curve, [[6.25, 6.75, 7.75, 8.5, 7.0]], rtol=1e-6)
    np.testing.assert_allclose(auc, [np.trapezoid([6.25, 6.75, 7.75, 8.5, 7.0], dx=0.25)])
    # An explicit substrate array, and the accuracy output (class 0 wins while L > 0).
    base = np.full_like(X_2X2, -10.0)
    curve, _ = metrics.insertion_curve(
        fn, X_2X2, MAP_2X2, 0, num_steps=4, substrate=base, output="accuracy"
    )  # L = -10 * 2.5 = -25, then -12, +26, +7, +11 as each pixel is revealed
    logits = [-25.0, -25 - 12, -37 + 26, -11 + 7, -4 + 11]
    np.testing.assert_array_equal(curve, [(np.array(logits) > 0).astype(np.float32)])


def test_deletion_ranks_a_subnormal_map_by_its_values():
    # XLA:CPU compares subnormal floats as 0: all pixels tied and went in index order.
    fn = jax.tree_util.Partial(linear_logits, jnp.asarray(W_2X2))
    tiny = np.array([[[1.0, 9.0], [5.0, 3.0]]], np.float32) * np.float32(2.0**-140)
    assert np.abs(tiny).max() < np.finfo(np.float32).smallest_normal
    curve, _ = metrics.deletion_curve(fn, X_2X2, tiny, 0, num_steps=4, output="logit")
    np.testing.assert_allclose(curve, [[7, 9, 3, 1, 0]], rtol=1e-6)  # as MAP_2X2, by hand


def test_blur_substrate_matches_scipy():
    x = RNG.uniform(size=(2, 9, 7, 3)).astype(np.float32)
    want = ndi.gaussian_filter(x.astype(np.float64), sigma=(0, 2.0, 2.0, 0), mode="reflect")
    np.testing.assert_allclose(metrics.blur(x, 2.0), want, atol=1e-6)
    np.testing.assert_allclose(metrics.make_substrate(x, "blur", 2.0), want, atol=1e-6)
    np.testing.assert_allclose(
        metrics.make_substrate(x, "mean"),
        np.broadcast_to(x.mean((1, 2), keepdims=True), x.shape),
        atol=1e-6,
    )


SIZE = 12
PATCH = (slice(3, 7), slice(5, 9))


def patch_logits(scale, x):
    """Class 0 iff the 4x4 patch is mostly bright: logit = scale * (patch sum - 8)."""
    z = scale * (jnp.sum(x[:, PATCH[0], PATCH[1], :], axis=(1, 2, 3)) - 8.0)
    return jnp.stack([z, jnp.zeros_like(z)], axis=-1)


def patch_problem(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((batch, SIZE, SIZE, 1), np.float32)
    x[:, PATCH[0], PATCH[1]] = 1.0
    mask = np.zeros((batch, SIZE, SIZE), bool)
    mask[:, PATCH[0], PATCH[1]] = True
    true_map = mask + 0.01 * rng.uniform(size=mask.shape)
    random_map = rng.uniform(size=mask.shape)
    fn = jax.tree_util.Partial(patch_logits, jnp.float32(1.0))
    return fn, x, mask, true_map.astype(np.float32), random_map.astype(np.float32)


def test_true_map_beats_random_map_on_deletion_insertion_and_localisation():
    fn, x, mask, true_map, random_map = patch_problem()
    _, del_true = metrics.deletion_curve(fn, x, true_map, 0, num_steps=24)
    _, del_rand = metrics.deletion_curve(fn, x, random_map, 0, num_steps=24)
    _, ins_true = metrics.insertion_curve(fn, x, true_map, 0, num_steps=24, blur_sigma=2.0)
    _, ins_rand = metrics.insertion_curve(fn, x, random_map, 0, num_steps=24, blur_sigma=2.0)
    assert np.all(del_true < del_rand - 0.3), (del_true, del_rand)
    assert np.all(ins_true > ins_rand + 0.05), (ins_true, ins_rand)
    np.testing.assert_array_equal(metrics.pointing_game(true_map, mask), [1, 1, 1, 1])
    np.testing.assert_array_equal(metrics.pointing_game(mask.astype(np.float32), mask), 1)
    assert np.all(metrics.relevance_mass_accuracy(true_map, mask) > 0.9)


def test_faithfulness_chunks_agree_and_do_not_retrace():
    fn, x, _, true_map, _ = patch_problem(batch=3)
    whole = metrics.deletion_curve(fn, x, true_map, 0, num_steps=10)
    chunked = metrics.deletion_curve(fn, x, true_map, 0, num_steps=10, batch_size=7)
    np.testing.assert_allclose(whole[0], chunked[0], atol=1e-6)
    np.testing.assert_allclose(whole[1], chunked[1], atol=1e-6)
    before = faith_mod._curve._cache_size()
    other = jax.tree_util.Partial(patch_logits, jnp.float32(2.0))  # new "variables"
    curves, _ = metrics.deletion_curve(other, x, true_map, 0, num_steps=10)
    assert faith_mod._curve._cache_size() == before
    assert not np.allclose(curves, whole[0])


def test_linear_imputation_solves_the_neighbour_mean_system():
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(1, 9, 8, 2)).astype(np.float32)
    removed = np.zeros((1, 9, 8), bool)
    removed[0, 2:6, 3:7] = True  # a hole
    removed[0, 0, 0] = removed[0, 8, 7] = removed[0, 8, 6] = True  # corners
    out = np.asarray(metrics.noisy_linear_imputation(x, removed, key=jax.random.key(0), noise=0))
    # Each filled pixel is the weighted mean of its in-image neighbours (1/6 direct,
    # 1/12 diagonal), written out as a loop.
    weights = {
        (dr, dc): (1 / 12 if dr and dc else 1 / 6)
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
        if dr or dc
    }
    for r, c in zip(*np.nonzero(removed[0]), strict=True):
        total, wsum = 0.0, 0.0
        for (dr, dc), w in weights.items():
            if 0 <= r + dr < 9 and 0 <= c + dc < 8:
                total, wsum = total + w * out[0, r + dr, c + dc], wsum + w
        np.testing.assert_allclose(out[0, r, c], total / wsum, atol=1e-5)
    np.testing.assert_array_equal(out[0][~removed[0]], x[0][~removed[0]])
    noisy = np.asarray(metrics.noisy_linear_imputation(x, removed, key=jax.random.key(1)))
    diff = (noisy - out)[0][removed[0]]
    assert 0.005 < diff.std() < 0.02 and np.all((noisy - out)[0][~removed[0]] == 0)


@pytest.mark.slow
def test_linear_imputation_matches_quantus(quantus):
    from quantus.functions.perturb_func import noisy_linear_imputation as q_impute

    rng = np.random.default_rng(4)
    x = rng.uniform(size=(1, 10, 10, 3)).astype(np.float32)
    order = np.argsort(-ndi.gaussian_filter(rng.normal(size=100).reshape(10, 10), 2).ravel())
    for p in (5, 40, 97):
        idx = order[: int(100 * p / 100)]
        want = q_impute(np.moveaxis(x[0], -1, 0).astype(np.float64), idx, noise=0.0)
        removed = np.zeros(100, bool)
        removed[idx] = True
        got = metrics.noisy_linear_imputation(
            x, removed.reshape(1, 10, 10), key=jax.random.key(0), noise=0.0
        )
        np.testing.assert_allclose(np.moveaxis(np.asarray(got[0]), -1, 0), want, atol=1e-5)


def test_imputation_and_road_take_a_new_tol_without_recompiling():
    rng = np.random.default_rng(13)
    x = rng.uniform(size=(1, 9, 8, 2)).astype(np.float32)
    removed = np.zeros((1, 9, 8), bool)
    removed[0, 2:7, 2:6] = True
    impute = functools.partial(
        metrics.noisy_linear_imputation, x, removed, key=jax.random.key(0), noise=0.0
    )
    tight = np.asarray(impute(tol=1e-6))
    before = faith_mod._imputation._cache_size()
    np.testing.assert_array_equal(impute(tol=np.float32(1e-6)), tight)  # a NumPy scalar
    loose = np.asarray(impute(tol=0.9))
    assert faith_mod._imputation._cache_size() == before
    assert np.abs(loose - tight).max() > 1e-3  # the tolerance is used: CG stopped early
    fn, xs, _, true_map, _ = patch_problem(batch=1)

    def road(tol):
        return metrics.road(
            fn,
            xs,
            true_map,
            0,
            key=jax.random.key(0),
            percentages=(30,),
            noise=0.0,
            output="logit",
            tol=tol,
        )

    want = road(1e-6)
    before = faith_mod._road._cache_size()
    np.testing.assert_array_equal(road(np.float32(1e-6)), want)
    road(1e-3)
    assert faith_mod._road._cache_size() == before


def test_road_removes_the_ranked_pixels_and_separates_morf_from_lerf():
    fn, x, _, true_map, _ = patch_problem(batch=2)
    percentages = (0, 10, 30, 60)
    got = metrics.road(
        fn,
        x,
        true_map,
        0,
        key=jax.random.key(0),
        percentages=percentages,
        noise=0.0,
        output="logit",
    )
    n = SIZE * SIZE
    for i in range(2):  # the same pixels imputed by hand, then the model
        order = np.argsort(-true_map[i].ravel(), kind="stable")
        for j, p in enumerate(percentages):
            removed = np.zeros(n, bool)
            removed[order[: int(n * p / 100)]] = True
            filled = metrics.noisy_linear_imputation(
                x[i : i + 1], removed.reshape(1, SIZE, SIZE), key=jax.random.key(0), noise=0.0
            )
            np.testing.assert_allclose(got[i, j], fn(filled)[0, 0], atol=1e-4)
    morf = metrics.road(fn, x, true_map, 0, key=jax.random.key(1), percentages=percentages)
    lerf = metrics.road(
        fn, x, true_map, 0, key=jax.random.key(1), percentages=percentages, order="lerf"
    )
    np.testing.assert_array_equal(morf, [[1, 0, 0, 0]] * 2)  # the patch goes first
    np.testing.assert_array_equal(lerf, [[1, 1, 1, 1]] * 2)  # the patch stays


# ---------------------------------------------------------------------------------------
# Sanity checks


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-global mean-dense: a translation-invariant 2-class model."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


@functools.partial(jax.jit, static_argnames=("n", "size"))
def bars(key, n, size=12):
    """Class 1: a horizontal bar, class 0: a vertical one, anywhere, plus noise."""
    kc, kp, kn = jax.random.split(key, 3)
    label = jax.random.bernoulli(kc, 0.5, (n,)).astype(jnp.int32)
    pos = jax.random.randint(kp, (n, 2), 1, size - 5)
    r = jnp.arange(size)

    def img(lab, p):
        in_rows = (r[:, None] >= p[0]) & (r[:, None] < p[0] + 4)
        in_cols = (r[None, :] >= p[1]) & (r[None, :] < p[1] + 4)
        horizontal = (r[:, None] == p[0] + 1) & in_cols
        vertical = (r[None, :] == p[1] + 1) & in_rows
        return jnp.where(lab == 1, horizontal, vertical).astype(jnp.float32)

    x = jax.vmap(img)(label, pos) + 0.1 * jax.random.normal(kn, (n, size, size))
    return x[..., None], label


MODEL = TinyCNN()
INIT = jax.jit(MODEL.init)


@jax.jit
def gradient_maps(variables, x, target):
    def picked(xx):
        return jnp.take_along_axis(MODEL.apply(variables, xx), target[:, None], 1).sum()

    return jax.grad(picked)(x).sum(-1)


def gradient_explain(model, variables, x, target):
    assert model is MODEL
    return gradient_maps(variables, x, target)


@pytest.mark.slow  # XLA compilation of the model, grads and similarities
def test_mprt_randomises_layers_top_down_and_cascading():
    key = jax.random.key(0)
    x, y = bars(key, 4)
    variables = INIT(jax.random.key(1), x[:1])
    fresh = INIT(jax.random.key(7), x[:1])  # what mprt draws with key 7
    seen = []

    def recording_explain(model, v, xx, t):
        seen.append(v)
        return gradient_explain(model, v, xx, t)

    res = metrics.mprt(MODEL, variables, x, y, recording_explain, key=jax.random.key(7))
    assert res["layers"] == ("head", "conv2", "conv1")
    assert res["maps"].shape == (3, 4, 12, 12) and res["original"].shape == (4, 12, 12)
    same = lambda u, v: all(jax.tree.leaves(jax.tree.map(np.array_equal, u, v)))
    for stage in range(3):
        params = seen[1 + stage]["params"]
        for j, layer in enumerate(res["layers"]):
            want = fresh if j <= stage else variables
            assert same(params[layer], want["params"][layer]), (stage, layer)
    for name, f in metrics.default_similarities().items():
        want = np.stack([f(res["original"], m) for m in res["maps"]])
        np.testing.assert_allclose(res["similarity"][name], want, atol=1e-6)

    seen.clear()
    metrics.mprt(
        MODEL,
        variables,
        x,
        y,
        recording_explain,
        key=jax.random.key(7),
        layers=["conv2", "head"],
        cascading=False,
    )
    assert same(seen[1]["params"]["conv2"], fresh["params"]["conv2"])
    assert same(seen[1]["params"]["head"], variables["params"]["head"])
    assert same(seen[2]["params"]["conv2"], variables["params"]["conv2"])

    # A stage of several layers randomises them together (a dense layer and its BatchNorm).
    for cascading in (True, False):
        seen.clear()
        res = metrics.mprt(
            MODEL,
            variables,
            x,
            y,
            recording_explain,
            key=jax.random.key(7),
            layers=[("head", "conv2"), "conv1"],
            similarity={"spearman_abs": metrics.default_similarities()["spearman_abs"]},
            cascading=cascading,
        )
        assert res["layers"] == (("head", "conv2"), "conv1") and len(seen) == 3
        first, second = seen[1]["params"], seen[2]["params"]
        assert same(first["head"], fresh["params"]["head"])
        assert same(first["conv2"], fresh["params"]["conv2"])
        assert same(first["conv1"], variables["params"]["conv1"])
        assert same(second["conv1"], fresh["params"]["conv1"])
        kept = variables if not cascading else fresh
        assert same(second["head"], kept["params"]["head"])
        assert same(second["conv2"], kept["params"]["conv2"])


@pytest.mark.slow  # XLA compilation of the model, grads and similarities
def test_mprt_second_call_does_not_retrace_and_draws_the_same_fresh_variables():
    from jbnn import models
    from jbnn.metrics import sanity as sanity_mod

    traces = []

    class CountingCNN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            traces.append(x.shape)  # a Python side effect: runs only while tracing
            return TinyCNN(name="body")(x)

    @jax.jit
    def grad_maps(f, x, target):
        return jax.grad(lambda xx: jnp.take_along_axis(f(xx), target[:, None], 1).sum())(x)[..., 0]

    seen = []

    def explain(model, v, xx, t):
        seen.append(v)
        return grad_maps(models.apply_fn(model, v), xx, t)

    x, y = bars(jax.random.key(0), 4)
    model = CountingCNN()
    init = jax.jit(model.init)  # the reference: what mprt drew before its init was cached
    variables = init(jax.random.key(1), x[:1])
    first = metrics.mprt(model, variables, x, y, explain, key=jax.random.key(7))
    assert first["layers"] == ("body/head", "body/conv2", "body/conv1")
    traced, compiled = len(traces), sanity_mod._jitted_init._cache_size()
    seen.clear()
    # Same model (and an equal new instance), new key: nothing is traced or compiled again.
    again = metrics.mprt(model, variables, x, y, explain, key=jax.random.key(7))
    other = metrics.mprt(CountingCNN(), variables, x, y, explain, key=jax.random.key(8))
    assert len(traces) == traced, traces[traced:]
    assert sanity_mod._jitted_init._cache_size() == compiled
    for name in first["similarity"]:
        np.testing.assert_array_equal(again["similarity"][name], first["similarity"][name])
    np.testing.assert_array_equal(again["maps"], first["maps"])
    # The cached init draws what a fresh jax.jit(model.init) draws, for each key.
    for stage_vars, key in ((seen[1], 7), (seen[len(seen) // 2 + 1], 8)):
        fresh = init(jax.random.key(key), x[:1])
        got, want = stage_vars["params"]["body"]["head"], fresh["params"]["body"]["head"]
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want)))
    assert not np.array_equal(other["maps"], first["maps"])


def test_parameter_layers_of_binarynet_are_logits_first():
    from jbnn import models

    model = models.get("binarynet", binary=True, num_classes=10, width=1 / 16, dense_features=16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    blocks = [p for i in range(6, 0, -1) for p in (f"block{i}/bn", f"block{i}/conv")]
    assert metrics.parameter_layers(model, shapes, (1, 8, 8, 3)) == [
        "head_bn",
        "head",
        "dense2_bn",
        "dense2",
        "dense1_bn",
        "dense1",
        *blocks,
    ]


@pytest.mark.slow
def test_mprt_similarity_falls_on_a_trained_model():
    key = jax.random.key(0)
    variables = INIT(key, jnp.zeros((1, 12, 12, 1)))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(carry, k):
        params, opt = carry
        x, y = bars(k, 32)
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            MODEL.apply(p, x), y
        ).mean()
        updates, opt = tx.update(jax.grad(loss_fn)(params), opt)
        return (optax.apply_updates(params, updates), opt), None

    # 40 steps learn the task (test accuracy 1.0). Over keys 0-8 the similarity asserts
    # below hold for keys 0, 1, 3, 7, 8 (150 steps: 0, 1, 3, 8) with margins alike.
    (variables, _), _ = jax.lax.scan(
        step, (variables, tx.init(variables)), jax.random.split(key, 40)
    )
    x, y = bars(jax.random.key(99), 16)
    assert (MODEL.apply(variables, x).argmax(-1) == y).mean() >= 0.9  # it learned the task
    res = metrics.mprt(MODEL, variables, x, y, gradient_explain, key=jax.random.key(1))
    first, last = np.asarray(res["similarity"]["spearman_abs"].mean(axis=1))[[0, -1]]
    assert first > last + 0.2, res["similarity"]["spearman_abs"].mean(axis=1)
    assert res["similarity"]["ssim"].mean(axis=1)[-1] < 0.5


def test_random_logit_test_compares_with_a_drawn_other_class():
    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))

    model = Linear()
    x = jnp.asarray(RNG.uniform(size=(6, 12, 12, 1)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    target = jnp.array([0, 1, 2, 3, 4, 0])
    kernel = np.asarray(variables["params"]["head"]["kernel"])  # (144, 5)

    def explain(m, v, xx, t):  # the gradient of logit t of a linear model: column t
        return jnp.asarray(kernel[:, np.asarray(t)].T.reshape(-1, 12, 12))

    key = jax.random.key(3)
    got = metrics.random_logit_test(model, variables, x, target, explain, key=key)
    other = (np.asarray(target) + np.asarray(jax.random.randint(key, (6,), 1, 5))) % 5
    assert np.all(other != np.asarray(target))
    want = metrics.ssim(explain(0, 0, 0, target), explain(0, 0, 0, other))
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.random_logit_test(model, variables, x, target, explain, key=key, num_classes=1)


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_maps_raise_clear_errors():
    a, b = random_maps((2, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        metrics.spearman(a, b[:, :15])
    with pytest.raises(ValueError, match=r"rank 3.*\[None\]"):
        metrics.ssim(a[0], b[0])
    bad = a.copy()
    bad[1, 3, 3] = np.nan
    for f in (metrics.spearman, metrics.pearson, metrics.ssim, metrics.hog_similarity):
        with pytest.raises(ValueError, match=r"non-finite.*sample\(s\) 1"):
            f(bad, b)
    for f in (metrics.total_variation, metrics.sparseness, metrics.complexity):
        with pytest.raises(ValueError, match="NaN"):
            f(bad)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[:, :10], b[:, :10])
    with pytest.raises(ValueError, match="cell_size"):
        metrics.hog_similarity(a, b, cell_size=16)  # one cell, blocks of two
    with pytest.raises(ValueError, match="k must be"):
        metrics.topk_intersection(a, b, k=16 * 16 + 1)
    with pytest.raises(ValueError, match="same shape"):
        metrics.pointing_game(a, np.ones((2, 16, 15), bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.relevance_mass_accuracy(a, np.full((2, 16, 16), 0.5))


def test_bad_faithfulness_inputs_raise_clear_errors():
    fn, x, _, true_map, _ = patch_problem(batch=2)
    with pytest.raises(ValueError, match=r"maps must have the batch and spatial shape of x"):
        metrics.deletion_curve(fn, x, true_map[:, :-1], 0)
    with pytest.raises(ValueError, match="Unknown substrate"):
        metrics.insertion_curve(fn, x, true_map, 0, substrate="noise")
    with pytest.raises(ValueError, match="target must have shape"):
        metrics.deletion_curve(fn, x, true_map, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="only 2 logits"):
        metrics.deletion_curve(fn, x, true_map, 2)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="x holds 1 non-finite"):
        metrics.deletion_curve(fn, bad, true_map, 0)
    with pytest.raises(ValueError, match="percentages"):
        metrics.road(fn, x, true_map, 0, key=jax.random.key(0), percentages=[50, 100])
    with pytest.raises(ValueError, match="Unknown order"):
        metrics.road(fn, x, true_map, 0, key=jax.random.key(0), order="random")
    with pytest.raises(ValueError, match="whole image"):
        metrics.noisy_linear_imputation(x, np.ones((2, SIZE, SIZE)), key=jax.random.key(0))
    for value in (np.nan, 0.5):  # NaN was taken as kept, 0.5 as removed
        removed = np.zeros((2, SIZE, SIZE))
        removed[1, 2, 3] = value
        with pytest.raises(ValueError, match=r"removed must be boolean or hold only 0 and 1"):
            metrics.noisy_linear_imputation(x, removed, key=jax.random.key(0))


def test_faithfulness_names_a_wrong_model_function_or_wrong_variables():
    """The checks of the saliency functions: model.apply (which takes (variables, x)) is
    refused by name, and variables made for other images are named as such; they failed
    deep inside Flax (``Array.__contains__``, ``ScopeParamShapeError``)."""
    model = nn.Dense(3)
    flat = np.ones((2, 8 * 8), np.float32)
    variables = model.init(jax.random.key(0), flat)
    maps = np.ones((2, 8, 8), np.float32)
    x = np.ones((2, 8, 8, 1), np.float32)
    for call, name in (
        (lambda fn, x, m: metrics.deletion_curve(fn, x, m, 0, num_steps=4), "deletion_curve"),
        (lambda fn, x, m: metrics.insertion_curve(fn, x, m, 0, num_steps=4), "insertion_curve"),
        (lambda fn, x, m: metrics.road(fn, x, m, 0, key=jax.random.key(0)), "road"),
    ):
        with pytest.raises(TypeError, match=rf"{name}: fn is Dense.apply, which takes"):
            call(model.apply, x, maps)
        fn = jax.tree_util.Partial(lambda z: model.apply(variables, z.reshape(z.shape[0], -1)))
        with pytest.raises(ValueError, match=rf"{name}: the model's variables do not fit images"):
            call(fn, np.ones((2, 9, 9, 1), np.float32), np.ones((2, 9, 9), np.float32))


def test_blur_refuses_a_bad_sigma_and_takes_numpy_scalars():
    x = RNG.uniform(size=(1, 9, 7, 2)).astype(np.float32)
    for sigma in (0.0, -1.0, np.nan, np.inf):  # 0.0 gave an all-NaN image
        with pytest.raises(ValueError, match="sigma must be a positive number"):
            metrics.blur(x, sigma)
        with pytest.raises(ValueError, match="blur_sigma must be a positive number"):
            metrics.make_substrate(x, "blur", sigma)
    want = ndi.gaussian_filter(x.astype(np.float64), sigma=(0, 2.0, 2.0, 0), mode="reflect")
    np.testing.assert_allclose(metrics.make_substrate(x, "blur", np.float32(2.0)), want, atol=1e-6)


def test_bad_mprt_inputs_raise_clear_errors():
    x, y = bars(jax.random.key(0), 2)
    variables = INIT(jax.random.key(1), x[:1])
    with pytest.raises(ValueError, match="Unknown layer 'conv3'.*known: head, conv2, conv1"):
        metrics.mprt(
            MODEL, variables, x, y, gradient_explain, key=jax.random.key(0), layers=["conv3"]
        )
    with pytest.raises(ValueError, match=r"explain must return maps"):
        metrics.mprt(
            MODEL, variables, x, y, lambda m, v, xx, t: jnp.zeros((2, 5, 5)), key=jax.random.key(0)
        )
    for bad in ([()], [("head", 3)], [7]):
        with pytest.raises(ValueError, match="module path or a non-empty tuple of them"):
            metrics.mprt(
                MODEL, variables, x, y, gradient_explain, key=jax.random.key(0), layers=bad
            )
    with pytest.raises(ValueError, match="Unknown layer 'conv3'"):
        metrics.mprt(
            MODEL,
            variables,
            x,
            y,
            gradient_explain,
            key=jax.random.key(0),
            layers=[("head", "conv3")],
        )


# Inside jit the values cannot be checked: a NaN or inf in a sample's input must give NaN
# for that sample (jbnn.metrics docstring), not a finite score that looks valid.
NONFINITE_MASKS = np.random.default_rng(7).uniform(size=(4, 16, 16)) > 0.5
NONFINITE_MASKS[:, 4, 5] = False  # the poisoned pixels lie outside the masks
SCORES = {
    "pearson": metrics.pearson,
    "ssim": metrics.ssim,
    "hog_similarity": functools.partial(metrics.hog_similarity, cell_size=8),
    "topk_intersection": functools.partial(metrics.topk_intersection, k=20),
    "total_variation": lambda a, b: metrics.total_variation(a),
    "sparseness": lambda a, b: metrics.sparseness(a),
    "complexity": lambda a, b: metrics.complexity(a),
    "pointing_game": lambda a, b: metrics.pointing_game(a, NONFINITE_MASKS),
    "relevance_mass_accuracy": lambda a, b: metrics.relevance_mass_accuracy(a, NONFINITE_MASKS),
}


@pytest.mark.parametrize("name", sorted(SCORES))
def test_traced_nonfinite_map_gives_nan_for_its_sample_only(name):
    f = SCORES[name]
    a, b = random_maps((4, 16, 16), seed=6)
    bad = a.copy()
    bad[1:, 4, 5] = [np.nan, np.inf, -np.inf]
    jitted = jax.jit(f)  # one compilation: the finite reference runs the same program
    got = np.asarray(jitted(bad, b))
    assert np.isnan(got[1:]).all(), got
    assert np.isfinite(got[0]) and got[0] == jitted(a, b)[0]  # the other samples unchanged
    if name in ("pearson", "ssim", "hog_similarity", "topk_intersection"):  # two maps
        got = np.asarray(jitted(b, bad))
        assert np.isnan(got[1:]).all(), got
        assert np.isfinite(got[0]) and got[0] == jitted(b, a)[0]
    with pytest.raises(ValueError, match="non-finite"):
        f(bad, b)  # concrete: refused at the boundary


@pytest.mark.parametrize("exponent", [-100, 100, 127])
def test_scores_do_not_change_when_maps_are_scaled_by_a_power_of_two(exponent):
    """Every score is scale invariant; near the float32 limit (2**127 ~ 1.7e38) sums
    overflowed (pearson, relevance mass) and XLA flushed the reciprocal of the max to 0,
    zeroing the normalised map (total variation, sparseness, complexity, ssim, hog)."""
    a, b = (m / np.abs(m).max() for m in random_maps((4, 16, 16), seed=8))  # |.| <= 1
    scale = np.float32(2.0**exponent)
    scores = dict(SCORES, spearman=metrics.spearman)
    for name, f in scores.items():
        want = np.asarray(f(a, b))
        got = np.asarray(f(a * scale, b * scale))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("largest", [500, 5000])  # all values subnormal; some normal
def test_subnormal_maps_score_as_the_maps_they_scale(largest):
    """XLA:CPU flushes subnormal floats (below 2**-126 ~ 1.2e-38) to 0 in arithmetic and
    compares: maps of such values scored as all-zero maps (total variation 0, pearson
    1.0 with another such map, a pointing-game hit anywhere)."""
    rng = np.random.default_rng(10)
    a = rng.integers(-largest, largest + 1, size=(4, 16, 16)).astype(np.float32)
    b = np.clip(np.round(a + rng.normal(scale=largest / 3, size=a.shape)), -largest, largest)
    b = b.astype(np.float32)
    scale = np.float32(2.0**-135)  # integers below 2**14 times it are exact float32
    tiny_a, tiny_b = a * scale, b * scale
    smallest_normal = np.finfo(np.float32).smallest_normal
    assert (np.abs(tiny_a) < smallest_normal).all() == (largest < 512)
    scores = dict(SCORES, spearman=metrics.spearman)
    for name, f in scores.items():
        want = np.asarray(f(a, b))
        np.testing.assert_allclose(f(tiny_a, tiny_b), want, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(f(tiny_a, b), want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_scale_by_power_of_two_matches_float64_over_the_float32_range():
    rng = np.random.default_rng(14)
    exponents = rng.integers(-149, 126, size=(6, 5, 7))
    m = (rng.normal(size=exponents.shape) * 2.0**exponents).astype(np.float32)
    m[1] = rng.integers(-300, 300, size=m.shape[1:]) * np.float32(2.0**-140)  # subnormal
    m[2] *= np.float32(2.0**-100)
    m[3] = 0.0
    m[3, 0, 0] = -np.float32(2.0**-149)  # the smallest subnormal, alone
    m[4] = -0.0
    got, mantissa = jax.jit(_checks.scale_by_power_of_two, static_argnums=1)(m, (1, 2))
    m64 = m.astype(np.float64)
    want_mantissa, e = np.frexp(np.abs(m64).max(axis=(1, 2), keepdims=True))
    want = np.ldexp(m64, -e)
    want = np.where(np.abs(want) < 2.0**-126, np.copysign(0.0, m64), want)  # flushed
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(mantissa, want_mantissa)


def _poisoned_patch_problem():
    fn, x, _, true_map, _ = patch_problem(batch=3)
    bad_map = true_map.copy()
    bad_map[1, 0, 0] = np.nan  # would be ranked last and ignored
    bad_x = x.copy()
    bad_x[2, 0, 0, 0] = np.inf  # outside the patch: the model would not see it
    return fn, x, true_map, bad_x, bad_map


def test_traced_nonfinite_images_or_maps_give_nan_deletion_curves():
    fn, x, true_map, bad_x, bad_map = _poisoned_patch_problem()
    deletion = jax.jit(lambda xx, m: metrics.deletion_curve(fn, xx, m, 0, num_steps=4))
    want_curves, want_auc = deletion(x, true_map)  # one compilation for both calls
    curves, auc = deletion(bad_x, bad_map)
    assert np.isnan(curves[1:]).all() and np.isnan(auc[1:]).all()
    np.testing.assert_allclose(curves[0], want_curves[0], atol=1e-6)
    np.testing.assert_allclose(auc[0], want_auc[0], atol=1e-6)


def test_traced_nonfinite_images_or_maps_give_nan_road_scores():
    fn, _, _, bad_x, bad_map = _poisoned_patch_problem()
    road = jax.jit(
        lambda xx, m: metrics.road(fn, xx, m, 0, key=jax.random.key(0), percentages=(0, 30))
    )
    got = np.asarray(road(bad_x, bad_map))
    assert np.isnan(got[1:]).all()
    np.testing.assert_array_equal(got[0], [1, 0])  # intact, then 30% removes the patch

"""Input generators shared by the backend suites: shapes, axes, layouts, dtypes, value ranges."""
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

DTYPES = ["float16", "float32", "float64"]
# relative tolerance on outputs, per input dtype (the reference rounds the same float64 values)
RTOL = {"float16": 4e-3, "float32": 2e-5, "float64": 1e-10}
# sizes that are not powers of two, plus 1 and partial-block sizes (3*tpb+1 for tpb 4, 8)
SIZES = st.sampled_from([1, 2, 3, 5, 6, 7, 13, 25])


@st.composite
def bn_cases(draw, min_count=2, param_dtypes=("stats",)):
    """A random (x, gamma, beta, axis, dy) problem with at least min_count values per channel;
    gamma and beta are drawn in one of param_dtypes (the kernels read them in their own dtype).
    "stats" is the statistics' dtype of x (float32 for float16/float32 x, float64 for float64):
    what models pass. Suites that vary the per-channel dtypes pass DTYPES; that the vectors'
    dtype and layout never change the bits is test_determinism's
    test_vector_dtype_and_layout_do_not_change_the_bits."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(SIZES) for _ in range(ndim))
    assume(int(np.prod(shape)) <= 4000)
    axis = draw(st.integers(-ndim, ndim - 1))
    channels = shape[axis]
    assume(int(np.prod(shape)) // channels >= min_count)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["C", "F", "permuted", "strided"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    offset = draw(st.sampled_from([0.0, 3.0, -40.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    affine = draw(st.booleans())
    param_dtype = draw(st.sampled_from(param_dtypes))
    if param_dtype == "stats":
        param_dtype = "float64" if dtype == "float64" else "float32"
    rng = np.random.default_rng(seed)
    x = make_array(rng, shape, dtype, layout, scale, offset)
    dy = make_array(rng, shape, dtype, layout, 1.0, 0.0)
    gamma = rng.uniform(0.5, 2.0, channels).astype(param_dtype) if affine else None
    beta = rng.standard_normal(channels).astype(param_dtype) if affine else None
    return x, gamma, beta, axis, dy


def make_array(rng, shape, dtype, layout, scale=1.0, offset=0.0):
    """Random data in one of four memory layouts (same logical values layout to layout)."""
    values = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    if layout == "C":
        return values
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "permuted":        # e.g. NHWC memory seen as NCHW
        order = rng.permutation(len(shape))
        stored = np.ascontiguousarray(values.transpose(order))
        return stored.transpose(np.argsort(order))
    big = np.empty(tuple(2 * s for s in shape), dtype)      # every other element
    view = big[tuple(slice(None, None, 2) for _ in shape)]
    view[...] = values
    return view


def tolerance(dtype, reference):
    """atol + |ref| * rtol with atol scaled to the output's magnitude (llm.c style)."""
    rtol = RTOL[np.dtype(dtype).name]
    scale = float(np.max(np.abs(reference))) if np.size(reference) else 1.0
    return dict(rtol=rtol, atol=rtol * max(scale, 1.0))


def values_scale(x, axis):
    """Per channel 1 + |mean| / std of x: how much centring x cancels (the factor by which
    rounding errors of the inputs' size grow relative to the normalized values)."""
    rows = channel_rows(x, axis)
    std = rows.std(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 + np.where(std > 0, np.abs(rows.mean(axis=1)) / std, np.inf)


def channel_rows(a, axis):
    """a as float64 (C, count): one row per channel."""
    a = np.moveaxis(np.asarray(a, np.float64), axis, 0)
    return a.reshape(a.shape[0], -1)


def unit_roundoff(dtype):
    return float(np.finfo(np.dtype(dtype)).eps)


def sum_tolerance(terms, reference, stats_dtype):
    """Per-channel bound for a float64-accumulated sum of `terms` (C, count) rounded to
    stats_dtype: the output's rounding plus a random walk of count roundings (sqrt(count), not
    count: a bound linear in count lets a 1% error pass in float16)."""
    eps = unit_roundoff(stats_dtype)
    return 16 * eps * (np.abs(np.asarray(reference, np.float64))
                       + np.sqrt((np.asarray(terms, np.float64) ** 2).sum(axis=1)))

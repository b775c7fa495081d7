"""Closed-form linear heads from summed sufficient statistics: the pooled-data head in one round.

A site with trunk features x_i in R^D and labels y_i in {0..C-1} computes

    n_c = #{i: y_i = c},   s_c = sum_{y_i = c} x_i,   G = sum_i x_i x_i^T

(``Statistics``). They are sums, so the federation's statistics are the sum of the
sites', and every head computed from them is the head of the pooled data, whatever the
split. With N = sum n_c, mean m = sum s_c / N, class means mu_c = s_c / n_c:

- shrinkage LDA (``lda_head``): Sigma = (G - sum_c s_c s_c^T / n_c) / N, Sigma_a =
  (1 - alpha) Sigma + alpha (tr Sigma / D) I; w_c = Sigma_a^-1 mu_c, b_c =
  -mu_c^T Sigma_a^-1 mu_c / 2 + log(n_c / N);
- ridge on one-hot targets, bias unpenalised (``ridge_solution``): with S = G - N m m^T,
  w_c = (S + lambda N I)^-1 (s_c - n_c m), b_c = n_c / N - w_c . m; ``ridge_head`` turns
  its scores into probabilities with a Gaussian model of the scores fitted from the same
  statistics.

Under SecAgg+ (``FixedPointCodec``) each value x travels as the integer X = round(x 2^F),
written in ``limbs`` base-2^L digits (L = log2 of Flower's quantization range), each
digit sent as a point of Flower's quantization grid, which its stochastic rounding
leaves unchanged; every site reports num_examples == max_weight, so Flower's weight
factor is exactly 1 whatever the site's size. The server recovers the exact integer
sums of the digits and recombines them: the decoded sum differs from the sum of the
sites' float64 values by at most n_sites * 2^-(F+1) per entry (each site's rounding to
the fixed-point grid), plus the float64 rounding of the result.

A site's personalised head solves its own statistics plus the federation's rescaled to
its size (``personalized_statistics``). Differential privacy (``GaussianRelease``) adds
Gaussian noise once to the summed statistics of feature vectors clipped to an L2 norm
R, and post-processes the release into statistics some dataset could have
(``consistent``) so the solves stay defined.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from scipy.special import softmax

from fedhead.common.errors import ConfigError, DataError, FederationError

# --- errors ------------------------------------------------------------------------


class ClosedFormError(FederationError, title="closed-form head problem"):
    """Statistics that cannot be sent, summed or solved."""


class StatisticRangeError(ClosedFormError):
    """A statistic outside what the fixed-point code can carry, or an aggregate no
    honest sites can produce."""


class MissingClassError(ClosedFormError):
    """A class that no site holds: no head can score it."""


class SolveError(ClosedFormError):
    """A system that is not positive definite (inconsistent or too noisy statistics)."""


# --- the statistics ----------------------------------------------------------------

CHUNK_VALUES = 2**21  # feature values per chunk (16 MiB in float64): bounds the memory


@dataclass(frozen=True)
class Layout:
    """Where each statistic sits in the flat wire vector: counts (C), class sums (C x D,
    row by row), then the Gram matrix's upper triangle with its diagonal, row by row."""

    num_classes: int
    dim: int

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @property
    def gram_size(self) -> int:
        return self.dim * (self.dim + 1) // 2

    @property
    def size(self) -> int:
        return self.num_classes * (1 + self.dim) + self.gram_size

    def bytes_float64(self) -> int:
        return 8 * self.size

    def describe(self, index: int) -> str:
        """Which statistic the flat ``index`` holds, in words."""
        c, d = self.num_classes, self.dim
        if index < c:
            return f"the count of class {index}"
        if index < c + c * d:
            cls, feature = divmod(index - c, d)
            return f"the sum of class {cls}, feature {feature}"
        k = index - c - c * d
        row_starts = np.cumsum(np.arange(d, 0, -1)) - np.arange(d, 0, -1)
        row = int(np.searchsorted(row_starts, k, side="right") - 1)
        return f"the Gram entry ({row}, {row + k - int(row_starts[row])})"


@dataclass(frozen=True)
class Statistics:
    """Per-class counts (C,), per-class feature sums (C, D) and the Gram matrix
    sum x x^T (D, D), all float64 (a real site's counts are integers)."""

    counts: np.ndarray
    sums: np.ndarray
    gram: np.ndarray

    def __post_init__(self) -> None:
        for name in ("counts", "sums", "gram"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        c = self.counts.shape[0] if self.counts.ndim == 1 else -1
        d = self.sums.shape[1] if self.sums.ndim == 2 else -1
        if c < 1 or self.sums.shape != (c, d) or d < 1 or self.gram.shape != (d, d):
            raise ValueError(
                f"statistics shapes counts {self.counts.shape}, sums {self.sums.shape}, "
                f"gram {self.gram.shape} do not fit (C,), (C, D), (D, D)"
            )

    @property
    def layout(self) -> Layout:
        return Layout(self.counts.shape[0], self.sums.shape[1])

    @property
    def total(self) -> float:
        """The number of examples behind the statistics (views count one each)."""
        return float(self.counts.sum())

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, num_classes: int) -> Statistics:
        """The statistics of ``features`` (n, D), or (V, n, D) with V views per example
        (every view one example), and their int ``labels`` (n,)."""
        return clipped_statistics(features, labels, num_classes, clip_norm=0.0).statistics

    @classmethod
    def zeros(cls, layout: Layout) -> Statistics:
        c, d = layout.num_classes, layout.dim
        return cls(np.zeros(c), np.zeros((c, d)), np.zeros((d, d)))

    def __add__(self, other: Statistics) -> Statistics:
        if self.layout != other.layout:
            raise ValueError(f"cannot add statistics of {self.layout} and {other.layout}")
        return Statistics(
            self.counts + other.counts, self.sums + other.sums, self.gram + other.gram
        )

    def scaled(self, factor: float) -> Statistics:
        """Every statistic times ``factor`` (the data set repeated ``factor`` times)."""
        return Statistics(factor * self.counts, factor * self.sums, factor * self.gram)

    def to_vector(self) -> np.ndarray:
        """The flat float64 wire vector (``Layout``)."""
        upper = self.gram[np.triu_indices(self.layout.dim)]
        return np.concatenate([self.counts, self.sums.ravel(), upper])

    @classmethod
    def from_vector(cls, vector: np.ndarray, layout: Layout) -> Statistics:
        """Statistics from a wire vector of ``layout`` (the Gram made symmetric)."""
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != (layout.size,):
            raise ValueError(
                f"a statistics vector for {layout.num_classes} classes and {layout.dim} "
                f"features has {layout.size} values, got shape {v.shape}"
            )
        c, d = layout.num_classes, layout.dim
        gram = np.zeros((d, d))
        gram[np.triu_indices(d)] = v[c + c * d :]
        gram = gram + np.triu(gram, 1).T
        return cls(v[:c].copy(), v[c : c + c * d].reshape(c, d).copy(), gram)


@dataclass(frozen=True)
class ClippedStatistics:
    """A site's statistics with how many of its feature vectors were clipped."""

    statistics: Statistics
    clipped: int  # feature vectors (views) scaled down to the clipping norm
    examples: int  # feature vectors (views) counted


def _chunks(features: np.ndarray, labels: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Float64 row blocks of (n, D) or (V, n, D) features with their labels."""
    views = features if features.ndim == 3 else features[np.newaxis]
    rows = max(1, CHUNK_VALUES // views.shape[2])
    for view in views:
        for start in range(0, view.shape[0], rows):
            yield (
                np.array(view[start : start + rows], dtype=np.float64),  # a copy: clipped in place
                labels[start : start + rows],
            )


def _checked_inputs(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    if features.ndim not in (2, 3) or features.shape[-1] < 1:
        raise DataError(
            f"features have shape {features.shape}; expected (examples, D) or (views, examples, D)"
        )
    y = np.asarray(labels)
    n = features.shape[-2]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be {n} integers, got shape {y.shape} dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes - 1}], found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def clipped_statistics(
    features: np.ndarray, labels: np.ndarray, num_classes: int, clip_norm: float
) -> ClippedStatistics:
    """Statistics of the features, each vector first scaled to L2 norm at most
    ``clip_norm`` (0: none), computed in float64 in chunks of ``CHUNK_VALUES``."""
    if clip_norm < 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be >= 0 and finite, got {clip_norm}")
    y = _checked_inputs(features, labels, num_classes)
    d = features.shape[-1]
    total = Statistics.zeros(Layout(num_classes, d))
    counts, sums, gram = total.counts, total.sums, total.gram
    clipped = 0
    for x, yc in _chunks(features, y):
        if not np.isfinite(x).all():
            raise DataError("features hold NaN or infinite values", "extract them again")
        if clip_norm > 0:
            norms = np.linalg.norm(x, axis=1)
            over = norms > clip_norm
            clipped += int(over.sum())
            x[over] *= (clip_norm / norms[over])[:, np.newaxis]
        onehot = np.zeros((num_classes, len(yc)))
        onehot[yc, np.arange(len(yc))] = 1.0
        counts += onehot.sum(axis=1)
        sums += onehot @ x
        gram += x.T @ x
    views = features.shape[0] if features.ndim == 3 else 1
    return ClippedStatistics(Statistics(counts, sums, (gram + gram.T) / 2), clipped, views * len(y))


# --- screening a site's plain (non-SecAgg+) statistics -------------------------------


@dataclass(frozen=True)
class Problem:
    """Why statistics are refused: a bounded ``reason`` (a ``REJECT_REASONS`` label) and
    one line of detail."""

    reason: str
    detail: str


RELATIVE_TOLERANCE = 1e-9  # float64 rounding of honest sums is far below this


def _first(mask: np.ndarray, layout: Layout, offset: int = 0) -> str:
    bad = np.flatnonzero(mask)
    return f"{len(bad)} value(s), first {layout.describe(offset + int(bad[0]))}"


def screen_statistics(
    vector: np.ndarray, layout: Layout, max_examples: float, abs_tolerance: float = 0.0
) -> list[Problem]:
    """Problems of one site's statistics vector (empty: accepted), checked in order:
    shape, finite values, non-negative integral counts, a total of at most
    ``max_examples`` (its prepare-time training count times the views, at most the
    cap), then a Gram consistent with the sums. ``abs_tolerance`` widens the
    consistency checks for values that were rounded (a SecAgg+ aggregate:
    ``FixedPointCodec.error_bound``)."""
    v = np.asarray(vector)
    if v.ndim != 1 or v.shape[0] != layout.size or not np.issubdtype(v.dtype, np.floating):
        return [
            Problem(
                "structure",
                f"statistics vector of shape {v.shape} and dtype {v.dtype}; expected "
                f"({layout.size},) floats for {layout.num_classes} classes x {layout.dim} "
                "features",
            )
        ]
    if not np.isfinite(v).all():
        return [Problem("non_finite", f"NaN or infinite: {_first(~np.isfinite(v), layout)}")]
    stats = Statistics.from_vector(v, layout)
    problems = _count_problems(stats, layout, max_examples)
    return problems or _gram_problems(stats, layout, abs_tolerance)


def _count_problems(stats: Statistics, layout: Layout, max_examples: float) -> list[Problem]:
    counts = stats.counts
    if (counts < 0).any() or (counts != np.round(counts)).any():
        bad = (counts < 0) | (counts != np.round(counts))
        return [Problem("malformed", f"negative or fractional counts: {_first(bad, layout)}")]
    if stats.total > max_examples:
        return [
            Problem(
                "weight",
                f"counts {stats.total:.0f} examples, more than the {max_examples:.0f} it "
                "may count (its count when the run started, at most max-site-examples)",
            )
        ]
    if stats.total == 0:
        return [Problem("no_examples", "counts no examples")]
    return []


def _gram_problems(stats: Statistics, layout: Layout, tol: float) -> list[Problem]:
    """Checks any real feature vectors pass: a non-negative diagonal, |G_ab| <=
    sqrt(G_aa G_bb), sum_c s_ca^2 / n_c <= G_aa (Cauchy-Schwarz per class, which
    implies the pooled (sum_c s_ca)^2 <= N G_aa), no sums for an empty class, and a
    positive semi-definite within-class scatter G - sum_c s_c s_c^T / n_c."""
    g, d = stats.gram, layout.dim
    diag = np.diag(g)
    rel = RELATIVE_TOLERANCE
    if (neg := diag < -tol).any():
        idx = np.flatnonzero(neg)[0]
        return [Problem("range", f"negative Gram diagonal: {_upper_name(layout, idx, idx)}")]
    iu = np.triu_indices(d, 1)
    bound = np.sqrt(np.maximum(diag, 0))
    excess = np.abs(g[iu]) > bound[iu[0]] * bound[iu[1]] * (1 + rel) + tol
    if excess.any():
        k = int(np.flatnonzero(excess)[0])
        where = _upper_name(layout, int(iu[0][k]), int(iu[1][k]))
        return [
            Problem("range", f"|G_ab| > sqrt(G_aa G_bb) at {excess.sum()} entries, first {where}")
        ]
    empty = stats.counts == 0
    if (stats.sums[empty] != 0).any():
        cls = int(np.flatnonzero(empty & (stats.sums != 0).any(axis=1))[0])
        return [Problem("range", f"class {cls} has no examples but non-zero feature sums")]
    held = ~empty
    between = (stats.sums[held] ** 2 / stats.counts[held, np.newaxis]).sum(axis=0)
    if (over := between > diag * (1 + rel) + tol * (1 + held.sum())).any():
        a = int(np.flatnonzero(over)[0])
        return [
            Problem(
                "range",
                f"class sums too large for the Gram diagonal (sum_c s_ca^2/n_c > G_aa) at "
                f"{over.sum()} feature(s), first {_upper_name(layout, a, a)}",
            )
        ]
    if not _is_psd(within_scatter(stats), tol):
        return [
            Problem(
                "range",
                "the Gram minus the class-mean part is not positive semi-definite: no set "
                "of feature vectors has these statistics",
            )
        ]
    return []


def _upper_name(layout: Layout, a: int, b: int) -> str:
    d = layout.dim
    k = a * d - a * (a - 1) // 2 + (b - a)
    return layout.describe(layout.num_classes * (1 + d) + k)


def within_scatter(stats: Statistics) -> np.ndarray:
    """G - sum_c s_c s_c^T / n_c over the classes present: the pooled within-class
    scatter (N times the within-class covariance)."""
    held = stats.counts > 0
    s, n = stats.sums[held], stats.counts[held]
    scatter = stats.gram - (s.T / n) @ s
    symmetric: np.ndarray = (scatter + scatter.T) / 2
    return symmetric


def _is_psd(matrix: np.ndarray, tol: float) -> bool:
    d = matrix.shape[0]
    jitter = RELATIVE_TOLERANCE * max(float(np.trace(matrix)), 0.0) + tol * d
    jitter = max(jitter, np.finfo(np.float64).tiny * d)
    try:
        scipy.linalg.cholesky(matrix + jitter * np.eye(d), lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return False
    return True


def aggregate_problems(stats: Statistics, max_examples: float) -> list[Problem]:
    """Checks of a decoded SecAgg+ sum: integral non-negative counts whose total is at
    most ``max_examples`` (the sum of the summed sites' caps)."""
    return _count_problems(stats, stats.layout, max_examples)


# --- exact transport through Flower's SecAgg+ ---------------------------------------


def _power_of_two_exponent(value: float) -> int | None:
    mantissa, exponent = math.frexp(value)
    return exponent - 1 if value > 0 and mantissa == 0.5 else None


@dataclass(frozen=True)
class FixedPointCodec:
    """Statistics as exact fixed-point integers on Flower's SecAgg+ quantization grid.

    Every site must report ``num_examples == max_weight`` for this round, so Flower's
    weight factor is exactly 1 whatever the site's size. ``clipping_range`` and
    ``quantization_range`` are Flower's (both powers of two, so grid points survive its
    arithmetic unchanged); ``fraction_bits`` F fixes the resolution 2^-F and ``limbs``
    the number of L-bit digits per value (L = log2 quantization_range).

    Defaults (3 digits of 22 bits, F = 30): values up to 2^32 (4.3e9) per entry and
    site, resolution 9.3e-10. A Gram entry is at most a site's examples times the
    largest squared feature: 100,000 examples of MobileNetV2's ReLU6 features (at most
    6) give 3.6e6, of a ResNet-50's (rarely above 30) 9e7, far inside the range, and
    entries of size ~1e3 carry ~12 significant digits more than float32 features hold.
    """

    clipping_range: float = 8.0
    quantization_range: int = 2**22
    fraction_bits: int = 30
    limbs: int = 3
    modulus_range: int = 2**32

    def __post_init__(self) -> None:
        problems = []
        if _power_of_two_exponent(self.clipping_range) is None:
            problems.append(
                f"secagg-clipping-range: {self.clipping_range} is not a power of two; "
                "closed-form statistics pass SecAgg+ exactly only on a power-of-two grid "
                "(use 8)"
            )
        q = self.quantization_range
        if not isinstance(q, int) or q < 2 or q & (q - 1):
            problems.append(
                f"secagg-quantization-range: {q} is not a power of two >= 2; closed-form "
                "statistics pass SecAgg+ exactly only on a power-of-two grid (use 4194304)"
            )
        if problems:
            raise ConfigError(problems, "run configuration")
        if not isinstance(self.limbs, int) or not 1 <= self.limbs <= 63 // self.digit_bits + 1:
            raise ValueError(
                f"limbs must be an integer in [1, {63 // self.digit_bits + 1}] (int64 "
                f"values in {self.digit_bits}-bit digits), got {self.limbs}"
            )
        if not isinstance(self.fraction_bits, int) or not 0 <= self.fraction_bits < 60:
            raise ValueError(
                f"fraction_bits must be an integer in [0, 60), got {self.fraction_bits}"
            )
        if self.fraction_bits >= self._value_bits:
            raise ValueError(
                f"fraction_bits {self.fraction_bits} leaves no integer bits in "
                f"{self.limbs} digits of {self.digit_bits} bits; lower it or add limbs"
            )
        m = self.modulus_range
        if not isinstance(m, int) or m <= q or m & (m - 1):
            raise ValueError(f"modulus_range must be a power of two above {q}, got {m}")

    @property
    def digit_bits(self) -> int:
        """L: the bits of one digit, log2 of the quantization range."""
        return self.quantization_range.bit_length() - 1

    @property
    def step(self) -> float:
        """The distance between two points of Flower's grid: 2c / Q (exact)."""
        return 2 * self.clipping_range / self.quantization_range

    @property
    def _value_bits(self) -> int:
        """Bits of |X| the digits (and int64) carry, sign apart."""
        return min(self.limbs * self.digit_bits, 63) - 1

    @property
    def capacity(self) -> float:
        """The largest |value| a site may send (the fixed point's range)."""
        return 2.0 ** (self._value_bits - self.fraction_bits)

    def error_bound(self, n_sites: int) -> float:
        """The most a decoded sum's entry differs from the sum of the sites' float64
        values: each site's rounding to the 2^-F grid (float64 rounding of the result
        apart, relative ~1e-16)."""
        return n_sites * 2.0 ** -(self.fraction_bits + 1)

    def bytes_per_site(self, layout: Layout) -> int:
        """The bytes of a site's masked vector under SecAgg+ (int64 per digit, plus
        Flower's weight factor)."""
        return 8 * (self.limbs * layout.size + 1)

    # --- the site's side
    def digits(self, vector: np.ndarray, layout: Layout | None = None) -> np.ndarray:
        """int64 digits (limbs, P) of round(vector 2^F): the low ones in [0, 2^L), the top
        one offset by 2^(L-1) so that every digit lies in [0, 2^L)."""
        x = np.asarray(vector, dtype=np.float64).ravel()
        scaled = x * 2.0**self.fraction_bits
        limit = 2.0**self._value_bits - 1.0
        ok = np.abs(scaled) < limit  # False for NaN too
        if not ok.all():
            self._refuse(x, ~ok, layout)
        value = np.rint(scaled).astype(np.int64)
        bits, mask = self.digit_bits, (1 << self.digit_bits) - 1
        out = np.empty((self.limbs, x.size), dtype=np.int64)
        for j in range(self.limbs - 1):
            out[j] = (value >> (j * bits)) & mask
        out[-1] = (value >> ((self.limbs - 1) * bits)) + (1 << (bits - 1))
        return out

    def _refuse(self, x: np.ndarray, bad: np.ndarray, layout: Layout | None) -> None:
        i = int(np.flatnonzero(bad)[0])
        what = layout.describe(i) if layout else f"value {i}"
        raise StatisticRangeError(
            f"{what} is {x[i]:.6g}, outside the +-{self.capacity:.4g} the SecAgg+ "
            f"fixed-point code carries ({bad.sum()} value(s) out of range)",
            "lower fraction-bits or add limbs (the same at every site), or lower max-site-examples",
        )

    def encode(self, vector: np.ndarray, layout: Layout | None = None) -> np.ndarray:
        """The float64 vector (limbs x P) a site hands to ``secaggplus_mod``: each digit k
        as the grid point k 2c/Q - c, which Flower quantizes back to exactly k."""
        k = self.digits(vector, layout).astype(np.float64)
        return (k * self.step - self.clipping_range).ravel()

    # --- the server's side
    def digit_sums(self, mean: np.ndarray, n_sites: int) -> np.ndarray:
        """The exact integer digit sums (limbs, P) behind Flower's aggregated ``mean``
        ((sum * step - n c) / n, as its unmask stage computes it); refuses a mean that
        is not such a sum or lies outside [0, n (2^L - 1)]."""
        if not isinstance(n_sites, int) or n_sites < 1:
            raise ValueError(f"n_sites must be an integer >= 1, got {n_sites}")
        if n_sites * self.quantization_range >= self.modulus_range:
            raise ValueError(
                f"n_sites {n_sites} x quantization_range {self.quantization_range} "
                f"overflows the modulus {self.modulus_range}"
            )
        m = np.asarray(mean, dtype=np.float64).ravel()
        if m.size % self.limbs:
            raise StatisticRangeError(
                f"aggregate of {m.size} values is not {self.limbs} digits per statistic"
            )
        raw = (m * n_sites + n_sites * self.clipping_range) / self.step
        sums = np.rint(raw)
        off_grid = ~(np.abs(raw - sums) <= 0.25)
        top = n_sites * ((1 << self.digit_bits) - 1)
        out_of_range = (sums < 0) | (sums > top)
        if off_grid.any() or out_of_range.any():
            raise StatisticRangeError(
                f"the SecAgg+ aggregate is not a sum of {n_sites} sites' digits: "
                f"{int(off_grid.sum())} value(s) off the grid, {int(out_of_range.sum())} "
                f"outside [0, {top}]",
                "every site must report num-examples equal to max-weight for the "
                "statistics round and use the same codec",
            )
        return sums.astype(np.int64).reshape(self.limbs, -1)

    def combine(self, sums: np.ndarray, n_sites: int) -> np.ndarray:
        """The float64 sum of the sites' fixed-point values from exact digit sums: the
        top digit's offsets removed, carries propagated in int64, then Horner's rule."""
        s = np.array(sums, dtype=np.int64, copy=True)
        bits = self.digit_bits
        s[-1] -= n_sites * (1 << (bits - 1))
        for j in range(self.limbs - 1):
            carry = s[j] >> bits
            s[j] -= carry << bits
            s[j + 1] += carry
        value = s[-1].astype(np.float64)
        for j in range(self.limbs - 2, -1, -1):
            value = value * 2.0**bits + s[j]
        result: np.ndarray = value * 2.0**-self.fraction_bits
        return result

    def decode(self, mean: np.ndarray, n_sites: int) -> np.ndarray:
        """The summed statistics vector behind Flower's aggregated ``mean`` of
        ``n_sites`` encoded vectors (within ``error_bound(n_sites)`` of the plain sum)."""
        return self.combine(self.digit_sums(mean, n_sites), n_sites)


# --- the solves --------------------------------------------------------------------


@dataclass(frozen=True)
class LinearHead:
    """A linear head: softmax(x W^T + b) is the class probability."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)

    def logits(self, features: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias
        return out

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        out: np.ndarray = softmax(self.logits(features), axis=1)
        return out


LDA = "lda"
RIDGE = "ridge"
METHODS = (LDA, RIDGE)
# Candidates for federated validation: LDA shrinkage alpha, ridge lambda (times N).
LDA_SHRINKAGES = (0.01, 0.03, 0.1, 0.3, 0.6)
RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def require_every_class(stats: Statistics, class_names: Sequence[str] = ()) -> None:
    """Refuse statistics in which some class has no example."""
    missing = np.flatnonzero(~(stats.counts > 0))
    if missing.size:
        c = int(missing[0])
        name = f"{class_names[c]!r}" if c < len(class_names) else f"{c}"
        raise MissingClassError(
            f"class {name} has no training examples at any site ({missing.size} such class(es))",
            "add a site holding it, or leave it out of the run's classes",
        )


def _spd_solve(matrix: np.ndarray, rhs: np.ndarray, what: str) -> np.ndarray:
    """matrix^-1 rhs for a symmetric positive-definite matrix (Cholesky)."""
    sym = (matrix + matrix.T) / 2
    try:
        factor = scipy.linalg.cho_factor(sym, lower=True, check_finite=True)
    except (np.linalg.LinAlgError, ValueError) as err:
        raise SolveError(
            f"{what} is not positive definite ({err})",
            "the statistics are inconsistent or too noisy; raise the regularisation",
        ) from err
    out: np.ndarray = scipy.linalg.cho_solve(factor, rhs, check_finite=False)
    return out


def lda_covariance(stats: Statistics, shrinkage: float) -> np.ndarray:
    """The pooled within-class covariance (scatter / N) shrunk by ``shrinkage`` toward
    (tr / D) I, as scikit-learn's LinearDiscriminantAnalysis(solver='lsqr') does."""
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    cov = within_scatter(stats) / stats.total
    shrunk = (1 - shrinkage) * cov
    shrunk[np.diag_indices_from(shrunk)] += shrinkage * np.trace(cov) / cov.shape[0]
    return shrunk


def lda_head(
    stats: Statistics, shrinkage: float = 0.1, *, class_names: Sequence[str] = ()
) -> LinearHead:
    """Shrinkage LDA: w_c = Sigma^-1 mu_c, b_c = -mu_c^T Sigma^-1 mu_c / 2 + log prior_c."""
    require_every_class(stats, class_names)
    means = stats.sums / stats.counts[:, np.newaxis]
    cov = lda_covariance(stats, shrinkage)
    weight = _spd_solve(cov, means.T, f"the LDA covariance (shrinkage {shrinkage:g})").T
    bias = -0.5 * np.einsum("cd,cd->c", means, weight) + np.log(stats.counts / stats.total)
    return LinearHead(weight, bias)


def ridge_solution(
    stats: Statistics, lam: float = 0.01, *, class_names: Sequence[str] = ()
) -> LinearHead:
    """Ridge regression of one-hot targets on the features with an unpenalised bias:
    argmin sum_i |onehot(y_i) - W x_i - b|^2 + lam N |W|^2. Its scores sum to 1 but are
    not probabilities: ``ridge_head`` calibrates them."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    require_every_class(stats, class_names)
    n = stats.total
    mean = stats.sums.sum(axis=0) / n
    total_scatter = stats.gram - n * np.outer(mean, mean)
    system = total_scatter + lam * n * np.eye(stats.layout.dim)
    rhs = (stats.sums - stats.counts[:, np.newaxis] * mean).T
    weight = _spd_solve(system, rhs, f"the ridge system (lambda {lam:g})").T
    bias = stats.counts / n - weight @ mean
    return LinearHead(weight, bias)


def ridge_head(
    stats: Statistics, lam: float = 0.01, *, class_names: Sequence[str] = ()
) -> LinearHead:
    """Ridge scores f = W x + b turned into probabilities: LDA on the scores, whose
    class means W mu_c + b and shared covariance W Sigma W^T follow from the same
    statistics (a pseudo-inverse, as the scores sum to 1). Still linear in x; for two
    classes a logistic map of the ridge score difference, so its ranking is ridge's."""
    raw = ridge_solution(stats, lam, class_names=class_names)
    means = stats.sums / stats.counts[:, np.newaxis]
    score_means = means @ raw.weight.T + raw.bias  # (C, C): row c = mean score of class c
    score_cov = raw.weight @ (within_scatter(stats) / stats.total) @ raw.weight.T
    precision = scipy.linalg.pinvh((score_cov + score_cov.T) / 2, rtol=1e-10)
    direction = score_means @ precision  # (C, C): row c = P m_c
    weight = direction @ raw.weight
    bias = (
        direction @ raw.bias
        - 0.5 * np.einsum("ck,ck->c", direction, score_means)
        + np.log(stats.counts / stats.total)
    )
    return LinearHead(weight, bias)


@dataclass(frozen=True)
class Candidate:
    """One head of the validation grid: its method, parameter and weights."""

    method: str  # LDA or RIDGE
    parameter: float  # LDA shrinkage or ridge lambda
    head: LinearHead

    @property
    def label(self) -> str:
        name = "shrinkage" if self.method == LDA else "lambda"
        return f"{self.method} {name}={self.parameter:g}"


def candidate_heads(
    stats: Statistics,
    method: str,
    parameters: Sequence[float] | None = None,
    *,
    class_names: Sequence[str] = (),
) -> list[Candidate]:
    """The heads of ``method`` for each parameter (default: ``LDA_SHRINKAGES`` or
    ``RIDGE_LAMBDAS``), for federated validation to choose from."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    grid = parameters or (LDA_SHRINKAGES if method == LDA else RIDGE_LAMBDAS)
    solve = lda_head if method == LDA else ridge_head
    return [Candidate(method, p, solve(stats, p, class_names=class_names)) for p in grid]


# --- personalisation ---------------------------------------------------------------


def personalized_statistics(site: Statistics, federation: Statistics, kappa: float) -> Statistics:
    """A site's own statistics plus ``kappa`` times the federation's rescaled to the
    site's size: kappa = 0 is the site alone, kappa -> inf the federated head, kappa = 1
    weighs the two equally. Solved like any statistics; the prior follows the mix, so
    a site keeps its own class balance in part."""
    if not kappa >= 0 or not math.isfinite(kappa):
        raise ValueError(f"kappa must be >= 0 and finite, got {kappa}")
    if not federation.total > 0:
        raise ValueError("the federation's statistics count no examples")
    return site + federation.scaled(kappa * site.total / federation.total)


# --- differential privacy: one Gaussian release ------------------------------------

BLOCKS = ("counts", "sums", "gram")


@dataclass(frozen=True)
class GaussianRelease:
    """One Gaussian release of the summed statistics of features clipped to L2 norm
    ``clip_norm`` (R), record-level add-or-remove-one privacy.

    One record (``rows_per_record`` feature vectors: an image and its augmented views)
    changes the counts by at most k, the class sums by k R and the Gram's upper
    triangle by k R^2 in L2 (sum_{a<=b} (x_a x_b)^2 <= |x|^4), k = rows_per_record.
    Block j gets noise std z Delta_j / sqrt(share_j) with the ``shares`` summing to 1,
    so sum_j (Delta_j / std_j)^2 = 1 / z^2: one Gaussian mechanism of noise multiplier
    z. Equal shares (the default) equal isotropic noise on the statistics of x / R:
    unlike isotropic noise of std z sqrt(1 + R^2 + R^4), the relative noise on each
    block does not depend on the units of the features.
    """

    noise_multiplier: float
    clip_norm: float
    delta: float = 1e-5
    shares: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    rows_per_record: int = 1
    _stds: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        z, r = self.noise_multiplier, self.clip_norm
        if not (z > 0 and math.isfinite(z)):
            raise ValueError(f"noise_multiplier must be > 0 and finite, got {z}")
        if not (r > 0 and math.isfinite(r)):
            raise ValueError(f"clip_norm must be > 0 and finite, got {r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if len(self.shares) != 3 or min(self.shares) <= 0 or abs(sum(self.shares) - 1) > 1e-9:
            raise ValueError(f"shares must be 3 positive numbers summing to 1, got {self.shares}")
        if not isinstance(self.rows_per_record, int) or self.rows_per_record < 1:
            raise ValueError(f"rows_per_record must be an integer >= 1, got {self.rows_per_record}")
        stds = tuple(
            z * s / math.sqrt(w) for s, w in zip(self.sensitivities(), self.shares, strict=True)
        )
        object.__setattr__(self, "_stds", stds)

    def sensitivities(self) -> tuple[float, float, float]:
        """L2 sensitivity of the counts, the class sums and the Gram's upper triangle."""
        k, r = self.rows_per_record, self.clip_norm
        return (float(k), k * r, k * r * r)

    def noise_stds(self) -> tuple[float, ...]:
        """The noise standard deviation of each block (counts, sums, Gram)."""
        return self._stds

    def epsilon(self) -> float:
        """Epsilon at ``delta`` of this one release (Flower's RDP accountant, no
        sampling amplification)."""
        from flwr.serverapp import RdpAccountant
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )

        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=self.delta,
                population_size=1,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, 1, 1))
        return float(accountant.get_epsilon(self.delta))

    def add_noise(self, stats: Statistics, rng: np.random.Generator) -> Statistics:
        """The statistics with this release's noise: independent per count, per class
        sum and per upper-triangle Gram entry (mirrored below the diagonal)."""
        std_n, std_s, std_g = self._stds
        d = stats.layout.dim
        noise = np.zeros((d, d))
        noise[np.triu_indices(d)] = rng.normal(0.0, std_g, stats.layout.gram_size)
        noise = noise + np.triu(noise, 1).T
        return Statistics(
            stats.counts + rng.normal(0.0, std_n, stats.counts.shape),
            stats.sums + rng.normal(0.0, std_s, stats.sums.shape),
            stats.gram + noise,
        )

    def release(self, stats: Statistics, rng: np.random.Generator) -> Statistics:
        """The noisy statistics, post-processed by ``consistent`` (no privacy cost)."""
        return consistent(self.add_noise(stats, rng))


def consistent(stats: Statistics, min_count: float = 1.0) -> Statistics:
    """Statistics some data set could have, near ``stats`` (post-processing of a noisy
    release): counts clamped at ``min_count`` (so every class has a mean and a prior;
    a class no site holds cannot be told from one with a few examples), and the
    within-class scatter projected onto the positive semi-definite matrices (its
    negative eigenvalues set to 0), which keeps LDA's covariance and ridge's system
    positive definite for any shrinkage or lambda > 0."""
    counts = np.maximum(stats.counts, min_count)
    clamped = Statistics(counts, stats.sums, stats.gram)
    between = stats.gram - within_scatter(clamped)
    values, vectors = scipy.linalg.eigh(within_scatter(clamped))
    scatter = (vectors * np.maximum(values, 0.0)) @ vectors.T
    gram = scatter + between
    return Statistics(counts, stats.sums, (gram + gram.T) / 2)

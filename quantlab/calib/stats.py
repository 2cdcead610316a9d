"""Activation statistics: pure functions over a ``(tokens, channels)`` tensor and exact running sums.

Definitions (one tensor ``x`` of shape ``(n, c)``; "values" are all ``n·c`` entries):

| statistic        | definition                                                                                   |
|------------------|----------------------------------------------------------------------------------------------|
| ``hist_entropy`` | ``bins`` (default 256) equal-width bins over ``[min(x), max(x)]`` of all values (numpy's      |
|                  | ``histogram`` convention: the last bin is closed); ``-Σ p log2 p`` in bits; 0 for a constant  |
| ``variance``     | population variance of all values (``np.var``, ddof 0)                                       |
| ``kurtosis``     | **excess** (Fisher) kurtosis of all values, ``m4 / m2² − 3`` (``scipy.stats.kurtosis``        |
|                  | defaults: ``fisher=True, bias=True``); 0 for a Gaussian, NaN for a constant tensor            |
| ``absmax``       | ``max |x|``                                                                                  |
| ``outlier_share``| massive activations: share of channels whose ``max |x|`` exceeds ``ratio`` (default 20) times |
|                  | the median over channels of the per-channel ``max |x|``                                      |
| ``mean_square``  | per channel ``E[x²]`` over tokens, ``(c,)``: the diagonal of ``XᵀX / n`` (AWQ, SmoothQuant)   |
| ``mean_abs``     | per channel ``E[|x|]``, ``(c,)`` (AWQ's activation scale)                                    |
| Hessian          | ``H = Σ_t w_t x_t x_tᵀ`` in float32, a **plain weighted sum** (not GPTQ's running mean);     |
|                  | GPTQ's ``H = 2/n Σ x xᵀ`` is ``2 · H / Σ_t w_t`` (:func:`gptq_hessian`)                       |

:class:`Moments` holds, split into image and text tokens, everything the exactly-mergeable statistics
need: token counts, ``Σx, Σx², Σx³, Σx⁴`` over values and per-channel ``Σx², Σ|x|, max|x|``. A chunk's
sums are float32 GEMMs over its tokens (relative error ~1e-6); chunks are merged in float64. Merging the
moments of chunks gives the moments of their concatenation up to that rounding (counts and maxima
exactly). "all" is image + text.

Histogram entropy and k-means entropy need the token vectors themselves; they are computed on a
bounded reservoir of tokens (:class:`TokenReservoir`): every token gets a key hashed from
``(seed, sample index, position)`` and a reservoir of size ``m`` keeps the ``m`` smallest keys. The
choice therefore does not depend on the order or chunking of the stream, the same positions are
chosen at every block, and the "all" reservoir is the ``m`` smallest keys of the image and text
reservoirs together (no third copy is stored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MODALITIES: tuple[str, ...] = ("image", "text", "all")
DEFAULT_BINS = 256
DEFAULT_OUTLIER_RATIO = 20.0


# --- pure statistics over one tensor -----------------------------------------------------------------

def hist_entropy(x: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Entropy (bits) of the histogram of all values of ``x`` over its own range (see module table)."""
    v = x.detach().flatten().to(torch.float64, copy=True)  # modified in place below
    if v.numel() == 0:
        return float("nan")
    lo_t, hi_t = torch.aminmax(v)
    lo, hi = float(lo_t), float(hi_t)
    if hi <= lo:
        return 0.0
    # (v - lo) >= 0, so truncation is floor; the top edge goes to the last bin (closed, like numpy)
    idx = v.sub_(lo).mul_(bins / (hi - lo)).to(torch.int32).clamp_(max=bins - 1)
    counts = torch.bincount(idx, minlength=bins).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def variance(x: torch.Tensor) -> float:
    """Population variance of all values (float64)."""
    return float(x.detach().double().var(unbiased=False))


def kurtosis(x: torch.Tensor) -> float:
    """Excess (Fisher) kurtosis of all values, biased estimator (= ``scipy.stats.kurtosis(x, None)``)."""
    v = x.detach().flatten().double()
    d = v - v.mean()
    m2 = float((d * d).mean())
    m4 = float((d ** 4).mean())
    return m4 / (m2 * m2) - 3.0 if m2 > 0 else float("nan")


def absmax(x: torch.Tensor) -> float:
    """``max |x|`` over all values."""
    return float(x.detach().abs().max())


def outlier_share(chan_absmax: torch.Tensor, ratio: float = DEFAULT_OUTLIER_RATIO) -> float:
    """Share of channels whose ``max |x|`` exceeds ``ratio`` × the median channel ``max |x|``."""
    m = chan_absmax.double()
    if m.numel() == 0:
        return float("nan")
    med = float(m.median())  # lower median for even counts (torch convention)
    return float((m > ratio * med).double().mean())


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``E[x²]`` of ``(n, c)`` → ``(c,)`` float64."""
    v = x.detach().double()
    return (v * v).mean(0)


def hessian_update(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_t w_t x_t x_tᵀ`` of ``x`` ``(n, c)`` in float32 → ``(c, c)`` (``w = 1`` when None)."""
    xf = x.detach().float()
    xw = xf if weight is None else xf * weight.float()[:, None]  # (n, c)
    return xw.T @ xf


def gptq_hessian(h_sum: torch.Tensor, weight_sum: float) -> torch.Tensor:
    """GPTQ's normalisation of a plain sum: ``2 · H / Σ w``."""
    return h_sum * (2.0 / weight_sum)


def moments_to_stats(n_values: float, power: Sequence[float]) -> tuple[float, float, float]:
    """(mean, population variance, excess kurtosis) from ``n`` and the raw power sums ``Σx..Σx⁴``."""
    if n_values <= 0:
        return float("nan"), float("nan"), float("nan")
    e1, e2, e3, e4 = (float(s) / n_values for s in power)
    m2 = e2 - e1 * e1
    m4 = e4 - 4 * e1 * e3 + 6 * e1 * e1 * e2 - 3 * e1 ** 4
    kurt = m4 / (m2 * m2) - 3.0 if m2 > 0 else float("nan")
    return e1, max(m2, 0.0), kurt


# --- exactly mergeable running sums ------------------------------------------------------------------

@dataclass
class Moments:
    """Running sums of one tensor, image tokens in row 0 and text tokens in row 1."""

    count: torch.Tensor  # (2,) int64: tokens
    power: torch.Tensor  # (2, 4) float64: Σx, Σx², Σx³, Σx⁴ over values
    chan_sq: torch.Tensor  # (2, c) float64: Σx² per channel
    chan_abs: torch.Tensor  # (2, c) float64: Σ|x| per channel
    chan_max: torch.Tensor  # (2, c) float32: max|x| per channel (0 where no token)

    @property
    def channels(self) -> int:
        return self.chan_sq.shape[1]

    @staticmethod
    def of(x: torch.Tensor, is_image: torch.Tensor, *, chunk_values: int = 1 << 22) -> Moments:
        """The sums of ``x`` ``(n, c)``, split by the boolean token mask ``is_image`` ``(n,)``.

        Rows are processed ``chunk_values // c`` at a time, so the float64 temporaries stay bounded.
        """
        n, c = x.shape
        step = max(1, chunk_values // max(c, 1))
        out = Moments.zeros(c, x.device)
        for lo in range(0, n, step):
            out = out.merge(Moments._of(x[lo:lo + step], is_image[lo:lo + step]))
        return out

    @staticmethod
    def _of(x: torch.Tensor, is_image: torch.Tensor) -> Moments:
        xf = x.detach().float()  # (n, c)
        split = torch.stack([is_image, ~is_image]).float()  # (2, n): one GEMM sums both modalities
        x2 = xf * xf
        a = xf.abs()
        per_chan = torch.stack([split @ xf, split @ x2, split @ (x2 * xf), split @ (x2 * x2)], 1)  # (2, 4, c)
        chan_max = torch.zeros(2, xf.shape[1], dtype=torch.float32, device=xf.device)
        for r, mask in enumerate((is_image, ~is_image)):
            n_r = int(mask.sum())
            if n_r:
                chan_max[r] = (a if n_r == len(mask) else a[mask]).amax(0)
        count = torch.stack([is_image.sum(), (~is_image).sum()]).long()
        per_chan = per_chan.double()
        return Moments(count, per_chan.sum(2), per_chan[:, 1].clone(), (split @ a).double(), chan_max)

    @staticmethod
    def zeros(channels: int, device: torch.device | str = "cpu") -> Moments:
        f64, d = torch.float64, device
        return Moments(torch.zeros(2, dtype=torch.long, device=d), torch.zeros(2, 4, dtype=f64, device=d),
                       torch.zeros(2, channels, dtype=f64, device=d), torch.zeros(2, channels, dtype=f64, device=d),
                       torch.zeros(2, channels, dtype=torch.float32, device=d))

    def merge(self, other: Moments) -> Moments:
        """The sums of both streams (a new object)."""
        return Moments(self.count + other.count, self.power + other.power, self.chan_sq + other.chan_sq,
                       self.chan_abs + other.chan_abs, torch.maximum(self.chan_max, other.chan_max))

    def select(self, modality: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, power (4,), chan_sq (c,), chan_abs (c,), chan_max (c,))`` of one modality."""
        if modality == "all":
            return (int(self.count.sum()), self.power.sum(0), self.chan_sq.sum(0), self.chan_abs.sum(0),
                    self.chan_max.amax(0))
        r = _row(modality)
        return int(self.count[r]), self.power[r], self.chan_sq[r], self.chan_abs[r], self.chan_max[r]


def _row(modality: str) -> int:
    if modality not in ("image", "text"):
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return 0 if modality == "image" else 1


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor over the tokens of one modality (see the module table)."""

    tokens: int
    hist_entropy: float
    variance: float
    kurtosis: float
    absmax: float
    outlier_share: float
    kmeans_entropy: float | None  # only for the LUQ tensor of a block
    mean_sq: torch.Tensor  # (c,) float32, E[x²]
    mean_abs: torch.Tensor  # (c,) float32, E[|x|]
    chan_absmax: torch.Tensor  # (c,) float32, max |x|

    SCALARS = ("tokens", "hist_entropy", "variance", "kurtosis", "absmax", "outlier_share", "kmeans_entropy")
    TENSORS = ("mean_sq", "mean_abs", "chan_absmax")

    def scalars(self) -> dict[str, float | int | None]:
        return {k: getattr(self, k) for k in self.SCALARS}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSORS}


def summarize(moments: Moments, modality: str, reservoir: torch.Tensor | None, *, bins: int = DEFAULT_BINS,
              outlier_ratio: float = DEFAULT_OUTLIER_RATIO, kmeans_entropy: float | None = None) -> TensorStats | None:
    """TensorStats of one modality from its moments and reservoir rows; None when it has no tokens."""
    n, power, chan_sq, chan_abs, chan_max = moments.select(modality)
    if n == 0:
        return None
    _, var, kurt = moments_to_stats(n * moments.channels, power.tolist())
    hent = hist_entropy(reservoir, bins) if reservoir is not None and reservoir.numel() else float("nan")
    return TensorStats(
        tokens=n, hist_entropy=hent, variance=var, kurtosis=kurt, absmax=float(chan_max.max()),
        outlier_share=outlier_share(chan_max, outlier_ratio), kmeans_entropy=kmeans_entropy,
        mean_sq=(chan_sq / n).float(), mean_abs=(chan_abs / n).float(), chan_absmax=chan_max.float().clone(),
    )


# --- order-independent token reservoir ---------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def token_keys(seed: int, sample: int, n: int) -> torch.Tensor:
    """Pseudo-random int64 keys of positions ``0..n-1`` of one sample (splitmix64 of seed, sample, pos)."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed & 0xFFFFFFFF) << np.uint64(40)) ^ (np.uint64(sample) << np.uint64(20))
        z = (z + np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(1)).astype(np.int64))  # non-negative


class TokenReservoir:
    """Which token positions of each sample enter a reservoir of ``size`` tokens per modality.

    Built once from the samples' token masks; :meth:`positions` tells a hook which rows to keep, and
    :meth:`assemble` turns the kept rows (one tensor per sample, in sample order) into the reservoir of a
    modality, ordered by key.
    """

    def __init__(self, image_masks: Sequence[torch.Tensor], size: int, seed: int):
        self.size = size
        keys, img, sample = [], [], []
        for s, mask in enumerate(image_masks):
            keys.append(token_keys(seed, s, len(mask)))
            img.append(mask.bool().cpu())  # bookkeeping stays on the CPU; rows are indexed on their device
            sample.append(torch.full((len(mask),), s, dtype=torch.long, device="cpu"))
        key, is_img, smp = torch.cat(keys), torch.cat(img), torch.cat(sample)
        pos = torch.cat([torch.arange(len(m), device="cpu") for m in image_masks])
        keep = torch.zeros_like(is_img)
        for mask in (is_img, ~is_img):
            idx = mask.nonzero().flatten()
            keep[idx[key[idx].argsort(stable=True)[:size]]] = True
        self._positions = [pos[keep & (smp == s)] for s in range(len(image_masks))]
        order = keep.nonzero().flatten()  # kept tokens in (sample, position) order = assemble's row order
        self._key, self._is_img = key[order], is_img[order]

    def positions(self, sample: int) -> torch.Tensor:
        """Sorted positions (among the sample's valid tokens) to keep."""
        return self._positions[sample]

    def assemble(self, rows: Sequence[torch.Tensor], modality: str, size: int | None = None) -> torch.Tensor:
        """The reservoir rows of ``modality`` (at most ``size``, default the reservoir's), ordered by key.

        A smaller ``size`` gives exactly the reservoir a ``TokenReservoir`` of that size would keep.
        """
        x = torch.cat(list(rows))
        assert x.shape[0] == len(self._key), "rows do not match the reservoir positions"
        mask = torch.ones_like(self._is_img) if modality == "all" else (
            self._is_img if _row(modality) == 0 else ~self._is_img)
        idx = mask.nonzero().flatten()
        idx = idx[self._key[idx].argsort(stable=True)[:min(size or self.size, self.size)]]
        return x[idx.to(x.device)]

"""The statistics collector of the calibration pass: per block, activation statistics split by modality, and
LUQ's entropy.

:class:`StatsCollector` is a :func:`~quantlab.calib.executor.stream_decoder` stage (and, with the vision
block's norm, the vision pass's: :mod:`quantlab.calib.vision`). For each block it

1. hooks every ``nn.Linear`` inside the block (its **input** activations) and the LUQ tensor;
2. calls ``run()`` once (every sample through the block) and returns the outputs unchanged;
3. splits every sample's tokens by its ``image_mask`` (padding dropped with ``attention_mask``):
   image / text / all; text-only samples contribute to text and all;
4. accumulates :class:`~quantlab.calib.stats.Moments` (mergeable sums), a bounded token reservoir
   (:class:`~quantlab.calib.stats.TokenReservoir`: the same hashed positions at every block), and
   optionally the Hessian ``Σ w_t x_t x_tᵀ`` of each Linear. Hooks only keep references to the token
   rows; the sums are computed ``flush_tokens`` tokens at a time;
5. at the end of the block, once, runs k-means on the LUQ reservoir of each modality and stores a
   :class:`BlockStats` in ``collector.blocks[index]``.

The LUQ tensor (``CollectOptions.entropy_on``):

| value                | tensor                                                  | note                                |
|----------------------|---------------------------------------------------------|-------------------------------------|
| ``block_input_norm`` | output of ``block.input_layernorm`` (default)           | the [CODE-D] reference hook: the    |
|                      |                                                         | RMS-normalised residual stream      |
|                      |                                                         | entering block i (= block i−1's     |
|                      |                                                         | output, normalised)                 |
| ``block_output``     | the block's output hidden state (what ``run()`` returns) | the paper's "output activation"    |

Linears reading the same tensor (q/k/v read the ``input_layernorm`` output, gate/up the
``post_attention_layernorm`` output) share one computation; each still gets its own entry.
:func:`quantlab.calib.collect.calibrate` runs the whole pass and returns a :class:`~quantlab.calib.artifact.CalibrationStats`.

The k-means entropy is the occupancy of one local optimum: on the toy's blocks, a different init or
row order moves it by up to ~0.25 bits (scikit-learn's ``n_init=10`` differs from ours by as much), so
close blocks can swap ranks. ``kmeans_n_init`` trades time for a lower-inertia optimum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantlab.calib.executor import CalibSample
from quantlab.calib.kmeans import kmeans_entropy
from quantlab.calib.options import CollectOptions
from quantlab.calib.stats import (
    MODALITIES,
    Moments,
    TensorStats,
    TokenReservoir,
    hessian_update,
    summarize,
)

NORM_NAME = "input_layernorm"  # the pre-attention norm of every supported decoder block


@dataclass
class BlockStats:
    """What one decoder block yielded: LUQ tensor and Linear inputs per modality, optional Hessians."""

    index: int
    luq: dict[str, TensorStats]  # modality -> stats (modalities without tokens are absent)
    linears: dict[str, dict[str, TensorStats]] = field(default_factory=dict)  # full name -> modality -> stats
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> (in, in) float32 sum
    hessian_weight: dict[str, float] = field(default_factory=dict)  # full name -> Σ w_t

    def cpu(self) -> BlockStats:
        """The same statistics with every tensor on the CPU (where artifacts and planners read them)."""
        return BlockStats(self.index, {m: _on_cpu(st) for m, st in self.luq.items()},
                          {n: {m: _on_cpu(st) for m, st in per.items()} for n, per in self.linears.items()},
                          {n: h.cpu() for n, h in self.hessians.items()}, dict(self.hessian_weight))


@dataclass
class _Acc:
    """Per-tensor accumulation inside one block: pending token rows, then exact sums and reservoir rows."""

    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (sample, (tokens, c)) not yet summed
    pending_tokens: int = 0
    moments: Moments | None = None
    rows: list[torch.Tensor] = field(default_factory=list)  # reservoir rows, in (sample, position) order
    hessian: torch.Tensor | None = None
    weight_sum: float = 0.0


LUQ = "<luq>"  # source key of the LUQ tensor inside a block


class StatsCollector:
    """A ``stream_decoder`` stage collecting statistics; results land in ``self.blocks``.

    Hooks only stash each sample's token rows (references, no copies); the sums are computed over
    about ``options.flush_tokens`` tokens at a time, so the per-sample cost is a few Python calls.
    """

    def __init__(self, samples: Sequence[CalibSample], options: CollectOptions = CollectOptions(), *,
                 prefix: str = "", norm_name: str | None = NORM_NAME):
        self.options = options
        self.prefix = prefix
        self.norm_name = norm_name  # the block's module whose output is the LUQ tensor (None: no LUQ tensor)
        self.valid = [s.valid_mask for s in samples]
        self.all_valid = [bool(v.all()) for v in self.valid]
        self.image = [s.image_mask.reshape(-1)[v].bool() for s, v in zip(samples, self.valid)]
        self.luq_res = TokenReservoir(self.image, options.max_tokens, options.seed)
        self.lin_res = TokenReservoir(self.image, options.linear_max_tokens, options.seed)
        wi, wt = options.modality_weights
        self.weight = [torch.where(m, wi, wt).float() for m in self.image]
        self.blocks: dict[int, BlockStats] = {}

    @property
    def token_counts(self) -> dict[str, int]:
        img = sum(int(m.sum()) for m in self.image)
        total = sum(len(m) for m in self.image)
        return {"image": img, "text": total - img, "all": total}

    def tokens(self, s: int, x: torch.Tensor, where: str) -> torch.Tensor:
        """Sample ``s``'s valid token rows ``(tokens, c)`` of a hooked ``(1, seq, c)`` tensor."""
        h = x.detach().reshape(-1, x.shape[-1])  # (seq, c): batch of one
        if h.shape[0] != len(self.valid[s]):
            raise ValueError(f"{where}: {h.shape[0]} tokens but sample {s} has {len(self.valid[s])} positions")
        return h if self.all_valid[s] else h[self.valid[s].to(h.device)]

    def flush(self, acc: _Acc, res: TokenReservoir, hessian: bool) -> None:
        """Sum the pending rows into ``acc`` (one set of tensor ops for many samples)."""
        if not acc.pending:
            return
        ss = [s for s, _ in acc.pending]
        x = torch.cat([h for _, h in acc.pending])  # (N, c), on the compute device
        offsets = torch.tensor([0] + [h.shape[0] for _, h in acc.pending], device="cpu").cumsum(0)
        # Per-sample masks live on the CPU; the sums run where the activations are.
        pos = torch.cat([res.positions(s) + offsets[j] for j, s in enumerate(ss)]).to(x.device)
        acc.pending, acc.pending_tokens = [], 0
        acc.rows.append(x[pos].float())
        m = Moments.of(x, torch.cat([self.image[s] for s in ss]).to(x.device))
        acc.moments = m if acc.moments is None else acc.moments.merge(m)
        if hessian:
            w = torch.cat([self.weight[s] for s in ss]).to(x.device)
            h = hessian_update(x, w)
            acc.hessian = h if acc.hessian is None else acc.hessian.add_(h)
            acc.weight_sum += float(w.double().sum())

    def __call__(self, index: int, block: nn.Module, run: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        state = _BlockRun(self, index)
        with state.hooks(block):
            outs = run()
        if self.options.entropy_on == "block_output":
            for s, out in enumerate(outs):
                state.push(LUQ, s, self.tokens(s, out, "block output"))
                state.flush_full()
        self.blocks[index] = state.finalize()
        return outs


class _BlockRun:
    """Hook state of one block: current sample, per-source accumulators, Linears sharing an input.

    A *source* is a distinct tensor: the LUQ tensor or a Linear's input. Linears whose input is the
    same object as an earlier source in the same sample (q/k/v read the ``input_layernorm`` output, which
    is also the default LUQ tensor; gate/up share theirs) are aliases and cost nothing extra.
    """

    def __init__(self, owner: StatsCollector, index: int):
        self.owner, self.index = owner, index
        self.sample = -1
        self.sources: dict[str, _Acc] = {LUQ: _Acc()}
        self.linears: list[str] = []
        self.alias: dict[str, str] = {}  # Linear -> source key whose (identical) input it reads
        self._last: tuple[torch.Tensor, str] | None = None

    def reservoir(self, key: str) -> TokenReservoir:
        return self.owner.luq_res if key == LUQ else self.owner.lin_res

    def wants_hessian(self, key: str) -> bool:
        if not self.owner.options.hessians:
            return False
        return key != LUQ or LUQ in self.alias.values()

    def push(self, key: str, s: int, h: torch.Tensor) -> None:
        acc = self.sources[key]
        acc.pending.append((s, h))
        acc.pending_tokens += h.shape[0]

    def flush_full(self) -> None:
        for key, acc in self.sources.items():
            if acc.pending_tokens >= self.owner.options.flush_tokens:
                self.owner.flush(acc, self.reservoir(key), self.wants_hessian(key))

    @contextmanager
    def hooks(self, block: nn.Module) -> Iterator[None]:
        opts = self.owner.options
        handles = [block.register_forward_pre_hook(self._next_sample)]
        try:
            norm = self.owner.norm_name
            if opts.entropy_on == "block_input_norm" and norm is not None:
                if not hasattr(block, norm):
                    raise ValueError(f"block {self.index} ({type(block).__name__}) has no {norm!r}; "
                                     "use entropy_on='block_output'")
                handles.append(getattr(block, norm).register_forward_hook(self._norm_hook))
            if opts.linears or opts.hessians:
                for name, mod in block.named_modules():
                    if isinstance(mod, nn.Linear):
                        full = f"{self.owner.prefix}.{self.index}.{name}" if self.owner.prefix else name
                        self.linears.append(full)
                        handles.append(mod.register_forward_hook(self._linear_hook(full)))
            yield
        finally:
            for h in handles:
                h.remove()
            self._last = None

    def _next_sample(self, module: nn.Module, args: Any) -> None:
        self.flush_full()  # the previous sample is complete: its aliases are known
        self.sample += 1
        self._last = None

    def _norm_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.push(LUQ, self.sample, self.owner.tokens(self.sample, out, self.owner.norm_name or NORM_NAME))
        self._last = (out, LUQ)

    def _linear_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            src = self._last[1] if self._last is not None and self._last[0] is x else None
            if self.sample == 0 and src is not None:
                self.alias[name] = src
            if self.alias.get(name) != src:  # internal invariant: the same Linears share inputs in every sample
                raise RuntimeError(f"{name}: input sharing differs between calibration samples")
            if src is not None:
                return
            self.sources.setdefault(name, _Acc())
            self.push(name, self.sample, self.owner.tokens(self.sample, x, name))
            self._last = (x, name)
        return hook

    def _luq_stats(self) -> dict[str, TensorStats]:
        opts, acc = self.owner.options, self.sources[LUQ]
        out: dict[str, TensorStats] = {}
        if acc.moments is None:
            return out
        for mod in MODALITIES:
            rows = self.owner.luq_res.assemble(acc.rows, mod)
            ent = None
            if opts.entropy and len(rows) and mod in opts.entropy_modalities:
                ent = kmeans_entropy(rows, opts.entropy_k, opts.seed, n_init=opts.kmeans_n_init,
                                     max_tokens=len(rows), max_iter=opts.kmeans_max_iter, tol=opts.kmeans_tol)
            st = summarize(acc.moments, mod, rows, bins=opts.hist_bins, outlier_ratio=opts.outlier_ratio,
                           kmeans_entropy=ent)
            if st is not None:
                out[mod] = st
        return out

    def _linear_stats(self, key: str) -> dict[str, TensorStats]:
        opts, acc = self.owner.options, self.sources[key]
        per = {m: summarize(acc.moments, m, self.reservoir(key).assemble(acc.rows, m, opts.linear_max_tokens),
                            bins=opts.hist_bins, outlier_ratio=opts.outlier_ratio) for m in MODALITIES}
        return {m: st for m, st in per.items() if st is not None}

    def finalize(self) -> BlockStats:
        opts = self.owner.options
        for key, acc in self.sources.items():
            self.owner.flush(acc, self.reservoir(key), self.wants_hessian(key))
        out = BlockStats(self.index, self._luq_stats())
        done: dict[str, dict[str, TensorStats]] = {}
        for name in self.linears:  # module order; a source's tensors go to its first Linear, copies to aliases
            key = self.alias.get(name, name)
            acc = self.sources.get(key)
            if acc is None or acc.moments is None:
                continue  # a Linear the block never called
            first = key not in done
            if first:
                done[key] = self._linear_stats(key) if opts.linears else {}
            if opts.linears:
                out.linears[name] = done[key] if first else {m: _clone(st) for m, st in done[key].items()}
            if acc.hessian is not None:
                out.hessians[name] = acc.hessian if first else acc.hessian.clone()
                out.hessian_weight[name] = acc.weight_sum
        return out.cpu()


def _clone(st: TensorStats) -> TensorStats:
    return dataclasses.replace(st, **{k: t.clone() for k, t in st.tensors().items()})


def _on_cpu(st: TensorStats) -> TensorStats:
    return dataclasses.replace(st, **{k: t.cpu() for k, t in st.tensors().items()})

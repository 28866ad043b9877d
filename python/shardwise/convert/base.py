"""Shared pieces of every converter: key tables, RoPE row permutations, lazy save ops, the base class.

Converters are pure: they map ``dict[str, Tensor]`` to ``dict[str, Tensor]`` with a ``ModelConfig``
and do no I/O. Saving goes through *ops* (key, dtype, shape, thunk) so that the checkpointer can
materialise one output shard at a time and keep peak memory O(one shard's transformed tensors).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..errors import ConversionError

__all__ = [
    "Converter",
    "KeyTable",
    "LoadResult",
    "Op",
    "RowSource",
    "identity_op",
    "materialize",
    "same_layout",
    "tied_op",
    "permute_to_hf",
    "permute_to_tune",
]

Tensor = torch.Tensor


@dataclass(frozen=True)
class RowSource:
    """Rows of ``tensor`` that an op writes unchanged, from row ``dst_row`` of its output on; with
    ``heads`` > 0 in HF's RoPE order (tune row ``r`` lands at ``dst_row + P(r)``, see ``dcp``).

    This is what lets a distributed save write each rank's rows straight to their final place
    without running ``make()`` on a full tensor: every row's destination follows from its index.
    """

    tensor: Tensor
    dst_row: int = 0
    heads: int = 0
    head_dim: int = 0


@dataclass(frozen=True)
class Op:
    """One output tensor of a tune→HF conversion, computed only when ``make()`` is called.

    ``rows`` describes the same result as a row map of source tensors (identity, RoPE permutation,
    concatenation along dim 0) when it is one; None when ``make()`` does more (e.g. concatenates along
    the last dim), so a distributed save must materialise it.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Tensor]
    rows: tuple[RowSource, ...] | None = None


def identity_op(key: str, t: Tensor) -> Op:
    """An op that returns ``t`` itself under ``key``."""
    return Op(key, t.dtype, tuple(t.shape), lambda: t, (RowSource(t),))


def permuted_op(key: str, t: Tensor, heads: int, head_dim: int, src_key: str = "") -> Op:
    """An op that returns ``t`` in HF's RoPE row order (``permute_to_hf``)."""
    return Op(
        key, t.dtype, tuple(t.shape), lambda: permute_to_hf(t, heads, head_dim, src_key),
        (RowSource(t, 0, heads, head_dim),),
    )


def concat_rows_op(key: str, parts: list[Tensor], sources: list[RowSource] | None = None) -> Op:
    """An op that concatenates ``parts`` along dim 0 (fused HF projections)."""
    rows = sum(p.shape[0] for p in parts)
    if sources is None:
        sources, at = [], 0
        for p in parts:
            sources.append(RowSource(p, at))
            at += p.shape[0]
    return Op(key, parts[0].dtype, (rows, *parts[0].shape[1:]), lambda: torch.cat(parts, dim=0), tuple(sources))


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same dtype and shape (metadata only; no tensor data is read)."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)


def equal_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` across devices: a mapped CPU original against a (possibly GPU) trained tensor."""
    if a is b:
        return True
    if a.device != b.device:
        b = b.detach().to(a.device)
    return torch.equal(a, b)


def tied_op(key: str, current: Tensor, kept: Tensor, original: Tensor | None = None) -> Op:
    """A tensor HF ties to another one (tied ``lm_head.weight``, T5 ``shared.weight``), written back.

    ``kept`` is what the input file held under ``key``, ``original`` the tensor that load mapped to
    ``current``. While ``current`` still equals ``original`` the kept bytes are emitted (exact round
    trip even if the file's copy differed); once training changed it, the copy follows ``current`` so
    the saved model stays consistent with HF's tying.
    """

    if original is not None and not same_layout(kept, original):
        return identity_op(key, kept)  # not a copy of the tied tensor: write it back as it was

    def make() -> Tensor:
        if (
            original is not None
            and same_layout(kept, current)
            and same_layout(original, current)
            and equal_values(original, current)
        ):
            return kept
        return current

    # no row map: which bytes are written depends on comparing whole tensors (a distributed save
    # gathers ``current`` for this one key)
    return Op(key, current.dtype, tuple(current.shape), make)


def materialize(ops: Iterable[Op]) -> dict[str, Tensor]:
    """Run every op, in order; the eager form of a conversion."""
    return {op.key: op.make() for op in ops}


@dataclass
class LoadResult:
    """What HF→tune produces: the torchtune-keyed tensors and the HF tensors kept aside for the save."""

    tune: dict[str, Tensor]
    aside: dict[str, Tensor] = field(default_factory=dict)


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def _abstract(key: str) -> str:
    """``a.12.b.{n}.c`` → ``a.#.b.#.c``: numeric and placeholder segments become ``#``."""
    return ".".join("#" if (p.isdigit() or _PLACEHOLDER.fullmatch(p)) else p for p in key.split("."))


class KeyTable:
    """A key mapping with ``{name}`` placeholders for numeric segments (layers, experts).

    Unlike torchtune's ``get_mapped_key``, every numeric segment is matched by name, so keys with
    several indices (MoE experts, T5's ``block.N.layer.0``) map exactly. A target of ``None`` means
    "known key, dropped by the converter".
    """

    _DROP = object()

    def __init__(self, pairs: Iterable[tuple[str, str | None]]) -> None:
        self._pairs = list(pairs)
        self._inverse: KeyTable | None = None
        self._exact: dict[str, str | None] = {}
        self._patterns: dict[str, list[tuple[re.Pattern[str], str | None]]] = {}
        for src, dst in self._pairs:
            names = _PLACEHOLDER.findall(src)
            if dst is not None:
                missing = set(_PLACEHOLDER.findall(dst)) - set(names)
                if missing:
                    raise ValueError(f"key table entry {src!r} -> {dst!r}: unknown placeholders {missing}")
            if not names:
                self._exact[src] = dst
                continue
            rx = "".join(
                f"(?P<{m.group(1)}>\\d+)" if m.group(1) else re.escape(m.group(0))
                for m in re.finditer(r"\{([a-z_]+)\}|[^{]+|\{", src)
            )
            self._patterns.setdefault(_abstract(src), []).append((re.compile(rx), dst))

    def lookup(self, key: str) -> tuple[bool, str | None]:
        """``(found, mapped)``; ``mapped`` is None for keys the table drops."""
        if key in self._exact:
            return True, self._exact[key]
        for rx, dst in self._patterns.get(_abstract(key), ()):
            m = rx.fullmatch(key)
            if m:
                if dst is None:
                    return True, None
                groups = m.groupdict()
                return True, dst.format(**groups)
        return False, None

    def map(self, key: str, what: str = "") -> str | None:
        """The mapped key; ``ConversionError`` naming the key when the table does not know it."""
        found, mapped = self.lookup(key)
        if not found:
            raise ConversionError(
                f'unexpected key "{key}"{" for " + what if what else ""}: it is not in the key table; '
                "check the model_type and that the checkpoint is in HF format"
            )
        return mapped

    def inverse(self) -> KeyTable:
        """The reverse table over the entries that are not dropped; built once (tables are immutable),
        so converters can ask for it on every save, or per key, without recompiling its patterns."""
        if self._inverse is None:
            self._inverse = KeyTable((dst, src) for src, dst in self._pairs if dst is not None)
        return self._inverse


def _check_rows(w: Tensor, n_heads: int, head_dim: int, key: str) -> None:
    if head_dim % 2 or w.dim() < 1 or w.shape[0] != n_heads * head_dim:
        raise ConversionError(
            f'"{key}": shape {tuple(w.shape)} does not fit {n_heads} heads of head_dim {head_dim} '
            "(check num_attention_heads / num_key_value_heads / head_dim in config.json)"
        )


def permute_to_tune(w: Tensor, n_heads: int, head_dim: int, key: str = "") -> Tensor:
    """HF rotate-half row order → torchtune interleaved: ``tune[2j+i] = hf[i*hd/2 + j]`` per head."""
    _check_rows(w, n_heads, head_dim, key)
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def permute_to_hf(w: Tensor, n_heads: int, head_dim: int, key: str = "") -> Tensor:
    """torchtune interleaved → HF rotate-half row order; the exact inverse of ``permute_to_tune``."""
    _check_rows(w, n_heads, head_dim, key)
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


class Converter(ABC):
    """One model family's HF ⇄ torchtune conversion (pure; no I/O)."""

    #: human-readable family name, used in error messages
    family: str = ""

    def validate_config(self, cfg: ModelConfig) -> None:  # noqa: B027 - optional hook
        """Raise ``ConfigError`` naming the missing field before anything is read or written."""

    @abstractmethod
    def hf_to_tune(self, hf: Mapping[str, Tensor], cfg: ModelConfig) -> LoadResult:
        """HF-keyed tensors → torchtune-keyed tensors, plus the HF tensors kept aside (never lost)."""

    @abstractmethod
    def tune_to_hf_ops(
        self, tune: Mapping[str, Tensor], cfg: ModelConfig, aside: Mapping[str, Tensor]
    ) -> list[Op]:
        """torchtune-keyed tensors (+ what load kept aside) → lazy ops producing HF-keyed tensors."""

    def tune_to_hf(
        self, tune: Mapping[str, Tensor], cfg: ModelConfig, aside: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The eager form of ``tune_to_hf_ops``."""
        return materialize(self.tune_to_hf_ops(tune, cfg, aside or {}))

    @staticmethod
    def append_aside(ops: list[Op], aside: Mapping[str, Tensor]) -> list[Op]:
        """Write back every kept-aside tensor that the conversion did not produce itself."""
        produced = {op.key for op in ops}
        ops.extend(identity_op(k, t) for k, t in aside.items() if k not in produced)
        return ops

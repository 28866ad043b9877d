"""The distributed save's pieces in one process: row maps, byte segments, layout planning, and the
whole write path simulated for any world size and any chunking (Hypothesis), against the
single-process save. The multi-process runs are in test_dcp_dist.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_convert_families import FAMILIES, convert, params

from shardwise import FullModelHFCheckpointer, _core
from shardwise.convert.base import permute_to_hf
from shardwise.dcp._rows import Dest, chunk_segments, rope_rows
from shardwise.dcp.plan import SourceLayout, plan_layout
from shardwise.errors import CheckpointIOError, ConversionError, HeaderError
from shardwise.format.layout import made

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.function_scoped_fixture])


@given(heads=st.integers(1, 9), half=st.integers(1, 40), rest=st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_rope_rows_is_torchtunes_permutation(heads: int, half: int, rest: int) -> None:
    """HF[P(r)] = tune[r] for the closed form P, exactly as permute_to_hf moves rows."""
    hd = 2 * half
    tune = torch.arange(heads * hd * rest).reshape(heads * hd, rest)
    hf = permute_to_hf(tune, heads, hd)
    p = torch.from_numpy(rope_rows(np.arange(heads * hd), hd))
    assert torch.equal(hf[p], tune)


@st.composite
def chunks(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], int, int]:
    nd = draw(st.integers(0, 4))
    shape = [draw(st.integers(1, 6)) for _ in range(nd)]
    head_dim = 0
    if nd and shape[0] % 2 == 0 and draw(st.booleans()):
        head_dim = draw(st.sampled_from([d for d in range(2, shape[0] + 1, 2) if shape[0] % d == 0]))
    offs = [draw(st.integers(0, s - 1)) for s in shape]
    sizes = [draw(st.integers(1, s - o)) for s, o in zip(shape, offs)]
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    return shape, offs, sizes, head_dim, itemsize


@given(chunks(), st.integers(0, 64))
@SETTINGS
def test_chunk_segments_put_every_byte_in_place(c: tuple, base: int) -> None:
    """The segments of any chunk (any dims cut, RoPE or not) write exactly its bytes, each where the
    full converted tensor has it, none twice."""
    shape, offs, sizes, head_dim, itemsize = c
    n = int(np.prod(shape)) if shape else 1
    full = torch.randint(0, 256, (*shape, itemsize), dtype=torch.uint8)
    rows_full = full.reshape(shape[0], -1) if shape else full.reshape(1, -1)
    expect = permute_to_hf(rows_full, shape[0] // head_dim, head_dim) if head_dim else rows_full
    chunk = full[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].contiguous().reshape(-1).numpy()
    row_bytes = itemsize * int(np.prod(shape[1:])) if shape else itemsize
    segs = chunk_segments(Dest("f", base, 0, row_bytes, head_dim), shape, offs, sizes, itemsize)
    out = np.zeros(base + n * itemsize, np.uint8)
    hit = np.zeros_like(out, bool)
    for src, dst, ln in segs:
        assert not hit[dst : dst + ln].any()
        out[dst : dst + ln] = chunk[src : src + ln]
        hit[dst : dst + ln] = True
    assert hit.sum() == chunk.size
    ex = np.zeros_like(out)
    ex[base:] = expect.reshape(-1).numpy()
    assert (out[hit] == ex[hit]).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(data=st.data())
@SETTINGS
def test_row_maps_reproduce_make(family: str, data: st.DataObject) -> None:
    """Every op that declares a row map produces, row by row, exactly what its ``make()`` produces."""
    _, _, _, ops = convert(family, data.draw(params(family)))
    for op in ops:
        if op.rows is None:
            continue
        want = made(op).reshape(op.shape[0] if op.shape else 1, -1)
        got = torch.empty_like(want)
        for rs in op.rows:
            src = rs.tensor.reshape(rs.tensor.shape[0] if rs.tensor.dim() else 1, -1)
            if rs.head_dim:
                idx = torch.from_numpy(rope_rows(np.arange(src.shape[0]), rs.head_dim))
                got[rs.dst_row + idx] = src
            else:
                got[rs.dst_row : rs.dst_row + src.shape[0]] = src
        assert torch.equal(got, want), op.key


def _split(n: int, world: int) -> list[tuple[int, int]]:
    """torch.chunk-style row ranges of ``n`` rows over ``world`` ranks (FSDP2's Shard(0))."""
    c = -(-n // world) if n else 0
    return [(min(r * c, n), min((r + 1) * c, n)) for r in range(world)]


def simulate_collective(ck: FullModelHFCheckpointer, tune: dict[str, torch.Tensor], folder: Path,
                        world: int) -> None:
    """What every rank of HFStorageWriter does, in one process: plan on meta tensors, create the files,
    each "rank" writes its row chunk through write_regions; keys whose conversion is no row map are
    made whole (what the collective save gathers them for)."""
    ck._ensure_sources()
    source = SourceLayout(ck._converter, ck._config, ck._aside, ck._sources, ck._key_source,
                          (ck._orig_index[1], ck._orig_index[2]) if ck._orig_index else None,
                          ck._orig_index is not None or len(ck._sources) > 1)
    ops = ck._converter.tune_to_hf_ops(tune, ck._config, ck._aside)
    fallback = {op.key: made(op) for op in ops if op.rows is None}
    meta_in = {k: (v.dtype, tuple(v.shape)) for k, v in tune.items()}
    meta_in.update({f"shardwise.hf::{k}": (v.dtype, tuple(v.shape)) for k, v in fallback.items()})
    real = dict(tune)
    real.update({f"shardwise.hf::{k}": v for k, v in fallback.items()})
    # the planner drops the tune keys only fallback ops read: mimic collective._materialize_non_row_ops
    if fallback:
        from shardwise.checkpointer.collective import _closure_tensors

        used = {id(rs.tensor) for op in ops if op.rows for rs in op.rows}
        only_fallback = {k for op in ops if op.rows is None for t in _closure_tensors(op)
                         for k, v in tune.items() if v is t and id(v) not in used}
        for k in only_fallback:
            meta_in.pop(k)
            real.pop(k)
    layout = plan_layout(meta_in, source)
    folder.mkdir(parents=True)
    _core.create_files([(str(folder / n), h, s) for n, h, s in layout.files], False)
    for rank in range(world):
        regions: dict[str, list] = {}
        for fqn, dests in layout.dests.items():
            t = real[fqn].contiguous()
            if t.dim() == 0:
                if rank:
                    continue
                offs, sizes = (), ()
                part = t
            else:
                a, b = _split(t.shape[0], world)[rank]
                offs, sizes = (a, *([0] * (t.dim() - 1))), (b - a, *t.shape[1:])
                part = t[a:b].contiguous()
            view = part.reshape(-1).view(torch.uint8).numpy() if part.numel() else b""
            for d in dests:
                segs = chunk_segments(d, tuple(t.shape), offs, sizes, t.element_size())
                if len(segs):
                    regions.setdefault(d.file, []).append((view, segs))
        if rank == 0:
            for t, d in layout.local:
                t = t.contiguous()
                segs = chunk_segments(d, tuple(t.shape), (0,) * t.dim(), tuple(t.shape), t.element_size())
                view = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
                if len(segs):
                    regions.setdefault(d.file, []).append((view, segs))
        _core.write_regions([(str(folder / f), r) for f, r in regions.items()], False)
    if layout.index is not None:
        (folder / "model.safetensors.index.json").write_bytes(layout.index)


def _model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name.endswith(".index.json")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(data=st.data())
@SETTINGS
def test_simulated_collective_save_equals_single_process(family: str, data: st.DataObject, tmp_path_factory) -> None:
    """For any structure, world size and changed/unchanged weights, the rows-first write produces the
    same files (names, headers, bytes, index) as the single-process save of the same full state dict."""
    p = data.draw(params(family))
    hf, cfg_dict = FAMILIES[family].make(p)
    root = tmp_path_factory.mktemp("sim")
    src = root / "in"
    src.mkdir()
    keys = list(hf)
    cut = data.draw(st.integers(0, len(keys)))
    groups = [g for g in (keys[:cut], keys[cut:]) if g]
    from safetensors.torch import save_file

    names = []
    for i, g in enumerate(groups, 1):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: hf[k].contiguous() for k in g}, str(src / name), metadata={"format": "pt"})
        names.append(name)
    (src / "config.json").write_text(json.dumps(cfg_dict))
    ck = FullModelHFCheckpointer(str(src), names, FAMILIES[family].model_type.name, str(root / "out"), fsync=False)
    tune = ck.load_checkpoint()["model"]
    if data.draw(st.booleans()):  # trained weights: every tensor changes
        tune = {k: (v + 1 if v.is_floating_point() else v) for k, v in tune.items()}
    world = data.draw(st.integers(1, 5))
    ck.save_checkpoint({"model": tune}, epoch=0)
    simulate_collective(ck, tune, root / "sim", world)
    assert _model_files(root / "sim") == _model_files(root / "out" / "epoch_0")


def test_plan_layout_without_source_is_the_safetensors_layout(tmp_path: Path) -> None:
    """HF-keyed tensors with no source layout: one file exactly as safetensors.save_file writes it,
    or torch's ``fqn_to_index_mapping`` file names and partition."""
    from safetensors.torch import save_file

    ts = {"b.weight": torch.randn(3, 4), "a.bias": torch.zeros(5, dtype=torch.bfloat16),
          "c.ids": torch.arange(7), "d.mask": torch.ones(2, dtype=torch.bool)}
    layout = plan_layout({k: (v.dtype, tuple(v.shape)) for k, v in ts.items()})
    assert [f[0] for f in layout.files] == ["model-00001-of-00001.safetensors"]
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert layout.files[0][1] == ref[: len(layout.files[0][1])] and layout.files[0][2] == len(ref)
    mapped = plan_layout({k: (v.dtype, tuple(v.shape)) for k, v in ts.items()},
                         fqn_to_index_mapping={"a.bias": 1, "b.weight": 2, "c.ids": 2, "d.mask": 1})
    assert [f[0] for f in mapped.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    idx = json.loads(mapped.index or b"{}")
    f1, f2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    assert idx["weight_map"] == {"a.bias": f1, "d.mask": f1, "b.weight": f2, "c.ids": f2}
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    with pytest.raises(ConversionError, match="no file index"):
        plan_layout({k: (v.dtype, tuple(v.shape)) for k, v in ts.items()}, fqn_to_index_mapping={"a.bias": 1})


def test_write_regions_rejects_bad_segments_before_writing(tmp_path: Path) -> None:
    header, _ = _core.fresh_layout(["t"], ["U8"], [[16]], None)
    path = tmp_path / "x.safetensors"
    _core.create_files([(str(path), header, len(header) + 16)], False)
    data = np.arange(16, dtype=np.uint8)
    base = len(header)
    with pytest.raises(HeaderError, match=r"x\.safetensors.*written twice"):
        _core.write_regions([(str(path), [(data, np.array([[0, base, 8], [8, base + 4, 8]], np.int64))])])
    with pytest.raises(HeaderError, match="outside the file"):
        _core.write_regions([(str(path), [(data, np.array([[0, base + 12, 8]], np.int64))])])
    with pytest.raises(ValueError, match="negative"):
        _core.write_regions([(str(path), [(data, np.array([[-1, base, 8]], np.int64))])])
    with pytest.raises(ValueError, match="int64 triples"):
        _core.write_regions([(str(path), [(data, np.zeros(4, np.int64))])])
    assert path.read_bytes()[base:] == bytes(16)  # nothing was written
    with pytest.raises(CheckpointIOError) as e:
        _core.write_regions([(str(tmp_path / "missing.safetensors"), [])])
    assert e.value.filename.endswith("missing.safetensors")
    with pytest.raises(CheckpointIOError):
        _core.create_files([(str(path), header, len(header) + 16)], False)  # exists: never clobbered
    with pytest.raises(HeaderError, match="declares"):
        _core.create_files([(str(tmp_path / "y.safetensors"), header, 5)], False)
    assert not (tmp_path / "y.safetensors").exists()

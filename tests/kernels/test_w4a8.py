"""The w4a8 CPU kernels (kernels/w4a8_gemv.c: w4a8_mm for few rows, w4a8_gemm for many)
against their float64 reference and each other, their layouts by hand, their errors, and the
run-time build (kernels/cpu_build.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from scission.kernels import cpu_build, w4a8
from scission.kernels.reference import ref_w4a8_mm, rel_error

# Float32 accumulation of float64-exact integer dots, one multiply per block: ~1e-7 measured.
REL_TOL = 1e-5


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request):
    """The build every machine uses (AVX2 where present) and the plain-C path forced."""
    return w4a8.library(portable=request.param == "portable")


def random_q4_1(n: int, k: int, gen: torch.Generator):
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 0.05 + 1e-3
    mins = -torch.rand(n, k // 32, generator=gen) * 0.4
    return codes, scales, mins


@pytest.mark.parametrize("m", [1, 2, 5, 9])
@pytest.mark.parametrize("n,k", [(1, 32), (4, 96), (17, 64), (64, 576), (130, 1536)])
def test_w4a8_mm_matches_float64_reference(lib, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    codes, scales, mins = random_q4_1(n, k, gen)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    x[-1, -1] = 40.0  # an outlier: its block's scale grows, the others keep theirs
    blocks = w4a8.pack_q4_1(codes, scales, mins)
    y = w4a8.w4a8_mm_with(lib, x, blocks, n)
    ref = ref_w4a8_mm(x, codes, scales, mins)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel_error(y, ref) < REL_TOL


def test_avx2_and_portable_builds_agree():
    gen = torch.Generator().manual_seed(7)
    codes, scales, mins = random_q4_1(96, 576, gen)
    blocks = w4a8.pack_q4_1(codes, scales, mins)
    x = torch.randn(3, 576, generator=gen)
    fast, plain = w4a8.library(), w4a8.library(portable=True)
    assert not plain.w4a8_uses_avx2()
    assert torch.equal(w4a8.w4a8_mm_with(fast, x, blocks, 96),
                       w4a8.w4a8_mm_with(plain, x, blocks, 96))  # same operations, same order


def gemm_with(lib, x, codes, scales, mins):
    n = codes.shape[0]
    return w4a8.w4a8_gemm_with(lib, x, *w4a8.pack_q4_1_gemm(codes, scales, mins), n)


# m: under one micro-kernel (4 rows), not a multiple of 4, over one chunk of 128 rows
@pytest.mark.parametrize("m", [1, 3, 8, 130, 261])
@pytest.mark.parametrize("n,k", [(1, 32), (13, 64), (64, 576), (130, 1536)])
def test_w4a8_gemm_matches_float64_reference_and_w4a8_mm(lib, m, n, k):
    """The many-row kernel: float64-exact up to float32 sums, and bit for bit w4a8_mm's
    result (rows past a tile of 8 and past a micro-kernel's 4 are padding)."""
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k + 1)
    codes, scales, mins = random_q4_1(n, k, gen)
    scales, mins = scales.half().float(), mins.half().float()  # as W4A8Linear stores them
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :32] = 0  # an all-zero block
    x[-1, -1] = 40.0  # an outlier
    y = gemm_with(lib, x, codes, scales, mins)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel_error(y, ref_w4a8_mm(x, codes, scales, mins)) < REL_TOL
    # the same float operations in the same order per row: equal bits (batch invariance)
    assert torch.equal(y, w4a8.w4a8_mm_with(lib, x, w4a8.pack_q4_1(codes, scales, mins), n))


def test_w4a8_gemm_quantizes_activations_as_w4a8_mm_exactly():
    """Every block's max|x| is 127, so e = 1 and a = round_half_even(x); weight row 0 is codes
    1 with scale 1, row 1 codes 0 with minimum 1: both outputs are sum(a), an integer every
    float operation keeps exact. So the AVX2 and plain-C builds of both kernels must give
    exactly the hand value, ties included (2.5 -> 2, -0.5 -> -0, 3.5 -> 4)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 64, generator=gen) * 20
    x[:, 0] = x[:, 32] = 127.0
    x[:, 1], x[:, 2], x[:, 33] = 2.5, -0.5, 3.5
    codes = torch.stack([torch.ones(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)])
    scales = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    mins = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    want = torch.round(x).sum(dim=1, keepdim=True).expand(37, 2)  # half to even
    blocks = w4a8.pack_q4_1(codes, scales, mins)
    for lib in (w4a8.library(), w4a8.library(portable=True)):
        assert torch.equal(gemm_with(lib, x, codes, scales, mins), want)
        assert torch.equal(w4a8.w4a8_mm_with(lib, x, blocks, 2), want)


def test_pack_q4_1_gemm_layout_by_hand():
    """9 rows -> 2 tiles of 8 (the second padded with zeros); per tile and block 8 steps of
    8 rows x 4 codes: byte (g, s, r, i) = q[8 t + r, 32 g + 4 s + i]; float32 scales and
    minimums [T, G, 8]."""
    n, k = 9, 64
    codes = (torch.arange(k)[None] * 3 + torch.arange(n)[:, None] * 5).remainder(16)
    scales = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 1
    mins = -scales / 4
    tile_codes, tile_scales, tile_mins = w4a8.pack_q4_1_gemm(codes, scales, mins)
    assert tile_codes.shape == (2, 2 * 256) and tile_codes.dtype == torch.uint8
    assert tile_scales.shape == tile_mins.shape == (2, 2, 8)
    for t in range(2):
        raw = tile_codes[t].tolist()
        for g in range(2):
            for r in range(8):
                row = 8 * t + r
                assert tile_scales[t, g, r].item() == (scales[row, g].item() if row < n else 0)
                assert tile_mins[t, g, r].item() == (mins[row, g].item() if row < n else 0)
                for st in range(8):
                    got = raw[g * 256 + st * 32 + r * 4:g * 256 + st * 32 + r * 4 + 4]
                    want = codes[row, 32 * g + 4 * st:32 * g + 4 * st + 4].tolist() \
                        if row < n else [0] * 4
                    assert got == want


def test_w4a8_gemm_bad_inputs_are_refused_with_the_shapes():
    packed = w4a8.pack_q4_1_gemm(torch.zeros(8, 64, dtype=torch.int64), torch.ones(8, 2),
                                 torch.zeros(8, 2))
    with pytest.raises(ValueError, match="tile_scales"):
        torch.ops.scission.w4a8_gemm(torch.ones(2, 96), *packed, 8)  # K 96 vs a weight for 64
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.scission.w4a8_gemm(torch.ones(2, 64), *packed, 9)  # 9 rows need 2 tiles
    with pytest.raises(ValueError, match="contiguous float32"):
        torch.ops.scission.w4a8_gemm(torch.ones(64, 2).T, *packed, 8)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        w4a8.pack_q4_1_gemm(torch.full((8, 32), 16), torch.ones(8, 1), torch.ones(8, 1))
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a8.pack_q4_1_gemm(torch.zeros(8, 48, dtype=torch.int64), torch.ones(8, 1),
                            torch.ones(8, 1))


def test_pack_q4_1_tile_layout_by_hand():
    """5 rows -> 2 tiles of 4 rows (the second padded with zeros); per tile and block: 4 fp16
    scales, 4 fp16 minimums, then each row's 16 bytes q[j] | q[j + 16] << 4."""
    n = 5
    codes = (torch.arange(64)[None] + torch.arange(n)[:, None]).remainder(16)  # q = (j + r) % 16
    scales = torch.tensor([[0.5 * (r + 1), 2.0 * (r + 1)] for r in range(n)])
    mins = torch.tensor([[-1.0 * r, 0.25 * r] for r in range(n)])
    blocks = w4a8.pack_q4_1(codes, scales, mins)
    assert blocks.dtype == torch.uint8 and blocks.shape == (2, 2 * w4a8.TILE_BYTES)
    for t in range(2):
        raw = bytes(blocks[t].tolist())
        for g in range(2):
            tile = raw[g * 80:(g + 1) * 80]
            rows = [t * 4 + r for r in range(4)]
            want_d = [scales[r, g].item() if r < n else 0.0 for r in rows]
            want_m = [mins[r, g].item() if r < n else 0.0 for r in rows]
            assert list(struct.unpack("<4e", tile[:8])) == want_d
            assert list(struct.unpack("<4e", tile[8:16])) == want_m
            for i, r in enumerate(rows):
                got = list(tile[16 + 16 * i:32 + 16 * i])
                if r >= n:
                    assert got == [0] * 16
                    continue
                q = [(g * 32 + j + r) % 16 for j in range(32)]
                assert got == [q[j] | (q[j + 16] << 4) for j in range(16)]


def test_ones_times_known_weights_by_hand(lib):
    """x = 1 everywhere (quantizes exactly: a = 127, e = 1/127), w = q * d + m per block:
    y = sum over blocks of d * sum(q) + 32 * m."""
    codes = torch.tensor([list(range(16)) * 2, [15] * 32])  # two rows, one block
    scales, mins = torch.tensor([[0.25], [0.5]]), torch.tensor([[-1.0], [2.0]])
    y = w4a8.w4a8_mm_with(lib, torch.ones(1, 32), w4a8.pack_q4_1(codes, scales, mins), 2)
    want = [0.25 * 240 + 32 * -1.0, 0.5 * 480 + 32 * 2.0]  # 28.0, 304.0
    assert y[0].tolist() == pytest.approx(want, rel=1e-6)


def test_thread_count_does_not_change_the_result():
    gen = torch.Generator().manual_seed(11)
    codes, scales, mins = random_q4_1(203, 576, gen)
    blocks = w4a8.pack_q4_1(codes, scales, mins)
    x = torch.randn(4, 576, generator=gen)
    packed = w4a8.pack_q4_1_gemm(codes, scales, mins)
    x_many = torch.randn(133, 576, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.scission.w4a8_mm(x, blocks, 203)
        one_many = torch.ops.scission.w4a8_gemm(x_many, *packed, 203)
        torch.set_num_threads(2)
        two = torch.ops.scission.w4a8_mm(x, blocks, 203)
        two_many = torch.ops.scission.w4a8_gemm(x_many, *packed, 203)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output row is summed by one thread, in one order
    assert torch.equal(one_many, two_many)


@pytest.mark.parametrize("top_k", [0, 1, 16, 130])
def test_rescored_head_matches_its_float64_definition(lib, top_k):
    """Coarse w4a8 logits, then each row's top_k recomputed from int8 weights and bf16 x:
    the same rows as torch.topk picks and float64 values of the rescored ones."""
    gen = torch.Generator().manual_seed(top_k)
    v, k = 130, 96
    codes, scales, mins = random_q4_1(v, k, gen)
    blocks = w4a8.pack_q4_1(codes, scales, mins)
    weight_int8 = torch.randint(-127, 128, (v, k), generator=gen, dtype=torch.int8)
    row_scales = (torch.rand(v, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(3, k, generator=gen)
    got = w4a8.rescored_head_with(lib, x, blocks, weight_int8, row_scales, top_k)
    coarse = w4a8.w4a8_mm_with(lib, x, blocks, v)
    want = coarse.double()
    if top_k:
        idx = coarse.topk(top_k, dim=-1).indices
        fine = torch.einsum("mtk,mk->mt", weight_int8[idx].double(),
                            x.to(torch.bfloat16).double()) * row_scales[idx].double()
        want.scatter_(1, idx, fine)
    assert got.shape == (3, v) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    # with the tile layout and 3 >= gemm_min_rows rows, the coarse pass is w4a8_gemm's
    tiles = w4a8.pack_q4_1_gemm(codes, scales.half().float(), mins.half().float())
    assert torch.equal(w4a8.rescored_head_with(lib, x, blocks, weight_int8, row_scales, top_k,
                                               tiles, gemm_min_rows=2), got)
    with pytest.raises(ValueError, match="top_k"):
        w4a8.rescored_head_with(lib, x, blocks, weight_int8, row_scales, v + 1)
    with pytest.raises(ValueError, match="tiles must be"):
        w4a8.rescored_head_with(lib, x, blocks, weight_int8, row_scales, top_k,
                                w4a8.pack_q4_1_gemm(codes[:64], scales[:64], mins[:64]), 2)


def test_op_inside_a_compiled_graph_equals_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(5)
    codes, scales, mins = random_q4_1(64, 96, gen)
    blocks = w4a8.pack_q4_1(codes, scales, mins)
    x = torch.randn(3, 96, generator=gen)

    packed = w4a8.pack_q4_1_gemm(codes, scales, mins)

    def f(x, blocks, packed):
        y = torch.ops.scission.w4a8_mm(x * 2, blocks, 64)
        return torch.nn.functional.silu(y) + torch.ops.scission.w4a8_gemm(x, *packed, 64)

    got = torch.compile(f, fullgraph=True)(x, blocks, packed)
    assert torch.allclose(got, f(x, blocks, packed), rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_refused_with_the_shapes():
    blocks = w4a8.pack_q4_1(torch.zeros(8, 64, dtype=torch.int64), torch.ones(8, 2),
                            torch.zeros(8, 2))
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.scission.w4a8_mm(torch.ones(2, 96), blocks, 8)  # K 96 vs blocks for 64
    with pytest.raises(ValueError, match="contiguous float32"):
        torch.ops.scission.w4a8_mm(torch.ones(2, 64, dtype=torch.float64), blocks, 8)
    with pytest.raises(ValueError, match="contiguous float32"):
        torch.ops.scission.w4a8_mm(torch.ones(64, 2).T, blocks, 8)
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.scission.w4a8_mm(torch.ones(2, 64), blocks, 9)  # 9 rows need 3 tiles
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a8.pack_q4_1(torch.zeros(8, 48, dtype=torch.int64), torch.ones(8, 1), torch.ones(8, 1))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        w4a8.pack_q4_1(torch.full((8, 32), 16), torch.ones(8, 1), torch.ones(8, 1))
    with pytest.raises(ValueError, match="scales"):
        w4a8.pack_q4_1(torch.zeros(8, 32, dtype=torch.int64), torch.ones(8, 2), torch.ones(8, 1))


SOURCE = "int answer(void) { return 42; }\n"


def test_build_is_cached_per_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("SCISSION_CACHE_DIR", str(tmp_path))
    src = tmp_path / "answer.c"
    src.write_text(SOURCE)
    first = cpu_build.build_shared_library(src, ("-O2",))
    mtime = first.stat().st_mtime_ns
    assert cpu_build.build_shared_library(src, ("-O2",)) == first
    assert first.stat().st_mtime_ns == mtime  # not rebuilt
    assert cpu_build.build_shared_library(src, ("-O1",)) != first  # other flags, other build
    assert cpu_build.load_library(src, ("-O2",)).answer() == 42
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir() if p.name.startswith("."))\
        == []  # no temporary files left


def test_build_errors_say_what_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("SCISSION_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "bad.c"
    bad.write_text("int broken(void) { return }\n")
    with pytest.raises(cpu_build.KernelBuildError, match=r"building bad\.c failed.*error"):
        cpu_build.build_shared_library(bad, ("-O2",))
    assert not list((tmp_path / "kernels").glob("*bad*"))  # nothing half-written kept
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    good = tmp_path / "answer.c"
    good.write_text(SOURCE)
    with pytest.raises(cpu_build.KernelBuildError, match="does not run"):
        cpu_build.build_shared_library(good, ("-O2",))


def test_shared_library_reuses_torchs_openmp_runtime():
    w4a8.library()
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) <= 1, gomp  # one OpenMP runtime in the process: one thread team

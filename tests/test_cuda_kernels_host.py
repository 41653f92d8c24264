"""The CUDA kernels' source (csrc/cuda/sce_kernels.cuh) executed on the host: simt_host.h runs
every CUDA thread as a host thread with real block and grid barriers, built with AddressSanitizer
and UBSan, so any out-of-bounds access fails the test. Checks every entry point (the cooperative
single-problem kernel over several blocks, one block per episode, and the large-problem path of
one phase a launch, its products formed as the binding has the vendor GEMM form them) against the
float64 reference. On a GPU the same kernels are also tested through the `cuda` backend."""

import math
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from copa_fast import reference as ref
from conftest import TOL, assert_rel, empty_class_problem, make_episode, tied_one_class_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


def _build_host_check(tmp_path_factory, sanitizers):
    exe = tmp_path_factory.mktemp("host_check") / "host_check"
    cmd = [CXX, "-std=c++20", "-O1", "-g", *sanitizers, "-pthread", "-I", os.path.join(ROOT, "csrc", "cuda"),
           os.path.join(ROOT, "csrc", "cuda", "host_check.cpp"), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and "sanitize" in out.stderr:
        pytest.skip(f"the compiler lacks sanitizers: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr
    return str(exe)


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    return _build_host_check(tmp_path_factory, ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"])


@pytest.fixture(scope="module")
def host_check_tsan(tmp_path_factory):
    """The same runner under ThreadSanitizer: a CUDA thread reading what another wrote without a
    barrier between them (block, grid or warp) is a data race between host threads here, and
    ThreadSanitizer's report fails the run."""
    return _build_host_check(tmp_path_factory, ["-fsanitize=thread"])


def _run(exe, tmp_path, z, q, y, tau, *, fused=True, w=None, blocks=1, episodes=None, phased=False,
         in_place=False, splits=(1, 1), carved=False):
    """episodes: (rows (E, 2), cls (E, 2), s_off (E,), s_total) for the one-block-per-episode kernel;
    phased: the large-problem path (one phase a launch, the products as the vendor GEMM forms them);
    in_place: the normalised rows written over z (the copa_loss op's arrangement, no zn buffer);
    splits: (ksplit_s, ksplit_q) of the one-launch kernel's split products;
    carved: the scratch in one NaN-filled workspace laid out as the binding lays it out."""
    dt = np.float64 if z.dtype == torch.float64 else np.float32
    r, d = z.shape
    k = q.shape[0]
    tau = np.atleast_1d(np.asarray(tau, dtype=dt))
    e = len(tau)
    mode = 1 if episodes is not None else (2 if phased else 0)
    s_total = r * k if episodes is None else episodes[3]
    header = [np.dtype(dt).itemsize, mode, r, k, d, int(fused), int(w is not None), blocks, e, s_total,
              int(in_place), *splits, int(carved)]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        f.write(struct.pack(f"{len(header)}q", *header))
        f.write(z.numpy().astype(dt).tobytes())
        f.write(q.numpy().astype(dt).tobytes())
        f.write(y.numpy().astype(np.int64).tobytes())
        if w is not None:
            f.write(w.numpy().astype(dt).tobytes())
        f.write(tau.tobytes())
        if episodes is not None:
            for a in episodes[:3]:
                f.write(np.asarray(a, dtype=np.int64).tobytes())
    res = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    assert res.returncode == 0, res.stderr[-3000:]
    raw = open(dst, "rb").read()
    out, off = {}, 0
    for name, count, typ in (("loss", e, dt), ("dtau", e, dt), ("losses", r, dt), ("pred", r, np.int64),
                             ("dz", r * d if fused else 0, dt), ("dq", k * d if fused else 0, dt)):
        size = count * np.dtype(typ).itemsize
        out[name] = torch.from_numpy(np.frombuffer(raw[off:off + size], dtype=typ).copy())
        off += size
    assert off == len(raw)
    out["dz"], out["dq"] = out["dz"].reshape(-1, d), out["dq"].reshape(-1, d)
    return out


def _class_means(exe, tmp_path, x, y, c, blocks):
    """copa_class_means on the host: the class means of x's rows by y into c classes (c x D)."""
    dt = np.float64 if x.dtype == torch.float64 else np.float32
    r, d = x.shape
    header = [np.dtype(dt).itemsize, 3, r, c, d, 0, 0, blocks, 1, 0, 0, 1, 1, 0]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        f.write(struct.pack(f"{len(header)}q", *header))
        f.write(x.numpy().astype(dt).tobytes())
        f.write(np.zeros(c * d, dtype=dt).tobytes())
        f.write(y.numpy().astype(np.int64).tobytes())
        f.write(np.zeros(1, dtype=dt).tobytes())
    res = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    assert res.returncode == 0, res.stderr[-3000:]
    raw = open(dst, "rb").read()
    assert len(raw) == c * d * np.dtype(dt).itemsize
    return torch.from_numpy(np.frombuffer(raw, dtype=dt).copy()).reshape(c, d)


def _want(x, p, y, tau, w=None):
    xr, pr = x.double().clone().requires_grad_(True), p.double().clone().requires_grad_(True)
    tr = torch.tensor(float(tau), dtype=torch.float64, requires_grad=True)
    per = ref.symmetric_ce(xr, pr, y, tr, reduction="none")
    loss = per.mean() if w is None else (per * w.double()).sum()
    loss.backward()
    return loss.detach(), per.detach(), xr.grad, pr.grad, tr.grad


def _check_against_reference(out, x, p, y, tau, tol, w=None):
    """The kernel's loss, per-sample losses and gradients against float64; returns, per row, whether
    its predicted class is the most cosine-similar prototype."""
    loss, per, dx, dp, dtau = _want(x, p, y, tau, w)
    assert_rel(out["loss"][0], loss, tol["loss"], "loss")
    assert_rel(out["losses"], per, tol["loss"], "per-sample losses")
    assert_rel(out["dz"], dx, tol["grad"], "dz")
    assert_rel(out["dq"], dp, tol["grad"], "dq")
    assert_rel(out["dtau"][0], dtau, tol["grad"], "dtau")
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(p.double(), dim=1).t()
    return out["pred"] == cos.argmax(1)


PATHS = pytest.mark.parametrize("phased", [False, True], ids=["one-launch", "phased"])


@PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,blocks", [((37, 5, 45), 3), ((40, 40, 33), 2), ((50, 1, 16), 1), ((70, 9, 64), 4),
                                          ((100, 70, 24), 2)],
                         ids=["ragged-3blocks", "C=N-2blocks", "C=1", "tails-4blocks", "three-column-strips"])
def test_single_problem_kernel_matches_reference(host_check, tmp_path, dtype, shape, blocks, phased):
    n, c, d = shape
    x, y = make_episode(n, c, d, seed=n + c, dtype=dtype, one_shot=1 if 1 < c < n else 0)
    p = torch.randn(c, d, generator=torch.Generator().manual_seed(3), dtype=dtype)
    out = _run(host_check, tmp_path, x, p, y, 2.0, blocks=blocks, phased=phased)
    pred_right = _check_against_reference(out, x, p, y, 2.0, TOL[dtype])
    assert pred_right.float().mean() >= 0.95


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_phased_column_tiles_over_several_row_ranges(host_check, tmp_path, dtype):
    """The phased path's column statistics by tiles of 32 columns x 512 rows (phase 7) combined over
    the row ranges in order (phase 8): 1100 rows = three ranges, the last ragged, 40 classes = two
    strips; against float64 at tau 5, the same bits from 1 and 3 row blocks."""
    x, y = make_episode(1100, 40, 16, seed=21, dtype=dtype)
    p = torch.randn(40, 16, generator=torch.Generator().manual_seed(4), dtype=dtype)
    a = _run(host_check, tmp_path, x, p, y, 5.0, blocks=3, phased=True)
    _check_against_reference(a, x, p, y, 5.0, TOL[dtype])
    b = _run(host_check, tmp_path, x, p, y, 5.0, blocks=1, phased=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@PATHS
def test_weights_large_tau_and_forward_only(host_check, tmp_path, phased):
    x, y = make_episode(45, 6, 30, seed=8, dtype=torch.float64)
    p = ref.class_prototypes(x, y, 6)
    w = torch.rand(45, dtype=torch.float64)
    out = _run(host_check, tmp_path, x, p, y, 10.0, w=w, blocks=2, phased=phased)
    loss, per, dx, dp, dtau = _want(x, p, y, 10.0, w)
    assert_rel(out["loss"][0], loss, 1e-10, "weighted loss at tau 10")
    assert_rel(out["dz"], dx, 1e-9, "dz at tau 10")
    assert_rel(out["dq"], dp, 1e-9, "dq at tau 10")
    assert_rel(out["dtau"][0], dtau, 1e-9, "dtau at tau 10")
    fwd = _run(host_check, tmp_path, x, p, y, 10.0, w=w, blocks=2, fused=False, phased=phased)
    assert torch.equal(fwd["loss"], out["loss"]) and fwd["dz"].numel() == 0


@pytest.mark.parametrize("tau", [7.0, 10.0])
def test_float32_loss_keeps_its_precision_at_large_tau(host_check, tmp_path, tau):
    """With a log-sum-exp rounded at |S| = exp(tau) in float32 the loss (log 2) was off by 1e-4 ..
    1e-3; kept as (max, log sum) pairs it is exact to float32 rounding."""
    x, p, y = tied_one_class_problem()
    out = _run(host_check, tmp_path, x, p, y, tau, blocks=1)
    assert abs(out["loss"][0].item() - math.log(2)) <= 1e-6
    assert abs(out["dtau"][0].item()) <= 1e-5 * math.exp(tau)


@PATHS
def test_deterministic_across_block_counts(host_check, tmp_path, phased):
    x, y = make_episode(33, 4, 20, seed=9)
    p = ref.class_prototypes(x, y, 4)
    a = _run(host_check, tmp_path, x, p, y, 2.0, blocks=1, phased=phased)
    b = _run(host_check, tmp_path, x, p, y, 2.0, blocks=3, phased=phased)
    for key in a:   # every reduction has a fixed order, whoever computes it
        assert torch.equal(a[key], b[key]), key


@PATHS
def test_nan_row_fewer_rows_than_warps(host_check, tmp_path, phased):
    # validation off: a NaN feature poisons the loss, never the memory; each row is one warp's (a
    # block has 8), its reductions end on lane 0's value, so every block count gives the same bits
    x, y = make_episode(5, 3, 40, seed=12)
    x[2, 17] = float("nan")
    p = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    runs = [_run(host_check, tmp_path, x, p, y, 2.0, blocks=b, phased=phased) for b in (1, 2, 5)]
    assert torch.isnan(runs[0]["loss"][0]) and torch.isnan(runs[0]["losses"][2])
    assert ((runs[0]["pred"] >= 0) & (runs[0]["pred"] < 3)).all()
    for other in runs[1:]:
        for key in other:
            torch.testing.assert_close(other[key], runs[0][key], rtol=0, atol=0, equal_nan=True, msg=key)
    clean = _run(host_check, tmp_path, x.nan_to_num(0.5), p, y, 2.0, blocks=5, phased=phased)
    _check_against_reference(clean, x.nan_to_num(0.5), p, y, 2.0, TOL[torch.float32])


@PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rows_normalised_in_place_give_the_same_bits(host_check, tmp_path, phased, dtype):
    """The copa_loss op hands the kernel its own z = x w_img^T and has the normalised rows written
    over it (one N x D buffer fewer): every output equal, bit for bit, to separate buffers', a bad
    label included (ASan checks the aliased buffer's accesses)."""
    x, y = make_episode(53, 7, 41, seed=11, dtype=dtype, one_shot=1)
    p = torch.randn(7, 41, generator=torch.Generator().manual_seed(4), dtype=dtype)
    w = torch.rand(53, dtype=dtype)
    for labels, weights in ((y, None), (y, w), (torch.where(y == 2, 9, y), None)):
        a = _run(host_check, tmp_path, x, p, labels, 3.0, w=weights, blocks=3, phased=phased)
        b = _run(host_check, tmp_path, x, p, labels, 3.0, w=weights, blocks=3, phased=phased, in_place=True)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True, msg=key)


@PATHS
def test_bad_label_gives_nan_without_out_of_bounds(host_check, tmp_path, phased):
    x, y = make_episode(30, 4, 16, seed=10)
    p = ref.class_prototypes(x, y, 4)
    y = y.clone()
    y[3], y[7] = 4, -5
    out = _run(host_check, tmp_path, x, p, y, 2.0, blocks=2, phased=phased)   # ASan aborts on any stray access
    assert torch.isnan(out["loss"][0]) and torch.isnan(out["losses"][3]) and torch.isnan(out["losses"][7])
    assert torch.isfinite(out["losses"][[0, 1, 2, 4]]).all()


@PATHS
def test_empty_class_gets_zero_gradient_at_large_tau(host_check, tmp_path, phased):
    """A class with no sample (validation off) scores above some rows' maximum; at tau 10 the row
    term's exponent overflowed and 0 samples x inf made the gradient NaN."""
    x, p, y = empty_class_problem(torch.float64)
    out = _run(host_check, tmp_path, x, p, y, 10.0, blocks=2, phased=phased)
    loss, per, dx, dp, dtau = _want(x, p[:4], y, 10.0)
    assert_rel(out["loss"][0], loss, 1e-10, "loss")
    assert_rel(out["dz"], dx, 1e-9, "dz")
    assert_rel(out["dq"][:4], dp, 1e-9, "dq")
    assert torch.equal(out["dq"][4], torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("pad", [0, 3], ids=["packed", "padded"])
def test_episodes_kernel_matches_reference(host_check, tmp_path, pad):
    _check_episodes(host_check, tmp_path, [(7, 3), (5, 1), (6, 6), (40, 9)], 19, pad, [2.0, 0.0, 5.0, 1.0])


def test_episodes_kernel_over_several_tiles(host_check, tmp_path):
    # the episodes kernel's 64 x 64 product tiles: several row, class and column tiles, ragged tails,
    # several 32-deep steps along D, N and C, beside an episode smaller than one tile
    _check_episodes(host_check, tmp_path, [(150, 70), (3, 2), (65, 33)], 100, 1, [2.0, 3.0, 0.5])


BAD_LAYOUTS = {   # episode 1's (rows, classes, s_off) against 30 rows, 7 classes, 120 score entries
    "rows past the end": ([12, 19], [3, 4], 30),
    "negative row count": ([12, -3], [3, 4], 30),
    "negative row start": ([-1, 5], [3, 4], 30),
    "classes past the end": ([12, 8], [4, 4], 30),
    "negative class count": ([12, 8], [3, -4], 30),
    "score block past s_total": ([12, 8], [3, 4], 100),
    "negative s_off": ([12, 8], [3, 4], -8),
    "huge counts": ([12, 2**40], [3, 2**40], 30),
}


@pytest.mark.parametrize("bad", list(BAD_LAYOUTS))
def test_episodes_kernel_refuses_a_layout_outside_its_buffers(host_check, tmp_path, bad):
    """The episodes kernel does not trust its offsets: an episode whose rows, classes or score block
    lie outside the stacked buffers gets a NaN loss and dtau and touches nothing (AddressSanitizer
    would stop the run at any access outside them; the runner sizes S at s_total exactly); the
    other episodes are computed as ever."""
    g = torch.Generator().manual_seed(8)
    z, q = torch.randn(30, 16, generator=g, dtype=torch.float64), torch.randn(7, 16, generator=g, dtype=torch.float64)
    y = torch.cat([torch.arange(3).repeat(4), torch.arange(4).repeat(2), torch.zeros(10, dtype=torch.long)])
    bad_rows, bad_cls, bad_s = BAD_LAYOUTS[bad]
    rows, cls, s_off = [[0, 12], bad_rows], [[0, 3], bad_cls], [0, bad_s]
    out = _run(host_check, tmp_path, z, q, y, [2.0, 2.0], episodes=(rows, cls, s_off, 120))
    assert torch.isnan(out["loss"][1]) and torch.isnan(out["dtau"][1])
    loss, per, dx, dp, dtau = _want(z[:12], q[:3], y[:12], 2.0)
    assert_rel(out["loss"][0], loss, 1e-10, "episode 0 loss")
    assert_rel(out["dz"][:12], dx, 1e-9, "episode 0 dz")
    assert_rel(out["dq"][:3], dp, 1e-9, "episode 0 dq")
    assert torch.equal(out["dz"][12:], torch.zeros(18, 16, dtype=torch.float64))   # nothing of episode 1
    assert torch.equal(out["dq"][3:], torch.zeros(4, 16, dtype=torch.float64))
    assert torch.equal(out["losses"][12:], torch.zeros(18, dtype=torch.float64))


def _check_episodes(host_check, tmp_path, sizes, d, pad, taus, carved=False):
    zs, qs, ys, rows, cls, s_off = [], [], [], [], [], []
    r = c = s = 0
    eps = []
    for k, (n, cc) in enumerate(sizes):
        x, y = make_episode(n, cc, d, seed=40 + k, dtype=torch.float64)
        p = torch.randn(cc, d, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        eps.append((x, p, y))
        rows.append([r, n])
        cls.append([c, cc])
        s_off.append(s)
        s += n * cc
        zs += [x, torch.full((pad, d), 1e30, dtype=torch.float64)]
        qs += [p, torch.full((pad, d), -1e30, dtype=torch.float64)]
        ys += [y, torch.full((pad,), 10**6)]
        r += n + pad
        c += cc + pad
    out = _run(host_check, tmp_path, torch.cat(zs), torch.cat(qs), torch.cat(ys), taus,
               episodes=(rows, cls, s_off, s), carved=carved)
    for k, (x, p, y) in enumerate(eps):
        loss, per, dx, dp, dtau = _want(x, p, y, taus[k])
        r0, n = rows[k]
        c0, cc = cls[k]
        assert_rel(out["loss"][k], loss, 1e-10, f"episode {k} loss")
        assert_rel(out["dz"][r0:r0 + n], dx, 1e-9, f"episode {k} dz")
        assert_rel(out["dq"][c0:c0 + cc], dp, 1e-9, f"episode {k} dq")
        assert_rel(out["dtau"][k], dtau, 1e-9, f"episode {k} dtau")
    return out


_EXP_MASK = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
             torch.float64: 0x7FF0000000000000}
_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _summary(exe, tmp_path, x, y, k, blocks, tau=None, transposed=False):
    """copa_count_nonfinite + copa_label_summary on the host: [min label, max label, distinct labels
    in [0, k), non-finite entries of x, tau] (x's bits as the CUDA binding hands them over; with
    `transposed` the kernels read x through the strides of a transposed view)."""
    r, d = x.shape
    es = x.element_size()
    header = [es, 5, r, k, d, _EXP_MASK[x.dtype], int(y.dtype == torch.int32), blocks, int(tau is not None), 0,
              int(transposed), 0, 0, 0]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    buf = (x.t() if transposed else x).contiguous()   # the d x R buffer of a transposed view
    with open(src, "wb") as f:
        f.write(struct.pack(f"{len(header)}q", *header))
        f.write(buf.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[es]).numpy().astype(_BITS[es]).tobytes())
        f.write(y.numpy().tobytes())
        if tau is not None:
            f.write(np.array([tau], dtype=np.float64).tobytes())
    res = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    assert res.returncode == 0, res.stderr[-3000:]
    return np.frombuffer(open(dst, "rb").read(), dtype=np.float64).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_value_summary_kernels(host_check, tmp_path, dtype):
    """The value checks' kernels (copa_fast::value_summary on CUDA): NaN / +-Inf counted from the
    bits of every floating dtype (contiguous and through a transposed view's strides), label min,
    max and the distinct labels in [0, k) over several chunks of a block's width, int32 labels,
    tau passed through; the same result from 1 and 3 counting blocks."""
    g = torch.Generator().manual_seed(7)
    n, d, k = 600, 9, 40
    x = torch.randn(n, d, generator=g).to(dtype)
    bad = torch.randperm(n * d, generator=g)[:17]
    x.view(-1)[bad[:7]] = float("nan")
    x.view(-1)[bad[7:12]] = float("inf")
    x.view(-1)[bad[12:]] = -float("inf")
    x.view(-1)[0] = torch.finfo(dtype).max   # finite, the largest exponent below all ones
    y = torch.randint(0, k, (n,), generator=g)
    y[5], y[300] = -3, k + 9
    want = [-3.0, float(k + 9), float(y[(y >= 0) & (y < k)].unique().numel()), 17.0]
    for blocks, transposed, labels, tau in ((1, False, y, None), (3, True, y.int(), 2.5), (3, False, y, -1.0)):
        got = _summary(host_check, tmp_path, x, labels, k, blocks, tau, transposed)
        assert got == want + [0.0 if tau is None else tau], (blocks, transposed)
    clean = torch.randn(70, 3, generator=g).to(dtype)
    assert _summary(host_check, tmp_path, clean, torch.arange(70) % 5, 5, 2)[:4] == [0.0, 4.0, 5.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,c,d,blocks", [(53, 7, 300, 3), (40, 1, 17, 2), (12, 12, 256, 5), (9, 3, 1100, 2),
                                           (600, 7, 70, 3), (520, 1, 40, 2)],
                         ids=["ragged-columns", "C=1", "C=N", "two-column-passes", "label-chunks",
                              "C=1-full-chunks"])
def test_class_means_kernel_matches_reference(host_check, tmp_path, dtype, n, c, d, blocks):
    """copa_loss's class means on cuda (one launch, rows summed in index order): equal to the float64
    means; fewer blocks than classes take the rest round-robin; D = 300 has ragged columns, D = 1100
    a second pass over the labels (1024 columns a pass); N = 600 and 520 read the labels in several
    chunks of a block's width with a ragged last one (C = 1: every row of a chunk listed)."""
    x, y = make_episode(n, c, d, seed=n + d, dtype=dtype, one_shot=1 if 1 < c < n else 0)
    got = _class_means(host_check, tmp_path, x, y, c, blocks)
    assert_rel(got, ref.class_prototypes(x.double(), y, c), 1e-6 if dtype == torch.float32 else 1e-13, "means")
    again = _class_means(host_check, tmp_path, x, y, c, 1)
    assert torch.equal(got, again)   # the same bits whatever the block count


def test_class_means_kernel_clamps_bad_labels_and_zeroes_empty_classes(host_check, tmp_path):
    """Validation off: labels outside 0..C-1 count as the nearest class (as clamped), never an index
    out of bounds (ASan); a class with no row gets a zero mean, not 0/0."""
    x, y = make_episode(30, 5, 20, seed=12, dtype=torch.float64)
    y = y.clone()
    y[y == 2] = 3            # class 2 left empty
    y[4], y[9] = -7, 11      # clamped to 0 and 4
    got = _class_means(host_check, tmp_path, x, y, 5, 2)
    want = ref.class_prototypes(x, y.clamp(0, 4), 5).clone()
    want[2] = 0.0
    assert torch.equal(got[2], torch.zeros(20, dtype=torch.float64))
    assert_rel(got, want, 1e-13, "means")


@pytest.mark.parametrize("splits,dtype", [((2, 1), torch.float64), ((1, 2), torch.float32),
                                          ((3, 2), torch.float64), ((5, 4), torch.float32)], ids=str)
def test_split_products_match_reference(host_check, tmp_path, dtype, splits):
    """The one-launch kernel's split products: S over shares of D (summed by phase 3's row items into
    S, and by its column items for themselves), dq over shares of rows (summed in phase 6). Shares
    past the end (5 of D's 3 tile steps, 4 of the 2 row steps) store zeros. Against float64, with
    weights; forward-only too; the same bits at any block count; a bad label: NaN, no stray access
    (ASan)."""
    n, c, d = 45, 7, 70
    x, y = make_episode(n, c, d, seed=sum(splits), dtype=dtype, one_shot=1)
    p = torch.randn(c, d, generator=torch.Generator().manual_seed(4), dtype=dtype)
    w = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(3))
    out = _run(host_check, tmp_path, x, p, y, 3.0, w=w, blocks=3, splits=splits)
    assert _check_against_reference(out, x, p, y, 3.0, TOL[dtype], w).all()
    again = _run(host_check, tmp_path, x, p, y, 3.0, w=w, blocks=1, splits=splits)
    for key in ("loss", "dtau", "losses", "pred", "dz", "dq"):
        assert torch.equal(again[key], out[key]), key
    fwd = _run(host_check, tmp_path, x, p, y, 3.0, w=w, blocks=2, fused=False, splits=splits)
    assert torch.equal(fwd["losses"], out["losses"]) and torch.equal(fwd["loss"], out["loss"])
    bad = y.clone()
    bad[4] = c + 2
    nan = _run(host_check, tmp_path, x, p, bad, 3.0, blocks=2, splits=splits, in_place=True)
    assert torch.isnan(nan["losses"][4]) and torch.isnan(nan["dq"]).all()


def _plan(exe, tmp_path, n, c, d, blocks):
    """plan_splits(n, c, d, blocks) of sce_problem.h: (ksplit_s, ksplit_q)."""
    header = [4, 4, n, c, d, 0, 0, blocks, 0, 0, 0, 1, 1, 0]
    src, dst = tmp_path / "plan.bin", tmp_path / "plan.out"
    src.write_bytes(struct.pack(f"{len(header)}q", *header))
    res = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return struct.unpack("2q", dst.read_bytes())


def test_split_plan(host_check, tmp_path):
    """The one-launch kernel's split products as planned for a device: N = 500 on a ~1000-block grid
    shares S's 16 steps of D out one each and dq's 16 row steps two each; shares never exceed the
    steps there are, nor (with dq's dz-tile partners) the grid, nor 2^22 partial values; a problem
    with enough tiles, or a grid of one block, is not split."""
    assert _plan(host_check, tmp_path, 500, 50, 512, 1056) == (16, 8)
    assert _plan(host_check, tmp_path, 500, 50, 512, 64) == (2, 2)        # 32 tiles of each on 64 blocks
    assert _plan(host_check, tmp_path, 1000, 1000, 512, 1056) == (1, 1)   # 1024 tiles; dq as deep as dz
    assert _plan(host_check, tmp_path, 37, 5, 45, 1) == (1, 1)
    assert _plan(host_check, tmp_path, 2000, 1000, 1024, 1 << 20) == (2, 2)     # S: 2^22 / (N C) = 2
    assert _plan(host_check, tmp_path, 65536, 2048, 2048, 1 << 20) == (1, 1)    # 2^22 / (C D) = 1
    for n, c, d in ((33, 1, 17), (1024, 128, 1024), (25, 5, 512)):
        ks, kq = _plan(host_check, tmp_path, n, c, d, 1056)
        assert 1 <= ks <= -(-d // 32) and 1 <= kq <= -(-n // 32)


_WS_FIELDS = ("zn", "qn", "znorm", "qnorm", "cnt", "wsum", "S", "R", "L", "row_dtau", "wloss", "Spart", "dqpart",
              "Lpart")


def _layout(exe, tmp_path, n, c, d, s_entries, zn_separate, spart, dqpart, lpart):
    """workspace_layout of sce_problem.h: ({buffer: offset or -1}, total entries)."""
    header = [4, 6, n, c, d, 0, 0, 1, 0, s_entries, int(zn_separate), spart, dqpart, lpart]
    src, dst = tmp_path / "layout.bin", tmp_path / "layout.out"
    src.write_bytes(struct.pack(f"{len(header)}q", *header))
    res = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    got = struct.unpack("15q", dst.read_bytes())
    return dict(zip(_WS_FIELDS, got[:14], strict=True)), got[14]


@pytest.mark.parametrize("n,c,d,s_entries,zn_separate,spart,dqpart,lpart", [
    (500, 50, 512, 25000, True, 16 * 25000, 8 * 50 * 512, 0),      # symmetric_ce at N = 500, split products
    (500, 50, 512, 25000, False, 0, 0, 0),                         # copa_loss's step: zn over z, unsplit
    (16384, 1000, 512, 16384000, False, 0, 0, 2 * 32 * 1000),      # the phased path's column tiles
    (37, 5, 45, 120, True, 0, 0, 0),                               # episodes: S is s_total long
    (7, 1, 3, 0, True, 0, 0, 0),                                   # no score entries: S still one
    (0, 0, 16, 0, True, 0, 0, 0),                                  # nothing at all
], ids=["split", "in-place", "phased", "episodes", "no-scores", "empty"])
def test_workspace_layout(host_check, tmp_path, n, c, d, s_entries, zn_separate, spart, dqpart, lpart):
    """The cuda binding's scratch in one allocation: every buffer the call has at an offset aligned
    to 64 entries (256 B in float32), as long as the kernels need, disjoint from every other and
    inside the total, which wastes nothing but the alignment; zn only when the rows are not
    normalised over z, the partials' buffers only when there are partials."""
    sizes = {"zn": n * d if zn_separate else 0, "qn": c * d, "znorm": n, "qnorm": c, "cnt": c, "wsum": c,
             "S": max(s_entries, 1), "R": 2 * n, "L": 2 * c, "row_dtau": n, "wloss": n, "Spart": spart,
             "dqpart": dqpart, "Lpart": lpart}
    off, total = _layout(host_check, tmp_path, n, c, d, s_entries, zn_separate, spart, dqpart, lpart)
    absent = {"zn": not zn_separate, "Spart": spart == 0, "dqpart": dqpart == 0, "Lpart": lpart == 0}
    spans = []
    for name, size in sizes.items():
        if absent.get(name, False):
            assert off[name] == -1, name
            continue
        assert off[name] >= 0 and off[name] % 64 == 0 and off[name] + size <= total, name
        spans.append((off[name], off[name] + size, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        assert end <= start, (a, b)
    assert total == max(1, sum(-(-size // 64) * 64 for _, _, size in ((0, 0, e - s) for s, e, _ in spans)))


CARVED = {   # (rows, classes, D, tau, run options, a bad label)
    "one-launch": (53, 7, 41, 3.0, dict(blocks=3), False),
    "split": (45, 7, 70, 3.0, dict(blocks=3, splits=(3, 2)), False),
    "split-bad-label": (45, 7, 70, 3.0, dict(blocks=2, splits=(2, 2), in_place=True), True),
    "in-place": (53, 7, 41, 3.0, dict(blocks=2, in_place=True), False),
    "forward-only": (53, 7, 41, 3.0, dict(blocks=2, fused=False), False),
    "phased": (1100, 40, 16, 5.0, dict(blocks=3, phased=True), False),
    "phased-in-place": (70, 9, 64, 2.0, dict(blocks=2, phased=True, in_place=True), False),
}


@pytest.mark.parametrize("case", list(CARVED))
def test_carved_workspace_gives_the_same_bits(host_check, tmp_path, case):
    """The binding allocates a call's scratch as one workspace carved by workspace_layout and never
    initialises it. Run so, over a workspace filled with NaN, every output equals, bit for bit, the
    run over separate exact-size (zeroed) buffers, and matches float64: no two buffers of the layout
    overlap, and no kernel reads scratch it has not written first."""
    n, c, d, tau, kw, bad = CARVED[case]
    x, y = make_episode(n, c, d, seed=n + d, dtype=torch.float32, one_shot=1)
    p = torch.randn(c, d, generator=torch.Generator().manual_seed(4))
    w = None if kw.get("phased") else torch.rand(n, generator=torch.Generator().manual_seed(3))
    if bad:
        y = y.clone()
        y[4] = c + 2
    a = _run(host_check, tmp_path, x, p, y, tau, w=w, **kw)
    b = _run(host_check, tmp_path, x, p, y, tau, w=w, carved=True, **kw)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True, msg=key)
    if bad:
        assert torch.isnan(b["losses"][4]) and torch.isnan(b["loss"][0])
    elif kw.get("fused", True):
        _check_against_reference(b, x, p, y, tau, TOL[torch.float32], w)


@pytest.mark.parametrize("pad", [0, 3], ids=["packed", "padded"])
def test_carved_workspace_episodes(host_check, tmp_path, pad):
    """The episodes kernel over the carved, NaN-filled workspace (S s_total long): the same bits as
    over separate buffers."""
    sizes, d, taus = [(7, 3), (5, 1), (40, 9)], 19, [2.0, 0.0, 5.0]
    a = _check_episodes(host_check, tmp_path, sizes, d, pad, taus)
    b = _check_episodes(host_check, tmp_path, sizes, d, pad, taus, carved=True)
    for key in a:
        assert torch.equal(b[key], a[key]), key


@pytest.mark.parametrize("case", ["one-launch", "split", "in-place", "phased", "episodes", "class-means",
                                  "value-summary"])
def test_kernels_have_no_data_race(host_check_tsan, tmp_path, case):
    # every barrier the kernels rely on — __syncthreads, the grid barrier, __syncwarp and the
    # shuffles' exchanges — is checked by ThreadSanitizer on the host threads that run them (it
    # reports the race of a row's S[i, y_i] read against its overwrite when that __syncwarp is gone)
    x, y = make_episode(37, 5, 45, seed=3)
    p = torch.randn(5, 45, generator=torch.Generator().manual_seed(3))
    if case == "value-summary":   # flags set by several threads, partial counts summed by another launch
        y = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(3))
        got = _summary(host_check_tsan, tmp_path, torch.randn(300, 4), y, 5, 3, 1.0)
        assert got == [0.0, 4.0, 5.0, 0.0, 1.0]
        return
    if case == "class-means":   # the label chunks' shared row lists, rewritten chunk after chunk
        x, y = make_episode(300, 6, 20, seed=3)
        got = _class_means(host_check_tsan, tmp_path, x, y, 6, 2)
        assert_rel(got, ref.class_prototypes(x.double(), y, 6), 1e-6, "means")
        return
    if case == "episodes":
        rows, cls, s_off = [[0, 30], [30, 7]], [[0, 4], [4, 1]], [0, 120]
        y = torch.cat([make_episode(30, 4, 45, seed=5)[1], torch.zeros(7, dtype=torch.int64)])
        out = _run(host_check_tsan, tmp_path, x, p, y, [2.0, 1.0], episodes=(rows, cls, s_off, 127))
        for k, ((r0, n), (c0, cc)) in enumerate(zip(rows, cls, strict=True)):
            loss = _want(x[r0:r0 + n], p[c0:c0 + cc], y[r0:r0 + n], [2.0, 1.0][k])[0]
            assert_rel(out["loss"][k], loss, TOL[torch.float32]["loss"], f"episode {k} loss")
        return
    kw = {"one-launch": dict(blocks=2), "split": dict(blocks=3, splits=(2, 2)),
          "in-place": dict(blocks=2, in_place=True), "phased": dict(blocks=3, phased=True)}[case]
    out = _run(host_check_tsan, tmp_path, x, p, y, 2.0, **kw)
    _check_against_reference(out, x, p, y, 2.0, TOL[torch.float32])

"""copa-fast eval: the embedded default runs end to end; bad input gives one line and exit 2."""

import json

import numpy as np
import pytest
import torch

from copa_fast import cli
from copa_fast.backends import default_backend
from conftest import DEVICES, device_for


def test_eval_embedded_default_json(capsys):
    rc = cli.main(["eval", "--episodes", "2", "--steps", "3", "--check-episodes", "1", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["episodes"] == 2 and set(res["methods"]) == {"copa", "pa", "ncc"}
    for m in res["methods"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["episodes_per_second"] > 0
    dev = res["methods"]["copa"]["max_abs_dev_vs_float64_reference"]
    assert dev["episodes_checked"] == 1 and dev["adapter_entries"] < 1e-4


def test_eval_reads_a_feature_file(tmp_path, capsys):
    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 15)
    feats = g.normal(size=(90, 12)).astype(np.float32) + labels[:, None]
    path = tmp_path / "f.npz"
    np.savez(path, features=feats, labels=labels)
    assert cli.main(["eval", "--features", str(path), "--episodes", "2", "--steps", "2", "--methods", "copa,ncc"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line]
    assert "CoPA" in rows and "NCC" in rows and "PA" not in rows


def test_feature_file_labels_may_be_class_names_or_any_integers(tmp_path):
    g = np.random.default_rng(1)
    ids = g.permutation(np.repeat(np.arange(6), 15))
    feats = g.normal(size=(90, 12)).astype(np.float32)
    names = np.array(["ant", "bee", "cat", "dog", "eel", "fox"])[ids]   # sorted names: the same numbering
    for i, labels in enumerate([ids, names, names.astype(np.bytes_), ids * 1000 - 7]):
        f, y = cli.load_features(_write(tmp_path, f"{i}.npz", features=feats, labels=labels))
        assert torch.equal(f, torch.from_numpy(feats)) and y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(labels if i == 3 else ids).long())


def _write(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("make,fragment", [
    (lambda d: str(d / "missing.npz"), "no such file"),
    (lambda d: _write(d, "k.npz", feats=np.zeros((4, 2))), "expected keys"),
    (lambda d: _write(d, "s.npz", features=np.zeros(4), labels=np.zeros(4, dtype=int)), "2-D float"),
    (lambda d: _write(d, "l.npz", features=np.ones((4, 2)), labels=np.zeros(4) + 0.5), "integers"),
    (lambda d: _write(d, "c.npz", features=np.ones((40, 2)), labels=np.arange(40) % 3), "classes"),
    (lambda d: _write(d, "o.npz", features=np.ones((4, 2)), labels=np.array(["a", "b", "a", "b"], dtype=object)),
     "string array"),
])
def test_eval_bad_input_is_one_line(tmp_path, capsys, make, fragment):
    rc = cli.main(["eval", "--features", make(tmp_path), "--episodes", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and fragment in err


@pytest.mark.parametrize("argv,flag", [
    (["eval", "--episodes", "0"], "--episodes"), (["eval", "--steps", "-1"], "--steps"),
    (["eval", "--check-episodes", "-2"], "--check-episodes"), (["eval", "--seed", "-1"], "--seed"),
    (["demo", "--episodes", "0"], "--episodes"), (["demo", "--seed", "-4"], "--seed"),
])
def test_bad_counts_name_their_flag(capsys, argv, flag):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"copa-fast: error: {flag}: expected an int >=")


def test_demo_and_bench_errors_are_one_line(tmp_path, capsys):
    for argv, flag in ((["demo", "--backend", "nope"], "--backend"),
                       (["bench", "--out", str(tmp_path / "file" / "sub"), "--max-n", "30"], "--out")):
        if flag == "--out":
            (tmp_path / "file").write_text("")   # a file where the folder's parent should be
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"copa-fast: error: {flag}: "), err


def test_eval_unavailable_backend(capsys):
    rc = cli.main(["eval", "--episodes", "1", "--backend", "cuda", "--device", "cpu"])
    assert rc == 2 and "--backend" in capsys.readouterr().err


def test_pt_file(tmp_path, capsys):
    labels = torch.arange(6).repeat_interleave(12)
    torch.save({"features": torch.randn(72, 8) + labels[:, None], "labels": labels}, tmp_path / "f.pt")
    assert cli.main(["eval", "--features", str(tmp_path / "f.pt"), "--episodes", "1", "--steps", "1",
                     "--methods", "ncc"]) == 0


def _eval_json(cmd, env):
    import os
    import signal
    import subprocess
    import sys

    # own process group: a timeout kills torchrun's workers too, not only the launcher
    proc = subprocess.Popen([sys.executable, *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr
    res = json.loads(stdout)
    for m in res["methods"].values():   # wall times differ between runs
        m.pop("seconds"), m.pop("episodes_per_second")
    return res


def test_eval_under_torchrun_equals_single_process(tmp_path):
    """torchrun --nproc-per-node 2 -m copa_fast eval: episodes split over 2 gloo ranks, results
    gathered on rank 0 equal the single-process run (same thread count, so bitwise)."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["eval", "--episodes", "5", "--steps", "3", "--check-episodes", "3", "--json", "--device", "cpu"]
    single = _eval_json(["-m", "copa_fast", *args], env)
    multi = _eval_json(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        "-m", "copa_fast", *args], env)
    assert multi.pop("world_size") == 2 and single.pop("world_size") == 1
    assert multi == single


def test_bench_writes_markdown_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--out", str(out), "--max-n", "100", "--d", "32", "--budget", "0", "--device", "cpu"])
    assert rc == 0
    md = (out / "bench.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 25 x 5 x 32") or line.startswith("| 100 x 10 x 32")]
    impls = {row.split("|")[2].strip() for row in rows}
    assert {"published-eager", "nxc-eager", "copa_fast-cpu"} <= impls
    data = json.loads((out / "bench.json").read_text())
    assert all(r["median_s"] > 0 and r["reps"] >= 3 for r in data["records"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench.png" in capsys.readouterr().out


def test_bench_bad_arguments(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path), "--max-n", "3"]) == 2
    assert "--max-n" in capsys.readouterr().err
    assert cli.main(["bench", "--out", str(tmp_path), "--impls", "fastest"]) == 2
    assert "--impls" in capsys.readouterr().err


@pytest.mark.skipif("triton" not in __import__("copa_fast").available_backends(), reason="triton unavailable")
def test_eval_batched_backend_equals_per_episode_backend(tmp_path, capsys):
    """With a batched backend (triton here) eval adapts all episodes with adapt_many; accuracies
    equal the per-episode cpu run."""
    g = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 15)
    path = tmp_path / "f.npz"
    np.savez(path, features=g.normal(size=(90, 12)).astype(np.float32) + labels[:, None], labels=labels)
    out = {}
    for backend, device in (("triton", device_for("triton").type), ("cpu", "cpu")):
        assert cli.main(["eval", "--features", str(path), "--episodes", "2", "--steps", "3", "--methods", "copa",
                         "--backend", backend, "--device", device, "--json"]) == 0
        out[backend] = json.loads(capsys.readouterr().out)["methods"]["copa"]
    assert out["triton"]["accuracy"] == out["cpu"]["accuracy"]
    assert out["triton"]["max_abs_dev_vs_float64_reference"]["adapter_entries"] < 1e-4


@pytest.mark.parametrize("gpu", [False, True])
def test_every_command_defaults_to_the_gpu_where_one_is_visible(monkeypatch, capsys, gpu):
    """eval, demo and bench run on the GPU when one is visible (a user's `copa-fast eval` on a GPU
    machine measures the GPU), else on the CPU; the help says which."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    want = "cuda" if gpu else "cpu"
    for command in ("eval", "demo", "bench"):
        assert cli.build_parser().parse_args([command]).device == want
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert f"else cpu; here {want})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv,fragment", [
    (["eval", "--episodes", "0"], "--episodes: expected an int >= 1"),
    (["eval", "--steps", "-1"], "--steps: expected an int >= 0"),
    (["eval", "--check-episodes", "-2"], "--check-episodes: expected an int >= 0"),
    (["bench", "--d", "0"], "--d: expected an int >= 1"),
    (["bench", "--budget", "nan"], "--budget: expected seconds >= 0"),
])
def test_cli_argument_errors_name_the_flag(capsys, argv, fragment):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


@pytest.mark.parametrize("command", ["eval", "bench", "demo"])
def test_cli_device_flag_is_parsed_not_a_traceback(capsys, command):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--device", "tpu"])
    assert exc.value.code == 2 and "--device: expected cpu, cuda or cuda:K, got 'tpu'" in capsys.readouterr().err
    assert cli.build_parser().parse_args([command, "--device", "cuda:1"]).device == "cuda:1"


@pytest.mark.parametrize("device", DEVICES)
def test_demo_runs_and_reports(capsys, device):
    """The demo's whole path on one small episode: the table row and the summary, the kernels'
    adapters within float32 rounding of the published loop's, on the device asked for (on a GPU
    with the device's default backend)."""
    import re

    want = default_backend(torch.device(device))   # what the demo picks when --backend is not given
    assert cli.main(["demo", "--episodes", "1", "--seed", "3", "--device", device]) == 0
    out = capsys.readouterr().out
    assert f"1 synthetic Meta-Dataset-shaped episodes (D=512) on {device}, backend '{want}'" in out
    summary = re.search(r"mean accuracy: ours ([\d.]+)%, reference ([\d.]+)%; .* largest adapter deviation (\S+)$",
                        out.strip().splitlines()[-1])
    assert summary, out
    assert abs(float(summary[1]) - float(summary[2])) <= 1.0 and float(summary[3]) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("command", ["eval", "demo", "bench"])
def test_cuda_device_without_a_gpu_is_one_line(capsys, command):
    assert cli.main([command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "copa-fast: error: --device: cuda requested but no GPU is visible"

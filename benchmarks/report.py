"""Compact table from a pytest-benchmark JSON: median and 20/80 % quantiles per shape and
implementation, and the speed-up of each against the published eager step of the same run."""

import json
import sys

import numpy as np


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    m = data.get("copa_fast_machine", {})
    where = m.get("gpu") or m.get("cpu", "cpu")
    lines = [f"machine: {where}; driver {m.get('driver')}; torch {m.get('torch')}; triton {m.get('triton')}; "
             f"date {data.get('datetime', '')[:10]}",
             "| N x C x D | implementation | median | p20 - p80 | vs published eager | peak extra MiB |",
             "|---|---|---|---|---|---|"]
    rows = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        t = np.array(b["stats"]["data"])
        rows.setdefault((e["N"], e["C"], e["D"]), {})[e["impl"]] = (np.median(t), np.quantile(t, 0.2),
                                                                    np.quantile(t, 0.8), e.get("peak_extra_mib"))
    for shape in sorted(rows):
        base = rows[shape].get("published-eager", (None,))[0]
        for impl, (med, lo, hi, mem) in rows[shape].items():
            ratio = f"{base / med:.1f}x" if base else "-"
            mem_s = f"{mem:.1f}" if mem is not None else "-"
            lines.append(f"| {shape[0]} x {shape[1]} x {shape[2]} | {impl} | {_fmt(med)} | {_fmt(lo)} - {_fmt(hi)} "
                         f"| {ratio} | {mem_s} |")
    return "\n".join(lines)


def _fmt(sec: float) -> str:
    return f"{sec * 1e6:.0f} us" if sec < 1e-3 else f"{sec * 1e3:.2f} ms"


if __name__ == "__main__":
    print(table(sys.argv[1]))

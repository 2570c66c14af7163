#!/usr/bin/env python3
"""bench-plot.py REPORT PNG: latency against throughput from a `make bench`
report: esk's closed loops (1, 64, 256, 1024 in flight) and the peers' rows
(PostgreSQL, UmaDB) of the same run, p50 solid and p99 dashed, each point
labelled with its requests in flight. Needs matplotlib (infra/bench.sh
installs it in target/bench/venv)."""

import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(text):
    """{system: [(in_flight, per_second, p50_ms, p99_ms)]}"""
    out = {}
    # esk's own closed loops: the first "## esk append" section (the main run).
    section = text.split("## esk append", 1)[1] if "## esk append" in text else ""
    section = section.split("\n## ", 1)[0]
    for m in re.finditer(r"^(\d+) in flight.*?=\s*(\d+)/s\s+latency p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms",
                         section, re.M):
        out.setdefault("esk", []).append((int(m[1]), float(m[2]), float(m[3]), float(m[4])))
    # The peers' table: "<system>  <clients>  <appends/s>  <p50>  <p99>".
    peers = text.split("## Peers", 1)[1] if "## Peers" in text else ""
    for m in re.finditer(r"^(PostgreSQL.*?|UmaDB.*?)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s*$", peers, re.M):
        out.setdefault(m[1].strip(), []).append((int(m[2]), float(m[3]), float(m[4]), float(m[5])))
    return out


def main():
    report, png = sys.argv[1], sys.argv[2]
    data = series(open(report).read())
    if not data:
        sys.exit(f"{report}: no esk or peer rows to plot")
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, (name, points) in enumerate(sorted(data.items(), key=lambda kv: kv[0] != "esk")):
        points.sort(key=lambda p: p[0])
        color = f"C{i}"
        xs = [p[1] for p in points]
        ax.plot(xs, [p[2] for p in points], "o-", color=color, label=f"{name} p50")
        ax.plot(xs, [p[3] for p in points], "x--", color=color, alpha=0.6, label=f"{name} p99")
        for n, x, p50, _ in points:
            ax.annotate(str(n), (x, p50), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("appends per second (closed loop; labels: requests in flight)")
    ax.set_ylabel("latency, ms")
    first = open(report).readline().strip("# \n")
    ax.set_title(f"latency vs throughput, a condition on every append\n{first}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()

"""Render a benchmark result (bench/results/<date>.json) as docs/benchmarks.md and a PNG plot.

.venv/bin/python bench/report.py [bench/results/<date>.json]   # default: the newest result
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = BENCH / "results" / "latency-vs-load.png"
CHANGES = BENCH / "changes.md"  # issue 19's change table: hand-kept, measured per change
KNEE_P50_GROWTH = 2.0  # past the knee the median is over twice its lowest-load value

SERIES_STYLE = {
    "direct": ("direct upstream (no gateway)", "0.55", "--"),
    "bare": ("bare pass-through", "tab:green", "-"),
    "ours": ("ours, every flag on", "tab:blue", "-"),
    "litellm": ("LiteLLM 1.108.7", "tab:red", "-"),
}
ORDER = ["bare", "ours", "ours_off", "ours_info", "litellm"]


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def get(entry: dict[str, Any], *path: str) -> Any:
    node: Any = entry
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def growth(entry: dict[str, Any]) -> float | None:
    """RSS growth over the measured phases: after them vs after the warm-up."""
    warm, after = entry.get("rss_warm_mb"), entry.get("rss_after_mb")
    if not warm or after is None:
        return None
    return (after - warm) / warm * 100


# --------------------------------------------------------------------------- plot


def knee(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest offered load a series still kept up with: not saturated, at least 95 % of
    the offered rate achieved, at most 1 % errors, and p50 within 2x of its lowest-load p50.
    The curve's rates are a coarse ladder, so the true knee lies between this point and the
    next."""
    ordered = sorted(
        (p for p in points if p.get("p50_ms") is not None), key=lambda p: p["offered_rps"]
    )
    if not ordered:
        return None
    base = ordered[0]["p50_ms"]
    best = None
    for point in ordered:
        kept_up = (
            not point.get("saturated")
            and point["achieved_rps"] >= 0.95 * point["offered_rps"]
            and point.get("error_share", 0) <= 0.01
            and point["p50_ms"] <= KNEE_P50_GROWTH * base
        )
        if not kept_up:
            break
        best = point
    if best is not None and best is ordered[-1]:
        best = {**best, "beyond_ladder": True}  # kept up with every rate offered
    return best


def knee_label(bend: dict[str, Any]) -> str:
    if bend.get("beyond_ladder"):
        return f"≥ {bend['offered_rps']:g} req/s (no knee on the ladder)"
    return f"{bend['offered_rps']:g} req/s"


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        print("matplotlib missing: no plot (pip install -c constraints.txt 'matplotlib>=3.8')")
        return False
    series = {"direct": get(results, "direct", "curve") or []}
    for key in ("bare", "ours", "litellm"):
        series[key] = get(results, "gateways", key, "curve") or []
    if not any(series.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for axis, quantile in zip(axes, ("p50", "p99"), strict=True):
        for key, points in series.items():
            points = [p for p in points if p.get(f"{quantile}_ms") is not None]
            if not points:
                continue
            label, colour, style = SERIES_STYLE[key]
            xs = [p["offered_rps"] for p in points]
            ys = [p[f"{quantile}_ms"] for p in points]
            axis.plot(xs, ys, style, color=colour, marker="o", markersize=4, label=label)
            if points[-1].get("saturated"):
                axis.plot(xs[-1:], ys[-1:], "x", color=colour, markersize=10, mew=2)
            bend = knee(points) if key != "direct" else None
            if bend is not None:
                axis.plot(
                    [bend["offered_rps"]],
                    [bend[f"{quantile}_ms"]],
                    "o",
                    markersize=13,
                    mfc="none",
                    mec=colour,
                    mew=2,
                )
                axis.annotate(
                    ("knee ≥ " if bend.get("beyond_ladder") else "knee ")
                    + f"{bend['offered_rps']:g}/s",
                    (bend["offered_rps"], bend[f"{quantile}_ms"]),
                    textcoords="offset points",
                    xytext=(-10, 12),
                    fontsize=7,
                    color=colour,
                )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("offered load (requests/s, open loop)")
        axis.set_ylabel(f"{quantile} latency (ms)")
        axis.set_title(f"{quantile} latency, upstream delay 20 ms")
        axis.grid(True, which="both", alpha=0.3)
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        axis.xaxis.set_major_formatter(plain)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        "Latency against offered load (× = saturated: p50 > 100 ms or > 1 % errors; ring = knee)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- targets


def side_ratio(results: dict[str, Any], name: str) -> float | None:
    """Median CPU-per-request ratio of two gateways loaded side by side (same windows)."""
    value = get(results, "side_by_side", name, "median_ratio")
    return float(value) if value is not None else None


def paired(results: dict[str, Any], name: str) -> float | None:
    """A median of per-round ratios computed by the harness (see `paired` there)."""
    value = results.get("paired", {}).get(name)
    return float(value) if value is not None else None


Row = tuple[str, str, bool | None]


def check(name: str, value: float | None, shown: str, ok: Callable[[float], bool]) -> Row:
    return (name, shown if value is not None else "n/a", ok(value) if value is not None else None)


def targets(results: dict[str, Any]) -> list[Row]:
    """(target, measured, met) for ours with every flag on: issue 19's targets first (CPU and
    throughput at LOG_LEVEL=info when that instance was measured, as the issue asks)."""
    ours = results.get("gateways", {}).get("ours", {})
    at = "ours_info" if paired(results, "throughput_cpu_s_per_1k_ours_info_over_bare") else "ours"
    level = "`LOG_LEVEL=info`" if at == "ours_info" else "`LOG_LEVEL=warning` (info not run)"
    cpu_x = paired(results, f"throughput_cpu_s_per_1k_{at}_over_bare")
    stream_cpu_x = paired(results, f"streaming_cpu_s_per_1k_{at}_over_bare")
    share = paired(results, f"throughput_rps_{at}_over_bare")
    p99 = get(ours, "latency", "median", "added_p99_ms")
    idle = ours.get("rss_idle_mb")
    grew = growth(ours) if ours else None
    on_off = side_ratio(results, "ours_over_ours_off") or paired(
        results, "throughput_cpu_s_per_1k_ours_over_ours_off"
    )
    extra = (on_off - 1) * 100 if on_off is not None else None
    over = results.get("overload", {}).get("median", {})
    server, client = over.get("server_rejected_p99_ms"), over.get("rejected_p99_ms")
    rows = [
        check(
            f"CPU per request ≤ 1.5× bare, {level}",
            cpu_x,
            f"{fmt(cpu_x, 2)}×",
            lambda v: v <= 1.5,
        ),
        check(
            f"CPU per stream ≤ 1.5× bare, {level}",
            stream_cpu_x,
            f"{fmt(stream_cpu_x, 2)}×",
            lambda v: v <= 1.5,
        ),
        check(
            f"max req/s ≥ 65 % of bare, {level}",
            share,
            f"{(share or 0) * 100:.0f} %",
            lambda v: v >= 0.65,
        ),
        check(
            "added p99 ≤ +4 ms at 20 req/s (20 ms upstream)",
            p99,
            f"{fmt(p99, 2)} ms",
            lambda v: v <= 4,
        ),
        check("RSS idle ≤ 80 MB", idle, f"{fmt(idle)} MB", lambda v: v <= 80),
        check(
            "RSS flat (≤ 10 % growth over the measured phases)",
            grew,
            f"{fmt(grew)} %",
            lambda v: v <= 10,
        ),
        check(
            "all flags on vs off ≤ +15 % CPU per request",
            extra,
            f"{fmt(extra)} %",
            lambda v: v <= 15,
        ),
        check(
            "503 at 10× overload ≤ 1 ms p99 server-side",
            server,
            f"{fmt(server, 2)} ms (client-side {fmt(client, 2)} ms)",
            lambda v: v <= 1,
        ),
    ]
    for q in ("p50", "p99"):
        acc, calm = over.get(f"accepted_{q}_ms"), over.get(f"unloaded_{q}_ms")
        delta = (acc / calm - 1) * 100 if acc is not None and calm else None
        rows.append(
            check(
                f"accepted {q} at 10× overload within 20 % of unloaded",
                delta,
                f"{fmt(delta, 1)} % ({fmt(acc, 1)} vs {fmt(calm, 1)} ms)",
                lambda v: abs(v) <= 20,
            )
        )
    return rows


# --------------------------------------------------------------------------- markdown


def table(results: dict[str, Any]) -> list[str]:
    gateways = results["gateways"]
    lines = [
        "| Gateway | Max req/s (32 conn) | CPU-s / 1k req | Added p50 / p99 at 20 req/s (ms) "
        "| RSS idle / warm → after (MB) | Streams/s (32 conn) | CPU-s / 1k streams |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ORDER:
        entry = gateways.get(key)
        if entry is None:
            continue
        name = entry["label"]
        if entry.get("status") != "ok":
            lines.append(f"| {name} | {entry.get('status')} | | | | | |")
            continue
        tp = get(entry, "throughput", "median") or {}
        lt = get(entry, "latency", "median") or {}
        st = get(entry, "streaming", "median") or {}
        grew = growth(entry)
        rss = (
            f"{fmt(entry.get('rss_idle_mb'))} / {fmt(entry.get('rss_warm_mb'))} → "
            f"{fmt(entry.get('rss_after_mb'))}"
        )
        if grew is not None:
            rss += f" ({grew:+.0f} %)"
        added = (
            f"{fmt(lt.get('added_p50_ms'), 2)} / {fmt(lt.get('added_p99_ms'), 2)}" if lt else "—"
        )
        lines.append(
            f"| {name} | {fmt(tp.get('rps'), 0)} | {fmt(tp.get('cpu_s_per_1k'), 3)} | {added} "
            f"| {rss} | {fmt(st.get('rps'), 0) if st else '—'} "
            f"| {fmt(st.get('cpu_s_per_1k'), 3) if st else '—'} |"
        )
    direct = (
        get(results, "direct", "latency", "pooled")
        or get(results, "direct", "latency", "median")
        or {}
    )
    lines.append(
        f"| direct upstream (reference) | | | absolute p50 {fmt(direct.get('p50'), 2)} / "
        f"p99 {fmt(direct.get('p99'), 2)} | | | |"
    )
    return lines


def ratios(results: dict[str, Any]) -> list[str]:
    gateways = results["gateways"]
    ours = gateways.get("ours", {})
    if ours.get("status") != "ok":
        return ["Ours is not measured in this run, so there are no ratios yet."]
    lines = ["| Figure | ours / LiteLLM | ours / bare pass-through |", "|---|---:|---:|"]
    for name, phase, key in (
        ("max req/s (higher is better)", "throughput", "rps"),
        ("CPU-s per 1k requests (lower is better)", "throughput", "cpu_s_per_1k"),
        ("streams/s (higher is better)", "streaming", "rps"),
        ("CPU-s per 1k streams (lower is better)", "streaming", "cpu_s_per_1k"),
    ):
        cells = [paired(results, f"{phase}_{key}_ours_over_{b}") for b in ("litellm", "bare")]
        shown = " | ".join(f"{c:.2f}×" if c else "n/a" for c in cells)
        lines.append(f"| {name} ¹ | {shown} |")
    for name, path in (
        ("added p50 at 20 req/s (lower is better)", ("latency", "median", "added_p50_ms")),
        ("added p99 at 20 req/s (lower is better)", ("latency", "median", "added_p99_ms")),
        ("RSS idle (lower is better)", ("rss_idle_mb",)),
        ("RSS after the run (lower is better)", ("rss_after_mb",)),
    ):
        mine = get(ours, *path)
        litellm = get(gateways.get("litellm", {}), *path)
        bare = get(gateways.get("bare", {}), *path)
        lines.append(f"| {name} | {ratio(mine, litellm)} | {ratio(mine, bare)} |")
    lines += [
        "",
        "¹ median of the per-round ratios (the two windows of one ratio are seconds apart, so "
        "slow drifts of the shared machine cancel out); the other rows are ratios of medians.",
    ]
    return lines


def overload_section(results: dict[str, Any]) -> list[str]:
    over = results.get("overload")
    if not over:
        return ["Not measured in this run (ours not available)."]
    mid = over["median"]
    statuses = over["rounds"][-1]["statuses"]
    return [
        f"Ours with every flag on and the bottleneck at {over['limits']['max_concurrent']} running "
        f"/ {over['limits']['max_queue']} queued, upstream delay {over['upstream_delay_ms']} ms: "
        f"capacity {over['capacity_rps']:g} req/s. Unloaded: {over['unloaded_rps']:g} req/s. "
        f"Overload: {over['offered_rps']:g} req/s offered (10×), open loop.",
        "",
        "| | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|",
        f"| 200, unloaded | {fmt(mid.get('unloaded_p50_ms'), 2)} "
        f"| {fmt(mid.get('unloaded_p99_ms'), 2)} |",
        f"| 200, accepted at 10× | {fmt(mid.get('accepted_p50_ms'), 2)} "
        f"| {fmt(mid.get('accepted_p99_ms'), 2)} |",
        f"| 503 `QUEUE_FULL` at 10×, client-side | {fmt(mid.get('rejected_p50_ms'), 3)} "
        f"| {fmt(mid.get('rejected_p99_ms'), 3)} |",
        f"| generator floor: direct upstream, no delay, same rate | "
        f"{fmt(mid.get('generator_floor_p50_ms'), 3)} "
        f"| {fmt(mid.get('generator_floor_p99_ms'), 3)} |",
        f"| 503 `QUEUE_FULL` at 10×, server-side | {fmt(mid.get('server_rejected_p50_ms'), 3)} "
        f"| {fmt(mid.get('server_rejected_p99_ms'), 3)} |",
        f"| 200 accepted at 10×, server-side | {fmt(mid.get('server_accepted_p50_ms'), 2)} "
        f"| {fmt(mid.get('server_accepted_p99_ms'), 2)} |",
        "",
        f"Accepted throughput under overload: {fmt(mid.get('accepted_rps'))} req/s "
        f"(statuses in the last round: {statuses}). Client-side latency is measured by the "
        "open-loop generator over loopback; server-side is the `duration_ms` of the service's "
        "own access log line (this instance runs at `LOG_LEVEL=info` for that; the "
        "`http_request_duration_seconds` buckets start at 5 ms, too coarse for a 1 ms target): "
        "the time from the request entering the ASGI app to its response being sent. The "
        "client-side tail includes the generator's own (the *floor* row: the same generator at "
        "the same rate against the upstream answering at once, sharing CPU 1 with it).",
    ]


def flags_section(results: dict[str, Any]) -> list[str]:
    gateways = results["gateways"]
    if gateways.get("ours", {}).get("status") != "ok":
        return ["Not measured in this run."]
    on_off = paired(results, "throughput_cpu_s_per_1k_ours_over_ours_off")
    info_on = paired(results, "throughput_cpu_s_per_1k_ours_info_over_ours")
    side_on = side_ratio(results, "ours_over_ours_off")
    side_info = side_ratio(results, "ours_info_over_ours")

    def pct(value: float | None, versus: str) -> str:
        return f"{(value - 1) * 100:+.1f} % vs {versus}" if value else "n/a"

    rows = (
        ("ours_off", "reference", "reference"),
        ("ours", pct(on_off, "every flag off"), pct(side_on, "every flag off")),
        ("ours_info", pct(info_on, "`warning`"), pct(side_info, "`warning`")),
    )
    lines = [
        "| Ours | Max req/s | CPU-s / 1k req | CPU per request: paired by round | side by side ² |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, delta, side in rows:
        entry = gateways.get(key, {})
        if entry.get("status") != "ok":
            continue
        tp = get(entry, "throughput", "median") or {}
        lines.append(
            f"| {entry['label']} | {fmt(tp.get('rps'), 0)} | {fmt(tp.get('cpu_s_per_1k'), 3)} "
            f"| {delta} | {side} |"
        )
    lines += [
        "",
        "² both instances on CPU 0 loaded at the same time by two wrk (16 connections each), "
        "CPU per request of each over the same window, median of the per-window ratios. On this "
        "shared machine the CPU per request of one configuration moves by up to ±20 % from one "
        "window to the next (same code, little interference measured), which is as large as the "
        "difference sought; loading both at once exposes them to the same conditions, so this "
        "column is the one the target is checked against.",
    ]
    return lines


def profile_section() -> list[str]:
    """Shares from `bench/profile.py` (py-spy), when a profile has been taken."""
    lines: list[str] = []
    for name, title in (("profile-on", "every flag on"), ("profile-off", "every flag off")):
        path = BENCH / "results" / f"{name}.json"
        if not path.exists():
            continue
        data = orjson.loads(path.read_bytes())
        packages = ", ".join(f"{k} {v:.0f} %" for k, v in data["by_package_pct"][:8])
        lines += [
            f"**Ours, {title}** (`bench/profile.py`, py-spy at 250 Hz for {data['seconds']:g} s "
            f"under wrk at 32 connections, {data['samples']:,} samples, {data['rps']:,.0f} "
            f"req/s while sampled, commit `{data['commit']}`).",
            "",
            f"By package, where the samples were (own time): {packages}.",
            "",
            "| Own time (top frames) | % | Inclusive (selected) | % |",
            "|---|---:|---|---:|",
        ]
        wanted = (
            "rom_agent",
            "fastapi",
            "starlette",
            "aiohttp/client",
            "prometheus",
            "structlog",
        )
        entry_points = ("cli.py", "__main__.py", "server.py", "run_asgi")
        inclusive = [
            (k, v)
            for k, v in data["inclusive_pct"]
            if any(w in k for w in wanted) and not any(e in k for e in entry_points)
        ][:12]
        own = data["self_pct"][:12]
        for i in range(max(len(own), len(inclusive))):
            a = own[i] if i < len(own) else ("", "")
            b = inclusive[i] if i < len(inclusive) else ("", "")
            lines.append(f"| `{a[0]}` | {a[1]} | `{b[0]}` | {b[1]} |".replace("``", ""))
        lines.append("")
    if not lines:
        return ["(no profile taken: `.venv/bin/python bench/profile.py`)"]
    return [
        *lines,
        "How to read it: py-spy samples Python stacks only, so a frame's own time includes the "
        "C it calls (socket writes from `RequestResponseCycle.send` or "
        "`StreamWriter.write_headers`, the event loop's polling in `Runner.run`); a coroutine's "
        "stack starts where its task was resumed, so an inclusive share counts the samples "
        "taken inside that frame, not the whole request. Raw stacks (for a flame graph) are "
        "left in `bench/work/`.",
    ]


def knees_line(results: dict[str, Any]) -> str:
    parts = []
    for key in ("bare", "ours", "litellm"):
        bend = knee(get(results, "gateways", key, "curve") or [])
        if bend is not None:
            parts.append(f"{SERIES_STYLE[key][0]} {knee_label(bend)}")
    if not parts:
        return ""
    return (
        "Knee (ring on the plot; the highest offered load still served at ≥ 95 % with p50 "
        "within 2× of its lowest-load p50 — the next rung of the ladder was not): "
        + "; ".join(parts)
        + "."
    )


def flame_section(results: dict[str, Any]) -> list[str]:
    graphs = results.get("flame_graphs") or {}
    if not graphs:
        kept = sorted((BENCH / "results").glob("flame-*.svg"))
        links = ", ".join(f"[`{p.name}`](../{p.relative_to(ROOT)})" for p in kept)
        return [
            "(no flame graph taken in this run"
            + (f"; the ones in `bench/results/` are from another run: {links})" if kept else ")")
        ]
    lines = []
    for name, graph in graphs.items():
        if graph["status"] == "ok":
            lines.append(f"* {name}: [`{graph['svg']}`](../{graph['svg']})")
        else:
            lines.append(f"* {name}: none ({graph['status']})")
    return [
        "py-spy flame graphs of ours (every flag on, `LOG_LEVEL=warning`) under the throughput "
        "and the streaming load, sampled at 200 Hz in one extra window each after the measured "
        "rounds (`--nonblocking`, so the gateway is never paused):",
        "",
        *lines,
    ]


def changes_section() -> list[str]:
    if not CHANGES.exists():
        return ["(none recorded)"]
    return CHANGES.read_text().rstrip("\n").splitlines()


def targets_section(results: dict[str, Any]) -> list[str]:
    if get(results, "gateways", "ours", "status") != "ok":
        status = get(results, "gateways", "ours", "status") or "not requested"
        return [f"Ours: **pending** ({status}). The targets are checked once it is measured."]
    lines = ["| Target (ours, every flag on) | Measured | Met |", "|---|---:|:---:|"]
    for name, shown, met in targets(results):
        mark = "n/a" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {shown} | {mark} |")
    return lines


def interference(results: dict[str, Any]) -> str:
    shares = [
        r["foreign_cpu0"]
        for entry in results.get("gateways", {}).values()
        for phase in ("throughput", "streaming")
        for r in get(entry, phase, "rounds") or []
        if r.get("foreign_cpu0") is not None
    ]
    if not shares:
        return "n/a"
    shares.sort()
    return f"{shares[len(shares) // 2] * 100:.0f} %, max {shares[-1] * 100:.0f} %"


def generator_note(results: dict[str, Any]) -> str:
    points = get(results, "direct", "curve") or []
    if not points:
        return ""
    top = max(points, key=lambda p: p["offered_rps"])
    return (
        f"Against the direct upstream the generator sustained {top['achieved_rps']:,.0f} req/s "
        f"of {top['offered_rps']:,.0f} offered with p99 {fmt(top['p99_ms'], 2)} ms "
        f"(dispatch lateness at most {fmt(top['max_lateness_ms'], 1)} ms), more than any gateway "
        "reaches, so it is not the bottleneck."
    )


def render(results: dict[str, Any], source: Path, plotted: bool) -> str:
    machine = results["machine"]
    plan = results["plan"]
    mode = results["mode"]
    litellm = get(results, "gateways", "litellm", "status")
    lines = [
        "# Benchmarks",
        "",
        "Ours against LiteLLM's proxy and a bare pass-through proxy, on one 2-core machine, all on "
        "loopback. Generated by `bench/run.sh` from "
        f"[`{source.relative_to(ROOT)}`](../{source.relative_to(ROOT)}) "
        f"({mode} run, {results['date']}, commit `{machine['commit']}`). Re-run: see the end.",
        "",
        "## Method",
        "",
        f"* **Machine**: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, "
        f"Linux {machine['kernel']}, CPython {machine['python']}; "
        f"{machine['wrk'].split(' Copyright')[0]}. The machine "
        "is shared with other work (load average at start "
        f"{machine['load_average_at_start'][0]:.2f}), so every figure is the median of "
        "interleaved rounds.",
        f"* **Pinning**: every gateway on {results['pinning']['gateways']}; the fake upstream, "
        f"wrk and the open-loop generator on {results['pinning']['upstream_and_load']} "
        "(`sched_setaffinity`, like `taskset`).",
        f"* **Upstream**: `bench/upstream.py`, a fake OpenAI-compatible server (raw asyncio + "
        "httptools on uvloop, precomputed answers; "
        f"{fmt(get(results, 'direct', 'throughput', 'rps'), 0)} req/s on its core alongside wrk)."
        " "
        f"Streams have {results['stream_chunks']} content chunks. Its delay is switched between "
        "phases (0 ms for throughput, 20 ms for latency).",
        "* **Gateways**: *ours* (`rom-agent serve`, `MODEL_CHAIN=openai/bench-model`, "
        "`LOG_LEVEL=warning`; every flag on: retry, circuit breaker, bottleneck at 64 running / "
        "256 queued, guardrails `full`, metrics — or every flag off); *bare*: "
        "`bench/bare_proxy.py`, aiohttp.web on uvloop forwarding bytes over one pooled aiohttp "
        "client — the floor for a Python proxy; *LiteLLM* `litellm[proxy]==1.108.7` in its own "
        "venv (`bench/.venv-litellm`), one worker, no database, "
        "`LITELLM_LOCAL_MODEL_COST_MAP=True`, a master key, a dummy `OPENAI_API_KEY`, "
        "otherwise its defaults (its access log is on).",
        f"* **Load**: throughput and streaming with wrk (1 thread, 32 connections, "
        f"{plan['throughput_s']:g} s / {plan['stream_s']:g} s, Lua script `bench/post.lua` for the "
        "POST body); latency with `bench/loadgen.py`, an open-loop generator (fixed arrival "
        "rate, no coordinated omission: a slow gateway does not slow the arrivals down). "
        + generator_note(results),
        f"* **Rounds**: interleaved (bare, LiteLLM, ours, ours-off, …, then again): "
        f"{plan.get('closed_rounds', plan['rounds'])} for throughput and streaming, "
        f"{plan['rounds']} for latency and overload; medians reported, and ratios as the median "
        "of per-round ratios. Added latency = gateway minus direct upstream, both at "
        f"{plan['latency_rate']:g} req/s for {plan['latency_s']:g} s per round with a 20 ms "
        "upstream, percentiles over the samples of all rounds together (a p99 of a few hundred "
        "samples alone moves by milliseconds on this machine).",
        "* **Interference**: before each window the harness waits (bounded) until CPU 0 is "
        "quiet, and it records the share of CPU 0 used by anything but the gateway during the "
        f"window (`foreign_cpu0` in the JSON; median {interference(results)}); a window where "
        "others took over 25 % is run again once.",
        "* **CPU**: utime + stime of the gateway process and its descendants, from "
        "`/proc/<pid>/stat`, before and after each measured window, divided by the requests it "
        "served — CPU-seconds per 1,000 requests, the least machine-dependent figure. "
        "**RSS**: `VmRSS` from `/proc/<pid>/status`: idle = after start and 20 requests; "
        "warm = after the warm-up (a few seconds of wrk, plain and streaming); after = after "
        "the throughput, streaming and latency phases. *Flat* compares after with warm. RSS "
        "after the latency/load curve (up to 1,024 client connections) is in the JSON "
        "(`rss_after_curve_mb`).",
        "",
        f"## Results ({mode} run)",
        "",
        *table(results),
        "",
    ]
    if litellm and litellm != "ok":
        lines += [f"LiteLLM: {litellm}.", ""]
    lines += [
        "## Ratios",
        "",
        *ratios(results),
        "",
        "## Ours: every flag on vs off",
        "",
        *flags_section(results),
        "",
        "## Ours at 10× overload (bottleneck on)",
        "",
        *overload_section(results),
        "",
        "## Latency against offered load",
        "",
    ]
    if plotted:
        plot_rel = PLOT.relative_to(ROOT)
        lines += [f"![latency against offered load](../{plot_rel})", ""]
    else:
        lines += ["(no plot in this run)", ""]
    lines += [
        "Open loop, upstream delay 20 ms; one pass of rising rates, a series stops after its first"
        " saturated point (p50 over 100 ms, five times the upstream delay, or over 1 % errors). "
        "A single pass is noisier than the tables: one stall of the shared machine shows as a "
        "p99 spike.",
        "",
        knees_line(results),
        "",
        "## Targets",
        "",
        *targets_section(results),
        "",
        "Reference figures from the issue, same kind of machine: the bare aiohttp pass-through "
        "used about 0.17 ms of CPU per request and reached about 5,900 req/s; LiteLLM 1.108.7 "
        "used about 11 ms of CPU per request, reached under 100 req/s, added about 17 ms p50 / "
        "23 ms p99 at 20 req/s, and held 320–400 MB.",
        "",
        "## Where ours spends its CPU",
        "",
        *flame_section(results),
        "",
        *profile_section(),
        "",
        "## Changes measured (issue 19)",
        "",
        *changes_section(),
        "",
        "## Published figures, for context",
        "",
        "* LiteLLM's own docs: ~1,170 req/s on 4 instances × 4 CPU with overhead p50 2 / p99 "
        "13 ms, or p50 12 / p99 43 ms on 2 × 4 CPU (Locust, fake endpoint, header-based overhead).",
        "* TensorZero's run (one c7i.xlarge, vegeta, LiteLLM 1.74.9 with 4 workers): LiteLLM "
        "p50 4.83 / p99 5.87 ms at 100 QPS, p99 39.7 ms at 500 QPS, failing at 1,000 QPS; "
        "TensorZero (Rust) p50 0.35 / p99 0.94 ms at 10,000 QPS.",
        "* Those are round trips or overhead headers on bigger machines with more workers; the "
        "figures above are one worker per gateway on one core, measured the same way for all.",
        "",
        "## Re-run",
        "",
        "```sh",
        "bench/run.sh            # full run, ~15 min: installs wrk and LiteLLM if missing",
        "bench/run.sh --quick    # one short round, ~3 min",
        "bench/run.sh --gateways bare,ours   # a subset",
        "```",
        "",
        "It writes `bench/results/<date>.json` (`<date>-quick.json` for a quick run), "
        "regenerates this page and `bench/results/latency-vs-load.png`, and stops everything it "
        "started. Details: `bench/README.md`.",
        "",
        "Memory over a long run is measured apart, by `bench/soak.py`: the real service under "
        "30,000 mixed requests (chat on long conversations, streams, cut streams, the facade), "
        "RSS at the start and after every 10,000 requests. Its latest figures are in "
        "`bench/README.md`.",
        "",
    ]
    return "\n".join(lines)


def write(source: Path) -> None:
    results = orjson.loads(source.read_bytes())
    plotted = plot(results, PLOT)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(results, source, plotted))
    print(f"wrote {DOC.relative_to(ROOT)}" + (f" and {PLOT.relative_to(ROOT)}" if plotted else ""))


def main() -> None:
    if len(sys.argv) > 1:
        source = Path(sys.argv[1]).resolve()
    else:
        candidates = sorted((BENCH / "results").glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise SystemExit("no results in bench/results/")
        source = candidates[-1]
    write(source)


if __name__ == "__main__":
    main()

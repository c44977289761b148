"""The picture of an analysis: hit rate against cache size, one line per curve, as a PNG.

matplotlib (Agg, no display) is imported by ``draw`` alone, so importing this module costs
nothing until a picture is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.analysis.report import Analysis, format_bytes

__all__ = ["draw"]

#: policy -> colour, marker, marker size, line style of its simulated curve (the LRU curve is
#: a black line). lru and ttl evict alike, so their lines often coincide: ttl's is dashed
#: with small markers, drawn over lru's large hollow ones, so both stay visible.
_STYLES: dict[str, tuple[str, str, float, str]] = {
    "lru": ("tab:blue", "o", 8.0, "-"),
    "lfu": ("tab:orange", "s", 5.0, "-"),
    "ttl": ("tab:green", "^", 4.0, "--"),
    "tinylfu": ("tab:red", "D", 5.0, "-"),
}


def draw(analysis: Analysis, path: str | Path, *, width_px: int = 1200,
         height_px: int = 750) -> Path:
    """Write the PNG of ``analysis`` to ``path`` (``width_px`` x ``height_px``)."""
    import matplotlib  # noqa: PLC0415 - heavy: only when a picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import (  # noqa: PLC0415
        FuncFormatter,
        LogLocator,
        NullLocator,
        PercentFormatter,
    )

    a = analysis
    dpi = 100
    fig, ax = plt.subplots(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    try:
        lru, *policies = a.curves
        ax.plot(lru.sizes, lru.hit_rates, color="black", linewidth=2.2,
                label=f"LRU, {lru.method}" + ("" if lru.exact else f" (rate {a.sampling_rate:g})"))
        for curve in policies:
            if not curve.sizes:
                continue
            colour, marker, dot, line = _STYLES.get(curve.policy, ("tab:gray", "x", 5.0, "-"))
            how = "" if curve.exact else ", miniature"
            ax.plot(curve.sizes, curve.hit_rates, color=colour, marker=marker, markersize=dot,
                    linestyle=line, linewidth=1.3,
                    markerfacecolor="none" if curve.policy == "lru" else colour,
                    label=f"L1 {curve.policy} (simulated{how})")
        if a.freshness_ceiling is not None and a.max_age is not None:
            ax.axhline(a.freshness_ceiling, color="tab:purple", linestyle="--", linewidth=1.4,
                       label=f"freshness ceiling, max_age {_duration(a.max_age)} "
                             f"({a.freshness_ceiling:.1%})")
        for label, size, colour in (("L1 size", a.l1_size, "tab:cyan"),
                                    ("Redis maxmemory", a.maxmemory_rows, "tab:brown")):
            if size is not None:
                ax.axvline(size, color=colour, linestyle=":", linewidth=1.6,
                           label=f"{label}: {size:,} rows")
        ax.set_xscale("log")
        ax.set_xlim(left=max(1, min([lru.sizes[0], *(c.sizes[0] for c in policies if c.sizes)])),
                    right=max(lru.sizes[-1], a.l1_size or 0, a.maxmemory_rows or 0) * 1.15)
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("cache size (entries, log scale)")
        ax.set_ylabel("hit rate")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="x", alpha=0.12)
        bpr = a.bytes_per_row
        if bpr:
            def to_bytes(entries: Any) -> Any:
                return entries * bpr

            def to_entries(size: Any) -> Any:
                return size / bpr

            top = ax.secondary_xaxis("top", functions=(to_bytes, to_entries))
            top.set_xlabel(f"memory at {bpr:g} bytes per row")
            # ticks at powers of 4 bytes: 1 KiB, 4 KiB, 16 KiB ..., round in the units printed
            top.xaxis.set_major_locator(LogLocator(base=4))
            top.xaxis.set_minor_locator(NullLocator())
            top.xaxis.set_major_formatter(FuncFormatter(_bytes_tick))
        sampled = "" if a.sampling_rate == 1.0 else f", sampled at {a.sampling_rate:g}"
        ax.set_title(f"{a.view}: hit rate against cache size\n{a.accesses:,} accesses, "
                     f"{a.distinct_ids:,} distinct ids{sampled}", fontsize=12)
        ax.legend(loc="upper left", fontsize=9, framealpha=0.9)
        fig.tight_layout()
        target = Path(path)
        fig.savefig(target, dpi=dpi)
    finally:
        plt.close(fig)
    return target


def _bytes_tick(value: float, _position: Any) -> str:
    return format_bytes(value).replace(".0 ", " ")


def _duration(seconds: float) -> str:
    for unit, length in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds / length:g}{unit}"
    return f"{seconds:g}s"

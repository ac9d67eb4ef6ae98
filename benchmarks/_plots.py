"""Plots shared by the benchmarks (matplotlib, written as PNG files; nothing is shown).

Every function returns the path it wrote, or None when matplotlib is missing, so that a
benchmark still prints its table without it.
"""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gantt(trace, path, title):
    """Write a pipeline trace as a Gantt chart: one row per worker, one bar per task.

    Example::

        >>> with pipe.record_trace() as trace:
        ...     pipe.train_step(x, y, loss_fn)
        >>> gantt(trace, "out/timeline.png", "1F1B, 2 stages")
    """
    plt = _pyplot()
    if plt is None or not trace.events:
        return None
    start = min(e["start_us"] for e in trace.events)
    workers = sorted({e["worker"] for e in trace.events})
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(workers)))
    for e in trace.events:
        color = "tab:blue" if e["phase"] == "forward" else "tab:orange"
        left = (e["start_us"] - start) / 1e3
        width = (e["end_us"] - e["start_us"]) / 1e3
        ax.barh(e["worker"], width, left=left, color=color, edgecolor="black", linewidth=0.3)
        ax.text(left + width / 2, e["worker"], str(e["micro_batch"]), ha="center", va="center",
                fontsize=7, color="white")
    ax.set_yticks(workers, [f"stage {w}" for w in workers])
    ax.invert_yaxis()
    ax.set_xlabel("ms (blue: forward, orange: backward; numbers: micro-batch)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bars(labels, means, stds, path, title, ylabel):
    """Bar chart with error bars, one bar per label.

    Example::

        >>> bars(["one GPU", "pipelined"], [3.75, 2.51], [0.1, 0.05], "out/ways.png",
        ...      "ResNet-50", "seconds")
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.5))
    positions = range(len(labels))
    ax.bar(positions, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(positions, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves(series, path, title, xlabel, ylabel, reference=None):
    """Line plot of several ``label -> (xs, means, stds)`` series on a log2 x axis, with an
    optional horizontal ``(label, value)`` reference line.

    Example::

        >>> curves({"gpipe": ([1, 2, 4], [3.0, 2.6, 2.5], [0.1, 0.1, 0.1])}, "out/split.png",
        ...        "split size", "split size", "seconds", reference=("one GPU", 3.75))
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, means, stds) in series.items():
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    if reference is not None:
        ax.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
    ax.set_xscale("log", base=2)
    ticks = sorted({x for xs, _, _ in series.values() for x in xs})
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


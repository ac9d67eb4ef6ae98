"""shardpipe.copy_to against Tensor.to, measured side by side in one run.

Three tables, each a ratio to the baseline measured in the same run (never asserted on):

1. bandwidth of ``copy_to(x, dst)`` vs ``x.to(dst, non_blocking=True, copy=True)`` from
   4 KiB up to ``--max-bytes`` (``copy=True`` so that a same-device baseline really copies);
2. GPU only: the share of a large copy hidden behind a matmul running on another (compute)
   stream at the same time, for both;
3. 64 small tensors: one ``copy_to`` call on the list vs 64 ``.to`` calls.

Example (CPU, a quick run)::

    python benchmarks/copy_bench.py --max-bytes 16M --repeats 3

Targets on a GPU: bandwidth ratio >= 0.95 for large copies, >= 90 % hidden, batched >= 3x.
"""

import argparse
import os
import platform
import statistics
import time

import torch

import shardpipe as sp

KIB = 1024
UNITS = {"": 1, "K": KIB, "M": KIB**2, "G": KIB**3}


def parse_bytes(text):
    """'64M' -> 67108864; accepts K, M, G (powers of 1024) or a plain number."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (use e.g. 4096, 64K, 16M, 1G)"
        ) from None
    nbytes = int(value * UNITS[unit])
    if nbytes < 4 * KIB:
        raise argparse.ArgumentTypeError(f"must be at least 4K, got {text!r}")
    return nbytes


def parse_pair(text):
    src, sep, dst = text.partition(",")
    if not sep:
        raise argparse.ArgumentTypeError(f"a pair is SRC,DST such as cpu,cuda:0; got {text!r}")
    return torch.device(src), torch.device(dst)


def human(nbytes):
    for unit in ("G", "M", "K"):
        if nbytes >= UNITS[unit]:
            return f"{nbytes / UNITS[unit]:g} {unit}iB"
    return f"{nbytes} B"


def sync(*devices):
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def seconds(fn, devices, inner):
    """Wall time of one call of fn, averaged over `inner` calls, the devices synchronized."""
    sync(*devices)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(*devices)
    return (time.perf_counter() - start) / inner


def side_by_side(fns, devices, repeats, inner):
    """Median time of each function, the runs interleaved so drift hits all alike."""
    for fn in fns:
        fn()  # warm-up: streams, pinned host memory, caching allocator
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            acc.append(seconds(fn, devices, inner))
    return [statistics.median(t) for t in times]


def bandwidth_table(src, dst, max_bytes, repeats):
    rows = []
    size = 4 * KIB
    while size <= max_bytes:
        x = torch.randn(size // 4, device=src)
        inner = max(1, min(64, (4 * KIB**2) // size))  # about 4 MiB per timed run at least
        t_to, t_sp = side_by_side(
            [
                lambda x=x: x.to(dst, non_blocking=True, copy=True),
                lambda x=x: sp.copy_to(x, dst, non_blocking=True),
            ],
            (src, dst),
            repeats,
            inner,
        )
        rows.append((human(size), size / t_to / 1e9, size / t_sp / 1e9, t_to / t_sp))
        del x
        size *= 4
    return rows


def overlap_row(src, dst, nbytes, repeats):
    """Share of the copy's time hidden behind a matmul on another stream, for both copies."""
    compute_device = dst if dst.type == "cuda" else src
    x = torch.randn(nbytes // 4, device=src)
    a = torch.randn(4096, 4096, device=compute_device)
    compute = torch.cuda.Stream(compute_device)
    copies = {
        ".to": lambda: x.to(dst, non_blocking=True, copy=True),
        "copy_to": lambda: sp.copy_to(x, dst, non_blocking=True),
    }
    devices = (src, dst)
    t_copy = {name: side_by_side([fn], devices, repeats, 1)[0] for name, fn in copies.items()}

    def matmuls(count):
        with torch.cuda.stream(compute):
            for _ in range(count):
                a @ a

    t_one = side_by_side([lambda: matmuls(1)], devices, repeats, 1)[0]
    count = max(1, int(2 * max(t_copy.values()) / t_one))  # compute outlasts the copy
    t_mm = side_by_side([lambda: matmuls(count)], devices, repeats, 1)[0]

    hidden = {}
    for name, copy in copies.items():

        def both(copy=copy):
            matmuls(count)  # queued first, so the copy has to run beside it
            copy()

        t_both = side_by_side([both], devices, repeats, 1)[0]
        share = (t_copy[name] + t_mm - t_both) / t_copy[name]
        hidden[name] = min(1.0, max(0.0, share))
    return human(nbytes), hidden[".to"], hidden["copy_to"]


def batched_row(src, dst, count, repeats):
    xs = [torch.randn(32, 32, device=src) for _ in range(count)]  # 4 KiB each
    t_to, t_sp = side_by_side(
        [
            lambda: [x.to(dst, non_blocking=True, copy=True) for x in xs],
            lambda: sp.copy_to(xs, dst, non_blocking=True),
        ],
        (src, dst),
        repeats,
        inner=20,
    )
    return t_to * 1e6, t_sp * 1e6, t_to / t_sp


def print_table(title, header, rows, formats):
    print(f"\n{title}")
    cells = [header] + [[fmt.format(v) for fmt, v in zip(formats, row)] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def plot(path, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (src, dst), rows in results.items():
        labels = [r[0] for r in rows]
        ax.plot(labels, [r[1] for r in rows], "--o", label=f".to {src}->{dst}")
        ax.plot(labels, [r[2] for r in rows], "-o", label=f"copy_to {src}->{dst}")
    ax.set_ylabel("GB/s")
    ax.set_xlabel("tensor size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"\nplot: {path}")


def main():
    has_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pair",
        type=parse_pair,
        action="append",
        help="SRC,DST device pair, repeatable (default: cuda:0,cuda:0 and cpu,cuda:0 "
        "with a GPU, else cpu,cpu)",
    )
    parser.add_argument(
        "--max-bytes",
        type=parse_bytes,
        default=None,
        help="largest copy of the bandwidth table (default 1G with a GPU, 64M on the CPU)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument(
        "--plot", default="benchmarks/out/copy_bench.png", help="where to write the plot"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    default_pairs = ["cuda:0,cuda:0", "cpu,cuda:0"] if has_cuda else ["cpu,cpu"]
    pairs = args.pair or [parse_pair(p) for p in default_pairs]
    max_bytes = args.max_bytes or (KIB**3 if has_cuda else 64 * KIB**2)

    where = torch.cuda.get_device_name(0) if has_cuda else f"CPU, {os.cpu_count()} cores"
    print(f"copy_bench: torch {torch.__version__}, {where}, {platform.machine()}")
    print("baseline: x.to(dst, non_blocking=True, copy=True); CPU sources are pageable")

    results = {}
    for src, dst in pairs:
        name = f"{src} -> {dst}"
        rows = bandwidth_table(src, dst, max_bytes, args.repeats)
        results[(src, dst)] = rows
        print_table(
            f"bandwidth, {name} (ratio = copy_to / .to, higher is better)",
            ["size", ".to GB/s", "copy_to GB/s", "ratio"],
            rows,
            ["{}", "{:.2f}", "{:.2f}", "{:.2f}"],
        )
        if src.type == "cuda" or dst.type == "cuda":
            nbytes = min(max_bytes, 256 * KIB**2)
            size, to_hidden, sp_hidden = overlap_row(src, dst, nbytes, args.repeats)
            overlap = [(size, f"{100 * to_hidden:.0f} %", f"{100 * sp_hidden:.0f} %")]
        else:
            overlap = [(human(min(max_bytes, 256 * KIB**2)), "n/a", "n/a")]
        print_table(
            f"copy hidden behind a matmul on a compute stream, {name}",
            ["size", ".to hidden", "copy_to hidden"],
            overlap,
            ["{}", "{}", "{}"],
        )
        t_to, t_sp, speedup = batched_row(src, dst, 64, args.repeats)
        print_table(
            f"64 tensors of 4 KiB, {name} (speedup = .to time / copy_to time)",
            ["64 x .to (us)", "1 x copy_to (us)", "speedup"],
            [(t_to, t_sp, speedup)],
            ["{:.1f}", "{:.1f}", "{:.2f}"],
        )
    if args.plot:
        plot(args.plot, results)


if __name__ == "__main__":
    main()

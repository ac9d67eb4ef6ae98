"""Timelines of pipeline schedules: Chrome/Perfetto traces and bubble fractions."""

import json

__all__ = ["Trace"]

_LETTERS = {"forward": "F", "backward": "B", "weight": "W"}
_REDUCTIONS = ("reduce", "reduce_wait")


class Trace:
    """Tasks recorded by :meth:`Pipeline.record_trace`.

    ``events`` holds one dict per task: ``stage``, ``micro_batch``, ``phase``
    (``"forward"``/``"backward"``, and ``"weight"`` for the weight gradients of the
    zero-bubble schedules, whose ``"backward"`` is the input gradient), ``worker``,
    ``start_us`` and ``end_us``. With a ``data_parallel_group`` it also holds, per step, one
    ``"reduce"`` event per stage (from when its gradients went out to when the caller saw
    them back; ``micro_batch`` and ``worker`` are -1) and one ``"reduce_wait"`` (stage -1:
    the caller waiting for all of them after the pipeline's last task).

    Example::

        >>> pipe = shardpipe.Pipeline(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)),
        ...                           ["cpu", "cpu"], chunks=4)
        >>> x, y = torch.randn(16, 8), torch.randn(16, 2)
        >>> with pipe.record_trace() as trace:
        ...     _ = pipe.train_step(x, y, nn.functional.mse_loss)
        >>> sorted({(e["stage"], e["phase"]) for e in trace.events})[:2]
        [(0, 'backward'), (0, 'forward')]
        >>> 0.0 <= trace.bubble_fraction() < 1.0     # share of worker time spent idle
        True
        >>> trace.save("step.json")  # doctest: +SKIP
    """

    def __init__(self, events=()):
        self.events = []
        self._extend(events)

    def _extend(self, raw):
        for stage, micro_batch, phase, worker, start, end in raw:
            self.events.append(dict(stage=stage, micro_batch=micro_batch, phase=phase,
                                    worker=worker, start_us=start, end_us=end))

    def bubble_fraction(self):
        """Idle share of the workers between the first task's start and the last's end."""
        tasks = [e for e in self.events if e["phase"] in _LETTERS]
        if not tasks:
            return 0.0
        start = min(e["start_us"] for e in tasks)
        end = max(e["end_us"] for e in tasks)
        workers = len({e["worker"] for e in tasks})
        busy = sum(e["end_us"] - e["start_us"] for e in tasks)
        span = (end - start) * workers
        return max(0.0, 1.0 - busy / span) if span > 0 else 0.0

    def to_chrome(self):
        """The trace in Chrome's trace-event format (a dict ready for ``json.dump``)."""
        events = []
        for e in self.events:
            if e["phase"] in _REDUCTIONS:
                # Reductions on a track of their own, after the workers'.
                name = "wait" if e["phase"] == "reduce_wait" else f"R{e['stage']}"
                tid = "data-parallel reduction"
            else:
                name, tid = f"{_LETTERS[e['phase']]}{e['micro_batch']}", e["worker"]
            events.append(dict(name=name, cat=e["phase"], ph="X", ts=e["start_us"],
                               dur=e["end_us"] - e["start_us"], pid=0, tid=tid,
                               args=dict(stage=e["stage"], micro_batch=e["micro_batch"])))
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save(self, path):
        """Write the trace as Chrome trace-event JSON."""
        with open(path, "w") as f:
            json.dump(self.to_chrome(), f)

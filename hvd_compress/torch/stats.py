"""What ``stats()`` reports of the PyTorch plug-in's steps: the sums of the step in progress, the last step's,
and totals since construction (``plugin.CompressionBase.stats`` turns them into ratios and norms)."""


def _sums():
    return {"bytes_sent": 0, "dense_bytes": 0, "dense_small_bytes": 0, "residual": 0.0, "norm": 0.0,
            "worker_error": 0.0, "server_error": 0.0}


class Stats:
    def __init__(self):
        self.now, self.last = _sums(), None
        self.total_bytes = self.total_dense_bytes = self.skipped_steps = 0

    def add(self, p, small, error_feedback, compressed):
        """A tensor of the step: its bytes (``small``: dense for being under ``dense_below``), and where it
        was ``compressed`` in a step that commits, its residual, norm and error buffers' squares."""
        s = self.now
        s["bytes_sent"] += p.bytes_sent
        s["dense_bytes"] += 4 * p.shape.numel()
        s["dense_small_bytes"] += p.bytes_sent if small else 0
        if compressed:
            s["residual"] += p.stats[0]
            s["norm"] += p.stats[1]
            s["worker_error"] += p.stats[0] if error_feedback else 0.0
            s["server_error"] += p.server_stats[0] if p.server_stats is not None else 0.0

    def end(self, skipped):
        """The step is over (``skipped``: dropped for a non-finite gradient)."""
        self.last, self.now = self.now, _sums()
        self.total_bytes += self.last["bytes_sent"]
        self.total_dense_bytes += self.last["dense_bytes"]
        self.skipped_steps += skipped
        self.last["skipped"] = skipped

    def drop(self):
        """The step in progress is dropped: none of it counts."""
        self.now = _sums()

    def figures(self, steps, buckets):
        s = dict(self.last or _sums())
        skipped = s.pop("skipped", False)
        s.update({key: float(s[key]) for key in ("residual", "norm", "worker_error", "server_error")})
        return {**s, "steps": steps, "skipped_steps": self.skipped_steps, "last_step_skipped": skipped,
                "total_bytes_sent": self.total_bytes, "total_dense_bytes": self.total_dense_bytes,
                "buckets": buckets}

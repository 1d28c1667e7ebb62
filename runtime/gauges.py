"""Per-model request gauges (waiting, running) and the LoRA info snapshot, kept so that neither
unknown names nor unloaded adapters grow the metrics."""

from __future__ import annotations

import threading

UNKNOWN = "<unknown>"


class ModelGauges:
    def __init__(self, metrics, engines, repository) -> None:
        self.metrics, self.engines, self.repository = metrics, engines, repository
        self._lock = threading.Lock()
        self._values: dict[tuple[int, str], int] = {}  # (id(gauge), label) -> value

    def label(self, name: str) -> str:
        """A model's metric label: its name while it is served, else ``<unknown>``."""
        return name if name in self.engines or name in self.repository.current else UNKNOWN

    def _move(self, gauge, label: str, delta: int) -> None:
        """Move a gauge by ``delta`` under the label the request got when it was queued. A series
        of a model no longer served goes once it is back at 0, so a request in flight across
        an unload neither goes negative nor leaves a series behind."""
        with self._lock:
            key = (id(gauge), label)
            value = self._values.get(key, 0) + delta
            if value == 0 and label != UNKNOWN and self.label(label) != label:
                self._values.pop(key, None)
                try:
                    gauge.remove(label)
                except KeyError:
                    pass
                return
            self._values[key] = value
            gauge.labels(label).set(value)

    def waiting(self, label: str, delta: int) -> None:
        self._move(self.metrics.waiting, label, delta)

    def on_start(self, batch) -> None:
        for r in batch:
            self._move(self.metrics.waiting, r.model, -1)
            self._move(self.metrics.running, r.model, +1)

    def on_expire(self, requests) -> None:
        for r in requests:
            self._move(self.metrics.waiting, r.model, -1)

    def on_end(self, batch) -> None:
        for r in batch:
            self._move(self.metrics.running, r.model, -1)

    def forget(self, name: str) -> None:
        """An unloaded adapter's series go now where they are at 0 (else when they get there)."""
        with self._lock:
            for gauge in (self.metrics.waiting, self.metrics.running):
                if self._values.get((id(gauge), name), 0) == 0:
                    self._values.pop((id(gauge), name), None)
                    try:
                        gauge.remove(name)
                    except KeyError:
                        pass

    def lora_snapshot(self) -> tuple[list[str], list[str], int]:
        """(adapters with requests running, adapters with requests waiting, device slots for
        adapters per base) for `Metrics.add_lora_info`."""
        with self._lock:
            items = list(self._values.items())
        running = [lb for (g, lb), v in items if g == id(self.metrics.running) and v > 0 and lb not in self.engines]
        waiting = [lb for (g, lb), v in items if g == id(self.metrics.waiting) and v > 0 and lb not in self.engines]
        return running, waiting, min(d.capacity() for d in self.repository.device.values())

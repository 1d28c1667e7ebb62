"""The automatic merged fast path: when one adapter has ``auto_merge_share`` of the last
``auto_merge_window`` requests of its base, a merged copy of the base for it is built in the
background (one per base; the previous one's copy is dropped). Batches of that adapter alone
then run the plain merged model (`Batcher._forward`)."""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque

log = logging.getLogger("wara.serve")


class AutoMerge:
    def __init__(self, repository, *, window: int, share: float, configured: set[str], pinned: set[str]) -> None:
        self.repository = repository
        self.share = share
        self.configured, self.pinned = configured, pinned  # names merged / pinned by the config: kept
        self._recent: deque = deque(maxlen=window)
        self._merged: dict[str, object] = {}  # base -> the version whose copy serves
        self._lock = threading.Lock()

    def track(self, version) -> None:
        """Count one request (``version`` None: its base) and start a merge when one dominates."""
        repo = self.repository
        with self._lock, repo.lock:
            self._recent.append(version)
            if len(self._recent) < self._recent.maxlen:
                return
            counts = Counter(id(v) for v in self._recent if v is not None)
            if not counts:
                return
            vid, n = counts.most_common(1)[0]
            if n < self.share * len(self._recent):
                return
            dominant = next(v for v in self._recent if v is not None and id(v) == vid)
            previous = self._merged.get(dominant.base_model)
            if previous is dominant or dominant.merged is not None or dominant.retired:
                return
            if previous is not None:
                self._demote(previous)
            self._merged[dominant.base_model] = dominant
            dominant.pinned = True  # its own factors and head must stay while the copy serves
            engine = repo.engines[dominant.base_model]

        def build() -> None:
            try:
                merged = engine.build_merged(repo.host.fold(dominant).factors)
            except Exception:
                log.exception("auto-merge of %s failed", dominant.name)
                merged = None
            with self._lock, repo.lock:
                if merged is not None and not dominant.retired and self._merged.get(dominant.base_model) is dominant:
                    dominant.merged = merged
                    log.info("auto-merged %s (%d of the last %d requests)", dominant.name, n, len(self._recent))
                elif self._merged.get(dominant.base_model) is dominant:
                    self._demote(dominant)
                    del self._merged[dominant.base_model]

        threading.Thread(target=build, name="auto-merge", daemon=True).start()

    def _demote(self, version) -> None:
        """Drop an automatic merged copy (configured ones stay)."""
        if version.name not in self.configured:
            version.merged = None
            version.pinned = version.name in self.pinned

"""The device tier: which adapters are in each base's page pool, and where.

An engine's adapted layers each hold one flat pool cut into pages (`runtime.slots.SlotLayer`); a
page is one rank of every adapted layer, and an adapter of folded rank R takes R consecutive
pages (fewer where its slot holds its own factors). A *slot* is a resident adapter's id
(1, 2, ...; 0 is the base). This tier owns the page allocation (`PagePool`: first fit,
compaction on demand), the slot table (least recently used first out) and eviction; the engine
only copies factors where it is told (`TorchEngine.write_slot`, ``move_slots``, ``free_slot``).

The batcher asks one question: `DeviceTier.place(versions)`: slots for these, which must wait
(no room while other requests hold the pool), and which failed (their adapter could not be
made ready; only their requests fail).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from ..errors import InternalError, Overloaded


class NoRoom(Overloaded):
    """The device pool has too few free pages for an adapter (the caller may evict and retry)."""


class PagePool:
    """Which pages each slot holds: contiguous runs, first fit, compaction on demand."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.runs: dict[int, tuple[int, int]] = {}  # slot -> (first page, pages)

    @property
    def used(self) -> int:
        return sum(n for _, n in self.runs.values())

    @property
    def free(self) -> int:
        return self.pages - self.used

    def find(self, count: int) -> int | None:
        """The first page of the first free run of ``count`` pages, or None."""
        at = 0
        for start, n in sorted(self.runs.values()):
            if start - at >= count:
                return at
            at = start + n
        return at if self.pages - at >= count else None

    def compaction(self) -> list[tuple[int, int, int]]:
        """Moves (slot, from page, to page), in order, that pack every run to the front."""
        moves, at = [], 0
        for slot, (start, n) in sorted(self.runs.items(), key=lambda kv: kv[1][0]):
            if start != at:
                moves.append((slot, start, at))
            at += n
        return moves


class DeviceTier:
    """One base's resident adapters: the pool, the slot table, eviction. ``fold(version)``
    makes a version ready for a slot (the host tier's `HostTier.fold`); ``lock`` is the
    adapter lifecycle's lock (leases and retirement are read under it)."""

    def __init__(self, engine, *, lock: threading.RLock | None = None, fold: Callable | None = None,
                 stats: dict | None = None, observe: Callable[[str, float], None] | None = None) -> None:
        self.engine = engine
        self.pool = PagePool(engine.pages)
        self.lock = lock or threading.RLock()
        self.fold = fold
        self.stats = stats if stats is not None else {"slot_evictions": 0, "slot_hits": 0, "slot_misses": 0}
        self.observe = observe
        self.table: OrderedDict[int, object] = OrderedDict()  # slot -> version, least recently used first
        self._next_slot = 1
        self._free_slots: list[int] = []

    # --- writes (the engine copies; this tier decides where) -------------------------------
    def write(self, slot: int, folded) -> None:
        """Put a prepared adapter into slot ``slot`` (>= 1; one already there is replaced), on as
        many pages as it takes, compacting the pool when its free pages are split. `NoRoom`
        when the pool has fewer free pages than it needs."""
        if slot < 1:
            raise InternalError(f"slot {slot}: slot 0 is the base")
        engine = self.engine
        with engine.lock:
            self._release(slot)
            need = folded.pages
            page = self.pool.find(need)
            if page is None and self.pool.free >= need:
                moves = self.pool.compaction()
                engine.move_slots([(s, to) for s, _, to in moves])
                for s, _, to in moves:
                    self.pool.runs[s] = (to, self.pool.runs[s][1])
                page = self.pool.find(need)
            if page is None:
                raise NoRoom(f"the device pool of {engine.base_model!r} has {self.pool.free} free pages; the adapter "
                             f"needs {need} (device_budget_mb holds {engine.pages} pages in all)")
            self.pool.runs[slot] = (page, need)
            engine.write_slot(slot, page, folded)

    def free(self, slot: int) -> None:
        """Give a slot's pages back."""
        with self.engine.lock:
            self._release(slot)

    def _release(self, slot: int) -> None:
        if self.pool.runs.pop(slot, None) is not None:
            self.engine.free_slot(slot)

    def capacity(self, rank: int | None = None) -> int:
        """How many adapters of ``rank`` pages (default: the mean of those resident now, else
        the engine's ``max_rank``) the pool holds."""
        runs = list(self.pool.runs.values())
        rank = rank or (max(1, round(sum(n for _, n in runs) / len(runs))) if runs else self.engine.max_rank)
        return self.engine.pages // max(1, rank)

    # --- placement (the batcher's worker, between forwards) --------------------------------
    def place(self, versions: list) -> tuple[dict[int, int], list, dict[int, BaseException]]:
        """Slots for a batch's versions: (id(version) -> slot, versions deferred, id(version) ->
        error). A version that needs pages evicts least recently used adapters that no queued
        or running request holds; one that still finds no room is deferred (its requests wait
        for a later batch). One whose factors cannot be made ready (its files changed under
        the root) fails alone. Folds run outside the lock."""
        needed = {id(v): v for v in versions}
        out: dict[int, int] = {}
        failed: dict[int, BaseException] = {}
        misses = []
        with self.lock:
            for v in needed.values():
                if v.slot is not None:
                    self.table.move_to_end(v.slot)
                    out[id(v)] = v.slot
                    self.stats["slot_hits"] += 1
                else:
                    misses.append(v)
                    self.stats["slot_misses"] += 1
        deferred = []
        for v in misses:
            with self.lock:
                if not self._make_room(v.pages, needed):
                    deferred.append(v)
                    continue
                folded, v.fresh = v.fresh, None
            t0 = time.perf_counter()
            if folded is None:
                try:
                    folded = self.fold(v)
                except Exception as e:  # this adapter's requests fail; the batch's others run
                    failed[id(v)] = e
                    continue
            with self.lock:  # the room made above is still free: only this base's worker writes the pool
                slot = self._free_slots.pop() if self._free_slots else self._take_slot_id()
                self.write(slot, folded)
                v.slot = slot
                self.table[slot] = v
                out[id(v)] = slot
            if self.observe is not None:
                self.observe("device", time.perf_counter() - t0)
        return out, deferred, failed

    def _take_slot_id(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _make_room(self, pages: int, needed: dict[int, object]) -> bool:
        """Evict (under the lock) until ``pages`` are free: retired versions first, then the
        least recently used ones no request holds. False when that is not enough."""
        if self.pool.free >= pages:
            return True
        order = [s for s, v in self.table.items() if v.retired and v.leases == 0]
        order += [s for s, v in self.table.items() if not v.retired and v.leases == 0 and id(v) not in needed]
        for slot in order:
            self.evict(slot)
            if self.pool.free >= pages:
                return True
        return False

    def evict(self, slot: int) -> None:
        """Take a version out of the pool (under the lock; it has no requests)."""
        v = self.table.pop(slot)
        self.free(slot)
        v.slot = None
        self._free_slots.append(slot)
        if not v.retired:
            self.stats["slot_evictions"] += 1

    def resident(self) -> tuple[int, int]:
        """(adapters, bytes of the pages they take) in the pool, retired ones left out."""
        with self.lock:
            live = [v for v in self.table.values() if not v.retired]
            return len(live), sum(v.pages for v in live) * self.engine.page_bytes

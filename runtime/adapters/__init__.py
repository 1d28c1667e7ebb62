"""The adapter lifecycle: disk (the root's index and reader) -> host (versions, leases, LRU) ->
device (page pool, slots), the one `prepare` step, and the `Repository` over them."""

from .device import DeviceTier, NoRoom, PagePool
from .host import Version
from .prepare import Folded, check_folded, folded_bounds, prepare
from .repository import Repository

__all__ = ["DeviceTier", "Folded", "NoRoom", "PagePool", "Repository", "Version", "check_folded", "folded_bounds",
           "prepare"]

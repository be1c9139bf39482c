"""Live-storage accounting of one traced step: every tensor storage that exists, real or fake,
counted once (views share it), freed when the storage dies or FSDP2 resizes it to nothing.

Written here rather than taken from torch's `MemTracker` because that tracker installs a
gradient hook on every parameter of each module it sees run (an error on frozen parameters:
DPO's reference, a LoRA base) and refuses a root module that runs twice in a step (gradient
accumulation, the reference). What it does well is reused: the storages of a wrapper tensor
(DTensor) come from its `get_untyped_storages`.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StorageTracker(TorchDispatchMode):
    """Bytes alive now (`current`) and at most (`peak`), with the peak of each named phase
    (`phase(name)`). Tensors made before the tracker starts count once `track`ed."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes: dict[int, int] = {}  # id of a live storage -> bytes counted for it
        self._refs: dict[int, weakref.ref] = {}  # id -> a weak reference that frees it
        self.current = 0
        self.peak = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase: str | None = None
        self._resize = None

    def track(self, tensors: Iterable[object]) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                for storage in get_untyped_storages(tensor):
                    self._count(storage)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.phase_peaks.clear()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, self._phase = self._phase, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)
        try:
            yield
        finally:
            self._phase = outer

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        old = self._bytes.get(key)
        if old is None:  # a storage's Python object lives exactly as long as its memory
            self._refs[key] = weakref.ref(storage, functools.partial(self._free,
                                                                     weakref.ref(self), key))
        if old != size:
            self._bytes[key] = size
            self._add(size - (old or 0))

    @staticmethod
    def _free(tracker_ref: weakref.ref, key: int, _dead: weakref.ref) -> None:
        tracker = tracker_ref()
        if tracker is not None:
            tracker._refs.pop(key, None)
            tracker._add(-tracker._bytes.pop(key, 0))

    def _add(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)
        if self._phase is not None:
            self.phase_peaks[self._phase] = max(self.phase_peaks[self._phase], self.current)

    def __enter__(self):
        # FSDP2 frees and refills its all-gathered weights with `UntypedStorage.resize_`,
        # which no dispatch mode sees: counted through a wrapper while the tracker runs.
        original = torch.UntypedStorage.resize_

        @functools.wraps(original)
        def resize_(storage, size):
            result = original(storage, size)
            if id(storage) in self._bytes:
                self._count(storage)
            return result

        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(tree_flatten(out)[0])
        return out

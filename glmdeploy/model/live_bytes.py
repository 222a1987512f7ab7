"""Counts the bytes of the tensor storages that torch code creates, op by op, and when they die.

`LiveBytes` is a `TorchDispatchMode`: every aten op that runs inside it is numbered, each storage
that an op's outputs do not share with its inputs is a new allocation of `nbytes` born at that op,
and a weakref finalizer on the storage records the op count when the storage is freed. The live
bytes after op j are then the sizes of the storages born at or before j and not yet dead. It works
the same on real tensors and on fake/meta tensors (where nothing is allocated), which is what lets
the planner measure a real-width forward for free; it sees the tensors ops return, not the scratch
buffers a kernel allocates and frees inside itself (see `benchmarks/workspace.py` for how far that
matters). Tensors that exist before the mode is entered (weights, inputs) are never counted.

This module imports torch at import time: import it lazily (as `glmdeploy.model.workspace` does).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class Life:
    """One storage's lifetime: alive after op `birth` up to, not including, op `death`."""

    nbytes: int
    birth: int
    death: int | None = None  # None: still alive


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped upstream
    """Records storage lifetimes by op index (see the module docstring).

    Attributes:
        ops: the aten ops in dispatch order (names), one per event.
        lives: every counted storage, in order of birth.
        marks: named op counts (`mark`), e.g. where a module's forward starts and ends.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: list[str] = []
        self.lives: list[Life] = []
        self.marks: dict[str, int] = {}
        self._life_of: Any = WeakIdKeyDictionary()  # storage -> index in lives (untyped upstream)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        step = len(self.ops)
        self.ops.append(str(func))
        inputs = {id(s) for s in _storages(tree_leaves((args, kwargs)))}
        for storage in _storages(tree_leaves(out)):
            index = self._life_of.get(storage)
            if index is not None:
                self._maybe_resized(storage, index, step)
            elif id(storage) not in inputs and storage.nbytes() > 0:
                self._born(storage, step)
        return out

    def mark(self, name: str) -> None:
        """Remember the current op count under `name` (events before it are < the count)."""
        self.marks[name] = len(self.ops)

    def index_of(self, tensor: torch.Tensor) -> int | None:
        """The `lives` index of the storage behind `tensor`, None if it was not born here."""
        index = self._life_of.get(tensor.untyped_storage())
        return None if index is None else int(index)

    def timeline(self, exclude: Iterable[int] = ()) -> list[int]:
        """Live bytes after each op (one entry per `ops`), leaving out the `exclude` lives."""
        skip = set(exclude)
        delta = [0] * (len(self.ops) + 1)
        for index, life in enumerate(self.lives):
            if index in skip:
                continue
            delta[life.birth] += life.nbytes
            if life.death is not None:
                delta[life.death] -= life.nbytes
        live, running = [], 0
        for change in delta[:-1]:
            running += change
            live.append(running)
        return live

    def peak(self, exclude: Iterable[int] = ()) -> int:
        """The largest live byte count after any op (0 if no op ran)."""
        return max(self.timeline(exclude), default=0)

    def _born(self, storage: torch.UntypedStorage, step: int) -> None:
        index = len(self.lives)
        self.lives.append(Life(nbytes=int(storage.nbytes()), birth=step))
        self._life_of[storage] = index
        weakref.finalize(storage, self._died, index)

    def _died(self, index: int) -> None:
        if self.lives[index].death is None:
            self.lives[index].death = len(self.ops)

    def _maybe_resized(self, storage: torch.UntypedStorage, index: int, step: int) -> None:
        """An op resized a storage we count (`resize_`, `out=`): end its life, start a new one."""
        life = self.lives[index]
        if life.death is None and storage.nbytes() != life.nbytes:
            life.death = step
            self.lives.append(Life(nbytes=int(storage.nbytes()), birth=step))
            self._life_of[storage] = len(self.lives) - 1
            weakref.finalize(storage, self._died, len(self.lives) - 1)


def _storages(leaves: Iterable[Any]) -> Iterator[torch.UntypedStorage]:
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
            yield leaf.untyped_storage()

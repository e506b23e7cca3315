"""``offload_activations``: what autograd saves for the backward pass lives in tierd, not in the process.

Contract. Inside ``with offload_activations(client) as off:`` every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``) whose size is at least ``min_bytes`` is put to tierd as
one entry ``act/<uuid>/<n>`` (``scope="client"``, not durable: the daemon deletes it when this client
disconnects, kill -9 included) and the process drops its copy; in backward it is read back (one get,
a copy into process memory, the lease released at once). Kept in the process instead, and never sent:
tensors below ``min_bytes``, parameters and views of parameters (the model holds them anyway), tensors
saved while a backward pass runs (the recompute of reentrant checkpointing: they are consumed at
once), layouts with overlapping memory (``expand``), dtypes tierd does not store, and any tensor the
daemon has no room for (``TierFull``: counted in ``put_failures``, the step goes on). A tensor saved by
several ops is put once while it is alive (all of them share the entry).

Lossless by default: the entry holds the tensor's bytes; the unpacked tensor has the same dtype,
shape, strides (for non-overlapping dense layouts) and device, so gradients are bit-identical with and
without offload. ``codec="bf16"`` (opt-in) stores float32 activations as bfloat16 entries (half the
bytes in every tier and in each copy), rounded to nearest, ties to even, in the process before the
put, and upcast (exactly) in unpack: each value x comes back as x' with ``|x - x'| <= 2**-8 * |x| +
2**-134`` (8 significant bits; the same bound as tierd's own bf16 codec, ``tierd/codecs/downcast.py``,
which applies only to the disk tier); a finite value beyond bf16's largest (within half a bf16 step of
float32's maximum) becomes inf. Other dtypes are stored as they are. Any other ``codec`` is passed to
``put`` as tierd's codec for the entry (say ``"zstd"``, lossless, for the disk tier).

Order. Backward unpacks roughly in the reverse of the order forward packed. At each unpack the next
``prefetch_depth`` live entries in that reverse order are hinted (``Client.prefetch``), so the daemon
brings entries demoted to disk back to RAM before they are needed. An entry is deleted as soon as
autograd drops what it saved (after the node that used it ran, or when the graph is freed): the
deletion is sent at the next unpack and at the end of the backward pass. ``__exit__`` deletes every
entry still present (a forward that raised, a graph never run backward); an unpack after that raises
``RuntimeError``: run backward inside the ``with`` block.

Gradient checkpointing. ``torch.utils.checkpoint`` (reentrant or not) and transformers'
``gradient_checkpointing_enable()`` save only each checkpointed block's inputs through these hooks: those
are offloaded; what the recompute saves during backward stays in the process for the few
microseconds until it is used.

Entering also has glibc give freed buffers of 1 MiB and more back to the OS
(``tierd.pages.limit_heap_retention``, process-wide): otherwise the activations the process no longer
holds stay in a heap that never shrinks, and a memory cgroup still counts them.

Cost per offloaded tensor: a put (two round trips and a memcpy) in forward, a get (one round trip and
a memcpy) and a delete in backward; ``min_bytes`` (default 256 KiB) keeps that small next to the copy.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from tierd.pages import limit_heap_retention
from tierd.protocol import DTYPE_SIZES
from tierd_client import Client, NotFound, TierFull

#: tensors smaller than this stay in the process (a put costs about two round trips, ~0.1-0.2 ms)
DEFAULT_MIN_BYTES = 256 << 10
#: live entries hinted ahead of each unpack, in backward order
DEFAULT_PREFETCH_DEPTH = 4
#: the codec applied in the process (float32 -> bfloat16 before the put); other names go to tierd
BF16 = "bf16"


@dataclass
class OffloadStats:
    """What one ``offload_activations`` context did (counters since it was entered)."""

    offloaded: int = 0
    offloaded_bytes: int = 0  # the saved tensors' own size
    stored_bytes: int = 0  # what the entries hold (half of the float32 part with codec="bf16")
    shared: int = 0  # saves that reused a live entry (the same tensor saved by several ops)
    kept_small: int = 0
    kept_other: int = 0  # parameters, backward-time saves, overlapping layouts, unsupported dtypes
    put_failures: int = 0  # TierFull: kept in the process
    fetched: int = 0
    fetched_bytes: int = 0
    hinted: int = 0
    deleted: int = 0


class _Saved:
    """What autograd holds instead of an offloaded tensor. When autograd drops the last one of an
    entry, the entry is queued for deletion (the delete itself is sent later, never from here)."""

    __slots__ = ("__weakref__", "dense", "device", "dtype", "idx", "key", "owner", "perm", "shape", "stride")

    def __init__(
        self, owner: ActivationOffload, key: str, idx: int, t: torch.Tensor, perm: list[int] | None
    ) -> None:
        self.owner = owner
        self.key = key
        self.idx = idx
        self.shape = tuple(t.shape)
        self.stride = t.stride()
        self.dtype = t.dtype
        self.device = t.device
        self.perm = perm  # the stored tensor is t.permute(perm) (contiguous); None: t.contiguous()
        self.dense = perm is not None

    def __del__(self) -> None:
        self.owner.consumed(self.key, self.idx)


def _dense_permutation(t: torch.Tensor) -> list[int] | None:
    """A permutation p with ``t.permute(p)`` contiguous (so the strides can be rebuilt), or None."""
    if t.is_contiguous():
        return list(range(t.dim()))
    strides, sizes = list(t.stride()), list(t.shape)
    perm = sorted(range(t.dim()), key=lambda d: (-strides[d], -sizes[d]))
    return perm if t.permute(perm).is_contiguous() else None


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


def _in_backward() -> bool:
    """Whether a backward pass is running on this thread (torch exposes it only as a private call)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class ActivationOffload:
    """The context manager ``offload_activations`` returns; see the module docstring for the contract."""

    def __init__(
        self,
        client: Client,
        *,
        min_bytes: int = DEFAULT_MIN_BYTES,
        codec: str | None = None,
        prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
    ) -> None:
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, not {min_bytes}")
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, not {prefetch_depth}")
        if codec is not None and not isinstance(codec, str):
            raise TypeError(f"codec is a codec name (say 'bf16') or None, not {type(codec).__name__}")
        self.client = client
        self.min_bytes = min_bytes
        self.codec = codec
        self.prefetch_depth = prefetch_depth
        self.prefix = f"act/{uuid.uuid4().hex}"
        self.stats = OffloadStats()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._n = 0
        self._order: list[int] = []  # idx of entries in pack order (sorted)
        self._live: dict[int, str] = {}  # idx -> key, entries present in the daemon
        self._hinted: set[int] = set()
        # id(tensor) -> (the tensor, its version, its _Saved, idx): a tensor saved again shares the entry
        self._alive: dict[int, tuple[weakref.ref[torch.Tensor], int, weakref.ref[_Saved], int]] = {}
        self._tid: dict[int, int] = {}  # idx -> id(tensor), to drop the _alive row with the entry
        self._dead: collections.deque[tuple[str, int]] = collections.deque()
        self._callback_queued = False
        self._closed = False

    # -- the context ---------------------------------------------------------------------------
    def __enter__(self) -> ActivationOffload:
        if self._hooks is not None or self._closed:
            raise RuntimeError("an offload_activations context is entered once")
        limit_heap_retention()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._closed = True
        if self.client.closed:  # its entries went with its connection (scope="client")
            self._live.clear()
            self._dead.clear()
            return
        self.flush()
        for idx, key in list(self._live.items()):
            self._delete(idx, key)

    @property
    def live_entries(self) -> int:
        """Entries of this context present in the daemon now."""
        return len(self._live)

    # -- pack (forward) ------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes:
            self.stats.kept_small += 1
            return t
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPE_SIZES or t.layout != torch.strided or _is_parameter(t) or _in_backward():
            self.stats.kept_other += 1
            return t
        self.flush()
        same = self._alive.get(id(t))
        if same is not None:
            ref, version, saved_ref, _ = same
            saved = saved_ref()
            if ref() is t and version == t._version and saved is not None:
                self.stats.shared += 1
                return saved
        perm = _dense_permutation(t)
        if perm is None and any(s == 0 for s, n in zip(t.stride(), t.shape, strict=True) if n > 1):
            self.stats.kept_other += 1  # expanded: its storage is smaller than the tensor
            return t
        stored = (t.permute(perm) if perm is not None else t.contiguous()).detach()
        codec = self.codec
        if codec == BF16:
            codec = None
            if t.dtype == torch.float32:
                stored = stored.to(torch.bfloat16)
        idx = self._n
        self._n += 1
        key = f"{self.prefix}/{idx}"
        try:
            self.client.put(key, stored, scope="client", durable=False, codec=codec, tags=["activation"])
        except TierFull:
            self.stats.put_failures += 1
            return t
        saved = _Saved(self, key, idx, t, perm)
        self._order.append(idx)
        self._live[idx] = key
        self._alive[id(t)] = (weakref.ref(t), t._version, weakref.ref(saved), idx)
        self._tid[idx] = id(t)
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += nbytes
        self.stats.stored_bytes += stored.numel() * stored.element_size()
        return saved

    # -- unpack (backward) ---------------------------------------------------------------------
    def _unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        assert isinstance(saved, _Saved)
        if self._closed or saved.idx not in self._live:
            raise RuntimeError(
                f"the saved activation {saved.key} was deleted when its offload_activations context "
                "exited: run backward inside the with block"
            )
        self._at_backward()
        self._hint_before(saved.idx)
        view = self.client.get(saved.key)
        try:
            if saved.perm is not None:
                out = view.to(saved.device, saved.dtype, copy=True).permute(_inverse(saved.perm))
            else:
                out = view.to(saved.device, saved.dtype, copy=True).view(saved.shape)
        finally:
            self.client.release(view)
        self.stats.fetched += 1
        self.stats.fetched_bytes += view.numel() * view.element_size()
        return out

    def _at_backward(self) -> None:
        """Send the deletions due, and have them sent again when this backward pass ends."""
        self.flush()
        if self._callback_queued:
            return
        with contextlib.suppress(RuntimeError):  # an unpack outside backward (say, a saved-tensor attribute)
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._callback_queued = True

    def _backward_done(self) -> None:
        self._callback_queued = False
        self.flush()

    def _hint_before(self, idx: int) -> None:
        """Hint the ``prefetch_depth`` live entries packed just before ``idx`` (backward's next ones)."""
        if not self.prefetch_depth:
            return
        pos = bisect.bisect_left(self._order, idx)
        keys: list[str] = []
        seen = 0
        i = pos - 1
        while i >= 0 and seen < self.prefetch_depth:
            j = self._order[i]
            key = self._live.get(j)
            if key is not None:
                seen += 1
                if j not in self._hinted:
                    self._hinted.add(j)
                    keys.append(key)
            i -= 1
        if keys:
            self.client.prefetch(keys)
            self.stats.hinted += len(keys)

    # -- deletion --------------------------------------------------------------------------------
    def consumed(self, key: str, idx: int) -> None:
        """Autograd dropped the last reference to entry ``idx``: queue its deletion (thread-safe; sends
        nothing, since this runs from a destructor that may fire inside a client call)."""
        self._dead.append((key, idx))

    def flush(self) -> None:
        """Delete the entries autograd has dropped since the last flush."""
        while self._dead:
            key, idx = self._dead.popleft()
            if idx in self._live:
                self._delete(idx, key)

    def _delete(self, idx: int, key: str) -> None:
        del self._live[idx]
        self._hinted.discard(idx)
        tid = self._tid.pop(idx, -1)
        row = self._alive.get(tid)
        if row is not None and row[3] == idx:
            del self._alive[tid]
        pos = bisect.bisect_left(self._order, idx)
        if pos < len(self._order) and self._order[pos] == idx:
            del self._order[pos]
        with contextlib.suppress(NotFound):
            self.client.delete(key)
        self.stats.deleted += 1


def offload_activations(
    client: Client,
    *,
    min_bytes: int = DEFAULT_MIN_BYTES,
    codec: str | None = None,
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
) -> ActivationOffload:
    """A context manager that keeps the tensors autograd saves for backward in tierd.

    ``with offload_activations(client) as off: loss = model(**batch).loss; loss.backward()``.
    Tensors of at least ``min_bytes`` go to tierd (lossless unless ``codec="bf16"``: float32 kept as
    bfloat16, within the error bound the module docstring states); ``off.stats`` says what went
    where. Run backward inside the block: leaving it deletes whatever is still stored.
    """
    return ActivationOffload(client, min_bytes=min_bytes, codec=codec, prefetch_depth=prefetch_depth)

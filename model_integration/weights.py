"""Weights in tierd: ingest a safetensors checkpoint, build a model bound to it, detach it again.

Every tensor of a checkpoint is one durable entry ``NAMESPACE/<param name>`` tagged ``weight`` and
``xxh3:<hex>`` (the xxh3-64 of its bytes), so a second ingest, or a second process, skips what is
there already and every process maps the same arena bytes.

Several machines: ``ingest(..., share=True)`` also writes every tensor to the daemon's remote tier,
plus the checkpoint's description under ``NAMESPACE/.checkpoint/`` (``config.json``,
``generation_config.json`` when there is one, and ``tensors.json``: the checkpoint's name and, per
tensor, its dtype, shape and bytes; each a uint8 entry). Another machine's daemon on the same
remote tier then serves ``from_pretrained(None, client, namespace=NAMESPACE)``, which builds the
model from those entries alone, with no access to the checkpoint files.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tierd.pages import limit_heap_retention
from tierd_client import NotFound
from tierd_client._core import DTYPE_SIZES, dtype_name
from tierd_integration.hooks import (
    Binding,
    StreamBlockHook,
    add_hook,
    empty_parameters,
    get_tensor,
    remove_hook,
    set_tensor,
)
from tierd_integration.layout import check_room, layout_sizes, streaming_layout
from tierd_integration.pacing import MAX_DEPTH, Pacer, chain
from tierd_integration.shards import TensorInfo, shards

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHECKSUM_TAG = "xxh3:"
#: glibc's mmap threshold once a streaming model is bound (glibc's ceiling for its dynamic one)
RUN_MMAP_THRESHOLD = 32 << 20
SOURCE_TAG = "src:"
#: where a shared checkpoint's description lives, under its namespace
MANIFEST = ".checkpoint"
_MANIFEST_FILES = ("config.json", "generation_config.json")


def checksum(t: torch.Tensor) -> str:
    """xxh3-64 hex of a tensor's bytes (C order)."""
    import xxhash

    flat = t.detach().contiguous().reshape(-1)
    return xxhash.xxh3_64_hexdigest(flat.view(torch.uint8).numpy().data)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * DTYPE_SIZES[dtype_name(t)]


def _has_disk(client: Any) -> bool:
    return any(t["name"] == "disk" for t in client.stats()["tiers"])


def _same(entry: dict[str, Any] | None, t: torch.Tensor, digest: str) -> bool:
    return (
        entry is not None
        and entry["dtype"] == dtype_name(t)
        and list(entry["shape"]) == list(t.shape)
        and entry["nbytes"] == _nbytes(t)
        and CHECKSUM_TAG + digest in entry["tags"]
    )


def _unchanged(entry: dict[str, Any] | None, info: TensorInfo, stamp: str) -> bool:
    """Quick check, no bytes read: the entry was ingested from this very file (name, size, mtime)."""
    return (
        entry is not None
        and entry["dtype"] == str(info.dtype).removeprefix("torch.")
        and list(entry["shape"]) == list(info.shape)
        and entry["nbytes"] == info.nbytes
        and SOURCE_TAG + stamp in entry["tags"]
    )


class _Progress:
    def __init__(self, what: str, enabled: bool) -> None:
        self.what, self.enabled = what, enabled
        self.t0 = self.last = time.perf_counter()
        self.tensors = self.bytes = 0

    def add(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            self._print("")

    def _print(self, end: str) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        print(
            f"{self.what}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB, "
            f"{self.bytes / 1e9 / dt:.2f} GB/s{end}",
            file=sys.stderr,
            flush=True,
        )

    def done(self, end: str) -> float:
        if self.enabled:
            self._print(end)
        return time.perf_counter() - self.t0


class _Putter:
    """Puts tensors under a namespace, skipping entries already there with the same bytes."""

    def __init__(
        self, client: Any, namespace: str, codec: str | None, durable: bool | None, share: bool = False
    ) -> None:
        self.client = client
        self.namespace = namespace.rstrip("/")
        self.codec = codec
        self.share = share
        self.durable = _has_disk(client) if durable is None else durable
        self.existing = {e["key"]: e for e in client.ls(self.namespace + "/")}
        self.counts = {"put": 0, "skipped": 0, "bytes": 0, "tensors": 0}

    def key(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def skip(self) -> None:
        self.counts["tensors"] += 1
        self.counts["skipped"] += 1

    def __call__(self, name: str, t: torch.Tensor, tags: tuple[str, ...] = ()) -> None:
        key = self.key(name)
        digest = checksum(t)
        if _same(self.existing.get(key), t, digest):
            self.skip()
            return
        self.counts["tensors"] += 1
        self.client.put(
            key, t, tags=["weight", CHECKSUM_TAG + digest, *tags], durable=self.durable, codec=self.codec,
            share=self.share,
        )  # fmt: skip
        self.counts["put"] += 1
        self.counts["bytes"] += _nbytes(t)


def checkpoint_names(checkpoint_dir: str | Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) for every tensor in the checkpoint's shards, read from the headers."""
    return {
        name: (info.dtype_code, list(info.shape))
        for shard in shards(checkpoint_dir)
        for name, info in shard.tensors.items()
    }


def ingest(
    client: Any,
    checkpoint_dir: str | Path,
    namespace: str,
    *,
    codec: str | None = None,
    progress: bool = True,
    durable: bool | None = None,
    verify: bool = False,
    share: bool = False,
) -> dict[str, Any]:
    """Put every tensor of a safetensors checkpoint into tierd as ``namespace/<name>``, one at a time.

    Entries already there are skipped: without reading a byte when they were ingested from the same
    shard file (name, size and mtime, kept in a ``src:`` tag: the quick check make and rsync use),
    else when their dtype, shape, size and xxh3-64 match the tensor read from the file. ``verify``
    skips the quick check (every tensor read and compared). ``durable=None`` means durable when the
    daemon has a disk tier (a durable put is refused without one). Returns ``{"put", "skipped",
    "bytes" (put), "tensors", "seconds"}``; progress goes to stderr. Tensors are read with ``preadv``
    and their page cache dropped after (see shards.py): ingest never leaves the model in the cache.
    ``share=True`` writes every tensor put to the remote tier too, and the checkpoint's description
    (see the module docstring); the daemon must run with ``--remote``.
    """
    putter = _Putter(client, namespace, codec, durable, share)
    prog = _Progress(f"ingest {namespace}", progress)
    for shard in shards(checkpoint_dir):
        for name, info in shard.tensors.items():
            if not verify and _unchanged(putter.existing.get(putter.key(name)), info, shard.stamp):
                putter.skip()
                prog.add(0)
                continue
            t = shard.read(name)
            putter(name, t, (SOURCE_TAG + shard.stamp,))
            prog.add(info.nbytes)
            del t
    if share:
        _put_manifest(putter, Path(checkpoint_dir))
    c = putter.counts
    seconds = prog.done(f" (put {c['put']}, skipped {c['skipped']})")
    return {**c, "seconds": seconds}


def _put_manifest(putter: _Putter, ckpt: Path) -> None:
    """The checkpoint's config files and tensor index as uint8 entries under NAMESPACE/.checkpoint/."""
    index = {
        n: [info.dtype_code, list(info.shape), info.nbytes]
        for s in shards(ckpt)
        for n, info in s.tensors.items()
    }
    files = {name: (ckpt / name).read_bytes() for name in _MANIFEST_FILES if (ckpt / name).exists()}
    # the checkpoint's name as this machine's models see it (config._name_or_path): another machine's
    # model gets it too, so that what is keyed by it (the vision cache's default model_id) matches
    files["tensors.json"] = json.dumps({"name_or_path": str(ckpt), "tensors": index}).encode()
    for name, data in files.items():
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        putter.client.put(f"{putter.namespace}/{MANIFEST}/{name}", t, tags=["checkpoint"],
                          durable=putter.durable, share=True)  # fmt: skip


def _read_manifest(client: Any, ns: str, into: Path) -> tuple[str, dict[str, tuple[str, list[int], int]]]:
    """Write a shared checkpoint's config files into ``into``; returns its name and tensor index."""

    def read(name: str) -> bytes:
        t = client.get(f"{ns}/{MANIFEST}/{name}")
        try:
            return bytes(t.numpy().tobytes())
        finally:
            client.release(t)

    for name in _MANIFEST_FILES:
        try:
            (into / name).write_bytes(read(name))
        except NotFound:
            if name == "config.json":
                raise NotFound(
                    f"no checkpoint {ns!r} in tierd (nor in its remote tier): ingest it with share=True "
                    "on a machine that has its files", key=f"{ns}/{MANIFEST}/{name}",
                ) from None  # fmt: skip
    desc = json.loads(read("tensors.json"))
    return str(desc["name_or_path"]), {n: (d, list(s), int(b)) for n, (d, s, b) in desc["tensors"].items()}


# -- binding ----------------------------------------------------------------------------------------
def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Point every tied name at its source tensor again (the same Parameter object)."""
    for n, src in tied.items():
        module_path, _, attr = n.rpartition(".")
        owner = model.get_submodule(module_path) if module_path else model
        t = get_tensor(model, src)
        if attr in owner._parameters:
            owner._parameters[attr] = t
        else:
            owner._buffers[attr] = t


def _tier_of(device: str) -> str | None:
    """The tier a model's weights are served from for ``device``: "cpu" RAM (None), "cuda" the GPU."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
    return "gpu" if device == "cuda" else None


def _room(client: Any, ram_budget: int | None, tier: str | None = None) -> int:
    """Bytes of weights this model may keep in its tier (RAM, or the GPU tier for device="cuda"):
    the tier's capacity, or ``ram_budget`` when smaller."""
    name = tier or "ram"
    found = next((t for t in client.stats()["tiers"] if t["name"] == name), None)
    if found is None:
        from tierd.errors import Unsupported

        raise Unsupported(f"device='cuda' needs a tierd with a GPU tier (--gpu-bytes); it has no {name}")
    room = int(found["capacity_bytes"])
    return room if ram_budget is None else min(room, int(ram_budget))


def _choose_mode(client: Any, total: int, ram_budget: int | None, tier: str | None = None) -> str:
    return "resident" if total <= _room(client, ram_budget, tier) else "streaming"


def bind(
    model: nn.Module,
    client: Any,
    namespace: str,
    names: list[str],
    *,
    mode: str,
    prefetch_depth: int = 2,
    room: int | None = None,
    nbytes: dict[str, int] | None = None,
    tier: str | None = None,
) -> nn.Module:
    """Bind the tensors ``names`` of ``model`` to ``namespace/<name>`` in tierd.

    ``tier``: None serves the views from RAM; "gpu" from the GPU tier (CUDA tensors; promoted from
    RAM by the daemon as they are asked for), buffers that are not bound moved to their device.

    ``resident``: one get_many, every tensor a view for the model's lifetime. ``streaming``: tensors
    outside the blocks (embeddings, norms, lm_head, the vision patch embedding) resident, each block
    (see _blocks: vision blocks and mergers, decoder layers) bound per forward by a StreamBlockHook;
    when ``room`` cannot hold the embedding and the output head beside the window, they stream as
    blocks too (a tied head reads the embedding's entry). Parameters that share a tensor with a bound
    one (tied lm_head) share it again.

    ``room`` (streaming): bytes of RAM this model may hold; what the resident tensors and the window
    leave of it keeps the first decoder layers resident (see :func:`streaming_layout`). A room below
    the layout's minimum raises :class:`RamTierTooSmall` before anything is leased.
    """
    if mode not in ("resident", "streaming"):
        raise ValueError(f"mode must be 'resident' or 'streaming', not {mode!r}")
    if hasattr(model, "_tierd_binding"):
        raise RuntimeError("model is bound to tierd already: detach(model) first")
    ns = namespace.rstrip("/")
    name_set = set(names)
    # Tied tensors: every name under which a bound tensor object appears.
    by_id: dict[int, list[str]] = {}
    requires_grad: dict[str, bool] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
        requires_grad[n] = p.requires_grad
    for n, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(n)
    tied: dict[str, str] = {}
    for group in by_id.values():
        src = next((n for n in group if n in name_set), None)
        if src is not None:
            tied.update({n: src for n in group if n != src})
    binding = Binding(client, ns, mode, list(names), tied, requires_grad, tier=tier)

    block_names: set[str] = set()
    if mode == "streaming":
        # the process stays small: freed buffers go back to the kernel. Only a heap that has not
        # grown yet stays small: glibc serves a request from a free chunk of the heap before it
        # thinks of mmap, so chunks freed earlier (building a model on the meta device allocates and
        # frees each parameter: a 2.9 GB heap for Qwen3-VL-2B) are reused by every forward's
        # temporaries and stay resident (~300 MiB of RssAnon for the 2B while it decoded).
        # from_pretrained calls it before it builds the model; for offload_model's model it is late.
        limit_heap_retention()
        # sizes as stored (``nbytes``: the checkpoint's); a model built on the meta device may
        # carry another dtype than its weights until they are bound
        size_of = dict(nbytes or {})
        for n in names:
            if n not in size_of:
                size_of[n] = _nbytes(get_tensor(model, n))
        layout = streaming_layout(model, names, size_of, room=room, prefetch_depth=prefetch_depth)
        if room is not None:
            check_room(layout, room, prefetch_depth, f"this model ({ns})")
        binding.kept_blocks = layout.kept
        binding.edges = layout.edges
        order = layout.blocks
        for _, _, _, src in order:
            block_names.update(src)
        taken = layout_sizes(layout, size_of)
        # the room the layout left after the resident tensors, the kept layers and the window
        spare = 0 if room is None else max(room - layout.minimum_bytes - layout.kept_bytes, 0)
        pacer = Pacer(taken, list(layout.after), prefetch_depth, layout.window_bytes + spare, client=client)
        binding.pacer = pacer
        for i, (_, module, rel, src) in enumerate(order):
            ahead: list[list[str]] = []
            # the blocks after it, in the order decoding reads them (it loops over the text layers)
            for j in chain(layout.after, i, MAX_DEPTH)[1:]:
                ahead.append([f"{ns}/{s}" for s in order[j][3]])
            hook = StreamBlockHook(client, rel, [f"{ns}/{s}" for s in src], ahead, tier, pacer, i)
            add_hook(module, hook)
            binding.blocks.append((module, list(src)))

    # Largest first, on its own: while a get runs, every entry it names that is already in RAM is held
    # in place, so small tensors fetched together with the embedding could split the free space
    # around it. Alone, it may take any room the daemon can clear.
    stored = nbytes or {}
    resident = sorted(
        (n for n in names if n not in block_names),
        key=lambda n: -(stored.get(n) or _nbytes(get_tensor(model, n))),
    )
    where = {"tier": tier} if tier else {}
    views = client.get_many([f"{ns}/{n}" for n in resident[:1]], **where) if resident else []
    views += client.get_many([f"{ns}/{n}" for n in resident[1:]], **where) if len(resident) > 1 else []
    for n, v in zip(resident, views, strict=True):
        set_tensor(model, n, v)
    dev = views[0].device if views else torch.device("cpu")
    if dev.type != "cpu":  # the buffers no tensor of the checkpoint binds (rotary tables) follow
        bound = set(resident) | block_names | set(tied)
        for n, b in list(model.named_buffers()):
            if n not in bound and not b.is_meta and b.device != dev:
                set_tensor(model, n, b.to(dev))
    binding.resident_views = views
    if mode == "streaming":
        # built and bound: from here on the heap holds the forwards' temporaries, which glibc's own
        # threshold ceiling keeps reusing (as in a plain process) instead of mapping and faulting
        # each one in anew (with 1 MiB: 370k more minor faults per 4-token 2B generate)
        limit_heap_retention(RUN_MMAP_THRESHOLD)
    _retie(model, tied)
    model._tierd_binding = binding
    left = [
        n
        for n, p in [*model.named_parameters(), *model.named_buffers()]
        if p.is_meta and n not in block_names and tied.get(n) not in block_names
    ]
    if left:
        detach(model)
        raise ValueError(f"{len(left)} tensors of the model are not in {ns}/, e.g. {left[:5]}")
    return model


def _meta_model(ckpt: Path) -> PreTrainedModel:
    from transformers import AutoConfig, GenerationConfig, Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(ckpt)
    with empty_parameters():
        model = Qwen3VLForConditionalGeneration(config)
    if (ckpt / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(ckpt)
    return model.eval()


def streaming_minimum(checkpoint_dir: str | Path, *, prefetch_depth: int = 2) -> int:
    """The smallest RAM tier (or ``ram_budget``) in bytes that ``from_pretrained`` streams this checkpoint
    in with this ``prefetch_depth``; read from the shard headers and the config, no weight is read."""
    ckpt = Path(checkpoint_dir)
    nbytes = {n: info.nbytes for shard in shards(ckpt) for n, info in shard.tensors.items()}
    # room 0: the layout that needs least (the embedding and the head streamed when that is less)
    layout = streaming_layout(_meta_model(ckpt), list(nbytes), nbytes, room=0, prefetch_depth=prefetch_depth)
    return layout.minimum_bytes


def from_pretrained(
    checkpoint_dir: str | Path | None,
    client: Any,
    *,
    namespace: str | None = None,
    ram_budget: int | None = None,
    prefetch_depth: int = 2,
    mode: str | None = None,
    progress: bool = False,
    device: str = "cpu",
    **ingest_kw: Any,
) -> nn.Module:
    """A Qwen3-VL built on the meta device whose weights are tierd views (ingested first if needed).

    ``namespace`` defaults to the checkpoint folder's name. ``mode`` None chooses: resident when all
    weights fit the RAM tier and ``ram_budget``, else streaming. Streaming in less room than
    :func:`streaming_minimum` raises :class:`RamTierTooSmall` before the checkpoint is read.

    ``checkpoint_dir=None``: no checkpoint files here; the model is built from what
    ``ingest(..., share=True)`` put under ``namespace`` on some machine, found in this daemon or its
    remote tier (NotFound when neither has it), and nothing is ingested.

    ``device="cuda"``: the weights are views of the GPU tier (Unsupported where the daemon has none):
    resident when they fit the GPU tier (and ``ram_budget``), else each block streamed RAM -> GPU
    for its forward by the same hooks and prefetch hints. Processes on one GPU share one copy. With
    the simulated device they are CPU tensors over its slabs (what CI runs).
    """
    tier = _tier_of(device)
    if checkpoint_dir is None:
        if not namespace:
            raise ValueError("from_pretrained(None, ...) needs the namespace the checkpoint was shared under")
        ns = namespace.rstrip("/")
        with tempfile.TemporaryDirectory(prefix="tierd-ckpt-") as tmp:
            name, index = _read_manifest(client, ns, Path(tmp))
            nbytes = {n: b for n, (_d, _s, b) in index.items()}
            room = _room(client, ram_budget, tier)
            mode = mode or _choose_mode(client, sum(nbytes.values()), ram_budget, tier)
            if mode == "streaming":
                limit_heap_retention()  # before the model is built (see bind)
            model = _meta_model(Path(tmp))
            model.config._name_or_path = name  # as on the machine that ingested it
        if mode == "streaming":
            layout = streaming_layout(model, list(nbytes), nbytes, room=room, prefetch_depth=prefetch_depth)
            check_room(
                layout, room, prefetch_depth, f"{ns} ({sum(nbytes.values()) / 2**20:.0f} MiB of weights)"
            )
        bind(
            model,
            client,
            ns,
            list(nbytes),
            mode=mode,
            prefetch_depth=prefetch_depth,
            room=room,
            nbytes=nbytes,
            tier=tier,
        )
        return model
    ckpt = Path(checkpoint_dir)
    ns = (namespace or ckpt.resolve().name).rstrip("/")
    tensors = {n: info for shard in shards(ckpt) for n, info in shard.tensors.items()}
    nbytes = {n: info.nbytes for n, info in tensors.items()}
    total = sum(nbytes.values())
    room = _room(client, ram_budget, tier)
    mode = mode or _choose_mode(client, total, ram_budget, tier)
    if mode == "streaming":
        limit_heap_retention()  # before the model is built (see bind)
    model = _meta_model(ckpt)
    if mode == "streaming":  # refuse a room too small now, before the checkpoint is read
        layout = streaming_layout(model, list(tensors), nbytes, room=room, prefetch_depth=prefetch_depth)
        check_room(layout, room, prefetch_depth, f"{ckpt.name} ({total / 2**20:.0f} MiB of weights)")
    ingest(client, ckpt, ns, progress=progress, **ingest_kw)
    bind(model, client, ns, list(tensors), mode=mode, prefetch_depth=prefetch_depth, room=room, nbytes=nbytes,
         tier=tier)  # fmt: skip
    return model


def offload_model(
    model: nn.Module,
    client: Any,
    namespace: str,
    *,
    durable: bool | None = True,
    ram_budget: int | None = None,
    prefetch_depth: int = 2,
    mode: str | None = None,
    codec: str | None = None,
) -> nn.Module:
    """Put a model's state_dict into tierd (tied tensors once), then bind the model to it (see bind)."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # tied tensors once
            seen.add(id(t))
            tensors[n] = t
    nbytes = {n: _nbytes(t) for n, t in tensors.items()}
    room = _room(client, ram_budget)
    mode = mode or _choose_mode(client, sum(nbytes.values()), ram_budget)
    if mode == "streaming":  # refuse a room too small before anything is put
        layout = streaming_layout(model, list(tensors), nbytes, room=room, prefetch_depth=prefetch_depth)
        check_room(layout, room, prefetch_depth, f"this model ({namespace})")
    putter = _Putter(client, namespace, codec, durable)
    for n, t in tensors.items():
        putter(n, t.detach().cpu())
    return bind(model, client, namespace, list(tensors), mode=mode, prefetch_depth=prefetch_depth,
                room=room, nbytes=nbytes)  # fmt: skip


def detach(model: nn.Module) -> nn.Module:
    """Remove every hook, restore the original forwards, and copy every bound tensor into ordinary
    CPU memory (leases released), so the model works without tierd and gives identical outputs."""
    binding: Binding | None = model.__dict__.pop("_tierd_binding", None)
    if binding is None:
        return model
    for module in model.modules():
        remove_hook(module)
    client = binding.client
    block_names = {n for _, ns in binding.blocks for n in ns}
    rg = binding.requires_grad

    def make_plain(n: str, v: torch.Tensor) -> None:
        module_path, _, attr = n.rpartition(".")
        owner = model.get_submodule(module_path) if module_path else model
        plain = v.detach().to("cpu", copy=True)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(plain, requires_grad=rg.get(n, True))
        else:
            owner._buffers[attr] = plain

    # streamed blocks one at a time, each released before the next: the RAM tier may be far smaller
    # than the model, and only one block's bytes need to be there at once
    for _, names in binding.blocks:
        need = [n for n in binding.names if n in set(names)]
        if not need:
            continue
        fetched = client.get_many([binding.key(n) for n in need])
        for n, v in zip(need, fetched, strict=True):
            make_plain(n, v)
        client.release(fetched)
    for n in binding.names:
        if n not in block_names:
            make_plain(n, get_tensor(model, n))
    _retie(model, binding.tied)
    if not getattr(client, "closed", False):
        held = list(binding.resident_views)
        if held:
            client.release(held)
    binding.resident_views = []
    return model

"""``offload_optimizer_state``: an optimizer's per-parameter state (Adam's moments) lives in tierd
between steps, and comes into the process one parameter group at a time while ``step()`` runs.

Contract. After ``off = offload_optimizer_state(optimizer, client)`` each call of ``optimizer.step()``
runs group by group: the group's state tensors are fetched (one ``get_many``, copied into process
memory, leases released), the optimizer's own step runs on that group alone, and the group's state
tensors of at least ``min_bytes`` are put back to tierd (``opt/<uuid>/<group>/<param>/<name>``,
``scope="client"``: gone when this client disconnects) and dropped from the process. While a group
steps, the next group's entries are hinted (``Client.prefetch``). Small state (Adam's ``step``
counter) stays in the process. The result is bit-identical to the plain step: torch's optimizers
update each group independently of the others, and the stored bytes are the state's own (no codec).

Between steps the process holds no large state. ``optimizer.state_dict()`` brings everything back
first (a state-dict pre hook) and offloads it again after (post hook), so checkpoints are complete;
``load_state_dict`` leaves the loaded state in the process until the next step offloads it.
``off.remove()`` (or leaving ``with off:``) brings the state back into the process, deletes the
entries and restores the optimizer's own ``step``. A step with a closure calls the closure once,
then steps the groups. Since the optimizer's own ``step`` runs once per group, step hooks
(``register_step_pre_hook`` and the global ones) run once per group too, and an LR scheduler that
wrapped ``optimizer.step`` before this was installed does not see the call (it may warn that the
scheduler stepped first; the learning rates are unaffected).

Memory. The process holds at most one group's state at a time: with one group per block of
parameters (a LoRA adapter per layer, say), Adam's 2x-parameters of moments drop to 2x the largest
group. Cost per step: per group one ``get_many`` and one put per state tensor, each a copy of the
bytes (about the cost of Adam's own arithmetic on them on a CPU).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import torch

from tierd_client import Client, NotFound

#: state tensors smaller than this stay in the process
DEFAULT_MIN_BYTES = 64 << 10


class _Step:
    """The step installed on the optimizer (a type of its own, so a second offload is refused)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, closure: Any = None) -> Any:
        return self.fn(closure)


class OptimizerStateOffload:
    """What ``offload_optimizer_state`` returns: removable, usable as a context manager."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, client: Client, *, min_bytes: int = DEFAULT_MIN_BYTES
    ) -> None:
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, not {min_bytes}")
        if isinstance(getattr(optimizer, "step", None), _Step):
            raise RuntimeError("this optimizer's state is already offloaded")
        self.optimizer = optimizer
        self.client = client
        self.min_bytes = min_bytes
        self.prefix = f"opt/{uuid.uuid4().hex}"
        #: (param id) -> {state name: key} for the state now in tierd
        self._stored: dict[int, dict[str, str]] = {}
        self.puts = 0
        self.fetches = 0
        self.offloaded_bytes = 0
        self._handles = [
            optimizer.register_state_dict_pre_hook(lambda _opt: self.fetch_all()),
            optimizer.register_state_dict_post_hook(self._after_state_dict),
            optimizer.register_load_state_dict_pre_hook(lambda _opt, _sd: self._forget_stored()),
        ]
        self._own_step = vars(optimizer).get("step")  # an instance-level step someone set before us
        optimizer.step = _Step(self._step)  # type: ignore[method-assign]
        self._removed = False

    def __enter__(self) -> OptimizerStateOffload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- step ------------------------------------------------------------------------------------
    def _step(self, closure: Any = None) -> Any:
        opt = self.optimizer
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = opt.param_groups
        step = type(opt).step
        try:
            for gi, group in enumerate(groups):
                self._fetch_group(gi, group)
                if gi + 1 < len(groups):
                    self._hint_group(groups[gi + 1])
                opt.param_groups = [group]
                try:
                    step(opt)
                finally:
                    opt.param_groups = groups
                self._offload_group(gi, group)
        finally:
            opt.param_groups = groups
        return loss

    @property
    def stored_bytes_in_process(self) -> int:
        """Bytes of state tensors the optimizer holds in the process now."""
        total = 0
        for st in self.optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    def _keys_of(self, group: dict[str, Any]) -> list[tuple[torch.Tensor, str, str]]:
        out = []
        for p in group["params"]:
            for name, key in self._stored.get(id(p), {}).items():
                out.append((p, name, key))
        return out

    def _hint_group(self, group: dict[str, Any]) -> None:
        keys = [k for _, _, k in self._keys_of(group)]
        if keys:
            self.client.prefetch(keys)

    def _fetch_group(self, gi: int, group: dict[str, Any]) -> None:
        rows = self._keys_of(group)
        if not rows:
            return
        views = self.client.get_many([k for _, _, k in rows])
        try:
            for (p, name, _), v in zip(rows, views, strict=True):
                self.optimizer.state[p][name] = v.to(p.device, copy=True)
        finally:
            self.client.release(views)
        for p, name, _ in rows:
            del self._stored[id(p)][name]
            if not self._stored[id(p)]:
                del self._stored[id(p)]
        self.fetches += len(rows)

    def _offload_group(self, gi: int, group: dict[str, Any]) -> None:
        for pi, p in enumerate(group["params"]):
            st = self.optimizer.state.get(p)
            if not st:
                continue
            for name, v in list(st.items()):
                if not isinstance(v, torch.Tensor) or v.numel() * v.element_size() < self.min_bytes:
                    continue
                key = f"{self.prefix}/{gi}/{pi}/{name}"
                self.client.put(
                    key, v.detach().contiguous(), scope="client", durable=False, tags=["optimizer"]
                )
                self._stored.setdefault(id(p), {})[name] = key
                del st[name]
                self.puts += 1
                self.offloaded_bytes += v.numel() * v.element_size()

    # -- whole-state moves -----------------------------------------------------------------------
    def fetch_all(self) -> None:
        """Bring every offloaded state tensor back into the optimizer (the entries are kept)."""
        for gi, group in enumerate(self.optimizer.param_groups):
            self._fetch_group(gi, group)

    def _after_state_dict(self, _opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        # state_dict() shares the optimizer's per-parameter dicts: copy them before emptying those
        state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
        for gi, group in enumerate(self.optimizer.param_groups):
            self._offload_group(gi, group)
        return state_dict

    def _forget_stored(self) -> None:
        """load_state_dict replaces the state: the stored entries are stale, delete them."""
        for d in self._stored.values():
            for key in d.values():
                with contextlib.suppress(NotFound):
                    self.client.delete(key)
        self._stored.clear()

    def remove(self) -> None:
        """Bring the state back into the process, delete the entries, restore the optimizer's step."""
        if self._removed:
            return
        self._removed = True
        keys = [k for d in self._stored.values() for k in d.values()]
        self.fetch_all()
        for key in keys:
            with contextlib.suppress(NotFound):
                self.client.delete(key)
        for h in self._handles:
            h.remove()
        if self._own_step is not None:
            self.optimizer.step = self._own_step  # type: ignore[method-assign]
        else:
            with contextlib.suppress(AttributeError):
                del self.optimizer.step  # the instance attribute: the class's step shows through again


def offload_optimizer_state(
    optimizer: torch.optim.Optimizer, client: Client, *, min_bytes: int = DEFAULT_MIN_BYTES
) -> OptimizerStateOffload:
    """Keep ``optimizer``'s per-parameter state (Adam's exp_avg / exp_avg_sq) in tierd between steps.

    Returns a handle: ``.remove()`` (or ``with``) undoes it. See the module docstring.
    """
    return OptimizerStateOffload(optimizer, client, min_bytes=min_bytes)

"""Count the host-device synchronisations a piece of tensor code would make on a GPU, on the CPU.

On a GPU, reading a tensor's value on the host (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, a
data-dependent shape: `nonzero`, boolean indexing, `unique`, `bincount`, `repeat_interleave` with
tensor repeats, `.cpu()`) waits for every queued kernel: a loop that does it once per block serialises
the GPU on the host. On the CPU these reads are free, so tests there cannot see them by timing.

`count_host_syncs(*tensors)` simulates the placement instead: the tensors passed in (and every
tensor computed from them, or created with an explicit `device=`, as `device=q.device` would put it
on the GPU) count as *device* tensors; tensors created without a device (host-side planning
arithmetic) and copies made with `.cpu()` are host tensors. A sync is recorded where a reading
operation touches a device tensor, with the attnsieve source line that called it:

    with count_host_syncs(q, k) as syncs:
        method.support(q, k, ctx)
    syncs.count, syncs.sites   # 2, Counter({('__int__', 'kernels/block_sparse.py:179'): 1, ...})

The model is conservative in one way (compiled C++ paths taken on the CPU hide their internals, so
run the torch paths) and approximate in another (a factory given `device=torch.device("cpu")`
explicitly counts as a device tensor). `benchmarks/device_check.py` confirms on a GPU.
"""

from __future__ import annotations

import collections
import traceback
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

# Reads of a tensor's value on the host, or ops whose output shape depends on the data.
SYNC_OPS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "cpu",
    "numpy", "unique", "unique_consecutive", "masked_select", "bincount", "equal", "allclose",
})
# Tensor factories: the result lives where their `device=` says (the host without one).
FACTORIES = frozenset({
    "arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "randn", "rand", "randint",
    "linspace", "eye", "tril_indices", "triu_indices",
})
_MARK = "_attnsieve_on_device"


@dataclass
class HostSyncs:
    """What `count_host_syncs` recorded: `sites` maps (operation, 'file:line') to a count."""

    sites: collections.Counter = field(default_factory=collections.Counter)

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __str__(self) -> str:
        if not self.sites:
            return "no host syncs"
        return ", ".join(f"{op} at {site} x{n}" for (op, site), n in self.sites.most_common())


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _mark(t) -> None:
    if isinstance(t, torch.Tensor):
        try:
            setattr(t, _MARK, True)
        except (AttributeError, RuntimeError):  # a tensor type that refuses attributes: left unmarked
            pass


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = frame.filename.replace("\\", "/")
        if "/attnsieve/" in path and not path.endswith("/host_syncs.py"):
            return f"{path.rsplit('/attnsieve/', 1)[-1]}:{frame.lineno}"
    return "outside attnsieve"


class _Tracker(TorchFunctionMode):
    def __init__(self, record: HostSyncs):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # traced by dynamo (FlexAttention's operator): a compiled graph
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        flat = pytree.tree_leaves((args, kwargs))
        dev = any(_on_device(a) for a in flat)
        if name in FACTORIES and not any(isinstance(a, torch.Tensor) for a in flat):
            dev = kwargs.get("device") is not None
        synced = dev and (name in SYNC_OPS or self._data_shaped(name, args, kwargs))
        if synced:
            self.record.sites[(name, _caller())] += 1
        out = func(*args, **kwargs)
        if name == "cpu" or (name == "to" and self._to_host(args, kwargs)):
            dev = False
            if out is args[0]:  # already on the CPU here: a copy, so the device tensor stays marked
                out = out.clone()
        elif name == "to" and self._to_device(args, kwargs):
            dev = True
        if dev:
            for t in pytree.tree_leaves(out):
                _mark(t)
        return out

    @staticmethod
    def _data_shaped(name, args, kwargs) -> bool:
        """Boolean-mask indexing, and repeat_interleave with tensor repeats and no output_size."""
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
            idx = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
        if name == "repeat_interleave":
            reps = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(reps, torch.Tensor) and reps.numel() > 1 and kwargs.get("output_size") is None
        if name == "where" and len(args) == 1 and not kwargs:
            return True  # torch.where(cond): nonzero
        return False

    @staticmethod
    def _to_host(args, kwargs) -> bool:
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        return target is not None and str(target).startswith("cpu") and isinstance(target, str)

    @staticmethod
    def _to_device(args, kwargs) -> bool:
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        if isinstance(target, torch.device):
            return True
        return any(_on_device(a) for a in args[1:])  # .to(other_tensor)


class count_host_syncs:  # noqa: N801 - used as a context manager, like torch's
    """Context manager: the host syncs the code inside would make on a GPU, with `tensors` there."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors
        self.record = HostSyncs()
        self._mode = _Tracker(self.record)

    def __enter__(self) -> HostSyncs:
        for t in self.tensors:
            _mark(t)
        self._mode.__enter__()
        return self.record

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for t in self.tensors:
            if isinstance(t, torch.Tensor) and hasattr(t, _MARK):
                delattr(t, _MARK)
        return False

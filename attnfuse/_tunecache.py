"""The measuring half of `attnfuse.autotune`: synthetic inputs, timers, one trial's median, and the on-disk cache.

Inputs (`inputs`): q/k/v/grad from a generator seeded per site and key length, built once per length; a synthetic
mask of the site's mask shape and dtype (~10% of keys dropped at random, the diagonal or key 0 always kept, so no
row is left without a key); a packed-documents tensor for FlexAttention where the site has one.  `measure` runs a
trial ``warmup`` times, then times ``reps`` calls and returns the median, or the exception's one-line reason.

The cache is one JSON file, keyed by what a time depends on.

A key (a JSON object) names the device (``torch.cuda.get_device_name`` or ``"cpu:<processor>"``), the torch and
triton versions, the dtype, the shape class (batch, heads, K/V heads and head dims exactly; query and key lengths
rounded up to a power of two), the mask structure, the op's flags that change the work (band, causal, softcap,
dropout, ...), whether forward+backward was timed, and the candidate (family, ``impl``, ``tiles``).  The value is
``{"measured_s": seconds | None, "error": the one-line reason it failed | None}``.

The file::

    {"version": 1, "entries": [{"key": {...}, "value": {...}}, ...]}

A version change makes an entry stale: its key no longer matches, so the candidate is measured again, and writing
drops the stale entries of the same device (other devices' entries stay: one file can serve several machines).
Writes are atomic (a temporary file in the same folder, then ``os.replace``) and merge with what another process
wrote meanwhile.  A corrupt or unreadable file is treated as empty, with a WARNING on the ``attnfuse`` logger; a
file that cannot be written is a WARNING too: the measurements still decide this compile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "TuneCache", "cache_key", "default_timer", "device_name", "environment", "inputs",
           "measure", "measuring", "pow2_ceil", "rescaled"]

log = logging.getLogger("attnfuse.autotune")

FORMAT_VERSION = 1
_VERSIONED = ("torch", "triton")  # the key fields whose change makes an entry of the same device stale


def device_name(device: str) -> str:
    """The cache's name for ``device`` ("cpu", "cuda", "cuda:1"): the GPU's marketing name, or the CPU's."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "cpu":
        return f"cpu:{platform.processor() or platform.machine() or 'unknown'}"
    return dev.type


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def environment(device: str) -> dict[str, str]:
    """The key fields that describe the machine and software: ``device``, ``torch``, ``triton`` (read per call, so
    an upgrade in a long-lived process is seen)."""
    return {"device": device_name(device), "torch": str(torch.__version__), "triton": _triton_version()}


def pow2_ceil(n: int) -> int:
    """``n`` rounded up to a power of two (1 for n <= 1): the shape class of a sequence length."""
    return 1 << max(0, int(n) - 1).bit_length()


def cache_key(env: Mapping[str, str], site: Any, q_len: int, kv_len: int, kernel: str, impl: str,
              tiles: str) -> dict[str, Any]:
    """The key of one candidate of ``site`` (an `attnfuse.autotune.Tunable`) at these lengths: ``env``
    (`environment`), dtype, training, shape class, mask structure, the op's keywords but the scale (the flex
    candidate's own where it has them), the mask's broadcast pattern and dtype, ALiBi / sinks / doc, and the
    candidate (kernel, impl, tiles)."""
    s = site.shape
    flex = kernel == "flex" and site.flex_kwargs is not None
    kw = {**site.op_kwargs, **(site.flex_kwargs if flex else {})}
    mask = site.flex_mask if flex else site.mask
    return {**env, "dtype": str(site.dtype).replace("torch.", ""), "training": bool(site.training),
            "shape": [s["batch"], s["heads"], s["kv_heads"], pow2_ceil(q_len), pow2_ceil(kv_len), s["head_dim"],
                      s["v_head_dim"]], "structure": site.structure,
            "flags": {k: kw[k] for k in sorted(kw) if k != "scale"},
            "mask": None if mask is None else [[d if d == 1 else -1 for d in mask[0]], str(mask[1])],
            "alibi": bool(site.alibi), "sinks": bool(site.sinks), "doc": bool(flex and site.flex_doc),
            "candidate": {"kernel": kernel, "impl": impl, "tiles": tiles}}


def _text(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


class TuneCache:
    """Measurements by key, read from ``path`` on first use and written back by `flush` (``path`` None: an
    in-memory cache that writes nothing)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else os.path.expanduser(os.fspath(path))
        self._entries: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        self._loaded = False

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored value of ``key``, or None (a miss)."""
        self._load()
        entry = self._entries.get(_text(key))
        return None if entry is None else dict(entry["value"])

    def put(self, key: Mapping[str, Any], value: Mapping[str, Any]) -> None:
        """Remember ``value`` for ``key`` (on disk at the next `flush`)."""
        self._load()
        entry = {"key": json.loads(_text(key)), "value": dict(value)}
        self._entries[_text(key)] = entry
        self._new[_text(key)] = entry

    def flush(self) -> None:
        """Write the new entries: merged over the file's current content, without the stale entries of the devices
        just measured, atomically.  Nothing to write (or no path): a no-op."""
        if self.path is None or not self._new:
            return
        merged = {**self._read(), **self._new}
        current = {(e["key"].get("device"), tuple(e["key"].get(f) for f in _VERSIONED)) for e in self._new.values()}
        measured = {device for device, _ in current}
        entries = [e for e in merged.values() if e["key"].get("device") not in measured
                   or (e["key"].get("device"), tuple(e["key"].get(f) for f in _VERSIONED)) in current]
        data = {"version": FORMAT_VERSION, "entries": entries}
        folder = os.path.dirname(os.path.abspath(self.path))
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".autotune-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as exc:
            log.warning("attnfuse autotune: cannot write the cache %s (%s); this compile's measurements are not "
                        "kept", self.path, exc)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        self._entries.update({_text(e["key"]): e for e in entries})
        self._new.clear()

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._entries = self._read(warn=True)

    def _read(self, warn: bool = False) -> dict[str, dict[str, Any]]:
        """The file's entries by key text; {} when there is no file, and (with a WARNING when ``warn``) when it
        cannot be read or is not a cache file of this format."""
        if self.path is None or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"not an attnfuse autotune cache of format version {FORMAT_VERSION}")
            entries = {}
            for e in data["entries"]:
                if not isinstance(e["key"], dict) or not isinstance(e["value"], dict):
                    raise ValueError("an entry is not {'key': {...}, 'value': {...}}")
                entries[_text(e["key"])] = {"key": e["key"], "value": e["value"]}
            return entries
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if warn:
                log.warning("attnfuse autotune: ignoring the unreadable cache %s (%s: %s); its candidates are "
                            "measured again and the file is rewritten", self.path, type(exc).__name__, exc)
            return {}


# -- inputs ---------------------------------------------------------------------------------------------------------

def rescaled(shape: tuple[int, ...], q_len: int, kv_len: int) -> list[int]:
    """A mask shape at other lengths: its key axis (and query axis, when not broadcast) resized."""
    dims = list(shape)
    if dims and dims[-1] != 1:
        dims[-1] = kv_len
    if len(dims) >= 2 and dims[-2] != 1:
        dims[-2] = q_len
    return dims


def _mask(spec: tuple[tuple[int, ...], torch.dtype], q_len: int, kv_len: int, g: torch.Generator,
          device: str) -> torch.Tensor:
    shape, dtype = spec
    dims = rescaled(shape, q_len, kv_len)
    drop = torch.rand(dims, generator=g, device=device) < 0.1
    if len(dims) >= 2 and dims[-2] != 1 and dims[-1] != 1:  # each row keeps its key on both diagonals
        i = torch.arange(q_len, device=device)
        drop[..., i, i.clamp(max=kv_len - 1)] = False
        drop[..., i, (i + kv_len - q_len).clamp(0, kv_len - 1)] = False
    elif dims and dims[-1] != 1:
        drop[..., 0] = False
    if dtype == torch.bool:
        return ~drop
    return torch.zeros(dims, dtype=dtype, device=device).masked_fill(drop, float("-inf"))


def _doc(batch: int, length: int, g: torch.Generator, device: str) -> torch.Tensor:
    """(batch, 2, L) int64: a few packed documents (row 0: segment ids), the first eighth of each a prefix (row 1:
    prefix-key flags)."""
    docs = max(1, min(4, length // 2))
    cpu = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (), generator=g, device=g.device)))
    starts = torch.randperm(max(1, length - 1), generator=cpu)[:docs - 1] + 1
    seg = torch.zeros(length, dtype=torch.int64)
    seg[starts] = 1
    seg = seg.cumsum(0)
    prefix = torch.zeros(length, dtype=torch.int64)
    for d in range(docs):
        where = (seg == d).nonzero().flatten()
        prefix[where[: max(1, where.numel() // 8)]] = 1
    return torch.stack([seg, prefix]).expand(batch, 2, length).contiguous().to(device)


def inputs(site: Any, q_len: int, kv_len: int, pool: dict[str, Any], flex: bool) -> tuple[list, dict[str, Any]]:
    """The op's positional arguments (q, k, v, mask, seed, alibi, sinks[, doc]) and keywords for one candidate of
    ``site`` (an `attnfuse.autotune.Tunable`) at these lengths; tensors are built once into ``pool`` (seeded)."""
    s, dev = site.shape, site.device
    if "q" not in pool:
        g = pool["g"] = torch.Generator(device=dev).manual_seed(site.seed * 1_000_003 + kv_len)

        def rand(*dims: int) -> torch.Tensor:
            return torch.randn(*dims, generator=g, device=dev, dtype=site.dtype).requires_grad_(site.training)

        b, h, hk = s["batch"], s["heads"], s["kv_heads"]
        pool["q"] = rand(b, h, q_len, s["head_dim"])
        pool["k"], pool["v"] = rand(b, hk, kv_len, s["head_dim"]), rand(b, hk, kv_len, s["v_head_dim"])
        pool["grad"] = torch.randn(b, h, q_len, s["v_head_dim"], generator=g, device=dev, dtype=site.dtype)
        pool["alibi"] = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device=dev) if site.alibi \
            else None
        pool["sinks"] = torch.randn(h, generator=g, device=dev) if site.sinks else None
        dropout = float(site.op_kwargs.get("dropout_p", 0.0)) > 0
        pool["seed"] = torch.tensor(1234, dtype=torch.int64, device=dev) if dropout else None
    own = not flex or site.flex_kwargs is None  # flex with its own keywords, mask and doc
    name = "mask" if own else "flex_mask"
    if name not in pool:
        spec = site.mask if own else site.flex_mask
        pool[name] = None if spec is None else _mask(spec, q_len, kv_len, pool["g"], dev)
    args = [pool["q"], pool["k"], pool["v"], pool[name], pool["seed"], pool["alibi"], pool["sinks"]]
    if not own and site.flex_doc:
        if "doc" not in pool:
            pool["doc"] = _doc(s["batch"], kv_len, pool["g"], dev)
        args.append(pool["doc"])
    return args, (dict(site.op_kwargs) if own else {**site.op_kwargs, **site.flex_kwargs})


def _input_bytes(site: Any, q_len: int, kv_len: int) -> int:
    s = site.shape
    qkvo = (s["heads"] * q_len * (s["head_dim"] + s["v_head_dim"]) + s["kv_heads"] * kv_len * (
        s["head_dim"] + s["v_head_dim"])) * s["batch"] * s["elem"]
    mask = max((math.prod(rescaled(m[0], q_len, kv_len)) * m[1].itemsize for m in (site.mask, site.flex_mask) if m),
               default=0)
    return qkvo * (2 if site.training else 1) + mask


def _memory_cap(device: str) -> int:
    """The most input bytes autotune allocates: a third of the GPU's free memory, or of the host's an eighth (at
    most 4 GiB)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(dev)[0] // 3
    try:
        return min(4 << 30, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8)
    except (ValueError, OSError, AttributeError):
        return 2 << 30


# -- timing ---------------------------------------------------------------------------------------------------------

def default_timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Seconds of one call: CUDA events around it on a CUDA device, ``time.perf_counter`` elsewhere."""
    if torch.device(device).type == "cuda":
        def cuda_timer(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_timer

    def cpu_timer(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return cpu_timer


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300]


def measure(trial: Any, site: Any, settings: Mapping[str, Any], timer: Callable[[Any], float], pool: dict[str, Any],
            budget_s: float) -> dict[str, Any]:
    """``{"measured_s": median seconds | None, "error": one-line reason | None, "keep": bool}`` of one trial (an
    `attnfuse.autotune.Trial`): its inputs built first, then ``warmup`` untimed calls and ``reps`` timed ones, each
    loop stopping early once it has spent ``budget_s`` (the first call, which may compile, not counted).  ``keep``
    False: a failure for lack of memory, which may pass (not cached)."""
    need, cap = _input_bytes(site, trial.q_len, trial.kv_len), _memory_cap(site.device)
    if need > cap:
        return {"measured_s": None, "keep": False, "error": f"its inputs at {trial.kv_len} keys need "
                f"{need / 2**30:.1f} GiB, over the {cap / 2**30:.1f} GiB autotune allocates"}
    cuda = torch.device(site.device).type == "cuda"
    try:
        inputs(site, trial.q_len, trial.kv_len, pool, trial.kernel == "flex")
        spent = 0.0
        for n in range(settings["warmup"]):
            start = time.perf_counter()
            trial()
            if cuda:
                torch.cuda.synchronize()
            spent += (time.perf_counter() - start) if n else 0.0  # the first call may compile: not counted
            if spent > budget_s:
                break
        times: list[float] = []
        for _ in range(settings["reps"]):
            t = float(timer(trial))
            if not math.isfinite(t) or t <= 0:
                raise ValueError(f"the timer returned {t!r} seconds")
            times.append(t)
            if sum(times) > budget_s:
                break
        return {"measured_s": statistics.median(times), "error": None, "keep": True}
    except Exception as exc:  # a candidate that cannot run this site loses; compilation goes on
        if cuda:
            torch.cuda.empty_cache()
        memory = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        return {"measured_s": None, "error": _reason(exc), "keep": not memory}


@contextlib.contextmanager
def measuring(site: Any):
    """Real tensors (outside any fake mode of the compile that asks), autograd as the timing needs it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with contextlib.ExitStack() as stack:
        stack.enter_context(unset_fake_temporarily())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad() if site.training else torch.no_grad())
        if torch.device(site.device).type == "cuda":
            stack.enter_context(torch.cuda.device(torch.device(site.device)))
        yield

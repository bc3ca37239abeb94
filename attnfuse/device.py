"""`DeviceSpec`: what the cost model knows about a device, its presets, "auto" detection and JSON files.

A spec is plain data (frozen, hashable: the flash launcher caches its tile choice per spec).  It comes from

* a preset: ``PRESETS["h100" | "h200" | "a100" | "cpu"]`` (datasheet numbers);
* ``"auto"`` (`DeviceSpec.detect`): the present CUDA device's properties (SMs, shared memory, L2) from
  ``torch.cuda.get_device_properties``, with the rates that properties do not give (bandwidth, matmul and
  exp throughput) from the preset of the same family; on a machine without CUDA, the CPU preset sized to
  its core count;
* a JSON file written by ``python -m attnfuse calibrate`` (`attnfuse.calibrate`), which measures the rates
  on the present device: ``options={"device": "spec.json"}`` or `DeviceSpec.load`.

Every field is validated on construction; a bad value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DTYPES", "PRESETS", "DeviceSpec"]

DTYPES = ("float16", "bfloat16", "float32", "float64")  # the keys of `DeviceSpec.matmul_flops`


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """A device as the cost model sees it (bytes, seconds, operations per second).

    ``smem_per_block``: shared memory one thread block may use (the opt-in maximum; it bounds the tiles);
    ``smem_per_sm``: shared memory per SM (it bounds how many blocks an SM holds); ``sms``: streaming
    multiprocessors (CPU: cores); ``l2_bytes`` / ``l2_bytes_per_s``: L2 size and bandwidth;
    ``hbm_bytes_per_s``: main-memory bandwidth; ``matmul_flops``: dense matmul FLOP/s per input dtype
    (tensor cores where the kernels use them; a dict is accepted and stored as sorted pairs); ``exp_per_s``:
    exponentials per second (the special-function units on a GPU); ``launch_s``: fixed cost of one kernel
    launch (CPU: of one batched op).
    """

    name: str
    smem_per_block: int
    smem_per_sm: int
    sms: int
    l2_bytes: int
    hbm_bytes_per_s: float
    matmul_flops: tuple[tuple[str, float], ...]
    exp_per_s: float
    launch_s: float = 4e-6
    l2_bytes_per_s: float = 0.0  # 0: three times hbm_bytes_per_s (about right on A100/H100)

    def __post_init__(self) -> None:
        flops = self.matmul_flops
        if isinstance(flops, Mapping):
            flops = tuple(sorted((str(k), v) for k, v in flops.items()))
        if not isinstance(flops, tuple) or not flops:
            raise _bad("matmul_flops", self.matmul_flops, "a non-empty {dtype: FLOP/s} mapping")
        for key, rate in flops:
            if key not in DTYPES:
                raise _bad(f"matmul_flops[{key!r}]", key, ", ".join(DTYPES))
            _positive(f"matmul_flops[{key!r}]", rate)
        object.__setattr__(self, "matmul_flops", flops)
        if not isinstance(self.name, str) or not self.name:
            raise _bad("name", self.name, "a non-empty string")
        for field in ("smem_per_block", "smem_per_sm", "sms", "l2_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _bad(field, value, "a positive integer")
        if self.smem_per_block > self.smem_per_sm:
            raise _bad("smem_per_block", self.smem_per_block, f"at most smem_per_sm ({self.smem_per_sm})")
        for field in ("hbm_bytes_per_s", "exp_per_s", "launch_s"):
            _positive(field, getattr(self, field))
        if self.l2_bytes_per_s == 0.0:
            object.__setattr__(self, "l2_bytes_per_s", 3.0 * self.hbm_bytes_per_s)
        _positive("l2_bytes_per_s", self.l2_bytes_per_s)

    # ------------------------------------------------------------------ rates

    def flops(self, dtype: torch.dtype | str) -> float:
        """Matmul FLOP/s for inputs of ``dtype`` (a dtype the spec lacks: its slowest listed rate)."""
        name = str(dtype).replace("torch.", "")
        rates = dict(self.matmul_flops)
        return rates.get(name, min(rates.values()))

    @property
    def peak_flops(self) -> float:
        return max(rate for _, rate in self.matmul_flops)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["matmul_flops"] = dict(self.matmul_flops)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceSpec:
        if not isinstance(data, Mapping):
            raise ValueError(f"attnfuse DeviceSpec: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"attnfuse DeviceSpec: unknown field(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(fields))}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"attnfuse DeviceSpec: missing field(s) {', '.join(missing)}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        path = pathlib.Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceSpec:
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"attnfuse DeviceSpec: no such file {str(path)!r} "
                             "(write one with `python -m attnfuse calibrate -o FILE`)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"attnfuse DeviceSpec: {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ detection

    @staticmethod
    def detect() -> DeviceSpec:
        """The spec of the current CUDA device (properties measured by the driver, rates from the preset of
        its family), or the CPU preset with this machine's core count."""
        if torch.cuda.is_available():
            return cuda_spec(torch.cuda.current_device())
        return dataclasses.replace(PRESETS["cpu"], sms=max(1, os.cpu_count() or 1))


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"attnfuse DeviceSpec field {field!r}: got {value!r}; allowed: {allowed}")


def _positive(field: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise _bad(field, value, "a positive finite number")


_KIB, _MIB = 1024, 2**20
PRESETS: dict[str, DeviceSpec] = {
    # H100 SXM: 989 TFLOP/s dense fp16/bf16, 67 fp32 (non-tensor), 3.9 T exp/s (16 MUFU ops/clk/SM)
    "h100": DeviceSpec("h100", 227 * _KIB, 228 * _KIB, 132, 50 * _MIB, 3.35e12,
                       {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12, "float64": 67e12}, 3.9e12),
    "h200": DeviceSpec("h200", 227 * _KIB, 228 * _KIB, 132, 50 * _MIB, 4.8e12,
                       {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12, "float64": 67e12}, 3.9e12),
    # A100 SXM 80 GB: 312 TFLOP/s fp16/bf16, 19.5 fp32, 108 SMs x 16 MUFU x 1.41 GHz
    "a100": DeviceSpec("a100", 163 * _KIB, 164 * _KIB, 108, 40 * _MIB, 2.0e12,
                       {"float16": 312e12, "bfloat16": 312e12, "float32": 19.5e12, "float64": 9.7e12}, 2.4e12),
    # a small CPU (the interpreter's spec too: any tile fits its "shared memory", the L2 per core)
    "cpu": DeviceSpec("cpu", 1 * _MIB, 1 * _MIB, 2, 32 * _MIB, 20e9,
                      {"float32": 100e9, "float64": 50e9, "bfloat16": 50e9, "float16": 20e9}, 4e9, 20e-6),
}


def _family(name: str, major: int) -> DeviceSpec:
    lowered = name.lower()
    for key in ("h200", "h100", "a100"):
        if key in lowered:
            return PRESETS[key]
    return PRESETS["h100"] if major >= 9 else PRESETS["a100"]


@functools.cache
def cuda_spec(index: int) -> DeviceSpec:
    """The spec of CUDA device ``index``: its measured properties, the rates of its family's preset."""
    props = torch.cuda.get_device_properties(index)
    base = _family(props.name, props.major)
    per_block = int(getattr(props, "shared_memory_per_block_optin", 0) or base.smem_per_block)
    per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or base.smem_per_sm)
    l2 = int(getattr(props, "L2_cache_size", 0) or base.l2_bytes)
    scale = props.multi_processor_count / base.sms  # rates scale with the SM count (e.g. PCIe parts)
    return dataclasses.replace(
        base, name=props.name, sms=props.multi_processor_count, smem_per_block=min(per_block, max(per_sm, 1)),
        smem_per_sm=max(per_sm, 1), l2_bytes=l2, matmul_flops=tuple((k, r * scale) for k, r in base.matmul_flops),
        exp_per_s=base.exp_per_s * scale)


def spec_for(t: torch.Tensor) -> DeviceSpec:
    """The spec a launch on ``t``'s device runs under: its CUDA device's, else the CPU preset (the interpreter,
    or fake CUDA tensors in tests: any tile fits)."""
    if t.is_cuda and torch.cuda.is_available():
        return cuda_spec(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return PRESETS["cpu"]


def triton_interprets() -> bool:
    """Whether Triton runs its kernels on the CPU (``TRITON_INTERPRET=1``, read when Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported(device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when attnfuse's Triton kernels run tensors of this device type, dtype and (largest) head dim, else why
    not (one sentence).  The launchers and the planner both ask this, so a plan names Triton tiles exactly where
    Triton runs."""
    if not (device_type == "cuda" or (device_type == "cpu" and triton_interprets())):
        return f"the Triton kernel runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not {device_type}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel takes float16, bfloat16 or float32, not {dtype}"
    if head_dim > 256:
        return f"the Triton kernel takes head dims up to 256, not {head_dim}"
    return None

"""The one frozen configuration object; every option is validated here.

`Config.from_options(options)` turns the ``options=`` dict of
``torch.compile(model, backend="attnfuse", options=...)`` into a `Config`.
Unknown keys and bad values raise `ValueError` naming the key and the allowed
values.  Environment variables are read here and nowhere else:

* ``ATTNFUSE_STRICT=1``  -- default for ``strict``.
* ``ATTNFUSE_REPORT=path`` -- default for ``report``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .costmodel import PRESETS, DeviceSpec

KERNEL_FAMILIES = ("flash", "window", "blocksparse", "topk", "lsh")
EXACT_FAMILIES = ("flash", "window", "blocksparse")
INNER_COMPILERS = ("inductor", "eager")
_APPROX_KEYS = ("max_rel_error", "topk", "lsh")


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"attnfuse option {key!r}: got {value!r}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated attnfuse options (see DESIGN.md, 'Options')."""

    kernels: tuple[str, ...] = KERNEL_FAMILIES
    approximate: Mapping[str, Any] | None = None
    device: str | DeviceSpec = "auto"
    inner: str = "inductor"
    report: str | None = None
    strict: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | Config | None = None) -> Config:
        if isinstance(options, Config):
            return options
        options = dict(options or {})
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in fields:
                raise ValueError(f"attnfuse: unknown option {key!r}; allowed options: {', '.join(fields)}")
        env_strict = os.environ.get("ATTNFUSE_STRICT", "") not in ("", "0")
        return cls(
            kernels=_kernels(options.get("kernels", "auto")),
            approximate=_approximate(options.get("approximate", False)),
            device=_device(options.get("device", "auto")),
            inner=_choice("inner", options.get("inner", "inductor"), INNER_COMPILERS),
            report=_report(options.get("report", os.environ.get("ATTNFUSE_REPORT"))),
            strict=_bool("strict", options.get("strict", env_strict)),
        )

    def device_spec(self) -> DeviceSpec:
        """The DeviceSpec this config targets ("auto" detects the current device)."""
        if isinstance(self.device, DeviceSpec):
            return self.device
        if self.device == "auto":
            return DeviceSpec.detect()
        return PRESETS[self.device]


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _bad(key, value, " | ".join(repr(a) for a in allowed))
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, value, "True | False")
    return value


def _kernels(value: Any) -> tuple[str, ...]:
    allowed = '"auto" or a list of ' + ", ".join(repr(k) for k in KERNEL_FAMILIES)
    if value == "auto":
        return KERNEL_FAMILIES
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad("kernels", value, allowed)
    for family in value:
        if family not in KERNEL_FAMILIES:
            raise _bad("kernels", family, allowed)
    return tuple(dict.fromkeys(value))


def _approximate(value: Any) -> Mapping[str, Any] | None:
    allowed = "False, or a dict with 'max_rel_error' (float in (0, 1)) and optional 'topk' / 'lsh' settings"
    if value is False or value is None:
        return None
    if not isinstance(value, Mapping):
        raise _bad("approximate", value, allowed)
    for key in value:
        if key not in _APPROX_KEYS:
            raise _bad(f"approximate.{key}", value[key], ", ".join(_APPROX_KEYS))
    err = value.get("max_rel_error")
    if not isinstance(err, (int, float)) or isinstance(err, bool) or not 0 < err < 1:
        raise _bad("approximate.max_rel_error", err, "a float in (0, 1)")
    return dict(value)


def _device(value: Any) -> str | DeviceSpec:
    if isinstance(value, DeviceSpec) or value == "auto" or value in PRESETS:
        return value
    raise _bad("device", value, '"auto", a DeviceSpec, or one of ' + ", ".join(repr(p) for p in PRESETS))


def _report(value: Any) -> str | None:
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else os.fspath(value)
    raise _bad("report", value, "None or a file path (str / os.PathLike)")

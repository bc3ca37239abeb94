"""The one frozen configuration object; every option is validated here.

`Config.from_options(options)` turns the ``options=`` dict of
``torch.compile(model, backend="attnfuse", options=...)`` into a `Config`.
Options that are not a mapping, unknown keys and bad values raise `ValueError`
naming attnfuse, the key and the allowed values.  Environment variables are read here and nowhere else:

* ``ATTNFUSE_STRICT=1``  -- default for ``strict``.
* ``ATTNFUSE_REPORT=path`` -- default for ``report``.
* ``ATTNFUSE_VERIFY=1|forward`` -- default for ``verify`` (``attnfuse.audit`` verifies unless told not to).
* ``ATTNFUSE_AUTOTUNE_CACHE=path`` -- the default ``autotune`` cache file (else `DEFAULT_AUTOTUNE_CACHE`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

from .device import PRESETS, DeviceSpec
from .families import APPROXIMATE, EXACT, FAMILIES, KERNELS
from .parallel._spec import ContextParallel, from_option

KERNEL_FAMILIES = KERNELS  # the registry's (attnfuse.families) kernel families, exact first
EXACT_FAMILIES = EXACT
INNER_COMPILERS = ("inductor", "eager")
VERIFY_MODES = (False, True, "forward")  # see attnfuse/passes/verify.py
APPROXIMATE_FAMILIES = APPROXIMATE
_APPROX_KEYS = ("max_rel_error", "families", *APPROXIMATE, "calibration")
_FAMILY_SETTINGS = {name: FAMILIES[name].defaults for name in APPROXIMATE}  # options["approximate"][name]
_CALIBRATION_DEFAULTS = {"max_heads": 4, "max_rows": 256, "seed": 0}
AUTOTUNE_DEFAULTS = {"reps": 10, "warmup": 2}  # options["autotune"]: timed calls (median) and untimed ones first
DEFAULT_AUTOTUNE_CACHE = "~/.cache/attnfuse/autotune-v1.json"
# (settings key, name) -> (least value, multiple of, greatest value or None); a name not listed: an int >= 1
# (>= 0 for seed, sink and local).  The top-k and LSH kernels' key blocks are whole 32-key tiles; LSH's ``bits``
# is -1 (auto: about four keys per bucket, `attnfuse.kernels.lsh.auto_bits`) or 0..16 bits per table.
_SETTING_RULES = {("approximate.topk", "block"): (32, 32, None), ("approximate.lsh", "block"): (32, 32, None),
                  ("approximate.lsh", "bits"): (-1, 1, 16), ("approximate.lsh", "probes"): (0, 1, None),
                  ("approximate.lsh", "cap"): (0, 1, None)}


def _bad(key: str, value: Any, allowed: str, source: str = "") -> ValueError:
    """The one shape of an option error: ``attnfuse option 'key'[ (from $ENV)]: got VALUE; allowed: ...``."""
    return ValueError(f"attnfuse option {key!r}{source}: got {value!r}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated attnfuse options (see DESIGN.md, 'Options')."""

    kernels: tuple[str, ...] = KERNEL_FAMILIES
    approximate: Mapping[str, Any] | None = None
    device: str | DeviceSpec = "auto"
    inner: str = "inductor"
    report: str | None = None
    strict: bool = False
    verify: bool | str = False
    autotune: Mapping[str, Any] | None = None  # None: the cost model chooses; else `_autotune`'s settings
    context_parallel: ContextParallel | None = None  # the sequence split over a process group (`attnfuse.parallel`)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | Config | None = None, *,
                     defaults: Mapping[str, Any] | None = None) -> Config:
        """Validate ``options`` (None, a mapping of option names to values, or a Config, returned as is);
        ``defaults`` (validated alike) fill the options it leaves out, ahead of the environment variables.

        Every bad input raises `ValueError` naming attnfuse, the option and what it accepts.
        """
        if isinstance(options, Config):
            return options
        fields = [f.name for f in dataclasses.fields(cls)]
        options = {**_mapping(defaults, fields), **_mapping(options, fields)}
        for key in options:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1) if isinstance(key, str) else []
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"attnfuse: unknown option {key!r}; {hint}allowed options: {', '.join(fields)}")
        env_strict = os.environ.get("ATTNFUSE_STRICT", "") not in ("", "0")
        env_verify = os.environ.get("ATTNFUSE_VERIFY", "")
        return cls(
            kernels=_kernels(options.get("kernels", "auto")),
            approximate=_approximate(options.get("approximate", False)),
            device=_device(options.get("device", "auto")),
            inner=_choice("inner", options.get("inner", "inductor"), INNER_COMPILERS),
            report=_report(options["report"]) if "report" in options else _report(
                os.environ.get("ATTNFUSE_REPORT"), " (from $ATTNFUSE_REPORT)"),
            strict=_bool("strict", options.get("strict", env_strict)),
            verify=_verify(options["verify"]) if "verify" in options else _verify(
                _ENV_VERIFY.get(env_verify, env_verify), " (from $ATTNFUSE_VERIFY)"),
            autotune=_autotune(options.get("autotune", False)),
            context_parallel=_context_parallel(options.get("context_parallel")),
        )

    def device_spec(self) -> DeviceSpec:
        """The DeviceSpec this config targets ("auto" detects the current device)."""
        if isinstance(self.device, DeviceSpec):
            return self.device
        if self.device == "auto":
            return DeviceSpec.detect()
        return PRESETS[self.device]


def _mapping(options: Any, fields: list[str]) -> dict[Any, Any]:
    """``options`` as a dict: None is no options; anything but a mapping is an error that says what to pass."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"attnfuse: options must be a dict of option names to values (allowed options: "
                         f"{', '.join(fields)}), got {type(options).__name__} {options!r}; "
                         "e.g. options={'kernels': ['flash']}")
    return dict(options)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _bad(key, value, " | ".join(repr(a) for a in allowed))
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, value, "True | False")
    return value


_ENV_VERIFY = {"": False, "0": False, "1": True, "forward": "forward"}


def _verify(value: Any, source: str = "") -> bool | str:
    """True: check each rewritten site's output (and, in training graphs, its gradients) on the example inputs
    and revert a site that disagrees; "forward": outputs only; False: no check."""
    if not any(value is mode for mode in VERIFY_MODES[:2]) and not (isinstance(value, str) and value == "forward"):
        raise _bad("verify", value, " | ".join(repr(m) for m in VERIFY_MODES), source)
    return value


def _kernels(value: Any) -> tuple[str, ...]:
    allowed = '"auto" or a list of ' + ", ".join(repr(k) for k in KERNEL_FAMILIES)
    if isinstance(value, str) and value == "auto":
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
    """The approximation policy, with every default filled in: ``max_rel_error`` (the budget: relative
    Frobenius error of a site's output on the calibration inputs), ``families`` (default both), per-family
    settings ``topk`` {topk, block, sink, local} and ``lsh`` {tables, bits, probes, cap, block, sink, local,
    seed} (`attnfuse.kernels.lsh.DEFAULTS`; ``bits`` -1: auto), ``calibration`` {max_heads, max_rows, seed}: how
    many K/V heads and query rows of the example inputs are compared, and ``pinned`` {family: the settings the
    user gave explicitly} -- LSH calibrates a ladder of settings chosen from the key length and the budget
    (`attnfuse.costmodel.lshknobs.ladder`) in which only the pinned ones stay fixed."""
    allowed = ("False, or a dict with 'max_rel_error' (float in (0, 1)) and optional 'families', 'topk', 'lsh', "
               "'calibration'")
    if value is False or value is None:
        return None
    if not isinstance(value, Mapping):
        raise _bad("approximate", value, allowed)
    for key in value:
        if key not in _APPROX_KEYS:
            raise _bad(f"approximate.{key}", value[key], "one of the keys " + ", ".join(_APPROX_KEYS))
    err = value.get("max_rel_error")
    if not isinstance(err, (int, float)) or isinstance(err, bool) or not 0 < err < 1:
        raise _bad("approximate.max_rel_error", err, "a float in (0, 1)")
    families = value.get("families", APPROXIMATE_FAMILIES)
    if isinstance(families, str):
        families = (families,)
    if not isinstance(families, (list, tuple)) or not families or any(f not in APPROXIMATE_FAMILIES
                                                                      for f in families):
        raise _bad("approximate.families", families, "a non-empty list of " + ", ".join(
            repr(f) for f in APPROXIMATE_FAMILIES))
    policy: dict[str, Any] = {"max_rel_error": float(err), "families": tuple(dict.fromkeys(families))}
    for name, defaults in (*_FAMILY_SETTINGS.items(), ("calibration", _CALIBRATION_DEFAULTS)):
        policy[name] = _settings(f"approximate.{name}", value.get(name, {}), defaults)
    policy["pinned"] = {name: {k: policy[name][k] for k in value.get(name, {})} for name in _FAMILY_SETTINGS}
    return policy


def _settings(key: str, value: Any, defaults: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise _bad(key, value, "a dict with keys " + ", ".join(defaults))
    out = dict(defaults)
    for name, v in value.items():
        if name not in defaults:
            raise _bad(f"{key}.{name}", v, "one of the keys " + ", ".join(defaults))
        low, step, high = _SETTING_RULES.get((key, name), (0 if name in ("seed", "sink", "local") else 1, 1, None))
        if not isinstance(v, int) or isinstance(v, bool) or v < low or v % step or (high is not None and v > high):
            raise _bad(f"{key}.{name}", v, f"an int >= {low}" + (f" and <= {high}" if high is not None else "")
                       + (f", a multiple of {step}" if step > 1 else ""))
        out[name] = v
    return out


def _autotune(value: Any) -> Mapping[str, Any] | None:
    """Measured selection (`attnfuse.autotune`): None (off), or ``{"cache": path | False, "reps", "warmup"}`` with
    every default filled in.  ``cache``: the JSON file the measurements persist in ($ATTNFUSE_AUTOTUNE_CACHE, else
    `DEFAULT_AUTOTUNE_CACHE`; ``~`` expanded), or False: measure on every compile, write nothing."""
    allowed = ("False, True, or a dict with optional 'cache' (a file path, or False for no cache), 'reps' (int >= 1) "
               "and 'warmup' (int >= 0)")
    if value is False or value is None:
        return None
    if value is not True and not isinstance(value, Mapping):
        raise _bad("autotune", value, allowed)
    value = {} if value is True else value
    for key in value:
        if key not in ("cache", *AUTOTUNE_DEFAULTS):
            raise _bad(f"autotune.{key}", value[key], "one of the keys cache, reps, warmup")
    out: dict[str, Any] = {"cache": os.environ.get("ATTNFUSE_AUTOTUNE_CACHE") or DEFAULT_AUTOTUNE_CACHE,
                           **AUTOTUNE_DEFAULTS}
    for key, low in (("reps", 1), ("warmup", 0)):
        v = value.get(key, out[key])
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise _bad(f"autotune.{key}", v, f"an int >= {low}")
        out[key] = v
    cache = value.get("cache", out["cache"])
    if cache is not False:
        if not isinstance(cache, (str, os.PathLike)) or not os.fspath(cache) or os.path.isdir(
                os.path.expanduser(os.fspath(cache))):
            raise _bad("autotune.cache", cache, "a file path (str / os.PathLike, not a directory), or False for no "
                                                "cache")
        cache = os.path.expanduser(os.fspath(cache))
    out["cache"] = cache
    return out


def _device(value: Any) -> str | DeviceSpec:
    allowed = '"auto", a DeviceSpec, a spec JSON file, or one of ' + ", ".join(repr(p) for p in PRESETS)
    if isinstance(value, DeviceSpec) or (isinstance(value, str) and (value == "auto" or value in PRESETS)):
        return value
    if isinstance(value, (str, os.PathLike)) and (os.fspath(value).endswith(".json") or os.path.isfile(value)):
        try:  # a calibrated spec (python -m attnfuse calibrate)
            return DeviceSpec.load(value)
        except (OSError, TypeError, ValueError) as exc:
            raise ValueError(f"attnfuse option 'device': {exc}; allowed: {allowed}") from None
    raise _bad("device", value, allowed)


def _report(value: Any, source: str = "") -> str | None:
    """None, or the path the JSON report is written to: a file (new or not) in a directory that exists."""
    allowed = "None or a file path (str / os.PathLike) in an existing directory"
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _bad("report", value, allowed, source)
    path = os.fspath(value)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        what = "is a directory" if os.path.isdir(path) else f"directory {folder!r} does not exist"
        raise _bad("report", value, f"{allowed} ({path!r} {what})", source)
    return path


def _context_parallel(value: Any) -> ContextParallel | None:
    """``context_parallel``: a ProcessGroup, a 1-D DeviceMesh or ``{"group", "strategy", "layout"}``
    (`attnfuse.parallel.from_option`, which raises the option's `ValueError`)."""
    if isinstance(value, ContextParallel):
        return value
    return from_option(value)

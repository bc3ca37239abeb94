"""``python -m attnfuse`` (also the ``attnfuse`` console script).

Commands:

* ``audit TARGET [--json FILE] [--html FILE] [--options JSON]``: trace TARGET's model once with
  `attnfuse.audit` and print the report table (which attention sites would be fused, with which kernel, and
  why the others are not); ``--json`` / ``--html`` also write the report (`Report.save`, `Report.to_html`).
* ``export TARGET --format onnx|mlir|pt2 -o FILE [--options JSON] [--mlir-output torch|linalg-on-tensors]
  [--dynamic | --dynamic-dims SPEC]``: rewrite TARGET's model with `attnfuse.export` and write it to FILE;
  prints the report table (its note names the dynamic dims) and ``attnfuse: wrote FILE``.  ``--dynamic``:
  every dim of every tensor input ``Dim.AUTO``; ``--dynamic-dims 0.0=batch,0.1=seq:1..4096``: the named
  dims only (input.dim=name[:min..max]; the same name is the same size).  A long export on a terminal
  shows a progress bar on stderr.
* ``calibrate [-o FILE] [--device auto|cuda|cpu] [--quick]``: measure the present device (`attnfuse.calibrate`)
  and write its `DeviceSpec` as JSON (usable as ``options={"device": FILE}``); prints the spec (JSON, stdout;
  a progress bar on stderr where it is a terminal).  ``--quick``: the same measurements with fewer samples.

TARGET is ``path/to/file.py:fn`` or ``pkg.module:fn``; ``fn()`` takes no arguments and returns
``(model, example_args)`` (a tuple, or one tensor) or ``(model, example_args, kwargs)`` (audit only).
``--options`` is a JSON object of attnfuse options (``'{"kernels": ["flash"]}'``) or ``@file.json``.

Errors are one message on stderr, ``attnfuse <command>: ...``, no traceback.  Exit codes: 0 success,
2 usage errors (TARGET's file, module or function, what ``fn()`` returned, ``--options``, ``--dynamic-dims``
and dims torch.export cannot keep dynamic), 1 a model that fails to trace or export (the message gives torch's
reason and the line of the model it points at).
While tracing, torch's own log output is muted unless ``TORCH_LOGS`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any


class _Failure(Exception):
    """A CLI error: ``str(self)`` is printed after ``attnfuse <command>:``; ``code`` is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import measure

    spec = measure(args.device, quick=args.quick)
    print(json.dumps(spec.to_dict(), indent=2))
    if args.output:
        spec.save(args.output)
        print(f"attnfuse: wrote {args.output}; use it with options={{'device': {args.output!r}}}", file=sys.stderr)
    return 0


def _audit(args: argparse.Namespace) -> int:
    import attnfuse

    _check_outputs(json=args.json, html=args.html)
    target = _target(args.target)
    options = _options(args.options)
    if "options" in target.kwargs:
        raise _Failure(2, f"{args.target}() returned a model keyword argument named 'options', which "
                          "attnfuse.audit takes for itself; rename it")
    with _tracing():
        try:
            report = attnfuse.audit(target.model, *target.args, options=options, **target.kwargs)
        except Exception as exc:
            raise _Failure(1, f"the model failed to trace: {_reason(exc)}") from None
    print(report)
    if args.json:
        report.save(args.json)
        print(f"attnfuse: wrote {args.json}", file=sys.stderr)
    if args.html:
        report.to_html(args.html)
        print(f"attnfuse: wrote {args.html}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    import attnfuse
    from attnfuse.export import _dims, export_with_progress

    if args.mlir_output is not None and args.format != "mlir":
        raise _Failure(2, f"--mlir-output applies to --format mlir only (got --format {args.format})")
    if args.dynamic and args.dynamic_dims:
        raise _Failure(2, "--dynamic and --dynamic-dims exclude each other: --dynamic makes every dim dynamic, "
                          "--dynamic-dims only the dims it names")
    _check_outputs(output=args.output)
    target = _target(args.target)
    if target.kwargs:
        raise _Failure(2, f"{args.target}() returned keyword arguments ({', '.join(target.kwargs)}); export takes "
                          "positional example args only: return (model, example_args)")
    options = _options(args.options)
    dynamic = "auto" if args.dynamic else None
    if args.dynamic_dims:
        try:
            dynamic = _dims.parse(" ".join(args.dynamic_dims), target.args)
        except ValueError as exc:
            raise _Failure(2, str(exc)) from None
    terminal = sys.stderr
    with _tracing():
        try:
            path = export_with_progress(target.model, target.args, args.output, args.format, options,
                                        dynamic_shapes=dynamic, mlir_output=args.mlir_output or "torch",
                                        progress=terminal)
        except ValueError as exc:
            raise _Failure(2, str(exc)) from None
        except ImportError as exc:  # a missing extra: the message names it (pip install attnfuse[onnx])
            raise _Failure(1, str(exc)) from None
        except OSError as exc:
            raise _Failure(1, f"cannot write {args.output}: {exc}") from None
        except Exception as exc:
            if args.dynamic_dims and _is_constraint(exc):
                raise _Failure(2, f"--dynamic-dims: {_constraint(exc)}") from None
            raise _Failure(1, f"the model failed to trace: {_reason(exc)}") from None
    report = attnfuse.last_report()
    if report is not None:
        print(report)
    print(f"attnfuse: wrote {path}")
    return 0


def _is_constraint(exc: BaseException) -> bool:
    """torch.export refusing the dims it was asked to keep dynamic (specialized, out of range, mismatched)."""
    from torch._dynamo.exc import UserError
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    return isinstance(exc, (UserError, ConstraintViolationError))


def _constraint(exc: BaseException) -> str:
    """torch's constraint error in one line: what it found and its suggested fixes."""
    keep = []
    for line in (ln.strip() for ln in str(exc).splitlines()):
        if line.startswith(("The error above", "For more information")):
            break
        line = re.split(r" (?:For more information|If you're using)", line.removeprefix("- "))[0].rstrip(".:")
        if line:
            keep.append(line)
    text = "; ".join(keep).replace("Suggested fixes;", "suggested fixes:")
    return (f"torch.export cannot keep these dims dynamic: {text}; name only dims the model leaves free "
            "(or use --dynamic, which keeps the others static)")


def _target(spec: str) -> Any:
    from ._target import TargetError, load_target

    try:
        return load_target(spec)
    except TargetError as exc:
        raise _Failure(2, str(exc)) from None


def _options(text: str | None) -> dict[str, Any] | None:
    """``--options``: a JSON object, or ``@file.json``; validated here so that a bad option is a usage error."""
    from .config import Config

    if text is None:
        return None
    source = "--options"
    if text.startswith("@"):
        source = f"--options {text}"
        try:
            text = pathlib.Path(text[1:]).read_text()
        except OSError as exc:
            raise _Failure(2, f"{source}: cannot read {text[1:]}: {exc.strerror or exc}") from None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Failure(2, f"{source} is not valid JSON ({exc}); pass a JSON object such as "
                          "'{\"kernels\": [\"flash\"]}' or @file.json") from None
    if not isinstance(options, dict):
        raise _Failure(2, f"{source} must be a JSON object such as '{{\"kernels\": [\"flash\"]}}'; "
                          f"got a JSON {type(options).__name__}")
    try:
        Config.from_options(options)
    except ValueError as exc:
        raise _Failure(2, str(exc)) from None
    return options


def _check_outputs(**paths: str | None) -> None:
    """Fail before the (slow) trace if an output file's directory does not exist."""
    for flag, path in paths.items():
        if path and not pathlib.Path(path).expanduser().resolve().parent.is_dir():
            raise _Failure(2, f"--{flag} {path}: directory {os.path.dirname(path)!r} does not exist")


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """Mute torch's logs and hold back stderr while tracing: on success the held text is written out; on a
    failure it is dropped (torch prints tracebacks and graph dumps there), the error message says it all."""
    if os.environ.get("TORCH_LOGS"):
        yield
        return
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    held = io.StringIO()
    torch_log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        torch_log.setLevel(level)
    sys.stderr.write(held.getvalue())


_NOISE = ("Hint:", "Developer debug context", "For more", "For C++", "For extended", "If you suspect", "Set TORCH",
          "consider using", "Caused by:", "The following call", "The error above", "from user code:")
_FILE_LINE = re.compile(r'File "?([^",]+)"?, line (\d+)(?:, in (\w+))?')


def _reason(exc: BaseException, width: int = 300) -> str:
    """The first meaningful lines of a tracing error: its headline, dynamo's explanation, and the line of the
    model's source it points at (from the message, else from the traceback)."""
    text = str(exc).strip() or str(exc.__cause__ or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else ""
    out = [f"{type(exc).__name__}: {head}" if head else type(exc).__name__]
    for ln in lines[1:]:
        if ln.startswith("Explanation:"):
            out.append(ln.removeprefix("Explanation:").strip())
            break
    where = _user_line(lines) or _user_frame(exc)
    if where:
        out.append(where)
    return "\n  ".join(ln if len(ln) <= width else ln[: width - 3] + "..." for ln in out)


def _is_library(filename: str) -> bool:
    import torch

    roots = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    return filename.startswith(roots) or "site-packages" in filename or filename.startswith("<")


def _user_line(lines: list[str]) -> str | None:
    """``at file.py:13 in forward: if x.sum() > 0:`` from the last user-code location in an error message."""
    found = None
    for i, ln in enumerate(lines):
        m = _FILE_LINE.search(ln)
        if m and not _is_library(m.group(1)):
            code = ln.split("code:", 1)[1].strip() if "code:" in ln else ""
            if not code and i + 1 < len(lines) and not _FILE_LINE.search(lines[i + 1]):
                code = lines[i + 1]
            found = (m.group(1), m.group(2), m.group(3), code)
    if found is None:
        return None
    filename, lineno, fn, code = found
    return f"at {filename}:{lineno}" + (f" in {fn}" if fn else "") + (f": {code}" if code else "")


def _user_frame(exc: BaseException) -> str | None:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_library(f.filename)]
    if not frames:
        return None
    f = frames[-1]
    return f"at {f.filename}:{f.lineno} in {f.name}" + (f": {f.line}" if f.line else "")


_DIMS_HELP = ("INPUT.DIM=NAME[:MIN..MAX] entries separated by commas (or repeat the flag), e.g. "
              "'0.0=batch,0.1=seq:1..4096'; INPUT is the position of a tensor in example_args and DIM its "
              "dimension, both from 0; the same NAME is the same size; MIN or MAX may be left out; "
              "other dims stay static")
_EXPORT_EPILOG = """\
shapes:
  By default every size is fixed to the example args'. --dynamic makes every dim dynamic where the
  model allows it; --dynamic-dims names them:

    attnfuse export gpt.py:model --format onnx -o gpt.onnx --dynamic-dims 0.0=batch,0.1=seq:2..1024

  makes input 0's dims 0 and 1 dynamic (dim 1 between 2 and 1024). Name input 1's dims the same
  (1.0=batch,1.1=seq) when it must match input 0, e.g. an attention mask.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnfuse", description="attnfuse command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    target_help = "path/to/file.py:fn or pkg.module:fn; fn() returns (model, example_args)"
    options_help = "attnfuse options as a JSON object, or @file.json"

    aud = commands.add_parser("audit", help="trace a model and report which attention sites attnfuse would fuse")
    aud.add_argument("target", metavar="TARGET", help=target_help)
    aud.add_argument("--json", metavar="FILE", help="also write the report as JSON (Report.load reads it)")
    aud.add_argument("--html", metavar="FILE", help="also write the report as an HTML page")
    aud.add_argument("--options", metavar="JSON", help=options_help)
    aud.set_defaults(run=_audit)

    exp = commands.add_parser("export", help="rewrite a model's attention and export it (pt2, ONNX, MLIR)",
                              epilog=_EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("target", metavar="TARGET", help=target_help)
    exp.add_argument("--format", required=True, choices=("pt2", "onnx", "mlir"))
    exp.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the exported model")
    exp.add_argument("--options", metavar="JSON", help=options_help)
    exp.add_argument("--mlir-output", choices=("torch", "linalg-on-tensors"),
                     help="the MLIR dialect level for --format mlir (default: torch)")
    exp.add_argument("--dynamic", action="store_true",
                     help="make every dim of every tensor input dynamic (torch.export.Dim.AUTO): the file runs at "
                          "other batch sizes and lengths; dims the model fixes (e.g. head_dim) stay static, and "
                          "the report's note lists the dynamic ones")
    exp.add_argument("--dynamic-dims", metavar="SPEC", action="append",
                     help="make only the named dims dynamic: " + _DIMS_HELP)
    exp.set_defaults(run=_export)

    cal = commands.add_parser("calibrate", help="measure this device and write a DeviceSpec JSON file")
    cal.add_argument("-o", "--output", help="where to write the spec JSON")
    cal.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    cal.add_argument("--quick", action="store_true",
                     help="the same measurements, fewer samples (under a second on a CPU; noisier)")
    cal.set_defaults(run=_calibrate)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except _Failure as exc:
        print(f"attnfuse {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except ValueError as exc:
        print(f"attnfuse {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

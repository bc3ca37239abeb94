"""Every bad option is a `ValueError` from attnfuse naming the option and what it accepts, on every way in:
`Config.from_options`, ``torch.compile(..., options=...)``, `attnfuse.audit`, `attnfuse.export` and the CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnfuse
from attnfuse.__main__ import _Failure, _options
from attnfuse.config import Config

ALLOWED_OPTIONS = ("allowed options: kernels, approximate, device, inner, report, strict, verify, autotune, "
                   "context_parallel")
FAMILIES = "'flash', 'window', 'blocksparse', 'sdpa', 'flex', 'tpa', 'topk', 'lsh'"
APPROX = {"max_rel_error": 0.1}

# (options, the option the message names, what the message says it accepts)
CASES = {
    "not a dict: str": ("flash", "options", f"options must be a dict of option names to values ({ALLOWED_OPTIONS}), "
                                            "got str 'flash'"),
    "not a dict: list": (["flash"], "options", "got list ['flash']"),
    "unknown": ({"bogus": 1}, "'bogus'", ALLOWED_OPTIONS),
    "misspelt": ({"kernel": ["flash"]}, "'kernel'", f"did you mean 'kernels'? {ALLOWED_OPTIONS}"),
    "kernels: family": ({"kernels": ["flash", "magic"]}, "'kernels'", f"got 'magic'; allowed: \"auto\" or a list of "
                                                                      f"{FAMILIES}"),
    "kernels: empty": ({"kernels": []}, "'kernels'", FAMILIES),
    "kernels: type": ({"kernels": 3}, "'kernels'", FAMILIES),
    "kernels: set": ({"kernels": {"flash"}}, "'kernels'", FAMILIES),
    "approximate: True": ({"approximate": True}, "'approximate'", "False, or a dict with 'max_rel_error'"),
    "approximate: no budget": ({"approximate": {}}, "'approximate.max_rel_error'", "a float in (0, 1)"),
    "approximate: budget": ({"approximate": {"max_rel_error": 2.0}}, "'approximate.max_rel_error'", "(0, 1)"),
    "approximate: key": ({"approximate": {**APPROX, "budget": 1}}, "'approximate.budget'",
                         "one of the keys max_rel_error, families, topk, lsh, calibration"),
    "approximate.families": ({"approximate": {**APPROX, "families": ["magic"]}}, "'approximate.families'",
                             "a non-empty list of 'topk', 'lsh'"),
    "approximate.topk: type": ({"approximate": {**APPROX, "topk": 8}}, "'approximate.topk'",
                               "a dict with keys topk, block, sink, local"),
    "approximate.topk: key": ({"approximate": {**APPROX, "topk": {"k": 5}}}, "'approximate.topk.k'",
                              "one of the keys topk, block, sink, local"),
    "approximate.topk.topk": ({"approximate": {**APPROX, "topk": {"topk": 0}}}, "'approximate.topk.topk'",
                              "an int >= 1"),
    "approximate.topk.block": ({"approximate": {**APPROX, "topk": {"block": 48}}}, "'approximate.topk.block'",
                               "an int >= 32, a multiple of 32"),
    "approximate.topk.sink": ({"approximate": {**APPROX, "topk": {"sink": -1}}}, "'approximate.topk.sink'",
                              "an int >= 0"),
    "approximate.lsh: old key": ({"approximate": {**APPROX, "lsh": {"n_hashes": 4}}}, "'approximate.lsh.n_hashes'",
                                 "one of the keys tables, bits, probes, cap, block, sink, local, seed"),
    "approximate.lsh.tables": ({"approximate": {**APPROX, "lsh": {"tables": 0}}}, "'approximate.lsh.tables'",
                               "an int >= 1"),
    "approximate.lsh.bits: low": ({"approximate": {**APPROX, "lsh": {"bits": -2}}}, "'approximate.lsh.bits'",
                                  "an int >= -1 and <= 16"),
    "approximate.lsh.bits: high": ({"approximate": {**APPROX, "lsh": {"bits": 17}}}, "'approximate.lsh.bits'",
                                   "an int >= -1 and <= 16"),
    "approximate.lsh.probes": ({"approximate": {**APPROX, "lsh": {"probes": -1}}}, "'approximate.lsh.probes'",
                               "an int >= 0"),
    "approximate.lsh.cap": ({"approximate": {**APPROX, "lsh": {"cap": 2.5}}}, "'approximate.lsh.cap'",
                            "an int >= 0"),
    "approximate.lsh.block: step": ({"approximate": {**APPROX, "lsh": {"block": 48}}}, "'approximate.lsh.block'",
                                    "an int >= 32, a multiple of 32"),
    "approximate.lsh.block: zero": ({"approximate": {**APPROX, "lsh": {"block": 0}}}, "'approximate.lsh.block'",
                                    "an int >= 32, a multiple of 32"),
    "approximate.lsh.sink": ({"approximate": {**APPROX, "lsh": {"sink": -1}}}, "'approximate.lsh.sink'",
                             "an int >= 0"),
    "approximate.lsh.local": ({"approximate": {**APPROX, "lsh": {"local": True}}}, "'approximate.lsh.local'",
                              "an int >= 0"),
    "approximate.lsh.seed": ({"approximate": {**APPROX, "lsh": {"seed": -3}}}, "'approximate.lsh.seed'",
                             "an int >= 0"),
    "approximate.calibration": ({"approximate": {**APPROX, "calibration": {"max_rows": "all"}}},
                                "'approximate.calibration.max_rows'", "an int >= 1"),
    "device: name": ({"device": "tpu"}, "'device'", "\"auto\", a DeviceSpec, a spec JSON file, or one of 'h100'"),
    "device: list": ({"device": ["h100"]}, "'device'", "one of 'h100', 'h200', 'a100', 'cpu'"),
    "device: missing file": ({"device": "/nonexistent/spec.json"}, "'device'", "python -m attnfuse calibrate"),
    "inner": ({"inner": "tvm"}, "'inner'", "allowed: 'inductor' | 'eager'"),
    "inner: list": ({"inner": ["eager"]}, "'inner'", "allowed: 'inductor' | 'eager'"),
    "report: type": ({"report": 3}, "'report'", "None or a file path (str / os.PathLike) in an existing directory"),
    "report: empty": ({"report": ""}, "'report'", "a file path"),
    "report: no directory": ({"report": "/nonexistent/r.json"}, "'report'", "directory '/nonexistent' does not exist"),
    "report: a directory": ({"report": "/"}, "'report'", "'/' is a directory"),
    "strict": ({"strict": "yes"}, "'strict'", "allowed: True | False"),
    "strict: int": ({"strict": 1}, "'strict'", "allowed: True | False"),
    "verify": ({"verify": "yes"}, "'verify'", "allowed: False | True | 'forward'"),
    "verify: None": ({"verify": None}, "'verify'", "allowed: False | True | 'forward'"),
    "autotune": ({"autotune": "yes"}, "'autotune'", "allowed: False, True, or a dict with optional 'cache'"),
    "autotune.reps": ({"autotune": {"reps": 0}}, "'autotune.reps'", "allowed: an int >= 1"),
    "context_parallel": ({"context_parallel": "world"}, "'context_parallel'", "allowed: a torch.distributed "
                         "ProcessGroup, a 1-D DeviceMesh, or a dict"),
    "context_parallel.layout": ({"context_parallel": {"group": None, "layout": "ring"}}, "'context_parallel.layout'",
                                "allowed: 'contiguous' | 'zigzag'"),
}


@pytest.mark.parametrize("options, option, allowed", CASES.values(), ids=CASES.keys())
def test_bad_option_message(options, option, allowed):
    with pytest.raises(ValueError) as info:
        Config.from_options(options)
    text = str(info.value)
    assert text.startswith(("attnfuse: ", "attnfuse option ")), text
    assert option in text and allowed in text, text
    with pytest.raises(ValueError) as again:  # audit's own default (verify) does not hide the error
        attnfuse.audit(torch.nn.Identity(), torch.ones(1), options=options)
    assert str(again.value) == text


def test_lsh_settings_take_their_whole_range_and_the_policy_records_what_was_given():
    given = {"tables": 1, "bits": -1, "probes": 0, "cap": 0, "block": 96, "sink": 0, "local": 0, "seed": 0}
    policy = Config.from_options({"approximate": {**APPROX, "lsh": given}}).approximate
    assert policy["lsh"] == given and policy["pinned"] == {"topk": {}, "lsh": given}
    policy = Config.from_options({"approximate": {**APPROX, "lsh": {"bits": 16, "probes": 3}}}).approximate
    assert policy["lsh"]["bits"] == 16 and policy["lsh"]["probes"] == 3 and policy["lsh"]["tables"] == 8
    assert policy["pinned"]["lsh"] == {"bits": 16, "probes": 3}  # the rest are the cost model's (lshknobs)


def test_every_option_has_a_bad_value_case():
    named = {option.strip("'").split(".")[0] for _, option, _ in CASES.values()}
    assert {f.name for f in dataclasses.fields(Config)} <= named


def test_environment_defaults_name_their_variable(monkeypatch):
    monkeypatch.setenv("ATTNFUSE_VERIFY", "maybe")
    with pytest.raises(ValueError, match=r"^attnfuse option 'verify' \(from \$ATTNFUSE_VERIFY\): got 'maybe'; "
                                         r"allowed: False \| True \| 'forward'$"):
        Config.from_options()
    assert Config.from_options({"verify": False}).verify is False  # the option wins over the variable
    monkeypatch.delenv("ATTNFUSE_VERIFY")
    monkeypatch.setenv("ATTNFUSE_REPORT", "/nonexistent/r.json")
    with pytest.raises(ValueError, match=r"^attnfuse option 'report' \(from \$ATTNFUSE_REPORT\): .*does not exist"):
        Config.from_options()


def test_spec_file_errors_name_the_option(tmp_path):
    folder = tmp_path / "spec.json"
    folder.mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    for path, why in ((folder, "Is a directory"), (bad, "missing field")):
        with pytest.raises(ValueError, match=rf"^attnfuse option 'device': .*{why}.*; allowed: \"auto\", a DeviceSpec"):
            Config.from_options({"device": str(path)})


def test_options_not_a_dict_through_torch_compile():
    expected = str(pytest.raises(ValueError, Config.from_options, "flash").value)
    x = torch.randn(2, 3, 7, 8)
    compiled = torch.compile(lambda q: (q @ q.transpose(-2, -1)).softmax(-1) @ q, backend="attnfuse",
                             options="flash")
    with pytest.raises(Exception) as info:  # dynamo wraps a backend's error; the user reads attnfuse's message
        compiled(x)
    assert expected in str(info.value)
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


def test_export_and_cli_options(tmp_path):
    with pytest.raises(ValueError, match=r"^attnfuse: options must be a dict of option names to values"):
        attnfuse.export(torch.nn.Identity(), (torch.ones(1),), tmp_path / "m.pt2", options="flash")
    assert not (tmp_path / "m.pt2").exists()
    with pytest.raises(_Failure) as info:
        _options('{"inner": "tvm"}')
    assert info.value.code == 2 and str(info.value) == ("attnfuse option 'inner': got 'tvm'; "
                                                        "allowed: 'inductor' | 'eager'")
    with pytest.raises(_Failure, match="must be a JSON object"):
        _options('"flash"')

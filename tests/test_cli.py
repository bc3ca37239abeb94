"""The ``attnfuse`` CLI, end to end through subprocesses: ``audit`` and ``export`` on targets written into
``tmp_path`` (``file.py:fn`` and ``module:fn``), their output files, and every error case (exit code and
message, never a traceback)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import attnfuse

MODELS = textwrap.dedent('''
    import math

    import torch
    import torch.nn as nn

    from cli_helper import HEADS  # a neighbour module: the file's directory is on sys.path while it loads


    class Attn(nn.Module):
        def __init__(self, dim=24, heads=HEADS):
            super().__init__()
            self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

        def forward(self, x, gain=1.0):
            b, t, d = x.shape
            q, k, v = self.qkv(x * gain).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
            return self.out((p @ v).transpose(1, 2).reshape(b, t, d))


    class Branchy(Attn):
        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return super().forward(x)


    class Broken(Attn):
        def forward(self, x):
            return super().forward(x) @ torch.ones(5, 5)


    def _x():
        torch.manual_seed(0)
        return torch.randn(2, 7, 24)


    def model():
        torch.manual_seed(0)
        return Attn().eval(), (_x(),)


    def one_tensor():
        torch.manual_seed(0)
        return Attn().eval(), _x()


    def with_kwargs():
        return Attn().eval(), (_x(),), {"gain": 0.5}


    def branchy():
        return Branchy().eval(), (_x(),)


    def broken():
        return Broken().eval(), (_x(),)


    def raises():
        raise RuntimeError("no weights here")


    def bad_return():
        return 42


    def bad_args():
        return Attn(), 3


    def not_a_model():
        return "attn", (_x(),)


    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def targets(tmp_path):
    """``tmp_path`` holding the target files; the CLI runs from ``tmp_path/cwd`` so that nothing is importable
    from the working directory by accident."""
    (tmp_path / "cli_models.py").write_text(MODELS)
    (tmp_path / "cli_helper.py").write_text("HEADS = 3\n")
    (tmp_path / "broken_import.py").write_text("import not_a_real_package_xyz\n\ndef model():\n    pass\n")
    (tmp_path / "cwd").mkdir()
    return tmp_path


def cli(*argv: str, cwd, pythonpath=None, exe=None) -> subprocess.CompletedProcess:
    """Run the CLI; the environment (TRITON_INTERPRET included) is the parent's."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    cmd = [exe] if exe else [sys.executable, "-m", "attnfuse"]
    proc = subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def load_models(targets):
    spec = importlib.util.spec_from_file_location("_cli_models_under_test", targets / "cli_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(targets))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(targets))
    return module


# --- audit ---------------------------------------------------------------------------------------------------


def test_audit_file_target_prints_the_table_and_writes_json_and_html(targets):
    out_json, out_html = targets / "report.json", targets / "report.html"
    proc = cli("audit", targets / "cli_models.py:model", "--json", out_json, "--html", out_html, cwd=targets / "cwd")
    assert proc.returncode == 0, proc.stderr
    assert "attnfuse: 1 of 1 attention sites fused" in proc.stdout
    assert "cli_models.py:" in proc.stdout and "flash" in proc.stdout
    assert f"wrote {out_json}" in proc.stderr
    report = attnfuse.Report.load(out_json)
    (site,) = report.sites
    assert site.status == "fused" and site.kernel == "flash" and site.shapes["q"] == [2, 3, 7, 8]
    assert f"wrote {out_html}" in proc.stderr
    page = out_html.read_text()
    assert site.source in page and "flash" in page


def test_audit_module_target_with_kwargs_and_options(targets):
    """``module:fn`` (tmp_path on PYTHONPATH); kwargs reach the model; ``--options`` is applied: only the
    window kernel allowed, so the (unmasked) site is skipped with a reason."""
    proc = cli("audit", "cli_models:with_kwargs", "--options", '{"kernels": ["window"]}', cwd=targets / "cwd",
               pythonpath=targets)
    assert proc.returncode == 0, proc.stderr
    assert "attnfuse: 0 of 1 attention sites fused" in proc.stdout and "skipped" in proc.stdout


def test_console_script_with_options_file(targets):
    exe = os.path.join(os.path.dirname(sys.executable), "attnfuse")
    if not os.path.exists(exe):
        pytest.skip("no attnfuse console script next to this python (pip install -e . installs it)")
    (targets / "opts.json").write_text(json.dumps({"kernels": ["flash"], "device": "cpu"}))
    proc = cli("audit", targets / "cli_models.py:one_tensor", "--options", "@" + str(targets / "opts.json"),
               cwd=targets / "cwd", exe=exe)
    assert proc.returncode == 0, proc.stderr
    assert "attnfuse: 1 of 1 attention sites fused (device: cpu)" in proc.stdout


def test_audit_trace_failure_names_the_line(targets):
    proc = cli("audit", targets / "cli_models.py:broken", cwd=targets / "cwd")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("attnfuse audit: the model failed to trace: ")
    assert "cli_models.py:" in proc.stderr and "torch.ones(5, 5)" in proc.stderr
    assert proc.stdout == ""


# --- usage errors (exit 2) -------------------------------------------------------------------------------------


USAGE_ERRORS = {
    "no colon": (["audit", "cli_models.py"], "TARGET must be 'path/to/file.py:fn' or 'pkg.module:fn'"),
    "missing file": (["audit", "nowhere.py:model"], "no such file: nowhere.py"),
    "import error": (["audit", "{t}/broken_import.py:model"], "No module named 'not_a_real_package_xyz'"),
    "missing module": (["audit", "no_such_module_xyz:model"], "cannot import no_such_module_xyz"),
    "missing function": (["audit", "{t}/cli_models.py:mdoel"], "has no 'mdoel'; its callables: Attn, Branchy"),
    "not callable": (["audit", "{t}/cli_models.py:NOT_A_FUNCTION"], "is a int, not a function"),
    "function raises": (["audit", "{t}/cli_models.py:raises"], "raises() raised RuntimeError: no weights here"),
    "bad return": (["audit", "{t}/cli_models.py:bad_return"], "must return (model, example_args)"),
    "bad args": (["audit", "{t}/cli_models.py:bad_args"], "returned a int as example_args"),
    "not a model": (["audit", "{t}/cli_models.py:not_a_model"], "returned a str as the model"),
    "bad json": (["audit", "{t}/cli_models.py:model", "--options", "{kernels: 1}"], "--options is not valid JSON"),
    "json list": (["audit", "{t}/cli_models.py:model", "--options", "[1]"], "must be a JSON object"),
    "missing options file": (["audit", "{t}/cli_models.py:model", "--options", "@{t}/none.json"], "cannot read"),
    "bad option value": (["audit", "{t}/cli_models.py:model", "--options", '{"kernels": ["warp"]}'],
                         "attnfuse option 'kernels': got 'warp'; allowed"),
    "unknown option": (["export", "{t}/cli_models.py:model", "--format", "pt2", "-o", "{t}/x.pt2", "--options",
                        '{"kernal": "flash"}'], "unknown option 'kernal'"),
    "export kwargs": (["export", "{t}/cli_models.py:with_kwargs", "--format", "pt2", "-o", "{t}/x.pt2"],
                      "returned keyword arguments (gain); export takes positional example args only"),
    "dynamic dims syntax": (["export", "{t}/cli_models.py:model", "--format", "pt2", "-o", "{t}/x.pt2",
                             "--dynamic-dims", "x.1=seq"],
                            "--dynamic-dims: cannot read 'x.1=seq'; expected INPUT.DIM=NAME[:MIN..MAX] entries"),
    "dynamic dims input": (["export", "{t}/cli_models.py:model", "--format", "pt2", "-o", "{t}/x.pt2",
                            "--dynamic-dims", "0.0=batch,1.0=batch"],
                           "--dynamic-dims '1.0=batch': there is no input 1; the example args are inputs 0..0"),
    "dynamic dims dim": (["export", "{t}/cli_models.py:model", "--format", "pt2", "-o", "{t}/x.pt2",
                          "--dynamic-dims", "0.3=d"], "input 0 has 3 dims (shape (2, 7, 24)), so DIM must be 0..2"),
    "dynamic dims range": (["export", "{t}/cli_models.py:model", "--format", "pt2", "-o", "{t}/x.pt2",
                            "--dynamic-dims", "0.1=seq:8..64"], "seq's range 8..64 excludes the example size of 0.1"),
    "dynamic both": (["export", "{t}/cli_models.py:model", "--format", "pt2", "-o", "{t}/x.pt2", "--dynamic",
                      "--dynamic-dims", "0.0=b"], "--dynamic and --dynamic-dims exclude each other"),
    "dynamic dims fixed by the model": (["export", "{t}/cli_models.py:model", "--format", "pt2", "-o", "{t}/x.pt2",
                                         "--dynamic-dims", "0.1=seq,0.2=hidden"],
                                        "--dynamic-dims: torch.export cannot keep these dims dynamic: Constraints "
                                        "violated (hidden)!; You marked hidden as dynamic but your code specialized "
                                        "it to be a constant (24); suggested fixes: hidden = 24"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_usage_errors(targets, case):
    argv, message = USAGE_ERRORS[case]
    proc = cli(*(a.replace("{t}", str(targets)) for a in argv), cwd=targets / "cwd")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"attnfuse {argv[0]}: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (targets / "x.pt2").exists()


# --- export ----------------------------------------------------------------------------------------------------


def _clean(proc, out) -> None:
    """No library warnings, and the written file named once (``attnfuse: wrote FILE``)."""
    text = proc.stdout + proc.stderr
    assert "FutureWarning" not in text and "LeafSpec" not in text, text
    assert text.count(str(out)) == 1 and f"attnfuse: wrote {out}\n" in proc.stdout, text


def test_export_pt2_loads_back_and_matches_eager(targets):
    out = targets / "model.pt2"
    proc = cli("export", targets / "cli_models.py:model", "--format", "pt2", "-o", out, cwd=targets / "cwd")
    assert proc.returncode == 0, proc.stderr
    assert "attnfuse: 1 of 1 attention sites fused" in proc.stdout
    assert "note: exported as pt2, static shapes\n" in proc.stdout
    _clean(proc, out)
    ep = torch.export.load(out)
    assert any("attnfuse" in str(n.target) for n in ep.graph.nodes)
    model, args = load_models(targets).model()
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), model(*args), rtol=1e-4, atol=1e-5)


def test_export_onnx(targets):
    onnx = pytest.importorskip("onnx")
    out = targets / "model.onnx"
    proc = cli("export", targets / "cli_models.py:one_tensor", "--format", "onnx", "-o", out, cwd=targets / "cwd")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert onnx.load(str(out)).graph.node


def test_export_onnx_dynamic_runs_at_other_sizes(targets):
    """``--dynamic``: every dim Dim.AUTO; the model fixes the hidden size (24), batch and length stay dynamic."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = targets / "dyn.onnx"
    proc = cli("export", targets / "cli_models.py:one_tensor", "--format", "onnx", "-o", out, "--dynamic",
               cwd=targets / "cwd")
    assert proc.returncode == 0, proc.stderr
    _clean(proc, out)
    assert re.search(r"^note: exported as onnx, dynamic dims: x \((s\d+), (s\d+), 24\); \1 2\.\., \2 2\.\.$",
                     proc.stdout, re.M), proc.stdout
    model, _ = load_models(targets).model()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in ((3, 11, 24), (5, 29, 24)):
        x = torch.randn(*shape)
        with torch.no_grad():
            eager = model(x)
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), eager, rtol=1e-4,
                                   atol=2e-5)


def test_export_pt2_dynamic_dims_named_with_a_range(targets):
    out = targets / "dyn.pt2"
    proc = cli("export", targets / "cli_models.py:model", "--format", "pt2", "-o", out, "--dynamic-dims",
               "0.0=batch", "--dynamic-dims", "0.1=seq:2..64", cwd=targets / "cwd")
    assert proc.returncode == 0, proc.stderr
    _clean(proc, out)
    assert "\nnote: exported as pt2, dynamic dims: x (batch, seq, 24); batch 0.., seq 2..64\n" in proc.stdout
    ep = torch.export.load(out)
    model, _ = load_models(targets).model()
    for shape in ((3, 11, 24), (5, 29, 24)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match=re.escape("x.size()[1] <= 64")):
        ep.module()(torch.randn(2, 65, 24))


def test_export_help_documents_dynamic_dims():
    proc = subprocess.run([sys.executable, "-m", "attnfuse", "export", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "--dynamic " in text and "INPUT.DIM=NAME[:MIN..MAX]" in text and "0.0=batch,0.1=seq:1..4096" in text


def test_export_mlir(targets):
    pytest.importorskip("torch_mlir")
    out = targets / "model.mlir"
    proc = cli("export", "cli_models:model", "--format", "mlir", "-o", out, "--mlir-output", "torch",
               cwd=targets / "cwd", pythonpath=targets)
    assert proc.returncode == 0, proc.stderr
    assert "func.func" in out.read_text()


def test_export_trace_failure_data_dependent_branch(targets):
    out = targets / "branchy.pt2"
    proc = cli("export", targets / "cli_models.py:branchy", "--format", "pt2", "-o", out, cwd=targets / "cwd")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("attnfuse export: the model failed to trace: ")
    assert "if x.sum() > 0" in proc.stderr
    assert not out.exists()

"""backend_info(), and the pure-PyTorch path taken without the extension."""

import os
import subprocess
import sys
import textwrap

import torch

import bigkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_info_reports_the_build():
    info = bigkernels.backend_info()
    assert info["extension_loaded"], f"the tests expect a built extension: {info['extension_error']}"
    assert info["extension_error"] is None
    assert info["version"] == bigkernels.__version__
    assert info["torch_version"] == torch.__version__
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and info["built_with_cuda"]
    assert hasattr(torch.ops.bigkernels, "dense_forward")


def test_backend_info_says_the_sm90_path_is_unverified(monkeypatch):
    from bigkernels._info import BUILD_INFO
    monkeypatch.setenv("BIGKERNELS_SM90", "1")
    status = bigkernels.backend_info()["sm90_dense"]
    if BUILD_INFO.get("sm90_cutlass"):
        assert status.startswith("built, on") and "unverified" in status
        monkeypatch.delenv("BIGKERNELS_SM90")
        assert bigkernels.backend_info()["sm90_dense"].startswith("built, off")
    else:
        assert status.startswith("not built")


FALLBACK_SCRIPT = textwrap.dedent("""
    import warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import bigkernels
    messages = [str(w.message) for w in caught if "bigkernels" in str(w.message)]
    assert len(messages) == 1, messages
    assert "BIGKERNELS_DISABLE_EXTENSION=1" in messages[0], messages[0]
    info = bigkernels.backend_info()
    assert info["extension_loaded"] is False and "BIGKERNELS_DISABLE_EXTENSION" in info["extension_error"]
    assert not hasattr(torch.ops.bigkernels, "dense_forward")

    from bigkernels import reference
    torch.manual_seed(0)
    for act in ("relu", "gelu", "swiglu"):
        rows = 10 if act == "swiglu" else 5
        x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
        w = torch.randn(rows, 7, dtype=torch.float64, requires_grad=True)
        b = torch.randn(rows, dtype=torch.float64, requires_grad=True)
        out = bigkernels.dense(x, w, b, act)
        torch.testing.assert_close(out, reference.dense(x, w, b, act))
        assert torch.autograd.gradcheck(lambda *t: bigkernels.dense(*t, activation=act), (x, w, b))
    try:
        bigkernels.dense(torch.ones(2, 3), torch.ones(4, 5))
    except ValueError as e:
        assert "last dimension" in str(e)
    else:
        raise AssertionError("bad shapes were accepted")
    model = bigkernels.models.DNN(4, 8, 2)
    model(torch.randn(5, 4)).sum().backward()
    seq = bigkernels.optimize(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    assert seq(torch.randn(2, 4)).min() >= 0
    print("fallback ok")
""")


def test_every_public_function_works_without_the_extension():
    env = dict(os.environ, BIGKERNELS_DISABLE_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback ok" in result.stdout

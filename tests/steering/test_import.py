"""`mup steering import`: torch `.pt` vector files (the BiPO study's) read without torch.

torch only WRITES the files here (test-only dependency); the reader under test never imports it
(checked in a fresh process).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mup.steering import VectorFileError, load_vector
from mup.steering._import import import_pt, read_pt

torch = pytest.importorskip("torch", reason="torch writes the .pt files the reader is tested on")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("shape", [(9,), (1, 9)], ids=["D", "1xD"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_pt_vectors_read_exactly(tmp_path, dtype, shape, legacy):
    t = (torch.randn(*shape) * 3).to(DTYPES[dtype])
    path = tmp_path / "v.pt"
    torch.save(t, path, _use_new_zipfile_serialization=not legacy)
    vec, saved = read_pt(path)
    assert saved == dtype and vec.dtype == np.float32 and vec.shape == (9,)
    np.testing.assert_array_equal(vec, t.float().numpy().reshape(-1))


def test_pt_parameters_views_and_single_tensor_dicts(tmp_path):
    path = tmp_path / "v.pt"
    base = torch.randn(20).to(torch.bfloat16)
    torch.save(base[3:15:3], path)  # a strided view into a larger storage
    np.testing.assert_array_equal(read_pt(path)[0], base[3:15:3].float().numpy())
    torch.save(torch.nn.Parameter(torch.arange(4.0)), path)
    np.testing.assert_array_equal(read_pt(path)[0], np.arange(4.0, dtype=np.float32))
    torch.save({"model.layers.15.vec": torch.ones(5, dtype=torch.float16)}, path)
    np.testing.assert_array_equal(read_pt(path)[0], np.ones(5, np.float32))


class _Payload:
    """A pickle that would create a file when loaded by an unrestricted unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt_refuses_anything_else(tmp_path):
    path = tmp_path / "v.pt"
    cases = [
        (torch.ones(2, 3), r"shape \[2, 3\]; a steering vector is \[D\] or \[1, D\]"),
        (torch.ones(0), r"shape \[0\]"),
        (torch.ones(3, dtype=torch.int64), "refusing pickle global torch.LongStorage"),
        ({"a": torch.ones(2), "b": torch.ones(2)}, "exactly one tensor is needed"),
        ([torch.ones(3)], "holds a list, not a tensor"),
    ]
    for obj, message in cases:
        torch.save(obj, path)
        with pytest.raises(VectorFileError, match=message):
            read_pt(path)
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), path)  # zip layout, hostile data.pkl
    with pytest.raises(VectorFileError, match="refusing pickle global"):
        read_pt(path)
    path.write_bytes(pickle.dumps(_Payload(marker)))  # a bare pickle
    with pytest.raises(VectorFileError, match="refusing pickle global|no torch magic"):
        read_pt(path)
    assert not marker.exists()
    path.write_bytes(b"")
    with pytest.raises(VectorFileError, match="empty file"):
        read_pt(path)
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(VectorFileError, match="neither a zip nor a legacy torch file"):
        read_pt(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/other.txt", "hi")
    with pytest.raises(VectorFileError, match="no single ARCHIVE/data.pkl"):
        read_pt(path)
    with pytest.raises(FileNotFoundError):
        read_pt(tmp_path / "missing.pt")


def test_import_pt_block_and_epoch_from_the_study_name(tmp_path):
    t = torch.randn(6).to(torch.bfloat16)
    path = tmp_path / "vec_ep7_layer31_gpu0.pt"
    torch.save(t, path)
    sv = import_pt(path, model="m")
    assert (sv.block, sv.epoch, sv.method, sv.model) == (31, 7, "bipo-pt", "m")
    assert sv.extra["source_dtype"] == "bfloat16"
    assert import_pt(path, block=31).block == 31
    with pytest.raises(
        VectorFileError, match=r"file name says block 31 \(its _layer31\), but block 30"
    ):
        import_pt(path, block=30)
    with pytest.raises(VectorFileError, match="6 entries but the model has d_model=8"):
        import_pt(path, d_model=8)
    other = tmp_path / "steer.pt"
    torch.save(t, other)
    with pytest.raises(VectorFileError, match="the block is not in the file name"):
        import_pt(other)
    assert import_pt(other, block=2).epoch == 0


def test_import_pt_old_layer_keyword(tmp_path):
    """`layer=` is the old name of `block=`: it still works, with a DeprecationWarning."""
    path = tmp_path / "vec_ep2_layer5.pt"
    torch.save(torch.randn(4), path)
    with pytest.warns(DeprecationWarning, match="layer= is deprecated, use block="):
        assert import_pt(path, layer=5).block == 5


def test_cli_import_runs_without_torch(tmp_path, capfd):
    """The real command in a fresh process: converts the file and never imports torch."""
    from mup._resolve import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    t = torch.randn(576).to(torch.bfloat16)  # SmolLM2-135M's d_model
    src = tmp_path / "vec_ep3_layer12.pt"
    torch.save(t, src)
    out = tmp_path / "v.safetensors"
    code = (
        "import sys; from mup.steering._cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", code, "import", str(src), "--model", "smollm2-135m"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "bfloat16" in proc.stdout and "steered block 12" in proc.stdout
    sv = load_vector(out, d_model=576)
    assert (sv.block, sv.epoch, sv.method) == (12, 3, "bipo-pt")
    np.testing.assert_array_equal(sv.vector, t.float().numpy())
    assert json.loads(json.dumps(sv.extra))["source"] == str(src)
    from mup.steering._cli import main

    # usage errors exit 2 (in this process: one fresh process is enough for the torch check)
    unwritten = tmp_path / "b.safetensors"
    at_block_40 = ["--model", "smollm2-135m", "--block", "40", "--out", str(unwritten)]
    assert main(["import", str(src), *at_block_40]) == 2
    capsys_err = capfd.readouterr().err
    assert "file name says block 12" in capsys_err
    plain = tmp_path / "steer.pt"
    torch.save(t, plain)
    # --layer is the old name of --block (argparse would exit on an unknown flag)
    at_layer_40 = ["--model", "smollm2-135m", "--layer", "40", "--out", str(unwritten)]
    assert main(["import", str(plain), *at_layer_40]) == 2
    assert "--block 40 is out of range" in capfd.readouterr().err
    assert not unwritten.exists()

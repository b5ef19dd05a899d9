"""`cdam-fast segment` refuses bad arguments before reading images or loading a model, and
`--overwrite` over another configuration's results discards them (the folder never mixes two
configurations)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cdam_fast as cf
from cdam_fast.cli import main
from test_bulk_segment import ARGS


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("extra, names", [
    (["--stride", "0"], "--stride"),
    (["--short-side", "-5"], "--short-side"),
    (["--crop", "0"], "--crop"),
    (["--crop", "32", "--stride", "48"], "--stride"),
    (["--pamr", "-1"], "--pamr"),
    (["--background", "-0.1"], "--background"),
    (["--background", "nan"], "--background"),
    (["--dtype", "fp16"], "dtype"),
])
def test_bad_arguments_are_named_before_anything_runs(photo, tmp_path, capsys, extra, names):
    rc = main(["segment", str(photo), *ARGS, *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and names in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_argument_error(photo, tmp_path, capsys):
    args = [a if a != "cpu" else "cuda" for a in ARGS]
    rc = main(["segment", str(photo), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "device" in err and "no CUDA device" in err and "Traceback" not in err, err


def test_output_folder_holding_every_input_is_refused(photo, capsys):
    rc = main(["segment", str(photo.parent), *ARGS, "--out", str(photo.parent)])
    err = capsys.readouterr().err
    assert rc == 2 and "inside the output folder" in err, err


def test_overwrite_discards_another_configurations_outputs(photo, tmp_path, capsys):
    second = photo.parent / "b.png"
    second.write_bytes(photo.read_bytes())
    out = tmp_path / "o"
    assert main(["segment", str(photo.parent), *ARGS, "--out", str(out)]) == 0
    assert (out / "b_labels.png").exists()
    other = [a if a != "background,cat,sofa" else "background,cat" for a in ARGS]
    assert main(["segment", str(photo), *other, "--out", str(out)]) == 2  # refused without --overwrite
    assert "different run" in capsys.readouterr().err
    assert main(["segment", str(photo), *other, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "b_labels.png").exists()  # the old configuration's b is gone, not left unrecorded
    assert main(["segment", str(photo.parent), *other, "--out", str(out)]) == 0  # resumes: only b is new
    assert "1 done, 1 skipped" in capsys.readouterr().err


def test_materialize_mode_does_not_read_the_budget_variable(monkeypatch):
    monkeypatch.setenv("CDAM_FAST_MEMORY_BUDGET", "lots")
    p = torch.softmax(torch.randn(1, 5, 3), -1)
    v = torch.randn(1, 5, 4)
    cf.cdam_attention(p, v, mode="materialize", backend="reference")
    with pytest.raises(cf.CdamInputError, match="CDAM_FAST_MEMORY_BUDGET"):
        cf.cdam_attention(p, v, backend="reference")  # auto mode uses it: the bad value is named


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cdam_fast.pipeline.segmenter.load_clip", refuse)


def _refused(argv, capsys, *messages):
    rc = main(["segment", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "model was loaded" not in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line
    for m in messages:
        assert m in err, err
    return err


def test_output_folder_that_cannot_be_created(photo, tmp_path, capsys, no_model):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused([str(photo), *ARGS, "--out", str(a_file / "out")], capsys, "--out", "is a file, not a folder")
    _refused([str(photo), *ARGS, "--out", str(a_file)], capsys, "--out", "is a file, not a folder")
    if Path("/sys").is_dir():  # a virtual file system: nothing can be created there, even by root
        _refused([str(photo), *ARGS, "--out", "/sys/cdam-out"], capsys, "--out", "cannot be created")
    assert a_file.read_text() == "x" and not list(tmp_path.glob(".cdam-probe-*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine: Triton and CUDA cannot run")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backend_on_a_cpu_run(photo, tmp_path, capsys, no_model, monkeypatch, backend):
    # The tests' interpreter is no user's Triton. The kernels read TRITON_INTERPRET once, at import:
    # import them under the tests' setting first (importing them below, with it unset, would leave
    # every later test in this process without the interpreter), then patch what they read.
    if importlib.util.find_spec("triton") is not None:  # without Triton nothing reads the setting
        from cdam_fast.kernels import common as kernels

        monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _refused([str(photo), *ARGS, "--backend", backend, "--out", str(tmp_path / "o")], capsys,
             f"--backend {backend} cannot run on cpu")
    assert not (tmp_path / "o").exists()


def test_crop_smaller_than_a_patch(photo, tmp_path, capsys, no_model):
    err = _refused([str(photo), *ARGS, "--crop", "8", "--stride", "8", "--out", str(tmp_path / "o")], capsys,
                   "--crop 8 is smaller than one 16x16 patch")
    assert "elongated" not in err


def test_ctrl_c_says_how_far_it_got_and_resumes(photo, tmp_path, capsys, monkeypatch, one_thread):
    from cdam_fast.pipeline import fileio

    for name in ("b", "c"):
        (photo.parent / f"{name}.png").write_bytes(photo.read_bytes())
    write, calls = fileio.write_outputs, []

    def interrupted_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(*args, **kwargs)

    monkeypatch.setattr(fileio, "write_outputs", interrupted_at_the_second)
    out = tmp_path / "o"
    rc = main(["segment", str(photo.parent), *ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted after 1 image; rerun to resume" in err and "Traceback" not in err, err
    monkeypatch.setattr(fileio, "write_outputs", write)
    assert main(["segment", str(photo.parent), *ARGS, "--out", str(out)]) == 0
    assert "2 done, 1 skipped" in capsys.readouterr().err

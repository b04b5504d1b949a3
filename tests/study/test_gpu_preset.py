"""The ``gpu`` preset: a scale sweep of four testbed sizes, one study per size
(``--preset gpu:64m``), every run on ``cuda``; on a machine without a GPU the commands
stop before touching ``--out``."""

from __future__ import annotations

import pytest
import torch

from evil_moe.cli.main import main
from evil_moe.models.testbed import Testbed
from evil_moe.study.spec import StudyError, expand, load_spec, unique_runs

#: deployed (shared) parameters of each scale, in millions, as the preset states them
SHARED = {"8m": 8.5, "16m": 16.8, "32m": 32.7, "64m": 60.5}


@pytest.mark.parametrize("scale", list(SHARED))
def test_each_scale_is_its_own_study_of_that_size(scale):
    spec, source = load_spec(f"gpu:{scale}")
    assert source == f"preset gpu:{scale}" and spec.study.name == f"gpu-{scale}"
    runs = unique_runs(expand(spec))
    assert len(runs) == 63 and {r.config.train.device for r in runs} == {"cuda"}
    kinds = {r.kind for r in runs}
    assert kinds == {"grid", "baseline"}  # each size has its own baseline curve
    model = Testbed(runs[0].config.model)
    shared = model.num_parameters()["shared"] / 1e6
    assert shared == pytest.approx(SHARED[scale], abs=0.05)


def test_scales_have_distinct_study_ids_and_the_sweep_needs_a_scale():
    ids = {load_spec(f"gpu:{s}")[0].study_id for s in SHARED}
    assert len(ids) == len(SHARED)
    with pytest.raises(StudyError, match="gpu:8m, gpu:16m, gpu:32m, gpu:64m"):
        load_spec("gpu")
    with pytest.raises(StudyError, match="no \\[scales\\]"):
        load_spec("quick:8m")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
def test_gpu_commands_stop_cleanly_without_a_gpu(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "study"
    assert main(["study", "--preset", "gpu:8m", "--out", str(out), "--quiet"]) == 2
    assert "no GPU" in capsys.readouterr().err and not out.exists()
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_overrides, "train.device=cuda"]) == 2
    assert "no GPU" in capsys.readouterr().err and not run.exists()

"""The command line's own checks: help with defaults, bad devices, no silent overwrite."""

from __future__ import annotations

import pytest

from circuitlab.cli import main


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["trace", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--out", "--force", "--device", "--max-feature-nodes", "--node-threshold",
                   "--edge-threshold", "--top", "--model", "--transcoders"):
        assert option in text
    assert "(default: 8192)" in text and "(default: cpu)" in text and "(default: 0.8)" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1536)" in text and "(default: 64)" in text


@pytest.mark.parametrize("command", [["trace"], ["eval-transcoders", "x"], ["cards"]])
def test_unknown_device_is_a_clear_error(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(command + ["--device", "tpu9"]) == 2
    assert "Unknown device 'tpu9'" in capsys.readouterr().err


def test_missing_cuda_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "--device", "cuda"]) == 2
    assert "not available here" in capsys.readouterr().err


def test_trace_does_not_overwrite_without_force(tmp_path, capsys):
    (tmp_path / "graph").mkdir()
    (tmp_path / "graph" / "graph.json").write_text("{}")
    assert main(["trace", "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "graph" / "graph.json").read_text() == "{}"

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


# ----------------------------------------------------------------------------- targets


@pytest.fixture
def tiny_trace(tiny_rm, monkeypatch):
    """``circuitlab trace`` on the tiny model (``--model tiny``), and that model."""
    from circuitlab import commands

    monkeypatch.setattr(commands, "load", lambda model, *a, **k: tiny_rm)
    return ["--model", "tiny", "--max-feature-nodes", "8"], tiny_rm


def active_feature(rm, text: str, pos: int):
    """``feature:LAYER:POS:FEATURE`` of a feature active at ``pos`` of ``text``, and its node id."""
    trace = rm.run(rm.tokenize(text))
    for layer in range(rm.n_layers):
        p, f, _ = trace.features[layer]
        here = f[p == pos]
        if len(here):
            return f"feature:{layer}:{pos}:{int(here[0])}", f"{layer}_{int(here[0])}_{pos}"
    raise AssertionError(f"no feature is active at position {pos} of {text!r}")


def test_trace_targets(tiny_trace, tmp_path, capsys):
    """A token at the last position, a token at a position, a logit difference at a negative
    position and a feature: the graph's targets are what the specs say."""
    from circuitlab import Graph

    base, rm = tiny_trace
    prompt = "the cat sat"  # character tokens: BOS and 11 characters
    feature, fid = active_feature(rm, prompt, 4)
    assert main(["trace", prompt, "--out", str(tmp_path / "a"), "--target", "a",
                 "--target", "b@5", "--target", '"c" - "d"@-3', "--target", feature] + base) == 0
    printed = capsys.readouterr().out
    assert "Logit targets:" in printed and "Feature targets:" in printed
    graph = Graph.load(tmp_path / "a" / "graph")
    L, ids = rm.n_layers, rm.token_id
    assert graph.metadata["targets"] == [fid, f"{L + 1}_{ids('a')}_11", f"{L + 1}_{ids('b')}_5",
                                         f"{L + 1}_-4_9"]
    logits = graph.nodes[graph.nodes.kind == "logit"]
    assert list(zip(logits.token, logits.pos)) == [("a", 11), ("b", 5), ("c - d", 9)]
    assert fid in Graph.load(tmp_path / "a" / "pruned").nodes.node_id.tolist()

    feature, fid = active_feature(rm, "the cat sat", 9)  # a completion position
    assert main(["trace", "the cat", "--out", str(tmp_path / "b"), "--completion", " sat",
                 "--explain", "s", "--explain", "2", "--target", feature] + base) == 0
    graph = Graph.load(tmp_path / "b" / "graph")
    assert graph.prompt == "the cat sat"
    assert graph.metadata["targets"] == [fid, f"{L + 1}_{ids('s')}_8", f"{L + 1}_{ids('a')}_9"]


@pytest.mark.parametrize("args, message", [
    (["--target", "feature:1:2"], "feature:LAYER:POS:FEATURE, three integers"),
    (["--target", '"a"-b'], "both tokens of a difference in double quotes"),
    (["--explain", "0"], "add --completion"),
    (["--completion", " b", "--target", "a"], "drop --target 'a'"),
])
def test_bad_target_is_a_clear_error(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "the cat", "--model", "no-such-model"] + args) == 2
    err = capsys.readouterr().err
    assert message in err and "circuitlab: " in err
    if "--target" in args and "--completion" not in args:
        assert f"--target {args[1]!r}" in err and "Accepted forms" in err
    assert not (tmp_path / "out").exists()

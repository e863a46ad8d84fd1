"""Tests for transcoder training and evaluation on the tiny random Gemma-3-like model."""

import errno
import json
import math
import re
from functools import partial

import pytest
import torch
from conftest import SMALL
from sae_lens import SAE

from circuitlab import cli, commands
from circuitlab.errors import CircuitlabError
from circuitlab.files import sha256, verify_manifest
from circuitlab.loading import load_transcoders
from circuitlab.precision import fast_bf16
from circuitlab.replacement import ReplacementModel
from circuitlab.train import checkpoints, data, export, topk
from circuitlab.train.evaluate import evaluate_transcoders, format_table
from circuitlab.train.trainer import train_transcoders



def weights_sha(out):
    return {p.parent.name: sha256(p) for p in sorted(out.glob("layer_*/sae_weights.safetensors"))}


def test_train_writes_loadable_sae_lens_folders(model, trained):
    manifest = json.loads((trained / "manifest.json").read_text())
    verify_manifest(trained, "trained transcoders", "retrain")
    assert manifest["tokens_seen"] >= 20_000 and manifest["stopped"] == "tokens"
    assert "train_transcoders(" in manifest["command"]
    assert manifest["settings"]["bf16"] is fast_bf16("cpu")  # the default: bf16 where it is fast
    for layer in range(3):
        sae = SAE.load_from_disk(trained / f"layer_{layer:02d}")
        assert type(sae).__name__ == "JumpReLUSkipTranscoder"
        assert sae.W_enc.dtype == torch.float32 and sae.W_enc.shape == (32, 64)
        assert sae.W_skip.shape == (32, 32) and (sae.threshold >= 0).all()
        meta = sae.cfg.metadata
        assert meta.hook_name == f"blocks.{layer}.hook_mlp_in"
        assert meta.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        assert meta.hf_hook_name == f"model.layers.{layer}.pre_feedforward_layernorm.output"
        cal = manifest["calibration"][str(layer)]
        assert cal["fvu_topk"] < 0.8
        assert abs(cal["fvu_jumprelu"] - cal["fvu_topk"]) < 0.05
        assert abs(cal["l0_jumprelu"] - 4) < 1
    rm = ReplacementModel(model, load_transcoders(trained, None, 3))
    assert torch.isfinite(rm.forward(rm.tokenize("the cat sat"))).all()


def test_evaluate_trained_beats_skip_only(model, corpus, trained, tmp_path):
    transcoders = load_transcoders(trained, None, 3)
    lines = [json.dumps({"text": doc}) for doc in corpus.read_text().split("\n\n")[:200]]
    (tmp_path / "heldout.jsonl").write_text("\n".join(lines), encoding="utf-8")
    df = evaluate_transcoders(model, transcoders, tmp_path, tokens=2_000, context=64)
    assert list(df.columns) == ["layer", "fvu", "l0", "dead"] and len(df) == 3
    assert ((df.fvu >= 0) & (df.fvu < 0.8)).all()
    assert ((df.dead >= 0) & (df.dead <= 1)).all() and (df.l0 > 0).all()
    assert math.isfinite(df.attrs["ce_clean"]) and math.isfinite(df.attrs["ce_spliced"])
    assert df.attrs["ce_increase"] == pytest.approx(df.attrs["ce_spliced"] - df.attrs["ce_clean"])
    for tc in transcoders:  # without features only the affine skip is left
        tc.W_dec.data.zero_()
    skip_only = evaluate_transcoders(model, transcoders, tmp_path, tokens=2_000, context=64)
    assert (df.fvu < skip_only.fvu).all()
    table = format_table(df)
    assert table.startswith("| layer |") and "| mean |" in table and "spliced" in table


def test_evaluate_reports_both_splits_side_by_side(model, corpus, trained, tmp_path, monkeypatch,
                                                  capsys):
    transcoders = load_transcoders(trained, None, 3)
    docs = corpus.read_text().split("\n\n")
    (tmp_path / "heldout.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:60]))
    (tmp_path / "prose.jsonl").write_text("\n".join(json.dumps({"text": d.upper()}) for d in docs[60:120]))
    both = evaluate_transcoders(model, transcoders, tmp_path, tokens=1_000, context=64,
                                split="heldout,prose")
    assert list(both) == ["heldout", "prose"]
    alone = {s: evaluate_transcoders(model, transcoders, tmp_path, tokens=1_000, context=64, split=s)
             for s in both}
    for split, df in both.items():
        assert df.attrs == alone[split].attrs and df.attrs["split"] == split
        assert df.equals(alone[split]) and list(df.columns) == ["layer", "fvu", "l0", "dead"]
    assert not both["heldout"].fvu.equals(both["prose"].fvu)
    assert both["heldout"].attrs["ce_increase"] != both["prose"].attrs["ce_increase"]
    listed = evaluate_transcoders(model, transcoders, tmp_path, tokens=1_000, context=64,
                                  split=["prose"])
    assert list(listed) == ["prose"] and listed["prose"].equals(both["prose"])

    table = format_table(both)
    head, _, *layers = table.splitlines()
    assert head == ("| layer | FVU (heldout) | L0 (heldout) | dead (heldout) | FVU (prose) | L0 (prose) "
                    "| dead (prose) |")
    assert [row.count("|") for row in layers[:4]] == [8] * 4 and layers[3].startswith("| mean |")
    ce = both["prose"].attrs["ce_increase"]
    assert "| | heldout | prose |" in table and f" {ce:+.3f} |" in table.split("| CE increase |")[1]

    # The command line evaluates both splits by default and writes both to JSON.
    monkeypatch.setattr(commands, "load_model", lambda *args, **kwargs: model)
    monkeypatch.setattr(commands, "load_transcoders", lambda *args, **kwargs: transcoders)
    monkeypatch.setattr(commands, "evaluate_transcoders", partial(evaluate_transcoders, context=64))
    out = tmp_path / "eval.json"
    assert cli.main(["eval-transcoders", str(trained), "--corpus", str(tmp_path), "--tokens",
                     "1000", "--json", str(out)]) == 0
    assert "FVU (prose)" in capsys.readouterr().out
    doc = json.loads(out.read_text())["splits"]
    assert list(doc) == ["heldout", "prose"] and len(doc["prose"]["layers"]) == 3
    assert doc["prose"]["ce_increase"] == pytest.approx(ce)
    (tmp_path / "prose.jsonl").unlink()
    with pytest.raises(CircuitlabError, match="no prose.jsonl.*circuitlab corpus"):
        evaluate_transcoders(model, transcoders, tmp_path, tokens=1_000, context=64,
                             split="heldout,prose")


def test_per_layer_ce_splices_one_layer_at_a_time(model, corpus, trained, tmp_path):
    transcoders = load_transcoders(trained, None, 3)
    lines = [json.dumps({"text": doc}) for doc in corpus.read_text().split("\n\n")[:50]]
    (tmp_path / "heldout.jsonl").write_text("\n".join(lines), encoding="utf-8")
    df = evaluate_transcoders(model, transcoders, tmp_path, tokens=1_000, context=64,
                              per_layer=True)
    assert (df.ce_alone.abs() > 1e-4).all() and "CE alone |" in format_table(df)
    # A transcoder that outputs zero makes "layer 2 alone" a zero-ablation of MLP 2 (BOS kept).
    for name in ("W_dec", "W_skip", "b_dec"):
        getattr(transcoders[2], name).data.zero_()
    ablated = evaluate_transcoders(model, transcoders, tmp_path, tokens=1_000, context=64,
                                   per_layer=True)
    assert ablated.ce_alone[:2].tolist() == pytest.approx(df.ce_alone[:2].tolist(), abs=1e-6)
    rows = data.TokenRows(model.tokenizer, tmp_path, 64, split="heldout").take(16)
    zero = lambda act, hook: torch.cat([act[:, :1], torch.zeros_like(act[:, 1:])], 1)  # noqa: E731
    with torch.no_grad():
        ce = [float(model.run_with_hooks(rows, return_type="loss", fwd_hooks=hooks))
              for hooks in ([], [("blocks.2.hook_mlp_out", zero)])]
    assert ablated.ce_alone[2] == pytest.approx(ce[1] - ce[0], rel=1e-4)


def test_cli_train_on_the_tiny_model(model, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands, "load_model", lambda *args, **kwargs: model)
    out = tmp_path / "tc"
    args = ["train", "--out", str(out), "--corpus", str(corpus), "--tokens", "20000",
            "--width", "64", "--k", "4", "--context", "64", "--batch-tokens", "512",
            "--buffer-tokens", "2048", "--passes", "2"]
    assert cli.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "circuitlab " + " ".join(args)
    assert manifest["tokens_seen"] >= 20_000 and manifest["settings"]["passes"] == 2
    wider = args.copy()
    wider[wider.index("--width") + 1] = "48"
    assert cli.main(wider) == 2
    assert "other settings (width: checkpoint 64, now 48" in capsys.readouterr().err


def test_fast_bf16_follows_the_hardware(monkeypatch):
    for avx512_bf16, amx, fast in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert fast_bf16("cpu") is fast


def test_same_seed_same_weights(model, corpus, tmp_path):
    first = train_transcoders(model, corpus, tmp_path / "a", tokens=3_000, **SMALL)
    second = train_transcoders(model, corpus, tmp_path / "b", tokens=3_000, **SMALL)
    assert weights_sha(first) == weights_sha(second)


def test_resume_after_time_and_token_stops(model, corpus, tmp_path):
    out = tmp_path / "tc"
    train_transcoders(model, corpus, out, tokens=3_000, time_budget=0.0, **SMALL)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stopped"] == "time" and manifest["tokens_seen"] == 0
    train_transcoders(model, corpus, out, tokens=1_024, **SMALL)
    first = json.loads((out / "manifest.json").read_text())
    assert first["stopped"] == "tokens" and first["tokens_seen"] == 1_024
    train_transcoders(model, corpus, out, tokens=5_000, **SMALL)
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["tokens_seen"] >= 5_000 and resumed["steps"] == resumed["tokens_seen"] // 512
    assert resumed["seconds"] >= first["seconds"]
    state = json.loads((out / "checkpoint" / "settings.json").read_text())
    assert state["docs_done"] > 0 and state["buffers"] >= 2


def test_passes_train_each_buffer_again(model, corpus, tmp_path):
    once = json.loads((train_transcoders(model, corpus, tmp_path / "a", tokens=4_096, **SMALL)
                       / "manifest.json").read_text())
    twice = json.loads((train_transcoders(model, corpus, tmp_path / "b", tokens=4_096, passes=2,
                                          **SMALL) / "manifest.json").read_text())
    assert once["steps"] == twice["steps"] == 8
    # A buffer holds 32 rows of 63 tokens: 3 batches a pass.
    assert once["tokens_read"] == 3 * 2_016 and twice["tokens_read"] == 2 * 2_016


def test_warm_start_keeps_the_weights_and_reads_on(model, corpus, trained, tmp_path):
    # The mapping into the normalized space inverts the export: bf16 weights round-trip.
    rows = data.TokenRows(model.tokenizer, corpus, 64)
    x, y = data.activation_buffer(model, rows.take(32), [0, 1, 2], 8, torch.float32, "cpu")
    state = topk.TopKTranscoders.from_bundle(trained, [0, 1, 2], x, y, lr=1e-3)
    for i in range(3):
        sae, stats = export.to_jumprelu(state, i, x[i], y[i], 4, {})
        saved = SAE.load_from_disk(trained / f"layer_{i:02d}")
        for name in topk.PARAMS:
            exact = getattr(sae, name).ndim == 2  # matrices are saved in bf16, vectors in fp32
            torch.testing.assert_close(getattr(sae, name), getattr(saved, name),
                                       rtol=0 if exact else 1e-6, atol=0)
        fresh = topk.TopKTranscoders.init(x, y, 64, 4, 1e-3, seed=0)
        assert stats["fvu_topk"] < export.to_jumprelu(fresh, i, x[i], y[i], 4, {})[1]["fvu_topk"]
    # Training goes on from where the first run stopped reading, and says where it started.
    out = train_transcoders(model, corpus, tmp_path / "warm", tokens=2_048, lr=1e-3,
                            init_from=trained, **SMALL)
    manifest = json.loads((out / "manifest.json").read_text())
    first = json.loads((trained / "manifest.json").read_text())
    assert manifest["init_from"]["path"] == str(trained.resolve())
    assert manifest["init_from"]["command"] == first["command"]
    assert manifest["init_from"]["tokens_seen"] == first["tokens_seen"]
    assert manifest["tokens_seen"] == 2_048 and manifest["settings"]["init_from"] == str(trained)
    docs = [json.loads((d / "checkpoint" / "settings.json").read_text())["docs_done"]
            for d in (trained, out)]
    assert docs[1] > docs[0] > 0
    for layer in range(3):
        assert manifest["calibration"][str(layer)]["fvu_topk"] < 0.8


def test_warm_start_from_other_width_raises(model, corpus, trained, tmp_path):
    with pytest.raises(CircuitlabError, match=r"Cannot warm-start .*d_sae=64.*pass its width"):
        train_transcoders(model, corpus, tmp_path, tokens=512, init_from=trained,
                          **{**SMALL, "width": 32})
    with pytest.raises(CircuitlabError, match=r"layer_00/cfg.json is missing"):
        train_transcoders(model, corpus, tmp_path, tokens=512, init_from=tmp_path, **SMALL)


def test_resume_with_other_settings_raises(model, corpus, tmp_path):
    train_transcoders(model, corpus, tmp_path, tokens=512, **SMALL)
    with pytest.raises(CircuitlabError, match=r"width: checkpoint 64, now 32.*resume=False"):
        train_transcoders(model, corpus, tmp_path, tokens=1_024, **{**SMALL, "width": 32})
    train_transcoders(model, corpus, tmp_path, tokens=512, resume=False, **{**SMALL, "width": 32})


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": [3]}, r"layers=\[3\].*0\.\.2"),
    ({"k": 64}, "1 <= k < width"),
    ({"width": 0}, "width=0, k=4: need 1 <= k < width"),
    ({"context": 1000}, "n_ctx"),
    ({"passes": 0}, "passes=0 must be >= 1"),
])
def test_bad_arguments(model, corpus, tmp_path, kwargs, message):
    with pytest.raises(CircuitlabError, match=message):
        train_transcoders(model, corpus, tmp_path, tokens=512, **{**SMALL, **kwargs})


def test_corpus_without_text(model, tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n ", encoding="utf-8")
    with pytest.raises(CircuitlabError, match="no usable text"):
        train_transcoders(model, tmp_path / "empty.txt", tmp_path / "out", **SMALL)
    (tmp_path / "short.txt").write_text("too short", encoding="utf-8")
    with pytest.raises(CircuitlabError, match="fewer than 63 tokens"):
        train_transcoders(model, tmp_path / "short.txt", tmp_path / "out", **SMALL)


def test_full_disk_keeps_the_old_checkpoint(model, corpus, tmp_path, monkeypatch):
    train_transcoders(model, corpus, tmp_path, tokens=512, **SMALL)
    checkpoint = tmp_path / "checkpoint" / checkpoints.CHECKPOINT_FILE
    before = sha256(checkpoint)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full)
    message = f"No space left.*{re.escape(str(checkpoint))}.*intact"
    with pytest.raises(CircuitlabError, match=message):
        train_transcoders(model, corpus, tmp_path, tokens=1_024, **SMALL)
    assert sha256(checkpoint) == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == sorted(
        ["log.jsonl", "settings.json", checkpoint.name])


def test_jumprelu_export_matches_topk_counts():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(1, 4096, 16, generator=g) + 1
    y = 5 * torch.tanh(x @ torch.randn(16, 16, generator=g))
    state = topk.TopKTranscoders.init(x, y, width=48, k=6, lr=1e-3, seed=0)
    sae, stats = export.to_jumprelu(state, 0, x[0], y[0], 6, {"hook_name": "blocks.0.hook_mlp_in"})
    pre = x[0] @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(6)
    counts = torch.bincount(idx[vals > 0], minlength=48)
    with torch.no_grad():
        acts = sae.encode(x[0])
        pred = sae(x[0])
    fired = (acts > 0).sum(0)
    assert (fired >= counts).all() and (fired <= 1.02 * counts + 1).all()
    assert stats["l0_jumprelu"] == pytest.approx(float((acts > 0).sum(1).float().mean()))
    fvu = (pred - y[0]).pow(2).sum() / (y[0] - y[0].mean(0)).pow(2).sum()
    assert stats["fvu_jumprelu"] == pytest.approx(float(fvu), rel=1e-4)

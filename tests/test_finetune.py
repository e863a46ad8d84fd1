"""Tests for the decoder KL fine-tuning of transcoders on the tiny random Gemma-3-like model."""

import json

import pytest
import torch
from conftest import SMALL, tiny_model
from sae_lens import SAE
from test_train import weights_sha

from circuitlab.clt import is_clt_folder
from circuitlab.clt import load as load_clt
from circuitlab.errors import CircuitlabError
from circuitlab.files import sha256, verify_manifest
from circuitlab.loading import load_transcoders
from circuitlab.train import finetune
from circuitlab.train.clt_trainer import train_clt
from circuitlab.train.evaluate import evaluate_transcoders
from circuitlab.train.finetune import finetune_transcoders

FT = dict(context=64, batch_rows=4, kl_positions=16, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def heldout(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("heldout")
    docs = corpus.read_text().split("\n\n")[-100:]
    (folder / "heldout.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return folder


def test_finetune_lowers_the_kl_and_keeps_the_encoders(model, corpus, trained, heldout, tmp_path):
    out = finetune_transcoders(model, trained, corpus, tmp_path / "ft", tokens=20_000, **FT)
    verify_manifest(out, "fine-tuned transcoders", "fine-tune again")
    manifest = json.loads((out / "manifest.json").read_text())
    first = json.loads((trained / "manifest.json").read_text())
    assert manifest["stopped"] == "tokens" and manifest["tokens_seen"] >= 20_000
    assert manifest["init_from"]["command"] == first["command"]
    # It reads on after the text the layer-wise training read.
    assert manifest["tokens_read"] == first["tokens_read"] + manifest["tokens_seen"]
    before, after = (evaluate_transcoders(model, load_transcoders(d, None, 3), heldout,
                                          tokens=3_000, context=64) for d in (trained, out))
    assert after.attrs["kl"] < 0.85 * before.attrs["kl"]
    assert after.attrs["ce_increase"] < before.attrs["ce_increase"]
    assert (after.fvu < before.fvu + 0.05).all()  # the FVU term keeps the layers faithful
    for layer in range(3):
        old, new = (SAE.load_from_disk(d / f"layer_{layer:02d}") for d in (trained, out))
        for name in ("W_enc", "b_enc", "threshold"):  # every feature fires where it did
            assert torch.equal(getattr(old, name), getattr(new, name))
        for name in ("W_dec", "W_skip", "b_dec"):
            assert not torch.equal(getattr(old, name), getattr(new, name))
        assert new.cfg.metadata.finetune["tokens_seen"] == manifest["tokens_seen"]
    assert after.l0.tolist() == before.l0.tolist()


@pytest.fixture(scope="module")
def clt(model, corpus, tmp_path_factory):
    """A CLT trained on ``corpus`` for 10k tokens, its features writing into 2 layers."""
    return train_clt(model, corpus, tmp_path_factory.mktemp("clt") / "clt", tokens=10_000,
                     window=2, **SMALL)


def test_finetune_a_clt_lowers_the_kl_and_keeps_the_encoders(model, corpus, clt, heldout,
                                                            tmp_path):
    out = finetune_transcoders(model, clt, corpus, tmp_path / "ft", tokens=20_000, **FT)
    verify_manifest(out, "fine-tuned CLT", "fine-tune again")
    assert is_clt_folder(out) and (out / "checkpoint").is_dir()
    manifest = json.loads((out / "manifest.json").read_text())
    first = json.loads((clt / "manifest.json").read_text())
    assert manifest["stopped"] == "tokens" and manifest["init_from"]["command"] == first["command"]
    assert manifest["tokens_read"] == first["tokens_read"] + manifest["tokens_seen"]
    old, new = load_clt(clt), load_clt(out)
    assert new.window == old.window == 2 and new.activation == old.activation
    for name in ("W_enc", "b_enc", "threshold"):  # every feature fires where it did
        assert torch.equal(getattr(old, name), getattr(new, name))
    for name in ("b_dec", "W_skip"):
        assert not torch.equal(getattr(old, name), getattr(new, name))
    for s in range(3):  # every decoder that is stored trains, and stays in its window
        assert new.W_dec[s].shape == old.W_dec[s].shape
        for t in range(old.W_dec[s].shape[1]):
            assert not torch.equal(old.W_dec[s][:, t], new.W_dec[s][:, t]), (s, t)
    before, after = (evaluate_transcoders(model, c, heldout, tokens=3_000, context=64)
                     for c in (old, new))
    assert after.attrs["kl"] < 0.85 * before.attrs["kl"]
    assert (after.fvu < before.fvu + 0.05).all()
    assert after.l0.tolist() == before.l0.tolist()


def test_clt_decoders_decode_as_the_clt_does(clt):
    # What fine-tuning trains is the CLT's own map: before a step, the trained parameters
    # reconstruct every layer exactly as the loaded CLT does, cross-layer writes included.
    c = load_clt(clt)
    decoders = finetune._CLTDecoders(load_clt(clt))
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 5, 32, generator=g) for _ in range(3)]
    acts = [c.encode(s, x[s]) for s in range(3)]
    assert all((a > 0).any() for a in acts)
    for t in range(3):
        torch.testing.assert_close(decoders.decode(t, acts, x[t]), c.decode(t, acts, x[t]),
                                   rtol=0, atol=1e-6)


def test_straight_through_rounding_is_what_gets_saved():
    w = torch.randn(8, 8, requires_grad=True)
    rounded = finetune.bf16_straight_through(w)
    assert torch.equal(rounded, w.detach().to(torch.bfloat16).float())
    rounded.sum().backward()
    assert torch.equal(w.grad, torch.ones(8, 8))


def clt_sha(out):
    return {p.name: sha256(p) for p in sorted(out.glob("W_*.safetensors"))}


@pytest.mark.parametrize("kind", ["trained", "clt"])
def test_finetune_resumes_exactly(model, corpus, kind, request, tmp_path, monkeypatch):
    trained, weights = request.getfixturevalue(kind), {"trained": weights_sha, "clt": clt_sha}[kind]
    straight = finetune_transcoders(model, trained, corpus, tmp_path / "a", tokens=3_000, **FT)
    step, calls = finetune._Finetune.step, []

    def crash_after_three(self, tokens):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return step(self, tokens)

    monkeypatch.setattr(finetune._Finetune, "step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        finetune_transcoders(model, trained, corpus, tmp_path / "b", tokens=3_000,
                             checkpoint_every=0.0, **FT)
    monkeypatch.setattr(finetune._Finetune, "step", step)
    counters = json.loads((tmp_path / "b" / "checkpoint" / "settings.json").read_text())
    assert counters["steps"] == 3
    resumed = finetune_transcoders(model, trained, corpus, tmp_path / "b", tokens=3_000, **FT)
    assert weights(resumed) == weights(straight) and weights(straight)
    with pytest.raises(CircuitlabError, match=r"other settings \(lr: checkpoint 0.01, now 0.1"):
        finetune_transcoders(model, trained, corpus, tmp_path / "b", tokens=6_000,
                             **{**FT, "lr": 1e-1})


@pytest.mark.parametrize("kwargs, message", [
    ({"kl_positions": 64}, r"kl_positions=64 must be in 1\.\.63"),
    ({"batch_rows": 0}, "batch_rows=0 must be >= 1"),
    ({"context": 1000}, "n_ctx"),
    ({"lr": 0.0}, "need lr > 0"),
])
def test_finetune_bad_arguments(model, corpus, trained, tmp_path, kwargs, message):
    with pytest.raises(CircuitlabError, match=message):
        finetune_transcoders(model, trained, corpus, tmp_path, tokens=512, **{**FT, **kwargs})


def test_finetune_transcoders_that_do_not_fit(model, corpus, trained, tmp_path):
    other = tiny_model("gemma3")
    other.cfg.n_layers = 4  # a model with a layer the folder has no transcoder for
    with pytest.raises(CircuitlabError, match=r"layers \[0, 1, 2\], not one for each .* 4 layers"):
        finetune_transcoders(other, trained, corpus, tmp_path, tokens=512, **FT)
    with pytest.raises(CircuitlabError, match="holds no transcoders"):
        finetune_transcoders(model, tmp_path, corpus, tmp_path / "out", tokens=512, **FT)


def test_finetune_corpus_too_short(model, trained, tmp_path):
    (tmp_path / "short.txt").write_text("too short", encoding="utf-8")
    with pytest.raises(CircuitlabError, match="fewer than 4 rows of 63 tokens"):
        finetune_transcoders(model, trained, tmp_path / "short.txt", tmp_path / "out", **FT)


def test_cli_finetune(model, corpus, trained, tmp_path, monkeypatch):
    from circuitlab import cli, commands

    monkeypatch.setattr(commands, "load_model", lambda *args, **kwargs: model)
    args = ["finetune", str(trained), "--out", str(tmp_path / "ft"), "--corpus", str(corpus),
            "--tokens", "1000", "--context", "64", "--kl-positions", "8", "--lr", "1e-3"]
    assert cli.main(args) == 0
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert manifest["command"] == "circuitlab " + " ".join(args)
    assert manifest["settings"]["kl_positions"] == 8 and manifest["tokens_seen"] >= 1_000

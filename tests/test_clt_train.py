"""Tests for cross-layer transcoder training (``train --clt``) and its evaluation, on the tiny
random Gemma-3-like model."""

import dataclasses
import json
from functools import partial

import pytest
import torch

from circuitlab import cli, commands
from circuitlab.clt import CrossLayerTranscoder, is_clt_folder
from circuitlab.clt import load as load_clt
from circuitlab.errors import CircuitlabError
from circuitlab.files import verify_manifest
from circuitlab.hooks import mlp_input
from circuitlab.replacement import ReplacementModel
from circuitlab.train import data
from circuitlab.train.checkpoints import CHECKPOINT_FILE, load_checkpoint
from circuitlab.train.clt_trainer import CLTSettings, TopKCLT, train_clt
from circuitlab.train.evaluate import evaluate_transcoders
from circuitlab.train.topk import AUX_COEF

#: Small, fast CLT settings for the tiny model (3 layers, d_model 32).
ARGS = ["--width", "64", "--k", "4", "--context", "64", "--batch-tokens", "512",
        "--buffer-tokens", "2048"]
SMALL = dict(width=64, k=4, context=64, batch_tokens=512, buffer_tokens=2048, aux_k=16,
             dead_tokens=2048, progress=False)


@pytest.fixture(scope="module")
def clt_run(model, corpus, tmp_path_factory):
    """``circuitlab train --clt --tokens 20000`` on the tiny model: the output folder."""
    out = tmp_path_factory.mktemp("clt") / "clt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(commands, "load_model", lambda *args, **kwargs: model)
        assert cli.main(["train", "--clt", "--out", str(out), "--corpus", str(corpus),
                         "--tokens", "20000", *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def heldout(corpus, tmp_path_factory):
    """A corpus folder whose held-out split is the first 200 documents of ``corpus``."""
    folder = tmp_path_factory.mktemp("heldout")
    docs = corpus.read_text().split("\n\n")[:200]
    (folder / "heldout.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return folder


@pytest.mark.parametrize("window, dtype", [(None, torch.float32), (2, torch.float32),
                                           (2, torch.bfloat16)])
def test_hand_gradients_match_autograd(window, dtype):
    """Float32 steps run the sparse kernels and match autograd closely; bfloat16 steps run
    dense bfloat16 products (and a bfloat16 encoder), so they match to bfloat16's precision."""
    g = torch.Generator().manual_seed(0)
    L, N, d, width, k, B = 3, 256, 8, 24, 3, 64
    x = 2 * torch.randn(L, N, d, generator=g) + 0.5
    y = 3 * torch.tanh(x @ torch.randn(d, d, generator=g)) + 0.1 * torch.randn(L, N, d, generator=g)
    state = TopKCLT.init(x, y, width, k, 1e-3, seed=0, window=window)
    assert [state.n_out(s) for s in range(L)] == ([3, 2, 1] if window is None else [2, 2, 1])
    state.opt.step = lambda: None  # keep the gradients, leave the weights
    for aux_k, dead_tokens in ((0, 10 ** 9), (4, 0)):  # no AuxK; every feature dead
        fvu = state.step(x[:, :B], y[:, :B], k, aux_k, dead_tokens, 1e-3, dtype)
        ref = {n: p.detach().clone().requires_grad_() for n, p in state.params.items()}
        xn = x[:, :B] / state.scale_in[:, None, None]
        yn = y[:, :B] / state.scale_out[:, None, None]
        recon = [xn[t] @ ref["W_skip"][t].T + ref["b_dec"][t] for t in range(L)]
        pres = []
        for s in range(L):
            pres.append(torch.addmm(ref["b_enc"][s].to(dtype), xn[s].to(dtype),  # as the step
                                    ref["W_enc"][s].to(dtype).T).float())
            top = pres[s].topk(k)
            acts = torch.zeros_like(pres[s]).scatter(1, top.indices, top.values.relu())
            for t in range(s, min(L, s + (window or L))):
                recon[t] = recon[t] + acts @ ref[f"W_dec_{s}"][:, t - s]
        fvus = torch.stack([(recon[t] - yn[t]).pow(2).sum() / (B * d) for t in range(L)])
        loss = fvus.sum()
        err = torch.stack(recon, 1).detach() - yn.transpose(0, 1)  # [B, L, d]
        for s in range(L if aux_k else 0):
            top = pres[s].topk(aux_k)
            acts = torch.zeros_like(pres[s]).scatter(1, top.indices, top.values.relu())
            e = err[:, s]  # the dead features reconstruct their own layer's error
            aux = acts @ ref[f"W_dec_{s}"][:, 0] + e
            loss = loss + AUX_COEF * aux.pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        loss.backward()
        if dtype == torch.float32:
            torch.testing.assert_close(fvu, fvus.detach())
            for name, p in state.params.items():
                torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-7)
        else:  # relative to each gradient's size: bfloat16 keeps 8 bits of mantissa
            torch.testing.assert_close(fvu, fvus.detach(), rtol=0.03, atol=0)
            for name, p in state.params.items():
                size = float(ref[name].grad.norm())
                assert float((p.grad - ref[name].grad).norm()) < 0.03 * size, name


def test_cli_trains_a_clt_that_loads_and_beats_the_untrained_one(model, corpus, clt_run, heldout):
    verify_manifest(clt_run, "trained CLT", "retrain")
    manifest = json.loads((clt_run / "manifest.json").read_text())
    assert manifest["command"].startswith("circuitlab train --clt --out")
    assert manifest["tokens_seen"] >= 20_000 and manifest["stopped"] == "tokens"
    assert manifest["settings"]["clt"] is True and manifest["settings"]["k"] == 4
    assert is_clt_folder(clt_run)
    clt = load_clt(clt_run)
    assert (clt.n_layers, clt.d_model, clt.d_sae, clt.activation) == (3, 32, 64, "jumprelu")
    assert clt.W_skip is not None and (clt.threshold >= 0).all()
    for layer, cal in manifest["calibration"].items():
        assert abs(cal["l0_jumprelu"] - 4) < 1, layer
        assert abs(cal["fvu_jumprelu"] - cal["fvu_topk"]) < 0.05, layer
    rm = ReplacementModel(model, clt)
    assert torch.isfinite(rm.forward(rm.tokenize("the cat sat"))).all()

    df = evaluate_transcoders(model, clt, heldout, tokens=2_000, context=64)
    assert list(df.columns) == ["layer", "fvu", "l0", "dead"] and len(df) == 3
    assert ((df.fvu > 0) & (df.fvu < 0.6)).all() and (abs(df.l0 - 4) < 1.5).all()
    # The export of the initialization, before any step, reconstructs worse.
    x, y = data.activation_buffer(model, data.TokenRows(model.tokenizer, corpus, 64).take(64),
                                  [0, 1, 2], 8, torch.float32, "cpu")
    untrained = TopKCLT.init(x, y, 64, 4, 1e-3, seed=0).to_clt(x, y, 4, "tiny")[0]
    before = evaluate_transcoders(model, untrained, heldout, tokens=2_000, context=64)
    assert (df.fvu < before.fvu).all() and df.attrs["kl"] < before.attrs["kl"]
    # Without the features only the skips are left: the features carry the FVU gained.
    for W in clt.W_dec:
        W.zero_()
    skips = evaluate_transcoders(model, clt, heldout, tokens=2_000, context=64)
    assert (df.fvu < skips.fvu - 0.05).all()


def test_eval_transcoders_reads_a_clt_folder(model, clt_run, heldout, monkeypatch, capsys,
                                            tmp_path):
    monkeypatch.setattr(commands, "load_model", lambda *args, **kwargs: model)
    monkeypatch.setattr(commands, "evaluate_transcoders", partial(evaluate_transcoders, context=64))
    out = tmp_path / "eval.json"
    assert cli.main(["eval-transcoders", str(clt_run), "--corpus", str(heldout), "--split",
                     "heldout", "--tokens", "1000", "--per-layer", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| layer | FVU | L0 | dead | CE alone |") and "| mean |" in table
    assert "all MLPs spliced" in table and "KL from the model" in table
    doc = json.loads(out.read_text())
    assert len(doc["layers"]) == 3 and doc["ce_increase"] == pytest.approx(
        doc["ce_spliced"] - doc["ce_clean"])


def test_clt_splice_sums_the_writes_of_earlier_layers(model, heldout):
    # Layer 2 alone, with only layer 0's features writing into it: the spliced MLP output
    # of layer 2 is what layer 0's features write there (plus b_dec), from the clean run.
    g = torch.Generator().manual_seed(0)
    clt = CrossLayerTranscoder(3, 32, 16, activation="relu")
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(3, 32, 16, generator=g))
        clt.W_dec[0].copy_(0.1 * torch.randn(16, 3, 32, generator=g))
    df = evaluate_transcoders(model, clt, heldout, tokens=500, context=64, per_layer=True)
    rows = data.TokenRows(model.tokenizer, heldout, 64, split="heldout").take(8)
    writes = {}

    def keep(act, hook):
        writes["x0"] = mlp_input(model, 0, act)

    def replace(act, hook):
        out = torch.relu(writes["x0"] @ clt.W_enc[0]) @ clt.W_dec[0][:, 2]
        return torch.cat([act[:, :1], out[:, 1:]], 1)

    with torch.no_grad():
        ce = [float(model.run_with_hooks(rows, return_type="loss", fwd_hooks=hooks)) for hooks in
              ([], [("blocks.0.ln2.hook_normalized", keep), ("blocks.2.hook_mlp_out", replace)])]
    assert df.ce_alone[2] == pytest.approx(ce[1] - ce[0], rel=1e-4)
    assert (df.l0 > 0).all() and (df.ce_alone.abs() > 1e-4).all()


def test_eval_reads_what_the_clt_reads(model, heldout):
    g = torch.Generator().manual_seed(1)
    clt = CrossLayerTranscoder(3, 32, 16, activation="relu", hook_in="hook_resid_mid")
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(3, 32, 16, generator=g) / 4)
        clt.W_dec[0].copy_(0.1 * torch.randn(16, 3, 32, generator=g))
    df = evaluate_transcoders(model, clt, heldout, tokens=500, context=64)
    rows = data.TokenRows(model.tokenizer, heldout, 64, split="heldout").take(8)
    with torch.no_grad():
        _, cache = model.run_with_cache(rows)
    x, y = cache["blocks.0.hook_resid_mid"][:, 1:], cache["blocks.0.hook_mlp_out"][:, 1:]
    pred = clt.decode(0, [clt.encode(0, x)], x)
    fvu = (pred - y).pow(2).sum() / (y - y.mean((0, 1))).pow(2).sum()
    assert df.fvu[0] == pytest.approx(float(fvu), rel=1e-4)


def test_resume_continues_where_it_stopped(model, corpus, tmp_path):
    out = tmp_path / "clt"
    train_clt(model, corpus, out, tokens=3_000, time_budget=0.0, **SMALL)
    assert json.loads((out / "manifest.json").read_text())["stopped"] == "time"
    train_clt(model, corpus, out, tokens=1_024, **SMALL)
    first = json.loads((out / "manifest.json").read_text())
    weights = load_clt(out).W_enc.clone()
    assert first["stopped"] == "tokens" and first["steps"] == 2
    train_clt(model, corpus, out, tokens=3_072, **SMALL)
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["tokens_seen"] == 3_072 and resumed["steps"] == 6
    assert resumed["seconds"] >= first["seconds"] and resumed["tokens_read"] > first["tokens_read"]
    settings = CLTSettings(**{**resumed["settings"], "layers": (0, 1, 2)})
    tensors, counters = load_checkpoint(out / "checkpoint", settings)
    assert int(tensors["adam.W_enc.step"]) == 6  # Adam went on, it did not start again
    assert counters["docs_done"] > 0 and not torch.equal(load_clt(out).W_enc, weights)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == sorted(
        [CHECKPOINT_FILE, "log.jsonl", "settings.json"])
    log = [json.loads(line) for line in (out / "checkpoint" / "log.jsonl").read_text().splitlines()]
    assert [e["tokens_seen"] for e in log][-2:] == [1_024, 3_072], "one line per save"
    assert log[-1]["machine"] and log[-1]["k"] == 4 and len(log[-1]["fvu"]) == 3
    with pytest.raises(CircuitlabError, match=r"width: checkpoint 64, now 32.*resume=False"):
        train_clt(model, corpus, out, tokens=4_096, **{**SMALL, "width": 32})


def test_clt_flag_errors(model, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands, "load_model", lambda *args, **kwargs: model)
    base = ["train", "--clt", "--corpus", str(corpus), "--tokens", "512", *ARGS]
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--layers", "0,1"]) == 2
    assert "drop --layers" in capsys.readouterr().err
    assert cli.main(["train", "--corpus", str(corpus), "--out", str(tmp_path / "b"), "--window",
                     "2", *ARGS]) == 2
    assert "--window set the cross-layer training; add --clt" in capsys.readouterr().err
    (tmp_path / "tc" / "layer_00").mkdir(parents=True)
    assert cli.main([*base, "--out", str(tmp_path / "tc")]) == 2
    assert "holds per-layer transcoders" in capsys.readouterr().err
    with pytest.raises(CircuitlabError, match="1 <= k < width"):
        train_clt(model, corpus, tmp_path / "b", tokens=512, **{**SMALL, "k": 64})


def test_warm_start_from_per_layer_transcoders(model, corpus, trained, tmp_path):
    """A CLT warm-started from per-layer transcoders starts as them (same reconstruction of
    every layer under TopK), then trains with a write window and an annealed k."""
    from circuitlab.train.topk import TopKTranscoders

    x, y = data.activation_buffer(model, data.TokenRows(model.tokenizer, corpus, 64).take(32),
                                  [0, 1, 2], 8, torch.float32, "cpu")
    per_layer = TopKTranscoders.from_bundle(trained, [0, 1, 2], x, y, 1e-3)
    clt = TopKCLT.from_bundle(trained, x, y, 1e-3, window=2)
    assert clt.window == 2 and [clt.n_out(s) for s in range(3)] == [2, 2, 1]
    for state in (per_layer, clt):
        state.opt.step = lambda: None
    torch.testing.assert_close(clt.step(x, y, 4, 0, 10 ** 9, 0.0, torch.float32),
                               per_layer.step(x, y, 4, 0, 10 ** 9, 0.0, torch.float32))

    out = train_clt(model, corpus, tmp_path / "clt", tokens=6_144, init_from=trained, window=2,
                    k_start=8, k_anneal_tokens=4_096, lr=1e-3,
                    **{**SMALL, "k": 4})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["window"] == 2 and manifest["settings"]["k_start"] == 8
    assert manifest["settings"]["init_from"] == str(trained.resolve())
    loaded = load_clt(out)
    assert loaded.window == 2 and tuple(loaded.W_dec[0].shape) == (64, 2, 32)
    assert (loaded.W_dec[0][:, 1].norm(dim=-1) > 0).any()  # later writes learned from zero
    for layer, cal in manifest["calibration"].items():
        assert abs(cal["l0_jumprelu"] - 4) < 1, layer


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), "window=0"), (dict(k_start=2), "k_start=2"),
    (dict(k_start=8, k_anneal_tokens=0), "anneals"),
])
def test_bad_clt_arguments(model, corpus, tmp_path, kwargs, message):
    with pytest.raises(CircuitlabError, match=message):
        train_clt(model, corpus, tmp_path / "clt", tokens=512, **{**SMALL, **kwargs})


def test_k_anneals_linearly():
    from circuitlab.train.clt_trainer import k_at

    s = CLTSettings(model_name="m", n_layers=2, d_model=4, layers=(0, 1), width=8, k=16,
                    aux_k=0, dead_tokens=1, context=8, batch_tokens=8, buffer_tokens=8,
                    passes=1, lr=1e-3, jumprelu_share=0.1, bf16=False, seed=0, corpus="c",
                    k_start=64, k_anneal_tokens=1000)
    assert [k_at(s, t) for t in (0, 500, 1000, 5000)] == [64, 40, 16, 16]
    assert k_at(dataclasses.replace(s, k_start=None), 0) == 16

"""8-bit transcoder folders: the layout on disk, loading, warm starts and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, tiny_model, tiny_transcoders
from safetensors import safe_open
from safetensors.torch import load_file

import circuitlab
from circuitlab import CircuitlabError, cli
from circuitlab.files import sha256, verify_manifest
from circuitlab.quantize import FLOAT8_WEIGHTS, quantize_folder, read_weights
from circuitlab.sizing import transcoder_shape
from circuitlab.train.topk import TopKTranscoders

MATRICES = ("W_enc", "W_dec", "W_skip")


def write_folder(path, saes):
    """SAE-Lens folders with a sha256 manifest, as `circuitlab train` leaves them."""
    for layer, sae in enumerate(saes):
        sae.save_model(path / f"layer_{layer:02d}")
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*.*"))
    (path / "manifest.json").write_text(json.dumps(
        {"sha256": {f: sha256(path / f) for f in files}, "tokens_seen": 1234}))
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3")


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_and_loading_match_a_hand_dequantization(model, arch, tmp_path, capsys):
    saes = tiny_transcoders(model, arch)
    src = write_folder(tmp_path / "src", saes)
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q8")]) == 0
    assert "rounding changed each matrix by at most" in capsys.readouterr().out
    out = tmp_path / "q8"
    verify_manifest(out, "8-bit transcoders", "requantize")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens_seen"] == 1234  # the source's record is carried
    assert manifest["storage"]["format"] == "circuitlab-float8"
    assert manifest["storage"]["source_manifest_sha256"] == sha256(src / "manifest.json")
    rm = circuitlab.load(model, out)
    for layer, (sae, loaded) in enumerate(zip(saes, rm.transcoders)):
        assert type(loaded) is type(sae)
        folder = out / f"layer_{layer:02d}"
        assert not (folder / "sae_weights.safetensors").exists()
        with safe_open(folder / FLOAT8_WEIGHTS, "pt") as f:
            assert f.metadata() == {"format": "circuitlab-float8", "version": "1"}
        raw = load_file(folder / FLOAT8_WEIGHTS)
        for name, value in sae.state_dict().items():
            got = getattr(loaded, name).detach()
            if name not in MATRICES:
                assert raw[name].dtype == torch.float32 and torch.equal(got, value)
                continue
            q, scale = raw[name], raw[f"{name}_scale"]
            assert q.dtype == torch.float8_e4m3fn and q.float().abs().max() == 448
            rows, cols = value.shape
            assert scale.shape == ((1, cols) if name == "W_enc" else (rows, 1))
            assert torch.equal(got, q.float() * scale)  # exactly the documented formula
            # Half a step of a 3-bit mantissa, relative; below e4m3's smallest normal (2^-6),
            # half its subnormal step (2^-9) times the scale.
            bound = torch.maximum(value.abs() * 2 ** -4, scale * 2 ** -10)
            assert ((got - value).abs() <= bound * (1 + 1e-5)).all()
        x = torch.randn(8, model.cfg.d_model)
        assert (loaded(x) - sae(x)).norm() < 0.05 * sae(x).norm()
    before = sum(p.stat().st_size for p in src.glob("*/sae_weights.safetensors"))
    after = sum(p.stat().st_size for p in out.glob(f"*/{FLOAT8_WEIGHTS}"))
    assert after < before / 2  # float32 source: close to a quarter, headers aside
    a, b = transcoder_shape(out), transcoder_shape(src)
    assert (a.width, a.skip, a.jumprelu, a.l0) == (b.width, b.skip, b.jumprelu, b.l0)


def test_warm_start_reads_an_8bit_folder_as_its_float_twin(model, tmp_path):
    saes = tiny_transcoders(model, "jumprelu_skip_transcoder")
    src = write_folder(tmp_path / "src", saes)
    out = tmp_path / "q8"
    assert cli.main(["quantize", str(src), "--out", str(out)]) == 0
    for layer, sae in enumerate(saes):  # the float twin: the dequantized weights, SAE-Lens' way
        with torch.no_grad():
            for name, value in read_weights(out / f"layer_{layer:02d}").items():
                getattr(sae, name).copy_(value)
    twin = write_folder(tmp_path / "twin", saes)
    x = torch.randn(model.cfg.n_layers, 64, model.cfg.d_model)
    y = torch.randn(model.cfg.n_layers, 64, model.cfg.d_model)
    layers = list(range(model.cfg.n_layers))
    a = TopKTranscoders.from_bundle(out, layers, x, y, lr=1e-3)
    b = TopKTranscoders.from_bundle(twin, layers, x, y, lr=1e-3)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name


def test_bad_input_leaves_user_files_alone(model, tmp_path, capsys):
    src = write_folder(tmp_path / "src", tiny_transcoders(model, "skip_transcoder"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli.main(["quantize", str(src), "--out", str(mine)]) == 2
    assert "not an earlier `circuitlab quantize` output" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert cli.main(["quantize", str(src), "--out", str(src)]) == 2
    assert "is the source folder" in capsys.readouterr().err
    assert cli.main(["quantize", str(mine), "--out", str(tmp_path / "q")]) == 2
    assert "no SAE-Lens transcoder folders" in capsys.readouterr().err
    # An earlier output is replaced whole; a corrupt one is caught by its checksums.
    out = tmp_path / "q8"
    assert cli.main(["quantize", str(src), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("x")
    assert cli.main(["quantize", str(src), "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists()
    weights = out / "layer_00" / FLOAT8_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CircuitlabError, match="fails its checksum"):
        circuitlab.load(model, out)
    # A source whose own checksums fail is refused before anything is written.
    (src / "layer_01" / "cfg.json").write_text("{}")
    with pytest.raises(CircuitlabError, match="fails its checksum"):
        quantize_folder(src, tmp_path / "q9")
    assert not (tmp_path / "q9").exists()


@pytest.mark.parametrize("window", [None, 2])
def test_clt_folder_in_8_bits(model, window, tmp_path, capsys):
    """`circuitlab quantize` on a cross-layer transcoder: the same layout with 8-bit matrices
    (one scale per feature, per feature and target layer, per skip row), each weight within
    float8's rounding of its slice's largest one; the thresholds and biases exact; skips and
    the write window kept; the manifest checked on load, eager and lazy alike."""
    from conftest import tiny_clt

    from circuitlab import clt as clt_module
    from circuitlab.replacement import ReplacementModel

    clt = tiny_clt(model, "jumprelu", skip=True, window=window)
    src = clt.save(tmp_path / "clt")
    files = sorted(p.name for p in src.iterdir())
    (src / "manifest.json").write_text(json.dumps(
        {"sha256": {f: sha256(src / f) for f in files}, "tokens_seen": 99}))
    out = tmp_path / "clt8"
    assert cli.main(["quantize", str(src), "--out", str(out)]) == 0
    assert "Wrote 3 layers" in capsys.readouterr().out
    verify_manifest(out, "8-bit CLT", "requantize")
    assert json.loads((out / "manifest.json").read_text())["tokens_seen"] == 99
    assert sum(f.stat().st_size for f in out.glob("W_*")) < 0.4 * sum(
        f.stat().st_size for f in src.glob("W_*"))
    with safe_open(out / "W_dec_0.safetensors", "pt") as f:
        assert f.metadata() == {"format": "circuitlab-float8", "version": "1"}
        assert f.get_slice("W_dec_0").get_dtype() == "F8_E4M3"
    for lazy in (False, True):
        loaded = circuitlab.load(model, out, lazy=lazy).clt if lazy else clt_module.load(out)
        assert loaded.window == clt.window and loaded.W_skip is not None
        for s in range(3):
            pairs = [(loaded.W_enc[s].T, clt.W_enc[s].T), (loaded.decoders(s), clt.decoders(s)),
                     (loaded.W_skip[s].T, clt.W_skip[s].T)]
            for got, want in pairs:  # per slice along the last axis: within 1/16 of its max
                step = want.abs().amax(-1, keepdim=True) / 16
                assert ((got - want).abs() <= step + 1e-12).all()
                assert not torch.equal(got, want)  # really rounded
            assert torch.equal(loaded.threshold[s], clt.threshold[s])
            assert torch.equal(loaded.b_enc[s], clt.b_enc[s])
    rm8 = ReplacementModel(model, clt_module.load(out), name="tiny")
    rm = ReplacementModel(model, clt, name="tiny")
    tokens = rm.tokenize("the cat sat on the mat.")
    # the replacement without error terms: close, not equal
    a, b = rm.forward(tokens), rm8.forward(tokens)
    assert torch.allclose(a, b, atol=0.05 * float(a.abs().max()))
    (out / "W_dec_1.safetensors").write_bytes(b"x" + (out / "W_dec_1.safetensors").read_bytes()[1:])
    with pytest.raises(CircuitlabError, match="W_dec_1.safetensors fails its checksum"):
        circuitlab.load(model, out)

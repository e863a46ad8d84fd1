"""Transcoder sources (hub presets on local files, SAE-Lens folders, circuit-tracer format),
model presets, caches and the bad-input errors of loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model, tiny_transcoders
from safetensors.torch import save_file

import circuitlab
from circuitlab import CircuitlabError, loading, presets
from circuitlab.replacement import ReplacementModel

PROMPT = "the cat sat on the mat."


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Serve ``hf_hub_download`` from ``tmp_path/hub/<repo>/<file>`` for SAE-Lens loaders."""
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors import safe_open
    from sae_lens.loading import pretrained_sae_loaders as loaders

    root = tmp_path / "hub"

    def download(repo_id, filename, subfolder=None, **kwargs):
        path = root / repo_id / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.exists():
            raise EntryNotFoundError(f"{path} not found")
        return str(path)

    def shapes(repo_id, filename):
        with safe_open(str(root / repo_id / filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
    return root


def reference_out(params, x):
    """Transcoder output from raw parameters: W_dec relu_thr(x W_enc + b_enc) + W_skip x + b_dec."""
    pre = x @ params["W_enc"] + params["b_enc"]
    acts = torch.relu(pre) * (pre > params.get("threshold", torch.zeros_like(pre)))
    out = acts @ params["W_dec"] + params["b_dec"]
    return out + x @ params["W_skip"].T if "W_skip" in params else out


def random_params(d, d_sae, g, skip=True, threshold=True):
    p = {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5,
         "W_dec": torch.randn(d_sae, d, generator=g) / d_sae ** 0.5,
         "b_enc": 0.1 * torch.randn(d_sae, generator=g), "b_dec": 0.1 * torch.randn(d, generator=g)}
    if skip:
        p["W_skip"] = torch.randn(d, d, generator=g) / d
    if threshold:
        p["threshold"] = 0.1 * torch.rand(d_sae, generator=g)
    return p


def check_matches(saes, params_per_layer, d):
    x = torch.randn(5, d)
    for sae, params in zip(saes, params_per_layer):
        assert torch.allclose(sae(x), reference_out(params, x), atol=1e-5)


def test_gemma_scope_2_preset_on_local_files(fake_hub, monkeypatch):
    """The Gemma Scope 2 release path: params.safetensors per layer, 'affine' skip, read through
    SAE-Lens' own converter; its 'hook_mlp_in' label is spliced at the ln2 output."""
    model = tiny_model("gemma3")
    d, L = model.cfg.d_model, model.cfg.n_layers
    g = torch.Generator().manual_seed(0)
    params = []
    for layer in range(L):
        p = random_params(d, 40, g)
        params.append(p)
        folder = fake_hub / "google/gemma-scope-2-270m-pt" / f"transcoder_all/layer_{layer}_width_16k_l0_small_affine"
        folder.mkdir(parents=True)
        save_file({"w_enc": p["W_enc"], "w_dec": p["W_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"],
                   "threshold": p["threshold"], "affine_skip_connection": p["W_skip"].T.contiguous()},
                  folder / "params.safetensors")
    saes = loading.load_transcoders("gemma-scope-2-270m-pt-transcoders-all", "gemma-3-270m", L)
    assert [type(s).__name__ for s in saes] == ["JumpReLUSkipTranscoder"] * L
    assert saes[1].cfg.metadata.hook_name == "blocks.1.hook_mlp_in"
    check_matches(saes, params, d)
    rm = circuitlab.load(model, saes)
    graph = circuitlab.attribute(rm, PROMPT, max_feature_nodes=None, progress=False, dtype=torch.float32)
    targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
    assert torch.allclose((graph.adjacency.sum(1) + graph.constants)[targets], graph.inputs[targets], atol=1e-5)
    # The features read the ln2 output, not the residual labelled hook_mlp_in in TL.
    trace = rm.run(rm.tokenize(PROMPT))
    _, cache = model.run_with_cache(rm.tokenize(PROMPT)[None])
    ln2_out = cache["blocks.1.ln2.hook_normalized"][0] * model.blocks[1].ln2.w
    assert torch.allclose(trace.mlp_in[1], ln2_out)
    assert not torch.allclose(trace.mlp_in[1], cache["blocks.1.hook_resid_mid"][0])  # = hook_mlp_in


def test_gemmascope_2b_preset_on_local_files(fake_hub):
    """GemmaScope (gemma-2-2b) transcoders: npz per layer, ln2.hook_normalized hooks."""
    d, d_sae = 2304, 16384
    g = torch.Generator().manual_seed(1)
    ids = loading._directory_sae_ids("gemma-scope-2b-pt-transcoders")
    sae_id = ids(0)
    assert sae_id.startswith("layer_0/width_16k/average_l0_")
    p = random_params(d, d_sae, g, skip=False)
    path = fake_hub / "google/gemma-scope-2b-pt-transcoders" / sae_id / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **{k: v.numpy() for k, v in p.items()})
    (sae,) = loading.load_transcoders("gemma-scope-2b-pt-transcoders", "gemma-2-2b", 1)
    assert type(sae).__name__ == "JumpReLUTranscoder"
    assert sae.cfg.metadata.hook_name == "blocks.0.ln2.hook_normalized"
    check_matches([sae], [p], d)


def test_qwen3_lowl0_preset_on_local_files(fake_hub):
    """mwhanna's Qwen3 transcoders: W_enc stored [d_sae, d_model] plus wandb/config yaml."""
    model = tiny_model("gemma3")
    d, L = model.cfg.d_model, model.cfg.n_layers
    repo = fake_hub / "mwhanna/qwen3-0.6b-transcoders-lowl0"
    repo.mkdir(parents=True)
    (repo / "wandb-config.yaml").write_text(yaml.safe_dump(
        {"d_model": {"value": d}, "d_feature": {"value": 24}, "batch_size": {"value": 64}}))
    (repo / "config.yaml").write_text(yaml.safe_dump({"model_name": "Qwen/Qwen3-0.6B"}))
    g = torch.Generator().manual_seed(2)
    params = []
    for layer in range(L):
        p = random_params(d, 24, g, skip=False, threshold=False)
        params.append(p)
        save_file({"W_enc": p["W_enc"].T.contiguous(), "W_dec": p["W_dec"], "b_enc": p["b_enc"],
                   "b_dec": p["b_dec"]}, repo / f"layer_{layer}.safetensors")
    saes = loading.load_transcoders("mwhanna-qwen3-0.6b-transcoders-lowl0", "qwen3-0.6b", L)
    assert [type(s).__name__ for s in saes] == ["Transcoder"] * L
    check_matches(saes, params, d)
    ReplacementModel(model, saes)  # 'mlp.hook_in' is accepted as the MLP input


def test_circuit_tracer_format(tmp_path):
    """config.yaml + per-layer safetensors (W_enc [d_sae, d_model], W_skip, JumpReLU threshold)."""
    model = tiny_model("gemma3")
    d, L = model.cfg.d_model, model.cfg.n_layers
    g = torch.Generator().manual_seed(3)
    params = []
    for layer in range(L):
        p = random_params(d, 30, g)
        params.append(p)
        save_file({"W_enc": p["W_enc"].T.contiguous(), "W_dec": p["W_dec"], "b_enc": p["b_enc"],
                   "b_dec": p["b_dec"], "W_skip": p["W_skip"],
                   "activation_function.threshold": p["threshold"]}, tmp_path / f"layer_{layer}.safetensors")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "meta-llama/Llama-3.2-1B", "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "transcoders": [f"layer_{l}.safetensors" for l in range(L)]}))
    rm = circuitlab.load(model, tmp_path)
    assert [type(s).__name__ for s in rm.transcoders] == ["JumpReLUSkipTranscoder"] * L
    check_matches(rm.transcoders, params, d)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"transcoders": ["missing.safetensors"]}))
    with pytest.raises(CircuitlabError, match="does not exist"):
        loading.load_transcoders(tmp_path, None, 1)


def test_sae_lens_folders_with_manifest(tmp_path):
    model = tiny_model("gemma3")
    saes = tiny_transcoders(model, "jumprelu_skip_transcoder")
    for layer, sae in reversed(list(enumerate(saes))):
        sae.save_model(tmp_path / f"layer_{layer:02d}")
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*"))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"sha256": {f: loading.sha256(tmp_path / f) for f in files}}))
    rm = circuitlab.load(model, tmp_path)
    x = torch.randn(4, model.cfg.d_model)
    for a, b in zip(rm.transcoders, saes):
        assert torch.allclose(a(x), b(x))
    # A flipped byte is caught by the checksum.
    weights = tmp_path / "layer_01" / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CircuitlabError, match="fails its checksum"):
        circuitlab.load(model, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircuitlabError, match="holds no transcoders"):
        loading.load_transcoders(tmp_path / "empty", None, 3)


def test_corrupt_or_missing_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "gemma-3-270m"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"not the weights")
    (folder / "tl_config.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps(
        {"sha256": {"model.safetensors": "0" * 64, "tl_config.json": loading.sha256(folder / "tl_config.json")}}))
    with pytest.raises(CircuitlabError, match="fails its checksum.*rebuild=True"):
        loading.load_model("gemma-3-270m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CircuitlabError, match="missing.*rebuild=True"):
        loading.load_model("gemma-3-270m")


def test_unknown_model_and_preset():
    with pytest.raises(CircuitlabError, match="Known presets: gemma-3-270m"):
        loading.load_model("no-such-model-xyz")
    with pytest.raises(CircuitlabError, match="Known releases: gemma-scope-2-270m"):
        loading.load_transcoders("no-such-release", "gemma-3-270m", 18)


def test_missing_bundle(monkeypatch, tmp_path):
    monkeypatch.setattr(presets, "BUNDLE_DIR", tmp_path)
    with pytest.raises(CircuitlabError, match="circuitlab train"):
        loading.load_transcoders(None, "gemma-3-270m", 18)
    with pytest.raises(CircuitlabError, match="No bundled transcoders"):
        loading.load_transcoders(None, "gpt2", 12)


REPO = Path(__file__).resolve().parent.parent


def test_retired_bundle_says_how_to_restore_it():
    """The per-layer set that was the default loads by name no more until restored; the
    error gives the git command, and that command's commit holds the set and its cards."""
    import subprocess

    name = "gemma-3-270m-skip-jumprelu"
    assert not (presets.BUNDLE_DIR / name).exists()
    with pytest.raises(CircuitlabError, match=r"git checkout [0-9a-f]{7,} -- data/transcoders/"):
        circuitlab.load(tiny_model("gemma3"), transcoders=name)
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the restore command cannot be checked here")
    commit = presets.RETIRED_BUNDLES[name]
    for path in presets.restore_command(name).split(" -- ")[1].split():
        subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}:{path}"], check=True)


@pytest.mark.slow
def test_retired_bundle_loads_by_name_once_restored(monkeypatch, tmp_path):
    """Restored from history (``git archive`` of the command's commit and paths), the
    per-layer set loads by its name beside the default CLT, and graphs name it."""
    import subprocess
    import tarfile

    name = "gemma-3-270m-skip-jumprelu"
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to restore from")
    paths = presets.restore_command(name).split(" -- ")[1].split()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", presets.RETIRED_BUNDLES[name],
                              *paths], check=True, capture_output=True).stdout
    (tmp_path / "a.tar").write_bytes(archive)
    with tarfile.open(tmp_path / "a.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    monkeypatch.setattr(presets, "BUNDLE_DIR", tmp_path / "data" / "transcoders")
    rm = circuitlab.load("gemma-3-270m", transcoders=name)
    assert rm.clt is None and len(rm.transcoders) == 18 and rm.transcoder_source == name
    graph = circuitlab.attribute(rm, "The capital of Texas is", max_feature_nodes=50)
    assert graph.metadata["transcoders"] == name


def test_mismatched_transcoders():
    model = tiny_model("gemma3")
    with pytest.raises(CircuitlabError, match="Got 2 transcoders .* 3 layers"):
        ReplacementModel(model, tiny_transcoders(model, "transcoder")[:2])
    wide = tiny_transcoders(tiny_model("gpt2"), "transcoder")
    for tc in wide:
        tc.cfg.d_in = 48
    with pytest.raises(CircuitlabError, match="Layer 0: transcoder maps d_in=48 -> d_out=32.*d_model is 32"):
        ReplacementModel(model, wide)
    shuffled = tiny_transcoders(model, "transcoder")
    shuffled[0], shuffled[1] = shuffled[1], shuffled[0]
    with pytest.raises(CircuitlabError, match="Transcoder #0 reads 'blocks.1.hook_mlp_in'"):
        ReplacementModel(model, shuffled)
    resid = tiny_transcoders(model, "transcoder")
    resid[2].cfg.metadata.hook_name = "blocks.2.hook_resid_pre"
    with pytest.raises(CircuitlabError, match="must read the MLP input"):
        ReplacementModel(model, resid)


def test_environment_matches_pyproject():
    root = Path(__file__).resolve().parent.parent
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) - {"-e ."} == wanted
    assert "python=3.11" in env["dependencies"]

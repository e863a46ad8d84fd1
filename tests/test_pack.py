"""``circuitlab pack``: compact training inputs for a GPU host with no registries (issue 3).

On the embedded model (slow): the pack rebuilds the model bit for bit (checked inside
``pack_inputs``, and here on activations), its token rows equal those read from the text,
``circuitlab train --model PACK`` runs from it alone, and bad input gets clear errors.
"""

import json

import pytest
import torch
from safetensors.numpy import load_file

from circuitlab.cli import main
from circuitlab.errors import CircuitlabError
from circuitlab.loading import load_model, load_pack
from circuitlab.hooks import mlp_io
from circuitlab.train.pack import pack_inputs
from circuitlab.train.data import TokenRows

pytestmark = pytest.mark.slow
SHARD_MB = 0.03  # below the embedding slice's size, so it is split into row pieces


@pytest.fixture(scope="module")
def gemma():
    return load_model()


@pytest.fixture(scope="module")
def pack(corpus, tmp_path_factory):
    return pack_inputs(tmp_path_factory.mktemp("pack") / "pack", corpus, tokens=3000,
                       shard_mb=SHARD_MB, progress=False)


def test_pack_files_are_small_and_checksummed(pack):
    meta = json.loads((pack / "pack.json").read_text())
    assert meta["tokens"] >= 3000 and meta["bos"] == 2 and meta["eos"] == 1
    assert meta["tensors"]["token_embd.weight"]["pieces"] > 1
    limit = SHARD_MB * 2**20
    for name in meta["weight_shards"] + meta["token_shards"]:
        size, arrays = (pack / name).stat().st_size, load_file(pack / name)
        data = sum(a.nbytes for a in arrays.values())
        # at most the limit, or a single tensor that is larger on its own
        assert data <= limit or len(arrays) == 1, (name, data, list(arrays))
        assert size < data + 4096  # the safetensors header is all the rest
    manifest = json.loads((pack / "manifest.json").read_text())["sha256"]
    assert set(manifest) == set(meta["weight_shards"] + meta["token_shards"] + ["pack.json"])
    packed = sum((pack / n).stat().st_size for n in meta["weight_shards"])
    assert 68e6 < packed < 69e6  # the non-embedding GGUF tensors plus ~100 embedding rows


def test_pack_rows_and_activations_match_the_text_path(pack, corpus, gemma):
    from_text = TokenRows(gemma.tokenizer, corpus, 64).take(1000)
    from_pack = TokenRows(None, pack, 64).take(1000)
    assert len(from_pack) >= 3000 // 63 and torch.equal(from_pack, from_text[:len(from_pack)])
    packed = load_pack(pack)
    assert packed.tokenizer is None
    layers = list(range(gemma.cfg.n_layers))
    for ours, theirs in zip(mlp_io(packed, from_pack[:4], layers), mlp_io(gemma, from_pack[:4], layers)):
        assert torch.equal(ours, theirs)


def test_train_from_the_pack_alone(pack, tmp_path):
    out = tmp_path / "tc"
    assert main(["train", "--model", str(pack), "--out", str(out), "--tokens", "1500",
                 "--width", "128", "--k", "8", "--context", "64", "--batch-tokens", "256",
                 "--buffer-tokens", "512", "--model-dtype", "float32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["corpus"] == str(pack.resolve())
    assert manifest["tokens_seen"] >= 1500 and len(list(out.glob("layer_*"))) == 18


def test_pack_bad_input(pack, corpus, tmp_path, gemma):
    from circuitlab.train.finetune import finetune_transcoders

    with pytest.raises(CircuitlabError, match="positive token budget"):
        pack_inputs(tmp_path / "p", corpus, tokens=0)
    with pytest.raises(CircuitlabError, match="training documents only"):
        TokenRows(None, pack, 64, split="heldout").take(1)
    with pytest.raises(CircuitlabError, match="is a pack"):
        finetune_transcoders(gemma, "data/transcoders/gemma-3-270m-clt-skip-jumprelu", pack, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pack.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = broken / "weights-03.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CircuitlabError, match="weights-03.safetensors fails its checksum"):
        load_pack(broken)

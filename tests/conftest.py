"""Tiny random models and transcoders, built in-process (no downloads)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from hub_cache import HubCache, offline_hub, write_gemma_3, write_tiny
from sae_lens import SAE
from transformer_lens import HookedTransformer, HookedTransformerConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHARS = " abcdefghijklmnopqrstuvwxyz.,!?'\"\nABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def char_tokenizer():
    """A character-level fast tokenizer that prepends BOS (id 1), saved and reloaded so
    TransformerLens can rebuild it."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    folder = tempfile.mkdtemp(prefix="circuitlab-chartok-")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, add_bos_token=True)


TINY_KINDS = {
    # Gemma 3-like: RMS sandwich norms, GQA, qk-norm, local/global rotary bases.
    "gemma3": dict(normalization_type="RMS", use_normalization_before_and_after=True,
                   n_key_value_heads=2, use_qk_norm=True, gated_mlp=True,
                   act_fn="gelu_pytorch_tanh", positional_embedding_type="rotary", rotary_dim=8,
                   use_local_attn=True, attn_types=["local", "global", "local"], window_size=6,
                   rotary_base=1000000, rotary_base_local=10000,
                   original_architecture="Gemma3ForCausalLM", final_rms=True),
    # GPT-2-like: LayerNorm with centering and biases, learned positions.
    "gpt2": dict(normalization_type="LN", act_fn="gelu", positional_embedding_type="standard",
                 original_architecture="GPT2LMHeadModel"),
}


def tiny_model(kind: str = "gemma3", seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(CHARS) + 4,
        n_ctx=64, seed=seed, dtype=torch.float32, default_prepend_bos=True, **TINY_KINDS[kind],
    )
    model = HookedTransformer(cfg, tokenizer=char_tokenizer())
    # Random nonzero biases and norm weights so the constant part is exercised.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", "b_O", "b_V", "b_U", ".b")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_transcoders(model: HookedTransformer, arch: str, d_sae: int = 48, seed: int = 0):
    """Random SAE-Lens transcoders of architecture ``arch`` for every layer of ``model``."""
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    out = []
    for layer in range(model.cfg.n_layers):
        tc = SAE.from_dict({
            "architecture": arch, "d_in": d, "d_sae": d_sae, "d_out": d, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": False,
            "metadata": {"hook_name": f"blocks.{layer}.hook_mlp_in",
                         "hook_name_out": f"blocks.{layer}.hook_mlp_out"},
        })
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, d_sae, generator=g) / d ** 0.5)
            tc.W_dec.copy_(torch.randn(d_sae, d, generator=g) / d_sae ** 0.5)
            tc.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
            tc.b_dec.copy_(0.1 * torch.randn(d, generator=g))
            if hasattr(tc, "threshold"):
                tc.threshold.copy_(0.2 * torch.rand(d_sae, generator=g))
            if hasattr(tc, "W_skip"):
                tc.W_skip.copy_(0.3 * torch.randn(d, d, generator=g) / d ** 0.5)
        out.append(tc)
    return out


ARCHS = ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


def tiny_clt(model: HookedTransformer, activation: str = "jumprelu", skip: bool = True,
             d_sae: int = 32, seed: int = 0, window: int | None = None):
    """A random ``CrossLayerTranscoder`` over every layer of ``model`` (its features writing
    into ``window`` layers, or all later ones)."""
    from circuitlab.clt import CrossLayerTranscoder

    g = torch.Generator().manual_seed(seed)
    L, d = model.cfg.n_layers, model.cfg.d_model
    clt = CrossLayerTranscoder(L, d, d_sae, activation=activation, skip=skip,
                               k=6 if activation == "topk" else None, model_name="tiny",
                               window=window)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(L, d, d_sae, generator=g) / d ** 0.5)
        clt.b_enc.copy_(0.1 * torch.randn(L, d_sae, generator=g))
        clt.b_dec.copy_(0.1 * torch.randn(L, d, generator=g))
        for s in range(L):
            n = clt.n_out(s)
            clt.W_dec[s].copy_(torch.randn(d_sae, n, d, generator=g) / (d_sae * n) ** 0.5)
        if clt.threshold is not None:
            clt.threshold.copy_(0.2 * torch.rand(L, d_sae, generator=g))
        if skip:
            clt.W_skip.copy_(0.3 * torch.randn(L, d, d, generator=g) / d ** 0.5)
    return clt


#: CLT variants: (activation, skip).
CLT_KINDS = [("relu", False), ("jumprelu", True), ("topk", False), ("topk", True)]


@pytest.fixture(scope="session")
def tiny():
    return tiny_model("gemma3")


@pytest.fixture(scope="session")
def tiny_rm(tiny):
    from circuitlab.replacement import ReplacementModel

    return ReplacementModel(tiny, tiny_transcoders(tiny, "jumprelu_skip_transcoder"), name="tiny")


WORDS = ("the cat sat on a mat and the dog ran to the big red house while a small bird sang "
         "of rain Rain fell. Why? 'Yes,' she said, \"no\" 42 times!").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file of 600 random documents over a small vocabulary (training tests)."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


SMALL = dict(width=64, k=4, context=64, batch_tokens=512, buffer_tokens=2048, aux_k=16,
             dead_tokens=2048, progress=False)  # small, fast training settings for tests


@pytest.fixture(scope="module")
def model():
    """The tiny random Gemma-3-like model (training tests)."""
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def trained(model, corpus, tmp_path_factory):
    """Transcoders trained on ``corpus`` for 20k tokens with ``SMALL`` settings."""
    from circuitlab.train.trainer import train_transcoders

    return train_transcoders(model, corpus, tmp_path_factory.mktemp("run") / "tc", tokens=20_000,
                             **SMALL)


# ----------------------------------------------------------------------------- feature cards

#: The held-out split of ``heldout_corpus``, over which the ``cached`` cards are built.
DOCS = ["the cat sat on the mat. " * 5, "A dog ran far away, and then it came back! " * 3,
        "Quick brown foxes jump over lazy dogs? " * 4, "one two three four five six seven"]


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty cache dir, so nothing is cached for the tiny model."""
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def heldout_corpus(tmp_path):
    """A corpus folder whose held-out split is ``DOCS`` (feature-card tests)."""
    import json

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return folder


@pytest.fixture
def cached(tiny_rm, heldout_corpus, no_cache):
    """Examples built for the tiny model over the tiny held-out corpus, in the cache dir."""
    from circuitlab.cards import read_examples
    from circuitlab.train.build_cards import build_examples

    path = build_examples(tiny_rm, heldout_corpus, tokens=300, context=24, batch_size=3, progress=False)
    return read_examples(path)


@pytest.fixture(scope="module")
def gemma():
    """The embedded model with its bundled transcoders (slow tests)."""
    import circuitlab

    return circuitlab.load("gemma-3-270m")


# ----------------------------------------------------------------------- hub cache (test_hub)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A temporary ``HF_HOME`` whose hub cache (the hub's on-disk layout, see
    ``tests/hub_cache.py``) holds tiny random models with GemmaScope and mwhanna /
    circuit-tracer transcoders (a few seconds). Activate it with ``offline_hub_cache``."""
    home = tmp_path_factory.mktemp("hf_home")
    return HubCache(home, write_tiny(home, char_tokenizer()))


@pytest.fixture(scope="session")
def gemma_hub_cache(hub_cache):
    """``hub_cache`` plus the real ``google/gemma-3-270m`` (the embedded GGUF dequantized)
    and random Gemma Scope 2 transcoders for it (about a minute; slow tests)."""
    if "gemma-scope-2" not in hub_cache.params:
        hub_cache.params["gemma-scope-2"] = write_gemma_3(hub_cache.home)
    return hub_cache


@pytest.fixture(scope="module")
def offline_hub_cache(hub_cache):
    """``hub_cache`` as the Hugging Face cache (``HF_HOME``, ``HF_HUB_OFFLINE=1``, no
    network), with SAE-Lens's one network-only call replaced (``hub_cache.offline_hub``)."""
    with offline_hub(hub_cache.home):
        yield hub_cache

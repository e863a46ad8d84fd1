#!/usr/bin/env bash
# GPU checks in one short command: the cuda-marked tests (exactness, interventions and
# training on cuda; tests/test_cuda.py) and the time of one 30-token graph of the embedded
# model on cuda. Usage: scripts/gpu_check.sh [cuda:N]   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here')"
"$PY" -m pytest -q -m cuda tests/test_cuda.py

"$PY" - "$DEVICE" <<'PYCODE'
import sys, time
import torch
import circuitlab

device = sys.argv[1]
print(circuitlab.plan("gemma-3-270m", tokens=30, device=device))
t0 = time.perf_counter()
rm = circuitlab.load("gemma-3-270m", device=device)          # bfloat16 weights on CUDA
print(f"loaded {rm} ({next(rm.model.parameters()).dtype}) in {time.perf_counter() - t0:.1f} s")
text = ("The quick brown fox jumps over the lazy dog while the small bird sings of rain "
        "and the old man walks his dog along the river to the market in town.")
ids = rm.tokenizer.encode(text, add_special_tokens=False)[:29]
prompt = rm.tokenizer.decode(ids)
print(f"prompt: {len(rm.tokenize(prompt))} tokens (BOS included)")
circuitlab.attribute(rm, "Warm up the kernels.", max_feature_nodes=256, progress=False)
torch.cuda.reset_peak_memory_stats()
torch.cuda.synchronize()
t0 = time.perf_counter()
graph = circuitlab.attribute(rm, prompt, max_feature_nodes=8192, progress=False)
torch.cuda.synchronize()
seconds = time.perf_counter() - t0
targets = torch.tensor(graph.nodes["kind"].isin(["feature", "logit"]).to_numpy())
gap = ((graph.adjacency.sum(1) + graph.constants - graph.inputs)[targets].abs().max()
       / graph.inputs[targets].abs().max())
print(f"30-token graph: {seconds:.1f} s, {graph.metadata['n_active_features']} active features, "
      f"{(graph.nodes['kind'] == 'feature').sum()} feature nodes, peak GPU memory "
      f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, max |edges + constant - input| "
      f"{float(gap):.2e} of the largest input")
PYCODE

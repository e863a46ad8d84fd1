"""Replacement and completeness scores and mean path lengths of the demo graph and the
notebooks' prompts, for one transcoder set: how much of each graph the transcoders explain
(see the README's glossary). Used to compare a newly trained set with the bundled one, or
with a set named by its folder or bundled name.

    python scripts/graph_scores.py [--transcoders FOLDER] [--set untuned] [--max-nodes N] [--json FILE]

Each graph is traced at its notebook's node budget unless ``--max-nodes`` sets one for all
(``attribute``'s default is 8192, more than the active features of most of these prompts).
"""

from __future__ import annotations

import argparse
import json
import time

import circuitlab
from circuitlab.attribution import attribute
from circuitlab.files import atomic_write_text

#: (name, prompt, max feature nodes): the demo (``make demo``) and the notebooks' prompts.
PROMPTS = [
    ("demo", 'The opposite of "small" is "', 8192),
    ("00 quickstart", 'The opposite of "small" is "', 1000),
    ("01 hop 1", "Dallas is a city in the state of", 500),
    ("01 hop 2", "The capital of Texas is the city of", 500),
    ("02 rhyme", "The cat sat on the mat,\nIt was wearing a big", 500),
    ("03 fr", 'Le contraire de "petit" est "', 500),
    ("03 es", 'Lo contrario de "pequeño" es "', 500),
    ("04 hinted", "Q: What is the capital of France? (I think it's Lyon)\nA: The capital of France is", 500),
    ("05 probe", "The capital of France is the city of", 1000),
]


#: Prompts no transcoder set was tuned on, fixed before the cross-layer training started:
#: prose, code, multilingual, arithmetic and rhyme, traced with the default node budget.
UNTUNED = [
    ("prose", "The old lighthouse keeper climbed the stairs every night to light the", 500),
    ("code", "def add(a, b):\n    return a", 500),
    ("de", 'Das Gegenteil von "groß" ist "', 500),
    ("zh", "中国的首都是", 500),
    ("arithmetic", "12 + 7 =", 500),
    ("rhyme", "Roses are red,\nViolets are blue,\nSugar is sweet,\nAnd so are", 500),
    ("facts", "The Great Wall is in the country of", 500),
]
SETS = {"notebooks": PROMPTS, "untuned": UNTUNED}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcoders", default=None, help="folder of per-layer transcoders or of a cross-layer transcoder, "
                        "or a bundled set's name (default: the bundled default)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--set", default="notebooks", choices=sorted(SETS),
                        help="the demo and notebook prompts, or prompts nothing was tuned on")
    parser.add_argument("--max-nodes", type=int, default=None,
                        help="feature node budget of every graph (default: each prompt's own)")
    args = parser.parse_args()
    rm = circuitlab.load("gemma-3-270m", args.transcoders)
    rows = []
    print("| graph | feature nodes | replacement | completeness | pruned replacement | "
          "pruned completeness | path length | pruned path length |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, prompt, max_nodes in SETS[args.set]:
        t0 = time.perf_counter()
        max_nodes = args.max_nodes or max_nodes
        graph = attribute(rm, prompt, max_feature_nodes=max_nodes, progress=False)
        full, pruned = graph.scores(), graph.prune().scores()
        row = {"graph": name, "prompt": prompt, "max_feature_nodes": max_nodes,
               "features": int((graph.nodes["kind"] == "feature").sum()),
               "replacement": full["replacement"], "completeness": full["completeness"],
               "pruned_replacement": pruned["replacement"],
               "pruned_completeness": pruned["completeness"],
               "path_length": full["path_length"], "pruned_path_length": pruned["path_length"],
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"| {name} | {row['features']} | {row['replacement']:.3f} | {row['completeness']:.3f} | "
              f"{row['pruned_replacement']:.3f} | {row['pruned_completeness']:.3f} | "
              f"{row['path_length']:.2f} | {row['pruned_path_length']:.2f} |", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"transcoders": str(rm.transcoder_source),
                                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

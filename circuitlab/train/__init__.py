"""Training transcoders: corpus, activations, TopK training, decoder fine-tuning, packs.

Importing this package is cheap; its modules load torch when imported.
"""

#: Features per layer and active features per token of the bundled transcoders: the
#: training defaults of ``train_transcoders`` and ``circuitlab train``.
WIDTH, K = 1536, 64

#: Features per layer and active features per token and layer of ``train_clt`` and
#: ``circuitlab train --clt``.
CLT_WIDTH, CLT_K = 2048, 16

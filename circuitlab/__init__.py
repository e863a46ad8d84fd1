"""circuitlab: attribution graphs of transcoder features, inside Jupyter."""

from .attribution import attribute
from .features import compare
from .graph import Graph
from .interventions import ablate, add, scale, set_to, swap
from .loading import CircuitlabError, load_model, load_transcoders
from .viz import explore
from .replacement import ReplacementModel

__all__ = ["load", "attribute", "Graph", "ReplacementModel", "CircuitlabError",
           "explore", "swap", "compare", "set_to", "scale", "ablate", "add"]


def load(model="gemma-3-270m", transcoders=None, *, device: str = "cpu", rebuild: bool = False):
    """Load a ``ReplacementModel``.

    Args:
        model: a preset name (``"gemma-3-270m"`` works offline), a TransformerLens/HF model
            name, or a ``HookedTransformer``.
        transcoders: ``None`` for the bundled set of the embedded model; an SAE-Lens release
            name; a directory (SAE-Lens folders or circuit-tracer ``config.yaml``); or a list
            of SAE-Lens transcoders, one per layer.
        device: torch device.
        rebuild: rebuild the embedded model's cache.

    Examples:
        >>> rm = circuitlab.load("gemma-3-270m")
        >>> rm = circuitlab.load("gemma-2-2b", transcoders="gemma-scope-2b-pt-transcoders")
    """
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        hooked, name = model, model.cfg.model_name
    else:
        hooked, name = load_model(model, device=device, rebuild=rebuild), model
    source = transcoders if isinstance(transcoders, (str, type(None))) else (
        str(transcoders) if not isinstance(transcoders, (list, tuple)) else "custom")
    tcs = load_transcoders(transcoders, name, hooked.cfg.n_layers, device=device)
    from .loading import DEFAULT_BUNDLE

    return ReplacementModel(hooked, tcs, name=name,
                            transcoder_source=source or DEFAULT_BUNDLE.get(name))

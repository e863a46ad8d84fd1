"""The frozen replacement model's vector-Jacobian product, by hand.

With attention patterns and norm denominators frozen at their values on a prompt, the
replacement model is linear from its sources to its targets. ``FrozenBackward`` holds that
linear map's per-layer pieces (the frozen norms as per-position factors, the value and output
matrices, the transposed patterns, the transcoders' skips) and applies its transpose layer by
layer; ``attribution`` runs it batched over targets, ``attention`` splits it by head.
"""

from __future__ import annotations

import torch

from .hooks import scale_name
from .replacement import ReplacementModel, Trace


def _center(g: torch.Tensor, center: bool) -> torch.Tensor:
    return g - g.mean(-1, keepdim=True) if center else g


class FrozenBackward:
    """The frozen replacement model's VJP for one prompt, with per-layer tensors cached.

    A norm with a frozen denominator, ``y = (x [- mean x]) / scale * w [+ b]``, has the VJP
    ``g -> center(g * w / scale)``; ``w / scale`` is cached per layer as ``[P, d]``.
    Transcoders that read the residual before the pre-MLP norm (``rm.reads == "resid_mid"``)
    see it unnormalized: their encoders and skip paths skip that VJP (``read = None``).
    """

    def __init__(self, rm: ReplacementModel, trace: Trace, dtype: torch.dtype):
        cfg = rm.cfg
        self.dtype = dtype
        self.center = cfg.normalization_type == "LN"
        normed = rm.reads == "mlp_in"
        self.sandwich = bool(cfg.use_normalization_before_and_after)
        cast = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
        up = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731
        factor = lambda ln, name: cast(up(ln.w) / up(trace.scales[name]))  # noqa: E731
        self.layers = []
        for l, block in enumerate(rm.model.blocks):
            attn = block.attn
            W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V  # [n_kv, d, dh]
            skip = rm.skip_matrix(l)
            self.layers.append(dict(
                W_OT=cast(attn.W_O.reshape(-1, cfg.d_model).T),          # [d, H*dh]
                W_VT=cast(W_V.permute(0, 2, 1).reshape(-1, cfg.d_model)),  # [n_kv*dh, d]
                n_kv=W_V.shape[0],
                patternT=cast(trace.patterns[l].transpose(-1, -2)),       # [H, Pk, Pq]
                ln1=factor(block.ln1, scale_name("ln1", l)),
                ln1_post=factor(block.ln1_post, scale_name("ln1_post", l))
                if self.sandwich else None,
                read=factor(block.ln2, scale_name("ln2", l)) if normed else None,
                skip=None if skip is None else cast(skip),                  # [d_out, d_in]
            ))
        self.final = factor(rm.model.ln_final, scale_name("ln_final"))

    def mlp(self, g: torch.Tensor, l: int) -> torch.Tensor:
        """Grad wrt resid_post[l] -> grad wrt resid_mid[l] (residual + skip path).

        Gradients are laid out ``[P, B, d]`` (position-major) so every product is one large
        matrix multiplication.
        """
        layer = self.layers[l]
        if layer["skip"] is None:
            return g
        return self._add_normed(g, g @ layer["skip"], layer["read"])

    def attention(self, g: torch.Tensor, l: int) -> torch.Tensor:
        """Grad wrt resid_mid[l] -> grad wrt resid_pre[l] (residual + frozen attention)."""
        layer, (P, B, d) = self.layers[l], g.shape
        ga = _center(g * layer["ln1_post"][:P, None], self.center) if self.sandwich else g
        ga = ga.reshape(P * B, d)
        pT = layer["patternT"][:, :P, :P]
        H, n_kv = pT.shape[0], layer["n_kv"]
        dh = layer["W_OT"].shape[1] // H
        gy = None
        for kv in range(n_kv):
            gv = None
            for h in range(kv * H // n_kv, (kv + 1) * H // n_kv):
                gz = (ga @ layer["W_OT"][:, h * dh:(h + 1) * dh]).view(P, B * dh)
                gv = pT[h] @ gz if gv is None else gv.addmm_(pT[h], gz)
            part = gv.view(P * B, dh) @ layer["W_VT"][kv * dh:(kv + 1) * dh]
            gy = part if gy is None else gy.add_(part)
        return self._add_normed(g, gy.view(P, B, d), layer["ln1"])

    def _add_normed(self, g: torch.Tensor, y: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
        """``g + center(y * factor)`` for ``y [P, B, d]`` and a per-position ``factor [P, d]``
        (``g + y`` for no factor)."""
        if factor is None:
            return g + y
        f = factor[:g.shape[0], None]
        return g + _center(y * f, True) if self.center else torch.addcmul(g, y, f)

    def injection(self, l: int | None, pos: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """Gradients wrt the residual of target inputs ``vecs . norm_out`` read through the
        pre-MLP norm of layer ``l`` (feature targets; no norm for transcoders that read the
        residual) or the final norm (``l=None``)."""
        factor = self.final if l is None else self.layers[l]["read"]
        if factor is None:
            return vecs.to(self.dtype)
        return _center(vecs.to(self.dtype) * factor[pos], self.center)

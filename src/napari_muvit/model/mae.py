"""Multi-resolution masked auto-encoder (MAE) pre-training of the MuViT encoder.

Follows the paper/supplement and the official package (spec §5):

* a fraction ``masking_ratio`` of all tokens (over all levels together) is masked; the share
  of *kept* tokens per level follows level weights ``w ~ Dirichlet(alpha·1_L)``;
* the encoder runs on the visible tokens only (with their world coordinates);
* per level a decoder (``decoder_mode="multi"``) reconstructs that level's tokens: its first
  layer is cross-attention from the level's tokens (visible outputs + per-level mask tokens) to
  the tokens of *all* levels (un-normalised context), later layers self-attend within the level;
* a shared final Linear predicts the P·P·C patch pixels; MSE on masked patches.

Differences to the official package (documented choices):

* the Dirichlet level weights are drawn **per sample** (official: one draw per batch);
* sampling runs on the CPU and indices are moved to the model's device, so it works on CUDA,
  CPU and MPS alike (torch has no Dirichlet/Gamma sampler on MPS);
* ``loss_mode="level_mean"`` (default, used for training): MSE averaged over the masked tokens
  of each level, then over levels — so a level is not under-weighted when few of its tokens are
  masked. ``loss_mode="token_mean"`` reproduces the official number (plain mean over all masked
  tokens); official folders load with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from napari_muvit.errors import InputError
from napari_muvit.model.checkpoint import load_folder, save_model
from napari_muvit.model.encoder import MuViTEncoder, TransformerLayer
from napari_muvit.model.rope import AxialRoPE

__all__ = ["LevelDecoder", "MuViTMAE", "sample_level_masks"]

LOSS_EPS = 1e-2


class LevelDecoder(nn.Module):
    """Decoder of one level: ``proj`` (Linear D→Dd, GELU, LayerNorm) + transformer layers.

    Layer 0 is cross-attention only when ``cross_first`` (official ``"multi"``).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_layers: int,
        heads: int,
        rotary_mode: str = "per_layer",
        rotary_base: float = 10000.0,
        dropout: float = 0.0,
        cross_first: bool = True,
    ):
        super().__init__()
        # Indices 0/1/2 keep the official key names proj.0 (Linear) and proj.2 (LayerNorm).
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim, heads, dropout, rotary_mode, rotary_base, cross=cross_first and j == 0
            )
            for j in range(num_layers)
        )
        self.rotary_mode = rotary_mode
        if rotary_mode in ("shared", "fixed"):
            self.rope = AxialRoPE(dim, heads, rotary_base, learnable=rotary_mode == "shared")
        else:
            self.rope = None

    def forward(
        self, q: Tensor, coords: Tensor, context: Tensor | None, context_coords: Tensor
    ) -> Tensor:
        """``q`` (B, n, Dd) already projected; ``context`` (B, N, Dd) projected, un-normalised."""
        shared_q = shared_k = None
        if self.rope is not None:
            shared_q, shared_k = self.rope(coords), self.rope(context_coords)
        per_layer = self.rotary_mode == "per_layer"
        for layer in self.layers:
            if layer.cross:
                q = layer(
                    q,
                    coords if per_layer else None,
                    context,
                    context_coords if per_layer else None,
                    rope=shared_q,
                    context_rope=shared_k,
                )
            else:
                q = layer(q, coords if per_layer else None, rope=shared_q)
        return q


def sample_level_masks(
    batch: int,
    n_per_level: int,
    weights: Tensor,
    keep: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted random split of ``L·n`` tokens into kept and masked indices (on the CPU).

    ``weights`` (B, L): relative probability of each level's tokens to be *kept* (drawn first
    in a weighted permutation). Returns ``(idx_keep (B, keep), idx_mask (B, N − keep))`` int64.
    """
    probs = weights.to(torch.float64).repeat_interleave(n_per_level, dim=1)
    # Guard against exact zeros (Dirichlet underflow) which multinomial cannot draw.
    probs = probs.clamp_min(1e-30)
    N = probs.shape[1]
    idx = torch.multinomial(probs, N, replacement=False, generator=generator)
    return idx[:, :keep], idx[:, keep:]


class MuViTMAE(nn.Module):
    """MAE pre-training wrapper around a :class:`MuViTEncoder`.

    Args:
        encoder: the encoder to pre-train.
        decoder_dim: decoder width Dd (256 in the paper).
        decoder_layers: layers per level decoder (2; the first is cross-attention).
        masking_ratio: fraction of all tokens masked (0.75).
        dirichlet_alpha: concentration of the per-level keep weights (0.5).
        masking_mode: ``"dirichlet"``, ``"random"`` (equal weights) or L fixed weights.
        decoder_mode: ``"multi"`` (official/paper) or ``"multi_iso"`` (no cross-attention).
        loss: ``"mse"`` (raw pixels) or ``"norm_mse"`` (per-patch normalised targets).
        loss_mode: ``"level_mean"`` (training default) or ``"token_mean"`` (official number).
        decoder_heads: decoder attention heads (default: the encoder's, as official).
        decoder_rotary_mode: RoPE mode of the decoders (``"per_layer"`` as official).
        normalization, meta: stored in the checkpoint.

    ``mae(x, bbox)`` -> dict with ``loss`` (scalar), ``loss_per_level`` (L,), ``pred``
    (B, N, P·P·C), ``idx_keep`` (B, K), ``idx_mask`` (B, N−K), ``encoded`` (B, K, D),
    ``mask`` (B, N) bool (True = masked) and ``patches`` (B, N, P·P·C) targets.
    """

    def __init__(
        self,
        encoder: MuViTEncoder,
        decoder_dim: int = 256,
        decoder_layers: int = 2,
        masking_ratio: float = 0.75,
        dirichlet_alpha: float = 0.5,
        masking_mode: str | Sequence[float] = "dirichlet",
        decoder_mode: str = "multi",
        loss: str = "mse",
        loss_mode: str = "level_mean",
        decoder_heads: int | None = None,
        decoder_rotary_mode: str = "per_layer",
        normalization: dict | None = None,
        meta: dict | None = None,
    ):
        super().__init__()
        if not 0.0 < masking_ratio < 1.0:
            raise InputError(f"masking_ratio: expected a value in (0, 1), got {masking_ratio}")
        if dirichlet_alpha <= 0:
            raise InputError(f"dirichlet_alpha: expected > 0, got {dirichlet_alpha}")
        if decoder_mode not in ("multi", "multi_iso"):
            raise InputError(f"decoder_mode: expected 'multi' or 'multi_iso', got {decoder_mode!r}")
        if loss not in ("mse", "norm_mse"):
            raise InputError(f"loss: expected 'mse' or 'norm_mse', got {loss!r}")
        if loss_mode not in ("level_mean", "token_mean"):
            raise InputError(f"loss_mode: expected 'level_mean' or 'token_mean', got {loss_mode!r}")
        L = encoder.num_levels
        if not isinstance(masking_mode, str):
            masking_mode = [float(v) for v in masking_mode]
            if len(masking_mode) != L or min(masking_mode) < 0 or max(masking_mode) <= 0:
                raise InputError(
                    f"masking_mode: expected 'dirichlet', 'random' or {L} non-negative weights, "
                    f"got {masking_mode}"
                )
        elif masking_mode not in ("dirichlet", "random"):
            raise InputError(
                f"masking_mode: expected 'dirichlet' or 'random', got {masking_mode!r}"
            )
        self.encoder = encoder
        self.decoder_dim = int(decoder_dim)
        self.decoder_layers = int(decoder_layers)
        self.masking_ratio = float(masking_ratio)
        self.dirichlet_alpha = float(dirichlet_alpha)
        self.masking_mode = masking_mode
        self.decoder_mode = decoder_mode
        self.loss = loss
        self.loss_mode = loss_mode
        self.decoder_heads = int(decoder_heads or encoder.heads)
        self.decoder_rotary_mode = decoder_rotary_mode
        if normalization is not None and not isinstance(normalization, dict):
            to_dict = getattr(normalization, "to_dict", None)
            if to_dict is None:
                raise InputError(
                    f"normalization: expected a dict or Normalization, got {type(normalization).__name__}"
                )
            normalization = to_dict()
        self.normalization = normalization
        self.meta = dict(meta or {})
        D, P, C = encoder.dim, encoder.patch_size, encoder.in_channels
        self.mask_token = nn.Parameter(torch.randn(1, L, D) * 0.02)
        self.decoder = nn.ModuleList(
            LevelDecoder(
                D,
                self.decoder_dim,
                self.decoder_layers,
                self.decoder_heads,
                decoder_rotary_mode,
                encoder.rotary_base,
                encoder.dropout,
                cross_first=decoder_mode == "multi",
            )
            for _ in range(L)
        )
        self.final = nn.Linear(self.decoder_dim, P * P * C)

    @property
    def decoder_config(self) -> dict[str, Any]:
        """Constructor kwargs of the decoder part (the ``head`` section of the checkpoint)."""
        return {
            "decoder_dim": self.decoder_dim,
            "decoder_layers": self.decoder_layers,
            "masking_ratio": self.masking_ratio,
            "dirichlet_alpha": self.dirichlet_alpha,
            "masking_mode": self.masking_mode,
            "decoder_mode": self.decoder_mode,
            "loss": self.loss,
            "loss_mode": self.loss_mode,
            "decoder_heads": self.decoder_heads,
            "decoder_rotary_mode": self.decoder_rotary_mode,
        }

    @property
    def levels(self) -> tuple[float | int, ...]:
        return self.encoder.levels

    def num_keep(self, num_tokens: int) -> int:
        """Visible tokens per sample: ``int(N·(1 − masking_ratio))`` (official), at least 1."""
        return max(1, int(num_tokens * (1 - self.masking_ratio)))

    def sample_masks(
        self,
        batch: int,
        n_per_level: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(idx_keep, idx_mask)`` on the CPU and move them to ``device``.

        ``generator`` (a CPU generator) makes the draw reproducible without touching the global
        RNG state.
        """
        L = self.encoder.num_levels
        N = L * n_per_level
        if self.masking_mode == "dirichlet":
            conc = torch.full((L,), self.dirichlet_alpha, dtype=torch.float64)
            if generator is not None:
                seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    w = torch.distributions.Dirichlet(conc).sample((batch,))
            else:
                w = torch.distributions.Dirichlet(conc).sample((batch,))
        elif self.masking_mode == "random":
            w = torch.ones(batch, L, dtype=torch.float64)
        else:
            w = torch.tensor(self.masking_mode, dtype=torch.float64).expand(batch, L)
        keep, mask = sample_level_masks(batch, n_per_level, w, self.num_keep(N), generator)
        return keep.to(device), mask.to(device)

    def _check_idx(
        self, idx_keep: Any, idx_mask: Any, B: int, N: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        idx_keep = torch.as_tensor(idx_keep, device=device).long()
        if idx_keep.ndim != 2 or idx_keep.shape[0] != B or not 0 < idx_keep.shape[1] < N:
            raise InputError(
                f"idx_keep: expected shape ({B}, K) with 0 < K < {N}, got {tuple(idx_keep.shape)}"
            )
        if int(idx_keep.min()) < 0 or int(idx_keep.max()) >= N:
            raise InputError(
                f"idx_keep: expected token indices in [0, {N}), got out-of-range values"
            )
        if idx_mask is None:
            keep = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, idx_keep, True)
            order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
            idx_mask = order[:, : N - idx_keep.shape[1]]
        else:
            idx_mask = torch.as_tensor(idx_mask, device=device).long()
            if idx_mask.shape != (B, N - idx_keep.shape[1]):
                raise InputError(
                    f"idx_mask: expected shape ({B}, {N - idx_keep.shape[1]}), got {tuple(idx_mask.shape)}"
                )
        cover = torch.zeros(B, N, dtype=torch.int32, device=device)
        cover.scatter_add_(1, torch.cat([idx_keep, idx_mask], 1), torch.ones_like(cover))
        if not bool((cover == 1).all()):
            raise InputError("idx_keep/idx_mask: expected a partition of all token indices")
        return idx_keep, idx_mask

    def forward(
        self,
        x: Tensor,
        bbox: Any = None,
        idx_keep: Any = None,
        idx_mask: Any = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Masked reconstruction of ``x`` (B, L, C, H, W) with world ``bbox`` (B, L, 2, 2).

        ``idx_keep``/``idx_mask`` replay a given masking (e.g. the official fixture); otherwise
        masks are sampled (CPU, optional ``generator``).
        """
        enc = self.encoder
        x = enc.check_input(x)
        B, L, _, H, W = x.shape
        P = enc.patch_size
        n = (H // P) * (W // P)
        N = L * n
        coords = enc.token_coords(bbox, x.shape, x.device)
        tokens0, patches = enc.embed(x)
        if idx_keep is None:
            if idx_mask is not None:
                raise InputError("idx_mask: given without idx_keep (pass both or idx_keep only)")
            idx_keep, idx_mask = self.sample_masks(B, n, x.device, generator)
        else:
            idx_keep, idx_mask = self._check_idx(idx_keep, idx_mask, B, N, x.device)
        D = enc.dim
        level_of = enc.level_index(n, x.device)  # (N,)
        vis = torch.gather(tokens0, 1, idx_keep[..., None].expand(-1, -1, D))
        vis_coords = torch.gather(coords, 1, idx_keep[..., None].expand(-1, -1, 2))
        encoded, _ = enc.run_layers(vis, vis_coords, None, level_of[idx_keep])
        # Full token set: per-level mask tokens everywhere, visible outputs scattered back.
        z = self.mask_token[0, level_of].to(encoded.dtype).unsqueeze(0).expand(B, -1, -1)
        z = z.scatter(1, idx_keep[..., None].expand(-1, -1, D), encoded)
        outs = []
        for lvl, dec in enumerate(self.decoder):
            # The same projection feeds queries and context; float32 residual under autocast.
            ctx = dec.proj(z).to(z.dtype)
            q = ctx[:, lvl * n : (lvl + 1) * n]
            qc = coords[:, lvl * n : (lvl + 1) * n]
            outs.append(dec(q, qc, ctx if self.decoder_mode == "multi" else None, coords))
        pred = self.final(torch.cat(outs, dim=1))
        loss, per_level, mask = self.reconstruction_loss(pred, patches, idx_mask, n)
        return {
            "loss": loss,
            "loss_per_level": per_level,
            "pred": pred,
            "idx_keep": idx_keep,
            "idx_mask": idx_mask,
            "encoded": encoded,
            "mask": mask,
            "patches": patches,
        }

    def reconstruction_loss(
        self,
        pred: Tensor,
        patches: Tensor,
        idx_mask: Tensor,
        n_per_level: int,
        loss_mode: str | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, loss_per_level (L,), mask (B, N))`` on the masked tokens, in float32.

        ``loss_per_level[l]`` is the MSE over the masked tokens of level l (0 if none is
        masked). ``loss`` is the mean of ``loss_per_level`` over levels with masked tokens
        (``"level_mean"``) or the plain mean over all masked tokens (``"token_mean"``, official).
        """
        mode = loss_mode or self.loss_mode
        B, N, _ = pred.shape
        target = patches.float()
        if self.loss == "norm_mse":
            target = (target - target.mean(-1, keepdim=True)) / (
                target.std(-1, keepdim=True) + LOSS_EPS
            )
        else:
            target = target / ((1 - LOSS_EPS) + LOSS_EPS)  # official: (x - 0) / (1 - eps + eps)
        err = (pred.float() - target).pow(2).mean(-1)  # (B, N)
        mask = torch.zeros(B, N, dtype=torch.bool, device=pred.device).scatter_(1, idx_mask, True)
        L = N // n_per_level
        m = mask.view(B, L, n_per_level).float()
        e = err.view(B, L, n_per_level)
        cnt = m.sum(dim=(0, 2))
        per_level = (e * m).sum(dim=(0, 2)) / cnt.clamp_min(1)
        if mode == "token_mean":
            loss = (err * mask).sum() / mask.sum().clamp_min(1)
        else:
            has = cnt > 0
            loss = per_level[has].mean() if bool(has.any()) else err.sum() * 0
        return loss, per_level, mask

    def unpatchify(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """(B, L·h·w, P·P·C) patch vectors -> images (B, L, C, H, W) (for visualising ``pred``)."""
        P, C = self.encoder.patch_size, self.encoder.in_channels
        h, w = height // P, width // P
        B = tokens.shape[0]
        t = tokens.reshape(B, -1, h, w, P, P, C)
        return t.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, -1, C, h * P, w * P)

    # -------------------------------------------------------------------------- I/O
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.yaml`` + ``model.safetensors`` (kind ``mae``)."""
        return save_model(self, folder, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, map_location: str | torch.device = "cpu"
    ) -> MuViTMAE:
        """Load our MAE folder or an official muvit MAE folder."""
        return load_folder(folder, MuViTEncoder, {"mae": cls}, map_location, expected="an MAE")

    def checkpoint_config(self) -> dict[str, Any]:
        """Everything of ``config.yaml`` but format fields and meta (used by save_model)."""
        return {
            "kind": "mae",
            "encoder": self.encoder.config,
            "head": self.decoder_config,
            "class_names": None,
            "label_values": None,
            "class_colors": None,
            "normalization": self.normalization,
        }

    @classmethod
    def from_checkpoint_config(
        cls, encoder: MuViTEncoder, cfg: dict[str, Any], meta: dict[str, Any]
    ) -> MuViTMAE:
        """Inverse of :meth:`checkpoint_config` (weights are loaded by the caller)."""
        return cls(encoder, **cfg["head"], normalization=cfg.get("normalization"), meta=meta)

"""What sentence-transformers runs on the token states: pooling, Dense, Normalize (torch).

``pool`` reproduces ``sentence_transformers`` Pooling for right-padded batches (every mode,
prompt tokens left out when ``include_prompt`` is False); ``load_head`` builds the Dense and
Normalize modules that follow it from their folders (safetensors only).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from embedjob.errors import CheckpointError
from embedjob.model.generic import DENSE_WEIGHTS, PICKLE_SUFFIXES, Head, HeadStep, activation_class


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str,
         skip: torch.Tensor | None = None) -> torch.Tensor:
    """Pool [B, L, H] token states over a [B, L] right-padding mask in fp32 -> [B, H * modes].

    Args:
        hidden: Token states.
        mask: 1 for tokens, 0 for padding.
        pooling: Modes joined by ``+`` (``cls``, ``mean``, ``max``, ``mean_sqrt_len_tokens``,
            ``weightedmean``, ``lasttoken``), concatenated in that order.
        skip: [B] leading tokens per row left out of pooling (the prompt), or None.
    """
    hidden = hidden.float()
    positions = torch.arange(hidden.shape[1], device=hidden.device)  # [L]
    weights = mask.to(torch.float32)  # [B, L]
    if skip is not None:
        weights = weights * (positions[None, :] >= skip[:, None])
    return torch.cat([_pool_one(hidden, weights, positions, m) for m in pooling.split("+")], -1)


def _pool_one(hidden: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
              mode: str) -> torch.Tensor:
    """One mode over [B, L, H] with [B, L] 0/1 ``weights`` (sentence-transformers' formulas)."""
    m = weights[..., None]  # [B, L, 1]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if mode == "cls":  # the first pooled token (position 0 unless the prompt is left out)
        return hidden[rows, weights.argmax(dim=1)]
    if mode == "lasttoken":  # the last pooled token (zeros when none is pooled)
        last = hidden.shape[1] - 1 - weights.flip(1).argmax(dim=1)
        return hidden[rows, last] * weights[rows, last][:, None]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":  # token i (from 1) weighs i
        wm = m * (positions + 1).to(torch.float32)[None, :, None]
        return (hidden * wm).sum(dim=1) / wm.sum(dim=1).clamp(min=1e-9)
    count = m.sum(dim=1).clamp(min=1e-9)  # [B, 1]
    summed = (hidden * m).sum(dim=1)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len_tokens":
        return summed / count.sqrt()
    raise CheckpointError(f"pooling mode {mode!r} is not supported")


class Dense(torch.nn.Module):
    """sentence-transformers' Dense: ``activation(linear(x))`` [+ x or residual(x)]."""

    def __init__(self, step: HeadStep) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(step.in_features, step.out_features, bias=step.bias)
        self.activation = activation_class(step.activation)()
        self.use_residual = step.use_residual
        if step.use_residual and step.in_features != step.out_features:
            self.residual = torch.nn.Linear(step.in_features, step.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


class Normalize(torch.nn.Module):
    """sentence-transformers' Normalize: L2 over the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1)


def load_head(local_dir: str, head: Head) -> torch.nn.Module | None:
    """The Dense / Normalize modules after pooling as one fp32 module (None when there are none).

    Raises:
        CheckpointError: A Dense module's ``model.safetensors`` is missing (pickle weights
            are named, never loaded) or its tensors do not match its config.
    """
    if not head.steps:
        return None
    return torch.nn.Sequential(*(_load_dense(Path(local_dir), s) if s.kind == "dense"
                                 else Normalize() for s in head.steps)).eval()


def _load_dense(local: Path, step: HeadStep) -> Dense:
    path = local / step.path / DENSE_WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("*") if p.suffix in PICKLE_SUFFIXES)
        found = f"; found pickle weights {pickles}, never loaded" if pickles else ""
        raise CheckpointError(f"{path} missing: Dense weights load from safetensors only{found}")
    module = Dense(step)
    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors do not match the Dense config: {e}") from e
    return module.float()

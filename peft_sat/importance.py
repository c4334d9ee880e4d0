"""Importance scores of MLP channels and attention heads (pure tensor code, no model imports).

Notation (one layer, one micro-batch): ``X`` (N, H) the block inputs at non-padding tokens, ``||X_j||`` the L2 norm
of input feature j over those tokens, ``X_s`` (S, H) a random subsample of S <= N of those tokens. Weights follow
``nn.Linear``: (out_features, in_features). All scores are non-negative, float32, one per unit; higher = keep.

MLP channel i of ``down(act(gate(x)) * up(x))``:
    uniform    s_i ~ U(0, 1)                                          (a random subset under any selection)
    magnitude  s_i = ||W_gate[i, :]|| * ||W_up[i, :]|| * ||W_down[:, i]||
    wanda      s_i = sum_j (|W_gate[i, j]| + |W_up[i, j]|) * ||X_j||     (Wanda, Sun et al. 2023, per output row)
    maxip      s_i = mean_{t in X_s} |act(x_t . W_gate[i]) * (x_t . W_up[i])|   (the channel's activation)
               with sparse_pass="backward" the dense forward has every activation: t over all of X, exact

Attention query head h (rows ``h*d:(h+1)*d`` of q, KV head g(h) = h // group_size, columns of o):
    uniform    s_h ~ U(0, 1)
    magnitude  s_h = ||W_q[h]||_F * ||W_o[:, h]||_F
    wanda      s_h = sum_{rows r of h} sum_j |W_q[r, j]| * ||X_j||
    maxip      s_h = mean_{t in X_s} ||x_t W_q[h]^T|| * ||x_t W_v[g(h)]^T||     (query strength x value strength)
A KV group's score is the sum of its query heads' scores.

Weight-based metrics use the frozen/base weight (a LoRA delta is small by construction); activation-based ones
read only S tokens so that scoring costs a few percent of the sliced step (``SATConfig.score_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Project = Callable[[torch.Tensor], torch.Tensor]  # x (S, H) -> (S, out) with the layer's base weight, no grad


def valid_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten ``x`` (..., H) to the (N, H) rows where ``token_mask`` (...,) is true; all rows if no usable mask.

    A mask that selects nothing (a batch of pure padding) falls back to all rows so that scores stay finite.
    """
    flat = x.reshape(-1, x.shape[-1])
    if token_mask is None or token_mask.numel() != flat.shape[0]:
        return flat
    keep = token_mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
    if not bool(keep.any()):
        return flat
    return flat[keep]


def sample_tokens(x: torch.Tensor, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Return ``num_tokens`` rows of ``x`` (N, H) drawn without replacement (all rows when N <= num_tokens)."""
    if x.shape[0] <= num_tokens:
        return x
    rows = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:num_tokens]
    return x[rows.to(x.device)]


def feature_norms(x: torch.Tensor) -> torch.Tensor:
    """||X_j||: L2 norm of each input feature over the tokens of ``x`` (N, H) -> (H,), float32."""
    return torch.linalg.vector_norm(x.float(), dim=0)


def uniform_scores(num_units: int, generator: torch.Generator) -> torch.Tensor:
    """Independent U(0, 1) scores: top-k of them is a uniformly random subset."""
    return torch.rand(num_units, generator=generator, device=generator.device)


def _wanda_rows(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """sum_j |W[r, j]| * ||X_j|| for every row r: (out, in), (in,) -> (out,)."""
    return weight.float().abs() @ norms.to(weight.device)


def channel_scores(
    metric: str,
    *,
    x: torch.Tensor,
    x_sample: torch.Tensor,
    w_gate: Callable[[], torch.Tensor],
    w_up: Callable[[], torch.Tensor],
    w_down: Callable[[], torch.Tensor],
    project_gate: Project,
    project_up: Project,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    num_channels: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Scores (I,) of the I intermediate channels of a gated MLP; see the module docstring for the formulas.

    Weights are passed as thunks so that a metric only materializes what it reads (4-bit weights dequantize).
    """
    if metric == "uniform":
        return uniform_scores(num_channels, generator)
    if metric == "magnitude":
        gate, up, down = w_gate().float(), w_up().float(), w_down().float()
        return gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    if metric == "wanda":
        norms = feature_norms(x)
        return _wanda_rows(w_gate(), norms) + _wanda_rows(w_up(), norms)
    if metric == "maxip":
        activation = act_fn(project_gate(x_sample)) * project_up(x_sample)  # (S, I)
        return activation.float().abs().mean(dim=0)
    raise ValueError(f"Unknown importance metric {metric!r}.")


def activation_scores(h: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``maxip`` channel scores from activations already computed: mean_t |h_t| over the valid tokens of ``h``
    (..., I) -> (I,), float32 (``token_mask`` as in ``valid_tokens``: every token when it selects none).

    With a mask, the padding rows are zeroed in place and every row summed: picking the valid rows would copy them,
    and their number is data the host must read from the device, a sync per block on an accelerator."""
    magnitudes = h.detach().reshape(-1, h.shape[-1]).float().abs()  # a new tensor: ours to overwrite
    if token_mask is None or token_mask.numel() != magnitudes.shape[0]:
        return magnitudes.mean(dim=0)
    keep = token_mask.reshape(-1).to(device=magnitudes.device, dtype=torch.bool)
    keep = keep | ~keep.any()  # a mask that selects nothing keeps every row
    magnitudes.masked_fill_(~keep[:, None], 0.0)  # whatever padding holds (even NaN) never reaches a score
    return magnitudes.sum(dim=0) / keep.sum()


def head_scores(
    metric: str,
    *,
    x: torch.Tensor,
    x_sample: torch.Tensor,
    w_q: Callable[[], torch.Tensor],
    w_o: Callable[[], torch.Tensor],
    project_q: Project,
    project_v: Project,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Scores (num_heads,) of the query heads; see the module docstring for the formulas."""
    if metric == "uniform":
        return uniform_scores(num_heads, generator)
    if metric == "magnitude":
        q_norms = w_q().float().reshape(num_heads, head_dim, -1).pow(2).sum(dim=(1, 2))
        o_norms = w_o().float().reshape(-1, num_heads, head_dim).pow(2).sum(dim=(0, 2))
        return (q_norms * o_norms).sqrt()
    if metric == "wanda":
        return _wanda_rows(w_q(), feature_norms(x)).reshape(num_heads, head_dim).sum(dim=1)
    if metric == "maxip":
        samples = x_sample.shape[0]
        q = project_q(x_sample).float().reshape(samples, num_heads, head_dim).norm(dim=-1)  # (S, n_q)
        v = project_v(x_sample).float().reshape(samples, num_kv_heads, head_dim).norm(dim=-1)  # (S, n_kv)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)  # (S, n_q): the KV head of each query head
        return (q * v).mean(dim=0)
    raise ValueError(f"Unknown importance metric {metric!r}.")


def group_scores(scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum consecutive query-head scores (n_q,) into KV-group scores (num_groups,)."""
    return scores.reshape(num_groups, -1).sum(dim=1)

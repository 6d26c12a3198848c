"""Log-probabilities and entropies of sampled tokens, computed chunk by chunk to bound memory.

Every RL loss in forkrl needs, per response token t, the log-probability of the sampled
token and the entropy of the whole next-token distribution (SPEC Eq. 1):

    p_t = softmax(z_t / T),   log π(o_t) = log p_t[o_t],   H_t = -Σ_j p_t,j log p_t,j

The textbook way (`naive_logprobs_and_entropy`) materializes a float32 `[tokens, vocab]`
log-softmax, keeps it for backward, and allocates a gradient of the same size. With a
150k vocabulary and 16k response tokens that is ~10 GB per tensor. Two memory-lean paths:

- `token_logprobs_and_entropy(logits, ...)`: the logits already exist (e.g. HF model
  output); rows are upcast and reduced one chunk at a time and only the per-row entropy
  is saved besides the logits, so no full float32 copy is ever alive.
- `fused_linear_logprobs_and_entropy(hidden, weight, ...)`: the logits never exist at
  all; each chunk of rows is projected through the LM head, reduced, and dropped, and
  backward recomputes it (one extra matmul traded for O(chunk × vocab) memory).

Both are custom `torch.autograd.Function`s with hand-written backward passes. With
z = logits / T, p = softmax(z) and H the entropy (derivation in `_backward_rows`):

    ∂ log p_y / ∂z_j = 1[j = y] - p_j
    ∂ H / ∂z_j       = -p_j (log p_j + H)

and ∂/∂logits = (∂/∂z) / T. Gradients flow through both outputs, so an entropy bonus
(or penalty) can be added to the loss.

With `return_grad_norm=True` both paths also return, without gradient, the norm of the sampled
token's log-prob gradient with respect to the raw logits (the `gradient` selection strategy,
after GMTS): with e_y the one-hot of the target,

    ‖∂ log p_y / ∂logits‖₂ = ‖e_y − p‖₂ / T = √((1 − p_y)² + Σ_{j≠y} p_j²) / T
                           = √(1 − 2 p_y + Σ_j p_j²) / T

two more row reductions (Σ_{j≠y} p_j and Σ_{j≠y} p_j²) in the same tile loop. The first form is
the one computed, with 1 − p_y = Σ_{j≠y} p_j: both terms are sums of non-negative numbers, so
nothing cancels when p_y ≈ 1, where 1 − 2p_y + Σp² (or 1 − exp(log p_y)) loses every digit in
float32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "CPU_TILE_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "default_chunk_rows",
    "fused_linear_logprobs_and_entropy",
    "naive_logprobs_and_entropy",
    "token_logprobs_and_entropy",
]

# Rows per chunk are chosen so that one float32 [rows, vocab] block holds about this many
# elements (128 MiB): small next to a full [tokens, vocab] tensor (a few hundred rows at a
# 64k-152k vocabulary), yet big enough that the LM-head matmul of the fused path and the
# GPU reductions run at full speed. Tuned with benchmarks/logprob_entropy.py.
DEFAULT_CHUNK_ELEMENTS = 32 * 1024 * 1024

# On CPU the softmax/entropy passes are bound by memory traffic, so CPU reductions work
# through tiles of rows that stay in cache (16 MiB of float32). On an idle 2-core machine
# (V = 65536) 16-64 row tiles ran forward + backward 1.5-2.5x faster than 128-256 row
# blocks and ~3x faster than the naive path; much smaller tiles lose on a busy machine, where every
# op's thread synchronization waits for a descheduled thread.
CPU_TILE_ELEMENTS = 4 * 1024 * 1024

# log p below this has p = exp(log p) == 0 exactly in float32 and float64 (exp underflows
# below about -104 and -745), so clamping there changes no term of H or of its gradient;
# it only turns 0 · (-inf) = nan into 0 for masked (-inf) logits.
_LOGP_FLOOR = -1000.0


def _rows_for(elements: int, vocab_size: int) -> int:
    rows = max(1, elements // max(1, vocab_size))
    # Multiples of 8 keep GPU matmul tiles aligned; irrelevant below 8 rows.
    return rows - rows % 8 if rows >= 8 else rows


def default_chunk_rows(vocab_size: int, device: torch.device | str = "cpu", *, fused: bool = False) -> int:
    """The default `chunk_size` (rows processed at once) for a vocabulary and device.

    Fused chunks (rows per LM-head matmul) and all CUDA chunks hold ~DEFAULT_CHUNK_ELEMENTS;
    CPU chunks of existing logits hold ~CPU_TILE_ELEMENTS, the size that stays in cache
    (fused CPU chunks are reduced through such tiles internally).
    """
    if fused or torch.device(device).type != "cpu":
        return _rows_for(DEFAULT_CHUNK_ELEMENTS, vocab_size)
    return _rows_for(CPU_TILE_ELEMENTS, vocab_size)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is reduced in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_slices(num_rows: int, step: int):
    return (slice(start, start + step) for start in range(0, num_rows, step))


def _tile_log_probs(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """log softmax(logits / T) in `dtype`: `[t, V]` any float dtype -> fresh `[t, V]` tensor.

    Kept to one log_softmax kernel (plus the cast and the division when needed): on CPU
    every extra elementwise pass is a parallel region that costs time, more so on a busy
    machine.
    """
    if temperature == 1.0:
        return torch.log_softmax(logits, dim=-1, dtype=dtype)
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _forward_rows(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, tile_rows: int, with_grad_norm: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row target log-prob and entropy of `[R, V]` logits (any dtype; left untouched).

    Each tile of `tile_rows` rows is upcast on its own, so at most one float32 tile
    (plus its temporaries) is alive at a time.

    Returns:
        logprobs `[R]`, entropy `[R]` and, with `with_grad_norm`, ‖∂ log p_y/∂logits‖₂ `[R]`
        (module docstring; else None), all in the compute dtype.
    """
    dtype = _compute_dtype(logits.dtype)
    logprobs = logits.new_empty(logits.shape[0], dtype=dtype)
    entropy = logits.new_empty(logits.shape[0], dtype=dtype)
    grad_norm = logits.new_empty(logits.shape[0], dtype=dtype) if with_grad_norm else None
    for rows in _row_slices(logits.shape[0], tile_rows):
        logp = _tile_log_probs(logits[rows], temperature, dtype)  # (t, V)
        target = targets[rows].unsqueeze(-1)  # (t, 1)
        logprobs[rows] = logp.gather(-1, target).squeeze(-1)
        logp.clamp_min_(_LOGP_FLOOR)
        p = logp.exp()  # (t, V)
        if grad_norm is not None:
            # Zero the target's entry, reduce the others, put it back: 1 − p_y = Σ_{j≠y} p_j
            # (exact where p_y ≈ 1, unlike 1 − exp(log p_y), whose log-softmax has already
            # rounded to 0) and √Σ_{j≠y} p_j².
            p_target = p.gather(-1, target)  # (t, 1)
            p.scatter_(-1, target, 0.0)
            one_minus_p = p.sum(-1)  # (t,)
            others = torch.linalg.vector_norm(p, dim=-1)  # (t,)
            p.scatter_(-1, target, p_target)
            grad_norm[rows] = torch.hypot(one_minus_p, others).div_(temperature)
        # -Σ p log p; torch.sum's cascaded summation is tens of times more accurate here
        # than a dot product (einsum/bmm) accumulating 10^5 float32 terms one by one.
        entropy[rows] = p.mul_(logp).sum(-1).neg_()
    return logprobs, entropy, grad_norm


def _backward_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    tile_rows: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ∂(Σ g_lp · log p_y + g_H · H)/∂logits for `[R, V]` logits into `out`.

    With z = logits / T, log p_j = z_j - logsumexp(z) and ∂ logsumexp/∂z_j = p_j:
        ∂ log p_y / ∂z_j = 1[j = y] - p_j
        ∂ H / ∂z_j = -Σ_k (∂p_k/∂z_j)(log p_k + 1) = -p_j (log p_j + H)
    so, with ∂/∂logits = ∂/∂z / T,
        grad_j = p_j · (a + c · log p_j) + 1[j = y] · g_lp / T,
        a = -(g_lp + g_H · H) / T,  c = -g_H / T   (per row).
    The log-softmax is recomputed tile by tile from the logits.

    Args:
        logits: `[R, V]` any float dtype.
        targets: `[R]` int64.
        entropy: `[R]` entropies saved by the forward pass (compute dtype).
        grad_logprobs, grad_entropy: `[R]` upstream gradients, or None when that output
            does not reach the loss.
        out: `[R, V]` any float dtype; may be `logits` itself (each tile is read before
            it is overwritten), which lets the fused path reuse its logits block.

    Returns:
        `out`.
    """
    dtype = entropy.dtype
    zeros = torch.zeros_like(entropy)
    g_lp = zeros if grad_logprobs is None else grad_logprobs.to(dtype)
    g_ent = zeros if grad_entropy is None else grad_entropy.to(dtype)
    offset = ((g_lp + g_ent * entropy) / -temperature).unsqueeze(-1)  # (R, 1) a
    slope = (g_ent / -temperature).unsqueeze(-1)  # (R, 1) c
    target_grad = (g_lp / temperature).unsqueeze(-1)  # (R, 1)
    for rows in _row_slices(logits.shape[0], tile_rows):
        logp = _tile_log_probs(logits[rows], temperature, dtype)  # (t, V)
        p = logp.exp()  # (t, V)
        # Write straight into `out` when no cast is needed; else into a scratch tile.
        grad = out[rows] if out.dtype == dtype else logp
        if grad_entropy is None:  # plain policy gradient, no entropy term: c = 0
            torch.mul(p, offset[rows], out=grad)
        else:
            torch.addcmul(offset[rows], logp.clamp_min_(_LOGP_FLOOR), slope[rows], out=logp)  # a + c · log p
            torch.mul(p, logp, out=grad)
        if grad_logprobs is not None:
            grad.scatter_add_(-1, targets[rows].unsqueeze(-1), target_grad[rows])
        if grad is logp:
            out[rows].copy_(grad)
    return out


class _ChunkedLogprobsEntropy(torch.autograd.Function):
    """Autograd Function over `[R, V]` logits; saves only the logits and `[R]` entropies."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_rows, with_grad_norm):
        logprobs, entropy, grad_norm = _forward_rows(logits, targets, temperature, chunk_rows, with_grad_norm)
        ctx.save_for_backward(logits, targets, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        # An unused output gets None instead of a zero tensor, so its term can be skipped.
        ctx.set_materialize_grads(False)
        if grad_norm is None:  # an empty placeholder: autograd Functions return a fixed arity
            grad_norm = logprobs.new_empty(0)
        ctx.mark_non_differentiable(grad_norm)
        return logprobs, entropy, grad_norm

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, grad_logprobs, grad_entropy, _grad_norm):
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        logits, targets, entropy = ctx.saved_tensors
        grad_logits = _backward_rows(
            logits,
            targets,
            entropy,
            grad_logprobs,
            grad_entropy,
            ctx.temperature,
            ctx.chunk_rows,
            out=torch.empty_like(logits),
        )
        return grad_logits, None, None, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_grad_norm: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Log-prob of each target token and entropy of each distribution, from logits.

    Rows are upcast and reduced `chunk_size` at a time, so neither forward nor backward
    holds a full float32 `[tokens, V]` tensor; backward writes one gradient tensor in the
    logits' dtype. Numerically stable (logsumexp-shifted) for any input dtype; -inf
    logits (masked vocabulary entries) are allowed as long as each row has a finite one.

    Args:
        logits: `[..., V]` float16 / bfloat16 / float32 / float64.
        targets: `[...]` int64 token ids in `[0, V)` (replace padding ids before calling).
        temperature: T in p = softmax(logits / T); use the sampling temperature.
        chunk_size: rows per chunk; default `default_chunk_rows(V, logits.device)`.
        return_grad_norm: also return ‖∂ log p_y/∂logits‖₂ `[...]` (module docstring), no grad.

    Returns:
        logprobs `[...]` and entropy `[...]`, float64 for float64 logits, else float32.
        Both are differentiable w.r.t. `logits`. With `return_grad_norm`, a third tensor.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    vocab_size = logits.shape[-1]
    chunk_rows = chunk_size or default_chunk_rows(vocab_size, logits.device)
    flat_logits = logits.reshape(-1, vocab_size)  # (R, V)
    flat_targets = targets.reshape(-1)  # (R,)
    if torch.is_grad_enabled() and logits.requires_grad:
        logprobs, entropy, grad_norm = _ChunkedLogprobsEntropy.apply(
            flat_logits, flat_targets, temperature, chunk_rows, return_grad_norm
        )
    else:
        logprobs, entropy, grad_norm = _forward_rows(
            flat_logits, flat_targets, temperature, chunk_rows, return_grad_norm
        )
    if return_grad_norm:
        return logprobs.view(targets.shape), entropy.view(targets.shape), grad_norm.view(targets.shape)
    return logprobs.view(targets.shape), entropy.view(targets.shape)


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`hidden @ weight.T + bias`: `[c, H]`, `[V, H]`, `[V]` -> `[c, V]` in the input dtype."""
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


class _FusedLinearLogprobsEntropy(torch.autograd.Function):
    """Autograd Function from hidden states; logits exist one `[chunk, V]` block at a time."""

    # Under CUDA autocast (`model.dtype=auto`) the forward's LM-head matmuls run in bf16; the
    # backward recomputes each chunk's logits, so it must run in the same autocast state, or it
    # would differentiate fp32 logits against an entropy saved from bf16 ones (and run the big
    # matmuls in fp32). custom_fwd/custom_bwd carry the forward's state into the backward.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, tile_rows, with_grad_norm):
        dtype = _compute_dtype(hidden.dtype)
        num_rows = hidden.shape[0]
        logprobs = hidden.new_empty(num_rows, dtype=dtype)
        entropy = hidden.new_empty(num_rows, dtype=dtype)
        # (N,) when asked for, else an empty placeholder (autograd Functions return a fixed arity)
        grad_norm = hidden.new_empty(num_rows if with_grad_norm else 0, dtype=dtype)
        for rows in _row_slices(num_rows, chunk_rows):
            logits = _project(hidden[rows], weight, bias)  # (c, V)
            lp, ent, gn = _forward_rows(logits, targets[rows], temperature, tile_rows, with_grad_norm)
            logprobs[rows], entropy[rows] = lp, ent
            if gn is not None:
                grad_norm[rows] = gn
            # Free the block now: otherwise it stays referenced while the next one is
            # computed and two blocks are alive at the peak.
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.tile_rows = temperature, chunk_rows, tile_rows
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(grad_norm)
        return logprobs, entropy, grad_norm

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_logprobs, grad_entropy, _grad_norm):
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 8
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc_dtype = entropy.dtype
        # Weight and bias gradients sum over every chunk; summing low-precision partial
        # products in bf16/fp16 would lose the small ones, so accumulate in the compute dtype.
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if need_bias else None
        for rows in _row_slices(hidden.shape[0], ctx.chunk_rows):
            h = hidden[rows]  # (c, H)
            logits = _project(h, weight, bias)  # (c, V) recomputed, then overwritten by its gradient
            grad_logits = _backward_rows(
                logits,
                targets[rows],
                entropy[rows],
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                ctx.temperature,
                ctx.tile_rows,
                out=logits,
            )  # (c, V) in the matmul dtype
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight  # (c, H)
            if need_weight:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), h)  # (V, H)
                else:
                    grad_weight.add_(grad_logits.t() @ h)
            if need_bias:
                grad_bias.add_(grad_logits.sum(0, dtype=acc_dtype))
            del logits, grad_logits  # one block alive at a time (see forward)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def fused_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_grad_norm: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Log-probs and entropies straight from the last hidden states, never forming logits.

    Equivalent to `token_logprobs_and_entropy(hidden @ weight.T + bias, targets, T)`, but
    forward and backward both work on `chunk_size` rows of logits at a time, so peak extra
    memory is O(chunk_size × V) instead of O(N × V). Backward recomputes each chunk's
    logits (one extra `[c, H] @ [H, V]` matmul) and reuses that block for their gradient.
    Matmuls run in the input dtype (bf16 on GPU); softmax math runs in float32 (float64
    for float64 inputs); weight and bias gradients are accumulated over chunks in float32
    and cast back (for bf16/fp16 weights this holds one float32 `[V, H]` buffer).

    `weight` is whatever the model's LM head uses (`model.lm_head.weight`, which may be
    tied to the input embedding; the gradient lands on the shared tensor either way).

    Args:
        hidden: `[..., H]` final hidden states (after the last norm), same dtype as weight.
        weight: `[V, H]` LM-head weight.
        targets: `[...]` int64 token ids in `[0, V)`, matching `hidden.shape[:-1]`.
        bias: optional `[V]` LM-head bias.
        temperature: T in p = softmax(logits / T).
        chunk_size: rows per LM-head matmul; default `default_chunk_rows(V, fused=True)`.
        return_grad_norm: also return ‖∂ log p_y/∂logits‖₂ `[...]` (module docstring), without
            gradient: one more reduction per tile, no `[N, V]` tensor.

    Returns:
        logprobs `[...]` and entropy `[...]`, float64 for float64 inputs, else float32;
        differentiable w.r.t. `hidden`, `weight` and `bias`. With `return_grad_norm`, a third tensor.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V, {hidden.shape[-1]}]")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes must match")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    vocab_size = weight.shape[0]
    chunk_rows = chunk_size or default_chunk_rows(vocab_size, hidden.device, fused=True)
    # Each matmul block is reduced in tiles (cache-sized on CPU; the whole block on GPU).
    tile_rows = min(chunk_rows, default_chunk_rows(vocab_size, hidden.device))
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_targets = targets.reshape(-1)  # (N,)
    logprobs, entropy, grad_norm = _FusedLinearLogprobsEntropy.apply(
        flat_hidden, weight, bias, flat_targets, temperature, chunk_rows, tile_rows, return_grad_norm
    )
    if return_grad_norm:
        return logprobs.view(targets.shape), entropy.view(targets.shape), grad_norm.view(targets.shape)
    return logprobs.view(targets.shape), entropy.view(targets.shape)


def naive_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation: a full-size log_softmax, differentiated by autograd.

    Used by the tests as ground truth and by the benchmark as the baseline. It keeps
    several float32 `[..., V]` tensors alive (log_softmax output, probabilities, and
    their gradients), which is exactly what the chunked functions avoid. -inf logits
    give nan entropy here (0 · -inf); use a large negative finite value instead.

    Args:
        logits: `[..., V]` any float dtype (upcast to float32, or kept float64).
        targets: `[...]` int64.
        temperature: T in p = softmax(logits / T).

    Returns:
        logprobs `[...]`, entropy `[...]` in float32 (float64 for float64 logits).
    """
    logp = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)) / temperature, dim=-1)  # (..., V)
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy

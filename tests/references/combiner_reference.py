"""Naive Combiner reference: the dense L x L attention matrix each variant implies, built from the paper's equations.

For every query i the support is written out as explicit sets of positions (the direct set Omega0(i) and the spans
Omega_r(i)), straight from the paper's definitions (Ren et al., 2021), with Python loops over samples, queries and
spans, in float64:

    p = softmax([q_i . k_j / sqrt(d) for j in Omega0] + [q_i . k_Omega / sqrt(d) for each span Omega])
    A[i, j] = p_direct(j)  +  sum_{spans Omega containing j} p(Omega) * softmax_{j' in Omega}(q_Omega . k_j' / sqrt(d))[j]
    out = A @ v

Padding: only real positions (key_mask == 1, index < L) enter any set; a span with no real position is dropped. The
blocked variants index positions on the padded grid (L rounded up to a multiple of the block size).

Obviously O(L^2) and slow: for tiny test sizes only.
"""

import math

import torch


def pool_ref(x: torch.Tensor, how: str) -> torch.Tensor:
    """Pool the rows of `x` (n, D): max / mean / sum."""
    if how == "max":
        return x.max(dim=0).values
    if how == "mean":
        return x.mean(dim=0)
    if how == "sum":
        return x.sum(dim=0)
    raise ValueError(how)


def combiner_sets(combiner_type: str, causal: bool, length: int, block_size: int | None):
    """For each query i < length: (direct positions, list of spans). A span is a dict with `positions` and, for
    Axial, the `slot` whose query/key represent it. Positions live on the padded grid (may be >= length)."""
    out = []
    if combiner_type in ("fixed", "axial", "mixture"):
        s = block_size
        padded = -(-length // s) * s
        num_blocks = padded // s
    for i in range(length):
        direct, spans = [], []
        if combiner_type == "fixed":
            own = i // s
            direct = [j for j in range(own * s, own * s + s) if (j <= i or not causal)]
            for m in range(num_blocks):
                if m == own or (causal and m > own):
                    continue
                spans.append({"positions": list(range(m * s, m * s + s))})
        elif combiner_type == "logsparse":
            direct = [i]
            for level in range(max(0, math.ceil(math.log2(length))) if length > 1 else 0):
                size = 2**level
                block = i // size
                sibling = block + 1 if block % 2 == 0 else block - 1
                if causal and sibling > block:
                    continue
                positions = [j for j in range(sibling * size, sibling * size + size)]
                if positions[0] >= length:
                    continue
                spans.append({"positions": positions})
        elif combiner_type == "axial":
            r, c = divmod(i, s)
            direct = [r * s + m for m in range(s) if (m <= c or not causal)]
            for t in range(num_blocks):
                if t == r or (causal and t > r):
                    continue
                spans.append({"positions": list(range(t * s, t * s + s)), "slot": t * s + c})
        elif combiner_type == "mixture":
            r, c = divmod(i, s)
            rows = range(num_blocks)
            direct = [r * s + m for m in range(s) if (m <= c or not causal)]
            direct += [t * s + c for t in rows if t < r or (not causal and t > r)]
            above = [t for t in rows if t < r]
            below = [t for t in rows if t > r]
            for m in range(s):
                if m == c:
                    continue
                spans.append({"positions": [t * s + m for t in above]})
                if not causal:
                    spans.append({"positions": [t * s + m for t in below]})
            for t in rows:
                if t == r or (causal and t > r):
                    continue
                spans.append({"positions": [t * s + m for m in range(c)]})
                spans.append({"positions": [t * s + m for m in range(c + 1, s)]})
        else:
            raise ValueError(combiner_type)
        out.append((direct, spans))
    return out


def implied_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    combiner_type: str,
    causal: bool,
    block_size: int | None = None,
    key_mask: torch.Tensor | None = None,
    span_summary: str = "max",
    abstraction_key_fn=None,
    hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense implied attention matrix `(B, H, L, L)` (float64). Rows of padded queries are left at zero."""
    input_dtype = v.dtype
    q, k, v = q.double(), k.double(), v.double()
    batch_size, num_heads, length, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    mask = torch.ones(batch_size, length, dtype=torch.bool) if key_mask is None else key_mask.bool().cpu()
    sets = combiner_sets(combiner_type, causal, length, block_size)

    abstraction_keys = None
    row_output = None
    if combiner_type == "axial":
        # Row attention of every slot (r, c) of the padded grid over the real positions of row r; a padded slot uses a
        # zero query. Then the abstraction keys from the given function (the module's projection of it).
        s = block_size
        padded = -(-length // s) * s
        row_output = torch.zeros(batch_size, num_heads, padded, v.shape[-1], dtype=torch.float64)
        for b in range(batch_size):
            for slot in range(padded):
                r = slot // s
                members = [j for j in range(r * s, r * s + s) if j < length and mask[b, j]]
                if not members:
                    continue
                query = q[b, :, slot] if slot < length and mask[b, slot] else torch.zeros_like(q[b, :, 0])
                logits = torch.stack([query[h] @ k[b, h, members].T for h in range(num_heads)]) * scale
                row_output[b, :, slot] = torch.einsum("hj,hjd->hd", logits.softmax(-1), v[b][:, members])
        hidden = None
        if hidden_states is not None:  # x on the padded grid, zero at padded positions
            hidden = torch.zeros(batch_size, padded, hidden_states.shape[-1], dtype=hidden_states.dtype)
            hidden[:, :length] = hidden_states * mask[..., None]
        abstraction_keys = abstraction_key_fn(row_output.to(input_dtype), hidden).double()

    attn = torch.zeros(batch_size, num_heads, length, length, dtype=torch.float64)
    for b in range(batch_size):
        real = {j for j in range(length) if mask[b, j]}
        for i in range(length):
            if i not in real:
                continue
            direct, spans = sets[i]
            direct = [j for j in direct if j in real]
            for h in range(num_heads):
                logits, weights = [], []  # weights: per logit, a dict position -> within-set probability
                for j in direct:
                    logits.append(q[b, h, i] @ k[b, h, j] * scale)
                    weights.append({j: 1.0})
                for span in spans:
                    members = [j for j in span["positions"] if j in real]
                    if not members:
                        continue
                    if combiner_type == "axial":
                        slot = span["slot"]
                        span_key = abstraction_keys[b, h, slot]
                        span_query = q[b, h, slot] if slot in real else torch.zeros_like(q[b, h, 0])
                    else:
                        span_key = pool_ref(k[b, h, members], span_summary)
                        span_query = pool_ref(q[b, h, members], span_summary)
                    inner = torch.stack([span_query @ k[b, h, j] * scale for j in members]).softmax(-1)
                    logits.append(q[b, h, i] @ span_key * scale)
                    weights.append(dict(zip(members, inner.unbind(0))))
                probs = torch.stack(logits).softmax(-1)  # kept as tensors: the reference is differentiable
                for p, within in zip(probs.unbind(0), weights):
                    for j, w in within.items():
                        attn[b, h, i, j] += p * w
    return attn


def combiner_reference(q, k, v, **kwargs) -> torch.Tensor:
    """`implied_attention(...) @ v`: `(B, H, L, Dv)` in float64."""
    return implied_attention(q, k, v, **kwargs) @ v.double()


def allowed_pairs(length: int, causal: bool, key_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """`(B, L, L)` bool: the (real query i, real key j) pairs full attention must cover (j <= i when causal)."""
    mask = torch.ones(batch_size, length, dtype=torch.bool) if key_mask is None else key_mask.bool()
    pairs = mask[:, :, None] & mask[:, None, :]
    if causal:
        pairs = pairs & torch.ones(length, length, dtype=torch.bool).tril()
    return pairs

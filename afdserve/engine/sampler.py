"""Sampler: next tokens from last-position logits, batched, with per-token seeded randomness.

Legend: N = rows (one per chunk that samples), R = rows that sample at random (temperature > 0),
V = vocabulary.

Order of operations per row (vLLM's): first min_tokens, logit_bias and the penalties
(engine/penalties.py), then a structured output's grammar mask (engine/structured.py); then temperature 0 (below 1e-5, to avoid overflow) is greedy argmax,
ties to the lowest token id; otherwise logits / temperature, then min_p, then top-k, then top-p
on the top-k-renormalised distribution, then one draw.

Top-k keeps every token whose scaled logit is >= the k-th largest (ties with the k-th value
are all kept). Top-p keeps the smallest prefix of the tokens sorted by probability (ties ordered
by token id) whose mass reaches top_p; the most likely token is always kept.

The draw is the exponential race (equivalently the Gumbel-max trick): with E_i ~ Exp(1)
i.i.d., E_i / p_i ~ Exp(rate p_i), and the smallest of independent exponentials is the i-th
with probability p_i / sum(p); so argmax_i p_i / E_i = argmax_i (logit_i - log E_i) is an exact
sample from softmax(logits), and masked tokens (logit -inf) can never win. E_i = -log U_i with
U_i uniform; float32 uniforms (24-bit) bound the error of the sampled distribution by about
1e-7 per token. The noise vector of each sampled token comes from its own generator seeded
with (sampling_seed, output_index) alone, never from global state, so a request's tokens do
not depend on which other requests share its batch, nor on a preemption that recomputes it
(the token at output_index i gets the same noise either way). The noise is drawn on the
logits' device, so the same seed gives the same tokens on the same kind of device.

Logprobs, when asked for, are those of the raw model distribution (log_softmax of the logits
before any penalty, bias, temperature or filter), as vLLM reports by default (its
logprobs_mode "raw_logprobs"); so are prompt logprobs (`score_tokens`), whose rank counts the
tokens at least as likely as the scored one (vLLM's).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from afdserve.engine.penalties import TokenHistory, apply_min_p, process_logits
from afdserve.engine.structured import Grammars
from afdserve.types import SampledToken, ScheduledChunk

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are treated as 0 (greedy): dividing by them overflows float32."""

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(sampling_seed: int, output_index: int) -> int:
    """Generator seed for one sampled token: a 63-bit mix of the request seed and the index.

    Pure integer arithmetic (Python's `hash` is salted per process, so it would not do).
    """
    return _splitmix64(_splitmix64(sampling_seed & _MASK64) ^ (output_index & _MASK64)) >> 1


def _gumbel_noise(
    chunks: Sequence[ScheduledChunk], vocab: int, device: torch.device
) -> torch.Tensor:
    """G = -log(-log U) ~ Gumbel(0, 1), i.e. -log E with E = -log U ~ Exp(1); one seeded
    generator per row. (Uniforms then two logs cost a third of `exponential_` on CPU.)"""
    noise = torch.empty(len(chunks), vocab, dtype=torch.float32, device=device)  # [R, V]
    for row, chunk in enumerate(chunks):
        gen = torch.Generator(device=device)
        gen.manual_seed(noise_seed(chunk.sampling_seed, chunk.output_index))
        noise[row].uniform_(generator=gen)  # U in [0, 1)
    # U = 0 gives -inf (that token cannot win); U < 1 keeps -log U > 0, so no NaN or +inf
    return noise.log_().neg_().log_().neg_()


TOP_P_CANDIDATES = 1024
"""Top-p looks at this many of a row's largest logits first (see `apply_top_k_top_p`)."""
TOP_P_MARGIN = 1e-4
"""A candidate whose mass-before lies this close to top_p sends its row to the full sort."""


def apply_top_k_top_p(
    scaled: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """Mask (to -inf) the tokens top-k and top-p drop; returns a new [R, V] tensor.

    top_k <= 0 or >= V disables top-k for that row; top_p >= 1 disables top-p. The result for
    a row depends only on that row (batch independence), whichever path the batch takes.

    The definition is the full stable sort (`_top_k_top_p_sorted`), which costs 10-17 ms per
    row at a 152K vocabulary on this project's 2-core CPU (benchmarks/bench_sampler.py).
    Top-p rows first take the fast path: the TOP_P_CANDIDATES largest logits decide the row
    whenever the nucleus ends among them, no logit outside them ties the last one, and no
    candidate's mass-before lies within TOP_P_MARGIN of top_p (the two paths sum the softmax
    in different orders, which moves that mass by about 1e-6). Every other top-p row goes
    through the full sort, so each row gets exactly the full sort's answer, on whichever path.
    """
    rows, vocab = scaled.shape  # [R, V]
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    use_p = [p < 1.0 for p in top_p]
    if not any(use_p):
        return _top_k_only(scaled, ks) if any(ks) else scaled
    p_rows = [i for i, u in enumerate(use_p) if u]
    every = len(p_rows) == rows
    vals, idx, decided = _top_p_candidates(
        scaled if every else scaled[p_rows], [ks[i] for i in p_rows], [top_p[i] for i in p_rows]
    )
    slow = [i for i, ok in zip(p_rows, decided, strict=True) if not ok]
    done = [j for j, ok in enumerate(decided) if ok]
    if every and not done:  # the candidates decided nothing: the full sort, with no copies
        return _top_k_top_p_sorted(scaled, ks, top_p)
    out = scaled.clone() if not any(ks) else _top_k_only(scaled, ks)  # rows without top-p
    if done:
        rows_out = torch.full(
            (len(done), vocab), float("-inf"), dtype=scaled.dtype, device=scaled.device
        )  # [D, V]
        out[[p_rows[j] for j in done]] = rows_out.scatter_(1, idx[done], vals[done])
    if slow:
        out[slow] = _top_k_top_p_sorted(
            scaled[slow], [ks[i] for i in slow], [top_p[i] for i in slow]
        )
    return out


def _top_k_only(scaled: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Top-k masking alone (k = 0: the row is kept whole)."""
    neg_inf = float("-inf")
    device = scaled.device
    top = scaled.topk(max(ks), dim=-1).values  # [R, kmax]
    k_col = torch.tensor([max(k, 1) for k in ks], device=device).unsqueeze(1)  # [R, 1]
    kth = top.gather(1, k_col - 1)  # [R, 1]
    off = torch.tensor([k == 0 for k in ks], device=device).unsqueeze(1)  # [R, 1]
    kth = kth.masked_fill(off, neg_inf)
    return scaled.masked_fill(scaled < kth, neg_inf)


def _top_k_top_p_sorted(
    scaled: torch.Tensor, ks: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """The definition: a full stable sort of every row (top-p on all of them)."""
    rows, vocab = scaled.shape  # [R, V]
    device = scaled.device
    neg_inf = float("-inf")
    sorted_vals, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)  # [R, V] x2
    if any(ks):
        k_col = torch.tensor([k or vocab for k in ks], device=device).unsqueeze(1)  # [R, 1]
        kth = sorted_vals.gather(1, k_col - 1)  # [R, 1]
        sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, neg_inf)
    probs = sorted_vals.softmax(dim=-1)  # [R, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V]; exactly 0 in column 0
    p_col = torch.tensor(top_p, dtype=probs.dtype, device=device).unsqueeze(1)  # [R, 1]
    sorted_vals = sorted_vals.masked_fill(mass_before >= p_col, neg_inf)
    return torch.empty_like(scaled).scatter_(1, sorted_idx, sorted_vals)


def _top_p_candidates(
    scaled: torch.Tensor, ks: Sequence[int], top_p: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Top-k then top-p from each row's TOP_P_CANDIDATES largest logits. Returns the candidates'
    values with the dropped ones at -inf [R, C], their token ids [R, C], and per row whether
    the candidates decided it (see `apply_top_k_top_p`); every other token of a decided row is
    dropped."""
    rows, vocab = scaled.shape  # [R, V]
    device = scaled.device
    neg_inf = float("-inf")
    c = min(vocab, TOP_P_CANDIDATES)
    vals, idx = scaled.topk(min(vocab, c + 1), dim=-1)  # [R, C+1]: by value, ties in no order
    # no logit outside the candidates may equal the last one (the set would be ambiguous)
    clean = vals[:, c] < vals[:, c - 1] if c < vocab else vals[:, 0] == vals[:, 0]  # [R]
    vals, idx = vals[:, :c], idx[:, :c]  # [R, C]
    by_id = idx.argsort(dim=-1)  # order ties by token id, as the stable full sort does
    vals, idx = vals.gather(1, by_id), idx.gather(1, by_id)
    vals, order = vals.sort(dim=-1, descending=True, stable=True)  # [R, C]
    idx = idx.gather(1, order)
    k_col = torch.tensor([k or vocab for k in ks], device=device).unsqueeze(1)  # [R, 1]
    top_k_in = k_col <= c  # [R, 1]: the top-k set (if any) lies among the candidates
    kth = vals.gather(1, k_col.clamp(max=c) - 1)  # [R, 1]
    kept = (vals >= kth) | (k_col >= vocab)  # [R, C]: what top-k keeps of the candidates
    vals = vals.masked_fill(~kept, neg_inf)
    top = vals[:, :1]  # [R, 1]: the row's maximum
    denom_all = torch.sub(scaled, top).exp_().sum(dim=-1, keepdim=True)  # [R, 1]: over V
    denom_k = (vals - top).exp().sum(dim=-1, keepdim=True)  # [R, 1]: over the top-k set
    with_k = torch.tensor([k != 0 for k in ks], device=device).unsqueeze(1)  # [R, 1]
    probs = (vals - top).exp() / torch.where(with_k, denom_k, denom_all)  # [R, C]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, C]
    p_col = torch.tensor(top_p, dtype=probs.dtype, device=device).unsqueeze(1)  # [R, 1]
    # the nucleus ends among the candidates, or top-k drops everything else; a top-k set
    # larger than the candidates would need its own denominator: the full sort takes it
    ends_inside = torch.where(
        with_k, top_k_in, probs.sum(dim=-1, keepdim=True) >= p_col + TOP_P_MARGIN
    )  # [R, 1]
    margin = ((mass_before - p_col).abs() <= TOP_P_MARGIN) & kept  # [R, C]
    decided = (clean.unsqueeze(1) & ends_inside & ~margin.any(dim=-1, keepdim=True)).squeeze(1)
    return vals.masked_fill(mass_before >= p_col, neg_inf), idx, decided.tolist()


def sample(
    logits: torch.Tensor,
    chunks: Sequence[ScheduledChunk],
    history: TokenHistory | None = None,
    eos_token_ids: Collection[int] = (),
    grammars: Grammars | None = None,
) -> list[SampledToken]:
    """One token per row of `logits` [N, V]; row i belongs to `chunks[i]` (all with sample=True).

    `history` holds the token history of the sequences with penalties (required when any chunk
    asks for one; the sampled tokens are counted into it); `eos_token_ids` are the model's EOS
    ids, which min_tokens masks; `grammars` holds the grammar state of the sequences with a
    structured output (required when any chunk has one: it masks their rows, consumes their
    tokens and marks `stop` the tokens that complete them). Greedy and random rows are handled as two vectorised groups;
    only drawing each random row's seeded noise is a Python loop. Any float dtype is accepted
    and computed in float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    if n != len(chunks):
        raise ValueError(f"{n} rows of logits for {len(chunks)} chunks")
    for chunk in chunks:
        if not chunk.sample:
            raise ValueError(f"chunk of sequence {chunk.seq_id} does not ask for a sample")
    if n == 0:
        return []
    logits = logits.float()  # [N, V]: the raw logits, for logprobs
    device = logits.device
    processed = process_logits(logits, chunks, history, eos_token_ids)  # [N, V]
    structured = any(c.params.structured is not None for c in chunks)
    if structured:
        if grammars is None:
            raise ValueError("structured outputs need the sequences' grammar state")
        if processed is logits:
            processed = logits.clone()  # the raw logits stay as they are (logprobs)
        grammars.mask_(processed, chunks)
    tokens = torch.empty(n, dtype=torch.long, device=device)  # [N]

    greedy_rows = [i for i, c in enumerate(chunks) if c.params.temperature < GREEDY_TEMPERATURE]
    random_rows = [i for i, c in enumerate(chunks) if c.params.temperature >= GREEDY_TEMPERATURE]
    if len(greedy_rows) == n:  # common case: no gather of the whole logits matrix
        tokens = processed.argmax(dim=-1)  # first maximum: lowest id wins ties
    elif greedy_rows:
        g_idx = torch.tensor(greedy_rows, device=device)  # [G]
        tokens[g_idx] = processed[g_idx].argmax(dim=-1)
    if random_rows:
        r_idx = torch.tensor(random_rows, device=device)  # [R]
        r_chunks = [chunks[i] for i in random_rows]
        temps = torch.tensor([float(c.params.temperature) for c in r_chunks], device=device)
        rows = processed if len(random_rows) == n else processed[r_idx]  # [R, V]
        scaled = rows / temps.unsqueeze(1)  # [R, V]: a new tensor
        scaled = apply_min_p(scaled, [c.params.min_p for c in r_chunks])
        scaled = apply_top_k_top_p(
            scaled, [c.params.top_k for c in r_chunks], [float(c.params.top_p) for c in r_chunks]
        )
        gumbel = _gumbel_noise(r_chunks, vocab, device)  # [R, V]
        tokens[r_idx] = scaled.add_(gumbel).argmax(dim=-1)  # scaled is ours to overwrite

    token_list = tokens.tolist()
    if history is not None:
        history.record(chunks, token_list)
    stops = grammars.record(chunks, token_list) if structured else [False] * n
    want = [c.params.logprobs for c in chunks]
    if all(w is None for w in want):
        return [
            SampledToken(seq_id=c.seq_id, token_id=t, stop=stop)
            for c, t, stop in zip(chunks, token_list, stops, strict=True)
        ]

    logprobs = logits.log_softmax(dim=-1)  # [N, V]
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()  # [N]
    n_top = max(w or 0 for w in want)
    top_vals: list[list[float]] = [[] for _ in chunks]
    top_ids: list[list[int]] = [[] for _ in chunks]
    if n_top:
        top = logprobs.topk(min(n_top, vocab), dim=-1)  # [N, n_top] x2
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    out = []
    for i, (chunk, tok) in enumerate(zip(chunks, token_list, strict=True)):
        if want[i] is None:
            out.append(SampledToken(seq_id=chunk.seq_id, token_id=tok, stop=stops[i]))
            continue
        alts = tuple(zip(top_ids[i][: want[i]], top_vals[i][: want[i]], strict=True))
        out.append(
            SampledToken(
                seq_id=chunk.seq_id,
                token_id=tok,
                logprob=chosen[i],
                top_logprobs=alts,
                stop=stops[i],
            )
        )
    return out


def score_tokens(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
    """Score one given token per row of `logits` [P, V] (`targets` [P]): its log-probability,
    its rank (how many tokens are at least as likely, itself included: vLLM's count) and the k
    most likely tokens' ids and log-probabilities. Each row depends on that row alone."""
    logprobs = logits.float().log_softmax(dim=-1)  # [P, V]
    chosen = logprobs.gather(1, targets.unsqueeze(1))  # [P, 1]
    ranks = (logprobs >= chosen).sum(dim=-1)  # [P]
    top_ids: list[list[int]] = [[] for _ in range(len(targets))]
    top_vals: list[list[float]] = [[] for _ in range(len(targets))]
    if k:
        top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # [P, k] x2
        top_ids, top_vals = top.indices.tolist(), top.values.tolist()
    return chosen.squeeze(1).tolist(), ranks.tolist(), top_ids, top_vals

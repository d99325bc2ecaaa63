"""Logits processing before sampling: min_tokens, logit_bias and the penalties (vLLM's).

Legend: N = rows of the step's logits, P = rows with penalties, V = vocabulary.

Each row, in vLLM's order (vllm/v1/sample/sampler.py, `apply_logits_processors`):
  1. min_tokens: while fewer than `min_tokens` tokens were generated, the model's EOS ids and
     the request's stop_token_ids get -inf (vLLM masks EOS so even with ignore_eos);
  2. logit_bias: each listed token's bias is added to its logit;
  3. repetition_penalty r, over every token seen in the prompt or the output: a positive logit
     is divided by r, any other multiplied by r (HF's `RepetitionPenaltyLogitsProcessor`);
  4. frequency_penalty f and presence_penalty p, over the generated tokens only (OpenAI's
     definition): logit -= f * count(token) + p * [count(token) > 0].
Every step is elementwise within its row, so a row's result depends on nothing else in the
batch. Temperature, min_p, top-k and top-p follow in the sampler.

The token history the penalties need lives here, in a `TokenHistory` owned by the attention
worker's runner: per sequence that asks for a penalty, a mask of its prompt's tokens and the
count of each generated token, [V] tensors on the logits' device. Prompt tokens are read from
the chunks fed while the sequence has generated nothing; each sampled token is counted once,
when it is sampled. Tokens fed again by a recompute after a preemption are therefore ignored
(the entry survives the preemption: the sequence is still live), so a recomputed sequence
sees exactly the history it had. Entries are dropped once the scheduler no longer holds the
sequence (finished or aborted; `retain`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from afdserve.engine.sequence_state import PerSequence
from afdserve.types import ScheduledChunk


@dataclass
class _Entry:
    pending_prompt: list[int] = field(default_factory=list)
    """Prompt tokens seen in chunks but not yet written into `prompt` (it is built lazily, when
    the vocabulary and device are known: at the first sample)."""
    pending_outputs: list[int] = field(default_factory=list)
    """Tokens generated on another attention worker (a migrated sequence), not yet counted."""
    prompt: torch.Tensor | None = None  # [V] bool: the token occurs in the prompt
    counts: torch.Tensor | None = None  # [V] float32: times the token was generated


class TokenHistory(PerSequence["_Entry"]):
    """Per-sequence token history of the sequences with penalties (see the module docstring).
    Used by one thread: the one that runs the worker's steps."""

    def observe(self, chunks: Iterable[ScheduledChunk]) -> None:
        """Record the prompt tokens a step feeds (call it for every chunk of every step)."""
        for c in chunks:
            if not c.params.uses_penalties:
                continue
            entry = self._seqs.get(c.seq_id)
            if entry is None:
                if c.output_index or c.start_pos:
                    raise RuntimeError(
                        f"sequence {c.seq_id}: no token history, yet it is past its start "
                        f"(position {c.start_pos}, output {c.output_index})"
                    )
                entry = self._seqs[c.seq_id] = _Entry()
            if c.output_index == 0:  # nothing generated yet: every fed token is the prompt's
                entry.pending_prompt.extend(c.token_ids)

    def resume(self, seq_id: int, params, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """Start the history of a migrated sequence, which generated `generated` elsewhere: its
        recompute feeds them again, and they must count as outputs, not as prompt."""
        if params.uses_penalties:
            self._seqs[seq_id] = _Entry(list(prompt), list(generated))

    def tensors(
        self, chunks: Sequence[ScheduledChunk], vocab: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt masks [P, V] (bool) and output counts [P, V] (float32) of these chunks."""
        prompts, counts = [], []
        for c in chunks:
            e = self._entry(c.seq_id)
            if e.prompt is None:
                e.prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
                e.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            if e.pending_prompt:
                ids = torch.tensor(e.pending_prompt, dtype=torch.long, device=device)
                e.prompt[ids] = True
                e.pending_prompt.clear()
            if e.pending_outputs:
                ids = torch.tensor(e.pending_outputs, dtype=torch.long, device=device)
                e.counts += torch.bincount(ids, minlength=vocab)[:vocab].float()
                e.pending_outputs.clear()
            prompts.append(e.prompt)
            counts.append(e.counts)
        return torch.stack(prompts), torch.stack(counts)

    def record(self, chunks: Sequence[ScheduledChunk], tokens: Sequence[int]) -> None:
        """Count the tokens just sampled for these chunks (those without penalties are skipped)."""
        for c, t in zip(chunks, tokens, strict=True):
            if c.params.uses_penalties:
                counts = self._entry(c.seq_id).counts
                if counts is None:
                    raise RuntimeError(f"sequence {c.seq_id}: sampled before its history was read")
                counts[t] += 1.0

    def _entry(self, seq_id: int) -> _Entry:
        entry = self._seqs.get(seq_id)
        if entry is None:
            raise RuntimeError(f"sequence {seq_id}: no token history (observe() its chunks first)")
        return entry


def process_logits(
    logits: torch.Tensor,
    chunks: Sequence[ScheduledChunk],
    history: TokenHistory | None,
    eos_token_ids: Collection[int] = (),
) -> torch.Tensor:
    """Steps 1-4 of the module docstring on float32 logits [N, V]: a new tensor, or `logits`
    itself when no row asks for any of them."""
    n, vocab = logits.shape
    device = logits.device
    mask_rows: list[int] = []
    mask_ids: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    biases: list[float] = []
    pen_rows: list[int] = []
    for i, c in enumerate(chunks):
        p = c.params
        if c.output_index < p.min_tokens:
            stop = sorted({*eos_token_ids, *p.stop_token_ids})
            stop = [t for t in stop if t < vocab]
            mask_rows += [i] * len(stop)
            mask_ids += stop
        for t, b in p.logit_bias:
            if t < vocab:
                bias_rows.append(i)
                bias_ids.append(t)
                biases.append(b)
        if p.uses_penalties:
            pen_rows.append(i)
    if not (mask_rows or bias_rows or pen_rows):
        return logits
    out = logits.clone()  # [N, V]; the raw logits stay as they are (logprobs come from them)
    if mask_rows:
        out[_index(mask_rows, device), _index(mask_ids, device)] = float("-inf")
    if bias_rows:  # (row, token) pairs are unique: a plain gather, add, scatter
        rows, ids = _index(bias_rows, device), _index(bias_ids, device)
        out[rows, ids] = out[rows, ids] + torch.tensor(biases, dtype=out.dtype, device=device)
    if pen_rows:
        if history is None:
            raise ValueError("penalties need the sequences' token history")
        pen_chunks = [chunks[i] for i in pen_rows]
        prompt, counts = history.tensors(pen_chunks, vocab, device)  # [P, V] x2
        idx = _index(pen_rows, device)
        out[idx] = apply_penalties(
            out[idx],
            prompt,
            counts,
            [c.params.repetition_penalty for c in pen_chunks],
            [c.params.frequency_penalty for c in pen_chunks],
            [c.params.presence_penalty for c in pen_chunks],
        )
    return out


def apply_penalties(
    logits: torch.Tensor,
    prompt: torch.Tensor,
    counts: torch.Tensor,
    repetition: Sequence[float],
    frequency: Sequence[float],
    presence: Sequence[float],
) -> torch.Tensor:
    """Steps 3 and 4 on logits [P, V] given prompt masks [P, V] and output counts [P, V]."""
    device, dtype = logits.device, logits.dtype
    rep = torch.tensor(repetition, dtype=dtype, device=device).unsqueeze(1)  # [P, 1]
    freq = torch.tensor(frequency, dtype=dtype, device=device).unsqueeze(1)  # [P, 1]
    pres = torch.tensor(presence, dtype=dtype, device=device).unsqueeze(1)  # [P, 1]
    generated = counts > 0  # [P, V]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(prompt | generated, penalised, logits)  # [P, V]
    out -= freq * counts
    out -= pres * generated
    return out


def apply_min_p(scaled: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Mask (to -inf, in place) the tokens whose probability is below min_p times the row's
    largest; rows with min_p 0 are left alone. p_i < min_p * p_max is tested as
    exp(x_i - max x) < min_p, the same set without the softmax's sum over the row."""
    rows = [i for i, p in enumerate(min_p) if p > 0.0]
    if not rows:
        return scaled
    device = scaled.device
    idx = _index(rows, device)
    sub = scaled[idx]  # [M, V]
    rel = (sub - sub.amax(dim=-1, keepdim=True)).exp_()  # [M, V]: p_i / p_max
    threshold = torch.tensor([min_p[i] for i in rows], dtype=sub.dtype, device=device)
    scaled[idx] = sub.masked_fill_(rel < threshold.unsqueeze(1), float("-inf"))
    return scaled


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)

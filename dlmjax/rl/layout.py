"""The extended training layout of block-diffusion RL (spec §0.5, §7 "Layout"): one row per (rollout, mask) is

    [ prompt (L0, left-padded) | clean response (L1, right-padded) | noisy response (L1) ]      N = L0 + 2 L1

with (L0, L1) global for one outer step. Host side (NumPy): packing the rollouts' token ids, positions, the response
block index of every position. Device side (jnp): the [R, N, N] block attention mask.

Block alignment (spec A6). "response" (both trainers, the default): response blocks start at the response start,
block j = response positions [jK, (j+1)K); prompt blocks are aligned to the *end* of the prompt region. "absolute"
(option): blocks sit at absolute positions 0, K, 2K, ... of the real sequence, as the SDAR decoder sees them; with P
real prompt tokens, response position i is in block (P + i) // K, so the first response block also holds the last
P mod K prompt tokens and is shorter by that much. What changes under "absolute": (1) the block of each response
token (per row: offset P mod K), hence the SLIM schedule's block index and per-row J, TraceRL's per-block step groups,
the block-level loss's blocks, and the mask's response blocks; (2) prompt rows are block-causal over absolute
positions instead of end-aligned blocks. Positions, pads, targets and everything else are identical. In both, prompt
rows never see response keys, so the prompt remainder's states do not see the (partly masked) block they share, as
they would during decoding -- exact parity with the decoder would need the remainder duplicated into the noisy copy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Packed:
    """One outer step's rollouts in the global (L0, L1) layout (n rollouts; token ids kept, never re-tokenised)."""

    prompt: np.ndarray  # [n, L0] int32, left-padded with pad_id
    prompt_valid: np.ndarray  # [n, L0] bool, True on real prompt tokens
    response: np.ndarray  # [n, L1] int32, right-padded with pad_id (truncated to L1)
    resp_len: np.ndarray  # [n] int32 real response tokens (positions >= resp_len are pads)
    step_map: np.ndarray | None  # [n, L1] int64 first-unmask step of each token; pads = rollout max + 1 (TraceRL)
    pad_id: int

    @property
    def n(self) -> int:
        return self.prompt.shape[0]

    @property
    def l0(self) -> int:
        return self.prompt.shape[1]

    @property
    def l1(self) -> int:
        return self.response.shape[1]

    @property
    def resp_valid(self):
        """[n, L1] bool: True on real (non-pad) response tokens."""
        return np.arange(self.l1)[None, :] < self.resp_len[:, None]


def pack_rollouts(prompts: Sequence, responses: Sequence, pad_id: int, step_maps: Sequence | None = None,
                  max_gen_length: int | None = None, l0: int | None = None, l1: int | None = None) -> Packed:
    """Left-pad prompts to L0 and right-pad responses to L1 (spec §0.5).

    prompts / responses / step_maps: one 1-D int sequence per rollout (the rollout's own ids and step map).
    L0 = longest prompt (or `l0`, which must be >= it: extra left padding changes nothing, pads are never keys).
    L1 = min(longest response, max_gen_length) (or `l1`: note that L1 is the KL / token-loss normaliser and sets the
    SLIM schedule's J, so overriding it changes the objective). Longer responses are truncated to L1. Step maps are
    truncated alike; pad positions get (max over the rollout's whole step map) + 1 (spec §2.3, §7)."""
    n = len(prompts)
    if len(responses) != n or (step_maps is not None and len(step_maps) != n):
        raise ValueError(f"pack_rollouts: {n} prompts, {len(responses)} responses"
                         + ("" if step_maps is None else f", {len(step_maps)} step maps"))
    plen = np.array([len(p) for p in prompts], np.int64)
    rlen = np.array([len(r) for r in responses], np.int64)
    need0 = int(plen.max(initial=0))
    L0 = need0 if l0 is None else int(l0)
    if L0 < need0:
        raise ValueError(f"pack_rollouts: l0={l0} is shorter than the longest prompt ({need0})")
    L1 = int(rlen.max(initial=0)) if l1 is None else int(l1)
    if max_gen_length is not None and l1 is None:
        L1 = min(L1, int(max_gen_length))
    L1 = max(L1, 1)
    prompt = np.full((n, L0), pad_id, np.int32)
    valid = np.zeros((n, L0), bool)
    response = np.full((n, L1), pad_id, np.int32)
    length = np.minimum(rlen, L1).astype(np.int32)
    steps = None if step_maps is None else np.zeros((n, L1), np.int64)
    for i in range(n):
        if plen[i]:
            prompt[i, L0 - plen[i]:] = np.asarray(prompts[i], np.int32)
            valid[i, L0 - plen[i]:] = True
        response[i, :length[i]] = np.asarray(responses[i], np.int32)[:length[i]]
        if steps is not None:
            sm = np.asarray(step_maps[i], np.int64)
            if len(sm) != rlen[i]:
                raise ValueError(f"pack_rollouts: rollout {i} has {rlen[i]} response tokens but a step map of "
                                 f"{len(sm)}")
            steps[i] = (sm.max() if len(sm) else 0) + 1
            steps[i, :length[i]] = sm[:length[i]]
    return Packed(prompt, valid, response, length, steps, int(pad_id))


def prompt_width(longest: int, k: int) -> int:
    """The prompt width L0 an outer step uses: the longest prompt's K-block count n rounded up to a multiple of
    2^(b - 3), b = n.bit_length(), times K (monotone; less than 1/4 extra plus K). Every step's rollout, old-policy
    and update programs are compiled per (L0, L1); exact widths would recompile them at nearly every step, these
    buckets bound the count to ~4 per octave (27 widths up to 784 tokens at K = 4). Extra left padding changes nothing: prompt
    pads are never keys, positions count real tokens only, prompt blocks are end-aligned (and absolute blocks use
    positions), and the SDAR decoder left-aligns the prompt."""
    if longest < 0 or k < 1:
        raise ValueError(f"prompt_width: longest={longest}, k={k}")
    n = -(-longest // k)  # K-blocks
    g = 1 << max(n.bit_length() - 3, 0)  # round the block count up to a multiple of 2^(b - 3): 4 buckets per octave
    return -(-n // g) * g * k


def block_offsets(prompt_valid, k: int, align: str = "response"):
    """[n] int: where response position 0 sits inside its K-block. 0 for "response" alignment, P mod K for
    "absolute" (P = real prompt tokens of the row)."""
    if align == "response":
        return np.zeros(prompt_valid.shape[0], np.int64)
    if align == "absolute":
        return np.asarray(prompt_valid).sum(-1).astype(np.int64) % k
    raise ValueError(f"block_offsets: align={align!r} is not response | absolute")


def response_blocks(offsets, l1: int, k: int):
    """[n, L1] int: block index of each response position, counted from the response's first block (= 0)."""
    return (np.asarray(offsets)[:, None] + np.arange(l1)[None, :]) // k


def positions(prompt_valid, l1: int):
    """Position ids [n, L0 + 2 L1] int32 (spec §0.5): only real prompt tokens count (the first is 0), prompt pad
    slots get 1, the clean response continues the count (pads included), the noisy copy repeats the clean ones."""
    pv = np.asarray(prompt_valid, bool)
    p = np.where(pv, np.cumsum(pv, axis=-1) - 1, 1)  # [n, L0]
    resp = pv.sum(-1, keepdims=True) + np.arange(l1)[None, :]  # [n, L1]
    return np.concatenate([p, resp, resp], axis=-1).astype(np.int32)


def extended_attention_mask(l0: int, l1: int, k: int, prompt_valid, align: str = "response"):
    """[R, N, N] bool (True = query may attend to key) of the extended layout; traceable, (l0, l1, k, align) static.

    prompt queries: prompt keys of the same or earlier prompt block (end-aligned blocks; absolute: position // K).
    clean response query in block j: every prompt key and the clean blocks <= j (bidirectional inside block j).
    noisy response query in block j: every prompt key, the clean blocks < j and the noisy block j itself (noisy
    blocks never see each other). Prompt pads are never keys; response pads stay visible; a prompt query left with
    no key attends to itself (spec §0.5, §7)."""
    import jax.numpy as jnp

    if align not in ("response", "absolute"):
        raise ValueError(f"extended_attention_mask: align={align!r} is not response | absolute")
    pv = jnp.asarray(prompt_valid, bool)  # [R, L0]
    r, n = pv.shape[0], l0 + 2 * l1
    idx = jnp.arange(n)
    seg = jnp.where(idx < l0, 0, jnp.where(idx < l0 + l1, 1, 2))  # [N] 0 prompt, 1 clean, 2 noisy
    ri = jnp.where(seg == 1, idx - l0, idx - l0 - l1)  # [N] response index of response slots
    if align == "response":
        blk = jnp.where(seg == 0, -((l0 - 1 - idx) // k + 1), ri // k)  # prompt blocks < 0, end-aligned
        blk = jnp.broadcast_to(blk[None], (r, n))
    else:
        plen = pv.sum(-1).astype(jnp.int32)  # [R]
        ppos = jnp.where(pv, jnp.cumsum(pv, axis=-1) - 1, 1)  # [R, L0] positions (pads: 1, as layout.positions)
        rblk = (plen[:, None] + ri[None, l0:]) // k  # [R, 2 L1]
        blk = jnp.concatenate([ppos // k, rblk], axis=-1)
    qs, ks = seg[None, :, None], seg[None, None, :]
    bq, bk = blk[:, :, None], blk[:, None, :]
    m = ((qs == 0) & (ks == 0) & (bk <= bq)) \
        | ((qs == 1) & ((ks == 0) | ((ks == 1) & (bk <= bq)))) \
        | ((qs == 2) & ((ks == 0) | ((ks == 1) & (bk < bq)) | ((ks == 2) & (bk == bq))))
    key_ok = jnp.concatenate([pv, jnp.ones((r, 2 * l1), bool)], axis=-1)  # [R, N]
    m = m & key_ok[:, None, :]
    lonely = ~m.any(-1)  # [R, N]: only prompt queries can be left without keys
    return m | (lonely[:, :, None] & jnp.eye(n, dtype=bool)[None])

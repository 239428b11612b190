"""Dream `diffusion_generate` (models_decoders.md §6.2), the whole generation in one jit.

A fixed canvas [left-padded prompt | G mask tokens] is denoised in `steps` forwards (lax.fori_loop, no host sync).
Each step runs the full bidirectional forward (Dream's padding mask and `tok_idx` positions, §3.4), shifts the logits
by one (§1.6), samples a candidate token and a confidence for every completion slot (`sample_tokens` in the
reference's dtype), and commits a subset of the masked slots:
  * alg 'origin': each masked slot independently with probability 1 - t[i+1]/t[i] (all at the last step);
  * the confidence algs with rule 'schedule' (the reference): each row's top-k masked slots by confidence,
    k = int(n̄·(1 - t[i+1]/t[i])) with n̄ the float32 batch-mean number of masks (int(n̄) at the last step), or k
    slots drawn by alg_temp;
  * rule 'tau_budget' (SLIM-RL, slimrl_tracerl.md §0.3) or 'dynamic' (TraceRL threshold): per row, with the row's own
    schedule count int(n_row·(1 - t[i+1]/t[i])) as the floor (the SLIM Dream port's floor), all masks at the last step;
  * alg 'confidence_threshold' (Fast-dLLM v1 Dream without cache, §6.4.3): confidence p(x0) as maskgit_plus; each
    row takes its top K = q + carry masked slots (q = G / steps, which must divide exactly), keeps the first and every
    other one with c ≥ τ (τ in the confidence dtype, N5); the dropped ones are added to the row's carry. Dropping at
    the row's last scheduled step extends that row by one step with q = 0, until a last step drops nothing. The step
    count is data dependent: a lax.while_loop, per-row carry and end step, capped by `max_steps`.
The float32 schedule t = linspace(1, eps, steps+1) and the count tables are built on the host in NumPy (N8); the
device only gathers from them. Choices where the spec is silent: BUILD_NOTES.md, "Dream loop choices".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax import model as M
from dlmjax.config import ModelConfig
from dlmjax.decode import rules, sampling, stats

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold")
RULES = ("schedule", "tau_budget", "dynamic")
CONF_DTYPES = ("float32", "bfloat16", "float16")


def check_sampling_fields(dc, bad) -> None:
    """The checks every Dream config shares: eps, temperature, top_p, top_k and conf_dtype (bad(why) raises)."""
    if not 0.0 < dc.eps < 1.0:
        bad(f"eps={dc.eps} must lie in (0, 1)")
    if not dc.temperature >= 0:  # also rejects NaN; 0 = greedy (Dream's own convention)
        bad(f"temperature={dc.temperature} must be >= 0 (0 = greedy)")
    rules.check_tau(dc.tau, bad)
    if dc.top_p is not None and not 0.0 < dc.top_p <= 1.0:
        bad(f"top_p={dc.top_p} must lie in (0, 1]")
    if dc.top_k is not None and dc.top_k < 1:
        bad(f"top_k={dc.top_k} must be None or >= 1")
    if dc.conf_dtype is not None and dc.conf_dtype not in CONF_DTYPES:
        bad(f"conf_dtype={dc.conf_dtype!r} is not None or one of {CONF_DTYPES}")


@dataclasses.dataclass(frozen=True)
class DreamDecodeConfig:
    """Static settings of Dream decoding. Defaults: DreamGenerationConfig's (alg origin, T 0, eps 1e-3)."""

    max_new_tokens: int = 128  # G: mask tokens appended to every prompt
    steps: int = 128  # forwards; the reference's evals use steps = max_new_tokens
    eps: float = 1e-3
    alg: str = "origin"  # origin | maskgit_plus | topk_margin | entropy | confidence_threshold (Fast-dLLM v1)
    alg_temp: float | None = None  # > 0: k slots drawn from softmax(C / alg_temp) (schedule rule only)
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    conf_dtype: str | None = None  # dtype of probabilities/confidences; None = the logits' dtype (bf16 reference)
    rule: str = "schedule"  # schedule (Dream) | tau_budget (SLIM-RL) | dynamic (TraceRL c > tau)
    tau: float = 0.9  # threshold of the tau_budget / dynamic rules and of alg confidence_threshold
    budget_m: float = 1.0  # tau_budget: b = m (1 - tau); m <= 0 means m = the row's schedule count
    forbid_mask_token: bool = False  # the reference may sample the mask token itself; True forbids it
    batch_mean: str = "exact"  # n̄ = S / B: 'exact' (torch CPU, spec) or 'reciprocal' (torch CUDA: S * f32(1/B))
    # confidence_threshold: cap on the while_loop's forwards; None = max_new_tokens, which cannot bind (every forward
    # commits >= 1 slot and the carry is at most G - steps when the schedule ends, see `n_iterations`)
    max_steps: int | None = None

    def __post_init__(self):
        def bad(why):
            raise ValueError(f"DreamDecodeConfig: {why}")

        if self.alg not in ALGS:
            bad(f"alg={self.alg!r} is not one of {ALGS}")
        if self.rule not in RULES:
            bad(f"rule={self.rule!r} is not one of {RULES}")
        if self.steps < 1 or self.max_new_tokens < 1:
            bad("steps and max_new_tokens must be positive")
        check_sampling_fields(self, bad)
        if self.batch_mean not in ("exact", "reciprocal"):
            bad(f"batch_mean={self.batch_mean!r} is not 'exact' or 'reciprocal'")
        if self.alg == "origin" and self.rule != "schedule":
            bad(f"rule={self.rule!r} needs a confidence; alg='origin' has none")
        if self.uses_alg_temp and (self.alg in ("origin", "confidence_threshold") or self.rule != "schedule"):
            bad("alg_temp > 0 applies to the schedule confidence algs (maskgit_plus, topk_margin, entropy) with "
                "rule='schedule' only")
        if self.alg == "confidence_threshold":
            if self.rule != "schedule":
                bad(f"rule={self.rule!r} does not apply to alg='confidence_threshold' (it has its own rule)")
            if self.max_new_tokens % self.steps:
                bad(f"alg='confidence_threshold' needs q = #masks / steps to be an integer: max_new_tokens="
                    f"{self.max_new_tokens} is not divisible by steps={self.steps}")
            if self.max_steps is not None and self.max_steps < self.steps:
                bad(f"max_steps={self.max_steps} must be >= steps={self.steps}")
        elif self.max_steps is not None:
            bad(f"max_steps={self.max_steps} applies to alg='confidence_threshold' only")

    @property
    def uses_alg_temp(self) -> bool:
        return self.alg_temp is not None and self.alg_temp != 0

    @property
    def n_iterations(self) -> int:
        """Most forwards the loop can run (the width of the per-step outputs): `steps`, or for confidence_threshold
        `max_steps` (default max_new_tokens). Bound: every step commits >= 1 slot (the first is kept), so the carry
        after scheduled step i is at most i·(q-1), G - steps at the end; an extension step has K = carry and commits
        >= 1, so it shrinks the carry: at most G - steps extensions, G forwards in all."""
        if self.alg != "confidence_threshold":
            return self.steps
        return self.max_new_tokens if self.max_steps is None else self.max_steps


# ----------------------------------------------------------------------------------------------------------------------
# host-side schedule (NumPy, float32 as torch computes it on the device)

def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n) in float32: δ = (end - start)/(n - 1); i < n//2 → start + δ·i, else
    end - δ·(n-1-i), each formed with ONE rounding (torch 2.13 CPU fuses the multiply-add; checked bit-exact for
    n ≤ 2100). The double products are exact, so float64 then one cast to float32 is that fused result."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def transfer_fractions(steps: int, eps: float) -> np.ndarray:
    """f32(1 - t[i+1]/t[i]) per step (torch: 0-d float32 tensors), with 1 at the last step. [steps] float32."""
    t = linspace_f32(1.0, eps, steps + 1)
    frac = (np.float32(1.0) - t[1:] / t[:-1]).astype(np.float32)
    frac[-1] = np.float32(1.0)
    return frac


def batch_mean_table(batch: int, max_masks: int, mode: str = "exact") -> np.ndarray:
    """n̄ = f32(S)/B for every total mask count S = 0..B·max_masks (torch: `mask.sum() / B`, an int64 0-d tensor
    divided by a Python int). 'exact': correctly rounded float32 division (torch CPU). 'reciprocal': f32(S)·f32(1/B),
    torch CUDA's rewrite of a division by a CPU scalar. [B·max_masks + 1] float32."""
    s = np.arange(batch * max_masks + 1).astype(np.float32)
    if mode == "reciprocal":
        return (s * (np.float32(1.0) / np.float32(batch))).astype(np.float32)
    return (s / np.float32(batch)).astype(np.float32)


def row_floor_table(steps: int, eps: float, max_masks: int) -> np.ndarray:
    """Per-row schedule count of the SLIM Dream port: int(n · float(f32(1 - t[i+1]/t[i]))) in double, n at the last
    step; the floor of the tau_budget / dynamic rules. [steps, max_masks + 1] int32, indexed by (step, n_masked)."""
    frac = transfer_fractions(steps, eps).astype(np.float64)
    n = np.arange(max_masks + 1, dtype=np.float64)
    tab = np.floor(n[None, :] * frac[:, None]).astype(np.int32)
    tab[-1] = np.arange(max_masks + 1)
    return tab


def lockstep_schedule(dc: DreamDecodeConfig) -> np.ndarray:
    """Tokens committed per step by the 'schedule' rule when every row keeps the same mask count (no mask token is
    ever committed): k_i = int(n̄_i · frac_i) with n̄_i = n_i exactly. [steps] int32 (sums to max_new_tokens)."""
    frac = transfer_fractions(dc.steps, dc.eps)
    n, out = dc.max_new_tokens, []
    for f in frac:
        k = int(np.float32(n) * f)
        out.append(k)
        n -= k
    return np.array(out, np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# one step

def candidates(dc: DreamDecodeConfig, logits, dtype, *, forbid=None, key=None, tokens=None):
    """Dream `sample_tokens` on shifted logits [B, G, V]: x0 [B, G] int32, p [B, G] (probability of x0 under the
    tempered, truncated distribution; what expected wrong commits count) and the alg's confidence [B, G] (p, margin
    or negative entropy), p and confidence in `dtype`. The composition of `sampling.sample_dream`, which returns only
    (confidence, x0); T > 0 draws x0 from `key` or takes the replayed `tokens`."""
    t = dc.temperature
    x = sampling.filter_logits(logits.astype(dtype), temperature=t if t > 0 else None, top_k=dc.top_k,
                               top_p=dc.top_p, top_p_first=True, prob_dtype=dtype, forbid=forbid)
    if t > 0:
        x0 = sampling.sample_categorical(x, key=key, tokens=tokens)
        p = sampling.token_confidence(x, x0, dtype)
    else:
        p, x0 = sampling.max_confidence(x, dtype)
    if dc.alg == "topk_margin":
        conf = sampling.margin_confidence(x, dtype)
    elif dc.alg == "entropy":
        conf = sampling.neg_entropy_confidence(x, dtype)
    else:
        conf = p
    return x0, p, conf


def select(dc: DreamDecodeConfig, tables, i, conf, masked, *, uniforms=None, gumbel=None, key_u=None, key_g=None):
    """Slots to write at step i: conf [B, G] (-inf where not masked), masked [B, G] -> commit [B, G] bool.
    tables: device copies of `transfer_fractions` ('frac', also origin's p_transfer), `batch_mean_table` ('nbar')
    and `row_floor_table` ('floor').

    A committed slot that is not masked is re-masked by the caller (reference: X = m there). That happens only
    with rule 'schedule' when a row holds fewer masks than the batch-mean k (after a committed mask token); the
    surplus goes to the lowest-index non-masked completion slots (torch.topk's order among -inf ties is undefined).
    """
    if dc.alg == "origin":
        return rules.commit_dream_origin(masked, tables["frac"][i], key=key_u, uniforms=uniforms)
    if dc.rule == "schedule":
        total = jnp.sum(masked, dtype=jnp.int32)
        nbar = tables["nbar"][total]                                      # f32 batch mean, host-rounded
        k = jnp.floor(nbar * tables["frac"][i]).astype(jnp.int32)         # int() of a float32 product
        if dc.uses_alg_temp:
            return rules.commit_dream_topk(conf, masked, k, alg_temp=dc.alg_temp, key=key_g, gumbel=gumbel)
        return rules.commit_dream_topk(conf, masked, k, masked_only=False)
    n = tables["floor"][i][jnp.sum(masked, axis=1, dtype=jnp.int32)]      # [B] the row's own schedule count
    if dc.rule == "tau_budget":
        return rules.commit_tau_budget(conf, masked, n, dc.tau, m=dc.budget_m)
    return rules.commit_dynamic_threshold(conf, masked, n, dc.tau)


def select_threshold(conf, masked, k, tau):
    """Fast-dLLM v1 Dream `confidence_threshold` step: conf [B, G] (-inf where not masked), masked [B, G], k [B] int32
    (K = q + carry). Each row ranks its masked slots by descending confidence (ties to the lower index, N7), takes
    the top K, keeps the first always and every other one unless c < τ (τ rounded to conf's dtype, N5: bf16(0.9) =
    0.8984375 is kept against τ = 0.9). Returns (commit [B, G] bool, dropped [B] int32 = K - #committed: the
    reference adds each dropped pick to its carry, including picks beyond the row's masks, which are -inf there)."""
    rank = rules.descending_rank(conf, masked)
    below = conf < rules.threshold_in(tau, conf.dtype, conf.shape[0])
    commit = masked & (rank < k[:, None]) & ((rank == 0) | ~below)
    return commit, k - jnp.sum(commit, axis=1, dtype=jnp.int32)


def _valid_mask(prompt_valid, b: int, p: int):
    """[B, P] bool: given directly, or from per-row lengths [B] of left-padded prompts (the tokenizer's
    padding_side='left' as in the reference evals)."""
    v = jnp.asarray(prompt_valid)
    if v.ndim == 2:
        return v.astype(bool)
    return jnp.arange(p, dtype=jnp.int32)[None, :] >= (p - v.astype(jnp.int32))[:, None]


# ----------------------------------------------------------------------------------------------------------------------
# the loop

def canvas(cfg: ModelConfig, dc, prompts, prompt_valid, caller: str):
    """The Dream canvas [left-padded prompt | G masks] and what every Dream loop derives from it: (mask_id,
    confidence dtype, forbidden token, tok_idx positions [B, L], padding attention mask [B, L, L], tokens [B, L]).
    Pads hold pad_token_id (else eos, else 0); the G mask slots count as valid."""
    b, p = prompts.shape
    g = dc.max_new_tokens
    mask_id = cfg.mask_token_id
    if mask_id is None:
        raise ValueError(f"{caller}: the model config has no mask_token_id")
    if p == 0:
        raise ValueError(f"{caller}: prompts need at least one column (Dream prompts start with BOS)")
    pad_id = next((t for t in (cfg.pad_token_id, cfg.eos_token_id) if t is not None), 0)
    dt = jnp.dtype(dc.conf_dtype or cfg.compute_dtype)
    forbid = mask_id if dc.forbid_mask_token else None
    pv = _valid_mask(prompt_valid, b, p)                                  # [B, P]
    valid = jnp.concatenate([pv, jnp.ones((b, g), bool)], axis=1)         # [B, L]
    pos = M.dream_positions(valid)                                        # tok_idx (= arange without padding)
    attn = M.padding_mask(valid, mask_queries=True)                       # [B, L, L] valid_i and valid_j
    x = jnp.concatenate([jnp.where(pv, prompts.astype(jnp.int32), pad_id), jnp.full((b, g), mask_id, jnp.int32)],
                        axis=1)
    return mask_id, dt, forbid, pos, attn, x


@functools.partial(jax.jit, static_argnums=(0, 1))
def diffusion_generate(cfg: ModelConfig, dc: DreamDecodeConfig, params, prompts, prompt_valid, key, replay=None):
    """Decode B prompts together on a fixed canvas.

    prompts: [B, P] int32, normally left-padded; prompt_valid: [B, P] bool (the reference's attention_mask) or
    [B] int32 lengths of left-padded rows. Prompts must not contain the mask token (the reference would denoise it;
    only the G completion slots are decoded here). key: PRNG key (fold_in by step).
    replay: optional dict of the reference's draws, each [B, S, G] by completion slot (S = dc.n_iterations: steps,
    or max_steps for confidence_threshold): 'tokens' (int32, sampled candidates when temperature > 0), 'uniforms'
    (float32, alg 'origin'), 'gumbel' (float32, alg_temp > 0).
    Returns a dict: tokens [B, G] (mask id where never decoded), step_map [B, G] (1-based step at which the slot
    last turned from mask to token; 0 = still masked), conf [B, G] (p of that token, float32), commits_per_step /
    ewc_per_step [B, S] (tokens unmasked and their Σ(1-p)), tpf [B], ewc [B], n_forward [B] (forwards of the row:
    steps, or for confidence_threshold the row's own step count incl. extensions), canvas [B, P+G].
    With confidence_threshold each row keeps its own carry and end step; a row past its end stops changing (its
    forwards still run in the batch but are not counted), and the loop ends when every row has ended.
    """
    b, p = prompts.shape
    g, steps, n_it = dc.max_new_tokens, dc.steps, dc.n_iterations
    mask_id, dt, forbid, pos, attn, x = canvas(cfg, dc, prompts, prompt_valid, "diffusion_generate")
    replay = replay or {}
    # completion slot j is predicted by position p + j - 1 (= M.shift_logits(logits)[:, p:]; position 0 keeps its
    # own): a static slice of the hidden states, so the LM head runs on G positions only
    src = slice(p - 1, p + g - 1) if cfg.logit_shift else slice(p, p + g)
    tables = dict(frac=jnp.asarray(transfer_fractions(steps, dc.eps)),
                  nbar=jnp.asarray(batch_mean_table(b, g, dc.batch_mean)),
                  floor=jnp.asarray(row_floor_table(steps, dc.eps, g)))

    def draws(i):
        ki = jax.random.split(jax.random.fold_in(key, i), 3)
        pick = lambda name: replay[name][:, i] if name in replay else None  # noqa: E731
        return ki, pick("tokens"), pick("uniforms"), pick("gumbel")

    def propose(i, c):
        """One forward: the completion slots, which are masked, candidates x0, p(x0) and the masked confidence."""
        h, _ = M.hidden_states(cfg, params, c["x"], pos, attn)
        logits = M.lm_head(cfg, params, h[:, src])                        # [B, G, V] shifted
        xc = c["x"][:, p:]                                                # [B, G]
        masked = xc == mask_id
        ki, tok, uni, gum = draws(i)
        x0, pr, conf = candidates(dc, logits, dt, forbid=forbid, key=None if tok is not None else ki[0], tokens=tok)
        conf = jnp.where(masked, conf, jnp.asarray(-jnp.inf, conf.dtype))
        return xc, masked, x0, pr, conf, ki, uni, gum

    def write(i, c, xc, masked, x0, pr, commit):
        new = jnp.where(commit, jnp.where(masked, x0, mask_id), xc)
        unmasked = commit & masked & (x0 != mask_id)                      # a committed mask token stays masked
        remasked = commit & ~masked
        p32 = pr.astype(jnp.float32)
        step_map = jnp.where(unmasked, i + 1, jnp.where(remasked, 0, c["step_map"]))
        conf_map = jnp.where(unmasked, p32, jnp.where(remasked, 0.0, c["conf_map"]))
        commits = c["commits"].at[:, i].set(jnp.sum(unmasked, axis=1, dtype=jnp.int32))
        ewc = c["ewc"].at[:, i].set(jnp.sum(jnp.where(unmasked, 1.0 - p32, 0.0), axis=1))
        return dict(c, x=c["x"].at[:, p:].set(new), step_map=step_map, conf_map=conf_map, commits=commits, ewc=ewc)

    def body(i, c):
        xc, masked, x0, pr, conf, ki, uni, gum = propose(i, c)
        commit = select(dc, tables, i, conf, masked, uniforms=uni, gumbel=gum,
                        key_u=None if uni is not None else ki[1], key_g=None if gum is not None else ki[2])
        return write(i, c, xc, masked, x0, pr, commit)

    def threshold_body(c):
        """confidence_threshold, per row: K = q + carry; a drop at the row's last step moves its end one step on
        and sets its q to 0 (the reference's `steps += 1`, `number_transfer_tokens = 0`)."""
        i = c["i"]
        active = i < c["end"]                                             # [B] rows not yet finished
        xc, masked, x0, pr, conf, _, _, _ = propose(i, c)
        commit, dropped = select_threshold(conf, masked, c["q"] + c["left"], dc.tau)
        commit &= active[:, None]
        extend = active & (i == c["end"] - 1) & (dropped > 0)
        c = write(i, c, xc, masked, x0, pr, commit)
        return dict(c, i=i + 1, left=jnp.where(active, dropped, c["left"]), q=jnp.where(extend, 0, c["q"]),
                    end=c["end"] + extend.astype(jnp.int32))

    carry = dict(x=x, step_map=jnp.zeros((b, g), jnp.int32), conf_map=jnp.zeros((b, g), jnp.float32),
                 commits=jnp.zeros((b, n_it), jnp.int32), ewc=jnp.zeros((b, n_it), jnp.float32))
    if dc.alg == "confidence_threshold":
        carry.update(i=jnp.zeros((), jnp.int32), q=jnp.full((b,), g // steps, jnp.int32),
                     left=jnp.zeros((b,), jnp.int32), end=jnp.full((b,), steps, jnp.int32))
        c = jax.lax.while_loop(lambda c: (c["i"] < n_it) & jnp.any(c["i"] < c["end"]), threshold_body, carry)
        n_forward = jnp.minimum(c["end"], c["i"])                         # the guard may stop a row early
    else:
        c = jax.lax.fori_loop(0, steps, body, carry)
        n_forward = jnp.full((b,), steps, jnp.int32)
    keep = jnp.ones((b, g), bool)                                         # fixed canvas: no stop ids in Dream
    decoded = c["step_map"] > 0
    return dict(tokens=c["x"][:, p:], step_map=c["step_map"], conf=c["conf_map"], commits_per_step=c["commits"],
                ewc_per_step=c["ewc"], tpf=stats.tokens_per_forward(c["step_map"], keep),
                ewc=jnp.sum(jnp.where(decoded, 1.0 - c["conf_map"], 0.0), axis=1),
                n_forward=n_forward, canvas=c["x"])

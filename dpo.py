"""
Direct Preference Optimization (Rafailov et al. 2023), the pieces: pairs -> tokens -> batches -> log-probs ->
loss. train_dpo.py runs these in a training loop; margins.py reuses them to measure held-out margins.

The objective. For a prompt x with a preferred response y_w (here: non-toxic) and a dispreferred one y_l
(toxic), DPO raises the policy's log-probability of y_w relative to a frozen reference model, and lowers that
of y_l:

    h    = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    loss = -log sigmoid(beta * h)                                           (eq. 7)

beta * (log pi - log pi_ref) is the "implicit reward" of a response; a pair is ranked correctly when the
chosen reward exceeds the rejected one. Only sequence log-probs enter the loss: the sum of log p(token) over
the response tokens, given the prompt and the response tokens before it.

The data layout (the DPO reference implementation's):

    tokenize_pair   {prompt, chosen, rejected} text -> {prompt_input_ids, chosen_input_ids, chosen_labels,
                    rejected_input_ids, rejected_labels}; labels are -100 on the prompt (no loss there)
    collate         B pairs -> ONE right-padded batch of 2B rows, chosen rows first then rejected, so both
                    responses go through the model in a single forward pass:
                        input_ids, attention_mask, labels  [2B, T]
    batch_logps     [2B, T] -> sequence log-probs [2B] and response token counts [2B]
    dpo_forward     policy log-probs + reference log-probs [B] each -> preference_loss -> losses [B]

Where each piece is used: dpo_forward in train_dpo.py's training step and evaluation; compute_logps (the
no-grad pass) for train_dpo.py's reference cache and for margins.py's held-out margins; batch_logps also
for evaluate.py's fluency log-probs; tokenize_pairs also for design.py's pair-confound check.

Sequence log-probs come two ways, with equal values up to rounding. `sequence_logps` is the reference's:
full logits [2B, T, V], log_softmax, gather, sum. `ResponseLogProbs` computes the same thing on response
positions only, in chunks, with a hand-written gradient, so that the full logits never exist: with the
262k-token vocabulary of the default model they would dominate a step's memory and time.
"""

import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import DTYPES
from tokenizer import left_truncate

# -----------------------------------------------------------------------------
# Pairs -> tokens -> batches

# Token budgets of a pair: train_dpo's defaults, and the fallbacks of margins.py and design.py's confound check.
MAX_PROMPT_LEN = 64  # prompt tokens kept: its end, with the BOS in front
MAX_LEN = 256        # prompt + response tokens


def check_lengths(max_prompt_len, max_len, response_tokens=None):
    """ValueError naming the flags unless a pair cut to these budgets keeps room for a response (the one check
    of the rule: training, margins and the confound check cut pairs the same way)."""
    if not 1 <= max_prompt_len < max_len:
        raise ValueError(f"--max-len ({max_len}) must exceed --max-prompt-len ({max_prompt_len}), which must be "
                         ">= 1, to leave room for a response")
    if response_tokens is not None and not 1 <= response_tokens <= max_len - max_prompt_len:
        raise ValueError(f"--response-tokens ({response_tokens}) must be >= 1 and fit beside the prompt: at most "
                         f"--max-len ({max_len}) - --max-prompt-len ({max_prompt_len})")


def _build_example(prompt_ids, chosen_ids, rejected_ids, bos_id, max_prompt_len, max_len, response_tokens=None):
    if response_tokens is not None and min(len(chosen_ids), len(rejected_ids)) <= response_tokens:
        return None  # a side that fits the budget whole would end where its text ends: a cue
    # Keep the end of the prompt: it is what the response continues. Keep the BOS the model expects first.
    prompt_ids = left_truncate(prompt_ids, max_prompt_len, bos_id)
    # Both responses are cut to ONE length and neither gets EOS. RTP-LX toxic completions are ~4x longer than
    # benign ones, so with EOS appended before a cut only the short (chosen) side kept its EOS and the pairs
    # were separable by length and by EOS alone (validation reward accuracy 1.0 at the first evaluation).
    # Cutting to the shorter side still leaves a cue: the shorter (benign) side is then kept whole, so it ends
    # a sentence (98.9% of the English pairs) and the toxic side does not (3.9%). With a response_tokens budget
    # that both sides exceed, both are cut mid-text and neither is ever whole.
    n = min(len(chosen_ids), len(rejected_ids), max_len - len(prompt_ids)) if response_tokens is None \
        else min(response_tokens, max_len - len(prompt_ids))
    example = {"prompt_input_ids": prompt_ids}
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        example[f"{name}_input_ids"] = prompt_ids + ids[:n]
        example[f"{name}_labels"] = [-100] * len(prompt_ids) + ids[:n]  # loss only on response tokens
    return example


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_prompt_len=MAX_PROMPT_LEN, max_len=MAX_LEN,
                  response_tokens=None):
    """One pair -> {prompt_input_ids, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}
    (lists of ints), or None when response_tokens is set and a response has no more tokens than it. The prompt
    is encoded with the tokenizer's BOS (if it adds one) and each response without; the prompt keeps its last
    max_prompt_len tokens, and both responses are cut to the same number of tokens with no EOS: response_tokens
    when set (so both are cut), else min(len(chosen), len(rejected)); at most max_len - prompt tokens. Labels are
    -100 on the prompt. Encoding them separately keeps the prompt/response boundary exact (a joint encoding could
    merge tokens across it)."""
    return _build_example(tokenizer.encode(prompt, add_special=True), tokenizer.encode(chosen, add_special=False),
                          tokenizer.encode(rejected, add_special=False), tokenizer.bos_id if tokenizer.add_bos
                          else None, max_prompt_len, max_len, response_tokens)


def tokenize_pairs(tokenizer, pairs, max_prompt_len=MAX_PROMPT_LEN, max_len=MAX_LEN, response_tokens=None):
    """tokenize_pair over a list of {prompt, chosen, rejected} dicts, with the batched (multi-core) encoder. The
    one token-level pair builder: training, its reference pass, margins.py and design.pair_confounds. Pairs that
    the response_tokens budget drops are left out; each example's `pair` is its position in `pairs`."""
    prompts = tokenizer.encode_batch([p["prompt"] for p in pairs], add_special=True)
    chosen = tokenizer.encode_batch([p["chosen"] for p in pairs], add_special=False)
    rejected = tokenizer.encode_batch([p["rejected"] for p in pairs], add_special=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    examples = [_build_example(p, c, r, bos, max_prompt_len, max_len, response_tokens)
                for p, c, r in zip(prompts, chosen, rejected)]
    return [{**ex, "pair": i} for i, ex in enumerate(examples) if ex is not None]


def collate(examples, pad_id):
    """B tokenized pairs -> one right-padded batch of 2B rows (chosen rows first, then rejected), so both
    responses go through the model in a single forward pass:
        input_ids [2B, T] long, attention_mask [2B, T] long (0 on padding), labels [2B, T] long (-100 off-response)
    """
    rows = [ex["chosen_input_ids"] for ex in examples] + [ex["rejected_input_ids"] for ex in examples]
    labels = [ex["chosen_labels"] for ex in examples] + [ex["rejected_labels"] for ex in examples]
    T = max(len(r) for r in rows)
    batch = {"input_ids": torch.full((len(rows), T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
             "labels": torch.full((len(rows), T), -100, dtype=torch.long)}
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["labels"][i, :len(ids)] = torch.tensor(lab)
    return batch


# -----------------------------------------------------------------------------
# The DPO loss


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta, label_smoothing=0.0, loss_type="sigmoid"):
    """The DPO loss of a batch of pairs.

    Args:
        policy_chosen_logps:   [B] log pi(y_w | x), summed over response tokens (per-token mean for IPO)
        policy_rejected_logps: [B] log pi(y_l | x)
        ref_chosen_logps:      [B] log pi_ref(y_w | x)
        ref_rejected_logps:    [B] log pi_ref(y_l | x)
        beta: temperature; larger keeps the policy closer to the reference
        label_smoothing: cDPO's probability that a preference label is flipped (0 = plain DPO)
        loss_type: "sigmoid" (DPO) or "ipo"
    Returns:
        losses [B], chosen_rewards [B], rejected_rewards [B]; rewards are beta * (policy - ref) log-probs,
        detached (they are for logging).
    """
    # h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l): how much more the policy prefers y_w than the ref.
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # [B]
    if loss_type == "sigmoid":
        # DPO eq. 7: -log sigmoid(beta h). cDPO: with probability eps the label is wrong, so the target is
        # the mixture (1 - eps) * (y_w > y_l) + eps * (y_l > y_w).
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, eq. 17): regress h onto 1/(2 beta) instead of pushing it to infinity.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (sigmoid, ipo)")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# -----------------------------------------------------------------------------
# Sequence log-probs: plain (the reference's) and chunked (large vocabularies)


def sequence_logps(logits, labels):
    """Sum of log p(token) over each row's response tokens, and the number of those tokens: the DPO reference's
    `_get_batch_logps`. logits [N, T, V], labels [N, T] (-100 off the response) -> (logps [N], n_tokens [N]).
    The softmax runs in fp32 at least, whatever dtype the logits come in."""
    assert logits.shape[:-1] == labels.shape, f"logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}"
    labels = labels[:, 1:]                                                     # [N, T-1]: t predicts token t+1
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # [N, T-1, V]
    mask = labels != -100                                                      # [N, T-1]
    # -100 is no vocabulary index: gather at 0 there, then mask it out
    per_token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # [N, T-1]
    return (per_token * mask).sum(-1), mask.sum(-1)


class ResponseLogProbs(torch.autograd.Function):
    """log p(target) = h . w_target - logsumexp(h W^T) at M response positions, in chunks of rows, so that the
    [M, V] logits never exist at once (V = 262k: 1 GB of fp32 per 1000 tokens, and autograd would keep three
    such tensors). Gradients, with P = softmax(h W^T):
        d logp / d h = w_target - P W            computed chunk by chunk in the forward pass ([M, D], small)
        d logp / d W = (onehot_target - P)^T h   needs the upstream gradient, so the backward pass recomputes
                                                 each chunk's logits (only when W is trained)
    hidden [M, D], weight [V, D], targets [M] long -> logps [M] (fp32, or fp64 for fp64 inputs). Under autocast
    the matmuls run in the autocast dtype and the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)  # softmax precision
        w = weight.to(dtype)
        logps = torch.empty(len(hidden), dtype=acc, device=hidden.device)  # [M]
        lse = torch.empty_like(logps)                                       # [M]
        dlogp_dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if ctx.needs_input_grad[0] else None
        for rows in torch.arange(len(hidden), device=hidden.device).split(chunk_size):
            logits = (hidden[rows].to(dtype) @ w.T).to(acc)  # [c, V]
            lse[rows] = logits.logsumexp(-1)
            logps[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            if dlogp_dh is not None:
                probs = logits.sub_(lse[rows, None]).exp_()  # softmax, in place
                dlogp_dh[rows] = weight[targets[rows]].to(acc) - (probs.to(dtype) @ w).to(acc)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.save_for_backward(hidden, weight, targets, lse, dlogp_dh)
        return logps

    @staticmethod
    def backward(ctx, grad):  # grad [M]: dL/dlogp
        hidden, weight, targets, lse, dlogp_dh = ctx.saved_tensors
        grad_hidden = (grad[:, None] * dlogp_dh).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            w = weight.to(ctx.dtype)
            grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)  # [V, D]
            for rows in torch.arange(len(hidden), device=hidden.device).split(ctx.chunk_size):
                h = hidden[rows].to(ctx.dtype)
                g = (h @ w.T).to(lse.dtype).sub_(lse[rows, None]).exp_().mul_(-grad[rows, None])  # -g P [c, V]
                g[torch.arange(len(rows), device=g.device), targets[rows]] += grad[rows]         # + g onehot
                if ctx.dtype == lse.dtype:
                    grad_weight.addmm_(g.T, h)  # accumulate in place: no [V, D] temporary
                else:
                    grad_weight += (g.T.to(ctx.dtype) @ h).to(lse.dtype)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def batch_logps(model, input_ids, attention_mask, labels, chunked=False, chunk_size=256):
    """Sum of log p(token) over each row's response tokens, and the number of those tokens.

    input_ids, attention_mask, labels: [N, T] (labels -100 on prompt and padding). Returns
    (logps [N] float32 (float64 for an fp64 model), n_tokens [N] long). By default (as TrainConfig.logps
    "plain"), full logits and `sequence_logps`, the DPO reference's way. chunked=True, the fast path for large
    vocabularies: the LM head runs only on the positions that predict a response token,
    chunk_size rows at a time (`ResponseLogProbs`). `model` may be wrapped in DistributedDataParallel.
    """
    assert input_ids.shape == labels.shape == attention_mask.shape, "input_ids, attention_mask, labels differ"
    if not chunked:
        return sequence_logps(model(input_ids, attention_mask), labels)
    hidden = model(input_ids, attention_mask, return_hidden=True)  # [N, T, D]
    targets = labels[:, 1:]     # [N, T-1]: position t predicts token t+1
    selected = targets != -100  # [N, T-1]
    weight, scale = getattr(model, "module", model).unembed_params()  # DistributedDataParallel wraps the model
    token_logps = ResponseLogProbs.apply(hidden[:, :-1][selected] * scale, weight, targets[selected],
                                         chunk_size)  # [M], M response tokens
    logps = torch.zeros(selected.shape, dtype=token_logps.dtype, device=hidden.device).masked_scatter(
        selected, token_logps).sum(-1)  # [N]
    return logps, selected.sum(-1)


def autocast(device, dtype):
    """Mixed precision for matmuls while the weights stay fp32; a no-op for fp32."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def compute_logps(model, batches, device, dtype=torch.float32, desc=None, chunked=False):
    """Per-pair summed log-probs and response token counts over collated batches (chosen rows first):
    {chosen_logps, rejected_logps: [N] float32, chosen_tokens, rejected_tokens: [N] long}, on the CPU, in
    batch order; chunked as in batch_logps. For train_dpo.py's reference cache and margins.py."""
    out = {"chosen_logps": [], "rejected_logps": [], "chosen_tokens": [], "rejected_tokens": []}
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        with autocast(device, dtype):
            logps, counts = batch_logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask",
                                                                               "labels")), chunked=chunked)
        for name, value in (("logps", logps), ("tokens", counts)):
            chosen, rejected = value.cpu().chunk(2)
            out[f"chosen_{name}"].append(chosen)
            out[f"rejected_{name}"].append(rejected)
    return {k: torch.cat(v) for k, v in out.items()}


# -----------------------------------------------------------------------------
# One DPO forward pass: a batch -> losses and metric sums

STATS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "logps_chosen",
         "logps_rejected")


def dpo_forward(model, batch, ref_chosen, ref_rejected, cfg):
    """Losses [B] of one collated batch of B pairs and its metric sums [len(STATS) + 1] (last entry: the pair
    count; sums, not means, so they add up over micro-batches and processes without a host sync).
    ref_chosen, ref_rejected: [B] reference log-probs. cfg: beta, label_smoothing, loss_type and logps
    ("plain" or "chunked"), e.g. a train_config.TrainConfig."""
    logps, counts = batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                chunked=cfg.logps == "chunked")  # [2B]
    policy_chosen, policy_rejected = logps.chunk(2)
    inputs = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    if cfg.loss_type == "ipo":  # IPO compares per-token log-ratios, so long responses do not dominate
        chosen_n, rejected_n = counts.chunk(2)
        inputs = tuple(x / n.clamp(min=1) for x, n in zip(inputs, (chosen_n, rejected_n) * 2))
    losses, chosen_rewards, rejected_rewards = preference_loss(*inputs, beta=cfg.beta,
                                                               label_smoothing=cfg.label_smoothing,
                                                               loss_type=cfg.loss_type)
    stats = torch.stack([losses.detach().sum(), (chosen_rewards > rejected_rewards).float().sum(),
                         (chosen_rewards - rejected_rewards).sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                         policy_chosen.detach().sum(), policy_rejected.detach().sum(),
                         torch.tensor(float(len(losses)), device=losses.device)])
    return losses, stats


def summarize(stats):
    """Metric sums [len(STATS) + 1] (a host list) -> {name: mean over pairs}."""
    return {name: stats[i] / max(stats[-1], 1.0) for i, name in enumerate(STATS)}

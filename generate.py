"""
Sample continuations of prompts: batched, KV-cached, left-padded, and reproducible from a seed.

The paper scores the toxicity of 25 sampled continuations (20 new tokens, temperature 0.9, nucleus top-p 0.8)
of every RTP-LX prompt, in each of 17 languages. This file produces those samples:

    python generate.py --prompts ../shared/data/rtp-lx/en.jsonl --out gens/en.jsonl --n 25

How it works, and why:
- Prompts are left-padded so each row's last prompt token sits in the last column. The model derives positions
  from the attention mask, so padding changes nothing about a row.
- The prompt is run once (prefill) and its KV cache copied to the n samples. After that each step feeds only the
  token just chosen, and the LM head is applied to the last position only (it is 168M of gemma-3-270m's 268M
  parameters).
- Nucleus (top-p) sampling over a 262k vocabulary: sorting 262k logits per row per step would cost more than the
  model on a CPU. So we take the top 1024 (a partial selection) and find the nucleus inside them. A row whose
  1024 best tokens hold less than top_p of the probability (a very flat distribution) is redone with a full sort.
  The result is always the exact nucleus.
- Randomness: each (prompt, sample) pair has its own random stream, seeded from (seed, lang, prompt_index,
  sample_index). Each step uses exactly one uniform number per row (inverse-CDF sampling). So a row's random
  numbers do not depend on which batch it lands in: the text does not depend on --batch-size, and a resumed run
  continues exactly. The one caveat is float rounding: a batched matmul may round a row's logits differently
  when the batch shape changes, which can flip a draw that falls within ~1e-7 of a boundary. That is rare: the
  tests see identical text at batch sizes 1 to 4, and so did gemma-3-270m at batch 6 vs 1 (240 tokens).
- Output is jsonl rows {prompt, generated_text, lang, prompt_index, sample_index}, the official repo's
  `prompt`/`generated_text` plus bookkeeping. Rows are appended and flushed one prompt at a time. Rerunning the
  same command resumes a killed run: a torn last line is cut off, the rows of a half-written prompt are dropped,
  and generation goes on from the first incomplete prompt. The settings live in OUT.meta.json, and a rerun with
  different settings is refused, so one file never mixes two configurations. A second run on the same OUT while
  one is writing it is refused too (report.exclusive). Nothing is created until the prompts are read, the flags
  checked and the model loaded, so a failed start leaves no empty OUT that would block the rerun.
- A prompt longer than the model's context less max_new_tokens is cut from the left (its end, which the
  continuation follows, is kept, and BOS stays in front); main() warns how many were cut.
"""

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import DEFAULT_MODEL
from data import (LANGS, PROMPT_SUFFIXES, add_root_flag, apply_root_flag, check_lang, decode_utf8, lang_from_path,
                  load_prompts)
from loading import add_device_args, load_model, resolve_device, resolve_dtype
from report import check_flags, check_outputs, exclusive, exit_on_error, write_json
from tokenizer import left_truncate

# Candidates kept by the partial selection before the exact nucleus search. With gemma-3-270m the 1024 best
# tokens almost always hold more than top_p = 0.8 of the mass, so the full-sort fallback is rare. A larger value
# makes fallbacks rarer but makes every step slower.
PREFILTER_K = 1024

# -----------------------------------------------------------------------------
# Sampling: pure functions on logits


def prefilter_candidates(logits, temperature=1.0, top_k=0, top_p=1.0, prefilter=PREFILTER_K):
    """The candidate tokens of each row, without host syncs (the first half of `filter_logits`).

    logits [B, V] -> (cand_logits [B, K], cand_ids [B, K], short [B] bool)
    cand_logits are temperature-scaled logits (float32) sorted in descending order, with -inf for tokens that
    top-k / top-p remove; cand_ids are their token ids. `short` marks rows whose K candidates hold less than top_p
    of the probability: their nucleus reaches outside the candidates, so `exact_top_p` must redo them.
    Semantics follow transformers' warpers in this order: temperature, then top-k, then top-p on the
    renormalised top-k distribution (when top_k is set).
    """
    B, V = logits.shape
    logits = logits.float() / temperature
    no_short = torch.zeros(B, dtype=torch.bool, device=logits.device)
    if top_k <= 0 and top_p >= 1:  # plain temperature sampling: inverse-CDF sampling needs no sorted order
        return logits, torch.arange(V, device=logits.device).expand(B, V), no_short
    K = min(V, top_k if top_k > 0 else prefilter)
    cand_logits, cand_ids = logits.topk(K, dim=-1)  # [B, K], sorted descending
    if top_p >= 1:
        return cand_logits, cand_ids, no_short
    # Top-p is defined on the top-k renormalised distribution when top_k is set, else on the full vocabulary.
    log_z = (cand_logits if top_k > 0 else logits).logsumexp(-1, keepdim=True)  # [B, 1]
    probs = (cand_logits - log_z).exp()                                          # [B, K]
    cum = probs.cumsum(-1)                                                       # [B, K]
    mass_before = F.pad(cum[:, :-1], (1, 0))  # [B, K] mass of the tokens ranked above each candidate
    # Keep a token while the tokens above it hold less than top_p: the smallest prefix with mass >= top_p.
    cand_logits = cand_logits.masked_fill(mass_before >= top_p, float("-inf"))
    short = cum[:, -1] < top_p if top_k <= 0 else no_short
    return cand_logits, cand_ids, short


def exact_top_p(logits, temperature, top_p, cand_logits, cand_ids, short):
    """Redo the rows marked `short` with a full sort of the vocabulary (the second half of `filter_logits`).

    logits [B, V]; cand_logits, cand_ids [B, K] and short [B] from `prefilter_candidates` ->
    (cand_logits [B, V], cand_ids [B, V]). The other rows keep their K candidates, padded with -inf.
    """
    B, V = logits.shape
    rows = short.nonzero().squeeze(1)  # [S]
    full_logits, full_ids = (logits[rows].float() / temperature).sort(-1, descending=True)  # [S, V]
    cum = full_logits.softmax(-1).cumsum(-1)
    mass_before = F.pad(cum[:, :-1], (1, 0))
    pad = V - cand_logits.shape[1]
    cand_logits = F.pad(cand_logits, (0, pad), value=float("-inf"))
    cand_ids = F.pad(cand_ids, (0, pad), value=0)
    cand_logits[rows] = full_logits.masked_fill(mass_before >= top_p, float("-inf"))
    cand_ids[rows] = full_ids
    return cand_logits, cand_ids


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0, prefilter=PREFILTER_K):
    """Temperature, top-k and exact top-p (nucleus) filtering, done fast with a 262k vocabulary.

    logits [B, V] -> (cand_logits [B, K], cand_ids [B, K]): the candidate tokens of each row in descending order,
    with -inf where a token is filtered out; softmax(cand_logits) is the sampling distribution over cand_ids.
    K = top_k if set, else min(prefilter, V) when top_p < 1, else V. It grows to V when some row's prefilter
    holds less than top_p of the mass; that row is then redone with the full sort, so the nucleus is exact.
    """
    cand_logits, cand_ids, short = prefilter_candidates(logits, temperature, top_k, top_p, prefilter)
    if short.any():
        cand_logits, cand_ids = exact_top_p(logits, temperature, top_p, cand_logits, cand_ids, short)
    return cand_logits, cand_ids


def sample_next(cand_logits, cand_ids, uniform):
    """Draw one token per row from softmax(cand_logits) by inverting its CDF at `uniform`.

    cand_logits [B, K] (-inf = excluded), cand_ids [B, K] long, uniform [B] in [0, 1) -> next token ids [B].
    Each row uses exactly one uniform number per step, so its draws do not depend on the rest of the batch.
    """
    probs = (cand_logits - cand_logits.max(-1, keepdim=True).values).exp()  # [B, K], unnormalised
    cdf = probs.cumsum(-1)                                                  # [B, K]
    # u < 1 makes target < total even after float32 rounding (u * x rounds down by at least half an ulp), so
    # the first index with cdf > target always exists and has positive probability.
    target = uniform[:, None].float() * cdf[:, -1:]                         # [B, 1]
    pos = torch.searchsorted(cdf, target, right=True)                       # [B, 1]
    return cand_ids.gather(-1, pos).squeeze(1)


def sample_seed(seed, lang, prompt_index, sample_index):
    """The seed of one (prompt, sample) random stream: a hash of all four, so no stream depends on batching."""
    key = f"{seed}:{lang or ''}:{prompt_index}:{sample_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1  # < 2**63


def _uniforms(generator, rows, steps, device):
    """[rows, steps] uniform numbers: from one generator, or row r from the r-th of a list of generators."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == rows, f"{len(generator)} generators for {rows} rows"
        u = torch.stack([torch.rand(steps, generator=g, device=g.device) for g in generator])
    else:
        u = torch.rand(rows, steps, generator=generator,
                       device=generator.device if generator is not None else device)
    return u.to(device)


# -----------------------------------------------------------------------------
# Generation


@torch.inference_mode()
def left_padded_mask(input_ids, attention_mask):
    """The attention mask of a batch of prompts (all ones when None), refused unless it is left-padded: the
    sampler appends each new token after the last column, so that column must be a real token in every row."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate needs left-padded, non-empty prompts: the last column of attention_mask "
                         "must be all ones")
    return attention_mask


def generate(model, input_ids, attention_mask, max_new_tokens, temperature=0.9, top_p=0.8, top_k=0, greedy=False,
             eos_id=None, generator=None, n=1, prefilter=PREFILTER_K):
    """Sample max_new_tokens continuation tokens for a left-padded batch, with a KV cache.

    input_ids [B, T] long, attention_mask [B, T] 0/1 (left padding: the last column is all ones) ->
    new tokens [B * n, max_new_tokens] long; row b * n + j is sample j of prompt b. After its first EOS a row is
    filled with EOS. eos_id: an id or a list of ids (None: never stop). generator: a torch.Generator, or a list
    of B * n generators (one random stream per row, which makes rows independent of the batch). n: samples per
    prompt; the prompt is prefilled once and its cache copied n times. Works inside `model.hooks(...)` and under
    autocast (the logits are filtered in float32).
    """
    B, T = input_ids.shape
    R = B * n
    device = input_ids.device
    attention_mask = left_padded_mask(input_ids, attention_mask)
    uniforms = None if greedy else _uniforms(generator, R, max_new_tokens, device)  # [R, max_new_tokens]
    eos_ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    fill = eos_ids[0] if eos_ids else 0
    # The nucleus may need the exact full sort only when top-p is searched inside a prefilter.
    may_be_short = not greedy and top_k <= 0 and top_p < 1

    cache = model.new_kv_cache()
    h = model(input_ids, attention_mask, kv_cache=cache, return_hidden=True)  # [B, T, d_model]
    logits = model.unembed(h[:, -1])                                          # [B, V]
    if n > 1:
        rows = torch.arange(B, device=device).repeat_interleave(n)  # [R]
        cache.reorder(rows)
        logits, attention_mask = logits[rows], attention_mask[rows]
    out = torch.full((R, max_new_tokens), fill, dtype=torch.long, device=device)
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        if t > 0:
            # Feed only the token just chosen; the mask grows by one column (ones even for finished rows,
            # whose further tokens are discarded).
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
            logits = model(out[:, t - 1:t], attention_mask, kv_cache=cache)[:, -1]  # [R, V]
        if greedy:
            short = torch.zeros(R, dtype=torch.bool, device=device)
        else:
            cand_logits, cand_ids, short = prefilter_candidates(logits, temperature, top_k, top_p, prefilter)
        if eos is not None or may_be_short:
            # The one host sync per step reads two flags: every row has ended (stop; this wastes the forward
            # just run, once, instead of paying a second sync every step) and some row needs the full sort.
            all_done, any_short = torch.stack([finished.all(), short.any()]).tolist()
            if all_done:
                break
            if any_short:
                cand_logits, cand_ids = exact_top_p(logits, temperature, top_p, cand_logits, cand_ids, short)
        if greedy:
            next_ids = logits.argmax(-1)  # [R]
        else:
            next_ids = sample_next(cand_logits, cand_ids, uniforms[:, t])
        out[:, t] = next_ids.masked_fill(finished, fill)
        if eos is not None:
            finished |= torch.isin(next_ids, eos)
    return out


def _cut_at_eos(ids, eos_id):
    """Token ids of one row up to (not including) its first EOS."""
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def prompt_budget(model, max_new_tokens):
    """The most prompt tokens that leave room for max_new_tokens in the model's context (its config's
    max_position_embeddings); ValueError when max_new_tokens alone fills it."""
    context = model.config.max_seq_len
    if max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the context of "
                         f"{getattr(model, 'name_or_path', 'the model')} is {context} tokens")
    return context - max_new_tokens


def generate_rows(model, tokenizer, jobs, n=1, greedy=False, max_new_tokens=20, temperature=0.9, top_p=0.8,
                  top_k=0, seed=0, batch_size=8, device=None):
    """Yield (job, texts, n_tokens) per prompt, in order. jobs: dicts with `prompt` and optionally `lang` and
    `prompt_index` (defaults: None and the position in `jobs`), which seed the random streams; texts: n strings;
    n_tokens: the new tokens generated for this prompt, each EOS counted, padding after it not. A prompt longer
    than prompt_budget is cut from the left (main() warns how many)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    budget = prompt_budget(model, max_new_tokens)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        keys = [(job.get("lang"), job.get("prompt_index", start + i)) for i, job in enumerate(batch)]
        input_ids, attention_mask = tokenizer.pad(
            [left_truncate(ids, budget, bos_id) for ids in tokenizer.encode_batch([job["prompt"] for job in batch])],
            side="left")
        generators = None if greedy else [torch.Generator().manual_seed(sample_seed(seed, lang, index, j))
                                          for lang, index in keys for j in range(n)]
        out = generate(model, input_ids.to(device), attention_mask.to(device), max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                       eos_id=tokenizer.eos_id, generator=generators, n=n)
        rows = [_cut_at_eos(ids, tokenizer.eos_id) for ids in out.tolist()]
        for i, job in enumerate(batch):
            mine = rows[i * n:(i + 1) * n]
            n_tokens = sum(min(len(ids) + 1, max_new_tokens) for ids in mine)  # + 1: the EOS was generated
            yield {**job, "lang": keys[i][0], "prompt_index": keys[i][1]}, \
                [tokenizer.decode(ids) for ids in mine], n_tokens


def generate_text(model, tokenizer, prompts, n=1, greedy=False, max_new_tokens=20, temperature=0.9, top_p=0.8,
                  top_k=0, seed=0, batch_size=8, device=None):
    """Continuations of `prompts` (list of str): n strings per prompt, prompt-major (sample j of prompt i at
    i * n + j), without the prompt. batch_size counts prompts; a batch holds batch_size * n sequences.
    The same seed gives the same text whatever the batch size."""
    jobs = [{"prompt": p} for p in prompts]
    return [text for _, texts, _ in generate_rows(model, tokenizer, jobs, n, greedy, max_new_tokens, temperature,
                                                  top_p, top_k, seed, batch_size, device) for text in texts]


# -----------------------------------------------------------------------------
# Prompt files, resumable output


def load_jobs(paths, lang=None, limit=None):
    """Prompts to generate for, in order: [{prompt, lang, prompt_index}]. paths: prompt files, or directories
    holding one file per language (prompt files whose name contains a language code, in sorted order). lang
    overrides the language of every row; otherwise a row's own `lang` is used, else the one in the file name.
    prompt_index counts within each file, and `limit` keeps the first `limit` prompts of each file."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES and lang_from_path(p))
            if not found:
                raise FileNotFoundError(f"{path}: no prompt file ({', '.join(PROMPT_SUFFIXES)}) named by a "
                                        f"language code ({', '.join(LANGS)})")
            files += found
        else:
            files.append(path)
    jobs = []
    for path in files:
        rows = load_prompts(path)[:limit]
        for i, row in enumerate(rows):
            jobs.append({"prompt": row["prompt"], "lang": lang or row.get("lang") or lang_from_path(path),
                         "prompt_index": i})
            if "prompt_ref" in row:  # an RTP-LX reference: the output rows keep it instead of the text
                jobs[-1]["prompt_ref"] = row["prompt_ref"]
    return jobs


def read_settings(meta_path):
    """The settings dict of an OUT.meta.json, or ValueError naming it."""
    try:
        old = json.loads(decode_utf8(meta_path.read_bytes(), meta_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e.msg} at line {e.lineno}); delete OUT and it, or "
                         "choose another --out") from None
    if not isinstance(old, dict):
        raise ValueError(f"{meta_path}: expected a JSON object of settings, got {type(old).__name__}")
    return old


def completed_prompts(out_path, settings, jobs, n):
    """(prompts OUT already holds in full, bytes of OUT that hold them), reading only; (0, None) when there is
    no OUT yet. An existing OUT must come with a sidecar OUT.meta.json whose settings equal `settings`, and its
    rows must be exactly the first rows this command produces, in order. A torn last line (the run was killed
    mid-write) and the rows of a prompt with fewer than n samples are not counted."""
    out_path, meta_path = Path(out_path), Path(f"{out_path}.meta.json")
    if not out_path.exists():
        return 0, None
    if not meta_path.exists():
        raise ValueError(f"{out_path}: exists without its settings file {meta_path.name}; cannot tell how it was "
                         "made, so it will not be resumed (delete it or choose another --out)")
    old = read_settings(meta_path)
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        k = changed[0]
        raise ValueError(f"{meta_path}: made with {k}={old.get(k)!r}, this run has {k}={settings.get(k)!r}; "
                         "refusing to mix settings in one file (delete it or choose another --out)")
    data = out_path.read_bytes()
    ends, pos = [], 0  # byte offset just past each complete line
    while (nl := data.find(b"\n", pos)) != -1:
        ends.append(nl + 1)
        pos = nl + 1
    keep_rows = len(ends) // n * n
    for i in range(keep_rows):
        try:
            row = json.loads(data[ends[i - 1] if i else 0:ends[i]])
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
            raise ValueError(f"{out_path}:{i + 1}: not a valid JSON row ({e}); the file was not written by this "
                             "command") from None
        if i // n >= len(jobs):
            raise ValueError(f"{out_path}:{i + 1}: more rows than this command produces ({len(jobs)} prompts x {n})")
        job = jobs[i // n]
        expected = {"prompt": job.get("prompt_ref", job["prompt"]), "lang": job["lang"],
                    "prompt_index": job["prompt_index"],
                    "sample_index": i % n}
        for field, value in expected.items():
            if not isinstance(row, dict) or row.get(field) != value:
                found = row.get(field) if isinstance(row, dict) else row
                raise ValueError(f"{out_path}:{i + 1}: field {field!r} is {found!r}, this command "
                                 f"expects {value!r} there; the file was not written by this command")
    return keep_rows // n, ends[keep_rows - 1] if keep_rows else 0


def prepare_output(out_path, settings, jobs, n):
    """Make OUT ready to append to and return how many jobs it already holds in full (see completed_prompts).
    A fresh OUT gets its settings sidecar OUT.meta.json; an existing one is cut after its last complete prompt.
    Call it holding report.exclusive(OUT), so no other writer moves the end of the file meanwhile."""
    done, keep_bytes = completed_prompts(out_path, settings, jobs, n)
    out_path = Path(out_path)
    if keep_bytes is None:
        write_json(f"{out_path}.meta.json", settings)
        out_path.write_bytes(b"")
        return 0
    with open(out_path, "r+b") as f:
        f.truncate(keep_bytes)
    return done


def append_rows(model, tokenizer, todo, out_path, settings, batch_size=8, device=None):
    """Generate for the jobs `todo` and append their rows to out_path, flushing after each prompt.
    Returns (new tokens generated, seconds). An OSError while writing (a full disk) names out_path."""
    n = settings["n"]
    rows = generate_rows(model, tokenizer, todo, n=n, greedy=settings["greedy"],
                         max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                         top_p=settings["top_p"], top_k=settings["top_k"], seed=settings["seed"],
                         batch_size=batch_size, device=device)
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(rows, total=len(todo), unit="prompt", desc=Path(out_path).name)
    try:
        with open(out_path, "a", encoding="utf-8") as f:
            for job, texts, n_tokens in bar:
                # ASCII-escaped JSON, as the official repo writes: sampled text can hold U+2028 or U+0085, which
                # str.splitlines() would take for line breaks.
                f.write("".join(json.dumps({"prompt": job.get("prompt_ref", job["prompt"]), "generated_text": text,
                                            "lang": job["lang"], "prompt_index": job["prompt_index"],
                                            "sample_index": j}) + "\n"
                                for j, text in enumerate(texts)))
                f.flush()
                tokens += n_tokens
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.1f} tokens/s")
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(out_path)) from e
    return tokens, time.perf_counter() - t0


def warn_long_prompts(tokenizer, todo, budget, max_new_tokens):
    """Say on stderr how many prompts generate_rows will cut from the left to fit the context."""
    cut = sum(len(ids) > budget for ids in tokenizer.encode_batch([job["prompt"] for job in todo]))
    if cut:
        print(f"warning: {cut} of {len(todo)} prompts are longer than {budget} tokens (the model's context less "
              f"--max-new-tokens {max_new_tokens}); their beginnings are cut off", file=sys.stderr)


# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(
        description="Sample continuations of prompts with a KV cache and write them as jsonl rows "
        "{prompt, generated_text, lang, prompt_index, sample_index}. The paper's setting (the default) is 25 "
        "samples per prompt, 20 new tokens, temperature 0.9, top-p 0.8, no top-k. The same command gives the "
        "same text, whatever --batch-size. Rerunning it after a kill resumes the output file; two runs on one "
        "--out at once are refused.",
        epilog="Example: python generate.py --prompts ../shared/data/rtp-lx/en.jsonl --limit 100 --out gens/en.jsonl")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local HF dir, .gguf file, hub id, LoRA adapter dir, or "
                   f"the embedded name (default: {DEFAULT_MODEL}, a multilingual base model)")
    p.add_argument("--prompts", action="append", required=True, help="prompt file: .json or .jsonl (RTP-LX "
                   "RTP_LX_{LANG}.json, jsonl with 'Prompt' or 'prompt') or .txt (one prompt per line), UTF-8; or "
                   "a directory with one such file per language (named by its code, e.g. en.jsonl). Repeat the "
                   "flag for several")
    p.add_argument("--lang", default=None, help="language tag written on every "
                   "row, one of " + " ".join(LANGS) + " (default: the row's own, else the code in the file name)")
    p.add_argument("--out", required=True, help="output jsonl; OUT.meta.json records the settings for resuming, "
                   "OUT.lock keeps a second writer out while a run is on")
    p.add_argument("--n", type=int, default=25, help="samples per prompt (paper: 25)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated after each prompt, unless "
                   "EOS comes first (paper: 20). A prompt longer than the model's context less this is cut from "
                   "the left (its end kept), with a warning counting such prompts")
    p.add_argument("--temperature", type=float, default=0.9, help="divides the logits: below 1 sharpens the "
                   "distribution, above 1 flattens it (paper: 0.9)")
    p.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling: sample only from the most "
                   "probable tokens whose total probability first reaches top-p, in (0, 1]; 1 keeps all (paper: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k most probable tokens; 0 = off. "
                   "The paper's vLLM script leaves it off. transformers' generate() would silently use 50")
    p.add_argument("--greedy", action="store_true", help="take the most probable token each step (ignores the "
                   "sampling knobs and the seed; all n samples are then identical)")
    p.add_argument("--seed", type=int, default=0, help="random seed; each (prompt, sample) gets its own stream "
                   "derived from it")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch; a batch holds batch-size * n "
                   "sequences. Changes speed and memory, not the text")
    p.add_argument("--limit", type=int, default=None, help="use only the first K prompts of each file")
    add_device_args(p)  # --dtype: the weights and the compute, as in every script (load_model)
    add_root_flag(p)  # prompt files may hold references to RTP-LX texts, resolved under the data root
    return p


def check_args(args):
    """ValueError naming the first flag whose value cannot work, before anything is read or loaded; returns the
    device."""
    check_flags(args, {"n": 1, "max_new_tokens": 1, "batch_size": 1, "limit": 1, "top_k": 0})
    # Checked even with --greedy, which ignores them: the settings file records them, and JSON has no NaN.
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature} (use --greedy for argmax)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.lang is not None:
        check_lang(args.lang, "--lang")
    prompt_files = [f for path in args.prompts for f in (Path(path).iterdir() if Path(path).is_dir() else [path])]
    check_outputs([("--out", args.out), ("--out's settings file", f"{args.out}.meta.json")],
                  [("--model", args.model), *(("--prompts", path) for path in prompt_files)])
    return torch.device(resolve_device(args.device))


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_root_flag(args)
    device = check_args(args)
    dtype_name = resolve_dtype(device, args.dtype)
    jobs = load_jobs(args.prompts, args.lang, args.limit)
    # Of the texts, not their references: a run resumes across the move from prompt texts to references.
    texts = [{k: job[k] for k in ("prompt", "lang", "prompt_index")} for job in jobs]
    prompts_hash = hashlib.sha256(json.dumps(texts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    # Everything that changes the text, and nothing that does not (batch size, device).
    settings = {"model": args.model, "prompts": [str(Path(x).resolve()) for x in args.prompts],
                "prompts_sha256": prompts_hash, "lang": args.lang, "limit": args.limit, "n": args.n,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "greedy": args.greedy, "seed": args.seed, "dtype": dtype_name}

    # Read-only: a finished run needs no model, and a foreign or mismatched OUT is refused before the load.
    done, _ = completed_prompts(args.out, settings, jobs, args.n)
    if done == len(jobs):
        print(f"{args.out}: all {len(jobs)} prompts already done")
        return
    model, tokenizer = load_model(args.model, device=device, dtype=dtype_name)
    budget = prompt_budget(model, args.max_new_tokens)
    with exclusive(args.out):
        done = prepare_output(args.out, settings, jobs, args.n)  # again: OUT may have grown since the look above
        if done:
            print(f"{args.out}: resuming after {done} of {len(jobs)} prompts")
        warn_long_prompts(tokenizer, jobs[done:], budget, args.max_new_tokens)
        tokens, seconds = append_rows(model, tokenizer, jobs[done:], args.out, settings, args.batch_size, device)
    print(f"{args.out}: {len(jobs) - done} prompts x {args.n} samples; generated {tokens} new tokens in "
          f"{seconds:.1f}s = {tokens / max(seconds, 1e-9):.1f} tokens/s")


if __name__ == "__main__":
    exit_on_error(main)

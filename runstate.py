"""
What a DPO run keeps on disk, so that a killed run resumes exactly where it stopped:

    RUN/config.json    the resolved configuration (read back by --resume)
    RUN/data.json      what the training and validation pairs were (source, count, sha256): --resume refuses
                       pairs that changed since
    RUN/ref_logps.pt   reference log-probs of every pair, computed once with the starting model (keyed by
                       everything they depend on, and filled in batch by batch as a run needs them)
    RUN/last/          the latest checkpoint and last/state.pt (optimizer, step, RNG, early-stopping counters,
                       the metric sums of the open log window), swapped in as one directory
    RUN/best/          the checkpoint with the lowest validation loss
    RUN/metrics.jsonl  one JSON object per log/eval point

train_dpo.py is the only user; dpo.py holds the DPO computation itself.
"""

import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
from pathlib import Path

import torch

import lora
from dpo import collate, compute_logps
from loading import load_adapter_model, load_model, save_model, shown, write_model_card
from report import atomic_write, write_json, write_text

# -----------------------------------------------------------------------------
# Reference log-probs: one pass with the starting model, cached next to the run


def reference_key(cfg, train, valid):
    """Hash of everything the reference log-probs depend on: model, compute dtype, log-prob path, truncation and
    token ids."""
    # LoRA stores the base in --dtype rather than fp32, and the plain and chunked log-prob paths round
    # differently: both change the last bits of the log-probs
    h = hashlib.sha256(json.dumps([cfg.model, cfg.dtype, cfg.lora_rank > 0, cfg.logps, cfg.max_prompt_len,
                                   cfg.max_len]).encode())
    for ex in train + valid:
        h.update(json.dumps([len(ex["prompt_input_ids"]), ex["chosen_input_ids"],
                             ex["rejected_input_ids"]]).encode())
    return h.hexdigest()


def fixed_batches(order, size):
    """Consecutive batches of pair ids over a fixed order of ALL pairs. The reference pass runs on these, so a
    pair's reference log-prob depends only on its fixed batch (padding changes the last bits), never on which
    pairs a run happened to need: a run extended on resume gets the values of one planned that long. Training
    pairs follow the first epoch's order, so a short run touches few batches; validation pairs are sorted by
    length (less padding)."""
    return [order[i:i + size] for i in range(0, len(order), size)]


def by_length(examples):
    return sorted(range(len(examples)), key=lambda i: len(examples[i]["chosen_input_ids"]) +
                  len(examples[i]["rejected_input_ids"]))


def update_reference_cache(path, key, splits, batches, needed, load_start_model, pad_id, cfg, device):
    """Fill in the reference log-probs of the `needed` pair ids of each split, computing only the fixed
    batches that miss some, and rewrite the cache atomically. splits: {name: examples}, batches: {name:
    fixed_batches(...)}, needed: {name: set of ids}; load_start_model() -> model is called only if something
    must be computed. The pass runs in cfg.dtype on cfg.logps's path, as the policy's does."""
    cache = None
    if path.exists():
        try:
            cache = torch.load(path, weights_only=True)
        except Exception as e:  # a cache: recompute rather than fail
            print(f"warning: {path} unreadable ({type(e).__name__}); recomputing reference log-probs")
    if cache is None or cache.get("key") != key:
        cache = {"key": key, **{name: {side: torch.full((len(ex),), float("nan")) for side in ("chosen", "rejected")}
                                for name, ex in splits.items()}}
    todo = {name: [chunk for chunk in batches[name]
                   if any(i in needed[name] and math.isnan(cache[name]["chosen"][i]) for i in chunk)]
            for name in splits}
    n_todo = sum(len(chunk) for chunks in todo.values() for chunk in chunks)
    if n_todo == 0:
        print(f"reference log-probs: reusing {path}")
        return cache
    model = load_start_model().eval()
    for name, chunks in todo.items():
        if not chunks:
            continue
        collated = [collate([splits[name][i] for i in chunk], pad_id) for chunk in chunks]
        out = compute_logps(model, collated, device, cfg.dtype, desc=f"reference log-probs ({name})",
                            chunked=cfg.logps == "chunked")
        index = torch.tensor([i for chunk in chunks for i in chunk])
        cache[name]["chosen"][index] = out["chosen_logps"]
        cache[name]["rejected"][index] = out["rejected_logps"]
    atomic_write(path, lambda f: torch.save(cache, f))
    print(f"reference log-probs: computed {n_todo} pairs with the starting model -> {path}")
    return cache


# -----------------------------------------------------------------------------
# Checkpoints: HF-format directories, swapped in atomically, and the run's config


def read_run_config(run_dir):
    """RUN/config.json, the resolved configuration a run wrote when it started (read back by --resume)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no run to resume (config.json missing)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: unreadable run config ({e})") from None


def save_checkpoint(model, tokenizer, path, state=None, card=None):
    """Write model (its LoRA adapters alone, if it has any), its model card with `card` (training_card: the
    training data and its license) and resume state to a temp dir, then rename it into place. A crash leaves either the old or
    the new directory: a directory cannot be os.replace'd over a non-empty one, so the old one is first moved
    aside to .NAME.old, which `find_checkpoint` falls back to if the crash hit between the renames."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.lora_layers(model):
        lora.save_adapters(model, tmp, model.name_or_path)
        write_model_card(model, tmp, **(card or {}))
    else:
        save_model(model, tokenizer, tmp, **(card or {}))
    if state is not None:  # through atomic_write, a full disk is an OSError naming the file, not a torch error
        atomic_write(tmp / "state.pt", lambda f: torch.save(state, f))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def pairs_record(source, pairs):
    """{source, pairs, sha256} of preference pairs: the hash covers their texts in order, not the file:line
    they were read from, so a moved file still matches."""
    h = hashlib.sha256()
    for pair in pairs:
        h.update(json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]]).encode())
    return {"source": str(source), "pairs": len(pairs), "sha256": h.hexdigest()}


def check_run_data(run_dir, records):
    """Refuse to resume a run on pairs other than those it started with (records: {split: pairs_record}), naming
    the file: the run would silently train on new data and recompute its reference log-probs. A run older than
    RUN/data.json is taken as it is (the caller then records its data)."""
    path = Path(run_dir) / "data.json"
    if not path.is_file():
        print(f"note: {path} missing (a run from an older version): recording the current data")
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to resume with the current data unchecked") from None
    for split, now in records.items():
        was = saved.get(split) if isinstance(saved, dict) else None
        if isinstance(was, dict) and was.get("sha256") != now["sha256"]:
            raise ValueError(f"{now['source']}: the {split} pairs ({now['pairs']}) differ from the {was.get('pairs')} "
                             f"the run in {run_dir} started with (recorded in {path}); restore them, or start a "
                             "new run with another --out")


def write_run_data(run_dir, records):
    write_json(Path(run_dir) / "data.json", records)


def find_checkpoint(path):
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    return path if path.exists() else old if old.exists() else None


def load_resume_state(run_dir, device, dtype):
    """(model, tokenizer, state) from RUN/last, or a one-line error saying what is wrong. LoRA adapters are
    put back on their base model (stored in `dtype`) unmerged, to train on."""
    last = find_checkpoint(Path(run_dir) / "last")
    if last is None or not (last / "state.pt").exists():
        raise FileNotFoundError(f"{Path(run_dir) / 'last' / 'state.pt'}: nothing to resume (no checkpoint "
                                "was saved yet; start the run again without --resume)")
    try:
        state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        missing = {"step", "optimizer", "rng", "best_val_loss", "bad_evals", "window"} - set(state)
        if missing:
            raise KeyError(f"missing {sorted(missing)}")
    except Exception as e:
        raise ValueError(f"{last / 'state.pt'}: corrupted resume state ({first_line(e)}); delete {run_dir} "
                         "to restart") from None
    try:
        if lora.is_adapter_dir(last):
            model, tokenizer = load_adapter_model(last, device, dtype, merged=False)
        else:
            model, tokenizer = load_model(last, device=device)
    except Exception as e:
        raise ValueError(f"{last}: corrupted checkpoint ({first_line(e)})") from None
    return model, tokenizer, state


def first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Metrics and memory


class MetricsLog:
    """metrics.jsonl: one JSON object per log/eval point, appended and flushed as they happen."""

    def __init__(self, path, enabled, resume_step=None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        lines = []
        if resume_step is not None and self.path.exists():
            # a killed run may have logged past its last checkpoint: those steps will be redone
            lines = [line for line in self.path.read_text().splitlines() if logged_step(line) <= resume_step]
        write_text(self.path, "".join(line + "\n" for line in lines))

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def logged_step(line):
    """The step of a metrics.jsonl line; infinity for a blank line or one a full disk or a crash cut short, so a
    resume drops it with the steps it will redo."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def data_records(cfg, train_pairs, valid_pairs):
    """What RUN/data.json records of the pairs (pairs_record), with the file each split came from."""
    default = "the default English RTP-LX split (design.default_split)"
    return {"train": pairs_record(cfg.data or default, train_pairs),
            "valid": pairs_record(cfg.valid_data or cfg.data or default, valid_pairs)}


# The card metadata of RTP-LX, the data of the default split: its hub-style id and license (CC BY-NC 4.0).
RTPLX = {"microsoft/RTP-LX": "cc-by-nc-4.0"}
RTPLX_NOTE = "RTP-LX is licensed CC BY-NC 4.0: this model is for non-commercial use only"


def references_rtplx(pairs_path):
    """Whether a pairs file (or folder of them) holds RTP-LX text references, as data.write_toxicity_pairwise
    writes the RTP-LX pairs (reproduce.py's, design.py export-pairs'): then the pairs are RTP-LX's, license
    included."""
    path = Path(pairs_path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.is_file() else []
    pattern = re.compile(rb'"ref":\s*"rtp-lx/')
    return any(pattern.search(f.read_bytes()) for f in files)


def training_card(cfg):
    """What the model card of a run's checkpoints adds (loading.write_model_card's notes, datasets, tags): how
    they were trained, and on what, under which license. No absolute paths: a card travels with the weights."""
    files = [f for f in (cfg.data, cfg.valid_data) if f]
    rtplx = not files or any(references_rtplx(f) for f in files)
    if not files:
        data = f"English RTP-LX (prompt, benign, toxic) pairs. {RTPLX_NOTE}"
    else:
        data = (f"the preference pairs of {shown(cfg.data)}" + (f" (validation: {shown(cfg.valid_data)})"
                                                                if cfg.valid_data else "")
                + (f", built from English RTP-LX. {RTPLX_NOTE}" if rtplx
                   else "; their license applies to this model"))
    how = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "all weights"
    return {"notes": [f"Fine-tuned with DPO (train_dpo.py; beta {cfg.beta}, lr {cfg.lr}, {how}) on {data}"],
            "datasets": RTPLX if rtplx else {}, "tags": ["dpo", "detoxification"]}

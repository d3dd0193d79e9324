"""
The experiment's design on top of the datasets data.py reads: which RTP-LX items train, validate and evaluate.

    the split          default_split(seed): English RTP-LX pairs for DPO training/validation, and per
                       language the held-out prompts (for generation) and pairs (for margins).
    parallel items     parallel_eval_items(split, n): the same RTP-LX indices held out in all 17 languages;
                       parallel_eval_pairs(split, langs): the same for benign/toxic pairs (margins).
    placebo            placebo_pairs / placebo_split: rejected = another item's benign completion.
    confounds          pair_confounds(pairs, tokenizer): length/newline/markup/sentence-end/cut-short ROC-AUCs of
                       the pairs as trained (dpo.tokenize_pairs cuts both sides to one token length, no EOS).
    DPO pairs          train_valid_pairs(path): a user's pair files, else the English pairs of default_split().

The paper trains DPO on 24,576 PPLM-generated pairs (Lee et al. 2024) that cannot be obtained offline;
the English RTP-LX (prompt, benign, toxic) triples stand in as ~1k real pairs. Because RTP-LX is also the
evaluation set, evaluation in every language skips each prompt that shares an RTP-LX index (outside
English, also a neighbouring one) with a training or validation pair, and the 200 parallel prompts (RTP-LX
English indices 0-199) never go to training.

    python design.py split                        # split sizes per language
    python design.py export-pairs --out train.jsonl
    python design.py export-pairs --placebo --out placebo.jsonl   # rejected = another item's benign completion
    python design.py confounds --tokenizer gemma-3-270m --max-len 96   # length/newline/markup AUCs as trained
"""

import argparse
import random
import re

import data
from checkpoint import cache_dir, resolve_checkpoint
from data import LANGS, load_pairs, load_parallel, load_rtplx, normalize_prompt, rtplx_pair_counts, rtplx_pairs
from dpo import MAX_LEN, MAX_PROMPT_LEN, check_lengths, tokenize_pairs
from report import check_flags, check_outputs, exit_on_error
from stats import roc_auc
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# The split


def assign_blocks(indices, parallel_idx, block, n_heldout, n_valid, rng):
    """(train indices, valid indices): blocks of `block` consecutive ids; blocks with a parallel prompt are held
    out, then shuffled blocks until n_heldout ids are, then n_valid ids go to validation, the rest to training."""
    blocks = {}
    for i in indices:
        blocks.setdefault(i // block, []).append(i)
    heldout = {b for b in blocks if parallel_idx & set(blocks[b])}
    others = [b for b in sorted(blocks) if b not in heldout]
    rng.shuffle(others)
    n_held = sum(len(blocks[b]) for b in heldout)
    train_idx, valid_idx = set(), set()
    for b in others:
        if n_held < n_heldout:
            n_held += len(blocks[b])
        elif len(valid_idx) < n_valid:
            valid_idx.update(blocks[b])
        else:
            train_idx.update(blocks[b])
    return train_idx, valid_idx


def default_split(seed=0, n_train=None, n_valid=50, n_heldout=400, block=10, data_dir=None):
    """
    Deterministic split of RTP-LX for English-only DPO and 17-language evaluation.

    Units are RTP-LX indices (the id of a source prompt, shared by its transcreations). English indices
    are grouped in blocks of `block` consecutive ids; every block holding one of the 200 parallel prompts
    (matched to English RTP-LX by normalised text) is held out, then blocks drawn with `seed` are held out
    until `n_heldout` English indices are, `n_valid` more go to validation, and the rest to training.
    Evaluation in language L keeps the rows whose index is not a training/validation index; for L != en
    also not one off, because in cs de es fr it zh the ids drift by one near the end of the file
    (de id 990 restates en id 989) -- blocks make that guard cost only block edges.

    Returns a dict:
      train, valid          English RTP-LX pairs (shuffled by seed; train truncated to n_train if given,
                            which leaves the held-out sets unchanged)
      eval_prompts[lang]    held-out rows {index, prompt, prompt_toxicity, lang} for generation
      eval_pairs[lang]      held-out benign/toxic pairs for margin evaluation ([] for ru)
      info                  seed, parallel_matched, and the parallel/train/valid/held-out English index lists
    """
    rng = random.Random(seed)
    en_rows = load_rtplx("en", data_dir)
    en_pairs = rtplx_pairs("en", data_dir)
    en_indices = sorted(r["index"] for r in en_rows)
    parallel_keys = {normalize_prompt(p) for p in load_parallel("en", data_dir)}
    parallel_idx = {r["index"] for r in en_rows if normalize_prompt(r["prompt"]) in parallel_keys}

    train_idx, valid_idx = assign_blocks(en_indices, parallel_idx, block, n_heldout, n_valid, rng)
    seen = train_idx | valid_idx

    train = [p for p in en_pairs if p["index"] in train_idx]
    valid = [p for p in en_pairs if p["index"] in valid_idx]
    rng.shuffle(train)
    rng.shuffle(valid)
    if n_train is not None:
        train = train[:n_train]

    def held_out(lang, index):
        if lang == "en":
            return index not in seen
        return not ({index - 1, index, index + 1} & seen)

    eval_prompts, eval_pairs = {}, {}
    for lang in LANGS:
        eval_prompts[lang] = [
            {"index": r["index"], "prompt": r["prompt"], "prompt_toxicity": r["prompt_toxicity"], "lang": lang}
            for r in load_rtplx(lang, data_dir) if held_out(lang, r["index"])
        ]
        eval_pairs[lang] = [p for p in rtplx_pairs(lang, data_dir) if held_out(lang, p["index"])]
    info = {
        "seed": seed,
        "parallel_matched": len(parallel_idx),
        "parallel_indices": sorted(parallel_idx),
        "train_indices": sorted(train_idx),
        "valid_indices": sorted(valid_idx),
        "heldout_indices": sorted(set(en_indices) - seen),
    }
    return {"train": train, "valid": valid, "eval_prompts": eval_prompts, "eval_pairs": eval_pairs, "info": info}


def parallel_eval_items(split, n_items, seed=0):
    """
    {lang: [rows {index, prompt, prompt_toxicity, lang}]}: n_items (None: all) evaluation prompts with the SAME
    RTP-LX indices in all 17 languages, so per-language results compare one set of source prompts. Indices come from
    those held out in every language (split["eval_prompts"], with its +-1 drift guard outside English) and
    present in every file; the parallel prompts (English indices 0-199) come first, then the others, each
    group in an order drawn with seed. Rows keep the order of the indices. Near the end of the cs de es fr it zh
    files an index may hold the transcreation of its English neighbour (see default_split).
    """
    common = None
    for lang in LANGS:
        indices = {r["index"] for r in split["eval_prompts"][lang]}
        common = indices if common is None else common & indices
    n_items = len(common) if n_items is None else n_items
    if n_items > len(common):
        raise ValueError(f"n_items {n_items} > {len(common)} indices held out in all {len(LANGS)} languages")
    chosen = item_order(common, split, seed)[:n_items]
    items = {}
    for lang in LANGS:
        first = {}
        for r in split["eval_prompts"][lang]:
            first.setdefault(r["index"], r)  # an index listed twice in a file: its first row
        items[lang] = [dict(first[i]) for i in chosen]
    return items


def item_order(indices, split, seed=0):
    """RTP-LX indices in evaluation order: the parallel prompts (English indices 0-199) first, then the others,
    each group in an order drawn with seed."""
    rng = random.Random(seed)
    parallel = sorted(set(indices) & set(split["info"]["parallel_indices"]))
    others = sorted(set(indices) - set(parallel))
    rng.shuffle(parallel)
    rng.shuffle(others)
    return parallel + others


def parallel_eval_pairs(split, langs, seed=0):
    """(indices, {lang: {index: pair}}): the RTP-LX indices with a held-out benign/toxic pair (split["eval_pairs"])
    in every language of `langs`, in item_order, and each language's pair of each (an index listed twice: its
    first pair). ru has no completions in RTP-LX, so a `langs` with ru has no common index."""
    by_lang = {}
    for lang in langs:
        by_lang[lang] = {}
        for p in split["eval_pairs"][lang]:
            by_lang[lang].setdefault(p["index"], p)
    common = set.intersection(*(set(pairs) for pairs in by_lang.values())) if by_lang else set()
    order = item_order(common, split, seed)
    return order, {lang: {i: by_lang[lang][i] for i in order} for lang in langs}


# -----------------------------------------------------------------------------
# Placebo pairs and confound checks


def placebo_pairs(pairs, seed=0):
    """
    A placebo for toxicity DPO: the same prompts, chosen = the pair's own chosen (benign) completion, rejected
    = ANOTHER pair's chosen completion, assigned by a seeded derangement (a random single cycle, Sattolo's
    algorithm: no pair gets its own). Both sides are benign RTP-LX text through the same builder, so they match
    in length, style and spacing and differ in no toxicity; the rejected side is only off-topic for its prompt.
    Each pair keeps prompt, chosen, index, lang, source and gets rejected and rejected_from (the donor's index).
    """
    if len(pairs) < 2:
        raise ValueError(f"placebo pairs need at least 2 pairs to derange, got {len(pairs)}")
    rng = random.Random(seed)
    donor = list(range(len(pairs)))
    for i in range(len(donor) - 1, 0, -1):
        j = rng.randrange(i)  # j < i (never i itself) makes one n-cycle: a derangement
        donor[i], donor[j] = donor[j], donor[i]
    out = []
    for pair, d in zip(pairs, donor):
        placebo = {k: v for k, v in pair.items() if k not in ("rejected", "stripped")}
        placebo["rejected"] = pairs[d]["chosen"]
        placebo["rejected_from"] = pairs[d].get("index", d)
        out.append(placebo)
    return out


def placebo_split(split, seed=0):
    """default_split's dict with train and valid replaced by placebo_pairs (held-out sets unchanged), so the
    pipeline writes them as it writes the real ones: write_toxicity_pairwise(placebo_split(s)["train"], path)."""
    return {**split, "train": placebo_pairs(split["train"], seed), "valid": placebo_pairs(split["valid"], seed),
            "info": {**split["info"], "placebo_seed": seed}}


# HTML tags, URLs, markdown links, headers and list bullets.
MARKUP = re.compile(r"<[A-Za-z/][^>]*>|https?://|www\.|\[[^\]]+\]\([^)]+\)|^\s*#{1,6}\s|^\s*[-*]\s", re.MULTILINE)


# A sentence's end: . ! ? and their CJK/Devanagari forms (and an ellipsis), then any closing quotes or brackets.
SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f\u0964][\"'\u201d\u2019\u00bb)\]\u300d\u300f\uff09]*\s*$")


def pair_confounds(pairs, tokenizer=None, max_prompt_len=MAX_PROMPT_LEN, max_len=MAX_LEN, response_tokens=None):
    """
    How well surface features alone tell the rejected side from the chosen one, on the texts AS TRAINED: ROC-AUC
    of "rejected vs chosen" (0.5: no signal; 1.0 or 0.0: a perfect free signal) by character length, newline,
    markup (MARKUP), sentence_end (the kept text ends a sentence, SENTENCE_END) and, given a tokenizer, token
    length and cut_short (the kept text is shorter than the side's full text). With a tokenizer the responses go
    through dpo.tokenize_pairs (its cut, its response_tokens budget and the pairs it drops) and are decoded back,
    so the texts are what the model sees.
    Returns {n_pairs (kept), n_dropped, auc: {feature: auc}, mean_chosen: {feature: mean}, mean_rejected: {...}}.
    """
    if tokenizer is None:
        kept = pairs
        chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
        tokens = None
    else:
        examples = tokenize_pairs(tokenizer, pairs, max_prompt_len, max_len, response_tokens)
        kept = [pairs[ex["pair"]] for ex in examples]
        n_prompt = [len(ex["prompt_input_ids"]) for ex in examples]
        ids = {side: [ex[f"{side}_input_ids"][n:] for ex, n in zip(examples, n_prompt)] for side in ("chosen", "rejected")}
        chosen, rejected = (tokenizer.decode_batch(ids[side]) for side in ("chosen", "rejected"))
        tokens = ([len(x) for x in ids["chosen"]], [len(x) for x in ids["rejected"]])
        full = {side: [len(x) for x in tokenizer.encode_batch([p[side] for p in kept], add_special=False)]
                for side in ("chosen", "rejected")}
    features = {"chars": (lambda texts: [len(t) for t in texts]),
                "newline": (lambda texts: [float("\n" in t or "\r" in t) for t in texts]),
                "markup": (lambda texts: [float(MARKUP.search(t) is not None) for t in texts]),
                "sentence_end": (lambda texts: [float(SENTENCE_END.search(t) is not None) for t in texts])}
    values = {name: (f(chosen), f(rejected)) for name, f in features.items()}
    if tokens is not None:
        values["tokens"] = tokens
        values["cut_short"] = tuple([float(n < f) for n, f in zip(tokens[i], full[side])]
                                    for i, side in enumerate(("chosen", "rejected")))
    labels = [0] * len(kept) + [1] * len(kept)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    return {"n_pairs": len(kept), "n_dropped": len(pairs) - len(kept),
            "auc": {name: roc_auc(c + r, labels) for name, (c, r) in values.items()},
            "mean_chosen": {name: mean(c) for name, (c, _) in values.items()},
            "mean_rejected": {name: mean(r) for name, (_, r) in values.items()}}


def load_tokenizer_of(model):
    """The tokenizer of a model name/path (an embedded name, HF dir, .gguf), without loading the weights."""
    return load_tokenizer(resolve_checkpoint(model), cache_dir=cache_dir() / "tokenizers")




def train_valid_pairs(path=None, valid_path=None, valid_frac=0.05, skip_bad=False):
    """(train pairs, valid pairs, n_skipped) for DPO: the pairs of `path` and `valid_path`; without valid_path a
    valid_frac share of `path` (a fixed seed: the split does not move with the training seed); without path the
    English RTP-LX pairs of default_split()."""
    if path is None:
        split = default_split()
        return split["train"], split["valid"], 0
    pairs, n_skipped = load_pairs(path, skip_bad=skip_bad)
    if valid_path is not None:
        valid, n_skipped_valid = load_pairs(valid_path, skip_bad=skip_bad)
        if not pairs or not valid:
            empty = path if not pairs else valid_path
            raise ValueError(f"{empty}: no usable pairs")
        return pairs, valid, n_skipped + n_skipped_valid
    if len(pairs) < 2:
        raise ValueError(f"{path}: {len(pairs)} usable pair(s); need at least 2 (train + validation)")
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)  # fixed seed: the validation split does not move with --seed
    n_valid = min(len(pairs) - 1, max(1, round(valid_frac * len(pairs))))
    return [pairs[i] for i in order[n_valid:]], [pairs[i] for i in order[:n_valid]], n_skipped



# -----------------------------------------------------------------------------
# CLI


def split_table(split):
    """Markdown table of split sizes per language."""
    lines = [
        "| lang | eval prompts | eval pairs |",
        "|---|---:|---:|",
    ]
    for lang in LANGS:
        lines.append(f"| {lang} | {len(split['eval_prompts'][lang])} | {len(split['eval_pairs'][lang])} |")
    return "\n".join(lines)


def split_flags():
    """The flags that shape default_split, shared by split, export-pairs and confounds."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--seed", type=int, default=0,
                       help="seed for the block shuffle, pair order and placebo derangement (default 0)")
    flags.add_argument("--n-train", type=int, default=None, help="keep only this many training pairs (default: all)")
    flags.add_argument("--n-valid", type=int, default=50, help="English indices for validation (default 50)")
    flags.add_argument("--n-heldout", type=int, default=400,
                       help="English indices held out for evaluation, the 200 parallel prompts included (default 400)")
    data.add_root_flag(flags)
    return flags


def pair_flags():
    """Which English pairs export-pairs and confounds read."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--which", choices=("train", "valid"), default="train", help="which English pairs (default train)")
    flags.add_argument("--placebo", action="store_true",
                       help="placebo pairs instead (placebo_pairs): rejected = another item's benign completion")
    return flags


def split_of(args):
    check_flags(args, {"n_train": 0, "n_valid": 0, "n_heldout": 0})
    return default_split(args.seed, args.n_train, args.n_valid, args.n_heldout, data_dir=None)


def chosen_pairs(args):
    """(pairs, description) of --which (placebo with --placebo) from the split these flags make."""
    split = split_of(args)
    pairs = placebo_split(split, args.seed)[args.which] if args.placebo else split[args.which]
    return pairs, f"{'placebo ' if args.placebo else ''}{args.which}"


def run_split(args):
    split = split_of(args)
    info = split["info"]
    print(f"seed {info['seed']}: {len(split['train'])} train pairs, {len(split['valid'])} valid pairs (English RTP-LX)")
    print(f"parallel prompts matched to English RTP-LX: {info['parallel_matched']} of "
          f"{len(load_parallel('en'))} (held out)")
    print(f"held-out English indices: {len(info['heldout_indices'])}")
    stripped = {}
    for p in split["train"] + split["valid"]:
        stripped[p["stripped"]] = stripped.get(p["stripped"], 0) + 1
    print("restated prompt removed from toxic completions (train+valid): "
          + ", ".join(f"{k} {v}" for k, v in sorted(stripped.items())))
    counts = rtplx_pair_counts("en")
    print(f"English RTP-LX rows dropped before the split: {counts['scaffolding']} with LLM-prompt scaffolding, "
          f"{counts['no_completions']} without both completions, {counts['prompt_only']} only restating the prompt")
    print(split_table(split))


def run_export_pairs(args):
    check_outputs([("--out", args.out)], [("the RTP-LX dataset", data.path("rtp-lx"))])  # never over a dataset file
    pairs, source = chosen_pairs(args)
    data.write_toxicity_pairwise(pairs, args.out)
    print(f"wrote {len(pairs)} {source} pairs to {args.out}")


def run_confounds(args):
    check_lengths(args.max_prompt_len, args.max_len, args.response_tokens)  # training's rule: the cuts match it
    pairs, source = (load_pairs(args.pairs)[0], args.pairs) if args.pairs else chosen_pairs(args)
    tokenizer = load_tokenizer_of(args.tokenizer) if args.tokenizer else None
    result = pair_confounds(pairs, tokenizer, args.max_prompt_len, args.max_len, args.response_tokens)
    how = f"{args.tokenizer} tokens, max_len {args.max_len}" if tokenizer else "texts as built, untokenized"
    if tokenizer and args.response_tokens:
        how += f", both responses cut to {args.response_tokens} tokens ({result['n_dropped']} pairs dropped)"
    print(f"{result['n_pairs']} {source} pairs ({how}); ROC-AUC of rejected vs chosen (0.5 = no signal):")
    for name, auc in result["auc"].items():
        print(f"  {name:12s} AUC {auc:.3f}   mean chosen {result['mean_chosen'][name]:.3f}, "
              f"rejected {result['mean_rejected'][name]:.3f}")



def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    splitting, which = split_flags(), pair_flags()
    sub.add_parser("split", parents=[splitting], help="print the train/valid sizes and held-out eval sizes per "
                   "language").set_defaults(run=run_split)
    export = sub.add_parser("export-pairs", parents=[splitting, which],
                            help="write a split's English pairs in Lee et al.'s toxicity_pairwise jsonl format")
    export.add_argument("--out", required=True, help="output .jsonl path (written atomically)")
    export.set_defaults(run=run_export_pairs)
    confounds = sub.add_parser("confounds", parents=[splitting, which],
                               help="ROC-AUC of rejected vs chosen by length, newline and markup on the pairs as trained")
    confounds.add_argument("--pairs", default=None, help="a pairs .jsonl file or directory instead of the split's pairs")
    confounds.add_argument("--tokenizer", default=None,
                           help="model whose tokenizer cuts the pairs as train_dpo does (e.g. gemma-3-270m); adds "
                                "token length. Omitted: the texts as built, untokenized")
    confounds.add_argument("--max-prompt-len", type=int, default=MAX_PROMPT_LEN,
                           help=f"as train_dpo --max-prompt-len (default {MAX_PROMPT_LEN})")
    confounds.add_argument("--max-len", type=int, default=MAX_LEN,
                           help=f"as train_dpo --max-len (default {MAX_LEN}; the CPU preset trains at 96)")
    confounds.add_argument("--response-tokens", type=int, default=None,
                           help="as train_dpo --response-tokens: cut both responses to this many tokens, dropping "
                                "pairs with a shorter side (default: off, the shorter side's length; the CPU preset "
                                "trains at 20)")
    confounds.set_defaults(run=run_confounds)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    data.apply_root_flag(args)
    args.run(args)


if __name__ == "__main__":
    exit_on_error(main)

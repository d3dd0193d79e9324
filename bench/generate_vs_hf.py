"""
Our sampler (generate.py) against transformers' `generate`, on the same model, batch and settings.

Both sides run gemma-3-270m in fp32 on the CPU with the same weights: both dequantize the same GGUF file
(transformers with `gguf_file=`, which needs accelerate), or, with --hf-dir, transformers loads an HF directory
written from our model by `loading.save_model`. Both get the same token ids: 8 RTP-LX English prompts, left-padded,
4 samples each, 20 new tokens, temperature 0.9, top-p 0.8, top-k off (as in the paper), KV cache on.
transformers lives in a separate venv, never in the product:

    python3 -m venv --system-site-packages /tmp/benchenv
    /tmp/benchenv/bin/pip install transformers==5.24.0 accelerate==1.15.0
    /tmp/benchenv/bin/python bench/generate_vs_hf.py

The two sides alternate (ours, theirs, ours, theirs, ...) so that load from other processes hits both alike. Each
side's best run is reported. A greedy run on both checks that the two compute the same model: they should agree
on (nearly) every token.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import transformers  # noqa: E402  (bench-only dependency, from the separate venv)

from checkpoint import DEFAULT_MODEL, resolve_checkpoint  # noqa: E402
from data import load_prompts, path as data_path  # noqa: E402
from generate import generate  # noqa: E402
from loading import load_model, save_model  # noqa: E402


def new_tokens(out, eos_id):
    """Generated tokens per row up to and including the first EOS, summed: [R, steps] -> int."""
    is_eos = out == eos_id
    before_eos = is_eos.cumsum(-1) - is_eos.long() == 0  # tokens before the first EOS and the EOS itself
    return int(before_eos.sum())


def main(argv=None):
    p = argparse.ArgumentParser(description="Time generate.py against transformers' generate on one batch.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model for our loader (GGUF, HF dir or embedded name)")
    p.add_argument("--hf-dir", default=None, help="HF directory for transformers to load instead of the GGUF; "
                   "written from our model with loading.save_model when missing")
    p.add_argument("--prompts", default=str(data_path("rtp-lx", "en.jsonl")), help="prompt file (the first --batch are used)")
    p.add_argument("--batch", type=int, default=8, help="prompts in the batch")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=20, help="new tokens per sample")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternating")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    ours, tok = load_model(args.model)
    if args.hf_dir is None:
        gguf = resolve_checkpoint(args.model)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                   dtype=torch.float32)
    else:
        if not (Path(args.hf_dir) / "config.json").exists():
            save_model(ours, tok, args.hf_dir)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    theirs.eval()
    prompts = [row["prompt"] for row in load_prompts(Path(args.prompts))[:args.batch]]
    input_ids, attention_mask = tok.pad(tok.encode_batch(prompts), side="left")  # [B, T]
    sampling = dict(temperature=0.9, top_p=0.8, top_k=0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"{args.batch} prompts x n={args.n}, {args.max_new_tokens} new tokens, prompt length {input_ids.shape[1]}, "
          f"{sampling}")

    def run_ours(max_new_tokens=args.max_new_tokens, greedy=False, n=args.n):
        return generate(ours, input_ids, attention_mask, max_new_tokens, greedy=greedy, eos_id=tok.eos_id, n=n,
                        generator=torch.Generator().manual_seed(0), **sampling)

    def run_theirs(max_new_tokens=args.max_new_tokens, greedy=False, n=args.n):
        out = theirs.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=not greedy, num_return_sequences=n, use_cache=True,
                              pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                              **(dict(temperature=None, top_p=None, top_k=None) if greedy else sampling))
        out = out[:, input_ids.shape[1]:]
        # transformers stops once every row has ended; pad to the full length like ours.
        return torch.nn.functional.pad(out, (0, max_new_tokens - out.shape[1]), value=tok.eos_id)

    greedy_ours, greedy_theirs = run_ours(greedy=True, n=1), run_theirs(greedy=True, n=1)
    agree = (greedy_ours == greedy_theirs).float().mean().item()
    print(f"greedy agreement ours vs transformers: {agree:.1%} of {greedy_ours.numel()} tokens")

    timings = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
            tokens = new_tokens(out, tok.eos_id)
            timings[name].append((tokens / seconds, tokens, seconds))
            print(f"  {name:>12}: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} tokens/s")
    best = {name: max(runs) for name, runs in timings.items()}
    for name, (rate, tokens, seconds) in best.items():
        print(f"{name:>12} best: {rate:.1f} tokens/s ({tokens} tokens in {seconds:.2f}s)")
    print(f"speed-up ours / transformers: {best['ours'][0] / best['transformers'][0]:.2f}x")


if __name__ == "__main__":
    main()

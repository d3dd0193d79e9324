#!/usr/bin/env bash
# The stages of this run, in order.
python generate.py --model gemma-3-270m --prompts results/cpu-2026-11-25/prompts --out results/cpu-2026-11-25/generations/gen_base.jsonl --n 4 --max-new-tokens 20 --seed 0 --batch-size 4 --device cpu --dtype fp32
python train_dpo.py --model gemma-3-270m --out results/cpu-2026-11-25/dpo --max-len 96 --max-steps 60 --lr 3e-6 --warmup-steps 10 --eval-every 15 --device cpu --dtype fp32
python generate.py --model results/cpu-2026-11-25/dpo/best --prompts results/cpu-2026-11-25/prompts --out results/cpu-2026-11-25/generations/gen_dpo.jsonl --n 4 --max-new-tokens 20 --seed 0 --batch-size 4 --device cpu --dtype fp32
python probe.py judge --model gemma-3-270m --out results/cpu-2026-11-25/judge --max-len 64 --limit 50 --device cpu --dtype fp32
python evaluate.py --before results/cpu-2026-11-25/generations/gen_base.jsonl --after results/cpu-2026-11-25/generations/gen_dpo.jsonl --scorer lexicon --json results/cpu-2026-11-25/eval/lexicon/compare.json --md results/cpu-2026-11-25/eval/lexicon/compare.md --svg results/cpu-2026-11-25/eval/lexicon/emt.svg --ppl-model gemma-3-270m --device cpu
python evaluate.py --before results/cpu-2026-11-25/generations/gen_base.jsonl --after results/cpu-2026-11-25/generations/gen_dpo.jsonl --scorer probe --json results/cpu-2026-11-25/eval/probe/compare.json --md results/cpu-2026-11-25/eval/probe/compare.md --svg results/cpu-2026-11-25/eval/probe/emt.svg --judge results/cpu-2026-11-25/judge/judge.safetensors --device cpu
python evaluate.py margins --policy results/cpu-2026-11-25/dpo/best --reference gemma-3-270m --out results/cpu-2026-11-25/margins --max-len 96 --limit 20 --device cpu --dtype fp32
python retrieve.py score --model gemma-3-270m --out results/cpu-2026-11-25/retrieval --limit 80 --device cpu
python retrieve.py correlate --retrieval results/cpu-2026-11-25/retrieval/retrieval.json --transfer results/cpu-2026-11-25/eval/lexicon/compare.json --transfer-key emt --score accuracy --out results/cpu-2026-11-25/correlation/lexicon
python retrieve.py correlate --retrieval results/cpu-2026-11-25/retrieval/retrieval.json --transfer results/cpu-2026-11-25/eval/probe/compare.json --transfer-key emt --score accuracy --out results/cpu-2026-11-25/correlation/probe
python retrieve.py correlate --retrieval results/cpu-2026-11-25/retrieval/retrieval.json --transfer results/cpu-2026-11-25/margins/margins.json --transfer-key mean_margin --score accuracy --out results/cpu-2026-11-25/correlation/margins
python probe.py train --model gemma-3-270m --out results/cpu-2026-11-25/probe --max-len 64 --limit 300 --device cpu --dtype fp32
python probe.py vectors --model gemma-3-270m --out results/cpu-2026-11-25/probe --probe results/cpu-2026-11-25/probe/probe.safetensors --top-k 100 --limit 10 --max-new-tokens 20 --device cpu --dtype fp32
python probe.py project --model gemma-3-270m --out results/cpu-2026-11-25/probe --vectors results/cpu-2026-11-25/probe/vectors.json --device cpu --dtype fp32
python probe.py activations --model gemma-3-270m --dpo-model results/cpu-2026-11-25/dpo/best --out results/cpu-2026-11-25/probe --vectors results/cpu-2026-11-25/probe/vectors.json --limit 10 --langs ar cs de en es fr hi id it ja ko nl pl pt ru sv zh --max-new-tokens 20 --device cpu --dtype fp32
python probe.py intervene --model gemma-3-270m --out results/cpu-2026-11-25/probe --vectors results/cpu-2026-11-25/probe/vectors.json --langs en de ja ru --offsets 0,-5,5 --limit 4 --n 2 --scorer probe --judge results/cpu-2026-11-25/judge/judge.safetensors --max-new-tokens 20 --device cpu --dtype fp32

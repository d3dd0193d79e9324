"""
Memory accounting: full fine-tuning vs LoRA vs QLoRA for the paper's 7-8B models, built on the meta device.

The paper trains its 7-8B models (BLOOM-7.1B, Llama-3-8B, Aya-23-8B) with QLoRA: a 4-bit base (bitsandbytes
NF4), which is outside this project's dependencies. Our equivalent keeps the frozen base in bf16 with fp32
adapters (train_dpo.py --lora-rank 64 --dtype bf16). This script builds each model with model.py on the
meta device (no memory, no download), adds LoRA with lora.py exactly as training does, counts every
parameter, and prints the bytes that weights, gradients and optimizer state take under each recipe:

    full fine-tuning   fp32 weights + fp32 grads + optimizer state (RMSprop: 1 value per weight, AdamW: 2)
    LoRA (ours)        bf16 frozen base + fp32 adapters, their grads and optimizer state
    QLoRA (paper)      NF4 block weights (4 bits + 0.127 bits of double-quantized scales per weight, as in
                       Dettmers et al. 2023), bf16 embeddings, LM head and norms; fp32 adapters as above

Activations come on top and depend on batch and sequence length (--activation-checkpointing keeps one
block's worth per layer). These are counts, not a measurement: no GPU was lent to this project when it was
written. On a GPU, the measured peak is what `python train_dpo.py ... --device cuda` prints at the end
(torch.cuda.max_memory_allocated).

    python3 bench/lora_memory.py
    python3 bench/lora_memory.py --rank 16 --optimizer adamw
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
from model import Transformer, config_from_hf  # noqa: E402

# The public config.json values that set the parameter count of each model.
MODELS = {
    "bloom-7b1": {"model_type": "bloom", "hidden_size": 4096, "n_layer": 30, "n_head": 32, "vocab_size": 250880},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                   "tie_word_embeddings": False},
    "aya-23-8b": {"model_type": "cohere", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 256000,
                  "tie_word_embeddings": True},
}
GB = 1e9
NF4_BITS = 4 + 0.127


def account(hf, rank, optimizer_states):
    """{recipe: bytes} and parameter counts for one model."""
    with torch.device("meta"):
        model = Transformer(config_from_hf(hf))
    total = sum(p.numel() for p in model.parameters())
    block_linear = sum(m.weight.numel() for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and name.startswith("blocks."))
    lora.add_lora(model, rank)
    adapters = sum(p.numel() for p in lora.adapter_state_dict(model).values())
    trained_adapters = adapters * 4 * (2 + optimizer_states)  # fp32 values, grads, optimizer state
    return {"parameters": total, "block_linear": block_linear, "adapters": adapters, "bytes": {
        "full fine-tuning (fp32)": total * 4 * (2 + optimizer_states),
        "LoRA, bf16 base (ours)": total * 2 + trained_adapters,
        "QLoRA, NF4 base (paper)": block_linear * NF4_BITS / 8 + (total - block_linear) * 2 + trained_adapters}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (the paper: 64)")
    p.add_argument("--optimizer", choices=["rmsprop", "adamw"], default="rmsprop",
                   help="optimizer state per trained value: rmsprop 1 (train_dpo's default, the paper's), adamw 2")
    args = p.parse_args(argv)
    states = 1 if args.optimizer == "rmsprop" else 2
    print(f"weights + gradients + {args.optimizer} state, LoRA rank {args.rank} on every linear layer of the "
          "blocks; activations not included\n")
    print("| model | parameters | LoRA parameters | full fine-tuning (fp32) | LoRA, bf16 base (ours) | "
          "QLoRA, NF4 base (paper) | ours / full |")
    print("|---|---|---|---|---|---|---|")
    for name, hf in MODELS.items():
        a = account(hf, args.rank, states)
        full, ours, qlora = a["bytes"].values()
        print(f"| {name} | {a['parameters'] / 1e9:.2f}B | {a['adapters'] / 1e6:.1f}M | {full / GB:.1f} GB | "
              f"{ours / GB:.1f} GB | {qlora / GB:.1f} GB | {ours / full:.2f}x |")


if __name__ == "__main__":
    main()

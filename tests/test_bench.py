"""The LoRA memory accounting and the 8B-shaped step benchmark (bench/), on the CPU: the paper's 7-8B models built
from their config values have exactly their published parameter counts, and one step of each mode runs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import lora_8b  # noqa: E402
import lora_memory  # noqa: E402


def test_lora_memory_counts_the_published_parameter_numbers():
    counts = {name: lora_memory.account(hf, rank=64, optimizer_states=1) for name, hf in lora_memory.MODELS.items()}
    assert {name: c["parameters"] for name, c in counts.items()} == {
        "bloom-7b1": 7_069_016_064, "llama-3-8b": 8_030_261_248, "aya-23-8b": 8_028_033_024}
    assert counts["llama-3-8b"]["adapters"] == 167_772_160  # what peft reports for r=64 on all linear layers
    full, ours, qlora = counts["llama-3-8b"]["bytes"].values()
    assert full == 8_030_261_248 * 12 and qlora < ours < full


def test_lora_8b_step_runs_in_both_modes():
    common = ["--device", "cpu", "--layers", "1", "--vocab", "64", "--seq", "8", "--grad-accum", "1", "--steps", "1",
              "--dtype", "fp32", "--model", "aya-23-8b"]
    lora_run = lora_8b.main(common + ["--mode", "lora", "--rank", "2"])
    full_run = lora_8b.main(common + ["--mode", "full"])
    assert lora_run["trained"] == 2 * (4 * 4096 + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # one block's adapters
    assert full_run["trained"] == full_run["parameters"] and lora_run["s_per_step"] > 0 and full_run["s_per_step"] > 0

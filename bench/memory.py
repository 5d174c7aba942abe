"""Peak memory per base parameter of the real trainers (SFT, reward model, PPO), full fine-tuning against LoRA.

It builds a causal LM of the asked size from a stock architecture config (Llama, Qwen2 or GPT-2; random
weights, nothing downloaded; the bundled world's tokenizer), saves it, and runs each stage's real
trainer (worker.train_sft.train_sft, worker.train_rm.train_rm, worker.train_ppo.train_ppo) for a couple
of optimizer steps on synthetic data, each in a fresh process, so that the process's peak resident
memory (getrusage's ru_maxrss) is that stage's alone. The figure is

    bytes per parameter = (peak RSS − RSS after imports) / parameters of the base model

covering weights, gradients, optimizer state, activations, the rollouts and the save at the end.
PPO full fine-tuning holds InstructGPT's four networks as copies (policy, reference, value, reward);
PPO with LoRA holds one frozen base with the policy's, the value network's and the reward model's
adapters on it (the reward model trained as an adapter on the same base: RMConfig lora_save='adapter').
`--ppo-rm separate` measures LoRA PPO with a full reward model instead (two frozen bases).

On CPU every weight is fp32 (4 bytes): the floor of a LoRA stage is ~4 B/param plus activations. The
last JSON line carries `<stage>_<mode>_bytes_per_param` for each run, `ppo_full_over_lora`, and what
those figures predict for 7 B and 70 B models (at fp32, and with a bf16 base as on a GPU: 2 bytes less
per parameter for the LoRA stages' frozen weights).

    python bench/memory.py --quick                  # ~20 M parameters, a few minutes
    python bench/memory.py --params 200M --arch llama
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Sizes by name: (hidden size, layers). With a 32 000-token vocabulary and untied embeddings these give
# about the named parameter count for Llama/Qwen2 (GPT-2's layers are a little smaller).
SIZES = {"20M": (256, 4), "60M": (512, 8), "200M": (1024, 12), "1B": (2048, 16)}
VOCAB = 32000
STAGES = ("sft", "rm", "ppo")
MODES = ("full", "lora")
SENTENCE = (
    "the river runs silver past the old mill and the hills are green under a pale sky, "
    "while the baker counts loaves and the mayor of Brindle writes letters to the sea"
)
WORDS = SENTENCE.split()


def build_model(arch: str, size: str, out: Path) -> int:
    """Saves a random-weight model of the architecture and size, with the world tokenizer; returns its parameters."""
    import torch
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from worker.modeling import prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(ROOT / "models" / "world-base"))
    hidden, layers = SIZES[size]
    heads = max(hidden // 64, 1)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model: Any
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024, **special)
        model = GPT2LMHeadModel(config)
    else:
        common = {
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "intermediate_size": (hidden * 8 // 3 + 63) // 64 * 64,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": False,
            **special,
        }
        model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


def build_reward_model(base: Path, out: Path, lora_r: int) -> None:
    """A reward model on the base (its head random): full, or a LoRA adapter saved alone on the same base."""
    from app.training.configs import RMConfig
    from worker.adapters import prepare_for_training
    from worker.modeling import load_model
    from worker.train_rm import RewardModel

    lm, tokenizer = load_model(base, device="cpu")
    rm = RewardModel.from_causal_lm(lm)
    if lora_r:
        rm.backbone = prepare_for_training(rm.backbone, RMConfig(lora_r=lora_r), task_type=None)
    rm.save(out, tokenizer, adapter_base=str(base) if lora_r else None)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one stage's trainer in this fresh process and reports its peak memory."""
    import torch

    from app.training.configs import PPOConfig, RMConfig, SFTConfig
    from worker.train_ppo import train_ppo
    from worker.train_rm import RankingExample, train_rm
    from worker.train_sft import train_sft

    torch.set_num_threads(args.threads)
    memory = {"device": "cpu", "gradient_checkpointing": args.gradient_checkpointing}
    if args.mode == "lora":
        memory |= {"lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.0}
    baseline = rss_bytes()
    out = Path(args.work) / f"out-{args.stage}-{args.mode}"
    words = args.seq_len // 2
    prompts = [f"Question {i}: {text(words // 2, i)}?" for i in range(8)]
    started = time.perf_counter()
    if args.stage == "sft":
        pairs = [(p, text(words, i)) for i, p in enumerate(prompts)]
        config = SFTConfig(epochs=1, batch_size=4, micro_batch_size=args.batch, max_length=args.seq_len, **memory)
        train_sft(args.model, pairs, [], config, out)
    elif args.stage == "rm":
        rankings = [
            RankingExample(p, [text(words, i + j) for j in range(4)], [1, 2, 3, 4]) for i, p in enumerate(prompts)
        ]
        config_rm = RMConfig(
            epochs=1, rankings_per_step=2, rankings_per_micro_batch=1, max_length=args.seq_len, **memory
        )
        train_rm(args.model, rankings[:4], [], config_rm, out)
    else:
        config_ppo = PPOConfig(
            steps=1,
            rollout_batch_size=4,
            minibatch_size=4,
            micro_batch_size=args.batch,
            ppo_epochs=1,
            max_new_tokens=args.seq_len // 4,
            max_prompt_length=args.seq_len // 2,
            eval_size=2,
            eval_batch_size=2,
            temperature=1.0,
            **memory,
        )
        result = train_ppo(args.model, args.rm, prompts, config_ppo, out, eval_prompts=prompts[:2])
        assert result["steps"] == 1
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_bytes": peak, "baseline_bytes": baseline, "seconds": round(seconds, 1)}


def run_stage(args: argparse.Namespace, stage: str, mode: str, model: Path, rm: Path | None, work: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--stage", stage,
        "--mode", mode,
        "--model", str(model),
        "--work", str(work),
        "--seq-len", str(args.seq_len),
        "--batch", str(args.batch),
        "--lora-r", str(args.lora_r),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if rm is not None:
        command += ["--rm", str(rm)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{stage}/{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", choices=sorted(SIZES), default="200M", help="model size (default 200M)")
    parser.add_argument("--arch", choices=("llama", "qwen2", "gpt2"), default="llama", help="architecture")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: sft, rm, ppo")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: full, lora")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default 256)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per forward pass (default 2)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument(
        "--ppo-rm",
        choices=("adapter", "separate"),
        default="adapter",
        help="LoRA PPO's reward model: an adapter on the policy's base (default) or a full model",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="turn gradient checkpointing on")
    parser.add_argument("--threads", type=int, default=max(os.cpu_count() or 1, 1), help="torch threads")
    parser.add_argument("--quick", action="store_true", help="a small run: 20M parameters, 128-token sequences")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.params, args.seq_len = "20M", 128

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        model = work / "base"
        n_params = build_model(args.arch, args.params, model)
        results: dict[str, Any] = {}
        for stage in args.stages.split(","):
            for mode in args.modes.split(","):
                rm = None
                if stage == "ppo":
                    shared = mode == "lora" and args.ppo_rm == "adapter"
                    rm = work / f"rm-{mode}"
                    build_reward_model(model, rm, args.lora_r if shared else 0)
                measured = run_stage(args, stage, mode, model, rm, work)
                used = measured["peak_bytes"] - measured["baseline_bytes"]
                results[f"{stage}_{mode}_bytes_per_param"] = round(used / n_params, 2)
                results[f"{stage}_{mode}_peak_gb"] = round(measured["peak_bytes"] / 1e9, 2)
                results[f"{stage}_{mode}_seconds"] = measured["seconds"]
                after_imports = measured["baseline_bytes"] / 1e9
                line = f"{stage:>4} {mode:>5}: {used / n_params:6.2f} B/param ({used / 1e9:.2f} GB"
                line += f" over {after_imports:.2f}"
                print(f"{line} GB after imports, {measured['seconds']} s)", flush=True)
                shutil.rmtree(work / f"out-{stage}-{mode}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures: dict[str, Any] = {
        "arch": args.arch,
        "params": n_params,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lora_r": args.lora_r,
        "ppo_rm": args.ppo_rm,
        "gradient_checkpointing": args.gradient_checkpointing,
        "device": "cpu",
        "dtype": "float32",
        **results,
    }
    if "ppo_full_bytes_per_param" in results and "ppo_lora_bytes_per_param" in results:
        figures["ppo_full_over_lora"] = round(
            results["ppo_full_bytes_per_param"] / results["ppo_lora_bytes_per_param"], 2
        )
    predictions = {}
    for key, value in results.items():
        if key.endswith("_bytes_per_param"):
            stage_mode = key.removesuffix("_bytes_per_param")
            bf16 = value - 2 if stage_mode.endswith("lora") else value  # a LoRA stage's frozen base in bf16
            predictions[stage_mode] = {
                "7B_gb_fp32": round(value * 7, 1),
                "70B_gb_fp32": round(value * 70, 1),
                "7B_gb_bf16_base": round(bf16 * 7, 1),
                "70B_gb_bf16_base": round(bf16 * 70, 1),
            }
    figures["predicted"] = predictions
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

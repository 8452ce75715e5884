"""Hugging Face model families (random weights, built from configs, nothing downloaded): the
cost of beyondgrad's quantities as a ratio to one plain forward+backward of the same model, and
which rule serves each parameter.

    python benchmarks/zoo.py                 # writes benchmarks/results/zoo_cpu.md and .json
    python benchmarks/zoo.py --smoke         # does it run (tiny, one rep; numbers mean nothing)

Needs ``transformers`` (``pip install --no-deps transformers tokenizers safetensors
huggingface_hub``). Protocol: the interleaved timing of ``harness.timed_reps`` (ABBA order,
calibrated calls per sample, median), one process, ``--threads`` torch threads; every
candidate is called once before timing, so the sample-axis probe, the coupling probe and the
expansion of shared outputs (`docs/zoo.md`) are paid outside the timed calls, as in a training
loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import beyondgrad as bg

sys.path.insert(0, str(Path(__file__).parent))
import harness

RESULTS = Path(__file__).parent / "results"


class Logits(nn.Module):
    """A Hugging Face model called with its default arguments, logits as CrossEntropy reads
    them (``[N, V, T]`` for language models, ``[N, C]`` for classifiers)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, ids: Tensor) -> Tensor:
        if self.kind == "seq2seq":
            return self.model(input_ids=ids, decoder_input_ids=ids).logits.transpose(1, 2)
        logits = self.model(input_ids=ids).logits
        return logits if self.kind == "class" else logits.transpose(1, 2)


def build(name: str, d: int, layers: int, vocab: int, T: int) -> tuple[nn.Module, bool]:
    """``(model, classifier?)`` of one family at width ``d``."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    heads, ff = 4, 4 * d
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=T, n_embd=d, n_layer=layers, n_head=heads)
        return Logits(tf.GPT2LMHeadModel(cfg), "causal"), False
    if name == "bert":
        cfg = tf.BertConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ff, max_position_embeddings=T, num_labels=3,
        )  # fmt: skip
        return Logits(tf.BertForSequenceClassification(cfg), "class"), True
    if name == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=T,
        )  # fmt: skip
        return Logits(tf.LlamaForCausalLM(cfg), "causal"), False
    cfg = tf.T5Config(
        vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=ff, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads,
    )  # fmt: skip
    return Logits(tf.T5ForConditionalGeneration(cfg), "seq2seq"), False


QUANTITIES: dict[str, Callable[[], list]] = {
    "Grad": lambda: [bg.Grad()],
    "BatchL2": lambda: [bg.BatchL2()],
    "BatchGrad": lambda: [bg.BatchGrad()],
    "DiagGGN (MC, 1)": lambda: [bg.DiagGGN(mc_samples=1)],
    "KFAC (MC, 1)": lambda: [bg.KFAC(fisher_type="mc")],
}


def measure(name: str, args: argparse.Namespace, cfg: harness.Config) -> dict:
    """Ratios of every quantity to a plain forward+backward, and the rule counts."""
    torch.manual_seed(0)
    model, classifier = build(name, args.d, args.layers, args.vocab, args.T)
    model.eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, args.vocab, (args.N, args.T), generator=g)
    y = torch.randint(
        0,
        3 if classifier else args.vocab,
        (args.N,) if classifier else (args.N, args.T),
        generator=g,
    )
    loss_fn = nn.CrossEntropyLoss()

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    row: dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    row["rules"] = dict(Counter(bg.compute(model, loss_fn, X, y, bg.Grad()).rules.values()))
    for label, make in QUANTITIES.items():
        qs = make()

        def cand(qs: list = qs) -> object:
            return bg.compute(model, loss_fn, X, y, *qs)

        try:
            cand()  # probes and expansion outside the timed calls
            timing = harness.timed_reps(plain, cand, cfg)
            row[label] = statistics.median(timing.cand) / statistics.median(timing.base)
            row["base_ms"] = 1e3 * statistics.median(timing.base)
        except Exception as err:  # recorded, not hidden
            row[label] = f"error: {type(err).__name__}: {str(err)[:120]}"
        harness.log(f"{name} {label}: {row[label]}")
    return row


def render(rows: list[dict], args: argparse.Namespace, env: str) -> str:
    lines = [
        "# Hugging Face models: cost relative to one forward+backward (CPU)",
        "",
        f"Command: `python benchmarks/zoo.py --threads {args.threads}`. {env}",
        f"Random-weight configs: d {args.d}, {args.layers} layers, vocab {args.vocab}, "
        f"N {args.N}, T {args.T}, float32, eval mode. Median of interleaved samples "
        "(`harness.timed_reps`); each candidate called once before timing (probes and the "
        "expansion of shared outputs are per model and input signature, paid once).",
        "",
        "| model | params | fwd+bwd ms | " + " | ".join(QUANTITIES) + " | rules |",
        "|---|---|---|" + "---|" * len(QUANTITIES) + "---|",
    ]
    for r in rows:
        cells = [f"{r[q]:.2f}" if isinstance(r[q], float) else str(r[q]) for q in QUANTITIES]
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r["rules"].items()))
        base = f"{r.get('base_ms', float('nan')):.1f}"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {base} | " + " | ".join(cells) + f" | {rules} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt2", "bert", "llama", "t5"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "zoo_cpu.md")
    args = p.parse_args(argv)
    if args.smoke:
        args.d, args.layers, args.vocab, args.N, args.T, args.reps = 16, 1, 32, 2, 4, 1
    torch.set_num_threads(args.threads)
    cfg = harness.Config(
        device="cpu", reps=args.reps, threads=args.threads, warmup=1,
        target_s=0.01 if args.smoke else 0.05, max_cell_s=2 if args.smoke else 20,
        cell_timeout_s=120, only_beyondgrad=True, quick=args.smoke, smoke=args.smoke,
    )  # fmt: skip
    start = time.time()
    rows = [measure(m, args, cfg) for m in args.models]
    env = f"torch {torch.__version__}, {args.threads} threads, {harness.cpu_model()}."
    table = render(rows, args, env)
    print(table)
    if not args.smoke:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    harness.log(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

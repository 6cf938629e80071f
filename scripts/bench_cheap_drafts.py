"""Cheaper drafts: what int8 weights and a reduced-vocabulary LM head cost and what they keep.

For a target/draft pair the draft is built four ways through its drafter spec: as given
(``SPEC``), ``SPEC,quant=int8``, ``SPEC,vocab=N`` and ``SPEC,quant=int8,vocab=N`` (see
``treeopt.models.variants``). For each variant it prints

- the draft's forward time over 1 and 4 new tokens after ``--context`` cached tokens (median
  ms over ``--repeats``, the variants interleaved so a busy machine hurts them alike), and
  its ratio to the unchanged draft;
- teacher-forced agreement with the target along the tokens of ``--prompts`` prompts (the
  shipped Spec-Bench and HumanEval prompts): top-1 (the draft's best token is the target's)
  and top-4 (the target's best token is among the draft's 4 best), over every position.

Every variant is lossless (the target verifies over its whole vocabulary); whether a cheaper
draft pays is the profiles' and the DP's decision (``treeopt tune --draft-quant int8``).

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cheap_drafts.py                # smollm2
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cheap_drafts.py \\
        --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --vocab 32768
    python scripts/bench_cheap_drafts.py --tiny                 # tiny random models: seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: steady CPU timings


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2", help="target model spec (default smollm2)")
    ap.add_argument("--draft", default="early-exit:4",
                    help="model draft spec: a model or early-exit:K (default early-exit:4)")
    ap.add_argument("--vocab", type=int, default=32768,
                    help="tokens the reduced-vocabulary variants propose from (default 32768)")
    ap.add_argument("--vocab-corpus", default=None,
                    help="corpus ranking the tokens (default: shipped Spec-Bench + HumanEval)")
    ap.add_argument("--context", type=int, default=256, help="cached tokens (default 256)")
    ap.add_argument("--repeats", type=int, default=15, help="timed forwards per point")
    ap.add_argument("--prompts", type=int, default=24,
                    help="prompts for the agreement (default 24, drawn across categories)")
    ap.add_argument("--prompt-tokens", type=int, default=256,
                    help="tokens of each prompt used (default 256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random models and a word tokenizer: checks the script in seconds")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------- tiny setup
def tiny_setup(folder: Path):
    """(target, tokenizer, prompt token lists, corpus file) of a tiny random Llama with a
    word-level tokenizer; the corpus repeats low word ids more often than high ones."""
    import torch
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from treeopt.testing import tiny_causal_lm

    vocab_size = 256
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="</s>")
    target = tiny_causal_lm("llama", vocab_size=vocab_size, hidden_size=64, num_layers=4)
    gen = torch.Generator().manual_seed(0)
    words = (torch.rand(4000, generator=gen) ** 2 * (vocab_size - 3)).long() + 3
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"w{int(w)}" for w in words[i:i + 40])
                                for i in range(0, len(words), 40)) + "\n")
    prompts = [torch.randint(3, vocab_size, (48,), generator=gen).tolist() for _ in range(3)]
    return target, tokenizer, prompts, corpus


def prompt_tokens(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token ids (at most ``length``) of ``n`` shipped prompts drawn across categories."""
    from treeopt.datasets import load_prompts

    prompts = load_prompts("spec_bench", n=max(1, n - n // 4), seed=seed) + \
        load_prompts("humaneval", n=max(1, n // 4), seed=seed)
    out = [tokenizer(p.text, add_special_tokens=False)["input_ids"][:length]
           for p in prompts[:n]]
    return [ids for ids in out if len(ids) >= 2]


# ---------------------------------------------------------------------------- measurements
def time_forwards(models: dict, vocab: int, context: int, repeats: int,
                  sizes=(1, 4)) -> dict[str, dict[int, float]]:
    """Median ms of one forward of n new tokens after ``context`` cached tokens, per model and
    n; every round times every model and size once (interleaved)."""
    import torch

    from treeopt.decode.attention import crop_to, forward_tree, new_cache

    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=gen)
    ids = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in sizes}
    pos = {n: torch.arange(context, context + n)[None] for n in sizes}
    caches = {}
    samples: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in models}
    with torch.inference_mode():
        for name, model in models.items():
            caches[name] = new_cache(model)
            forward_tree(model, prefix, torch.arange(context)[None], None, caches[name],
                         logits_to_keep=1)
        for r in range(repeats + 1):  # round 0 warms up
            for name, model in models.items():
                for n in sizes:
                    t0 = time.perf_counter()
                    forward_tree(model, ids[n], pos[n], None, caches[name])
                    ms = (time.perf_counter() - t0) * 1000
                    crop_to(caches[name], context)
                    if r:
                        samples[name][n].append(ms)
    return {k: {n: statistics.median(v) for n, v in d.items()} for k, d in samples.items()}


def agreement(target, models: dict, prompts: list[list[int]], k: int = 4
              ) -> dict[str, tuple[float, float]]:
    """Teacher-forced (top-1, top-k) agreement of each model with the target's argmax over
    every position of ``prompts``."""
    import torch

    hits = {name: [0, 0] for name in models}
    total = 0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            best = target(input_ids=x).logits[0].argmax(-1)
            total += best.numel()
            for name, model in models.items():
                top = model(input_ids=x).logits[0].topk(k, dim=-1).indices
                hits[name][0] += int((top[:, 0] == best).sum())
                hits[name][1] += int((top == best[:, None]).any(-1).sum())
    return {name: (h[0] / total, h[1] / total) for name, h in hits.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from treeopt.decode.drafter import build_drafter
    from treeopt.models.variants import DraftVariant, add_variant, proposable_tokens

    threads = torch.get_num_threads()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.tiny:
                target, tokenizer, prompts, corpus = tiny_setup(Path(tmp))
                draft_spec, vocab, corpus_spec = "early-exit:2", 64, str(corpus)
                args.context, args.repeats = min(args.context, 64), min(args.repeats, 3)
                names = ("tiny", draft_spec)
            else:
                from treeopt.models.loading import load_model, load_tokenizer

                target = load_model(args.target)
                tokenizer = load_tokenizer(args.target)
                if tokenizer is None:
                    print(f"target {args.target!r} has no tokenizer", file=sys.stderr)
                    return 2
                prompts = prompt_tokens(tokenizer, args.prompts, args.prompt_tokens)
                draft_spec, vocab, corpus_spec = args.draft, args.vocab, args.vocab_corpus
                names = (args.target, draft_spec)
            variants = {
                "fp32": DraftVariant(),
                "int8": DraftVariant("int8"),
                f"vocab={vocab}": DraftVariant(vocab=vocab, vocab_corpus=corpus_spec),
                f"int8+vocab={vocab}": DraftVariant("int8", vocab, corpus_spec),
            }
            models = {}
            for name, variant in variants.items():
                spec = add_variant(draft_spec, variant)
                drafter = build_drafter(spec, target=target, tokenizer=tokenizer)
                models[name] = drafter.model
            full = int(target.config.vocab_size)
            times = time_forwards(models, full, args.context, args.repeats)
            agree = agreement(target, models, prompts)
    finally:
        torch.set_num_threads(threads)
        if progress:
            hf_logging.enable_progress_bar()
    positions = sum(len(p) for p in prompts)
    print(f"target {names[0]} | draft {names[1]} | context {args.context}, {args.repeats} "
          f"repeats, {args.threads} threads | agreement over {positions} positions of "
          f"{len(prompts)} prompts (teacher-forced)")
    print(f"{'variant':<20} {'tokens':>7} {'1 tok ms':>9} {'4 tok ms':>9} {'x fp32(1)':>9} "
          f"{'x fp32(4)':>9} {'top-1':>6} {'top-4':>6}")
    base = times["fp32"]
    for name, model in models.items():
        t = times[name]
        print(f"{name:<20} {proposable_tokens(model):>7} {t[1]:>9.2f} {t[4]:>9.2f} "
              f"{t[1] / base[1]:>9.2f} {t[4] / base[4]:>9.2f} {agree[name][0]:>6.3f} "
              f"{agree[name][1]:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

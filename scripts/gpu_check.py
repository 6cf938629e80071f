"""treeopt's GPU check: everything that needs a CUDA GPU, in one run of under 8 minutes, offline.

Sections, each under its own time budget (a section that would start past its budget or the
whole run's is skipped and says so; the run ends by ``--budget`` seconds):

- env:        nvidia-smi's GPU list, torch / CUDA / transformers versions.
- tests:      the test files that exercise CUDA (those that mention it), with pytest.
- exactness:  tree decoding on the GPU equals plain greedy decoding token for token (tiny
              random models, float32, several tree shapes).
- latency:    latency profiles (``treeopt.profile.latency.measure_latency``: target tree
              forwards and draft level forwards by tokens at once) of random-weight models
              built on the GPU from real configs (``CONFIGS``): a Llama-2-7B-sized target with
              JackFram/llama-68m- and llama-160m-sized drafts, a Qwen2.5-1.5B-sized target
              with a Qwen2.5-0.5B-sized draft. Random weights time exactly like real ones.
- engine:     the decoding engine's time per step with those pairs (AR, a chain, a uniform
              tree, the DP tree for the shipped Sequoia reference profile): draft, verify and
              other (the engine's own overhead) milliseconds per step.
- attention:  ``treeopt bench attention`` on the GPU (SDPA with a tree mask, FlexAttention
              with a block mask, per-branch calls), Llama-7B-like heads.

Everything goes to one folder named after the GPU (``runs/gpu-check-<gpu>-<time>`` unless
``--out``), with ``summary.json`` / ``summary.txt``, and a ``.tar.gz`` of it beside. Without
a CUDA GPU it says so and exits 0 having done nothing. ``--device cpu --tiny`` runs the same
sections on tiny models in seconds (the check of this script itself).

    bash scripts/gpu_check.sh                   # picks a Python with CUDA, then this
    python scripts/gpu_check.py --out /tmp/gc --sections latency,engine --budget 300
    python scripts/gpu_check.py --device cpu --tiny --sections env,exactness,latency
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Public config values (the models' config.json on the Hugging Face hub): only the sizes
# matter for timing; weights are random.
CONFIGS: dict[str, dict] = {
    "llama-2-7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    "llama-68m": dict(arch="llama", hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=12,
                      vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      tie_word_embeddings=False),
    "llama-160m": dict(arch="llama", hidden_size=768, intermediate_size=3072,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True),
}
#: (target, drafts): the first draft also runs the engine section.
PAIRS = [("llama-2-7b", ("llama-68m", "llama-160m")), ("qwen2.5-1.5b", ("qwen2.5-0.5b",))]
#: What ``--tiny`` puts over every config (the architecture and the rest are kept).
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
#: Seconds per section (the whole default budget, 450 s, keeps the run under 8 minutes with
#: the start and the archive).
BUDGETS = {"env": 15, "tests": 75, "exactness": 30, "latency": 150, "engine": 90,
           "attention": 90}
SECTIONS = tuple(BUDGETS)


# ---------------------------------------------------------------------------- models
def make_config(name: str, **overrides):
    """The transformers config of ``CONFIGS[name]`` (with ``overrides``)."""
    import transformers as tf

    values = {**CONFIGS[name], **overrides}
    arch = values.pop("arch")
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[arch]
    return cls(bos_token_id=0, eos_token_id=1, pad_token_id=1, **values)


@contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(name: str, device: str = "cuda", dtype=None, seed: int = 0, **overrides):
    """A random-weight ``*ForCausalLM`` of ``CONFIGS[name]``, initialised directly on
    ``device`` in ``dtype`` (a 7B model built on the CPU would take minutes)."""
    import torch
    import transformers as tf

    dtype = dtype or torch.float16
    config = make_config(name, **overrides)
    cls = tf.LlamaForCausalLM if config.model_type == "llama" else tf.Qwen2ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = cls(config)
    return model.to(device=device, dtype=dtype).eval()


def param_count(name: str, **overrides) -> int:
    """Parameters of ``CONFIGS[name]``, counted on the meta device (nothing allocated)."""
    import torch
    import transformers as tf

    config = make_config(name, **overrides)
    cls = tf.LlamaForCausalLM if config.model_type == "llama" else tf.Qwen2ForCausalLM
    with torch.device("meta"):
        model = cls(config)
    seen, total = set(), 0
    for p in model.parameters():  # tied embeddings count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ---------------------------------------------------------------------------- budget
class Budget:
    """The run's deadline and each section's: ``left()`` is what the current section may
    still spend (its own budget, capped by the run's)."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + total_s
        self.section_deadline = self.deadline

    def start(self, seconds: float) -> None:
        self.section_deadline = min(self.deadline, self.clock() + seconds)

    def left(self) -> float:
        return self.section_deadline - self.clock()

    def run_left(self) -> float:
        return self.deadline - self.clock()


class Skipped(Exception):
    """A unit of work not started because its section's time is up."""


def guard(budget: Budget, what: str, need: float = 0.0) -> None:
    """Raise :class:`Skipped` unless at least ``need`` seconds are left for ``what``."""
    if budget.left() <= need:
        raise Skipped(f"{what}: skipped, the section's time budget is spent")


def run_sections(sections, budget: Budget, budgets: dict, log=print) -> list[dict]:
    """Run ``(name, fn)`` pairs in order, each ``fn(budget)`` under its section budget;
    returns one record per section: status ok / failed / skipped / partial, seconds, and the
    notes or error. A failing section never stops the others."""
    records = []
    for name, fn in sections:
        t0 = time.monotonic()
        if budget.run_left() <= 1.0:
            records.append({"section": name, "status": "skipped", "seconds": 0.0,
                            "notes": ["the run's time budget is spent"]})
            log(f"[{name}] skipped: the run's time budget is spent")
            continue
        budget.start(budgets[name])
        log(f"[{name}] up to {min(budgets[name], budget.run_left()):.0f} s")
        record = {"section": name, "status": "ok", "notes": []}
        try:
            result = fn(budget) or {}
            record.update(result)
        except Skipped as exc:
            record.update(status="skipped", notes=[str(exc)])
        except Exception as exc:  # a broken section is reported, the next one still runs
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc(limit=8))
        record["seconds"] = round(time.monotonic() - t0, 2)
        log(f"[{name}] {record['status']} in {record['seconds']:.1f} s"
            + (f": {record['error']}" if record.get("error") else ""))
        for note in record.get("notes", []):
            log(f"[{name}]   {note}")
        records.append(record)
    return records


# ---------------------------------------------------------------------------- sections
class Check:
    """The sections, sharing the options and the output folder."""

    def __init__(self, args, out: Path):
        self.args, self.out = args, out
        import torch

        self.device = args.device
        self.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                      "float32": torch.float32}[args.dtype]
        self.overrides = dict(TINY) if args.tiny else {}

    def _model(self, name: str, seed: int = 0, dtype=None):
        return build_model(name, self.device, dtype or self.dtype, seed=seed, **self.overrides)

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ env
    def env(self, budget: Budget) -> dict:
        import torch
        import transformers

        info = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__, "python": sys.version.split()[0],
                "device": self.device, "dtype": self.args.dtype, "tiny": self.args.tiny}
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(
                torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                info["nvidia_smi"] = subprocess.run(
                    [smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                     "--format=csv"], capture_output=True, text=True,
                    timeout=max(1.0, budget.left())).stdout.strip().splitlines()
            except (OSError, subprocess.TimeoutExpired) as exc:
                info["nvidia_smi"] = f"failed: {exc}"
        (self.out / "env.json").write_text(json.dumps(info, indent=1))
        return {"notes": [f"{info.get('gpu', self.device)}, torch {info['torch']}, CUDA "
                          f"{info['cuda']}, transformers {info['transformers']}"]}

    # ------------------------------------------------------------------ tests
    def tests(self, budget: Budget) -> dict:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "cuda" in p.read_text() and p.name != "test_gpu_check.py")
        if not files:
            return {"status": "skipped", "notes": ["no test file mentions cuda"]}
        guard(budget, "pytest", need=10)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
               "not slow", *files]
        log = self.out / "tests.log"
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=budget.left())
        except subprocess.TimeoutExpired as exc:
            log.write_text((exc.stdout or b"").decode(errors="replace")
                           if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
            return {"status": "failed", "error": f"pytest ran past {budget.left():.0f} s",
                    "notes": [" ".join(cmd[3:])]}
        log.write_text(proc.stdout + proc.stderr)
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "ok" if proc.returncode == 0 else "failed",
                "notes": [f"{' '.join(files)}: {last}"],
                **({"error": f"pytest exit {proc.returncode}"} if proc.returncode else {})}

    # ------------------------------------------------------------------ exactness
    def exactness(self, budget: Budget) -> dict:
        import torch

        from treeopt.shapes import PRESETS, chain, specinfer
        from treeopt.testing import decode, tiny_pair

        target, draft = tiny_pair("llama", vocab_size=96)
        target, draft = target.to(self.device), draft.to(self.device)
        gen = torch.Generator().manual_seed(0)
        lengths, new_tokens = ((5, 17), 12) if self.args.tiny else ((5, 17, 40), 24)
        prompts = [torch.randint(3, 96, (1, n), generator=gen) for n in lengths]
        trees = {"chain:5": chain(5), "specinfer:3,2,1": specinfer([3, 2, 1]),
                 "mc_sim_7b_63": PRESETS["mc_sim_7b_63"].tree()}
        rows, bad = [], []
        for ids in prompts:
            guard(budget, "exactness")
            ids = ids.to(self.device)
            plain = decode(target, None, None, ids, max_new_tokens=new_tokens).tokens
            for name, tree in trees.items():
                out = decode(target, draft, tree, ids, max_new_tokens=new_tokens)
                same = out.tokens == plain
                rows.append({"prompt_tokens": ids.shape[1], "tree": name, "same": same,
                             "tokens_per_step": out.stats.tokens_per_step})
                if not same:
                    bad.append(f"{name} on a {ids.shape[1]}-token prompt differs from plain "
                               "greedy decoding")
        (self.out / "exactness.json").write_text(json.dumps(rows, indent=1))
        notes = bad or [f"{len(rows)} tree decodings equal plain greedy decoding token for "
                        f"token on {self.device}"]
        return {"status": "failed" if bad else "ok", "notes": notes,
                **({"error": f"{len(bad)} decodings differ"} if bad else {})}

    # ------------------------------------------------------------------ latency + engine
    def latency(self, budget: Budget) -> dict:
        from treeopt.profile.latency import measure_latency, write_latency

        tokens = (1, 2, 4) if self.args.tiny else (1, 2, 4, 8, 16, 32, 64, 128)
        repeats, warmup = (2, 1) if self.args.tiny else (10, 3)
        context = 32 if self.args.tiny else 256
        notes = []
        for target_name, drafts in PAIRS:
            guard(budget, f"{target_name} latency", need=5)
            target = self._model(target_name)
            for draft_name in drafts:
                guard(budget, f"{target_name} + {draft_name} latency", need=2)
                draft = self._model(draft_name, seed=1)
                latency = measure_latency(target, draft, tokens=tokens, context=context,
                                          repeats=repeats, warmup=warmup,
                                          names={"target": f"{target_name} (random weights)",
                                                 "draft": f"{draft_name} (random weights)"})
                tag = "tiny-" if self.args.tiny else ""
                path = write_latency(latency, self.out / f"latency-{tag}{target_name}-"
                                                         f"{draft_name}.json")
                t, d = latency.target, latency.draft
                notes.append(f"{target_name}: " + " ".join(
                    f"{n}:{ms:.2f}" for n, ms in zip(t.tokens, t.ms)) + f" ms | {draft_name}: "
                    + " ".join(f"{n}:{ms:.2f}" for n, ms in zip(d.tokens, d.ms))
                    + f" ms -> {path.name}")
                del draft
            del target
            self._free()
        return {"notes": notes}

    def engine(self, budget: Budget) -> dict:
        import torch

        from treeopt.search.api import load_profile, rank_table
        from treeopt.search.dp import solve
        from treeopt.shapes import chain, specinfer
        from treeopt.testing import decode

        table = rank_table(load_profile(ROOT / "profiles" / "sequoia-reference.json"))
        dp_tree = solve(table, 16, 6).tree(16, 6)
        trees = {"ar": None, "chain:5": chain(5), "specinfer:4,2,1": specinfer([4, 2, 1]),
                 "dp:16x5": dp_tree}
        new_tokens = 8 if self.args.tiny else 48
        rows, notes = [], []
        for target_name, drafts in PAIRS:
            guard(budget, f"{target_name} engine", need=10)
            target, draft = self._model(target_name), self._model(drafts[0], seed=1)
            vocab = int(target.config.vocab_size)
            gen = torch.Generator().manual_seed(0)
            prompts = [torch.randint(3, vocab, (1, 128), generator=gen).to(self.device)
                       for _ in range(2)]
            for name, tree in trees.items():
                guard(budget, f"{target_name} engine {name}")
                decode(target, draft, tree, prompts[0], max_new_tokens=4)  # warm-up
                steps = 0
                split = {"draft_s": 0.0, "verify_s": 0.0, "other_s": 0.0, "total_s": 0.0}
                for ids in prompts:
                    out = decode(target, draft, tree, ids, max_new_tokens=new_tokens,
                                 timing=True)
                    s = out.stats
                    steps += s.target_forwards
                    split["draft_s"] += s.draft_s
                    split["verify_s"] += s.verify_s
                    split["other_s"] += s.other_s
                    split["total_s"] += s.total_s - s.prefill_s
                per = {k.replace("_s", "_ms_per_step"): 1000 * v / max(steps, 1)
                       for k, v in split.items()}
                row = {"target": target_name, "draft": drafts[0], "tiny": self.args.tiny,
                       "tree": name,
                       "size": tree.size if tree is not None else 1, "steps": steps, **per}
                rows.append(row)
                notes.append(f"{target_name}+{drafts[0]} {name:<16} step "
                             f"{per['total_ms_per_step']:8.2f} ms = draft "
                             f"{per['draft_ms_per_step']:.2f} + verify "
                             f"{per['verify_ms_per_step']:.2f} + other "
                             f"{per['other_ms_per_step']:.2f}")
            del target, draft
            self._free()
        (self.out / "engine.json").write_text(json.dumps(rows, indent=1))
        return {"notes": notes}

    # ------------------------------------------------------------------ attention
    def attention(self, budget: Budget) -> dict:
        guard(budget, "attention benchmark", need=10)
        folder = self.out / "attention"
        if self.args.tiny:
            grid = ["--batch", "1", "--context", "8", "--tree-sizes", "4,8", "--heads", "2",
                    "--head-dim", "4", "--repeats", "2", "--warmup", "1"]
        else:
            # 4 points: FlexAttention compiles once per shape (seconds each)
            grid = ["--batch", "1,4", "--context", "2048", "--tree-sizes", "16,64",
                    "--heads", "32", "--head-dim", "128", "--repeats", "20", "--warmup", "5"]
        dtype = "float32" if self.device == "cpu" else self.args.dtype
        cmd = [sys.executable, "-m", "treeopt", "bench", "attention", "--device", self.device,
               "--dtype", dtype, *grid, "--out", str(folder)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
            "PYTHONPATH", ""))
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=budget.left(), env=env)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"ran past {budget.left():.0f} s"}
        folder.mkdir(exist_ok=True)
        (folder / "attention.log").write_text(proc.stdout + proc.stderr)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return {"status": "failed", "error": f"exit {proc.returncode}: {tail}"}
        return {"notes": lines[-12:]}


# ---------------------------------------------------------------------------- main
def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default runs/gpu-check-<gpu>-<time>)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole run (default %(default)s: under 8 minutes)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ", ".join(SECTIONS))
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with --tiny")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the timed models (default %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny versions of the configs and grids: checks this script in seconds")
    p.add_argument("--no-archive", action="store_true", help="skip the .tar.gz of the folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch here; nothing done")
        return 0
    if not args.device.startswith("cuda") and not args.tiny:
        print("gpu_check: --device cpu only with --tiny (full-size models need a GPU)",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else (
        ROOT / "runs" / f"gpu-check-{gpu_slug(gpu)}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    check = Check(args, out)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"gpu_check: {gpu}, output {out}, budget {args.budget:.0f} s, sections "
        f"{', '.join(chosen)}")
    records = run_sections([(name, getattr(check, name)) for name in chosen], budget,
                           BUDGETS, log)
    failed = [r["section"] for r in records if r["status"] == "failed"]
    summary = {"gpu": gpu, "device": args.device, "tiny": args.tiny, "budget_s": args.budget,
               "sections": records, "failed": failed}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log("gpu_check: " + ("all sections passed or were skipped" if not failed
                         else f"FAILED: {', '.join(failed)}"))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    if not args.no_archive:
        archive = out.with_name(out.name + ".tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        print(f"gpu_check: archive {archive}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Our MistralLM vs transformers' MistralForCausalLM (PyTorch), CPU float32, same weights.

Model: 4 layers, d 512, 8 heads, 2 KV heads, FFN 1536, vocab 32000; random weights from
HF (seed 0) saved with ``save_pretrained`` and loaded into ours with ``load_mistral``.

* prefill: one forward over a batch of 4 x 512 tokens with full logits (jit compile excluded);
* greedy decoding of 64 new tokens for the same 4 prompts (ours: ``generate``; theirs:
  ``model.generate(do_sample=False)``). Decode throughput excludes the prefill, with the same
  formula for both: ``4 * 63 / (t(64 new) - t(1 new))``; end-to-end ``4 * 64 / t(64 new)``
  is reported too.

Each side runs in its own process (so neither thread pool disturbs the other), the two
alternating ``--reps`` times; every process times ``--rounds`` runs after warm-up. This is
done with the libraries' default threading and again with one thread each (``XLA_FLAGS``
single-threaded Eigen, ``torch.set_num_threads(1)``), which is far less sensitive to other
load on a shared machine. Medians are reported, with ratios of minima beside them.

Our model is loaded with ``scan_layers=False``, the inference layout: with scanned layers the
decode loop re-slices (copies) every layer's stacked weights for each token.

    python bench/llm_vs_torch.py [--reps 2] [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from results import write_section  # bench/results.py (this script's directory)

BATCH, PROMPT, NEW = 4, 512, 64
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# ----------------------------------------------------------------------------- worker


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker(side: str, rounds: int) -> dict:
    """Times one implementation; runs in a fresh process (threading set by the parent)."""
    import numpy as np
    import torch
    import transformers

    if os.environ.get("BENCH_THREADS") == "1":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        sliding_window=None,
        max_position_embeddings=4096,
    )
    hf = transformers.MistralForCausalLM(config).eval()
    ids_np = np.random.RandomState(0).randint(3, 32000, (BATCH, PROMPT))

    if side == "ours":
        import jax
        import jax.numpy as jnp

        from exo2ego_jax.models.decode import generate
        from exo2ego_jax.weights.hf_mistral import load_mistral

        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            module, params = load_mistral(d, scan_layers=False)
        del hf
        ids, mask = jnp.asarray(ids_np, jnp.int32), jnp.ones((BATCH, PROMPT), jnp.int32)
        forward = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)

        def prefill():
            return np.asarray(forward(params, ids).block_until_ready()[:, -1])

        def gen(n):
            return lambda: np.asarray(generate(module, params, ids, mask, n).tokens)

        threads = f"jax {jax.__version__}"
    else:
        ids, mask = torch.tensor(ids_np), torch.ones(BATCH, PROMPT, dtype=torch.long)

        def prefill():
            with torch.inference_mode():
                return hf(input_ids=ids).logits[:, -1].numpy()

        def gen(n):
            def run():
                with torch.inference_mode():
                    out = hf.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )
                return out[:, PROMPT:].numpy()

            return run

        threads = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"

    fns = {"prefill": prefill, "gen1": gen(1), "gen": gen(NEW)}
    outputs = {k: fn() for k, fn in fns.items()}  # warm-up (compiles ours)
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return {
        "times": times,
        "tokens": outputs["gen"].tolist(),
        "last_logits": outputs["prefill"][:, :8].tolist(),
        "version": threads,
    }


# ----------------------------------------------------------------------------- parent


def run_worker(side: str, threads: str, rounds: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if threads == "1":
        env["XLA_FLAGS"] = SINGLE_THREAD_XLA
        env["BENCH_THREADS"] = "1"
    cmd = [sys.executable, __file__, "--worker", side, "--rounds", str(rounds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(ours: list[dict], theirs: list[dict]) -> tuple[list[tuple], dict]:
    def pool(runs, key):
        return [t for r in runs for t in r["times"][key]]

    stats = {}
    for side, runs in (("ours", ours), ("theirs", theirs)):
        for key in ("prefill", "gen1", "gen"):
            v = pool(runs, key)
            stats[side, key] = (statistics.median(v), min(v))

    def decode(side, i):
        return BATCH * (NEW - 1) / max(stats[side, "gen"][i] - stats[side, "gen1"][i], 1e-9)

    def e2e(side, i):
        return BATCH * NEW / stats[side, "gen"][i]

    rows = [
        (
            "prefill 4x512 (s, lower is better)",
            stats["ours", "prefill"][0],
            stats["theirs", "prefill"][0],
            stats["theirs", "prefill"][0] / stats["ours", "prefill"][0],
            stats["theirs", "prefill"][1] / stats["ours", "prefill"][1],
        ),
        (
            "greedy decode tokens/s (prefill excluded)",
            decode("ours", 0),
            decode("theirs", 0),
            decode("ours", 0) / decode("theirs", 0),
            decode("ours", 1) / decode("theirs", 1),
        ),
        (
            "end-to-end generate tokens/s (incl. prefill)",
            e2e("ours", 0),
            e2e("theirs", 0),
            e2e("ours", 0) / e2e("theirs", 0),
            e2e("ours", 1) / e2e("theirs", 1),
        ),
    ]
    return rows, stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=2, help="process pairs per thread setting")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per process")
    parser.add_argument("--threads", default="both", choices=("both", "default", "1"))
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds)))
        return

    import numpy as np

    settings = ("default", "1") if args.threads == "both" else (args.threads,)
    lines = [
        "## LLM: ours (JAX/Flax) vs transformers PyTorch, CPU float32",
        "",
        f"`python bench/llm_vs_torch.py` — Mistral with 4 layers, d 512, 8 heads / 2 KV heads, "
        f"FFN 1536, vocab 32000; batch {BATCH} x {PROMPT} prompt tokens; greedy, {NEW} new "
        f"tokens. {os.cpu_count()} CPUs. Each side in its own process, alternating "
        f"{args.reps}x, {args.rounds} timed runs per process after warm-up (compile excluded). "
        "Ratio = ours / theirs speed (> 1: ours faster); the last column uses the minima. "
        "Timings on a shared machine move with other load (load averages are given per "
        "table); compare runs made at similar load.",
    ]
    for threads in settings:
        ours, theirs = [], []
        load0 = os.getloadavg()[0]
        for _ in range(args.reps):
            ours.append(run_worker("ours", threads, args.rounds))
            theirs.append(run_worker("theirs", threads, args.rounds))
        load1 = os.getloadavg()[0]
        rows, stats = summarize(ours, theirs)
        same = float(np.mean(np.array(ours[0]["tokens"]) == np.array(theirs[0]["tokens"])))
        logit_diff = float(
            np.abs(np.array(ours[0]["last_logits"]) - np.array(theirs[0]["last_logits"])).max()
        )
        label = "default threading" if threads == "default" else "one thread each"
        lines += [
            "",
            f"### {label}: {ours[0]['version']}, {theirs[0]['version']}; "
            f"load average {load0:.1f} -> {load1:.1f}",
            "",
            "| metric | ours | transformers | ratio (median) | ratio (min) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, a, b, r, rmin in rows:
            lines.append(f"| {name} | {a:.3g} | {b:.3g} | {r:.2f}x | {rmin:.2f}x |")
        raw = {f"{s}/{k}": [round(x, 3) for x in v] for (s, k), v in stats.items()}
        lines += [
            "",
            f"Same greedy tokens as HF on {same:.0%} of the {BATCH}x{NEW} positions; max |last-"
            f"token logits diff| {logit_diff:.1e}. (median, min) seconds: {raw}",
        ]
        print("\n".join(lines[-(len(rows) + 7) :]), flush=True)
    table = "\n".join(lines)
    if not args.no_write:
        write_section("llm_vs_torch", table)


if __name__ == "__main__":
    main()

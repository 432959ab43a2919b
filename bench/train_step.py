"""Stage-3 train step: ours (JAX/Flax) vs transformers + peft (PyTorch), CPU float32.

Model: Mistral with 4 layers, d 512, 8 heads / 2 KV heads, FFN 1536, vocab 32000 (as
``bench/llm_vs_torch.py``), LoRA r 16 / alpha 32 / dropout 0 on q, k, v, o, gate, up, down.
Batch: 4 rows of 256 text tokens with one ``<video>`` placeholder (after a 16-token prefix),
replaced by 150 precomputed visual tokens (identical on both sides), so the LLM sees
4 x 405 positions; rows 1 and 3 are right-padded. Next-token loss on the text after the
video; global-norm clipping at 1.0, then AdamW (lr 1e-3, weight decay 0.01) on the LoRA
parameters only; the base model is frozen.

* ours (LLM): ``MistralLM`` with LoRA; the step embeds the text, splices the visual tokens
  (``splice_batch``), runs the LM on ``inputs_embeds``, ``losses.vtg_loss``; the adapters are
  the differentiated argument, the frozen base an ordinary one; ``jax.jit`` donating the
  adapters and the optimizer state.
* theirs: ``transformers.MistralForCausalLM.from_pretrained`` on our weights (written with
  ``save_mistral``), adapters from ``peft`` (``LoraConfig``; lora_A copied from ours, lora_B
  zero), eager PyTorch (2 threads, or 1: see below); the step embeds the text, concatenates
  the visual tokens, ``model(inputs_embeds=..., labels=...)``, ``backward``,
  ``clip_grad_norm_``, ``torch.optim.AdamW``. (Without peft installed, hand-written
  adapters are used instead.)
* ours (full stage 3, no counterpart): ``stages.make_train_step`` on a tiny Exo2Ego (tiny CLIP,
  STC connector, F) with the same LLM; the 150 visual tokens are ``[x ; F(x)]`` of 4 frames.

Every side lives in its own persistent worker process (compiled once); the parent alternates
them one timed step at a time (the first three steps are warm-up and the correctness check:
the losses must agree within 1e-4 or nothing is timed). Before every round the ours worker
times the matmul "peak": a 2048 x 2048 float32 ``jnp.dot``, and two independent ones in one
program (XLA may run a single dot on one thread), whichever is faster. Medians are reported.
Model FLOPs are counted analytically (``step_flops``) and by XLA (``cost_analysis()``).

Two passes: 2 threads per side (``torch.set_num_threads(2)``, XLA's default pool), then
1 thread per side, each worker pinned to the same CPU. The machine is shared: multi-threaded
eager PyTorch slows down disproportionately when another job takes one of the two CPUs
(its OpenMP threads wait for each other), so the 1-thread pass is the steadier comparison.

    python bench/train_step.py [--quick] [--rounds 5] [--threads both|2|1] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_section  # bench/results.py (this script's directory)

SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
MARK = "@@"  # prefix of the worker replies on stdout (libraries may print too)

LLM = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32.0
LR, WD, CLIP = 1e-3, 0.01, 1.0
SENTINEL = -201
PREFIX = 16  # text tokens before <video>
VISUAL = 150  # tokens replacing <video> (= the tiny Exo2Ego's [x ; F(x)], 2 x 75)
CHECK_STEPS = 3  # steps from the common initial state compared between the sides
SIZES = {"full": dict(batch=4, text=256), "quick": dict(batch=2, text=128)}


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    text: int  # text tokens per row including the placeholder

    @property
    def seq(self) -> int:
        return self.text + VISUAL - 1


# ----------------------------------------------------------------------------- FLOPs


def step_flops(shape: Shape) -> dict[str, float]:
    """Matmul FLOPs of one LoRA train step (multiply-add = 2 FLOPs).

    N = B·T tokens, P = frozen matmul parameters (7 projections x layers + LM head; the
    embedding is a gather), r = LoRA rank.
      forward   = 2·N·P  +  4·B·T²·n_h·d_h·layers (QKᵀ and PV, full square as both compute it)
                  +  2·N·r·Σ(in + out) over the adapted projections
      backward  = 1 x the frozen matmuls (activation gradients only; the frozen weights get no
                  gradient) + 2 x attention (both operands are activations) + 2 x LoRA (input
                  and weight gradients)
    Elementwise work (norms, RoPE, softmax, SiLU, cross-entropy, AdamW) is not counted.
    """
    b, t = shape.batch, shape.seq
    n = b * t
    d, f, v = LLM["hidden_size"], LLM["intermediate_size"], LLM["vocab_size"]
    hd = d // LLM["num_heads"]
    q, kv = LLM["num_heads"] * hd, LLM["num_kv_heads"] * hd
    projs = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    layers = LLM["num_layers"]
    p_frozen = layers * sum(i * o for i, o in projs) + d * v
    dense = 2 * n * p_frozen
    attn = layers * 4 * b * t * t * q
    lora = layers * sum(2 * n * RANK * (i + o) for i, o in projs)
    fwd = dense + attn + lora
    bwd = dense + 2 * attn + 2 * lora
    return dict(forward=fwd, backward=bwd, total=fwd + bwd, lm_head_share=2 * 2 * n * d * v)


# ----------------------------------------------------------------------------- data


def make_batch(shape: Shape):
    """Text ids / labels / mask with one sentinel per row, and the precomputed visual tokens."""
    import numpy as np

    rng = np.random.RandomState(0)
    b, length = shape.batch, shape.text
    ids = rng.randint(3, LLM["vocab_size"], (b, length)).astype(np.int32)
    ids[:, 0] = 1  # BOS
    ids[:, PREFIX] = SENTINEL
    mask = np.ones((b, length), np.int32)
    for row, pad in ((1, 24), (3, 57)):
        if row < b:
            mask[row, length - pad :] = 0
            ids[row, length - pad :] = 0
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, : PREFIX + 1] = -100  # supervise the text after the video only
    visual = (0.02 * rng.standard_normal((b, VISUAL, LLM["hidden_size"]))).astype(np.float32)
    return dict(input_ids=ids, labels=labels, attention_mask=mask, visual=visual)


# ----------------------------------------------------------------------------- workers


def _timed_step(run) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one step."""
    c0, t0 = os.times(), time.perf_counter()
    loss = run()
    t1, c1 = time.perf_counter(), os.times()
    return t1 - t0, (c1.user - c0.user) + (c1.system - c0.system), loss


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def _mistral_config(**kw):
    from exo2ego_jax.models.lora import LoRAConfig
    from exo2ego_jax.models.mistral import MistralConfig

    return MistralConfig(
        **LLM,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        sliding_window=None,
        max_position_embeddings=4096,
        lora=LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=TARGETS),
        **kw,
    )


def _optax_optimizer():
    import optax

    # As train.make_optimizer (clip, then AdamW), with a constant learning rate.
    return optax.chain(
        optax.clip_by_global_norm(CLIP),
        optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD),
    )


def _llm_step_fns(module, optimizer):
    """``loss_fn(lora, frozen, batch)`` and the train ``step`` of the LLM-only benchmark."""
    import jax
    import jax.numpy as jnp
    import optax

    from exo2ego_jax import losses, stages
    from exo2ego_jax.models.splice import splice_batch

    def loss_fn(lora, frozen, batch):
        p = stages.merge_params(lora, frozen)["llm"]
        ids = batch["input_ids"]
        text = module.apply({"params": p}, jnp.where(ids == SENTINEL, 0, ids), method="embed")
        embeds, mask, labels = splice_batch(
            ids, text, batch["visual"], batch["attention_mask"], batch["labels"], SENTINEL
        )
        logits = module.apply({"params": p}, inputs_embeds=embeds, attention_mask=mask).logits
        return losses.vtg_loss(logits, labels)[0]

    def step(lora, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, (loss, optax.tree.norm(grads))

    return loss_fn, step


def _unrolled_cost(make, *args) -> float | None:
    """XLA's FLOP count of ``make()`` lowered (not compiled) on abstract ``args``.

    Used with layers unrolled: XLA's cost analysis counts a scanned layer body once.
    """
    import jax

    try:
        cost = jax.jit(make()).lower(*args).cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def worker_ours(workdir: Path, shape: Shape, args) -> dict:
    """Our LLM-only stage-3 step; writes the shared weights for the PyTorch side."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from exo2ego_jax import stages
    from exo2ego_jax.models.mistral import MistralLM
    from exo2ego_jax.weights.hf_mistral import save_mistral

    cfg = _mistral_config(scan_layers=args.layout == "scan", remat_policy=args.remat)
    module = MistralLM(cfg)
    init = jax.jit(lambda k: nn.unbox(module.init(k, jnp.zeros((1, 2), jnp.int32))["params"]))
    params = init(jax.random.key(0))
    save_mistral(cfg, params, workdir / "hf")  # lora_b == 0: the merge is the base exactly
    flat = {}  # "{layer}/{projection}" -> lora_a as torch's [r, in]
    for path, v in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] != "lora_a":
            continue
        proj = names[-2]
        if names[0] == "layers":  # scanned: leading layer axis
            for i in range(cfg.num_layers):
                flat[f"{i}/{proj}"] = np.asarray(v[i]).T.copy()
        else:  # layers_{i}
            flat[f"{names[0].split('_')[1]}/{proj}"] = np.asarray(v).T.copy()
    np.savez(workdir / "lora_a.npz", **flat)

    lora, frozen = stages.split_params({"llm": params}, (r"^llm/.*/lora_[ab]$",))
    del params
    batch = {k: jnp.asarray(v) for k, v in make_batch(shape).items()}
    optimizer = _optax_optimizer()
    opt_state = optimizer.init(lora)

    loss_fn, step = _llm_step_fns(module, optimizer)

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(lora, opt_state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    state = {"lora": lora, "opt": opt_state}

    def run():
        state["lora"], state["opt"], (loss, gnorm) = compiled(
            state["lora"], state["opt"], frozen, batch
        )
        return float(loss), float(gnorm)

    # The forward alone (profiling aid): loss of the same batch, no gradient.
    fwd = jax.jit(loss_fn).lower(lora, frozen, batch).compile()

    def run_fwd():
        return float(fwd(state["lora"], frozen, batch))

    # The matmul "peak": one 2048² float32 dot, and two independent ones in one program (XLA
    # may run a single dot on one thread; the pair can occupy both cores).
    a, b = (jax.random.normal(jax.random.key(i), (2048, 2048), jnp.float32) for i in (1, 2))
    one = jax.jit(jnp.dot).lower(a, a).compile()
    two = jax.jit(lambda a, b: (a @ a, b @ b)).lower(a, b).compile()

    def peak():
        out = {}
        for name, fn, flop in (("one", one, 2 * 2048**3), ("two", two, 4 * 2048**3)):
            jax.block_until_ready(fn(a, b) if name == "two" else fn(a, a))
            runs = [
                _timed_step(
                    lambda fn=fn, name=name: jax.block_until_ready(
                        fn(a, b) if name == "two" else fn(a, a)
                    )
                )
                for _ in range(5)
            ]
            wall, cpu, _ = sorted(runs)[len(runs) // 2]
            out[name] = (flop / wall, flop / max(cpu, 1e-9))
        return out

    # XLA's own FLOP count, on the same step with unrolled layers.
    unrolled = MistralLM(dataclasses.replace(cfg, scan_layers=False))
    abstract = jax.eval_shape(
        lambda k: nn.unbox(unrolled.init(k, jnp.zeros((1, 2), jnp.int32))["params"]),
        jax.random.key(0),
    )
    u_lora, u_frozen = stages.split_params({"llm": abstract}, (r"^llm/.*/lora_[ab]$",))
    u_loss, u_step = _llm_step_fns(unrolled, optimizer)
    u_args = (u_lora, _abstract(optimizer.init(u_lora)), u_frozen, _abstract(batch))

    return dict(
        run=run,
        extra={"forward": run_fwd, "peak": peak},
        info=dict(
            compile_s=compile_s,
            xla_flops=_cost_flops(compiled),
            xla_flops_forward=_cost_flops(fwd),
            xla_unrolled=_unrolled_cost(lambda: u_step, *u_args),
            xla_unrolled_forward=_unrolled_cost(lambda: u_loss, u_lora, u_frozen, _abstract(batch)),
            version=f"jax {jax.__version__}",
        ),
    )


def worker_full(workdir: Path, shape: Shape, args) -> dict:
    """Our full stage-3 step (ego CLIP + STC connector + F + LLM with LoRA), tiny encoder."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from exo2ego_jax import stages
    from exo2ego_jax.models import clip as clip_lib
    from exo2ego_jax.models import connector as connector_lib
    from exo2ego_jax.models import exo2ego

    llm = _mistral_config(scan_layers=args.layout == "scan", remat_policy=args.remat)
    clip = clip_lib.tiny(image_size=32, patch_size=4)
    cfg = exo2ego.tiny(
        llm=llm,
        connector=connector_lib.tiny(in_channels=clip.hidden_size, out_size=llm.hidden_size),
    )
    assert cfg.visual_tokens_in_prompt == VISUAL, cfg.visual_tokens_in_prompt
    model = exo2ego.Exo2Ego(cfg)
    params = model.init(jax.random.key(0))
    stage = stages.StageConfig(stage=3)
    trainable, frozen = stages.split_params(params, stages.trainable_patterns(stage, model))
    del params
    b = make_batch(shape)
    frames = np.random.RandomState(1).standard_normal((shape.batch, cfg.num_frames, 32, 32, 3))
    batch = {
        "instruct": {
            "frames": jnp.asarray(frames, jnp.float32),
            **{k: jnp.asarray(b[k]) for k in ("input_ids", "labels", "attention_mask")},
        }
    }
    optimizer = _optax_optimizer()
    opt_state = optimizer.init(trainable)
    step = stages.make_train_step(model, stage, optimizer)
    t0 = time.perf_counter()
    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled = jitted.lower(trainable, opt_state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    state = {"t": trainable, "o": opt_state}

    def run():
        state["t"], state["o"], m = compiled(state["t"], state["o"], frozen, batch)
        return float(m["loss"]), float(m["grad_norm"])

    u_model = exo2ego.Exo2Ego(
        dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=False))
    )
    u_abstract = u_model.abstract_params()
    u_t, u_f = stages.split_params(u_abstract, stages.trainable_patterns(stage, u_model))
    u_args = (u_t, _abstract(optimizer.init(u_t)), u_f, _abstract(batch))

    return dict(
        run=run,
        extra={},
        info=dict(
            compile_s=compile_s,
            xla_flops=_cost_flops(compiled),
            xla_unrolled=_unrolled_cost(
                lambda: stages.make_train_step(u_model, stage, optimizer), *u_args
            ),
            trainable=stages.count_params(trainable),
            version=f"jax {jax.__version__}",
        ),
    )


def _lora_linear(base, a, scale):
    """Hand-written LoRA (only without peft): frozen ``base`` Linear + scale · B(A(x)), B = 0."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Parameter(a.clone())  # [r, in]
            self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, a.shape[0]))

        def forward(self, x):
            h = torch.nn.functional.linear(x, self.lora_a)
            return self.base(x) + scale * torch.nn.functional.linear(h, self.lora_b)

    return LoRALinear()


def worker_theirs(workdir: Path, shape: Shape, args) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32)
    model.train()  # dropout is 0 everywhere; train mode as a training loop would be
    a_np = np.load(workdir / "lora_a.npz")

    def a_of(layer: int, name: str):
        return torch.from_numpy(a_np[f"{layer}/{name}"])  # [r, in]

    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None and not args.no_peft:
        lcfg = peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, bias="none"
        )
        model = peft.get_peft_model(model, lcfg)
        layers = model.base_model.model.model.layers
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for name in TARGETS:
                    part = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
                    mod = getattr(part, name)
                    mod.lora_A["default"].weight.copy_(a_of(i, name))
                    assert not mod.lora_B["default"].weight.any()
        lora_impl = f"peft {peft.__version__}"
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(model.model.layers):
            for name in TARGETS:
                part = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
                setattr(part, name, _lora_linear(getattr(part, name), a_of(i, name), ALPHA / RANK))
        lora_impl = "hand-written adapters"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)

    b = make_batch(shape)
    ids = torch.from_numpy(np.where(b["input_ids"] == SENTINEL, 0, b["input_ids"])).long()
    visual = torch.from_numpy(b["visual"])
    m, lab = torch.from_numpy(b["attention_mask"]).long(), torch.from_numpy(b["labels"]).long()
    vis_mask = torch.ones(shape.batch, VISUAL, dtype=torch.long)
    vis_lab = torch.full((shape.batch, VISUAL), -100, dtype=torch.long)
    mask = torch.cat([m[:, :PREFIX], vis_mask, m[:, PREFIX + 1 :]], 1)
    labels = torch.cat([lab[:, :PREFIX], vis_lab, lab[:, PREFIX + 1 :]], 1)
    embed = model.get_input_embeddings()

    def run():
        text = embed(ids)
        embeds = torch.cat([text[:, :PREFIX], visual, text[:, PREFIX + 1 :]], 1)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss), float(gnorm)

    a = torch.randn(2048, 2048)

    def peak():
        torch.mm(a, a)
        runs = [_timed_step(lambda: torch.mm(a, a)) for _ in range(5)]
        wall, cpu, _ = sorted(runs)[len(runs) // 2]
        return {"one": (2 * 2048**3 / wall, 2 * 2048**3 / max(cpu, 1e-9))}

    return dict(
        run=run,
        extra={"peak": peak},
        info=dict(
            version=f"torch {torch.__version__} ({torch.get_num_threads()} thread"
            f"{'s' if torch.get_num_threads() > 1 else ''}), "
            f"transformers {transformers.__version__}, {lora_impl}",
            attn=model.config._attn_implementation,
        ),
    )


WORKERS = {"ours": worker_ours, "theirs": worker_theirs, "full": worker_full}


def serve(side: str, workdir: Path, shape: Shape, args) -> None:
    """Builds one side, runs the check steps, then answers ``step`` / extra commands."""
    t0 = time.perf_counter()
    w = WORKERS[side](workdir, shape, args)
    setup_s = time.perf_counter() - t0
    check = [w["run"]() for _ in range(CHECK_STEPS if side != "full" else 2)]

    def reply(obj):
        print(MARK + json.dumps(obj), flush=True)

    reply(dict(ready=True, setup_s=setup_s, check=check, **w["info"]))
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        if cmd == "step":
            wall, cpu, out = _timed_step(w["run"])
            reply(dict(wall=wall, cpu=cpu, loss=out[0]))
        elif cmd in w["extra"]:
            fn = w["extra"][cmd]
            if cmd == "peak":
                reply(dict(value=fn()))
            else:
                wall, cpu, _ = _timed_step(fn)
                reply(dict(wall=wall, cpu=cpu))
        else:
            reply(dict(error=f"unknown command {cmd!r}"))


# ----------------------------------------------------------------------------- parent


class Worker:
    """One ``--worker side`` process answering ``step`` / ``quit`` on stdin. ``tree``: run
    that checkout's copy of this script (its code on ``PYTHONPATH``; default this one)."""

    def __init__(self, side: str, workdir: Path, args, threads: int = 2, tree: Path | None = None):
        self.side = side
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        env["BENCH_THREADS"] = str(threads)
        if threads == 1:
            env["XLA_FLAGS"] = SINGLE_THREAD_XLA
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        script = tree / "bench" / "train_step.py" if tree is not None else Path(__file__)
        cmd = [sys.executable, str(script), "--worker", side, "--workdir", str(workdir)]
        cmd += ["--layout", args.layout, "--remat", args.remat]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--no-peft"] if args.no_peft else []
        self.log = open(workdir / f"{side}.log", "w")
        # One thread each: XLA's thunk runtime still runs independent ops concurrently, so the
        # process is also pinned to one CPU (the same one for every worker).
        cpu = min(os.sched_getaffinity(0))
        pin = (lambda: os.sched_setaffinity(0, {cpu})) if threads == 1 else None
        self.proc = subprocess.Popen(
            cmd,
            cwd=tree,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            preexec_fn=pin,
        )
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                out = json.loads(line[len(MARK) :])
                if "error" in out:
                    raise RuntimeError(f"{self.side}: {out['error']}")
                return out
        self.log.flush()
        tail = Path(self.log.name).read_text()[-4000:]
        raise RuntimeError(f"{self.side} worker died:\n{tail}")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="batch 2 x 128 text, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per side")
    parser.add_argument("--layout", default="scan", choices=("scan", "unrolled"))
    parser.add_argument(
        "--remat", default="none", choices=("none", "full", "dots", "dots_no_batch")
    )
    parser.add_argument("--no-full", action="store_true", help="skip our full stage-3 step")
    parser.add_argument("--no-peft", action="store_true", help="hand-written torch adapters")
    parser.add_argument(
        "--threads",
        default="both",
        choices=("2", "1", "both"),
        help="threads per side: 2 (torch.set_num_threads(2), XLA's default pool), 1 (one "
        "thread, pinned to one CPU: much less sensitive to other load), or both (default)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    shape = Shape(**SIZES["quick" if args.quick else "full"])
    if args.worker:
        serve(args.worker, Path(args.workdir), shape, args)
        return
    rounds = args.rounds or (3 if args.quick else 5)
    settings = {"2": (2,), "1": (1,), "both": (2, 1)}[args.threads]
    t_start = time.perf_counter()
    passes = [run_pass(args, shape, rounds, threads) for threads in settings]
    summary = summarize(args, shape, rounds, passes, time.perf_counter() - t_start)
    print(summary)
    if not args.no_write:
        write_section("train_step", summary)


def run_pass(args, shape: Shape, rounds: int, threads: int) -> dict:
    """Starts the workers with ``threads`` threads each and times them, interleaved."""
    print(f"--- {threads} thread(s) per side", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="train_step_"))
    workers: dict[str, Worker] = {}
    with_full = not args.no_full and threads == 2
    try:
        load = [os.getloadavg()]
        # One at a time: the PyTorch side reads the weights the ours side writes, and no
        # compile overlaps another side's steps.
        for side in ("ours", "theirs") + (("full",) if with_full else ()):
            workers[side] = Worker(side, tmp, args, threads)
            print(f"{side}: ready in {workers[side].info['setup_s']:.1f}s", flush=True)
        ours, theirs = workers["ours"].info, workers["theirs"].info
        diffs = [abs(a[0] - b[0]) for a, b in zip(ours["check"], theirs["check"], strict=True)]
        print(f"losses ours {[c[0] for c in ours['check']]}")
        print(f"losses theirs {[c[0] for c in theirs['check']]}")
        if diffs[0] > 1e-4:
            raise SystemExit(f"first-step losses differ by {diffs[0]:.2e} > 1e-4; not timing")

        times: dict[str, list[tuple[float, float]]] = {s: [] for s in workers}
        if threads == 2:
            times["forward"] = []  # the profiling aid: first pass only
        peaks: dict[str, list[dict]] = {"jax": [], "torch": []}
        sides = list(workers)
        for r in range(rounds):
            load.append(os.getloadavg())
            peaks["jax"].append(workers["ours"].ask("peak")["value"])
            peaks["torch"].append(workers["theirs"].ask("peak")["value"])
            order = sides[r % len(sides) :] + sides[: r % len(sides)]  # rotate who goes first
            for side in order:
                out = workers[side].ask("step")
                times[side].append((out["wall"], out["cpu"]))
            if "forward" in times:
                out = workers["ours"].ask("forward")
                times["forward"].append((out["wall"], out["cpu"]))
            print(
                f"round {r}: "
                + ", ".join(f"{s} {v[-1][0]:.2f}s" for s, v in times.items())
                + f"; peak {max(v[0] for v in peaks['jax'][-1].values()) / 1e9:.0f} GFLOP/s"
                + f"; load {load[-1][0]:.1f}",
                flush=True,
            )
        load.append(os.getloadavg())
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    infos = {s: w.info for s, w in workers.items()}
    return dict(threads=threads, infos=infos, times=times, peaks=peaks, load=load)


def summarize_pass(p: dict, shape: Shape, rounds: int) -> list[str]:
    """One ``### n threads`` subsection: table, correctness, peak, raw times."""
    infos, times, peaks, load = p["infos"], p["times"], p["peaks"], p["load"]
    ours, theirs = infos["ours"], infos["theirs"]
    flops = step_flops(shape)
    side_flops = {s: flops["total"] for s in ("ours", "theirs", "full")}
    side_flops["forward"] = flops["forward"]
    # Per round: the better of one 2048² dot and two independent ones, in wall-clock FLOP/s
    # and in FLOPs per CPU-second of the process.
    peak_wall = [max(x["one"][0], x["two"][0]) for x in peaks["jax"]]
    peak_cpu = [max(x["one"][1], x["two"][1]) for x in peaks["jax"]]
    med = {s: statistics.median(w for w, _ in v) for s, v in times.items()}
    lo = {s: min(w for w, _ in v) for s, v in times.items()}
    cores = {s: statistics.median(c / w for w, c in v) for s, v in times.items()}
    # MFU per round against the peak measured just before (same load), median over rounds;
    # and per CPU-second (FLOPs per CPU-second of the process / the matmul's): insensitive to
    # time spent descheduled by other jobs, but counts spin-waiting as work.
    mfu = {
        s: statistics.median(side_flops[s] / w / q for (w, _), q in zip(v, peak_wall, strict=True))
        for s, v in times.items()
    }
    mfu_cpu = {
        s: statistics.median(side_flops[s] / c / q for (_, c), q in zip(v, peak_cpu, strict=True))
        for s, v in times.items()
    }
    paired = statistics.median(
        t / o for (o, _), (t, _) in zip(times["ours"], times["theirs"], strict=True)
    )
    diffs = [abs(a[0] - b[0]) for a, b in zip(ours["check"], theirs["check"], strict=True)]
    gdiffs = [abs(a[1] - b[1]) / b[1] for a, b in zip(ours["check"], theirs["check"], strict=True)]

    def row(name, side, ratio, note=""):
        return (
            f"| {name} | {med[side]:.2f} ({lo[side]:.2f}) | {1 / med[side]:.3f} | "
            f"{cores[side]:.2f} | {ratio} | {mfu[side]:.0%}{note} | {mfu_cpu[side]:.0%} |"
        )

    rows = [
        row(
            "ours, LLM step (`MistralLM` + LoRA, jit, donated)",
            "ours",
            f"**{paired:.2f}x** ({lo['theirs'] / lo['ours']:.2f}x)",
        ),
        row(f"theirs, LLM step ({theirs['version'].split(', ')[-1]}, eager)", "theirs", "1"),
    ]
    if "full" in infos:
        rows.append(
            row(
                "ours, full stage-3 step (`make_train_step`: CLIP + STC + F + LLM)",
                "full",
                "—",
                " of LLM FLOPs",
            )
        )
    if "forward" in times:
        rows.append(row("ours, LLM forward + loss only (profiling aid)", "forward", "—", " (fwd)"))
    compile_s = f"ours {ours['compile_s']:.0f}s" + (
        f", full {infos['full']['compile_s']:.0f}s" if "full" in infos else ""
    )
    raw = {s: [round(w, 2) for w, _ in v] for s, v in times.items()}
    n = p["threads"]
    return [
        "",
        f"### {n} thread{'s' if n > 1 else ''} per side: {ours['version']}; "
        f"{theirs['version'].split(', transformers')[0]}; load average {load[0][0]:.1f} at start, "
        f"{statistics.median(x[0] for x in load[1:]):.1f} median over the rounds",
        "",
        "| step | s/step, median (min) | steps/s | CPU cores busy | ours/theirs speed, "
        "median of rounds (of minima) | MFU vs same-round peak | MFU per CPU-second |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Same loss: first {CHECK_STEPS} steps from the same weights, ours "
        f"{', '.join(f'{c[0]:.6f}' for c in ours['check'])} vs theirs "
        f"{', '.join(f'{c[0]:.6f}' for c in theirs['check'])} (|diff| "
        f"{', '.join(f'{d:.1e}' for d in diffs)}; pre-clip gradient norms within "
        f"{max(gdiffs):.1e} relative). Peak before each round: median "
        f"{statistics.median(peak_wall) / 1e9:.0f}, range {min(peak_wall) / 1e9:.0f}–"
        f"{max(peak_wall) / 1e9:.0f} GFLOP/s, {statistics.median(peak_cpu) / 1e9:.0f} GFLOP per "
        f"CPU-second (torch.mm: median "
        f"{statistics.median(x['one'][0] for x in peaks['torch']) / 1e9:.0f} GFLOP/s). Compile "
        f"(excluded): {compile_s}. Seconds per round: {raw}.",
    ]


def summarize(args, shape: Shape, rounds: int, passes: list[dict], total_s: float) -> str:
    """The Markdown section: common description, one subsection per thread setting, FLOPs."""
    first = passes[0]["infos"]
    ours, theirs = first["ours"], first["theirs"]
    flops = step_flops(shape)
    xla = [
        ("LLM step", ours.get("xla_unrolled")),
        ("LLM forward", ours.get("xla_unrolled_forward")),
    ]
    if "full" in first:
        xla.append(("full stage-3 step", first["full"].get("xla_unrolled")))
    xla_text = ", ".join(f"{v / 1e9:.1f} GFLOP for the {k}" for k, v in xla if v) or "n/a"
    xla_text += " (programs with unrolled layers, before optimisation"
    if args.layout == "scan" and ours.get("xla_flops"):
        xla_text += (
            f"; the compiled scanned step reports {ours['xla_flops'] / 1e9:.1f}: a scanned "
            "layer body is counted once"
        )
    xla_text += ")"
    cmd = "python bench/train_step.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a not in ("--no-write",)
    )
    lines = [
        f"## Stage-3 train step: ours (JAX) vs transformers + "
        f"{'peft' if 'peft' in theirs['version'] else 'hand-written LoRA'} (PyTorch), CPU float32",
        "",
        f"`{cmd}` — {datetime.date.today().isoformat()}, {os.cpu_count()} CPUs shared with "
        f"other jobs (load averages below), whole run {total_s:.0f}s. Mistral "
        f"{LLM['num_layers']} layers, d {LLM['hidden_size']}, {LLM['num_heads']} heads / "
        f"{LLM['num_kv_heads']} KV heads, FFN {LLM['intermediate_size']}, vocab "
        f"{LLM['vocab_size']}; LoRA r {RANK} / alpha {ALPHA:g} / dropout 0 on "
        f"{', '.join(t.split('_')[0] for t in TARGETS)}; batch {shape.batch} x ({shape.text} "
        f"text tokens, `<video>` -> {VISUAL} precomputed visual tokens) = {shape.batch} x "
        f"{shape.seq} positions; loss on the text after the video; global-norm clip {CLIP:g} + "
        f"AdamW (lr {LR:g}, wd {WD:g}) on the adapters, base frozen. Ours: layers "
        f"{args.layout}, remat {args.remat}, frozen base a non-differentiated argument, adapters "
        f"and optimizer state donated. Theirs: {theirs['version'].split(', ', 1)[1]}, "
        f"`MistralForCausalLM.from_pretrained` on our weights (`save_mistral`), attention "
        f"`{theirs['attn']}`, eager. The full stage-3 row (no counterpart) runs "
        f"`stages.make_train_step` on a tiny Exo2Ego (CLIP 32 px, STC connector, F; 4 frames -> "
        f"[x ; F(x)] = {VISUAL} tokens) with the same LLM. Each side is a persistent process; "
        f"{rounds} rounds of one timed step per side (first mover rotated) after "
        f"{CHECK_STEPS} warm-up steps. Ratio > 1: ours faster. MFU = counted FLOPs / step time / "
        f"the matmul peak measured just before that round (one 2048² float32 `jnp.dot`, or two "
        f"independent ones in one program, whichever is faster), median over rounds; 'per "
        f"CPU-second' divides FLOPs per CPU-second of the process by the matmul's.",
        "",
        f"FLOPs per LLM step, counted: {flops['total'] / 1e9:.1f} GFLOP (forward "
        f"{flops['forward'] / 1e9:.1f}, backward {flops['backward'] / 1e9:.1f}; LM head "
        f"{flops['lm_head_share'] / 1e9:.1f}) = forward [2·N·P_frozen + 4·B·T²·d·L (QKᵀ and PV, "
        f"full square, as both compute them) + 2·N·r·Σ(in+out) (LoRA)] + backward [1x the "
        f"frozen matmuls (activation gradients only; frozen weights get none) + 2x attention "
        f"+ 2x LoRA], N = B·T, P_frozen = 7 projections x L layers + LM head. XLA "
        f"`cost_analysis()`: {xla_text}.",
    ]
    for p in passes:
        lines += summarize_pass(p, shape, rounds)
    return "\n".join(lines)


if __name__ == "__main__":
    main()

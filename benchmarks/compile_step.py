"""The compiled weighting step (``LossReweighting(compile=...)``) against the eager one: launches, time, numbers.

Per configuration (a rule, checks read each step or deferred) and batch size:

* **launches**: what one step issues on a GPU. The eager step's ATen ops are counted on the ``meta`` device
  (as ``op_count.py``: every op but views and ``detach``). For the compiled step, the ops outside the compiled
  functions are counted the same way, plus the kernels Inductor generates for each compiled function (compiled
  on the CPU, whose C++ kernels fuse as the GPU's Triton kernels do: an estimate of the GPU count);
* **step time**: the median time of one ``run_step`` (the whole weighting step of a training step: checks, rule,
  combination, table update, the loss), eager and compiled, on ``--device`` (``cpu`` here; ``cuda`` on a GPU,
  synchronised around each step), after the compilation (its first call is timed separately);
* **agreement**: over ``--steps`` steps with repeated indices, the largest difference between the compiled and the
  eager weights, relative to the weight (float32 rounding is 6e-8), and between their tables.

    python benchmarks/compile_step.py [--quick] [--json PATH] [--out DIR] [--device cpu|cuda] [--mode MODE]

JSON figures (``<cfg>`` = ``linupper_sync``, ``linupper_nosync``, ``kl_dro_ema_sync``, ``kl_dro_ema_nosync``):
``launches_<cfg>_eager``, ``launches_<cfg>_compiled``, ``step_ms_<cfg>_eager``, ``step_ms_<cfg>_compiled``,
``compile_s_<cfg>`` (the first call's compilation), ``max_rel_weight_diff``, ``max_table_diff``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import legend_outside, parser, print_table, save_plot, setup_threads, write_json  # noqa: E402

NUM_SAMPLES = 4096
CONFIGS = {
    "linupper": dict(rule="linupper", warmup_steps=0),
    "kl_dro_ema": dict(rule="kl_dro", normalizer="ema", max_weight=5.0),
}


def make(name: str, sync: bool, compile: Any) -> Any:
    from lightning_reweight import LossReweighting

    return LossReweighting(**CONFIGS[name], num_samples=NUM_SAMPLES, sync_checks=sync, log_every_n_steps=0,
                           compile=compile)


def _step_fn(cb: Any, device: Any) -> Any:
    import torch

    import lightning_reweight.engine as engine
    from lightning_reweight.doors.loop import LoopContext

    model = torch.nn.Linear(4, 1).to(device)
    ctx = LoopContext([cb], module=model)

    def step(losses: Any, index: Any) -> Any:
        return engine.run_step([cb], ctx, model, losses, index)

    return step


def launches(name: str, sync: bool, mode: str | None, batch: int) -> tuple[int, int]:
    """``(ops outside compiled functions, Inductor kernels of the compiled functions)`` of one step (``mode=None``:
    the eager step, second value 0)."""
    import op_count
    import torch
    import torch._inductor.metrics as metrics

    import lightning_reweight.engine as engine
    from lightning_reweight._compile import CompiledFunction

    meta = torch.device("meta")
    cb = make(name, sync, False)
    graphs: list[tuple[Any, tuple[Any, ...]]] = []
    counter = op_count._counter()
    if mode is not None:  # count the compiled functions' calls apart: run them eagerly on meta, uncounted
        call = CompiledFunction.__call__

        def uncounted(self: Any, *args: Any) -> Any:
            graphs.append((self.fn, args))
            ops = dict(counter.ops)
            out = self.fn(*args)
            counter.ops.clear()
            counter.ops.update(ops)
            return out

        cb._rule_graph = CompiledFunction(cb._tensor_rule, mode, "rule")
        CompiledFunction.__call__ = uncounted
    step = _step_fn(cb, meta)
    index = torch.arange(batch, device=meta)
    read = engine._read
    engine._read = lambda packed, layout: [True] * len(layout)  # a meta tensor holds no value: "valid"
    try:
        for _ in range(2):  # warm: the table exists, the state lives on the device
            step(torch.empty(batch, device=meta, requires_grad=True), index)
            if mode is not None and cb.table.compiled is None:
                cb.table.compile(mode)
        graphs.clear()
        with counter:
            step(torch.empty(batch, device=meta, requires_grad=True), index)
    finally:
        engine._read = read
        if mode is not None:
            CompiledFunction.__call__ = call
    outside = sum(counter.ops.values())
    kernels = 0
    for fn, args in graphs:  # compile each function on CPU tensors of the same shapes and count its kernels
        cpu_args = _to_cpu(args)
        torch._dynamo.reset()
        before = metrics.generated_kernel_count
        from torch._inductor import config

        with config.patch({"fx_graph_cache": False}):
            torch.compile(fn, fullgraph=True)(*cpu_args)
        kernels += metrics.generated_kernel_count - before
    return outside, kernels


def _to_cpu(args: Any) -> Any:
    import torch

    if isinstance(args, torch.Tensor):
        if args.device.type == "meta":
            if args.dtype == torch.int64:
                return torch.randint(0, NUM_SAMPLES, args.shape)
            if args.dtype == torch.bool:
                return torch.zeros(args.shape, dtype=torch.bool)
            return torch.rand(args.shape, dtype=args.dtype)
        return args.cpu()
    if isinstance(args, (tuple, list)):
        return type(args)(_to_cpu(a) for a in args)
    return args


def timed_run(name: str, sync: bool, compile: Any, batch: int, steps: int, device: str) -> dict[str, Any]:
    """Run ``steps`` steps (a fixed stream of losses and repeated indices) and time each after the first."""
    import torch

    cb = make(name, sync, compile)
    step = _step_fn(cb, device)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(batch, generator=g) * 4, torch.randint(0, NUM_SAMPLES, (batch,), generator=g))
            for _ in range(steps)]
    times, weights = [], []
    first = 0.0
    for i, (losses, index) in enumerate(data):
        losses = losses.to(device).requires_grad_()
        index = index.to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(losses, index)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i < 2:
            first += dt  # the compilation (first shape, then the state's tensor on the second step)
        else:
            times.append(dt)
        weights.append(cb.last_weights.detach().cpu().clone())
    cb.check_deferred()  # the deferred checks of the run (sync_checks=False) hold
    times.sort()
    return {"median_ms": 1e3 * times[len(times) // 2], "first_s": first, "weights": weights,
            "table": {k: v.cpu() for k, v in cb.table.columns.items()}}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    setup_threads(args.threads)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("compile_step.py: --device cuda needs a CUDA device")
    steps = 40 if args.quick else args.steps
    rows, figures = [], {}
    max_rel, max_table = 0.0, 0.0
    for name in CONFIGS:
        for sync in (True, False):
            cfg = f"{name}_{'sync' if sync else 'nosync'}"
            eager_ops, _ = launches(name, sync, None, args.batch)
            outside, kernels = launches(name, sync, args.mode, args.batch)
            torch._dynamo.reset()
            eager = timed_run(name, sync, False, args.batch, steps, args.device)
            compiled = timed_run(name, sync, args.mode, args.batch, steps, args.device)
            for a, b in zip(eager["weights"], compiled["weights"]):
                max_rel = max(max_rel, float(((a - b).abs() / a.abs().clamp_min(1e-30)).max()))
            for k, col in eager["table"].items():
                diff = (col.double() - compiled["table"][k].double()).nan_to_num(0.0).abs().max()
                max_table = max(max_table, float(diff))
            figures.update({f"launches_{cfg}_eager": float(eager_ops), f"launches_{cfg}_compiled": float(outside + kernels),
                            f"step_ms_{cfg}_eager": eager["median_ms"], f"step_ms_{cfg}_compiled": compiled["median_ms"],
                            f"compile_s_{cfg}": compiled["first_s"]})
            rows.append({"config": cfg, "launches eager": eager_ops,
                         "launches compiled (outside + kernels)": f"{outside + kernels} ({outside} + {kernels})",
                         f"step ms eager ({args.device})": f"{eager['median_ms']:.3f}",
                         f"step ms compiled ({args.device})": f"{compiled['median_ms']:.3f}",
                         "compile s": f"{compiled['first_s']:.1f}"})
    figures["max_rel_weight_diff"] = max_rel
    figures["max_table_diff"] = max_table
    print_table(rows, title=f"one weighting step, batch {args.batch}, mode {args.mode!r}, median of "
                            f"{steps - 2} steps on {args.device}")
    print(f"largest compiled-vs-eager difference over {steps} steps: weights {max_rel:.2e} (relative), "
          f"table {max_table:.2e} (absolute)")
    write_json(args.json, figures, table=rows, batch=args.batch, device=args.device, mode=args.mode)
    _plot(rows, figures, args)


def _plot(rows: list[dict[str, Any]], figures: dict[str, float], args: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    x = range(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar([i - 0.2 for i in x], [figures[f"launches_{n}_eager"] for n in names], 0.4, label="eager")
    a.bar([i + 0.2 for i in x], [figures[f"launches_{n}_compiled"] for n in names], 0.4, label="compiled")
    a.set_xticks(list(x), names, rotation=20)
    a.set_ylabel("kernel launches per step (count)")
    a.set_title(f"Launches of one step, batch {args.batch}")
    b.bar([i - 0.2 for i in x], [figures[f"step_ms_{n}_eager"] for n in names], 0.4, label="eager")
    b.bar([i + 0.2 for i in x], [figures[f"step_ms_{n}_compiled"] for n in names], 0.4, label="compiled")
    b.set_xticks(list(x), names, rotation=20)
    b.set_ylabel(f"median step time on {args.device} (ms)")
    b.set_title(f"Time of one step ({args.device}, mode {args.mode!r})")
    legend_outside(b)
    save_plot(fig, args.out, "compile_step", quick=args.quick)


if __name__ == "__main__":
    main()

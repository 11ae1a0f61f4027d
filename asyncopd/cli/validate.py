"""`asyncopd validate`: the plan as a table, every problem, and the verdict (exit 0 runs, 2 does not)."""

from asyncopd.bench.table import format_table
from asyncopd.config.resources import format_bytes
from asyncopd.config.schema import Config
from asyncopd.validation.rules import report

COLUMNS = [("role", "role", "s"), ("backend", "backend", "s"), ("layout", "layout", "s"), ("gpus", "GPUs", "s"),
           ("params", "params", "s"), ("grads", "grads", "s"), ("optimizer", "optimizer", "s"),
           ("activations", "activations", "s"), ("kv", "KV cache", "s"), ("total", "total/GPU", "s"),
           ("source", "model shape from", "s")]


def render(cfg: Config) -> tuple[str, bool]:
    """The report's text, and whether the config can run (this machine's problems are shown, not counted)."""
    the_plan, found, host = report(cfg)
    lines = []
    if the_plan is not None:
        rows = [{"role": p.role, "backend": p.backend, "layout": p.layout, "gpus": f"{p.gpus:g}",
                 "params": format_bytes(p.memory.params_bytes), "grads": format_bytes(p.memory.grads_bytes),
                 "optimizer": format_bytes(p.memory.optimizer_bytes),
                 "activations": format_bytes(p.memory.activations_bytes),
                 "kv": format_bytes(p.memory.kv_cache_bytes), "total": format_bytes(p.memory.total_bytes),
                 "source": p.source} for p in the_plan.roles]
        c = cfg.cluster
        gpus = (f"{c.nodes} x {c.gpus_per_node} = {the_plan.gpus_available} GPUs"
                + (f" of {c.gpu_memory_gib:g} GiB" if c.gpu_memory_gib else "")) if the_plan.gpus_available \
            else "no GPUs (a CPU machine: GPU totals and memory are not checked)"
        lines += [f"asyncopd validate: {cfg.run.experiment} on {gpus}; sequences up to {the_plan.seq_len} tokens",
                  "", format_table(rows, COLUMNS), "", "formulas (per GPU):"]
        lines += [f"  {p.role}: {p.memory.formula}" for p in the_plan.roles]
    if found:
        lines += ["", f"cannot run: {len(found)} problem(s)"] + [f"  - [{p.field}] {p.message}" for p in found]
    if host:
        lines += ["", "on this machine (checked again when a run starts):"]
        lines += [f"  - [{p.field}] {p.message}" for p in host]
    lines += ["", "verdict: " + ("can run" if not found else "cannot run")]
    return "\n".join(lines), not found

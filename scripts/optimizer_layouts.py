"""AdamW with the official per-tensor clip and the teacher's EMA, compiled in three layouts of
the state, to see whether flat buffers give XLA fewer and larger kernels.

- `tensors`: one array per tensor (the train state's layout, dino_jax/optim.py);
- `concat`: the same state, concatenated into one vector inside the step and split after;
- `flat`: student, teacher and both moments kept as one vector each (a changed state layout);
  the gradients still arrive per tensor, as the backward pass makes them.

For each: the fused ops of the compiled program's entry computation, the entry parameters it
copies instead of updating in place, and the time of an update (median of --repeats) on the
default device. The tensors are ViT-S/16's matmul weights and biases (12 blocks) and the
65,536 x 256 last layer; --blocks and --prototypes change the sizes.

    python scripts/optimizer_layouts.py [--blocks 12] [--prototypes 65536] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

B1, B2, EPS, CLIP, LR, WD, MOMENTUM = 0.9, 0.999, 1e-8, 3.0, 1e-3, 0.04, 0.996
OP = re.compile(r"=\s*\S+\s+([\w\-]+)\(")


def shapes(blocks: int, prototypes: int, dim: int = 384) -> list[tuple[int, ...]]:
    block = [(dim, 3 * dim), (3 * dim,), (dim, dim), (dim,)]  # qkv, proj
    block += [(dim, 4 * dim), (4 * dim,), (4 * dim, dim), (dim,)]  # fc1, fc2
    return block * blocks + [(256, prototypes)]


def clipped(g: jax.Array) -> jax.Array:
    coef = CLIP / (jnp.linalg.norm(g) + 1e-6)
    return jnp.where(coef < 1.0, g * coef, g)


def adamw(g, p, mu, nu, t):
    mu = B1 * mu + (1 - B1) * g
    nu = B2 * nu + (1 - B2) * jnp.square(g)
    denom = jnp.sqrt(nu) / jnp.sqrt(1 - B2**t) + EPS
    return p - (LR / (1 - B1**t)) * mu / denom - LR * WD * p, mu, nu


def per_tensor(grads, student, teacher, mu, nu, t):
    out = [adamw(clipped(g), *s, t) for g, *s in zip(grads, student, mu, nu, strict=True)]
    student, mu, nu = ([o[i] for o in out] for i in range(3))
    teacher = [MOMENTUM * a + (1 - MOMENTUM) * b for a, b in zip(teacher, student, strict=True)]
    return student, teacher, mu, nu


def concatenated(grads, student, teacher, mu, nu, t):
    def flat(xs):
        return jnp.concatenate([x.reshape(-1) for x in xs])

    def split(v):
        ends = np.cumsum([x.size for x in student])
        return [v[e - x.size : e].reshape(x.shape) for x, e in zip(student, ends, strict=True)]

    p, m, n = adamw(flat([clipped(g) for g in grads]), flat(student), flat(mu), flat(nu), t)
    teacher = MOMENTUM * flat(teacher) + (1 - MOMENTUM) * p
    return split(p), split(teacher), split(m), split(n)


def flat_state(grads, student, teacher, mu, nu, t):
    g = jnp.concatenate([clipped(x).reshape(-1) for x in grads])
    student, mu, nu = adamw(g, student, mu, nu, t)
    return student, MOMENTUM * teacher + (1 - MOMENTUM) * student, mu, nu


LAYOUTS = {"tensors": per_tensor, "concat": concatenated, "flat": flat_state}


def measure(layout: str, sizes: list[tuple[int, ...]], repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(0), len(sizes))
    grads = [jax.random.normal(k, s) for k, s in zip(keys, sizes, strict=True)]

    def state():  # fresh buffers for every call: they are donated
        tensors = [jnp.full(s, 0.5) for s in sizes]
        if layout == "flat":
            n = sum(int(np.prod(s)) for s in sizes)
            return [jnp.full((n,), 0.5) for _ in range(4)]
        return [[jnp.copy(x) for x in tensors] for _ in range(4)]

    step = jax.jit(LAYOUTS[layout], donate_argnums=(1, 2, 3, 4))
    t = jnp.float32(1.0)
    text = step.lower(grads, *state(), t).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    ops = Counter(m.group(1) for m in map(OP.search, entry.splitlines()) if m)
    copies = len(re.findall(r"\scopy\(%?(?:student|teacher|mu|nu)", entry))
    times = []
    for _ in range(repeats + 1):
        args = state()
        jax.block_until_ready(args)
        start = time.perf_counter()
        jax.block_until_ready(step(grads, *args, t))
        times.append(time.perf_counter() - start)
    return {
        "layout": layout,
        "tensors": len(sizes),
        "device": jax.devices()[0].device_kind,
        "fusions": ops["fusion"],
        "entry_ops": sum(v for k, v in ops.items() if k != "parameter"),
        "parameter_copies": copies,
        "update_ms": 1e3 * float(np.median(times[1:])),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = shapes(args.blocks, args.prototypes)
    results = [measure(layout, sizes, args.repeats) for layout in LAYOUTS]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()

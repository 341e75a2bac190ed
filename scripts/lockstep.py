"""The official training loop and dino_jax's step in lockstep: same weights, same crops.

    python scripts/lockstep.py --official PATH/TO/dino [--steps 60] [--seed 0]

main_dino.py's set-up runs as scripts/official_side.py does it (seeded networks, loader,
AdamW, schedules of the recipe's full run); dino_jax's state starts from the official
networks' initial weights, with the recipe's compiled update (dino_jax.recipe.build, the
trainer's own). For each of the first --steps iterations the official loader's batch (its
own crops) goes through main_dino.train_one_epoch for one iteration and through our update;
it prints both losses and, every 10 steps, the relative distance between the two students'
and the two teachers' parameters and centers. Float32 differences of the order of 1e-6 grow
in a chaotic training run, slowly; a different update moves the figures apart at once.

`--save_init FILE` writes the official networks' initial weights instead, so that
`python train.py --config.init_from=FILE` trains ours from the official start.

Run it with the environment scripts/compare_official.py names.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FirstBatches:
    """The first `n` batches of a data loader, kept, with the real loader's length
    (train_one_epoch indexes the schedules by len(loader) * epoch + iteration)."""

    def __init__(self, loader, n: int):
        self.loader, self.n, self.kept = loader, n, []

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                return
            self.kept.append(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def flat(state: dict) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for _, v in sorted(state.items())])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--official", required=True)
    p.add_argument("--config", default=os.path.join("configs", "demo.py"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save_init",
        default=None,
        help="only write the official networks' initial weights as a main_dino checkpoint"
        " here (for train.py --config.init_from=...), then stop",
    )
    a = p.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import functools

    import jax
    import jax.numpy as jnp

    from dino_jax import recipe
    from dino_jax.interop.official import official_state_dict
    from dino_jax.interop.state_dict import from_state_dict
    from dino_jax.train_step import dino_update
    from scripts import compare_official as co
    from scripts import official_side

    config = co.load_recipe(os.path.join(ROOT, a.config))
    off = official_side.import_checkout(a.official)
    args = co.official_args(config, a.seed)
    images, labels = co.demo_splits(config)[0]
    run = official_side.set_up(off, args, images, labels)
    if a.save_init:
        import torch

        checkpoint = {
            "student": run.student.state_dict(),
            "teacher": run.teacher.state_dict(),
            "epoch": 0,
            "args": args,
            "dino_loss": run.dino_loss.state_dict(),
        }
        torch.save(checkpoint, a.save_init)
        print(f"wrote the official seed-{a.seed} initial networks to {a.save_init}")
        return
    steps_per_epoch = len(run.data_loader)

    rec = recipe.build(config, steps_per_epoch)
    state = rec.init_state(jax.random.key(a.seed))

    def ours_from(module) -> dict:
        sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        return jax.tree.map(jnp.asarray, from_state_dict(sd)[0])

    state = state.replace(
        student=ours_from(run.student.module),
        teacher=ours_from(run.teacher_without_ddp),
        opt_state=rec.hp.tx.init(ours_from(run.student.module)),
    )
    update = jax.jit(functools.partial(dino_update, hp=rec.hp))
    losses = []
    run.dino_loss.register_forward_hook(lambda m, i, out: losses.append(out.item()))

    run.data_loader.sampler.set_epoch(0)
    first = FirstBatches(run.data_loader, a.steps)
    official_side.train_epoch(off, args, run, 0, first)  # the official iterations, at once
    print(" step  official loss  ours loss   |diff|")
    for step, (crops, _) in enumerate(first.kept):
        nhwc = [c.numpy().transpose(0, 2, 3, 1) for c in crops]
        groups = (jnp.stack(nhwc[:2], 1), jnp.stack(nhwc[2:], 1))
        state, metrics = update(state, groups, jax.random.key(step))
        ours = float(metrics["train/loss"])
        print(f"{step:5d}  {losses[step]:13.6f}  {ours:9.6f}   {abs(ours - losses[step]):.2e}")
    st = {k: v.detach().numpy() for k, v in run.student.module.state_dict().items()}
    te = {k: v.detach().numpy() for k, v in run.teacher_without_ddp.state_dict().items()}
    our_st = official_state_dict(jax.device_get(state.student))
    our_te = official_state_dict(jax.device_get(state.teacher))
    keys = sorted(set(st) & set(our_st))
    center = run.dino_loss.center.numpy()
    worst = sorted(keys, key=lambda k: -rel(np.asarray(our_st[k]), st[k]))[:4]
    print(f"after {len(first.kept)} steps, parameters furthest apart (relative distance):")
    print("  " + ", ".join(f"{k} {rel(np.asarray(our_st[k]), st[k]):.1e}" for k in worst))
    student_gap = rel(flat({k: our_st[k] for k in keys}), flat({k: st[k] for k in keys}))
    teacher_gap = rel(flat({k: our_te[k] for k in keys}), flat({k: te[k] for k in keys}))
    print(
        f"  all student parameters {student_gap:.2e}, teacher {teacher_gap:.2e},"
        f" center {rel(np.asarray(state.center), center):.2e}"
    )


if __name__ == "__main__":
    main()

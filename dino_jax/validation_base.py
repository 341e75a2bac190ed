"""What every section's validation shares: a list of problems, each with what to change, and the
seed check."""

from __future__ import annotations

# jax.random.key keeps the low 32 bits of a seed (2**32 gives the run of seed 0) and refuses
# 2**63 and above; numpy and tf.data take any seed in this range.
SEED_MAX = 2**32 - 1


class Errors(list):
    """The problems found, as messages; `check` adds one where a condition fails."""

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)

    def positive_int(self, name: str, value) -> None:
        self.check(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{name}={value!r}: must be a positive int",
        )

    def splits_over_devices(self, name: str, batch, num_devices: int) -> None:
        """A positive batch size must split evenly over the devices."""
        if isinstance(batch, int) and batch > 0:
            self.check(
                batch % num_devices == 0,
                f"{name}={batch} is not divisible by the {num_devices} devices:"
                f" use a multiple of {num_devices}",
            )


def seed_error(name: str, value) -> str | None:
    """Why `value` cannot seed every generator the code feeds it to, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX:
        return None
    return (
        f"{name}={value!r}: a seed is an int in [0, 2**32 - 1 = {SEED_MAX}] (jax.random.key keeps"
        " 32 bits: a larger seed repeats a smaller one or fails)"
    )

"""What every section's validation shares: a list of problems, each with what to change."""

from __future__ import annotations


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

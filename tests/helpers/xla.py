"""XLA flags of the test processes: N virtual CPU devices, and collective time-outs far above
any step of the suite.

With virtual CPU devices, every device of a sharded step meets the others in each all-reduce.
XLA:CPU aborts the whole process (`Fatal Python error: Aborted`, "Termination timeout ... of
40 seconds exceeded") when one device arrives 40 s after the others, which a process that is
starved of CPU time on a loaded 2-core machine can do. The tests' own timeouts bound a hang.
"""

COLLECTIVE_TIMEOUTS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
    " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
)


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_TIMEOUTS}"

"""The few exception types a user can meet; cli.py maps each to an exit code.

Messages are one line that names the file or key at fault and what is wrong with it.
"""


class UserError(Exception):
    """Bad input or configuration (exit code 2). Nothing existing has been overwritten."""

    exit_code = 2


class ClusterError(Exception):
    """The Dask cluster cannot be reached or was lost beyond recovery (exit code 3)."""

    exit_code = 3

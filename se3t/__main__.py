"""``se3t`` / ``python -m se3t``: train, evaluate, predict, convert-nvidia.

User mistakes (bad flags, missing files, unusable checkpoints, diverged training) end with one ``error:`` line
and a non-zero status, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert-nvidia":
        from se3t.compat.nvidia import cli_main

        return cli_main(argv[1:])

    from se3t.runtime.args import parse_args
    from se3t.runtime.errors import UserError

    args = parse_args(argv)  # argparse itself exits with status 2 and a usage line on bad flags
    try:
        from se3t.runtime import commands

        run = {"train": commands.run_train, "evaluate": commands.run_evaluate, "predict": commands.run_predict}
        return run[args.command](args)
    except UserError as e:
        print(f"se3t {args.command}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"se3t {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())

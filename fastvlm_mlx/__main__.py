"""`python -m fastvlm_mlx <command> [args]`: every tool, as mlx-lm's `python -m mlx_lm <command>`.

Each command is also a module (`python -m fastvlm_mlx.generate`) and a console script
(`fastvlm-generate`).
"""

import importlib
import sys

COMMANDS = {
    "generate": "generate",
    "chat": "chat",
    "server": "server",
    "convert": "convert",
    "benchmark": "benchmark",
    "verify": "verify",
    "caption": "caption",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m fastvlm_mlx {{{','.join(COMMANDS)}}} [--help | args]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; {usage}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"fastvlm_mlx.{COMMANDS[command]}")
    sys.argv[0] = f"fastvlm-{command}"
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())

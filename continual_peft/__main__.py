"""`python -m continual_peft ...` is the `continual-peft` command (e.g. under torchrun).

Under torchrun a process ends with `os._exit` once its Python-level exit work (atexit handlers,
flushed output) is done: the native teardown of torch.distributed's gloo state can otherwise
abort a finished rank at interpreter exit ("terminate called without an active exception",
SIGABRT), which turns a finished run into a failed job.
"""

import atexit
import os
import sys

from continual_peft.cli import app
from continual_peft.distributed import launched_size


def main() -> None:
    try:
        app(prog_name="continual-peft")
        code = 0
    except SystemExit as done:
        code = done.code
    if launched_size() == 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, then status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

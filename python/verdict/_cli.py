"""The `verdict` command installed by the wheel: the same CLI as the binary
(`serve`, `classify`, `score`, `bench`), run inside this process."""

from __future__ import annotations

import signal
import sys
from typing import List, Optional

from verdict import _native


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Behave as the binary does: Ctrl-C ends a `classify` at once, and `serve`
    # installs its own handler for a graceful shutdown.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    return _native.run_cli(["verdict", *args])


if __name__ == "__main__":
    sys.exit(main())

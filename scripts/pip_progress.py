"""Run a pip command verbosely but show only the progress of a native build.

Compiling llama.cpp takes minutes; a silent pip looks hung and a verbose one floods the
terminal. This prints "[step/total]" lines about every 5% and the tail of the log on failure.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys

STEP = re.compile(r"\[(\d+)/(\d+)\]")


def main(argv: list[str]) -> int:
    tail: collections.deque[str] = collections.deque(maxlen=60)
    last_shown = -1
    with subprocess.Popen(
        [*argv, "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            match = STEP.search(line)
            if match:
                done, total = int(match.group(1)), int(match.group(2))
                percent = 100 * done // total
                if percent // 5 != last_shown // 5 or done == total:
                    print(f"  llama.cpp build: {done}/{total} ({percent}%)", flush=True)
                    last_shown = percent
            elif line.startswith(("Successfully", "Requirement already satisfied: llama")):
                print("  " + line.strip(), flush=True)
    if proc.returncode != 0:
        sys.stderr.write("".join(tail))
        print(f"pip failed with exit code {proc.returncode}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

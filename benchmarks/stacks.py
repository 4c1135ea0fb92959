"""Stack samples of a long benchmark run (where a compile spends its minutes): a run prints every thread's stack
every few seconds in faulthandler's layout, and the driver that started it reads them back from its output,
together with the dump faulthandler itself prints when the run is stopped with SIGABRT.

The samples come from a Python thread (`sys._current_frames()`, under the GIL): faulthandler's own periodic dumps
(`dump_traceback_later`) read other threads' frames without the GIL and can crash the run they watch.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import TextIO

SAMPLE_HEADER = "Stack sample"


def format_stacks(frames: dict[int, object], skip: int | None = None) -> str:
    """Every thread's stack in faulthandler's layout ('Thread 0x... (most recent call first):' and one
    '  File "path", line N in name' line per frame, innermost first), but the thread `skip`."""
    out = []
    for ident, frame in frames.items():
        if ident == skip:
            continue
        out.append(f"Thread {ident:#018x} (most recent call first):")
        while frame is not None:
            code = frame.f_code
            out.append(f'  File "{code.co_filename}", line {frame.f_lineno} in {code.co_name}')
            frame = frame.f_back
        out.append("")
    return "\n".join(out)


def sample_stacks(every_s: float, stream: TextIO | None = None) -> threading.Event:
    """Print every thread's stack to `stream` (default stderr) every `every_s` seconds, each sample under a
    '{SAMPLE_HEADER} N:' line, from a daemon thread; set the returned event to stop."""
    stop = threading.Event()

    def loop() -> None:
        n = 0
        while not stop.wait(every_s):
            n += 1
            text = format_stacks(sys._current_frames(), skip=threading.get_ident())
            print(f"{SAMPLE_HEADER} {n}:\n{text}", file=stream or sys.stderr, flush=True)

    threading.Thread(target=loop, name="stack-sampler", daemon=True).start()
    return stop


def split_dumps(log: str) -> list[str]:
    """The stack dumps in a run's output, oldest first: the samples and the one faulthandler prints on SIGABRT
    ('Fatal Python error: Aborted')."""
    starts = [m.start() for m in re.finditer(rf"^(?:{SAMPLE_HEADER} \d+:|Fatal Python error)", log, re.MULTILINE)]
    return [log[a:b] for a, b in zip(starts, [*starts[1:], len(log)][: len(starts)], strict=True)]


def innermost_frames(dump: str, keep: int = 8) -> list[str]:
    """From one dump of all threads, the `keep` innermost frames of the deepest thread's stack (the one doing the
    work; the others wait on locks), innermost first."""
    stacks = [block.splitlines() for block in re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump)]
    frames = [[line.strip() for line in block if line.strip().startswith("File ")] for block in stacks]
    return max(frames, key=len, default=[])[:keep]


def telling_frame(frames: list[str]) -> str:
    """The innermost frame outside Python's own library (threading, concurrent.futures: where a thread waits),
    its path cut to the package."""
    lib = [f for f in frames if "site-packages/" in f or "/lib/python3" not in f]
    frame = (lib or frames or ["no stack dump"])[0]
    return re.sub(r'File ".*?site-packages/', 'File "', frame)

#!/usr/bin/env python3
"""Fails when a built extension holds its own copy of the C++ runtime's streams and locales.

libstdc++ declares its stream instantiations ``extern template``, so a normal build leaves
``std::ostream::_M_insert<long>`` undefined, bound at load time to torch's libstdc++.so.6. An
extension that *defines* it had libstdc++ linked in statically (``-static-libstdc++`` or
``libstdc++.a`` in the link flags, or a toolset g++ that does so), and the process then runs two
C++ runtimes whose locale facet ids disagree: streaming a number (the num_put facet) crashes, as
every error message of ``_C.so`` holding a number did on the GPU image of 2026-11-28
(docs/performance.md, "GPU status"). setup.py runs this check after the build, and
scripts/gpu_check.sh records it.

Usage: python3 scripts/check_runtime.py path/to/_C.so   (exit 1 with the message on failure)
"""

import re
import shutil
import subprocess
import sys

# Mangled members (K: const ones) of std::ostream (So), std::istream (Si), std::iostream (Sd),
# std::locale, std::ios_base, std::basic_ios and std::num_put: a normal build defines none.
# Inline pieces that a normal build does emit (e.g. ~basic_stringbuf) are deliberately not listed.
RUNTIME = re.compile(r"_ZNK?(So|Si|Sd|St6locale|St8ios_base|St9basic_ios|St7num_put)")


def runtime_symbols(path: str) -> list[str]:
    """The stream and locale symbols ``path`` defines, demangled where c++filt exists."""
    names = set()
    # The static table also lists hidden copies (--exclude-libs); -D still works once stripped.
    for table in ([], ["-D"]):
        cmd = ["nm", "--defined-only", *table, path]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr.strip()}")
        names.update(line.split()[-1] for line in run.stdout.splitlines() if line.strip())
    # The crashing function's family (std::ostream::_M_insert<T>) first, for the message.
    found = sorted((n for n in names if RUNTIME.match(n)),
                   key=lambda n: (not n.startswith("_ZNSo9_M_insert"), n))
    if found and shutil.which("c++filt"):
        found = subprocess.run(["c++filt"], input="\n".join(found), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    return found


def check(path: str) -> bool:
    """Raises RuntimeError naming the symbols, the file and the likely cause when ``path``
    defines C++ stream or locale code. Without nm it warns on stderr and returns False."""
    if shutil.which("nm") is None:
        print(f"warning: no nm (binutils): {path} not checked for a static C++ runtime",
              file=sys.stderr)
        return False
    found = runtime_symbols(path)
    if found:
        shown = "\n  ".join(found[:8])
        raise RuntimeError(
            f"{path} defines {len(found)} symbols of the C++ runtime's streams and locales, "
            f"e.g.\n  {shown}\n"
            "libstdc++ was linked into it statically: -static-libstdc++ or libstdc++.a in "
            "LDSHARED, LDFLAGS, CFLAGS or CXXFLAGS (the environment's or Python's sysconfig), or "
            "a toolset/conda g++ that links it so. The process would hold two C++ runtimes, and "
            "every error message holding a number would crash (std::ostream::_M_insert<long>). "
            "Link libstdc++ dynamically: clear those flags, use the system g++ of torch's GCC "
            "family (torch.__config__.show()).")
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} path/to/_C.so")
    try:
        checked = check(sys.argv[1])
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    if checked:
        print(f"ok: {sys.argv[1]} defines no C++ stream or locale code")

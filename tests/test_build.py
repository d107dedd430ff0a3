"""The extension links the C++ runtime dynamically: scripts/check_runtime.py (which setup.py runs
after every build) passes the installed ``spikeops._C`` and a normally linked library, and fails
one that carries a static libstdc++, the cause of the crashes in docs/performance.md, "GPU
status"."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spikeops

CHECK = Path(__file__).resolve().parents[1] / "scripts" / "check_runtime.py"

pytestmark = pytest.mark.skipif(shutil.which("nm") is None,
                                reason="no nm (binutils): the check cannot read symbol tables")

# Streams a long, the operation that crashed (std::ostream::_M_insert<long>).
PROBE = """#include <sstream>
#include <string>
std::string probe(long n) {
  std::ostringstream os;
  os << "n = " << n;
  return os.str();
}
"""


def check(path):
    return subprocess.run([sys.executable, str(CHECK), str(path)], capture_output=True, text=True)


def test_installed_extension_passes():
    run = check(spikeops._C.__file__)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok:")


@pytest.mark.skipif(shutil.which("c++") is None, reason="no c++ compiler to build the libraries")
@pytest.mark.parametrize("static", [False, True], ids=["shared-libstdc++", "static-libstdc++"])
def test_tiny_library(tmp_path, static):
    src, lib = tmp_path / "probe.cpp", tmp_path / "libprobe.so"
    src.write_text(PROBE)
    flags = ["-static-libstdc++"] if static else []
    build = subprocess.run(["c++", "-shared", "-fPIC", "-O2", *flags, str(src), "-o", str(lib)],
                           capture_output=True, text=True)
    if build.returncode != 0 and static:
        pytest.skip(f"c++ cannot link -static-libstdc++ (no libstdc++.a?): {build.stderr}")
    assert build.returncode == 0, build.stderr
    run = check(lib)
    if not static:
        assert run.returncode == 0, run.stderr
        return
    assert run.returncode == 1
    assert "linked into it statically" in run.stderr
    # Demangled, or mangled where no c++filt is present.
    assert any(name in run.stderr for name in ("_M_insert<long>(long)", "_ZNSo9_M_insertIlEERSoT_"))

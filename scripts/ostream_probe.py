"""Does std::ostream's integer formatting work in a C++ library built here, loaded beside torch?

The open crash of csrc/error_message.h: on the GPU machine, the extension's error messages that
streamed an integer killed the process. This probe takes torch and the extension out of the
question: a ten-line library that streams an integer into a std::ostringstream, built with each
C++ compiler found (the one torch.utils.cpp_extension picks, /opt/gcc/bin/g++, g++), with and
without the -Wl,-Bsymbolic-functions of Ubuntu Python's link line, and called through ctypes in
a process that imported torch (and initialised CUDA where there is a GPU) first. One line per
build: what the call returned, or how its process ended.

    python3 scripts/ostream_probe.py        (scripts/gpu_check.sh's repro stage runs it)
"""
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <cstring>
#include <sstream>
extern "C" int format_integer(long value, char* out, int size) {
  std::ostringstream stream;
  stream << "got " << value << " elements";
  std::strncpy(out, stream.str().c_str(), size - 1);
  return 0;
}
"""

CALL = r"""
import ctypes, sys, torch
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
try:
    import fused_ce  # noqa: F401  (its libraries loaded as in the tests)
except Exception as e:  # noqa: BLE001
    print("(fused_ce not importable:", e, ")", end=" ")
library = ctypes.CDLL(sys.argv[1])
text = ctypes.create_string_buffer(64)
library.format_integer(42, text, 64)
print(repr(text.value.decode()))
"""


def compilers():
    from torch.utils.cpp_extension import get_cxx_compiler

    found = []
    for name in (get_cxx_compiler(), "/opt/gcc/bin/g++", "g++"):
        path = shutil.which(name)
        if path and os.path.realpath(path) not in [os.path.realpath(p) for p in found]:
            found.append(path)
    return found


def main():
    folder = tempfile.mkdtemp(prefix="ostream_probe_")
    source = os.path.join(folder, "probe.cpp")
    with open(source, "w") as f:
        f.write(SOURCE)
    for number, compiler in enumerate(compilers()):
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        for link_flags in ([], ["-Wl,-Bsymbolic-functions"]):
            library = os.path.join(folder, f"probe{number}{'_symbolic' if link_flags else ''}.so")
            build = subprocess.run([compiler, "-O2", "-std=c++17", "-fPIC", "-shared", source, "-o", library,
                                    *link_flags], capture_output=True, text=True)
            label = f"{compiler} ({version}) {' '.join(link_flags) or '(plain link)'}:"
            if build.returncode != 0:
                print(label, "build failed:", build.stderr.strip().splitlines()[-1:])
                continue
            run = subprocess.run([sys.executable, "-c", CALL, library], capture_output=True, text=True,
                                 timeout=120)
            ended = run.stdout.strip() if run.returncode == 0 else f"process ended with status {run.returncode}"
            print(label, ended, flush=True)


if __name__ == "__main__":
    main()

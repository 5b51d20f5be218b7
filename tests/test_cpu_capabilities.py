"""The CPU kernels are compiled once per instruction set (AVX-512 with and
without AVX512_BF16, AVX2, baseline) and the best one the CPU supports runs. The rest of the suite
therefore only exercises that one; here the numerical test modules run again
in a subprocess for every other instruction set this CPU supports, selected
with FUSED_CE_CPU_CAPABILITY."""

import os
import subprocess
import sys

import pytest

import fused_ce

TESTS = os.path.dirname(os.path.abspath(__file__))

# The modules that check values and gradients against PyTorch across the
# kernel paths: row and tile kernels, every dtype, strided and in-place
# gradients, the LLM options, NaN / inf, the gradient cache's full writes.
NUMERICAL_MODULES = [
    "test_parity.py",
    "test_gradient_cache.py",
    "test_llm_options.py",
    "test_special_values.py",
    "test_inplace_backward.py",
]

SUPPORTED = fused_ce.supported_cpu_capabilities()


def run_python(code: str, capability: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FUSED_CE_CPU_CAPABILITY=capability)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_supported_capabilities_start_at_the_baseline():
    assert SUPPORTED[0] == "default"
    assert set(SUPPORTED) <= {"default", "avx2", "avx512", "avx512_bf16"}
    assert fused_ce.cpu_capability() in SUPPORTED


def test_the_best_capability_runs_unless_one_is_requested():
    requested = os.environ.get("FUSED_CE_CPU_CAPABILITY")
    expected = requested if requested in SUPPORTED else SUPPORTED[-1]
    assert fused_ce.cpu_capability() == expected


@pytest.mark.parametrize("capability", SUPPORTED)
def test_requested_capability_is_used(capability):
    result = run_python(
        "import warnings; warnings.simplefilter('error'); import fused_ce; "
        "print(fused_ce.cpu_capability())",
        capability,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == capability


def test_unknown_capability_warns_and_falls_back_to_the_best():
    result = run_python(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fused_ce\n"
        "print(fused_ce.cpu_capability())\n"
        "print(*[str(w.message) for w in caught], sep='\\n')\n",
        "avx1024",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == SUPPORTED[-1]
    assert any("FUSED_CE_CPU_CAPABILITY='avx1024'" in line for line in lines[1:]), lines


def test_no_warning_without_a_request():
    env = {k: v for k, v in os.environ.items() if k != "FUSED_CE_CPU_CAPABILITY"}
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", "import fused_ce"],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


# Where the CPU has a single instruction set (a non-x86 machine), the rerun
# uses it, rather than leaving an empty parameter set that pytest skips.
OTHER_CAPABILITIES = [c for c in SUPPORTED if c != fused_ce.cpu_capability()] or SUPPORTED


@pytest.mark.parametrize("capability", OTHER_CAPABILITIES)
def test_numerical_suite_passes_with_every_other_capability(capability):
    # The first node checks that the subprocess really runs `capability`.
    selection = [f"{os.path.basename(__file__)}::test_the_best_capability_runs_unless_one_is_requested",
                 *NUMERICAL_MODULES]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection],
        cwd=TESTS, env=dict(os.environ, FUSED_CE_CPU_CAPABILITY=capability),
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"with FUSED_CE_CPU_CAPABILITY={capability}:\n{result.stdout[-6000:]}"
    assert " passed" in result.stdout

"""CPU feature detection, ISA selection and the KT_ISA environment variable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, check_state, ktf, make_problem, make_state

BOOL_KEYS = ("amx_bf16", "amx_int8", "amx_tile", "avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma", "amx_granted")
ALL_ISAS = ("amx", "avx512", "avx2", "amx_emulated")


def _cpuinfo_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_cpu_info_keys_and_types():
    info = ktf().cpu_info()
    assert isinstance(info, dict)
    for key in BOOL_KEYS:
        assert key in info, f"cpu_info() lacks {key!r}"
        assert isinstance(info[key], bool), f"cpu_info()[{key!r}] must be a bool, got {type(info[key])}"
    assert isinstance(info["isa"], str)
    assert isinstance(info["available_isas"], list)
    assert info["isa"] in info["available_isas"]
    assert info["available_isas"] == list(ktf().available_isas())


def test_cpu_info_matches_this_machine():
    info = ktf().cpu_info()
    flags = _cpuinfo_flags()
    assert info["avx2"] is True and info["fma"] is True
    for key in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma"):
        assert info[key] == (key in flags), f"cpu_info()[{key!r}] = {info[key]} but /proc/cpuinfo says {key in flags}"
    for key in ("amx_bf16", "amx_int8", "amx_tile"):
        # the kernel lists AMX only when it supports it; CPUID may still report it without
        if key in flags:
            assert info[key], f"/proc/cpuinfo lists {key} but cpu_info() says False"
    if not info["amx_tile"]:
        assert "amx" not in info["available_isas"]


def test_available_isas_consistent():
    info = ktf().cpu_info()
    isas = list(ktf().available_isas())
    assert isas and set(isas) <= set(ALL_ISAS) and len(set(isas)) == len(isas)
    assert isas == sorted(isas, key=ALL_ISAS.index), "available_isas() must be best first"
    assert "avx2" in isas
    assert isas[-1] == "amx_emulated", "the emulated AMX path runs everywhere and is listed last"
    if "amx" in isas:
        assert info["amx_bf16"] and info["amx_tile"] and info["amx_granted"]
    if "avx512" in isas:
        assert info["avx512f"]
    # the default path is the best available unless KT_ISA says otherwise
    if "KT_ISA" not in os.environ:
        assert info["isa"] == isas[0] and info["isa"] != "amx_emulated"


def test_each_isa_state_reports_and_works(isa):
    prob = make_problem(E=4, H=40, I=24, k=2, T=9, r=2, seed=71)
    state = make_state(prob, isa)
    check_state(state, prob, where=f"[{isa}]")


# ----------------------------------------------------------------------------- KT_ISA
SCRIPT = textwrap.dedent(
    """
    import json, torch
    import kt_functional as ktf
    info = ktf.cpu_info()
    gate = torch.randn(2, 8, 16).bfloat16(); up = torch.randn(2, 8, 16).bfloat16()
    down = torch.randn(2, 16, 8).bfloat16()
    st = ktf.MoEState(ktf.ExpertWeights.from_tensors(gate, up, down), None, threads=1)
    y, _ = ktf.moe_forward(st, torch.randn(3, 16).bfloat16(), torch.tensor([[0, 1], [1, -1], [0, 1]]),
                           torch.ones(3, 2), save_for_backward=False)
    print("RESULT", json.dumps({"isa": info["isa"], "available": info["available_isas"],
                                "finite": bool(torch.isfinite(y.float()).all())}))
    """
)


def _run_with_env(kt_isa):
    env = dict(os.environ)
    env["KT_ISA"] = kt_isa
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=120)


def _result(proc):
    import json  # noqa: PLC0415

    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"subprocess gave no result: rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def test_kt_isa_env_selects_path(isa):
    """KT_ISA=<path> in a fresh process makes that path the default (every available one,
    avx2 included)."""
    proc = _run_with_env(isa)
    assert proc.returncode == 0, proc.stderr
    res = _result(proc)
    assert res["isa"] == isa and res["finite"]


def test_kt_isa_env_avx2():
    proc = _run_with_env("avx2")
    assert proc.returncode == 0, proc.stderr
    assert _result(proc)["isa"] == "avx2"


def _assert_clear_kt_isa_error(proc):
    assert proc.returncode != 0, f"expected a failure, got rc=0\nstdout:\n{proc.stdout}"
    err = proc.stderr
    assert "KT_ISA" in err, f"error must mention KT_ISA:\n{err}"
    assert any(e in err for e in ("ValueError", "RuntimeError", "ImportError")), err
    assert "Segmentation fault" not in err and "Illegal instruction" not in err
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}"


@pytest.mark.parametrize("kt_isa", ["bogus", "avx1024"])
def test_kt_isa_env_bogus(kt_isa):
    _assert_clear_kt_isa_error(_run_with_env(kt_isa))


def test_kt_isa_env_unavailable(missing_isa):
    """KT_ISA naming a path this CPU (or build) lacks fails clearly instead of crashing."""
    _assert_clear_kt_isa_error(_run_with_env(missing_isa))

"""--precision auto (the default): bf16 only where the CPU or GPU multiplies it natively, else fp32; the
choice is said in one line and recorded in config.yaml, so that the run's resume and its `orpo eval`
make the same one."""

from __future__ import annotations

import pytest
import yaml

import orpo
from orpo import precision as P

AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "flags\t\t: avx2 avx512f avx512bw\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "Features\t: fp asimd atomics\n"


@pytest.mark.parametrize("info, machine, native", [
    (AVX2, "x86_64", False), (SKYLAKE, "x86_64", False), (SAPPHIRE, "x86_64", True),
    (GRAVITON3, "aarch64", True), (GRAVITON2, "aarch64", False), ("", "x86_64", False),
])
def test_native_bf16_is_read_from_the_cpus_flags(info, machine, native):
    got, what = P.from_cpuinfo(info, machine)
    assert got is native and what


def test_auto_resolves_by_the_device_and_explicit_choices_stay(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16", lambda: (False, "a CPU with AVX2 but no native bf16"))
    assert P.resolve("bf16", "cpu") == ("bf16", None) and P.resolve("fp32", "cuda") == ("fp32", None)
    got, why = P.resolve("auto", "cpu")
    assert got == "fp32" and "AVX2" in why and "--precision bf16" in why
    monkeypatch.setattr(P, "cpu_bf16", lambda: (True, "a CPU with AMX_BF16"))
    assert P.resolve("auto", "cpu") == ("bf16", None)
    assert P.resolve("auto", "mps")[0] == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_a_run_records_what_auto_chose_and_says_why(tmp_path, tiny_model_dir, plain_file, monkeypatch, capsys, native):
    monkeypatch.setattr(P, "cpu_bf16", lambda: (native, "a CPU with AMX_BF16" if native else "a CPU with AVX2 but no native bf16"))
    out = tmp_path / "run"
    cfg = dict(model=str(tiny_model_dir), data=str(plain_file), output_dir=str(out), max_steps=1, save_steps=0,
               eval_samples=0)
    orpo.train(orpo.TrainConfig(**cfg))
    said = capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["precision"] == ("bf16" if native else "fp32")
    assert ("precision: fp32 (auto:" in said) is not native
    # the resume resolves "auto" the same way on the same machine: the same run, not "precision changed"
    res = orpo.train(orpo.TrainConfig(**dict(cfg, max_steps=2), resume=True))
    assert res.steps == 2

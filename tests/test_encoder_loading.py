"""Registry, plug-ins and safe checkpoint loading, on a tiny encoder installed as a real package."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from asap_bench.cli import main
from asap_bench.encoders import registry
from asap_bench.encoders.base import encoder_fingerprint
from asap_bench.encoders.checkpoints import CheckpointError, load_weights, read_state_dict, resolve_checkpoint

PLUGIN = Path(__file__).parent / "fixtures" / "tiny_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the plug-in package into a folder and put it on sys.path, as an install would."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN)], check=True, capture_output=True)
    sys.path.insert(0, str(target))
    registry.plugins.cache_clear()
    yield target
    sys.path.remove(str(target))
    registry.plugins.cache_clear()


@pytest.fixture
def tiny(installed):
    torch.manual_seed(0)
    return registry.build_encoder("tiny-cnn", "demo").eval()


def _published(encoder) -> dict[str, torch.Tensor]:
    """The plug-in's published layout: weights under 'backbone.', plus a head the card ignores."""
    state = {f"backbone.{k}": v.clone() for k, v in encoder.state_dict().items()}
    state["head.weight"] = torch.zeros(2, 16)
    return state


def test_plugin_is_listed_built_and_loaded(installed, tiny, tmp_path):
    assert "tiny-cnn" in registry.all_encoder_names()
    result = CliRunner().invoke(main, ["encoders", "list"])
    assert result.exit_code == 0 and "tiny-cnn" in result.output and "15 encoders" in result.output
    path = tmp_path / "tiny-cnn.safetensors"
    save_file(_published(tiny), str(path))
    fresh, report = registry.load_encoder("tiny-cnn", "demo", checkpoint=path)
    assert report.fraction == 1.0 and not report.missing and not report.unexpected
    assert report.ignored == ["head.weight"]
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.inference_mode():
        a, b = tiny(x), fresh.eval()(x)
    assert torch.equal(a.global_embedding, b.global_embedding) and a.global_embedding.shape == (2, 16)
    with pytest.raises(ValueError, match=r"expects input \[B, 1, 32, 32, 16\]"):
        tiny(torch.zeros(1, 1, 16, 16, 16))


def test_all_builtin_encoders_listed():
    result = CliRunner().invoke(main, ["encoders", "list"])
    assert result.exit_code == 0
    for name in ["random", "asap", "simcrop", "mae", "m3ae", "mrm", "ct-clip", "merlin", "m3d-clip", "fvlm",
                 "hlip", "pcrlv2", "hi-end-mae", "visd-boost"]:
        assert f"\n{name} " in result.output
    shown = CliRunner().invoke(main, ["encoders", "show", "hlip"])
    assert shown.exit_code == 0 and "spatial_posemb" in shown.output


def test_unknown_names_suggest_close_matches():
    with pytest.raises(KeyError, match="did you mean 'asap'"):
        registry.get_card("asapp")
    result = CliRunner().invoke(main, ["encoders", "show", "merln"])
    assert result.exit_code == 1 and "did you mean 'merlin'" in result.output
    with pytest.raises(KeyError, match="unknown architecture family 'vit3"):
        registry.family_class("vit3")


class _Payload:
    """Unpickling this runs os.system: the attack a weights-only load must stop."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_payload_is_refused_and_never_runs(tiny, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": {"stem.weight": torch.zeros(1)}, "x": _Payload(marker)}, handle)
    torch.save({"state": _Payload(marker)}, tmp_path / "evil2.pth")
    for bad in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused: the file holds pickled objects"):
            load_weights(tiny, bad)
    assert not marker.exists()


def test_bad_checkpoints_name_file_and_keys(tiny, tmp_path):
    state = _published(tiny)
    wrong = dict(state, **{"backbone.stem.weight": torch.zeros(3, 1, 4, 4, 4)})
    save_file(wrong, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)shape\.safetensors: shape mismatch.*stem\.weight: checkpoint \[3, 1, 4, 4, 4\]"):
        load_weights(tiny, tmp_path / "shape.safetensors")

    partial = {k: v for k, v in state.items() if "proj" not in k and "stem.weight" not in k}
    partial["backbone.stem_typo.weight"] = torch.zeros(1)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_weights(tiny, tmp_path / "partial.safetensors")
    message = str(info.value)
    assert "partial.safetensors" in message and "'stem.weight'" in message and "'stem_typo.weight'" in message
    report = load_weights(tiny, tmp_path / "partial.safetensors", min_fraction=0.0)
    assert "stem.weight" in report.missing and report.unexpected == ["stem_typo.weight"]

    torch.save({"weights": state}, tmp_path / "nested.pth")
    assert set(read_state_dict(tmp_path / "nested.pth", "weights")) == set(state)
    with pytest.raises(CheckpointError, match="under key 'model'.*top-level keys are \\['weights'\\]"):
        read_state_dict(tmp_path / "nested.pth", "model")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable torch checkpoint"):
        read_state_dict(tmp_path / "junk.pth")


def test_offline_sources_say_what_to_download(installed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = registry.get_card("tiny-cnn")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(card)
    message = str(info.value)
    assert "hf://example-org/tiny-cnn/model.safetensors" in message and "huggingface-cli download example-org/tiny-cnn" in message
    assert "https://example.org/tiny-cnn.pth (remote; download it and pass --checkpoint PATH)" in message
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "tiny-cnn.safetensors").write_bytes(b"")
    assert resolve_checkpoint(card) == Path("checkpoints/tiny-cnn.safetensors")
    with pytest.raises(CheckpointError, match="--checkpoint nowhere.pth: file does not exist"):
        resolve_checkpoint(card, "nowhere.pth")


def test_fingerprint_follows_weights_and_card(installed):
    card = registry.get_card("tiny-cnn")
    a = encoder_fingerprint(card, "demo", "a" * 64)
    assert a == encoder_fingerprint(card, "demo", "a" * 64)
    assert a != encoder_fingerprint(card, "demo", "b" * 64)
    assert a != encoder_fingerprint(card, "native", "a" * 64)
    changed = card.model_copy(update={"input": card.input.model_copy(update={"hu_window": (-1100.0, 1000.0)})})
    assert a != encoder_fingerprint(changed, "demo", "a" * 64)


def test_frozen_forward_matches_a_plain_forward(tiny):
    from asap_bench.encoders.base import frozen_forward

    x = torch.randn(1, 1, 32, 32, 16)
    out = frozen_forward(tiny, x, hidden_states=True)
    with torch.no_grad():
        ref = tiny(x, hidden_states=True)
    assert torch.allclose(out.global_embedding, ref.global_embedding)
    assert out.global_embedding.dtype == torch.float32 and not out.global_embedding.requires_grad
    assert out.grid == ref.grid and len(out.hidden_states) == 1

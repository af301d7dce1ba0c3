"""`asap-bench encoders check`: every encoder x every protocol, native and demo, built and run on the meta device."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.encoders.card import encoder_names
from asap_bench.encoders.check import check_encoders
from asap_bench.encoders.monai_vit import MonaiViT
from asap_bench.encoders.registry import forget_card, get_card, register_card
from asap_bench.encoders.vit3d import ViT3D
from asap_bench.protocol import get_protocol, shipped_protocols


def test_every_encoder_takes_every_protocol_at_native_and_demo_size():
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["encoders", "check", "--task", "all", "--variant", "both"])
    seconds = time.perf_counter() - started
    print(f"\nencoders check: {seconds:.1f} s")
    assert result.exit_code == 0, result.output
    n_encoders, n_protocols = len(encoder_names()), len(shipped_protocols())
    assert (n_encoders, n_protocols) == (14, 27)
    total = n_encoders * n_protocols * 2
    assert f"{total} pairs (14 encoders x 27 protocols x 2 variant(s)): {total} ok, 0 failed" in result.output
    # the adaptations the cards declare, as the harness runs them under the paper input
    assert "pad 112x224x224 -> 120x240x240 (DHW) for patch 10x20x20" in result.output  # CT-CLIP
    assert "pad 112x224x224 -> 112x240x240 (DWH) for patch 8x24x24" in result.output  # HLIP
    assert "pad 224x224x112 -> 228x228x120 (HWD) for patch 12x12x12" in result.output  # Hi-End-MAE
    assert "rebuild_patch_embed: patch_size 4x16x16 -> 8x16x16, qkv_bias false -> true (DHW)" in result.output  # M3D


def test_one_row_per_pair_names_input_grid_and_adaptation():
    result = CliRunner().invoke(main, ["encoders", "check", "hlip", "fvlm", "--task", "cls/stoic,seg/acdc",
                                       "--variant", "native", "--all-pairs"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith(("hlip ", "fvlm "))]
    assert [r[:5] for r in rows] == [
        ["hlip", "cls/stoic", "native", "112x240x240", "(DWH)"], ["hlip", "seg/acdc", "native", "24x96x96", "(DWH)"],
        ["fvlm", "cls/stoic", "native", "112x224x224", "(DWH)"], ["fvlm", "seg/acdc", "native", "32x96x96", "(DWH)"]]
    assert [r[5:7] for r in rows] == [["14x10x10", "ok"], ["3x4x4", "ok"], ["7x14x7", "ok"], ["2x6x3", "ok"]]
    assert "pad 24x96x96 -> 32x96x96 (DWH) for patch 16x16x32" in result.output  # the 24-slice ACDC crops
    assert "4 pairs (2 encoders x 2 protocols x 1 variant(s)): 4 ok, 0 failed" in result.output


@pytest.fixture
def broken():
    """Register a card copy (under a family of its own when ``cls`` is given) for one test."""
    names: list[str] = []

    def add(name: str, cls: type | None = None, **update) -> str:
        card = get_card(name)
        card = card.model_copy(update={"name": f"{name}-broken", **({"family": cls.family} if cls else {}), **update})
        names.append(register_card(card, cls).name)
        return card.name

    yield add
    for name in names:
        forget_card(name)


class SourceGridFromOwnArchitecture(MonaiViT):
    """MonaiViT as it was: the source grid of a position table read from the module's own architecture."""

    family = "monai_vit_own_grid"

    def adapt_tensor(self, key, tensor, shape):
        own = self.grid
        return None if tensor.shape[1] != own[0] * own[1] * own[2] else tensor


class LiesAboutItsPatch(ViT3D):
    """A ViT whose geometry claims any size is fine: the meta forward's token grid gives it away."""

    family = "vit3d_no_multiple"

    @classmethod
    def input_multiple(cls, arch):
        return (1, 1, 1)


def test_a_position_table_that_the_published_checkpoint_cannot_fill_fails_the_check(broken):
    name = broken("fvlm", SourceGridFromOwnArchitecture)
    rows = check_encoders([name], [get_protocol("cls/stoic")], ("native", "demo"))
    native, demo = rows
    assert not native.ok and demo.ok
    assert native.problem == (f"{name} cls/stoic: a published checkpoint's patch_embedding.position_embeddings "
                              "[1, 1232, 768] cannot fill the module's [1, 686, 768] (neither resampled nor rebuilt)")


def test_a_token_grid_that_misses_border_voxels_fails_the_check(broken):
    name = broken("hi-end-mae", LiesAboutItsPatch)
    (row,) = check_encoders([name], [get_protocol("cls/stoic")], ("native",))
    assert row.problem == f"{name} cls/stoic: token grid 18x18x9 x 12x12x12 covers 216x216x108 of the input 224x224x112"


def test_failing_pairs_exit_non_zero_one_line_each(broken):
    card = get_card("ct-clip")
    name = broken("ct-clip", paper_input=card.paper_input.model_copy(update={"fit": "none"}))
    result = CliRunner().invoke(main, ["encoders", "check", name, "--task", "cls/stoic,seg/acdc", "--variant", "native"])
    assert result.exit_code == 1
    hint = "declare paper_input.fit in the card"
    assert result.stderr.splitlines() == [
        f"failed: native: {name} cls/stoic: input 112x224x224 (DHW) is not divisible by patch 10x20x20; {hint}",
        f"failed: native: {name} seg/acdc: input 24x96x96 (DHW) is not divisible by patch 10x20x20; {hint}"]
    assert "2 pairs (1 encoders x 2 protocols x 1 variant(s)): 0 ok, 2 failed" in result.stdout

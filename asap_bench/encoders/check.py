"""Every encoder at the effective input of every protocol, built and run on the ``meta`` device.

``check_encoders`` needs no data, weights or compute: for each (encoder,
protocol, variant) it takes the effective input (``runner.local.effective_input``:
the card's ``paper_input.fit`` applied), builds the module with
``torch.device("meta")`` and pushes a meta tensor of that shape through
``encode``. It checks that the global feature is ``[B, embed_dim]``, that the
patch tokens match their grid and that the grid covers the whole (padded) input,
that UNETR gets one hidden state per block where the card segments with UNETR
(and that the UNETR decoder gives back the input size), and that a checkpoint of
the published size fills the module: every tensor of the same shape, adapted by
the family, or rebuilt by the fitted architecture. Pairs that share an effective
input are built once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..protocol import Protocol
from .card import EncoderCard

VARIANTS = ("native", "demo")
BATCH = 2


@dataclass
class CheckRow:
    encoder: str
    protocol: str
    variant: str
    input: str  # the encoder's tensor, e.g. "120x240x240 (DHW)"
    grid: str
    adaptation: str  # the provenance line: fit and position table
    problem: str = ""  # empty when the pair is fine

    @property
    def ok(self) -> bool:
        return not self.problem


def segments_with_unetr(card: EncoderCard, protocol: Protocol) -> bool:
    family = protocol.transfer.source.split("/")[0] if protocol.transfer is not None else protocol.family
    return family == "seg" and card.segmentation.mode == "unetr"


def check_encoders(names: list[str], protocols: list[Protocol], variants: tuple[str, ...] = VARIANTS) -> list[CheckRow]:
    """One row per (encoder, protocol, variant), in that order."""
    from ..runner.local import effective_input
    from .registry import get_card

    rows: list[CheckRow] = []
    for name in names:
        card = get_card(name)
        for variant in variants:
            memo: dict[tuple, tuple[str, str]] = {}
            published: dict[str, torch.Size] | None = None
            for protocol in protocols:
                effective = effective_input(protocol, card, variant)
                loads = card.checkpoint.availability != "none"
                order = card.input.axis_order
                size = tuple(effective.spec.tensor_size())
                row = CheckRow(name, protocol.id, variant, f"{'x'.join(map(str, size))} ({order})", "-",
                               effective.provenance(loads))
                rows.append(row)
                if effective.problems:
                    row.problem = effective.problems[0]
                    continue
                unetr = segments_with_unetr(card, protocol)
                key = (effective.variant, repr(effective.card.sizes.get(effective.variant)), size, unetr)
                if key not in memo:
                    if published is None and loads:
                        published = _shapes(card, variant)
                    memo[key] = _check_module(effective.card, effective.variant, size, unetr, published)
                row.grid, problem = memo[key]
                if problem:
                    row.problem = f"{name} {protocol.id}: {problem}"
    return rows


def _shapes(card: EncoderCard, variant: str) -> dict[str, torch.Size]:
    """State-dict shapes of the module at the published size: what a checkpoint of that size holds."""
    from .registry import family_class

    with torch.device("meta"):
        module = family_class(card.family)(card, variant)
    return {k: v.shape for k, v in module.state_dict().items()}


def _check_module(card: EncoderCard, variant: str, size: tuple[int, ...], unetr: bool,
                  published: dict[str, torch.Size] | None) -> tuple[str, str]:
    """(token grid, problem or "") of the module ``card``/``variant`` on a meta input of ``size``."""
    from .registry import family_class

    cls = family_class(card.family)
    try:
        with torch.device("meta"):
            module = cls(card, variant)
            x = torch.empty(BATCH, int(module.arch.get("in_chans", card.input.channels)), *size)
            out = module(x, hidden_states=unetr)
            problem = _outputs(module, out, size, unetr) or (_decoder(module, x) if unetr else "")
    except Exception as error:  # the point of the check: any failure of a real forward, named
        return "-", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    grid = "x".join(map(str, out.grid)) if out.grid else "-"
    if not problem and published is not None:
        problem = _fills(module, published)
    return grid, problem


def _outputs(module, out, size: tuple[int, ...], unetr: bool) -> str:
    """What is wrong with one forward's outputs, or ""."""
    if tuple(out.global_embedding.shape) != (BATCH, module.embed_dim):
        return f"global feature {list(out.global_embedding.shape)}, expected [{BATCH}, {module.embed_dim}]"
    if out.patch_tokens is None or out.grid is None:
        return "no patch tokens with their grid"
    grid = tuple(int(g) for g in out.grid)
    if out.patch_tokens.shape[:2] != (BATCH, math.prod(grid)):
        return f"patch tokens {list(out.patch_tokens.shape)} do not match the grid {list(grid)}"
    stride = type(module).token_stride(module.arch)
    if stride is not None:
        covered = tuple(g * s for g, s in zip(grid, stride))
        if any(c < n or c - s >= n for c, n, s in zip(covered, size, stride)):
            return (f"token grid {'x'.join(map(str, grid))} x {'x'.join(map(str, stride))} covers "
                    f"{'x'.join(map(str, covered))} of the input {'x'.join(map(str, size))}")
    if unetr:
        depth = int(module.arch.get("depth", 0))
        states = out.hidden_states or []
        if len(states) != depth or any(h.shape[:2] != out.patch_tokens.shape[:2] for h in states):
            return f"UNETR needs {depth} hidden states shaped like the patch tokens, got {len(states)}"
    return ""


def _decoder(module, x: torch.Tensor) -> str:
    """The UNETR decoder around the encoder gives logits of the input's size."""
    from ..tasks.unetr import EncoderUNETR

    model = EncoderUNETR(module, out_channels=2, feature_size=8)
    logits = model(x)
    if tuple(logits.shape[2:]) != tuple(x.shape[2:]):
        return f"UNETR logits {list(logits.shape[2:])} differ from the input {list(x.shape[2:])}"
    return ""


def _fills(module, published: dict[str, torch.Size]) -> str:
    """A checkpoint of the published size fills ``module``: same shapes, family-adapted, or rebuilt."""
    own = module.state_dict()
    rebuilt = set(module.rebuilt_keys())
    for key, shape in published.items():
        if key not in own or own[key].shape == shape or key in rebuilt:
            continue
        adapted = module.adapt_tensor(key, torch.empty(shape, device="meta"), own[key].shape)
        if adapted is None or adapted.shape != own[key].shape:
            return (f"a published checkpoint's {key} {list(shape)} cannot fill the module's {list(own[key].shape)} "
                    "(neither resampled nor rebuilt)")
    return ""


def summary_rows(rows: list[CheckRow]) -> list[dict]:
    """Rows that share encoder, variant, input and adaptation folded into one, with their protocol count."""
    folded: dict[tuple, dict] = {}
    for row in rows:
        key = (row.encoder, row.variant, row.input, row.grid, row.adaptation, row.ok)
        entry = folded.setdefault(key, {"encoder": row.encoder, "variant": row.variant, "protocols": [],
                                        "input": row.input, "grid": row.grid, "adaptation": row.adaptation,
                                        "status": "ok" if row.ok else "FAILED"})
        entry["protocols"].append(row.protocol)
    out = []
    for entry in folded.values():
        ids = entry["protocols"]
        entry["protocols"] = ", ".join(ids) if len(ids) <= 2 else f"{len(ids)} ({ids[0]}, ...)"
        out.append(entry)
    return out

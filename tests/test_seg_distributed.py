"""Data-parallel UNETR fine-tuning under torchrun (2 processes, gloo) equals one process, bit for bit.

Each item of a step (one volume's crops) gets its own forward and backward pass
in both runs, so every item's gradient comes from the same kernels on the same
shapes; with one item per rank the only sum left, DDP's average of two
gradients, is exact. One batch of all crops in one process would not match:
the batch size changes the rounding of the convolution gradients, instance
normalisation magnifies it to about 1e-3 in the ViT, AdamW's first steps
(close to ``lr * sign(gradient)``) make weights differ by up to 3 x lr, and a
near-random prediction's HD95 moves by 1e-2 mm with a few voxels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asap_bench

PACKAGE_ROOT = str(Path(asap_bench.__file__).resolve().parents[1])

SCRIPT = r'''
import dataclasses, json, logging, sys
from pathlib import Path

from asap_bench.data.manifest import load_manifest
from asap_bench.encoders.registry import family_class, get_card
from asap_bench.protocol import get_protocol
from asap_bench.runner import distributed
from asap_bench.runner.local import effective_input, seed_everything
from asap_bench.splits import make_split, ratio_name
from asap_bench.tasks.base import EncoderHandle, TaskInputs
from asap_bench.tasks.segmentation import Segmentation

root, work, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
if distributed.launched_by_torchrun():
    distributed.init("cpu")
protocol = get_protocol("seg/fumpe")
params = {**protocol.head.params, "demo_max_steps": 2, "demo_val_every": 2, "demo_volumes_per_step": 2,
          "demo_feature_size": 8}
protocol = protocol.model_copy(update={"head": protocol.head.model_copy(update={"params": params})})
manifest = load_manifest(root, "fumpe")
split = make_split(manifest, protocol, 0)
split = dataclasses.replace(split, train=split.train[:4], val=split.val[:1], test=split.test[:2],
                            regimes={ratio_name(1.0): split.train[:4]})
spec = effective_input(protocol, get_card("random"), "demo").spec
card = get_card("random")
card = card.model_copy(update={"architecture": {**card.architecture_for("demo"), "img_size": list(spec.tensor_size())}})

def build():
    seed_everything(0)
    return family_class(card.family)(card, "native").train()

seed_everything(0)
inputs = TaskInputs(protocol, manifest, split, 1.0, 0, log=logging.getLogger("seg"), encoder=EncoderHandle(card, build),
                    spec=spec, cache_dir=work / "cache", work_dir=work / f"job-{distributed.world()}")
result = Segmentation().run(inputs)
if distributed.rank() == 0:
    out.write_text(json.dumps({"metrics": result.metrics, "selected": result.selected,
                               "history": result.units["training"]["history"],
                               "processes": result.units["training"]["processes"],
                               "ids": result.units["ids"], "per_case": result.units["per_case"]}))
distributed.shutdown()
'''


def _run(command: list[str], cwd: Path) -> None:
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_torchrun_two_processes_match_one(demo_root, tmp_path):
    script = tmp_path / "seg_job.py"
    script.write_text(SCRIPT)
    args = [str(demo_root), str(tmp_path / "work")]
    # the one-process run fills the volume cache first, so the two ranks only read it
    _run([sys.executable, str(script), *args, str(tmp_path / "one.json")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args,
          str(tmp_path / "two.json")], tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["selected"]["volumes_per_step"] == two["selected"]["volumes_per_step"] == 2
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]] == [2]
    assert two["history"] == one["history"]  # the loss is the mean over all items, on every rank
    assert two["ids"] == one["ids"] and len(one["ids"]) == 2
    assert two["per_case"] == one["per_case"]
    assert two["metrics"] == one["metrics"]

"""Small task families the runner tests plug in, so they do not depend on any real family."""

from __future__ import annotations

import os
import time

from sklearn.metrics import roc_auc_score

from asap_bench.data.manifest import label_matrix
from asap_bench.tasks.base import TaskFamily, TaskInputs, TaskResult


class MeanDifference(TaskFamily):
    """Score = projection on the train class-mean difference; AUC of the first label on test."""

    name = "cls"
    needs = "global"

    def run(self, inputs: TaskInputs) -> TaskResult:
        target = inputs.protocol.data.target
        labels = label_matrix(inputs.manifest, target).iloc[:, 0]
        train = [c for c in inputs.train if labels[c] in (0, 1)]
        x = inputs.features.global_features(train)
        y = labels[train].to_numpy()
        direction = x[y == 1].mean(0) - x[y == 0].mean(0)
        if os.environ.get("ASAP_TEST_FAIL_SEED") == str(inputs.seed):
            raise FloatingPointError("loss became NaN at step 3")
        evaluated, manifest, features, ref = inputs.split.test, inputs.manifest, inputs.features, inputs.protocol.data
        if inputs.target is not None:
            manifest, features, ref = inputs.target, inputs.target_features, inputs.protocol.transfer.target
            evaluated = list(manifest.frame.index)
        truth = label_matrix(manifest, ref.target).iloc[:, 0]
        scores = features.global_features(evaluated) @ direction
        auc = float(roc_auc_score(truth[evaluated].to_numpy(), scores))
        return TaskResult({"auc": auc}, sizes={"train": len(train), "test": len(evaluated)},
                          units={"kind": "case", "ids": evaluated, "scores": scores.tolist()})


class Slow(MeanDifference):
    """The same, but each job takes a while: room for a SIGKILL in the middle of a run."""

    def run(self, inputs: TaskInputs) -> TaskResult:
        time.sleep(float(os.environ.get("ASAP_TEST_JOB_SECONDS", "0.5")))
        return super().run(inputs)


class TokenMean(MeanDifference):
    """The same score on the mean of pooled patch tokens; checks the token shape it was promised."""

    name = "rg"
    needs = "tokens"

    def token_grid(self, protocol):
        return (2, 2, 2)

    def run(self, inputs: TaskInputs) -> TaskResult:
        ids = inputs.split.test
        tokens = inputs.features.tokens(ids)
        width = inputs.features.global_features(ids[:1]).shape[1]
        assert tokens.shape == (len(ids), 8, width), tokens.shape
        return TaskResult({"bleu4": float(abs(tokens).mean())}, sizes={"test": len(ids)},
                          provenance={"text_model": "tiny", "text_model_sha256": "0" * 64})


class FineTune(TaskFamily):
    """Builds the encoder, 'trains' in resumable steps kept in the work folder, scores its weights.

    ``ASAP_TEST_STOP_AT`` interrupts the first attempt at that step (as Ctrl-C does), so a rerun must resume.
    """

    name = "seg"
    needs = "volumes"

    def run(self, inputs: TaskInputs) -> TaskResult:
        import json

        import torch

        first, second = inputs.encoder.build(), inputs.encoder.build()
        assert first.training and all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
        state = inputs.work_dir / "state.json"
        inputs.work_dir.mkdir(parents=True, exist_ok=True)
        done = json.loads(state.read_text()) if state.is_file() else {"step": 0, "starts": []}
        done["starts"].append(done["step"])
        for step in range(done["step"], 10):
            if os.environ.get("ASAP_TEST_STOP_AT") == str(step) and len(done["starts"]) == 1:
                raise KeyboardInterrupt(f"interrupted at step {step}")
            done["step"] = step + 1
            state.write_text(json.dumps(done))
        weight = float(next(first.parameters()).detach().abs().sum())
        return TaskResult({"dice": 0.5}, notes={"starts": ",".join(map(str, done["starts"]))},
                          selected={"weight_sum": weight, "input_size": list(inputs.spec.size)},
                          sizes={"train": len(inputs.train)})

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

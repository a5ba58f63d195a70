"""The objectives' registry: each training objective by name, with what it minimises. config's
choices (`train.objective`, `train.phases`) come from here, and the training loop loads an
objective's module (`objectives/<name>.py`) by its name. It imports nothing of the project, so
config, a floor below the objectives, can read it."""

from __future__ import annotations

import importlib

OBJECTIVES = {  # name -> what it minimises (the config's description)
    "sft": "cross-entropy on the teacher's sampled answers",
    "kl": "cross-entropy against the teacher's top-k next-token distribution WITH the prompt (topk null: forward "
          "KL over the whole vocabulary)",
    "on_policy": "reverse KL to the prompted teacher on the student's own samples",
    "jsd": "GKD's generalised Jensen-Shannon divergence to the prompted teacher (train.jsd.beta 0: forward KL, 1: "
           "reverse KL), on the teacher's answers or, with train.jsd.on_policy, the student's own",
}


def load(name: str):
    """The objective's module."""
    return importlib.import_module(f"promptdistill.objectives.{name}")

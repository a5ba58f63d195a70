"""Training objectives: what one optimiser step of `distill train` minimises. They are
registered by name in `promptdistill/registry.py`, whence config's choices; stages/train.py's
loop loads each from there.

An objective is one module here that turns a step's examples into what its loss needs:

    loss(ctx) -> Loss                              the loss its datums take (written in the module,
                                                   or loss.CROSS_ENTROPY)
    datums(ctx, examples, step) -> list[Datum]     this process's share of the step, each trained
                                                   token at weight 1 (the loop scales by 1/tokens)
    prepare(ctx, examples)                         optional: once, before the first step
    TEACHER                                        True when it asks the teacher during training
    JUDGES_SAMPLES                                 True when the teacher judges the student's own samples
    Options                                        optional: a pydantic model of its `train.<name>` options
    on_turns(cfg) -> bool                          optional: True when it learns one answered turn at a time
                                                   (it samples the student's answer to each); without it, an
                                                   example is a whole conversation, the loss on every answer

The loop owns the rest of the step: the data-parallel share, the token weights, the
micro-batches, forward_backward and optim_step.
"""

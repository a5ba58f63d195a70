"""Probe what a Tinker-compatible server does beyond the cross_entropy recipe we train with:
each feature a soft-label (`kl`) or on-policy objective might need, tried once with the
tinker SDK, its outcome printed one line each. Run with the project's Python, e.g. against
the server `make test-tinker` starts (or any other):

    TINKER_BASE_URL=http://127.0.0.1:PORT TINKER_API_KEY=tml-x TINKER_MODEL=/path/to/model python probe.py
"""

import os

import numpy as np
import tinker
from tinker import types

K = 4  # candidate tokens per position, as a top-k soft label would carry


def tensor(values, dtype: str) -> types.TensorData:
    a = np.asarray(values)
    return types.TensorData(data=a.flatten().tolist(), dtype=dtype, shape=list(a.shape))


def datum(tokens: list[int], **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def probe(name: str, call) -> None:
    try:
        print(f"{name}: ok, {call()}", flush=True)
    except Exception as e:  # noqa: BLE001  the outcome is what is reported
        print(f"{name}: FAILED, {type(e).__name__}: {str(e)[:300]}", flush=True)


def main() -> None:
    model = os.environ["TINKER_MODEL"]
    service = tinker.ServiceClient()
    trainer = service.create_lora_training_client(base_model=model, rank=8).result()
    tokens = list(range(100, 112))  # any ids in the vocabulary
    n = len(tokens) - 1
    targets, ones = tokens[1:], np.ones(n)

    def fwd(loss: str, **inputs):
        out = trainer.forward([datum(tokens, **inputs)], loss).result()
        return {k: list(v.shape) for k, v in out.loss_fn_outputs[0].items()}, out.metrics

    probe("cross_entropy, targets (N,)", lambda: fwd("cross_entropy", target_tokens=tensor(targets, "int64"),
                                                     weights=tensor(ones, "float32")))
    soft = np.stack([np.array(targets) + k for k in range(K)], axis=1)  # (N, K) candidate ids
    probe(f"cross_entropy, targets (N, {K}) soft labels", lambda: fwd(
        "cross_entropy", target_tokens=tensor(soft, "int64"), weights=tensor(np.full((n, K), 1 / K), "float32")))
    rl = dict(target_tokens=tensor(targets, "int64"), logprobs=tensor(-ones, "float32"),
              advantages=tensor(ones, "float32"))
    for loss in ("importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"):
        probe(f"{loss} (forward)", lambda loss=loss: fwd(loss, **rl))
    probe("importance_sampling forward_backward + optim_step", lambda: (
        trainer.forward_backward([datum(tokens, **rl)], "importance_sampling").result().metrics,
        trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result().metrics))

    sampler = trainer.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokens[:6])
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=0)

    def sample(**kw):
        r = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params, **kw).result()
        s = r.sequences[0]
        return {"tokens": len(s.tokens), "logprobs": None if s.logprobs is None else len(s.logprobs),
                "topk_sample": None if s.topk_logprobs is None else len(s.topk_logprobs),
                "prompt_logprobs": None if r.prompt_logprobs_np is None else len(r.prompt_logprobs_np),
                "topk_prompt": None if r.topk_prompt_logprobs_np is None else len(r.topk_prompt_logprobs_np)}

    probe("sample, 2 samples", sample)
    probe("sample, topk_sample_logprobs=4", lambda: sample(topk_sample_logprobs=K))
    probe("sample, include_prompt_logprobs", lambda: sample(include_prompt_logprobs=True))
    probe("sample, topk_prompt_logprobs=4", lambda: sample(include_prompt_logprobs=True, topk_prompt_logprobs=K))
    probe("compute_logprobs (prompt)", lambda: len(sampler.compute_logprobs(prompt).result()))
    probe("save_weights_external", lambda: trainer.save_weights_external("probe").result().path)
    probe("save_weights_for_sampler", lambda: trainer.save_weights_for_sampler("probe").result().path)


if __name__ == "__main__":
    main()

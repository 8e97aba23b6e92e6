"""Continuation log-likelihoods from transformers' forward of a saved checkpoint, steered by a
forward hook: the independent reference of the log-likelihood multiple-choice routes."""

from __future__ import annotations

import functools

import pytest

from mup.evals._loglik import common_prefix


@functools.cache
def torch_model(model_dir: str):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_dir)


def torch_logliks(model_dir, vector, layer: int, m: float, prompt: str, continuations):
    """Summed continuation log-probabilities (float64 log-softmax of the float32 logits), with
    m * vector added to block `layer`'s output (mup's convention)."""
    torch = pytest.importorskip("torch")
    model, tokenizer = torch_model(str(model_dir))
    v = torch.tensor(vector, dtype=torch.float32)

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + m * v, *output[1:])
        return output + m * v

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        p_ids = tokenizer(prompt)["input_ids"]
        out = []
        for c in continuations:
            ids = tokenizer(prompt + c)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            start = max(1, common_prefix(p_ids, ids))
            out.append(float(sum(logp[j - 1, ids[j]] for j in range(start, len(ids)))))
        return out
    finally:
        handle.remove()

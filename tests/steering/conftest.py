"""A tiny random llama with a word-level chat tokenizer, and synthetic contrast pairs for it.

The model is built in memory (`init_params`, weights re-scaled so logits are not uniform), so
the steering tests need neither torch nor a checkpoint on disk. Pairs: prompts of "q" words,
chosen responses of "a" words, rejected responses of "b" words; a vector that shifts the
output towards "a" words raises every pair's chosen-vs-rejected margin, held-out ones included.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support.checkpoints import word_tokenizer
from _support.configs import tiny_config

WORDS = [f"q{i}" for i in range(30)] + [f"a{i}" for i in range(14)] + [f"b{i}" for i in range(14)]


@pytest.fixture(scope="session")
def tiny_model():
    from mup._resolve import ResolvedSpec
    from mup.models import Model, init_params

    config = tiny_config(n_layers=3)
    # Shapes from `init_params` without running it (one small compile per leaf otherwise);
    # values drawn in numpy: std 0.3 gives the model preferences to steer against (at the
    # default 0.02 the logits are nearly uniform). Norm weights stay at 1.
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    spec = ResolvedSpec(spec="tiny", kind="dir", path=Path("tiny"), name="tiny-random-llama")
    return Model(
        config=config, params=params, tokenizer=word_tokenizer(WORDS), spec=spec, dtype="float32"
    )


def make_pairs(n: int, seed: int, split: str = "train"):
    from mup.steering import PreferencePair

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = " ".join(f"q{j}" for j in rng.integers(0, 30, size=rng.integers(2, 6)))
        a = " ".join(f"a{j}" for j in rng.integers(0, 14, size=rng.integers(2, 5)))
        b = " ".join(f"b{j}" for j in rng.integers(0, 14, size=rng.integers(2, 5)))
        out.append(
            PreferencePair(
                id=f"{split}-{seed}-{i}",
                prompt=({"role": "user", "content": q},),
                chosen=a,
                rejected=b,
                split=split,
            )
        )
    return out


@pytest.fixture(scope="session")
def tiny_pairs():
    """(train, test) synthetic pairs for the tiny model."""
    return make_pairs(16, seed=1, split="train"), make_pairs(8, seed=2, split="test")

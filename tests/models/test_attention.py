"""Block-causal attention (the cache-free forward above one query block) equals the full one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mup.models import _layers


@pytest.mark.parametrize(
    ("window", "softcap"), [(None, None), (40, None), (None, 50.0)], ids=["causal", "window", "cap"]
)
def test_causal_attention_equals_full_attention(window, softcap):
    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 3 * _layers.CAUSAL_CHUNK + 37, 4, 2, 8  # a ragged last block
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    valid = np.ones((B, T), bool)
    valid[1, T - 50 :] = False  # right padding in one row
    slots = jnp.arange(T, dtype=jnp.int32)
    mask = _layers.attention_mask(slots, slots, jnp.asarray(valid), window=window)
    kw = dict(scale=H**-0.5, logit_softcap=softcap)
    full = np.asarray(_layers.attention(q, k, v, mask, **kw))
    blocks = np.asarray(_layers.causal_attention(q, k, v, mask, **kw))
    # Only real query rows are ever read (padding rows see no keys and are discarded).
    np.testing.assert_allclose(blocks[valid], full[valid], rtol=1e-6, atol=1e-6)

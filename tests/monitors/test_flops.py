"""The FLOPs convention against a hand count on a tiny config (2 x matmul weights x tokens)."""

from __future__ import annotations

import pytest
from _support.configs import tiny_config

from mup.monitors import block_matmul_params, llm_flops, probe_flops

# D=8, N=2 query heads, K=1 kv head (MQA), H=4, F=16, L=2 blocks, V=32.
TINY = tiny_config(
    vocab_size=32, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, tie_embeddings=True
)

# One block's matmul weights, by hand:
#   q: D x N*H = 8 x 8 = 64;  k: D x K*H = 8 x 4 = 32;  v: 32;  o: N*H x D = 64   -> 192
#   gate, up: D x F = 128 each;  down: F x D = 128                                 -> 384
BLOCK = 64 + 32 + 32 + 64 + 3 * 128  # 576
HEAD = 8 * 32  # LM head D x V, whether tied or not: a matmul either way


def test_block_matmul_params_by_hand():
    assert BLOCK == 576
    assert block_matmul_params(TINY) == BLOCK


def test_llm_flops_by_hand():
    # 10 tokens through both blocks, logits at the last position.
    assert llm_flops(TINY, 10) == 2 * 10 * 2 * BLOCK + 2 * 1 * HEAD == 23552
    # One block, logits at 3 positions (a likelihood baseline's completion tokens).
    assert llm_flops(TINY, 10, n_blocks=1, logit_positions=3) == 2 * 10 * 576 + 2 * 3 * 256
    # No blocks, no logits: nothing.
    assert llm_flops(TINY, 10, n_blocks=0, logit_positions=0) == 0
    assert llm_flops(TINY, 0, logit_positions=0) == 0


def test_llm_flops_agree_with_the_config_count():
    # ModelConfig.flops_per_token counts the same matmuls (without attention at seq_len=0).
    assert llm_flops(TINY, 7, logit_positions=7) == pytest.approx(7 * TINY.flops_per_token())
    assert llm_flops(TINY, 7, n_blocks=1, logit_positions=0) == pytest.approx(
        7 * TINY.flops_per_token(up_to_layer=1)
    )


def test_probe_flops_by_hand():
    # A 9-parameter probe (8 weights and a bias) reading 10 tokens: 2 * 9 * 10.
    assert probe_flops(9, 10) == 180
    # Reading layer 1 of a model it would not otherwise run: plus the forward through block 0
    # (layer L is the residual stream entering block L, so L blocks), no LM head.
    assert probe_flops(9, 10, forward_to_layer=1, config=TINY) == 180 + 2 * 10 * 1 * BLOCK
    assert probe_flops(9, 10, forward_to_layer=2, config=TINY) == 180 + 2 * 10 * 2 * BLOCK
    assert probe_flops(9, 10, forward_to_layer=0, config=TINY) == 180


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: llm_flops(TINY, 10, n_blocks=3), r"n_blocks must be in \[0, 2\]"),
        (lambda: llm_flops(TINY, -1), "token counts must be >= 0"),
        (lambda: llm_flops(TINY, 1, logit_positions=-1), "token counts must be >= 0"),
        (lambda: probe_flops(9, 10, forward_to_layer=1), "needs the model's config"),
        (
            lambda: probe_flops(9, 10, forward_to_layer=3, config=TINY),
            r"forward_to_layer .*\[0, 2\]",
        ),
        (lambda: probe_flops(-9, 10), "n_params and n_tokens must be >= 0"),
        (lambda: probe_flops(9, -10), "n_params and n_tokens must be >= 0"),
    ],
)
def test_flops_refuse_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()

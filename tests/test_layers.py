"""Building blocks of compile/layers.py against jax's own ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iree_runner.compile import layers as L


@pytest.mark.parametrize("k", [1, 2, 8])
def test_top_k_matches_lax_top_k_with_ties(k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    x[1, [3, 7, 11]] = x[1].max() + 1.0  # a three-way tie at the top: lowest index first
    x[2] = 0.5  # all equal
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    got_v, got_i = jax.jit(L.top_k, static_argnums=1)(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    assert got_i.dtype == jnp.int32


@pytest.mark.parametrize("n", [7, 151936])
def test_first_argmax_is_lowest_index_of_max(n):
    from iree_runner.compile.export import first_argmax

    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    x[[n // 3, n - 1]] = x.max() + 1.0  # tie: the lower index wins
    got = jax.jit(first_argmax)(jnp.asarray(x))
    assert got.dtype == jnp.int32 and got.shape == () and int(got) == n // 3


@pytest.mark.parametrize("C", [1, 5])
@pytest.mark.parametrize("window", [None, 3])
def test_all_heads_attention_equals_per_head(C, window):
    """With an f16 cache attention runs as 2-D matmuls against every KV head; same result as
    the per-head form on the same (f16-rounded) cache."""
    rng = np.random.default_rng(2)
    S, KVH, G, Dh, start = 16, 2, 3, 8, 6
    f = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    cache_k, cache_v = (f(*L.kv_cache_shape(2, KVH, Dh, S)).astype(jnp.float16) for _ in range(2))
    q, k, v = f(C, KVH * G, Dh), f(C, KVH, Dh), f(C, KVH, Dh)
    positions = start + jnp.arange(C, dtype=jnp.int32)
    outs = [L.attention(q.astype(jnp.float16).astype(jnp.float32) if ck.dtype == jnp.float32 else q, k, v,
                        L.KVCache(ck, cv, positions), 1, 0.3, window)
            for ck, cv in ((cache_k, cache_v), (cache_k.astype(jnp.float32), cache_v.astype(jnp.float32)))]
    np.testing.assert_allclose(outs[0], outs[1], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("one_plus", [False, True])
def test_fused_norm_and_rope_equals_norm_then_rope(one_plus):
    """rms_norm_rope with the load-time [w; w halves swapped] == rms_norm then apply_rope."""
    from test_resident import FakeCheckpoint

    from iree_runner.resident import gather_weights

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 4, 16)).astype(np.float32) * 3.0)
    w = rng.standard_normal(16).astype(np.float32)
    ckpt = FakeCheckpoint({"l.q_norm.weight": w})
    w_rope = gather_weights(ckpt, ["l.q_norm.weight_rope"], np.float32)["l.q_norm.weight_rope"]
    cos, sin = L.rope_cos_sin(jnp.arange(5, 8, dtype=jnp.int32), L.rope_inv_freq(16, 10000.0, None))
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    want = L.apply_rope(L.rms_norm(x, jnp.asarray(w), 1e-6, one_plus=one_plus), cos, sin)
    got = L.rms_norm_rope(x, jnp.asarray(w_rope), r, cos, sin, one_plus=one_plus)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="partial rotary"):
        L.rms_norm_rope(x, jnp.asarray(w_rope), r, cos[:, :8], sin[:, :8])

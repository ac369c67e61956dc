"""Gathering the tensors a compiled model expects from a checkpoint (iree_runner/resident.py)."""

import numpy as np
import pytest

from iree_runner.resident import MissingWeight, gather_weights


class FakeCheckpoint:
    model_dir = "/models/fake"

    def __init__(self, tensors):
        self.tensors = tensors

    def __contains__(self, name):
        return name in self.tensors

    def names(self):
        return list(self.tensors)

    def load(self, name, dtype):
        return self.tensors[name].astype(dtype)

    def load_all(self, dtype, names):
        return {n: self.load(n, dtype) for n in names}


def _ckpt(with_k=True):
    p = "model.layers.0"
    t = {f"{p}.self_attn.q_proj.weight": np.full((4, 3), 1.0), f"{p}.self_attn.v_proj.weight": np.full((2, 3), 3.0),
         f"{p}.self_attn.q_proj.bias": np.full(4, 1.0), f"{p}.self_attn.k_proj.bias": np.full(2, 2.0),
         f"{p}.self_attn.v_proj.bias": np.full(2, 3.0),
         f"{p}.mlp.gate_proj.weight": np.full((5, 3), 4.0), f"{p}.mlp.up_proj.weight": np.full((5, 3), 5.0)}
    if with_k:
        t[f"{p}.self_attn.k_proj.weight"] = np.full((2, 3), 2.0)
    return FakeCheckpoint(t)


def test_stacks_qkv_and_gate_up_in_order():
    names = ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.qkv_proj.bias",
             "model.layers.0.mlp.gate_up_proj.weight"]
    w = gather_weights(_ckpt(), names, np.float16)
    assert w[names[0]].shape == (8, 3) and w[names[0]].dtype == np.float16
    np.testing.assert_array_equal(w[names[0]][:, 0], [1, 1, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(w[names[1]], [1, 1, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(w[names[2]][:, 0], [4] * 5 + [5] * 5)


def test_missing_part_is_named():
    with pytest.raises(MissingWeight, match=r"/models/fake.*'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        gather_weights(_ckpt(with_k=False), ["model.layers.0.self_attn.qkv_proj.weight"], np.float32)

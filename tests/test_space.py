"""Space: sizes, constraints, arg constraints, platform filters, errors, and staying cheap."""

from __future__ import annotations

import itertools

import pytest
import triton

from tunebook import _compat
from tunebook._space import Space, SpaceError, platform_allows

H100 = {"backend": "cuda", "arch": "90", "device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0"}
A100 = {"backend": "cuda", "arch": "80", "device": "NVIDIA A100-SXM4-80GB", "triton": "3.6.0"}
MI300 = {"backend": "hip", "arch": "gfx942", "device": "AMD Instinct MI300X", "triton": "3.6.0"}
CPU = {"backend": "interpreter", "arch": "x86_64", "device": "x86_64", "triton": "3.6.0"}


def gemm_space(**extra):
    return Space(
        BLOCK_M=[32, 64, 128],
        BLOCK_N=[32, 64, 128],
        BLOCK_K=[32, 64],
        num_warps=[4, 8],
        num_stages=range(2, 6),
        **extra,
    )


def test_size_iteration_order_and_configs():
    space = gemm_space()
    assert space.size == len(space) == 3 * 3 * 2 * 2 * 4
    configs = list(space)
    assert all(isinstance(c, triton.Config) for c in configs)
    expected = list(itertools.product([32, 64, 128], [32, 64, 128], [32, 64], [4, 8], range(2, 6)))
    got = [
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
        for c in configs
    ]
    assert got == expected
    # Options are Config fields, never meta-parameters.
    assert set(configs[0].kwargs) == {"BLOCK_M", "BLOCK_N", "BLOCK_K"}
    assert [str(c) for c in space] == [str(c) for c in configs]  # deterministic


def test_constraints_filter_len_iteration_and_candidates():
    space = gemm_space(constraints=[lambda c: c["BLOCK_M"] >= c["BLOCK_N"], lambda c: c["num_warps"] == 4])
    expected = [(m, n) for m in (32, 64, 128) for n in (32, 64, 128) if m >= n]
    assert len(space) == len(expected) * 2 * 4
    cands = space.candidates()
    assert len(cands) == len(space) == len(list(space))
    assert all(c["BLOCK_M"] >= c["BLOCK_N"] and c["num_warps"] == 4 for c in cands)
    assert all(type(c) is dict for c in cands)


def test_constraint_receives_a_plain_dict_and_errors_name_the_problem():
    seen = []
    space = Space(B=[1, 2], constraints=[lambda c: seen.append(c) or True])
    len(space)
    assert seen and all(type(c) is dict and set(c) == {"B"} for c in seen)
    broken = Space(B=[1, 2], constraints=[lambda c: c["BLOCK"] > 1])
    with pytest.raises(SpaceError, match=r"constraint #0.*KeyError.*'B'"):
        len(broken)


def test_arg_constraints_apply_only_with_args():
    space = gemm_space(arg_constraints=[lambda c, args: c["BLOCK_K"] <= args["K"]])
    assert len(space.candidates()) == len(space)
    small = space.candidates(args={"K": 32, "M": 16})
    assert small and all(c["BLOCK_K"] == 32 for c in small)
    assert len(small) == len(space) // 2
    with pytest.raises(SpaceError, match="arg constraint #0"):
        space.candidates(args={"M": 16})


def test_platform_filters_num_ctas_and_maxnreg():
    space = Space(BLOCK=[64, 128], num_ctas=[1, 2], maxnreg=[None, 128])
    assert len(space.candidates(H100)) == 8
    on_a100 = space.candidates(A100)
    assert len(on_a100) == 4 and all(c["num_ctas"] == 1 for c in on_a100)
    for other in (MI300, CPU):
        kept = space.candidates(other)
        assert len(kept) == 2 and all(c["num_ctas"] == 1 and c["maxnreg"] is None for c in kept)
    assert platform_allows({"num_ctas": 2}, {"backend": "cuda", "arch": "sm_100a"})
    assert not platform_allows({"num_ctas": 2}, {"backend": "cuda"})  # unknown arch: be safe


def test_to_config_splits_meta_and_options():
    space = Space(BLOCK=[64], GROUP=[8], num_warps=[8], num_stages=[3], maxnreg=[None, 128])
    cfg = space.to_config({"BLOCK": 64, "GROUP": 8, "num_warps": 8, "num_stages": 3, "maxnreg": 128})
    assert cfg.kwargs == {"BLOCK": 64, "GROUP": 8}
    assert (cfg.num_warps, cfg.num_stages, cfg.maxnreg) == (8, 3, 128)
    with pytest.raises(SpaceError, match="BLOCK_Q is not"):
        space.to_config({"BLOCK": 64, "GROUP": 8, "BLOCK_Q": 1})
    with pytest.raises(SpaceError, match="GROUP missing"):
        space.to_config({"BLOCK": 64})


def test_unknown_option_names_are_errors_listing_valid_names():
    with pytest.raises(SpaceError) as info:
        Space(BLOCK=[64], num_warp=[4])
    assert "num_warp" in str(info.value) and "'num_warps'" in str(info.value)
    for name in _compat.CONFIG_OPTION_FIELDS:
        assert name in str(info.value)
    with pytest.raises(SpaceError, match=r"num_consumer_groups.*Valid option names"):
        Space(BLOCK=[64], num_consumer_groups=[1, 2])
    # The escape hatch for a kernel whose own meta-parameter looks like an option.
    space = Space(BLOCK=[64], meta={"num_warp": [1, 2]})
    assert space.to_config(space.candidates()[1]).kwargs == {"BLOCK": 64, "num_warp": 2}
    with pytest.raises(SpaceError, match="as keyword parameter"):
        Space(meta={"num_warps": [4]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"B": 64}, "must be a list, tuple or range"),
        ({"B": []}, "is empty"),
        ({"B": [1, 1]}, "twice"),
        ({"B": [[1]]}, "unhashable"),
    ],
)
def test_bad_values_are_explained(kwargs, match):
    with pytest.raises(SpaceError, match=match):
        Space(**kwargs)


def test_repr_is_readable():
    space = gemm_space(constraints=[lambda c: True])
    text = repr(space)
    assert "BLOCK_M=[32, 64, 128]" in text and "num_stages=range(2, 6)" in text
    assert "3x3x2x2x4 = 144 configs" in text and "1 constraint" in text
    len(space)
    assert "144 after" in repr(space)


def test_sample_is_seeded_distinct_and_feasible():
    space = gemm_space(constraints=[lambda c: c["BLOCK_M"] >= c["BLOCK_N"]])
    a = space.sample(20, seed=7)
    assert a == space.sample(20, seed=7)
    assert a != space.sample(20, seed=8)
    keys = [tuple(c.values()) for c in a]
    assert len(set(keys)) == 20 and all(c["BLOCK_M"] >= c["BLOCK_N"] for c in a)
    assert len(space.sample(10_000, seed=0)) == len(space)
    # A constraint that almost nothing passes still yields every feasible point.
    tight = gemm_space(constraints=[lambda c: (c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) == (32, 32, 2)])
    assert len(tight.sample(100, seed=1)) == 2 * 2


def test_a_hundred_thousand_configs_stay_cheap():
    calls = []

    def constraint(c):
        calls.append(1)
        return c["A"] % 2 == 0

    # 10 * 10 * 10 * 10 * 10 = 10^5 points.
    space = Space(
        A=range(10), B=range(10), C=range(10), D=range(10), num_stages=range(10), constraints=[constraint]
    )
    assert space.size == 100_000
    # Sampling a few draws a few, not the product.
    assert len(space.sample(50, seed=0)) == 50
    assert len(calls) < 1_000
    # The first config is found after one check; nothing is enumerated up front.
    calls.clear()
    next(iter(space))
    assert len(calls) == 1
    assert len(space) == 50_000 and len(calls) == 1 + 100_000
    calls.clear()
    assert len(space) == 50_000 and calls == []  # cached: compact indices, not dicts
    assert space._feasible is not None and space._feasible.itemsize <= 4
    unconstrained = Space(
        A=range(100), B=range(100), C=range(10), num_warps=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    )
    assert len(unconstrained) == 1_000_000 and unconstrained._feasible is None
    assert len(unconstrained.sample(5, seed=3)) == 5


@pytest.mark.parametrize(
    ("result", "said"),
    [
        (None, r"returned None \(a missing return\?\) instead of True or False"),
        ("tensor", r"returned Tensor tensor\(\[.*\]\), which is neither True nor False \(RuntimeError"),
    ],
)
def test_a_constraint_that_returns_no_bool_is_named_with_a_candidate(result, said):
    """Found by a search review: a constraint without ``return`` rejected every config in
    silence, and one returning a tensor raised a bare RuntimeError from Space.__len__."""
    import torch

    def check(c):
        return torch.tensor([c["B"] > 1, True]) if result == "tensor" else None

    with pytest.raises(
        SpaceError, match=r"constraint #1 \('check'\) " + said + r".* on candidate \{'B': 1\}"
    ):
        len(Space(B=[1, 2], constraints=[lambda c: True, check]))
    with pytest.raises(SpaceError, match=r"arg constraint #0 \('<lambda>'\) " + said):
        Space(B=[1, 2], arg_constraints=[lambda c, args: check(c)]).candidates(args={"n": 1})
    import numpy as np

    assert len(Space(B=[1, 2], constraints=[lambda c: np.bool_(c["B"] > 1)])) == 1  # NumPy's bool is a bool


def test_numpy_and_torch_values_become_python_scalars():
    """Found by a search review: ``list(2 ** np.arange(4, 7))`` gave np.int64 values, which
    Triton's interpreter refuses and the book stores as text; an array was refused with
    advice to wrap it in a list."""
    import numpy as np
    import torch

    for values in (list(2 ** np.arange(4, 7)), np.array([16, 32, 64]), torch.tensor([16, 32, 64])):
        space = Space(BLOCK=values, num_warps=[np.int32(4)])
        assert space.params == {"BLOCK": (16, 32, 64), "num_warps": (4,)}
        assert all(type(v) is int for v in space.params["BLOCK"])
        assert space.to_config(space.candidates()[0]).kwargs == {"BLOCK": 16}
    assert Space(F=[np.float32(0.5), np.bool_(True)]).params == {"F": (0.5, True)}
    with pytest.raises(SpaceError, match=r"this array has 2 dimensions"):
        Space(BLOCK=np.array([[16, 32]]))
    with pytest.raises(SpaceError, match=r"Write BLOCK=\[value.item\(\)\] for a single value"):
        Space(BLOCK=np.array(16))
    with pytest.raises(SpaceError, match="twice"):
        Space(BLOCK=[np.int64(16), 16])

"""tunebook.patch() / unpatch() in this process: what is replaced, what is served, what is
put back, and the Triton attributes a tunebook autotuner keeps. Real kernels on the CPU
interpreter; the processes that show persistence are in test_thirdparty.py and
test_libraries.py."""

from __future__ import annotations

import gc
import inspect
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import triton
import triton.runtime.autotuner as triton_autotuner

import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook import _adopt, _patch

TritonAutotuner = triton_autotuner.Autotuner
TRITON_AUTOTUNE = triton_autotuner.autotune
KEY = (200, "torch.float32", "torch.float32", "torch.float32")


@pytest.fixture
def patched() -> Iterator[None]:
    gc.collect()  # subclasses that earlier tests defined are gone, not named again
    tunebook.patch()
    try:
        yield
    finally:
        tunebook.unpatch()


def triton_kernel(replay: Replay, cls: type = TritonAutotuner, **options: Any) -> Any:
    """A Triton autotuner of add_kernel, as a library builds one (timed by ``replay``)."""
    return cls(
        add_kernel,
        add_kernel.arg_names,
        block_configs(32, 64, 128),
        ["n"],
        None,
        None,
        pre_hook=replay.pre_hook,
        do_bench=replay,
        **options,
    )


def launch(kernel: Any, n: int = 200) -> torch.Tensor:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)
    return out


# ---------------------------------------------------------------------- the names and the class


def test_patch_replaces_autotune_under_every_name_and_unpatch_puts_back_exactly() -> None:
    library = types.ModuleType("a_library")
    library.autotune = triton.autotune  # `from triton import autotune`, before the patch
    library.other = lambda: None  # another library's own patch: left alone
    sys.modules["a_library"] = library
    class_before = dict(TritonAutotuner.__dict__)
    try:
        tunebook.patch()
        tunebook.patch()  # idempotent
        homes = [triton.autotune, triton.runtime.autotune, triton_autotuner.autotune, library.autotune]
        assert all(home is _patch.autotune for home in homes)
        assert "cache_results" in inspect.signature(triton.autotune).parameters  # fla's probe
        assert TritonAutotuner.run is not class_before["run"]
        tunebook.unpatch()
        tunebook.unpatch()  # idempotent
        homes = [triton.autotune, triton.runtime.autotune, triton_autotuner.autotune, library.autotune]
        assert all(home is TRITON_AUTOTUNE for home in homes)
        assert dict(TritonAutotuner.__dict__) == class_before
    finally:
        tunebook.unpatch()
        del sys.modules["a_library"]


def test_a_reference_kept_past_unpatch_decorates_as_triton() -> None:
    tunebook.patch()
    kept = triton.autotune
    tunebook.unpatch()
    kernel = kept(block_configs(32, 64), key=["n"])(add_kernel)
    assert type(kernel) is TritonAutotuner


def test_patched_decorator_builds_tunebook_autotuners_with_readable_names(patched: None) -> None:
    kernel = triton.autotune(block_configs(32, 64, 128), key=["n"], cache_results=True)(add_kernel)
    assert isinstance(kernel, tunebook.Autotuner) and isinstance(kernel, triton.runtime.Autotuner)
    assert kernel.cache_results is True
    identity = kernel.identity()
    assert identity.kernel.name == "small_kernels.add_kernel"  # module + qualname
    plain = tunebook.autotune(block_configs(32, 64, 128), key=["n"])(add_kernel)
    assert plain.identity().kernel.id == identity.kernel.id  # the name is for people; identity is exact
    launch(kernel)
    assert tunebook.stats()["benchmarked"] == 3


def test_patched_decorator_falls_back_to_triton_when_tunebook_cannot_build(
    patched: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no tunebook today")

    monkeypatch.setattr(_patch, "_tunebook_autotune", refuse)
    replay = Replay({32: 2.0, 64: 1.0})
    with pytest.warns(
        tunebook.PatchWarning, match=r"kernels\.add_kernel keeps Triton's autotuner.*no tunebook"
    ):
        kernel = triton.autotune(block_configs(32, 64), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
            add_kernel
        )
    assert type(kernel) is TritonAutotuner
    launch(kernel)
    assert replay.measured == [32, 64] and tunebook.stats()["benchmarked"] == 0


# ---------------------------------------------------------------------- adopted instances


def test_kernel_decorated_before_the_patch_is_served_and_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = triton_kernel(replay)
    launch(kernel, 100)  # Triton tunes a key before the patch
    tuned_before = dict(kernel.cache)
    assert len(replay.measured) == 3

    bench_calls: list[Any] = []
    tritons_bench = TritonAutotuner._bench

    def counted_bench(self: Any, *args: Any, **kwargs: Any) -> Any:
        bench_calls.append(args)
        return tritons_bench(self, *args, **kwargs)

    monkeypatch.setattr(TritonAutotuner, "_bench", counted_bench)
    tunebook.patch()
    try:
        launch(kernel)
        assert len(replay.measured) == 6  # tunebook measured the new key, with the kernel's do_bench
        assert bench_calls == [] and tunebook.stats()["benchmarked"] == 3
        assert kernel.best_config.kwargs == {"BLOCK": 64}  # Triton's attributes, on the instance
        assert kernel.cache[KEY] is kernel.best_config and set(kernel.configs_timings) == set(kernel.configs)
        assert kernel.bench_time > 0 and kernel.nargs is None
        assert all(kernel.cache[key] is config for key, config in tuned_before.items())  # served as written
        launch(kernel, 100)
        assert len(replay.measured) == 6
        kernel.cache[KEY] = kernel.configs[2]  # a caller's write overrules, as in Triton
        launch(kernel)
        assert kernel.best_config is kernel.configs[2]
        kernel.cache = {}  # a library assigning a new dict is followed
        launch(kernel)
        assert kernel.best_config.kwargs == {"BLOCK": 64} and len(replay.measured) == 6  # from the book
    finally:
        tunebook.unpatch()
    assert type(kernel.cache) is dict and _adopt.ATTRIBUTE not in vars(kernel)
    assert list(kernel.cache) == [KEY]
    launch(kernel, 300)  # a new key: Triton's own path again
    assert len(bench_calls) == 3 and tunebook.stats()["benchmarked"] == 3


def test_subclass_whose_run_calls_super_is_adopted_and_its_cache_writes_hold(patched: None) -> None:
    class Cached(TritonAutotuner):  # as fla-core's CachedAutotuner
        preset: dict[Any, Any] = {}

        def run(self, *args: Any, **kwargs: Any) -> Any:
            for key, config in self.preset.items():
                self.cache[key] = config
            return super().run(*args, **kwargs)

    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", tunebook.PatchWarning)  # served: nothing to warn about
        kernel = triton_kernel(replay, Cached)
    launch(kernel)
    assert vars(kernel)[_adopt.ATTRIBUTE] and tunebook.stats()["benchmarked"] == 3
    kernel.preset = {(300, *KEY[1:]): kernel.configs[0]}
    launch(kernel, 300)
    assert kernel.best_config is kernel.configs[0] and len(replay.measured) == 3


def test_subclass_pruning_is_its_own_with_nargs_set(patched: None) -> None:
    seen: list[dict[str, Any]] = []

    class Prunes(TritonAutotuner):
        def prune_configs(self, kwargs: dict[str, Any], configs: Any = None) -> list[Any]:
            seen.append(dict(self.nargs))
            return self.configs[1:]

    replay = Replay({32: 1.0, 64: 3.0, 128: 2.0})
    kernel = triton_kernel(replay, Prunes)
    launch(kernel)
    assert sorted(replay.measured) == [64, 128] and kernel.best_config.kwargs == {"BLOCK": 128}
    assert seen and seen[0]["n"] == 200


def test_unserved_subclasses_are_named_and_keep_tritons_behaviour() -> None:
    class OwnBench(TritonAutotuner):
        def _bench(self, *args: Any, config: Any, **meta: Any) -> Any:
            return super()._bench(*args, config=config, **meta)

    class OwnRun(TritonAutotuner):
        def run(self, *args: Any, **kwargs: Any) -> Any:
            return self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())

    gc.collect()
    with pytest.warns(tunebook.PatchWarning) as caught:
        tunebook.patch()
    try:
        (message,) = [str(w.message) for w in caught]  # one warning names them all
        assert "subclasses of Triton's Autotuner keep Triton's own tuning" in message
        assert "OwnBench (overrides _bench)" in message
        assert "OwnRun (overrides run() without calling Autotuner.run())" in message
        with pytest.warns(tunebook.PatchWarning, match=r"Later \(overrides do_bench\)"):

            class Later(TritonAutotuner):  # defined while patched: named at its class statement
                do_bench = property(lambda self: self._do_bench)

        for cls in (OwnBench, Later):
            replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
            kernel = triton_kernel(replay, cls)
            launch(kernel)
            assert len(replay.measured) == 3 and _adopt.ATTRIBUTE not in vars(kernel)
            assert type(kernel.cache) is dict
        launch(triton_kernel(Replay({}), OwnRun))
        assert tunebook.stats()["benchmarked"] == 0
    finally:
        tunebook.unpatch()


def test_a_run_override_calling_the_base_run_by_its_module_path_is_served(patched: None) -> None:
    """`triton.runtime.autotuner.Autotuner.run(self, ...)` is a Base.run call: such a class
    was warned about as never calling Autotuner.run and left to Triton."""

    class ByPath(TritonAutotuner):  # `triton` and `triton_autotuner`: this module's globals
        def run(self, *args: Any, **kwargs: Any) -> Any:
            return triton.runtime.autotuner.Autotuner.run(self, *args, **kwargs)

    class ByAlias(TritonAutotuner):
        def run(self, *args: Any, **kwargs: Any) -> Any:
            return triton_autotuner.Autotuner.run(self, *args, **kwargs)

    for cls in (ByPath, ByAlias):
        with warnings.catch_warnings():
            warnings.simplefilter("error", tunebook.PatchWarning)
            kernel = triton_kernel(Replay({32: 3.0, 64: 1.0, 128: 2.0}), cls)
            launch(kernel)
        assert vars(kernel)[_adopt.ATTRIBUTE] and kernel.best_config.kwargs == {"BLOCK": 64}


def test_a_kernel_benchmarking_outside_tunebook_is_named_once(patched: None) -> None:
    class Sometimes(TritonAutotuner):  # reads as calling Autotuner.run, but tunes its own way here
        def run(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.pop("via_base", False):
                return super().run(*args, **kwargs)
            self.nargs = dict(zip(self.arg_names, args))
            timings = {c: self._bench(*args, config=c, **kwargs) for c in self.configs}
            return self.fn.run(*args, **kwargs, **min(timings, key=timings.get).all_kwargs())

    kernel = triton_kernel(Replay({32: 3.0, 64: 1.0, 128: 2.0}), Sometimes)
    with pytest.warns(
        tunebook.PatchWarning, match=r"kernels\.add_kernel .*Sometimes\) benchmarks configs through"
    ):
        launch(kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tunebook.PatchWarning)
        launch(kernel)  # once


def test_an_instance_tunebook_cannot_build_from_keeps_triton(
    patched: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Any, host: Any) -> None:
        raise RuntimeError("cannot")

    monkeypatch.setattr(_adopt.Adopted, "__init__", refuse)
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = triton_kernel(replay)
    with pytest.warns(
        tunebook.PatchWarning, match=r"kernels\.add_kernel .* keeps Triton's autotuner.*cannot"
    ):
        launch(kernel)
    launch(kernel, 300)
    assert len(replay.measured) == 6 and tunebook.stats()["benchmarked"] == 0


# ---------------------------------------------------------------------- Triton's surface


def test_tunebook_autotuner_has_every_attribute_a_triton_autotuner_has() -> None:
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    theirs = triton_kernel(replay)
    launch(theirs)
    ours = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    launch(ours)
    assert isinstance(ours, triton.runtime.Autotuner)
    public = {name for name in vars(theirs) if not name.startswith("_")}
    public |= {"prune_configs", "do_bench", "warmup", "run"}
    assert public - set(dir(ours)) == set()
    for name in ("fn", "base_fn", "keys", "arg_names", "reset_to_zero", "restore_value", "cache_results"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert list(ours.cache) == list(theirs.cache) == [KEY]
    assert ours.best_config.kwargs == theirs.best_config.kwargs == {"BLOCK": 64}
    assert set(ours.configs_timings) == set(ours.configs) and ours.bench_time > 0
    assert ours.nargs is None and theirs.nargs is None
    assert ours.prune_configs({}) == ours.configs
    assert ours.do_bench is replay or callable(ours.do_bench)


def test_cache_results_is_accepted_in_tritons_position() -> None:
    args = (block_configs(32, 64), ["n"], None, None, None, None, None, None, None, False, None, True)
    kernel = tunebook.autotune(*args)(add_kernel)
    assert kernel.cache_results is True
    launch(kernel)


def test_a_mode_it_cannot_read_fails_the_patch_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was a fallback to Triton's autotuner and a warning for every kernel decorated later."""
    monkeypatch.setenv("TUNEBOOK_MODE", "bogus")
    with pytest.raises(tunebook.ConfigurationError, match="TUNEBOOK_MODE"):
        tunebook.patch()
    assert not _patch.active()

"""Triton's hook protocol around one launch, written once.

Triton's Autotuner calls, around every benchmarked launch: the config's own ``pre_hook``,
then the autotuner's ``pre_hook`` (by default: zero the ``reset_to_zero`` arguments and
copy the ``restore_value`` ones), the launch, then ``post_hook`` (by default: copy the
``restore_value`` arguments back), also when the launch raised. After tuning, the
``reset_to_zero`` arguments are zeroed once more, so the caller's own launch starts from
zeros. :class:`Hooks` keeps those hooks with Triton's attribute names and runs them.

Result checking launches differently: the restoring post-hook would undo the very output
being compared, so a check launch skips the default hooks except the zeroing
(:meth:`Hooks.check_launch`; the check restores inputs itself).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._call import Call

Hook = Callable[..., Any]


class Hooks:
    """The hooks of one autotuner, as Triton names them: ``pre_hook``, ``post_hook``,
    ``user_defined_pre_hook``, ``user_defined_post_hook``, ``restore_copies``."""

    def __init__(
        self,
        reset_to_zero: Sequence[str],
        restore_value: Sequence[str],
        pre_hook: Hook | None,
        post_hook: Hook | None,
    ) -> None:
        self.reset_to_zero = list(reset_to_zero)
        self.restore_value = list(restore_value)
        self.restore_copies: dict[str, Any] = {}
        self.user_defined_pre_hook = pre_hook is not None
        self.user_defined_post_hook = post_hook is not None
        self.pre_hook: Hook = pre_hook if pre_hook is not None else self._default_pre_hook
        self.post_hook: Hook = post_hook if post_hook is not None else self._default_post_hook

    def _default_pre_hook(self, kwargs: dict[str, Any], reset_only: bool = False) -> None:
        for name in self.reset_to_zero:
            if kwargs.get(name) is not None:
                kwargs[name].zero_()
        if not reset_only and self.restore_value:
            self.restore_copies = {
                n: kwargs[n].clone() for n in self.restore_value if kwargs.get(n) is not None
            }

    def _default_post_hook(self, kwargs: dict[str, Any], exception: BaseException | None) -> None:
        for name, value in self.restore_copies.items():
            kwargs[name].copy_(value)
        self.restore_copies = {}

    def timed_launch(
        self, run: Callable[..., Any], call: Call, config: Any, defaults: Mapping[str, Any]
    ) -> Callable[[], None]:
        """A no-argument launch of ``config`` with the full protocol, for a benchmarker;
        ``defaults``: the options the launch leaves out (``Call.run_kwargs``)."""
        hook_args = {**call.nargs, **call.launch_kwargs(config)}
        current = call.run_kwargs(config, defaults)

        def launch() -> None:
            if config.pre_hook:
                config.pre_hook(hook_args)
            self.pre_hook(hook_args)
            try:
                run(*call.args, grid=call.grid, warmup=False, **current)
            except Exception as exc:
                try:
                    self.post_hook(hook_args, exception=exc)
                finally:
                    raise
            self.post_hook(hook_args, exception=None)

        return launch

    def check_launch(
        self, run: Callable[..., Any], call: Call, config: Any, defaults: Mapping[str, Any]
    ) -> None:
        """One launch of ``config`` for result checking (see the module docstring)."""
        hook_args = {**call.nargs, **call.launch_kwargs(config)}
        current = call.run_kwargs(config, defaults)
        if config.pre_hook:
            config.pre_hook(hook_args)
        if self.user_defined_pre_hook:
            self.pre_hook(hook_args)
        else:
            self._default_pre_hook(hook_args, reset_only=True)
        run(*call.args, grid=call.grid, warmup=False, **current)
        if self.user_defined_post_hook:
            self.post_hook(hook_args, exception=None)

    def after_tuning(self, call: Call, config: Any) -> None:
        """As Triton: after benchmarking, the reset_to_zero arguments are zeroed again."""
        self.pre_hook(call.hook_args(config), reset_only=True)

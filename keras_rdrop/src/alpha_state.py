"""`AlphaState`: R-Drop's `alpha` at each training step, a sub-layer of
`RDropModel`.

The mirror of `AnchorState`, which holds the anchor's `beta`. It holds the
validated `alpha`, and, for a scheduled one, the step counter the schedules
are evaluated at (`step`, saved with the model), one logged value per
schedule (`trackers`), and the variables a plain callable's value is fed to
the step through (`values`, with the `feeds` that fill them from the host).
A float `alpha` creates no variable, so such models keep exactly their
variables.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_rdrop.src.alpha_schedule import (
    CurrentValue,
    advance,
    host_schedules,
    is_scheduled,
    log_names,
    step_counter,
)
from keras_rdrop.src.weight_schedules import HostScheduleFeed, feed, host_variable


class AlphaState(keras.layers.Layer):
    """`alpha`, its step counter, its logged values and its host feeds.

    Args:
        alpha: A validated `alpha` (`alpha_schedule.validate_alpha`): a
            float, a schedule, or a dict of them by output name.
        **kwargs: Passed to `keras.layers.Layer`.
    """

    def __init__(self, alpha: Any, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.alpha = alpha
        # The log name of each schedule (`alpha`, `alpha_<output>`).
        self.schedules = log_names(alpha)
        self.step = step_counter() if self.schedules else None
        self.trackers = [CurrentValue(name) for name in self.schedules]
        host = host_schedules(alpha)
        self.values = [host_variable(f"{name}_value") for name in host]
        self.feeds = list(zip(host, host.values(), self.values))
        self.built = True

    @property
    def enabled(self) -> bool:
        """Whether the second pass runs: a positive or scheduled `alpha`.

        A schedule may be 0 now and positive later, so it counts as on.
        """
        if is_scheduled(self.alpha):
            return True
        if isinstance(self.alpha, dict):
            return any(a > 0 for a in self.alpha.values())
        return self.alpha > 0

    def advance(self) -> dict:
        """Each schedule's value at this training step, by log name (logged);
        counts the step. Empty when nothing is scheduled."""
        if not self.schedules:
            return {}
        fed = {name: variable for name, _, variable in self.feeds}
        return advance(self.step, self.schedules, self.trackers, fed)

    def step_count(self) -> int:
        """The training steps taken so far (`step`), read on the host."""
        return int(ops.convert_to_numpy(self.step))

    def with_feed(self, callbacks):
        """`callbacks` and, for a plain-callable `alpha`, the callback that
        feeds it its value before each step (`fit`)."""
        if not self.feeds:
            return callbacks
        if isinstance(callbacks, keras.callbacks.CallbackList):
            raise TypeError(
                "An RDropModel whose `alpha` is a plain callable evaluates it in "
                "a callback of its own, which cannot join a CallbackList: pass "
                "`fit` a list of callbacks."
            )
        if isinstance(callbacks, keras.callbacks.Callback):
            callbacks = [callbacks]
        feed_alpha = HostScheduleFeed(self.feeds, lambda model: self.step_count())
        return [*(callbacks or []), feed_alpha]

    def feed_now(self) -> None:
        """Feeds a plain-callable `alpha` its value at the current step
        (`train_on_batch`)."""
        if self.feeds:
            feed(self.feeds, self.step_count())

    def load_own_variables(self, store):
        # A file written before `AlphaState` existed holds these variables in
        # the model's own store, which `RDropModel` hands here; this layer's
        # own entry is then empty.
        if list(store.keys()):
            super().load_own_variables(store)

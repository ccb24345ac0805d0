"""The engine's scheduler and controller protocol: parking, preemption, isolation, dispatch counts."""

from __future__ import annotations

import numpy as np
import pytest

from timjax.engine import Action, Engine, PlainController, Request

N_NEW = 8


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(7)
    return [rs.randint(0, 256, n).tolist() for n in (6, 13, 3, 21)]


class ParkingController(PlainController):
    """Parks after ``park_after`` sampled tokens for ``polls`` polls, then feeds ``inject`` (a tool result, say)
    followed by nothing else: the next sample comes after the injected tokens."""

    def __init__(self, *, park_after: int, polls: int, inject: list[int], log: list, **kw):
        super().__init__(**kw)
        self.park_after, self.polls, self.inject, self.log = park_after, polls, inject, log
        self.parked_polls = 0

    def on_token(self, token, seq):
        action = super().on_token(token, seq)
        if len(seq.generated) == self.park_after and action.finish is None:
            self.log.append(("park", len(self.log)))
            return Action(feed=action.feed, park=True)
        return action

    def poll(self, seq):
        self.parked_polls += 1
        self.log.append(("poll", self.parked_polls))
        if self.parked_polls < self.polls:
            return None
        return Action(feed=list(self.inject))


class ForcingController(PlainController):
    """The same tokens as ParkingController without parking: the injected tokens follow the sampled one."""

    def __init__(self, *, park_after: int, inject: list[int], **kw):
        super().__init__(**kw)
        self.park_after, self.inject = park_after, inject

    def on_token(self, token, seq):
        action = super().on_token(token, seq)
        if len(seq.generated) == self.park_after and action.finish is None:
            return Action(feed=action.feed + list(self.inject))
        return action


def _run(model, reqs, **kw):
    kw.setdefault("max_batch", 4)
    kw.setdefault("page_size", 4)
    kw.setdefault("max_seq_len", 64)
    return Engine(model, check_cache=True, **kw).run(reqs)


def test_parked_sequence_waits_while_the_others_decode(tiny_pair, prompts):
    _, model = tiny_pair
    inject = [5, 6, 7]
    log: list = []

    def on_token(i, tok):
        log.append(("token", i))

    parked = ParkingController(park_after=2, polls=4, inject=inject, log=log, max_new_tokens=N_NEW)
    plain = [PlainController(max_new_tokens=N_NEW) for _ in prompts[1:]]
    reqs = [Request(prompts[0], N_NEW, controller=parked)] + [
        Request(p, N_NEW, controller=c) for p, c in zip(prompts[1:], plain)]
    engine = Engine(model, max_batch=4, page_size=4, max_seq_len=64, check_cache=True)
    results = engine.run(reqs, on_token=on_token)
    assert parked.parked_polls == 4 and all(r.finish_reason == "length" for r in results)
    polls = [i for i, e in enumerate(log) if e[0] == "poll"]
    between = log[polls[0]:polls[-1]]
    assert ("token", 0) not in between and any(e[0] == "token" for e in between)  # the others went on
    # the same token stream without parking: the injected tokens written straight after the sampled one
    forced = ForcingController(park_after=2, inject=inject, max_new_tokens=N_NEW)
    ref = _run(model, [Request(prompts[0], N_NEW, controller=forced)])[0]
    assert results[0].tokens == ref.tokens
    alone = _run(model, [Request(p, N_NEW) for p in prompts[1:]])
    assert [r.tokens for r in results[1:]] == [r.tokens for r in alone]

"""Interleaved step timing (timm_momentum.tools.timing): the rotating order, repeats, and configurations timed each
in a process of its own. No timing asserts."""
import functools
import os

import pytest
import torch
import torch.nn as nn

from timm_momentum.tools import timing


def test_timing_interleaves_configurations_and_rotates_their_order(monkeypatch):
    order = []

    def fake_timer(models, x, target, amp):
        def step(label):
            order.append(label)
            return {'a': 1.0, 'b': 2.0, 'c': 3.0}[label] * len(order)  # later steps are slower: a drifting machine
        return step

    monkeypatch.setattr(timing, 'step_timer', fake_timer)
    medians = timing.time_steps(dict.fromkeys('abc'), None, None, None, warmup=1, steps=2, repeats=2)
    assert order == list('abc' 'bca' 'cab' 'abc' 'bca')  # warm-up round, then 2 repeats of 2 rounds
    # each repeat's median is of its own rounds: repeat 0 has a at steps 6 and 8, b at 4 and 9 (x 2), c at 5 and 7
    # (x 3); repeat 1 a at 10 and 15, b at 11 and 13, c at 12 and 14
    assert medians == {'a': [7.0, 12.5], 'b': [13.0, 24.0], 'c': [18.0, 39.0]}


class _Recorder(nn.Module):
    """A linear classifier that writes the id of the process running each forward to a file of its own."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.linear = path, nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.path, 'a') as f:
            f.write(f'{os.getpid()}\n')
        return self.linear(x.flatten(1))


def _recorder(path: str) -> nn.Module:
    return _Recorder(path)


def _broken() -> nn.Module:
    raise RuntimeError('no such model')


def test_each_configuration_steps_in_a_process_of_its_own_fresh_for_each_repeat(tmp_path):
    builders = {name: functools.partial(_recorder, str(tmp_path / name)) for name in ('a', 'b')}
    x, target = torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))
    faults = {}
    medians = timing.time_steps_apart(builders, x, target, None, warmup=1, steps=2, repeats=2, faults=faults)
    assert set(medians) == {'a', 'b'} and all(len(m) == 2 and min(m) > 0 for m in medians.values())
    pids = {name: (tmp_path / name).read_text().split() for name in builders}
    # per repeat: the warm-up step and 2 timed steps of a configuration in one process, a fresh one each repeat ...
    runs = {name: [p[:3], p[3:]] for name, p in pids.items()}
    assert all(len(p) == 6 and len(set(r[0])) == 1 and len(set(r[1])) == 1 and r[0][0] != r[1][0]
               for p, r in zip(pids.values(), runs.values()))
    # ... each configuration's its own, none of them this process
    assert not set(pids['a']) & set(pids['b']) and str(os.getpid()) not in set(pids['a']) | set(pids['b'])
    assert [len(f) for f in faults.values()] == [4, 4] and all(n >= 0 for f in faults.values() for n in f)


def test_faults_in_one_process_count_the_timed_steps(monkeypatch):
    monkeypatch.setattr(timing, 'step_timer', lambda models, x, target, amp: lambda label: 1.0)
    faults = {}
    timing.time_steps(dict.fromkeys('ab'), None, None, None, warmup=2, steps=3, repeats=2, faults=faults)
    assert [len(f) for f in faults.values()] == [6, 6]


def test_a_configuration_that_fails_to_build_is_recorded_and_the_rest_timed(tmp_path):
    builders = {'good': functools.partial(_recorder, str(tmp_path / 'good')), 'bad': _broken}
    x, target = torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))
    failures = {}
    medians = timing.time_steps_apart(builders, x, target, None, warmup=0, steps=1, repeats=2, failures=failures)
    assert list(medians) == ['good'] and len(medians['good']) == 2  # the failed one not built again
    assert failures == {'bad': 'timing: RuntimeError: no such model'}
    with pytest.raises(RuntimeError, match='bad: RuntimeError: no such model'):
        timing.time_steps_apart(builders, x, target, None, warmup=0, steps=1)

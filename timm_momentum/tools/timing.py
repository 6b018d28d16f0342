"""Interleaved timing of training steps (benchmarks/MEASURE.md): configurations stepped in rotating order, round
after round, in this process or each in a process of its own.

Why a process of its own, on CPU: configurations timed in one process share glibc's heap. After the step with the
largest footprint frees its tensors, glibc returns part of the heap to the system; that configuration's next step
takes page faults to map it again, while a smaller one fits in what stayed mapped and takes none. So the largest
configuration pays for the heap it shares, and only it does (benchmarks/RESULTS.md has the counts). In a process of
its own each configuration keeps the heap of its own steps, as a training run does. How much of the heap a process
faults in each step still differs from one process to the next (two identical configurations read 20 000 and 42 000
minor faults a step at resnet101), so each repeat starts fresh processes, and the median over repeats rests on
several such draws instead of carrying one process's through the whole run.
"""
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .memory import autocast, train_step, warm_up_compiled

__all__ = ['step_timer', 'interleave', 'time_steps', 'time_steps_apart', 'minor_faults']


def minor_faults() -> int:
    """Minor page faults of this process so far (each maps a page of memory on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_timer(models: Dict[str, nn.Module], x: torch.Tensor, target: torch.Tensor,
               amp: Optional[str]) -> Callable[[str], float]:
    """A function that trains the named model for one step (SGD, lr 1e-4) and returns the seconds it took."""
    device = x.device.type
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(label: str) -> float:
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, amp):
            train_step(models[label], x, target, optimizers[label])
        if device == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def interleave(step: Callable[[str], float], labels: Sequence[str], warmup: int, steps: int, repeats: int = 1,
               failures: Optional[Dict[str, str]] = None, reason: Callable[[BaseException], str] = repr
               ) -> Dict[str, List[float]]:
    """Each configuration's median step time in each of ``repeats`` blocks of ``steps`` rounds, after ``warmup``.

    A round times one ``step(label)`` of every configuration (A B C A B C ...), starting one configuration later
    each round. With ``failures``, a configuration whose step raises is dropped and ``reason`` of its error recorded
    there; without, the error propagates.
    """
    times: Dict[str, List[List[float]]] = {k: [[] for _ in range(repeats)] for k in labels}
    live = list(labels)
    for round_ in range(warmup + steps * repeats):
        start = round_ % len(live) if live else 0
        for label in live[start:] + live[:start]:
            try:
                seconds = step(label)
            except Exception as e:
                if failures is None:
                    raise
                failures[label] = f'timing: {reason(e)}'
                live.remove(label)
                continue
            if round_ >= warmup:
                times[label][(round_ - warmup) // steps].append(seconds)
    return {k: [statistics.median(block) for block in times[k]] for k in live}


def time_steps(models: Dict[str, nn.Module], x: torch.Tensor, target: torch.Tensor, amp: Optional[str],
               warmup: int, steps: int, failures: Optional[Dict[str, str]] = None, repeats: int = 1,
               reason: Callable[[BaseException], str] = repr, faults: Optional[Dict[str, List[int]]] = None
               ) -> Dict[str, List[float]]:
    """``interleave`` over training steps of ``models``, all in this process; ``faults``, where given, is filled
    with each one's minor page faults per timed step."""
    step = step_timer(models, x, target, amp)
    counted: Dict[str, List[int]] = {}
    medians = interleave(_counting_faults(step, counted), list(models), warmup, steps, repeats, failures, reason)
    if faults is not None:  # each configuration steps once per round: its first ``warmup`` steps warmed up
        faults.update({label: counted[label][warmup:] for label in medians})
    return medians


def _counting_faults(step: Callable[[str], float], faults: Dict[str, List[int]]) -> Callable[[str], float]:
    def counted(label: str) -> float:
        before = minor_faults()
        seconds = step(label)
        faults.setdefault(label, []).append(minor_faults() - before)
        return seconds

    return counted


def _worker(build: Callable[[], nn.Module], x: torch.Tensor, target: torch.Tensor, amp: Optional[str],
            threads: int, connection) -> None:
    """A process timing one configuration: build it (a compiled one warmed up until it stops recompiling), then
    answer each 'step' with ('ok', (seconds, minor page faults)) or ('failed', error) until told 'stop'."""
    torch.set_num_threads(threads)
    try:
        model = build()
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            warm_up_compiled(model, x, target, None, amp)
        step = step_timer({'model': model}, x, target, amp)
    except Exception as e:
        connection.send(('failed', f'{type(e).__name__}: {e}'))
        return
    faults: Dict[str, List[int]] = {}
    step = _counting_faults(step, faults)
    connection.send(('ready', None))
    while connection.recv() == 'step':
        try:
            seconds = step('model')
            connection.send(('ok', (seconds, faults['model'][-1])))
        except Exception as e:
            connection.send(('failed', f'{type(e).__name__}: {e}'))


class _Remote:
    """The parent's end of the timing processes: one per configuration, stepped one at a time."""

    def __init__(self, builders: Dict[str, Callable[[], nn.Module]], x: torch.Tensor, target: torch.Tensor,
                 amp: Optional[str]) -> None:
        context = torch.multiprocessing.get_context('spawn')
        self.connections, self.processes = {}, []
        self.faults: Dict[str, List[int]] = {label: [] for label in builders}
        for label, build in builders.items():
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(build, x, target, amp, torch.get_num_threads(), theirs),
                                      daemon=True)
            process.start()
            theirs.close()
            self.connections[label] = mine
            self.processes.append(process)

    def ready(self, failures: Optional[Dict[str, str]]) -> List[str]:
        """The configurations whose process built its model; the others' errors go to ``failures`` (or raise)."""
        live = []
        for label, connection in self.connections.items():
            status, detail = self._receive(label)
            if status == 'ready':
                live.append(label)
            elif failures is None:
                raise RuntimeError(f'{label}: {detail}')
            else:
                failures[label] = f'timing: {detail}'
        return live

    def step(self, label: str) -> float:
        self.connections[label].send('step')
        status, detail = self._receive(label)
        if status != 'ok':
            raise RuntimeError(detail)
        seconds, faults = detail
        self.faults[label].append(faults)
        return seconds

    def _receive(self, label: str) -> Tuple[str, object]:
        try:
            return self.connections[label].recv()
        except EOFError:
            return 'failed', 'its timing process ended without an answer (killed, out of memory?)'

    def close(self) -> None:
        for connection in self.connections.values():
            try:
                connection.send('stop')
            except (BrokenPipeError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def time_steps_apart(builders: Dict[str, Callable[[], nn.Module]], x: torch.Tensor, target: torch.Tensor,
                     amp: Optional[str], warmup: int, steps: int, failures: Optional[Dict[str, str]] = None,
                     repeats: int = 1, faults: Optional[Dict[str, List[int]]] = None,
                     reason: Callable[[BaseException], str] = repr) -> Dict[str, List[float]]:
    """``interleave`` over training steps, each configuration in a process of its own (spawned, with this process's
    thread count), stepped one at a time, so none runs on heap another one's steps left mapped. Each repeat starts
    fresh processes and warms them up anew.

    Args:
        builders: Picklable functions that build each configuration's model (a compiled one is warmed up until it
            stops recompiling before the rounds start).
        x: The batch, sent to every process.
        target: Its labels.
        amp: ``bf16``, ``fp16`` or None.
        warmup: Rounds before timing.
        steps: Timed rounds per repeat.
        failures: Where a configuration that fails (to build, or in a step) is recorded and dropped; without it the
            error raises.
        repeats: Blocks of ``steps`` rounds, each in fresh processes, after ``warmup`` rounds, with its own median.
        faults: Filled with each configuration's minor page faults per timed step, where given.
        reason: Turns a step's error into the text recorded in ``failures``.
    """
    medians: Dict[str, List[float]] = {label: [] for label in builders}
    counted: Dict[str, List[int]] = {label: [] for label in builders}
    for _ in range(repeats):
        remote = _Remote({k: build for k, build in builders.items() if k in medians}, x, target, amp)
        try:
            live = remote.ready(failures)
            block = interleave(remote.step, live, warmup, steps, 1, failures, reason)
        finally:
            remote.close()
        for label in list(medians):
            if label in block:
                medians[label] += block[label]
                counted[label] += remote.faults[label][warmup:]
            else:  # failed in this repeat (recorded in ``failures``): dropped from the rest
                del medians[label]
    if faults is not None:
        faults.update({label: counted[label] for label in medians})
    return medians

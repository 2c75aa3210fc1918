"""Parallel groups for ``longconv mqar`` on a CPU host: config key ``workers: N``.

XLA's CPU backend spreads an MQAR step's many small ops over its threads poorly: the quick sweep's Hyena
step takes 29 ms on 2 cores and 36 ms on one, so two groups trained at once, each in its own process
pinned to one core, finish sooner than the same two trained one after another on both cores. (Not so for
large steps: the paper cell's batch-512 Hyena step takes 2.4 s on two cores and 3.5 CPU-s on one.) Each worker
process pins itself to its share of this process's CPUs (Linux; elsewhere the workers run unpinned), asks
this process for the next group over its own pipe and trains it with `lm.mqar.runner.train_groups`, without
progress bars (its per-evaluation lines still print, with the tokens/s). Records come back over the pipe;
this process alone writes ``results.jsonl``. Each record carries ``cpus``, the CPUs its group trained on.

Stopping works as in one process: ``--time-budget`` is shared (every worker stops before the same
deadline), and Ctrl-C or SIGTERM here sends each worker one SIGTERM, on which it checkpoints and records its
cut runs (stop ``interrupted``); a second Ctrl-C kills the workers at once.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time
import traceback

from lm.mqar import runner
from lm.signals import interrupts_deferred, interrupts_kept, sigterm_as_interrupt


def cpu_shares(workers: int) -> list[list[int]]:
    """This process's CPUs split into ``workers`` contiguous shares (fewer if there are fewer CPUs)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = max(1, min(workers, len(cpus)))
    return [cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n] for i in range(n)]


def _send(conn, message) -> None:
    with interrupts_deferred(repeat_acts_now=False):  # a stop request must not cut a message in two
        conn.send(message)


def _worker_main(cpus: list[int], cfg, out_dir: pathlib.Path, deadline_wall: float | None, verbose: bool,
                 conn) -> None:
    """One worker process: pin to ``cpus``, then train the groups the parent sends over ``conn`` (a
    duplex pipe: the worker asks with ("next", None), the parent answers with a group or None) and send back
    ("record", record) for every ended or cut run, ("error", traceback) if training failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which sends one SIGTERM
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # before JAX starts: XLA sizes its thread pool from the affinity
        cpus = sorted(os.sched_getaffinity(0))  # what the records report: the CPUs really used
    runner.keep_freed_memory()
    deadline = None if deadline_wall is None else time.perf_counter() + (deadline_wall - time.time())

    def groups():
        while True:
            _send(conn, ("next", None))
            group = conn.recv()
            if group is None:
                return
            yield group

    try:
        with sigterm_as_interrupt():
            runner.train_groups(cfg, groups(), out_dir, deadline=deadline, progress=False, verbose=verbose,
                                on_record=lambda rec: _send(conn, ("record", dict(rec, cpus=cpus))))
    except KeyboardInterrupt:
        pass  # the cut runs were recorded and checkpointed by train_group
    except (runner.ConfigError, runner.MQARError) as e:  # a problem with the input: its message says it all
        _send(conn, ("error", str(e)))
    except Exception:
        _send(conn, ("error", traceback.format_exc()))
    finally:
        conn.close()


def train_in_workers(cfg, groups: list, out_dir: pathlib.Path, *, shares: list[list[int]],
                     deadline: float | None = None, verbose: bool = False, on_record=None) -> None:
    """Train ``groups`` in one worker process per CPU share (see the module docstring), handing each worker
    the next group when it asks; ``deadline`` is a ``time.perf_counter()`` value; ``on_record(record)``
    runs here for every record a worker sends. Raises KeyboardInterrupt after an interrupt once the workers
    have recorded their cut runs, and `runner.MQARError` with the worker's traceback if one failed."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")  # fork after JAX started its threads is unsafe
    deadline_wall = None if deadline is None else time.time() + (deadline - time.perf_counter())
    todo = list(groups)
    conns, procs = [], []
    for i, cpus in enumerate(shares):
        here, there = ctx.Pipe()
        procs.append(ctx.Process(target=_worker_main, name=f"mqar-worker-{i}",
                                 args=(cpus, cfg, out_dir, deadline_wall, verbose, there)))
        procs[-1].start()
        there.close()  # the worker holds the other end: its exit ends the pipe here (EOFError)
        conns.append(here)
    runner._say(f"mqar: {len(todo)} groups on {len(procs)} worker processes, CPUs {shares} (no progress bars)")
    errors: list[str] = []
    stopping = False

    def stop_workers() -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker checkpoints and records its cut runs

    open_conns = list(conns)
    with interrupts_kept():  # a Ctrl-C dropped in a gc callback here would be lost: the workers ignore SIGINT
        while open_conns:
            try:
                ready = wait(open_conns, timeout=1.0)  # at least once a second: a kept Ctrl-C acts below
                with interrupts_deferred(repeat_acts_now=False):
                    for conn in ready:
                        try:
                            kind, payload = conn.recv()
                        except (EOFError, OSError):  # the worker exited (or died)
                            open_conns.remove(conn)
                            continue
                        if kind == "next":
                            conn.send(todo.pop(0) if todo and not stopping else None)
                        elif kind == "record" and on_record is not None:
                            on_record(payload)
                        elif kind == "error":
                            errors.append(payload)
                            stopping = True
                            stop_workers()
            except KeyboardInterrupt:
                if stopping and not errors:
                    for p in procs:
                        p.kill()
                    raise
                stopping = True
                runner._say("mqar: stopping the workers; they record and checkpoint their cut runs "
                            "(Ctrl-C again to kill them)")
                stop_workers()
    for p in procs:
        p.join()
    failed = [f"worker {i} ended with exit code {p.exitcode}" for i, p in enumerate(procs)
              if p.exitcode not in (0, None) and not stopping]
    if errors or failed:
        raise runner.MQARError(f"a worker failed: {(errors + failed)[0]}")
    if stopping:
        raise KeyboardInterrupt

"""A device's lone-job worker (issue 24): every core as threads, lent to the slot whose job finds the device's
other slots idle.

A CPU device's slots share its cores (on 2 cores, 2 workers x 1 thread: the split that carries the most jobs/s).
One thread is slower than the whole CPU for a job alone on the node (1.35-1.44x plain faster-whisper with every
core, on 2 cores), and a worker's thread count is fixed when its model is loaded (ctranslate2's OpenMP team), so
the lone job decodes elsewhere: on a worker of its own with every core, one per device, which no slot owns. A job
takes it when, as it starts, no other slot of the device has a job in flight and the lone-job worker is ready
and not lent; otherwise it decodes on its slot's own worker. Its lease, sections and report stay its slot's.

What this costs: one more worker's memory (``devices.choose_slots`` plans it only where memory holds it), and
while a lone job that began alone still runs, jobs that start beside it share the cores with its threads.
"""

from __future__ import annotations

from .supervisor import Worker, WorkerState


#: The lone-job worker's name in logs, metrics and status (it leases nothing: a job's lease is its slot's).
LONE_RESOURCE = "cpu/lone"


class LoneWorker:
    """Lends ``worker`` to the slot whose job finds every other slot of the device idle (see the module's
    docstring). ``take`` and ``give_back`` pair once per job, on the event loop."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.lent_to: str | None = None  # the slot's resource while lent
        self.jobs_total = 0
        self._running = 0  # jobs in flight on the device's slots, wherever they decode

    def take(self, own: Worker) -> Worker:
        """The worker for a job that starts on ``own``'s slot: this lone-job worker when no other job of the device
        is in flight and it is ready and not lent, else ``own``. Pair with ``give_back``."""
        alone = self._running == 0 and self.lent_to is None and self.worker.state is WorkerState.ready
        self._running += 1
        if not alone:
            return own
        self.lent_to = own.resource
        self.jobs_total += 1
        return self.worker

    def give_back(self, worker: Worker) -> None:
        """The job that ``take`` gave ``worker`` has ended."""
        self._running -= 1
        if worker is self.worker:
            self.lent_to = None

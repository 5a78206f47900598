"""
Stopping a run without losing it: the first Ctrl-C or SIGTERM asks the trainer to save a checkpoint and stop (within
one micro-batch on one process; at the end of the step under DDP, where every rank must stop together), a second
Ctrl-C quits at once without saving, and run_trainer turns what ends a run into a message and an exit code. A run
that stopped and saved exits as shells expect of a signal: 130 after Ctrl-C (SIGINT), 143 after SIGTERM (Stopped), so
`python train_lm.py ... && python sample.py ...` samples only a finished model.
"""

import os
import signal
import sys

import torch

from cli import quit_interrupted
from training import NonFiniteLoss


class StopNow(Exception):
    """Raised by StopRequest.poll() once a stop was asked for: the trainer saves the state it had at the start of the
    iteration (a half-done step or evaluation is dropped, and redone on --resume) and exits."""


class Stopped(SystemExit):
    """Raised by a trainer once it has saved after a stop request: the exit status 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class StopRequest:
    """The first Ctrl-C or SIGTERM sets a flag; poll(), called before each micro-batch and each evaluation batch, then
    raises StopNow, so the trainer stops within one micro-batch wherever it is. Under DDP the ranks must stop together:
    poll() does nothing and the flag is agreed on at the end of the step (agree_on_step). A second Ctrl-C raises
    KeyboardInterrupt: the trainer quits without saving (run_trainer). Python runs handlers between operations, so
    both wait for the operation under way (a big matmul); two presses within one operation count as one."""

    def __init__(self, ddp=False):
        self.requested, self.immediate = False, not ddp
        self.signum = 0  # the first signal received (the exit status is 128 + it), 0 until one is
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            when = "at the next micro-batch" if self.immediate else "after this step"
            say(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping {when} "
                "(Ctrl-C again to quit without saving)\n")
        self.requested, self.signum = True, self.signum or signum

    def poll(self):
        if self.requested and self.immediate:
            raise StopNow


def say(text):
    """Print from a signal handler: straight to the file descriptor, as print() would fail if the signal came while
    the main thread was inside print() (sys.stdout's lock is not reentrant)."""
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except (OSError, ValueError):  # no file descriptor (stdout captured in memory)
        print(text, end="", flush=True)


def run_trainer(main):
    """Run a trainer's main(): a NaN or inf loss exits with its message, Ctrl-C outside the training loop (or a
    second one inside it) quits without a traceback; the process group is always torn down."""
    try:
        main()
    except NonFiniteLoss as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:  # checkpoints are written atomically: the one on disk is whole
        quit_interrupted("quitting without saving; the checkpoint on disk is the last one saved")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

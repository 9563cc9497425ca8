"""Run ``patch_wise_dino.py`` (same arguments, same exit statuses), killing or signalling this process at
a chosen point.

Crash tests start it as a subprocess, directly or under torchrun. The kill points, read from the
environment and armed only on a first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0):

    PWSELF_KILL_AT=EPOCH:ITERATION  die inside that iteration of the epoch, after the optimizer step and
                                    before the teacher's EMA update
    PWSELF_SIGNAL_AT=EPOCH:ITERATION:SIGNAL
                                    send this process SIGNAL (e.g. SIGTERM) at that same point; with
                                    PWSELF_SIGNAL_GROUP=1 its whole process group (its data workers too)
    PWSELF_KILL_IN_SAVE=N           die inside the N-th write of checkpoint.pth, after its temporary file
                                    is complete and before it is renamed into place
    PWSELF_KILL_RANK=R              only the process of this rank is hit (default 0)

After training, every process saves its teacher to ``<output_dir>/teacher_rank<R>.pt``.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patch_wise_dino  # noqa: E402
import utils  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def act_inside_iteration(epoch: int, iteration: int, action=die) -> None:
    """Run ``action`` (by default: die) in ``utils.ema_update`` of that iteration: the student is updated, the
    teacher is not."""
    step, ema_update, current = patch_wise_dino.Trainer.step, utils.ema_update, {}

    def recording_step(self, images, geometry, epoch_, iteration_, iteration_in_epoch):
        current["at"] = (epoch_, iteration_in_epoch)
        return step(self, images, geometry, epoch_, iteration_, iteration_in_epoch)

    def acting_ema_update(*args):
        if current.get("at") == (epoch, iteration):
            action()
        ema_update(*args)

    patch_wise_dino.Trainer.step = recording_step
    utils.ema_update = acting_ema_update


def kill_inside_save(count: int) -> None:
    """Die in the ``count``-th rename of a finished temporary onto checkpoint.pth."""
    replace, renames = os.replace, []

    def dying_replace(source, destination):
        if Path(destination).name == "checkpoint.pth":
            renames.append(destination)
            if len(renames) == count:
                die()
        replace(source, destination)

    os.replace = dying_replace


def arm_kill_points() -> None:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return
    if int(os.environ.get("PWSELF_KILL_RANK", 0)) != int(os.environ.get("RANK", 0)):
        return
    if "PWSELF_KILL_AT" in os.environ:
        act_inside_iteration(*map(int, os.environ["PWSELF_KILL_AT"].split(":")))
    if "PWSELF_SIGNAL_AT" in os.environ:
        epoch, iteration, name = os.environ["PWSELF_SIGNAL_AT"].split(":")
        if os.environ.get("PWSELF_SIGNAL_GROUP") == "1":  # sent by another process, as SLURM or a terminal do
            group = ["kill", "-s", name.removeprefix("SIG"), "--", f"-{os.getpgrp()}"]
            act_inside_iteration(int(epoch), int(iteration), lambda: subprocess.run(group))
        else:
            act_inside_iteration(int(epoch), int(iteration), lambda: os.kill(os.getpid(), getattr(signal, name)))
    if "PWSELF_KILL_IN_SAVE" in os.environ:
        kill_inside_save(int(os.environ["PWSELF_KILL_IN_SAVE"]))


def train_and_save_teacher(args) -> None:
    trainer = patch_wise_dino.run_from_command_line(args)
    torch.save(trainer.teacher.state_dict(), Path(trainer.args.output_dir) / f"teacher_rank{utils.get_rank()}.pt")


if __name__ == "__main__":
    arm_kill_points()
    utils.run_script(train_and_save_teacher, patch_wise_dino.get_args_parser())

"""interrupts: SIGTERM raised like Ctrl-C inside ``stoppable``, and the exit codes a shell
would report for each."""

import os
import signal
import time

import pytest

from cifar_resnet import interrupts


def test_sigterm_inside_is_a_keyboard_interrupt_and_exits_143():
    seen = []
    with pytest.raises(SystemExit) as exit_:
        with interrupts.stoppable():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises as soon as the signal lands
            except KeyboardInterrupt as stop:
                seen.append(interrupts.stop_word(stop))
                raise
    assert seen == ["terminated"] and exit_.value.code == 128 + signal.SIGTERM
    assert exit_.value.__suppress_context__  # no traceback of where the stop landed


def test_ctrl_c_exits_130_and_the_previous_handler_is_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        with interrupts.stoppable():
            assert signal.getsignal(signal.SIGTERM) is not before
            raise KeyboardInterrupt
    assert exit_.value.code == 128 + signal.SIGINT
    assert interrupts.stop_word(KeyboardInterrupt()) == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_other_errors_and_normal_exits_pass_through():
    with pytest.raises(ValueError):
        with interrupts.stoppable():
            raise ValueError("not a stop")
    with interrupts.stoppable():
        pass

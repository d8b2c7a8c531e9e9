"""Noticing that the app's terminal has gone: a closed window, a dropped ssh link, a killed tmux.

A terminal that hangs up does not always signal the app. The kernel sends SIGHUP to the session
leader only, and the app hears of it when that leader exits; a leader that outlives the hang-up
leaves the app unsignalled (`make run` is one: make catches SIGHUP and waits for its child). Every
read of the terminal then returns end-of-file at once, and Textual's input thread spins on it at
100% CPU for as long as the machine runs. So the app also polls its terminal for POLLHUP.
"""

from __future__ import annotations

import os
import select

HANG_UP_CHECK_S = 1.0   # how often the app looks; a poll costs microseconds
HUNG_UP_EXIT_STATUS = 128 + 1   # what a shell reports for a process ended by SIGHUP (1)


def can_watch(fd: int) -> bool:
    """Whether `fd` is a terminal this platform can poll (not Windows, not a pipe)."""
    return hasattr(select, "poll") and os.isatty(fd)


def hung_up(fd: int) -> bool:
    """True once the terminal on `fd` has hung up."""
    poller = select.poll()
    poller.register(fd, 0)   # hang-up, error and invalid are reported whatever is asked for
    try:
        events = poller.poll(0)
    except OSError:
        return True
    return any(mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, mask in events)

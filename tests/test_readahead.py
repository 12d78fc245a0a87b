"""ReadAhead: the next pool's images are read in one background thread (io/readahead.py)."""

import threading
import time

import numpy as np
import pytest

from gerelion_dask.io.readahead import ReadAhead


class Reader:
    """Counts calls per key and the most reads ever inside at once (oracle for 'one at a time')."""

    def __init__(self, delay=0.0):
        self.calls, self.inside, self.most, self.delay = {}, 0, 0, delay
        self.lock = threading.Lock()
        self.threads = set()

    def __call__(self, key):
        def read():
            with self.lock:
                self.calls[key] = self.calls.get(key, 0) + 1
                self.inside += 1
                self.most = max(self.most, self.inside)
                self.threads.add(threading.get_ident())
            time.sleep(self.delay)
            with self.lock:
                self.inside -= 1
            return np.full(3, key, dtype=np.float32)
        return read


def test_a_read_started_ahead_is_taken_once_and_not_repeated():
    # oracle: the reader's call count -- the take of a started key reads nothing again
    r = Reader()
    with ReadAhead() as ahead:
        ahead.start(5, r(5))
        got = ahead.take(5, r(5))
    np.testing.assert_array_equal(got, np.full(3, 5, dtype=np.float32))
    assert r.calls == {5: 1}
    assert (ahead.hits, ahead.misses) == (1, 0)


def test_take_without_a_read_ahead_reads_now_in_the_reader_thread():
    r = Reader()
    with ReadAhead() as ahead:
        got = ahead.take(7, r(7))
    np.testing.assert_array_equal(got, np.full(3, 7, dtype=np.float32))
    assert r.calls == {7: 1} and (ahead.hits, ahead.misses) == (0, 1)
    assert threading.get_ident() not in r.threads  # read by the reader thread, not the caller


def test_reads_never_overlap_and_old_keys_are_dropped():
    # oracle: a counter of reads in progress never exceeds 1, although the caller takes a key that was not started
    # while a slow read ahead is in flight; depth 2: the oldest of three pending keys is read again when taken
    r = Reader(delay=0.05)
    with ReadAhead(depth=2) as ahead:
        ahead.start(1, r(1))
        ahead.take(9, r(9))  # a miss while 1 is being read
        ahead.start(2, r(2))
        ahead.start(3, r(3))
        ahead.start(4, r(4))  # 2 dropped
        for k in (3, 4, 2):
            np.testing.assert_array_equal(ahead.take(k, r(k)), np.full(3, k, dtype=np.float32))
    assert r.most == 1
    assert r.calls[2] == 2 and r.calls[3] == 1 and r.calls[4] == 1


def test_an_error_of_a_read_ahead_is_raised_by_its_take():
    def bad():
        raise OSError("truncated chunk 3")

    with ReadAhead() as ahead:
        ahead.start("x", bad)
        with pytest.raises(OSError, match="truncated chunk 3"):
            ahead.take("x", bad)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        ReadAhead(depth=0)


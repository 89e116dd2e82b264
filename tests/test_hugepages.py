"""The start-up setting that gives XLA's large CPU buffers transparent huge pages."""

import sys

import pytest

from qtx import hugepages


@pytest.fixture
def madvise_linux(monkeypatch):
    monkeypatch.setattr(hugepages, "_thp_madvise", lambda: True)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))


def test_tunable_is_added_once_and_keeps_other_tunables(madvise_linux):
    assert hugepages.huge_pages_env({})["GLIBC_TUNABLES"] == hugepages.TUNABLE
    env = hugepages.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}"
    assert env["A"] == "b"
    assert hugepages.huge_pages_env(env) is None  # already set: no second restart


def test_nothing_changes_when_opted_out_or_unsupported(madvise_linux, monkeypatch):
    assert hugepages.huge_pages_env({"QTX_HUGE_PAGES": "0"}) is None
    monkeypatch.setattr("platform.libc_ver", lambda: ("", ""))
    assert hugepages.huge_pages_env({}) is None
    monkeypatch.setattr(hugepages, "_thp_madvise", lambda: False)
    assert hugepages.huge_pages_env({}) is None


def test_no_restart_once_jax_is_running(madvise_linux, monkeypatch):
    import jax  # noqa: F401

    calls = []
    monkeypatch.setattr("os.execve", lambda *a: calls.append(a))
    hugepages.reexec_with_huge_pages()
    assert calls == []
